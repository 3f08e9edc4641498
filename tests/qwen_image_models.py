"""Tiny Qwen-Image models and LoRA files for the tests (random weights, no hub): the transformer, a Qwen2.5-VL text
encoder, LoRAs written by peft + ``QwenImagePipeline.save_lora_weights`` and renamed by the inverse of diffusers'
converter, and the weights diffusers' own loader gives."""
from __future__ import annotations

from pathlib import Path

import diffusers
import torch
from safetensors.torch import load_file, save_file

from family_parity import fused_by_diffusers, peft_lora_file

#: a tiny Qwen-Image transformer (the shapes of diffusers' own pipeline tests)
TINY = dict(patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16,
            num_attention_heads=3, joint_attention_dim=16, guidance_embeds=False, axes_dims_rope=(8, 4, 4))
BLOCK = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
         "attn.add_v_proj", "attn.to_add_out", "img_mod.1", "txt_mod.1", "img_mlp.net.0.proj", "img_mlp.net.2",
         "txt_mlp.net.0.proj", "txt_mlp.net.2")
TOP = ("img_in", "txt_in", "proj_out", "norm_out.linear", "time_text_embed.timestep_embedder.linear_1",
       "time_text_embed.timestep_embedder.linear_2")
TARGETS = [f"transformer_blocks.{i}.{m}" for i in range(TINY["num_layers"]) for m in BLOCK] + list(TOP)
RANK, ALPHA = 4, 2.0


def tiny_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = diffusers.QwenImageTransformer2DModel(**TINY)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.5)
    return model.eval()


def tiny_text_encoder(seed: int = 0) -> torch.nn.Module:
    """A tiny Qwen2.5-VL (transformers 5 names: ``model.language_model.layers.N...``)."""
    import transformers

    torch.manual_seed(seed)
    config = transformers.Qwen2_5_VLConfig(
        text_config=dict(hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, vocab_size=64, rope_parameters={"rope_type": "default",
                         "rope_theta": 10000.0, "mrope_section": [1, 1, 2]}),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=16),
        vocab_size=64)
    return transformers.Qwen2_5_VLForConditionalGeneration(config).eval()


def diffusers_file(model: torch.nn.Module, path: Path, seed: int = 1) -> Path:
    """A LoRA on ``TARGETS`` written by peft + ``QwenImagePipeline.save_lora_weights``."""
    return peft_lora_file(model, path, diffusers.QwenImagePipeline, TARGETS, RANK, ALPHA, seed)


def renamed_file(diffusers_path: Path, path: Path, prefix: str, kohya: bool = False, suffixes: str = "kohya") -> Path:
    """The same LoRA under ``prefix`` + Qwen-Image's names (diffusers' converter read backwards): kohya suffixes
    (``lora_down``/``lora_up`` + ``alpha``), ``lora_A``/``lora_B`` + ``alpha``, or DiffSynth's
    ``lora_A.default`` (alpha = rank: the scale folded into ``lora_B``)."""
    out = {}
    for key, value in load_file(str(diffusers_path)).items():
        module, _, suffix = key.removeprefix("transformer.").rpartition(".lora_")
        name = prefix + (module.replace(".", "_") if kohya else module)
        down = suffix.startswith("A")
        if suffixes == "kohya":
            out[f"{name}.{'lora_down' if down else 'lora_up'}.weight"] = value
        elif suffixes == "peft":
            out[f"{name}.{'lora_A' if down else 'lora_B'}.weight"] = value
        else:
            out[f"{name}.{'lora_A' if down else 'lora_B'}.default.weight"] = value if down else value * ALPHA / RANK
            continue
        out[f"{name}.alpha"] = torch.tensor(ALPHA)
    save_file(out, str(path))
    return path


def diffusers_fused(model: torch.nn.Module, path: Path, strength: float = 1.0) -> dict[str, torch.Tensor]:
    """The weights diffusers gives: ``load_lora_weights`` + ``fuse_lora`` on a pipeline holding the model."""
    return fused_by_diffusers(diffusers.QwenImagePipeline, model, path, strength)
