"""Reading LoRA files: a validated header first, tensor data only on request.

``.safetensors`` files are parsed by hand: the header is checked (well-formed JSON object, known dtypes,
offsets inside the file and non-overlapping, shape x itemsize = byte span) before any tensor byte is read.
Pickle formats (``.ckpt/.pt/.pth/.bin``) are loaded only with ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import json
import math
import os
import pickle
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping, NamedTuple

from .errors import CorruptFileError, UnsafeFileError
from ._lazy import torch

#: safetensors dtype → (the torch dtype's name, bytes per element): the header check needs only the sizes, so
#: parsing a header does not import torch (``SAFETENSORS_DTYPES`` holds the torch dtypes themselves)
DTYPES: dict[str, tuple[str, int]] = {
    "F64": ("float64", 8), "F32": ("float32", 4), "F16": ("float16", 2),
    "BF16": ("bfloat16", 2), "F8_E4M3": ("float8_e4m3fn", 1), "F8_E5M2": ("float8_e5m2", 1),
    "I64": ("int64", 8), "I32": ("int32", 4), "I16": ("int16", 2), "I8": ("int8", 1),
    "U64": ("uint64", 8), "U32": ("uint32", 4), "U16": ("uint16", 2), "U8": ("uint8", 1),
    "BOOL": ("bool", 1),
}
PICKLE_SUFFIXES = {".ckpt", ".pt", ".pth", ".bin"}
MAX_HEADER_BYTES = 100 * 1024 * 1024


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a safetensors dtype name."""
    return getattr(torch, DTYPES[name][0])


def __getattr__(name: str) -> object:
    if name == "SAFETENSORS_DTYPES":  # safetensors dtype → (torch dtype, bytes per element), made on first use
        table = {key: (torch_dtype(key), size) for key, (_, size) in DTYPES.items()}
        globals()[name] = table
        return table
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass(frozen=True)
class Header:
    """What detection may look at: names, shapes, dtypes and metadata — never tensor data.

    ``extras`` holds the non-tensor leaves of a pickle (e.g. A1111 ``string_to_token.*``), by flattened name.
    ``path`` lets a dialect find sidecar files (``adapter_config.json``); it is ``None`` for in-memory dicts.
    """

    shapes: Mapping[str, tuple[int, ...]]
    dtypes: Mapping[str, str]
    metadata: Mapping[str, str]
    path: Path | None = None
    extras: Mapping[str, str] = field(default_factory=dict)

    def __contains__(self, name: object) -> bool:
        return name in self.shapes

    def __len__(self) -> int:
        return len(self.shapes)

    def keys(self) -> Iterable[str]:
        return self.shapes.keys()

    def filtered(self, keep: Callable[[str], bool]) -> "Header":
        shapes = {k: v for k, v in self.shapes.items() if keep(k)}
        return Header(shapes, {k: self.dtypes[k] for k in shapes}, self.metadata, self.path,
                      {k: v for k, v in self.extras.items() if keep(k)})

    @property
    def display_name(self) -> str:
        return str(self.path) if self.path is not None else "<state dict>"


class _Span(NamedTuple):  # a tuple: thousands are made per header
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int


class LoraFile:
    """A LoRA-like file: validated header up front, tensors read lazily.

    Use :meth:`open` for a path or :meth:`from_state_dict` for tensors already in memory.
    """

    def __init__(self, header: Header, loader: Callable[[str], torch.Tensor], file_format: str):
        self.header = header
        self.format = file_format
        self._loader = loader
        #: per-file memo of header-derived work (e.g. patches built once, read against several bases)
        self.cache: dict = {}
        # patches keep ``file.tensor`` to load their tensors, and the patches are kept in ``cache``: as a bound
        # method it would make every file a reference cycle that only the cycle collector frees
        self.tensor = _tensor_reader(header, loader)  # type: ignore[method-assign]

    # -- construction -------------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | os.PathLike) -> "LoraFile":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such file")
        if _looks_like_pickle(path):
            return cls._open_pickle(path)
        return cls._open_safetensors(path)

    @classmethod
    def from_state_dict(cls, state_dict: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None,
                        path: str | os.PathLike | None = None) -> "LoraFile":
        tensors, extras = _flatten(state_dict)
        names = {torch_dtype(name): name for name in DTYPES}
        header = Header(
            shapes={k: tuple(t.shape) for k, t in tensors.items()},
            dtypes={k: names.get(t.dtype, str(t.dtype)) for k, t in tensors.items()},
            metadata=dict(metadata or {}), path=Path(path) if path is not None else None, extras=extras,
        )
        return cls(header, tensors.__getitem__, "memory")

    @classmethod
    def _open_safetensors(cls, path: Path) -> "LoraFile":
        spans, metadata, data_start = _read_safetensors_header(path)
        header = Header(shapes={k: s[1] for k, s in spans.items()}, dtypes={k: s[0] for k, s in spans.items()},
                        metadata=metadata, path=path)

        def load(name: str) -> torch.Tensor:
            return _read_span(path, name, spans[name], data_start)

        return cls(header, load, "safetensors")

    @classmethod
    def _open_pickle(cls, path: Path) -> "LoraFile":
        loaded = _torch_load_safely(path)
        if isinstance(loaded, Mapping) and isinstance(loaded.get("state_dict"), Mapping):
            loaded = loaded["state_dict"]
        if not isinstance(loaded, Mapping):
            raise CorruptFileError(f"{path}: holds a {type(loaded).__name__}, expected a dict of tensors")
        try:
            file = cls.from_state_dict(loaded, path=path)
        except RecursionError:
            raise CorruptFileError(f"{path}: its dict of tensors is nested too deeply or refers to itself") from None
        file.format = "pickle"
        return file

    # -- access ---------------------------------------------------------------------------------------
    @property
    def path(self) -> Path | None:
        return self.header.path

    @property
    def metadata(self) -> Mapping[str, str]:
        return self.header.metadata

    @property
    def shapes(self) -> Mapping[str, tuple[int, ...]]:
        return self.header.shapes

    @property
    def dtypes(self) -> Mapping[str, str]:
        return self.header.dtypes

    def keys(self) -> Iterable[str]:
        return self.header.shapes.keys()

    def __contains__(self, name: object) -> bool:
        return name in self.header.shapes

    def __iter__(self) -> Iterator[str]:
        return iter(self.header.shapes)

    def __len__(self) -> int:
        return len(self.header.shapes)

    def tensor(self, name: str) -> torch.Tensor:
        """Read one tensor (the only place tensor data is touched)."""
        return _tensor_reader(self.header, self._loader)(name)

    def __repr__(self) -> str:
        return f"LoraFile({self.header.display_name!r}, {len(self)} tensors, format={self.format})"


