"""What an evaluation takes: its settings, the facts of a model file and of the text.

Takes: a GGUF path (its header is read, never its weights), a text file or a corpus name,
and the numbers the user chose (context, chunks, batch, threads, flash attention).
Gives: `EvalSettings`, `ModelFacts`, `TextFacts`, the bytes llama-perplexity tokenizes
(`read_text_bytes`) and how many chunks a token count holds (`count_chunks`).

Shaped so because both backends (the bindings session in `evaluate`, the binary in
`tool_backend`) and the results need these, and none of them may import another's module:
this is the bottom layer of the evaluation package.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from apex_orch.calibration import corpus as corpus_mod
from apex_orch.core.errors import ApexError, EvalError, RequestError
from apex_orch.core.fingerprint import source_sha256
from apex_orch.core.infiles import read_input
from apex_orch.core.safefiles import write_atomic
from apex_orch.evaluation import base_cache
from apex_orch.model.info import read_model
from apex_orch.plan.llama_rules import ftype_label

Progress = Callable[[str], None]


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
    tool_log_verbosity: llama-perplexity's -lv (None: its default); it changes only what the
    tool logs, so it is in neither `numeric_key` nor `to_dict` (caches and results ignore it).
    """
    n_ctx: int = 512
    chunks: int | None = None          # None: every full chunk of the text
    n_batch: int | None = None
    n_ubatch: int = 512
    n_threads: int = field(default_factory=default_threads)
    flash_attn: bool = True
    repack: bool = False               # llama.cpp "extra buffer types" (CPU repack / AMX); tool: -nr when off
    tool_log_verbosity: int | None = None   # bench/bench_eval.py sets 4 to get llama_perf timings

    def __post_init__(self) -> None:
        if self.n_ctx < 16 or self.n_ctx % 2:
            raise RequestError(f"context {self.n_ctx} must be an even number >= 16", fields=("n_ctx",))
        if self.chunks is not None and self.chunks < 1:
            raise RequestError(f"{self.chunks} chunks: must be >= 1", fields=("chunks",))
        if self.n_batch is not None and not (1 <= self.n_batch <= self.n_ctx):
            raise RequestError(
                f"batch {self.n_batch} must be between 1 and the context {self.n_ctx}", fields=("n_batch",),
                hint="a batch larger than the context packs several chunks per decode, which changes "
                     "the numbers; leave the batch unset (= context)")
        if self.n_ubatch < 1 or self.n_threads < 1:
            raise RequestError("the physical batch and the thread count must be >= 1",
                               fields=("n_ubatch", "n_threads"))

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


def count_chunks(n_tokens: int, settings: EvalSettings, text_label: str) -> tuple[int, list[str]]:
    """How many chunks of n_ctx tokens are evaluated (the tool's floor division, capped by
    `chunks`), and a note when `chunks` asked for more than the text holds. The error names the
    text (it is what is too short), never the model."""
    if n_tokens < 2 * settings.n_ctx:
        raise EvalError(
            f"the evaluation text is too short: {n_tokens} tokens, but a context of {settings.n_ctx} needs at "
            f"least {2 * settings.n_ctx} (tokens of this model's vocabulary)", where=text_label,
            hint="use a longer text or a smaller context", options=("text", "corpus", "n_ctx"))
    n_max = n_tokens // settings.n_ctx
    notes = []
    if settings.chunks is not None and settings.chunks > n_max:
        notes.append(f"{settings.chunks} chunks asked for, more than the text holds; "
                     f"evaluated all {n_max} chunks")
    return (n_max if settings.chunks is None else min(settings.chunks, n_max)), notes


# --------------------------------------------------------------------------- model facts

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
    return ftype_label(kv.get("general.file_type")) or "?"


def model_facts(path: str | os.PathLike, *, fingerprint: bool = True) -> ModelFacts:
    """Size, bits per weight and tier from the GGUF header (raises ModelError for a corrupt or
    non-GGUF file). `fingerprint`: the full sha256 of every shard (memoised by stat under
    <cache>/hashes: ~3 min once for a 240 GB base, then free) — the base log-prob cache's key, so a
    base whose bytes changed is a new key. Not needed (False) for a file that is only evaluated."""
    p = Path(path)
    info = read_model(p)
    n_params = info.total_parameters
    data_bytes = sum(t.n_bytes for t in info.tensors)
    digest = ",".join(source_sha256(sp) for sp in info.paths) if fingerprint else ""
    return ModelFacts(path=str(p), fingerprint=digest, size_bytes=info.file_size,
                      n_params=n_params, bpw=8.0 * data_bytes / n_params if n_params else 0.0,
                      tier=tier_of(info.kv, p), arch=info.arch, name=info.name)


# --------------------------------------------------------------------------- text

@dataclass
class TextFacts:
    label: str                  # the file path, or corpus:NAME
    path: str                   # a file llama-perplexity can read (-f)
    sha256: str                 # of the file's bytes
    n_bytes: int


def text_facts(text: str | os.PathLike | None = None, corpus: str | None = None) -> TextFacts:
    """The evaluation text: a file, or a corpus built by name (plain format, so that no special
    tokens are parsed — the tool never parses them) and written under the cache."""
    if (text is None) == (corpus is None):
        raise RequestError("give exactly one evaluation text: a file or a corpus name", fields=("text", "corpus"))
    if text is not None:
        p = Path(text)
        # core.infiles: a regular file (a FIFO or /dev/zero refused before a byte is read), at most 512 MiB
        data = read_input(p, "text")
        return TextFacts(label=str(p), path=str(p), sha256=hashlib.sha256(data).hexdigest(), n_bytes=len(data))
    built = corpus_mod.build_corpus(corpus)
    data = built.data
    sha = hashlib.sha256(data).hexdigest()
    out = base_cache.cache_dir() / "texts" / f"{Path(str(corpus)).stem}-{sha[:16]}.txt"
    if not _holds(out, sha):
        write_atomic(out, data)
    return TextFacts(label=f"corpus:{corpus}", path=str(out), sha256=sha, n_bytes=len(data))


def _holds(path: Path, sha: str) -> bool:
    try:
        return hashlib.sha256(read_input(path, "text")).hexdigest() == sha
    except ApexError:
        return False


def read_text_bytes(facts: TextFacts) -> bytes:
    """The bytes llama-perplexity tokenizes: the file with one trailing newline removed (-f)."""
    data = read_input(facts.path, "text")
    if hashlib.sha256(data).hexdigest() != facts.sha256:
        raise EvalError("evaluation text changed while it was being used", where=facts.path)
    return data[:-1] if data.endswith(b"\n") else data
