"""PEFT's own LyCORIS-family tuners (LoHa, LoKr, OFT, BOFT) and IA3, in both layouts peft writes
(``save_pretrained`` with ``adapter_config.json``, and diffusers ``save_lora_weights`` with
``lora_adapter_metadata``): detected, read and applied exactly as PEFT merges them (fp32 relative error < 1e-5),
files written by peft inside the tests."""
from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import pytest
import torch

import lora_compat
from lora_compat import Entry, Patcher
from lora_compat.cli import main

from lora_compat.oracles.models import make_sd15_components
from lora_compat.oracles.peft_tuner_oracle import VARIANTS, write_tuner_file

KINDS = {"loha": "loha", "lokr": "lokr", "oft": "peft_oft", "boft": "peft_boft", "ia3": "peft_ia3"}
LAYOUTS = ("peft", "diffusers")


@pytest.fixture(scope="module")
def sd15() -> dict[str, torch.nn.Module]:
    return make_sd15_components(seed=7)


@pytest.fixture(scope="module")
def files(tmp_path_factory, sd15):
    """Each (variant, layout) written once per module: (path, PEFT's merged weights)."""
    root, cache = tmp_path_factory.mktemp("peft_tuners"), {}

    def get(variant: str, layout: str) -> tuple[Path, dict[str, torch.Tensor]]:
        if (variant, layout) not in cache:
            cache[variant, layout] = write_tuner_file(root, sd15, variant, layout, seed=len(cache))
        return cache[variant, layout]

    return get


def kind_of(variant: str) -> str:
    return KINDS[variant.split("_")[0]]


