"""Run QuantizeJobs: llama-quantize -> verify -> commit, one tier or many.

`run_quantize(job)` executes a job planned by job.plan_quantize: a rerun with the same inputs
is a no-op (the manifest says so); otherwise a pre-flight disk check, an exclusive lock on the
output (OutputGuard), the tool's own --dry-run compared with the plan (toolcheck), llama-quantize
into a temporary name in the destination folder (its stderr parsed by record into progress),
the header verified against the plan (verify.py), an optional split with llama-gguf-split,
sha256 and manifest, and only then the rename. Any failure or interrupt removes the partial
file. `run_many(jobs)` runs several tiers with bounded parallelism.

Kept apart from job.py so that planning (pure, used by --dry-run and the release preview)
reads without the machinery of running.
"""

from __future__ import annotations

import concurrent.futures as cf
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from apex_orch.core.errors import (DiskSpaceError, InterruptedRun, OutputExistsError, ToolFailedError, ToolTimeoutError,
                                   VerificationError)
from apex_orch.core.fingerprint import file_record, remember
from apex_orch.core.manifest import manifest_path, manifest_text, up_to_date
from apex_orch.core.outputs import OutputGuard, check_free_space, sidecars
from apex_orch.core.safefiles import clear_name, refuse_links, write_new
from apex_orch.core.translate import translate_os_error
from apex_orch.core.text import binary_size
from apex_orch.llama.quantlog import progress_of
from apex_orch.llama.tools import build_label, find_tool, run_tool, terminate_all
from apex_orch.plan.render import render_file
from apex_orch.quantize import toolcheck
from apex_orch.quantize.job import Progress, QuantizeJob, check_distinct_outputs
from apex_orch.quantize.verify import verify_output


@dataclass
class QuantizeResult:
    job: QuantizeJob
    files: list[Path]
    skipped: bool
    seconds: float
    message: str


def _split_parts_pattern(final: Path) -> str:
    return final.name[:-5] + "-*-of-*.gguf"


def run_quantize(job: QuantizeJob, *, force: bool = False, progress: Progress | None = None,
                 timeout: float | None = None, replace_stale: bool = False) -> QuantizeResult:
    """Quantize one tier. An output that exists and is up to date is kept (`force` makes it again);
    one that is not up to date is an OutputExistsError unless `replace_stale` (or `force`) replaces it."""
    emit = progress or (lambda _m: None)
    start = time.monotonic()
    finals = [job.output]
    existing_parts = sorted(job.output.parent.glob(_split_parts_pattern(job.output))) if job.split_max_size else []
    if job.split_max_size and existing_parts:
        finals = existing_parts
    # Nothing is written through a link planted at an output's (or sidecar's) name: a link
    # planted there by someone else would redirect the write to a file they chose.
    refuse_links([x for f in [job.output, *finals] for x in (f, *sidecars(f))])
    if not force and all(f.exists() for f in finals):
        fresh, why = up_to_date(finals, job.key)   # a damaged manifest raises ManifestError: never trusted
        if fresh:
            emit(f"{job.output.name}: up to date (manifest matches inputs), kept")
            return QuantizeResult(job, finals, True, 0.0, "up to date")
        if not replace_stale:
            raise OutputExistsError(f"{finals[0]} already exists and is not up to date ({why})",
                                    hint="ask to replace it (it is kept until the new file is complete and verified)",
                                    options=("force",))
        emit(f"{job.output.name}: not up to date ({why}): made again, replaced once verified")
    try:
        return _run_guarded(job, force or replace_stale, emit, timeout, start, existing_parts)
    except OSError as exc:   # disk full, read-only, quota... while writing our own files
        raise translate_os_error(exc) from None


def _disk_full_error(folder: Path, what: str, log_path: Path | None) -> DiskSpaceError | None:
    """After a failed write: a DiskSpaceError when the folder's disk is (nearly) full, else None."""
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return None
    if free >= 64 << 20:
        return None
    return DiskSpaceError(
        f"the disk holding {folder} is full: it filled up while {what} ({free / 1e6:.1f} MB free)",
        hint="free some space or choose another output folder, then rerun; the partial file was removed and "
             "nothing was published" + (f" (log: {log_path})" if log_path else ""), options=("out_dir", "out"))


