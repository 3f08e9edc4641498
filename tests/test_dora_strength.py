"""DoRA strength as a host's slider means it.

Default (``dora_strength="interpolate"``): ``W' = W + s·(W_dora − W)``, ``W_dora`` being the reference
library's own full-strength result (lycoris-lora's forward pass, PEFT's merge), the way A1111/SD.Next
(``finalize_updown``) and ComfyUI/Forge (``weight_decompose``) read a strength: 0 leaves the weights exactly
as they were, 1 is the whole LoRA. ``dora_strength="library"`` keeps the libraries' conventions: LyCORIS'
multiplier (the whole ΔW stays applied at 0) and PEFT's scaling (``m·W/‖W‖`` at 0).

Every path a strength reaches a DoRA module through is checked: ``patched_weights``, the Patcher (merge and
hot mode, block weights, per-entry override), ``bake`` (API and CLI), ``merge`` (ties/dare full deltas),
the diffusers adapter (``load``/``set_strength``) and ``hosts.convert.updown`` (what the webui, Forge and ComfyUI
adapters call with the host's multiplier), against float64 transcriptions of the hosts' own DoRA code.
"""
from __future__ import annotations

import copy
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import lora_compat
from lora_compat import Entry, Patcher
from lora_compat.tools.bake import bake
from lora_compat.cli import main
from lora_compat.tools.merge import merged_patchset
from lora_compat.hosts.convert import patch_from_weights, updown

from lora_compat.oracles.lycoris_oracle import write_lycoris_file
from lora_compat.oracles.models import make_sd15_components
from lora_compat.oracles.peft_oracle import write_peft_file

warnings.filterwarnings("ignore", category=lora_compat.LoraCompatWarning)
STRENGTHS = [0.0, 0.5, 1.0, -0.7]
LYCORIS_DORA = ["dora_out", "dora_in", "loha_dora", "lokr_dora"]
PEFT_DORA = ["diffusers_dora", "peft_raw_dora"]
EPS32 = torch.finfo(torch.float32).eps


@pytest.fixture(scope="module")
def sd15() -> dict[str, torch.nn.Module]:
    return make_sd15_components(seed=100)


@pytest.fixture(scope="module")
def files(sd15, tmp_path_factory) -> dict[str, tuple[Path, dict[str, torch.Tensor]]]:
    """Each DoRA file with the reference library's own merged weights at full strength."""
    root = tmp_path_factory.mktemp("dora")
    out = {}
    for variant in LYCORIS_DORA:
        (root / variant).mkdir()
        out[variant] = write_lycoris_file(root / variant, sd15, variant, seed=5)
    for variant in PEFT_DORA:
        out[variant] = write_peft_file(root, sd15, variant, seed=5)
    return out


def params(components: dict) -> dict[str, torch.Tensor]:
    return {f"{c}.{n}": p.detach().float().clone() for c, m in components.items() for n, p in m.named_parameters()}


def interpolated(base: dict, full: dict, s: float) -> dict[str, torch.Tensor]:
    """``W + s·(W_ref − W)`` in float64 from the library's full-strength weights."""
    return {k: (base[k].double() + s * (v.double() - base[k].double())).float() for k, v in full.items()}


def assert_matches(got: dict, want: dict, limit: float = 1e-5) -> None:
    assert sorted(got) == sorted(want)
    for key, value in want.items():
        error = float((got[key].double() - value.double()).norm() / value.double().norm().clamp_min(1e-12))
        assert error < limit, f"{key}: relative error {error:.2e}"


def assert_untouched(got: dict, base: dict) -> None:
    assert got
    for key, value in got.items():
        assert torch.equal(value, base[key]), key


# -- patched_weights ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", LYCORIS_DORA + PEFT_DORA)
@pytest.mark.parametrize("strength", STRENGTHS)
def test_default_interpolates_the_library_weight(sd15, files, variant, strength):
    path, full = files[variant]
    base = params(sd15)
    got = lora_compat.patched_weights(path, sd15, strength, strict=True)
    if strength == 0.0:
        assert sorted(got) == sorted(full)
        assert_untouched(got, base)  # bit-identical: the LoRA is off
    else:
        assert_matches(got, interpolated(base, full, strength))


