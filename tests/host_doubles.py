"""Test doubles of the hosts' LoRA contracts (`../shared/reference/hosts.md`), small but faithful in what the
adapters rely on:

- A1111 / SD.Next: ``network.ModuleType``/``NetworkModule``/``NetworkWeights``, ``networks.module_types`` (first
  non-None ``create_module`` wins), ``load_network`` splitting keys at the first dot and mapping flat names
  through ``network_layer_mapping``; the weight becomes ``backup + updown`` (``network_apply_weights``).
- ComfyUI / Forge: ``model_lora_keys_unet`` (``lora_unet_<X_>`` and ``diffusion_model.X`` for every
  ``diffusion_model.X.weight``), ``model_lora_keys_clip`` (``text_encoders.<key>`` and the kohya CLIP names),
  ``load_lora(lora, key_map)`` for lora_up/lora_down(+alpha), hada_*, diff/diff_b, ``load_lora_for_models``
  cloning patchers and ``add_patches``; patches merged in fp32 from the original weight, with
  ``extra_weight_calculators`` for unknown patch types (Forge).
"""
from __future__ import annotations

import types
from collections import namedtuple
from typing import Callable

import torch
from safetensors.torch import load_file

NetworkWeights = namedtuple("NetworkWeights", ["network_key", "sd_key", "w", "sd_module"])


# -- A1111 / SD.Next ------------------------------------------------------------------------------------------
def make_network_module() -> types.ModuleType:
    network = types.ModuleType("network")

    class ModuleType:
        def create_module(self, net, weights):
            return None

    class NetworkModule:
        def __init__(self, net, weights):
            self.network, self.network_key, self.sd_key = net, weights.network_key, weights.sd_key
            self.sd_module, self.w = weights.sd_module, weights.w

        def multiplier(self):
            return self.network.te_multiplier if "transformer" in self.sd_key[:20] else self.network.unet_multiplier

        def calc_updown(self, orig_weight):
            raise NotImplementedError

    class ModuleTypeLora(ModuleType):
        """The host's own plain LoRA type (never reached when lora_compat's type is first)."""

        def create_module(self, net, weights):
            return NetworkModule(net, weights) if "lora_up.weight" in weights.w else None

    network.ModuleType, network.NetworkModule, network.ModuleTypeLora = ModuleType, NetworkModule, ModuleTypeLora
    network.NetworkWeights = NetworkWeights
    return network


class NetworkOnDisk:
    def __init__(self, filename: str):
        self.filename = filename


class Network:
    def __init__(self, name: str, on_disk: NetworkOnDisk, te: float = 1.0, unet: float = 1.0):
        self.name, self.network_on_disk = name, on_disk
        self.te_multiplier, self.unet_multiplier = te, unet
        self.modules: dict[str, object] = {}


def make_networks(network: types.ModuleType, mapping: dict[str, torch.nn.Module],
                  convert_name: Callable[[str], str]) -> types.ModuleType:
    """``networks`` with ``module_types``, ``sd_models.read_state_dict`` and ``load_network``."""
    networks = types.ModuleType("networks")
    networks.module_types = [network.ModuleTypeLora()]
    networks.sd_models = types.SimpleNamespace(read_state_dict=lambda path: load_file(str(path)))
    networks.failed: dict[str, list[str]] = {}

    def load_network(name, network_on_disk):
        net = Network(name, network_on_disk)
        sd = networks.sd_models.read_state_dict(network_on_disk.filename)
        groups: dict[str, dict[str, torch.Tensor]] = {}
        prefixes: dict[str, str] = {}
        failed = []
        for key, tensor in sd.items():
            prefix, _, part = key.partition(".")
            sd_key = convert_name(prefix)
            if sd_key not in mapping:
                failed.append(key)
                continue
            groups.setdefault(sd_key, {})[part] = tensor
            prefixes[sd_key] = prefix
        for sd_key, w in groups.items():
            weights = NetworkWeights(prefixes[sd_key], sd_key, w, mapping[sd_key])
            for nettype in networks.module_types:
                module = nettype.create_module(net, weights)
                if module is not None:
                    break
            else:
                raise AssertionError(f"no module type accepts {sd_key}: {sorted(w)}")
            net.modules[sd_key] = module
        networks.failed[name] = failed
        return net

    networks.load_network = load_network
    return networks


