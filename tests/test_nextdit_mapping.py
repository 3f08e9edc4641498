"""Full-size Z-Image and Lumina-Image 2.0 mapping on the shipped tables: derived full-coverage key lists (every Linear
module, rank 1) in each layout in the wild map to the right base with nothing unmatched; native fused ``qkv`` splits
into q/k/v rows taken from the model's shapes (Lumina 2: 2304/768/768); the two families (same native names) are
told apart by width only, never confidently wrong."""
from __future__ import annotations

from pathlib import Path

import pytest

import lora_compat
from lora_compat.archs.nextdit import LUMINA2, Z_IMAGE
from lora_compat.files import Header, LoraFile

from corpus import load
from nextdit_names import native
from test_wan_mapping import _file as wan_file

#: Linear modules on meta (families.md appendix A): Z-Image-Turbo 276, Lumina-Image 2.0 244
LINEAR_MODULES = {"z-image": 276, "lumina2": 244}
ARCHS = {"z-image": Z_IMAGE, "lumina2": LUMINA2}
def linears(base: str, component: str = "transformer") -> dict[str, tuple[int, int]]:
    modules = ARCHS[base].index.components[component]
    return {p: s["weight"] for p, s in modules.items() if len(s.get("weight", ())) == 2}


def native_linears(base: str) -> dict[str, tuple[int, int]]:
    """Native module → (rows, columns): q, k and v stacked into ``qkv``."""
    out: dict[str, tuple[int, int]] = {}
    for path, (rows, columns) in linears(base).items():
        name = native(base, path)
        out[name] = (out.get(name, (0, 0))[0] + rows, columns)
    return out


def write(path: Path, names: dict[str, tuple[int, int]], down: str, up: str, alpha: bool = False) -> Path:
    """A rank-1 file of zeros on ``names`` (module → (rows, columns)), as test_wan_mapping writes its own."""
    return wan_file(path, names, down, up, alpha)


def header_file(shapes: dict[str, tuple[int, ...]], metadata: dict[str, str] | None = None) -> LoraFile:
    return LoraFile(Header(shapes, {k: "F16" for k in shapes}, metadata or {}),
                    lambda k: (_ for _ in ()).throw(AssertionError(k)), "memory")


@pytest.mark.parametrize("base", ARCHS)
def test_tables_agree_with_diffusers_on_meta(base):
    pytest.importorskip("diffusers")
    from lora_compat.archs.generate_tables import table_for

    generated = table_for(base)["components"]
    shipped = ARCHS[base].index.components
    assert set(generated) == set(shipped) == {"transformer", "text_encoder"}
    for component, modules in generated.items():
        assert {m: {p: tuple(s) for p, s in params.items()} for m, params in modules.items()} == shipped[component]
    assert len(linears(base)) == LINEAR_MODULES[base]


def test_widths_of_the_official_configs():
    z, lumina = linears("z-image"), linears("lumina2")
    assert z["layers.29.attention.to_k"] == (3840, 3840) and z["cap_embedder.1"] == (3840, 2560)
    assert z["noise_refiner.1.feed_forward.w1"] == (10240, 3840) and "layers.30.attention.to_q" not in z
    assert (lumina["layers.25.attn.to_q"], lumina["layers.25.attn.to_k"], lumina["layers.25.attn.to_v"]) == \
        ((2304, 2304), (768, 2304), (768, 2304))
    assert lumina["time_caption_embed.caption_embedder.1"] == (2304, 2304)
    # the text encoders: Qwen3-4B (Z-Image) and Gemma-2-2B (Lumina 2), transformers names
    assert linears("z-image", "text_encoder")["layers.35.self_attn.k_proj"] == (1024, 2560)
    assert linears("lumina2", "text_encoder")["layers.25.mlp.gate_proj"] == (9216, 2304)


def _diffusers_names(base: str, prefix: str) -> dict[str, tuple[int, int]]:
    return {prefix + p: s for p, s in linears(base).items()}


#: layout → (names, down suffix, up suffix, alpha, dialect)
LAYOUTS = {
    "diffusers": (lambda b: _diffusers_names(b, "transformer."), "lora_A.weight", "lora_B.weight", False, "diffusers"),
    "ai-toolkit": (lambda b: _diffusers_names(b, "diffusion_model."), "lora_A.weight", "lora_B.weight", False,
                   "native"),
    "diffsynth": (lambda b: _diffusers_names(b, ""), "lora_A.default.weight", "lora_B.default.weight", False,
                  "native"),
    "musubi": (lambda b: {"lora_unet_" + p.replace(".", "_"): s for p, s in linears(b).items()},
               "lora_down.weight", "lora_up.weight", True, "kohya"),
    "comfy-fused": (lambda b: {"diffusion_model." + n: s for n, s in native_linears(b).items()},
                    "lora_A.weight", "lora_B.weight", False, "native"),
    "comfy-fused-kohya": (lambda b: {"diffusion_model." + n: s for n, s in native_linears(b).items()},
                          "lora_down.weight", "lora_up.weight", True, "native"),
    "lora-dot-fused": (lambda b: {"diffusion_model." + n: s for n, s in native_linears(b).items()},
                       "lora.down.weight", "lora.up.weight", True, "native"),
    "bare-fused": (lambda b: dict(native_linears(b)), "lora_A.weight", "lora_B.weight", False, "native"),
    "kohya-fused": (lambda b: {"lora_unet_" + n.replace(".", "_"): s for n, s in native_linears(b).items()},
                    "lora_down.weight", "lora_up.weight", True, "kohya"),
}


