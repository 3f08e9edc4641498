"""Wan through ComfyUI a125cd84's real key maps (``comfy.lora.model_lora_keys_unet`` / ``model_lora_keys_clip``) and
``load_lora``: what ``convert_for_host(..., "comfy")`` names for a Wan model (native transformer names, the UMT5
encoder as ``umt5xxl``) is every key loaded, onto the parameter lora_compat targets."""
from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lora_compat.hosts.convert import convert_for_host

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
diffusers = pytest.importorskip("diffusers")
from test_wan import _diffusers_file, _model, _native_file  # noqa: E402
from test_wan_layouts import native_state  # noqa: E402
from test_wan_more import _kohya_te_file, _modulation_file, _umt5  # noqa: E402


class _Held:
    """What the key maps read of a loaded model: its state dict (and, for the diffusion model, its config)."""

    def __init__(self, state: dict[str, torch.Tensor], unet_config: dict | None = None):
        self.state = state
        self.model_config = type("WAN21_T2V", (), {"unet_config": unet_config or {"image_model": "wan2.1"}})()

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.state


def _comfy_states(model, te) -> tuple[dict, dict]:
    """The model and its UMT5 as ComfyUI holds them (native names; ``umt5xxl.transformer.<transformers path>``)."""
    return native_state(model, "diffusion_model."), {f"umt5xxl.transformer.{k}": v for k, v in te.state_dict().items()}


def _loaded(comfy, conversion, model, te, caplog) -> dict:
    unet, clip = _comfy_states(model, te)
    key_map = comfy.lora.model_lora_keys_unet(_Held(unet), {})
    key_map = comfy.lora.model_lora_keys_clip(_Held(clip), key_map)
    with caplog.at_level(logging.WARNING):
        patches = comfy.lora.load_lora(conversion.tensors, key_map)
    assert "lora key not loaded" not in caplog.text
    return patches


def test_lightx2v_file_loads_whole_in_comfyui(comfy, tmp_path, caplog):
    """A native LoRA with lightx2v ``diff_m`` modulation deltas: ComfyUI loads every converted key, onto the LoRA's
    weights and the modulation parameters (``diffusion_model.blocks.N.modulation``, not ``lora_unet_`` names)."""
    model = _model()
    native = _native_file(_diffusers_file(model, tmp_path / "d.safetensors"), tmp_path / "n.safetensors")
    _modulation_file(tmp_path / "mod.safetensors", lightx2v=True)
    from safetensors.torch import load_file

    tensors = {**load_file(str(native)), **{k: v for k, v in load_file(str(tmp_path / "mod.safetensors")).items()
                                             if "diff_m" in k}}
    save_file(tensors, str(tmp_path / "lightx2v.safetensors"))
    conversion = convert_for_host(str(tmp_path / "lightx2v.safetensors"), "comfy", base="wan")
    assert conversion.unmatched == []
    patches = _loaded(comfy, conversion, model, _umt5(), caplog)
    assert "diffusion_model.blocks.0.self_attn.q.weight" in patches
    assert {"diffusion_model.blocks.0.modulation", "diffusion_model.blocks.1.modulation",
            "diffusion_model.head.modulation"} <= set(patches)


def test_onetrainer_file_with_umt5_loads_whole_in_comfyui(comfy, tmp_path, caplog):
    model, te = _model(), _umt5()
    _kohya_te_file(tmp_path / "ot.safetensors", model, te, "lora_transformer_")
    conversion = convert_for_host(str(tmp_path / "ot.safetensors"), "comfy", base="wan")
    assert conversion.unmatched == []
    patches = _loaded(comfy, conversion, model, te, caplog)
    assert sorted(patches) == sorted(["diffusion_model.blocks.0.self_attn.q.weight",
                                      "diffusion_model.blocks.1.ffn.2.weight",
                                      "umt5xxl.transformer.encoder.block.0.layer.0.SelfAttention.q.weight",
                                      "umt5xxl.transformer.encoder.block.1.layer.1.DenseReluDense.wi_0.weight",
                                      "umt5xxl.transformer.encoder.block.1.layer.1.DenseReluDense.wo.weight"])
