"""Quantize: plan -> llama-quantize -> verify -> commit, one tier or many.

`plan_quantize(...)` is pure (no writing): the Plan, the output name, the argument list,
metadata stamps, predicted size, the manifest inputs. `run_quantize(job)` executes it:
pre-flight disk check, an exclusive lock on the output, llama-quantize into a temporary
name in the destination folder (stderr parsed by record into progress), header
verification against the plan, optional split with llama-gguf-split, sha256, manifest,
and only then the rename. Any failure or interrupt removes the partial file.
"""

from __future__ import annotations

import concurrent.futures as cf
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from apex_orch import __version__
from apex_orch.core.errors import (ApexError, DiskSpaceError, ImatrixError, InterruptedRun, ModelError, OutputExistsError,
                              PlanError, ToolFailedError, ToolTimeoutError, UsageError, VerificationError)
from apex_orch.core.fingerprint import file_record, remember, source_sha256
from apex_orch.model.gguf_header import read_header
from apex_orch.llama.tools import build_label, find_tool, run_tool, terminate_all
from apex_orch.core.manifest import inputs_key, manifest_path, manifest_text, up_to_date
from apex_orch.model.info import ModelInfo, model_display_name, read_model
from apex_orch.core.outputs import OutputGuard, check_free_space, sidecars, translate_os_error
from apex_orch.plan.planner import Plan, make_plan, render_file
from apex_orch.plan.profiles import Profile, load_profile
from apex_orch.llama.quantlog import progress_of
from apex_orch.core.safefiles import check_not_inputs, clear_name, refuse_links, write_new

Progress = Callable[[str], None]
SIZE_RE = re.compile(r"^(\d+(?:\.\d+)?)([KMGT]?)$", re.I)


def output_name(model_name: str, tier: str) -> str:
    """`<Model>-APEX-<Tier>.gguf`; both parts reduced to [A-Za-z0-9._-], so never a path."""
    safe_model = re.sub(r"[^A-Za-z0-9._-]+", "-", model_name).strip("-.") or "model"
    safe_tier = re.sub(r"[^A-Za-z0-9._-]+", "-", tier).strip("-.") or "tier"
    return f"{safe_model}-APEX-{safe_tier}.gguf"


def safe_model_name(name: str) -> str:
    """A user-given --name, refused when it looks like a path (it must not steer where files go)."""
    if not name.strip() or "/" in name or "\\" in name or name.startswith(".") or "\0" in name:
        raise UsageError(f"--name {name!r} is not a plain model name: it may not contain '/' or '\\', "
                         "or start with '.'",
                         hint="--name only names the files inside --out-dir; use -o PATH to choose another "
                              "place, or --out-dir for the folder")
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.") or "model"


def parse_size(text: str) -> int:
    """'48G' -> bytes (decimal units, like llama-gguf-split's --split-max-size)."""
    m = SIZE_RE.match(text.strip())
    if not m:
        raise UsageError(f"--split-max-size {text!r} is not a size like 48G or 500M")
    mult = {"": 1, "K": 1000, "M": 1000 ** 2, "G": 1000 ** 3, "T": 1000 ** 4}[m.group(2).upper()]
    value = float(m.group(1)) * mult
    # llama-gguf-split takes whole megabytes: a smaller size would become "0M" and fail only after
    # the whole quantization. Checked here, when the job is planned, before anything runs.
    if not value >= 1000 ** 2:
        raise UsageError(f"--split-max-size {text}: too small; parts are at least 1M (llama-gguf-split "
                         "splits in whole megabytes)", hint="use a size such as 48G or 500M")
    if not value <= 1000 ** 5:
        raise UsageError(f"--split-max-size {text}: too large (at most 1000T)", hint="use a size such as 48G")
    return int(value)


@dataclass
class ImatrixSource:
    path: Path
    sha256: str
    corpus: str | None
    info: object = field(repr=False, default=None)


@dataclass
class QuantizeJob:
    model: ModelInfo
    profile: Profile
    plan: Plan
    output: Path
    imatrix: ImatrixSource | None
    threads: int
    split_max_size: int | None
    argv_template: list[str]             # with {OUT} and {RULES} placeholders
    metadata: dict[str, str]
    inputs: dict
    predicted_size: int
    # Take llama-quantize's own --dry-run types as the plan when they differ (a user's own build).
    trust_tool_plan: bool = False

    @property
    def key(self) -> str:
        if self.inputs.get("source") is None:
            # The full sha256 of every source shard (memoised by stat, fingerprint.source_sha256):
            # computed on first use, so --dry-run never reads the weights.
            self.inputs["source"] = [source_sha256(p) for p in self.model.paths]
        return inputs_key(self.inputs)

    def argv(self, out: Path, rules: Path) -> list[str]:
        return [str(rules) if a == "{RULES}" else str(out) if a == "{OUT}" else a for a in self.argv_template]

    def describe(self) -> str:
        argv = " ".join(self.argv(self.output, self.output.with_name(self.output.name + ".tensor-types.txt")))
        return (f"{self.profile.tier}: {self.output} ({self.predicted_size / 2**30:.2f} GiB predicted, "
                f"{self.plan.bpw:.3f} bpw)\n  {argv}")


