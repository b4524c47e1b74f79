"""Phase eval: every tier measured against the source, and the quality gates.

`run_phase(state, run)` evaluates each tier's file (PPL, KL divergence, same-top-p, and speed when
the config asks) against the source model on the config's text, with one base-logits cache for
all tiers (computed first), and the source's own PPL. The work goes through `state.executor`
(here, or one Ray task per tier); the records and the gates stay here. Results are records in the
work folder (`eval/<file>.json`, each with a manifest keyed by the file's sha256, the source's
fingerprint, the text and the settings), so a rerun evaluates nothing; with `run` false it only
reads the records that are fresh. It fills `state.evals` (per tier) and `state.base_eval` for the
card. A tier that fails a gate (its profile's, overridden by the config's `eval.gates`; see
plan.gates) stops the release here, after its record is kept, so the card and publish phases do
not run.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from apex_orch.core.errors import ApexError, EvalError
from apex_orch.core.fingerprint import file_record, source_sha256
from apex_orch.core.infiles import read_json
from apex_orch.core.manifest import inputs_key, manifest_path, up_to_date, write_manifest
from apex_orch.core.outputs import atomic_write_text
from apex_orch.core.safefiles import safe_mkdir
from apex_orch.evaluation.base_cache import BaseLogProbs
from apex_orch.evaluation.evaluate import measure_speed, plan_eval
from apex_orch.evaluation.gates import gate_failed, summary_gate_failures
from apex_orch.evaluation.inputs import EvalSettings, ModelFacts, TextFacts, default_threads, model_facts, text_facts
from apex_orch.evaluation.results import EvalResult
from apex_orch.llama.tools import build_label
from apex_orch.quantize.job import QuantizeJob
from apex_orch.release.config import EvalConfig
from apex_orch.release.state import PhaseReport, ReleaseState


def _record_path(state: ReleaseState, file_name: str) -> Path:
    return state.work / "eval" / f"{file_name}.json"


def _settings(cfg: EvalConfig) -> EvalSettings:
    return EvalSettings(n_ctx=cfg.ctx, chunks=cfg.chunks, n_threads=default_threads())


def _text_facts(state: ReleaseState) -> TextFacts:
    e = state.config.eval
    if e.text is not None:
        return text_facts(text=e.text.resolve())
    return text_facts(corpus=e.corpus)


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


def _tier_inputs(files: list[Path], base_fp: str, text_sha: str, settings: EvalSettings, speed: bool) -> dict:
    # full sha256 of each file (free after the quantize phase verified it: memoised by stat)
    return {"files": [source_sha256(f) for f in files], "base": base_fp, "text_sha256": text_sha,
            "settings": settings.numeric_key(), "speed": speed, "llama": build_label()}


def _summary(result: EvalResult) -> dict:
    k = result.kld
    sp = result.speed
    return {"ppl": result.ppl, "ppl_err": result.ppl_err, "base_ppl": result.base_ppl,
            "kld_mean": k.kld_mean if k else None, "kld_p999": k.kld_p999 if k else None,
            "ppl_ratio": k.mean_ppl_ratio if k else None, "same_top_p": k.same_top_p if k else None,
            "pp_tokens_per_s": sp.pp_tokens_per_s if sp else None,
            "tg_tokens_per_s": sp.tg_tokens_per_s if sp else None,
            "n_chunks": result.n_chunks, "n_ctx": result.settings.get("n_ctx")}


def _read_record(path: Path, key: str) -> dict | None:
    if not path.is_file():
        return None
    try:
        fresh, _ = up_to_date([path], key)
    except ApexError:
        return None
    if not fresh:
        return None
    try:   # its bytes are the recorded ones (the manifest's sha256); read back the one way, bounded
        record = read_json(path, "record")
    except ApexError:
        return None
    return record if isinstance(record, dict) and isinstance(record.get("summary", {}), dict) else None


def _write_record(path: Path, key: str, inputs: dict, body: dict) -> None:
    safe_mkdir(path.parent)
    atomic_write_text(path, json.dumps(body, indent=2, sort_keys=True, default=str) + "\n")
    write_manifest(manifest_path(path), {"kind": "apex-orch release eval", "inputs": inputs, "inputs_key": key,
                                         "files": [file_record(path)]})


def run_phase(state: ReleaseState, run: bool) -> PhaseReport:
    cfg = state.config
    e = cfg.eval
    if not e.enabled:
        return PhaseReport("eval", "not needed", detail="eval.enabled is false: benchmarks pending")
    settings = _settings(e)
    tf = _text_facts(state)
    base = model_facts(state.model_path)
    failures: list[str] = []
    base_inputs = {"base": base.fingerprint, "text_sha256": tf.sha256, "settings": settings.numeric_key(),
                   "speed": e.speed, "kind": "base"}
    base_key = inputs_key(base_inputs)
    base_path = _record_path(state, "base")
    found: list[_Tier] = []   # the tiers with files, in config order: records fresh, or to make
    for job in state.jobs:
        files = state.files.get(job.profile.tier)
        if not files:
            continue
        inputs = _tier_inputs(files, base.fingerprint, tf.sha256, settings, e.speed)
        key = inputs_key(inputs)
        path = _record_path(state, files[0].name)
        found.append(_Tier(job, files, path, key, inputs, _read_record(path, key)))
    fresh = sum(1 for t in found if t.record is not None)
    todo = [t for t in found if t.record is None] if run else []
    cache = _evaluate(state, todo, base, tf, settings) if todo else None
    ran = sum(1 for t in todo if t.record is not None)
    for t in found:
        if t.record is not None:
            state.evals[t.job.profile.tier] = t.record
            gates = dict(t.job.profile.gates)
            gates.update(dict(e.gates))
            failures += summary_gate_failures(t.record["summary"], gates, t.files[0].name)
    if state.evals:
        record = _read_record(base_path, base_key)
        if record is None and run:
            cache = cache or state.executor.base_cache(base, tf, settings, progress=state.progress)
            with BaseLogProbs(cache) as c:
                ppl, err = c.meta["base_ppl"], c.meta["base_ppl_err"]
            sp = measure_speed(state.model_path, settings) if e.speed else None
            record = {"file": Path(base.path).name, "size": base.size_bytes, "type": state.model.source_ftype_label,
                      "ppl": ppl, "ppl_err": err, "pp_tokens_per_s": sp.pp_tokens_per_s if sp else None,
                      "tg_tokens_per_s": sp.tg_tokens_per_s if sp else None}
            _write_record(base_path, base_key, base_inputs, record)
        state.base_eval = record
    if failures:
        raise gate_failed(failures, hint="the results are kept in the release folder; the card and publish phases "
                             "did not run. Pick other tiers or relax eval.gates in the release config")
    pending = len(state.jobs) - len(state.evals)
    detail = f"{ran} evaluated, {fresh} up to date" + (f", {pending} pending" if pending else "")
    if not run:
        return PhaseReport("eval", "resolved", detail=detail)
    return PhaseReport("eval", "ran" if ran else "up to date", detail=detail)


@dataclass
class _Tier:
    job: QuantizeJob
    files: list[Path]
    path: Path           # its record
    key: str
    inputs: dict
    record: dict | None  # fresh, or made by this run


def _evaluate(state: ReleaseState, todo: list[_Tier], base: ModelFacts, tf: TextFacts,
              settings: EvalSettings) -> Path:
    """Evaluate the tiers without a fresh record through the executor; each record is written as
    soon as its tier is done (kept when another tier fails). Returns the base log-prob cache."""
    e = state.config.eval
    plans = []
    for t in todo:
        state.progress(f"eval: {t.files[0].name} against {Path(base.path).name} ({e.text_label()}, "
                       f"ctx {e.ctx}, chunks {e.chunks or 'all'})")
        plans.append(plan_eval(t.files[0], base=state.model_path, settings=settings, speed=e.speed, text_facts_=tf))
    # Once, before the tiers: every tier's evaluation reads it (on a cluster, from shared storage).
    cache = state.executor.base_cache(base, tf, settings, progress=state.progress)

    def keep(i: int, result: EvalResult) -> None:
        t = todo[i]
        t.record = {"tier": t.job.profile.tier, "file": t.files[0].name,
                    "size": sum(f.stat().st_size for f in t.files), "summary": _summary(result),
                    "text": e.text_label(), "settings": settings.to_dict()}
        _write_record(t.path, t.key, t.inputs, t.record)
    state.executor.evaluate(plans, progress=state.progress, on_result=keep)
    return cache
