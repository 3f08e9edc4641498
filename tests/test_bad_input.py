"""Bad input: each broken or wrong file gives the right LoraCompatError naming the file, and nothing else happens.

"Nothing else" means: no tensor byte is read (``files._read_span`` fails every test that touches it) and no
code from a pickle runs (a live payload would write a marker file).
"""
from __future__ import annotations

import json
import random
import re
import struct
from pathlib import Path
from typing import Callable

import pytest
import torch
from safetensors.torch import save_file

import lora_compat
from lora_compat import files
from lora_compat.errors import CorruptFileError, NotALoraError, UnknownDialectError, UnsafeFileError

KOHYA_MODULE = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
RANK = 4

Opener = Callable[[Path], object]


# -- helpers ----------------------------------------------------------------------------------------------
def kohya_state_dict() -> dict[str, torch.Tensor]:
    return {
        f"{KOHYA_MODULE}.lora_down.weight": torch.randn(RANK, 320),
        f"{KOHYA_MODULE}.lora_up.weight": torch.randn(320, RANK),
        f"{KOHYA_MODULE}.alpha": torch.tensor(float(RANK)),
    }


def write_kohya(path: Path) -> Path:
    save_file(kohya_state_dict(), str(path))
    return path


def split_safetensors(path: Path) -> tuple[dict, bytes]:
    """The parsed JSON header and the data section of a safetensors file."""
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + length]), raw[8 + length:]


def write_raw(path: Path, header: object, data: bytes = b"", length: int | None = None) -> Path:
    """A safetensors-shaped file: 8-byte length, the header (JSON-encoded unless bytes), the data section."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)
    return path


def names(path: Path, text: str) -> str:
    """A ``match=`` pattern: the message names the file, then says ``text`` (a regex)."""
    return re.escape(str(path)) + r":.*" + text


def _write_marker(path: str) -> None:
    Path(path).write_text("pickle payload ran")


class Payload:
    """Unpickling this calls ``_write_marker``: the marker file proves code ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self) -> tuple[Callable[[str], None], tuple[str]]:
        return _write_marker, (str(self.marker),)