@pytest.mark.parametrize("variant", ["dora_out", "dora_in"])
@pytest.mark.parametrize("strength", [0.0, 1.0])
def test_library_mode_follows_the_lycoris_multiplier(sd15, tmp_path, variant, strength):
    """(0.5 and -0.7 are in test_parity.py's multiplier test.) At 0 LyCORIS keeps the whole ΔW."""
    path, expected = write_lycoris_file(tmp_path, sd15, variant, seed=5, multiplier=strength)
    got = lora_compat.patched_weights(path, sd15, strength, strict=True, dora_strength="library")
    assert_matches(got, expected)
    if strength == 0.0:
        base = params(sd15)
        assert all(not torch.equal(v, base[k]) for k, v in got.items())


@pytest.mark.parametrize("variant", PEFT_DORA)
@pytest.mark.parametrize("strength", [0.0, 0.5, -0.7])
def test_library_mode_follows_peft_scaling(sd15, tmp_path, variant, strength):
    """PEFT's ``set_scale(s)`` then merge: ``m·(W + sΔW)/‖W + sΔW‖``; at 0 that is ``m·W/‖W‖``, not W."""
    path, expected = write_peft_file(tmp_path, sd15, variant, seed=5, scale=strength)
    got = lora_compat.patched_weights(path, sd15, strength, strict=True, dora_strength="library")
    assert_matches(got, expected)
    default = lora_compat.patched_weights(path, sd15, strength, strict=True)
    assert any(not torch.equal(default[k], got[k]) for k in got)


@pytest.mark.parametrize("variant", LYCORIS_DORA + PEFT_DORA)
def test_strength_one_is_the_same_in_both_modes(sd15, files, variant):
    path, _ = files[variant]
    a = lora_compat.patched_weights(path, sd15, 1.0)
    b = lora_compat.patched_weights(path, sd15, 1.0, dora_strength="library")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_unknown_mode_is_refused(sd15, files):
    path, _ = files["dora_out"]
    with pytest.raises(ValueError, match="dora_strength must be 'interpolate'"):
        lora_compat.patched_weights(path, sd15, 0.5, dora_strength="lycoris")
    with pytest.raises(ValueError, match="dora_strength"):
        Patcher(copy.deepcopy(sd15["unet"]), dora_strength="peft")
    with pytest.raises(ValueError, match="dora_strength"):
        Entry(path, 0.5, dora_strength="linear")


# -- the hosts' own DoRA math (float64 transcriptions) and the adapters' updown path --------------------------------
def a1111_finalize_updown(weight, up, down, alpha, dora_scale, multiplier):
    """SD.Next ``NetworkModule.finalize_updown`` + ``apply_weight_decompose`` (the A1111 1.9+ family): the
    scaled ΔW is decomposed against the original weight, the resulting change times the multiplier."""
    updown = (up.flatten(1) @ down.flatten(1)).reshape(weight.shape) * (alpha / down.shape[0])
    merged = updown + weight
    out_dim = merged.shape[0]
    per_output = dora_scale.shape[0] == out_dim and all(d == 1 for d in dora_scale.shape[1:])
    if per_output:
        norm = merged.reshape(out_dim, -1).norm(dim=1, keepdim=True).reshape(out_dim, *[1] * (weight.dim() - 1))
    else:
        norm = (merged.transpose(0, 1).reshape(merged.shape[1], -1).norm(dim=1, keepdim=True)
                .reshape(merged.shape[1], *[1] * (weight.dim() - 1)).transpose(0, 1))
    return (merged * (dora_scale / norm) - weight) * multiplier


def comfy_weight_decompose(weight, up, down, alpha, dora_scale, strength):
    """ComfyUI ``LoRAAdapter.calculate_weight`` + ``weight_decompose`` (input-axis path), as a change of W."""
    lora_diff = (up.flatten(1) @ down.flatten(1)).reshape(weight.shape) * (alpha / down.shape[0])
    weight_calc = weight + lora_diff
    norm = (weight_calc.transpose(0, 1).reshape(weight_calc.shape[1], -1).norm(dim=1, keepdim=True)
            .reshape(weight_calc.shape[1], *[1] * (weight_calc.dim() - 1)).transpose(0, 1)) + EPS32
    weight_calc = weight_calc * (dora_scale / norm)
    new = weight + strength * (weight_calc - weight) if strength != 1.0 else weight_calc
    return new - weight