def assert_matches(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(expected)
    for key, value in expected.items():
        error = (got[key].float() - value.float()).norm() / value.float().norm()
        assert error < 1e-5, f"{key}: relative error {error:.2e}"


def base_values(components: dict[str, torch.nn.Module], keys) -> dict[str, torch.Tensor]:
    state = {f"{c}.{k}": v for c, m in components.items() for k, v in m.state_dict().items()}
    return {k: state[k].float() for k in keys}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_file_matches_peft_merge(files, sd15, variant, layout):
    path, expected = files(variant, layout)
    info = lora_compat.inspect(path)
    assert (info.dialect, info.kinds, info.unmatched) == ("peft-lycoris", [kind_of(variant)], [])
    assert info.components == ({"unet": 255} if layout == "peft" else {"text_encoder": 12, "unet": 255})
    assert_matches(lora_compat.patched_weights(path, sd15, strict=True), expected)


@pytest.mark.parametrize("variant", ["loha", "loha_effective_conv", "lokr", "lokr_decompose_both"])
@pytest.mark.parametrize("strength", [0.6, -0.8])
def test_loha_lokr_strength_is_peft_set_scale(tmp_path, sd15, variant, strength):
    path, expected = write_tuner_file(tmp_path, sd15, variant, "diffusers", seed=3, scale=strength)
    assert_matches(lora_compat.patched_weights(path, sd15, strength=strength, strict=True), expected)


@pytest.mark.parametrize("variant", ["oft", "oft_coft_shared", "boft", "boft_butterfly", "ia3"])
@pytest.mark.parametrize("strength", [0.6, -0.8])
def test_oft_boft_ia3_strength_interpolates_the_merged_weight(files, sd15, variant, strength):
    """PEFT has no strength for OFT/BOFT/IA3: lora_compat's is ``W + s·(W_peft − W)`` (OFT: ``R_s = s(R−I)+I``)."""
    path, merged = files(variant, "peft")
    base = base_values(sd15, merged)
    expected = {k: base[k] + strength * (merged[k] - base[k]) for k in merged}
    assert_matches(lora_compat.patched_weights(path, sd15, strength=strength, strict=True), expected)


@pytest.mark.parametrize("mode", ["merge", "hot"])
def test_patcher_applies_and_removes_them(files, sd15, mode):
    """The Patcher stacks the five kinds (merge mode) / runs them in hot mode; clear() restores every bit."""
    model = copy.deepcopy(sd15)
    pristine = {f"{c}.{k}": v.clone() for c, m in model.items() for k, v in m.state_dict().items()}
    entries = [Entry(files(v, "diffusers")[0], s) for v, s in (("loha", 0.7), ("lokr", 1.0), ("oft", 0.5),
                                                                  ("boft_butterfly", 1.0), ("ia3", 0.8))]
    expected = lora_compat.patched_weights(entries[0].source, sd15, 0.7)
    patcher = Patcher(model, mode=mode)
    patcher.set(entries[:1])
    if mode == "merge":
        state = {f"{c}.{k}": v for c, m in model.items() for k, v in m.state_dict().items()}
        assert all(torch.equal(state[k], v) for k, v in expected.items())
    patcher.set(entries)
    gen = torch.Generator().manual_seed(0)
    sample, states = torch.randn(1, 4, 8, 8, generator=gen), torch.randn(1, 5, 16, generator=gen)
    reference = copy.deepcopy(sd15)
    Patcher(reference).set(entries)
    with torch.no_grad():
        got = model["unet"](sample, 3, encoder_hidden_states=states).sample
        want = reference["unet"](sample, 3, encoder_hidden_states=states).sample
    assert ((got - want).norm() / want.norm()) < 1e-5
    patcher.clear()
    assert all(torch.equal(v, pristine[f"{c}.{k}"]) for c, m in model.items() for k, v in m.state_dict().items())


def test_cli_inspect_names_the_kind(files, capsys):
    path, _ = files("oft", "peft")
    assert main(["inspect", "--json", str(path)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["dialect"], report["kinds"], report["unmatched"]) == ("peft-lycoris", ["peft_oft"], [])


@pytest.mark.parametrize("variant", ["oft", "boft"])
def test_without_a_config_the_defaults_apply(tmp_path, files, sd15, variant):
    """OFT's merge depends on config fields (Neumann terms, coft): without a config PEFT's defaults, loudly;
    BOFT needs none. The ``oft`` variant uses the defaults, so it stays exact."""
    path, expected = files(variant, "peft")
    alone = tmp_path / "alone.safetensors"
    alone.write_bytes(path.read_bytes())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = lora_compat.patched_weights(alone, sd15, strict=True)
    notes = [str(w.message) for w in caught if isinstance(w.message, lora_compat.LoraCompatWarning)]
    assert_matches(got, expected)
    if variant == "oft":
        assert any("no adapter_config.json beside the file: PEFT's defaults assumed" in n for n in notes)
    else:
        assert not any("PEFT's defaults" in n for n in notes)


# -- converting for the webuis and ComfyUI -----------------------------------------------------------------------
@pytest.mark.parametrize("to", ["kohya", "webui"])
@pytest.mark.parametrize("variant", ["loha_effective_conv", "lokr", "lokr_decompose_both"])
def test_loha_lokr_convert_to_lycoris_tensors(tmp_path, files, sd15, variant, to):
    """LoHa/LoKr keep their kind: LyCORIS tensors with ``alpha`` (a LoKr with both factors full, which LyCORIS
    readers scale by 1, carries PEFT's ``alpha / r`` in ``lokr_w1``); the file re-reads to PEFT's merge."""
    path, expected = files(variant, "diffusers")
    out = tmp_path / f"{to}.safetensors"
    report = lora_compat.convert(path, to, out)
    assert (report.source_dialect, report.modules) == ("peft-lycoris", 267)
    info = lora_compat.inspect(out)
    assert (info.dialect, info.kinds, info.unmatched) == ("lycoris", [kind_of(variant)], [])
    assert_matches(lora_compat.patched_weights(out, sd15, strict=True), expected)
    assert_matches(lora_compat.patched_weights(out, sd15, 0.6, strict=True),
                   lora_compat.patched_weights(path, sd15, 0.6, strict=True))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, sd15) -> Path:
    """The tiny SD1.5 as a diffusers folder (what ``--checkpoint`` takes)."""
    root = tmp_path_factory.mktemp("checkpoint")
    for name, module in sd15.items():
        module.save_pretrained(root / name)
    return root


@pytest.mark.parametrize("to", ["kohya", "webui"])
@pytest.mark.parametrize("variant", ["oft_coft_shared", "boft_butterfly", "ia3"])
def test_oft_boft_ia3_convert_to_exact_diffs_of_a_checkpoint(tmp_path, files, sd15, checkpoint, variant, to):
    """No host reads PEFT OFT/BOFT/IA3 (LyCORIS' OFT/BOFT rotate the other side, LyCORIS IA3 leaves the bias): the
    converted file holds the exact change of the given checkpoint's weights and biases (LyCORIS ``diff`` /
    ``diff_b``), at every strength (both are linear in it)."""
    path, merged = files(variant, "diffusers")
    out = tmp_path / f"{to}.safetensors"
    with pytest.raises(lora_compat.LoraCompatError,
                       match=rf"a {kind_of(variant)} patch has no kohya/LyCORIS tensor form; it can be written as "
                             r"the exact change of a checkpoint's weights: pass --checkpoint PATH"):
        lora_compat.convert(path, to, out)
    assert not out.exists()
    lora_compat.convert(path, to, out, checkpoint=checkpoint)
    info = lora_compat.inspect(out)
    assert (info.dialect, info.kinds, info.unmatched) == ("lycoris", ["full"], [])
    assert_matches(lora_compat.patched_weights(out, sd15, strict=True), merged)
    base = base_values(sd15, merged)
    half = {k: base[k] + 0.6 * (merged[k] - base[k]) for k in merged}
    assert_matches(lora_compat.patched_weights(out, sd15, 0.6, strict=True), half)


def test_cli_convert_with_a_checkpoint(tmp_path, files, sd15, checkpoint, capsys):
    path, merged = files("oft", "peft")
    out = tmp_path / "webui.safetensors"
    assert main(["convert", str(path), "--to", "webui", "-o", str(out)]) == 2
    assert "--checkpoint PATH" in capsys.readouterr().err
    assert main(["convert", str(path), "--to", "webui", "-o", str(out), "--checkpoint", str(checkpoint)]) == 0
    assert "peft-lycoris -> webui" in capsys.readouterr().out
    assert_matches(lora_compat.patched_weights(out, sd15, strict=True), merged)


# -- the diffusers adapter -------------------------------------------------------------------------------------------
def unet_and_text_outputs(components: dict[str, torch.nn.Module]) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        hidden = components["text_encoder"](torch.randint(0, 1000, (1, 7), generator=gen)).last_hidden_state
        sample = torch.randn(1, 4, 8, 8, generator=gen)
        return hidden, components["unet"](sample, 10, encoder_hidden_states=hidden).sample


@pytest.mark.parametrize("variant", ["loha", "lokr", "oft", "boft_butterfly", "ia3"])
def test_diffusers_adapter_loads_them_like_peft(tmp_path, variant):
    """``adapters.diffusers.load``: LoHa into PEFT's own LoHa layers, the others through the patcher; the
    pipeline's outputs equal the model with PEFT's merged weights; ``unload`` restores every bit."""
    from diffusers import StableDiffusionPipeline

    from lora_compat.adapters import diffusers as adapter

    components = make_sd15_components(seed=5)
    pipe = StableDiffusionPipeline(vae=None, text_encoder=components["text_encoder"], tokenizer=None,
                                   unet=components["unet"], scheduler=None, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pristine = {c: {k: v.clone() for k, v in m.state_dict().items()} for c, m in components.items()}
    path, expected = write_tuner_file(tmp_path, components, variant, "diffusers", seed=2)
    merged = copy.deepcopy(components)
    for key, value in expected.items():
        component, _, name = key.partition(".")
        merged[component].get_parameter(name).data = value.clone()
    name = adapter.load(pipe, path)
    assert (name.route, name.unmatched) == ("peft" if variant == "loha" else "patcher", [])
    for got, want in zip(unet_and_text_outputs(components), unet_and_text_outputs(merged)):
        assert float((got - want).norm() / want.norm()) < 1e-5
    adapter.unload(pipe, name)
    for component, module in components.items():
        assert all(torch.equal(v, pristine[component][k]) for k, v in module.state_dict().items())


def test_bake_into_a_checkpoint_gives_peft_merge(tmp_path, files, sd15, checkpoint):
    """``bake`` (streamed, tensor by tensor, from the checkpoint's files) of two PEFT tuner files: as everywhere in
    lora_compat a stack adds each file's change of the original weights, here PEFT's merges of LoHa and BOFT."""
    from safetensors.torch import load_file

    from lora_compat.tools.bake import bake

    (loha, after_loha), (boft, after_boft) = files("loha", "peft"), files("boft", "diffusers")
    bake(checkpoint, [(loha, 1.0), (boft, 1.0)], tmp_path / "baked", progress=False)
    baked = {f"{c}.{k}": v for c in sd15 for f in (tmp_path / "baked" / c).glob("*.safetensors")
             for k, v in load_file(str(f)).items()}
    base = base_values(sd15, baked)
    changed = after_loha.keys() | after_boft.keys()
    expected = {k: after_loha.get(k, base[k]) + after_boft.get(k, base[k]) - base[k] for k in changed}
    assert_matches({k: baked[k] for k in changed}, expected)
    assert all(torch.equal(baked[k], base[k]) for k in baked.keys() - changed)


@pytest.mark.parametrize("variant", ["lokr", "oft", "ia3"])
def test_sdxl_files_with_both_text_encoders(tmp_path, variant):
    from lora_compat.oracles.models import make_sdxl_components

    sdxl = make_sdxl_components(seed=4)
    path, expected = write_tuner_file(tmp_path, sdxl, variant, "diffusers", seed=6)
    info = lora_compat.inspect(path)
    assert (info.dialect, sorted(info.components), info.unmatched) == \
        ("peft-lycoris", ["text_encoder", "text_encoder_2", "unet"], [])
    assert_matches(lora_compat.patched_weights(path, sdxl, strict=True), expected)


@pytest.mark.parametrize("variant", ["loha", "oft", "boft"])
def test_flux_transformer_files(tmp_path, variant):
    """``transformer.`` + diffusers FLUX.1 names (``FluxPipeline.save_lora_weights``) on a tiny FLUX.1."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(2)
    flux = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2,
                                  attention_head_dim=16, num_attention_heads=4, joint_attention_dim=32,
                                  pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(4, 6, 6)).eval()
    with torch.no_grad():
        for p in flux.parameters():
            p.normal_(0, 0.2)
    path, expected = write_tuner_file(tmp_path, {"transformer": flux}, variant, "diffusers", seed=8)
    info = lora_compat.inspect(path)
    assert (info.dialect, info.kinds, info.unmatched) == ("peft-lycoris", [kind_of(variant)], [])
    assert_matches(lora_compat.patched_weights(path, {"transformer": flux}, strict=True), expected)


def test_broken_modules_are_reported_by_key_and_reason(tmp_path, sd15):
    """Malformed PEFT tuner tensors never crash the header-only read: each module's keys are unmatched with the
    reason, the well-formed module is read."""
    from safetensors.torch import save_file

    attn = "base_model.model.down_blocks.0.attentions.0.transformer_blocks.0"
    tensors = {f"{attn}.attn1.to_q.hada_w1_a": torch.zeros(8), f"{attn}.attn1.to_q.hada_w1_b": torch.zeros(2, 8),
               f"{attn}.attn1.to_q.hada_w2_a": torch.zeros(8, 2), f"{attn}.attn1.to_q.hada_w2_b": torch.zeros(2, 8),
               f"{attn}.attn1.to_k.oft_R.weight": torch.zeros(2, 5),
               f"{attn}.attn1.to_v.boft_s": torch.ones(8, 1),
               f"{attn}.attn1.to_out.0.lokr_w1": torch.zeros(2, 2),
               f"{attn}.attn1.to_out.0.oft_R.weight": torch.zeros(2, 6),
               f"{attn}.attn2.to_q.oft_R.weight": torch.zeros(2, 6)}
    save_file(tensors, str(tmp_path / "broken.safetensors"))
    patchset = lora_compat.read(tmp_path / "broken.safetensors")
    module = lambda name: f"module {name[len('base_model.model.'):]!r}"  # noqa: E731
    assert patchset.unmatched == {
        **dict.fromkeys([k for k in tensors if ".to_q.hada" in k],
                        f"{module(attn + '.attn1.to_q')}: too few dimensions for a factor: hada_w1_a [8]"),
        f"{attn}.attn1.to_k.oft_R.weight":
            f"{module(attn + '.attn1.to_k')}: oft_R.weight [2, 5] is not [blocks, b(b-1)/2]",
        f"{attn}.attn1.to_v.boft_s": f"{module(attn + '.attn1.to_v')}: PEFT BOFT needs boft_R",
        **dict.fromkeys([k for k in tensors if ".to_out.0." in k],
                        f"{module(attn + '.attn1.to_out.0')} mixes the tensors of LoKr, OFT")}
    assert [p.kind for p in patchset.values()] == ["peft_oft"]


class SmallNet(torch.nn.Module):
    """Linear, Conv2d (3x3) and Conv1d layers of a model no base knows."""

    def __init__(self):
        super().__init__()
        self.lin, self.conv, self.c1 = torch.nn.Linear(16, 12), torch.nn.Conv2d(8, 12, 3), torch.nn.Conv1d(8, 16, 3)


@pytest.mark.parametrize("config", [("LoHaConfig", dict(r=2, alpha=3, use_effective_conv2d=True)),
                                    ("LoKrConfig", dict(r=1, alpha=3)), ("LoKrConfig", dict(r=16, alpha=3))])
def test_a_plain_torch_model(tmp_path, config):
    """A PEFT model of a plain ``torch.nn`` module: exact; a LoKr with a full Conv1d factor, whose PEFT merge lays
    the kernel out unlike LyCORIS, is refused by key (every other module still exact)."""
    import peft

    from lora_compat.oracles import peft_tuner_oracle as oracle

    torch.manual_seed(0)
    net = SmallNet()
    model = peft.get_peft_model(copy.deepcopy(net), getattr(peft, config[0])(target_modules=["lin", "conv", "c1"],
                                                                             **config[1]))
    oracle.randomize_adapter(model, torch.Generator().manual_seed(1))
    model.save_pretrained(tmp_path / "adapter")
    expected = oracle.peft_merged("model", net, model, 1.0)
    path = tmp_path / "adapter" / "adapter_model.safetensors"
    full_conv1d = config == ("LoKrConfig", dict(r=16, alpha=3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", lora_compat.LoraCompatWarning)
        got = lora_compat.patched_weights(path, {"model": net})
    if full_conv1d:
        from lora_compat.models import resolve_patchset
        from lora_compat.archs import ModuleIndex

        expected.pop("model.c1.weight")
        unmatched = resolve_patchset(path, ModuleIndex.from_modules({"model": net})).unmatched
        assert unmatched == dict.fromkeys(["base_model.model.c1.lokr_w1", "base_model.model.c1.lokr_w2"],
                                          "module 'c1': a full 3-D lokr_w2 (a Conv1d layer) is not supported: PEFT's "
                                          "merge (torch.kron of a 2-D and a 3-D factor) lays the kernel out unlike "
                                          "LyCORIS' LoKr")
    assert_matches(got, expected)
