"""The base model's log-probabilities, computed once and kept on disk for KL divergence.

What is stored (and why it is enough)
-------------------------------------
llama-perplexity's own `--kl-divergence-base` file keeps, for every scored token, the base
model's log-probabilities over the whole vocabulary as uint16 with a per-token scale:

    max_l = max(logits); min_l = max(min(logits), max_l - 16)
    lse   = log(sum(exp(logits - max_l)))                      (double sum, float log)
    scale = (max_l - min_l) / 65535;  min_log_prob = min_l - max_l - lse
    q[i]  = round((logits[i] - min_l) / scale)  if logits[i] > min_l else 0
    log p[i] ~= scale * q[i] + min_log_prob

and every statistic it prints reads only three things from that: log p of the scored token,
the argmax of q (for "Same top p"), and the entries with log p > -16 (the KLD sum skips the
rest). We store exactly the same quantized values, so our statistics equal the tool's up to
float rounding order, with two changes that make the file compact:

1. entries the tool ignores (log p <= -16 nats, except the scored token) are set to 0 — for
   a real 131k-vocabulary model that is most of the row;
2. a chunk whose [n_scored, n_vocab] uint16 block is mostly zeros is stored byte-planed (all
   high bytes, then all low bytes) and deflated; a dense one (near-uniform distributions, as
   in random synthetic models) is stored raw — deflate saves ~10% there at ~10 MB/s.

Error bound against the exact (unquantized) base distribution: every stored log-prob is within
scale/2 <= 16/65535/2 = 1.22e-4 nats of the exact value, so each token's KLD is off by at most
about 1.22e-4 * (1 + E_p|log p/q|) nats, a rounding error of either sign that averages out over
the tokens; plus the probability mass below e^-16 that the tool itself drops. Against
llama-perplexity (the reference) the difference is only float summation order.

File layout (a ZIP archive; every member but meta.json is a .npy array)::

    meta.json            format, inputs (base fingerprint, text sha256, settings), n_ctx,
                         n_vocab, n_chunks, first, n_scored, vocabulary sample, base PPL
    tokens.npy           int32 [n_chunks * n_ctx]   the evaluated tokens (tool layout)
    scale.npy            float32 [n_chunks, n_scored]
    min_log_prob.npy     float32 [n_chunks, n_scored]
    nll.npy              float64 [n_chunks, n_scored]  exact base -log p(token) (unquantized)
    chunks/NNNNN.bin     codec byte (0 raw <u2, 1 deflated byte planes) + uint16 [n_scored, n_vocab]

Writes go to a temp file in the cache folder and are renamed into place when complete.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import struct
import tempfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from apex_orch.core import settings
from apex_orch.core.errors import EvalError
from apex_orch.core.infiles import open_checked, parse_json

FORMAT = "apex-orch-base-logprobs"
FORMAT_VERSION = 1
LOG_PROB_FLOOR = -16.0        # llama-perplexity skips base log-probs at or below this
ZLIB_LEVEL = 1                # fast; the zero runs do most of the work


def cache_dir() -> Path:
    """<cache>/eval, or $APEX_ORCH_EVAL_CACHE (tests point it at a temp folder)."""
    return settings.eval_cache_dir()


def cache_key(inputs: dict) -> str:
    """Stable key for a dict of inputs (base fingerprint, text sha256, ctx, chunks, settings)."""
    blob = json.dumps({"format": FORMAT, "version": FORMAT_VERSION, **inputs}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def cache_path(inputs: dict) -> Path:
    return cache_dir() / "base" / f"{cache_key(inputs)[:24]}.zip"


# --------------------------------------------------------------------------- quantization

@dataclass
class QuantizedRows:
    """The tool's per-token uint16 log-probs for a block of rows."""
    q: np.ndarray              # uint16 [rows, n_vocab]
    scale: np.ndarray          # float32 [rows]
    min_log_prob: np.ndarray   # float32 [rows]
    nll: np.ndarray            # float64 [rows], exact -log p(target)