def _tensor_reader(header: Header, loader: Callable[[str], torch.Tensor]) -> Callable[[str], torch.Tensor]:
    """:meth:`LoraFile.tensor` without a reference to the file."""
    def tensor(name: str) -> torch.Tensor:
        """Read one tensor (the only place tensor data is touched)."""
        if name not in header.shapes:
            raise KeyError(f"{header.display_name}: no tensor named {name!r}")
        return loader(name)

    return tensor


# -- safetensors ------------------------------------------------------------------------------------------
def _read_safetensors_header(path: Path) -> tuple[dict[str, _Span], dict[str, str], int]:
    size = path.stat().st_size
    if size < 8:
        raise CorruptFileError(f"{path}: {size} bytes, too short for a safetensors file "
                               "(expected an 8-byte header length first)")
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        if header_len > size - 8:
            raise CorruptFileError(f"{path}: header length {header_len} is larger than the file "
                                   f"({size - 8} bytes after the length field); the file is truncated or not safetensors")
        if header_len > MAX_HEADER_BYTES:
            raise CorruptFileError(f"{path}: header length {header_len} exceeds {MAX_HEADER_BYTES} bytes")
        raw = f.read(header_len)
    try:
        parsed = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise CorruptFileError(f"{path}: header is not valid UTF-8 JSON ({exc})") from None
    if not isinstance(parsed, dict):
        raise CorruptFileError(f"{path}: header is a JSON {type(parsed).__name__}, expected an object")

    data_start = 8 + header_len
    data_len = size - data_start
    metadata = _parse_metadata(path, parsed.pop("__metadata__", None))
    spans = _parse_entries(path, parsed, data_len)
    _check_no_overlap(path, spans)
    return spans, metadata, data_start


def _parse_metadata(path: Path, raw: object) -> dict[str, str]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise CorruptFileError(f"{path}: header key '__metadata__' is a {type(raw).__name__}, expected an object")
    return {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in raw.items()}


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


_ITEM_SIZES = {name: size for name, (_, size) in DTYPES.items()}
_INT = {int}


def _parse_entries(path: Path, parsed: Mapping[str, object], data_len: int) -> dict[str, _Span]:
    """Every tensor entry checked; a quick test of the well-formed case, :func:`_parse_entry` (which says
    what is wrong) for any entry the quick test does not pass."""
    spans: dict[str, _Span] = {}
    sizes, ints, prod, span = _ITEM_SIZES, _INT, math.prod, tuple.__new__  # _Span(...) without its Python __new__
    for name, entry in parsed.items():
        try:
            # the same checks as _parse_entry (bool is no int here: type(d) is int)
            shape, offsets = entry["shape"], entry["data_offsets"]
            start, end = offsets
            ok = (type(entry) is dict and type(shape) is list and type(offsets) is list
                  and type(start) is int and type(end) is int and 0 <= start <= end <= data_len
                  and ints.issuperset(map(type, shape)) and (not shape or min(shape) >= 0)
                  and prod(shape) * sizes[entry["dtype"]] == end - start)
        except (TypeError, KeyError, ValueError):
            ok = False
        spans[name] = span(_Span, (entry["dtype"], tuple(shape), start, end)) if ok \
            else _parse_entry(path, name, entry, data_len)
    return spans


