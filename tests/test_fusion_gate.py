"""The AutoLoRA gate in hot mode: it equals its equations (written out here in float64, from
retrieval_and_fusion.md §1) on random inputs and inside a FLUX.1 transformer, on split and fused hosts; with
saturated gates it is the plain sum; gate files are checked by key names and shapes; nothing is invented.

The DiffSynth layer → diffusers modules table below is written from the reference, independently of
``lora_compat.tools.autolora_gate``.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import lora_compat
from lora_compat import Patcher
from lora_compat.errors import LoraCompatError
from lora_compat.tools.autolora_gate import FusionGates, gate, host_layers

from lora_compat.oracles.models import make_sd15_components
from flux_models import (PARTIAL, bfl_table, diffusers_file, flux_forward, kohya_flux_file, make_bfl_host,
                         make_flux)

warnings.filterwarnings("ignore", category=lora_compat.LoraCompatWarning)

PARAMS = ("weight_base", "weight_lora", "weight_cross", "weight_out", "bias",
          "norm_base.weight", "norm_base.bias", "norm_lora.weight", "norm_lora.bias")
DOUBLE = {"attn.a_to_qkv": ["attn.to_q", "attn.to_k", "attn.to_v"],
          "attn.b_to_qkv": ["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"],
          "attn.a_to_out": ["attn.to_out.0"], "attn.b_to_out": ["attn.to_add_out"],
          "ff_a.0": ["ff.net.0.proj"], "ff_a.2": ["ff.net.2"], "ff_b.0": ["ff_context.net.0.proj"],
          "ff_b.2": ["ff_context.net.2"], "norm1_a.linear": ["norm1.linear"], "norm1_b.linear": ["norm1_context.linear"]}
SINGLE = {"to_qkv_mlp": ["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"], "proj_out": ["proj_out"],
          "norm.linear": ["norm.linear"]}
BFL = {"blocks.{i}.attn.a_to_qkv": "double_blocks.{i}.img_attn.qkv", "blocks.{i}.ff_a.2": "double_blocks.{i}.img_mlp.2",
       "single_blocks.{i}.to_qkv_mlp": "single_blocks.{i}.linear1"}


def gated_layers(model: torch.nn.Module) -> dict[str, list[str]]:
    """DiffSynth layer name → the diffusers modules whose outputs it concatenates."""
    layers = {}
    for i in range(len(model.transformer_blocks)):
        for name, parts in DOUBLE.items():
            layers[f"blocks.{i}.{name}"] = [f"transformer_blocks.{i}.{p}" for p in parts]
    for i in range(len(model.single_transformer_blocks)):
        for name, parts in SINGLE.items():
            layers[f"single_blocks.{i}.{name}"] = [f"single_transformer_blocks.{i}.{p}" for p in parts]
    return layers


def reference_gate(p: dict[str, torch.Tensor], h: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
    """The equations in float64: LayerNorm by hand (biased variance, eps 1e-5), logistic gate."""
    p = {k: v.double() for k, v in p.items()}
    h, o = h.double(), o.double()

    def norm(v: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        mean = v.mean(-1, keepdim=True)
        var = ((v - mean) ** 2).mean(-1, keepdim=True)
        return (v - mean) / torch.sqrt(var + 1e-5) * w + b

    hn = norm(h, p["norm_base.weight"], p["norm_base.bias"])
    on = norm(o, p["norm_lora.weight"], p["norm_lora.bias"])
    z = p["weight_base"] * hn + p["weight_lora"] * on + p["weight_cross"] * hn * on + p["bias"]
    g = 1.0 / (1.0 + torch.exp(-z))
    return h + (p["weight_out"] * g * o).sum(0)


def random_params(dim: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    return {name: torch.randn(dim, generator=g) for name in PARAMS}


def saturated_params(dim: int) -> dict[str, torch.Tensor]:
    zeros, ones = torch.zeros(dim), torch.ones(dim)
    return {"weight_base": zeros, "weight_lora": zeros, "weight_cross": zeros, "weight_out": ones,
            "bias": torch.full((dim,), 40.0), "norm_base.weight": ones, "norm_base.bias": zeros,
            "norm_lora.weight": ones, "norm_lora.bias": zeros}


def write_gate_file(path: Path, model: torch.nn.Module, make=None, seed: int = 0) -> Path:
    """A LoRAFusion file in DiffSynth's key format for ``model``'s layer widths."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer, parts in gated_layers(model).items():
        dim = sum(model.get_submodule(p).weight.shape[0] for p in parts)
        params = make(dim) if make else random_params(dim, g)
        for name, value in params.items():
            tensors[f"model_dict.{layer.replace('.', '___')}.{name}"] = value.clone()
    save_file(tensors, str(path))
    return path