def resolve_imatrix(model: ModelInfo, path: str | os.PathLike | None) -> ImatrixSource | None:
    if path is None:
        return None
    from apex_orch.calibration import imatrix as im
    p = Path(path)
    if not p.exists():
        raise ImatrixError("imatrix file not found", where=str(p), hint="check --imatrix, or use --corpus NAME")
    info = im.read_imatrix(p)
    im.check_imatrix_fits(info, model)
    datasets = getattr(info, "datasets", None) or []
    # full sha256 (memoised by stat: a rerun does not read a large imatrix again)
    return ImatrixSource(p, source_sha256(p), datasets[0] if datasets else None, info)


def build_imatrix_for(model_path: Path, corpus: str, threads: int | None, progress: Progress, *,
                      ctx: int = 512, chunks: int | None = None) -> Path:
    """Build (or reuse from the cache) the imatrix an I-profile needs, on a named corpus."""
    from apex_orch.calibration import imatrix as im
    ip = im.plan_imatrix(model_path, corpus, ctx=ctx, chunks=chunks, threads=threads)
    return im.run_imatrix(ip, on_progress=progress)


def check_source_unquantized(model: ModelInfo, allow_requantize: bool = False) -> list[str]:
    """Refuse an already-quantized source (requantizing compounds the rounding error of both
    quantizations); with allow_requantize, return the loud warning to show instead."""
    from apex_orch.plan.llama_rules import is_quantized
    quantized = [t for t in model.tensors if t.n_dims >= 2 and is_quantized(t.ggml_type)]
    if not quantized:
        return []
    types = sorted({t.ggml_type.name for t in quantized})
    what = (f"{len(quantized)} of its {sum(1 for t in model.tensors if t.n_dims >= 2)} weight tensors are already "
            f"quantized ({', '.join(types)}; e.g. {quantized[0].name} is {quantized[0].ggml_type.name})")
    if not allow_requantize:
        raise ModelError(f"the source is already quantized: {what}. Quantizing it again compounds the "
                         "rounding errors of both quantizations, so the result is worse than the same tier "
                         "made from the original weights", where=str(model.path),
                         hint="quantize from the F16/BF16/F32 GGUF; pass --allow-requantize if you accept the "
                              "loss (llama-quantize's own --allow-requantize is passed on)")
    return [f"requantizing an already-quantized source (--allow-requantize): {what}; the output is worse "
            "than the same tier made from the original weights"]


