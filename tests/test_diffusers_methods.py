"""diffusers' own adapter methods on adapters that took lora_compat's patcher route (``enable()`` mode).

Files are real LyCORIS files (lycoris-lora); a weight at strength ``w`` is compared bit for bit with
``lora_compat.patched_weights`` at ``w`` on untouched copies (the patcher's exactness against LyCORIS itself is
tested in test_adapter_diffusers.py), and every restore with the state before the load, tensor by tensor.
"""
from __future__ import annotations

import copy
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest
import torch

import lora_compat
from lora_compat import LoraCompatError, patched_weights
from lora_compat.adapters import diffusers as adapter

from lora_compat.oracles.lycoris_oracle import write_lycoris_file
from sd_pipes import assert_close, base_params, forward, sd15_pipe

warnings.filterwarnings("ignore", category=lora_compat.LoraCompatWarning)
PATCHER_KINDS = ["diag_oft", "boft", "ia3", "dora_out", "lokr", "full", "norm"]


@contextmanager
def enabled() -> Iterator[None]:
    adapter.enable()
    try:
        yield
    finally:
        adapter.disable()


def snapshot(components: dict) -> dict[str, torch.Tensor]:
    """Every state_dict tensor, ``"<component>.<name>"``."""
    return {f"{c}.{k}": v.clone() for c, m in components.items() for k, v in m.state_dict().items()}


def assert_state(components: dict, want: dict[str, torch.Tensor]) -> None:
    now = snapshot(components)
    assert now.keys() == want.keys()
    differ = [k for k, v in want.items() if not torch.equal(now[k], v)]
    assert not differ, f"{len(differ)} tensors differ, e.g. {differ[:3]}"


def assert_weights(components: dict, before: dict[str, torch.Tensor], *patched: dict[str, torch.Tensor]) -> None:
    """Base parameters (PEFT wrappers folded) equal ``before`` overlaid with the patched values, bit for bit."""
    want = dict(before)
    for values in patched:
        want.update(values)
    now = {f"{c}.{k}": v for c, m in components.items() for k, v in base_params(m).items()}
    differ = [k for k, v in now.items() if not torch.equal(v, want[k])]
    assert not differ, f"{len(differ)} parameters differ, e.g. {differ[:3]}"


def only(values: dict[str, torch.Tensor], component: str) -> dict[str, torch.Tensor]:
    return {k: v for k, v in values.items() if k.startswith(component + ".")}


def lycoris(tmp_path: Path, components: dict, variant: str, seed: int) -> tuple[Path, list[str]]:
    """A real LyCORIS file and the components its network changed (by LyCORIS' own forward pass)."""
    folder = tmp_path / variant
    folder.mkdir(exist_ok=True)
    path, expected = write_lycoris_file(folder, components, variant, seed=seed)
    return path, sorted({key.partition(".")[0] for key in expected})


@pytest.mark.parametrize("variant", PATCHER_KINDS)
def test_patcher_route_adapter_behaves_as_a_diffusers_adapter(tmp_path: Path, variant: str) -> None:
    pipe, components = sd15_pipe()
    copies = copy.deepcopy(components)
    before = snapshot(components)
    path, touched = lycoris(tmp_path, components, variant, seed=21)
    at = {w: patched_weights(path, copies, w) for w in (0.6, 1.0)}
    with enabled():
        pipe.load_lora_weights(str(path), adapter_name="x")
        assert adapter.adapters(pipe) == {"x": "patcher"}
        assert pipe.get_list_adapters() == {c: ["x"] for c in touched}
        assert pipe.get_active_adapters() == ["x"]
        assert_weights(components, before, at[1.0])

        pipe.set_adapters("x", 0.6)
        assert_weights(components, before, at[0.6])
        pipe.set_adapters(["x"], [None])  # diffusers: None is 1.0
        assert_weights(components, before, at[1.0])

        pipe.unload_lora_weights()
        assert_state(components, before)
        assert pipe.get_list_adapters() == {} and pipe.get_active_adapters() == [] and adapter.adapters(pipe) == {}

        pipe.load_lora_weights(str(path), adapter_name="x")  # the name is free again
        pipe.set_adapters("x", 0.6)
        assert_weights(components, before, at[0.6])
        pipe.delete_adapters("x")
        assert_state(components, before)
        assert pipe.get_list_adapters() == {} and adapter.adapters(pipe) == {}

        pipe.load_lora_weights(str(path), adapter_name="x")
        pipe.delete_adapters(["x"])
        assert_state(components, before)


