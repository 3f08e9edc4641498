"""One pass over a file: the header check's quick path, detection kept on the LoraFile, the collector paused."""
from __future__ import annotations

import gc
import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import lora_compat
from lora_compat import files, plugins
from lora_compat.detection import detect
from lora_compat.errors import CorruptFileError
from lora_compat.tools.examples import kohya_sd15
from lora_compat.files import LoraFile

#: header entries the quick check must pass to _parse_entry's verdict: well-formed ones and one of each fault
ENTRIES = [
    {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
    {"dtype": "F16", "shape": [], "data_offsets": [0, 2]},
    {"dtype": "BF16", "shape": [0, 4], "data_offsets": [5, 5]},
    {"dtype": "U8", "shape": [7], "data_offsets": [1, 8]},
    {"dtype": "F32", "shape": [True, 3], "data_offsets": [0, 12]},
    {"dtype": "F32", "shape": [1.0, 3], "data_offsets": [0, 12]},
    {"dtype": "F32", "shape": [-1, -3], "data_offsets": [0, 12]},
    {"dtype": "F32", "shape": "23", "data_offsets": [0, 24]},
    {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24, 48]},
    {"dtype": "F32", "shape": [2, 3], "data_offsets": {"a": 0, "b": 24}},
    {"dtype": "F32", "shape": [2, 3], "data_offsets": [False, 24]},
    {"dtype": "F32", "shape": [2, 3], "data_offsets": [24, 0]},
    {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 20]},
    {"dtype": "F32", "shape": [2, 3], "data_offsets": [100, 124]},
    {"dtype": "F31", "shape": [2, 3], "data_offsets": [0, 24]},
    {"dtype": ["F32"], "shape": [2, 3], "data_offsets": [0, 24]},
    {"shape": [2, 3], "data_offsets": [0, 24]},
    {"dtype": "F32", "data_offsets": [0, 24]},
    ["F32", [2, 3], [0, 24]],
    "F32",
    None,
]


def slow_verdict(entry: object) -> object:
    try:
        return files._parse_entry(Path("x"), "t", entry, 64)
    except CorruptFileError as exc:
        return str(exc)


@pytest.mark.parametrize("entry", ENTRIES, ids=lambda e: json.dumps(e))
def test_quick_header_check_gives_the_same_span_or_error(entry: object) -> None:
    expected = slow_verdict(entry)
    try:
        got: object = files._parse_entries(Path("x"), {"t": entry}, 64)["t"]
    except CorruptFileError as exc:
        got = str(exc)
    assert got == expected
    assert type(got) is type(expected)  # a _Span, not a bare tuple, where the entry is good


def test_whole_file_spans_match_the_entry_by_entry_check(tmp_path: Path) -> None:
    path = kohya_sd15(tmp_path / "style.safetensors")
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    parsed = json.loads(raw[8:8 + length])
    parsed.pop("__metadata__", None)
    data_len = len(raw) - 8 - length
    spans, _, _ = files._read_safetensors_header(path)
    assert spans == {name: files._parse_entry(path, name, entry, data_len) for name, entry in parsed.items()}


