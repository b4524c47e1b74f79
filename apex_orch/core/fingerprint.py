"""Fingerprints of files: full sha256, made cheap to repeat by stat-keyed memos.

Verification means the bytes: a file is up to date, carded or published only when its bytes are
the ones recorded. Two cheap-when-unchanged checks, one full check:

- Outputs: a manifest records each file's size, mtime_ns, inode and full sha256
  (`file_record`). `check_record` trusts the file without reading it only when size, mtime_ns
  and inode all equal the record (a few microseconds); any difference means a full sha256
  (memoised, see below) that must equal the recorded one.
- Sources (cache keys of the quantize manifest, the imatrix cache, the eval base log-prob cache,
  the --from-q8 Q8_0 copies): `source_sha256` is the full sha256 of the bytes, memoised under
  <cache>/hashes/ by (real path, size, mtime_ns, inode, device, ctime_ns). An unchanged
  240 GB source is hashed once (about 240 GB / sha256 throughput: ~3 min at the 1.4 GB/s
  measured by bench/bench_integrity.py, longer when the disk reads slower); later runs cost one
  stat and one small file read. Any write to the file changes its ctime (which no user can set
  back), so a changed source is always re-hashed: a new cache key.
- Publish always hashes what it uploads in full (`sha256_file`), with no memo.

`fast_fingerprint` (the size + 8 MiB head + 16 sampled blocks scheme of earlier versions) is
kept only so old manifests still read; nothing decides "up to date" with it any more.
Split models: each shard is hashed, in order.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from apex_orch.core.errors import ApexError
from apex_orch.core.infiles import read_json

HEAD_BYTES = 8 << 20
SAMPLE_BYTES = 64 << 10
SAMPLES = 16
SCHEME = "fast-v1"


def fast_fingerprint(path: str | os.PathLike[str]) -> str:
    p = Path(path)
    size = p.stat().st_size
    h = hashlib.sha256()
    h.update(f"{SCHEME}:{size}:".encode())
    with open(p, "rb") as fh:
        h.update(fh.read(HEAD_BYTES))
        if size > HEAD_BYTES:
            for i in range(SAMPLES):
                offset = HEAD_BYTES + (size - HEAD_BYTES - SAMPLE_BYTES) * i // max(1, SAMPLES - 1)
                fh.seek(max(HEAD_BYTES, offset))
                h.update(fh.read(SAMPLE_BYTES))
    return f"{SCHEME}:{size}:{h.hexdigest()[:32]}"


def sha256_file(path: str | os.PathLike[str], chunk: int = 4 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ------------------------------------------------------------------ stat-keyed sha256 memo

MEMO_SCHEME = "sha256-memo-v1"
MEMO_MAX_ENTRIES = 4096


def memo_dir() -> Path:
    from apex_orch.core.settings import cache_root
    return cache_root() / "hashes"


def _stat_identity(st: os.stat_result) -> list[int]:
    return [st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev, st.st_ctime_ns]


def _memo_entry(real: str, st: os.stat_result) -> Path:
    key = hashlib.sha256(json.dumps([MEMO_SCHEME, real, *_stat_identity(st)]).encode()).hexdigest()
    return memo_dir() / f"{key[:40]}.json"


def _memo_lookup(real: str, st: os.stat_result) -> str | None:
    try:
        doc = read_json(_memo_entry(real, st), "record")
    except ApexError:   # missing or damaged: the file is hashed again
        return None
    if isinstance(doc, dict) and doc.get("path") == real and doc.get("stat") == _stat_identity(st):
        sha = doc.get("sha256")
        if isinstance(sha, str) and len(sha) == 64:
            return sha
    return None


def remember(path: str | os.PathLike[str], sha256: str) -> None:
    """Record that the file now at `path` (as it stands now) has this sha256. Never fails a run:
    a memo that cannot be written only means hashing again next time."""
    from apex_orch.core.safefiles import write_atomic
    try:
        real = os.path.realpath(path)
        st = os.stat(real)
        entry = _memo_entry(real, st)
        if _memo_lookup(real, st) == sha256:
            return
        entry.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(entry, json.dumps({"path": real, "stat": _stat_identity(st), "sha256": sha256}) + "\n")
        _prune(entry.parent)
    except OSError:
        pass


def _prune(folder: Path) -> None:
    """Keep the memo small: past MEMO_MAX_ENTRIES, drop the oldest half (by mtime)."""
    try:
        entries = list(os.scandir(folder))
        if len(entries) <= MEMO_MAX_ENTRIES:
            return
        entries.sort(key=lambda e: e.stat(follow_symlinks=False).st_mtime_ns)
        for e in entries[: len(entries) // 2]:
            os.unlink(e.path)
    except OSError:
        pass


def source_sha256(path: str | os.PathLike[str]) -> str:
    """Full sha256 of a file's bytes, memoised by its stat identity (see the module docstring)."""
    real = os.path.realpath(path)
    before = os.stat(real)
    hit = _memo_lookup(real, before)
    if hit is not None:
        return hit
    sha = sha256_file(real)
    if _stat_identity(os.stat(real)) == _stat_identity(before):   # not written while we read it
        remember(real, sha)
    return sha


# ------------------------------------------------------------------ manifest records

def file_record(path: str | os.PathLike[str], name: str | None = None, sha256: str | None = None) -> dict[str, Any]:
    """What a manifest records about one file: enough to notice a change cheaply, and the hash."""
    st = os.stat(path)
    return {"name": name or Path(path).name, "size": st.st_size, "mtime_ns": st.st_mtime_ns,
            "inode": st.st_ino, "sha256": sha256 or sha256_file(path)}


def check_record(path: str | os.PathLike[str], rec: dict[str, Any]) -> tuple[bool, str]:
    """(True, how) when the file's bytes are the recorded ones: size, mtime_ns and inode all as
    recorded (cheap), else a full sha256 (memoised) equal to the recorded one."""
    try:
        st = os.stat(path)
    except OSError:
        return False, "missing"
    if st.st_size != rec.get("size"):
        return False, f"size {st.st_size:,} bytes, recorded {rec.get('size')!r}"
    if rec.get("mtime_ns") == st.st_mtime_ns and rec.get("inode") == st.st_ino:
        if isinstance(rec.get("sha256"), str):
            remember(path, rec["sha256"])     # later source_sha256() calls on it are free
        return True, "stat unchanged"
    if source_sha256(path) == rec.get("sha256"):
        return True, "re-hashed: same bytes"
    return False, "its sha256 differs from the recorded one"
