"""FLUX.1: full-size mapping on the meta device, fused (BFL) and split (diffusers) hosts, partial q/k/v,
Control LoRA input widening, and wrong-base errors.

The BFL host and the BFL↔diffusers table used to check results are written in ``flux_models.py`` from
dialects.md §5.1, independently of ``lora_compat.archs.flux``.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import lora_compat
from lora_compat import Patcher
from lora_compat.models import check_patchset, resolve_patchset
from lora_compat.archs import ModuleIndex
from lora_compat.errors import BaseMismatchError

from corpus import header_only_file, load
from flux_models import (PARTIAL, control_file, diffusers_file, flux_forward, kohya_flux_file, make_bfl_host,
                         make_flux, split_view, swap_halves)
from lora_compat.oracles.models import make_sd15_components

FLUX_CORPUS = {
    "invokeai_flux_control_lora_format.json": "bfl-control",
    "invokeai_flux_lora_aitoolkit_format.json": "bfl",
    "invokeai_flux_lora_diffusers_format.json": "diffusers",
    "invokeai_flux_lora_kohya_format.json": "kohya",
    "invokeai_flux_lora_xlabs_format.json": "xlabs",
    "derived_flux1_kohya_lora_full.json": "kohya",
}


# -- full-size mapping ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def meta_flux() -> dict[str, torch.nn.Module]:
    from lora_compat.archs.generate_tables import build_components

    return build_components("flux1")


@pytest.mark.parametrize("name", sorted(FLUX_CORPUS))
def test_full_size_flux_layouts_map_onto_the_meta_model(name: str, meta_flux) -> None:
    file = header_only_file(name)
    result = lora_compat.inspect(file)
    assert (result.dialect, result.base, result.unmatched) == (FLUX_CORPUS[name], "flux1", [])

    index = ModuleIndex.from_modules({"transformer": meta_flux["transformer"]})
    patchset = resolve_patchset(file, index)
    assert patchset.unmatched == {} and patchset.misfits == {}
    used = {ref.name for patch in patchset.values() for ref in patch.refs().values()}
    assert used == set(file.keys())  # every key of the file lands somewhere

    by_module = load("derived_flux1_module_map.json")["diffusers_to_bfl"]
    model = meta_flux["transformer"]
    for target, patch in patchset.items():
        path = target.partition(".")[2]
        module = model.get_submodule(path)
        weight = module.weight
        shapes = {n: tuple(p.shape) for n, p in module.named_parameters(recurse=False)}
        if patch.kind != "set":
            assert patch.misfit(shapes) is None, target
        if patch.kind == "lora" and hasattr(patch, "up"):
            rows = by_module[path]["rows"]
            assert patch.up.shape[0] == (rows[1] - rows[0] if rows else weight.shape[0]), target
            bfl = by_module[path]["bfl"]
            up = patch.refs()["up"].name
            assert up.startswith(("lora_unet_" + bfl.replace(".", "_") + ".", bfl + ".", f"diffusion_model.{bfl}.",
                                  f"transformer.{path}.")) or ".processor." in up, (target, up)


def test_kohya_flux_covers_every_module_of_the_map() -> None:
    """The full-coverage kohya layout (blocks only: no in_dims) reaches exactly the block modules of the map."""
    result = lora_compat.read(header_only_file("derived_flux1_kohya_lora_full.json"))
    mapped = load("derived_flux1_module_map.json")["diffusers_to_bfl"]
    in_blocks = {m for m in mapped if m.startswith(("transformer_blocks.", "single_transformer_blocks."))}
    assert len(in_blocks) == 494 and {t.partition(".")[2] for t in result} == in_blocks


def test_lokr_on_bfl_names_maps_by_name() -> None:
    """The InvokeAI LoKr fixture's shapes are not Kronecker-consistent: names map, shapes decide no base."""
    result = lora_compat.inspect(header_only_file("invokeai_flux_lokr_bfl_format.json"))
    assert (result.dialect, result.base, result.unmatched, result.kinds) == ("bfl", None, [], ["lokr"])
    assert result.base_candidates == ["flux1", "flux2"]  # double_blocks.0 / single_blocks.0 are FLUX.2 names too




