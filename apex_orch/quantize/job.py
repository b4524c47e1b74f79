"""One quantization, decided before anything runs: the QuantizeJob.

`plan_quantize(model, profile, ...)` is pure (it writes nothing): it reads the header, makes
the Plan, refuses what would fail later (an already-quantized source, an I-profile without
an imatrix, an imatrix that misses planned low-bit tensors, an output that is an input) and
gives a QuantizeJob: the output name, the values the llama-quantize command line is built
from, the metadata stamped into the file, the predicted file size and the manifest inputs.
run.py executes a job; verify.py checks what it wrote.

The command line is built from the job's values each time (`QuantizeJob.argv`), never
patched in place, so changing `threads` or asking for a `--dry-run` cannot leave a stale
argument behind.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from apex_orch import __version__
from apex_orch.calibration.imatrix import plan_imatrix, run_imatrix
from apex_orch.calibration.imatrix_file import (MTP_NOT_COLLECTED, ImatrixInfo, check_imatrix_fits,
                                                check_plan_coverage, mtp_lacking_data, read_imatrix)
from apex_orch.core.errors import ImatrixError, ModelError, RequestError
from apex_orch.core.fingerprint import source_sha256
from apex_orch.core.manifest import inputs_key
from apex_orch.core.outputs import sidecars
from apex_orch.core.safefiles import check_not_inputs
from apex_orch.core.sizes import MB
from apex_orch.core.text import file_name_part
from apex_orch.llama.tools import build_label, find_tool
from apex_orch.model.info import ModelInfo, model_display_name, read_model
from apex_orch.plan.llama_rules import is_quantized
from apex_orch.plan.planner import Plan, make_plan
from apex_orch.plan.profiles import Profile, load_profile


Progress = Callable[[str], None]
# llama-gguf-split takes whole megabytes (--split-max-size NM): a smaller part would be "0M" and
# fail only after the whole quantization, so plan_quantize refuses it first.
MIN_SPLIT_SIZE = MB


def output_name(model_name: str, tier: str, *, mtp_draft: bool = False) -> str:
    """`<Model>-APEX-<Tier>.gguf` (an MTP draft file: `mtp-<Model>-APEX-<Tier>.gguf`, as the
    converter names drafts); both parts reduced to [A-Za-z0-9._-], so never a path."""
    name = f"{file_name_part(model_name, 'model')}-APEX-{file_name_part(tier, 'tier')}.gguf"
    return f"mtp-{name}" if mtp_draft else name


def draft_output_name(model_name: str) -> str:
    """A release's one MTP draft file: `mtp-<Model>.gguf` beside its tiers."""
    return f"mtp-{file_name_part(model_name, 'model')}.gguf"


def safe_model_name(name: str) -> str:
    """A user-given model name, refused when it looks like a path (it must not steer where files go)."""
    if not name.strip() or "/" in name or "\\" in name or name.startswith(".") or "\0" in name:
        raise RequestError(f"{name!r} is not a plain model name: it may not contain '/' or '\\', "
                           "or start with '.'", fields=("name",),
                           hint="the name only names the files inside the output folder; give an output path or "
                                "another output folder to choose where they go", options=("out", "out_dir"))
    return file_name_part(name, "model")


NAME_MAX = 255   # bytes per file name on every common file system


def check_name_length(output: Path) -> None:
    """The output, its sidecars and its temporary name must each fit a file name's 255 bytes: a long
    tier or name is refused when the job is planned, never met as "File name too long" mid-run."""
    names = [output.name, *(s.name for s in sidecars(output)), f".{output.name}.tensor-types.txt.partial-4194304"]
    longest = max(names, key=lambda n: len(os.fsencode(n)))
    if len(os.fsencode(longest)) > NAME_MAX:
        raise RequestError(f"output name {output.name[:48]}... is {len(os.fsencode(output.name))} bytes; with its "
                           f"sidecars and temporary names ({len(os.fsencode(longest))} bytes at most) it exceeds the "
                           f"{NAME_MAX} bytes a file name may have", fields=("name", "out"),
                           hint="use a shorter tier name (the profile's `tier`), model name or output file")


