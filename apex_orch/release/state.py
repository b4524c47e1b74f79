"""The release folder and what the phases hand to each other.

`ReleaseState` is the one object every phase takes (with `run`: do the work, or only find earlier
results) and fills in for the phases after it: the fetched source, the model, the imatrix, the
tier jobs and files, the eval records. The run's options (push, parallel, force) are fields too, so
every phase has the same signature, and so is the executor the phases hand their heavy work to
(release.executor: this machine unless `--executor` names a Ray cluster). `PhaseReport` is what a
phase says it did.

The folder's layout (the work folder, the card's and LocalAI entries' names) and its safety
checks live here because both the run and the dry run need them before any phase: the folder may
not be a project/home/root folder or hold a card apex-orch did not write (`check_out_dir`), no
output may be an input (`check_release_paths`), and one run at a time holds the folder
(`release_lock`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from apex_orch.core.errors import (ApexError, ConfigError, LockedError, ModelError, OutputExistsError,
                                   UnsafeOutputError)
from apex_orch.core.infiles import read_input
from apex_orch.core.locks import FileLock
from apex_orch.core.outputs import sidecars
from apex_orch.core.safefiles import check_not_inputs, safe_mkdir
from apex_orch.model.info import ModelInfo
from apex_orch.quantize.job import ImatrixSource, QuantizeJob, draft_output_name, output_name
from apex_orch.release.baselines import baseline_output
from apex_orch.release.calibration import IMATRIX_NAME, MANIFEST_NAME, TEXT_NAME
from apex_orch.release.card import CALIBRATION_DIR, CARD_MARKER, PLOT_NAME  # noqa: F401  (re-exported)
from apex_orch.release.config import ReleaseConfig
from apex_orch.release.executor import Executor, LocalExecutor

Progress = Callable[[str], None]

WORK_DIR = ".apex-release"       # logs, records, the converted source, baselines: never published
CARD_NAME = "README.md"
LOCALAI_DIR = "localai"
# In CALIBRATION_DIR: the imatrix, the text llama-imatrix read, its manifest (release.calibration).
CALIBRATION_FILES = (IMATRIX_NAME, TEXT_NAME, MANIFEST_NAME)


@dataclass
class PhaseReport:
    name: str
    status: str           # ran | up to date | resolved | skipped | not needed | failed
    seconds: float = 0.0
    detail: str = ""


@dataclass
class ReleaseState:
    """Everything the phases hand to each other, and the run's options."""
    config: ReleaseConfig
    out_dir: Path
    progress: Progress
    source_override: Path | None = None
    push: bool = False                                        # publish uploads
    parallel: int | None = None                               # tiers quantized at once (None: automatic)
    force: bool = False                                       # redo stale outputs, not refuse
    executor: Executor = field(default_factory=LocalExecutor) # where imatrix, quantize and eval run
    source_paths: list[Path] = field(default_factory=list)   # fetched GGUF(s)
    snapshot_dir: Path | None = None                          # convert: the safetensors snapshot
    mmproj_snapshot: Path | None = None
    mmproj_src: Path | None = None                            # mmproj file to include as is
    model_path: Path | None = None                            # the GGUF the tiers are made from
    model: ModelInfo | None = None
    mmproj: Path | None = None                                # the projector in the release folder
    mtp_source: Path | None = None                            # mtp: draft: the head alone, unquantized
    mtp_job: QuantizeJob | None = None                        # ... and its quantization (the draft file)
    mtp_files: list[Path] = field(default_factory=list)       # ... the draft file, once written
    imatrix: ImatrixSource | None = None
    imatrix_record: dict | None = None
    jobs: list[QuantizeJob] = field(default_factory=list)     # one per tier
    files: dict[str, list[Path]] = field(default_factory=dict)
    evals: dict[str, dict] = field(default_factory=dict)
    base_eval: dict | None = None
    speculative: dict[str, dict] = field(default_factory=dict)   # tier -> its MTP drafting record (eval)
    converted_now: bool = False
    reports: list[PhaseReport] = field(default_factory=list)
    baseline_files: dict[str, list[Path]] = field(default_factory=dict)   # label -> its file(s)
    baseline_jobs: list[QuantizeJob] = field(default_factory=list)        # the presets' jobs
    baseline_evals: dict[str, dict] = field(default_factory=dict)         # label -> its eval record
    calibration_upload: bool = True                           # publish the imatrix and its calibration text
    calibration: dict | None = None                           # the published calibration files' record
    plot: Path | None = None                                  # the card's plot, when the card phase made one

    @property
    def work(self) -> Path:
        return self.out_dir / WORK_DIR

    def require_all_files(self, phase: str) -> None:
        missing = [j.profile.tier for j in self.jobs if j.profile.tier not in self.files]
        what = f"tier(s) {', '.join(missing)}" if missing else ""
        if self.config.mtp is not None and self.config.mtp.mode == "draft" and not self.mtp_files:
            what += (" and " if what else "") + f"the MTP draft {draft_output_name(self.config.name)}"
        if what:
            raise ModelError(f"{phase}: no up-to-date output for {what}",
                             hint="run the quantize phase first", options=("only", "skip", "from_phase"))


