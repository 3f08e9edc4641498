"""The diffusers adapter: every kind through ``load`` equals the reference library's result; diffusers'
adapter management works on what we load; ``enable()``/``disable()``; exact restoration."""
from __future__ import annotations

import copy
import warnings
from pathlib import Path

import pytest
import torch

import lora_compat
from lora_compat import LoraCompatError
from lora_compat.adapters import diffusers as adapter

from lora_compat.oracles.lycoris_oracle import ALGOS, write_lycoris_file
from lora_compat.oracles.models import make_sd15_components, make_sdxl_components, tiny_sd15_pipeline, tiny_tokenizer
from lora_compat.oracles.peft_oracle import VARIANTS as PEFT_VARIANTS
from lora_compat.oracles.peft_oracle import write_peft_file
from sd_pipes import assert_close, base_params, forward, sd15_pipe

warnings.filterwarnings("ignore", category=lora_compat.LoraCompatWarning)
EXPECTED_ROUTE = {"lora": "diffusers", "loha": "peft"}


def with_values(components: dict, values: dict[str, torch.Tensor]) -> dict:
    """Deep copies of the (unpatched) components with the given parameter values."""
    copies = {k: copy.deepcopy(m) for k, m in components.items()}
    for key, value in values.items():
        component, _, name = key.partition(".")
        params = dict(copies[component].named_parameters())
        with torch.no_grad():
            params[name].data = value.clone()
    return copies


@pytest.mark.parametrize("variant", [v for v in ALGOS if v != "lora_tucker"] + ["lora_tucker"])
def test_every_lycoris_kind_loads_and_matches_lycoris(tmp_path: Path, variant: str) -> None:
    pipe, components = sd15_pipe()
    pristine = {c: {k: v.clone() for k, v in base_params(m).items()} for c, m in components.items()}
    path, expected = write_lycoris_file(tmp_path, components, variant, seed=3)
    reference = forward(with_values(components, expected))
    name = adapter.load(pipe, path)
    assert name.route == EXPECTED_ROUTE.get(variant, "patcher") and name.unmatched == []
    for got, want in zip(forward(components), reference):
        assert_close(got, want)
    adapter.unload(pipe, name)
    for component, module in components.items():
        now = base_params(module)
        assert now.keys() == pristine[component].keys()
        assert all(torch.equal(now[k], v) for k, v in pristine[component].items())


@pytest.mark.parametrize("variant", PEFT_VARIANTS)
def test_every_peft_and_diffusers_format_loads_and_matches_peft(tmp_path: Path, variant: str) -> None:
    pipe, components = sd15_pipe()
    path, expected = write_peft_file(tmp_path, components, variant)
    reference = forward(with_values(components, expected))
    name = adapter.load(pipe, path)
    for got, want in zip(forward(components), reference):
        assert_close(got, want)
    adapter.unload(pipe, name)


def _two_loras(tmp_path: Path, components: dict) -> tuple[Path, Path]:
    paths = []
    for name, seed in (("a", 1), ("b", 2)):
        (tmp_path / name).mkdir()
        paths.append(write_lycoris_file(tmp_path / name, components, "lora", seed=seed)[0])
    return paths[0], paths[1]


def test_diffusers_adapter_management_on_what_we_load(tmp_path: Path) -> None:
    """set_adapters (0.7, 0.3), fuse_lora/unfuse_lora, delete_adapters and unload_lora_weights behave as
    diffusers documents on adapters loaded through lora_compat; lora_compat's unload() is bit-exact after them."""
    pipe, components = sd15_pipe()
    pristine = {c: {k: v.clone() for k, v in base_params(m).items()} for c, m in components.items()}
    a, b = _two_loras(tmp_path, components)
    # the expected model: our patcher at (0.7, 0.3) on copies
    copies = {k: copy.deepcopy(m) for k, m in components.items()}
    lora_compat.Patcher(copies).set([(a, 0.7), (b, 0.3)])
    want = forward(copies)
    only_a = {k: copy.deepcopy(m) for k, m in components.items()}
    lora_compat.Patcher(only_a).set([(a, 0.7)])

    assert adapter.load(pipe, a, "a") == "a" and adapter.load(pipe, b, "b").route == "diffusers"
    pipe.set_adapters(["a", "b"], adapter_weights=[0.7, 0.3])
    for got, expected in zip(forward(components), want):
        assert_close(got, expected)
    assert sorted(pipe.get_active_adapters()) == ["a", "b"]

    pipe.fuse_lora(components=["unet", "text_encoder"])
    fused = forward(components)
    for got, expected in zip(fused, want):
        assert_close(got, expected)
    pipe.unfuse_lora(components=["unet", "text_encoder"])

    pipe.delete_adapters("b")
    for got, expected in zip(forward(components), forward(only_a)):
        assert_close(got, expected)
    pipe.unload_lora_weights()
    drifted = any(not torch.equal(base_params(m)[k], v) for c, m in components.items()
                  for k, v in pristine[c].items())
    assert drifted  # diffusers' fuse/unfuse subtracts: not exact, as diffusers.md measured
    adapter.unload(pipe)  # lora_compat's unload puts the exact originals back
    assert adapter.adapters(pipe) == {}
    for component, module in components.items():
        now = base_params(module)
        assert now.keys() == pristine[component].keys()
        assert all(torch.equal(now[k], v) for k, v in pristine[component].items()), component


