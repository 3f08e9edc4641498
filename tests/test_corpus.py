"""Detection and full-size key mapping against every SD-family layout of the corpus (lora_compat/corpus, header only),
and what happens to the layouts of families lora_compat does not support yet."""
from __future__ import annotations

import pytest

import lora_compat
from lora_compat.models import resolve_patchset
from lora_compat.archs import ModuleIndex
from lora_compat import corpus
from lora_compat.errors import NotALoraError

from corpus import DIALECT_IDS, expected_targets, header_only_file, index, load, meta_components, sd_layouts

LORA_LAYOUTS = [n for n in sd_layouts() if load(n)["is_lora"] and load(n)["dialect"] != "sai_control_lora"]
REFUSED_LAYOUTS = [n for n in sd_layouts() if n not in LORA_LAYOUTS]


def _strip_text_model(target: str) -> str:
    return target.replace(".text_model.", ".")


@pytest.mark.parametrize("name", LORA_LAYOUTS)
def test_dialect_detected(name):
    result = lora_compat.inspect(header_only_file(name))
    assert result.dialect == DIALECT_IDS[load(name)["dialect"]]


@pytest.mark.parametrize("name", [n for n in LORA_LAYOUTS if load(n)["provenance"] == "derived"])
def test_full_size_base_detected_and_every_key_mapped(name):
    result = lora_compat.inspect(header_only_file(name))
    assert result.base == load(name)["base"]
    assert result.unmatched == []
    assert result.targets == load(name)["num_modules"]


@pytest.mark.parametrize("name", [n for n in LORA_LAYOUTS if load(n)["provenance"] != "derived"])
def test_tiny_layouts_never_get_a_confident_wrong_base(name):
    data = load(name)
    result = lora_compat.inspect(header_only_file(name))
    hinted = bool(data.get("metadata", {}).get("ss_base_model_version"))
    if hinted:
        assert result.base == data["base"]
    else:
        assert result.base is None
        assert data["base"] in result.base_candidates
    assert result.unmatched == []


@pytest.mark.parametrize("name", LORA_LAYOUTS)
def test_every_key_maps_to_the_real_module_with_the_right_shape(name):
    """Resolve against the layout's model built on the meta device (full-size official configs for
    derived layouts, the generator's tiny config otherwise): zero unmatched, and each target equals
    the module the corpus records for that key."""
    index = ModuleIndex.from_modules(meta_components(name))
    patchset = resolve_patchset(header_only_file(name), index)
    assert patchset.unmatched == {}
    assert patchset.misfits == {}
    expected = expected_targets(name)
    assert len(patchset) == len({k.split(".")[0] for k in load(name)["keys"]}) or not expected
    for target, patch in patchset.items():
        for ref in patch.refs().values():
            module = ref.name.split(".")[0]
            if module in expected:
                assert _strip_text_model(target) == _strip_text_model(expected[module]), ref.name


@pytest.mark.parametrize("name", REFUSED_LAYOUTS)
def test_non_loras_are_refused_by_name(name):
    with pytest.raises(NotALoraError) as info:
        lora_compat.inspect(header_only_file(name))
    assert info.value.kind == DIALECT_IDS[load(name)["dialect"]]


#: model files (not LoRAs) of families lora_compat does not support: the header alone says they are models
UNSUPPORTED_MODEL_FILES = ["invokeai_anima_comfyui_keys.json", "invokeai_z_image_transformer_comfyui_keys.json"]
#: LoRAs of families lora_compat does not support (Anima): no base, nothing matched
UNSUPPORTED_LORAS = ["invokeai_anima_lora_kohya_format.json"]
#: the corpus layout of Qwen-Image (supported since issue 14): kohya LoKr with synthetic factor shapes
QWEN_IMAGE_LORA = "invokeai_qwen_image_lora_kohya_format.json"


def test_the_unsupported_family_layouts_are_in_the_corpus():
    entries = {e["file"]: e for e in index()}
    names = UNSUPPORTED_MODEL_FILES + UNSUPPORTED_LORAS + [QWEN_IMAGE_LORA]
    assert {entries[n]["base"] for n in names} == {"anima", "qwen_image", "z_image"}
    assert [entries[n]["is_lora"] for n in names] == [False, False, True, True]