# -- ComfyUI / Forge ----------------------------------------------------------------------------------------
class StateModel:
    """A model seen through its state dict (names → live tensors)."""

    def __init__(self, params: dict[str, torch.Tensor]):
        self.params = params

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.params)


class Patcher:
    """ComfyUI's ModelPatcher, reduced to patches recorded per key and merged on demand."""

    def __init__(self, model: StateModel, patches: dict | None = None):
        self.model, self.cond_stage_model = model, model
        self.patches: dict[str, list] = {k: list(v) for k, v in (patches or {}).items()}

    def clone(self) -> "Patcher":
        return Patcher(self.model, self.patches)

    def add_patches(self, patches: dict, strength: float) -> list[str]:
        for key, patch in patches.items():
            self.patches.setdefault(key, []).append((strength, patch))
        return list(patches)

    def patched(self, calculators: dict | None = None) -> dict[str, torch.Tensor]:
        out = {}
        for key, patches in self.patches.items():
            weight = self.model.params[key]
            out[key] = calculate_weight(patches, weight.float().clone(), calculators or {}).to(weight.dtype)
        return out


def calculate_weight(patches: list, weight: torch.Tensor, calculators: dict) -> torch.Tensor:
    for strength, (kind, values) in patches:
        if kind == "lora":
            up, down, alpha = values
            rank = down.shape[0]
            scale = float(alpha) / rank if alpha is not None else 1.0
            delta = up.float().reshape(up.shape[0], -1) @ down.float().reshape(rank, -1)
            weight += strength * scale * delta.reshape(weight.shape)
        elif kind == "loha":
            w1a, w1b, alpha, w2a, w2b = values
            scale = float(alpha) / w1b.shape[0] if alpha is not None else 1.0
            delta = (w1a.float() @ w1b.float()) * (w2a.float() @ w2b.float())
            weight += strength * scale * delta.reshape(weight.shape)
        elif kind == "diff":
            weight += strength * values[0].float().reshape(weight.shape)
        elif kind in calculators:
            weight = calculators[kind](weight, strength, values)
        else:
            raise AssertionError(f"unknown patch type {kind}")
    return weight


def model_lora_keys_unet(model: StateModel, key_map: dict) -> dict:
    for key in model.state_dict():
        if key.startswith("diffusion_model.") and key.endswith(".weight"):
            name = key[len("diffusion_model."):-len(".weight")]
            key_map["lora_unet_" + name.replace(".", "_")] = key
            key_map["diffusion_model." + name] = key
    return key_map


def model_lora_keys_clip(model: StateModel, key_map: dict) -> dict:
    keys = model.state_dict()
    has_g = any(k.startswith("clip_g.") for k in keys)
    for key in keys:
        if not key.endswith(".weight"):
            continue
        key_map["text_encoders." + key[: -len(".weight")]] = key
        for clip, kohya in (("clip_l", "lora_te1_" if has_g else "lora_te_"), ("clip_g", "lora_te2_")):
            head = f"{clip}.transformer."
            if key.startswith(head):
                key_map[kohya + key[len(head):-len(".weight")].replace(".", "_")] = key
    return key_map


