"""The AutoLoRA learned gate (arXiv 2508.02107, DiffSynth-Studio "LoRAFusion"), run in hot mode.

For each gated linear layer with input ``x``, base output ``h = W x + b`` and the outputs ``o_i`` of the
LoRAs applied there (each already scaled by its strength and alpha/rank):

    ĥ = LN_base(h),  ô_i = LN_lora(o_i)                     (LayerNorm over the channels, eps 1e-5, affine)
    g_i = σ(w_base ⊙ ĥ + w_lora ⊙ ô_i + w_cross ⊙ ĥ ⊙ ô_i + bias)
    y = h + Σ_i w_out ⊙ g_i ⊙ o_i

``w_base`` is the base-feature gate, ``w_lora`` the LoRA-specific gate, ``w_cross`` the interaction gate and
``w_out`` the learnable fusion scale; the two LayerNorms are the magnitude calibration (they make the gate's
inputs scale-free; the released code has no other calibration op). The gate parameters are the model: they
come from a user-supplied LoRAFusion weight file (DiffSynth-Studio's ``model.safetensors``, keys
``model_dict.<layer with "." → "___">.<param>``); nothing here invents them.

The file names DiffSynth's FLUX.1 layers, which fuse q/k/v (and the single blocks' MLP input) into one
linear. On a split host (diffusers ``FluxTransformer2DModel``) the layer's base and LoRA outputs are
concatenated across its parts (``to_q``, ``to_k``, ``to_v``[, ``proj_mlp``]) before gating, because the
LayerNorm statistics over a fused 9216/21504-channel output differ from those of each 3072-channel slice;
gating each slice alone would not be the trained gate. The cost: the parts' base outputs are computed once
more inside the hook. On a fused host (BFL/ComfyUI names) each layer is one module.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch
import torch.nn.functional as F

from ..archs.flux import DOUBLE_BLOCK, SINGLE_BLOCK, is_bfl_transformer, is_flux_transformer
from ..errors import LoraCompatError

#: DiffSynth layer in ``blocks.N`` → the BFL module in ``double_blocks.N`` (a rename, same rows)
DOUBLE_LAYERS = {
    "attn.a_to_qkv": "img_attn.qkv", "attn.b_to_qkv": "txt_attn.qkv",
    "attn.a_to_out": "img_attn.proj", "attn.b_to_out": "txt_attn.proj",
    "ff_a.0": "img_mlp.0", "ff_a.2": "img_mlp.2", "ff_b.0": "txt_mlp.0", "ff_b.2": "txt_mlp.2",
    "norm1_a.linear": "img_mod.lin", "norm1_b.linear": "txt_mod.lin",
}
#: DiffSynth layer in ``single_blocks.N`` → the BFL module in ``single_blocks.N``
SINGLE_LAYERS = {"to_qkv_mlp": "linear1", "proj_out": "linear2", "norm.linear": "modulation.lin"}
GATE_PARAMS = ("weight_base", "weight_lora", "weight_cross", "weight_out", "bias",
               "norm_base.weight", "norm_base.bias", "norm_lora.weight", "norm_lora.bias")
LAYER_NORM_EPS = 1e-5


def gate(params: Mapping[str, torch.Tensor], base: torch.Tensor, lora_outputs: torch.Tensor) -> torch.Tensor:
    """``y = h + Σ_i w_out ⊙ g_i ⊙ o_i`` for base output ``h`` (…, dim) and LoRA outputs ``o`` (N, …, dim)."""
    dim = (base.shape[-1],)
    norm_base = F.layer_norm(base, dim, params["norm_base.weight"], params["norm_base.bias"], LAYER_NORM_EPS)
    norm_lora = F.layer_norm(lora_outputs, dim, params["norm_lora.weight"], params["norm_lora.bias"], LAYER_NORM_EPS)
    gates = torch.sigmoid(norm_base * params["weight_base"] + norm_lora * params["weight_lora"]
                          + norm_base * norm_lora * params["weight_cross"] + params["bias"])
    return base + (params["weight_out"] * gates * lora_outputs).sum(dim=0)


@dataclass(frozen=True)
class GatePart:
    """Rows ``[start, stop)`` of a gated layer that the host module ``target`` (component-qualified) produces."""

    target: str
    start: int
    stop: int


@dataclass(frozen=True)
class GateLayer:
    """One gated layer: its DiffSynth name and the host modules whose outputs it concatenates."""

    name: str
    parts: tuple[GatePart, ...]

    @property
    def dim(self) -> int:
        return self.parts[-1].stop


def file_key(layer: str, param: str) -> str:
    return f"model_dict.{layer.replace('.', '___')}.{param}"


def host_layers(modules: Mapping[str, torch.nn.Module]) -> list[GateLayer]:
    """The gated layers of the FLUX.1 transformer among ``modules`` (components), in file order, mapped onto
    the host's split (diffusers) or fused (BFL) layout."""
    for component, model in modules.items():
        named = dict(model.named_modules())
        if is_flux_transformer(named):
            return _split_layers(component, named)
        if is_bfl_transformer(named):
            return _fused_layers(component, named)
    found = ", ".join(f"{c} ({type(m).__name__})" for c, m in modules.items()) or "nothing"
    raise LoraCompatError(f"the AutoLoRA gate exists for FLUX.1 transformers only; the target has {found}")


def _block_count(named: Mapping[str, torch.nn.Module], prefix: str) -> int:
    count = 0
    while f"{prefix}.{count}" in named:
        count += 1
    return count


