"""The dry run: a release's whole plan, computed without running, downloading or writing anything.

`describe_release(config, ...)` takes what `run_release` takes and gives the text `apex-orch
release --dry-run` prints: the phases, the source and projector, the converter and llama-imatrix
commands, one row per tier (file, predicted size, bpw, split parts, present or missing) with its
llama-quantize command, the eval and publish settings, and the disk the release needs against
what is free. It runs the phases' own resolving code (fetch, convert, plan) with `run` false, so
the plan is the one the run would carry out; where an input does not exist yet it says so.
Before the imatrix exists, tiers are sized with a full-coverage stand-in (`preview_imatrix`); `fit:`
tiers are fitted as the run would fit them, their profiles written to a temporary folder only.
"""

from __future__ import annotations

import os
import shlex
import shutil
from pathlib import Path

from apex_orch.calibration.imatrix import ImatrixPlan
from apex_orch.calibration.imatrix_file import ImatrixEntry, ImatrixInfo, expected_tensors
from apex_orch.core.errors import ApexError, ModelError
from apex_orch.core.text import disk_size, table
from apex_orch.quantize.job import ImatrixSource, parse_size, resolve_imatrix
from apex_orch.quantize.run import default_jobs
from apex_orch.release.config import ReleaseConfig
from apex_orch.release.fit_tiers import resolve_fit_tiers
from apex_orch.release.phases.convert import convert_argv, convert_source, converted_path
from apex_orch.release.phases.fetch import fetch_mmproj, fetch_source
from apex_orch.release.phases.evaluate import check_text_early
from apex_orch.release.phases.imatrix import imatrix_plan
from apex_orch.release.phases.quantize import existing_outputs, plan_jobs
from apex_orch.release.runner import PHASES
from apex_orch.release.state import (CARD_NAME, LOCALAI_DIR, ReleaseState, check_out_dir, check_release_paths,
                                     default_out_dir)


def preview_imatrix(state: ReleaseState, plan_or_none: ImatrixPlan | None) -> ImatrixSource:
    """A stand-in ImatrixSource for sizing and commands before the imatrix exists: full coverage,
    the cache path it will have (or a placeholder), a 64-hex placeholder hash."""
    entries = {}
    for t in expected_tensors(state.model):
        n_mat = 1
        for d in t.shape[2:]:
            n_mat *= d
        entries[t.name] = ImatrixEntry(t.name, t.shape[0], n_mat, (1,) * n_mat)
    c = state.config.imatrix
    path = plan_or_none.cache_path if plan_or_none is not None else Path("<imatrix from phase imatrix>.gguf")
    dataset = str(plan_or_none.corpus_file) if plan_or_none is not None else f"{c.corpus}.txt"
    info = ImatrixInfo(path=path, chunk_count=plan_or_none.chunks if plan_or_none else (c.chunks or 0),
                       chunk_size=c.ctx, datasets=(dataset,), entries=entries)
    return ImatrixSource(path, "0" * 64, dataset, info)


