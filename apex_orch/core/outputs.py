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
- never writes through a link (it could point anywhere): a symbolic link at the output's name or any of its
  sidecars (.log, .lock, .manifest.json, .tensor-types.txt, .split.log) is refused up front
  (UnsafeOutputError), and the lock file is opened with O_NOFOLLOW and never truncated when it
  is not a plain file of ours (see apex_orch.core.safefiles).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Callable, Iterable

from apex_orch.core.errors import (DiskSpaceError, LockedError, OutputExistsError, OutputNotWritableError,
                                   RequestError)
from apex_orch.core.locks import FileLock
from apex_orch.core.safefiles import check_not_inputs, clear_name, refuse_links, write_atomic, write_new
from apex_orch.core.translate import translate_os_error

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
        self._lock: FileLock | None = None
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
                                                hint="ask to replace it (it is kept until the new file is "
                                                     "complete and verified)", options=("force",))
        except BaseException:
            self._release()
            raise
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self.discard()
        self._release()

    # ---- lock
    def _acquire(self) -> None:
        record = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()})
        final = self.final

        def busy(holder: str) -> LockedError:
            return LockedError(f"{final} is being written by another apex-orch run ({holder or 'another process'})",
                               hint="wait for it to finish; if no such process exists, the lock frees itself "
                                    "when that process is gone")
        self._lock = FileLock(self.lock_path, record=record, busy=busy).__enter__()

    def _release(self) -> None:
        if self._lock is not None:
            self._lock.__exit__(None, None, None)
            self._lock = None

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

    def discard_temp(self, temp: Path) -> None:
        """Remove one temporary now (e.g. the unsplit file once its parts exist) and stop tracking it."""
        Path(temp).unlink()
        self._temps.pop(Path(temp), None)

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
            hint="choose another output folder" + ("" if ro else ", or fix the folder's permissions"),
            options=("out_dir", "out"))


def _is_read_only_mount(folder: Path) -> bool:
    try:
        return bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
    except OSError:
        return False


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
            hint="free some space or choose another output folder", options=("out_dir", "out"))
    return free


MAX_NAME_BYTES = 255 - len(".") - len(PARTIAL_TAG) - 10 - len(".manifest.json")   # a temporary's and sidecars' room


def check_new_output(path: str | os.PathLike[str], *, inputs: Iterable[Path | None] = (), force: bool = False,
                     option: str = "out", what: str = "output file",
                     suffixes: Iterable[str] | None = None) -> Path:
    """Up front, before any work: the checks OutputGuard makes when it writes a small output (a
    profile, a plot), so a run never computes for minutes and then cannot write. Its format
    (`suffixes`, lower case, with the dot), never one of the run's `inputs` (forced or not), no link
    planted at it or its sidecars, not an existing file without `force`, a name the file system can
    hold. `option` names the parameter that sets the path (the CLI words it as its flag)."""
    path = Path(path)
    check_not_inputs([path], inputs, what=what, options=(option,))   # first: the refusal force never changes
    if suffixes is not None:
        allowed = tuple(suffixes)
        if path.suffix.lower() not in allowed:
            raise RequestError(f"{path}: the file name must end in {', '.join(allowed)}", fields=(option,),
                               hint="the ending chooses the format")
    if len(os.fsencode(path.name)) > MAX_NAME_BYTES:
        raise RequestError(f"{path.name[:40]}...: the name is {len(os.fsencode(path.name))} bytes; at most "
                           f"{MAX_NAME_BYTES} (file systems allow 255 per name, with room for the temporary name)",
                           fields=(option,), hint="choose a shorter name")
    if path.is_dir():
        raise RequestError(f"{path} is a folder", fields=(option,), hint="give a file name")
    refuse_links([path, *sidecars(path)])
    if os.path.lexists(path) and not force:
        raise OutputExistsError(f"{path} exists", hint="ask to replace it", options=("force",))
    return path


def write_output(path: str | os.PathLike[str], data: bytes | str | Callable[[Path], object], *,
                 force: bool = False) -> Path:
    """Write a small output the way quantize writes its files: under OutputGuard (its folder writable,
    no link planted, the lock, no overwrite without `force`), into a temporary name of this run with
    normal permissions (0644 less the umask), renamed over `path` only when complete. `data` may be a
    function that writes the temporary file whose path it is given (a plot)."""
    path = Path(path)
    with OutputGuard(path, force=force) as guard:
        tmp = guard.temp_for(path)
        if callable(data):
            clear_name(tmp)
            data(tmp)
            if not tmp.is_file() or tmp.is_symlink():
                raise OutputNotWritableError(f"{tmp} was not written as a regular file")
            os.chmod(tmp, 0o644 & ~_umask())
        else:
            write_new(tmp, data)
        guard.commit()
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_new_text(path: Path, text: str, *, force: bool = False) -> None:
    """A small user-requested file: refused if it exists unless `force`, written through the guard."""
    write_output(path, text, force=force)


def atomic_write_text(path: Path, text: str) -> None:
    """Whole-file write through a fresh temporary and a rename (safefiles.write_atomic)."""
    write_atomic(path, text)