def check_split_fits(plan: Plan, split_bytes: int) -> None:
    """llama-gguf-split puts whole tensors in parts of at most the size (whole megabytes); a tensor
    larger than that cannot be placed (the first one fails the tool, later ones overrun the size):
    refused when the job is planned, not after the quantization."""
    limit = split_bytes // 1000 ** 2 * 1000 ** 2
    biggest = max(plan.tensors, key=lambda t: t.n_bytes, default=None)
    padded = (biggest.n_bytes + 31) // 32 * 32 if biggest is not None else 0   # GGUF_DEFAULT_ALIGNMENT
    if padded > limit:
        raise RequestError(f"parts of {split_bytes:,} bytes: the tensor {biggest.name} alone is "
                           f"{biggest.n_bytes:,} bytes at its planned type, more than a part may hold "
                           f"({limit:,} bytes)", fields=("split_max_size",),
                           hint=f"use at least {-(-padded // 1000 ** 2)}M; parts hold whole tensors")


def check_distinct_outputs(pairs: list[tuple[str, Path]], *, error=RequestError, where: str | None = None) -> None:
    """(tier, output path) pairs: two tiers that map to one file (after names are made safe, e.g.
    "A B" and "A-B", or equal but for case) are refused up front, naming both."""
    seen: dict[str, str] = {}
    for tier, path in pairs:
        key = os.path.normcase(os.path.abspath(path)).casefold()
        if key in seen:
            raise error(f"tiers {seen[key]!r} and {tier!r} both map to the file {Path(path).name}; "
                        "one would silently replace the other", where=where,
                        hint="give one of the profiles another `tier:` name (names are reduced to letters, "
                             "digits, '.', '_' and '-', and compared ignoring case)")
        seen[key] = tier


@dataclass
class ImatrixSource:
    path: Path
    sha256: str
    corpus: str | None
    info: ImatrixInfo = field(repr=False)


@dataclass
class QuantizeJob:
    model: ModelInfo
    profile: Profile
    plan: Plan
    output: Path
    imatrix: ImatrixSource | None
    threads: int
    split_max_size: int | None
    tool: Path                           # the llama-quantize that runs (found when the job is planned)
    requantize: bool                     # an already-quantized source, accepted: pass --allow-requantize
    metadata: dict[str, str]
    inputs: dict
    predicted_size: int
    # Take llama-quantize's own --dry-run types as the plan when they differ (a user's own build).
    trust_tool_plan: bool = False
    threads_given: bool = False          # -t was given: every job runs with exactly that many threads

    @property
    def key(self) -> str:
        if self.inputs.get("source") is None:
            # The full sha256 of every source shard (memoised by stat, fingerprint.source_sha256):
            # computed on first use, so --dry-run never reads the weights.
            self.inputs["source"] = [source_sha256(p) for p in self.model.paths]
        return inputs_key(self.inputs)

    @property
    def memory_bytes(self) -> int:
        """What one llama-quantize run of this job holds at its peak, estimated: its largest tensor
        as f32, twice (the dequantized source and the work buffer), plus 512 MiB for the rest. The
        one estimate: local parallelism (quantize.run.default_jobs) and Ray placement use it."""
        biggest = max((t.n_elements for t in self.plan.tensors), default=0)
        return biggest * 4 * 2 + (512 << 20)

    @property
    def rules_path(self) -> Path:
        """Where the rendered --tensor-type-file sits beside the output once committed."""
        return self.output.with_name(self.output.name + ".tensor-types.txt")

    def argv(self, out: Path, rules: Path, *, dry_run: bool = False) -> list[str]:
        """The llama-quantize command line writing `out` with the rules file `rules`."""
        argv = [str(self.tool)]
        if dry_run:
            argv.append("--dry-run")
        if self.requantize:
            argv.append("--allow-requantize")
        if self.imatrix is not None:
            argv += ["--imatrix", str(self.imatrix.path)]
        argv += ["--tensor-type-file", str(rules)]
        for key, value in self.metadata.items():
            argv += ["--override-kv", f"{key}=str:{value[:127]}"]
        # llama-quantize reads every shard of a split source from the first; the output is one file
        argv += [str(self.model.paths[0]), str(out), self.profile.base_ftype, str(self.threads)]
        return argv

    def replace_plan(self, plan: Plan) -> None:
        """Take another plan (the tool's own types, --trust-tool-plan) and predict its file size."""
        self.plan = plan
        self.predicted_size = plan.predicted_file_size(_written_kv(self.metadata, self.imatrix))

    def describe(self) -> str:
        argv = " ".join(self.argv(self.output, self.rules_path))
        return (f"{self.profile.tier}: {self.output} ({self.predicted_size / 2**30:.2f} GiB predicted, "
                f"{self.plan.bpw:.3f} bpw)\n  {argv}")


