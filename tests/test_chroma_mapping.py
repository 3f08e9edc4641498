"""Full-size Chroma mapping on the shipped table: derived full-coverage key lists (every Linear module, rank 1) in
each layout map to base ``chroma`` with nothing unmatched; plain FLUX.1 files stay ``flux1``; FLUX.1 modulation
keys are unmatched on Chroma; the table agrees with diffusers' class on ``meta``."""
from __future__ import annotations

import pytest

import lora_compat
from lora_compat.archs.chroma import CHROMA
from family_tests import header_file, lora

#: Linear modules of Chroma1 (families.md appendix A, counted on ``meta``)
LINEAR_MODULES = 433
WIDTH, MLP = 3072, 12288
#: BFL module in double_blocks.N → the diffusers modules it stacks by rows (diffusers' chroma single-file converter
#: read backwards)
DOUBLE = {"img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
          "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
          "img_attn.proj": ("attn.to_out.0",), "txt_attn.proj": ("attn.to_add_out",),
          "img_mlp.0": ("ff.net.0.proj",), "img_mlp.2": ("ff.net.2",),
          "txt_mlp.0": ("ff_context.net.0.proj",), "txt_mlp.2": ("ff_context.net.2",)}
SINGLE = {"linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"), "linear2": ("proj_out",)}
TOP = {"img_in": "x_embedder", "txt_in": "context_embedder", "final_layer.linear": "proj_out",
       "distilled_guidance_layer.in_proj": "distilled_guidance_layer.in_proj",
       "distilled_guidance_layer.out_proj": "distilled_guidance_layer.out_proj",
       **{f"distilled_guidance_layer.layers.{n}.{bfl}": f"distilled_guidance_layer.layers.{n}.{d}"
          for n in range(5) for bfl, d in (("in_layer", "linear_1"), ("out_layer", "linear_2"))}}


def bfl_modules() -> dict[str, tuple[tuple[int, int], tuple[str, ...]]]:
    """BFL name → ((rows, columns), the diffusers modules it covers)."""
    linears = _linears()
    found: dict[str, tuple[tuple[int, int], tuple[str, ...]]] = {}
    for bfl, path in TOP.items():
        found[bfl] = (linears[path], (path,))
    for n in range(19):
        for bfl, parts in DOUBLE.items():
            paths = tuple(f"transformer_blocks.{n}.{p}" for p in parts)
            found[f"double_blocks.{n}.{bfl}"] = ((sum(linears[p][0] for p in paths), linears[paths[0]][1]), paths)
    for n in range(38):
        for bfl, parts in SINGLE.items():
            paths = tuple(f"single_transformer_blocks.{n}.{p}" for p in parts)
            found[f"single_blocks.{n}.{bfl}"] = ((sum(linears[p][0] for p in paths), linears[paths[0]][1]), paths)
    return found


def _linears() -> dict[str, tuple[int, int]]:
    modules = CHROMA.index.components["transformer"]
    return {p: shapes["weight"] for p, shapes in modules.items() if len(shapes.get("weight", ())) == 2}


def test_table_has_every_linear_of_chroma1():
    linears = _linears()
    assert len(linears) == LINEAR_MODULES
    assert linears["distilled_guidance_layer.in_proj"] == (5120, 64)
    assert linears["distilled_guidance_layer.layers.4.linear_2"] == (5120, 5120)
    assert linears["single_transformer_blocks.37.proj_out"] == (WIDTH, WIDTH + MLP)
    assert not any(p.endswith(("norm1.linear", "norm1_context.linear", "norm.linear")) for p in linears)
    assert CHROMA.index.components["text_encoder"]["encoder.block.23.layer.1.DenseReluDense.wi_0"]["weight"] \
        == (10240, 4096)


def test_table_agrees_with_diffusers_on_meta():
    pytest.importorskip("diffusers")
    from lora_compat.archs.generate_tables import table_for

    generated = table_for("chroma")["components"]
    for component, shipped in CHROMA.index.components.items():
        assert {m: {p: tuple(s) for p, s in params.items()} for m, params in generated[component].items()} == shipped


