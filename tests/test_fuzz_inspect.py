"""Property: whatever bytes a file holds, ``inspect`` succeeds or raises a LoraCompatError subclass — no other
exception escapes, and no tensor data is read on the way.

Inputs: random bytes as .safetensors and .pt, byte-level mutations of a valid safetensors header (flip,
insert, delete, new length prefix), JSON-level mutations (values or key names replaced by random JSON),
well-formed headers with random kohya/LyCORIS-like names, shapes and dtypes, and mutations of valid .pt files.
"""
from __future__ import annotations

import io
import json
import math
import struct
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st
from safetensors.torch import save

import lora_compat
from lora_compat import files
from lora_compat.errors import LoraCompatError

FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

MODULES = [
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
    "lora_unet_mid_block_attentions_0_proj_in",
    "lora_unet_up_blocks_1_resnets_0_conv1",
    "lora_te_text_model_encoder_layers_0_mlp_fc1",
    "lora_te1_text_model_encoder_layers_0_self_attn_q_proj",
    "lycoris_input_blocks_1_1_proj_out",
    "oft_unet_down_blocks_0_attentions_0_proj_in",
    "unet.down_blocks.0.attentions.0.proj_in",
    "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_q_lora",
    "text_encoder.text_model.encoder.layers.0.self_attn.q_proj",
    "base_model.model.down_blocks.0.attentions.0.proj_in",
    "transformer.single_transformer_blocks.0.attn.to_q",
    "model.diffusion_model.input_blocks.0.0",
    "control_model.input_hint_block.0",
    "lora_controlnet",
    "bundle_emb.concept",
    "string_to_param",
    "clip_l",
    "clip_g",
    "emb_params",
    "",
]
SUFFIXES = [
    "lora_down.weight", "lora_up.weight", "lora_mid.weight", "alpha", "hada_w1_a", "hada_w1_b", "hada_w2_a",
    "hada_w2_b", "lokr_w1", "lokr_w2", "lokr_w2_a", "lokr_t2", "diff", "diff_b", "oft_blocks", "dora_scale",
    "lora_A.weight", "lora_B.weight", "lora.down.weight", "lora.up.weight", "w_norm", "b_norm", "weight", "scale",
    "lora_linear_layer.down.weight", "lora_magnitude_vector", "lora_B.bias", "a1.weight", "b2.weight", "on_input",
    "rescale", "oft_diag", "lokr_w1_a", "lokr_w1_b", "lokr_w2_b", "hada_t1", "bias", "*", "",
]
DIMS = [0, 1, 2, 3, 4, 8, 320, 768, 1280]

#: torch warns about the pickle protocol numbers that random bytes claim
pytestmark = pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")


# -- the property ---------------------------------------------------------------------------------------------
def assert_inspect_fails_cleanly(path: Path) -> None:
    """``inspect`` either returns or raises a LoraCompatError; anything else fails the test."""
    try:
        result = lora_compat.inspect(path)
    except LoraCompatError as exc:
        assert str(path) in str(exc), f"the message does not name the file: {exc}"
        return
    assert result.file == str(path)
    result.to_json()


@pytest.fixture(autouse=True)
def no_tensor_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(path: Path, name: str, *args: object) -> torch.Tensor:
        raise AssertionError(f"tensor data of {name!r} in {path} was read")

    monkeypatch.setattr(files, "_read_span", refuse)


# -- a valid file to mutate ------------------------------------------------------------------------------------
def _valid_safetensors() -> bytes:
    module = MODULES[0]
    return save({f"{module}.lora_down.weight": torch.ones(4, 320, dtype=torch.float16),
                 f"{module}.lora_up.weight": torch.ones(320, 4, dtype=torch.float16),
                 f"{module}.alpha": torch.tensor(4.0)},
                metadata={"ss_network_dim": "4", "ss_base_model_version": "sd_v1",
                          "ss_tag_frequency": json.dumps({"a": {"tag": 2, "other": 1}})})


VALID = _valid_safetensors()
(HEADER_LEN,) = struct.unpack("<Q", VALID[:8])
HEADER: dict[str, Any] = json.loads(VALID[8:8 + HEADER_LEN])
DATA = VALID[8 + HEADER_LEN:]


def _paths(value: Any, prefix: tuple = ()) -> list[tuple]:
    """Every place in the JSON header a value can be replaced (objects by key, lists by index)."""
    found = [prefix] if prefix else []
    if isinstance(value, dict):
        for key, item in value.items():
            found += _paths(item, prefix + (key,))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found += _paths(item, prefix + (index,))
    return found


HEADER_PATHS = _paths(HEADER)