def lycoris_modules(path: Path, components: dict) -> list[tuple[str, dict, torch.nn.Module]]:
    """(kohya module name, its tensors, the module) for every module of a lycoris-lora file; LyCORIS' kohya
    wrapper names a module ``lora_unet_`` / ``lora_te_`` + its path with dots replaced by underscores."""
    tensors = load_file(str(path))
    by_name = {}
    for component, prefix in (("unet", "lora_unet_"), ("text_encoder", "lora_te_")):
        for name, module in components[component].named_modules():
            by_name[prefix + name.replace(".", "_")] = module
    grouped: dict[str, dict] = {}
    for key, value in tensors.items():
        module, _, suffix = key.partition(".")
        grouped.setdefault(module, {})[suffix] = value
    return [(name, w, by_name[name]) for name, w in sorted(grouped.items())]


@pytest.mark.parametrize("variant", ["dora_out", "dora_in"])
@pytest.mark.parametrize("strength", STRENGTHS)
def test_updown_equals_a1111_finalize_updown(sd15, files, variant, strength):
    """``hosts.convert.updown`` with the host's multiplier (what the webui and Forge adapters call) gives the change
    the A1111 family's own DoRA code computes, on both axes."""
    modules = lycoris_modules(files[variant][0], sd15)
    assert len(modules) > 100
    for name, w, module in modules:
        weight = module.weight.detach()
        change, _ = updown(patch_from_weights(name, w), weight, getattr(module, "bias", None), strength)
        want = a1111_finalize_updown(weight.double(), w["lora_up.weight"].double(), w["lora_down.weight"].double(),
                                     float(w["alpha"]), w["dora_scale"].double(), strength)
        got = (weight.double() + change.double())
        error = float((got - (weight.double() + want)).norm() / (weight.double() + want).norm())
        assert error < 1e-6, (name, error)
        if strength == 0.0:
            assert torch.equal(weight + change, weight), name


@pytest.mark.parametrize("strength", STRENGTHS)
def test_updown_equals_comfyui_weight_decompose(sd15, files, strength):
    """ComfyUI's ``weight_decompose`` (input axis: the axis on which its W_dora is LyCORIS'; on the output axis
    it divides by the norm of W instead of W + ΔW, which lora_compat does not copy)."""
    for name, w, module in lycoris_modules(files["dora_in"][0], sd15):
        weight = module.weight.detach()
        change, _ = updown(patch_from_weights(name, w), weight, None, strength)
        want = comfy_weight_decompose(weight.double(), w["lora_up.weight"].double(), w["lora_down.weight"].double(),
                                      float(w["alpha"]), w["dora_scale"].double(), strength)
        got = weight.double() + change.double()
        error = float((got - (weight.double() + want)).norm() / (weight.double() + want).norm())
        assert error < 1e-6, (name, error)


def test_updown_library_mode_follows_lycoris(sd15, files, tmp_path):
    path, _ = files["dora_out"]
    _, expected = write_lycoris_file(tmp_path, sd15, "dora_out", seed=5, multiplier=-0.7)
    names = {id(m): n for n, m in sd15["unet"].named_modules()}
    checked = 0
    for name, w, module in lycoris_modules(path, sd15):
        if not name.startswith("lora_unet_"):
            continue
        path_name = names[id(module)]
        weight = module.weight.detach()
        change, _ = updown(patch_from_weights(name, w), weight, None, -0.7, dora_strength="library")
        want = expected[f"unet.{path_name}.weight"]
        assert float((weight + change - want).norm() / want.norm()) < 1e-5, name
        checked += 1
    assert checked > 100


# -- the Patcher -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", ["dora_out", "loha_dora", "diffusers_dora"])
@pytest.mark.parametrize("strength", [0.0, 0.5, -0.7])
def test_patcher_merge_mode(sd15, files, variant, strength):
    path, full = files[variant]
    model = copy.deepcopy(sd15)
    base = params(model)
    patcher = Patcher(model)
    patcher.set([(path, strength)])
    now = params(model)
    got = {k: now[k] for k in full}
    if strength == 0.0:
        assert all(torch.equal(now[k], v) for k, v in base.items())
    else:
        assert_matches(got, interpolated(base, full, strength))
    patcher.set([Entry(path, strength, dora_strength="library")])  # the override recomputes the modules
    assert_matches({k: params(model)[k] for k in full},
                   lora_compat.patched_weights(path, sd15, strength, dora_strength="library"), 1e-6)
    patcher.close()
    assert all(torch.equal(v, base[k]) for k, v in params(model).items())


def unet_forward(unet: torch.nn.Module) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        sample = torch.randn(1, 4, 16, 16, generator=g)
        hidden = torch.randn(1, 7, 16, generator=g)
        return unet(sample, torch.tensor([10]), encoder_hidden_states=hidden).sample


