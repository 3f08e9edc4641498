"""Tiny random-config diffusers/transformers models used as numerical oracles in tests.

Configs follow the shapes of the corpus' generated files (lora_compat/corpus/gen_*.json.gz base_config):
the same module topology as the real SD1.5 / SDXL models, with tiny widths.
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch

SD15_UNET = dict(
    sample_size=8, in_channels=4, out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(8, 16, 16, 16), layers_per_block=2, norm_num_groups=4,
    cross_attention_dim=16, attention_head_dim=4, use_linear_projection=False,
)
SDXL_UNET = dict(
    sample_size=8, in_channels=4, out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(8, 16, 16), layers_per_block=2, norm_num_groups=4,
    transformer_layers_per_block=(1, 2, 2), attention_head_dim=(2, 4, 4),
    cross_attention_dim=16, use_linear_projection=True,
    addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=56,
)
CLIP_TINY = dict(vocab_size=1000, hidden_size=16, intermediate_size=64, projection_dim=16,
                 num_hidden_layers=2, num_attention_heads=4, bos_token_id=0, eos_token_id=2, pad_token_id=1)
CLIP_TINY_2 = dict(CLIP_TINY, hidden_size=8, intermediate_size=32, projection_dim=8, hidden_act="gelu")


def _randomize(module: torch.nn.Module, seed: int) -> None:
    """Give every parameter distinct random values (norm weights too), so deltas are visible."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)


def _finish(components: dict[str, torch.nn.Module], dtype: torch.dtype) -> dict[str, torch.nn.Module]:
    for module in components.values():
        module.eval().requires_grad_(False)
        if dtype != torch.float32:
            module.to(dtype)
    return components


def make_sd15_components(seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, torch.nn.Module]:
    """{"unet": UNet2DConditionModel, "text_encoder": CLIPTextModel}, tiny, random, eval mode."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    unet = UNet2DConditionModel(**SD15_UNET)
    te = CLIPTextModel(CLIPTextConfig(**CLIP_TINY))
    _randomize(unet, seed)
    _randomize(te, seed + 1)
    return _finish({"unet": unet, "text_encoder": te}, dtype)


def make_sdxl_components(seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, torch.nn.Module]:
    """{"unet", "text_encoder" (CLIPTextModel), "text_encoder_2" (CLIPTextModelWithProjection)}, tiny, random."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    unet = UNet2DConditionModel(**dict(SDXL_UNET, cross_attention_dim=CLIP_TINY["hidden_size"] + CLIP_TINY_2["hidden_size"]))
    te = CLIPTextModel(CLIPTextConfig(**CLIP_TINY))
    te2 = CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_TINY_2))
    _randomize(unet, seed)
    _randomize(te, seed + 1)
    _randomize(te2, seed + 2)
    return _finish({"unet": unet, "text_encoder": te, "text_encoder_2": te2}, dtype)


@contextmanager
def one_thread() -> Iterator[None]:
    """Run torch single-threaded: on these tiny tensors intra-op threading only adds (large, under load) overhead."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def tiny_tokenizer(root: Path):
    """A 6-word CLIP tokenizer written into ``root`` (no hub)."""
    import json

    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "a</w>": 2, "cat</w>": 3, "in</w>": 4, "snow</w>": 5}
    (root / "vocab.json").write_text(json.dumps(vocab))
    (root / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(root / "vocab.json"), str(root / "merges.txt"), model_max_length=8,
                         pad_token="<|endoftext|>")


def tiny_sd15_pipeline(components: dict, tokenizer):
    """A runnable StableDiffusionPipeline around the tiny SD1.5 components (tiny VAE, DDIM)."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline

    torch.manual_seed(11)
    vae = AutoencoderKL(block_out_channels=(8,), down_block_types=("DownEncoderBlock2D",),
                        up_block_types=("UpDecoderBlock2D",), latent_channels=4, norm_num_groups=4, sample_size=16)
    return StableDiffusionPipeline(vae=vae, text_encoder=components["text_encoder"], tokenizer=tokenizer,
                                   unet=components["unet"], scheduler=DDIMScheduler(), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
