"""A fast, header-only GGUF reader.

gguf.GGUFReader builds Python objects for every element of every array (131k
tokenizer strings, merges...) and maps the tensor data; planning needs neither.
This reader walks the header once with struct.unpack_from over an mmap, keeps scalar
values, keeps small arrays, records only the length of big ones, and never touches
tensor data, so a 240 GB file inspects in milliseconds. Type names and sizes come
from the gguf package's tables (GGMLQuantizationType, GGML_QUANT_SIZES).
"""

from __future__ import annotations

import mmap
import os
import stat
import struct
from dataclasses import dataclass, field
from pathlib import Path

from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from apex_orch.core.errors import ModelError

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


@dataclass(frozen=True)
class TensorRecord:
    name: str
    shape: tuple[int, ...]          # ggml order: ne0 (row length) first
    ggml_type: GGMLQuantizationType
    offset: int                     # relative to the data section
    shard: int = 0

    @property
    def n_elements(self) -> int:
        return shape_elements(self.shape)

    @property
    def n_bytes(self) -> int:
        return tensor_nbytes(self.ggml_type, self.shape)


def shape_elements(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def tensor_nbytes(ggml_type: GGMLQuantizationType, shape: tuple[int, ...]) -> int:
    block, type_size = GGML_QUANT_SIZES[ggml_type]
    ne0 = shape[0]
    rows = 1
    for d in shape[1:]:
        rows *= d
    return rows * ((ne0 // block) * type_size)


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

    @property
    def data_end(self) -> int:
        """Where the last tensor's bytes end (absolute file offset)."""
        if not self.tensors:
            return self.data_offset
        return max(self.data_offset + t.offset + t.n_bytes for t in self.tensors)


class _Cursor:
    def __init__(self, buf, path: Path):
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

    def unpack(self, fmt: str, what: str):
        n = struct.calcsize(fmt)
        self.need(n, what)
        value = struct.unpack_from(fmt, self.buf, self.pos)[0]
        self.pos += n
        return value

    def string(self, what: str) -> str:
        n = self.unpack("<Q", what)
        if n > 1 << 30:
            raise ModelError(f"GGUF header is corrupt: {what} claims a {n}-byte string",
                             where=str(self.path), hint="the file is damaged; fetch it again")
        self.need(n, what)
        raw = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        return raw.decode("utf-8", errors="replace")

    def skip_string(self, what: str) -> None:
        n = self.unpack("<Q", what)
        self.need(n, what)
        self.pos += n


def _value(cur: _Cursor, vtype: int, key: str):
    try:
        vt = GGUFValueType(vtype)
    except ValueError:
        raise ModelError(f"GGUF header is corrupt: key {key!r} has unknown value type {vtype}",
                         where=str(cur.path), hint="the file is damaged or not a GGUF file") from None
    if vt in _SCALAR:
        return vt, cur.unpack(_SCALAR[vt], key)
    if vt == GGUFValueType.STRING:
        return vt, cur.string(key)
    if vt == GGUFValueType.ARRAY:
        etype = GGUFValueType(cur.unpack("<I", key))
        length = cur.unpack("<Q", key)
        if etype == GGUFValueType.ARRAY:
            raise ModelError(f"nested arrays are not supported (key {key!r})", where=str(cur.path))
        keep = length <= KEEP_ARRAY_MAX
        if etype in _SCALAR:
            width = struct.calcsize(_SCALAR[etype])
            cur.need(width * length, key)
            if keep:
                values = list(struct.unpack_from("<" + _SCALAR[etype][1] * length, cur.buf, cur.pos))
            cur.pos += width * length
        else:  # strings
            if keep:
                values = [cur.string(key) for _ in range(length)]
            else:
                for _ in range(length):
                    cur.skip_string(key)
        return vt, (values if keep else ArrayInfo(etype, length))
    raise ModelError(f"unsupported GGUF value type {vt!r} for {key!r}", where=str(cur.path))


def read_header(path: str | os.PathLike, shard: int = 0) -> GGUFHeader:
    p = Path(path)
    try:
        # O_NONBLOCK: opening a FIFO for reading would otherwise wait forever for a writer.
        fd = os.open(p, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        raise ModelError("file not found", where=str(p), hint="check the path") from None
    except IsADirectoryError:
        raise ModelError("is a folder, not a GGUF file", where=str(p)) from None
    except PermissionError:
        raise ModelError("permission denied reading the file", where=str(p)) from None
    except ValueError:   # a NUL byte in the path
        raise ModelError("the path contains a NUL byte; no file can have this name", where=repr(str(p))) from None
    except OSError as exc:   # a name too long, a loop of links...
        raise ModelError(f"cannot open the file: {exc.strerror}", where=str(p)) from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        if stat.S_ISDIR(st.st_mode):
            raise ModelError("is a folder, not a GGUF file", where=str(p))
        raise ModelError(f"is not a regular file (a {_file_kind(st.st_mode)}); apex-orch reads GGUF models "
                         "from regular files only", where=str(p),
                         hint="pass the .gguf file itself (a pipe or device would block or change under the tools)")
    os.set_blocking(fd, True)
    with os.fdopen(fd, "rb") as fh:
        size = st.st_size
        if size < 24:
            raise ModelError(f"not a GGUF file ({size} bytes, too small for a GGUF header)",
                             where=str(p), hint="pass a .gguf model file")
        with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            return _parse(mm, p, size, shard)


def _parse(buf, path: Path, size: int, shard: int) -> GGUFHeader:
    cur = _Cursor(buf, path)
    magic = bytes(buf[0:4])
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
    kv: dict[str, object] = {}
    kv_types: dict[str, GGUFValueType] = {}
    kv_sizes: dict[str, int] = {}
    for _ in range(n_kv):
        start = cur.pos
        key = cur.string("metadata key")
        vtype = cur.unpack("<I", key)
        vt, value = _value(cur, vtype, key)
        kv[key] = value
        kv_types[key] = vt
        kv_sizes[key] = cur.pos - start
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
    hdr = GGUFHeader(path, version, kv, kv_types, tensors, alignment, data_offset, size, header_end, kv_sizes)
    if hdr.data_end > size:
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


def _file_kind(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "FIFO / named pipe"
    if stat.S_ISCHR(mode):
        return "character device"
    if stat.S_ISBLK(mode):
        return "block device"
    if stat.S_ISSOCK(mode):
        return "socket"
    return "special file"


def _gguf_version() -> str:
    try:
        from importlib.metadata import version
        return version("gguf")
    except Exception:  # pragma: no cover
        return "(unknown version)"