# -- fused and split hosts ------------------------------------------------------------------------------------
def _equal_split(host: torch.nn.Module, model: torch.nn.Module) -> None:
    view = split_view(host, model)
    params = dict(model.named_parameters())
    for name, value in view.items():
        assert torch.equal(value, params[name]), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_partial_qkv_applies_identically_to_fused_and_split_hosts(tmp_path: Path, dtype) -> None:
    model = make_flux(dtype=dtype)
    host = make_bfl_host(model)
    _equal_split(host, model)
    file = diffusers_file(tmp_path / "partial.safetensors", model, PARTIAL)
    split, fused = Patcher({"transformer": model}), Patcher({"transformer": host})
    originals = {n: p.detach().clone() for n, p in host.named_parameters()}
    split.set([(file, 0.8)])
    fused.set([(file, 0.8)])
    _equal_split(host, model)
    # rows no part covers stay exactly as they were
    qkv = host.get_submodule("double_blocks.0.img_attn.qkv").weight
    rows = model.transformer_blocks[0].attn.to_q.weight.shape[0]
    assert torch.equal(qkv[rows:2 * rows], originals["double_blocks.0.img_attn.qkv.weight"][rows:2 * rows])
    assert not torch.equal(qkv[:rows], originals["double_blocks.0.img_attn.qkv.weight"][:rows])
    fused.clear()
    for name, p in host.named_parameters():
        assert torch.equal(p, originals[name]), name


def test_fused_source_applies_identically_to_fused_and_split_hosts(tmp_path: Path) -> None:
    model = make_flux()
    host = make_bfl_host(model)
    kohya = kohya_flux_file(tmp_path / "kohya.safetensors", model)
    partial = diffusers_file(tmp_path / "partial.safetensors", model, PARTIAL)
    split, fused = Patcher({"transformer": model}), Patcher({"transformer": host})
    for stack in ([(kohya, 1.0)], [(kohya, 0.5), (partial, -0.7)]):
        split.set(stack)
        fused.set(stack)
        _equal_split(host, model)


def test_fused_source_split_rows_equal_the_fused_delta(tmp_path: Path) -> None:
    """Fused → split is exact: the split modules' deltas, stacked, are the fused ΔW = alpha/r · up @ down."""
    model = make_flux()
    kohya = kohya_flux_file(tmp_path / "kohya.safetensors", model)
    from safetensors.torch import load_file

    raw = load_file(str(kohya))
    new = lora_compat.patched_weights(kohya, {"transformer": model})
    key = "lora_unet_single_blocks_1_linear1"
    expected = raw[f"{key}.alpha"] / 4 * raw[f"{key}.lora_up.weight"] @ raw[f"{key}.lora_down.weight"]
    names = ["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"]
    got = torch.cat([new[f"transformer.single_transformer_blocks.1.{n}.weight"]
                     - model.get_submodule(f"single_transformer_blocks.1.{n}").weight.detach() for n in names])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    # norm_out.linear = final_layer.adaLN_modulation.1 with (shift, scale) halves swapped
    key = "lora_unet_final_layer_adaLN_modulation_1"
    delta = raw[f"{key}.alpha"] / 4 * raw[f"{key}.lora_up.weight"] @ raw[f"{key}.lora_down.weight"]
    got = new["transformer.norm_out.linear.weight"] - model.norm_out.linear.weight.detach()
    torch.testing.assert_close(got, swap_halves(delta), rtol=1e-5, atol=1e-6)


def test_inspect_reports_partial_fused_modules() -> None:
    """A full-size "Fast Flux" style header with only some of q/k/v (and of linear1's parts)."""
    from lora_compat.files import Header, LoraFile

    mapped = load("derived_flux1_module_map.json")["diffusers_to_bfl"]
    shapes = {}
    for module in PARTIAL:
        out, inner = mapped[module]["diffusers_weight_shape"]
        shapes[f"transformer.{module}.lora_A.weight"] = (16, inner)
        shapes[f"transformer.{module}.lora_B.weight"] = (out, 16)
    header = Header(shapes, {k: "BF16" for k in shapes}, {}, None)
    result = lora_compat.inspect(LoraFile(header, lambda k: (_ for _ in ()).throw(AssertionError(k)), "memory"))
    assert (result.dialect, result.base, result.unmatched) == ("diffusers", "flux1", [])
    assert result.partial["transformer.double_blocks.0.img_attn.qkv"] == {
        "present": ["transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_v"],
        "absent": ["transformer_blocks.0.attn.to_k"]}
    assert result.partial["transformer.single_blocks.1.linear1"] == {
        "present": ["single_transformer_blocks.1.proj_mlp"],
        "absent": [f"single_transformer_blocks.1.attn.to_{x}" for x in "qkv"]}
    assert "transformer.double_blocks.1.img_mlp.2" not in result.partial  # whole modules are never partial


