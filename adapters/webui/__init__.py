"""The code behind the webui extension folder (AUTOMATIC1111, SD.Next, Forge).

- A1111 and SD.Next: a ``module_types`` entry inserted first computes ``calc_updown`` from lora_compat's
  patches (every kind, DoRA with the right math), and a wrapper around the LoRA file read pre-converts
  dialects the host cannot parse (diffusers/PEFT, OneTrainer, BFL...) into the flat names it maps.
- Forge: its ``load_lora_state_dict`` read is pre-converted into the names Forge's (ComfyUI-style) key map
  accepts (its missing generic ``text_encoders.`` names are supplied); kinds Forge lacks or computes
  differently become ``lora_compat`` patches computed here through ``extra_weight_calculators``. Every module
  reaches its component: what the UNet's ``load_lora`` call does not take is left for the text encoder's.
- SD.Next: an empty LoRA request always counts as a change, so removing every LoRA restores the model.

Each host object is passed in (``install_a1111(networks, network)`` ...), so the logic runs without a webui.
"""
from __future__ import annotations

import itertools
import sys
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from lora_compat.errors import LoraCompatError
from lora_compat.hosts.convert import Conversion, HostName, convert_for_host, host_native, patch_from_weights, updown
from lora_compat.patches import Patch

SETTING = "lora_compat_enabled"
_ids = itertools.count(1)


#: filename → its conversion (the module type looks the patches up by module name)
CONVERTED: dict[str, Conversion] = {}
#: the loaded model's own modules, when the host script knows them (set on model load); else the file's base
MODEL_INDEX: dict[str, Any] = {"index": None}
#: Forge ``lora_compat`` patch ids → (patch, host name)
FORGE_PATCHES: dict[int, tuple[Patch, HostName | None]] = {}


def _opts_enabled() -> bool:
    shared = sys.modules.get("modules.shared")
    opts = getattr(shared, "opts", None)
    return bool(getattr(opts, SETTING, True)) if opts is not None else True


enabled: Callable[[], bool] = _opts_enabled


def report(filename: str, conversion: Conversion) -> None:
    """The loud console line: what was read and which keys map to nothing."""
    if conversion.unmatched:
        keys = ", ".join(conversion.unmatched[:8]) + (" ..." if len(conversion.unmatched) > 8 else "")
        print(f"[lora_compat] {Path(filename).name}: {len(conversion.unmatched)} keys match no module of "
              f"{conversion.base or 'any known base'} and are ignored: {keys}", file=sys.stderr)


# -- A1111 and SD.Next -------------------------------------------------------------------------------------------
def make_module_type(network: Any) -> Any:
    """A ``network.ModuleType`` (built on the host's own classes) that handles every module lora_compat can
    read: its ``calc_updown`` uses lora_compat's math."""

    class LoraCompatModule(network.NetworkModule):
        def __init__(self, net: Any, weights: Any, patch: Patch):
            super().__init__(net, weights)
            self.lora_compat_patch = patch

        def calc_updown(self, orig_weight: torch.Tensor):
            bias = getattr(self.sd_module, "bias", None)
            return updown(self.lora_compat_patch, orig_weight, bias, self.multiplier())

    class LoraCompatModuleType(network.ModuleType):
        lora_compat = True

        def create_module(self, net: Any, weights: Any):
            if not enabled():
                return None
            filename = getattr(getattr(net, "network_on_disk", None), "filename", None)
            converted = CONVERTED.get(filename)
            found = converted.patches.get(weights.network_key) if converted else None
            patch = found[0] if found else patch_from_weights(weights.network_key, weights.w)
            if patch is None and converted:  # a kind with no kohya form (PEFT OFT/BOFT): A1111's network_key is
                found = converted.patches.get(weights.network_key.partition(".")[0])  # the module's first key
                patch = found[0] if found else None
            return LoraCompatModule(net, weights, patch) if patch is not None else None

    return LoraCompatModuleType()


