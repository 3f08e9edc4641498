"""Full-size Qwen-Image mapping on the shipped tables: derived full-coverage key lists (every Linear module, rank 1 or
LoKr factors) in each layout in the wild map to base ``qwen-image`` with nothing unmatched and the right variant;
the tables agree with diffusers' / transformers' classes on ``meta``; FLUX.1 files keep their base."""
from __future__ import annotations

from typing import Callable

import pytest

import lora_compat
from lora_compat.archs.qwen_image import QWEN_IMAGE

from family_layouts import header_file

#: Linear modules (families.md appendix A, counted on ``meta``): Qwen-Image 20B and Qwen-Image-2.1
LINEAR_20B, LINEAR_21 = 846, 232
#: Qwen2.5-VL-7B's Linear modules (language model 28 x 7 + lm_head, vision tower 32 x 5 + merger 2) and parameters
LINEAR_TE, TE_PARAMS = 359, 8_292_166_656


#: the 2-D weights that are embeddings, not Linear layers
EMBEDDINGS = ("time_text_embed.addition_t_embedding", "model.language_model.embed_tokens")


def _linears(variant: str | None = None, component: str = "transformer") -> dict[str, tuple[int, int]]:
    index = QWEN_IMAGE.index if variant is None else QWEN_IMAGE.variant_index(variant)
    modules = index.components[component]
    return {p: shapes["weight"] for p, shapes in modules.items()
            if len(shapes.get("weight", ())) == 2 and p not in EMBEDDINGS}


def _lora(names: dict[str, tuple[int, int]], down: str, up: str, alpha: bool) -> dict[str, list[int]]:
    keys: dict[str, list[int]] = {}
    for name, (out, inp) in names.items():
        keys[f"{name}.{down}"] = [1, inp]
        keys[f"{name}.{up}"] = [out, 1]
        if alpha:
            keys[f"{name}.alpha"] = []
    return keys


