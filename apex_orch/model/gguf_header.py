"""A fast, header-only GGUF reader.

gguf.GGUFReader builds Python objects for every element of every array (131k
tokenizer strings, merges...) and maps the tensor data; planning needs neither.
This reader walks the header once with struct.unpack_from over an mmap, keeps scalar
values, keeps small arrays, records only the length of big ones, and never touches
tensor data, so a 240 GB file inspects in milliseconds. Type names and sizes come
from the gguf package's tables (GGMLQuantizationType, GGML_QUANT_SIZES).

`verbatim=True` keeps every array whole and string values as raw bytes, so keys read here
can be written into another GGUF byte for byte (the synthetic models copy a tokenizer so).
"""

from __future__ import annotations

import contextlib
import math
import mmap
import os
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from apex_orch.model.gguf_tables import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from apex_orch.core.errors import ModelError
from apex_orch.core.infiles import open_input

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
KEEP_ARRAY_MAX = 4096  # arrays longer than this keep only their length

_SCALAR = {
    GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b", GGUFValueType.UINT16: "<H",
    GGUFValueType.INT16: "<h", GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i",
    GGUFValueType.FLOAT32: "<f", GGUFValueType.BOOL: "<?", GGUFValueType.UINT64: "<Q",
    GGUFValueType.INT64: "<q", GGUFValueType.FLOAT64: "<d",
}


@dataclass(frozen=True)
class ArrayInfo:
    """A metadata array too long to keep: its element type and length."""
    element_type: GGUFValueType
    length: int


class SizedTensor:
    """Element count and byte size of a tensor record that has `shape` and `ggml_type`
    (shared by the header's records and ModelInfo's tensors)."""
    shape: tuple[int, ...]
    ggml_type: GGMLQuantizationType

    @property
    def n_elements(self) -> int:
        return shape_elements(self.shape)

    @property
    def n_bytes(self) -> int:
        return tensor_nbytes(self.ggml_type, self.shape)


@dataclass(frozen=True)
class TensorRecord(SizedTensor):
    name: str
    shape: tuple[int, ...]          # ggml order: ne0 (row length) first
    ggml_type: GGMLQuantizationType
    offset: int                     # relative to the data section
    shard: int = 0


def shape_elements(shape: tuple[int, ...]) -> int:
    return math.prod(shape)