@pytest.mark.parametrize("strength", [0.0, 0.5, -0.7])
def test_patcher_hot_mode(sd15, files, strength):
    path, full = files["dora_in"]
    base = params(sd15)
    reference = copy.deepcopy(sd15["unet"])
    with torch.no_grad():
        wanted = interpolated(base, full, strength)
        for name, p in reference.named_parameters():
            if f"unet.{name}" in wanted:
                p.copy_(wanted[f"unet.{name}"])
    unet = copy.deepcopy(sd15["unet"])
    plain = unet_forward(unet)
    patcher = Patcher(unet, mode="hot")
    patcher.set([(path, strength)])
    out = unet_forward(unet)
    if strength == 0.0:
        assert torch.equal(out, plain)
    else:
        want = unet_forward(reference)
        assert float((out - want).norm() / want.norm()) < 1e-5
    patcher.set([Entry(path, strength, dora_strength="library")])
    library = copy.deepcopy(sd15["unet"])
    lora_compat.Patcher(library, dora_strength="library").set([(path, strength)])
    want = unet_forward(library)
    assert float((unet_forward(unet) - want).norm() / want.norm()) < 1e-5
    patcher.close()


def test_block_weights_scale_the_interpolation(sd15, files):
    """``BASE`` (the text encoder) at 0.25 of the entry's 0.8: text-encoder modules at 0.2, the UNet at 0.8."""
    path, full = files["dora_out"]
    model = copy.deepcopy(sd15)
    base = params(model)
    Patcher(model).set([Entry(path, 0.8, blocks={"BASE": 0.25})])
    now = params(model)
    te = {k: v for k, v in full.items() if k.startswith("text_encoder.")}
    unet = {k: v for k, v in full.items() if k.startswith("unet.")}
    assert te and unet
    assert_matches({k: now[k] for k in te}, interpolated(base, te, 0.2))
    assert_matches({k: now[k] for k in unet}, interpolated(base, unet, 0.8))


def test_patcher_wide_library_mode(sd15, files):
    path, _ = files["diffusers_dora"]
    model = copy.deepcopy(sd15)
    Patcher(model, dora_strength="library").set([(path, 0.0)])
    want = lora_compat.patched_weights(path, sd15, 0.0, dora_strength="library")
    now = params(model)
    assert all(torch.equal(now[k], v) for k, v in want.items())


# -- bake ----------------------------------------------------------------------------------------------------------
def _checkpoint(tmp_path: Path, components: dict) -> Path:
    checkpoint = tmp_path / "checkpoint"
    components["unet"].save_pretrained(checkpoint / "unet")
    components["text_encoder"].save_pretrained(checkpoint / "text_encoder")
    (checkpoint / "model_index.json").write_text("{}")
    return checkpoint


