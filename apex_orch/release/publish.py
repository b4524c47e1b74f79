"""Publish a release folder to the Hugging Face Hub (only with `apex-orch release --push`).

`plan_publish(state)` writes nothing: the repo id, exactly which files go up (the tier GGUFs, the
projector, README.md and the LocalAI entries; never manifests, logs or work files, which hold
local paths), their sizes and sha256, and the commit message naming apex-orch and llama.cpp.
Verification means the bytes (issue 15): every GGUF is hashed in full, here, with no memo or stat
shortcut (about 3 min per 240 GB at the sha256 speed bench/bench_integrity.py measures), and a
file whose sha256 is not the one its manifest (and so the card) records is refused.
`execute_publish(plan, api=...)` talks to the Hub through a `huggingface_hub.HfApi`:
create_repo(exist_ok=True), get_paths_info to skip files the Hub already holds with the same
sha256 (so a rerun uploads nothing), preupload_lfs_files one file at a time (large files are
streamed from disk, and an interrupted upload keeps what was sent), then one create_commit.

The token comes from huggingface_hub.get_token() (HF_TOKEN, then the token file written by
`hf auth login`). It is handed to HfApi and nowhere else: never printed, logged or written, and
masked out of any error text.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from apex_orch import __version__
from apex_orch.core.errors import PublishError

Progress = Callable[[str], None]


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


def git_blob_sha1(data: bytes) -> str:
    """What the Hub reports as blob_id for a regular (non-LFS) file."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def plan_publish(state) -> PublishPlan:
    """The publish plan for a release whose card phase has run (release.ReleaseState)."""
    from apex_orch.core.fingerprint import sha256_file
    from apex_orch.llama.tools import build_label
    from apex_orch.core.manifest import manifest_path, read_manifest
    from apex_orch.release.runner import CARD_NAME, LOCALAI_DIR

    cfg = state.config
    out: Path = state.out_dir
    files: list[PublishFile] = []

    def from_manifest(first: Path) -> None:
        doc = read_manifest(manifest_path(first))
        for rec in doc["files"]:
            p = first.with_name(rec["name"])
            if not p.is_file() or p.stat().st_size != rec["size"]:
                raise PublishError(f"{p.name} does not match its manifest", where=str(p),
                                   hint="rerun the release without --only/--skip to rebuild it")
            digest = sha256_file(p)   # what is uploaded is what was recorded, byte for byte
            if digest != rec["sha256"]:
                raise PublishError(f"{p.name} changed since it was written: its sha256 is {digest[:16]}..., its "
                                   f"manifest and the model card record {str(rec['sha256'])[:16]}...", where=str(p),
                                   hint="nothing was uploaded; rebuild that tier (delete the file and rerun the "
                                        "release) so the file, its manifest and the card agree")
            files.append(PublishFile(p, rec["name"], rec["size"], digest, True))

    for job in state.jobs:
        from_manifest(state.files[job.profile.tier][0])
    if state.mmproj is not None:
        from_manifest(state.mmproj)
    card = out / CARD_NAME
    if not card.is_file():
        raise PublishError(f"{card} is missing", hint="run the card phase first")
    small = [card] + sorted((out / LOCALAI_DIR).glob("*.yaml"))
    for p in small:
        rel = p.relative_to(out).as_posix()
        files.append(PublishFile(p, rel, p.stat().st_size, sha256_file(p), False))
    n_gguf = sum(1 for f in files if f.lfs)
    message = f"{cfg.name} APEX GGUF: {len(cfg.tiers)} tiers (apex-orch {__version__}, {build_label()})"
    description = (f"Made with `apex-orch release {cfg.display_path()}`: {n_gguf} GGUF file(s), the model card "
                   f"and LocalAI gallery entries. apex-orch {__version__}; llama.cpp build {build_label()}.")
    return PublishPlan(cfg.publish.repo, cfg.publish.private, files, message, description)


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


def _known_token() -> str | None:
    try:
        from huggingface_hub import get_token
        return get_token()
    except Exception:
        return None


def make_api(token: str):
    from huggingface_hub import HfApi
    return HfApi(token=token, library_name="apex-orch", library_version=__version__)


class _Masker:
    def __init__(self, secret: str | None):
        self.secret = secret

    def __call__(self, text: str) -> str:
        return text.replace(self.secret, "***") if self.secret else text


def execute_publish(plan: PublishPlan, *, api=None, progress: Progress | None = None) -> PublishResult:
    """Upload what changed and commit once. `api` defaults to an HfApi holding the user's token."""
    emit = progress or (lambda _m: None)
    if api is None:
        token = _token()
        api = make_api(token)
    else:
        token = _known_token()
    mask = _Masker(token)
    try:
        return _execute(plan, api, emit)
    except PublishError as exc:
        raise PublishError(mask(exc.message), hint=exc.hint and mask(exc.hint), where=exc.where) from None
    except Exception as exc:  # the Hub client's errors: one message, the token masked out
        raise PublishError(f"upload to {plan.repo_id} failed: {mask(f'{type(exc).__name__}: {exc}')}",
                           hint="check the token's write access to the repo (`hf auth whoami`) and the "
                                "network; a rerun uploads only what the Hub does not hold yet") from None


def _execute(plan: PublishPlan, api, emit: Progress) -> PublishResult:
    from huggingface_hub import CommitOperationAdd

    api.create_repo(plan.repo_id, repo_type=plan.repo_type, private=plan.private, exist_ok=True)
    remote: dict[str, tuple[str | None, str | None]] = {}
    try:
        infos = api.get_paths_info(plan.repo_id, [f.path_in_repo for f in plan.files], expand=True,
                                   repo_type=plan.repo_type, revision=plan.revision)
    except Exception as exc:  # an empty new repo has no revision yet
        if "RevisionNotFound" not in type(exc).__name__ and "EntryNotFound" not in type(exc).__name__:
            raise
        infos = []
    for info in infos:
        lfs = getattr(info, "lfs", None)
        sha = getattr(lfs, "sha256", None) if lfs is not None else None
        remote[info.path] = (sha, getattr(info, "blob_id", None))
    changed, unchanged = [], []
    for f in plan.files:
        sha, blob = remote.get(f.path_in_repo, (None, None))
        same = (sha == f.sha256) if f.lfs else (blob is not None and blob == git_blob_sha1(f.local.read_bytes()))
        (unchanged if same else changed).append(f)
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
    url = getattr(info, "commit_url", None)
    oid = getattr(info, "oid", None)
    return PublishResult([f.path_in_repo for f in changed], [f.path_in_repo for f in unchanged], url, oid,
                         message=f"{len(changed)} uploaded, {len(unchanged)} unchanged"
                                 + (f": {url}" if url else ""))


def write_record(state, plan: PublishPlan, result: PublishResult) -> None:
    """What was pushed, for the release's own records (no token, no local paths)."""
    import json
    import time
    from apex_orch.core.outputs import atomic_write_text
    doc = {"repo": plan.repo_id, "revision": plan.revision, "commit_message": plan.commit_message,
           "commit_url": result.commit_url, "commit_oid": result.commit_oid, "pushed_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
           "uploaded": result.uploaded, "unchanged": result.unchanged,
           "files": {f.path_in_repo: f.sha256 for f in plan.files}}
    atomic_write_text(state.work / "publish.json", json.dumps(doc, indent=2) + "\n")
