"""Perplexity and KL divergence, in-process with the bindings, equal to llama-perplexity.

What llama-perplexity does (tools/perplexity/perplexity.cpp in the pinned tree), and so what
we do: the text (one trailing newline dropped, like `-f`) is tokenized with the model's
special tokens added (BOS) and without parsing special tokens; it is cut into
floor(n_tokens / n_ctx) chunks of n_ctx tokens (`--chunks` caps that); each chunk is decoded
from an empty KV cache with its first token replaced by BOS (when the vocabulary adds one);
only the second half is scored: positions first = n_ctx/2 .. n_ctx-2 predict the next token,
n_ctx - 1 - first tokens per chunk. PPL = exp(mean NLL); its error is
ppl * sqrt((mean(NLL^2) - mean(NLL)^2) / (count - 1)).

With a base model, the base's log-probs are computed once (see evalcache) and the tool's KL
statistics are reproduced: the same sums, the same percentile interpolation (float32), the
same names. Numbers change with flash attention, batch size and (a little) the KV layout,
so those settings are explicit (`EvalSettings`) and recorded in every result; batch = ctx,
one sequence per batch, flash attention on (what the tool's `auto` picks on CPU).

`--backend llama-perplexity` runs the binary with the same settings and parses its records
into the same `EvalResult`.

Public entry points: `plan_eval` / `run_eval` / `evaluate`, `measure_speed`, `check_gates`,
`Gates`, `EvalSettings`, `EvalResult`, `KLDStats`, `SpeedResult`.
"""

from __future__ import annotations

import ctypes
import dataclasses
import hashlib
import json
import math
import os
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import numpy as np

from apex_orch.evaluation import base_cache as evalcache
from apex_orch.core.errors import EvalError, GateFailedError, ModelError, UsageError

Progress = Callable[[str], None]
BACKENDS = ("bindings", "llama-perplexity")
MIN_KLD_TOKENS = 100            # llama-perplexity prints no statistics below this
ROW_BLOCK = 64                  # rows of logits processed at once (bounds memory for 131k vocabs)


def default_threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


# --------------------------------------------------------------------------- settings

@dataclass(frozen=True)
class EvalSettings:
    """Everything that changes the numbers (or the speed) of an evaluation.

    n_batch None means n_batch = n_ctx (one decode per chunk, like the tool with -b = -c).
    flash_attn True matches the tool's default `auto` on CPU.
    """
    n_ctx: int = 512
    chunks: int | None = None          # None: every full chunk of the text
    n_batch: int | None = None
    n_ubatch: int = 512
    n_threads: int = field(default_factory=default_threads)
    flash_attn: bool = True
    repack: bool = False               # llama.cpp "extra buffer types" (CPU repack / AMX); tool: -nr when off

    def __post_init__(self) -> None:
        if self.n_ctx < 16 or self.n_ctx % 2:
            raise UsageError(f"context {self.n_ctx} must be an even number >= 16")
        if self.chunks is not None and self.chunks < 1:
            raise UsageError(f"--chunks {self.chunks} must be >= 1")
        if self.n_batch is not None and not (1 <= self.n_batch <= self.n_ctx):
            raise UsageError(
                f"batch {self.n_batch} must be between 1 and the context {self.n_ctx}",
                hint="a batch larger than the context packs several chunks per decode, which changes "
                     "the numbers; leave --batch unset (= context)")
        if self.n_ubatch < 1 or self.n_threads < 1:
            raise UsageError("--ubatch and --threads must be >= 1")

    @property
    def batch(self) -> int:
        return self.n_batch or self.n_ctx

    @property
    def ubatch(self) -> int:
        return min(self.n_ubatch, self.batch)

    @property
    def first(self) -> int:
        return self.n_ctx // 2

    @property
    def scored_per_chunk(self) -> int:
        return self.n_ctx - 1 - self.first

    def numeric_key(self) -> dict:
        """The settings that change the base logits (threads do not: ggml splits rows, not sums)."""
        return {"n_ctx": self.n_ctx, "chunks": self.chunks, "n_batch": self.batch,
                "n_ubatch": self.ubatch, "flash_attn": self.flash_attn, "repack": self.repack}

    def to_dict(self) -> dict:
        return {"n_ctx": self.n_ctx, "chunks": self.chunks, "n_batch": self.batch, "n_ubatch": self.ubatch,
                "n_threads": self.n_threads, "flash_attn": self.flash_attn, "repack": self.repack}


# --------------------------------------------------------------------------- results

@dataclass
class KLDStats:
    """llama-perplexity's KL-divergence block. Percent values (cor, Δp, same top p) are in
    percent, as the tool prints them; the rest are plain numbers."""
    mean_ppl_q: float
    mean_ppl_q_err: float
    mean_ppl_base: float
    mean_ppl_base_err: float
    cor_ln_ppl: float                  # Cor(ln(PPL(Q)), ln(PPL(base))), %
    mean_ln_ppl_ratio: float
    mean_ln_ppl_ratio_err: float
    mean_ppl_ratio: float
    mean_ppl_ratio_err: float
    mean_ppl_diff: float
    mean_ppl_diff_err: float
    kld_mean: float
    kld_mean_err: float
    kld_max: float
    kld_p999: float
    kld_p990: float
    kld_p950: float
    kld_p900: float
    kld_median: float
    kld_p100: float
    kld_p050: float
    kld_p010: float
    kld_p001: float
    kld_min: float
    dp_mean: float                     # Mean Δp, %
    dp_mean_err: float
    dp_max: float
    dp_p999: float
    dp_p990: float
    dp_p950: float
    dp_p900: float
    dp_p750: float
    dp_median: float
    dp_p250: float
    dp_p100: float
    dp_p050: float
    dp_p010: float
    dp_p001: float
    dp_min: float
    rms_dp: float                      # RMS Δp, %
    rms_dp_err: float
    same_top_p: float                  # Same top p, %
    same_top_p_err: float
    count: int = 0


# (tool label, field, error field or None, unit suffix) in the order the tool prints them.
KLD_LINES: tuple[tuple[str, str, str | None, str], ...] = (
    ("Mean PPL(Q)", "mean_ppl_q", "mean_ppl_q_err", ""),
    ("Mean PPL(base)", "mean_ppl_base", "mean_ppl_base_err", ""),
    ("Cor(ln(PPL(Q)), ln(PPL(base)))", "cor_ln_ppl", None, "%"),
    ("Mean ln(PPL(Q)/PPL(base))", "mean_ln_ppl_ratio", "mean_ln_ppl_ratio_err", ""),
    ("Mean PPL(Q)/PPL(base)", "mean_ppl_ratio", "mean_ppl_ratio_err", ""),
    ("Mean PPL(Q)-PPL(base)", "mean_ppl_diff", "mean_ppl_diff_err", ""),
    ("Mean    KLD", "kld_mean", "kld_mean_err", ""),
    ("Maximum KLD", "kld_max", None, ""),
    ("99.9%   KLD", "kld_p999", None, ""),
    ("99.0%   KLD", "kld_p990", None, ""),
    ("95.0%   KLD", "kld_p950", None, ""),
    ("90.0%   KLD", "kld_p900", None, ""),
    ("Median  KLD", "kld_median", None, ""),
    ("10.0%   KLD", "kld_p100", None, ""),
    (" 5.0%   KLD", "kld_p050", None, ""),
    (" 1.0%   KLD", "kld_p010", None, ""),
    (" 0.1%   KLD", "kld_p001", None, ""),
    ("Minimum KLD", "kld_min", None, ""),
    ("Mean    Δp", "dp_mean", "dp_mean_err", "%"),
    ("Maximum Δp", "dp_max", None, "%"),
    ("99.9%   Δp", "dp_p999", None, "%"),
    ("99.0%   Δp", "dp_p990", None, "%"),
    ("95.0%   Δp", "dp_p950", None, "%"),
    ("90.0%   Δp", "dp_p900", None, "%"),
    ("75.0%   Δp", "dp_p750", None, "%"),
    ("Median  Δp", "dp_median", None, "%"),
    ("25.0%   Δp", "dp_p250", None, "%"),
    ("10.0%   Δp", "dp_p100", None, "%"),
    (" 5.0%   Δp", "dp_p050", None, "%"),
    (" 1.0%   Δp", "dp_p010", None, "%"),
    (" 0.1%   Δp", "dp_p001", None, "%"),
    ("Minimum Δp", "dp_min", None, "%"),
    ("RMS Δp", "rms_dp", "rms_dp_err", "%"),
    ("Same top p", "same_top_p", "same_top_p_err", "%"),
)