def _read_converted(holder: Any, filename: str, layout: str) -> Callable[[], None] | None:
    """Make ``holder.read_state_dict(filename)`` return the converted tensors for this one call (returns the
    restore function). Every dialect is converted, kohya's too: the names are then always the host's own, and
    lora_compat's module type finds each module's patch by the name it wrote."""
    if not enabled():
        return None
    try:
        conversion = convert_for_host(filename, layout, MODEL_INDEX["index"])
    except LoraCompatError as exc:
        print(f"[lora_compat] {Path(filename).name}: {exc}", file=sys.stderr)
        return None
    CONVERTED[filename] = conversion
    report(filename, conversion)
    original = holder.read_state_dict

    def read_state_dict(path, *args, **kwargs):
        if str(path) == str(filename):
            return dict(conversion.tensors)
        return original(path, *args, **kwargs)

    holder.read_state_dict = read_state_dict

    def restore() -> None:
        holder.read_state_dict = original
    return restore


def install_a1111(networks: Any, network: Any, sd_models: Any | None = None, host: str = "a1111") -> None:
    """Insert the module type first and wrap ``networks.load_network`` (idempotent)."""
    if not any(getattr(t, "lora_compat", False) for t in networks.module_types):
        networks.module_types.insert(0, make_module_type(network))
    if getattr(networks.load_network, "lora_compat", False):
        return
    original = networks.load_network
    holder = sd_models or networks.sd_models

    def load_network(name, network_on_disk):
        restore = _read_converted(holder, network_on_disk.filename, "compvis" if host == "a1111" else "diffusers")
        try:
            return original(name, network_on_disk)
        finally:
            if restore:
                restore()

    load_network.lora_compat = True
    load_network.__wrapped__ = original
    networks.load_network = load_network


def install_sdnext(lora_common: Any, lora_load: Any, network: Any, extra_networks_lora: Any | None = None,
                   sd_models: Any | None = None) -> None:
    """SD.Next: module type first, pre-conversion around ``lora_load.load_safetensors``, and an empty request
    always counted as a change."""
    if not any(getattr(t, "lora_compat", False) for t in lora_common.module_types):
        lora_common.module_types.insert(0, make_module_type(network))
    if not getattr(lora_load.load_safetensors, "lora_compat", False):
        original = lora_load.load_safetensors
        holder = sd_models or lora_load.sd_models

        def load_safetensors(name, network_on_disk, *args, **kwargs):
            restore = _read_converted(holder, network_on_disk.filename, "diffusers")
            try:
                return original(name, network_on_disk, *args, **kwargs)
            finally:
                if restore:
                    restore()

        load_safetensors.lora_compat = True
        load_safetensors.__wrapped__ = original
        lora_load.load_safetensors = load_safetensors
    if extra_networks_lora is not None:
        fix_empty_request(extra_networks_lora.ExtraNetworkLora)


def fix_empty_request(cls: Any) -> None:
    """``changed()`` reports a change for an empty request while LoRAs are still applied (SD.Next issue #3670),
    so that removing every LoRA restores the model. SD.Next master returns ``(bool, reason)`` and its callers
    unpack it; older releases return a bare bool: the answer keeps the form the host returned."""
    original = cls.changed
    if getattr(original, "lora_compat", False):
        return

    def changed(self, requested, *args, **kwargs):
        result = original(self, requested, *args, **kwargs)
        pair = isinstance(result, tuple)
        if (result[0] if pair else result) or len(requested) != 0 or not _anything_loaded(self):
            return result
        return (True, "lora_compat: empty request while LoRAs are applied") if pair else True

    changed.lora_compat = True
    changed.__wrapped__ = original
    cls.changed = changed


def _anything_loaded(extra_network: Any) -> bool:
    common = sys.modules.get("modules.lora.lora_common")
    for holder in (common, extra_network):
        for attr in ("previously_loaded_networks", "loaded_networks"):
            if getattr(holder, attr, None):
                return True
    return False


# -- Forge -------------------------------------------------------------------------------------------------------
_FORGE_READS: dict[tuple, dict[str, torch.Tensor]] = {}


def forge_state_dict(filename: str) -> dict[str, torch.Tensor]:
    """The file under names Forge's key map accepts; modules whose kind Forge lacks or computes differently
    carry a ``<module>.lora_compat`` id tensor that the wrapped ``load_lora`` turns into our own patch.
    Converted once per file version and model (Forge reads the file at every generation)."""
    stat = Path(filename).stat()
    key = (str(filename), stat.st_size, stat.st_mtime_ns, id(MODEL_INDEX["index"]))
    if key in _FORGE_READS:
        return dict(_FORGE_READS[key])
    tensors = _forge_convert(filename)
    for old in [k for k in _FORGE_READS if k[0] == str(filename)]:
        for name, value in _FORGE_READS.pop(old).items():
            if name.endswith(".lora_compat"):
                FORGE_PATCHES.pop(int(value), None)
    _FORGE_READS[key] = tensors
    return dict(tensors)