#: what the refusal of each says the file is (issue 14: a model file of the newer families is named)
REFUSED_AS = {
    "invokeai_anima_comfyui_keys.json":
        r"a full model checkpoint \(145 plain parameters, no LoRA tensors\), not a LoRA",
    "invokeai_z_image_transformer_comfyui_keys.json":
        r"a Z-Image transformer checkpoint, not a LoRA \(53 model tensors, no LoRA tensors\)",
}


@pytest.mark.parametrize("name", UNSUPPORTED_MODEL_FILES)
def test_model_files_of_unsupported_families_are_refused_as_checkpoints(name):
    """A ComfyUI Z-Image transformer (keys without prefix), named for what it is, and an Anima checkpoint (``net.``
    keys), not named yet."""
    data = load(name)
    expected = rf"^<state dict>: is {REFUSED_AS[name]}; load it as a model$"
    with pytest.raises(NotALoraError, match=expected) as info:
        lora_compat.inspect(header_only_file(name))
    assert info.value.kind == DIALECT_IDS[data["dialect"]] == "checkpoint"


@pytest.mark.parametrize("name", UNSUPPORTED_LORAS)
def test_loras_of_unsupported_families_get_no_base_and_every_key_unmatched(name):
    """Anima's ``blocks_N_cross_attn_k_proj`` are no supported base's names: no base is named, not even as a
    candidate, and no key is mapped."""
    data = load(name)
    result = lora_compat.inspect(header_only_file(name))
    assert result.dialect == DIALECT_IDS[data["dialect"]]
    assert (result.base, result.base_candidates, result.targets, result.components) == (None, [], 0, {})
    assert sorted(result.unmatched) == sorted(data["keys"])
    assert all(reason.endswith("matches no module of the model") for reason in result.unmatched_reasons.values())
    assert result.warnings == []


def test_a_few_unknown_modules_do_not_hide_the_base_its_names_fit():
    """A tiny SD1.5 file (no full-size shape fits) with one module no SD model has: sd15 stays a candidate, its
    modules map by name, and only the unknown module's keys are unmatched."""
    data = load("gen_kohya_from_diffusers_sd15.json")
    junk = {"lora_unet_not_a_module.lora_down.weight": [4, 16], "lora_unet_not_a_module.lora_up.weight": [16, 4]}
    file = corpus.header_file({"keys": {**data["keys"], **junk}})
    result = lora_compat.inspect(file)
    assert (result.dialect, result.base) == ("kohya", None)
    assert "sd15" in result.base_candidates
    assert sorted(result.unmatched) == sorted(junk)
    assert result.targets == len({k.split(".")[0] for k in data["keys"]})


def test_the_qwen_image_lokr_maps_by_name_on_qwen_image():
    """The fixture's LoKr factors are synthetic (their Kronecker product is 16x the module): no full-size base fits,
    Qwen-Image is the only candidate, and every key maps by name (its 8 modules), nothing unmatched."""
    data = load(QWEN_IMAGE_LORA)
    result = lora_compat.inspect(header_only_file(QWEN_IMAGE_LORA))
    assert (result.dialect, result.base, result.base_candidates, result.kinds) == \
        ("lycoris", None, ["qwen-image"], ["lokr"])
    assert (result.unmatched, result.targets, result.components) == ([], 8, {"transformer": 8})
    patchset = lora_compat.read(header_only_file(QWEN_IMAGE_LORA))
    block = "transformer.transformer_blocks.0."
    assert sorted(patchset.patches) == sorted([
        *(block + f"attn.{m}" for m in ("to_q", "to_k", "to_v", "to_out.0", "add_k_proj")),
        block + "img_mlp.net.0.proj", block + "txt_mlp.net.2", "transformer.transformer_blocks.1.attn.to_k"])


