"""Full-size FLUX.2 mapping on the shipped tables (header only): derived full-coverage key lists (every Linear module
of each variant, rank 1) in each layout map to base ``flux2`` and the right variant with nothing unmatched; the
tables agree with diffusers' class on ``meta``; FLUX.1 and FLUX.2 files are never taken for each other."""
from __future__ import annotations

import pytest

import lora_compat
from lora_compat.archs.flux2 import FLUX2
from lora_compat.files import Header, LoraFile

#: Linear modules per variant (families.md appendix A, counted on ``meta``)
LINEAR_MODULES = {"flux2-dev": 203, "flux2-klein-4b": 109, "flux2-klein-9b": 153}
VARIANTS = tuple(LINEAR_MODULES)

#: diffusers module of ``transformer_blocks.N`` → (BFL module of ``double_blocks.N``, its part number in the
#: fused module); written from diffusers' ``convert_flux2_transformer_checkpoint_to_diffusers``
DOUBLE = {"attn.to_q": ("img_attn.qkv", 0), "attn.to_k": ("img_attn.qkv", 1), "attn.to_v": ("img_attn.qkv", 2),
          "attn.add_q_proj": ("txt_attn.qkv", 0), "attn.add_k_proj": ("txt_attn.qkv", 1),
          "attn.add_v_proj": ("txt_attn.qkv", 2), "attn.to_out.0": ("img_attn.proj", 0),
          "attn.to_add_out": ("txt_attn.proj", 0), "ff.linear_in": ("img_mlp.0", 0), "ff.linear_out": ("img_mlp.2", 0),
          "ff_context.linear_in": ("txt_mlp.0", 0), "ff_context.linear_out": ("txt_mlp.2", 0)}
SINGLE = {"attn.to_qkv_mlp_proj": "linear1", "attn.to_out": "linear2"}
TOP = {"x_embedder": "img_in", "context_embedder": "txt_in",
       "time_guidance_embed.timestep_embedder.linear_1": "time_in.in_layer",
       "time_guidance_embed.timestep_embedder.linear_2": "time_in.out_layer",
       "time_guidance_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
       "time_guidance_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
       "double_stream_modulation_img.linear": "double_stream_modulation_img.lin",
       "double_stream_modulation_txt.linear": "double_stream_modulation_txt.lin",
       "single_stream_modulation.linear": "single_stream_modulation.lin",
       "proj_out": "final_layer.linear", "norm_out.linear": "final_layer.adaLN_modulation.1"}


def bfl_name(path: str) -> str:
    """The BFL module a diffusers module lives in."""
    if path in TOP:
        return TOP[path]
    kind, block, rest = path.split(".", 2)
    if kind == "transformer_blocks":
        return f"double_blocks.{block}.{DOUBLE[rest][0]}"
    return f"single_blocks.{block}.{SINGLE[rest]}"


def index_of(variant: str):
    return FLUX2.index if variant == "flux2-dev" else FLUX2.variant_index(variant)


def linears(variant: str, component: str = "transformer") -> dict[str, tuple[int, int]]:
    modules = index_of(variant).components[component]
    return {p: shapes["weight"] for p, shapes in modules.items() if len(shapes.get("weight", ())) == 2}


def bfl_modules(variant: str) -> dict[str, tuple[int, int]]:
    """BFL module → (rows, columns): the fused modules' rows are the sum of their parts'."""
    modules: dict[str, tuple[int, int]] = {}
    for path, (out, inp) in linears(variant).items():
        name = bfl_name(path)
        modules[name] = (modules.get(name, (0, inp))[0] + out, inp)
    return modules