def plan_quantize(model_path: str | os.PathLike, profile: str | Profile, *, out: Path | None = None,
                  out_dir: Path = Path("out"), name: str | None = None, imatrix: ImatrixSource | None = None,
                  threads: int | None = None, split_max_size: str | None = None,
                  model: ModelInfo | None = None, allow_requantize: bool = False) -> QuantizeJob:
    model = model or read_model(model_path)
    requantize_warnings = check_source_unquantized(model, allow_requantize)
    prof = profile if isinstance(profile, Profile) else load_profile(profile)
    if prof.imatrix_required and imatrix is None:
        raise ImatrixError(
            f"profile {prof.name} ({prof.tier}) needs an importance matrix",
            hint=f"pass --imatrix FILE, or --corpus {prof.corpus or 'diverse'} to build one "
                 "(cached, shared by every I-tier)")
    plan = make_plan(model, prof, has_imatrix=imatrix is not None)
    plan.warnings.extend(requantize_warnings)
    if plan.needs_imatrix and imatrix is None:
        names = ", ".join(t.name for t in plan.needs_imatrix[:3])
        raise ImatrixError(f"{len(plan.needs_imatrix)} planned tensors use types llama-quantize refuses to "
                           f"write without an imatrix ({names} ...)", hint="pass --imatrix or --corpus")
    if imatrix is not None:
        from apex_orch.calibration import imatrix as im
        missing = im.check_plan_coverage(imatrix.info, plan)
        if missing:
            raise ImatrixError(
                f"the imatrix has no data for {len(missing)} planned low-bit tensor(s): "
                f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}",
                where=str(imatrix.path),
                hint="compute the imatrix on a corpus that routes tokens to every expert (more chunks), "
                     "or use a profile without IQ1/IQ2/IQ3_XXS types for those tensors")
        partial = _partial_coverage(imatrix.info, plan)
        if partial:
            plan.warnings.append(
                f"the imatrix saw no tokens for some experts of {len(partial)} planned low-bit tensor(s) "
                f"({'; '.join(partial[:4])}{' ...' if len(partial) > 4 else ''}); llama-quantize quantizes "
                "those experts with flat importance weights (lower quality). Compute the imatrix on more "
                "chunks or a more diverse corpus")
    display = safe_model_name(name) if name is not None else model_display_name(model)
    if out:
        output = Path(out)   # an explicit file: the user chose where it goes
    else:
        output = Path(out_dir) / output_name(display, prof.tier)
        if output.parent.resolve() != Path(out_dir).resolve():   # defence in depth: never outside --out-dir
            raise UsageError(f"output name {output.name!r} would leave --out-dir {out_dir}",
                             hint="use a plain --name without path separators")
    if output.suffix != ".gguf":
        raise UsageError(f"output {output} must end in .gguf")
    # Inputs are never outputs (issue 15): refused here, before anything runs, --force or not.
    check_not_inputs([output, *sidecars(output)], [*model.paths, imatrix.path if imatrix else None],
                     flag="-o / --out-dir / --name")
    threads = threads or os.cpu_count() or 1
    metadata = {
        "apex.version": __version__,
        "apex.profile": prof.name,
        "apex.tier": prof.tier,
        "apex.profile_sha256": prof.sha256,
        "apex.llama_cpp": build_label(),
    }
    if imatrix is not None:
        metadata["apex.imatrix.sha256"] = imatrix.sha256
        metadata["apex.imatrix.corpus"] = imatrix.corpus or "unknown"
    argv = [str(find_tool("llama-quantize").path)]
    if requantize_warnings:
        argv.append("--allow-requantize")
    if imatrix is not None:
        argv += ["--imatrix", str(imatrix.path)]
    argv += ["--tensor-type-file", "{RULES}"]
    for key, value in metadata.items():
        argv += ["--override-kv", f"{key}=str:{value[:127]}"]
    if model.is_split:
        argv += []  # llama-quantize reads every shard from the first; the output is one file
    argv += [str(model.paths[0]), "{OUT}", prof.base_ftype, str(threads)]
    inputs = {
        "source": None,          # sha256 of each shard, filled on first use of QuantizeJob.key
        "profile_sha256": prof.sha256,
        "imatrix_sha256": imatrix.sha256 if imatrix else None,
        "llama_cpp": build_label(),
        "apex_orch": __version__,
        "metadata": metadata,
        "split_max_size": split_max_size,
    }
    if requantize_warnings:
        inputs["allow_requantize"] = True
    return QuantizeJob(model=model, profile=prof, plan=plan, output=output, imatrix=imatrix, threads=threads,
                       split_max_size=parse_size(split_max_size) if split_max_size else None,
                       argv_template=argv, metadata=metadata, inputs=inputs,
                       predicted_size=plan.predicted_file_size(_written_kv(metadata, imatrix)))


def _partial_coverage(info, plan: Plan) -> list[str]:
    """'name: experts 3, 7 of 16' for planned imatrix-requiring tensors whose entry has zero-count experts."""
    out = []
    entries = getattr(info, "entries", {}) or {}
    for t in plan.tensors:
        if not t.requires_imatrix:
            continue
        entry = entries.get(t.name)
        zero = list(getattr(entry, "zero", []) or []) if entry is not None else []
        if zero and len(zero) < getattr(entry, "n_mat", len(zero) + 1):
            shown = ", ".join(str(i) for i in zero[:6]) + (" ..." if len(zero) > 6 else "")
            out.append(f"{t.name}: experts {shown} of {entry.n_mat}")
    return out


def _written_kv(metadata: dict[str, str], imatrix: ImatrixSource | None) -> dict[str, object]:
    """Every key llama-quantize adds to the output header (ours, plus its imatrix notes)."""
    kv: dict[str, object] = {k: v[:127] for k, v in metadata.items()}
    if imatrix is not None:
        kv["quantize.imatrix.file"] = str(imatrix.path)[:127]
        datasets = getattr(imatrix.info, "datasets", None) or []
        if datasets:
            kv["quantize.imatrix.dataset"] = str(datasets[0])[:127]
        kv["quantize.imatrix.entries_count"] = len(getattr(imatrix.info, "entries", {}) or {})
        chunks = getattr(imatrix.info, "chunk_count", 0) or 0
        if chunks > 0:
            kv["quantize.imatrix.chunks_count"] = int(chunks)
    return kv