def test_set_strength_and_unload_work_on_every_route(tmp_path: Path) -> None:
    pipe, components = sd15_pipe()
    pristine = {c: {k: v.clone() for k, v in base_params(m).items()} for c, m in components.items()}
    files = {}
    for variant in ("lora", "loha", "lokr"):
        (tmp_path / variant).mkdir()
        files[variant], _ = write_lycoris_file(tmp_path / variant, components, variant, seed=5)
    copies = {k: copy.deepcopy(m) for k, m in components.items()}
    lora_compat.Patcher(copies).set([(files["lora"], 0.5), (files["loha"], -0.4), (files["lokr"], 0.8)])
    want = forward(copies)
    names = {v: adapter.load(pipe, f) for v, f in files.items()}
    # PEFT cannot put LoHa layers on modules the LoRA adapter already wraps: that LoHa goes to the patcher
    assert {v: n.route for v, n in names.items()} == {"lora": "diffusers", "loha": "patcher", "lokr": "patcher"}

    for variant, strength in (("lora", 0.5), ("loha", -0.4), ("lokr", 0.8)):
        adapter.set_strength(pipe, names[variant], strength)
    for got, expected in zip(forward(components), want):
        assert_close(got, expected)
    adapter.unload(pipe)
    assert adapter.adapters(pipe) == {}
    for component, module in components.items():
        now = base_params(module)
        assert all(torch.equal(now[k], v) for k, v in pristine[component].items()), component
    with pytest.raises(LoraCompatError, match=r"no adapter 'lora' was loaded through lora_compat"):
        adapter.set_strength(pipe, "lora", 1.0)


def test_enable_makes_load_lora_weights_take_a_loha_file(tmp_path: Path) -> None:
    from diffusers.loaders.lora_pipeline import StableDiffusionLoraLoaderMixin

    original = StableDiffusionLoraLoaderMixin.__dict__["load_lora_weights"]
    pipe, components = sd15_pipe()
    path, expected = write_lycoris_file(tmp_path, components, "loha", seed=4)
    reference = forward(with_values(components, expected))
    with pytest.raises(Exception):  # plain diffusers rejects LoHa
        pipe.load_lora_weights(str(path), adapter_name="plain")
    adapter.enable()
    adapter.enable()  # idempotent
    try:
        assert adapter.enabled()
        pipe.load_lora_weights(str(path), adapter_name="loha")
        for got, want in zip(forward(components), reference):
            assert_close(got, want)
        assert adapter.adapters(pipe) == {"loha": "peft"}
    finally:
        adapter.disable()
        adapter.disable()
    assert StableDiffusionLoraLoaderMixin.__dict__["load_lora_weights"] is original and not adapter.enabled()


def test_enable_converts_plain_lora_then_calls_diffusers(tmp_path: Path) -> None:
    """A kohya LoRA goes through diffusers' own method as a canonical dict (a PEFT adapter is created)."""
    pipe, components = sd15_pipe()
    path, expected = write_lycoris_file(tmp_path, components, "lora", seed=6)
    reference = forward(with_values(components, expected))
    adapter.enable()
    try:
        pipe.load_lora_weights(str(path), adapter_name="k")
    finally:
        adapter.disable()
    assert "k" in {n for names in pipe.get_list_adapters().values() for n in names}
    for got, want in zip(forward(components), reference):
        assert_close(got, want)


def test_sdxl_pipeline_load(tmp_path: Path) -> None:
    from diffusers import StableDiffusionXLPipeline

    components = make_sdxl_components(seed=7)
    pipe = StableDiffusionXLPipeline(vae=None, text_encoder=components["text_encoder"],
                                     text_encoder_2=components["text_encoder_2"], tokenizer=None, tokenizer_2=None,
                                     unet=components["unet"], scheduler=None)
    params = {c: {k: v.clone() for k, v in base_params(m).items()} for c, m in components.items()}
    for variant in ("lora", "loha", "boft"):
        (tmp_path / variant).mkdir()
        path, expected = write_lycoris_file(tmp_path / variant, components, variant, seed=8)
        copies = with_values(components, expected)
        name = adapter.load(pipe, path)
        assert name.route == EXPECTED_ROUTE.get(variant, "patcher")
        g = torch.Generator().manual_seed(1)
        sample = torch.randn(1, 4, 16, 16, generator=g)
        hidden = torch.randn(1, 7, components["unet"].config.cross_attention_dim, generator=g)
        cond = {"text_embeds": torch.randn(1, 8, generator=g), "time_ids": torch.randn(1, 6, generator=g)}
        with torch.no_grad():
            got = components["unet"](sample, torch.tensor([5]), hidden, added_cond_kwargs=cond).sample
            want = copies["unet"](sample, torch.tensor([5]), hidden, added_cond_kwargs=cond).sample
        assert_close(got, want)
        adapter.unload(pipe, name)
    for c, module in components.items():
        assert all(torch.equal(base_params(module)[k], v) for k, v in params[c].items())