def forge_reads_itself(conversion: Conversion) -> bool:
    """Files Forge's own ``load_lora`` reads whole: FLUX.1 Control LoRAs (it renames them and pads the widened
    ``img_in`` itself), which no weight calculator could do (the weight changes shape)."""
    return conversion.dialect == "bfl-control"


def forge_split(conversion: Conversion) -> tuple[dict[str, torch.Tensor], dict[str, tuple[Patch, HostName | None]]]:
    """(tensors Forge applies itself, patches lora_compat computes through its weight calculator), by module."""
    native, own = {}, {}
    for name, (patch, host) in conversion.patches.items():
        tensors = {k: v for k, v in conversion.tensors.items() if k.startswith(name + ".")}
        if tensors and host_native(patch):
            native.update(tensors)
        else:
            own[name] = (patch, host)
    return native, own


def _forge_convert(filename: str) -> dict[str, torch.Tensor]:
    conversion = convert_for_host(filename, "comfy", MODEL_INDEX["index"])
    CONVERTED[filename] = conversion
    report(filename, conversion)
    if forge_reads_itself(conversion):
        from safetensors.torch import load_file

        return load_file(filename)
    tensors, own = forge_split(conversion)
    for name, (patch, host) in own.items():
        patch_id = next(_ids)
        FORGE_PATCHES[patch_id] = (patch, host)
        tensors[f"{name}.lora_compat"] = torch.tensor(patch_id)
    return tensors


def forge_weight_calculator(weight: torch.Tensor, strength: float, value: Any) -> torch.Tensor:
    """``extra_weight_calculators["lora_compat"]``: the patched parameter from our patch, in fp32. ``value``
    is ``(patch id, "weight")`` or ``(patch id, "bias", shape of the module's weight)``: a bias change never
    depends on the weight's values, only on its shape."""
    patch, _ = FORGE_PATCHES[int(value[0])]
    param = value[1] if len(value) > 1 else "weight"
    if param == "bias":
        shape = value[2] if len(value) > 2 and value[2] is not None else (weight.shape[0],)
        _, change = updown(patch, torch.zeros(shape), weight, strength)
        return weight if change is None else (weight.float() + change).to(weight.dtype)
    change, _ = updown(patch, weight, None, strength)
    return (weight.float() + change).to(weight.dtype)


#: parameter shapes of the models the running ``load_lora_for_models`` call patches (Forge key → shape)
_FORGE_SHAPES: dict[str, tuple[int, ...]] = {}


def _model_shapes(*holders: Any) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    for holder in holders:
        if holder is not None and hasattr(holder, "state_dict"):
            shapes.update({k: tuple(v.shape) for k, v in holder.state_dict().items()})
    return shapes


def _generic_text_encoder_names(lora: Mapping[str, Any], to_load: Mapping[str, Any]) -> dict[str, str]:
    """ComfyUI's generic ``text_encoders.<model key>`` names (which lora_compat writes for every text-encoder
    module) for the model this ``load_lora`` call loads: Forge's key map (an older ComfyUI one) lacks them and
    knows only the encoder layers' linear modules under kohya names."""
    sides = {v.split(".", 1)[0] for v in to_load.values() if isinstance(v, str)} - {"diffusion_model"}
    if not sides:
        return {}
    names = {k.rsplit(".", n)[0] for k in lora if k.startswith("text_encoders.") for n in (1, 2)}
    extra = {}
    for key in _FORGE_SHAPES:
        if key.endswith(".weight") and key.split(".", 1)[0] in sides:
            name = "text_encoders." + key[: -len(".weight")]
            if name in names and name not in to_load:
                extra[name] = key
    return extra


