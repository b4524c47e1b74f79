"""The dry run: a release's whole plan, computed without running, downloading or writing anything.

`describe_release(config, ...)` takes what `run_release` takes and gives a ReleasePreview, plain
data: the phases, the source and projector, the converter and llama-imatrix commands, one row per
tier (file, predicted size, bpw, split parts, present or missing) with its llama-quantize
command, one per baseline (a preset's predicted size and command; a file's path and size, or why a
Hub one is not downloaded yet), the eval settings with each task set (data, sha256, count, the
tokens its scorer decodes per file), the calibration files publish would upload, and the disk the
release needs against what is free.
`apex-orch release --dry-run` prints it as text (apex_orch.cli.release_preview) or, with --json,
as `ReleasePreview.to_dict()` (schema in docs/release.md). It runs the phases' own resolving code
(fetch, convert, plan) with `run` false, so the plan is the one the run would carry out; where an
input does not exist yet, the step says why in its `problem`.
Before the imatrix exists, tiers are sized with a full-coverage stand-in (`preview_imatrix`); `fit:`
tiers are fitted as the run would fit them, their profiles written to a temporary folder only.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from apex_orch.calibration.imatrix import ImatrixPlan
from apex_orch.calibration.imatrix_file import ImatrixEntry, ImatrixInfo, expected_tensors
from apex_orch.core.errors import ApexError, ConfigError, ModelError
from apex_orch.evaluation.inputs import EvalSettings, model_facts
from apex_orch.evaluation.task_files import TASK_KINDS
from apex_orch.evaluation.tasks import TaskSettings, TaskSpec, plan_tasks, task_cost
from apex_orch.core.sizes import Size
from apex_orch.quantize.job import ImatrixSource, resolve_imatrix
from apex_orch.quantize.run import default_jobs
from apex_orch.quantize.job import draft_output_name
from apex_orch.release import mtp as mtp_mode
from apex_orch.release.baselines import check_baselines, plan_baseline_jobs
from apex_orch.release.config import ReleaseConfig
from apex_orch.release.fit_tiers import resolve_fit_tiers
from apex_orch.release.phases.convert import convert_argv, convert_source, converted_draft_path, converted_path
from apex_orch.release.phases.evaluate import check_task_files, check_text_early
from apex_orch.release.phases.fetch import fetch_baselines_local, fetch_mmproj, fetch_source, hf_download
from apex_orch.release.phases.imatrix import imatrix_plan
from apex_orch.release.phases.quantize import existing_outputs, plan_draft, plan_jobs
from apex_orch.release.runner import PHASES, check_calibration_upload
from apex_orch.release.state import (CALIBRATION_DIR, CALIBRATION_FILES, CARD_NAME, LOCALAI_DIR, ReleaseState,
                                     check_out_dir, check_release_paths, default_out_dir)


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


SCHEMA = "apex-orch-release-dry-run"
SCHEMA_VERSION = 1


@dataclass
class FetchPreview:
    source: str                       # the config's source, described
    given: str | None = None          # a local GGUF given in place of it
    problem: str | None = None        # why it is not fetched yet (None: it is here)


@dataclass
class MmprojPreview:
    what: str                         # where the projector comes from, described
    name: str                         # its file name in the release
    path: str | None = None           # the file to include, once fetched
    size: int | None = None
    problem: str | None = None        # why it is not available here (the whole error, hint included)


@dataclass
class ConvertPreview:
    what: str                         # "source" or "mmproj"
    argv: list[str]


@dataclass
class SourcePreview:
    path: str
    size: int
    arch: str
    blocks: int
    experts: int
    type: str                         # the type holding most of its weights (F16, BF16...)


@dataclass
class MtpPreview:
    mode: str | None                  # bundled | draft | none; None: no `mtp:` (as the source holds it)
    what: str                         # the mode, in words
    head_layers: int | None = None    # the tiers' source's MTP layers (None: not known yet)
    head_bytes: dict[str, int] = field(default_factory=dict)   # tier -> bytes of the head it carries
    draft_file: str | None = None     # mtp: draft: the draft file's name in the release
    draft_type: str | None = None
    draft_source: str | None = None   # the unquantized head it is made from (None: not converted yet)
    draft_size: int | None = None     # its predicted bytes
    draft_present: bool = False       # its up-to-date file is already in the release folder
    draft_argv: list[str] | None = None   # its llama-quantize command line


@dataclass
class ImatrixPreview:
    corpus: str
    ctx: int
    chunks: int | None                # None: every chunk of the corpus
    i_tiers: list[str]
    cached: bool | None = None        # None: it cannot be planned here (see problem)
    i_baselines: list[str] = field(default_factory=list)   # the baselines made with it
    cache_path: str | None = None
    argv: list[str] | None = None
    problem: str | None = None


@dataclass
class TierPreview:
    tier: str
    file: str
    size: int                         # predicted bytes of the file (all parts)
    bpw: float
    parts: int
    present: bool                     # its up-to-date files are already in the release folder
    argv: list[str]                   # the llama-quantize command line


@dataclass
class TaskPreview:
    task: str
    title: str
    data: str                         # the file, or hf:<repo>@<revision>/<file>
    sha256: str | None = None         # of the data (None: not readable here, see problem)
    n_tasks: int | None = None        # tasks scored on every file and the source
    n_available: int | None = None
    tokens: int | None = None         # tokens the scorer decodes per file (the source's tokenizer)
    problem: str | None = None


@dataclass
class BaselinePreview:
    name: str
    kind: str                         # preset | file | hf
    what: str
    file: str | None = None           # the file's name (a preset's output in the work folder)
    size: int | None = None           # bytes: a preset's predicted size, a file's own
    present: bool = False             # made (up to date) or fetched already
    argv: list[str] | None = None     # a preset's llama-quantize command
    path: str | None = None           # where the file is (or will be written)
    problem: str | None = None


@dataclass
class EvalPreview:
    enabled: bool
    files: int = 0
    base: str | None = None
    text: str | None = None
    ctx: int | None = None
    chunks: int | None = None         # None: every chunk of the text
    speed: bool = False
    gates: dict[str, float] = field(default_factory=dict)
    text_tokens: int | None = None    # the text's tokens in the source's vocabulary (checked before any tool)
    text_chunks: int | None = None    # chunks of ctx tokens evaluated
    text_note: str | None = None      # why the text could not be checked here
    speed_repetitions: int | None = None
    speed_tokens: list[int] | None = None     # llama-bench's -p / -n
    task_ctx: int | None = None
    tasks: list[TaskPreview] = field(default_factory=list)


@dataclass
class DiskPreview:
    need: int                         # bytes the release needs in its folder
    tiers: int                        # of which the tier files
    split_scratch: bool               # plus the largest tier once more, while it is split
    projector: int
    present: int                      # bytes of tier and baseline files already there
    free: int
    folder: str                       # where free space was measured
    baselines: int = 0                # of which the preset baselines (in the work folder)

    @property
    def enough(self) -> bool:
        return self.free + self.present >= self.need


@dataclass
class ReleasePreview:
    name: str
    config: str
    title: str
    output: str
    phases: list[str]                 # every phase, in order
    selected: list[str]               # the ones this run would run
    push: bool
    warnings: list[str]
    fetch: FetchPreview
    mmproj: MmprojPreview | None
    converts: list[ConvertPreview]
    mtp: MtpPreview | None = None               # the config's `mtp:` (None: none, and no head known)
    source_problem: str | None = None           # why the source GGUF cannot be read yet
    source: SourcePreview | None = None         # None: it does not exist yet; nothing below is known
    imatrix: ImatrixPreview | None = None       # None: no I-tier
    parallel: int | None = None                 # tiers quantized at a time
    split_max_size: Size | None = None
    tiers: list[TierPreview] = field(default_factory=list)
    eval: EvalPreview | None = None
    card: str | None = None
    localai: str | None = None
    publish_repo: str = ""
    private: bool = False
    disk: DiskPreview | None = None
    notes: list[str] = field(default_factory=list)
    baselines: list[BaselinePreview] = field(default_factory=list)
    calibration_upload: bool = True
    calibration_files: list[str] = field(default_factory=list)   # what publish would upload of the calibration

    def to_dict(self) -> dict:
        """The preview as JSON-ready values (docs/release.md, "The dry run as JSON")."""
        data = dataclasses.asdict(self)
        data["split_max_size"] = (None if self.split_max_size is None
                                  else {"text": self.split_max_size.text, "bytes": self.split_max_size.bytes})
        if self.disk is not None:
            data["disk"]["enough"] = self.disk.enough
        return {"format": SCHEMA, "format_version": SCHEMA_VERSION, **data}


def describe_release(config: ReleaseConfig, *, phases: list[str] | None = None, push: bool = False,
                     jobs: int | None = None, out_dir: Path | None = None,
                     source: Path | None = None, calibration_upload: bool = True) -> ReleasePreview:
    """The whole plan, computed without running or writing anything."""
    check_calibration_upload(config, calibration_upload)
    selected = list(phases) if phases is not None else list(PHASES)
    out = Path(os.path.abspath(out_dir)) if out_dir else default_out_dir(config)
    check_out_dir(out, config)
    check_release_paths(config, out, Path(os.path.abspath(source)) if source else None)
    notes: list[str] = []
    state = ReleaseState(config, out, notes.append,
                         source_override=Path(os.path.abspath(source)) if source else None)
    cfg = config
    preview = ReleasePreview(
        name=cfg.name, config=cfg.display_path(), title=cfg.title, output=str(out), phases=list(PHASES),
        selected=[p for p in PHASES if p in selected], push=push, warnings=list(cfg.warnings),
        fetch=FetchPreview(cfg.source.describe(), given=str(source) if source is not None else None),
        mmproj=None, converts=[], notes=notes, publish_repo=cfg.publish.repo, private=cfg.publish.private,
        calibration_upload=calibration_upload,
        calibration_files=[f"{CALIBRATION_DIR}/{n}" for n in CALIBRATION_FILES]
        if calibration_upload and config.imatrix is not None else [])
    if "eval" in preview.selected and cfg.eval.enabled:
        try:                      # a missing or malformed file: refused here, as the run refuses it
            check_task_files(cfg)
        except ConfigError:       # an unset ${VAR}: said per task below (the variable may be set on the runner)
            pass
    # fetch + convert
    try:
        fetch_source(state, run=False)
        fetched = True
    except ModelError:
        raise   # the source is there but refused (not a regular file): not "not fetched yet"
    except ApexError as exc:
        fetched = False
        preview.fetch.problem = exc.message
    mmproj_size = 0
    if cfg.mmproj is not None:
        mm = cfg.mmproj
        what = {"file": lambda: f"file {mm.path.raw}",
                "hf": lambda: f"{mm.hf.repo}@{mm.hf.revision[:12]}/{mm.hf.files[0]}",
                "convert": lambda: ("converted from " + (f"local checkpoint {mm.checkpoint.raw}" if mm.checkpoint
                                                         else f"{mm.hf.repo}@{mm.hf.revision[:12]}")
                                    + f" at {mm.outtype.upper()}")}[mm.kind]()
        preview.mmproj = MmprojPreview(what, mm.name)
        try:
            fetch_mmproj(state, run=False)
            if state.mmproj_src is not None:
                mmproj_size = state.mmproj_src.stat().st_size
                preview.mmproj.path, preview.mmproj.size = str(state.mmproj_src), mmproj_size
        except ModelError:
            raise   # a local projector that is there but refused (not a regular file)
        except ApexError as exc:
            preview.mmproj.problem = exc.render({})   # hint included; no parameter names (a caller's words)
    if cfg.mtp is not None:
        preview.mtp = MtpPreview(cfg.mtp.mode, mtp_mode.describe_mode(cfg.mtp))
        if cfg.mtp.mode == "draft":
            preview.mtp.draft_file, preview.mtp.draft_type = draft_output_name(cfg.name), cfg.mtp.type
    if cfg.source.kind == "convert" and source is None:
        snap = state.snapshot_dir or Path("<snapshot>")
        flag = None
        if state.snapshot_dir is not None:   # a mode the checkpoint cannot give: refused here, as in the run
            head = mtp_mode.checkpoint_head(state.snapshot_dir)
            mtp_mode.check_checkpoint(cfg.mtp, head)
            flag = mtp_mode.converter_flag(cfg.mtp, head)
        elif cfg.mtp is not None and cfg.mtp.mode != "bundled":
            flag = "--no-mtp"
        preview.converts.append(ConvertPreview("source", convert_argv(
            snap, converted_path(state), cfg.source.outtype, mistral_format=cfg.source.mistral_format, name=cfg.name,
            mtp_flag=flag)))
        if cfg.mtp is not None and cfg.mtp.mode == "draft" and cfg.mtp.file is None:
            preview.converts.append(ConvertPreview("mtp draft", convert_argv(
                snap, converted_draft_path(state), cfg.source.outtype, mistral_format=cfg.source.mistral_format,
                name=cfg.name, mtp_flag="--mtp")))
    if cfg.mmproj is not None and cfg.mmproj.kind == "convert":
        snap = state.mmproj_snapshot or Path("<snapshot>")
        preview.converts.append(ConvertPreview("mmproj", convert_argv(
            snap, out / cfg.mmproj.name, cfg.mmproj.outtype, mmproj=True, mistral_format=cfg.mmproj.mistral_format)))
    baseline_problems = _fetch_baselines(state)
    model_known = False
    if fetched:
        try:
            convert_source(state, run=False)
            model_known = True
        except ApexError as exc:
            if state.model_path is not None and Path(state.model_path).is_file():
                raise   # the source exists but is refused (a header that disagrees with itself...)
            preview.source_problem = exc.message
    if not model_known:
        return preview
    check_baselines(state)        # a baseline of another model: refused, as the run refuses it
    m = state.model
    preview.source = SourcePreview(str(state.model_path), m.file_size, m.arch, m.block_count, m.expert_count,
                                   m.source_ftype_label)
    if preview.mtp is None and m.nextn_layers:
        preview.mtp = MtpPreview(None, mtp_mode.describe_mode(None))
    if preview.mtp is not None and preview.mtp.mode != "draft":
        preview.mtp.head_layers = len(mtp_mode.head_blocks(m))
    # imatrix
    im_plan = None
    if cfg.imatrix is not None:
        c = cfg.imatrix
        preview.imatrix = ImatrixPreview(c.corpus, c.ctx, c.chunks, [t.tier for t in cfg.i_tiers],
                                         i_baselines=[b.label for b in cfg.i_baselines])
        try:
            im_plan = imatrix_plan(state)
            preview.imatrix.cached = im_plan.cached
            preview.imatrix.cache_path = str(im_plan.cache_path)
            preview.imatrix.argv = im_plan.argv
        except ApexError as exc:
            preview.imatrix.problem = exc.message
    # quantize
    stand_in = None
    if cfg.imatrix is not None:
        if im_plan is not None and im_plan.cached:
            stand_in = resolve_imatrix(m, im_plan.cache_path)
        else:
            stand_in = preview_imatrix(state, im_plan)
    resolve_fit_tiers(state, write=False)   # `fit:` tiers: fitted in a temporary folder, nothing kept
    job_list = plan_jobs(state, imatrix=stand_in)
    split = cfg.split_max_size.bytes if cfg.split_max_size else None
    preview.split_max_size = cfg.split_max_size
    preview.parallel = jobs or default_jobs(job_list)
    draft = plan_draft(state, write=False)
    if draft is not None:
        preview.mtp.draft_source, preview.mtp.draft_size = str(state.mtp_source), draft.predicted_size
        preview.mtp.draft_present = bool(existing_outputs(draft))
        preview.mtp.draft_argv = draft.argv(draft.output, draft.rules_path)
        preview.mtp.head_layers = draft.model.nextn_layers
    if preview.mtp is not None and preview.mtp.head_layers and preview.mtp.draft_file is None:
        preview.mtp.head_bytes = {j.profile.tier: sum(t.n_bytes for t in j.plan.tensors if t.role.value == "nextn")
                                  for j in job_list}
    total = 0
    for job in job_list:
        size = job.predicted_size
        total += size
        preview.tiers.append(TierPreview(
            job.profile.tier, job.output.name, size, job.plan.bpw,
            -(-size // split) if split and size > split else 1, bool(existing_outputs(job)),
            job.argv(job.output, job.rules_path)))
    baseline_jobs = {j.profile.tier: j for j in plan_baseline_jobs(state, stand_in)}
    baseline_bytes = baseline_present = 0
    for b in cfg.baselines:
        bp = BaselinePreview(b.label, b.kind, b.describe(), problem=baseline_problems.get(b.label))
        if b.kind == "preset":
            job = baseline_jobs[b.label]
            bp.file, bp.size, bp.path = job.output.name, job.predicted_size, str(job.output)
            bp.argv = job.argv(job.output, job.rules_path)
            bp.present = bool(existing_outputs(job))
            baseline_bytes += bp.size
            baseline_present += bp.size if bp.present else 0
        elif state.baseline_files.get(b.label):
            f = state.baseline_files[b.label][0]
            bp.file, bp.size, bp.path, bp.present = f.name, f.stat().st_size, str(f), True
        elif b.kind == "hf":
            bp.file = Path(b.hf.files[0]).name
        preview.baselines.append(bp)
    # eval, card, publish
    e = cfg.eval
    preview.eval = EvalPreview(enabled=False)
    if e.enabled:
        preview.eval = EvalPreview(True, len(job_list) + len(cfg.baselines), state.model_path.name, e.text_label(),
                                   e.ctx, e.chunks, e.speed, dict(e.gates),
                                   speed_repetitions=e.speed_repetitions if e.speed else None,
                                   speed_tokens=list(e.speed_tokens) if e.speed else None,
                                   task_ctx=e.task_ctx if e.tasks else None, tasks=_task_previews(state))
        if "eval" in selected:   # refused here, as the run refuses it before its first tool
            try:
                checked = check_text_early(state)
                if checked is not None:
                    preview.eval.text_tokens, preview.eval.text_chunks = checked
            except ModelError as exc:   # a header-only stand-in (a replica as the source) has no loadable vocabulary
                preview.eval.text_note = f"the text is not checked here: {exc.message}"
    preview.card, preview.localai = str(out / CARD_NAME), str(out / LOCALAI_DIR)
    # disk
    need = total + (draft.predicted_size if draft is not None else 0)
    if split:
        need += max((j.predicted_size for j in job_list if j.predicted_size > split), default=0)
    if cfg.mmproj is not None:
        need += mmproj_size
    probe = out
    while not probe.exists():
        probe = probe.parent
    need += baseline_bytes
    preview.disk = DiskPreview(need, total, bool(split), mmproj_size if cfg.mmproj is not None else 0,
                               sum(f.stat().st_size for j in job_list + ([draft] if draft else [])
                                   for f in (existing_outputs(j) or [])) + baseline_present,
                               shutil.disk_usage(probe).free, str(probe), baseline_bytes)
    return preview


def _fetch_baselines(state: ReleaseState) -> dict[str, str]:
    """The baselines' files found here (a local file must exist, as the run requires); why a Hub one
    is not (not downloaded yet), by label."""
    fetch_baselines_local(state)
    problems = {}
    for b in state.config.baselines:
        if b.kind == "hf":
            try:
                state.baseline_files[b.label] = hf_download(b.hf, local_only=True)
            except ApexError as exc:
                problems[b.label] = exc.message
    return problems


def _task_previews(state: ReleaseState) -> list[TaskPreview]:
    """Each task set: its data, count and the tokens its scorer decodes per file (the source's tokenizer)."""
    e = state.config.eval
    settings = TaskSettings.from_eval(EvalSettings(n_ctx=e.ctx), n_ctx=e.task_ctx)
    facts = model_facts(state.model_path, fingerprint=False)
    out = []
    for t in e.tasks:
        kind = TASK_KINDS[t.task]
        tp = TaskPreview(kind.name, kind.title, t.file.raw if t.file is not None else "pinned Hub data")
        out.append(tp)
        try:
            planned = plan_tasks(facts, [TaskSpec(t.task, str(t.file.resolve()) if t.file else None, t.count)],
                                 settings).tasks[0]
        except ApexError as exc:   # an unset ${VAR}, pinned data not pinned yet: said here, refused by the run
            tp.problem = exc.message
            continue
        if planned.set is None:
            tp.data, tp.sha256 = planned.source.label, planned.source.sha256
            tp.problem = "not fetched yet: downloaded once by the eval phase"
            continue
        f = planned.set.file
        tp.data, tp.sha256, tp.n_tasks, tp.n_available = f.label, f.sha256, planned.n_tasks, f.n_tasks
        try:
            tp.tokens = task_cost(state.model_path, planned.set, planned.n_tasks, settings).tokens
        except ModelError as exc:   # a header-only stand-in has no vocabulary to count with
            tp.problem = f"tokens not counted here: {exc.message}"
    return out
