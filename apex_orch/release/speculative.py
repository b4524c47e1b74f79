"""The eval phase's MTP measurement: llama.cpp drafting with each tier's MTP head, and without it.

With `eval.speculative` (on by default when `mtp:` is bundled or draft), every tier is run through
evaluation.speculative once: greedy generation with the head drafting (bundled: the head in the
tier file itself; draft: the published mtp-<Model>.gguf beside it, `-md`) and without speculation.
`check_result` must pass (tokens drafted, the same output as without the head): a failure is its
EvalError, and no record is kept, so the next run measures again.

Each tier's result is a record `.apex-release/eval/speculative-<file>.json` (release.eval_records)
keyed by the tier file's sha256, the draft's, the settings (tokens, drafted per step, context,
threads, prompt) and the llama.cpp build, so a rerun with the same files measures nothing; the
tools' logs go to `.apex-release/speculative/<file>/`. The records fill `state.speculative` (tier ->
record) for the card. The speeds are this machine's: the record keeps the threads and the build so
the card can say so.
"""

from __future__ import annotations

import math
from pathlib import Path

from apex_orch.core.fingerprint import source_sha256
from apex_orch.core.manifest import inputs_key
from apex_orch.evaluation.inputs import default_threads
from apex_orch.evaluation.speculative import (DEFAULT_CTX, DEFAULT_DRAFT_MAX, DEFAULT_PROMPT, SpeculativeResult,
                                              check_result, plan_speculative, run_speculative)
from apex_orch.llama.tools import build_label
from apex_orch.release.eval_records import read_record, record_path, write_record
from apex_orch.release.state import ReleaseState

LOG_DIR = "speculative"
SUMMARY_INTS = ("n_predict", "draft_max", "ctx", "threads", "drafted", "accepted", "generated")
SUMMARY_RATES = ("tokens_per_s_with", "tokens_per_s_without", "speed_ratio")


def record_stem(file_name: str) -> str:
    return f"speculative-{file_name}"


def _settings(state: ReleaseState) -> dict:
    return {"n_predict": state.config.eval.speculative_tokens, "draft_max": DEFAULT_DRAFT_MAX, "ctx": DEFAULT_CTX,
            "threads": default_threads(), "repack": False, "prompt": DEFAULT_PROMPT}


def _rate(x: float) -> float | None:
    return x if math.isfinite(x) else None     # a run too short for the tool's clock: no speed


def summary(result: SpeculativeResult) -> dict:
    """What the card shows and the record keeps: the head's run's draft counts, both runs' speeds."""
    p, w, wo = result.plan, result.with_head, result.without
    return {"n_predict": p.n_predict, "draft_max": p.draft_max, "ctx": p.ctx, "threads": p.threads,
            "drafted": w.n_drafted, "accepted": w.n_accept, "acceptance": result.acceptance,
            "generated": w.n_predict, "tokens_per_s_with": _rate(w.tokens_per_s),
            "tokens_per_s_without": _rate(wo.tokens_per_s),
            "speed_ratio": _rate(result.speed_ratio) if math.isfinite(wo.tokens_per_s) else None,
            "decoded_with": [w.decoded, w.decode_seconds], "decoded_without": [wo.decoded, wo.decode_seconds],
            "same_output": result.same_output}


def valid(record: dict | None) -> bool:
    """A record read back is used only when every number the card shows is there, of its type."""
    if record is None or not isinstance(record.get("llama_cpp"), str) or not isinstance(record.get("file"), str):
        return False
    s = record.get("summary")
    if not isinstance(s, dict):
        return False
    ints = all(isinstance(s.get(k), int) and not isinstance(s.get(k), bool) and s[k] >= 0 for k in SUMMARY_INTS)
    rates = all(s.get(k) is None or (isinstance(s[k], (int, float)) and not isinstance(s[k], bool))
                for k in SUMMARY_RATES)
    return ints and rates and s["accepted"] <= s["drafted"] and s["drafted"] > 0 and s.get("same_output") is True


def measure(state: ReleaseState, run: bool) -> tuple[int, int]:
    """Every tier with a file measured (or its fresh record read); (measured now, up to date)."""
    e, mtp = state.config.eval, state.config.mtp
    if not e.speculative or mtp is None or mtp.mode not in ("bundled", "draft"):
        return 0, 0
    draft: Path | None = None
    if mtp.mode == "draft":
        if not state.mtp_files:
            return 0, 0                      # the draft file is not made yet: pending, like a missing tier
        draft = state.mtp_files[0]
    settings = _settings(state)
    ran = fresh = 0
    for job in state.jobs:
        files = state.files.get(job.profile.tier)
        if not files:
            continue
        inputs = {"kind": "speculative", "files": [source_sha256(f) for f in files],
                  "draft": source_sha256(draft) if draft is not None else None, "settings": settings,
                  "llama": build_label()}
        key = inputs_key(inputs)
        path = record_path(state.work, record_stem(files[0].name))
        record = read_record(path, key)
        if record is not None and valid(record):
            fresh += 1
        elif run:
            record = _measure(state, files[0], draft, settings)
            write_record(path, key, inputs, record)
            ran += 1
        else:
            continue
        state.speculative[job.profile.tier] = record
    return ran, fresh


def _measure(state: ReleaseState, model: Path, draft: Path | None, settings: dict) -> dict:
    """One tier: both runs, checked (an EvalError when the head drafted nothing or the outputs differ)."""
    plan = plan_speculative(model, draft=draft, prompt=settings["prompt"], n_predict=settings["n_predict"],
                            draft_max=settings["draft_max"], ctx=settings["ctx"], threads=settings["threads"],
                            repack=settings["repack"])
    logs = state.work / LOG_DIR / model.name
    state.progress(f"eval: {model.name}: llama.cpp drafting with the MTP head"
                   + (f" ({draft.name})" if draft is not None else "") + f", then without ({settings['n_predict']} "
                   f"tokens, {settings['threads']} threads; logs: {logs})")
    result = run_speculative(plan, logs)
    check_result(result)
    return {"file": model.name, "draft": draft.name if draft is not None else None, "head": plan.head,
            "summary": summary(result), "llama_cpp": result.build}
