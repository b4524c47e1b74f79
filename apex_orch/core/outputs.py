"""Outputs that are either complete or absent.

`OutputGuard` owns one final output (and its sidecars):
- refuses an existing output without `force` (OutputExistsError);
- takes an exclusive lock `<out>.lock` with flock, so a second run on the same output is
  refused (LockedError naming the holder); the kernel drops flock when a process dies,
  even on kill -9, so a leftover lock file from a killed run is recognised as stale;
- hands out temporary names in the destination folder (`.<name>.partial-<pid>`), removed
  on any failure, interrupt (SIGINT/SIGTERM) or exit; partials left by a killed run are
  removed by the next run that takes the lock;
- `commit()` renames temporaries to their final names only after verification;
- never writes through a link (issue 15): a symbolic link at the output's name or any of its
  sidecars (.log, .lock, .manifest.json, .tensor-types.txt, .split.log) is refused up front
  (UnsafeOutputError), and the lock file is opened with O_NOFOLLOW and never truncated when it
  is not a plain file of ours (see apex_orch.core.safefiles).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import socket
import time
from pathlib import Path

from apex_orch.core.errors import ApexError, DiskSpaceError, LockedError, OutputExistsError, OutputNotWritableError
from apex_orch.core.safefiles import open_nofollow, refuse_links, write_atomic

PARTIAL_TAG = ".partial-"
SIDECARS = (".lock", ".log", ".manifest.json", ".tensor-types.txt", ".split.log")


def sidecars(final: Path) -> list[Path]:
    """The files apex-orch writes beside an output (its lock, tool log, manifest, rules)."""
    return [final.with_name(final.name + s) for s in SIDECARS]


def _partial_name(final: Path) -> Path:
    return final.with_name(f".{final.name}{PARTIAL_TAG}{os.getpid()}")


class OutputGuard:
    def __init__(self, final: Path, *, force: bool = False, extra_finals: list[Path] | None = None):
        self.final = Path(final)
        self.force = force
        self.extra_finals = list(extra_finals or [])
        self.lock_path = self.final.with_name(self.final.name + ".lock")
        self._lock_fh = None
        self._temps: dict[Path, Path] = {}   # temp -> final
        self.cleaned_stale: list[Path] = []

    # ---- lifecycle
    def __enter__(self) -> "OutputGuard":
        ensure_writable_folder(self.final.parent)
        refuse_links([f for final in [self.final, *self.extra_finals] for f in (final, *sidecars(final))])
        self._acquire()
        try:
            self._clean_stale()
            if not self.force:
                for f in [self.final, *self.extra_finals]:
                    if f.exists():
                        raise OutputExistsError(f"{f} already exists",
                                                hint="pass --force to replace it (it is kept until the new "
                                                     "file is complete and verified)")
        except BaseException:
            self._release()
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.discard()
        self._release()

    # ---- lock
    def _acquire(self) -> None:
        try:
            fh = open_nofollow(self.lock_path, "lock")
        except OSError as exc:
            raise translate_os_error(exc, self.lock_path) from None
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "another process"
            fh.close()
            raise LockedError(f"{self.final} is being written by another apex-orch run ({holder})",
                              hint="wait for it to finish; if no such process exists, the lock frees itself "
                                   "when that process is gone") from None
        fh.seek(0)
        fh.truncate()
        fh.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}))
        fh.flush()
        self._lock_fh = fh

    def _release(self) -> None:
        if self._lock_fh is not None:
            try:
                self.lock_path.unlink(missing_ok=True)
            finally:
                fcntl.flock(self._lock_fh.fileno(), fcntl.LOCK_UN)
                self._lock_fh.close()
                self._lock_fh = None

    def _clean_stale(self) -> None:
        """We hold the lock, so any partial of this output belongs to a dead run."""
        for final in [self.final, *self.extra_finals]:
            # the output's own partial, and its sidecars' (.X.gguf.tensor-types.txt.partial-N, manifest)
            for pattern in (f".{final.name}{PARTIAL_TAG}*", f".{final.name}.*{PARTIAL_TAG}*"):
                for p in final.parent.glob(pattern):
                    if p not in self.cleaned_stale:
                        p.unlink(missing_ok=True)
                        self.cleaned_stale.append(p)
        # split parts written by a dead run
        stem = self.final.name[:-5] if self.final.name.endswith(".gguf") else self.final.name
        for p in self.final.parent.glob(f".{stem}-*-of-*.gguf{PARTIAL_TAG}*"):
            p.unlink(missing_ok=True)
            self.cleaned_stale.append(p)

    # ---- temporaries
    def temp_for(self, final: Path | None = None) -> Path:
        final = Path(final) if final else self.final
        tmp = _partial_name(final)
        self._temps[tmp] = final
        return tmp

    def adopt(self, temp: Path, final: Path) -> None:
        """Track a temporary created by a tool (e.g. split parts) for commit/cleanup."""
        self._temps[Path(temp)] = Path(final)

    def discard(self) -> None:
        for tmp in list(self._temps):
            tmp.unlink(missing_ok=True)
            self._temps.pop(tmp, None)

    def commit(self) -> list[Path]:
        done = []
        for tmp, final in list(self._temps.items()):
            if not tmp.exists():
                continue
            os.replace(tmp, final)
            self._temps.pop(tmp)
            done.append(final)
        return done


def ensure_writable_folder(folder: Path) -> None:
    """Create `folder` if needed; refuse one that cannot be written, before any work starts."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise translate_os_error(exc, folder, creating=True) from None
    # os.access also answers EROFS for a read-only mount, which root's permissions do not override.
    if not os.access(folder, os.W_OK):
        ro = _is_read_only_mount(folder)
        raise OutputNotWritableError(
            f"output folder {folder} is not writable" + (" (read-only file system)" if ro else " (permission denied)"),
            hint="choose another --out-dir (or -o)" + ("" if ro else ", or fix the folder's permissions"))


