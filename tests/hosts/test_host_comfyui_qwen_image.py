"""Qwen-Image on ComfyUI's real LoRA code (comfy/lora.py, sd.py, model_patcher.py at the pinned commit): the node
converts every layout to names ComfyUI's key maps take (its QwenImage branch and the generic ``lora_unet_`` /
``text_encoders.`` maps) and the patched weights equal diffusers' fused model; the Qwen2.5-VL keys reach the CLIP."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from hostmodels import STRENGTH, assert_close, tree
from lora_compat.adapters import comfyui

pytest.importorskip("diffusers")
from qwen_image_models import (diffusers_file, diffusers_fused, renamed_file, tiny_model,  # noqa: E402
                               tiny_text_encoder)

CPU = torch.device("cpu")


def qwen_models(comfy, transformer: nn.Module, encoder: nn.Module):
    """A ModelPatcher over ComfyUI's ``QwenImage`` model (its transformer under Qwen-Image's own names, which are
    diffusers') and a ``comfy.sd.CLIP`` holding the Qwen2.5-VL language model under ComfyUI's checkpoint names
    (``qwen25_7b.transformer.model.layers.N...``)."""
    model = comfy.model_base.QwenImage()
    model.add_module("diffusion_model", transformer)
    model.model_config = type("QwenImage", (), {"unet_config": {"image_model": "qwen_image"}})()
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=CPU, offload_device=CPU)
    clip = comfy.sd.CLIP(no_init=True)
    language = encoder.model.language_model
    clip.cond_stage_model = tree({f"qwen25_7b.transformer.model.{name}": getattr(language, name)
                                  for name in ("embed_tokens", "layers", "norm")},
                                 root=type("QwenImageTEModel", (nn.Module,), {})())
    clip.patcher = comfy.model_patcher.ModelPatcher(clip.cond_stage_model, load_device=CPU, offload_device=CPU)
    clip.patcher.is_clip = True
    clip.tokenizer, clip.layer_idx, clip.tokenizer_options = None, None, {}
    clip.use_clip_schedule, clip.apply_hooks_to_conds = False, None
    return patcher, clip


#: how each layout names the text encoder's modules (``model.layers.N...``: the checkpoint's names)
ENCODER_NAMES = {"musubi": lambda m: "lora_te_model_" + m.replace(".", "_"),
                 "comfy": lambda m: "text_encoders.qwen25_7b.transformer.model." + m,
                 "diffusers": lambda m: "text_encoder.model.language_model." + m}


def _with_text_encoder_keys(path: Path, layout: str, encoder: nn.Module, out: Path
                            ) -> tuple[Path, dict[str, torch.Tensor]]:
    """``path`` plus Qwen2.5-VL keys under the layout's names, and the encoder weights they give at ``STRENGTH``
    (written out here)."""
    tensors = load_file(str(path))
    g = torch.Generator().manual_seed(11)
    expected = {}
    for module in ("layers.0.self_attn.q_proj", "layers.1.mlp.up_proj"):
        weight = encoder.model.language_model.get_submodule(module).weight
        down, up = torch.randn(2, weight.shape[1], generator=g), torch.randn(weight.shape[0], 2, generator=g)
        name = ENCODER_NAMES[layout](module)
        tensors.update({f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up,
                        f"{name}.alpha": torch.tensor(1.0)})
        expected[f"qwen25_7b.transformer.model.{module}.weight"] = weight.detach() + STRENGTH * 0.5 * (up @ down)
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()  # diffusers' lora_adapter_metadata: the scales
    save_file(tensors, str(out), metadata)
    return out, expected


@pytest.mark.parametrize("layout", ["musubi", "comfy", "diffusers"])
def test_comfyui_node_applies_qwen_image_files_exactly(layout, comfy, tmp_path) -> None:
    model = tiny_model()
    source = diffusers_file(model, tmp_path / "qwen.safetensors")
    path = {"diffusers": source,
            "comfy": renamed_file(source, tmp_path / "comfy.safetensors", "diffusion_model."),
            "musubi": renamed_file(source, tmp_path / "musubi.safetensors", "lora_unet_", kohya=True)}[layout]
    encoder = tiny_text_encoder()
    path, want_clip = _with_text_encoder_keys(path, layout, encoder, tmp_path / f"{layout}_te.safetensors")
    want = {k.removeprefix("transformer."): v for k, v in diffusers_fused(model, source, STRENGTH).items()}
    transformer = copy.deepcopy(model)
    base = {n: p.detach().clone() for n, p in transformer.named_parameters()}
    clip_base = {n: p.detach().clone() for n, p in encoder.named_parameters()}
    patcher, clip = qwen_models(comfy, transformer, encoder)
    patched_model, patched_clip = comfyui.load_for_models(patcher, clip, str(path), STRENGTH, STRENGTH)
    patched_model.patch_model(device_to=CPU)
    patched_clip.patcher.patch_model(device_to=CPU)
    try:
        for name, tensor in want.items():
            assert_close(transformer.get_parameter(name).detach(), tensor, name)
        for name, tensor in want_clip.items():
            assert_close(clip.cond_stage_model.get_parameter(name).detach(), tensor, name)
    finally:
        patched_model.unpatch_model(device_to=CPU)
        patched_clip.patcher.unpatch_model(device_to=CPU)
    assert all(torch.equal(p, base[n]) for n, p in transformer.named_parameters())
    assert all(torch.equal(p, clip_base[n]) for n, p in encoder.named_parameters())
