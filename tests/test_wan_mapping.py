"""Full-size Wan mapping on the shipped table: derived full-coverage key lists (every Linear module, rank 1) in
each layout map to base ``wan`` with nothing unmatched; the table agrees with diffusers' class on ``meta``."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import lora_compat
from lora_compat.archs.wan import WAN

#: Linear modules of Wan 2.1 I2V-14B (families.md appendix A, counted on ``meta``): T2V-14B's 406 plus the image
#: cross-attention (2 per block) and the image embedder's two Linear layers
LINEAR_MODULES = 488
#: diffusers name → native name (diffusers' ``_convert_non_diffusers_wan_lora_to_diffusers`` read backwards)
BLOCK_NATIVE = {"attn1.to_q": "self_attn.q", "attn1.to_k": "self_attn.k", "attn1.to_v": "self_attn.v",
                "attn1.to_out.0": "self_attn.o", "attn2.to_q": "cross_attn.q", "attn2.to_k": "cross_attn.k",
                "attn2.to_v": "cross_attn.v", "attn2.to_out.0": "cross_attn.o",
                "attn2.add_k_proj": "cross_attn.k_img", "attn2.add_v_proj": "cross_attn.v_img",
                "ffn.net.0.proj": "ffn.0", "ffn.net.2": "ffn.2"}
TOP_NATIVE = {"condition_embedder.text_embedder.linear_1": "text_embedding.0",
              "condition_embedder.text_embedder.linear_2": "text_embedding.2",
              "condition_embedder.time_embedder.linear_1": "time_embedding.0",
              "condition_embedder.time_embedder.linear_2": "time_embedding.2",
              "condition_embedder.time_proj": "time_projection.1",
              "condition_embedder.image_embedder.ff.net.0.proj": "img_emb.proj.1",
              "condition_embedder.image_embedder.ff.net.2": "img_emb.proj.3", "proj_out": "head.head"}


def _native(path: str) -> str:
    if path in TOP_NATIVE:
        return TOP_NATIVE[path]
    _, block, rest = path.split(".", 2)
    return f"blocks.{block}.{BLOCK_NATIVE[rest]}"


def _linears() -> dict[str, tuple[int, int]]:
    modules = WAN.index.components["transformer"]
    return {p: shapes["weight"] for p, shapes in modules.items() if len(shapes.get("weight", ())) == 2}


def _file(path: Path, names: dict[str, tuple[int, int]], down: str, up: str, alpha: bool) -> Path:
    tensors = {}
    for name, (out, inp) in names.items():
        tensors[f"{name}.{down}"] = torch.zeros(1, inp, dtype=torch.float16)
        tensors[f"{name}.{up}"] = torch.zeros(out, 1, dtype=torch.float16)
        if alpha:
            tensors[f"{name}.alpha"] = torch.tensor(1.0)
    save_file(tensors, str(path))
    return path


def test_table_has_every_linear_of_i2v_14b():
    linears = _linears()
    assert len(linears) == LINEAR_MODULES
    assert linears["blocks.39.ffn.net.0.proj"] == (13824, 5120)
    assert linears["blocks.0.attn2.add_k_proj"] == (5120, 5120)
    assert WAN.index.components["transformer"]["patch_embedding"]["weight"] == (5120, 16, 1, 2, 2)  # T2V's


def test_table_agrees_with_diffusers_on_meta():
    pytest.importorskip("diffusers")
    from lora_compat.archs.generate_tables import table_for

    generated = table_for("wan")["components"]["transformer"]
    shipped = WAN.index.components["transformer"]
    assert {m: {p: tuple(s) for p, s in params.items()} for m, params in generated.items()} == shipped
    for variant in WAN.variant_tables:
        generated = table_for(variant)["components"]["transformer"]
        shipped = WAN.variant_index(variant).components["transformer"]
        assert {m: {p: tuple(s) for p, s in params.items()} for m, params in generated.items()} == shipped
    assert WAN.variant_index("wan21-t2v-1.3b").components["transformer"]["blocks.29.ffn.net.0.proj"]["weight"] \
        == (8960, 1536)


LAYOUTS = {
    "diffusers": (lambda p: f"transformer.{p}", "lora_A.weight", "lora_B.weight", False, "diffusers"),
    "peft": (lambda p: f"base_model.model.{p}", "lora_A.weight", "lora_B.weight", False, None),
    "comfy": (lambda p: f"diffusion_model.{_native(p)}", "lora_A.weight", "lora_B.weight", False, "native"),
    "comfy_kohya": (lambda p: f"diffusion_model.{_native(p)}", "lora_down.weight", "lora_up.weight", True, "native"),
    "comfy_dot": (lambda p: f"diffusion_model.{_native(p)}", "lora.down.weight", "lora.up.weight", False, "native"),
    "musubi": (lambda p: "lora_unet_" + _native(p).replace(".", "_"), "lora_down.weight", "lora_up.weight", True,
               "kohya"),
}


@pytest.mark.parametrize("layout", [k for k, v in LAYOUTS.items() if v[4] is not None])
def test_full_coverage_maps_to_wan(tmp_path, layout):
    name, down, up, alpha, dialect = LAYOUTS[layout]
    linears = _linears()
    path = _file(tmp_path / f"wan_{layout}.safetensors", {name(p): s for p, s in linears.items()}, down, up, alpha)
    detection = lora_compat.detect(path)
    assert (detection.dialect.id, detection.base) == (dialect, "wan")
    patchset = detection.patchset
    assert not patchset.unmatched
    assert sorted(patchset.patches) == sorted(f"transformer.{p}" for p in linears)


def test_t2v_subset_maps_to_wan(tmp_path):
    """A T2V LoRA (no image cross-attention), partial: some blocks, only q and v."""
    linears = {p: s for p, s in _linears().items() if p.startswith(("blocks.3.", "blocks.17."))
               and p.endswith(("to_q", "to_v"))}
    path = _file(tmp_path / "wan_partial.safetensors",
                 {"diffusion_model." + _native(p): s for p, s in linears.items()}, "lora_A.weight", "lora_B.weight",
                 False)
    detection = lora_compat.detect(path)
    assert detection.base == "wan" and not detection.patchset.unmatched
    assert len(detection.patchset.patches) == 8


def _header_file(shapes: dict[str, tuple[int, ...]]):
    """A LoRA known by its header alone (no tensor is read)."""
    from lora_compat.files import Header, LoraFile

    return LoraFile(Header(shapes, {k: "F16" for k in shapes}, {}),
                    lambda k: (_ for _ in ()).throw(AssertionError(k)), "memory")


def _native_header(dim: int, ffn: int, image: bool = False) -> dict[str, tuple[int, ...]]:
    modules = {"self_attn.q": (dim, dim), "cross_attn.o": (dim, dim), "ffn.0": (ffn, dim), "ffn.2": (dim, ffn)}
    if image:
        modules["cross_attn.k_img"] = (dim, dim)
    shapes: dict[str, tuple[int, ...]] = {}
    for block in (0, 7):
        for module, (out, inp) in modules.items():
            name = f"diffusion_model.blocks.{block}.{module}"
            shapes.update({f"{name}.lora_down.weight": (4, inp), f"{name}.lora_up.weight": (out, 4),
                           f"{name}.alpha": ()})
    return shapes


#: hidden width and FFN width per variant (families.md section 2.1), and the variant the shapes tell
@pytest.mark.parametrize("dim, ffn, image, variant", [
    (1536, 8960, False, "wan21-t2v-1.3b"),
    (3072, 14336, False, "wan22-ti2v-5b"),
    (5120, 13824, True, "wan21-i2v-14b"),
    (5120, 13824, False, None),  # Wan 2.1 T2V-14B and the Wan 2.2 A14B experts: the same shapes
])
def test_variant_from_shapes(dim, ffn, image, variant):
    result = lora_compat.inspect(_header_file(_native_header(dim, ffn, image)))
    assert (result.dialect, result.base, result.variant, result.unmatched) == ("native", "wan", variant, [])
    assert "shapes not checked" not in " ".join(result.warnings)
    assert result.to_dict()["variant"] == variant


def test_other_widths_are_not_wan():
    result = lora_compat.inspect(_header_file(_native_header(2048, 8192)))
    assert (result.base, result.base_candidates, result.variant) == (None, ["wan"], None)


def test_other_families_have_no_variant():
    shapes = {"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": (4, 3072),
              "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": (9216, 4),
              "lora_unet_double_blocks_0_img_attn_qkv.alpha": ()}
    result = lora_compat.inspect(_header_file(shapes))
    assert (result.base, result.variant) == ("flux1", None)


def test_musubi_dotted_names_map_to_wan():
    """musubi-tuner files with dots left after the block number (``lora_unet_blocks_22.self_attn.k``; they broke
    WanVideoWrapper, #869)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for name, (out, inp) in (("blocks_22.self_attn.k", (5120, 5120)), ("blocks_3.ffn.0", (13824, 5120))):
        shapes.update({f"lora_unet_{name}.lora_down.weight": (4, inp), f"lora_unet_{name}.lora_up.weight": (out, 4),
                       f"lora_unet_{name}.alpha": ()})
    result = lora_compat.inspect(_header_file(shapes))
    assert (result.dialect, result.base, result.unmatched) == ("native", "wan", [])
    assert result.components == {"transformer": 2}


def test_ldm_named_files_are_not_native():
    """``diffusion_model.input_blocks...`` (SD under LDM names) is no Wan file: still no dialect's, as before."""
    shapes = {"diffusion_model.input_blocks.1.1.proj_in.lora_A.weight": (4, 320),
              "diffusion_model.input_blocks.1.1.proj_in.lora_B.weight": (320, 4)}
    with pytest.raises(lora_compat.UnknownDialectError):
        lora_compat.inspect(_header_file(shapes))