def test_name_in_use_is_refused(tmp_path: Path) -> None:
    pipe, components = sd15_pipe()
    path, _ = write_lycoris_file(tmp_path, components, "lora", seed=9)
    adapter.load(pipe, path, "x")
    with pytest.raises(LoraCompatError, match=r"adapter name 'x' is already in use"):
        adapter.load(pipe, path, "x")


def test_flux_pipeline_load_kohya_partial_and_control(tmp_path: Path) -> None:
    from diffusers import FluxPipeline

    from flux_models import PARTIAL, control_file, diffusers_file, flux_forward, kohya_flux_file, make_flux

    model = make_flux()
    pipe = FluxPipeline(scheduler=None, vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None,
                        tokenizer_2=None, transformer=model)
    pristine = {k: v.clone() for k, v in base_params(model).items()}
    files = {"kohya": kohya_flux_file(tmp_path / "kohya.safetensors", model),
             "partial": diffusers_file(tmp_path / "partial.safetensors", model, PARTIAL),
             "control": control_file(tmp_path / "control.safetensors", model)}
    for kind, route, channels in (("kohya", "diffusers", 16), ("partial", "diffusers", 16), ("control", "patcher", 32)):
        reference = make_flux()
        lora_compat.Patcher({"transformer": reference}).set([(files[kind], 0.6)])
        name = adapter.load(pipe, files[kind], strength=0.6)
        assert name.route == route
        assert model.config.in_channels == channels
        assert_close(flux_forward(model, channels), flux_forward(reference, channels))
        adapter.unload(pipe, name)
        now = base_params(model)
        assert now.keys() == pristine.keys() and all(torch.equal(now[k], v) for k, v in pristine.items())
        assert model.config.in_channels == 16


def _two_steps(pipe) -> torch.Tensor:
    out = pipe("a cat in snow", num_inference_steps=2, generator=torch.Generator().manual_seed(0), height=16,
               width=16, output_type="pt", guidance_scale=3.0)
    return out.images


@pytest.mark.parametrize("variant", ["lora", "loha", "boft"])
def test_two_step_pipeline_call_matches_the_reference_library(tmp_path: Path, variant: str) -> None:
    """A whole 2-step StableDiffusionPipeline call after ``load`` equals the same call with the weights the
    reference library's forward implies; after ``unload`` it equals the unpatched call exactly."""
    tokenizer = tiny_tokenizer(tmp_path)
    components = make_sd15_components(seed=100)
    pipe = tiny_sd15_pipeline(components, tokenizer)
    before = _two_steps(pipe)
    path, expected = write_lycoris_file(tmp_path, components, variant, seed=12)
    reference = _two_steps(tiny_sd15_pipeline(with_values(components, expected), tokenizer))
    name = adapter.load(pipe, path)
    assert name.route == EXPECTED_ROUTE.get(variant, "patcher")
    assert_close(_two_steps(pipe), reference)
    adapter.unload(pipe, name)
    assert torch.equal(_two_steps(pipe), before)


def test_hotswap_replaces_a_diffusers_route_adapter_in_place(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    pipe, components = sd15_pipe()
    full_a, full_b = _two_loras(tmp_path, components)
    a, b = tmp_path / "unet_a.safetensors", tmp_path / "unet_b.safetensors"
    for source, target in ((full_a, a), (full_b, b)):
        save_file({k: v for k, v in load_file(str(source)).items() if k.startswith("lora_unet_")}, str(target),
                  metadata={"ss_base_model_version": "sd_v1"})
    want_b = {k: copy.deepcopy(m) for k, m in components.items()}
    lora_compat.Patcher(want_b).set([(b, 0.9)])
    adapter.load(pipe, a, "x")
    wrappers = [m for m in _peft_layers(components)]
    assert adapter.load(pipe, b, "x", strength=0.9, hotswap=True).route == "diffusers"
    assert _peft_layers(components) == wrappers  # the same layer objects: swapped in place
    for got, want in zip(forward(components), forward(want_b)):
        assert_close(got, want)
    with pytest.raises(LoraCompatError, match=r"hotswap needs an adapter 'y' loaded through the diffusers route"):
        adapter.load(pipe, b, "y", hotswap=True)
    with pytest.raises(LoraCompatError, match=r"diffusers cannot hot-swap text-encoder LoRAs \(text_encoder\)"):
        adapter.load(pipe, full_b, "x", hotswap=True)


def _peft_layers(components: dict) -> list:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for c in components.values() for m in c.modules() if isinstance(m, BaseTunerLayer)]