def test_mixing_a_diffusers_route_and_a_patcher_route_adapter(tmp_path: Path) -> None:
    pipe, components = sd15_pipe()
    copies = copy.deepcopy(components)
    before = snapshot(components)
    lora, _ = lycoris(tmp_path, components, "lora", seed=31)
    oft, _ = lycoris(tmp_path, components, "diag_oft", seed=32)
    oft_at = {w: patched_weights(oft, copies, w) for w in (0.3, 0.4, 1.0)}
    with enabled():
        pipe.load_lora_weights(str(lora), adapter_name="d")
        pipe.load_lora_weights(str(oft), adapter_name="o")
        assert adapter.adapters(pipe) == {"o": "patcher"}  # "d" went through diffusers' own method
        assert pipe.get_list_adapters() == {"unet": ["d", "o"], "text_encoder": ["d", "o"]}

        pipe.set_adapters(["d", "o"], [0.7, 0.4])
        assert pipe.get_active_adapters() == ["d", "o"]
        assert_weights(components, before, oft_at[0.4])  # the base layers under PEFT's LoRA layers
        reference = copy.deepcopy(copies)
        lora_compat.Patcher(reference).set([(lora, 0.7), (oft, 0.4)])
        for got, want in zip(forward(components), forward(reference)):
            assert_close(got, want)

        pipe.set_adapters("d", 0.5)  # "o" is left out: off, still loaded
        assert pipe.get_active_adapters() == ["d"]
        assert pipe.get_list_adapters() == {"unet": ["d", "o"], "text_encoder": ["d", "o"]}
        assert_weights(components, before)
        reference = copy.deepcopy(copies)
        lora_compat.Patcher(reference).set([(lora, 0.5)])
        for got, want in zip(forward(components), forward(reference)):
            assert_close(got, want)

        pipe.set_adapters(["o", "d"], [{"unet": 0.3}, 0.2])  # text_encoder left out of the dict: 1.0
        assert pipe.get_active_adapters() == ["o", "d"]
        assert_weights(components, before, only(oft_at[0.3], "unet"), only(oft_at[1.0], "text_encoder"))

        pipe.delete_adapters(["d", "o"])
        assert pipe.get_list_adapters() == {} and adapter.adapters(pipe) == {}
        assert_weights(components, before)
        pipe.unload_lora_weights()  # drops the empty PEFT wrappers
        assert_state(components, before)


def test_set_adapters_per_component_weights_and_refusals(tmp_path: Path) -> None:
    pipe, components = sd15_pipe()
    copies = copy.deepcopy(components)
    before = snapshot(components)
    oft, _ = lycoris(tmp_path, components, "boft", seed=41)
    at = {w: patched_weights(oft, copies, w) for w in (0.25, 0.5)}
    with enabled():
        pipe.load_lora_weights(str(oft), adapter_name="o")
        pipe.set_adapters("o", {"unet": 0.5, "text_encoder": 0.25, "transformer": 2.0})
        assert_weights(components, before, only(at[0.5], "unet"), only(at[0.25], "text_encoder"))
        applied = snapshot(components)
        with pytest.raises(LoraCompatError, match=r"adapter 'o' took lora_compat's patcher route .* its weight on "
                                                  r"'unet' must be one number, not \{'down': 0.5\}"):
            pipe.set_adapters("o", {"unet": {"down": 0.5}})
        with pytest.raises(ValueError, match=r"Adapter name\(s\) \{'nope'\} not in the list of present adapters"):
            pipe.set_adapters(["o", "nope"])
        with pytest.raises(ValueError, match=r"Length of adapter names 1 is not equal to the length of the weights 2"):
            pipe.set_adapters(["o"], [0.1, 0.2])
        assert_state(components, applied)  # a refused call changes nothing
        pipe.unload_lora_weights()
        assert_state(components, before)


def test_disable_lora_and_enable_lora(tmp_path: Path) -> None:
    pipe, components = sd15_pipe()
    copies = copy.deepcopy(components)
    before = snapshot(components)
    unpatched = forward(components)
    oft, _ = lycoris(tmp_path, components, "diag_oft", seed=51)
    ia3, _ = lycoris(tmp_path, components, "ia3", seed=52)
    lora, _ = lycoris(tmp_path, components, "lora", seed=53)
    with enabled():
        pipe.load_lora_weights(str(lora), adapter_name="d")
        pipe.load_lora_weights(str(oft), adapter_name="o")
        pipe.disable_lora()
        assert_weights(components, before)
        for got, want in zip(forward(components), unpatched):
            assert torch.equal(got, want)
        pipe.load_lora_weights(str(ia3), adapter_name="i")  # loaded while disabled: waits for enable_lora
        assert_weights(components, before)
        assert pipe.get_active_adapters() == ["d", "o", "i"]
        pipe.enable_lora()
        reference = copy.deepcopy(copies)
        lora_compat.Patcher(reference).set([(oft, 1.0), (ia3, 1.0)])
        assert_weights(components, before, snapshot_of(reference, before))
        pipe.unload_lora_weights()
        assert_state(components, before)