def describe_release(config: ReleaseConfig, *, phases: list[str] | None = None, push: bool = False,
                     jobs: int | None = None, out_dir: Path | None = None, source: Path | None = None) -> str:
    """The whole plan, computed without running or writing anything."""
    selected = list(phases) if phases is not None else list(PHASES)
    out = Path(os.path.abspath(out_dir)) if out_dir else default_out_dir(config)
    check_out_dir(out, config)
    check_release_paths(config, out, Path(os.path.abspath(source)) if source else None)
    notes: list[str] = []
    state = ReleaseState(config, out, notes.append,
                         source_override=Path(os.path.abspath(source)) if source else None)
    cfg = config
    lines = [f"release   {cfg.name}  ({cfg.display_path()})",
             f"title     {cfg.title}",
             f"output    {out}",
             f"phases    {' -> '.join(p if p in selected else f'({p})' for p in PHASES)}"
             + ("" if push else "   [publish uploads only with --push]")]
    for w in cfg.warnings:
        lines.append(f"warning   {w}")
    lines.append("")
    # fetch + convert
    lines.append(f"fetch     {cfg.source.describe() if source is None else f'local GGUF {source} (--source)'}")
    try:
        fetch_source(state, run=False)
        fetched = True
    except ModelError:
        raise   # the source is there but refused (not a regular file): not "not fetched yet"
    except ApexError as exc:
        fetched = False
        lines.append(f"          not fetched yet: {exc.message}")
    mmproj_size = 0
    if cfg.mmproj is not None:
        mm = cfg.mmproj
        what = {"file": lambda: f"file {mm.path.raw}",
                "hf": lambda: f"{mm.hf.repo}@{mm.hf.revision[:12]}/{mm.hf.files[0]}",
                "convert": lambda: ("converted from " + (f"local checkpoint {mm.checkpoint.raw}" if mm.checkpoint
                                                         else f"{mm.hf.repo}@{mm.hf.revision[:12]}")
                                    + f" at {mm.outtype.upper()}")}[mm.kind]()
        lines.append(f"mmproj    {what} -> {mm.name} (never touched by profiles)")
        try:
            fetch_mmproj(state, run=False)
            if state.mmproj_src is not None:
                mmproj_size = state.mmproj_src.stat().st_size
                lines.append(f"          {state.mmproj_src} ({disk_size(mmproj_size)})")
        except ModelError:
            raise   # a local projector that is there but refused (not a regular file)
        except ApexError as exc:
            lines.append("          not available here: " + exc.render().replace("\n", "\n          "))
    if cfg.source.kind == "convert" and source is None:
        snap = state.snapshot_dir or Path("<snapshot>")
        lines.append("convert   $ " + shlex.join(convert_argv(snap, converted_path(state), cfg.source.outtype,
                                                           mistral_format=cfg.source.mistral_format, name=cfg.name)))
    if cfg.mmproj is not None and cfg.mmproj.kind == "convert":
        snap = state.mmproj_snapshot or Path("<snapshot>")
        lines.append("convert   $ " + shlex.join(convert_argv(snap, out / cfg.mmproj.name, cfg.mmproj.outtype,
                                                           mmproj=True, mistral_format=cfg.mmproj.mistral_format)))
    model_known = False
    if fetched:
        try:
            convert_source(state, run=False)
            model_known = True
        except ApexError as exc:
            if state.model_path is not None and Path(state.model_path).is_file():
                raise   # the source exists but is refused (a header that disagrees with itself...)
            lines.append(f"          not converted yet: {exc.message}")
    if not model_known:
        lines.append("")
        lines.append("the source GGUF does not exist yet, so tier sizes cannot be predicted; run the fetch and "
                     "convert phases first (or pass --source PATH)")
        return "\n".join(lines)
    m = state.model
    lines.append(f"source    {state.model_path} ({disk_size(m.file_size)}, {m.arch}, {m.block_count} blocks, "
                 f"{m.expert_count} experts, {m.source_ftype_label})")
    lines.append("")
    # imatrix
    im_plan = None
    if cfg.imatrix is not None:
        c = cfg.imatrix
        lines.append(f"imatrix   corpus {c.corpus}, ctx {c.ctx}, chunks {c.chunks or 'all'}; computed once for "
                     f"{len(cfg.i_tiers)} I-tiers ({', '.join(t.tier for t in cfg.i_tiers)})")
        try:
            im_plan = imatrix_plan(state)
            lines.append(f"          {'cached: ' + str(im_plan.cache_path) if im_plan.cached else 'not computed yet'}")
            lines.append("          $ " + shlex.join(im_plan.argv))
        except ApexError as exc:
            lines.append(f"          cannot be planned here: {exc.message}")
    else:
        lines.append("imatrix   not needed (no I-tier)")
    # quantize
    stand_in = None
    if cfg.imatrix is not None:
        if im_plan is not None and im_plan.cached:
            stand_in = resolve_imatrix(m, im_plan.cache_path)
        else:
            stand_in = preview_imatrix(state, im_plan)
    resolve_fit_tiers(state, write=False)   # `fit:` tiers: fitted in a temporary folder, nothing kept
    job_list = plan_jobs(state, imatrix=stand_in)
    split = parse_size(cfg.split_max_size) if cfg.split_max_size else None
    lines.append("")
    n_par = jobs or default_jobs(job_list)
    lines.append(f"quantize  {len(job_list)} tiers, {n_par} at a time"
                 + (f", split into parts of at most {cfg.split_max_size}" if split else ""))
    rows = []
    total = 0
    for job in job_list:
        size = job.predicted_size
        total += size
        parts = -(-size // split) if split and size > split else 1
        state_txt = "present" if existing_outputs(job) else "missing"
        rows.append([job.profile.tier, job.output.name, disk_size(size), f"{size / 2**30:.2f}", f"{job.plan.bpw:.3f}",
                     str(parts) if parts > 1 else "1", state_txt])
    lines.append(table(["tier", "file", "size", "GiB", "bpw", "parts", "state"], rows, align="llrrrrl"))
    for job in job_list:
        argv = job.argv(job.output, job.output.with_name(job.output.name + ".tensor-types.txt"))
        lines.append(f"  {job.profile.tier}: $ " + shlex.join(argv))
    # eval
    lines.append("")
    e = cfg.eval
    if e.enabled:
        gates = ", ".join(f"{k} {v:g}" for k, v in e.gates) or "none"
        lines.append(f"eval      {len(job_list)} files against {state.model_path.name} on {e.text_label()}, ctx {e.ctx}, "
                     f"chunks {e.chunks or 'all'}, one base-logits cache; speed {'yes' if e.speed else 'no'}; "
                     f"gates: {gates}")
        if "eval" in selected:   # refused here, as the run refuses it before its first tool
            try:
                n_tokens, n_chunks = check_text_early(state)
                lines.append(f"          the text holds {n_tokens:,} tokens: {n_chunks} chunk(s) of {e.ctx} evaluated")
            except ModelError as exc:   # a header-only stand-in (--source REPLICA) has no loadable vocabulary
                lines.append(f"          the text is not checked here: {exc.message}")
    else:
        lines.append("eval      disabled (the card says benchmarks pending)")
    lines.append(f"card      {out / CARD_NAME} + {len(job_list)} LocalAI entries in {out / LOCALAI_DIR}")
    lines.append(f"publish   {cfg.publish.repo} ({'private' if cfg.publish.private else 'public'}); "
                 + ("runs with --push" if push else "not without --push"))
    # disk
    need = total
    if split:
        need += max((j.predicted_size for j in job_list if j.predicted_size > split), default=0)
    if cfg.mmproj is not None:
        need += mmproj_size
    probe = out
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    present = sum(f.stat().st_size for j in job_list for f in (existing_outputs(j) or []))
    lines.append("")
    lines.append(f"disk      the release needs {disk_size(need)} (tiers {disk_size(total)}"
                 + (", split scratch for the largest tier" if split else "")
                 + (f", projector {disk_size(mmproj_size)}" if mmproj_size else "") + ")"
                 + (f", {disk_size(present)} already present" if present else "")
                 + f"; {disk_size(free)} free in {probe}"
                 + ("" if free + present >= need else "  -> NOT ENOUGH"))
    for n in notes:
        lines.append(f"note      {n}")
    return "\n".join(lines)
