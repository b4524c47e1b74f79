"""Phase imatrix: one importance matrix, computed once and shared by every I-tier.

`run_phase(state, run)` plans llama-imatrix on the model from the convert phase with the config's
`imatrix` section (corpus, ctx, chunks, from_q8), has `state.executor` run it (here, or as one Ray
task) when its content-keyed cache does not hold the result yet, and sets `state.imatrix` (what
the quantize phase hands llama-quantize) and `state.imatrix_record` (what the card says about the
calibration). Not needed without an I-tier or an imatrix baseline.
An I-tier whose profile gives the MTP head a type needing imatrix data is refused first: no imatrix
has any for the head (quantize.job.check_mtp_head_types), so none is built for it.
Unless the run opts out (`state.calibration_upload` false), it also puts the calibration in the
release folder for publishing (release.calibration: the imatrix, the text llama-imatrix read and
its manifest, in `calibration/`) and sets `state.calibration` to their record.
With `run` false a missing imatrix is an error: later phases never compute it; the calibration
files are only looked for.
"""

from __future__ import annotations

from apex_orch.calibration.corpus_spec import load_corpus_spec
from apex_orch.calibration.imatrix import ImatrixPlan, plan_imatrix
from apex_orch.core.errors import ApexError, ImatrixError
from apex_orch.plan.planner import make_plan
from apex_orch.quantize.job import check_mtp_head_types, resolve_imatrix
from apex_orch.release.calibration import find_calibration, write_calibration
from apex_orch.release.state import CALIBRATION_DIR, PhaseReport, ReleaseState


def imatrix_plan(state: ReleaseState, threads: int | None = None) -> ImatrixPlan:
    c = state.config.imatrix
    return plan_imatrix(state.model_path, c.corpus, ctx=c.ctx, chunks=c.chunks, threads=threads, from_q8=c.from_q8)


def run_phase(state: ReleaseState, run: bool) -> PhaseReport:
    cfg = state.config
    if cfg.imatrix is None:
        return PhaseReport("imatrix", "not needed", detail="no I-tier or imatrix baseline")
    for t in cfg.i_tiers:
        if not t.fit_pending:   # a fit tier is checked once it is fitted (plan_quantize)
            check_mtp_head_types(make_plan(state.model, t.profile, has_imatrix=True), None)
    plan = imatrix_plan(state)
    status = "up to date" if plan.cached else "ran"
    if not plan.cached:
        if not run:
            raise ImatrixError(f"the imatrix for corpus {cfg.imatrix.corpus} has not been computed yet",
                               hint="run the imatrix phase first", options=("only", "skip", "from_phase"))
        users = f"{len(cfg.i_tiers)} I-tiers" + (f" and {len(cfg.i_baselines)} baseline(s)" if cfg.i_baselines else "")
        state.progress(f"imatrix: corpus {plan.corpus_name}, {plan.chunks} chunks x {plan.ctx} tokens "
                       f"(one imatrix for {users})")
    path = state.executor.imatrix(plan, progress=state.progress) if run else plan.cache_path
    state.imatrix = resolve_imatrix(state.model, path)
    description = ""
    try:
        description = load_corpus_spec(cfg.imatrix.corpus).description or ""
    except ApexError:
        pass
    state.imatrix_record = {"corpus": plan.corpus_name, "description": " ".join(description.split()),
                            "ctx": plan.ctx, "chunks": plan.chunks, "tokens": plan.tokens,
                            "sha256": state.imatrix.sha256}
    detail = f"{plan.chunks} chunks x {plan.ctx} from {plan.corpus_name}"
    if state.calibration_upload:
        folder = state.out_dir / CALIBRATION_DIR
        if run:
            state.calibration, wrote = write_calibration(folder, plan, path, state.model_path)
            if wrote:
                state.progress(f"imatrix: the calibration files for publishing -> {CALIBRATION_DIR}/")
                status = "ran"
        else:
            state.calibration = find_calibration(folder, plan, path)
        detail += "; calibration files " + ("in " + CALIBRATION_DIR + "/" if state.calibration else "missing")
    if not run:
        status = "resolved"
    return PhaseReport("imatrix", status, detail=detail)