def _baked(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for component in ("unet", "text_encoder"):
        for file in sorted((folder / component).glob("*.safetensors")):
            out.update({f"{component}.{k}": v for k, v in load_file(str(file)).items()})
    return out


def test_bake(sd15, files, tmp_path, capsys):
    path, full = files["dora_in"]
    base = params(sd15)
    checkpoint = _checkpoint(tmp_path, sd15)
    bake(checkpoint, [(path, 0.0)], tmp_path / "off", progress=False)
    assert_untouched({k: v for k, v in _baked(tmp_path / "off").items() if k in full}, base)
    bake(checkpoint, [(path, -0.7)], tmp_path / "half", progress=False)
    baked = _baked(tmp_path / "half")
    assert_matches({k: baked[k] for k in full}, interpolated(base, full, -0.7))
    assert main(["bake", str(checkpoint), f"{path}:-0.7", "-o", str(tmp_path / "lib"),
                 "--dora-strength", "library"]) == 0
    baked = _baked(tmp_path / "lib")
    _, expected = write_lycoris_file(tmp_path, sd15, "dora_in", seed=5, multiplier=-0.7)
    assert_matches({k: baked[k] for k in expected}, expected)
    with pytest.raises(SystemExit):
        main(["bake", str(checkpoint), f"{path}:0.5", "-o", str(tmp_path / "x"), "--dora-strength", "no"])
    assert "invalid choice: 'no'" in capsys.readouterr().err


# -- merge -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["ties", "dare"])
def test_merge_uses_the_interpolated_full_delta(sd15, files, method):
    """One DoRA LoRA at weight w, density 1 (nothing trimmed or dropped): the merged full delta is
    ``w·(W_dora − W)`` by default and the library's change at w with ``dora_strength="library"``."""
    path, full = files["dora_out"]
    base = params(sd15)
    merged, _, _ = merged_patchset([(path, 0.5)], method, density=1.0, components=sd15)
    got = {f"{t}.weight": base[f"{t}.weight"] + p.diff.load() for t, p in merged.items()}
    assert_matches(got, interpolated(base, full, 0.5))
    merged, _, _ = merged_patchset([(path, 0.5)], method, density=1.0, components=sd15, dora_strength="library")
    got = {f"{t}.weight": base[f"{t}.weight"] + p.diff.load() for t, p in merged.items()}
    assert_matches(got, lora_compat.patched_weights(path, sd15, 0.5, dora_strength="library"), 1e-6)


def test_merge_of_dora_needs_the_model(files):
    with pytest.raises(lora_compat.LoraCompatError, match=r"its dora patch depends on the base weights, so its delta needs them: pass --checkpoint PATH"):
        merged_patchset([(files["dora_out"][0], 0.5)], "ties")


# -- the diffusers adapter (patcher route) -------------------------------------------------------------------------
def test_diffusers_adapter_load_and_set_strength(files):
    from diffusers import StableDiffusionPipeline

    from lora_compat.adapters import diffusers as adapter

    components = make_sd15_components(seed=100)
    pipe = StableDiffusionPipeline(vae=None, text_encoder=components["text_encoder"], tokenizer=None,
                                   unet=components["unet"], scheduler=None, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    path, full = files["diffusers_dora"]
    base = params(components)
    name = adapter.load(pipe, path, strength=0.0)
    assert name.route == "patcher"
    assert all(torch.equal(v, base[k]) for k, v in params(components).items())
    adapter.set_strength(pipe, name, -0.7)
    now = params(components)
    assert_matches({k: now[k] for k in full}, interpolated(base, full, -0.7))
    adapter.unload(pipe, name)
    name = adapter.load(pipe, path, strength=0.5, dora_strength="library")
    adapter.set_strength(pipe, name, 0.0)  # keeps the library convention: m·W/‖W‖ at 0
    now = params(components)
    want = lora_compat.patched_weights(path, make_sd15_components(seed=100), 0.0, dora_strength="library")
    assert all(torch.equal(now[k], v) for k, v in want.items())
    assert any(not torch.equal(now[k], base[k]) for k in want)
    adapter.unload(pipe, name)
    assert all(torch.equal(v, base[k]) for k, v in params(components).items())


# -- a DoRA part of a fused host weight (BFL qkv) --------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["interpolate", "library"])
@pytest.mark.parametrize("strength", [0.0, 0.5])
def test_dora_part_of_a_fused_bfl_weight(tmp_path, mode, strength):
    """OneTrainer DoRA (``dora_scale [1, in]``) on ``to_q``, applied to a BFL host where to_q is rows of
    ``double_blocks.0.img_attn.qkv``: the rows follow the chosen convention (closed forms in float64), the
    other rows stay as they were."""
    from safetensors.torch import save_file

    from flux_models import make_bfl_host, make_flux

    model = make_flux()
    host = make_bfl_host(model)
    weight = model.transformer_blocks[0].attn.to_q.weight.detach().double()
    g = torch.Generator().manual_seed(3)
    down, up = torch.randn(4, weight.shape[1], generator=g), torch.randn(weight.shape[0], 4, generator=g) * 0.1
    magnitude = weight.float().norm(dim=0, keepdim=True) * (1 + 0.1 * torch.rand(1, weight.shape[1], generator=g))
    key = "lora_transformer_transformer_blocks_0_attn_to_q"
    save_file({f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up, f"{key}.alpha": torch.tensor(2.0),
               f"{key}.dora_scale": magnitude}, str(tmp_path / "dora.safetensors"))
    merged = weight + 0.5 * up.double() @ down.double()
    factor = magnitude.double() / (merged.norm(dim=0, keepdim=True) + EPS32)
    if mode == "interpolate":
        want = weight + strength * (merged * factor - weight)
    else:
        want = merged * (1 + strength * (factor - 1))
    qkv = host.get_submodule("double_blocks.0.img_attn.qkv").weight
    before = qkv.detach().clone()
    Patcher({"transformer": host}, dora_strength=mode).set([(tmp_path / "dora.safetensors", strength)])
    rows = weight.shape[0]
    if mode == "interpolate" and strength == 0.0:
        assert torch.equal(qkv, before)
    else:
        assert float((qkv[:rows].double() - want).norm() / want.norm()) < 1e-6
        assert torch.equal(qkv[rows:], before[rows:])