def lora_deltas(model: torch.nn.Module, kohya: Path, partial: Path) -> list[dict[str, torch.Tensor]]:
    """Each file's ΔW per diffusers module, from the file's tensors (kohya: alpha/rank = 1/2, fused rows)."""
    deltas: list[dict[str, torch.Tensor]] = [{}, {}]
    k = load_file(str(kohya))
    for bfl, parts in bfl_table(model).items():
        key = "lora_unet_" + bfl.replace(".", "_")
        if f"{key}.lora_up.weight" not in k:
            continue
        fused = k[f"{key}.lora_up.weight"] @ k[f"{key}.lora_down.weight"] * 0.5
        row = 0
        for p in parts:
            rows = model.get_submodule(p).weight.shape[0]
            deltas[0][p] = fused[row:row + rows]
            row += rows
    d = load_file(str(partial))
    for name in PARTIAL:
        deltas[1][name] = d[f"transformer.{name}.lora_B.weight"] @ d[f"transformer.{name}.lora_A.weight"]
    return deltas


def capture(model: torch.nn.Module, names: list[str]) -> tuple[dict, list]:
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def hook(name):
        def record(module, args, output) -> None:
            seen.setdefault(name, (args[0].detach().clone(), output.detach().clone()))
        return record

    return seen, [model.get_submodule(n).register_forward_hook(hook(n)) for n in names]


def test_gate_equals_its_equations_on_random_inputs() -> None:
    g = torch.Generator().manual_seed(0)
    for dim, loras in ((24, 1), (40, 3)):
        params = random_params(dim, g)
        h = torch.randn(2, 5, dim, generator=g) * 3
        o = torch.randn(loras, 2, 5, dim, generator=g) * 0.2
        got = gate(params, h, o)
        want = reference_gate(params, h, o)
        assert got.dtype == torch.float32
        assert ((got.double() - want).norm() / want.norm()).item() < 1e-6


def test_saturated_gates_are_the_plain_sum() -> None:
    g = torch.Generator().manual_seed(1)
    h, o = torch.randn(3, 16, generator=g), torch.randn(2, 3, 16, generator=g)
    assert torch.equal(gate(saturated_params(16), h, o), h + (o[0] + o[1]))