def _lokr(names: dict[str, tuple[int, int]], factor: int = 4) -> dict[str, list[int]]:
    """LyCORIS LoKr with full factors: ``w1 (f, f) (x) w2 (out/f, in/f)`` is the module's shape."""
    keys: dict[str, list[int]] = {}
    for name, (out, inp) in names.items():
        keys.update({f"{name}.lokr_w1": [factor, factor], f"{name}.lokr_w2": [out // factor, inp // factor],
                     f"{name}.alpha": []})
    return keys


def _flat(path: str) -> str:
    return path.replace(".", "_")


#: layout → (module name, down suffix, up suffix, alpha, dialect); diffusers names are Qwen-Image's own names
LAYOUTS: dict[str, tuple[Callable[[str], str], str, str, bool, str]] = {
    "diffusers": (lambda p: f"transformer.{p}", "lora_A.weight", "lora_B.weight", False, "diffusers"),
    "peft-no-config": (lambda p: f"base_model.model.{p}", "lora_A.weight", "lora_B.weight", False, "diffusers"),
    "diffsynth-default": (lambda p: p, "lora_A.default.weight", "lora_B.default.weight", False, "diffusers"),
    "bare-kohya-suffixes": (lambda p: p, "lora_down.weight", "lora_up.weight", True, "native"),
    "comfy": (lambda p: f"diffusion_model.{p}", "lora_A.weight", "lora_B.weight", False, "native"),
    "comfy-kohya": (lambda p: f"diffusion_model.{p}", "lora_down.weight", "lora_up.weight", True, "native"),
    "comfy-dot": (lambda p: f"diffusion_model.{p}", "lora.down.weight", "lora.up.weight", False, "native"),
    "musubi": (lambda p: f"lora_unet_{_flat(p)}", "lora_down.weight", "lora_up.weight", True, "kohya"),
    "simpletuner-lycoris": (lambda p: f"lycoris_{_flat(p)}", "lora_down.weight", "lora_up.weight", True, "lycoris"),
}


def test_tables_have_every_linear():
    assert len(_linears()) == LINEAR_20B
    assert len(_linears("qwen-image-2.1")) == LINEAR_21
    assert len(_linears(component="text_encoder")) == LINEAR_TE
    linears = _linears()
    assert linears["transformer_blocks.59.img_mod.1"] == (18432, 3072)
    assert linears["transformer_blocks.0.txt_mlp.net.0.proj"] == (12288, 3072)
    assert linears["txt_in"] == (3072, 3584)
    assert _linears("qwen-image-2.1")["transformer_blocks.31.img_mlp.gate_layer"] == (12288, 4096)
    te = _linears(component="text_encoder")
    assert te["model.language_model.layers.27.self_attn.k_proj"] == (512, 3584)
    assert te["model.language_model.layers.0.mlp.down_proj"] == (3584, 18944)
    # Qwen-Image-Layered's extra timestep embedding is in the table too
    assert QWEN_IMAGE.index.components["transformer"]["time_text_embed.addition_t_embedding"] == {"weight": (2, 3072)}


def test_tables_agree_with_the_classes_on_meta():
    pytest.importorskip("diffusers")
    from lora_compat.archs.generate_tables import build_components, table_for

    tables = (("qwen-image", QWEN_IMAGE.index), ("qwen-image-2.1", QWEN_IMAGE.variant_index("qwen-image-2.1")))
    for name, index in tables:
        generated = table_for(name)["components"]
        shipped = index.components
        assert {c: {m: {p: tuple(s) for p, s in params.items()} for m, params in mods.items()}
                for c, mods in generated.items()} == shipped
    encoder = build_components("qwen-image")["text_encoder"]
    assert sum(p.numel() for p in encoder.parameters()) == TE_PARAMS


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_full_coverage_maps_to_qwen_image_20b(layout):
    name, down, up, alpha, dialect = LAYOUTS[layout]
    linears = _linears()
    result = lora_compat.inspect(header_file(_lora({name(p): s for p, s in linears.items()}, down, up, alpha)))
    assert (result.dialect, result.base, result.variant, result.unmatched) == \
        (dialect, "qwen-image", "qwen-image-20b", [])
    patchset = lora_compat.read(header_file(_lora({name(p): s for p, s in linears.items()}, down, up, alpha)))
    assert sorted(patchset.patches) == sorted(f"transformer.{p}" for p in linears)
    assert "shapes not checked" not in " ".join(result.warnings)


@pytest.mark.parametrize("prefix", ["lora_unet_", "lycoris_"])
def test_full_coverage_lokr_maps_to_qwen_image(prefix):
    """kohya / SimpleTuner LyCORIS LoKr (diffusers 0.42 raises on these)."""
    linears = _linears()
    result = lora_compat.inspect(header_file(_lokr({prefix + _flat(p): s for p, s in linears.items()})))
    assert (result.dialect, result.base, result.variant, result.kinds, result.unmatched, result.targets) == \
        ("lycoris", "qwen-image", "qwen-image-20b", ["lokr"], [], LINEAR_20B)


@pytest.mark.parametrize("layout", ["diffusers", "comfy", "musubi"])
def test_full_coverage_maps_to_qwen_image_21(layout):
    name, down, up, alpha, dialect = LAYOUTS[layout]
    linears = _linears("qwen-image-2.1")
    result = lora_compat.inspect(header_file(_lora({name(p): s for p, s in linears.items()}, down, up, alpha)))
    assert (result.dialect, result.base, result.variant, result.unmatched, result.targets) == \
        (dialect, "qwen-image", "qwen-image-2.1", [], LINEAR_21)


def test_a_2_1_file_of_modules_only_2_1_has_is_2_1():
    """The 20B table names none of its modules (``img_mlp.gate_layer``): the variant table is still tried."""
    modules = {f"transformer_blocks.{n}.img_mlp.{m}": s for n in (0, 31)
               for m, s in (("gate_layer", (12288, 4096)), ("proj", (12288, 4096)), ("out", (4096, 12288)))}
    keys = _lora({f"transformer.{m}": s for m, s in modules.items()}, "lora_A.weight", "lora_B.weight", False)
    result = lora_compat.inspect(header_file(keys))
    assert (result.base, result.variant, result.unmatched, result.targets) == ("qwen-image", "qwen-image-2.1", [], 6)


@pytest.mark.parametrize("prefix, rename", [
    ("lora_te_", lambda p: _flat(p.replace("model.language_model.", "model.").replace("model.visual.", "visual."))),
    ("lora_te_", _flat),
    ("text_encoder.", lambda p: p),
])
def test_text_encoder_coverage_maps_to_qwen_image(prefix, rename):
    """Every Linear of Qwen2.5-VL-7B under kohya names (transformers' older ``model.layers.N`` paths or transformers
    5's ``model.language_model.layers.N``) or diffusers names, beside one transformer module."""
    te = _linears(component="text_encoder")
    names = {prefix + rename(p): s for p, s in te.items()}
    if prefix.startswith("lora_"):
        keys = _lora({**names, "lora_unet_transformer_blocks_0_img_mod_1": (18432, 3072)},
                     "lora_down.weight", "lora_up.weight", True)
    else:
        keys = _lora({**names, "transformer.transformer_blocks.0.img_mod.1": (18432, 3072)},
                     "lora_A.weight", "lora_B.weight", False)
    result = lora_compat.inspect(header_file(keys))
    assert (result.base, result.unmatched) == ("qwen-image", [])
    assert result.components == {"text_encoder": LINEAR_TE, "transformer": 1}


def _attention(blocks, width=3072) -> dict[str, tuple[int, int]]:
    return {f"transformer_blocks.{n}.attn.{m}": (width, width) for n in blocks
            for m in ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")}


@pytest.mark.parametrize("layout", ["diffusers", "peft-no-config", "musubi"])
def test_attention_only_over_flux1_depth_is_no_confident_base(layout):
    """Qwen-Image attention over blocks FLUX.1 also has: FLUX.1 diffusers names and shapes too. Without metadata
    neither base is named; the trainer's metadata decides."""
    name, down, up, alpha, _ = LAYOUTS[layout]
    keys = _lora({name(p): s for p, s in _attention(range(0, 19, 6)).items()}, down, up, alpha)
    result = lora_compat.inspect(header_file(keys))
    assert (result.base, result.base_candidates, result.variant) == (None, ["flux1", "qwen-image"], None)
    for metadata in ({"ss_base_model_version": "qwen_image"}, {"modelspec.architecture": "qwen-image/lora"}):
        result = lora_compat.inspect(header_file(keys, metadata))
        assert (result.base, result.variant, result.unmatched) == ("qwen-image", "qwen-image-20b", [])
    result = lora_compat.inspect(header_file(keys, {"ss_base_model_version": "flux1"}))
    assert (result.base, result.unmatched) == ("flux1", [])


@pytest.mark.parametrize("layout", ["comfy", "comfy-kohya", "bare-kohya-suffixes"])
def test_attention_only_in_native_layouts_is_qwen_image(layout):
    """``diffusion_model.`` + diffusers names, and bare diffusers names with kohya suffixes: ComfyUI reads these for
    Qwen-Image only (its FLUX.1 maps take BFL names and ``transformer.`` + diffusers names), as does InvokeAI."""
    name, down, up, alpha, dialect = LAYOUTS[layout]
    keys = _lora({name(p): s for p, s in _attention(range(0, 19, 6)).items()}, down, up, alpha)
    result = lora_compat.inspect(header_file(keys))
    assert (result.dialect, result.base, result.variant, result.unmatched) == \
        (dialect, "qwen-image", "qwen-image-20b", [])


@pytest.mark.parametrize("layout", ["diffusers", "comfy", "musubi"])
def test_attention_deeper_than_flux1_is_qwen_image(layout):
    name, down, up, alpha, dialect = LAYOUTS[layout]
    keys = _lora({name(p): s for p, s in _attention([3, 40]).items()}, down, up, alpha)
    result = lora_compat.inspect(header_file(keys))
    assert (result.dialect, result.base, result.variant, result.unmatched) == \
        (dialect, "qwen-image", "qwen-image-20b", [])


def test_partial_files_map():
    """Some blocks, only q and v, one MLP projection."""
    modules = {p: s for p, s in _linears().items() if p.startswith(("transformer_blocks.7.", "transformer_blocks.51."))
               and p.endswith(("to_q", "to_v", "txt_mlp.net.2"))}
    result = lora_compat.inspect(header_file(_lora({f"diffusion_model.{p}": s for p, s in modules.items()},
                                                   "lora_down.weight", "lora_up.weight", True)))
    assert (result.base, result.unmatched, result.targets) == ("qwen-image", [], 6)


def test_flux1_diffusers_files_keep_their_base():
    """FLUX.1's diffusers files have modules only FLUX.1 has (single_transformer_blocks, norm1.linear, ff.net)."""
    from lora_compat.archs.flux import FLUX1

    modules = FLUX1.index.components["transformer"]
    linears = {p: s["weight"] for p, s in modules.items() if len(s.get("weight", ())) == 2}
    for prefix in ("transformer.", ""):
        result = lora_compat.inspect(header_file(_lora({prefix + p: s for p, s in linears.items()},
                                                       "lora_A.weight", "lora_B.weight", False)))
        assert (result.dialect, result.base, result.variant, result.unmatched) == ("diffusers", "flux1", None, [])


def test_the_qwen_image_transformer_file_is_refused():
    """A model file, not a LoRA: still refused with the family named (model_files.py)."""
    from family_layouts import qwen_image_transformer

    with pytest.raises(lora_compat.NotALoraError, match="a Qwen-Image transformer checkpoint"):
        lora_compat.inspect(header_file(qwen_image_transformer(depth=2)))


def _gate_up(linears: dict[str, tuple[int, int]]) -> dict[str, tuple[int, int]]:
    """ComfyUI's Qwen-Image-2.1 modules: each block's ``img_mlp.gate_layer`` and ``img_mlp.proj`` as one
    ``img_mlp.gate_up`` (gate rows first; diffusers' ``convert_qwen_image21_transformer_checkpoint_to_diffusers``)."""
    fused = {}
    for path, (out, inp) in linears.items():
        if path.endswith(".img_mlp.gate_layer"):
            assert linears[path.replace("gate_layer", "proj")] == (out, inp)
            fused[path.replace("gate_layer", "gate_up")] = (2 * out, inp)
        elif not path.endswith(".img_mlp.proj"):
            fused[path] = (out, inp)
    return fused


@pytest.mark.parametrize("layout", ["comfy", "comfy-kohya", "musubi"])
def test_full_coverage_with_comfyuis_fused_gate_up_maps_to_qwen_image_21(layout):
    """ComfyUI's 2.1 names (``img_mlp.gate_up``, 24576 rows): each fused module patches the block's gate and up
    projections; nothing is unmatched."""
    name, down, up, alpha, dialect = LAYOUTS[layout]
    linears = _linears("qwen-image-2.1")
    fused = _gate_up(linears)
    assert len(fused) == LINEAR_21 - 32 and fused["transformer_blocks.31.img_mlp.gate_up"] == (24576, 4096)
    file = header_file(_lora({name(p): s for p, s in fused.items()}, down, up, alpha))
    result = lora_compat.inspect(file)
    assert (result.dialect, result.base, result.variant, result.unmatched, result.targets) == \
        (dialect, "qwen-image", "qwen-image-2.1", [], LINEAR_21)
    patchset = lora_compat.read(header_file(_lora({name(p): s for p, s in fused.items()}, down, up, alpha)))
    assert sorted(patchset.patches) == sorted(f"transformer.{p}" for p in linears)