def snapshot_of(components: dict, before: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in snapshot(components).items() if k in before}


def test_fuse_pins_a_patcher_adapter_and_unload_bakes_it(tmp_path: Path) -> None:
    """PEFT keeps a fused adapter at the scale it was fused at and leaves it in the weights on unload; a
    patcher-route adapter does the same, exactly."""
    pipe, components = sd15_pipe()
    copies = copy.deepcopy(components)
    before = snapshot(components)
    oft, _ = lycoris(tmp_path, components, "diag_oft", seed=61)
    at = {w: patched_weights(oft, copies, w) for w in (0.3, 0.4, 0.8)}
    with enabled():
        pipe.load_lora_weights(str(oft), adapter_name="o")
        pipe.set_adapters("o", 0.8)
        pipe.fuse_lora(components=["unet", "text_encoder"], lora_scale=0.5)
        assert_weights(components, before, at[0.4])
        pipe.set_adapters("o", 0.3)  # fused: stays at 0.4, as a merged PEFT adapter does
        assert_weights(components, before, at[0.4])
        pipe.unfuse_lora(components=["unet", "text_encoder"])
        assert_weights(components, before, at[0.3])

        pipe.set_adapters("o", 0.8)
        pipe.fuse_lora(components=["unet"])
        pipe.set_adapters("o", 0.3)
        assert_weights(components, before, only(at[0.8], "unet"), only(at[0.3], "text_encoder"))
        pipe.unload_lora_weights()  # the fused part stays, the rest is restored
        assert_weights(components, before, only(at[0.8], "unet"))
        assert pipe.get_list_adapters() == {} and adapter.adapters(pipe) == {}

        baked = snapshot(components)
        pipe.load_lora_weights(str(oft), adapter_name="o")  # on top of the baked weights; removed exactly
        pipe.delete_adapters("o")
        assert_state(components, baked)


def test_fusing_a_peft_adapter_over_modules_the_patcher_writes(tmp_path: Path) -> None:
    """A diffusers-route LoRA and an IA3 on the same modules: fuse_lora, a weight change while fused,
    unfuse_lora (exact again where the patcher writes) and delete of both, which as in diffusers leaves what was
    fused in the weights."""
    pipe, components = sd15_pipe()
    copies = copy.deepcopy(components)
    before = snapshot(components)
    lora, _ = lycoris(tmp_path, components, "lora", seed=71)
    ia3, _ = lycoris(tmp_path, components, "ia3", seed=72)

    def reference(lora_strength: float, ia3_strength: float) -> tuple[torch.Tensor, torch.Tensor]:
        model = copy.deepcopy(copies)
        lora_compat.Patcher(model).set([(lora, lora_strength), (ia3, ia3_strength)])
        return forward(model)

    with enabled():
        pipe.load_lora_weights(str(lora), adapter_name="d")
        pipe.load_lora_weights(str(ia3), adapter_name="i")
        pipe.set_adapters(["d", "i"], [1.0, 0.6])
        pipe.fuse_lora(components=["unet", "text_encoder"], safe_fusing=True)  # PEFT gives weight.data new tensors
        for got, want in zip(forward(components), reference(1.0, 0.6)):
            assert_close(got, want)
        # (a LoRA weight change while fused would meet diffusers' own unfuse drift: PEFT subtracts at the new scale)
        pipe.set_adapters(["d", "i"], [1.0, 0.3])  # "i" stays as it was fused, as "d" does
        for got, want in zip(forward(components), reference(1.0, 0.6)):
            assert_close(got, want)
        fused = snapshot(components)
        with pytest.raises(LoraCompatError, match=r"delete_adapters: 'd' is fused \(fuse_lora\) into .*, whose "
                                                  r"weights the patcher-route adapter 'i' also changes"):
            pipe.delete_adapters("d")
        assert_state(components, fused)

        pipe.unfuse_lora(components=["unet", "text_encoder"])
        ia3_at = patched_weights(ia3, copies, 0.3)  # where the patcher writes, no trace of PEFT's subtraction
        now = {f"{c}.{k}": v for c, m in components.items() for k, v in base_params(m).items()}
        assert all(torch.equal(now[k], v) for k, v in ia3_at.items())
        for got, want in zip(forward(components), reference(1.0, 0.3)):
            assert_close(got, want)

        pipe.fuse_lora(components=["unet", "text_encoder"], lora_scale=0.5)
        pipe.delete_adapters(["d", "i"])
        assert pipe.get_list_adapters() == {} and adapter.adapters(pipe) == {}
        for got, want in zip(forward(components), reference(0.5, 0.15)):
            assert_close(got, want)


