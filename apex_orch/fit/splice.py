"""Spliced GGUFs: the source model with some tensors taken, byte for byte, from quantized files.

Measuring "this group alone at Q3_K" does not need a quantization per measurement: llama-quantize
quantizes each tensor on its own (its rows, its type, its importance-matrix entry), so the bytes a
group gets in a file where only it is Q3_K are the bytes it gets in a file where everything is
Q3_K. `write_spliced` assembles such a file from the source and one uniform quantization per
ladder type: the source's preamble and metadata verbatim, new tensor infos, each tensor's data
copied from its donor. tests/test_fit.py checks the result against llama-quantize run with the
equivalent rules, byte for byte in every tensor.
"""

from __future__ import annotations

import contextlib
import struct
from pathlib import Path
from typing import Any

from apex_orch.core.errors import ModelError
from apex_orch.core.infiles import open_input
from apex_orch.core.safefiles import write_atomic_with
from apex_orch.model.gguf_header import GGUFHeader, read_header

COPY_CHUNK = 8 << 20
NOT_COPIED = ("general.file_type", "general.quantization_version")


def _tensor_info(name: str, shape: tuple[int, ...], ggml_type: int, offset: int) -> bytes:
    raw = name.encode()
    return (struct.pack("<Q", len(raw)) + raw + struct.pack("<I", len(shape))
            + b"".join(struct.pack("<Q", d) for d in shape) + struct.pack("<I", ggml_type)
            + struct.pack("<Q", offset))


def write_spliced(source: Path, donors: dict[str, Path], out: Path) -> Path:
    """Write `out`: `source` with each tensor named in `donors` replaced by that donor's tensor.

    The donor tensor must have the source tensor's shape; its type may differ (that is the point).
    Written under a temporary name and renamed, so `out` is never partial.
    """
    src = read_header(source)
    if src.kv.get("split.count", 1) not in (None, 1):
        raise ModelError("sensitivity measurement needs a single-file model", where=str(source),
                         hint="merge the parts first: llama-gguf-split --merge FIRST-PART OUT.gguf")
    headers: dict[Path, GGUFHeader] = {}
    plan: list[tuple[str, tuple[int, ...], int, Path, int, int]] = []   # name, shape, type, file, abs offset, bytes
    for t in src.tensors:
        donor = donors.get(t.name)
        if donor is None:
            plan.append((t.name, t.shape, int(t.ggml_type), source, src.data_offset + t.offset, t.n_bytes))
            continue
        h = headers.get(donor)
        if h is None:
            h = headers[donor] = read_header(donor)
            # llama-quantize copies the source's metadata; a donor whose differs came from another model
            differs = [k for k, v in src.kv.items() if k not in NOT_COPIED and h.kv.get(k) != v]
            if differs:
                raise ModelError(f"{donor.name} is not a quantization of {source.name}: its metadata differs "
                                 f"({', '.join(differs[:3])})", where=str(donor),
                                 hint="the donor must be a quantization of this very source")
        d = next((x for x in h.tensors if x.name == t.name), None)
        if d is None or d.shape != t.shape:
            raise ModelError(f"{donor.name} has no tensor {t.name} of shape {t.shape}", where=str(donor),
                             hint="the donor must be a quantization of this very source")
        plan.append((t.name, t.shape, int(d.ggml_type), donor, h.data_offset + d.offset, d.n_bytes))
    align = src.alignment
    pad = lambda n: (n + align - 1) // align * align  # noqa: E731
    infos, offset = [], 0
    for name, shape, gtype, _, _, n in plan:
        infos.append(_tensor_info(name, shape, gtype, offset))
        offset += pad(n)
    kv_end = 24 + sum(src.kv_sizes.values())

    def fill(fo) -> None:
        with open_input(source, "model") as fh:
            fo.write(fh.read(kv_end))      # preamble + metadata, verbatim
        for info in infos:
            fo.write(info)
        fo.write(b"\0" * (pad(fo.tell()) - fo.tell()))
        files: dict[Path, Any] = {}
        try:
            with contextlib.ExitStack() as opened:
                for _, _, _, path, start, n in plan:
                    fi = files.get(path) or files.setdefault(path, opened.enter_context(open_input(path, "model")))
                    fi.seek(start)
                    left = n
                    while left:
                        buf = fi.read(min(COPY_CHUNK, left))
                        if not buf:
                            raise ModelError(f"{path.name} ended inside a tensor", where=str(path))
                        fo.write(buf)
                        left -= len(buf)
                    fo.write(b"\0" * (pad(n) - n))
        finally:
            files.clear()

    return write_atomic_with(out, fill)