def test_detecting_the_same_file_again_reuses_the_decision(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    file = LoraFile.open(kohya_sd15(tmp_path / "style.safetensors"))
    first = detect(file)
    reads: list[str] = []
    dialect = type(first.dialect)
    original = dialect.read
    monkeypatch.setattr(dialect, "read", lambda self, f, index: reads.append("read") or original(self, f, index))
    again = detect(file)
    assert reads == []
    assert (again.dialect, again.base, again.base_candidates, again.base_reason, dict(again.patchset),
            again.patchset.unmatched, again.patchset.warnings) == \
        (first.dialect, first.base, first.base_candidates, first.base_reason, dict(first.patchset),
         first.patchset.unmatched, first.patchset.warnings)
    # the caller's copies are its own
    again.patchset.warnings.append("changed by the caller")
    again.patchset.patches.clear()
    again.base_candidates.append("nothing")
    third = detect(file)
    assert "changed by the caller" not in third.patchset.warnings
    assert dict(third.patchset) == dict(first.patchset) and third.base_candidates == first.base_candidates
    # another base argument is another decision; a changed registry decides again
    detect(file, "sd15")
    assert reads == ["read"]
    plugins.reset_registry()
    detect(file)
    assert len(reads) > 1


def test_resolve_patchset_of_a_detected_file_reads_only_the_model(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from lora_compat.models import resolve_patchset

    file = LoraFile.open(kohya_sd15(tmp_path / "style.safetensors"))
    detection = detect(file)
    index = plugins.archs()["sd15"].index
    indexes: list[object] = []
    dialect = type(detection.dialect)
    original = dialect.read
    monkeypatch.setattr(dialect, "read", lambda self, f, ix: indexes.append(ix) or original(self, f, ix))
    patchset = resolve_patchset(detection.file, index)
    assert indexes == [index]
    assert dict(patchset) == dict(detection.patchset.fitted(index))


@pytest.mark.parametrize("enabled", [True, False])
def test_the_collector_is_left_as_it_was(tmp_path: Path, enabled: bool) -> None:
    good = kohya_sd15(tmp_path / "style.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(struct.pack("<Q", 2) + b"[]")
    was = gc.isenabled()
    try:
        (gc.enable if enabled else gc.disable)()
        lora_compat.inspect(good)
        assert gc.isenabled() is enabled
        with pytest.raises(CorruptFileError):
            lora_compat.inspect(bad)
        assert gc.isenabled() is enabled
    finally:
        (gc.enable if was else gc.disable)()


def test_state_dict_files_detect_as_before() -> None:
    tensors = {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(2, 320, 1, 1),
               "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(320, 2, 1, 1),
               "lora_unet_down_blocks_0_attentions_0_proj_in.alpha": torch.tensor(2.0)}
    file = LoraFile.from_state_dict(tensors)
    first, again = detect(file), detect(file)
    assert (first.base, list(first.patchset)) == (again.base, list(again.patchset))
    assert list(first.patchset) == ["unet.down_blocks.0.attentions.0.proj_in"]


def test_save_file_roundtrip_still_reads_tensors(tmp_path: Path) -> None:
    path = tmp_path / "one.safetensors"
    down = torch.arange(640.).reshape(2, 320, 1, 1)
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": down,
               "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.ones(320, 2, 1, 1)}, str(path))
    patch = lora_compat.read(path)["unet.down_blocks.0.attentions.0.proj_in"]
    assert torch.equal(patch.refs()["down"].load(), down)


def test_a_detected_file_is_freed_without_the_cycle_collector(tmp_path: Path) -> None:
    """Patches keep a way to load their tensors and the file keeps its patches and detection: none of it may
    refer back to the file, or every file would wait for a collection of the whole process."""
    path = kohya_sd15(tmp_path / "style.safetensors")
    lora_compat.inspect(path)  # module-level tables made on first use
    was = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        file = LoraFile.open(path)
        lora_compat.read(file)
        detect(file, "sd15")
        assert torch.equal(file.tensor(next(iter(file.keys()))), file.tensor(next(iter(file.keys()))))
        del file
        lora_compat.inspect(path)
        assert gc.collect() == 0
    finally:
        if was:
            gc.enable()


def test_tensor_of_a_missing_name_still_says_which_file(tmp_path: Path) -> None:
    file = LoraFile.open(kohya_sd15(tmp_path / "style.safetensors"))
    with pytest.raises(KeyError, match="style.safetensors: no tensor named 'nope'"):
        file.tensor("nope")
    with pytest.raises(KeyError, match="style.safetensors: no tensor named 'nope'"):
        LoraFile.tensor(file, "nope")


def test_a_file_with_bundled_embeddings_detects_again_as_the_first_time() -> None:
    tensors = {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(2, 320, 1, 1),
               "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(320, 2, 1, 1),
               "bundle_emb.mytoken.string_to_param.*": torch.zeros(1, 768)}
    file = LoraFile.from_state_dict(tensors)
    first, again = detect(file), detect(file)
    assert first.file is not file and again.file is first.file
    assert "bundle_emb.mytoken.string_to_param.*" not in again.file
    assert again.warnings == first.warnings and "mytoken" in again.warnings[0]
    assert again.patchset.warnings == first.patchset.warnings
    assert list(again.patchset) == list(first.patchset) == ["unet.down_blocks.0.attentions.0.proj_in"]