@pytest.mark.parametrize("base", ARCHS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_full_coverage_maps_to_the_base(tmp_path, base, layout):
    names, down, up, alpha, dialect = LAYOUTS[layout]
    path = write(tmp_path / f"{base}_{layout}.safetensors", names(base), down, up, alpha)
    detection = lora_compat.detect(path)
    assert (detection.dialect.id, detection.base, detection.variant) == (dialect, base, None)
    assert detection.patchset.unmatched == {}
    assert sorted(detection.patchset.patches) == sorted(f"transformer.{p}" for p in linears(base))


@pytest.mark.parametrize("base", ARCHS)
def test_fused_qkv_splits_at_the_model_rows(base):
    """``attention.qkv`` is cut where the model's q, k and v end: thirds in Z-Image, 2304/768/768 in Lumina 2."""
    rows = {"z-image": (3840, 3840, 3840), "lumina2": (2304, 768, 768)}[base]
    width = rows[0]
    shapes = {"diffusion_model.layers.7.attention.qkv.lora_A.weight": (4, width),
              "diffusion_model.layers.7.attention.qkv.lora_B.weight": (sum(rows), 4)}
    result = lora_compat.detect(header_file(shapes))
    assert (result.base, result.patchset.unmatched) == (base, {})
    attention = "attention" if base == "z-image" else "attn"
    for proj, count in zip(("to_q", "to_k", "to_v"), rows):
        assert result.patchset.patches[f"transformer.layers.7.{attention}.{proj}"].out_rows() == count


@pytest.mark.parametrize("base", ARCHS)
def test_partial_files_map(tmp_path, base):
    """Some blocks, and only q and v of them (split names), plus one fused qkv and an out: nothing unmatched."""
    attention = "attention" if base == "z-image" else "attn"
    split = {p: s for p, s in linears(base).items()
             if p.startswith(("layers.3.", "context_refiner.1.")) and p.endswith(("to_q", "to_v"))}
    names = {f"diffusion_model.{p}": s for p, s in split.items()}
    fused = native_linears(base)
    names.update({f"diffusion_model.{n}": fused[n] for n in ("layers.11.attention.qkv", "noise_refiner.0.attention.out")})
    detection = lora_compat.detect(write(tmp_path / "partial.safetensors", names, "lora_A.weight", "lora_B.weight"))
    assert (detection.base, detection.patchset.unmatched) == (base, {})
    assert sorted(detection.patchset.patches) == sorted(
        [f"transformer.{p}" for p in split] + [f"transformer.layers.11.{attention}.{x}" for x in ("to_q", "to_k", "to_v")]
        + [f"transformer.noise_refiner.0.{attention}.to_out.0"])


def test_the_corpus_checkpoint_names_map_to_z_image():
    """A LoRA on every Linear module of the corpus' ComfyUI Z-Image checkpoint (native names): all map, and the
    checkpoint itself stays refused as a model file."""
    keys = load("invokeai_z_image_transformer_comfyui_keys.json")["keys"]
    shapes: dict[str, tuple[int, ...]] = {}
    for key, shape in keys.items():
        if key.endswith(".weight") and len(shape) == 2:
            module = "diffusion_model." + key.removesuffix(".weight")
            shapes.update({f"{module}.lora_down.weight": (4, shape[1]), f"{module}.lora_up.weight": (shape[0], 4),
                           f"{module}.alpha": ()})
    result = lora_compat.inspect(header_file(shapes))
    assert (result.dialect, result.base, result.unmatched) == ("native", "z-image", [])
    # layers.0 and noise_refiner.0: q, k, v, out, w1-w3, adaLN (8 each); context_refiner.0 has no adaLN (7);
    # x_embedder, cap_embedder.1, t_embedder.mlp.0/2, final_layer.linear/adaLN_modulation.1 (6)
    assert result.targets == 8 + 8 + 7 + 6
    with pytest.raises(lora_compat.NotALoraError, match="Z-Image"):
        lora_compat.inspect(header_file({k: tuple(v) for k, v in keys.items()}))


def _one_block(width: int, q: int, kv: int, modulation: str) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    for module, (rows, columns) in {"layers.0.attention.qkv": (q + 2 * kv, width),
                                    "layers.0.attention.out": (width, q),
                                    f"layers.0.{modulation}": (4 * width, 256 if width == 3840 else 1024)}.items():
        name = f"diffusion_model.{module}"
        shapes.update({f"{name}.lora_A.weight": (4, columns), f"{name}.lora_B.weight": (rows, 4)})
    return shapes


def test_z_image_and_lumina2_are_told_apart_by_width():
    z = lora_compat.inspect(header_file(_one_block(3840, 3840, 3840, "adaLN_modulation.0")))
    lumina = lora_compat.inspect(header_file(_one_block(2304, 2304, 768, "adaLN_modulation.1")))
    assert (z.base, z.unmatched) == ("z-image", [])
    assert (lumina.base, lumina.unmatched) == ("lumina2", [])


def test_an_unknown_width_is_neither():
    """Both families have these names (qkv, out, feed_forward): at another width neither is the base. The fused
    qkv's 3:1 rows are Z-Image's proportion, not Lumina 2's GQA 5:3, so only Z-Image stays a candidate."""
    shapes = {}
    for module, (rows, columns) in {"layers.0.attention.qkv": (3072, 1024), "layers.0.attention.out": (1024, 1024),
                                    "layers.0.feed_forward.w2": (1024, 2048)}.items():
        shapes.update({f"diffusion_model.{module}.lora_A.weight": (4, columns),
                       f"diffusion_model.{module}.lora_B.weight": (rows, 4)})
    result = lora_compat.inspect(header_file(shapes))
    assert result.base is None
    assert result.base_candidates == ["z-image"]


def test_metadata_names_lumina2_where_shapes_cannot():
    shapes = {"diffusion_model.layers.0.attention.out.lora_A.weight": (4, 1024),
              "diffusion_model.layers.0.attention.out.lora_B.weight": (1024, 4)}
    result = lora_compat.inspect(header_file(shapes, {"ss_base_model_version": "lumina2"}))
    assert result.base == "lumina2"


def test_text_encoder_keys_apply_to_the_encoder():
    """sd-scripts' Lumina 2 text-encoder names (Gemma 2 under ``lora_te_``) map to the text_encoder component."""
    shapes = {}
    for module, (rows, columns) in {"lora_unet_layers_0_attention_qkv": (3840, 2304),
                                    "lora_te_layers_0_self_attn_q_proj": (2048, 2304),
                                    "lora_te_layers_25_mlp_down_proj": (2304, 9216)}.items():
        shapes.update({f"{module}.lora_down.weight": (4, columns), f"{module}.lora_up.weight": (rows, 4),
                       f"{module}.alpha": ()})
    result = lora_compat.inspect(header_file(shapes))
    assert (result.base, result.unmatched) == ("lumina2", [])
    assert result.components == {"transformer": 3, "text_encoder": 2}


def test_flux1_bfl_files_stay_flux1():
    shapes = {"diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight": (4, 3072),
              "diffusion_model.double_blocks.0.img_attn.qkv.lora_B.weight": (9216, 4),
              "diffusion_model.final_layer.linear.lora_A.weight": (4, 3072),
              "diffusion_model.final_layer.linear.lora_B.weight": (64, 4)}
    result = lora_compat.inspect(header_file(shapes))
    assert (result.dialect, result.base, result.unmatched) == ("bfl", "flux1", [])


@pytest.mark.parametrize("base, encoder, width", [("z-image", "qwen3_4b", 2560), ("lumina2", "gemma2_2b", 2304)])
def test_comfyui_text_encoder_names_map(base, encoder, width):
    """ComfyUI's generic text-encoder LoRA names (``text_encoders.`` + the clip state-dict key) beside native
    transformer keys: the text encoder's modules under their transformers paths."""
    rows = {"z-image": 11520, "lumina2": 3840}[base]
    shapes = {}
    for module, (out, columns) in {"diffusion_model.layers.0.attention.qkv": (rows, rows // 3 if base == "z-image"
                                                                            else width),
                                   f"text_encoders.{encoder}.transformer.model.layers.1.mlp.up_proj":
                                       (linears(base, "text_encoder")["layers.1.mlp.up_proj"][0], width)}.items():
        shapes.update({f"{module}.lora_A.weight": (4, columns), f"{module}.lora_B.weight": (out, 4)})
    result = lora_compat.inspect(header_file(shapes))
    assert (result.dialect, result.base, result.unmatched) == ("native", base, [])
    assert result.components == {"transformer": 3, "text_encoder": 1}


@pytest.mark.parametrize("name, base", [("derived_z_image_native_fused_lora_full.json", "z-image"),
                                        ("derived_lumina2_native_fused_lora_full.json", "lumina2")])
def test_corpus_derived_native_layouts(name, base):
    """The corpus' derived full-coverage native files (fused qkv, lora_down/up + alpha): the right base from the
    header, every key mapped; on the family's own model built on meta (real modules, a split host), every target
    has the shape the file implies."""
    from lora_compat import corpus as bundled
    from lora_compat.archs import ModuleIndex
    from lora_compat.models import resolve_patchset

    from corpus import header_only_file, meta_components

    data = bundled.load(name)
    result = lora_compat.inspect(header_only_file(name))
    assert (result.dialect, result.base, result.variant, result.unmatched) == ("native", base, None, [])
    assert result.targets == data["num_modules"] == LINEAR_MODULES[base]
    patchset = resolve_patchset(header_only_file(name), ModuleIndex.from_modules(meta_components(name)))
    assert (patchset.unmatched, patchset.misfits, len(patchset)) == ({}, {}, LINEAR_MODULES[base])
