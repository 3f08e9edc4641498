"""ComfyUI custom nodes: "Load LoRA (lora_compat)" and "LoRA info (lora_compat)".

The loader converts any dialect into the names ComfyUI's own ``comfy.lora`` key map accepts (SGM UNet names,
BFL Flux names with fused q/k/v LoRAs assembled exactly, ``text_encoders.clip_l.transformer...``) and calls
``comfy.sd.load_lora_for_models``. Kinds ComfyUI lacks or computes differently (DoRA conventions, OFT/BOFT,
IA3, norms, set, LoRA bias, non-LoRA parts of fused modules) are handed to ComfyUI's ModelPatcher as weight
adapters that compute lora_compat's exact math when ComfyUI patches the weights: on the weight as the LoRAs
before them in the chain left it, exactly as ComfyUI applies its own chained LoRAs.
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

from lora_compat import plugins
from lora_compat.errors import LoraCompatError
from lora_compat.hosts.convert import Conversion, convert_for_host, host_native, index_from_state_dict, updown
from lora_compat.patches import Patch

def comfy_native(patch: Patch) -> bool:
    """Kinds whose ComfyUI math equals lora_compat's at every strength (the rest become lora_compat adapters)."""
    return host_native(patch)


def split_for_comfy(conversion: Conversion) -> tuple[dict[str, torch.Tensor], dict[str, Patch]]:
    """(tensors ComfyUI applies itself, patches lora_compat computes), by module name."""
    native, own = {}, {}
    for name, (patch, _) in conversion.patches.items():
        tensors = {k: v for k, v in conversion.tensors.items() if k.startswith(name + ".")}
        if tensors and comfy_native(patch):
            native.update(tensors)
        else:
            own[name] = patch
    return native, own


def comfy_reads_itself(conversion: Conversion) -> bool:
    """Files handed to ComfyUI's own loader whole: FLUX.1 Control LoRAs (it reads them, input widening
    included, in ``comfy/lora_convert.py``)."""
    return conversion.dialect == "bfl-control"


def loaded_base(model: Any, clip: Any) -> str | None:
    """The base of the loaded model: its ``model_config`` class, else its CLIP's class, as the registered families
    name them (``Arch.comfy_classes``, subclasses included; ``None``: unknown)."""
    archs = list(plugins.archs().values())
    for holder in (getattr(getattr(model, "model", None), "model_config", None),
                   getattr(clip, "cond_stage_model", None)):
        for cls in type(holder).__mro__ if holder is not None else ():
            arch = next((a for a in archs if cls.__name__ in a.comfy_classes), None)
            if arch is not None:
                return arch.id
    return None


_ADAPTER_CLASSES: dict[type, type] = {}


def adapter_class(weight_adapter_base: type) -> type:
    """A ``comfy.weight_adapter.WeightAdapterBase`` that applies one lora_compat patch to one parameter.

    ComfyUI calls ``calculate_weight`` when it patches the model (and at every low-VRAM cast), with the weight
    as the patches before it in the chain left it; the change is added in place, because ComfyUI hands a
    narrowed view for offset keys."""
    if weight_adapter_base not in _ADAPTER_CLASSES:
        class LoraCompatAdapter(weight_adapter_base):
            name = "lora_compat"

            def __init__(self, patch: Patch, param: str, weight_shape: tuple[int, ...]):
                self.patch, self.param, self.weight_shape = patch, param, weight_shape
                self.loaded_keys: set[str] = set()
                self.weights: list[torch.Tensor] = []

            def calculate_weight(self, weight, key, strength, strength_model, offset, function,
                                 intermediate_dtype=torch.float32, original_weight=None):
                if strength == 0:
                    return weight
                if self.param == "weight":
                    change, _ = updown(self.patch, weight, None, strength)
                else:  # a bias change depends on the weight's shape only
                    _, change = updown(self.patch, torch.zeros(self.weight_shape), weight, strength)
                if change is not None:
                    weight += function(change.to(weight.dtype))
                return weight

        _ADAPTER_CLASSES[weight_adapter_base] = LoraCompatAdapter
    return _ADAPTER_CLASSES[weight_adapter_base]


def adapter_patches(own: Mapping[str, Patch], key_map: Mapping[str, Any], state: Mapping[str, torch.Tensor],
                    adapter: type) -> tuple[dict[str, Any], list[str]]:
    """``{ComfyUI key: adapter}`` for the weight (and bias) of every module of ``own`` the key map knows;
    and the module names it does not know."""
    patches, missing = {}, []
    for name, patch in own.items():
        key = key_map.get(name)
        if not isinstance(key, str) or key not in state:
            missing.append(name)
            continue
        shape = tuple(state[key].shape)
        if "weight" in patch.params:
            patches[key] = adapter(patch, "weight", shape)
        if "bias" in patch.params and key.endswith(".weight"):
            patches[key[: -len(".weight")] + ".bias"] = adapter(patch, "bias", shape)
    return patches, missing