def _is_read_only_mount(folder: Path) -> bool:
    try:
        return bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def translate_os_error(exc: OSError, path: Path | str | None = None, *, creating: bool = False):
    """An OSError met while writing outputs, as one actionable ApexError (returned, not raised)."""
    where = str(path or exc.filename or "")
    what = "cannot create" if creating else "cannot write"
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return DiskSpaceError(f"the disk is full: {what} {where} ({exc.strerror})",
                              hint="free some space or write to another folder, then rerun")
    if exc.errno == errno.EFBIG:
        return DiskSpaceError(f"file too large: {what} {where} ({exc.strerror}; a file size limit, `ulimit -f`?)",
                              hint="raise the file size limit or write to another file system")
    if exc.errno == errno.EROFS:
        return OutputNotWritableError(f"{what} {where}: {exc.strerror}",
                                      hint="choose another --out-dir (or -o) on a writable file system")
    if exc.errno in (errno.EACCES, errno.EPERM):
        return OutputNotWritableError(f"{'cannot create' if creating else 'cannot access'} {where}: {exc.strerror}",
                                      hint="fix the permissions, or choose another --out-dir (or -o)")
    return ApexError(f"{exc.strerror or exc}: {where}" if where else f"{exc.strerror or exc}",
                     hint="check that path and its file system, then rerun")


def check_free_space(folder: Path, needed: int, *, margin_fraction: float = 0.02,
                     margin_bytes: int = 64 << 20) -> int:
    """Refuse before starting when the folder cannot hold `needed` bytes plus a margin."""
    ensure_writable_folder(folder)
    free = shutil.disk_usage(folder).free
    want = int(needed * (1 + margin_fraction)) + margin_bytes
    if free < want:
        raise DiskSpaceError(
            f"not enough free disk in {folder}: {free / 1e9:.2f} GB free, the output needs about "
            f"{needed / 1e9:.2f} GB plus a {want - needed >> 20} MiB margin",
            hint="free some space or choose another --out-dir")
    return free


def write_new_text(path: Path, text: str, *, force: bool = False) -> None:
    """A small user-requested file (-o): refused if it exists without --force, written atomically."""
    if path.exists() and not force:
        raise OutputExistsError(f"{path} exists", hint="pass --force to overwrite")
    atomic_write_text(path, text)


def atomic_write_text(path: Path, text: str) -> None:
    """Whole-file write through a fresh temporary and a rename (safefiles.write_atomic)."""
    write_atomic(path, text)