# ------------------------------------------------------------------ verification

def verify_output(paths: list[Path], plan: Plan) -> dict:
    """Compare the written header(s) with the plan: every tensor's type and bytes, file sizes."""
    found: dict[str, tuple] = {}
    for p in paths:
        try:
            hdr = read_header(p)
        except ModelError as exc:   # a torn or garbled file the tool claims to have written
            raise VerificationError(
                f"the file llama-quantize wrote is incomplete or damaged ({exc.message})",
                hint="nothing was published; check free disk space and the log beside the output, "
                     "then rerun") from None
        for t in hdr.tensors:
            found[t.name] = (t.ggml_type, t.n_bytes)
    problems = []
    planned = plan.by_name()
    for name, pt in planned.items():
        got = found.get(name)
        if got is None:
            problems.append(f"{name}: missing from the output")
        elif got[0] != pt.final_type:
            problems.append(f"{name}: planned {pt.final_type.name}, written {got[0].name}")
        elif got[1] != pt.n_bytes:
            problems.append(f"{name}: planned {pt.n_bytes} bytes, written {got[1]}")
    for name in found.keys() - planned.keys():
        problems.append(f"{name}: in the output but not in the plan")
    if problems:
        raise VerificationError(
            f"output does not match the plan ({len(problems)} tensor(s)): " + "; ".join(problems[:8])
            + (" ..." if len(problems) > 8 else ""),
            hint="the file was not published; check the llama-quantize log beside the output")
    return {"tensors": len(found), "tensor_bytes": sum(b for _, b in found.values()),
            "file_bytes": sum(p.stat().st_size for p in paths)}


# ------------------------------------------------------------------ running

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
                 timeout: float | None = None) -> QuantizeResult:
    emit = progress or (lambda _m: None)
    start = time.monotonic()
    finals = [job.output]
    existing_parts = sorted(job.output.parent.glob(_split_parts_pattern(job.output))) if job.split_max_size else []
    if job.split_max_size and existing_parts:
        finals = existing_parts
    # Nothing is written through a link planted at an output's (or sidecar's) name (issue 15).
    refuse_links([x for f in [job.output, *finals] for x in (f, *sidecars(f))])
    if not force and all(f.exists() for f in finals):
        fresh, why = up_to_date(finals, job.key)   # a damaged manifest raises ManifestError: never trusted
        if fresh:
            emit(f"{job.output.name}: up to date (manifest matches inputs); --force redoes it")
            return QuantizeResult(job, finals, True, 0.0, "up to date")
        raise OutputExistsError(f"{finals[0]} already exists and is not up to date ({why})",
                                hint="pass --force to replace it (it is kept until the new file is complete "
                                     "and verified)")
    try:
        return _run_guarded(job, force, emit, timeout, start, existing_parts)
    except OSError as exc:   # disk full, read-only, quota... while writing our own files
        raise translate_os_error(exc) from None


def _disk_full_error(folder: Path, what: str, log_path: Path | None) -> DiskSpaceError | None:
    """After a failed write: a DiskSpaceError when the folder's disk is (nearly) full, else None."""
    import shutil
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return None
    if free >= 64 << 20:
        return None
    return DiskSpaceError(
        f"the disk holding {folder} is full: it filled up while {what} ({free / 1e6:.1f} MB free)",
        hint="free some space or choose another --out-dir, then rerun; the partial file was removed and "
             "nothing was published" + (f" (log: {log_path})" if log_path else ""))