def load_for_models(model: Any, clip: Any, path: str, strength_model: float, strength_clip: float,
                    comfy_modules: Mapping[str, Any] | None = None) -> tuple[Any, Any]:
    """What the loader node runs: convert, let ComfyUI apply what it computes exactly itself, and hand it
    lora_compat adapters for the rest."""
    found = dict(comfy_modules or sys.modules)
    comfy_sd, comfy_lora = found["comfy.sd"], found["comfy.lora"]
    shapes = {k: tuple(v.shape) for k, v in model.model.state_dict().items()} if model is not None else {}
    conversion = convert_for_host(path, "comfy", index_from_state_dict(shapes), base=loaded_base(model, clip))
    if comfy_reads_itself(conversion):
        from safetensors.torch import load_file

        return comfy_sd.load_lora_for_models(model, clip, load_file(path), strength_model, strength_clip)
    if conversion.unmatched:
        print(f"[lora_compat] {path}: {len(conversion.unmatched)} keys match no module and are ignored: "
              f"{', '.join(conversion.unmatched[:8])}", file=sys.stderr)
    native, own = split_for_comfy(conversion)
    if native:
        model, clip = comfy_sd.load_lora_for_models(model, clip, native, strength_model, strength_clip)
    if not own:
        return model, clip
    weight_adapter = found.get("comfy.weight_adapter") or getattr(comfy_lora, "weight_adapter", None)
    if weight_adapter is None:
        raise LoraCompatError(f"{path}: this ComfyUI has no comfy.weight_adapter (added in 2025); update ComfyUI "
                              "to load the DoRA/OFT/IA3/norm/... parts of this file exactly")
    adapter = adapter_class(weight_adapter.WeightAdapterBase)
    missing = set(own)
    if model is not None:
        model, unknown = _with_adapters(model, model.model, comfy_lora.model_lora_keys_unet, own, strength_model, adapter)
        missing &= unknown
    if clip is not None:
        clip, unknown = _with_adapters(clip, clip.cond_stage_model, comfy_lora.model_lora_keys_clip, own, strength_clip,
                                       adapter)
        missing &= unknown
    if missing:
        print(f"[lora_compat] {path}: no module for {', '.join(sorted(missing)[:8])}", file=sys.stderr)
    return model, clip


def _with_adapters(patcher: Any, holder: Any, key_map_of: Any, own: Mapping[str, Patch], strength: float,
                   adapter: type) -> tuple[Any, set[str]]:
    """A clone of ``patcher`` (a ModelPatcher or CLIP) with the adapters of the modules ``holder`` has, as
    ``comfy.sd.load_lora_for_models`` adds patches; and the names ``holder`` does not have."""
    patches, unknown = adapter_patches(own, key_map_of(holder, {}), holder.state_dict(), adapter)
    if patches and strength != 0:
        patcher = patcher.clone()
        patcher.add_patches(patches, strength)
    return patcher, set(unknown)


def _lora_names() -> list[str]:
    import folder_paths

    return folder_paths.get_filename_list("loras")


def _lora_path(name: str) -> str:
    import folder_paths

    finder = getattr(folder_paths, "get_full_path_or_raise", folder_paths.get_full_path)
    return finder("loras", name)


class LoraCompatLoader:
    """Load LoRA (lora_compat): the inputs of ComfyUI's LoraLoader, any dialect."""

    RETURN_TYPES = ("MODEL", "CLIP")
    OUTPUT_TOOLTIPS = ("The modified diffusion model.", "The modified CLIP model.")
    FUNCTION = "load_lora"
    CATEGORY = "loaders"
    DESCRIPTION = ("Loads a LoRA of any dialect (kohya, LyCORIS, diffusers/PEFT, Flux variants) exactly. Multiple "
                   "LoRA nodes can be linked together: each applies to the weights the nodes before it produced.")

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        strength = {"default": 1.0, "min": -100.0, "max": 100.0, "step": 0.01}
        return {"required": {
            "model": ("MODEL", {"tooltip": "The diffusion model the LoRA will be applied to."}),
            "clip": ("CLIP", {"tooltip": "The CLIP model the LoRA will be applied to."}),
            "lora_name": (_lora_names(), {"tooltip": "The name of the LoRA (any dialect: kohya, LyCORIS, "
                                                     "diffusers/PEFT, Flux variants)."}),
            "strength_model": ("FLOAT", {**strength, "tooltip": "How strongly to modify the diffusion model. "
                                                                "This value can be negative."}),
            "strength_clip": ("FLOAT", {**strength, "tooltip": "How strongly to modify the CLIP model. "
                                                               "This value can be negative."}),
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
    OUTPUT_TOOLTIPS = ("What lora-compat inspect says about the file: dialect, base, kinds, modules.",)
    FUNCTION = "info"
    CATEGORY = "loaders"
    OUTPUT_NODE = True
    DESCRIPTION = "Shows the dialect, base model, patch kinds and modules of a LoRA file."

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {"lora_name": (_lora_names(), {"tooltip": "The name of the LoRA."})}}

    def info(self, lora_name):
        from lora_compat.cli import format_inspection
        from lora_compat.tools.inspection import inspect

        text = format_inspection(inspect(_lora_path(lora_name)))
        return {"ui": {"text": [text]}, "result": (text,)}


NODE_CLASS_MAPPINGS = {"LoraCompatLoader": LoraCompatLoader, "LoraCompatInfo": LoraCompatInfo}
NODE_DISPLAY_NAME_MAPPINGS = {"LoraCompatLoader": "Load LoRA (lora_compat)", "LoraCompatInfo": "LoRA info (lora_compat)"}