def resolve_imatrix(model: ModelInfo, path: str | os.PathLike | None) -> ImatrixSource | None:
    if path is None:
        return None
    p = Path(path)
    if not p.exists():
        raise ImatrixError("imatrix file not found", where=str(p),
                           hint="check the path, or name a corpus to build one from", options=("imatrix", "corpus"))
    info = read_imatrix(p)
    check_imatrix_fits(info, model)
    # full sha256 (memoised by stat: a rerun does not read a large imatrix again)
    return ImatrixSource(p, source_sha256(p), info.datasets[0] if info.datasets else None, info)


def build_imatrix_for(model_path: Path, corpus: str, threads: int | None, progress: Progress, *,
                      ctx: int = 512, chunks: int | None = None) -> Path:
    """Build (or reuse from the cache) the imatrix an I-profile needs, on a named corpus."""
    ip = plan_imatrix(model_path, corpus, ctx=ctx, chunks=chunks, threads=threads)
    return run_imatrix(ip, on_progress=progress)


def check_source_unquantized(model: ModelInfo, allow_requantize: bool = False) -> list[str]:
    """Refuse an already-quantized source (requantizing compounds the rounding error of both
    quantizations); with allow_requantize, return the loud warning to show instead."""
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
                         hint="quantize from the F16/BF16/F32 GGUF, or accept the loss (llama-quantize's own "
                              "--allow-requantize is passed on)", options=("allow_requantize",))
    return [f"requantizing an already-quantized source (accepted on request): {what}; the output is worse "
            "than the same tier made from the original weights"]


def plan_quantize(model_path: str | os.PathLike, profile: str | Profile, *, out: Path | None = None,
                  out_dir: Path = Path("out"), name: str | None = None, imatrix: ImatrixSource | None = None,
                  threads: int | None = None, split_max_size: int | None = None,
                  model: ModelInfo | None = None, allow_requantize: bool = False,
                  trust_tool_plan: bool = False) -> QuantizeJob:
    """One tier's job, decided before anything runs. `split_max_size`: bytes per part (None: one
    file); `threads`: llama-quantize's (default: every core)."""
    if split_max_size is not None and split_max_size < MIN_SPLIT_SIZE:
        raise RequestError(f"parts of {split_max_size:,} bytes are too small: at least 1 MB (llama-gguf-split "
                           "splits in whole megabytes)", fields=("split_max_size",), hint="use a size such as 48G")
    model = model or read_model(model_path)
    requantize_warnings = check_source_unquantized(model, allow_requantize)
    prof = profile if isinstance(profile, Profile) else load_profile(profile)
    if prof.imatrix_required and imatrix is None:
        raise ImatrixError(
            f"profile {prof.name} ({prof.tier}) needs an importance matrix",
            hint=f"give an imatrix file, or a corpus to build one from ({prof.corpus or 'diverse'}; cached, "
                 "shared by every I-tier)", options=("imatrix", "corpus"))
    plan = make_plan(model, prof, has_imatrix=imatrix is not None)
    plan.warnings.extend(requantize_warnings)
    check_mtp_head_types(plan, imatrix.info if imatrix is not None else None)
    if plan.needs_imatrix and imatrix is None:
        names = ", ".join(t.name for t in plan.needs_imatrix[:3])
        raise ImatrixError(f"{len(plan.needs_imatrix)} planned tensors use types llama-quantize refuses to "
                           f"write without an imatrix ({names} ...)",
                           hint="give an imatrix file, or a corpus to build one from", options=("imatrix", "corpus"))
    if imatrix is not None:
        missing = check_plan_coverage(imatrix.info, plan)
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
        output = Path(out_dir) / output_name(display, prof.tier, mtp_draft=model.is_mtp_draft)
        if output.parent.resolve() != Path(out_dir).resolve():   # defence in depth: never outside out_dir
            raise RequestError(f"output name {output.name!r} would leave the output folder {out_dir}",
                               fields=("name",), hint="use a plain name without path separators")
    if output.suffix != ".gguf":
        raise RequestError(f"output {output} must end in .gguf", fields=("out",))
    check_name_length(output)
    # Inputs are never outputs: refused here, before anything runs, replacing outputs allowed or not.
    check_not_inputs([output, *sidecars(output)], [*model.paths, imatrix.path if imatrix else None],
                     options=("out", "out_dir", "name"))
    if split_max_size:
        check_split_fits(plan, split_max_size)
    threads_given = threads is not None
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
    tool = find_tool("llama-quantize").path
    inputs = {
        "source": None,          # sha256 of each shard, filled on first use of QuantizeJob.key
        "profile_sha256": prof.sha256,
        "imatrix_sha256": imatrix.sha256 if imatrix else None,
        "llama_cpp": build_label(),
        "apex_orch": __version__,
        "metadata": metadata,
        "split_max_size": split_max_size,   # bytes: 48G and 48GB are the same split
    }
    if requantize_warnings:
        inputs["allow_requantize"] = True
    return QuantizeJob(model=model, profile=prof, plan=plan, output=output, imatrix=imatrix, threads=threads,
                       threads_given=threads_given,
                       split_max_size=split_max_size, tool=tool, requantize=bool(requantize_warnings),
                       metadata=metadata, inputs=inputs, trust_tool_plan=trust_tool_plan,
                       predicted_size=plan.predicted_file_size(_written_kv(metadata, imatrix)))