def tensor_nbytes(ggml_type: GGMLQuantizationType, shape: tuple[int, ...]) -> int:
    block, type_size = GGML_QUANT_SIZES[ggml_type]
    return math.prod(shape[1:]) * ((shape[0] // block) * type_size)


@dataclass
class GGUFHeader:
    path: Path
    version: int
    kv: dict[str, object]
    kv_types: dict[str, GGUFValueType]
    tensors: list[TensorRecord]
    alignment: int
    data_offset: int
    file_size: int
    header_bytes: int = field(default=0)
    kv_sizes: dict[str, int] = field(default_factory=dict)   # bytes of each key/value entry
    array_types: dict[str, GGUFValueType] = field(default_factory=dict)   # element type of each array key

    @property
    def data_end(self) -> int:
        """Where the last tensor's bytes end (absolute file offset)."""
        if not self.tensors:
            return self.data_offset
        return max(self.data_offset + t.offset + t.n_bytes for t in self.tensors)


class _Cursor:
    def __init__(self, buf: Any, path: Path) -> None:
        self.buf = buf
        self.pos = 0
        self.path = path
        self.size = len(buf)

    def need(self, n: int, what: str) -> None:
        if self.pos + n > self.size:
            raise ModelError(
                f"GGUF header is truncated: reading {what} needs bytes {self.pos}..{self.pos + n} "
                f"but the file has {self.size}",
                where=str(self.path),
                hint="the file is incomplete (an interrupted download or copy?); fetch it again",
            )

    def unpack(self, fmt: str, what: str) -> Any:
        n = struct.calcsize(fmt)
        self.need(n, what)
        value = struct.unpack_from(fmt, self.buf, self.pos)[0]
        self.pos += n
        return value

    def raw_string(self, what: str) -> bytes:
        n = self.unpack("<Q", what)
        if n > 1 << 30:
            raise ModelError(f"GGUF header is corrupt: {what} claims a {n}-byte string",
                             where=str(self.path), hint="the file is damaged; fetch it again")
        self.need(n, what)
        raw = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        return raw

    def string(self, what: str) -> str:
        return self.raw_string(what).decode("utf-8", errors="replace")

    def skip_string(self, what: str) -> None:
        n = self.unpack("<Q", what)
        self.need(n, what)
        self.pos += n


def _value(cur: _Cursor, vtype: int, key: str, verbatim: bool = False) -> tuple[Any, Any, Any]:
    """(value type, value, array element type or None) of one metadata value."""
    try:
        vt = GGUFValueType(vtype)
    except ValueError:
        raise ModelError(f"GGUF header is corrupt: key {key!r} has unknown value type {vtype}",
                         where=str(cur.path), hint="the file is damaged or not a GGUF file") from None
    read_string = cur.raw_string if verbatim else cur.string
    if vt in _SCALAR:
        return vt, cur.unpack(_SCALAR[vt], key), None
    if vt == GGUFValueType.STRING:
        return vt, read_string(key), None
    if vt == GGUFValueType.ARRAY:
        etype = GGUFValueType(cur.unpack("<I", key))
        length = cur.unpack("<Q", key)
        if etype == GGUFValueType.ARRAY:
            raise ModelError(f"nested arrays are not supported (key {key!r})", where=str(cur.path))
        keep = verbatim or length <= KEEP_ARRAY_MAX
        if etype in _SCALAR:
            width = struct.calcsize(_SCALAR[etype])
            cur.need(width * length, key)
            if keep:
                values = list(struct.unpack_from("<" + _SCALAR[etype][1] * length, cur.buf, cur.pos))
            cur.pos += width * length
        else:  # strings
            if keep:
                values = [read_string(key) for _ in range(length)]
            else:
                for _ in range(length):
                    cur.skip_string(key)
        return vt, (values if keep else ArrayInfo(etype, length)), etype
    raise ModelError(f"unsupported GGUF value type {vt!r} for {key!r}", where=str(cur.path))


def read_header(path: str | os.PathLike[str], shard: int = 0, *, verbatim: bool = False) -> GGUFHeader:
    p = Path(path)
    with _mapped_gguf(p) as (mm, size):
        return _parse(mm, p, size, shard, verbatim)


@contextlib.contextmanager
def _mapped_gguf(p: Path) -> Iterator[tuple[mmap.mmap, int]]:
    """The file mapped read-only, after the checks every input gets (core.infiles: it opens without
    blocking on a FIFO, it is a regular file) and the one a GGUF needs (long enough for a header)."""
    with open_input(p, "model") as fh:
        size = os.fstat(fh.fileno()).st_size
        if size < 24:
            raise ModelError(f"not a GGUF file ({size} bytes, too small for a GGUF header)",
                             where=str(p), hint="pass a .gguf model file")
        with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            yield mm, size


def _preamble(cur: "_Cursor", path: Path) -> tuple[int, int, int]:
    """Magic, version and the tensor and key counts (bounded): the cursor is left at the first key."""
    magic = bytes(cur.buf[0:4])
    if magic != GGUF_MAGIC:
        raise ModelError(f"not a GGUF file (magic {magic!r}, expected b'GGUF')", where=str(path),
                         hint="pass a .gguf model file (convert safetensors with convert_hf_to_gguf.py)")
    cur.pos = 4
    version = cur.unpack("<I", "version")
    if version not in (2, 3):
        raise ModelError(f"unsupported GGUF version {version} (big-endian or too new?)", where=str(path))
    n_tensors = cur.unpack("<Q", "tensor count")
    n_kv = cur.unpack("<Q", "metadata count")
    if n_tensors > 1_000_000 or n_kv > 1_000_000:
        raise ModelError(f"GGUF header is corrupt: {n_tensors} tensors / {n_kv} keys",
                         where=str(path), hint="the file is damaged; fetch it again")
    return version, n_tensors, n_kv


def _parse(buf: Any, path: Path, size: int, shard: int, verbatim: bool) -> GGUFHeader:
    cur = _Cursor(buf, path)
    version, n_tensors, n_kv = _preamble(cur, path)
    kv: dict[str, object] = {}
    kv_types: dict[str, GGUFValueType] = {}
    kv_sizes: dict[str, int] = {}
    array_types: dict[str, GGUFValueType] = {}
    for _ in range(n_kv):
        start = cur.pos
        key = cur.string("metadata key")
        vtype = cur.unpack("<I", key)
        vt, value, etype = _value(cur, vtype, key, verbatim)
        kv[key] = value
        kv_types[key] = vt
        kv_sizes[key] = cur.pos - start
        if etype is not None:
            array_types[key] = etype
    tensors: list[TensorRecord] = []
    for _ in range(n_tensors):
        name = cur.string("tensor name")
        n_dims = cur.unpack("<I", name)
        if n_dims > 4:
            raise ModelError(f"GGUF header is corrupt: tensor {name!r} has {n_dims} dims", where=str(path))
        shape = tuple(cur.unpack("<Q", name) for _ in range(n_dims))
        raw_type = cur.unpack("<I", name)
        try:
            gtype = GGMLQuantizationType(raw_type)
        except ValueError:
            raise ModelError(f"tensor {name!r} has ggml type {raw_type}, unknown to gguf "
                             f"{_gguf_version()}", where=str(path),
                             hint="upgrade the gguf package, or the file is damaged") from None
        offset = cur.unpack("<Q", name)
        tensors.append(TensorRecord(name, shape, gtype, offset, shard))
    alignment = kv.get("general.alignment", DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise ModelError(f"general.alignment {alignment!r} is not a power of two", where=str(path))
    header_end = cur.pos
    data_offset = (header_end + alignment - 1) // alignment * alignment
    _check_tensor_shapes(tensors, alignment, path)
    hdr = GGUFHeader(path, version, kv, kv_types, tensors, alignment, data_offset, size, header_end, kv_sizes,
                     array_types)
    # A file without tensors (vocab-only) has no data section, so nothing pads it to the alignment.
    if hdr.tensors and hdr.data_end > size:
        raise ModelError(
            f"file is shorter than its tensors: it has {size:,} bytes but its header describes "
            f"{hdr.data_end:,} (an interrupted download, copy or write)",
            where=str(path), hint="fetch or copy the file again; compare its size with the source",
        )
    _check_tensor_ranges(tensors, data_offset, path)
    return hdr


_DAMAGED = "the file is damaged or was written by a broken converter; fetch or convert it again"


def _check_tensor_shapes(tensors: list[TensorRecord], alignment: int, path: Path) -> None:
    """Each tensor's own description: no zero dimension, whole blocks per row, an aligned offset
    (what llama.cpp's gguf loader and llama-quantize would otherwise assert on, late)."""
    for t in tensors:
        if not t.shape:
            raise ModelError(f"GGUF header is inconsistent: tensor {t.name!r} has no dimensions",
                             where=str(path), hint=_DAMAGED)
        if any(d == 0 for d in t.shape):
            raise ModelError(f"GGUF header is inconsistent: tensor {t.name!r} has a zero dimension "
                             f"(shape {list(t.shape)})", where=str(path), hint=_DAMAGED)
        if shape_elements(t.shape) >= 1 << 63:
            raise ModelError(f"GGUF header is inconsistent: tensor {t.name!r} claims {list(t.shape)} "
                             "elements (more than 2^63)", where=str(path), hint=_DAMAGED)
        block = GGML_QUANT_SIZES[t.ggml_type][0]
        if t.shape[0] % block:
            raise ModelError(f"GGUF header is inconsistent: tensor {t.name!r} ({t.ggml_type.name}) has rows "
                             f"of {t.shape[0]} values, not a multiple of the type's block of {block}",
                             where=str(path), hint=_DAMAGED)
        if t.offset % alignment:
            raise ModelError(f"GGUF header is inconsistent: tensor {t.name!r} starts at data offset "
                             f"{t.offset}, not a multiple of the file's alignment {alignment}",
                             where=str(path), hint=_DAMAGED)


def _check_tensor_ranges(tensors: list[TensorRecord], data_offset: int, path: Path) -> None:
    """No two tensors share bytes (the file's end was checked by the caller)."""
    ordered = sorted(tensors, key=lambda t: t.offset)
    for prev, cur in zip(ordered, ordered[1:]):
        end = prev.offset + prev.n_bytes
        if end > cur.offset:
            raise ModelError(
                f"GGUF header is inconsistent: tensors {prev.name!r} and {cur.name!r} overlap: "
                f"{prev.name!r} occupies bytes {data_offset + prev.offset:,}..{data_offset + end:,} "
                f"and {cur.name!r} starts at byte {data_offset + cur.offset:,}", where=str(path), hint=_DAMAGED)


def _gguf_version() -> str:
    try:
        from importlib.metadata import version
        return version("gguf")
    except Exception:  # pragma: no cover
        return "(unknown version)"


# ------------------------------------------------------------------ a few keys only

@contextlib.contextmanager
def _metadata_cursor(path: str | os.PathLike[str]) -> Iterator[tuple[_Cursor, int]]:
    """A cursor at the first metadata key of a GGUF file, and the number of keys, after
    read_header's checks (a regular file, the magic, the version, a sane key count)."""
    p = Path(path)
    with _mapped_gguf(p) as (buf, _size):
        cur = _Cursor(buf, p)
        _version, _n_tensors, n_kv = _preamble(cur, p)
        yield cur, n_kv


def read_kv(path: str | os.PathLike[str], keys: Iterable[str]) -> dict[str, object]:
    """The metadata values of `keys` that the file holds, kept as read_header keeps them (a long
    array as its ArrayInfo). Stops once every key is found; tensor infos are never read."""
    wanted = set(keys)
    found: dict[str, object] = {}
    with _metadata_cursor(path) as (cur, n_kv):
        for _ in range(n_kv):
            if len(found) == len(wanted):
                break
            key = cur.string("metadata key")
            value = _checked_value(cur, cur.unpack("<I", key), key)
            if key in wanted:
                found[key] = value
    return found


def _checked_value(cur: _Cursor, vtype: int, key: str) -> object:
    """_value's value, an array of an unknown element type refused like any other damage."""
    try:
        return _value(cur, vtype, key)[1]
    except ValueError:   # GGUFValueType(<unknown element type>)
        raise ModelError(f"GGUF header is corrupt: array {key!r} has elements of an unknown type",
                         where=str(cur.path), hint="the file is damaged or not a GGUF file") from None


def read_array_items(path: str | os.PathLike[str], key: str, indices: Iterable[int]) -> dict[int, object]:
    """The elements at `indices` of the metadata array `key` (those within its length), stepping
    over the others unread: a token's text without decoding the whole vocabulary. Empty when
    the file has no such array."""
    targets = sorted({i for i in indices if i >= 0})
    with _metadata_cursor(path) as (cur, n_kv):
        for _ in range(n_kv):
            name = cur.string("metadata key")
            vtype = cur.unpack("<I", name)
            if name == key:
                return _array_items(cur, key, targets) if vtype == GGUFValueType.ARRAY else {}
            _checked_value(cur, vtype, name)
    return {}


def _array_items(cur: _Cursor, key: str, targets: list[int]) -> dict[int, object]:
    raw_type = cur.unpack("<I", key)
    length = cur.unpack("<Q", key)
    targets = [t for t in targets if t < length]
    items: dict[int, object] = {}
    if raw_type == GGUFValueType.STRING:
        index = 0
        for target in targets:
            while index < target:   # strings differ in length: step over each one
                cur.skip_string(key)
                index += 1
            items[target] = cur.string(key)
            index += 1
        return items
    try:
        fmt = _SCALAR[GGUFValueType(raw_type)]
    except (ValueError, KeyError):
        raise ModelError(f"GGUF header is corrupt: array {key!r} has elements of an unknown type",
                         where=str(cur.path), hint="the file is damaged or not a GGUF file") from None
    start, width = cur.pos, struct.calcsize(fmt)
    for target in targets:
        cur.pos = start + target * width
        items[target] = cur.unpack(fmt, key)
    return items
