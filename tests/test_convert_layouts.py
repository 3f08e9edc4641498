"""``convert`` keeps its promises on layouts the full-size tables do not describe: diffusers-layout Flux files of
another width (written by real peft / diffusers, PEFT-saved, partial q/k/v) to the fused bfl / kohya layouts with
no model at hand, and conv LoRAs (LoCon, DyLoRA) to diffusers files that plain diffusers loads."""
from __future__ import annotations

import copy
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import lora_compat
from lora_compat.cli import main

from lora_compat.oracles.models import one_thread
from flux_models import make_flux

warnings.filterwarnings("ignore", category=lora_compat.LoraCompatWarning)

#: width 80 (5 heads of 16): not a divisor of FLUX.1-dev's 3072, so no full-size proportion can be assumed
FLUX_SMALL = dict(num_layers=2, num_single_layers=2, num_attention_heads=5)
#: every Linear of the diffusers Flux transformer that a trainer targets
FLUX_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
                "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "norm1.linear",
                "norm1_context.linear", "proj_mlp", "proj_out", "norm.linear", "x_embedder", "context_embedder",
                "norm_out.linear", "timestep_embedder.linear_1", "guidance_embedder.linear_2"]
#: only some of q/k/v (and of linear1's parts): fused modules the file covers in part
FLUX_PARTIAL = ["transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_v",
                "transformer_blocks.1.attn.add_k_proj", "single_transformer_blocks.0.attn.to_k",
                "single_transformer_blocks.1.proj_mlp", "transformer_blocks.1.ff.net.2", "norm_out.linear", "proj_out"]


def diffusers_kohya_targets(model: torch.nn.Module) -> list[str]:
    """What diffusers 0.42's kohya Flux loader accepts: it splits single-block linear1 by FLUX.1-dev's widths
    ([3072, 3072, 3072, 12288], a bare assertion), and it names the top-level modules (img_in, final_layer...)
    without ``transformer.``, so they are dropped with no log. The file holds the blocks' modules, less linear1."""
    return [name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)
            and name.endswith(tuple(FLUX_TARGETS)) and name.startswith(("transformer_blocks.", "single_"))
            and not (name.startswith("single_transformer_blocks.") and name.endswith(("to_q", "to_k", "to_v",
                                                                                       "proj_mlp")))]


def _lora_config(targets: list[str]):
    from peft import LoraConfig

    return LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=True,
                      rank_pattern={"to_k": 2}, alpha_pattern={"to_k": 6, "proj_out": 3})