def check_mtp_head_types(plan: Plan, info: ImatrixInfo | None) -> None:
    """Refuse a plan that gives the MTP head a type needing imatrix data the imatrix (`info`, None:
    none) lacks: llama-imatrix never collects any for the head, so llama-quantize would stop at its
    first such tensor. Called before any imatrix is built, with the plan made as if one were there."""
    lacking = mtp_lacking_data(info, plan)
    if not lacking:
        return
    by_name = plan.by_name()
    types = sorted({by_name[n].final_type.name for n in lacking})
    keys = sorted({by_name[n].reason for n in lacking})
    raise ImatrixError(
        f"profile {plan.profile.name} gives {len(lacking)} tensor(s) of the MTP head {', '.join(types)} "
        f"({', '.join(keys)}), a type llama-quantize writes only with imatrix data, and no imatrix can have "
        f"it ({MTP_NOT_COLLECTED}): {', '.join(lacking[:5])}{' ...' if len(lacking) > 5 else ''}",
        where=str(plan.profile.path),
        hint="give the head a type that needs no imatrix: `types.nextn: Q8_0` (the default, as APEX-MTP keeps "
             "it) or e.g. Q6_K, Q4_K, IQ4_XS; or leave the head out of the model")


def _partial_coverage(info: ImatrixInfo, plan: Plan) -> list[str]:
    """'name: experts 3, 7 of 16' for planned imatrix-requiring tensors whose entry has zero-count experts."""
    out = []
    for t in plan.tensors:
        if not t.requires_imatrix:
            continue
        entry = info.entries.get(t.name)
        zero = entry.zero if entry is not None else []
        if zero and len(zero) < entry.n_mat:
            shown = ", ".join(str(i) for i in zero[:6]) + (" ..." if len(zero) > 6 else "")
            out.append(f"{t.name}: experts {shown} of {entry.n_mat}")
    return out


def stamped_kv_allowance(with_imatrix: bool) -> dict[str, object]:
    """The largest metadata a quantize run stamps (each string at llama-quantize's 127-byte cap,
    the keys of plan_quantize's `metadata` and `_written_kv`): what a size budget leaves room for
    (fit.fitter), so a fitted file stays under its budget whatever its names and paths."""
    keys = ["apex.version", "apex.profile", "apex.tier", "apex.profile_sha256", "apex.llama_cpp"]
    if with_imatrix:
        keys += ["apex.imatrix.sha256", "apex.imatrix.corpus", "quantize.imatrix.file", "quantize.imatrix.dataset"]
    kv: dict[str, object] = {k: "x" * 127 for k in keys}
    if with_imatrix:
        kv.update({"quantize.imatrix.entries_count": 0, "quantize.imatrix.chunks_count": 0})
    return kv


def _written_kv(metadata: dict[str, str], imatrix: ImatrixSource | None) -> dict[str, object]:
    """Every key llama-quantize adds to the output header (ours, plus its imatrix notes)."""
    kv: dict[str, object] = {k: v[:127] for k, v in metadata.items()}
    if imatrix is not None:
        kv["quantize.imatrix.file"] = str(imatrix.path)[:127]
        datasets = imatrix.info.datasets
        if datasets:
            kv["quantize.imatrix.dataset"] = str(datasets[0])[:127]
        kv["quantize.imatrix.entries_count"] = len(imatrix.info.entries)
        if imatrix.info.chunk_count > 0:
            kv["quantize.imatrix.chunks_count"] = int(imatrix.info.chunk_count)
    return kv