def install_forge(networks: Any, lora_backend: Any) -> None:
    """Wrap Forge's ``networks.load_lora_state_dict``, ``networks.load_lora`` and
    ``networks.load_lora_for_models``; register the calculator.

    Forge's ``load_lora_for_models`` calls ``load_lora(lora, unet_keys)`` and then ``load_lora(remaining,
    clip_keys)``: a ``lora_compat`` key the first call does not use goes back into its remainder, so the
    second call finds every text-encoder module."""
    lora_backend.extra_weight_calculators["lora_compat"] = forge_weight_calculator
    if getattr(networks.load_lora_state_dict, "lora_compat", False):
        return
    original_read, original_load = networks.load_lora_state_dict, networks.load_lora
    original_for_models = networks.load_lora_for_models

    def load_lora_state_dict(filename, *args, **kwargs):
        if not enabled():
            return original_read(filename, *args, **kwargs)
        try:
            return forge_state_dict(filename)
        except LoraCompatError as exc:
            print(f"[lora_compat] {Path(filename).name}: {exc}; Forge reads it itself", file=sys.stderr)
            return original_read(filename, *args, **kwargs)

    def load_lora(lora, to_load, *args, **kwargs):
        """Forge's own ``load_lora`` for its native tensors, plus ``lora_compat`` patches on the weight (and the
        bias, when the patch changes it) of each module in ``to_load`` that we compute ourselves."""
        to_load = {**to_load, **_generic_text_encoder_names(lora, to_load)}
        ours = {k: v for k, v in lora.items() if k.endswith(".lora_compat")}
        rest = {k: v for k, v in lora.items() if k not in ours}
        result = original_load(rest, to_load, *args, **kwargs)
        patch_dict, remaining = result if isinstance(result, tuple) else (result, None)
        for key, value in ours.items():
            target = to_load.get(key[: -len(".lora_compat")])
            if not isinstance(target, str):
                if remaining is not None:
                    remaining[key] = value  # for the next call (the text encoder's keys), or Forge's own report
                continue
            patch_dict[target] = ("lora_compat", (int(value), "weight"))
            patch, _ = FORGE_PATCHES[int(value)]
            if "bias" in patch.params and target.endswith(".weight"):
                patch_dict[target[: -len(".weight")] + ".bias"] = \
                    ("lora_compat", (int(value), "bias", _FORGE_SHAPES.get(target)))
        return result

    def load_lora_for_models(model, clip, *args, **kwargs):
        saved = dict(_FORGE_SHAPES)
        _FORGE_SHAPES.clear()
        _FORGE_SHAPES.update(_model_shapes(getattr(model, "model", None), getattr(clip, "cond_stage_model", None)))
        try:
            return original_for_models(model, clip, *args, **kwargs)
        finally:
            _FORGE_SHAPES.clear()
            _FORGE_SHAPES.update(saved)

    load_lora_state_dict.lora_compat = load_lora.lora_compat = load_lora_for_models.lora_compat = True
    networks.load_lora_state_dict, networks.load_lora = load_lora_state_dict, load_lora
    networks.load_lora_for_models = load_lora_for_models


def set_model(state_dict_shapes: Mapping[str, tuple[int, ...]] | None = None, components: Any = None) -> None:
    """Tell the hooks which model is loaded: Forge's BFL-named state dict shapes, or diffusers components
    (SD.Next); row ranges of fused Flux modules then come from this model's shapes."""
    from lora_compat.archs import ModuleIndex
    from lora_compat.hosts.convert import index_from_state_dict

    if components is not None:
        MODEL_INDEX["index"] = ModuleIndex.from_modules(components)
    elif state_dict_shapes is not None:
        MODEL_INDEX["index"] = index_from_state_dict(state_dict_shapes)
    else:
        MODEL_INDEX["index"] = None


def install(host_modules: Mapping[str, Any] | None = None) -> str | None:
    """Detect the running webui and install the hooks for it; returns ``a1111``, ``sdnext``, ``forge`` or
    ``None`` (not inside a webui)."""
    found = dict(host_modules or sys.modules)
    networks = found.get("networks")
    if networks is not None and hasattr(networks, "load_lora_state_dict"):
        install_forge(networks, found["backend.patcher.lora"])
        return "forge"
    if "modules.lora.lora_common" in found:
        install_sdnext(found["modules.lora.lora_common"], found["modules.lora.lora_load"],
                       found["modules.lora.network"], found.get("modules.lora.extra_networks_lora"))
        return "sdnext"
    if networks is not None and hasattr(networks, "module_types"):
        install_a1111(networks, found["network"])
        return "a1111"
    return None


__all__ = ["install", "install_a1111", "install_sdnext", "install_forge", "convert_for_host", "make_module_type",
           "patch_from_weights", "updown", "fix_empty_request", "forge_state_dict", "forge_weight_calculator",
           "set_model", "forge_split", "forge_reads_itself", "CONVERTED"]
