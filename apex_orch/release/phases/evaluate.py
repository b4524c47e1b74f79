"""Phase eval: every tier and baseline measured against the source, and the quality gates.

`run_phase(state, run)` evaluates each tier's file and each baseline's (release.baselines) against
the source model: PPL, KL divergence, same-top-p on the config's text, with one base-logits cache
for all of them (computed first); the config's task sets by llama-perplexity's scorers
(`eval.tasks`, evaluation.tasks); llama-bench's pp512 / tg128 when `eval.speed` asks
(evaluation.speed: mean and standard deviation of `repetitions` runs); and the source's own PPL,
task accuracies and speed. Tiers and baselines are measured with the same settings, so the card can
put them in one table. The work goes through `state.executor` (here, or one Ray task per file); the
records and the gates stay here. Results are records in the work folder (`eval/<file>.json` for a
tier, `eval/baseline-<name>.json` for a baseline, `eval/base.json`; each with a manifest keyed by
the file's sha256, the source's fingerprint, the text, the settings, the task data's sha256 and
counts, and the speed's repetitions), so a rerun evaluates nothing; with `run` false it only reads
the records that are fresh. It fills `state.evals` (per tier), `state.baseline_evals` (per baseline)
and `state.base_eval` for the card. A tier that fails a gate (its profile's, overridden by the
config's `eval.gates`; see plan.gates) stops the release here, after its record is kept, so the card
and publish phases do not run; baselines have no gates. With `eval.speculative` (on by default with
`mtp: bundled | draft`), the tiers that pass are then run with their MTP head drafting and without
(release.speculative: `state.speculative`, records `eval/speculative-<file>.json`).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

from apex_orch.core.errors import EvalError, TaskError
from apex_orch.core.fingerprint import source_sha256
from apex_orch.core.manifest import inputs_key
from apex_orch.evaluation.base_cache import BaseLogProbs
from apex_orch.evaluation.evaluate import measure_speed, plan_eval
from apex_orch.evaluation.gates import gate_failed, summary_gate_failures
from apex_orch.evaluation.inputs import EvalSettings, ModelFacts, TextFacts, default_threads, model_facts, text_facts
from apex_orch.evaluation.results import EvalResult, SpeedResult, TaskResult
from apex_orch.evaluation.task_files import TASK_KINDS, read_task_set
from apex_orch.evaluation.tasks import TaskPlan, TaskSettings, TaskSpec, plan_tasks, run_tasks
from apex_orch.llama.tools import build_label
from apex_orch.release.baselines import record_stem
from apex_orch.release.config import EvalConfig
from apex_orch.release.eval_records import read_record, record_path, write_record
from apex_orch.release.speculative import measure as measure_speculative
from apex_orch.release.state import PhaseReport, ReleaseState


def _record_path(state: ReleaseState, stem: str) -> Path:
    return record_path(state.work, stem)


def _settings(cfg: EvalConfig) -> EvalSettings:
    return EvalSettings(n_ctx=cfg.ctx, chunks=cfg.chunks, n_threads=default_threads())


def _text_facts(state: ReleaseState) -> TextFacts:
    e = state.config.eval
    if e.text is not None:
        return text_facts(text=e.text.resolve())
    return text_facts(corpus=e.corpus)


def task_specs(cfg: EvalConfig) -> list[TaskSpec]:
    """The config's task sets as evaluation.tasks specs (a file's path resolved: an unset ${VAR} is
    a ConfigError at its line)."""
    return [TaskSpec(t.task, str(t.file.resolve()) if t.file is not None else None, t.count) for t in cfg.tasks]


def plan_release_tasks(state: ReleaseState, settings: EvalSettings | None = None) -> TaskPlan | None:
    """Every task file read and checked (pinned Hub data from the cache when there); None without tasks."""
    e = state.config.eval
    if not e.tasks:
        return None
    ts = TaskSettings.from_eval(settings or _settings(e), n_ctx=e.task_ctx)
    return plan_tasks(model_facts(state.model_path, fingerprint=False), task_specs(e), ts)


def check_task_files(config) -> None:
    """Every task file the config names exists and parses (llama.cpp's format), before anything is
    written: a missing one is a TaskError at its config line, a malformed one names the file's line."""
    for i, t in enumerate(config.eval.tasks):
        if t.file is None:
            continue
        p = t.file.resolve()            # an unset ${VAR}: a ConfigError at this line
        kind = TASK_KINDS[t.task]
        if not os.path.lexists(p) or p.is_dir():
            raise TaskError(f"eval.tasks[{i}]: the {kind.title} task file {p} does not exist", where=t.where,
                            hint="fix the path (relative to the release config's folder), or remove the task")
        read_task_set(kind, p)


def _tasks_key(plan: TaskPlan | None) -> dict | None:
    """What task results depend on, without the files' paths: data sha256, counts, settings."""
    if plan is None:
        return None
    s = plan.settings
    return {"sets": [{"task": t.kind.name, "data_sha256": t.set.file.sha256 if t.set else t.source.sha256,
                      "limit": t.spec.limit} for t in plan.tasks],
            "settings": {"n_ctx": s.n_ctx, "n_batch": s.n_batch, "n_ubatch": s.n_ubatch, "flash_attn": s.flash_attn,
                         "repack": s.repack}}


def _speed_key(cfg: EvalConfig) -> dict | bool:
    return {"repetitions": cfg.speed_repetitions, "tokens": list(cfg.speed_tokens)} if cfg.speed else False


def check_text_early(state: ReleaseState) -> tuple[int, int] | None:
    """(tokens, chunks) of the eval text with the source's tokenizer, checked before any tool runs
    (the imatrix and every tier would otherwise be made first): long enough for the context, and
    enough scored tokens for KL statistics in the chunks asked for. None when eval is off."""
    from apex_orch.evaluation.evaluate import check_eval_text
    e = state.config.eval
    if not e.enabled or state.model_path is None:
        return None
    try:
        return check_eval_text(state.model_path, _text_facts(state), _settings(e), kld=True)
    except EvalError as exc:   # the same finding, said in the release config's words
        raise EvalError(exc.message, where=exc.where, hint="in the release config: a longer eval.text (or another "
                        "eval.corpus), a smaller eval.ctx, or more eval.chunks") from None


def _file_inputs(files: list[Path], common: dict) -> dict:
    # full sha256 of each file (free after the quantize phase verified it: memoised by stat)
    return {"files": [source_sha256(f) for f in files], **common}


def task_summary(results: list[TaskResult]) -> list[dict]:
    return [{"task": t.task, "title": t.title, "accuracy": t.accuracy, "error": t.error,
             "ci95": list(t.ci95) if t.ci95 else None, "n_tasks": t.n_tasks, "n_available": t.n_available,
             "data": t.data, "data_sha256": t.data_sha256, "settings": t.settings} for t in results]


def speed_summary(sp: SpeedResult | None) -> dict | None:
    return dataclasses.asdict(sp) if sp is not None else None


def _summary(result: EvalResult) -> dict:
    k = result.kld
    sp = result.speed
    return {"ppl": result.ppl, "ppl_err": result.ppl_err, "base_ppl": result.base_ppl,
            "kld_mean": k.kld_mean if k else None, "kld_mean_err": k.kld_mean_err if k else None,
            "kld_p999": k.kld_p999 if k else None, "ppl_ratio": k.mean_ppl_ratio if k else None,
            "same_top_p": k.same_top_p if k else None,
            "pp_tokens_per_s": sp.pp_tokens_per_s if sp else None,
            "tg_tokens_per_s": sp.tg_tokens_per_s if sp else None,
            "speed": speed_summary(sp), "tasks": task_summary(result.tasks),
            "n_chunks": result.n_chunks, "n_ctx": result.settings.get("n_ctx")}


def run_phase(state: ReleaseState, run: bool) -> PhaseReport:
    cfg = state.config
    e = cfg.eval
    if not e.enabled:
        return PhaseReport("eval", "not needed", detail="eval.enabled is false: benchmarks pending")
    settings = _settings(e)
    tf = _text_facts(state)
    base = model_facts(state.model_path)
    task_plan = plan_release_tasks(state, settings)
    common = {"base": base.fingerprint, "text_sha256": tf.sha256, "settings": settings.numeric_key(),
              "speed": _speed_key(e), "tasks": _tasks_key(task_plan), "llama": build_label()}
    failures: list[str] = []
    base_inputs = {**common, "kind": "base"}
    base_key = inputs_key(base_inputs)
    base_path = _record_path(state, "base")
    found: list[_Target] = []   # the tiers, then the baselines, with files: records fresh, or to make
    for job in state.jobs:
        files = state.files.get(job.profile.tier)
        if files:
            found.append(_target(state, "tier", job.profile.tier, files, files[0].name, common,
                                 dict(job.profile.gates)))
    for b in cfg.baselines:
        files = state.baseline_files.get(b.label)
        if files:
            found.append(_target(state, "baseline", b.label, files, record_stem(b), common, {}))
    fresh = sum(1 for t in found if t.record is not None)
    todo = [t for t in found if t.record is None] if run else []
    cache = _evaluate(state, todo, base, tf, settings, task_plan) if todo else None
    ran = sum(1 for t in todo if t.record is not None)
    for t in found:
        if t.record is None:
            continue
        if t.kind == "baseline":
            state.baseline_evals[t.name] = t.record
            continue
        state.evals[t.name] = t.record
        gates = dict(t.gates)
        gates.update(dict(e.gates))
        failures += summary_gate_failures(t.record["summary"], gates, t.files[0].name)
    if state.evals or state.baseline_evals:
        record = read_record(base_path, base_key)
        if record is None and run:
            record = _base_record(state, base, tf, settings, task_plan, cache)
            write_record(base_path, base_key, base_inputs, record)
        state.base_eval = record
    if failures:
        raise gate_failed(failures, hint="the results are kept in the release folder; the card and publish phases "
                             "did not run. Pick other tiers or relax eval.gates in the release config")
    pending = len(state.jobs) + len(cfg.baselines) - len(state.evals) - len(state.baseline_evals)
    detail = f"{ran} evaluated, {fresh} up to date" + (f", {pending} pending" if pending else "")
    spec_ran, spec_fresh = measure_speculative(state, run)
    if e.speculative:
        detail += f"; MTP drafting: {spec_ran} measured, {spec_fresh} up to date"
    if not run:
        return PhaseReport("eval", "resolved", detail=detail)
    return PhaseReport("eval", "ran" if ran or spec_ran else "up to date", detail=detail)


def _base_record(state: ReleaseState, base: ModelFacts, tf: TextFacts, settings: EvalSettings,
                 task_plan: TaskPlan | None, cache: Path | None) -> dict:
    """The source's own numbers: its exact PPL (from the base cache), task accuracies and speed."""
    e = state.config.eval
    cache = cache or state.executor.base_cache(base, tf, settings, progress=state.progress)
    with BaseLogProbs(cache) as c:
        ppl, err = c.meta["base_ppl"], c.meta["base_ppl_err"]
    tasks = run_tasks(task_plan, progress=state.progress) if task_plan is not None else []
    sp = measure_speed(state.model_path, settings, repetitions=e.speed_repetitions, n_prompt=e.speed_tokens[0],
                       n_gen=e.speed_tokens[1]) if e.speed else None
    return {"file": Path(base.path).name, "size": base.size_bytes, "type": state.model.source_ftype_label,
            "ppl": ppl, "ppl_err": err, "pp_tokens_per_s": sp.pp_tokens_per_s if sp else None,
            "tg_tokens_per_s": sp.tg_tokens_per_s if sp else None, "speed": speed_summary(sp),
            "tasks": task_summary(tasks)}


@dataclass
class _Target:
    kind: str            # "tier" or "baseline"
    name: str            # the tier, or the baseline's label
    files: list[Path]
    path: Path           # its record
    key: str
    inputs: dict
    gates: dict
    record: dict | None  # fresh, or made by this run


def _target(state: ReleaseState, kind: str, name: str, files: list[Path], stem: str, common: dict,
            gates: dict) -> _Target:
    inputs = _file_inputs(files, common)
    key = inputs_key(inputs)
    path = _record_path(state, stem)
    return _Target(kind, name, files, path, key, inputs, gates, read_record(path, key))


def _evaluate(state: ReleaseState, todo: list[_Target], base: ModelFacts, tf: TextFacts,
              settings: EvalSettings, task_plan: TaskPlan | None) -> Path:
    """Evaluate the files without a fresh record through the executor; each record is written as
    soon as its file is done (kept when another one fails). Returns the base log-prob cache."""
    e = state.config.eval
    plans = []
    for t in todo:
        what = f" (baseline {t.name})" if t.kind == "baseline" else ""
        state.progress(f"eval: {t.files[0].name}{what} against {Path(base.path).name} ({e.text_label()}, "
                       f"ctx {e.ctx}, chunks {e.chunks or 'all'}"
                       + (f", {len(task_plan.tasks)} task set(s)" if task_plan else "") + ")")
        plan = plan_eval(t.files[0], base=state.model_path, settings=settings, speed=e.speed, text_facts_=tf,
                         speed_repetitions=e.speed_repetitions)
        plan.speed_tokens = e.speed_tokens
        if task_plan is not None:   # the sets read once, scored on every file with the same settings
            plan.tasks = TaskPlan(plan.model, task_plan.settings, task_plan.tasks)
        plans.append(plan)
    # Once, before the files: every evaluation reads it (on a cluster, from shared storage).
    cache = state.executor.base_cache(base, tf, settings, progress=state.progress)

    def keep(i: int, result: EvalResult) -> None:
        t = todo[i]
        t.record = {t.kind: t.name, "file": t.files[0].name,
                    "size": sum(f.stat().st_size for f in t.files), "summary": _summary(result),
                    "text": e.text_label(), "settings": settings.to_dict()}
        write_record(t.path, t.key, t.inputs, t.record)
    state.executor.evaluate(plans, progress=state.progress, on_result=keep)
    return cache
