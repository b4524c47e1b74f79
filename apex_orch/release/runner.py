"""Runs a release: the seven phases in order, over one ReleaseState, in a locked release folder.

Phases, in order: fetch -> convert -> imatrix -> quantize -> eval -> card -> publish (one module
each in release.phases, all `run_phase(state, run) -> PhaseReport`). Each one is idempotent
(quantize/eval/convert/mmproj outputs carry manifests keyed by their inputs; the imatrix and the
base logits live in content-keyed caches; downloads sit in the Hugging Face cache at a pinned
commit; the card is rewritten only when its text changes), so an interrupted release resumes
where it stopped and a rerun is a no-op. `--only/--skip/--from` choose phases (`select_phases`);
a phase not run still *resolves* its results (finding them, never recomputing) for the phases
after it, which is also how `resolve_release` finds a finished release's results.

`run_release(config, ..., executor=)` gives a ReleaseResult; `executor` says where the heavy work
runs (release.executor: "local", "ray", "ray://HOST:PORT"), connected once the folder is locked and
closed when the run ends, however it ends. Every run appends to `<release>/.apex-release/release.log`
and leaves the phase table and the executor's tasks (what, which worker, how long, how many
attempts) in `last-run.json`, also when a phase fails. The dry run (release.dryrun) plans the same
phases without this module's lock or log.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Callable

from apex_orch.core.errors import ApexError, ModelError, RequestError
from apex_orch.core.outputs import atomic_write_text
from apex_orch.core.safefiles import open_nofollow, safe_mkdir
from apex_orch.core.text import table
from apex_orch.release.config import ReleaseConfig
from apex_orch.release.executor import TASK_PHASES, make_executor, parse_executor
from apex_orch.release.phases import card, convert, evaluate, fetch, imatrix, publish, quantize
from apex_orch.model.info import read_model
from apex_orch.release.baselines import check_baselines
from apex_orch.release.phases.evaluate import check_task_files, check_text_early
from apex_orch.release.phases.fetch import fetch_baselines_local, fetch_source
from apex_orch.release.state import (WORK_DIR, PhaseReport, Progress, ReleaseState, check_out_dir, check_release_paths,
                                     default_out_dir, release_lock)

PHASE_RUNNERS: dict[str, Callable[[ReleaseState, bool], PhaseReport]] = {
    "fetch": fetch.run_phase,
    "convert": convert.run_phase,
    "imatrix": imatrix.run_phase,
    "quantize": quantize.run_phase,
    "eval": evaluate.run_phase,
    "card": card.run_phase,
    "publish": publish.run_phase,
}
PHASES = tuple(PHASE_RUNNERS)


def select_phases(only: str | None = None, skip: str | None = None, from_phase: str | None = None) -> list[str]:
    """The phases to run, in order. `only`/`skip` take comma-separated names; `from_phase` a single one."""
    def parse(text: str, field: str) -> list[str]:
        names = [n.strip() for n in text.split(",") if n.strip()]
        bad = [n for n in names if n not in PHASES]
        if bad or not names:
            raise RequestError(f"{text!r}: unknown phase {', '.join(bad) or '(none)'}", fields=(field,),
                               hint="phases: " + ", ".join(PHASES))
        return names
    if only and (skip or from_phase):
        raise RequestError("a list of phases to run alone cannot be combined with phases to skip or a first phase",
                           fields=("only", "skip", "from_phase"))
    selected = list(PHASES)
    if only:
        wanted = set(parse(only, "only"))
        selected = [p for p in PHASES if p in wanted]
    if from_phase:
        start = parse(from_phase, "from_phase")
        if len(start) != 1:
            raise RequestError("the first phase is one phase", fields=("from_phase",))
        selected = list(PHASES[PHASES.index(start[0]):])
    if skip:
        dropped = set(parse(skip, "skip"))
        selected = [p for p in selected if p not in dropped]
    return selected


@dataclass
class ReleaseResult:
    state: ReleaseState
    reports: list[PhaseReport]
    seconds: float


class _Log:
    """Progress to the caller and to <release>/.apex-release/release.log (timestamped there only)."""

    def __init__(self, path: Path, emit: Progress):
        self.path = path
        self.emit = emit
        self.fh: IO[str] | None = None

    def open(self) -> None:
        safe_mkdir(self.path.parent)
        self.fh = open_nofollow(self.path, "a")   # never appended through a planted link
        self.fh.write(f"\n=== release run started {time.strftime('%Y-%m-%d %H:%M:%S')} pid {os.getpid()}\n")
        self.fh.flush()

    def __call__(self, msg: str) -> None:
        if self.fh is not None and not msg.startswith("["):
            self.fh.write(f"{time.strftime('%H:%M:%S')} {msg}\n")
            self.fh.flush()
        self.emit(msg)

    def close(self) -> None:
        if self.fh is not None:
            self.fh.close()
            self.fh = None


def check_calibration_upload(config: ReleaseConfig, calibration_upload: bool) -> None:
    """Opting out of publishing the calibration is a request about something: a release without an
    imatrix (no I-tier, no imatrix baseline) has none, so the request is a mistake worth saying."""
    if not calibration_upload and config.imatrix is None:
        raise RequestError("this release uses no importance matrix (no I-tier and no imatrix baseline), so there "
                           "is no calibration to leave out of the upload", fields=("calibration_upload",),
                           hint="drop the opt-out; the card of a release without an imatrix lists no calibration files")


def preflight(config: ReleaseConfig, out: Path, source: Path | None, selected: list[str]) -> None:
    """What the config's own files can tell before anything is written: the task files (when eval
    runs) exist and parse, and local baseline files are quantizations of a local source. Inputs
    that only exist later (a Hub download, a conversion) are checked by their phase, still before
    any tool runs."""
    if "eval" in selected and config.eval.enabled:
        check_task_files(config)
    if not any(b.kind == "file" for b in config.baselines):
        return
    probe = ReleaseState(config, out, lambda _m: None, source_override=source)
    fetch_baselines_local(probe)       # missing, or not a regular file: refused now
    try:
        fetch_source(probe, run=False)
    except ModelError:
        raise
    except ApexError:      # not here yet (a Hub source, an unset ${VAR}): the phases say so in order
        return
    if probe.snapshot_dir is None:
        probe.model = read_model(probe.source_paths[0])
        check_baselines(probe)


def run_release(config: ReleaseConfig, *, phases: list[str] | None = None, push: bool = False,
                jobs: int | None = None, out_dir: Path | None = None, source: Path | None = None,
                progress: Progress | None = None, force: bool = False, executor: str = "local",
                calibration_upload: bool = True) -> ReleaseResult:
    """Run the selected phases; the others resolve their earlier results for the ones after them.
    `jobs`: tiers quantized in parallel (local executor). `force`: a selected phase redoes its stale
    outputs instead of stopping on them. `executor`: "local", "ray" or "ray://HOST:PORT".
    `calibration_upload`: put the imatrix and its calibration text in the release (and the upload)."""
    parse_executor(executor)   # a bad spec is refused before the folder is touched
    check_calibration_upload(config, calibration_upload)
    selected = list(phases) if phases is not None else list(PHASES)
    out = Path(os.path.abspath(out_dir)) if out_dir else default_out_dir(config)
    check_out_dir(out, config)
    source = Path(os.path.abspath(source)) if source else None
    check_release_paths(config, out, source)
    preflight(config, out, source, selected)
    emit = progress or (lambda _m: None)
    log = _Log(out / WORK_DIR / "release.log", emit)
    state = ReleaseState(config, out, log, source_override=source, push=push, parallel=jobs, force=force,
                         calibration_upload=calibration_upload)
    t_all = time.monotonic()
    with release_lock(out / WORK_DIR):
        log.open()
        try:
            # after the lock: a second driver is refused before it reaches the cluster; only when a
            # selected phase can run tasks (`--only card` or `--only publish` never asks for a cluster)
            if any(p in TASK_PHASES for p in selected):
                state.executor = make_executor(executor, progress=log, resources=config.resources)
        except BaseException:
            log.close()
            raise
        try:
            for w in config.warnings:
                log(f"warning: {w}")
            last_needed = max(PHASES.index(p) for p in selected) if selected else -1
            for i, name in enumerate(PHASES):
                if i > last_needed:
                    break
                run = name in selected
                if name == "imatrix" and "eval" in selected:
                    check_text_early(state)   # the source is known; no imatrix or tier is made yet
                t0 = time.monotonic()
                if run:
                    log(f"== {name}")
                try:
                    report = PHASE_RUNNERS[name](state, run)
                except BaseException:
                    state.reports.append(PhaseReport(name, "failed", time.monotonic() - t0))
                    _write_run_record(state, selected)
                    raise
                report.seconds = time.monotonic() - t0
                state.reports.append(report)
                if run:
                    log(f"{name}: {report.status} in {report.seconds:.1f} s"
                        + (f" ({report.detail})" if report.detail else ""))
            _write_run_record(state, selected)
        finally:
            try:
                state.executor.close()
            finally:
                log.close()
    return ReleaseResult(state, state.reports, time.monotonic() - t_all)


def resolve_release(config: ReleaseConfig, *, out_dir: Path | None = None, source: Path | None = None,
                    through: str = "eval", calibration_upload: bool = True) -> ReleaseState:
    """Find (never compute) every phase's results up to `through`, e.g. to re-render a card."""
    out = Path(os.path.abspath(out_dir)) if out_dir else default_out_dir(config)
    state = ReleaseState(config, out, lambda _m: None,
                         source_override=Path(os.path.abspath(source)) if source else None,
                         calibration_upload=calibration_upload)
    for name in PHASES[:PHASES.index(through) + 1]:
        state.reports.append(PHASE_RUNNERS[name](state, False))
    return state


def _write_run_record(state: ReleaseState, selected: list[str]) -> None:
    doc = {"config": str(state.config.path), "selected": selected,
           "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
           "phases": [{"name": r.name, "status": r.status, "seconds": round(r.seconds, 3), "detail": r.detail}
                      for r in state.reports],
           "executor": state.executor.name, "tasks": [t.to_dict() for t in state.executor.records]}
    atomic_write_text(state.work / "last-run.json", json.dumps(doc, indent=2) + "\n")


def format_reports(result: ReleaseResult) -> str:
    """The phase table, then one row per task the executor ran (which worker made which file)."""
    rows = [[r.name, r.status, f"{r.seconds:.1f}", r.detail] for r in result.reports]
    text = table(["phase", "status", "seconds", "detail"], rows, align="llrl")
    tasks = result.state.executor.records
    if tasks:
        text += "\n\n" + table(["task", "file", "worker", "seconds", "attempts"],
                               [[t.phase, t.target, t.worker, f"{t.seconds:.1f}", str(t.attempts)] for t in tasks],
                               align="lllrr")
    return text + f"\nrelease folder: {result.state.out_dir}  ({result.seconds:.1f} s)"
