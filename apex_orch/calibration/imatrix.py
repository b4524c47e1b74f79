"""Importance matrices: compute them with llama-imatrix, cached.

Stages (see DESIGN.md):
- `plan_imatrix(...)` -> ImatrixPlan: pure (reads the model header, builds the corpus in
  memory, counts its tokens with the model's tokenizer; writes nothing). Holds the values the
  llama-imatrix argument list is built from (`ImatrixPlan.argv`, never patched in place), the
  cache key and the output path. The threads and the process that names the scratch files are
  plan values too: `for_process` gives the same plan for another process (a Ray worker).
- `run_imatrix(plan)` -> Path: writes the corpus text, optionally makes a Q8_0 copy of the
  model, runs llama-imatrix into a temporary name and renames it into the cache; a rerun
  with the same inputs is a cache hit and runs nothing.

Cache: `<cache_root>/imatrix/<key>.gguf` (+ `<key>.json` saying what it was computed from),
key = sha256 of {the model's full sha256 (every shard; memoised by stat under <cache>/hashes, so
an unchanged 240 GB model is hashed once, ~3 min), corpus sha256, ctx, effective chunk count,
from_q8, parse_special, llama.cpp build}: a model whose bytes changed is a new key, and so is its
--from-q8 Q8_0 copy (named from the same hash). Threads and -ngl do not change the key: every I-tier of a
release shares one imatrix.

Reading and checking an imatrix file is imatrix_file.py; `imatrix-report` is imatrix_report.py.
The two flock locks here (one run per cache key; one Q8_0 copy per model) are kept side by
side so they can become the project's one lock later.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from apex_orch.calibration.corpus import BuiltCorpus, build_corpus, make_manifest, manifest_path_for
from apex_orch.calibration.imatrix_file import read_imatrix
from apex_orch.calibration.tokenizer import ModelTokenizer
from apex_orch.core.errors import (ImatrixError, LockedError, ModelError, OutputExistsError, RequestError,
                                   ToolFailedError)
from apex_orch.core.fingerprint import sha256_file, source_sha256
from apex_orch.core.locks import FileLock
from apex_orch.core.safefiles import check_not_inputs, clear_name, copy_atomic, refuse_links, write_atomic
from apex_orch.core.settings import cache_root
from apex_orch.llama import tools
from apex_orch.model.info import read_model, shard_paths

# v2: the model is keyed by its full sha256 (a stat alone would let edited bytes pass as the same model)
KEY_SCHEME = "imatrix-v2"

ProgressCallback = Callable[[str], None]


# =========================================================================== planning

def _cache_dir() -> Path:
    return cache_root() / "imatrix"


def _model_fingerprint(model_path: Path) -> str:
    return "+".join(source_sha256(p) for p in shard_paths(model_path))


SHORT_CONV_ARCHS = frozenset({"lfm2", "lfm2moe"})   # GGUF architectures with a short-conv state


@dataclass
class ImatrixPlan:
    model_path: Path
    corpus_name: str
    corpus_sha256: str
    corpus_file: Path             # where the corpus text is written for llama-imatrix
    ctx: int
    chunks: int                   # effective chunk count (what llama-imatrix will process)
    requested_chunks: int | None
    available_chunks: int
    tokens: int                   # corpus tokens with the model's tokenizer
    ngl: int
    threads: int
    from_q8: bool
    parse_special: bool
    key: str
    key_material: dict
    cache_path: Path
    log_path: Path
    out: Path | None
    force: bool
    tool: Path                    # llama-imatrix
    corpus: BuiltCorpus = field(repr=False)    # the text in memory
    pass_chunks: bool = False     # chunks were asked for: --chunks (else the tool takes every chunk)
    no_repack: bool = False       # an MLA model: --no-repack (see plan_imatrix)
    one_sequence: bool = False    # a short-conv model: -b = ctx, one chunk per batch (see plan_imatrix)
    q8_path: Path | None = None
    quantize_tool: Path | None = None          # llama-quantize for the Q8_0 copy (from_q8)
    # The process whose scratch names the run writes (".partial-<pid>"): the one that runs the plan.
    scratch_pid: int = field(default_factory=os.getpid)

    @property
    def output(self) -> Path:
        return self.out or self.cache_path

    @property
    def tmp_path(self) -> Path:
        """Per-process scratch name (a killed run's orphan can never share it); .gguf suffix:
        llama-imatrix warns otherwise. Stale partials of the key are removed under the lock."""
        return self.cache_path.with_name(f".{self.key}.partial-{self.scratch_pid}.gguf")

    @property
    def run_model(self) -> Path:
        return self.q8_path if self.q8_path is not None else self.model_path

    @property
    def argv(self) -> list[str]:
        argv = [str(self.tool), "-m", str(self.run_model), "-f", str(self.corpus_file), "-o", str(self.tmp_path),
                "-c", str(self.ctx)]
        if self.pass_chunks:
            argv += ["--chunks", str(self.chunks)]
        if self.one_sequence:
            argv += ["-b", str(self.ctx)]
        argv += ["-ngl", str(self.ngl), "-t", str(self.threads)]
        if self.parse_special:
            argv.append("--parse-special")
        if self.no_repack:
            argv.append("--no-repack")
        return argv

    @property
    def q8_partial(self) -> Path | None:
        if self.q8_path is None:
            return None
        return self.q8_path.with_name(f".{self.q8_path.name}.partial-{self.scratch_pid}")

    @property
    def q8_argv(self) -> list[str] | None:
        if self.q8_path is None or self.quantize_tool is None:
            return None
        return [str(self.quantize_tool), str(self.model_path), str(self.q8_partial), "Q8_0", str(self.threads)]

    def for_process(self, *, threads: int, pid: int | None = None) -> "ImatrixPlan":
        """This plan run by another process (default: this one) with `threads` threads: the same
        key and outputs, its own scratch names."""
        return dataclasses.replace(self, threads=threads, scratch_pid=os.getpid() if pid is None else pid)

    @property
    def cached(self) -> bool:
        return self.cache_path.is_file()

    def describe(self) -> str:
        lines = [f"model:    {self.model_path}",
                 f"corpus:   {self.corpus_name} (sha256 {self.corpus_sha256[:16]}..., {self.tokens} tokens, "
                 f"{self.available_chunks} chunks of {self.ctx} available)",
                 f"chunks:   {self.chunks} x {self.ctx} tokens",
                 f"cache:    {self.cache_path} ({'present: cache hit' if self.cached else 'not computed yet'})"]
        if self.out:
            lines.append(f"output:   {self.out}")
        if self.q8_argv:
            lines.append("q8 copy:  " + " ".join(self.q8_argv))
        lines.append("command:  " + " ".join(self.argv))
        return "\n".join(lines)


def plan_imatrix(model_path: str | os.PathLike, corpus_name: str, ctx: int = 512, chunks: int | None = None,
                 ngl: int = 0, threads: int | None = None, out: str | os.PathLike | None = None, *,
                 from_q8: bool = False, force: bool = False, bin_dir: str | os.PathLike | None = None,
                 tokens: int | None = None) -> ImatrixPlan:
    """Decide everything about an imatrix run without writing anything.

    `tokens` may be given by a caller that already counted the corpus with this model's
    tokenizer; otherwise the tokenizer is loaded (vocab only) through the bindings.
    """
    model = Path(model_path)
    if not model.is_file() and not model.exists():
        raise ModelError(f"model not found: {model}")
    model_info = read_model(model)   # the header checked against itself (a FIFO, a folder refused) first
    if ctx < 8:
        raise RequestError(f"context {ctx} is too small", fields=("ctx",), hint="use 512 (the usual) or at least 64")
    if chunks is not None and chunks < 1:
        raise RequestError(f"chunks must be at least 1, got {chunks}", fields=("chunks",))
    if ngl < 0:
        raise RequestError(f"GPU layers must be 0 or more, got {ngl}", fields=("ngl",))
    threads = threads or os.cpu_count() or 1
    if out is not None:   # inputs are never outputs: refused before anything runs
        check_not_inputs([Path(out)], shard_paths(model), options=("out",))

    built = build_corpus(corpus_name, model=model)
    if tokens is None:
        tok = ModelTokenizer(model)
        try:
            tokens = tok.count(built.text, special=built.parse_special)
        finally:
            tok.close()
    need = 2 * ctx
    if tokens < need:
        raise ImatrixError(
            f"corpus {built.name!r} has {tokens} tokens with this model's tokenizer; llama-imatrix "
            f"needs at least {need} (2 x context {ctx})",
            hint="add text to the corpus (a local or hf source), raise its budget_tokens, or lower -c")
    available = tokens // ctx
    effective = min(chunks, available) if chunks else available

    material: dict[str, Any] = {
        "scheme": KEY_SCHEME,
        "model": _model_fingerprint(model),
        "corpus_sha256": built.sha256,
        "ctx": ctx,
        "chunks": effective,
        "from_q8": from_q8,
        "parse_special": built.parse_special,
        "llama_cpp": tools.build_label(),
    }
    # LFM2's short-conv state is garbage when a batch holds several chunks but not all of its
    # sequences (pinned llama.cpp: non-finite values or GGML_ASSERT in get_rows), so those models
    # get one chunk per batch; the batch size is part of the key only where it is set.
    one_sequence = model_info.arch in SHORT_CONV_ARCHS
    if one_sequence:
        material["batch"] = ctx
    key = hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:32]
    cache_dir = _cache_dir()
    corpus_file = cache_root() / "corpora" / f"{built.name}-{built.sha256[:12]}.txt"
    q8_path = quantize_tool = None
    if from_q8:
        fp = hashlib.sha256(material["model"].encode()).hexdigest()[:24]
        q8_path = cache_root() / "q8" / f"{model.stem}.{fp}.Q8_0.gguf"
        quantize_tool = tools.find_tool("llama-quantize", bin_dir).path
    # On CPUs with AMX, repacked attn_k_b cannot take MLA's permuted q_nope and llama.cpp aborts
    # (GGML_ASSERT(*cur_backend_id != -1)); repacking only speeds up, never changes data.
    mla = any(t.name.endswith("attn_k_b.weight") for t in model_info.tensors)
    return ImatrixPlan(
        model_path=model, corpus_name=built.name, corpus_sha256=built.sha256, corpus_file=corpus_file,
        ctx=ctx, chunks=effective, requested_chunks=chunks, available_chunks=available, tokens=tokens,
        ngl=ngl, threads=threads, from_q8=from_q8, parse_special=built.parse_special, key=key,
        key_material=material, cache_path=cache_dir / f"{key}.gguf", log_path=cache_dir / f"{key}.log",
        out=Path(out) if out else None, force=force, tool=tools.find_tool("llama-imatrix", bin_dir).path,
        corpus=built, pass_chunks=chunks is not None, no_repack=mla, one_sequence=one_sequence,
        q8_path=q8_path, quantize_tool=quantize_tool)


# =========================================================================== progress

class ImatrixProgress:
    """Turns llama-imatrix's log into a few progress lines.

    The tool prints `computing over N chunks`, `X seconds per pass - ETA Y minutes`, then
    `[i]ppl,` marks with no newline, so the per-chunk marks arrive together at the end.
    """

    COMPUTING = re.compile(r"computing over (\d+) chunks, n_ctx=(\d+)")
    PASS = re.compile(r"([\d.]+) seconds per pass - ETA (.*)$")
    MARK = re.compile(r"\[(\d+)\]([\d.]+|nan|inf)")
    FINAL = re.compile(r"Final estimate: PPL = ([\d.]+)")

    def __init__(self, emit: ProgressCallback | None):
        self.emit = emit or (lambda _line: None)
        self.total: int | None = None
        self.done = 0
        self.ppl: float | None = None
        self.tail: list[str] = []

    def __call__(self, line: str) -> None:
        if m := self.COMPUTING.search(line):
            self.total = int(m.group(1))
            self.emit(f"imatrix: computing over {self.total} chunks of {m.group(2)} tokens")
        elif m := self.PASS.search(line):
            self.emit(f"imatrix: {float(m.group(1)):.2f} s per pass, ETA {m.group(2).strip()}")
        if marks := self.MARK.findall(line):
            self.done = max(self.done, max(int(i) for i, _ in marks))
            try:
                self.ppl = float(marks[-1][1])
            except ValueError:
                pass
            total = self.total or self.done
            self.emit(f"imatrix: chunk {self.done}/{total}" + (f", PPL {self.ppl:.2f}" if self.ppl else ""))
        if m := self.FINAL.search(line):
            self.ppl = float(m.group(1))


# =========================================================================== locks

def _cache_lock(path: Path) -> FileLock:
    """One run per cache key (core.locks), the holder's pid written in for the error message."""
    path.parent.mkdir(parents=True, exist_ok=True)

    def busy(holder: str) -> LockedError:
        return LockedError(f"another apex-orch run (pid {holder or '?'}) is computing this imatrix",
                           where=str(path), hint="wait for it; a rerun then is a cache hit")
    return FileLock(path, record=str(os.getpid()), busy=busy)


def _ensure_q8(plan: ImatrixPlan, emit: ProgressCallback, timeout: float | None) -> None:
    assert plan.q8_path is not None and plan.q8_argv is not None
    if plan.q8_path.is_file():
        emit(f"imatrix: using cached Q8_0 copy {plan.q8_path}")
        return
    plan.q8_path.parent.mkdir(parents=True, exist_ok=True)
    # One Q8_0 copy per model, shared by runs on other corpora (other imatrix keys): each run writes
    # its own scratch name, and the copy is made under its own lock, which a second run waits for
    # (then finds the copy) instead of writing the same file at the same time.
    q8_lock = FileLock(plan.q8_path.with_name(plan.q8_path.name + ".lock"), record=str(os.getpid()),
                       busy=LockedError,   # never raised: a busy lock is waited for
                       on_wait=lambda _holder: emit("imatrix: waiting for another run's Q8_0 copy of this model"))
    with q8_lock:
        if plan.q8_path.is_file():
            emit(f"imatrix: using cached Q8_0 copy {plan.q8_path}")
            return
        partial = plan.q8_partial
        for stale in plan.q8_path.parent.glob(f".{plan.q8_path.name}.partial*"):
            if stale != partial:   # left by a killed run (we hold the lock: nobody else is writing)
                stale.unlink(missing_ok=True)
        emit(f"imatrix: making a Q8_0 copy of the model: {plan.q8_path}")
        try:
            clear_name(partial)   # a link planted at the scratch name is removed, never written through
            tools.run_tool(plan.q8_argv, log_path=plan.q8_path.with_suffix(".log"), timeout=timeout,
                           what="llama-quantize (Q8_0 copy)")
            os.replace(partial, plan.q8_path)
        except BaseException:
            partial.unlink(missing_ok=True)
            raise


# =========================================================================== running

def _publish(plan: ImatrixPlan, emit: ProgressCallback) -> Path:
    """Copy the cached imatrix to -o (atomic; refuses to overwrite a different file without force)."""
    if plan.out is None:
        return plan.cache_path
    out = plan.out
    if out.exists():
        if out.is_file() and sha256_file(out) == sha256_file(plan.cache_path):
            emit(f"imatrix: {out} is already this imatrix")
            return out
        if not plan.force:
            raise OutputExistsError(f"{out} exists and holds a different imatrix",
                                    hint="ask to replace it, or choose another output", options=("force", "out"))
    copy_atomic(plan.cache_path, out)
    return out


def _write_corpus_file(plan: ImatrixPlan) -> None:
    path = plan.corpus_file
    data = plan.corpus.data
    if not (path.is_file() and path.stat().st_size == len(data) and sha256_file(path) == plan.corpus_sha256):
        write_atomic(path, data)
    manifest = make_manifest(plan.corpus, text_name=path.name, total_tokens=plan.tokens, model=plan.model_path)
    write_atomic(manifest_path_for(path), json.dumps(manifest, indent=2) + "\n")


def run_imatrix(plan: ImatrixPlan, *, on_progress: ProgressCallback | None = None,
                timeout: float | None = None) -> Path:
    """Execute a plan; return the imatrix path (-o if given, else the cache file)."""
    emit = on_progress or (lambda _line: None)
    if plan.cached:
        read_imatrix(plan.cache_path)   # a damaged cache entry is an error, not a silent reuse
        emit(f"imatrix: cache hit: {plan.cache_path}")
        return _publish(plan, emit)

    plan.cache_path.parent.mkdir(parents=True, exist_ok=True)
    refuse_links([plan.cache_path.with_suffix(".lock"), plan.log_path, plan.cache_path,
                  plan.cache_path.with_suffix(".json"), *([plan.out] if plan.out else []),
                  *([plan.q8_path, plan.q8_path.with_suffix(".log")] if plan.q8_path else [])])
    with _cache_lock(plan.cache_path.with_suffix(".lock")):
        if plan.cached:  # finished by another run while we waited for the lock
            emit(f"imatrix: cache hit: {plan.cache_path}")
            return _publish(plan, emit)
        for stale in plan.cache_path.parent.glob(f".{plan.key}.partial*"):
            if stale != plan.tmp_path:
                stale.unlink(missing_ok=True)
                emit(f"imatrix: removed a partial file left by an interrupted run: {stale.name}")
        _write_corpus_file(plan)
        if plan.from_q8:
            _ensure_q8(plan, emit, timeout)
        progress = ImatrixProgress(emit)
        emit(f"imatrix: running llama-imatrix on {plan.corpus_name} ({plan.chunks} chunks x {plan.ctx})")
        try:
            result = tools.run_tool(plan.argv, log_path=plan.log_path, on_line=progress, timeout=timeout,
                                    what="llama-imatrix")
            if not plan.tmp_path.is_file():
                raise ToolFailedError("llama-imatrix exited 0 but wrote no imatrix",
                                      log_path=plan.log_path, log_tail="\n".join(result.tail))
            info = read_imatrix(plan.tmp_path)
            os.replace(plan.tmp_path, plan.cache_path)
        except BaseException:
            plan.tmp_path.unlink(missing_ok=True)
            raise
        sidecar = {
            "kind": "apex-orch imatrix",
            "key": plan.key,
            "inputs": plan.key_material,
            "model_path": str(plan.model_path),
            "corpus": plan.corpus_name,
            "corpus_file": str(plan.corpus_file),
            "tokens": plan.tokens,
            "command": plan.argv,
            "q8_command": plan.q8_argv,
            "seconds": round(result.seconds, 3),
            "chunks": info.chunk_count,
            "entries": len(info.entries),
            "sha256": sha256_file(plan.cache_path),
        }
        write_atomic(plan.cache_path.with_suffix(".json"), json.dumps(sidecar, indent=2) + "\n")
        ppl = f", PPL {progress.ppl:.2f}" if progress.ppl else ""
        emit(f"imatrix: done in {result.seconds:.1f} s: {info.chunk_count} chunks, "
             f"{len(info.entries)} tensors{ppl} -> {plan.cache_path}")
    return _publish(plan, emit)
