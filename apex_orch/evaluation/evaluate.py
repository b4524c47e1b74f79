"""Perplexity and KL divergence, in-process with the bindings, equal to llama-perplexity.

What llama-perplexity does (tools/perplexity/perplexity.cpp in the pinned tree), and so what
we do: the text (one trailing newline dropped, like `-f`) is tokenized with the model's
special tokens added (BOS) and without parsing special tokens; it is cut into
floor(n_tokens / n_ctx) chunks of n_ctx tokens (`--chunks` caps that); each chunk is decoded
from an empty KV cache with its first token replaced by BOS (when the vocabulary adds one);
only the second half is scored: positions first = n_ctx/2 .. n_ctx-2 predict the next token,
n_ctx - 1 - first tokens per chunk. PPL = exp(mean NLL); its error is
ppl * sqrt((mean(NLL^2) - mean(NLL)^2) / (count - 1)).

With a base model, the base's log-probs are computed once (see base_cache) and the tool's KL
statistics are reproduced: the same sums, the same percentile interpolation (float32), the
same names. Numbers change with flash attention, batch size and (a little) the KV layout,
so those settings are explicit (`EvalSettings`) and recorded in every result; batch = ctx,
one sequence per batch, flash attention on (what the tool's `auto` picks on CPU).

`--backend llama-perplexity` runs the binary with the same settings (`tool_backend`) and
parses its records into the same `EvalResult`.

Task accuracy (`tasks`: llama-perplexity's HellaSwag, Winogrande and multiple-choice scorers)
and speed (`speed`: llama-bench's pp512/tg128) are added to the same result. An evaluation with
tasks may have no text: then it has no perplexity part.

This module is the orchestration: `plan_eval` / `run_eval` / `evaluate`, `ensure_base_cache`.
The pieces it joins: `inputs` (settings, model and text facts), `session` (the bindings),
`statistics` (the tool's formulas), `results`, `gates`, `tool_backend`, `tasks`, `speed`.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from apex_orch.core.errors import EvalError, RequestError
from apex_orch.core.safefiles import check_not_inputs
from apex_orch.evaluation import base_cache as evalcache
from apex_orch.evaluation.inputs import (EvalSettings, ModelFacts, Progress, TextFacts, count_chunks, model_facts,
                                         read_text_bytes, text_facts)
from apex_orch.evaluation.results import EvalResult
from apex_orch.evaluation.session import BindingsModel, check_same_vocab, chunk_logits
from apex_orch.evaluation.speed import N_GEN, N_PROMPT, measure_speed
from apex_orch.evaluation.statistics import (MIN_KLD_TOKENS, KLDRows, kld_rows, kld_stats, map_row_blocks, ppl_from_nll,
                                             ppl_rows)
from apex_orch.evaluation.tasks import TaskPlan, TaskSettings, TaskSpec, plan_tasks, run_tasks
from apex_orch.evaluation.tool_backend import ToolBase, run_with_tool
from apex_orch.llama.tools import build_label
from apex_orch.model.info import shard_paths

BACKENDS = ("bindings", "llama-perplexity")
SPEED_REPETITIONS = 5        # llama-bench's default


# --------------------------------------------------------------------------- plan

@dataclass
class EvalPlan:
    """Everything an evaluation will do, resolved and printable before anything runs."""
    model: ModelFacts
    text: TextFacts | None               # None: tasks (and speed) only
    settings: EvalSettings
    backend: str = "bindings"
    base: ModelFacts | None = None
    cache_path: Path | None = None       # base log-probs (bindings backend)
    cache_hit: bool = False
    speed: bool = False
    speed_repetitions: int = SPEED_REPETITIONS
    speed_tokens: tuple[int, int] = (N_PROMPT, N_GEN)   # llama-bench's -p / -n: pp512 / tg128
    tasks: TaskPlan | None = None

    def describe(self) -> str:
        s = self.settings
        lines = [f"model    {self.model.path} ({self.model.tier}, {self.model.size_bytes / 2**20:.1f} MiB, "
                 f"{self.model.bpw:.2f} bpw)"]
        if self.text is not None:
            lines += [f"text     {self.text.label} (sha256 {self.text.sha256[:12]}, {self.text.n_bytes} bytes)",
                      f"backend  {self.backend}",
                      f"settings ctx {s.n_ctx}, chunks {s.chunks or 'all'}, batch {s.batch}, ubatch {s.ubatch}, "
                      f"threads {s.n_threads}, flash-attn {'on' if s.flash_attn else 'off'}"]
        if self.base:
            lines.append(f"base     {self.base.path}")
            if self.backend == "bindings":
                lines.append(f"cache    {self.cache_path} ({'hit' if self.cache_hit else 'will be computed'})")
        if self.tasks is not None:
            lines.append(self.tasks.describe())
        if self.speed:
            lines.append(f"speed    llama-bench pp{self.speed_tokens[0]}/tg{self.speed_tokens[1]}, "
                         f"{self.speed_repetitions} repetition(s)")
        return "\n".join(lines)


def base_cache_inputs(base: ModelFacts, text: TextFacts, settings: EvalSettings) -> dict:
    return {"base": base.fingerprint, "text_sha256": text.sha256, **settings.numeric_key(),
            "llama": build_label()}


def plan_eval(model: str | os.PathLike, *, base: str | os.PathLike | None = None,
              text: str | os.PathLike | None = None, corpus: str | None = None,
              settings: EvalSettings | None = None, backend: str = "bindings",
              speed: bool = False, text_facts_: TextFacts | None = None,
              tasks: list[TaskSpec] | None = None, task_settings: TaskSettings | None = None,
              speed_repetitions: int = SPEED_REPETITIONS) -> EvalPlan:
    """Resolve inputs (reads GGUF headers, the text and the task files; runs nothing). Without a
    text (`text`, `corpus`, `text_facts_`) the evaluation is tasks and/or speed only."""
    if backend not in BACKENDS:
        raise RequestError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}", fields=("backend",))
    settings = settings or EvalSettings()
    facts = model_facts(model, fingerprint=False)
    base_facts = model_facts(base) if base is not None else None
    has_text = text_facts_ is not None or text is not None or corpus is not None
    if not has_text and (tasks or speed) and base is None:
        tf = None
    else:
        tf = text_facts_ or text_facts(text, corpus)
    task_plan = plan_tasks(facts, tasks, task_settings or TaskSettings.from_eval(settings)) if tasks else None
    plan = EvalPlan(model=facts, text=tf, settings=settings, backend=backend, base=base_facts, speed=speed,
                    speed_repetitions=speed_repetitions, tasks=task_plan)
    if base_facts is not None and backend == "bindings":
        plan.cache_path = evalcache.cache_path(base_cache_inputs(base_facts, tf, settings))
        plan.cache_hit = plan.cache_path.is_file()
    if tf is not None and not plan.cache_hit:   # before any tool runs (--dry-run too): the text holds the chunks
        check_eval_text(base if base is not None else model, tf, settings, kld=base_facts is not None)
    return plan


_TEXT_TOKENS: dict[tuple[str, str], int] = {}


def check_eval_text(model: str | os.PathLike, text: TextFacts, settings: EvalSettings, *,
                    kld: bool) -> tuple[int, int]:
    """(tokens, chunks evaluated) of `text` with `model`'s tokenizer (its vocabulary only, loaded in
    tens of milliseconds), checked before any tool runs: at least two contexts of tokens, and, for KL
    divergence, at least MIN_KLD_TOKENS scored tokens in the chunks evaluated. Errors name the text."""
    memo_key = (os.path.realpath(model), text.sha256)
    n_tokens = _TEXT_TOKENS.get(memo_key)
    if n_tokens is None:   # once per (model, text) in a process: compare and a release plan one file each
        with BindingsModel(model, vocab_only=True) as vm:
            n_tokens = len(vm.tokenize(read_text_bytes(text)))
        _TEXT_TOKENS[memo_key] = n_tokens
    n_chunks, _notes = count_chunks(n_tokens, settings, text.label)
    scored = n_chunks * settings.scored_per_chunk
    if kld and scored < MIN_KLD_TOKENS:
        raise EvalError(f"{n_chunks} chunk(s) of {settings.n_ctx} tokens score {scored} tokens; KL statistics need "
                        f"at least {MIN_KLD_TOKENS} (llama-perplexity prints none below that)", where=text.label,
                        hint="use more chunks or a larger context; each chunk scores its second half",
                        options=("chunks", "n_ctx"))
    return n_tokens, n_chunks


# --------------------------------------------------------------------------- bindings runner

def ensure_base_cache(base: ModelFacts, text: TextFacts, settings: EvalSettings, *,
                      progress: Progress | None = None, refresh: bool = False) -> Path:
    """Compute the base's log-probs once per (base, text, settings) and return the cache file."""
    inputs = base_cache_inputs(base, text, settings)
    path = evalcache.cache_path(inputs)
    # Inputs are never outputs: a cache file that is the base or the text (a link or
    # hard link planted in the cache, or APEX_ORCH_EVAL_CACHE pointed at the inputs) is refused.
    check_not_inputs([path], [*shard_paths(Path(base.path)), Path(text.path)],
                     what="eval cache folder (APEX_ORCH_EVAL_CACHE)", options=())
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
        n_chunks, _ = count_chunks(len(tokens), settings, text.label)
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
                    logits = chunk_logits(cx, tokens, start, settings, bm.add_bos, bm.bos)[:n_scored]
                    targets = tokens[start + first + 1:start + n_ctx]
                    parts = map_row_blocks(n_scored, lambda lo, hi: evalcache.quantize_rows(logits[lo:hi],
                                                                                             targets[lo:hi]),
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
                check_same_vocab(bm.vocab_signature(), cache.meta["vocab"], plan.model.path, plan.base.path)
                tokens = cache.tokens
                n_text_tokens = int(cache.meta["n_text_tokens"])
                n_chunks = cache.n_chunks
                if s.chunks is not None and s.chunks > n_chunks:
                    notes.append(f"{s.chunks} chunks asked for, more than the text holds; "
                                 f"evaluated all {n_chunks} chunks")
            else:
                tokens = bm.tokenize(read_text_bytes(plan.text))
                n_text_tokens = len(tokens)
                n_chunks, notes = count_chunks(n_text_tokens, s, plan.text.label)
            first, n_ctx = s.first, s.n_ctx
            nll_parts: list[np.ndarray] = []
            kld_parts: list[KLDRows] = []
            with bm.context(n_ctx=n_ctx, n_batch=s.batch, n_ubatch=s.ubatch, n_threads=s.n_threads,
                            flash_attn=s.flash_attn) as cx:
                for i in range(n_chunks):
                    start = i * n_ctx
                    td = time.monotonic()
                    logits = chunk_logits(cx, tokens, start, s, bm.add_bos, bm.bos)
                    decode_s += time.monotonic() - td
                    targets = tokens[start + first + 1:start + n_ctx]
                    rows = logits[:len(targets)]
                    if cache is None:
                        nll_parts.append(ppl_rows(rows, targets, s.n_threads))
                    else:
                        kld_parts.append(kld_rows(rows, targets, cache.chunk(i), cache.scale[i],
                                                  cache.min_log_prob[i], s.n_threads))
                    say(f"{Path(plan.model.path).name}: chunk {i + 1}/{n_chunks}")
    finally:
        if cache is not None:
            cache.close()
    n_scored = n_chunks * s.scored_per_chunk
    kld = None
    if cache is None:
        ppl, ppl_err = ppl_from_nll(np.concatenate(nll_parts))
    else:
        if n_scored < MIN_KLD_TOKENS:
            raise EvalError(f"only {n_scored} tokens scored; KL statistics need at least {MIN_KLD_TOKENS} "
                            "(llama-perplexity prints none below that)", where=plan.model.path,
                            hint="use more chunks or a larger context")
        kld = kld_stats(np.concatenate([p.nll for p in kld_parts]), np.concatenate([p.nll_base for p in kld_parts]),
                        np.concatenate([p.kld for p in kld_parts]), np.concatenate([p.p_diff for p in kld_parts]),
                        sum(p.same_top for p in kld_parts))
        ppl, ppl_err = kld.mean_ppl_q, kld.mean_ppl_q_err
    return EvalResult(
        model=plan.model, backend="bindings", settings={**s.to_dict(), "chunks": n_chunks},
        text=plan.text, n_tokens=n_text_tokens, n_chunks=n_chunks, n_scored=n_scored, ppl=ppl,
        ppl_err=ppl_err, base=plan.base, base_ppl=base_ppl, base_ppl_err=base_err, kld=kld,
        seconds=time.monotonic() - t0, eval_tokens_per_s=(n_chunks * n_ctx / decode_s) if decode_s else None,
        llama_build=build_label(), cache=str(plan.cache_path) if plan.cache_path else None, notes=notes)


# --------------------------------------------------------------------------- entry points

def run_eval(plan: EvalPlan, *, progress: Progress | None = None, tool_base: ToolBase | None = None) -> EvalResult:
    """Perplexity (and KL statistics) when the plan has a text, then its task sets, then speed."""
    if plan.text is None:
        # no perplexity part: the task results carry their own settings
        result = EvalResult(model=plan.model, backend="llama-perplexity", settings={}, text=None, n_tokens=None,
                            n_chunks=0, n_scored=0, ppl=None, ppl_err=None, llama_build=build_label())
    elif plan.backend == "bindings":
        result = _run_bindings(plan, progress)
    else:
        result = run_with_tool(plan.model, plan.text, plan.settings, base=plan.base, progress=progress,
                               tool_base=tool_base)
    if plan.tasks is not None:
        result.tasks = run_tasks(plan.tasks, progress=progress)
    if plan.speed:
        if progress:
            progress(f"llama-bench: {Path(plan.model.path).name}")
        result.speed = measure_speed(plan.model.path, plan.settings, repetitions=plan.speed_repetitions,
                                     n_prompt=plan.speed_tokens[0], n_gen=plan.speed_tokens[1])
    return result


def evaluate(model: str | os.PathLike, *, base: str | os.PathLike | None = None,
             text: str | os.PathLike | None = None, corpus: str | None = None,
             settings: EvalSettings | None = None, backend: str = "bindings", speed: bool = False,
             tasks: list[TaskSpec] | None = None, task_settings: TaskSettings | None = None,
             progress: Progress | None = None) -> EvalResult:
    """One call: plan and run an evaluation (PPL; with `base`, the KL statistics too; task sets;
    llama-bench speed)."""
    plan = plan_eval(model, base=base, text=text, corpus=corpus, settings=settings, backend=backend, speed=speed,
                     tasks=tasks, task_settings=task_settings)
    return run_eval(plan, progress=progress)