def _parts(component: str, named: Mapping[str, torch.nn.Module], paths: tuple[str, ...]) -> tuple[GatePart, ...]:
    parts, row = [], 0
    for path in paths:
        rows = named[path].weight.shape[0]
        parts.append(GatePart(f"{component}.{path}", row, row + rows))
        row += rows
    return tuple(parts)


def _split_layers(component: str, named: Mapping[str, torch.nn.Module]) -> list[GateLayer]:
    layers = []
    for i in range(_block_count(named, "transformer_blocks")):
        for layer, bfl in DOUBLE_LAYERS.items():
            paths = tuple(f"transformer_blocks.{i}.{p}" for p in DOUBLE_BLOCK[bfl])
            layers.append(GateLayer(f"blocks.{i}.{layer}", _parts(component, named, paths)))
    for i in range(_block_count(named, "single_transformer_blocks")):
        for layer, bfl in SINGLE_LAYERS.items():
            paths = tuple(f"single_transformer_blocks.{i}.{p}" for p in SINGLE_BLOCK[bfl])
            layers.append(GateLayer(f"single_blocks.{i}.{layer}", _parts(component, named, paths)))
    return layers


def _fused_layers(component: str, named: Mapping[str, torch.nn.Module]) -> list[GateLayer]:
    layers = []
    for i in range(_block_count(named, "double_blocks")):
        for layer, bfl in DOUBLE_LAYERS.items():
            layers.append(GateLayer(f"blocks.{i}.{layer}", _parts(component, named, (f"double_blocks.{i}.{bfl}",))))
    for i in range(_block_count(named, "single_blocks")):
        for layer, bfl in SINGLE_LAYERS.items():
            layers.append(GateLayer(f"single_blocks.{i}.{layer}",
                                    _parts(component, named, (f"single_blocks.{i}.{bfl}",))))
    return layers


class FusionGates:
    """A LoRAFusion weight file, checked against and mapped onto one host. Pass it (or its path) as
    ``Patcher(target, mode="hot", fusion=...)``."""

    def __init__(self, source: str, layers: list[GateLayer], params: dict[str, dict[str, torch.Tensor]]):
        self.source = source
        self.layers = {layer.name: layer for layer in layers}
        self.params = params
        self._on: dict[tuple[str, torch.device], dict[str, torch.Tensor]] = {}

    @classmethod
    def load(cls, path: str | os.PathLike, target: Mapping[str, torch.nn.Module]) -> "FusionGates":
        """Read ``path`` and check that its keys and shapes are exactly the gate of ``target``'s FLUX.1
        transformer (one 9-parameter gate per gated layer, each of the layer's fused output width)."""
        from safetensors import safe_open
        from safetensors import SafetensorError

        path = Path(path)
        if not path.is_file():
            raise LoraCompatError(f"{path}: no LoRAFusion weight file there; the AutoLoRA gate needs the trained "
                                  "gate weights (DiffSynth-Studio LoRAFusion model.safetensors), lora_compat "
                                  "never invents them")
        layers = host_layers(target)
        expected = {file_key(layer.name, p): layer.dim for layer in layers for p in GATE_PARAMS}
        try:
            with safe_open(str(path), framework="pt") as handle:
                shapes = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
                _check_layout(path, shapes, expected)
                tensors = {key: handle.get_tensor(key).float() for key in expected}
        except SafetensorError as exc:
            raise LoraCompatError(f"{path}: not a readable safetensors file: {exc}") from exc
        params = {layer.name: {p: tensors[file_key(layer.name, p)] for p in GATE_PARAMS} for layer in layers}
        return cls(str(path), layers, params)

    def check(self, target: Mapping[str, torch.nn.Module]) -> None:
        """Raise unless these gates were mapped onto a host with exactly ``target``'s layout."""
        layers = {layer.name: layer for layer in host_layers(target)}
        if layers != self.layers:
            raise LoraCompatError(f"{self.source}: these gates were loaded for another model layout; "
                                  "load the file again for this target")

    def params_on(self, layer: str, device: torch.device) -> dict[str, torch.Tensor]:
        key = (layer, device)
        if key not in self._on:
            self._on[key] = {name: value.to(device) for name, value in self.params[layer].items()}
        return self._on[key]


def _check_layout(path: Path, shapes: Mapping[str, tuple[int, ...]], expected: Mapping[str, int]) -> None:
    missing = sorted(set(expected) - set(shapes))
    extra = sorted(set(shapes) - set(expected))
    if missing or extra:
        def listed(keys: list[str]) -> str:
            return ", ".join(keys[:4]) + (f" and {len(keys) - 4} more" if len(keys) > 4 else "")

        problems = []
        if missing:
            problems.append(f"{len(missing)} gate keys the target needs are missing ({listed(missing)})")
        if extra:
            problems.append(f"{len(extra)} keys match no gated layer of the target ({listed(extra)})")
        raise LoraCompatError(f"{path}: not a LoRAFusion gate for this model: {'; '.join(problems)}. Expected "
                              f"{len(expected)} keys, one gate per gated FLUX.1 layer (a file for another block "
                              "count or layer set does not fit)")
    for key, dim in expected.items():
        if shapes[key] != (dim,):
            raise LoraCompatError(f"{path}: {key} has shape {list(shapes[key])}, expected [{dim}] (the layer's "
                                  "fused output width on this model)")