def load_lora(lora: dict, to_load: dict) -> dict:
    patches, used = {}, set()
    for name, key in to_load.items():
        if f"{name}.lora_up.weight" in lora:
            parts = [f"{name}.lora_up.weight", f"{name}.lora_down.weight", f"{name}.alpha"]
            alpha = lora.get(parts[2])
            patches[key] = ("lora", (lora[parts[0]], lora[parts[1]], None if alpha is None else alpha.item()))
        elif f"{name}.hada_w1_a" in lora:
            parts = [f"{name}.hada_w1_a", f"{name}.hada_w1_b", f"{name}.hada_w2_a", f"{name}.hada_w2_b", f"{name}.alpha"]
            alpha = lora.get(parts[4])
            patches[key] = ("loha", (lora[parts[0]], lora[parts[1]], None if alpha is None else alpha.item(),
                                     lora[parts[2]], lora[parts[3]]))
        elif f"{name}.diff" in lora:
            parts = [f"{name}.diff"]
            patches[key] = ("diff", (lora[parts[0]],))
        else:
            parts = []
        if f"{name}.diff_b" in lora and key.endswith(".weight"):
            parts.append(f"{name}.diff_b")
            patches[key[: -len(".weight")] + ".bias"] = ("diff", (lora[f"{name}.diff_b"],))
        used.update(p for p in parts if p in lora)
    load_lora.not_loaded = sorted(set(lora) - used)
    return patches


def make_comfy() -> dict[str, types.ModuleType]:
    comfy_lora = types.ModuleType("comfy.lora")
    comfy_lora.model_lora_keys_unet, comfy_lora.model_lora_keys_clip = model_lora_keys_unet, model_lora_keys_clip
    comfy_lora.load_lora = load_lora
    comfy_sd = types.ModuleType("comfy.sd")

    def load_lora_for_models(model, clip, lora, strength_model, strength_clip):
        key_map = {}
        if model is not None:
            key_map = comfy_lora.model_lora_keys_unet(model.model, key_map)
        if clip is not None:
            key_map = comfy_lora.model_lora_keys_clip(clip.cond_stage_model, key_map)
        loaded = comfy_lora.load_lora(lora, key_map)
        new_model = model.clone() if model is not None else None
        new_clip = clip.clone() if clip is not None else None
        if new_model is not None:
            new_model.add_patches({k: v for k, v in loaded.items() if k in model.model.params}, strength_model)
        if new_clip is not None:
            new_clip.add_patches({k: v for k, v in loaded.items() if k in clip.cond_stage_model.params},
                                 strength_clip)
        comfy_sd.not_loaded = getattr(comfy_lora.load_lora, "not_loaded", [])
        return new_model, new_clip

    comfy_sd.load_lora_for_models = load_lora_for_models
    return {"comfy.sd": comfy_sd, "comfy.lora": comfy_lora}


def make_forge() -> tuple[types.ModuleType, types.ModuleType]:
    """``sd_forge_lora/networks.py`` (module globals ``load_lora_state_dict``, ``load_lora``) and
    ``backend.patcher.lora`` (``extra_weight_calculators``)."""
    backend = types.ModuleType("backend.patcher.lora")
    backend.extra_weight_calculators = {}
    networks = types.ModuleType("networks")
    networks.load_lora_state_dict = lambda filename: load_file(str(filename))
    networks.load_lora = load_lora

    def load_lora_for_models(model, clip, lora, strength_model, strength_clip):
        key_map = model_lora_keys_unet(model.model, {})
        if clip is not None:
            key_map = model_lora_keys_clip(clip.cond_stage_model, key_map)
        loaded = networks.load_lora(lora, key_map)
        new_model = model.clone()
        new_model.add_patches({k: v for k, v in loaded.items() if k in model.model.params}, strength_model)
        new_clip = clip.clone() if clip is not None else None
        if new_clip is not None:
            new_clip.add_patches({k: v for k, v in loaded.items() if k in clip.cond_stage_model.params},
                                 strength_clip)
        return new_model, new_clip

    def load_networks(filename, model, clip, strength_model=1.0, strength_clip=1.0):
        return load_lora_for_models(model, clip, networks.load_lora_state_dict(filename), strength_model,
                                    strength_clip)

    networks.load_lora_for_models, networks.load_networks = load_lora_for_models, load_networks
    return networks, backend
