"""Full-size SD3 / SD3.5 mapping on the shipped tables: derived full-coverage key lists (every Linear module,
rank 1) in each layout map to base ``sd3`` with nothing unmatched and the right variant; the tables agree with
diffusers' class on ``meta`` (families.md appendix A counts)."""
from __future__ import annotations

import pytest

import lora_compat
from lora_compat.archs.sd3 import SD3
from family_tests import header_file, lora

#: Linear modules per variant (families.md appendix A, counted on ``meta``)
LINEARS = {"sd3-medium": 340, "sd3.5-large": 536, "sd3.5-medium": 392}
#: native module in joint_blocks.N.x_block / context_block → the diffusers modules it stacks (diffusers'
#: ``convert_sd3_transformer_checkpoint_to_diffusers`` read backwards)
X_BLOCK = {"attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"), "attn.proj": ("attn.to_out.0",),
           "attn2.qkv": ("attn2.to_q", "attn2.to_k", "attn2.to_v"), "attn2.proj": ("attn2.to_out.0",),
           "mlp.fc1": ("ff.net.0.proj",), "mlp.fc2": ("ff.net.2",), "adaLN_modulation.1": ("norm1.linear",)}
CONTEXT_BLOCK = {"attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
                 "attn.proj": ("attn.to_add_out",), "mlp.fc1": ("ff_context.net.0.proj",),
                 "mlp.fc2": ("ff_context.net.2",), "adaLN_modulation.1": ("norm1_context.linear",)}
TOP = {"context_embedder": "context_embedder", "t_embedder.mlp.0": "time_text_embed.timestep_embedder.linear_1",
       "t_embedder.mlp.2": "time_text_embed.timestep_embedder.linear_2",
       "y_embedder.mlp.0": "time_text_embed.text_embedder.linear_1",
       "y_embedder.mlp.2": "time_text_embed.text_embedder.linear_2", "final_layer.linear": "proj_out",
       "final_layer.adaLN_modulation.1": "norm_out.linear"}


def _index(variant: str):
    return SD3.index if variant == "sd3.5-large" else SD3.variant_index("sd3-medium")


def linears(variant: str) -> dict[str, tuple[int, int]]:
    """Every Linear of the transformer of ``variant`` (SD3-Medium: the 24-layer table less attn2)."""
    modules = _index(variant).components["transformer"]
    found = {p: s["weight"] for p, s in modules.items() if len(s.get("weight", ())) == 2}
    return {p: s for p, s in found.items() if variant != "sd3-medium" or ".attn2." not in p}


def native_modules(variant: str) -> dict[str, tuple[tuple[int, int], tuple[str, ...]]]:
    """Native name → ((rows, columns), the diffusers modules it covers), for every Linear of ``variant``."""
    mods = linears(variant)
    found = {}
    for native, path in TOP.items():
        found[native] = (mods[path], (path,))
    blocks = {int(p.split(".")[1]) for p in mods if p.startswith("transformer_blocks.")}
    for i in blocks:
        for stream, table in (("x_block", X_BLOCK), ("context_block", CONTEXT_BLOCK)):
            for native, parts in table.items():
                paths = tuple(f"transformer_blocks.{i}.{p}" for p in parts)
                if all(p in mods for p in paths):
                    found[f"joint_blocks.{i}.{stream}.{native}"] = (
                        (sum(mods[p][0] for p in paths), mods[paths[0]][1]), paths)
    assert sorted(p for _, paths in found.values() for p in paths) == sorted(mods)
    return found


@pytest.mark.parametrize("variant", list(LINEARS))
def test_linear_counts(variant):
    assert len(linears(variant)) == LINEARS[variant]


def test_tables_agree_with_diffusers_on_meta():
    pytest.importorskip("diffusers")
    from lora_compat.archs.generate_tables import table_for

    for name, index in (("sd3", SD3.index), ("sd3-medium", SD3.variant_index("sd3-medium"))):
        generated = table_for(name)["components"]
        for component, shipped in index.components.items():
            assert {m: {p: tuple(s) for p, s in ps.items()} for m, ps in generated[component].items()} == shipped
    large = SD3.index.components["transformer"]
    assert large["transformer_blocks.37.norm1_context.linear"]["weight"] == (2 * 2432, 2432)  # context_pre_only
    assert "transformer_blocks.37.attn.to_add_out" not in large
    assert "transformer_blocks.37.ff_context.net.2" not in large
    assert large["transformer_blocks.0.attn.norm_q"]["weight"] == (64,)  # rms qk-norm
    medium = SD3.variant_index("sd3-medium").components["transformer"]
    assert medium["transformer_blocks.12.attn2.to_q"]["weight"] == (1536, 1536)
    assert "transformer_blocks.13.attn2.to_q" not in medium
    assert SD3.index.components["text_encoder"]["text_projection"]["weight"] == (768, 768)
    assert SD3.index.components["text_encoder_2"]["text_projection"]["weight"] == (1280, 1280)


def _flat(name: str) -> str:
    return name.replace(".", "_")