def _replaced(tree: Any, where: tuple, new: Any) -> Any:
    if not where:
        return new
    copy = dict(tree) if isinstance(tree, dict) else list(tree)
    copy[where[0]] = _replaced(tree[where[0]], where[1:], new)
    return copy


def _renamed(header: dict[str, Any], old: str, new: str) -> dict[str, Any]:
    return {(new if key == old else key): value for key, value in header.items()}


def _with_header(raw: bytes, data: bytes = DATA) -> bytes:
    return struct.pack("<Q", len(raw)) + raw + data


# -- strategies ------------------------------------------------------------------------------------------------
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
key_names = st.one_of(
    st.text(max_size=40),
    st.builds(lambda m, s: f"{m}.{s}" if m and s else m or s, st.sampled_from(MODULES), st.sampled_from(SUFFIXES)),
)


@st.composite
def byte_mutations(draw: st.DrawFn) -> bytes:
    """The valid file with 1-4 byte-level edits inside the length prefix + header region."""
    raw = bytearray(VALID)
    for _ in range(draw(st.integers(1, 4))):
        end = min(len(raw), 8 + HEADER_LEN)
        kind = draw(st.sampled_from(["flip", "insert", "delete", "length"]))
        at = draw(st.integers(0, max(end - 1, 0)))
        if kind == "flip" and raw:
            raw[at] ^= draw(st.integers(1, 255))
        elif kind == "insert":
            raw[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif kind == "delete":
            del raw[at:at + draw(st.integers(1, 16))]
        else:
            length = draw(st.one_of(st.integers(0, 2**64 - 1), st.integers(-16, 16).map(lambda d: HEADER_LEN + d)))
            raw[:8] = struct.pack("<Q", max(0, min(length, 2**64 - 1)))
    return bytes(raw)


@st.composite
def json_mutations(draw: st.DrawFn) -> bytes:
    """The valid header with values replaced by random JSON and keys renamed; the length prefix kept right."""
    header: Any = HEADER
    for _ in range(draw(st.integers(1, 3))):
        if isinstance(header, dict) and header and draw(st.booleans()):
            header = _renamed(header, draw(st.sampled_from(sorted(header))), draw(key_names))
        else:
            where = draw(st.sampled_from(HEADER_PATHS))
            try:
                header = _replaced(header, where, draw(json_values))
            except (KeyError, IndexError, TypeError):  # an earlier edit removed that place
                header = draw(json_values)
    return _with_header(json.dumps(header).encode())


@st.composite
def well_formed_headers(draw: st.DrawFn) -> tuple[bytes, int]:
    """Headers that pass validation (consistent offsets) with random names, shapes and dtypes: the dialects see them.

    Gives the file's start (length prefix + header) and the data section's size, written as a sparse hole.
    """
    names = draw(st.lists(key_names, min_size=1, max_size=8, unique=True).filter(lambda ns: "__metadata__" not in ns))
    header: dict[str, Any] = {}
    offset = 0
    for name in names:
        dtype = draw(st.sampled_from(sorted(files.SAFETENSORS_DTYPES)))
        shape = draw(st.lists(st.sampled_from(DIMS), max_size=3).filter(lambda s: math.prod(s) <= 1280 * 1280))
        size = files.SAFETENSORS_DTYPES[dtype][1]
        for dim in shape:
            size *= dim
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    if draw(st.booleans()):
        header["__metadata__"] = draw(st.dictionaries(
            st.sampled_from(["ss_base_model_version", "ss_network_dim", "ss_tag_frequency", "modelspec.architecture",
                             "modelspec.trigger_phrase", "format"]),
            st.one_of(st.text(max_size=16), json_values.map(json.dumps))))
    return _with_header(json.dumps(header).encode(), b""), offset


def _torch_bytes(content: object, zipfile: bool) -> bytes:
    buffer = io.BytesIO()
    torch.save(content, buffer, _use_new_zipfile_serialization=zipfile)
    return buffer.getvalue()


VALID_PT = [_torch_bytes({f"{MODULES[0]}.lora_down.weight": torch.ones(2, 320),
                          f"{MODULES[0]}.lora_up.weight": torch.ones(320, 2), "step": 10}, zipfile)
            for zipfile in (True, False)]


@st.composite
def pt_mutations(draw: st.DrawFn) -> bytes:
    raw = bytearray(draw(st.sampled_from(VALID_PT)))
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(raw) - 1))
        if draw(st.booleans()):
            raw[at] ^= draw(st.integers(1, 255))
        else:
            del raw[at:at + draw(st.integers(1, 64))]
    return bytes(raw)