# -- Control LoRA -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("target", ["split", "fused"])
def test_control_lora_widens_the_input_and_clear_narrows_it(tmp_path: Path, target: str) -> None:
    model = make_flux()
    host = model if target == "split" else make_bfl_host(model)
    file = control_file(tmp_path / "control.safetensors", model)
    embedder = host.x_embedder if target == "split" else host.img_in
    params = dict(host.named_parameters())
    originals = {n: p.detach().clone() for n, p in params.items()}
    patcher = Patcher({"transformer": host})
    patcher.set([(file, 0.6)])
    assert embedder.weight.shape == (64, 32) and embedder.in_features == 32
    assert dict(host.named_parameters()) == params  # the same Parameter objects
    from safetensors.torch import load_file

    raw = load_file(str(file))
    # padded original columns + 0.6 · B·A; the new columns are 0.6 · B·A alone
    delta = 0.6 * raw["img_in.lora_B.weight"] @ raw["img_in.lora_A.weight"]
    padded = torch.cat([originals[f"{'x_embedder' if target == 'split' else 'img_in'}.weight"],
                        torch.zeros(64, 16)], 1)
    torch.testing.assert_close(embedder.weight.detach(), padded + delta, rtol=1e-5, atol=1e-6)
    norm = host.transformer_blocks[0].attn.norm_q.weight if target == "split" else \
        host.get_submodule("double_blocks.0.img_attn.norm.query_norm").scale
    assert torch.equal(norm, raw["double_blocks.0.img_attn.norm.query_norm.scale"])  # set: exact, strength ignored
    if target == "split":
        assert model.config.in_channels == 32
        out = flux_forward(model, channels=32)
        assert out.shape[-1] == 16  # the output keeps its width
    patcher.clear()
    assert embedder.weight.shape == (64, 16) and embedder.in_features == 16
    for name, p in host.named_parameters():
        assert torch.equal(p, originals[name]), name
    if target == "split":
        assert model.config.in_channels == 16


# -- wrong base --------------------------------------------------------------------------------------------------
def test_flux_lora_on_sd_components_is_a_base_mismatch(tmp_path: Path) -> None:
    file = kohya_flux_file(tmp_path / "flux.safetensors", make_flux())
    with pytest.raises(BaseMismatchError, match=r"flux\.safetensors: none of its \d+ keys maps to a module of "
                                                r"these components \(unet, text_encoder\): the LoRA is made for "
                                                r"flux1 \(by its names\); the components look like a Stable "
                                                r"Diffusion UNet model"):
        Patcher(make_sd15_components()).set([(file, 1.0)])


def test_sd_lora_on_flux_is_a_base_mismatch(tmp_path: Path) -> None:
    sd = make_sd15_components()
    conv = sd["unet"].down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q
    save_file({"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight":
               torch.randn(2, conv.weight.shape[1]),
               "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight":
               torch.randn(conv.weight.shape[0], 2)}, str(tmp_path / "sd.safetensors"))
    with pytest.raises(BaseMismatchError, match=r"sd\.safetensors: none of its 2 keys maps to a module of these "
                                                r"components \(transformer\): the LoRA is made for sd15 or sd2 "
                                                r"\(by its names\); the components look like a flux1-family"):
        Patcher(make_flux()).set([(tmp_path / "sd.safetensors", 1.0)])


def test_flux_lora_for_another_width_is_a_base_mismatch(tmp_path: Path) -> None:
    file = kohya_flux_file(tmp_path / "narrow.safetensors", make_flux())
    wide = make_flux(num_attention_heads=6)  # width 96 instead of 64
    with pytest.raises(BaseMismatchError, match=r"narrow\.safetensors: this LoRA is made for flux1 \(by its names\); "
                                                r"the components look like a flux1-family model: \d+ "
                                                r"modules do not fit .*implies a weight \[\d+, 64 per row\], "
                                                r"module weight is \[\d+, 96\]"):
        Patcher(wide).set([(file, 1.0)])
    index = ModuleIndex.from_modules({"transformer": wide})
    patchset = resolve_patchset(file, index)
    with pytest.raises(BaseMismatchError):
        check_patchset(patchset, index, strict=False)


def test_trailing_underscore_names_get_a_clear_reason(tmp_path: Path) -> None:
    model = make_flux()
    save_file({"lora_unet_context_embedder_.lora_down.weight": torch.randn(2, 32),
               "lora_unet_context_embedder_.lora_up.weight": torch.randn(64, 2),
               **{k: v for k, v in _kohya_one(model).items()}}, str(tmp_path / "broken.safetensors"))
    result = lora_compat.inspect(tmp_path / "broken.safetensors", base="flux1")
    assert "sd-scripts issue #1463" in result.unmatched_reasons["lora_unet_context_embedder_.lora_down.weight"]


