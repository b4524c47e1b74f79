"""Speed the way the community quotes it: the pinned `llama-bench`'s pp512 / tg128.

Takes: a GGUF and the evaluation settings (threads, ubatch, flash attention, repack).
Gives: `bench_argv` (the command line) and `measure_speed` (a `SpeedResult`: mean tokens/s of
each test over the repetitions and llama-bench's standard deviation, threads, batch sizes).

llama-bench runs each test `repetitions` times (its default 5) after one warm-up run, from an
empty cache, with random tokens: pp<N> decodes an N-token prompt as one batch, tg<N> generates
N tokens one at a time. Its `-o jsonl` records (one JSON object per test, one line each, on
stdout) are read back by field. Options left at llama-bench's defaults: `-b 2048`, `-ngl` (all
layers on a GPU build), the KV cache types; `-t`, `-ub`, `-fa` and `--repack` follow the
evaluation settings, so the speed is measured the way the numbers were (repack off also keeps
MLA models off the AMX path that aborts them, see docs/eval.md).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from apex_orch.core.errors import EvalError
from apex_orch.evaluation import base_cache
from apex_orch.evaluation.inputs import EvalSettings, model_facts
from apex_orch.evaluation.results import SpeedResult
from apex_orch.llama.tools import find_tool, run_tool

REPETITIONS = 5          # llama-bench's own default
N_PROMPT, N_GEN = 512, 128
_NUMBERS = ("n_prompt", "n_gen", "n_threads", "n_batch", "n_ubatch", "avg_ts", "stddev_ts")


def bench_argv(model: str | os.PathLike, settings: EvalSettings, *, n_prompt: int = N_PROMPT,
               n_gen: int = N_GEN, repetitions: int = REPETITIONS) -> list[str]:
    s = settings
    return [str(find_tool("llama-bench").path), "-m", str(model), "-p", str(n_prompt), "-n", str(n_gen),
            "-r", str(repetitions), "-t", str(s.n_threads), "-ub", str(s.n_ubatch),
            "-fa", "1" if s.flash_attn else "0", "--repack", "1" if s.repack else "0", "-o", "jsonl"]


def _records(lines: list[str], model: str) -> list[dict]:
    out = []
    for line in lines:
        text = line.strip()
        if not (text.startswith("{") and text.endswith("}")):
            continue
        try:
            rec = json.loads(text)
        except ValueError:
            raise EvalError(f"llama-bench printed a record that is not JSON: {text[:120]}", where=model) from None
        bad = [k for k in _NUMBERS if not isinstance(rec.get(k), (int, float)) or isinstance(rec.get(k), bool)]
        if bad or not isinstance(rec.get("samples_ts"), list):
            raise EvalError(f"llama-bench's record lacks {', '.join(bad) or 'samples_ts'}: {text[:120]}", where=model)
        out.append(rec)
    return out


def measure_speed(model: str | os.PathLike, settings: EvalSettings | None = None, *, n_prompt: int = N_PROMPT,
                  n_gen: int = N_GEN, repetitions: int = REPETITIONS) -> SpeedResult:
    """pp<n_prompt> and tg<n_gen> of `model` by llama-bench (mean ± sd over `repetitions` runs)."""
    settings = settings or EvalSettings()
    if min(n_prompt, n_gen, repetitions) < 1:
        raise EvalError(f"llama-bench needs positive counts (prompt {n_prompt}, generated {n_gen}, "
                        f"repetitions {repetitions})")
    model_facts(model, fingerprint=False)   # a clear error for a damaged file before the tool sees it
    lines: list[str] = []
    root = base_cache.cache_dir() / "work"
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="apex-bench-", dir=root) as work:
        run_tool(bench_argv(model, settings, n_prompt=n_prompt, n_gen=n_gen, repetitions=repetitions),
                 log_path=Path(work) / "llama-bench.log", on_line=lines.append, what="llama-bench")
    recs = _records(lines, str(model))
    pp = [r for r in recs if r["n_prompt"] == n_prompt and r["n_gen"] == 0]
    tg = [r for r in recs if r["n_gen"] == n_gen and r["n_prompt"] == 0]
    if len(pp) != 1 or len(tg) != 1:
        raise EvalError(f"llama-bench printed {len(pp)} pp{n_prompt} and {len(tg)} tg{n_gen} record(s), "
                        "expected one of each", where=str(model), hint="its log tail is above; rerun")
    p, g = pp[0], tg[0]
    for r in (p, g):
        if len(r["samples_ts"]) != repetitions:
            raise EvalError(f"llama-bench ran {len(r['samples_ts'])} repetitions of a test, not {repetitions}",
                            where=str(model))
    return SpeedResult(pp_tokens=n_prompt, pp_tokens_per_s=float(p["avg_ts"]), tg_tokens=n_gen,
                       tg_tokens_per_s=float(g["avg_ts"]), n_threads=int(p["n_threads"]), n_batch=int(p["n_batch"]),
                       n_ubatch=int(p["n_ubatch"]), flash_attn=bool(p.get("flash_attn")), repetitions=repetitions,
                       pp_tokens_per_s_sd=float(p["stddev_ts"]), tg_tokens_per_s_sd=float(g["stddev_ts"]),
                       repack=bool(p.get("repack")), tool="llama-bench", build_commit=p.get("build_commit"),
                       cpu_info=_text(p.get("cpu_info")), gpu_info=_text(p.get("gpu_info")))


def _text(value) -> str | None:
    """A free-text field of llama-bench's record (the machine's description), kept short and plain."""
    if not isinstance(value, str) or not value.strip():
        return None
    return " ".join(value.split())[:200]