@pytest.fixture(autouse=True)
def no_tensor_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every check here is header-only: reading tensor data fails the test."""
    def refuse(path: Path, name: str, *args: object) -> torch.Tensor:
        raise AssertionError(f"tensor data of {name!r} in {path} was read")

    monkeypatch.setattr(files, "_read_span", refuse)


@pytest.fixture(params=[lora_compat.inspect, lora_compat.LoraFile.open], ids=["inspect", "LoraFile.open"])
def opener(request: pytest.FixtureRequest) -> Opener:
    """Corrupt files fail already when opened, and ``inspect`` passes the same error on."""
    return request.param


# -- corrupt safetensors ------------------------------------------------------------------------------------
def test_empty_file(tmp_path: Path, opener: Opener) -> None:
    path = tmp_path / "empty.safetensors"
    path.write_bytes(b"")
    with pytest.raises(CorruptFileError, match=names(path, "0 bytes, too short for a safetensors file")):
        opener(path)


def test_truncated_in_data_section(tmp_path: Path, opener: Opener) -> None:
    path = write_kohya(tmp_path / "cut.safetensors")
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    cut = 8 + length + 100
    assert cut < len(raw)
    path.write_bytes(raw[:cut])
    with pytest.raises(CorruptFileError, match=names(path, r"data_offsets \[\d+, \d+\] run past the end of the "
                                                          r"data section \(100 bytes\): the file is truncated")):
        opener(path)


def test_header_offsets_past_the_end(tmp_path: Path, opener: Opener) -> None:
    header, data = split_safetensors(write_kohya(tmp_path / "valid.safetensors"))
    key = f"{KOHYA_MODULE}.lora_up.weight"
    start, _ = header[key]["data_offsets"]
    header[key]["data_offsets"] = [start, len(data) + 4]
    path = write_raw(tmp_path / "past_end.safetensors", header, data)
    with pytest.raises(CorruptFileError, match=names(path, rf"tensor '{key}': data_offsets \[{start}, "
                                                          rf"{len(data) + 4}\] run past the end of the data")):
        opener(path)


@pytest.mark.parametrize("offsets", [[8, 4], [-4, 4]], ids=["decreasing", "negative"])
def test_header_offsets_not_increasing(tmp_path: Path, opener: Opener, offsets: list[int]) -> None:
    header = {"a": {"dtype": "F32", "shape": [1], "data_offsets": offsets}}
    path = write_raw(tmp_path / "backwards.safetensors", header, bytes(8))
    with pytest.raises(CorruptFileError, match=names(path, rf"tensor 'a': data_offsets \[{offsets[0]}, "
                                                          rf"{offsets[1]}\] are not an increasing pair")):
        opener(path)


def test_header_length_larger_than_file(tmp_path: Path, opener: Opener) -> None:
    raw = write_kohya(tmp_path / "valid.safetensors").read_bytes()
    path = tmp_path / "long_header.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw[8:])
    with pytest.raises(CorruptFileError, match=names(path, rf"header length {len(raw)} is larger than the file")):
        opener(path)


def test_header_length_over_the_limit(tmp_path: Path, opener: Opener) -> None:
    """A huge (sparse) file whose length prefix claims a header above MAX_HEADER_BYTES is refused unread."""
    path = tmp_path / "huge_header.safetensors"
    length = files.MAX_HEADER_BYTES + 1
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", length))
        f.truncate(8 + length)
    with pytest.raises(CorruptFileError, match=names(path, rf"header length {length} exceeds")):
        opener(path)


def test_unknown_dtype(tmp_path: Path, opener: Opener) -> None:
    header, data = split_safetensors(write_kohya(tmp_path / "valid.safetensors"))
    key = f"{KOHYA_MODULE}.lora_down.weight"
    header[key]["dtype"] = "F12"
    path = write_raw(tmp_path / "dtype.safetensors", header, data)
    with pytest.raises(CorruptFileError, match=names(path, rf"tensor '{key}': unknown dtype 'F12'")):
        opener(path)


def test_shape_not_matching_bytes(tmp_path: Path, opener: Opener) -> None:
    header, data = split_safetensors(write_kohya(tmp_path / "valid.safetensors"))
    key = f"{KOHYA_MODULE}.lora_down.weight"
    header[key]["shape"] = [RANK, 321]
    path = write_raw(tmp_path / "shape.safetensors", header, data)
    with pytest.raises(CorruptFileError, match=names(path, rf"tensor '{key}': shape \[{RANK}, 321\] x F32 needs "
                                                          rf"{RANK * 321 * 4} bytes but data_offsets span "
                                                          rf"{RANK * 320 * 4}")):
        opener(path)


def test_overlapping_tensors(tmp_path: Path, opener: Opener) -> None:
    header = {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
              "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}}
    path = write_raw(tmp_path / "overlap.safetensors", header, bytes(24))
    with pytest.raises(CorruptFileError, match=names(path, "tensors 'a' and 'b' overlap in the data section")):
        opener(path)


def test_header_not_an_object(tmp_path: Path, opener: Opener) -> None:
    path = write_raw(tmp_path / "list.safetensors", [1, 2, 3])
    with pytest.raises(CorruptFileError, match=names(path, "header is a JSON list, expected an object")):
        opener(path)


@pytest.mark.parametrize("raw", [b"\xff\xfe{}", b'{"a": {"dtype": "F32"', b"{not json}"],
                         ids=["invalid-utf8", "cut-json", "invalid-json"])
def test_header_not_json(tmp_path: Path, opener: Opener, raw: bytes) -> None:
    path = write_raw(tmp_path / "text.safetensors", raw)
    with pytest.raises(CorruptFileError, match=names(path, "header is not valid UTF-8 JSON")):
        opener(path)


def test_metadata_not_an_object(tmp_path: Path, opener: Opener) -> None:
    header, data = split_safetensors(write_kohya(tmp_path / "valid.safetensors"))
    header["__metadata__"] = ["ss_network_dim", "4"]
    path = write_raw(tmp_path / "meta.safetensors", header, data)
    with pytest.raises(CorruptFileError, match=names(path, "'__metadata__' is a list, expected an object")):
        opener(path)


# -- pickles -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("zipfile", [True, False], ids=["zip", "legacy"])
def test_pickle_that_runs_code_is_refused_unrun(tmp_path: Path, opener: Opener, zipfile: bool) -> None:
    marker = tmp_path / "marker"
    path = tmp_path / "evil.pt"
    torch.save({"lora_unet_x.lora_down.weight": torch.zeros(1), "payload": Payload(marker)}, path,
               _use_new_zipfile_serialization=zipfile)
    with pytest.raises(UnsafeFileError, match=names(path, r"refused to unpickle.*_write_marker")):
        opener(path)
    assert not marker.exists()


def test_pickle_payload_is_live(tmp_path: Path) -> None:
    """Control for the test above: an unrestricted load of the same file does run the payload."""
    marker = tmp_path / "marker"
    path = tmp_path / "evil.pt"
    torch.save({"payload": Payload(marker)}, path)
    torch.load(path, weights_only=False)
    assert marker.read_text() == "pickle payload ran"


@pytest.mark.parametrize("blob", [
    random.Random(0).randbytes(4096),
    b"garbage, not a pickle",
    b"\x80\x02" + random.Random(1).randbytes(256),
    b"PK\x03\x04" + random.Random(2).randbytes(256),
    b"",
], ids=["random", "text", "pickle-magic", "zip-magic", "empty"])
def test_random_bytes_in_pt(tmp_path: Path, opener: Opener, blob: bytes) -> None:
    path = tmp_path / "random.pt"
    path.write_bytes(blob)
    with pytest.raises(CorruptFileError, match=names(path, "not a readable (pickle/)?torch file")):
        opener(path)


@pytest.mark.parametrize("content", [torch.zeros(4, 4), [torch.zeros(2)], 3],
                         ids=["tensor", "list", "int"])
def test_pt_without_a_dict(tmp_path: Path, opener: Opener, content: object) -> None:
    path = tmp_path / "plain.pt"
    torch.save(content, path)
    kind = type(content).__name__
    with pytest.raises(CorruptFileError, match=names(path, f"holds a {kind}, expected a dict of tensors")):
        opener(path)


def test_self_referential_pickle(tmp_path: Path, opener: Opener) -> None:
    looped: dict[str, object] = {"lora_unet_x.lora_down.weight": torch.zeros(1)}
    looped["self"] = looped
    path = tmp_path / "loop.pt"
    torch.save(looped, path)
    with pytest.raises(CorruptFileError, match=names(path, "nested too deeply or refers to itself")):
        opener(path)


# -- valid files that are not (recognisable) LoRAs --------------------------------------------------------------
def test_safetensors_without_tensors(tmp_path: Path) -> None:
    path = tmp_path / "none.safetensors"
    save_file({}, str(path), metadata={"ss_network_dim": "4"})
    with pytest.raises(UnknownDialectError, match=names(path, "holds no tensors")):
        lora_compat.inspect(path)


def test_unrelated_keys(tmp_path: Path) -> None:
    path = tmp_path / "foo.safetensors"
    save_file({"foo": torch.zeros(3), "bar.weight": torch.zeros(2, 2)}, str(path))
    with pytest.raises(UnknownDialectError, match=names(path, r"no registered dialect recognises these keys "
                                                              r"\(e\.g\. (foo|bar\.weight)")):
        lora_compat.inspect(path)


def test_textual_inversion_a1111_pt(tmp_path: Path) -> None:
    path = tmp_path / "x.pt"
    torch.save({"string_to_param": {"*": torch.zeros(2, 768)}, "string_to_token": {"*": 265}, "name": "x",
                "step": 10}, path)
    with pytest.raises(NotALoraError, match=names(path, r"textual-inversion embedding \(2 vectors, width 768 "
                                                        r"-> SD1\.x\)")) as info:
        lora_compat.inspect(path)
    assert info.value.kind == "textual-inversion"


def test_textual_inversion_diffusers_learned_embeds(tmp_path: Path) -> None:
    path = tmp_path / "learned_embeds.bin"
    torch.save({"<tok>": torch.zeros(768)}, path)
    with pytest.raises(NotALoraError, match=names(path, r"textual-inversion embedding \(1 vectors, width 768")) \
            as info:
        lora_compat.inspect(path)
    assert info.value.kind == "textual-inversion"


def test_textual_inversion_sdxl_safetensors(tmp_path: Path) -> None:
    path = tmp_path / "sdxl_embedding.safetensors"
    save_file({"clip_l": torch.zeros(2, 768), "clip_g": torch.zeros(2, 1280)}, str(path))
    with pytest.raises(NotALoraError, match=names(path, r"textual-inversion embedding \(2 vectors.*SDXL")) as info:
        lora_compat.inspect(path)
    assert info.value.kind == "textual-inversion"


# -- valid LoRAs -------------------------------------------------------------------------------------------------
def test_bundled_embedding_is_stripped_with_a_warning(tmp_path: Path) -> None:
    path = tmp_path / "bundled.safetensors"
    save_file({**kohya_state_dict(), "bundle_emb.myconcept.string_to_param.*": torch.zeros(2, 768)}, str(path))
    result = lora_compat.inspect(path)
    assert result.dialect == "kohya"
    assert result.tensors == 3
    assert result.targets == 1
    assert result.rank == {"min": RANK, "max": RANK}
    assert result.unmatched == []
    stripped = [w for w in result.warnings if "myconcept" in w]
    assert len(stripped) == 1 and "stripped 1 bundled textual-inversion embedding" in stripped[0]


def test_inspect_never_reads_tensor_data(tmp_path: Path) -> None:
    """Header validation is all ``inspect`` does with the file: a garbage data section goes unnoticed."""
    header, data = split_safetensors(write_kohya(tmp_path / "valid.safetensors"))
    path = write_raw(tmp_path / "garbage_data.safetensors", header, random.Random(3).randbytes(len(data)))
    result = lora_compat.inspect(path)
    assert result.dialect == "kohya"
    assert result.targets == 1
    with pytest.raises(AssertionError, match="was read"):  # the autouse fixture is in force
        lora_compat.LoraFile.open(path).tensor(f"{KOHYA_MODULE}.alpha")
