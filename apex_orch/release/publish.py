"""Publish a release folder to the Hugging Face Hub (only with `apex-orch release --push`).

Takes a `PublishRequest`: plain values the publish phase reads from the release (the repo, the
words of the commit, the files the tiers' manifests record and the card files), so this module
knows nothing of the release's state or layout. Gives a `PublishResult`, and `write_record` keeps
it in the release's work folder.

`plan_publish(request)` uploads nothing: the repo id, exactly which files go up (the tier GGUFs, the
projector, the calibration files, README.md, its plot and the LocalAI entries; never manifests,
logs, baselines or work files, which hold local paths), their sizes and sha256, and the commit message
naming apex-orch and llama.cpp. Verification means the bytes: every GGUF is hashed in full, here, with no memo or stat
shortcut (about 3 min per 240 GB at the sha256 speed bench/bench_integrity.py measures), and a
file whose sha256 is not the one its manifest (and so the card) records is refused.
`execute_publish(plan)` talks to the Hub through a `huggingface_hub.HfApi`: create_repo(exist_ok=True),
get_paths_info to skip files the Hub already holds with the same sha256 (so a rerun uploads
nothing), preupload_lfs_files one file at a time (large files are streamed from disk, and an
interrupted upload keeps what was sent), then one create_commit.

The Hub is huggingface_hub's default unless HF_ENDPOINT names another (a mirror, or the tests' fake
Hub); it is passed to HfApi as a value because huggingface_hub reads HF_ENDPOINT only at import.
The token comes from huggingface_hub.get_token() (HF_TOKEN, then the token file written by
`hf auth login`). It is handed to HfApi and nowhere else: never printed, logged or written, and
masked out of any error text.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from apex_orch import __version__
from apex_orch.core.errors import PublishError
from apex_orch.core.fingerprint import sha256_file
from apex_orch.core.infiles import read_input
from apex_orch.core.manifest import manifest_path, read_manifest
from apex_orch.core.outputs import atomic_write_text
from apex_orch.core.settings import hub_endpoint
from apex_orch.llama.tools import build_label, mask_secrets

if TYPE_CHECKING:  # huggingface_hub is imported on first use: it is slow to import
    from huggingface_hub import HfApi, RepoFile

Progress = Callable[[str], None]


@dataclass(frozen=True)
class RecordedFile:
    """A file the release wrote and recorded in a sidecar manifest: a tier's GGUF (or one of its
    parts) or the projector, with the size and sha256 the manifest (and so the card) records."""
    path_in_repo: str
    local: Path
    size: int
    sha256: str


@dataclass(frozen=True)
class PublishRequest:
    """What a release hands to publish, as values (the publish phase builds it)."""
    repo_id: str
    private: bool
    model_name: str                 # the release's name: starts the commit message
    tier_count: int
    config_label: str               # the config as the commit description names it
    release_dir: Path               # the card files' paths in the repo are relative to it
    recorded: list[RecordedFile]    # uploaded through LFS, one at a time, if their bytes still match
    card_files: list[Path]          # README.md, the plot, the LocalAI entries: they go up in the commit
    calibration: list[RecordedFile] = field(default_factory=list)   # checked and uploaded like `recorded`


@dataclass(frozen=True)
class PublishFile:
    local: Path
    path_in_repo: str
    size: int
    sha256: str
    lfs: bool                     # large/binary: stored through LFS (its sha256 is what the Hub reports)


@dataclass
class PublishPlan:
    repo_id: str
    private: bool
    files: list[PublishFile]
    commit_message: str
    commit_description: str
    repo_type: str = "model"
    revision: str = "main"

    def describe(self) -> str:
        lines = [f"repo     {self.repo_id} ({'private' if self.private else 'public'}, {self.revision})",
                 f"commit   {self.commit_message}"]
        for f in self.files:
            lines.append(f"  {f.path_in_repo}  {f.size:,} bytes  sha256 {f.sha256[:16]}")
        return "\n".join(lines)


@dataclass
class PublishResult:
    uploaded: list[str]
    unchanged: list[str]
    commit_url: str | None
    commit_oid: str | None
    message: str = ""
    notes: list[str] = field(default_factory=list)


def recorded_files(first: Path) -> list[RecordedFile]:
    """The files the sidecar manifest of `first` (a tier's first file, or the projector) records."""
    doc = read_manifest(manifest_path(first))
    return [RecordedFile(rec["name"], first.with_name(rec["name"]), rec["size"], rec["sha256"])
            for rec in doc["files"]]


def plan_publish(request: PublishRequest) -> PublishPlan:
    """The publish plan; refuses a recorded file whose bytes are not the ones its manifest records."""
    files: list[PublishFile] = []
    for rec in [*request.recorded, *request.calibration]:
        p = rec.local
        if not p.is_file() or p.stat().st_size != rec.size:
            raise PublishError(f"{p.name} does not match its manifest", where=str(p),
                               hint="rerun the release with every phase selected to rebuild it",
                               options=("only", "skip"))
        digest = sha256_file(p)   # what is uploaded is what was recorded, byte for byte
        if digest != rec.sha256:
            raise PublishError(f"{p.name} changed since it was written: its sha256 is {digest[:16]}..., its "
                               f"manifest and the model card record {rec.sha256[:16]}...", where=str(p),
                               hint="nothing was uploaded; rebuild that tier (delete the file and rerun the "
                                    "release) so the file, its manifest and the card agree")
        files.append(PublishFile(p, rec.path_in_repo, rec.size, digest, True))
    for p in request.card_files:
        if not p.is_file():
            raise PublishError(f"{p} is missing", hint="run the card phase first")
        rel = p.relative_to(request.release_dir).as_posix()
        files.append(PublishFile(p, rel, p.stat().st_size, sha256_file(p), False))
    n_gguf = len(request.recorded)
    message = (f"{request.model_name} APEX GGUF: {request.tier_count} tiers "
               f"(apex-orch {__version__}, {build_label()})")
    description = (f"Made with `apex-orch release {request.config_label}`: {n_gguf} GGUF file(s)"
                   + (", the calibration files" if request.calibration else "")
                   + f", the model card and LocalAI gallery entries. apex-orch {__version__}; "
                     f"llama.cpp build {build_label()}.")
    return PublishPlan(request.repo_id, request.private, files, message, description)


def _token() -> str:
    try:
        from huggingface_hub import get_token
    except ImportError as exc:  # pragma: no cover - declared dependency
        raise PublishError(f"huggingface_hub is not installed: {exc}") from exc
    token = get_token()
    if not token:
        raise PublishError("no Hugging Face token found (HF_TOKEN, or the token file from `hf auth login`)",
                           hint="run `hf auth login` on this machine, or set HF_TOKEN in the job's secrets")
    return token


def execute_publish(plan: PublishPlan, *, progress: Progress | None = None) -> PublishResult:
    """Upload what changed and commit once, with the user's token, to the Hub HF_ENDPOINT names."""
    emit = progress or (lambda _m: None)
    token = _token()
    try:
        from huggingface_hub import HfApi
        api = HfApi(endpoint=hub_endpoint(), token=token, library_name="apex-orch", library_version=__version__)
        return _upload(plan, api, emit)
    except PublishError as exc:
        raise PublishError(mask_secrets(exc.message, [token]), hint=exc.hint and mask_secrets(exc.hint, [token]),
                           where=exc.where) from None
    except Exception as exc:  # the Hub client's errors: one message, the token masked out
        detail = mask_secrets(f"{type(exc).__name__}: {exc}", [token])
        raise PublishError(f"upload to {plan.repo_id} failed: {detail}",
                           hint="check the token's write access to the repo (`hf auth whoami`) and the "
                                "network; a rerun uploads only what the Hub does not hold yet") from None


def _hub_holds(remote: RepoFile | None, f: PublishFile) -> bool:
    """Whether the Hub's file has f's bytes: by sha256 when the Hub stores it through LFS (which the
    Hub decides: a binary card file such as the plot goes there too), else by git blob id."""
    from huggingface_hub.utils.sha import git_hash
    if remote is None:
        return False
    if remote.lfs is not None:
        return remote.lfs.sha256 == f.sha256
    if remote.size != f.size:
        return False
    return remote.blob_id == git_hash(read_input(f.local, "record", error=PublishError))


def _upload(plan: PublishPlan, api: HfApi, emit: Progress) -> PublishResult:
    from huggingface_hub import CommitOperationAdd, RepoFile
    from huggingface_hub.errors import RemoteEntryNotFoundError, RevisionNotFoundError

    api.create_repo(plan.repo_id, repo_type=plan.repo_type, private=plan.private, exist_ok=True)
    try:
        infos = api.get_paths_info(plan.repo_id, [f.path_in_repo for f in plan.files], expand=True,
                                   repo_type=plan.repo_type, revision=plan.revision)
    except (RevisionNotFoundError, RemoteEntryNotFoundError):  # no commit on that revision yet
        infos = []
    remote = {info.path: info for info in infos if isinstance(info, RepoFile)}
    changed: list[Any] = []
    unchanged: list[Any] = []
    for f in plan.files:
        (unchanged if _hub_holds(remote.get(f.path_in_repo), f) else changed).append(f)
    if not changed:
        emit(f"publish: {plan.repo_id} already holds all {len(plan.files)} files")
        return PublishResult([], [f.path_in_repo for f in unchanged], None, None,
                             message=f"{plan.repo_id} is up to date ({len(unchanged)} files)")
    operations = []
    for f in changed:
        op = CommitOperationAdd(path_in_repo=f.path_in_repo, path_or_fileobj=str(f.local))
        if f.lfs:
            emit(f"publish: uploading {f.path_in_repo} ({f.size / 1e9:.2f} GB)")
            api.preupload_lfs_files(plan.repo_id, additions=[op], repo_type=plan.repo_type, revision=plan.revision)
        operations.append(op)
    emit(f"publish: committing {len(operations)} file(s) to {plan.repo_id}")
    info = api.create_commit(plan.repo_id, operations, commit_message=plan.commit_message,
                             commit_description=plan.commit_description, repo_type=plan.repo_type,
                             revision=plan.revision)
    return PublishResult([f.path_in_repo for f in changed], [f.path_in_repo for f in unchanged],
                         info.commit_url, info.oid,
                         message=f"{len(changed)} uploaded, {len(unchanged)} unchanged"
                                 + (f": {info.commit_url}" if info.commit_url else ""))


def write_record(work_dir: Path, plan: PublishPlan, result: PublishResult) -> None:
    """What was pushed, for the release's own records (no token, no local paths)."""
    doc = {"repo": plan.repo_id, "revision": plan.revision, "commit_message": plan.commit_message,
           "commit_url": result.commit_url, "commit_oid": result.commit_oid,
           "pushed_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
           "uploaded": result.uploaded, "unchanged": result.unchanged,
           "files": {f.path_in_repo: f.sha256 for f in plan.files}}
    atomic_write_text(work_dir / "publish.json", json.dumps(doc, indent=2) + "\n")
