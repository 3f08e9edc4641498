"""A third-party base family, registered as a plugin for a small made-up model, works end to end."""
from __future__ import annotations

import gzip
import json
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from plugin_dist import install_plugin
import lora_compat
from lora_compat import plugins
from lora_compat.archs import Arch, HostNames
from lora_compat.hooks import hookimpl


class ToyModel(torch.nn.Module):
    """A made-up transformer: two blocks of two Linear layers."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = torch.nn.ModuleList(
            torch.nn.ModuleDict({"proj_in": torch.nn.Linear(8, 16), "proj_out": torch.nn.Linear(16, 8)})
            for _ in range(2))


def _table_file(model: torch.nn.Module, path: Path) -> Path:
    """The family's module table, from the model's own module shapes."""
    modules = {name: {p: list(t.shape) for p, t in m.named_parameters(recurse=False)}
               for name, m in model.named_modules() if any(True for _ in m.parameters(recurse=False))}
    with gzip.open(path, "wt") as f:
        json.dump({"components": {"transformer": modules}}, f)
    return path


def _registered_toy(tmp_path: Path, **naming):
    """Register the toy family (``naming``: its kohya prefixes and host names) and yield its model."""
    torch.manual_seed(0)
    model = ToyModel()
    arch = Arch(id="toy", title="Toy transformer", table_file=str(_table_file(model, tmp_path / "toy.json.gz")),
                metadata_hint=lambda md: md.get("ss_base_model_version") == "toy",
                component_classes={"transformer": ("ToyModel",)},
                model_hint=lambda components: any("blocks.0.proj_in" in m for m in components.values()), **naming)
    plugin = types.SimpleNamespace(register_archs=hookimpl(lambda register: register(arch)))
    plugins.register_plugin(plugin, name="toy-family")
    try:
        yield model
    finally:
        plugins.unregister_plugin(plugin)


@pytest.fixture
def toy(tmp_path):
    yield from _registered_toy(tmp_path, kohya_prefixes={"lora_unet_": "transformer"})


RANK, ALPHA = 2, 1.0


def _kohya_file(path: Path, prefix: str = "lora_unet_", seed: int = 1
                ) -> tuple[Path, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """A kohya-style LoRA on two toy modules, named ``prefix`` + the flattened module path."""
    g = torch.Generator().manual_seed(seed)
    tensors, factors = {}, {}
    for module, (out, inp) in (("blocks.0.proj_in", (16, 8)), ("blocks.1.proj_out", (8, 16))):
        down, up = torch.randn(RANK, inp, generator=g), torch.randn(out, RANK, generator=g)
        flat = prefix + module.replace(".", "_")
        tensors[f"{flat}.lora_down.weight"], tensors[f"{flat}.lora_up.weight"] = down, up
        tensors[f"{flat}.alpha"] = torch.tensor(ALPHA)
        factors[module] = (down, up)
    save_file(tensors, str(path), metadata={"ss_base_model_version": "toy"})
    return path, factors


def _expected(model: ToyModel, factors, strength: float = 1.0) -> dict[str, torch.Tensor]:
    # W + strength * alpha / rank * up @ down, computed by hand
    weights = dict(model.named_parameters())
    return {f"transformer.{m}.weight": weights[f"{m}.weight"].detach() + strength * (ALPHA / RANK) * (up @ down)
            for m, (down, up) in factors.items()}


def test_detects_and_reads_a_registered_family(toy, tmp_path):
    path, factors = _kohya_file(tmp_path / "toy_lora.safetensors")
    detection = lora_compat.detect(path)
    assert detection.base == "toy"
    patchset = lora_compat.read(path)
    assert sorted(patchset.keys()) == ["transformer.blocks.0.proj_in", "transformer.blocks.1.proj_out"]


def test_applies_with_a_registered_family(toy, tmp_path):
    path, factors = _kohya_file(tmp_path / "toy_lora.safetensors")
    expected = _expected(toy, factors, 0.5)
    got = lora_compat.patched_weights(path, {"transformer": toy}, 0.5)
    assert sorted(got) == sorted(expected)
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, rtol=1e-5, atol=1e-6)
    before = {n: p.detach().clone() for n, p in toy.named_parameters()}
    patcher = lora_compat.Patcher(toy)  # the component comes from the family's class names
    patcher.set([(path, 0.5)])
    for name, value in expected.items():
        torch.testing.assert_close(toy.get_parameter(name.partition(".")[2]).detach(), value, rtol=1e-5, atol=1e-6)
    patcher.set([])
    for name, value in before.items():
        assert torch.equal(toy.get_parameter(name).detach(), value)


def test_converts_with_a_registered_family(toy, tmp_path):
    path, factors = _kohya_file(tmp_path / "toy_lora.safetensors")
    expected = _expected(toy, factors)
    lora_compat.convert(path, "diffusers", tmp_path / "toy_diffusers.safetensors", base="toy")
    lora_compat.convert(tmp_path / "toy_diffusers.safetensors", "kohya", tmp_path / "back.safetensors", base="toy")
    from safetensors.torch import load_file

    back = load_file(str(tmp_path / "back.safetensors"))
    assert sorted(k.partition(".")[0] for k in back) == sorted(k.partition(".")[0] for k in load_file(str(path)))
    got = lora_compat.patched_weights(tmp_path / "back.safetensors", {"transformer": toy})
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, rtol=1e-5, atol=1e-6)


def test_bakes_with_a_registered_family(toy, tmp_path):
    from safetensors.torch import load_file

    from lora_compat.tools.bake import bake

    path, factors = _kohya_file(tmp_path / "toy_lora.safetensors")
    expected = _expected(toy, factors, 0.75)
    checkpoint = tmp_path / "toy_checkpoint"
    (checkpoint / "transformer").mkdir(parents=True)
    state = {k: v.detach().clone().contiguous() for k, v in toy.state_dict().items()}
    save_file(state, str(checkpoint / "transformer" / "diffusion_pytorch_model.safetensors"))
    bake(checkpoint, [(path, 0.75)], tmp_path / "baked", progress=False)
    baked = load_file(str(tmp_path / "baked" / "transformer" / "diffusion_pytorch_model.safetensors"))
    assert sorted(baked) == sorted(state)
    for key, value in state.items():
        want = expected.get(f"transformer.{key}", value)
        torch.testing.assert_close(baked[key], want, rtol=1e-5, atol=1e-6)


def _toy_host_paths(paths):
    """The made-up host's own names of the toy modules (as SGM names are a UNet's): ``layers.N.in``/``.out``."""
    return {p.replace("blocks.", "layers.").replace("proj_in", "in").replace("proj_out", "out"): p for p in paths}


@pytest.fixture
def toy_named(tmp_path):
    """The toy family with its own kohya prefix and host names, declared by its Arch alone."""
    yield from _registered_toy(tmp_path, kohya_prefixes={"lora_toy_": "transformer"},
                               alias_makers={"transformer": _toy_host_paths},
                               host_names={"transformer": HostNames("lora_toy_", aliases=_toy_host_paths)})


#: the toy modules under the family's host names (written by hand, not by lora_compat)
TOY_HOST_NAMES = {"blocks.0.proj_in": "lora_toy_layers_0_in", "blocks.1.proj_out": "lora_toy_layers_1_out"}


def _toy_prefixed_file(path: Path) -> tuple[Path, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """A kohya-style LoRA on the toy modules under the family's own prefix and flattened module paths."""
    return _kohya_file(path, "lora_toy_", seed=2)