def test_gated_layers_equal_the_equations_inside_a_flux_transformer(tmp_path: Path) -> None:
    model = make_flux()
    kohya = kohya_flux_file(tmp_path / "kohya.safetensors", model)
    partial = diffusers_file(tmp_path / "partial.safetensors", model, PARTIAL)
    gates_path = write_gate_file(tmp_path / "gate.safetensors", model, seed=3)
    strengths = (0.8, -0.6)
    patcher = Patcher({"transformer": model}, mode="hot", fusion=gates_path)
    patcher.set([(kohya, strengths[0]), (partial, strengths[1])])
    layers = gated_layers(model)
    checked = ["blocks.0.attn.a_to_qkv", "blocks.1.attn.b_to_qkv", "blocks.1.ff_a.2", "single_blocks.0.to_qkv_mlp",
               "single_blocks.1.to_qkv_mlp", "single_blocks.1.norm.linear"]
    seen, hooks = capture(model, [p for layer in checked for p in layers[layer]])
    flux_forward(model, 16)
    for h in hooks:
        h.remove()
    file_params = load_file(str(gates_path))
    deltas = lora_deltas(model, kohya, partial)
    for layer in checked:
        parts = layers[layer]
        x = seen[parts[0]][0]
        assert all(torch.equal(seen[p][0], x) for p in parts)  # the parts of a layer share their input
        base = torch.cat([torch.nn.functional.linear(x, model.get_submodule(p).weight, model.get_submodule(p).bias)
                          for p in parts], dim=-1)
        outputs = []
        for delta, strength in zip(deltas, strengths):
            if any(p in delta for p in parts):
                weight = torch.cat([delta.get(p, torch.zeros_like(model.get_submodule(p).weight)) for p in parts])
                outputs.append(x @ weight.T * strength)
        params = {n: file_params[f"model_dict.{layer.replace('.', '___')}.{n}"] for n in PARAMS}
        want = reference_gate(params, base, torch.stack(outputs))
        got = torch.cat([seen[p][1] for p in parts], dim=-1).double()
        assert ((got - want).norm() / want.norm()).item() < 1e-5, layer
        plain = base.double() + sum(o.double() for o in outputs)
        assert ((got - plain).norm() / plain.norm()).item() > 1e-3, layer  # the gate did something
    patcher.clear()
    assert torch.equal(flux_forward(model, 16), flux_forward(make_flux(), 16))


def test_saturated_gate_file_equals_the_plain_sum_in_a_whole_forward(tmp_path: Path) -> None:
    model = make_flux()
    kohya = kohya_flux_file(tmp_path / "kohya.safetensors", model)
    partial = diffusers_file(tmp_path / "partial.safetensors", model, PARTIAL)
    gates_path = write_gate_file(tmp_path / "gate.safetensors", model, make=saturated_params)
    stack = [(kohya, 0.7), (partial, 1.2)]
    gated = Patcher({"transformer": model}, mode="hot", fusion=gates_path)
    gated.set(stack)
    got = flux_forward(model, 16)
    gated.close()
    plain = Patcher({"transformer": model}, mode="hot")
    plain.set(stack)
    want = flux_forward(model, 16)
    plain.close()
    merged = Patcher({"transformer": model})
    merged.set(stack)
    merged_out = flux_forward(model, 16)
    merged.clear()
    assert ((got - want).norm() / want.norm()).item() < 1e-5
    assert ((got - merged_out).norm() / merged_out.norm()).item() < 1e-5
    assert ((want - flux_forward(model, 16)).norm() / want.norm()).item() > 1e-2  # the LoRAs matter


def test_fused_host_gates_exactly_like_the_split_host(tmp_path: Path) -> None:
    model = make_flux()
    host = make_bfl_host(model)
    kohya = kohya_flux_file(tmp_path / "kohya.safetensors", model)
    partial = diffusers_file(tmp_path / "partial.safetensors", model, PARTIAL)
    gates_path = write_gate_file(tmp_path / "gate.safetensors", model, seed=4)
    stack = [(kohya, 0.9), (partial, 0.5)]
    split = Patcher({"transformer": model}, mode="hot", fusion=gates_path)
    fused = Patcher({"transformer": host}, mode="hot", fusion=gates_path)
    split.set(stack)
    fused.set(stack)
    layers = gated_layers(model)
    g = torch.Generator().manual_seed(9)
    for pattern, bfl_pattern in BFL.items():
        for i in range(2):
            layer, bfl = pattern.format(i=i), bfl_pattern.format(i=i)
            parts = layers[layer]
            x = torch.randn(1, 6, model.get_submodule(parts[0]).weight.shape[1], generator=g)
            with torch.no_grad():
                want = torch.cat([model.get_submodule(p)(x) for p in parts], dim=-1)
                got = host.get_submodule(bfl)(x)
            assert ((got - want).norm() / want.norm()).item() < 1e-5, layer