def quantize_rows(logits: np.ndarray, targets: np.ndarray) -> QuantizedRows:
    """Quantize float32 logits [rows, n_vocab] exactly as llama-perplexity's log_softmax does
    when it writes --kl-divergence-base, then zero the entries it never reads."""
    logits = np.asarray(logits, dtype=np.float32)
    rows = logits.shape[0]
    max_l = logits.max(axis=1)
    min_l = np.maximum(logits.min(axis=1), max_l - np.float32(16))
    sum_exp = np.exp(logits - max_l[:, None]).sum(axis=1, dtype=np.float64)
    log_sum_exp = np.log(sum_exp).astype(np.float32)
    min_log_prob = (min_l - max_l - log_sum_exp).astype(np.float32)
    scale = ((max_l - min_l) / np.float32(65535)).astype(np.float32)
    with np.errstate(divide="ignore"):
        inv_scale = np.where(scale > 0, np.float32(1) / scale, np.float32(0)).astype(np.float32)
    shifted = (logits - min_l[:, None]) * inv_scale[:, None]          # float32, like the tool
    q = np.where(logits > min_l[:, None], np.rint(shifted), 0).astype(np.uint16)
    # -log p(target) the way the tool's perplexity pass computes it: float diff, double log.
    idx = np.arange(rows)
    target_logit = logits[idx, targets]
    nll = -((target_logit - max_l).astype(np.float64) - np.log(sum_exp))
    # Drop what the KLD sum skips (log p <= -16), keeping the scored token's own entry.
    log_p = scale[:, None] * q.astype(np.float32) + min_log_prob[:, None]
    ignored = log_p <= np.float32(LOG_PROB_FLOOR)
    ignored[idx, targets] = False
    q[ignored] = 0
    return QuantizedRows(q, scale, min_log_prob, nll)


CODEC_RAW = 0                  # little-endian uint16 as is
CODEC_PLANES_ZLIB = 1          # high bytes, then low bytes, deflated
DEFLATE_MIN_ZERO_FRACTION = 0.5


def _pack(q: np.ndarray) -> bytes:
    """One chunk's bytes: a codec byte, then the payload. Deflate only pays when most entries
    were zeroed (real vocabularies); near-uniform rows (random synthetic models) stay raw,
    because deflating high-entropy uint16 saves ~10% at ~10 MB/s."""
    q = np.ascontiguousarray(q.astype("<u2"))
    if np.count_nonzero(q) <= (1.0 - DEFLATE_MIN_ZERO_FRACTION) * q.size:
        planes = q.view(np.uint8).reshape(-1, 2)
        payload = zlib.compress(planes[:, 1].tobytes() + planes[:, 0].tobytes(), ZLIB_LEVEL)
        return bytes([CODEC_PLANES_ZLIB]) + payload
    return bytes([CODEC_RAW]) + q.tobytes()


def _unpack(data: bytes, shape: tuple[int, int]) -> np.ndarray:
    n = shape[0] * shape[1]
    codec, payload = data[0], memoryview(data)[1:]
    if codec == CODEC_RAW:
        raw = np.frombuffer(payload, dtype="<u2")
        if raw.size == n:
            return raw.reshape(shape)
    elif codec == CODEC_PLANES_ZLIB:
        planes = np.frombuffer(zlib.decompress(payload), dtype=np.uint8)
        if planes.size == 2 * n:
            out = np.empty((n, 2), dtype=np.uint8)
            out[:, 1] = planes[:n]
            out[:, 0] = planes[n:]
            return out.reshape(-1).view("<u2").reshape(shape)
    raise EvalError("base log-prob cache is corrupt (a chunk has the wrong size or codec)",
                    hint="delete the cache file; it will be recomputed")


# --------------------------------------------------------------------------- writing

class BaseCacheWriter:
    """Stream chunks into a temp ZIP next to `path`; `commit()` renames it into place."""

    def __init__(self, path: Path, meta: dict, tokens: np.ndarray):
        self.path = path
        self.meta = dict(meta)
        self.n_chunks = int(meta["n_chunks"])
        self.n_scored = int(meta["n_scored"])
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        self.tmp = Path(tmp)
        self._zip = zipfile.ZipFile(self.tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True)
        self._put_array("tokens.npy", np.asarray(tokens, dtype=np.int32))
        self._scale = np.zeros((self.n_chunks, self.n_scored), np.float32)
        self._min = np.zeros((self.n_chunks, self.n_scored), np.float32)
        self._nll = np.zeros((self.n_chunks, self.n_scored), np.float64)
        self._done = 0
        self.stored_bytes = 0

    def _put_array(self, name: str, arr: np.ndarray) -> None:
        buf = io.BytesIO()
        np.lib.format.write_array(buf, arr, allow_pickle=False)
        self._zip.writestr(zipfile.ZipInfo(name), buf.getvalue(), compress_type=zipfile.ZIP_DEFLATED)

    def add_chunk(self, index: int, rows: QuantizedRows) -> None:
        if index != self._done:
            raise ValueError(f"chunks must be added in order (got {index}, expected {self._done})")
        data = _pack(rows.q)
        self.stored_bytes += len(data)
        self._zip.writestr(zipfile.ZipInfo(f"chunks/{index:05d}.bin"), data)
        self._scale[index] = rows.scale
        self._min[index] = rows.min_log_prob
        self._nll[index] = rows.nll
        self._done += 1

    def commit(self, extra_meta: dict | None = None) -> Path:
        if self._done != self.n_chunks:
            raise ValueError(f"only {self._done} of {self.n_chunks} chunks were written")
        self._put_array("scale.npy", self._scale)
        self._put_array("min_log_prob.npy", self._min)
        self._put_array("nll.npy", self._nll)
        meta = {**self.meta, **(extra_meta or {})}
        self._zip.writestr("meta.json", json.dumps(meta, indent=1, sort_keys=True))
        self._zip.close()
        os.replace(self.tmp, self.path)
        return self.path

    def abort(self) -> None:
        try:
            self._zip.close()
        finally:
            self.tmp.unlink(missing_ok=True)