def _host_named(factors) -> dict[str, torch.Tensor]:
    return {f"{TOY_HOST_NAMES[m]}.{suffix}": tensor for m, (down, up) in factors.items()
            for suffix, tensor in (("lora_down.weight", down), ("lora_up.weight", up))}


@pytest.mark.parametrize("to", ["kohya", "webui"])
def test_converts_to_the_family_host_names(toy_named, tmp_path, to):
    from safetensors.torch import load_file

    path, factors = _toy_prefixed_file(tmp_path / "toy_lora.safetensors")
    out = tmp_path / f"toy_{to}.safetensors"
    lora_compat.convert(path, to, out, base="toy")
    written = load_file(str(out))
    want = _host_named(factors)
    assert sorted(written) == sorted([*want, *(f"{n}.alpha" for n in TOY_HOST_NAMES.values())])
    for key, value in want.items():
        assert torch.equal(written[key], value), key
    assert all(float(written[f"{n}.alpha"]) == ALPHA for n in TOY_HOST_NAMES.values())
    # the family's host names read back (its aliases) and apply exactly, then bake
    expected = _expected(toy_named, factors, 0.5)
    got = lora_compat.patched_weights(out, {"transformer": toy_named}, 0.5)
    assert sorted(got) == sorted(expected)
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, rtol=1e-5, atol=1e-6)


