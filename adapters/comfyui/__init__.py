"""ComfyUI custom nodes: "Load LoRA (lora_compat)" and "LoRA info (lora_compat)".

The loader converts any dialect into the names ComfyUI's own ``comfy.lora`` key map accepts (SGM UNet names,
BFL Flux names with fused q/k/v LoRAs assembled exactly, ``text_encoders.clip_l.transformer...``) and calls
``comfy.sd.load_lora_for_models``. Kinds ComfyUI lacks or computes differently (DoRA conventions, OFT/BOFT,
IA3, norms, set, LoRA bias, non-LoRA parts of fused modules) are computed here against the model's own
weights at the requested strength and handed to ComfyUI as exact ``diff`` patches.
"""
from __future__ import annotations

try:  # a ComfyUI whose Python lacks lora_compat: install it from this folder's own source (install.py)
    import lora_compat  # noqa: F401
except ImportError:
    from .install import ensure

    ensure()

import sys
from typing import Any, Mapping

import torch

from lora_compat.errors import LoraCompatError
from lora_compat.hostkeys import Conversion, convert, host_native, index_from_state_dict, updown
from lora_compat.patches import Patch

def comfy_native(patch: Patch) -> bool:
    """Kinds whose ComfyUI math equals lora_compat's at every strength (the rest become exact diffs)."""
    return host_native(patch)


def split_for_comfy(conversion: Conversion) -> tuple[dict[str, torch.Tensor], dict[str, Patch]]:
    """(tensors ComfyUI applies itself, patches we compute as diffs), by module name."""
    native, own = {}, {}
    for name, (patch, _) in conversion.patches.items():
        tensors = {k: v for k, v in conversion.tensors.items() if k.startswith(name + ".")}
        if tensors and comfy_native(patch):
            native.update(tensors)
        else:
            own[name] = patch
    return native, own


def exact_diffs(own: Mapping[str, Patch], key_map: Mapping[str, str], weights: Mapping[str, torch.Tensor],
                strength: float) -> tuple[dict[str, torch.Tensor], list[str]]:
    """``<name>.diff`` / ``.diff_b`` tensors with our patches' change at ``strength``, computed from the
    model's current weights (found through ComfyUI's key map); and the names no module matched."""
    tensors, missing = {}, []
    for name, patch in own.items():
        key = key_map.get(name)
        weight = weights.get(key) if key else None
        if weight is None:
            missing.append(name)
            continue
        bias = weights.get(key[: -len(".weight")] + ".bias") if key.endswith(".weight") else None
        change, bias_change = updown(patch, weight, bias, strength)
        tensors[f"{name}.diff"] = change
        if bias_change is not None:
            tensors[f"{name}.diff_b"] = bias_change
    return tensors, missing


def load_for_models(model: Any, clip: Any, path: str, strength_model: float, strength_clip: float,
                    comfy_modules: Mapping[str, Any] | None = None) -> tuple[Any, Any]:
    """What the loader node runs: convert, let ComfyUI apply what it computes exactly, add our exact diffs."""
    found = dict(comfy_modules or sys.modules)
    comfy_sd, comfy_lora = found["comfy.sd"], found["comfy.lora"]
    shapes = {k: tuple(v.shape) for k, v in model.model.state_dict().items()} if model is not None else {}
    conversion = convert(path, "comfy", index_from_state_dict(shapes))
    if conversion.dialect == "bfl-control":  # ComfyUI reads FLUX.1 Control LoRAs itself (input widening included)
        from safetensors.torch import load_file

        return comfy_sd.load_lora_for_models(model, clip, load_file(path), strength_model, strength_clip)
    if conversion.unmatched:
        print(f"[lora_compat] {path}: {len(conversion.unmatched)} keys match no module and are ignored: "
              f"{', '.join(conversion.unmatched[:8])}", file=sys.stderr)
    native, own = split_for_comfy(conversion)
    if native:
        model, clip = comfy_sd.load_lora_for_models(model, clip, native, strength_model, strength_clip)
    if own:
        unet_keys = comfy_lora.model_lora_keys_unet(model.model, {}) if model is not None else {}
        clip_keys = comfy_lora.model_lora_keys_clip(clip.cond_stage_model, {}) if clip is not None else {}
        unet_diffs, missing = exact_diffs({k: p for k, p in own.items() if k in unet_keys}, unet_keys,
                                          model.model.state_dict() if model is not None else {}, strength_model)
        clip_diffs, _ = exact_diffs({k: p for k, p in own.items() if k in clip_keys}, clip_keys,
                                    clip.cond_stage_model.state_dict() if clip is not None else {}, strength_clip)
        missing = sorted(set(own) - set(unet_keys) - set(clip_keys)) + missing
        if missing:
            print(f"[lora_compat] {path}: no module for {', '.join(missing[:8])}", file=sys.stderr)
        if unet_diffs or clip_diffs:
            model, clip = comfy_sd.load_lora_for_models(model, clip, {**unet_diffs, **clip_diffs}, 1.0, 1.0)
    return model, clip


def _lora_names() -> list[str]:
    import folder_paths

    return folder_paths.get_filename_list("loras")


def _lora_path(name: str) -> str:
    import folder_paths

    return folder_paths.get_full_path("loras", name)


class LoraCompatLoader:
    """Load LoRA (lora_compat): the inputs of ComfyUI's LoraLoader, any dialect."""

    RETURN_TYPES = ("MODEL", "CLIP")
    FUNCTION = "load_lora"
    CATEGORY = "loaders"
    DESCRIPTION = "Loads a LoRA of any dialect (kohya, LyCORIS, diffusers/PEFT, Flux variants) exactly."

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "model": ("MODEL",), "clip": ("CLIP",), "lora_name": (_lora_names(),),
            "strength_model": ("FLOAT", {"default": 1.0, "min": -100.0, "max": 100.0, "step": 0.01}),
            "strength_clip": ("FLOAT", {"default": 1.0, "min": -100.0, "max": 100.0, "step": 0.01}),
        }}

    def load_lora(self, model, clip, lora_name, strength_model, strength_clip):
        if strength_model == 0 and strength_clip == 0:
            return model, clip
        try:
            return load_for_models(model, clip, _lora_path(lora_name), strength_model, strength_clip)
        except LoraCompatError as exc:
            raise RuntimeError(str(exc)) from exc


class LoraCompatInfo:
    """LoRA info (lora_compat): what ``lora-compat inspect`` says about a file."""

    RETURN_TYPES = ("STRING",)
    FUNCTION = "info"
    CATEGORY = "loaders"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {"lora_name": (_lora_names(),)}}

    def info(self, lora_name):
        from lora_compat.cli import format_inspection
        from lora_compat.inspection import inspect

        text = format_inspection(inspect(_lora_path(lora_name)))
        return {"ui": {"text": [text]}, "result": (text,)}


NODE_CLASS_MAPPINGS = {"LoraCompatLoader": LoraCompatLoader, "LoraCompatInfo": LoraCompatInfo}
NODE_DISPLAY_NAME_MAPPINGS = {"LoraCompatLoader": "Load LoRA (lora_compat)", "LoraCompatInfo": "LoRA info (lora_compat)"}