def header_file(modules: dict[str, tuple[int, int]], down: str, up: str, alpha: bool = False,
                metadata: dict[str, str] | None = None) -> LoraFile:
    """A rank-1 LoRA known by its header alone (no tensor is read)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for name, (out, inp) in modules.items():
        shapes[f"{name}.{down}"] = (1, inp)
        shapes[f"{name}.{up}"] = (out, 1)
        if alpha:
            shapes[f"{name}.alpha"] = ()
    return LoraFile(Header(shapes, {k: "F16" for k in shapes}, metadata or {}),
                    lambda k: (_ for _ in ()).throw(AssertionError(k)), "memory")


def lokr_file(modules: dict[str, tuple[int, int]]) -> LoraFile:
    """A LoKr (full ``w1``, low-rank ``w2``) on each module: w1 (4, 4) ⊗ (w2_a w2_b) (out/4, in/4)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for name, (out, inp) in modules.items():
        shapes.update({f"{name}.lokr_w1": (4, 4), f"{name}.lokr_w2_a": (out // 4, 2),
                       f"{name}.lokr_w2_b": (2, inp // 4), f"{name}.alpha": ()})
    return LoraFile(Header(shapes, {k: "F16" for k in shapes}, {}),
                    lambda k: (_ for _ in ()).throw(AssertionError(k)), "memory")


def test_tables_have_every_linear_of_each_variant():
    for variant, count in LINEAR_MODULES.items():
        assert len(linears(variant)) == count
    dev, klein4, klein9 = (linears(v) for v in VARIANTS)
    assert dev["single_transformer_blocks.47.attn.to_qkv_mlp_proj"] == (3 * 6144 + 2 * 18432, 6144)
    assert klein4["single_transformer_blocks.19.attn.to_qkv_mlp_proj"] == (3 * 3072 + 2 * 9216, 3072)
    assert klein9["transformer_blocks.7.ff.linear_in"] == (2 * 12288, 4096)
    assert klein4["context_embedder"] == (3072, 7680) and "time_guidance_embed.guidance_embedder.linear_1" not in klein4
    assert dev["norm_out.linear"] == (2 * 6144, 6144)


def test_text_encoders_are_the_variants_own():
    dev = FLUX2.index.components["text_encoder"]
    assert dev["model.language_model.layers.39.self_attn.q_proj"]["weight"] == (4096, 5120)
    assert dev["model.language_model.layers.0.mlp.gate_proj"]["weight"] == (32768, 5120)
    klein4 = FLUX2.variant_index("flux2-klein-4b").components["text_encoder"]
    assert klein4["model.layers.35.self_attn.k_proj"]["weight"] == (1024, 2560)
    klein9 = FLUX2.variant_index("flux2-klein-9b").components["text_encoder"]
    assert klein9["model.layers.0.mlp.up_proj"]["weight"] == (12288, 4096)


def test_tables_agree_with_diffusers_on_meta():
    pytest.importorskip("diffusers")
    from lora_compat.archs.generate_tables import table_for

    for name in ("flux2", *FLUX2.variant_tables):
        generated = table_for(name)["components"]
        shipped = (FLUX2.index if name == "flux2" else FLUX2.variant_index(name)).components
        assert {c: {m: {p: tuple(s) for p, s in params.items()} for m, params in mods.items()}
                for c, mods in generated.items()} == shipped


#: layout → (module name of a diffusers path, down suffix, up suffix, alpha, the dialect that reads it)
LAYOUTS = {
    "diffusers": (lambda p: f"transformer.{p}", "lora_A.weight", "lora_B.weight", False, "diffusers"),
    "peft": (lambda p: f"base_model.model.{p}", "lora_A.weight", "lora_B.weight", False, "diffusers"),
    # diffusers' block names under diffusion_model. (its converter takes them), also as the "sformer_blocks" alias
    "expanded": (lambda p: f"diffusion_model.{p}", "lora_A.weight", "lora_B.weight", False, "bfl"),
    "sformer": (lambda p: "diffusion_model." + (p.replace("transformer_blocks.", "sformer_blocks.", 1)
                                                if p.startswith("transformer_blocks.") else p),
                "lora_A.weight", "lora_B.weight", False, "bfl"),
}
#: BFL layouts: (module name of a BFL name, down, up, alpha, dialect)
BFL_LAYOUTS = {
    "ai-toolkit": (lambda b: f"diffusion_model.{b}", "lora_A.weight", "lora_B.weight", False, "bfl"),
    "comfy-kohya": (lambda b: f"diffusion_model.{b}", "lora_down.weight", "lora_up.weight", True, "bfl"),
    "bare-bfl": (lambda b: b, "lora_A.weight", "lora_B.weight", False, "bfl"),
    "peft-bfl": (lambda b: f"base_model.model.{b}", "lora_A.weight", "lora_B.weight", False, "bfl"),
    "comfy-dot": (lambda b: f"diffusion_model.{b}", "lora.down.weight", "lora.up.weight", False, "bfl"),
    "kohya": (lambda b: "lora_unet_" + b.replace(".", "_"), "lora_down.weight", "lora_up.weight", True, "kohya"),
}


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_full_coverage_diffusers_names(variant, layout):
    name, down, up, alpha, dialect = LAYOUTS[layout]
    modules = linears(variant)
    result = lora_compat.inspect(header_file({name(p): s for p, s in modules.items()}, down, up, alpha))
    assert (result.dialect, result.base, result.variant, result.unmatched) == (dialect, "flux2", variant, [])
    assert result.targets == LINEAR_MODULES[variant]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("layout", BFL_LAYOUTS)
def test_full_coverage_bfl_names(variant, layout):
    name, down, up, alpha, dialect = BFL_LAYOUTS[layout]
    result = lora_compat.inspect(header_file({name(b): s for b, s in bfl_modules(variant).items()}, down, up, alpha))
    assert (result.dialect, result.base, result.variant, result.unmatched) == (dialect, "flux2", variant, [])
    assert result.targets == LINEAR_MODULES[variant]  # qkv split into to_q/k/v, the rest one-to-one


@pytest.mark.parametrize("variant", VARIANTS)
def test_full_coverage_bfl_names_map_each_part(variant):
    patchset = lora_compat.read(header_file({f"diffusion_model.{b}": s for b, s in bfl_modules(variant).items()},
                                            "lora_A.weight", "lora_B.weight"))
    assert sorted(patchset.patches) == sorted(f"transformer.{p}" for p in linears(variant))


def test_musubi_mixed_names():
    """musubi-tuner's ``diffusion_model.double_blocks.0.img_attn_qkv`` (dots for the block, ``_`` inside: #905)."""
    modules = {b: s for b, s in bfl_modules("flux2-klein-9b").items()
               if b.startswith(("double_blocks.", "single_blocks."))}
    mixed = {f"diffusion_model.{b.split('.', 2)[0]}.{b.split('.', 2)[1]}.{b.split('.', 2)[2].replace('.', '_')}": s
             for b, s in modules.items()}
    assert "diffusion_model.double_blocks.0.img_attn_qkv" in mixed
    result = lora_compat.inspect(header_file(mixed, "lora_down.weight", "lora_up.weight", True))
    assert (result.dialect, result.base, result.variant, result.unmatched) == ("bfl", "flux2", "flux2-klein-9b", [])
    assert result.targets == 153 - 9  # every block module (Klein has 9 top-level Linear modules)


@pytest.mark.parametrize("variant", VARIANTS)
def test_lokr_on_bfl_names(variant):
    result = lora_compat.inspect(lokr_file({f"diffusion_model.{b}": s for b, s in bfl_modules(variant).items()}))
    assert (result.dialect, result.base, result.variant, result.unmatched) == ("bfl", "flux2", variant, [])


@pytest.mark.parametrize("variant", VARIANTS)
def test_lokr_on_lycoris_names(variant):
    """SimpleTuner's LyCORIS: ``lycoris_`` + the diffusers path flattened."""
    result = lora_compat.inspect(lokr_file({"lycoris_" + p.replace(".", "_"): s for p, s in linears(variant).items()}))
    assert (result.dialect, result.base, result.variant, result.unmatched) == ("lycoris", "flux2", variant, [])
    assert result.targets == LINEAR_MODULES[variant]


@pytest.mark.parametrize("variant", VARIANTS)
def test_lokr_on_bare_diffusers_names(variant):
    """SimpleTuner / bare diffusers LoKr (``transformer_blocks.0.attn.to_q.lokr_w1``)."""
    result = lora_compat.inspect(lokr_file(linears(variant)))
    assert (result.dialect, result.base, result.variant, result.unmatched) == ("diffusers", "flux2", variant, [])
    assert result.targets == LINEAR_MODULES[variant]


def test_partial_qkv_and_blocks():
    """Only q and v of two double blocks, k of another, and one single block's linear2: partial files are normal."""
    modules = {p: s for p, s in linears("flux2-klein-4b").items()
               if p.startswith(("transformer_blocks.1.attn.to_q", "transformer_blocks.1.attn.to_v",
                                "transformer_blocks.3.attn.to_k", "single_transformer_blocks.19.attn.to_out"))}
    result = lora_compat.inspect(header_file({f"transformer.{p}": s for p, s in modules.items()},
                                             "lora_A.weight", "lora_B.weight"))
    # attention only: FLUX.1 has these names and shapes too, but no 3072 x 12288 single-block linear2
    assert (result.base, result.variant, result.unmatched, result.targets) == ("flux2", "flux2-klein-4b", [], 4)


@pytest.mark.parametrize("variant, te_paths", [
    ("flux2-dev", ("model.language_model.layers.0.self_attn.q_proj", "model.language_model.layers.39.mlp.down_proj")),
    ("flux2-klein-4b", ("model.layers.0.self_attn.q_proj", "model.layers.35.mlp.down_proj")),
    ("flux2-klein-9b", ("model.layers.0.self_attn.v_proj", "model.layers.35.mlp.gate_proj")),
])
def test_text_encoder_keys_map(variant, te_paths):
    te = index_of(variant).components["text_encoder"]
    modules = {"lora_unet_" + b.replace(".", "_"): s for b, s in bfl_modules(variant).items()
               if b.startswith("double_blocks.0.")}
    modules.update({"lora_te_" + p.replace(".", "_"): te[p]["weight"] for p in te_paths})
    result = lora_compat.inspect(header_file(modules, "lora_down.weight", "lora_up.weight", True))
    assert (result.dialect, result.base, result.variant, result.unmatched) == ("kohya", "flux2", variant, [])
    assert result.components == {"transformer": 12, "text_encoder": 2}  # targets: each qkv split in three


# -- FLUX.1 and FLUX.2 are never taken for each other ------------------------------------------------------------
def test_klein_4b_attention_only_gets_no_confident_base():
    """Klein 4B has FLUX.1's width: double-block q/k/v/proj of its blocks 0-4 are FLUX.1 names and shapes too."""
    modules = {f"diffusion_model.double_blocks.{n}.{s}_attn.{m}": (9216 if m == "qkv" else 3072, 3072)
               for n in range(5) for s in ("img", "txt") for m in ("qkv", "proj")}
    result = lora_compat.inspect(header_file(modules, "lora_A.weight", "lora_B.weight"))
    assert (result.base, result.base_candidates, result.variant) == (None, ["flux1", "flux2"], None)
    assert result.base_reason == "shapes fit flux1, flux2 equally"


@pytest.mark.parametrize("metadata, base", [({"ss_base_model_version": "flux2_klein_4b"}, "flux2"),
                                            ({"modelspec.architecture": "flux-2-klein-4b/lora"}, "flux2"),
                                            ({"ss_base_model_version": "flux1"}, "flux1")])
def test_metadata_decides_an_attention_only_file(metadata, base):
    modules = {"double_blocks.2.img_attn.qkv": (9216, 3072), "double_blocks.2.img_attn.proj": (3072, 3072)}
    result = lora_compat.inspect(header_file({f"diffusion_model.{b}": s for b, s in modules.items()},
                                             "lora_A.weight", "lora_B.weight", metadata=metadata))
    assert (result.base, result.unmatched) == (base, [])


def test_flux1_files_stay_flux1():
    """FLUX.1's own modules (per-block img_mod, 12288-row GELU mlp, 21504-row linear1) fit only FLUX.1."""
    modules = {"double_blocks.0.img_attn.qkv": (9216, 3072), "double_blocks.0.img_mod.lin": (18432, 3072),
               "double_blocks.0.img_mlp.0": (12288, 3072), "single_blocks.0.linear1": (21504, 3072)}
    result = lora_compat.inspect(header_file({f"lora_unet_{b.replace('.', '_')}": s for b, s in modules.items()},
                                             "lora_down.weight", "lora_up.weight", True))
    assert (result.base, result.variant, result.unmatched) == ("flux1", None, [])


def test_flux2_klein_4b_mlp_is_not_flux1():
    """Klein 4B's SwiGLU mlp (2 x 9216 rows) and linear1 (27648 rows) at FLUX.1's width fit FLUX.2 only."""
    modules = {"double_blocks.0.img_attn.qkv": (9216, 3072), "double_blocks.0.img_mlp.0": (18432, 3072),
               "single_blocks.0.linear1": (27648, 3072)}
    result = lora_compat.inspect(header_file({f"diffusion_model.{b}": s for b, s in modules.items()},
                                             "lora_A.weight", "lora_B.weight"))
    assert (result.base, result.variant, result.unmatched) == ("flux2", "flux2-klein-4b", [])


@pytest.mark.parametrize("mlp, linear1, linear2, family", [(4, 7, 5, "flux1"), (6, 9, 4, "flux2")])
def test_names_alone_decide_by_proportions(mlp, linear1, linear2, family):
    """A LoRA of a tiny model (width 80: no full-size shapes) with names both families have: the module shapes in a
    family's proportions (FLUX.1: 4x GELU mlp, 7x ``linear1``; FLUX.2: 6x SwiGLU mlp, 9x ``linear1``) leave that
    family the only candidate, whose names it is then read by."""
    width = 80
    modules = {"double_blocks.0.img_attn.qkv": (3 * width, width), "double_blocks.0.img_mlp.0": (mlp * width, width),
               "single_blocks.0.linear1": (linear1 * width, width), "single_blocks.0.linear2": (width, linear2 * width)}
    result = lora_compat.inspect(header_file({f"diffusion_model.{b}": s for b, s in modules.items()},
                                             "lora_A.weight", "lora_B.weight"))
    assert (result.base, result.base_candidates, result.unmatched) == (None, [family], [])


def test_names_alone_in_both_proportions_keep_both_candidates():
    modules = {"double_blocks.0.img_attn.qkv": (240, 80), "double_blocks.0.img_attn.proj": (80, 80)}
    result = lora_compat.inspect(header_file({f"diffusion_model.{b}": s for b, s in modules.items()},
                                             "lora_A.weight", "lora_B.weight"))
    assert (result.base, result.base_candidates) == (None, ["flux1", "flux2"])