def _kohya_one(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    w = model.transformer_blocks[0].attn.to_out[0].weight
    return {"lora_unet_double_blocks_0_img_attn_proj.lora_down.weight": torch.randn(2, w.shape[1]),
            "lora_unet_double_blocks_0_img_attn_proj.lora_up.weight": torch.randn(w.shape[0], 2)}



# -- OneTrainer and the text encoders ------------------------------------------------------------------------------
def make_text_encoders(seed: int = 0) -> dict[str, torch.nn.Module]:
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, max_position_embeddings=16))
    t5 = T5EncoderModel(T5Config(vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                 feed_forward_proj="gated-gelu", is_encoder_decoder=False))
    return {"text_encoder": clip.eval(), "text_encoder_2": t5.eval()}


def _lora(out: int, inner: int, rank: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(rank, inner, generator=g), torch.randn(out, rank, generator=g) * 0.1


def test_onetrainer_flux_with_dora_and_t5(tmp_path: Path) -> None:
    """lora_transformer_<diffusers path> with DoRA (dora_scale [1, in]), lora_te1_ = CLIP-L, lora_te2_ = T5."""
    model, encoders = make_flux(), make_text_encoders()
    components = {"transformer": model, **encoders}
    g = torch.Generator().manual_seed(7)
    modules = {"lora_transformer_transformer_blocks_0_attn_to_q": model.transformer_blocks[0].attn.to_q,
               "lora_transformer_single_transformer_blocks_1_proj_mlp": model.single_transformer_blocks[1].proj_mlp,
               "lora_te1_text_model_encoder_layers_1_self_attn_v_proj":
                   encoders["text_encoder"].get_submodule("encoder.layers.1.self_attn.v_proj"),
               "lora_te2_encoder_block_1_layer_1_DenseReluDense_wi_0":
                   encoders["text_encoder_2"].get_submodule("encoder.block.1.layer.1.DenseReluDense.wi_0")}
    tensors, expected = {}, {}
    for key, module in modules.items():
        weight = module.weight.detach()
        down, up = _lora(weight.shape[0], weight.shape[1], 4, g)
        tensors.update({f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up,
                        f"{key}.alpha": torch.tensor(2.0)})
        merged = weight + 0.5 * up @ down
        if key.startswith("lora_transformer_"):  # DoRA on the input axis, as OneTrainer writes by default
            magnitude = weight.norm(dim=0, keepdim=True) * (1 + 0.1 * torch.rand(1, weight.shape[1], generator=g))
            tensors[f"{key}.dora_scale"] = magnitude
            merged = magnitude * merged / (merged.norm(dim=0, keepdim=True) + torch.finfo(torch.float32).eps)
        expected[module] = merged
    save_file(tensors, str(tmp_path / "onetrainer.safetensors"))
    result = lora_compat.inspect(tmp_path / "onetrainer.safetensors")
    assert (result.dialect, result.kinds, result.unmatched) == ("onetrainer", ["dora", "lora"], [])
    new = lora_compat.patched_weights(tmp_path / "onetrainer.safetensors", components, strict=True)
    names = {module: f"{component}.{name}.weight" for component, root in components.items()
             for name, module in root.named_modules() if module in expected}
    assert set(new) == set(names.values())
    for module, value in expected.items():
        torch.testing.assert_close(new[names[module]], value, rtol=1e-5, atol=1e-6)


def test_onetrainer_numbered_bfl_parts_equal_the_split_modules(tmp_path: Path) -> None:
    """``transformer.double_blocks.0.img_attn.qkv.1`` is to_k; ``single_blocks.0.linear1.3`` is proj_mlp."""
    model = make_flux()
    g = torch.Generator().manual_seed(8)
    pairs = {"double_blocks.0.img_attn.qkv.1": "transformer_blocks.0.attn.to_k",
             "single_blocks.0.linear1.3": "single_transformer_blocks.0.proj_mlp",
             "double_blocks.1.img_mlp.0": "transformer_blocks.1.ff.net.0.proj"}
    numbered, diffusers = {}, {}
    for bfl, path in pairs.items():
        weight = model.get_submodule(path).weight
        down, up = _lora(weight.shape[0], weight.shape[1], 3, g)
        numbered.update({f"transformer.{bfl}.lora_down.weight": down, f"transformer.{bfl}.lora_up.weight": up})
        diffusers.update({f"transformer.{path}.lora_A.weight": down, f"transformer.{path}.lora_B.weight": up})
    save_file(numbered, str(tmp_path / "numbered.safetensors"))
    save_file(diffusers, str(tmp_path / "split.safetensors"))
    assert lora_compat.inspect(tmp_path / "numbered.safetensors").dialect == "onetrainer"
    a = lora_compat.patched_weights(tmp_path / "numbered.safetensors", {"transformer": model}, strict=True)
    b = lora_compat.patched_weights(tmp_path / "split.safetensors", {"transformer": model}, strict=True)
    assert a.keys() == b.keys() == {f"transformer.{p}.weight" for p in pairs.values()}
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("style", ["kohya", "diffusers", "comfyui"])
def test_flux_text_encoder_keys_resolve_against_transformers_names(tmp_path: Path, style: str) -> None:
    encoders = make_text_encoders()
    g = torch.Generator().manual_seed(9)
    clip_q = "text_model.encoder.layers.0.self_attn.q_proj"  # files keep CLIP's text_model. level ...
    clip_module = "encoder.layers.0.self_attn.q_proj"  # ... which transformers 5 dropped
    t5_o = "encoder.block.0.layer.0.SelfAttention.o"
    names = {"kohya": {"text_encoder": "lora_te1_" + clip_q.replace(".", "_"),
                       "text_encoder_2": "lora_te3_" + t5_o.replace(".", "_")},
             "diffusers": {"text_encoder": f"text_encoder.{clip_q}", "text_encoder_2": f"text_encoder_2.{t5_o}"},
             "comfyui": {"text_encoder": f"text_encoders.clip_l.transformer.{clip_q}",
                         "text_encoder_2": f"text_encoders.t5xxl.transformer.{t5_o}"}}[style]
    down_key, up_key = {"kohya": ("lora_down", "lora_up"), "diffusers": ("lora_A", "lora_B"),
                        "comfyui": ("lora_down", "lora_up")}[style]
    tensors, expected = {}, {}
    for component, key in names.items():
        path = clip_module if component == "text_encoder" else t5_o
        weight = encoders[component].get_submodule(path).weight.detach()
        down, up = _lora(weight.shape[0], weight.shape[1], 2, g)
        tensors.update({f"{key}.{down_key}.weight": down, f"{key}.{up_key}.weight": up})
        expected[f"{component}.{path}.weight"] = weight + up @ down
    if style == "comfyui":  # ComfyUI files carry the transformer too; the dialect is bfl
        tensors["diffusion_model.img_in.lora_down.weight"] = torch.randn(2, 16, generator=g)
        tensors["diffusion_model.img_in.lora_up.weight"] = torch.randn(64, 2, generator=g)
    save_file(tensors, str(tmp_path / f"{style}.safetensors"))
    components = {"transformer": make_flux(), **encoders} if style == "comfyui" else encoders
    new = lora_compat.patched_weights(tmp_path / f"{style}.safetensors", components, strict=True, base="flux1")
    for key, value in expected.items():
        torch.testing.assert_close(new[key], value, rtol=1e-5, atol=1e-6)


def test_control_lora_in_hot_mode_is_refused_and_nothing_changes(tmp_path: Path) -> None:
    model = make_flux()
    file = control_file(tmp_path / "control.safetensors", model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    patcher = Patcher({"transformer": model}, mode="hot")
    with pytest.raises(lora_compat.LoraCompatError, match=r"transformer\.x_embedder: this LoRA widens the "
                                                          r"module's input .* use Patcher\(mode='merge'\)"):
        patcher.set([(file, 1.0)])
    assert patcher.active == [] and model.x_embedder.in_features == 16
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert torch.equal(flux_forward(model, 16), flux_forward(make_flux(), 16))  # no hook left behind


@pytest.mark.parametrize("prefix", ["", "base_model.model."])
def test_bare_and_peft_prefixed_flux_names_equal_the_transformer_prefix(tmp_path: Path, prefix: str) -> None:
    model = make_flux()
    reference = diffusers_file(tmp_path / "ref.safetensors", model, PARTIAL)
    from safetensors.torch import load_file

    renamed = {prefix + k[len("transformer."):]: v for k, v in load_file(str(reference)).items()}
    save_file(renamed, str(tmp_path / "other.safetensors"))
    assert lora_compat.inspect(tmp_path / "other.safetensors").dialect == "diffusers"
    a = lora_compat.patched_weights(tmp_path / "other.safetensors", {"transformer": model}, strict=True)
    b = lora_compat.patched_weights(reference, {"transformer": model}, strict=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