def _randomize(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "lora_A" in name or "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def _peft_merged(model: torch.nn.Module, adapted: torch.nn.Module) -> dict[str, torch.Tensor]:
    """PEFT's own merge of every adapted layer: ``transformer.<param>`` → merged value (changed ones only)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    before = dict(model.named_parameters())
    merged = {}
    for name, module in adapted.named_modules():
        if isinstance(module, BaseTunerLayer):
            module.merge()
            name = name.removeprefix("base_model.model.")
            for param, value in module.get_base_layer().named_parameters(recurse=False):
                if not torch.equal(value, before[f"{name}.{param}"]):
                    merged[f"transformer.{name}.{param}"] = value.detach().clone()
    return merged


def write_flux_file(tmp: Path, model: torch.nn.Module, layout: str, targets: list[str], seed: int = 0
                    ) -> tuple[Path, dict[str, torch.Tensor]]:
    """A LoRA of ``model`` written by real peft / diffusers, and PEFT's own merged weights.
    ``diffusers``: ``FluxPipeline.save_lora_weights`` of ``get_peft_model_state_dict`` with the adapter metadata;
    ``peft``: ``get_peft_model(...).save_pretrained`` (``base_model.model.`` keys, ``adapter_config.json``)."""
    from diffusers import FluxPipeline
    from peft import get_peft_model, get_peft_model_state_dict

    config = _lora_config(targets)
    out = tmp / layout
    with one_thread():
        if layout == "peft":
            adapted = get_peft_model(copy.deepcopy(model), config)
            _randomize(adapted, seed)
            adapted.save_pretrained(out)
            path = out / "adapter_model.safetensors"
        else:
            adapted = copy.deepcopy(model)
            adapted.add_adapter(config)
            _randomize(adapted, seed)
            FluxPipeline.save_lora_weights(out, transformer_lora_layers=get_peft_model_state_dict(adapted),
                                           transformer_lora_adapter_metadata=config.to_dict())
            path = out / "pytorch_lora_weights.safetensors"
        return path, _peft_merged(model, adapted)


def assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], base: dict[str, torch.Tensor],
                tol: float) -> None:
    """Equal effective weights (fp32 rel. error < tol); a parameter only one side touches is unchanged there."""
    assert want
    for key in got.keys() | want.keys():
        a, b = got.get(key, base[key]), want.get(key, base[key])
        rel = float((a - b).norm() / b.norm())
        assert rel < tol, (key, rel)


def _base(components: dict[str, torch.nn.Module]) -> dict[str, torch.Tensor]:
    return {f"{c}.{n}": p.detach() for c, m in components.items() for n, p in m.named_parameters()}


@pytest.fixture(scope="module")
def small_flux() -> torch.nn.Module:
    return make_flux(seed=4, **FLUX_SMALL)


# -- Flux: diffusers layout of any width → fused bfl / kohya, with no model at hand ------------------------------
@pytest.mark.parametrize("to", ["bfl", "kohya"])
@pytest.mark.parametrize("layout, targets", [("diffusers", FLUX_TARGETS), ("peft", FLUX_TARGETS),
                                             ("diffusers", FLUX_PARTIAL)], ids=["diffusers", "peft", "partial"])
def test_small_flux_diffusers_layout_converts_to_the_fused_layouts(tmp_path: Path, small_flux, layout: str,
                                                                  targets: list[str], to: str) -> None:
    source, merged = write_flux_file(tmp_path, small_flux, layout, targets)
    components = {"transformer": small_flux}
    base = _base(components)
    want = lora_compat.patched_weights(source, components)
    assert_same(want, merged, base, 1e-5)  # lora_compat reads the source as PEFT merges it
    out = tmp_path / f"{to}.safetensors"
    report = lora_compat.convert(source, to, out)  # no components: the layout comes from the file's shapes
    assert report.unmatched == []
    keys = list(load_file(str(out)))
    prefix = "diffusion_model." if to == "bfl" else "lora_unet_"
    assert all(k.startswith(prefix) for k in keys), keys[:3]
    assert any(".double_blocks.0.img_attn.qkv." in k or "_double_blocks_0_img_attn_qkv." in k for k in keys)
    info = lora_compat.inspect(out)
    assert (info.dialect, info.unmatched) == (to, [])
    assert_same(lora_compat.patched_weights(out, components), want, base, 1e-6)
    # and back to the split layout, still with no model: the fused modules split by the file's own rows
    back = tmp_path / "back.safetensors"
    assert lora_compat.convert(out, "diffusers", back).unmatched == []
    assert_same(lora_compat.patched_weights(back, components), want, base, 1e-6)


def test_partial_qkv_fills_the_missing_parts_with_zero_rows(tmp_path: Path, small_flux) -> None:
    """to_k is left out of double block 0: its rows of the fused qkv are zero, sized by to_q's width (80)."""
    source, _ = write_flux_file(tmp_path, small_flux, "diffusers", FLUX_PARTIAL)
    out = tmp_path / "bfl.safetensors"
    lora_compat.convert(source, "bfl", out)
    tensors = load_file(str(out))
    up = tensors["diffusion_model.double_blocks.0.img_attn.qkv.lora_B.weight"]
    assert up.shape[0] == 3 * 80
    assert torch.count_nonzero(up[80:160]) == 0 and torch.count_nonzero(up[:80]) and torch.count_nonzero(up[160:])
    linear1 = tensors["diffusion_model.single_blocks.1.linear1.lora_B.weight"]  # proj_mlp only
    assert linear1.shape[0] == 3 * 80 + 4 * 80 and torch.count_nonzero(linear1[:240]) == 0


def test_xlabs_single_qkv_of_a_width_divisible_by_7_splits_by_its_width(tmp_path: Path) -> None:
    """x-flux's single-block qkv_lora covers 3W of linear1's 7W rows. At W = 112, 3W rows are also the whole
    linear1 of a W = 48 model: the patch's input width (112) decides, not the row count alone."""
    from safetensors.torch import save_file

    model = make_flux(seed=5, num_layers=1, num_single_layers=1, num_attention_heads=7)
    g = torch.Generator().manual_seed(1)
    down, up = torch.randn(4, 112, generator=g), torch.randn(336, 4, generator=g) * 0.1
    save_file({"single_blocks.0.processor.qkv_lora.down.weight": down,
               "single_blocks.0.processor.qkv_lora.up.weight": up}, str(tmp_path / "xlabs.safetensors"))
    info = lora_compat.inspect(tmp_path / "xlabs.safetensors")
    assert (info.dialect, info.unmatched) == ("xlabs", [])
    by_names = lora_compat.read(tmp_path / "xlabs.safetensors")  # no model: the full-size table, names only
    assert {t: p.up.shape[0] for t, p in by_names.items()} == {
        f"transformer.single_transformer_blocks.0.attn.{name}": 112 for name in ("to_q", "to_k", "to_v")}
    got = lora_compat.patched_weights(tmp_path / "xlabs.safetensors", {"transformer": model}, strict=True)
    block = model.single_transformer_blocks[0]
    delta = up @ down
    want = {f"transformer.single_transformer_blocks.0.attn.{name}.weight":
            getattr(block.attn, name).weight.detach() + delta[i * 112:(i + 1) * 112]
            for i, name in enumerate(("to_q", "to_k", "to_v"))}
    assert got.keys() == want.keys()
    for key, value in want.items():
        torch.testing.assert_close(got[key], value, rtol=1e-5, atol=1e-6)


def test_fused_parts_of_different_widths_are_refused(tmp_path: Path) -> None:
    """to_q of width 80 and to_v of width 64 in one block fit no model: refused by name, nothing written."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    tensors = {}
    for module, width in (("to_q", 80), ("to_v", 64)):
        tensors[f"transformer.transformer_blocks.0.attn.{module}.lora_A.weight"] = torch.randn(2, width, generator=g)
        tensors[f"transformer.transformer_blocks.0.attn.{module}.lora_B.weight"] = torch.randn(width, 2, generator=g)
    save_file(tensors, str(tmp_path / "odd.safetensors"))
    with pytest.raises(lora_compat.LoraCompatError, match=r"odd\.safetensors: double_blocks\.0\.img_attn\.qkv: its "
                       r"parts imply different widths \(transformer_blocks\.0\.attn\.to_q: 80 rows, "
                       r"transformer_blocks\.0\.attn\.to_v: 64 rows; the base has 3072 and 3072\)"):
        lora_compat.convert(tmp_path / "odd.safetensors", "bfl", tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()


def test_a_given_base_another_base_fits_is_refused() -> None:
    """SD1.5 cross-attention shapes (768-wide context) with --base sd2 (1024): the file fits sd15, so it is not
    renamed after sd2 by names alone (it used to be written with no tensors); header only, nothing read."""
    from lora_compat.tools.convert import convert_state_dict
    from lora_compat.files import Header, LoraFile

    shapes = {}
    for i, j in ((0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1)):
        name = f"lora_unet_down_blocks_{i}_attentions_{j}_transformer_blocks_0_attn2_to_k"
        width = (320, 640, 1280)[i]
        shapes.update({f"{name}.lora_down.weight": (4, 768), f"{name}.lora_up.weight": (width, 4)})

    def no_reads(key: str) -> torch.Tensor:
        raise AssertionError(f"tensor {key} read")

    file = LoraFile(Header(shapes, {k: "F32" for k in shapes}, {}, None), no_reads, "memory")
    assert lora_compat.inspect(file).base == "sd15"
    with pytest.raises(lora_compat.LoraCompatError, match=r"made for sd15 \(its shapes fit it\), not the given base "
                       r"sd2: 6 modules do not fit \(e\.g\. unet\.down_blocks\.0\.attentions\.0\.transformer_blocks"
                       r"\.0\.attn2\.to_k: LoRA up \[320, 4\] / down \[4, 768\] implies a weight \[320, 768 per row\], "
                       r"module weight is \[320, 1024\]\)"):
        convert_state_dict(file, "diffusers", base="sd2")


@pytest.mark.parametrize("base", [[], ["--base", "flux1"]], ids=["detected", "given"])
def test_cli_convert_of_a_small_flux_file(tmp_path: Path, small_flux, base: list[str], capsys) -> None:
    """With ``--base flux1`` given, the full-size shapes do not fit the file: names decide, the file's rows lay out
    the fused modules (the patches used to be dropped as misfits, leaving a file with no tensors)."""
    source, merged = write_flux_file(tmp_path, small_flux, "diffusers", FLUX_PARTIAL)
    for to in ("bfl", "kohya"):
        out = tmp_path / f"cli_{to}.safetensors"
        assert main(["convert", str(source), "--to", to, "-o", str(out), *base]) == 0, capsys.readouterr().err
        assert capsys.readouterr().out.startswith(f"wrote {out}: diffusers -> {to}, base flux1, 9 modules")
        components = {"transformer": small_flux}
        assert_same(lora_compat.patched_weights(out, components), merged, _base(components), 1e-5)


def test_host_names_of_a_small_flux_file_need_no_model(tmp_path: Path, small_flux) -> None:
    """The webui/ComfyUI naming (``hosts.convert.convert_for_host``, no host index) lays out fused modules by the file."""
    from safetensors.torch import save_file

    from lora_compat.hosts.convert import convert_for_host as host_convert

    source, merged = write_flux_file(tmp_path, small_flux, "diffusers", FLUX_PARTIAL)
    conversion = host_convert(str(source), "comfy")
    assert conversion.unmatched == []
    assert conversion.tensors["lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight"].shape[0] == 3 * 80
    # the swapped final modulation has no host-native tensors: the host adapters apply lora_compat's own patch
    assert "lora_unet_final_layer_adaLN_modulation_1" in conversion.patches
    assert not any(k.startswith("lora_unet_final_layer_adaLN") for k in conversion.tensors)
    save_file({k: v.contiguous() for k, v in conversion.tensors.items()}, str(tmp_path / "comfy.safetensors"))
    components = {"transformer": small_flux}
    want = {k: v for k, v in merged.items() if not k.startswith("transformer.norm_out.")}
    assert_same(lora_compat.patched_weights(tmp_path / "comfy.safetensors", components), want,
                _base(components), 1e-5)


@pytest.mark.parametrize("config", ["with adapter_config.json", "keys only"])
def test_peft_saved_flux_top_level_modules_match(tmp_path: Path, small_flux, config: str) -> None:
    """``base_model.model.proj_out`` (and x_embedder, context_embedder: names with no dot of their own) match;
    beside its adapter_config.json the file is read by the peft dialect, with the config's scales."""
    source, merged = write_flux_file(tmp_path, small_flux, "peft", FLUX_TARGETS)
    if config == "keys only":
        (tmp_path / "alone").mkdir()
        source = source.rename(tmp_path / "alone" / source.name)
    info = lora_compat.inspect(source)
    assert (info.dialect, info.unmatched) == ("peft" if config != "keys only" else "diffusers", [])
    assert info.targets == len({k.rpartition(".")[0] for k in merged})
    got = lora_compat.patched_weights(source, {"transformer": small_flux}, strict=True)
    assert {"transformer.proj_out.weight", "transformer.x_embedder.weight",
            "transformer.context_embedder.weight"} <= got.keys()
    if config != "keys only":  # without the config, alpha = rank is assumed (as diffusers does)
        assert_same(got, merged, _base({"transformer": small_flux}), 1e-5)
    assert main(["inspect", str(source)]) == 0


@pytest.mark.parametrize("layout", ["diffusers", "peft"])
def test_kohya_output_loads_in_diffusers_own_kohya_flux_loader(tmp_path: Path, small_flux, layout: str) -> None:
    """No lora_compat in the loading: FluxPipeline.load_lora_weights (its kohya converter) + fuse_lora."""
    from diffusers import FluxPipeline

    source, merged = write_flux_file(tmp_path, small_flux, layout, diffusers_kohya_targets(small_flux))
    out = tmp_path / "kohya.safetensors"
    lora_compat.convert(source, "kohya", out)
    transformer = copy.deepcopy(small_flux)
    pipe = FluxPipeline(scheduler=None, vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None,
                        tokenizer_2=None, transformer=transformer)
    with one_thread():
        pipe.load_lora_weights(str(out))
        pipe.fuse_lora(components=["transformer"], lora_scale=1.0)
    got = {f"transformer.{n.replace('.base_layer', '')}": p.detach() for n, p in transformer.named_parameters()
           if ".lora_" not in n}
    base = _base({"transformer": small_flux})
    changed = {k: v for k, v in got.items() if not torch.equal(v, base[k])}
    assert_same(changed, merged, base, 1e-5)


# -- conv LoRAs → diffusers / peft files that plain diffusers / PEFT load ------------------------------------------
@pytest.fixture(scope="module")
def sd15() -> dict[str, torch.nn.Module]:
    from lora_compat.oracles.models import make_sd15_components

    return make_sd15_components(seed=100)


def _conv_kernels(path: Path) -> set[tuple[int, ...]]:
    """Kernel sizes of the file's conv modules, and whether a conv's lora_up is 2-D (LyCORIS DyLoRA)."""
    raw = load_file(str(path))
    kernels = {tuple(v.shape[2:]) for k, v in raw.items() if k.endswith(".lora_down.weight") and v.dim() == 4}
    flat_ups = {k for k, v in raw.items() if k.endswith(".lora_up.weight") and v.dim() == 2
                and raw[k.replace("lora_up", "lora_down")].dim() == 4}
    return kernels | ({("2-D up",)} if flat_ups else set())


def _sd15_pipeline(components: dict[str, torch.nn.Module]):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(vae=None, text_encoder=components["text_encoder"], tokenizer=None,
                                   unet=components["unet"], scheduler=None, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)


def _params(components: dict[str, torch.nn.Module]) -> dict[str, torch.Tensor]:
    return {f"{c}.{n.replace('.base_layer', '')}": p.detach() for c, m in components.items()
            for n, p in m.named_parameters() if ".lora_" not in n}


@pytest.mark.parametrize("variant, kernels", [("lora", {(3, 3), (1, 1)}), ("dylora", {(3, 3), (1, 1), ("2-D up",)})])
def test_conv_loras_converted_to_diffusers_load_in_plain_diffusers(tmp_path: Path, sd15, variant: str,
                                                                   kernels: set) -> None:
    """LoCon 3x3 / 1x1 and LyCORIS DyLoRA (conv lora_up stored [out, r]) → ``--to diffusers`` → diffusers' own
    ``load_lora_weights`` + ``fuse_lora``: PEFT's conv layers take lora_A [r, in, kh, kw] and lora_B [out, r, 1, 1]."""
    from lora_compat.oracles.lycoris_oracle import write_lycoris_file

    source, _ = write_lycoris_file(tmp_path, sd15, variant, seed=3)
    assert _conv_kernels(source) == kernels
    out = tmp_path / "pytorch_lora_weights.safetensors"
    lora_compat.convert(source, "diffusers", out)
    components = {k: copy.deepcopy(m) for k, m in sd15.items()}
    pipe = _sd15_pipeline(components)
    with one_thread():
        pipe.load_lora_weights(str(out))
        pipe.fuse_lora(components=["unet", "text_encoder"], lora_scale=1.0)
    want = lora_compat.patched_weights(source, sd15, 1.0)
    assert any(v.dim() == 4 and v.shape[2:] == (3, 3) for v in want.values())
    assert_same({k: v for k, v in _params(components).items() if k in want}, want, _base(sd15), 1e-5)
    # the pipeline adapter hands diffusers the same shapes
    from lora_compat.adapters import diffusers as adapter

    components = {k: copy.deepcopy(m) for k, m in sd15.items()}
    pipe = _sd15_pipeline(components)
    with one_thread():
        assert adapter.load(pipe, source).route == "diffusers"
        pipe.fuse_lora(components=["unet", "text_encoder"], lora_scale=1.0)
    assert_same({k: v for k, v in _params(components).items() if k in want}, want, _base(sd15), 1e-5)


def test_dylora_conv_converted_to_peft_loads_in_peft(tmp_path: Path, sd15) -> None:
    """``--to peft`` of the UNet part: PeftModel.from_pretrained + merge_and_unload equals patched_weights."""
    from peft import PeftModel
    from safetensors.torch import save_file

    from lora_compat.oracles.lycoris_oracle import write_lycoris_file

    source, _ = write_lycoris_file(tmp_path, sd15, "dylora", seed=4)
    unet_only = tmp_path / "unet_only.safetensors"
    save_file({k: v for k, v in load_file(str(source)).items() if k.startswith("lora_unet_")}, str(unet_only),
              metadata={"ss_base_model_version": "sd_v1"})
    lora_compat.convert(unet_only, "peft", tmp_path / "adapter")
    with one_thread():
        merged = PeftModel.from_pretrained(copy.deepcopy(sd15["unet"]), str(tmp_path / "adapter")).merge_and_unload()
    want = lora_compat.patched_weights(unet_only, {"unet": sd15["unet"]}, 1.0)
    got = {f"unet.{n}": p.detach() for n, p in merged.named_parameters() if f"unet.{n}" in want}
    assert_same(got, want, _base({"unet": sd15["unet"]}), 1e-5)