def test_full_size_flux_has_the_released_gate_layout() -> None:
    """FLUX.1-dev on the meta device: 304 gated layers, 2736 tensors, 27,316,224 parameters, the numbers of
    DiffSynth's released LoRAFusion-preview file."""
    from lora_compat.archs.generate_tables import build_components

    layers = host_layers({"transformer": build_components("flux1")["transformer"]})
    assert len(layers) == 304
    assert len(layers) * len(PARAMS) == 2736
    assert sum(layer.dim for layer in layers) * len(PARAMS) == 27_316_224
    dims = {layer.name: layer.dim for layer in layers}
    assert (dims["blocks.0.attn.a_to_qkv"], dims["blocks.18.norm1_b.linear"], dims["single_blocks.37.to_qkv_mlp"],
            dims["single_blocks.0.norm.linear"], dims["blocks.3.ff_b.0"]) == (9216, 18432, 21504, 9216, 12288)


def test_gate_files_are_checked_by_names_and_shapes(tmp_path: Path) -> None:
    model = make_flux()
    target = {"transformer": model}
    with pytest.raises(LoraCompatError, match=r"nothing\.safetensors: no LoRAFusion weight file there.*never "
                                              r"invents them"):
        Patcher(target, mode="hot", fusion=tmp_path / "nothing.safetensors")
    good = write_gate_file(tmp_path / "gate.safetensors", model)
    tensors = load_file(str(good))
    missing = dict(tensors)
    del missing["model_dict.single_blocks___1___proj_out.weight_cross"]
    save_file(missing, str(tmp_path / "missing.safetensors"))
    with pytest.raises(LoraCompatError, match=r"missing\.safetensors: not a LoRAFusion gate for this model: 1 gate "
                                              r"keys the target needs are missing \(model_dict\.single_blocks___1"
                                              r"___proj_out\.weight_cross\)"):
        FusionGates.load(tmp_path / "missing.safetensors", target)
    wrong = dict(tensors)
    wrong["model_dict.blocks___0___attn___a_to_qkv.bias"] = torch.zeros(64)
    save_file(wrong, str(tmp_path / "wrong.safetensors"))
    with pytest.raises(LoraCompatError, match=r"wrong\.safetensors: model_dict\.blocks___0___attn___a_to_qkv\.bias "
                                              r"has shape \[64\], expected \[192\]"):
        FusionGates.load(tmp_path / "wrong.safetensors", target)
    bigger = write_gate_file(tmp_path / "bigger.safetensors", make_flux(num_layers=3))
    with pytest.raises(LoraCompatError, match=r"bigger\.safetensors: .*90 keys match no gated layer of the target "
                                              r"\(model_dict\.blocks___2___"):
        FusionGates.load(bigger, target)
    (tmp_path / "garbage.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(LoraCompatError, match=r"garbage\.safetensors: not a readable safetensors file"):
        FusionGates.load(tmp_path / "garbage.safetensors", target)


def test_gate_refuses_merge_mode_and_non_flux_targets(tmp_path: Path) -> None:
    model = make_flux()
    good = write_gate_file(tmp_path / "gate.safetensors", model)
    with pytest.raises(LoraCompatError, match=r"cannot be merged into the weights: use Patcher\(target, "
                                              r"mode='hot', fusion=\.\.\.\)"):
        Patcher({"transformer": model}, fusion=good)
    with pytest.raises(LoraCompatError, match=r"the AutoLoRA gate exists for FLUX\.1 transformers only; the target "
                                              r"has unet \(UNet2DConditionModel\)"):
        Patcher({"unet": make_sd15_components()["unet"]}, mode="hot", fusion=good)
    gates = FusionGates.load(good, {"transformer": model})
    with pytest.raises(LoraCompatError, match=r"loaded for another model layout"):
        Patcher({"transformer": make_bfl_host(model)}, mode="hot", fusion=gates).set([])
