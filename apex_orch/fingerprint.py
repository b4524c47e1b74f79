"""Fingerprints of inputs, cheap enough for 240 GB files.

`fast_fingerprint`: file size + sha256 of the first 8 MiB (the GGUF header with all
metadata and tensor offsets) + sha256 of 16 blocks of 64 KiB sampled at fixed
fractions of the file. It changes when the header, the size or any sampled block
changes; it does not prove every byte equal (use `sha256_file` for that — outputs
always get a full sha256). Split models: fingerprint each shard, in order.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

HEAD_BYTES = 8 << 20
SAMPLE_BYTES = 64 << 10
SAMPLES = 16
SCHEME = "fast-v1"


def fast_fingerprint(path: str | os.PathLike) -> str:
    p = Path(path)
    size = p.stat().st_size
    h = hashlib.sha256()
    h.update(f"{SCHEME}:{size}:".encode())
    with open(p, "rb") as fh:
        h.update(fh.read(HEAD_BYTES))
        if size > HEAD_BYTES:
            for i in range(SAMPLES):
                offset = HEAD_BYTES + (size - HEAD_BYTES - SAMPLE_BYTES) * i // max(1, SAMPLES - 1)
                fh.seek(max(HEAD_BYTES, offset))
                h.update(fh.read(SAMPLE_BYTES))
    return f"{SCHEME}:{size}:{h.hexdigest()[:32]}"


def sha256_file(path: str | os.PathLike, chunk: int = 4 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
