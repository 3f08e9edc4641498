"""The corpus' derived full-coverage layouts of the newer families (tests/derive_corpus.py writes them; Z-Image and
Lumina 2 came earlier): each maps at full size to its base and variant from the header alone with nothing
unmatched, and onto the family's own model built on ``meta``; the matrix's host columns say which webui has no
model of the family."""
from __future__ import annotations

import pytest

import lora_compat
from lora_compat import corpus as bundled
from lora_compat.archs import ModuleIndex
from lora_compat.models import resolve_patchset

from corpus import SD_BASES, header_only_file, index, load, meta_components

#: file → (dialect, base, variant, diffusers Linear modules: families.md appendix A, counted on ``meta``)
EXPECTED = {
    "derived_wan_native_lora_full.json": ("native", "wan", "wan21-i2v-14b", 488),
    "derived_qwen_image_musubi_lora_full.json": ("kohya", "qwen-image", "qwen-image-20b", 846),
    "derived_flux2_dev_aitoolkit_lora_full.json": ("bfl", "flux2", "flux2-dev", 203),
    "derived_chroma_kohya_lora_full.json": ("kohya", "chroma", None, 433),
    "derived_sd35_large_kohya_lora_full.json": ("kohya", "sd3", "sd3.5-large", 536),
    "derived_z_image_native_fused_lora_full.json": ("native", "z-image", None, 276),
    "derived_lumina2_native_fused_lora_full.json": ("native", "lumina2", None, 244),
}
FAMILY_LAYOUTS = sorted(e["file"] for e in index()
                        if e["provenance"] == "derived" and e["is_lora"] and e["base"] not in SD_BASES | {"flux1"})


def test_every_family_has_a_derived_layout():
    assert FAMILY_LAYOUTS == sorted(EXPECTED)
    assert {load(n)["base"] for n in FAMILY_LAYOUTS} == {"wan", "qwen-image", "flux2", "chroma", "sd3", "z-image",
                                                        "lumina2"}


@pytest.mark.parametrize("name", FAMILY_LAYOUTS)
def test_full_size_layout_maps_from_the_header(name):
    dialect, base, variant, linears = EXPECTED[name]
    result = lora_compat.inspect(header_only_file(name))
    assert (result.dialect, result.base, result.variant, result.unmatched) == (dialect, base, variant, [])
    assert result.targets == load(name)["num_modules"] == linears
    assert "shapes not checked" not in " ".join(result.warnings)


@pytest.mark.parametrize("name", FAMILY_LAYOUTS)
def test_full_size_layout_maps_onto_the_meta_model(name):
    patchset = resolve_patchset(header_only_file(name), ModuleIndex.from_modules(meta_components(name)))
    assert (patchset.unmatched, patchset.misfits, len(patchset)) == ({}, {}, EXPECTED[name][3])


def test_the_generator_writes_the_shipped_layouts():
    """tests/derive_corpus.py rebuilds each layout on ``meta`` as shipped (its library versions aside)."""
    pytest.importorskip("diffusers")
    from derive_corpus import LAYOUTS, layout

    for name in LAYOUTS:
        fresh, shipped = layout(name), bundled.load(name)
        assert {k: v for k, v in fresh.items() if k != "library_versions"} == \
            {k: v for k, v in shipped.items() if k != "library_versions"}


#: (a1111, forge) cells per base: A1111 v1.8.0 loads SD1/SD2/SDXL only; Forge dfdcbab6 adds SD3, Chroma and Flux
WEBUI_CELLS = {
    "wan": ("refused: AUTOMATIC1111 has no Wan", "refused: Forge has no Wan"),
    "qwen-image": ("refused: AUTOMATIC1111 has no Qwen-Image", "refused: Forge has no Qwen-Image"),
    "flux2": ("refused: AUTOMATIC1111 has no FLUX.2", "refused: Forge has no FLUX.2"),
    "z-image": ("refused: AUTOMATIC1111 has no Z-Image", "refused: Forge has no Z-Image"),
    "lumina2": ("refused: AUTOMATIC1111 has no Lumina 2", "refused: Forge has no Lumina 2"),
    "chroma": ("refused: AUTOMATIC1111 has no Chroma", None),
    "sd3": ("refused: AUTOMATIC1111 has no SD3", None),
}


@pytest.mark.parametrize("name", FAMILY_LAYOUTS)
def test_host_columns_name_the_webuis_without_the_family(name):
    """A1111 and Forge cannot load a model of these families, whatever lora_compat's adapter would do with the
    file; SD.Next (058a7f0c) and ComfyUI load them and get the adapters' own routes."""
    from lora_compat.adapters.routes import host_routes
    from lora_compat.matrix import RouteQuery, _placeholders

    data = load(name)
    file = bundled.header_file(data, read=_placeholders(data))
    hosts = host_routes(RouteQuery(file, data["base"], lora_compat.read(file)))
    a1111, forge = WEBUI_CELLS[data["base"]]
    assert hosts["a1111"] == a1111
    if forge is not None:
        assert hosts["forge"] == forge
    else:
        assert hosts["forge"].startswith("works: ")
    assert hosts["sdnext"] == "works: lora_compat module type (diffusers names)"
    assert hosts["comfyui"].startswith("works: ")


def test_matrix_rows_name_the_familys_own_tests(tmp_path):
    """The matrix's rows of these layouts: mapped at full size, checked by the family's own test file, and the
    host cells above."""
    import json

    from lora_compat.adapters.routes import host_routes
    from lora_compat.matrix import corpus_rows

    (tmp_path / "INDEX.json").write_text(json.dumps([e for e in index() if e["file"] in FAMILY_LAYOUTS]))
    for name in FAMILY_LAYOUTS:
        (tmp_path / name).write_text(json.dumps(load(name)))
    tests = {"wan": "test_wan.py", "qwen-image": "test_qwen_image.py", "flux2": "test_flux2.py",
             "chroma": "test_chroma.py", "sd3": "test_sd3.py", "z-image": "test_nextdit.py",
             "lumina2": "test_nextdit.py"}
    rows = corpus_rows(tmp_path, routes=host_routes)
    assert sorted(r.layout for r in rows) == FAMILY_LAYOUTS
    for row in rows:
        assert row.mapping == f"works: {EXPECTED[row.layout][3]} targets at full size"
        assert row.checked_by.split(" (")[0] == tests[row.base]
        assert row.hosts["a1111"] == WEBUI_CELLS[row.base][0]