# -- the tests ---------------------------------------------------------------------------------------------------
@FUZZ
@given(raw=st.binary(max_size=512))
def test_random_bytes_as_safetensors(tmp_path: Path, raw: bytes) -> None:
    path = tmp_path / "random.safetensors"
    path.write_bytes(raw)
    assert_inspect_fails_cleanly(path)


@FUZZ
@given(header=json_values)
def test_random_json_as_header(tmp_path: Path, header: Any) -> None:
    path = tmp_path / "json.safetensors"
    path.write_bytes(_with_header(json.dumps(header).encode()))
    assert_inspect_fails_cleanly(path)


@FUZZ
@given(raw=byte_mutations())
def test_byte_mutated_header(tmp_path: Path, raw: bytes) -> None:
    path = tmp_path / "mutated.safetensors"
    path.write_bytes(raw)
    assert_inspect_fails_cleanly(path)


@FUZZ
@given(raw=json_mutations())
def test_json_mutated_header(tmp_path: Path, raw: bytes) -> None:
    path = tmp_path / "mutated.safetensors"
    path.write_bytes(raw)
    assert_inspect_fails_cleanly(path)


@FUZZ
@given(file=well_formed_headers())
def test_well_formed_header_with_random_names_and_shapes(tmp_path: Path, file: tuple[bytes, int]) -> None:
    start, data_len = file
    path = tmp_path / "random_layout.safetensors"
    with open(path, "wb") as f:
        f.write(start)
        f.truncate(len(start) + data_len)
    assert_inspect_fails_cleanly(path)


@FUZZ
@given(raw=st.one_of(st.binary(max_size=512),
                     st.binary(max_size=256).map(lambda b: b"\x80\x02" + b),
                     st.binary(max_size=256).map(lambda b: b"PK\x03\x04" + b)))
def test_random_bytes_as_pt(tmp_path: Path, raw: bytes) -> None:
    path = tmp_path / "random.pt"
    path.write_bytes(raw)
    assert_inspect_fails_cleanly(path)


@settings(FUZZ, max_examples=150)
@given(raw=pt_mutations())
def test_mutated_pt(tmp_path: Path, raw: bytes) -> None:
    path = tmp_path / "mutated.pt"
    path.write_bytes(raw)
    assert_inspect_fails_cleanly(path)


def _scalar(name: str, dtype: str = "F32") -> dict[str, dict[str, Any]]:
    return {name: {"dtype": dtype, "shape": [], "data_offsets": [0, files.SAFETENSORS_DTYPES[dtype][1]]}}


#: headers the properties above once crashed on (tensors with fewer dimensions than their role needs)
FOUND_BY_FUZZING = {
    "kohya-scalar-lora-up": {f"{MODULES[0]}.lora_up.weight": {"dtype": "F32", "shape": [], "data_offsets": [0, 4]},
                             f"{MODULES[0]}.lora_down.weight": {"dtype": "F32", "shape": [4, 320],
                                                                "data_offsets": [4, 5124]}},
    "lycoris-scalar-lora-down": {f"{MODULES[5]}.lora_up.weight": {"dtype": "F32", "shape": [], "data_offsets": [0, 4]},
                                 f"{MODULES[5]}.lora_down.weight": {"dtype": "F16", "shape": [],
                                                                    "data_offsets": [4, 6]}},
    "scalar-oft-blocks": _scalar(f"{MODULES[1]}.oft_blocks", "U8"),
    "scalar-emb-params": _scalar("emb_params"),
    "scalar-clip-l": {**_scalar("clip_l"), "x.lora_mid.weight": {"dtype": "F32", "shape": [], "data_offsets": [4, 8]}},
}


@pytest.mark.parametrize("header", FOUND_BY_FUZZING.values(), ids=FOUND_BY_FUZZING.keys())
def test_found_by_fuzzing(tmp_path: Path, header: dict[str, Any]) -> None:
    data_len = max(entry["data_offsets"][1] for entry in header.values())
    path = tmp_path / "found.safetensors"
    path.write_bytes(_with_header(json.dumps(header).encode(), bytes(data_len)))
    assert_inspect_fails_cleanly(path)


def test_the_mutation_seeds_are_valid(tmp_path: Path) -> None:
    """The unmutated seeds inspect cleanly, so mutations start from real files."""
    path = tmp_path / "valid.safetensors"
    path.write_bytes(VALID)
    assert lora_compat.inspect(path).dialect == "kohya"
    for index, raw in enumerate(VALID_PT):
        pt = tmp_path / f"valid{index}.pt"
        pt.write_bytes(raw)
        assert lora_compat.inspect(pt).dialect == "kohya"