def test_bakes_a_file_under_the_family_host_names(toy_named, tmp_path):
    from safetensors.torch import load_file

    from lora_compat.tools.bake import bake

    path, factors = _toy_prefixed_file(tmp_path / "toy_lora.safetensors")
    lora_compat.convert(path, "kohya", tmp_path / "toy_kohya.safetensors", base="toy")
    checkpoint = tmp_path / "toy_checkpoint"
    (checkpoint / "transformer").mkdir(parents=True)
    state = {k: v.detach().clone().contiguous() for k, v in toy_named.state_dict().items()}
    save_file(state, str(checkpoint / "transformer" / "diffusion_pytorch_model.safetensors"))
    report = bake(checkpoint, [(tmp_path / "toy_kohya.safetensors", 1.0)], tmp_path / "baked", progress=False)
    assert report.unmatched == {}
    baked = load_file(str(tmp_path / "baked" / "transformer" / "diffusion_pytorch_model.safetensors"))
    expected = _expected(toy_named, factors)
    for key, value in state.items():
        torch.testing.assert_close(baked[key], expected.get(f"transformer.{key}", value), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("layout", ["compvis", "comfy"])
@pytest.mark.parametrize("with_model", [False, True])
def test_host_converters_use_the_family_host_names(toy_named, tmp_path, layout, with_model):
    # what the webui extension and the ComfyUI node hand the host: the family's names, with or without the model
    from lora_compat.archs import ModuleIndex
    from lora_compat.hosts.convert import convert_for_host

    path, factors = _toy_prefixed_file(tmp_path / "toy_lora.safetensors")
    index = ModuleIndex.from_modules({"transformer": toy_named}) if with_model else None
    conversion = convert_for_host(str(path), layout, index)
    want = _host_named(factors)
    assert sorted(conversion.tensors) == sorted([*want, *(f"{n}.alpha" for n in TOY_HOST_NAMES.values())])
    for key, value in want.items():
        assert torch.equal(conversion.tensors[key], value), key
    assert conversion.unmatched == []


FAMILY_SOURCE = '''
"""Toy transformer: a made-up base family (one module, as a third party ships it)."""
from lora_compat.archs import Arch, HostNames
from lora_compat.hooks import hookimpl


def host_paths(paths):
    """The toy host's own names: layers.N.in / layers.N.out."""
    return {p.replace("blocks.", "layers.").replace("proj_in", "in").replace("proj_out", "out"): p for p in paths}


TOY = Arch(id="toy", title="Toy transformer", table_file=TABLE,
           kohya_prefixes={"lora_unet_": "transformer", "lora_toy_": "transformer"},
           alias_makers={"transformer": host_paths},
           host_names={"transformer": HostNames("lora_toy_", aliases=host_paths)},
           metadata_hint=lambda md: md.get("ss_base_model_version") == "toy",
           component_classes={"transformer": ("ToyModel",)})


@hookimpl
def register_archs(register):
    register(TOY)
'''


def test_a_family_from_an_entry_point(tmp_path):
    torch.manual_seed(0)
    table = _table_file(ToyModel(), tmp_path / "toy.json.gz")
    env = install_plugin(tmp_path, "toy_family", f"TABLE = {str(table)!r}\n" + FAMILY_SOURCE, "toy")
    path, _ = _kohya_file(tmp_path / "toy_lora.safetensors")
    cli = [sys.executable, "-m", "lora_compat"]
    listed = json.loads(subprocess.run(cli + ["dialects", "--json"], env=env, check=True, capture_output=True,
                                       text=True).stdout)
    assert {"id": "toy", "plugin": "toy", "title": "Toy transformer"} in listed["bases"]
    inspected = json.loads(subprocess.run(cli + ["inspect", "--json", str(path)], env=env, check=True,
                                          capture_output=True, text=True).stdout)
    assert (inspected["dialect"], inspected["base"], inspected["base_candidates"]) == ("kohya", "toy", ["toy"])
    assert (inspected["components"], inspected["targets"], inspected["unmatched"]) == ({"transformer": 2}, 2, [])
    out = tmp_path / "toy_kohya.safetensors"
    subprocess.run(cli + ["convert", "--to", "kohya", "-o", str(out), str(path)], env=env, check=True,
                   capture_output=True, text=True)
    from safetensors.torch import load_file

    assert sorted(load_file(str(out))) == sorted(f"{n}.{s}" for n in TOY_HOST_NAMES.values()
                                                 for s in ("alpha", "lora_down.weight", "lora_up.weight"))


@pytest.mark.parametrize("base, target, name", [
    ("sd15", "text_encoder.encoder.layers.0.self_attn.q_proj",
     "text_encoders.clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj"),
    ("sd2", "text_encoder.encoder.layers.0.self_attn.q_proj",
     "text_encoders.clip_h.transformer.text_model.encoder.layers.0.self_attn.q_proj"),
    ("sdxl", "text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj",
     "text_encoders.clip_g.transformer.text_model.encoder.layers.0.self_attn.q_proj"),
    ("flux1", "text_encoder_2.encoder.block.0.layer.0.SelfAttention.q",
     "text_encoders.t5xxl.transformer.encoder.block.0.layer.0.SelfAttention.q"),
])
def test_comfy_text_encoder_names_per_family(base, target, name):
    # ComfyUI's LoRA key for a text-encoder module: "text_encoders." + its CLIP state-dict name
    from lora_compat.dialects.kohya_names import kohya_names

    index = plugins.archs()[base].index
    assert kohya_names(index, [target], comfy=True, base=base)[target].name == name


def test_comfy_text_encoder_names_come_from_the_family():
    from dataclasses import replace

    from lora_compat.archs.sd import SD2
    from lora_compat.dialects.kohya_names import kohya_names

    arch = replace(SD2, id="sd2_fork", comfy_text_encoders={"text_encoder": "text_encoders.clip_x.transformer."})
    plugin = types.SimpleNamespace(register_archs=hookimpl(lambda register: register(arch)))
    plugins.register_plugin(plugin, name="sd2-fork")
    try:
        target = "text_encoder.encoder.layers.0.self_attn.q_proj"
        got = kohya_names(arch.index, [target], comfy=True, base="sd2_fork")[target].name
    finally:
        plugins.unregister_plugin(plugin)
    assert got == "text_encoders.clip_x.transformer.text_model.encoder.layers.0.self_attn.q_proj"


def test_catalogue_names_come_from_the_families(tmp_path):
    from lora_compat.tools.library import catalog_base

    for _ in _registered_toy(tmp_path, kohya_prefixes={"lora_unet_": "transformer"}, catalog_names=("toy 1.0",)):
        assert catalog_base("Toy 1.0") == "toy"
        assert catalog_base("Toy 2.0") is None
        # the built-in families' Civitai baseModel names and A1111 "sd version" values
        assert [catalog_base(n) for n in ("SD 1.5", "Pony", "Flux.1 D", "sd1", "sdxl")] == \
            ["sd15", "sdxl", "flux1", "sd15", "sdxl"]
    assert catalog_base("Toy 1.0") is None