def default_out_dir(config: ReleaseConfig) -> Path:
    if config.output is not None:
        return config.output.resolve()
    return Path(os.path.abspath(Path("out") / "release" / config.name))


def check_out_dir(out: Path, config: ReleaseConfig) -> None:
    """The release folder gets a README.md and many large files: keep it away from the project,
    the home folder and filesystem roots (a README.md there would be replaced)."""
    out = Path(os.path.abspath(out))
    protected = {Path("/"), Path.home(), config.path.resolve().parent}
    protected |= set(config.path.resolve().parents)
    if out in protected or out == Path(os.path.abspath(os.getcwd())):
        raise ConfigError(f"release folder {out} is a folder that must not receive release files",
                          where=config.output.where if config.output else str(config.path),
                          hint="use a dedicated folder such as out/release/NAME")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"release folder {out} exists and is not a folder", hint="choose another release folder",
                          options=("out_dir",))
    card = out / CARD_NAME
    if card.exists():
        # the one way inputs are read: a FIFO or device planted there is refused, never read
        head = read_input(card, "record", error=UnsafeOutputError).decode("utf-8", errors="replace")
        if CARD_MARKER not in head:
            raise OutputExistsError(f"{card} exists and was not written by apex-orch",
                                    hint="move it away or choose another release folder; apex-orch replaces "
                                         "only cards it wrote")


def release_outputs(config: ReleaseConfig, out: Path) -> list[Path]:
    """Every file name a release writes in its folder that could meet an input (tiers and their
    sidecars, the projector, the preset baselines, the card, the plot)."""
    finals = [out / output_name(config.name, t.profile.tier) for t in config.tiers]
    if config.mtp is not None and config.mtp.mode == "draft":
        finals.append(out / draft_output_name(config.name))
    if config.mmproj is not None:
        finals.append(out / config.mmproj.name)
    finals += [baseline_output(config, out / WORK_DIR, b) for b in config.baselines if b.kind == "preset"]
    calibration = [out / CALIBRATION_DIR / n for n in CALIBRATION_FILES] if config.imatrix is not None else []
    return [x for f in finals for x in (f, *sidecars(f))] + calibration + [out / CARD_NAME, out / PLOT_NAME]


def release_inputs(config: ReleaseConfig, source: Path | None) -> list[Path]:
    """The local files a release reads (what it can know before fetching anything)."""
    found: list[Path] = []
    refs = []
    if source is not None:
        found.append(source)
    elif config.source.kind == "gguf":
        refs += list(config.source.paths)
    if config.mmproj is not None and config.mmproj.kind == "file":
        refs.append(config.mmproj.path)
    if config.mtp is not None and config.mtp.file is not None:
        refs.append(config.mtp.file)
    if config.eval.text is not None:
        refs.append(config.eval.text)
    refs += [b.path for b in config.baselines if b.kind == "file"]
    refs += [t.file for t in config.eval.tasks if t.file is not None]
    for ref in refs:
        try:
            found.append(ref.resolve())
        except ApexError:   # an unset ${VAR}: reported where the path is first needed
            pass
    return found


def check_release_paths(config: ReleaseConfig, out: Path, source: Path | None) -> None:
    """Inputs are never outputs: refused before the lock, the log or any phase. The
    projector included as is is hard-linked into the release on purpose: for it, only the same
    path counts."""
    what, options = "release folder (the config's `output:`) or source", ("out_dir", "source")
    outputs, inputs = release_outputs(config, out), release_inputs(config, source)
    mm = out / config.mmproj.name if config.mmproj is not None and config.mmproj.kind == "file" else None
    check_not_inputs([o for o in outputs if o != mm], inputs, what=what, options=options)
    if mm is not None:
        check_not_inputs([mm], inputs, what=what, options=options, hard_links_ok=True)


def release_lock(work: Path) -> FileLock:
    """One release run per folder (core.locks: flock, dropped by the kernel when the run is
    killed; the lock file is removed when the run ends)."""
    safe_mkdir(work)                             # .apex-release itself must not be a link elsewhere

    def busy(holder: str) -> LockedError:
        return LockedError(f"another apex-orch release is running in {work.parent} ({holder or 'another process'})",
                           hint="wait for it to finish; the lock frees itself when that process exits")
    return FileLock(work / "lock", record=f"pid {os.getpid()}", busy=busy)