def test_peft_route_loha_under_diffusers_methods(tmp_path: Path) -> None:
    pipe, components = sd15_pipe()
    copies = copy.deepcopy(components)
    before = snapshot(components)
    loha, _ = lycoris(tmp_path, components, "loha", seed=81)
    lora_compat.Patcher(copies).set([(loha, 0.5)])
    with enabled():
        pipe.load_lora_weights(str(loha), adapter_name="h")
        assert adapter.adapters(pipe) == {"h": "peft"}
        assert pipe.get_list_adapters() == {"unet": ["h"], "text_encoder": ["h"]}
        assert pipe.get_active_adapters() == ["h"]
        pipe.set_adapters("h", 0.5)
        for got, want in zip(forward(components), forward(copies)):
            assert_close(got, want)
        pipe.delete_adapters("h")
        assert adapter.adapters(pipe) == {} and pipe.get_list_adapters() == {}
        pipe.load_lora_weights(str(loha), adapter_name="h")  # the name is free again
        pipe.unload_lora_weights()
        assert_state(components, before)
        assert adapter.adapters(pipe) == {}


def test_a_patcher_adapter_name_cannot_be_taken_by_a_diffusers_load(tmp_path: Path) -> None:
    pipe, components = sd15_pipe()
    oft, _ = lycoris(tmp_path, components, "diag_oft", seed=91)
    lora, _ = lycoris(tmp_path, components, "lora", seed=92)
    with enabled():
        pipe.load_lora_weights(str(oft), adapter_name="x")
        with pytest.raises(LoraCompatError, match=r"adapter name 'x' is already in use"):
            pipe.load_lora_weights(str(lora), adapter_name="x")
        assert pipe.get_list_adapters() == {"unet": ["x"], "text_encoder": ["x"]}


def test_flux_unload_lora_weights_removes_a_control_lora(tmp_path: Path) -> None:
    """Flux's own ``unload_lora_weights(reset_to_overwritten_params=...)`` override reaches the patcher too."""
    from diffusers import FluxPipeline

    from flux_models import control_file, make_flux

    model = make_flux()
    pipe = FluxPipeline(scheduler=None, vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None,
                        tokenizer_2=None, transformer=model)
    before = snapshot({"transformer": model})
    path = control_file(tmp_path / "control.safetensors", model)
    with enabled():
        pipe.load_lora_weights(str(path), adapter_name="c")
        assert model.config.in_channels == 32
        assert pipe.get_list_adapters() == {"transformer": ["c"]}
        pipe.unload_lora_weights(reset_to_overwritten_params=True)
    assert model.config.in_channels == 16 and model.x_embedder.in_features == 16
    assert_state({"transformer": model}, before)


def test_enable_wraps_and_disable_restores_diffusers_methods() -> None:
    from diffusers.loaders.lora_base import LoraBaseMixin
    from diffusers.loaders.lora_pipeline import StableDiffusionLoraLoaderMixin

    names = ["get_list_adapters", "get_active_adapters", "set_adapters", "delete_adapters", "unload_lora_weights",
             "disable_lora", "enable_lora", "fuse_lora", "unfuse_lora"]
    originals = {n: LoraBaseMixin.__dict__[n] for n in names}
    loader = StableDiffusionLoraLoaderMixin.__dict__["load_lora_weights"]
    adapter.enable()
    adapter.enable()
    try:
        assert all(LoraBaseMixin.__dict__[n] is not originals[n] for n in names)
        assert all(LoraBaseMixin.__dict__[n].__wrapped__ is originals[n] for n in names)
    finally:
        adapter.disable()
        adapter.disable()
    assert {n: LoraBaseMixin.__dict__[n] for n in names} == originals
    assert StableDiffusionLoraLoaderMixin.__dict__["load_lora_weights"] is loader