def _run_guarded(job: QuantizeJob, force: bool, emit: Progress, timeout: float | None, start: float,
                 existing_parts: list[Path]) -> QuantizeResult:
    with OutputGuard(job.output, force=force, extra_finals=existing_parts) as guard:
        for stale in guard.cleaned_stale:
            emit(f"removed a partial file left by an interrupted run: {stale.name}")
        check_free_space(job.output.parent, job.predicted_size * (2 if job.split_max_size else 1))
        tmp = guard.temp_for(job.output)
        rules = guard.temp_for(job.rules_path)
        write_new(rules, render_file(job.plan))   # O_EXCL|O_NOFOLLOW: a name this run owns
        log_path = job.output.with_name(job.output.name + ".log")
        _check_tool_agrees(job, tmp, rules, emit)
        argv = job.argv(tmp, rules)
        emit(f"{job.profile.tier}: llama-quantize -> {job.output.name} ({len(job.plan.tensors)} tensors)")
        clear_name(tmp)   # a link planted at this run's temporary name is removed, never written through

        def on_line(line: str) -> None:
            rec = progress_of(line)
            if rec:
                i, n, tname = rec
                emit(f"[{i}/{n}] {tname}")
        writing = f"llama-quantize was writing {job.output.name}"
        try:
            result = run_tool(argv, log_path=log_path, on_line=on_line, timeout=timeout, what="llama-quantize")
        except ToolFailedError as exc:
            if not isinstance(exc, ToolTimeoutError):
                full = _disk_full_error(job.output.parent, writing, log_path)
                if full is not None:
                    raise full from None
            raise
        if not tmp.exists():
            raise ToolFailedError("llama-quantize exited 0 but wrote no output", log_path=log_path,
                                  log_tail="\n".join(result.tail))
        try:
            stats = verify_output([tmp], job.plan)
        except VerificationError:
            full = _disk_full_error(job.output.parent, writing, log_path)
            if full is not None:
                raise full from None
            raise
        if stats["file_bytes"] != job.predicted_size:
            raise VerificationError(
                f"{job.output.name}: {stats['file_bytes']:,} bytes written, {job.predicted_size:,} predicted",
                hint="the header differs from the plan's prediction; check the log beside the output")
        if job.split_max_size and tmp.stat().st_size > job.split_max_size:
            parts = _split(job, guard, tmp, emit, timeout)
            verify_output([guard_tmp for guard_tmp, _ in parts], job.plan)
            guard.discard_temp(tmp)   # the parts replace the unsplit file
            records = [(final, guard_tmp) for guard_tmp, final in parts]
        else:
            records = [(job.output, tmp)]
        # size, mtime_ns and inode survive the rename: a rerun trusts them, else re-hashes in full
        file_docs = [file_record(t, name=final.name) for final, t in records]
        seconds = time.monotonic() - start
        doc = {
            "kind": "apex-orch quantize",
            "inputs": job.inputs,
            "inputs_key": job.key,
            "source": [str(p) for p in job.model.paths],
            "profile": {"name": job.profile.name, "tier": job.profile.tier, "sha256": job.profile.sha256,
                        "base_ftype": job.profile.base_ftype},
            "imatrix": ({"path": str(job.imatrix.path), "sha256": job.imatrix.sha256, "corpus": job.imatrix.corpus}
                        if job.imatrix else None),
            "command": job.argv(job.output, job.rules_path),
            "llama_cpp": build_label(),
            "files": file_docs,
            "verified": stats,
            "predicted": {"tensor_bytes": job.plan.total_bytes, "bpw": round(job.plan.bpw, 4)},
            "plan_types_from": job.plan.types_from,
            "llama_quantize": str(job.tool),
            "roles": {role: s["types"] for role, s in job.plan.role_summary().items()},
            "timings": {"llama_quantize_s": round(result.seconds, 3), "total_s": round(seconds, 3)},
        }
        mpath = manifest_path(records[0][0])
        # The manifest is written as a temporary too and renamed last, so a failure while writing it
        # (disk full) publishes nothing, and a published manifest never describes a missing file.
        write_new(guard.temp_for(mpath), manifest_text(doc))
        if force:
            mpath.unlink(missing_ok=True)
        committed = guard.commit()   # data files, the rules file, then the manifest, atomically renamed
        for (final, _t), rec in zip(records, file_docs):
            remember(final, rec["sha256"])   # later source_sha256(final) (eval keys) is free
        if job.split_max_size and len(records) > 1 and job.output.exists() and force:
            job.output.unlink()  # a previous unsplit output of the same tier
    final_files = [f for f in committed if f.suffix == ".gguf"]
    return QuantizeResult(job, final_files, False, time.monotonic() - start,
                          f"wrote {', '.join(f.name for f in final_files)} "
                          f"({binary_size(sum(f.stat().st_size for f in final_files))}, verified)")