def test_lora_of_an_unsupported_family_is_refused_when_applied():
    from lora_compat.models import check_patchset
    from lora_compat.errors import BaseMismatchError

    patchset = lora_compat.read(header_only_file("invokeai_anima_lora_kohya_format.json"))
    flux = ModuleIndex.from_modules({"transformer": meta_components("derived_flux1_kohya_lora_full.json")["transformer"]})
    with pytest.raises(BaseMismatchError, match=r"none of its 33 keys maps to a module of these components "
                                                r"\(transformer\): the LoRA is made for another model"):
        check_patchset(patchset, flux, strict=False)


def test_the_qwen_image_lora_is_refused_on_a_flux1_model():
    from lora_compat.models import check_patchset, resolve_patchset
    from lora_compat.errors import BaseMismatchError

    flux = ModuleIndex.from_modules({"transformer": meta_components("derived_flux1_kohya_lora_full.json")["transformer"]})
    patchset = resolve_patchset(header_only_file(QWEN_IMAGE_LORA), flux)
    with pytest.raises(BaseMismatchError, match=r"this LoRA is made for qwen-image \(by its names\); the components "
                                                r"look like flux1"):
        check_patchset(patchset, flux, strict=False)


def test_textual_inversion_message_names_what_it_is():
    with pytest.raises(NotALoraError, match=r"textual-inversion embedding \(4 vectors, width 768 -> SD1.x\)"):
        lora_compat.inspect(header_only_file("gen_ti_a1111_safetensors.json"))


@pytest.mark.parametrize("name", ["derived_sd15_kohya_lora_full.json", "derived_sdxl_kohya_lora_full_sgm_names.json"])
def test_sd2_is_not_confused_with_sd15(name):
    """SD2 shares SD1.5's UNet names; only the shapes tell them apart."""
    result = lora_compat.inspect(header_only_file(name), base="sd2")
    assert result.unmatched  # forced onto the wrong base, the shapes do not fit


def test_sdxl_lora_given_sd15_components_is_a_base_mismatch():
    from lora_compat.models import check_patchset
    from lora_compat.errors import BaseMismatchError

    index = ModuleIndex.from_modules(meta_components("derived_sd15_kohya_lora_full.json"))
    patchset = resolve_patchset(header_only_file("derived_sdxl_kohya_lora_full_sgm_names.json"), index)
    with pytest.raises(BaseMismatchError, match=r"made for sdxl; the components look like sd15: \d+ modules do not fit"):
        check_patchset(patchset, index, strict=False)


def test_sd2_layout_detected_as_sd2():
    """No SD2 file is in the corpus: build a full-coverage kohya key list from the official SD2.1 model
    built on the meta device (diffusers, not our tables) and detect it."""
    from lora_compat.archs.generate_tables import build_components
    from lora_compat.files import Header, LoraFile

    shapes = {}
    for component, prefix in (("unet", "lora_unet_"), ("text_encoder", "lora_te_text_model_")):
        for name, module in build_components("sd2")[component].named_modules():
            leaf = name.rsplit(".", 1)[-1]
            if leaf in ("to_q", "to_k", "to_v", "q_proj", "k_proj", "v_proj", "fc1", "fc2") or name.endswith("to_out.0"):
                weight = module.weight.shape
                key = prefix + name.replace(".", "_")
                shapes[f"{key}.lora_down.weight"] = (8, weight[1])
                shapes[f"{key}.lora_up.weight"] = (weight[0], 8)
                shapes[f"{key}.alpha"] = ()
    header = Header(shapes, {k: "F16" for k in shapes}, {})
    result = lora_compat.inspect(LoraFile(header, lambda k: (_ for _ in ()).throw(AssertionError(k)), "memory"))
    assert (result.dialect, result.base, result.unmatched) == ("kohya", "sd2", [])
    # 23 CLIP layers x (q, k, v, fc1, fc2); 16 transformer blocks x 2 attentions x (q, k, v, out)
    assert result.components == {"text_encoder": 23 * 5, "unet": 16 * 8}


def test_shipped_architecture_tables_match_a_fresh_build():
    import gzip
    import json

    from lora_compat.archs.base import TABLES
    from lora_compat.archs.generate_tables import table_for

    for base in ("sd15", "sd2", "sdxl", "flux1"):
        with gzip.open(TABLES / f"{base}.json.gz", "rt") as f:
            shipped = json.load(f)
        assert shipped == json.loads(json.dumps(table_for(base))), base
