"""Phase quantize: every tier's GGUF, planned from its profile and written by llama-quantize.

`run_phase(state, run)` plans one QuantizeJob per tier (`state.jobs`; a `fit:` tier is fitted
first, release.fit_tiers) and one per preset baseline (`state.baseline_jobs`, into the work folder:
never published; release.baselines) and, when running, has `state.executor` write the ones whose files are
missing (here `state.parallel` at a time, or one Ray task per tier); each output carries a
manifest keyed by its inputs, so finished tiers are skipped and a killed run resumes at the tier
it was writing.
A tier whose files exist but no longer match their manifest stops the run, unless `state.force`
is set: then exactly those tiers are redone. With `run` false it only finds the tiers' up-to-date
files. Either way `state.files` maps each found tier to its file(s), and `state.baseline_files`
each found preset baseline to its file.
With `mtp: draft` one more job quantizes the MTP head alone (`state.mtp_source`) into
`mtp-<Model>.gguf` at the config's `mtp.type`, with the tiers and like them (`state.mtp_job`,
`state.mtp_files`).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from apex_orch.core.errors import ManifestError
from apex_orch.core.manifest import up_to_date
from apex_orch.core.safefiles import safe_mkdir
from apex_orch.quantize.job import ImatrixSource, QuantizeJob, draft_output_name, plan_quantize
from apex_orch.release.baselines import BASELINE_DIR, plan_baseline_jobs
from apex_orch.release.fit_tiers import resolve_fit_tiers
from apex_orch.release.mtp import draft_profile
from apex_orch.release.state import PhaseReport, ReleaseState

DRAFT_DIR = "mtp"     # the draft's profile, in the work folder


def plan_jobs(state: ReleaseState, imatrix: ImatrixSource | None = None) -> list[QuantizeJob]:
    """One job per tier; `imatrix` stands in for the state's (the dry run's preview). `fit:` tiers
    are fitted first (once per state; their profiles kept in the work folder)."""
    resolve_fit_tiers(state, write=True)
    cfg = state.config
    imatrix = imatrix if imatrix is not None else state.imatrix
    jobs = []
    for t in cfg.tiers:
        jobs.append(plan_quantize(state.model_path, t.profile, out_dir=state.out_dir, name=cfg.name,
                                  imatrix=imatrix if t.profile.imatrix_required else None,
                                  split_max_size=cfg.split_max_size.bytes if cfg.split_max_size else None,
                                  model=state.model))
    return jobs


def plan_draft(state: ReleaseState, *, write: bool) -> QuantizeJob | None:
    """The MTP draft's job (mtp: draft), or None. `write`: keep its profile in the work folder;
    else in a temporary folder (the dry run writes nothing)."""
    if state.mtp_source is None:
        return None
    cfg = state.config
    with tempfile.TemporaryDirectory(prefix="apex-orch-mtp-") as tmp:
        profile = draft_profile(cfg.mtp.type, state.work / DRAFT_DIR if write else Path(tmp))
    return plan_quantize(state.mtp_source, profile, out=state.out_dir / draft_output_name(cfg.name), name=cfg.name)


def tier_files(job: QuantizeJob) -> list[Path]:
    """The final names of a tier's output: its split parts when they exist, else the one file."""
    if job.split_max_size:
        parts = sorted(job.output.parent.glob(job.output.name[:-5] + "-*-of-*.gguf"))
        if parts:
            return parts
    return [job.output]


def existing_outputs(job: QuantizeJob) -> list[Path] | None:
    """The tier's files when a valid manifest says they come from exactly these inputs."""
    finals = tier_files(job)
    if not all(f.exists() for f in finals):
        return None
    return finals if up_to_date(finals, job.key)[0] else None


def stale_outputs(job: QuantizeJob) -> bool:
    """True when some of the tier's files exist but are not the ones its manifest and inputs
    describe (changed bytes, other inputs, a damaged or missing manifest)."""
    finals = tier_files(job)
    if not any(f.exists() for f in finals):
        return False
    if not all(f.exists() for f in finals):
        return True
    try:
        return not up_to_date(finals, job.key)[0]
    except ManifestError:
        return True


def run_phase(state: ReleaseState, run: bool) -> PhaseReport:
    state.jobs = plan_jobs(state)
    state.mtp_job = plan_draft(state, write=run)
    state.baseline_jobs = plan_baseline_jobs(state, state.imatrix)
    labels = {id(j): j.profile.tier for j in state.baseline_jobs}
    everything = state.jobs + ([state.mtp_job] if state.mtp_job is not None else []) + state.baseline_jobs
    if run:
        if state.baseline_jobs:
            safe_mkdir(state.work / BASELINE_DIR)
        # A forced run redoes exactly the stale tiers; up-to-date tiers are still skipped.
        stale = [j for j in everything if stale_outputs(j)] if state.force else []
        for j in stale:
            state.progress(f"quantize: {j.output.name} is stale; redone, as forced")
        rest = [j for j in everything if j not in stale]
        ex = state.executor
        done = (ex.quantize(rest, force=False, parallel=state.parallel, progress=state.progress) if rest else []) + \
            (ex.quantize(stale, force=True, parallel=state.parallel, progress=state.progress) if stale else [])
        order = {id(j): i for i, j in enumerate(everything)}
        results = sorted(done, key=lambda r: order[id(r.job)])
        state.files = {r.job.profile.tier: list(r.files) for r in results
                       if id(r.job) not in labels and r.job is not state.mtp_job}
        state.mtp_files = next((list(r.files) for r in results if r.job is state.mtp_job), [])
        state.baseline_files.update({labels[id(r.job)]: list(r.files) for r in results if id(r.job) in labels})
        skipped = sum(1 for r in results if r.skipped)
        status = "up to date" if skipped == len(results) else "ran"
        detail = f"{len(results) - skipped} written, {skipped} up to date"
        return PhaseReport("quantize", status, detail=detail
                           + (" (the MTP draft included)" if state.mtp_job is not None else "")
                           + (f" ({len(state.baseline_jobs)} baseline(s))" if state.baseline_jobs else ""))
    for job in state.jobs:
        files = existing_outputs(job)
        if files:
            state.files[job.profile.tier] = files
    if state.mtp_job is not None:
        state.mtp_files = existing_outputs(state.mtp_job) or []
    for job in state.baseline_jobs:
        files = existing_outputs(job)
        if files:
            state.baseline_files[labels[id(job)]] = files
    missing = [j.profile.tier for j in state.jobs + state.baseline_jobs
               if j.profile.tier not in state.files and j.profile.tier not in state.baseline_files]
    if state.mtp_job is not None and not state.mtp_files:
        missing.append("MTP draft")
    return PhaseReport("quantize", "resolved",
                       detail=f"{len(state.files)} tiers present"
                       + (f"; missing: {', '.join(missing)}" if missing else ""))