@dataclass
class SpeedResult:
    """llama-bench-like throughput through the bindings (random tokens, empty cache)."""
    pp_tokens: int
    pp_tokens_per_s: float
    tg_tokens: int
    tg_tokens_per_s: float
    n_threads: int
    n_batch: int
    n_ubatch: int
    flash_attn: bool
    repetitions: int


@dataclass
class ModelFacts:
    path: str
    fingerprint: str
    size_bytes: int
    n_params: int
    bpw: float
    tier: str
    arch: str
    name: str


@dataclass
class TextFacts:
    label: str                  # the file path, or corpus:NAME
    path: str                   # a file llama-perplexity can read (-f)
    sha256: str                 # of the file's bytes
    n_bytes: int


@dataclass
class EvalResult:
    model: ModelFacts
    backend: str
    settings: dict
    text: TextFacts
    n_tokens: int | None        # tokens in the text (with BOS); None: llama-perplexity does not print it
    n_chunks: int
    n_scored: int               # tokens scored in total
    ppl: float
    ppl_err: float
    base: ModelFacts | None = None
    base_ppl: float | None = None        # exact base PPL (perplexity mode) when a base is given
    base_ppl_err: float | None = None
    kld: KLDStats | None = None
    speed: SpeedResult | None = None
    seconds: float = 0.0
    eval_tokens_per_s: float | None = None  # decode throughput during the evaluation
    llama_build: str = ""
    cache: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def ppl_ratio(self) -> float | None:
        return self.kld.mean_ppl_ratio if self.kld else None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, ensure_ascii=False, allow_nan=True)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "EvalResult":
        d = dict(data)
        d["model"] = ModelFacts(**d["model"])
        d["text"] = TextFacts(**d["text"])
        d["base"] = ModelFacts(**d["base"]) if d.get("base") else None
        d["kld"] = KLDStats(**d["kld"]) if d.get("kld") else None
        d["speed"] = SpeedResult(**d["speed"]) if d.get("speed") else None
        return cls(**d)


# --------------------------------------------------------------------------- model facts

_QUANT_RE = re.compile(r"(?i)(?:^|[-_.])((?:IQ|Q)\d(?:_[A-Z0-9]+)*|BF16|F16|F32|MXFP4(?:_MOE)?)(?=$|[-_.])")
# "<Model>-APEX-<Tier>.gguf" (the name apex-orch quantize writes); not a name that starts with "apex-".
_APEX_RE = re.compile(r"(?i)[-_.]apex[-_.]([a-z][a-z0-9]*(?:[-_][a-z0-9]+)*?)(?=$|[-_.]gguf|-\d{5}-of-)")


def tier_of(kv: Mapping[str, Any], path: Path) -> str:
    """APEX tier: the metadata apex-orch quantize stamps (`apex.tier`, the display name, else
    `apex.profile`), else the file name (APEX-<tier>, or a llama quant type such as Q4_K_M),
    else general.file_type, else '?'."""
    for key in ("apex.tier", "apex.profile"):
        value = kv.get(key)
        if isinstance(value, str) and value.strip():
            return value.strip()
    stem = path.name[:-5] if path.name.endswith(".gguf") else path.name
    m = _APEX_RE.search(stem)
    if m:
        return m.group(1)
    m = _QUANT_RE.search(stem)
    if m:
        return m.group(1).upper()
    ftype = kv.get("general.file_type")
    if isinstance(ftype, int):
        try:
            from gguf.constants import LlamaFileType
            return LlamaFileType(ftype).name.removeprefix("MOSTLY_")
        except ValueError:
            pass
    return "?"


def model_facts(path: str | os.PathLike, *, fingerprint: bool = True) -> ModelFacts:
    """Size, bits per weight and tier from the GGUF header (raises ModelError for a corrupt or
    non-GGUF file). `fingerprint`: the full sha256 of every shard (memoised by stat under
    <cache>/hashes: ~3 min once for a 240 GB base, then free) — the base log-prob cache's key, so a
    base whose bytes changed is a new key. Not needed (False) for a file that is only evaluated."""
    from apex_orch.core.fingerprint import source_sha256
    from apex_orch.model.info import read_model

    p = Path(path)
    info = read_model(p)
    n_params = info.total_parameters
    data_bytes = sum(t.n_bytes for t in info.tensors)
    digest = ",".join(source_sha256(sp) for sp in info.paths) if fingerprint else ""
    return ModelFacts(path=str(p), fingerprint=digest, size_bytes=info.file_size,
                      n_params=n_params, bpw=8.0 * data_bytes / n_params if n_params else 0.0,
                      tier=tier_of(info.kv, p), arch=info.arch, name=info.name)


# --------------------------------------------------------------------------- text

def text_facts(text: str | os.PathLike | None = None, corpus: str | None = None) -> TextFacts:
    """The evaluation text: a file, or a corpus built by name (plain format, so that no special
    tokens are parsed — the tool never parses them) and written under the cache."""
    if (text is None) == (corpus is None):
        raise UsageError("give exactly one of --text FILE or --corpus NAME")
    if text is not None:
        p = Path(text)
        try:
            data = p.read_bytes()
        except FileNotFoundError:
            raise EvalError("evaluation text not found", where=str(p), hint="check the --text path") from None
        except IsADirectoryError:
            raise EvalError("evaluation text is a folder", where=str(p)) from None
        return TextFacts(label=str(p), path=str(p), sha256=hashlib.sha256(data).hexdigest(), n_bytes=len(data))
    from apex_orch.calibration import corpus as corpus_mod

    built = corpus_mod.build_corpus(corpus)
    data = built.data
    sha = hashlib.sha256(data).hexdigest()
    out = evalcache.cache_dir() / "texts" / f"{Path(str(corpus)).stem}-{sha[:16]}.txt"
    if not out.is_file() or hashlib.sha256(out.read_bytes()).hexdigest() != sha:
        corpus_mod.atomic_write_bytes(out, data)
    return TextFacts(label=f"corpus:{corpus}", path=str(out), sha256=sha, n_bytes=len(data))


def read_text_bytes(facts: TextFacts) -> bytes:
    """The bytes llama-perplexity tokenizes: the file with one trailing newline removed (-f)."""
    data = Path(facts.path).read_bytes()
    if hashlib.sha256(data).hexdigest() != facts.sha256:
        raise EvalError("evaluation text changed while it was being used", where=facts.path)
    return data[:-1] if data.endswith(b"\n") else data


# --------------------------------------------------------------------------- bindings session

_LOG_CALLBACK = None


def _llama():
    """The bindings, with llama.cpp's log chatter routed nowhere unless APEX_ORCH_DEBUG is set."""
    global _LOG_CALLBACK
    from apex_orch.llama.bindings import load_llama_cpp

    ll = load_llama_cpp()
    if _LOG_CALLBACK is None:
        verbose = os.environ.get("APEX_ORCH_DEBUG", "") not in ("", "0")

        @ll.llama_log_callback
        def _log(level, text, _user):  # pragma: no cover - only prints
            if verbose or level == 3:  # GGML_LOG_LEVEL_ERROR
                import sys
                sys.stderr.write(text.decode("utf-8", errors="replace"))

        _LOG_CALLBACK = _log
        ll.llama_log_set(_LOG_CALLBACK, ctypes.c_void_p(0))
        ll.llama_backend_init()
    return ll