LAYOUTS = {  # layout → (dialect, key of a diffusers path / of a native name, kohya suffixes, alpha)
    "diffusers": ("diffusers", lambda p: f"transformer.{p}", None, False, False),
    "peft": ("diffusers", lambda p: f"base_model.model.{p}", None, False, False),
    "onetrainer": ("onetrainer", lambda p: "lora_transformer_" + _flat(p), None, True, True),
    "simpletuner": ("lycoris", lambda p: "lycoris_" + _flat(p), None, True, True),
    "kohya": ("kohya", None, lambda n: "lora_unet_" + _flat(n), True, True),
    "comfy": ("native", None, lambda n: f"diffusion_model.{n}", False, False),
    "comfy-kohya": ("native", None, lambda n: f"diffusion_model.{n}", True, True),
}


def _layout_file(layout: str, variant: str) -> dict[str, tuple[int, ...]]:
    dialect, by_path, by_native, kohya, alpha = LAYOUTS[layout]
    suffixes = ("lora_down.weight", "lora_up.weight") if kohya else ("lora_A.weight", "lora_B.weight")
    if by_path is not None:
        names = {by_path(p): s for p, s in linears(variant).items()}
    else:
        names = {by_native(n): s for n, (s, _) in native_modules(variant).items()}
    return lora(names, *suffixes, alpha=alpha)


@pytest.mark.parametrize("variant, expected", [("sd3.5-large", "sd3.5-large"), ("sd3.5-medium", "sd3.5-medium"),
                                               ("sd3-medium", None)])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_full_coverage_maps_to_sd3(layout, variant, expected):
    """SD3-Medium's modules are all SD3.5-Medium's too: without attn2 (or qk-norm) keys the variant is null."""
    detection = lora_compat.detect(header_file(_layout_file(layout, variant)))
    assert (detection.dialect.id, detection.base, detection.variant) == (LAYOUTS[layout][0], "sd3", expected)
    assert detection.patchset.unmatched == {} and detection.patchset.misfits == {}
    assert sorted(detection.patchset.patches) == sorted(f"transformer.{p}" for p in linears(variant))
    assert "shapes not checked" not in " ".join(detection.patchset.warnings)


def test_partial_qkv_and_single_blocks():
    shapes = lora({"lora_unet_joint_blocks_5_x_block_attn_qkv": (3 * 2432, 2432),
                   "lora_unet_joint_blocks_37_context_block_attn_qkv": (3 * 2432, 2432),
                   "lora_unet_joint_blocks_37_context_block_adaLN_modulation_1": (2 * 2432, 2432)},
                  "lora_down.weight", "lora_up.weight", alpha=True)
    result = lora_compat.inspect(header_file(shapes))
    assert (result.base, result.variant, result.unmatched, result.targets) == ("sd3", "sd3.5-large", [], 7)


def test_text_encoders_of_every_layout():
    """sd-scripts' lora_te1_/2_/3_ (CLIP-L, CLIP-G, T5) beside the transformer: nothing unmatched."""
    te = {"lora_te1_text_model_encoder_layers_0_self_attn_q_proj": (768, 768),
          "lora_te1_text_projection": (768, 768),
          "lora_te2_text_model_encoder_layers_31_mlp_fc1": (5120, 1280),
          "lora_te2_text_projection": (1280, 1280),
          "lora_te3_encoder_block_23_layer_1_DenseReluDense_wi_1": (10240, 4096),
          "lora_unet_joint_blocks_0_x_block_attn_qkv": (3 * 2432, 2432)}
    result = lora_compat.inspect(header_file(lora(te, "lora_down.weight", "lora_up.weight", alpha=True)))
    assert (result.dialect, result.base, result.unmatched) == ("kohya", "sd3", [])
    assert result.components == {"text_encoder": 2, "text_encoder_2": 2, "text_encoder_3": 1, "transformer": 3}


def test_comfy_text_encoder_names():
    """ComfyUI's ``text_encoders.<clip_l|clip_g|t5xxl>.transformer.`` names beside ``diffusion_model.``."""
    shapes = lora({**{f"diffusion_model.joint_blocks.{i}.x_block.mlp.fc2": (2432, 4 * 2432) for i in range(4)},
                   "text_encoders.clip_l.transformer.text_model.encoder.layers.0.self_attn.k_proj": (768, 768),
                   "text_encoders.clip_g.transformer.text_model.encoder.layers.0.self_attn.k_proj": (1280, 1280),
                   "text_encoders.t5xxl.transformer.encoder.block.0.layer.0.SelfAttention.q": (4096, 4096)})
    result = lora_compat.inspect(header_file(shapes))
    assert (result.dialect, result.base, result.unmatched) == ("native", "sd3", [])
    assert result.components == {"transformer": 4, "text_encoder": 1, "text_encoder_2": 1, "text_encoder_3": 1}


def test_flux1_and_sd3_are_not_taken_for_each_other():
    flux = lora({"lora_unet_double_blocks_0_img_attn_qkv": (9216, 3072)}, "lora_down.weight", "lora_up.weight",
                alpha=True)
    assert lora_compat.inspect(header_file(flux)).base == "flux1"
    sd3 = lora({"transformer.transformer_blocks.3.attn.to_q": (2432, 2432)})
    result = lora_compat.inspect(header_file(sd3))
    assert (result.base, result.base_candidates) == ("sd3", ["sd3"])


def test_metadata_names_sd3():
    assert SD3.metadata_hint({"ss_base_model_version": "sd3"})
    assert SD3.metadata_hint({"modelspec.architecture": "stable-diffusion-v3-medium/lora"})
    assert not SD3.metadata_hint({"ss_base_model_version": "sdxl_base_v1-0"})