def _run_guarded(job: QuantizeJob, force: bool, emit: Progress, timeout: float | None, start: float,
                 existing_parts: list[Path]) -> QuantizeResult:
    with OutputGuard(job.output, force=force, extra_finals=existing_parts) as guard:
        for stale in guard.cleaned_stale:
            emit(f"removed a partial file left by an interrupted run: {stale.name}")
        check_free_space(job.output.parent, job.predicted_size * (2 if job.split_max_size else 1))
        tmp = guard.temp_for(job.output)
        rules = guard.temp_for(job.output.with_name(job.output.name + ".tensor-types.txt"))
        write_new(rules, render_file(job.plan))   # O_EXCL|O_NOFOLLOW: a name this run owns
        log_path = job.output.with_name(job.output.name + ".log")
        argv = job.argv(tmp, rules)
        _check_tool_agrees(job, argv, tmp, emit)
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
        files = [job.output]
        if job.split_max_size and tmp.stat().st_size > job.split_max_size:
            files = _split(job, guard, tmp, emit, timeout)
            verify_output([guard_tmp for guard_tmp, _ in files], job.plan)
            tmp.unlink()
            guard._temps.pop(tmp, None)
            records = [(final, guard_tmp) for guard_tmp, final in files]
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
            "command": job.argv(job.output, job.output.with_name(job.output.name + ".tensor-types.txt")),
            "llama_cpp": build_label(),
            "files": file_docs,
            "verified": stats,
            "predicted": {"tensor_bytes": job.plan.total_bytes, "bpw": round(job.plan.bpw, 4)},
            "plan_types_from": job.plan.types_from,
            "llama_quantize": argv[0],
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
                          f"({sum(f.stat().st_size for f in final_files) / 2**30:.2f} GiB, verified)")


def _check_tool_agrees(job: QuantizeJob, argv: list[str], out_placeholder: Path, emit: Progress) -> None:
    """The binary's own --dry-run must give the plan's types (see toolcheck); else stop, or, with
    --trust-tool-plan, make its types the plan that verification, manifest and card use."""
    from apex_orch.quantize import toolcheck
    tool_types = toolcheck.tool_dry_run_types(argv, out_placeholder)
    diffs = toolcheck.compare(job.plan, tool_types)
    if not diffs:
        return
    if not job.trust_tool_plan:
        raise toolcheck.mismatch_error(argv[0], diffs)
    emit(f"WARNING: {argv[0]} assigns other types than the pinned rules for {len(diffs)} tensor(s) "
         f"(e.g. {diffs[0]}); --trust-tool-plan: its dry-run is the plan")
    job.plan = toolcheck.plan_with_tool_types(job.plan, tool_types)
    job.predicted_size = job.plan.predicted_file_size(_written_kv(job.metadata, job.imatrix))


def _split(job: QuantizeJob, guard: OutputGuard, tmp: Path, emit: Progress, timeout) -> list[tuple[Path, Path]]:
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


def check_distinct_outputs(pairs: list[tuple[str, Path]], *, error=UsageError, where: str | None = None) -> None:
    """(tier, output path) pairs: two tiers that map to one file (after names are made safe, e.g.
    "A B" and "A-B", or equal but for case) are refused up front, naming both (issue 15)."""
    seen: dict[str, str] = {}
    for tier, path in pairs:
        key = os.path.normcase(os.path.abspath(path)).casefold()
        if key in seen:
            raise error(f"tiers {seen[key]!r} and {tier!r} both map to the file {Path(path).name}; "
                        "one would silently replace the other", where=where,
                        hint="give one of the profiles another `tier:` name (names are reduced to letters, "
                             "digits, '.', '_' and '-', and compared ignoring case)")
        seen[key] = tier


def default_jobs(jobs: list[QuantizeJob]) -> int:
    """Parallel tiers: bounded by cores and by memory (largest tensor as f32, twice, + 512 MiB)."""
    cores = os.cpu_count() or 1
    try:
        avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        avail = 8 << 30
    biggest = max((t.n_elements for j in jobs for t in j.plan.tensors), default=0)
    per_job = biggest * 4 * 2 + (512 << 20)
    return max(1, min(len(jobs), max(1, cores // 2), max(1, avail // per_job)))


def run_many(jobs: list[QuantizeJob], *, parallel: int | None = None, force: bool = False,
             progress: Progress | None = None, timeout: float | None = None) -> list[QuantizeResult]:
    """Run several tiers with bounded parallelism; the first failure cancels the rest."""
    if not jobs:
        return []
    check_distinct_outputs([(j.profile.tier, j.output) for j in jobs])
    n = parallel or default_jobs(jobs)
    if n <= 1:
        return [run_quantize(j, force=force, progress=progress, timeout=timeout) for j in jobs]
    per_job_threads = max(1, (os.cpu_count() or 1) // n)
    for j in jobs:
        j.threads = per_job_threads
        j.argv_template[-1] = str(per_job_threads)
    results: list[QuantizeResult] = []
    with cf.ThreadPoolExecutor(max_workers=n) as pool:
        futures = {pool.submit(run_quantize, j, force=force, progress=progress, timeout=timeout): j for j in jobs}
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


__all__ = ["QuantizeJob", "QuantizeResult", "plan_quantize", "run_quantize", "run_many", "verify_output",
           "output_name", "resolve_imatrix", "build_imatrix_for", "ApexError", "PlanError"]