# --------------------------------------------------------------------------- reading

class BaseLogProbs:
    """Read access to a committed cache file."""

    def __init__(self, path: Path):
        self.path = Path(path)
        # core.infiles: the one way a file is opened (a FIFO planted in the cache is refused, not read)
        self._fh = open_checked(self.path, "eval-cache")
        try:
            self._zip = zipfile.ZipFile(self._fh, "r")
            self.meta = parse_json(self._zip.read("meta.json"), str(self.path), EvalError)
            if not isinstance(self.meta, dict) or self.meta.get("format") != FORMAT \
                    or self.meta.get("version") != FORMAT_VERSION:
                raise ValueError("not a base log-prob cache of this format")
            self.tokens = self._array("tokens.npy")
            self.scale = self._array("scale.npy")
            self.min_log_prob = self._array("min_log_prob.npy")
            self.nll = self._array("nll.npy")
            self.n_ctx = int(self.meta["n_ctx"])
            self.n_vocab = int(self.meta["n_vocab"])
            self.n_chunks = int(self.meta["n_chunks"])
            self.first = int(self.meta["first"])
            self.n_scored = int(self.meta["n_scored"])
        except (OSError, KeyError, ValueError, TypeError, EvalError, zipfile.BadZipFile) as exc:
            self._fh.close()
            raise EvalError(f"base log-prob cache is unreadable ({getattr(exc, 'message', exc)})",
                            where=str(self.path), hint="delete the file; it will be recomputed") from None

    def _array(self, name: str) -> np.ndarray:
        with self._zip.open(name) as fh:
            return np.lib.format.read_array(io.BytesIO(fh.read()), allow_pickle=False)

    def chunk(self, index: int) -> np.ndarray:
        """uint16 [n_scored, n_vocab] quantized log-probs of one chunk."""
        try:
            return _unpack(self._zip.read(f"chunks/{index:05d}.bin"), (self.n_scored, self.n_vocab))
        except (KeyError, IndexError, zlib.error, zipfile.BadZipFile) as exc:
            raise EvalError(f"base log-prob cache is corrupt (chunk {index}: {exc})", where=str(self.path),
                            hint="delete the file; it will be recomputed") from None

    def iter_chunks(self) -> Iterator[tuple[int, np.ndarray]]:
        for i in range(self.n_chunks):
            yield i, self.chunk(i)

    def close(self) -> None:
        self._zip.close()
        self._fh.close()

    def __enter__(self) -> "BaseLogProbs":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def size_bytes(self) -> int:
        return self.path.stat().st_size

    def dense_bytes(self) -> int:
        """What llama-perplexity's own base file for the same run weighs."""
        nv = 2 * ((self.n_vocab + 1) // 2) + 4
        return 20 + 4 * self.tokens.size + 2 * nv * self.n_scored * self.n_chunks


def write_tool_base_file(cache: BaseLogProbs, out: Path) -> Path:
    """Write llama-perplexity's `--kl-divergence-base` file from our cache (same numbers:
    the entries we zeroed are ones the tool skips). Lets `--backend llama-perplexity`
    reuse a cache and lets tests check the two formats against each other."""
    nv = 2 * ((cache.n_vocab + 1) // 2) + 4
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(b"_logits_")
            fh.write(struct.pack("<Iii", cache.n_ctx, cache.n_vocab, cache.n_chunks))
            fh.write(cache.tokens.astype("<i4").tobytes())
            for i, q in cache.iter_chunks():
                block = np.zeros((cache.n_scored, nv), dtype="<u2")
                head = np.stack([cache.scale[i], cache.min_log_prob[i]], axis=1).astype("<f4")
                block[:, :4] = head.view("<u2")
                block[:, 4:4 + cache.n_vocab] = q
                fh.write(block.tobytes())
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out