def _check_tool_agrees(job: QuantizeJob, out: Path, rules: Path, emit: Progress) -> None:
    """The binary's own --dry-run must give the plan's types (see toolcheck); else stop, or, with
    --trust-tool-plan, make its types the plan that verification, manifest and card use."""
    tool_types = toolcheck.tool_dry_run_types(job.argv(out, rules, dry_run=True), out)
    diffs = toolcheck.compare(job.plan, tool_types)
    if not diffs:
        return
    if not job.trust_tool_plan:
        raise toolcheck.mismatch_error(str(job.tool), diffs)
    emit(f"WARNING: {job.tool} assigns other types than the pinned rules for {len(diffs)} tensor(s) "
         f"(e.g. {diffs[0]}); as asked, its dry-run is the plan")
    job.replace_plan(toolcheck.plan_with_tool_types(job.plan, tool_types))


def _split(job: QuantizeJob, guard: OutputGuard, tmp: Path, emit: Progress,
           timeout: float | None) -> list[tuple[Path, Path]]:
    """llama-gguf-split the verified temporary into parts, also under temporary names."""
    stem_tmp = tmp.with_name(f".{job.output.name[:-5]}.split-{os.getpid()}")
    argv = [str(find_tool("llama-gguf-split").path), "--split", "--split-max-size",
            str(job.split_max_size // 1000 ** 2) + "M", str(tmp), str(stem_tmp)]
    emit(f"splitting into parts of at most {job.split_max_size / 1e9:.1f} GB")
    run_tool(argv, log_path=job.output.with_name(job.output.name + ".split.log"), timeout=timeout,
             what="llama-gguf-split")
    parts = sorted(tmp.parent.glob(stem_tmp.name + "-*-of-*.gguf"))
    out: list[tuple[Path, Path]] = []
    for part in parts:
        suffix = part.name[len(stem_tmp.name):]            # -00001-of-00003.gguf
        final = job.output.with_name(job.output.name[:-5] + suffix)
        t = guard.temp_for(final)
        os.replace(part, t)
        out.append((t, final))
    return out


def default_jobs(jobs: list[QuantizeJob]) -> int:
    """Parallel tiers: bounded by cores and by memory (QuantizeJob.memory_bytes each)."""
    cores = os.cpu_count() or 1
    try:
        avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        avail = 8 << 30
    per_job = max(j.memory_bytes for j in jobs)
    return max(1, min(len(jobs), max(1, cores // 2), max(1, avail // per_job)))


def share_threads(jobs: list[QuantizeJob], parallel: int | None) -> int:
    """How many tiers run at once; without -t the cores are shared between them (the command line is
    built from `threads` when a job runs, and the dry run shows it). -t reaches every job as given."""
    n = parallel or default_jobs(jobs)
    if n > 1:
        for j in jobs:
            if not j.threads_given:
                j.threads = max(1, (os.cpu_count() or 1) // n)
    return n


def run_many(jobs: list[QuantizeJob], *, parallel: int | None = None, force: bool = False,
             progress: Progress | None = None, timeout: float | None = None,
             replace_stale: bool = False) -> list[QuantizeResult]:
    """Run several tiers with bounded parallelism (run_quantize's options); the first failure cancels the rest."""
    if not jobs:
        return []
    check_distinct_outputs([(j.profile.tier, j.output) for j in jobs])
    n = share_threads(jobs, parallel)
    if n <= 1:
        return [run_quantize(j, force=force, progress=progress, timeout=timeout, replace_stale=replace_stale)
                for j in jobs]
    results: list[QuantizeResult] = []
    with cf.ThreadPoolExecutor(max_workers=n) as pool:
        futures = {pool.submit(run_quantize, j, force=force, progress=progress, timeout=timeout,
                               replace_stale=replace_stale): j for j in jobs}
        try:
            for fut in cf.as_completed(futures):
                results.append(fut.result())
        except BaseException as exc:
            for f in futures:
                f.cancel()
            terminate_all()
            cf.wait(futures)
            if isinstance(exc, KeyboardInterrupt):
                raise InterruptedRun("quantize interrupted; partial outputs were removed",
                                     hint="rerun the same command: finished tiers are skipped") from None
            raise
    order = {id(j): i for i, j in enumerate(jobs)}
    return sorted(results, key=lambda r: order[id(r.job)])