LAYOUTS = {
    "diffusers": ("diffusers", lambda: {f"transformer.{p}": s for p, s in _linears().items()}, False, False),
    "peft": ("diffusers", lambda: {f"base_model.model.{p}": s for p, s in _linears().items()}, False, False),
    "onetrainer": ("onetrainer", lambda: {"lora_transformer_" + p.replace(".", "_"): s
                                          for p, s in _linears().items()}, True, True),
    "ai-toolkit": ("bfl", lambda: {f"diffusion_model.{b}": s for b, (s, _) in bfl_modules().items()}, False, False),
    "comfy": ("bfl", lambda: {f"diffusion_model.{b}": s for b, (s, _) in bfl_modules().items()}, True, True),
    "kohya": ("kohya", lambda: {"lora_unet_" + b.replace(".", "_"): s for b, (s, _) in bfl_modules().items()},
              True, True),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_full_coverage_maps_to_chroma(layout):
    dialect, names, kohya, alpha = LAYOUTS[layout]
    suffixes = ("lora_down.weight", "lora_up.weight") if kohya else ("lora_A.weight", "lora_B.weight")
    result = lora_compat.inspect(header_file(lora(names(), *suffixes, alpha=alpha)))
    assert (result.dialect, result.base, result.variant, result.unmatched) == (dialect, "chroma", None, [])
    detection = lora_compat.detect(header_file(lora(names(), *suffixes, alpha=alpha)))
    assert sorted(detection.patchset.patches) == sorted(f"transformer.{p}" for p in _linears())


def _blocks_only(layout: str) -> dict[str, tuple[int, ...]]:
    """The FLUX.1 blocks Chroma shares (no approximator, no embedders), in BFL or diffusers names."""
    if layout == "bfl":
        return lora({f"diffusion_model.{b}": s for b, (s, _) in bfl_modules().items() if "blocks." in b})
    return lora({f"transformer.{p}": s for p, s in _linears().items() if "blocks." in p})


@pytest.mark.parametrize("layout", ["bfl", "diffusers"])
def test_a_file_of_shared_modules_stays_flux1(layout):
    """Chroma derives from FLUX.1: a file whose modules both have, with no metadata, keeps flux1."""
    result = lora_compat.inspect(header_file(_blocks_only(layout)))
    assert (result.base, result.base_candidates, result.unmatched) == ("flux1", ["flux1"], [])


@pytest.mark.parametrize("metadata", [{"ss_base_model_version": "chroma"},
                                      {"modelspec.architecture": "chroma-1/lora"}])
def test_metadata_naming_chroma_decides(metadata):
    result = lora_compat.inspect(header_file(_blocks_only("bfl"), metadata))
    assert (result.base, result.unmatched) == ("chroma", [])
    assert result.base_reason == "shapes fit several bases; metadata names this one"


def test_one_approximator_module_decides():
    shapes = _blocks_only("bfl")
    shapes.update(lora({"diffusion_model.distilled_guidance_layer.layers.2.out_layer": (5120, 5120)}))
    result = lora_compat.inspect(header_file(shapes))
    assert (result.base, result.base_candidates, result.unmatched) == ("chroma", ["chroma"], [])


def test_flux1_modulation_keys_are_unmatched_on_chroma():
    modulation = {"double_blocks.0.img_mod.lin": (6 * WIDTH, WIDTH), "single_blocks.3.modulation.lin":
                  (3 * WIDTH, WIDTH), "final_layer.adaLN_modulation.1": (2 * WIDTH, WIDTH)}
    shapes = {**_blocks_only("bfl"), **lora({f"diffusion_model.{m}": s for m, s in modulation.items()})}
    assert lora_compat.inspect(header_file(shapes)).base == "flux1"  # FLUX.1 has them: it fits better
    result = lora_compat.inspect(header_file(shapes), base="chroma")
    assert result.base == "chroma"
    assert result.unmatched == sorted(f"diffusion_model.{m}.{s}" for m in modulation
                                      for s in ("lora_A.weight", "lora_B.weight"))
    assert result.targets == len(_linears()) - len(TOP)


def test_t5_keys_map_to_chromas_text_encoder():
    """sd-scripts' lora_te3_ (T5): Chroma's T5 is its ``text_encoder``; the file is Chroma's by its metadata."""
    t5 = {"lora_te3_encoder_block_0_layer_0_SelfAttention_q": (4096, 4096),
          "lora_te3_encoder_block_23_layer_1_DenseReluDense_wo": (4096, 10240)}
    shapes = {**lora({"lora_unet_double_blocks_0_img_attn_qkv": (3 * WIDTH, WIDTH)}, "lora_down.weight",
                     "lora_up.weight", alpha=True), **lora(t5, "lora_down.weight", "lora_up.weight", alpha=True)}
    result = lora_compat.inspect(header_file(shapes, {"ss_base_model_version": "chroma"}))
    assert (result.dialect, result.base, result.unmatched) == ("kohya", "chroma", [])
    assert result.components == {"transformer": 3, "text_encoder": 2}
    assert lora_compat.inspect(header_file(shapes)).base == "flux1"


def test_comfy_t5_names_map_to_chromas_text_encoder():
    shapes = {**_blocks_only("bfl"),
              **lora({"text_encoders.t5xxl.transformer.encoder.block.0.layer.0.SelfAttention.k": (4096, 4096)}),
              **lora({"diffusion_model.distilled_guidance_layer.in_proj": (5120, 64)})}
    result = lora_compat.inspect(header_file(shapes))
    assert (result.base, result.unmatched) == ("chroma", [])
    assert result.components["text_encoder"] == 1