def _parse_entry(path: Path, name: str, entry: object, data_len: int) -> _Span:
    where = f"{path}: tensor {name!r}"
    if not isinstance(entry, dict):
        raise CorruptFileError(f"{where}: header entry is a {type(entry).__name__}, expected an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise CorruptFileError(f"{where}: unknown dtype {dtype!r}, expected one of {sorted(DTYPES)}")
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise CorruptFileError(f"{where}: shape {shape!r} is not a list of non-negative integers")
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(o) for o in offsets)):
        raise CorruptFileError(f"{where}: data_offsets {offsets!r} is not a pair of integers")
    start, end = offsets
    if not 0 <= start <= end:
        raise CorruptFileError(f"{where}: data_offsets [{start}, {end}] are not an increasing pair of offsets")
    if end > data_len:
        raise CorruptFileError(f"{where}: data_offsets [{start}, {end}] run past the end of the data section "
                               f"({data_len} bytes): the file is truncated or corrupt")
    expected = math.prod(shape) * DTYPES[dtype][1]
    if end - start != expected:
        raise CorruptFileError(f"{where}: shape {shape} x {dtype} needs {expected} bytes but data_offsets "
                               f"span {end - start}")
    return _Span(dtype, tuple(shape), start, end)


def _check_no_overlap(path: Path, spans: Mapping[str, _Span]) -> None:
    ordered = sorted(((s.start, s.end, n) for n, s in spans.items() if s.end > s.start))
    for (_, prev_end, prev), (start, _, name) in zip(ordered, ordered[1:]):
        if start < prev_end:
            raise CorruptFileError(f"{path}: tensors {prev!r} and {name!r} overlap in the data section")


def _read_span(path: Path, name: str, span: _Span, data_start: int) -> torch.Tensor:
    nbytes = span.end - span.start
    buffer = torch.empty(nbytes, dtype=torch.uint8)
    try:
        with open(path, "rb") as f:
            f.seek(data_start + span.start)
            got = f.readinto(buffer.numpy()) if nbytes else 0
    except OSError as exc:
        raise CorruptFileError(f"{path}: reading tensor {name!r} failed: {exc}") from exc
    if got != nbytes:
        raise CorruptFileError(f"{path}: tensor {name!r} is truncated ({got} of {nbytes} bytes)")
    return buffer.view(torch_dtype(span.dtype)).reshape(span.shape)


# -- pickle -------------------------------------------------------------------------------------------------
def _looks_like_pickle(path: Path) -> bool:
    if path.suffix.lower() in PICKLE_SUFFIXES:
        return True
    if path.suffix.lower() == ".safetensors":
        return False
    with open(path, "rb") as f:
        magic = f.read(2)
    return magic == b"PK" or magic[:1] == b"\x80"


def _torch_load_safely(path: Path) -> object:
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as exc:
        raise _unpickling_error(path, exc) from None
    except RuntimeError as exc:
        if "mmap" in str(exc):
            return _torch_load_no_mmap(path)
        raise CorruptFileError(f"{path}: not a readable torch file ({exc})") from None
    except Exception as exc:  # torch.load raises many kinds on garbage input
        raise CorruptFileError(f"{path}: not a readable torch file ({type(exc).__name__}: {exc})") from None


def _torch_load_no_mmap(path: Path) -> object:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise _unpickling_error(path, exc) from None
    except Exception as exc:
        raise CorruptFileError(f"{path}: not a readable torch file ({type(exc).__name__}: {exc})") from None


#: how torch's weights-only unpickler words a refusal to import or call something (anything else is garbage)
_CODE_MARKERS = ("GLOBAL ", "call reduce", "create new object")


def _unpickling_error(path: Path, exc: pickle.UnpicklingError) -> CorruptFileError | UnsafeFileError:
    """UnsafeFileError when the pickle wants code run to load, CorruptFileError when it is not a pickle at all."""
    paragraphs = [p.strip() for p in str(exc).split("\n\n")
                  if p.strip() and not p.strip().startswith("Check the documentation")]
    reason = (paragraphs[-1] if paragraphs else str(exc)).split("WeightsUnpickler error:")[-1]
    reason = reason.split(" Please use ")[0].strip()
    if any(marker in reason for marker in _CODE_MARKERS):
        return UnsafeFileError(f"{path}: refused to unpickle: the file needs code execution to load "
                               f"(only plain tensors and containers are allowed; weights_only=True): {reason}")
    return CorruptFileError(f"{path}: not a readable pickle/torch file ({reason})")


def _flatten(tree: Mapping, prefix: str = "") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    tensors: dict[str, torch.Tensor] = {}
    extras: dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, torch.Tensor):
            tensors[name] = value
        elif isinstance(value, Mapping):
            sub_tensors, sub_extras = _flatten(value, name + ".")
            tensors.update(sub_tensors)
            extras.update(sub_extras)
        else:
            extras[name] = str(value)
    return tensors, extras