class BindingsModel:
    """A model loaded through llama_cpp's C API (no high-level wrapper: we build the exact
    batches llama-perplexity builds)."""

    def __init__(self, path: str | os.PathLike, *, vocab_only: bool = False, repack: bool = False):
        self.ll = ll = _llama()
        self.path = Path(path)
        params = ll.llama_model_default_params()
        params.vocab_only = vocab_only
        params.use_extra_bufts = repack
        self.model = ll.llama_model_load_from_file(str(self.path).encode(), params)
        if not self.model:
            raise ModelError("llama.cpp could not load this model", where=str(self.path),
                             hint="run with APEX_ORCH_DEBUG=1 to see llama.cpp's reason; the file may be "
                                  "damaged or of an architecture the pinned llama.cpp does not know")
        self.vocab = ll.llama_model_get_vocab(self.model)
        self.n_vocab = int(ll.llama_vocab_n_tokens(self.vocab))
        self.add_bos = bool(ll.llama_vocab_get_add_bos(self.vocab))
        self.bos = int(ll.llama_vocab_bos(self.vocab))

    def tokenize(self, data: bytes) -> np.ndarray:
        """common_tokenize(ctx, text, add_special=true, parse_special=false)."""
        n_max = len(data) + 2
        buf = (self.ll.llama_token * n_max)()
        n = self.ll.llama_tokenize(self.vocab, data, len(data), buf, n_max, True, False)
        if n < 0:
            n_max = -n
            buf = (self.ll.llama_token * n_max)()
            n = self.ll.llama_tokenize(self.vocab, data, len(data), buf, n_max, True, False)
        return np.ctypeslib.as_array(buf)[:n].astype(np.int32)

    def token_text(self, token: int) -> str:
        raw = self.ll.llama_vocab_get_text(self.vocab, token)
        return raw.decode("utf-8", errors="replace") if raw else ""

    def vocab_signature(self) -> dict:
        """n_vocab, a few token strings and a hash of them all (to refuse a foreign base)."""
        h = hashlib.sha256()
        for i in range(self.n_vocab):
            h.update(self.token_text(i).encode("utf-8", errors="replace") + b"\0")
        picks = sorted({0, 1, 2, min(100, self.n_vocab - 1), self.n_vocab // 2, self.n_vocab - 1})
        return {"n_vocab": self.n_vocab, "add_bos": self.add_bos, "bos": self.bos,
                "sample": {str(i): self.token_text(i) for i in picks}, "sha256": h.hexdigest()}

    def context(self, *, n_ctx: int, n_batch: int, n_ubatch: int, n_threads: int,
                flash_attn: bool) -> "BindingsContext":
        return BindingsContext(self, n_ctx=n_ctx, n_batch=n_batch, n_ubatch=n_ubatch,
                               n_threads=n_threads, flash_attn=flash_attn)

    def close(self) -> None:
        if self.model:
            self.ll.llama_model_free(self.model)
            self.model = None

    def __enter__(self) -> "BindingsModel":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class BindingsContext:
    """One llama_context with the parameters llama-perplexity's common_params give it."""

    def __init__(self, model: BindingsModel, *, n_ctx: int, n_batch: int, n_ubatch: int,
                 n_threads: int, flash_attn: bool):
        ll = self.ll = model.ll
        self.model = model
        self.n_vocab = model.n_vocab
        self.n_batch = n_batch
        cp = ll.llama_context_default_params()
        cp.n_ctx = n_ctx
        cp.n_batch = n_batch
        cp.n_ubatch = n_ubatch
        cp.n_seq_max = 1
        cp.n_threads = n_threads
        cp.n_threads_batch = n_threads
        cp.flash_attn_type = ll.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash_attn else ll.LLAMA_FLASH_ATTN_TYPE_DISABLED
        cp.swa_full = False          # common_params default (the C default is true)
        cp.kv_unified = False
        cp.no_perf = False
        self.ctx = ll.llama_init_from_model(model.model, cp)
        if not self.ctx:
            raise EvalError(f"llama.cpp could not create a context (n_ctx={n_ctx}, n_batch={n_batch})",
                            where=str(model.path), hint="lower the context or free memory")
        self.batch = ll.llama_batch_init(n_batch, 0, 1)
        self._tok = np.ctypeslib.as_array(self.batch.token, shape=(n_batch,))
        self._pos = np.ctypeslib.as_array(self.batch.pos, shape=(n_batch,))
        self._nseq = np.ctypeslib.as_array(self.batch.n_seq_id, shape=(n_batch,))
        self._out = np.ctypeslib.as_array(self.batch.logits, shape=(n_batch,))
        for i in range(n_batch):
            self.batch.seq_id[i][0] = 0
        self._nseq[:] = 1

    def clear(self) -> None:
        self.ll.llama_memory_clear(self.ll.llama_get_memory(self.ctx), True)

    def decode(self, tokens: np.ndarray, pos0: int, outputs: np.ndarray) -> int:
        """Decode tokens at positions pos0.. in sequence 0; `outputs` marks rows that want logits."""
        n = len(tokens)
        self._tok[:n] = tokens
        self._pos[:n] = np.arange(pos0, pos0 + n, dtype=np.int32)
        self._out[:n] = outputs.astype(np.int8)
        self.batch.n_tokens = n
        ret = self.ll.llama_decode(self.ctx, self.batch)
        if ret != 0:
            raise EvalError(f"llama_decode failed (code {ret})", where=str(self.model.path),
                            hint="run with APEX_ORCH_DEBUG=1 to see llama.cpp's log")
        return int(outputs.sum())

    def logits(self, n_outputs: int) -> np.ndarray:
        """View of the last decode's logits, [n_outputs, n_vocab] float32 (valid until the next decode)."""
        ptr = self.ll.llama_get_logits(self.ctx)
        return np.ctypeslib.as_array(ptr, shape=(n_outputs, self.n_vocab))

    def synchronize(self) -> None:
        self.ll.llama_synchronize(self.ctx)

    def close(self) -> None:
        if self.ctx:
            self.ll.llama_batch_free(self.batch)
            self.ll.llama_free(self.ctx)
            self.ctx = None

    def __enter__(self) -> "BindingsContext":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _chunk_logits(cx: BindingsContext, tokens: np.ndarray, start: int, settings: EvalSettings,
                  add_bos: bool, bos: int) -> np.ndarray:
    """Decode one chunk like llama-perplexity and return the logits of positions first..n_ctx-1."""
    n_ctx, n_batch, first = settings.n_ctx, settings.batch, settings.first
    chunk = tokens[start:start + n_ctx].copy()
    if add_bos:
        chunk[0] = bos
    cx.clear()
    pos = np.arange(n_ctx)
    n_batches = (n_ctx + n_batch - 1) // n_batch
    if n_batches == 1:
        n_out = cx.decode(chunk, 0, pos >= first)
        return cx.logits(n_out)
    parts = []
    for j in range(n_batches):
        lo, hi = j * n_batch, min(n_ctx, (j + 1) * n_batch)
        n_out = cx.decode(chunk[lo:hi], lo, pos[lo:hi] >= first)
        if n_out:
            parts.append(cx.logits(n_out).copy())
    return np.concatenate(parts, axis=0)


def _n_chunks(n_tokens: int, settings: EvalSettings, model_label: str) -> tuple[int, list[str]]:
    if n_tokens < 2 * settings.n_ctx:
        raise EvalError(
            f"the evaluation text is too short: {n_tokens} tokens, but a context of {settings.n_ctx} "
            f"needs at least {2 * settings.n_ctx}", where=model_label,
            hint="use a longer text (--text/--corpus) or a smaller context (-c)")
    n_max = n_tokens // settings.n_ctx
    notes = []
    if settings.chunks is not None and settings.chunks > n_max:
        notes.append(f"--chunks {settings.chunks} asked for more than the text holds; "
                     f"evaluated all {n_max} chunks")
    return (n_max if settings.chunks is None else min(settings.chunks, n_max)), notes


# --------------------------------------------------------------------------- the tool's statistics

def _mean_and_uncertainty(s: float, s2: float, count: int) -> tuple[float, float]:
    if count < 1:
        return 0.0, 0.0
    f = s / count
    df = s2 / count - f * f
    df = math.sqrt(df / (count - 1)) if df > 0 and count > 10 else 0.0
    return f, df


def _covariance(sa: float, sb: float, sab: float, count: int) -> float:
    if count < 10:
        return 0.0
    return (sab / count - (sa / count) * (sb / count)) / (count - 1)


def _percentile(sorted_values: np.ndarray, fraction: float) -> float:
    """The tool's interpolation, in float32 as it does it."""
    f = np.float32(fraction)
    if f <= 0:
        return float(sorted_values[0])
    if f >= 1:
        return float(sorted_values[-1])
    p = np.float32(f * np.float32(sorted_values.size - 1))
    ip = int(p)
    p = np.float32(p - np.float32(ip))
    a = sorted_values[ip]
    b = sorted_values[min(ip + 1, sorted_values.size - 1)]
    return float(np.float32((np.float32(1) - p) * a + p * b))


def _median(sorted_values: np.ndarray) -> float:
    n = sorted_values.size
    if n % 2 == 0:
        return float(np.float32(0.5) * (sorted_values[n // 2] + sorted_values[n // 2 - 1]))
    return float(sorted_values[n // 2])


def ppl_from_nll(nll: np.ndarray) -> tuple[float, float]:
    """PPL and its error from per-token NLL, as llama-perplexity's perplexity pass does."""
    count = nll.size
    mean = float(nll.sum(dtype=np.float64)) / count
    mean2 = float((nll.astype(np.float64) ** 2).sum()) / count - mean * mean
    ppl = math.exp(mean)
    return ppl, (math.sqrt(mean2 / (count - 1)) * ppl if mean2 > 0 else 0.0)


def kld_stats(nll: np.ndarray, nll_base: np.ndarray, kld: np.ndarray, p_diff: np.ndarray,
              same_top: int) -> KLDStats:
    """The statistics block of llama-perplexity --kl-divergence, from per-token arrays."""
    count = int(nll.size)
    nll64, base64 = nll.astype(np.float64), nll_base.astype(np.float64)
    kld64, dp64 = kld.astype(np.float64), p_diff.astype(np.float64)
    log_ppl = _mean_and_uncertainty(float(nll64.sum()), float((nll64 ** 2).sum()), count)
    log_base = _mean_and_uncertainty(float(base64.sum()), float((base64 ** 2).sum()), count)
    cov = _covariance(float(nll64.sum()), float(base64.sum()), float((nll64 * base64).sum()), count)
    ppl_val = math.exp(log_ppl[0])
    ppl_unc = ppl_val * log_ppl[1]
    base_val = math.exp(log_base[0])
    base_unc = base_val * log_base[1]
    denom = log_ppl[1] * log_base[1]
    cor = cov / denom if denom else float("nan")
    ratio_ln = log_ppl[0] - log_base[0]
    ratio_ln_unc = math.sqrt(max(0.0, log_ppl[1] ** 2 + log_base[1] ** 2 - 2.0 * cov))
    ratio = math.exp(ratio_ln)
    ppl_cov = ppl_val * base_val * cov
    diff_unc = math.sqrt(max(0.0, ppl_unc ** 2 + base_unc ** 2 - 2.0 * ppl_cov))
    kl = _mean_and_uncertainty(float(kld64.sum()), float((kld64 ** 2).sum()), count)
    dp = _mean_and_uncertainty(float(dp64.sum()), float((dp64 ** 2).sum()), count)
    dp2 = dp64 ** 2
    mse = _mean_and_uncertainty(float(dp2.sum()), float((dp2 ** 2).sum()), count)
    rms = math.sqrt(mse[0])
    rms_unc = 0.5 / rms * mse[1] if rms else 0.0
    same = same_top / count
    kv = np.sort(kld.astype(np.float32))
    dv = np.sort(p_diff.astype(np.float32))
    pct = lambda v, f: _percentile(v, f)  # noqa: E731
    return KLDStats(
        mean_ppl_q=ppl_val, mean_ppl_q_err=ppl_unc, mean_ppl_base=base_val, mean_ppl_base_err=base_unc,
        cor_ln_ppl=100.0 * cor, mean_ln_ppl_ratio=ratio_ln, mean_ln_ppl_ratio_err=ratio_ln_unc,
        mean_ppl_ratio=ratio, mean_ppl_ratio_err=ratio * ratio_ln_unc,
        mean_ppl_diff=ppl_val - base_val, mean_ppl_diff_err=diff_unc,
        kld_mean=kl[0], kld_mean_err=kl[1], kld_max=float(kv[-1]), kld_p999=pct(kv, 0.999),
        kld_p990=pct(kv, 0.990), kld_p950=pct(kv, 0.950), kld_p900=pct(kv, 0.900),
        kld_median=_median(kv), kld_p100=pct(kv, 0.100), kld_p050=pct(kv, 0.050),
        kld_p010=pct(kv, 0.010), kld_p001=pct(kv, 0.001), kld_min=float(kv[0]),
        dp_mean=100.0 * dp[0], dp_mean_err=100.0 * dp[1], dp_max=100.0 * float(dv[-1]),
        dp_p999=100.0 * pct(dv, 0.999), dp_p990=100.0 * pct(dv, 0.990), dp_p950=100.0 * pct(dv, 0.950),
        dp_p900=100.0 * pct(dv, 0.900), dp_p750=100.0 * pct(dv, 0.750), dp_median=100.0 * _median(dv),
        dp_p250=100.0 * pct(dv, 0.250), dp_p100=100.0 * pct(dv, 0.100), dp_p050=100.0 * pct(dv, 0.050),
        dp_p010=100.0 * pct(dv, 0.010), dp_p001=100.0 * pct(dv, 0.001), dp_min=100.0 * float(dv[0]),
        rms_dp=100.0 * rms, rms_dp_err=100.0 * rms_unc, same_top_p=100.0 * same,
        same_top_p_err=100.0 * math.sqrt(same * (1.0 - same) / (count - 1)), count=count)


def _blocks(n: int, fn: Callable[[int, int], Any], threads: int) -> list:
    """Run fn(lo, hi) over ROW_BLOCK-row slices of range(n), on `threads` threads (numpy
    releases the GIL in its loops; llama-perplexity likewise spreads its log-softmax over
    all cores)."""
    spans = [(lo, min(n, lo + ROW_BLOCK)) for lo in range(0, n, ROW_BLOCK)]
    if threads <= 1 or len(spans) == 1:
        return [fn(lo, hi) for lo, hi in spans]
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(max_workers=min(threads, len(spans))) as pool:
        return list(pool.map(lambda span: fn(*span), spans))


def _ppl_rows(logits: np.ndarray, targets: np.ndarray, threads: int = 1) -> np.ndarray:
    """-log p(target) per row, as the tool's plain perplexity pass computes it."""
    out = np.empty(len(targets), np.float64)

    def block(lo: int, hi: int) -> None:
        L = logits[lo:hi]
        t = targets[lo:hi]
        max_l = L.max(axis=1)
        sum_exp = np.exp(L - max_l[:, None]).sum(axis=1, dtype=np.float64)
        out[lo:hi] = -((L[np.arange(hi - lo), t] - max_l).astype(np.float64) - np.log(sum_exp))

    _blocks(len(targets), block, threads)
    return out


@dataclass
class _KLDRows:
    nll: np.ndarray
    nll_base: np.ndarray
    kld: np.ndarray
    p_diff: np.ndarray
    same_top: int


def _kld_rows(logits: np.ndarray, targets: np.ndarray, q: np.ndarray, scale: np.ndarray,
              min_log_prob: np.ndarray, threads: int = 1) -> _KLDRows:
    """Per-token values of the tool's log_softmax(..., base_log_prob, tok, kld), vectorized in
    float32 like the C code (sums in float64), in place to spare memory passes."""
    n = len(targets)
    nll = np.empty(n, np.float32)
    nll_base = np.empty(n, np.float32)
    kld = np.empty(n, np.float64)
    floor = np.float32(evalcache.LOG_PROB_FLOOR)

    def block(lo: int, hi: int) -> int:
        L = np.asarray(logits[lo:hi], dtype=np.float32)
        t = targets[lo:hi]
        idx = np.arange(hi - lo)
        max_l = L.max(axis=1)
        imax = L.argmax(axis=1)
        work = np.subtract(L, max_l[:, None])
        np.exp(work, out=work)
        log_z = max_l + np.log(work.sum(axis=1, dtype=np.float64)).astype(np.float32)  # max + log Σ
        nll[lo:hi] = log_z - L[idx, t]
        qb = q[lo:hi]
        sc = scale[lo:hi].astype(np.float32)
        mn = min_log_prob[lo:hi].astype(np.float32)
        nll_base[lo:hi] = -(sc * qb[idx, t].astype(np.float32) + mn)
        log_pb = np.multiply(qb, sc[:, None], dtype=np.float32)
        log_pb += mn[:, None]
        np.subtract(log_pb, L, out=work)                 # log p_base - logit
        work += log_z[:, None]                           # log p_base - log q
        # Rows whose range was clipped at max-16 hold entries the tool skips (log p <= -16).
        skip = (log_pb <= floor) if bool((mn <= floor).any()) else None
        np.exp(log_pb, out=log_pb)
        work *= log_pb
        if skip is not None:
            work[skip] = 0
        kld[lo:hi] = work.sum(axis=1, dtype=np.float64)
        return int((imax == qb.argmax(axis=1)).sum())

    same = sum(_blocks(n, block, threads))
    p_diff = np.exp(-nll) - np.exp(-nll_base)
    return _KLDRows(nll, nll_base, kld, p_diff.astype(np.float32), same)


# --------------------------------------------------------------------------- plan

@dataclass
class EvalPlan:
    """Everything an evaluation will do, resolved and printable before anything runs."""
    model: ModelFacts
    text: TextFacts
    settings: EvalSettings
    backend: str = "bindings"
    base: ModelFacts | None = None
    cache_path: Path | None = None       # base log-probs (bindings backend)
    cache_hit: bool = False
    speed: bool = False

    def describe(self) -> str:
        s = self.settings
        lines = [f"model    {self.model.path} ({self.model.tier}, {self.model.size_bytes / 2**20:.1f} MiB, "
                 f"{self.model.bpw:.2f} bpw)",
                 f"text     {self.text.label} (sha256 {self.text.sha256[:12]}, {self.text.n_bytes} bytes)",
                 f"backend  {self.backend}",
                 f"settings ctx {s.n_ctx}, chunks {s.chunks or 'all'}, batch {s.batch}, ubatch {s.ubatch}, "
                 f"threads {s.n_threads}, flash-attn {'on' if s.flash_attn else 'off'}"]
        if self.base:
            lines.append(f"base     {self.base.path}")
            if self.backend == "bindings":
                lines.append(f"cache    {self.cache_path} ({'hit' if self.cache_hit else 'will be computed'})")
        if self.speed:
            lines.append("speed    pp512/tg128 through the bindings")
        return "\n".join(lines)


def base_cache_inputs(base: ModelFacts, text: TextFacts, settings: EvalSettings) -> dict:
    from apex_orch.llama.tools import build_label

    return {"base": base.fingerprint, "text_sha256": text.sha256, **settings.numeric_key(),
            "llama": build_label()}


def plan_eval(model: str | os.PathLike, *, base: str | os.PathLike | None = None,
              text: str | os.PathLike | None = None, corpus: str | None = None,
              settings: EvalSettings | None = None, backend: str = "bindings",
              speed: bool = False, text_facts_: TextFacts | None = None) -> EvalPlan:
    """Resolve inputs (reads GGUF headers and the text; runs nothing)."""
    if backend not in BACKENDS:
        raise UsageError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    settings = settings or EvalSettings()
    facts = model_facts(model, fingerprint=False)
    base_facts = model_facts(base) if base is not None else None
    tf = text_facts_ or text_facts(text, corpus)
    plan = EvalPlan(model=facts, text=tf, settings=settings, backend=backend, base=base_facts, speed=speed)
    if base_facts is not None and backend == "bindings":
        plan.cache_path = evalcache.cache_path(base_cache_inputs(base_facts, tf, settings))
        plan.cache_hit = plan.cache_path.is_file()
    return plan


# --------------------------------------------------------------------------- bindings runner

def ensure_base_cache(base: ModelFacts, text: TextFacts, settings: EvalSettings, *,
                      progress: Progress | None = None, refresh: bool = False) -> Path:
    """Compute the base's log-probs once per (base, text, settings) and return the cache file."""
    inputs = base_cache_inputs(base, text, settings)
    path = evalcache.cache_path(inputs)
    # Inputs are never outputs (issue 15): a cache file that is the base or the text (a link or
    # hard link planted in the cache, or APEX_ORCH_EVAL_CACHE pointed at the inputs) is refused.
    from apex_orch.model.info import shard_paths
    from apex_orch.core.safefiles import check_not_inputs
    check_not_inputs([path], [*shard_paths(Path(base.path)), Path(text.path)], flag="APEX_ORCH_EVAL_CACHE")
    if path.is_file() and not refresh:
        try:
            with evalcache.BaseLogProbs(path):
                return path
        except EvalError:
            path.unlink(missing_ok=True)   # unreadable: recompute below
    say = progress or (lambda _m: None)
    data = read_text_bytes(text)
    t0 = time.monotonic()
    with BindingsModel(base.path, repack=settings.repack) as bm:
        tokens = bm.tokenize(data)
        n_chunks, _ = _n_chunks(len(tokens), settings, base.path)
        first, n_scored, n_ctx = settings.first, settings.scored_per_chunk, settings.n_ctx
        meta = {"format": evalcache.FORMAT, "version": evalcache.FORMAT_VERSION, "inputs": inputs,
                "base_path": base.path, "text": text.label, "n_ctx": n_ctx, "n_vocab": bm.n_vocab,
                "n_chunks": n_chunks, "first": first, "n_scored": n_scored, "n_text_tokens": int(len(tokens)),
                "vocab": bm.vocab_signature(), "settings": settings.to_dict()}
        writer = evalcache.BaseCacheWriter(path, meta, tokens[:n_chunks * n_ctx])
        try:
            with bm.context(n_ctx=n_ctx, n_batch=settings.batch, n_ubatch=settings.ubatch,
                            n_threads=settings.n_threads, flash_attn=settings.flash_attn) as cx:
                nll_all = []
                for i in range(n_chunks):
                    start = i * n_ctx
                    logits = _chunk_logits(cx, tokens, start, settings, bm.add_bos, bm.bos)[:n_scored]
                    targets = tokens[start + first + 1:start + n_ctx]
                    parts = _blocks(n_scored, lambda lo, hi: evalcache.quantize_rows(logits[lo:hi], targets[lo:hi]),
                                    settings.n_threads)
                    rows = evalcache.QuantizedRows(
                        np.concatenate([p.q for p in parts]), np.concatenate([p.scale for p in parts]),
                        np.concatenate([p.min_log_prob for p in parts]), np.concatenate([p.nll for p in parts]))
                    writer.add_chunk(i, rows)
                    nll_all.append(rows.nll)
                    say(f"base log-probs: chunk {i + 1}/{n_chunks}")
            ppl, err = ppl_from_nll(np.concatenate(nll_all))
            writer.commit({"base_ppl": ppl, "base_ppl_err": err, "seconds": time.monotonic() - t0,
                           "stored_chunk_bytes": writer.stored_bytes})
        except BaseException:
            writer.abort()
            raise
    return path


def _check_vocab(model_sig: dict, base_sig: dict, model_path: str, base_path: str) -> None:
    if model_sig["n_vocab"] != base_sig["n_vocab"]:
        raise EvalError(
            f"the base has a different vocabulary: {model_sig['n_vocab']} tokens here, "
            f"{base_sig['n_vocab']} in the base {base_path}", where=model_path,
            hint="KL divergence needs the base the file was quantized from (same tokenizer)")
    for tok, text in base_sig["sample"].items():
        if model_sig["sample"].get(tok) != text:
            raise EvalError(
                f"the base has a different vocabulary: token {tok} is {model_sig['sample'].get(tok)!r} here "
                f"but {text!r} in the base {base_path}", where=model_path,
                hint="KL divergence needs the base the file was quantized from (same tokenizer)")
    if model_sig["sha256"] != base_sig["sha256"]:
        raise EvalError(f"the base has a different vocabulary (same size, different token strings): {base_path}",
                        where=model_path, hint="KL divergence needs the base the file was quantized from")


def _run_bindings(plan: EvalPlan, progress: Progress | None) -> EvalResult:
    say = progress or (lambda _m: None)
    s = plan.settings
    t0 = time.monotonic()
    notes: list[str] = []
    cache: evalcache.BaseLogProbs | None = None
    base_ppl = base_err = None
    if plan.base is not None:
        plan.cache_path = ensure_base_cache(plan.base, plan.text, s, progress=progress)
        cache = evalcache.BaseLogProbs(plan.cache_path)
        base_ppl, base_err = cache.meta.get("base_ppl"), cache.meta.get("base_ppl_err")
    decode_s = 0.0
    try:
        with BindingsModel(plan.model.path, repack=s.repack) as bm:
            if cache is not None:
                _check_vocab(bm.vocab_signature(), cache.meta["vocab"], plan.model.path, plan.base.path)
                tokens = cache.tokens
                n_text_tokens = int(cache.meta["n_text_tokens"])
                n_chunks = cache.n_chunks
                if s.chunks is not None and s.chunks > n_chunks:
                    notes.append(f"--chunks {s.chunks} asked for more than the text holds; "
                                 f"evaluated all {n_chunks} chunks")
            else:
                tokens = bm.tokenize(read_text_bytes(plan.text))
                n_text_tokens = len(tokens)
                n_chunks, notes = _n_chunks(n_text_tokens, s, plan.model.path)
            first, n_ctx = s.first, s.n_ctx
            parts: list = []
            with bm.context(n_ctx=n_ctx, n_batch=s.batch, n_ubatch=s.ubatch, n_threads=s.n_threads,
                            flash_attn=s.flash_attn) as cx:
                for i in range(n_chunks):
                    start = i * n_ctx
                    td = time.monotonic()
                    logits = _chunk_logits(cx, tokens, start, s, bm.add_bos, bm.bos)
                    decode_s += time.monotonic() - td
                    targets = tokens[start + first + 1:start + n_ctx]
                    rows = logits[:len(targets)]
                    if cache is None:
                        parts.append(_ppl_rows(rows, targets, s.n_threads))
                    else:
                        parts.append(_kld_rows(rows, targets, cache.chunk(i), cache.scale[i], cache.min_log_prob[i],
                                                s.n_threads))
                    say(f"{Path(plan.model.path).name}: chunk {i + 1}/{n_chunks}")
            speed = measure_speed_loaded(bm, s) if plan.speed else None
    finally:
        if cache is not None:
            cache.close()
    n_scored = n_chunks * s.scored_per_chunk
    kld = None
    if cache is None:
        ppl, ppl_err = ppl_from_nll(np.concatenate(parts))
    else:
        if n_scored < MIN_KLD_TOKENS:
            raise EvalError(f"only {n_scored} tokens scored; KL statistics need at least {MIN_KLD_TOKENS} "
                            "(llama-perplexity prints none below that)", where=plan.model.path,
                            hint="use more chunks or a larger context")
        kld = kld_stats(np.concatenate([p.nll for p in parts]), np.concatenate([p.nll_base for p in parts]),
                        np.concatenate([p.kld for p in parts]), np.concatenate([p.p_diff for p in parts]),
                        sum(p.same_top for p in parts))
        ppl, ppl_err = kld.mean_ppl_q, kld.mean_ppl_q_err
    from apex_orch.llama.tools import build_label
    return EvalResult(
        model=plan.model, backend="bindings", settings={**s.to_dict(), "chunks": n_chunks},
        text=plan.text, n_tokens=n_text_tokens, n_chunks=n_chunks, n_scored=n_scored, ppl=ppl,
        ppl_err=ppl_err, base=plan.base, base_ppl=base_ppl, base_ppl_err=base_err, kld=kld, speed=speed,
        seconds=time.monotonic() - t0, eval_tokens_per_s=(n_chunks * n_ctx / decode_s) if decode_s else None,
        llama_build=build_label(), cache=str(plan.cache_path) if plan.cache_path else None, notes=notes)


# --------------------------------------------------------------------------- speed

def measure_speed_loaded(bm: BindingsModel, settings: EvalSettings, *, n_prompt: int = 512,
                         n_gen: int = 128, repetitions: int = 1) -> SpeedResult:
    """pp<n_prompt> / tg<n_gen> like llama-bench: random tokens, an empty cache per run, the
    prompt as one batch (ubatch from the settings), generation one token per decode. A short
    warm-up (32 prompt tokens, 4 generated) runs first; the figures are means over repetitions."""
    rng = np.random.default_rng(0)
    n_ubatch = min(settings.n_ubatch, n_prompt)
    with bm.context(n_ctx=n_prompt + n_gen, n_batch=n_prompt, n_ubatch=n_ubatch,
                    n_threads=settings.n_threads, flash_attn=settings.flash_attn) as cx:
        def pp(n: int) -> float:
            toks = rng.integers(0, bm.n_vocab, n, dtype=np.int32)
            outs = np.zeros(n, bool)
            outs[-1] = True
            cx.clear()
            t = time.perf_counter()
            cx.decode(toks, 0, outs)
            cx.synchronize()
            return time.perf_counter() - t

        def tg(n: int) -> float:
            toks = rng.integers(0, bm.n_vocab, n, dtype=np.int32)
            one = np.ones(1, bool)
            cx.clear()
            t = time.perf_counter()
            for i in range(n):
                cx.decode(toks[i:i + 1], i, one)
            cx.synchronize()
            return time.perf_counter() - t

        pp(min(32, n_prompt)), tg(min(4, n_gen))  # warm-up: first-touch of the weights, graph allocation
        pp_t = [pp(n_prompt) for _ in range(repetitions)]
        tg_t = [tg(n_gen) for _ in range(repetitions)]
    return SpeedResult(pp_tokens=n_prompt, pp_tokens_per_s=n_prompt * len(pp_t) / sum(pp_t),
                       tg_tokens=n_gen, tg_tokens_per_s=n_gen * len(tg_t) / sum(tg_t),
                       n_threads=settings.n_threads, n_batch=n_prompt, n_ubatch=n_ubatch,
                       flash_attn=settings.flash_attn, repetitions=repetitions)


def measure_speed(model: str | os.PathLike, settings: EvalSettings | None = None, *,
                  n_prompt: int = 512, n_gen: int = 128, repetitions: int = 1) -> SpeedResult:
    """Throughput of one model through the bindings (see measure_speed_loaded)."""
    settings = settings or EvalSettings()
    model_facts(model, fingerprint=False)  # a clear error for a corrupt file before llama.cpp sees it
    with BindingsModel(model, repack=settings.repack) as bm:
        return measure_speed_loaded(bm, settings, n_prompt=n_prompt, n_gen=n_gen, repetitions=repetitions)


# --------------------------------------------------------------------------- llama-perplexity backend

_NUM = r"([-+]?(?:\d+(?:\.\d*)?(?:[eE][-+]?\d+)?|nan|-?inf))"
_FINAL_RE = re.compile(r"Final estimate: PPL = " + _NUM + r" \+/- " + _NUM)
_CHUNKS_RE = re.compile(r"(?:calculating perplexity|computing) over (\d+) chunks, n_ctx=(\d+), "
                        r"batch_size=(\d+), n_seq=(\d+)")
_TOO_SHORT_RE = re.compile(r"tokenizes to only (\d+) tokens")
_NEED_RE = re.compile(r"you need at least (\d+) tokens")
_PROMPT_EVAL_RE = re.compile(r"prompt eval time =\s*" + _NUM + r" ms /\s*(\d+) tokens")
_VOCAB_RE = re.compile(r"inconsistent vocabulary \((\d+) vs (\d+)\)")


def parse_kld_block(lines: Iterable[str]) -> dict[str, float]:
    """Fields of KLDStats found in llama-perplexity's statistics block."""
    out: dict[str, float] = {}
    labels = sorted(KLD_LINES, key=lambda x: -len(x[0]))  # "Mean PPL(Q)/..." before "Mean PPL(Q)"
    for raw in lines:
        line = raw.rstrip()
        for label, name, err, _unit in labels:
            if not line.startswith(label):
                continue
            rest = line[len(label):].strip()
            if not rest.startswith(":"):
                continue
            nums = re.findall(_NUM, rest[1:])
            if not nums:
                continue
            out[name] = float(nums[0])
            if err and len(nums) > 1:
                out[err] = float(nums[1])
            break
    return out


def _tool_env() -> dict:
    # LLAMA_ARG_* variables silently change llama.cpp tools' defaults; ours are explicit.
    return {k: v for k, v in os.environ.items() if not k.startswith("LLAMA_ARG_")}


def tool_argv(model: str, settings: EvalSettings, *, text: str | None = None,
              base_file: str | None = None, kl: bool = False) -> list[str]:
    from apex_orch.llama.tools import find_tool

    s = settings
    argv = [str(find_tool("llama-perplexity").path), "-m", model, "-c", str(s.n_ctx), "-b", str(s.batch),
            "-ub", str(s.ubatch), "-t", str(s.n_threads), "-fa", "on" if s.flash_attn else "off", "-fit", "off"]
    if TOOL_LOG_VERBOSITY is not None:
        argv += ["-lv", str(TOOL_LOG_VERBOSITY)]
    if not s.repack:
        argv.append("-nr")
    if text is not None:
        argv += ["-f", text]
    if s.chunks is not None:
        argv += ["--chunks", str(s.chunks)]
    if base_file is not None:
        argv += ["--kl-divergence-base", base_file]
    if kl:
        argv.append("--kl-divergence")
    return argv


def _tail(lines: list[str], n: int = 15) -> str:
    return "\n".join(line for line in lines[-n:])


TOOL_ATTEMPTS = 4
TOOL_LOG_VERBOSITY: int | None = None   # bench/bench_eval.py sets 4 to get llama_perf timings


def _run_tool_logged(argv: list[str], what: str, log_dir: Path,
                     complete: Callable[[list[str]], bool]) -> list[str]:
    """Run llama-perplexity and return its output lines once `complete(lines)` holds.

    The pinned llama.cpp logs through an asynchronous worker thread that is never flushed at
    exit (common/log.cpp, "logs may be lost if not flushed before the program exits",
    ggml-org/llama.cpp#22142): on a busy machine the tool exits 0 having lost its last lines —
    the final estimate or the whole KL block. Measured here: 5 of 45 runs under 3x CPU
    oversubscription. So a run whose records are missing is run again (the numbers are
    deterministic); conditions the tool only logs (text too short, foreign vocabulary) are
    turned into errors."""
    from apex_orch.llama.tools import run_tool

    model = argv[argv.index("-m") + 1]
    for attempt in range(1, TOOL_ATTEMPTS + 1):
        lines: list[str] = []
        run_tool(argv, log_path=log_dir / f"{what}.{attempt}.log", on_line=lines.append, env=_tool_env(),
                 what="llama-perplexity")
        for line in lines:
            m = _TOO_SHORT_RE.search(line)
            if m:
                need = next((int(n.group(1)) for n in map(_NEED_RE.search, lines) if n), None)
                raise EvalError(f"the evaluation text is too short: {m.group(1)} tokens, but the context "
                                f"needs at least {need}", where=model,
                                hint="use a longer text (--text/--corpus) or a smaller context (-c)")
            m = _VOCAB_RE.search(line)
            if m:
                raise EvalError(f"the base has a different vocabulary ({m.group(1)} vs {m.group(2)} tokens)",
                                where=model)
        if complete(lines):
            return lines
    raise EvalError(
        f"llama-perplexity exited without printing its final records, {TOOL_ATTEMPTS} times; its last lines:\n"
        + _tail(lines), where=model,
        hint="the pinned llama.cpp loses its last log lines at exit on a busy machine (llama.cpp#22142); "
             "rerun when the machine is less loaded, or use --backend bindings")


def _has_final(lines: list[str]) -> bool:
    return any(_FINAL_RE.search(line) for line in lines)


def _has_kld_block(lines: list[str]) -> bool:
    fields = parse_kld_block(lines)
    return all(f.name in fields for f in dataclasses.fields(KLDStats) if f.name != "count")


def _decode_rate(lines: list[str]) -> float | None:
    for line in lines:
        m = _PROMPT_EVAL_RE.search(line)
        if m and float(m.group(1)) > 0:
            return int(m.group(2)) / (float(m.group(1)) / 1000.0)
    return None


class ToolBase:
    """llama-perplexity's own base file for one (base, text, settings), made once and shared by
    every file of a compare; removed on close."""

    def __init__(self, base: ModelFacts, text: TextFacts, settings: EvalSettings, work: Path):
        self.base, self.text, self.settings, self.work = base, text, settings, work
        self.path: Path | None = None
        self.ppl = self.ppl_err = None
        self.n_chunks = 0

    def ensure(self) -> Path:
        if self.path is None:
            out = self.work / "base.kld"
            lines = _run_tool_logged(tool_argv(self.base.path, self.settings, text=self.text.path,
                                               base_file=str(out)), "base", self.work, _has_final)
            m = next(filter(None, map(_FINAL_RE.search, lines)), None)
            if not m:
                raise EvalError("llama-perplexity printed no final estimate for the base:\n" + _tail(lines),
                                where=self.base.path)
            self.ppl, self.ppl_err = float(m.group(1)), float(m.group(2))
            c = next(filter(None, map(_CHUNKS_RE.search, lines)), None)
            self.n_chunks = int(c.group(1)) if c else 0
            self.path = out
        return self.path


def _run_tool(plan: EvalPlan, progress: Progress | None, tool_base: ToolBase | None = None) -> EvalResult:
    from apex_orch.llama.tools import build_label

    say = progress or (lambda _m: None)
    s = plan.settings
    t0 = time.monotonic()
    own_dir = None
    if tool_base is None:
        own_dir = tempfile.TemporaryDirectory(prefix="apex-eval-", dir=_work_root())
        work = Path(own_dir.name)
        if plan.base is not None:
            tool_base = ToolBase(plan.base, plan.text, s, work)
    else:
        work = tool_base.work
    try:
        kld = None
        base_ppl = base_err = None
        # Checked here, not only parsed from the tool's log: its last lines can be lost (see
        # _run_tool_logged), and this error deserves to be deterministic.
        with BindingsModel(plan.base.path if plan.base else plan.model.path, vocab_only=True) as vm:
            _n_chunks(len(vm.tokenize(read_text_bytes(plan.text))), s, vm.path.as_posix())
        if plan.base is None:
            say(f"llama-perplexity: {Path(plan.model.path).name}")
            lines = _run_tool_logged(tool_argv(plan.model.path, s, text=plan.text.path), "model", work, _has_final)
            m = next(filter(None, map(_FINAL_RE.search, lines)), None)
            if not m:
                raise EvalError("llama-perplexity printed no final estimate:\n" + _tail(lines),
                                where=plan.model.path)
            ppl, ppl_err = float(m.group(1)), float(m.group(2))
        else:
            _check_vocab(vocab_signature(plan.model.path), vocab_signature(plan.base.path),
                         plan.model.path, plan.base.path)
            say(f"llama-perplexity: base log-probs of {Path(plan.base.path).name}")
            base_file = tool_base.ensure()
            base_ppl, base_err = tool_base.ppl, tool_base.ppl_err
            say(f"llama-perplexity: KL divergence of {Path(plan.model.path).name}")
            lines = _run_tool_logged(tool_argv(plan.model.path, s, base_file=str(base_file), kl=True),
                                     Path(plan.model.path).stem, work, _has_kld_block)
            fields = parse_kld_block(lines)
            missing = [f.name for f in dataclasses.fields(KLDStats) if f.name != "count" and f.name not in fields]
            if missing:
                raise EvalError(f"llama-perplexity printed no KL statistics (missing {', '.join(missing[:3])}); "
                                "its last lines:\n" + _tail(lines), where=plan.model.path,
                                hint="it prints none when fewer than 100 tokens are scored")
            kld = KLDStats(**fields)
            ppl, ppl_err = kld.mean_ppl_q, kld.mean_ppl_q_err
        c = next(filter(None, map(_CHUNKS_RE.search, lines)), None)
        n_chunks = int(c.group(1)) if c else 0
        n_scored = n_chunks * s.scored_per_chunk
        if kld is not None:
            kld.count = n_scored
        result = EvalResult(
            model=plan.model, backend="llama-perplexity", settings={**s.to_dict(), "chunks": n_chunks},
            text=plan.text, n_tokens=None, n_chunks=n_chunks,
            n_scored=n_scored, ppl=ppl, ppl_err=ppl_err, base=plan.base, base_ppl=base_ppl,
            base_ppl_err=base_err, kld=kld, seconds=time.monotonic() - t0,
            eval_tokens_per_s=_decode_rate(lines), llama_build=build_label())
        if plan.speed:
            result.speed = measure_speed(plan.model.path, s)
        return result
    finally:
        if own_dir is not None:
            own_dir.cleanup()


def _work_root() -> Path:
    root = evalcache.cache_dir() / "work"
    root.mkdir(parents=True, exist_ok=True)
    return root


def vocab_signature(path: str | os.PathLike) -> dict:
    with BindingsModel(path, vocab_only=True) as bm:
        return bm.vocab_signature()


# --------------------------------------------------------------------------- entry points

def run_eval(plan: EvalPlan, *, progress: Progress | None = None, tool_base: ToolBase | None = None) -> EvalResult:
    if plan.backend == "bindings":
        return _run_bindings(plan, progress)
    return _run_tool(plan, progress, tool_base)


def evaluate(model: str | os.PathLike, *, base: str | os.PathLike | None = None,
             text: str | os.PathLike | None = None, corpus: str | None = None,
             settings: EvalSettings | None = None, backend: str = "bindings", speed: bool = False,
             progress: Progress | None = None) -> EvalResult:
    """One call: plan and run an evaluation (PPL; with `base`, the KL statistics too)."""
    plan = plan_eval(model, base=base, text=text, corpus=corpus, settings=settings, backend=backend, speed=speed)
    return run_eval(plan, progress=progress)


# --------------------------------------------------------------------------- gates

@dataclass(frozen=True)
class Gates:
    """Quality thresholds; None = not checked. same_top_p is in percent like the tool prints."""
    max_mean_kld: float | None = None
    max_ppl_ratio: float | None = None
    min_same_top_p: float | None = None

    KEYS = ("max_mean_kld", "max_ppl_ratio", "min_same_top_p")

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any] | None, *, where: str | None = None) -> "Gates":
        """From a release config / profile dict, e.g. {max_mean_kld: 0.05, max_ppl_ratio: 1.02}."""
        data = dict(data or {})
        unknown = sorted(set(data) - set(cls.KEYS))
        if unknown:
            raise UsageError(f"unknown gate key(s): {', '.join(unknown)} (known: {', '.join(cls.KEYS)})",
                             where=where)
        values = {}
        for key in cls.KEYS:
            value = data.get(key)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise UsageError(f"gate {key} must be a number, got {value!r}", where=where)
            values[key] = float(value)
        return cls(**values)

    @property
    def active(self) -> bool:
        return any(getattr(self, k) is not None for k in self.KEYS)


def gate_failures(result: EvalResult, gates: Gates) -> list[str]:
    """Human-readable failed gates for one result (empty when it passes)."""
    if not gates.active:
        return []
    name = Path(result.model.path).name
    if result.kld is None:
        return [f"{name}: gates need KL statistics; give --base"]
    k = result.kld
    out = []
    if gates.max_mean_kld is not None and not k.kld_mean <= gates.max_mean_kld:
        out.append(f"{name}: mean KLD {k.kld_mean:.6f} > max {gates.max_mean_kld:g}")
    if gates.max_ppl_ratio is not None and not k.mean_ppl_ratio <= gates.max_ppl_ratio:
        out.append(f"{name}: PPL(Q)/PPL(base) {k.mean_ppl_ratio:.6f} > max {gates.max_ppl_ratio:g}")
    if gates.min_same_top_p is not None and not k.same_top_p >= gates.min_same_top_p:
        out.append(f"{name}: same top p {k.same_top_p:.3f}% < min {gates.min_same_top_p:g}%")
    return out


def check_gates(results: EvalResult | Iterable[EvalResult], gates: Gates) -> None:
    """Raise GateFailedError listing every failed threshold with its numbers."""
    items = [results] if isinstance(results, EvalResult) else list(results)
    failures = [f for r in items for f in gate_failures(r, gates)]
    if failures:
        raise GateFailedError("quality gate failed:\n  " + "\n  ".join(failures),
                              hint="the file is worse than the thresholds allow; pick a larger tier "
                                   "or relax the gate")


# --------------------------------------------------------------------------- text report

def format_result(result: EvalResult) -> str:
    """Human-readable result: our header, then llama-perplexity's own lines and names."""
    s = result.settings
    tokens = "?" if result.n_tokens is None else str(result.n_tokens)
    out = [f"model:    {result.model.path} [{result.model.tier}, {result.model.bpw:.2f} bpw, "
           f"{result.model.size_bytes / 2**20:.1f} MiB]",
           f"backend:  {result.backend} (ctx {s['n_ctx']}, batch {s['n_batch']}, ubatch {s['n_ubatch']}, "
           f"threads {s['n_threads']}, flash-attn {'on' if s['flash_attn'] else 'off'}, "
           f"repack {'on' if s.get('repack') else 'off'})",
           f"text:     {result.text.label} ({tokens} tokens, {result.n_chunks} chunks, {result.n_scored} scored)"]
    if result.base is not None and result.base_ppl is not None:
        out.append(f"base:     {result.base.path} (PPL {result.base_ppl:.4f} +/- {result.base_ppl_err:.5f})")
    out.append(f"Final estimate: PPL = {result.ppl:.4f} +/- {result.ppl_err:.5f}")
    if result.kld is not None:
        k = result.kld
        out += ["", "====== Perplexity statistics ======"]
        for label, name, err, unit in KLD_LINES:
            if name == "kld_mean":
                out += ["", "====== KL divergence statistics ======"]
            elif name == "dp_mean":
                out += ["", "====== Token probability statistics ======"]
            value = getattr(k, name)
            if unit == "%":
                text = f"{value:6.3f}" + (f" ± {getattr(k, err):5.3f} %" if err else "%")
            else:
                text = f"{value:10.6f}" + (f" ± {getattr(k, err):10.6f}" if err else "")
            pad = 30 if name.startswith(("mean_ppl", "cor", "mean_ln")) else 0
            out.append(f"{label:<{pad}}: {text}" if pad else f"{label}: {text}")
    if result.speed is not None:
        sp = result.speed
        out += ["", f"speed:    pp{sp.pp_tokens} {sp.pp_tokens_per_s:.1f} t/s, tg{sp.tg_tokens} "
                    f"{sp.tg_tokens_per_s:.1f} t/s (threads {sp.n_threads}, ubatch {sp.n_ubatch}, "
                    f"flash-attn {'on' if sp.flash_attn else 'off'}, {sp.repetitions} run(s))"]
    return "\n".join(out)
