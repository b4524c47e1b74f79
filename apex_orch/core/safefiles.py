"""Safe files: nothing outside the output folder is touched, and an output is never an input.

Every file apex-orch creates goes through this module, so that every one is whole or absent:

- `write_atomic(path, data)` (and `copy_atomic(src, path)`, streamed) — files written whole (manifests,
  rules, cards, LocalAI entries,
  records, cache sidecars): written to a fresh temporary made with O_CREAT|O_EXCL in the same
  folder (never an existing name, never through a link), fsynced, then renamed over `path`.
  A rename replaces whatever name is at `path` — a planted link included — never the file a
  link points to.
- `open_nofollow(path, mode)` — files written in place (tool logs "w", the release log "a",
  flock lock files "lock"): opened with O_NOFOLLOW, so a symbolic link planted at the name is
  refused (UnsafeOutputError, exit 17) instead of followed; then fstat — anything but a
  regular file with a single link (a hard link to a file elsewhere, a FIFO, a device) is
  refused before a byte is written or truncated.
- `clear_name(path)` — a temporary name handed to a tool (llama-quantize's output, the Q8_0
  scratch copy) is cleared of anything planted there (a link is removed, never followed) just
  before the tool starts; the tool then creates a new file.
- `refuse_links(paths)` — the up-front check: a symbolic link at any name a run is about to
  write is one clear error before anything runs. Decision: a planted link is refused, never
  silently replaced: it is evidence that something is wrong in that folder, and the user
  decides (remove it, rerun).
- `safe_mkdir(path)` — a folder apex-orch creates inside an output folder (`.apex-release/`,
  `localai/`) must not be a link to somewhere else.
- `check_not_inputs(outputs, inputs)` — an output that resolves to an input (the same path
  after resolving links, or the same file: same device and inode, i.e. a hard link) is refused
  (OutputIsInputError, exit 2) before anything runs.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Any, Callable, IO, Iterable

from apex_orch.core.errors import OutputIsInputError, UnsafeOutputError

_MODES = {
    "w": (os.O_WRONLY, "w"),            # truncated after the checks, never before
    "a": (os.O_WRONLY | os.O_APPEND, "a"),
    "lock": (os.O_RDWR, "r+"),          # never truncated on open: another run may hold it
}


def _link_error(path: Path) -> UnsafeOutputError:
    try:
        target = os.readlink(path)
    except OSError:
        target = "?"
    return UnsafeOutputError(
        f"{path} is a symbolic link (to {target}); apex-orch never writes through a link at a name it "
        "creates, so nothing outside the output folder is touched",
        hint=f"remove the link (rm {path}) or choose another output folder, then rerun")


def _not_plain_error(path: Path, st: os.stat_result) -> UnsafeOutputError:
    if stat.S_ISREG(st.st_mode):
        what = f"a hard link ({st.st_nlink} names share this file)"
        hint = f"remove that name (rm {path}; the other names keep the data) or choose another output folder"
    else:
        what = "not a regular file"
        hint = f"remove it (rm {path}) or choose another output folder"
    return UnsafeOutputError(f"{path} is {what}; apex-orch writes only files it owns there, so nothing "
                             "outside the output folder is changed", hint=hint + ", then rerun")


def refuse_links(paths: Iterable[Path]) -> None:
    """Refuse (UnsafeOutputError) when any of these names is a symbolic link. Missing is fine."""
    for p in paths:
        if os.path.islink(p):
            raise _link_error(Path(p))


def safe_mkdir(path: Path) -> Path:
    """mkdir -p, refusing a symbolic link at the last component (a folder apex-orch owns)."""
    path = Path(path)
    refuse_links([path])
    path.mkdir(parents=True, exist_ok=True)
    refuse_links([path])
    return path


def open_nofollow(path: Path, mode: str = "w", *, binary: bool = False, perm: int = 0o644) -> IO[Any]:
    """Open a file to write in place, never through a link: "w" (truncate), "a" (append) or
    "lock" (read/write, not truncated; for flock). Raises UnsafeOutputError for a symbolic
    link, a hard link or a non-regular file at `path`; other OSErrors pass through."""
    path = Path(path)
    flags, pymode = _MODES[mode]
    # O_NONBLOCK: a FIFO planted at the name must not block the open (it is refused below).
    flags |= os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
    try:
        fd = os.open(path, flags, perm)
    except OSError as exc:
        if exc.errno == errno.ELOOP or (exc.errno == errno.ENXIO and os.path.islink(path)):
            raise _link_error(path) from None
        if exc.errno == errno.ENXIO:   # a FIFO without a reader
            raise _not_plain_error(path, os.lstat(path)) from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_nlink > 1:
            raise _not_plain_error(path, st)
        os.set_blocking(fd, True)
        if mode == "w":
            os.ftruncate(fd, 0)
    except BaseException:
        os.close(fd)
        raise
    if binary:
        return os.fdopen(fd, pymode + "b")
    return os.fdopen(fd, pymode, encoding="utf-8", errors="replace")


def clear_name(path: Path) -> Path:
    """Remove whatever is at `path` (a dead run's leftover, a planted link: the link itself, never
    its target); a folder there is refused."""
    path = Path(path)
    if os.path.lexists(path):
        if os.path.isdir(path) and not os.path.islink(path):
            raise _not_plain_error(path, os.lstat(path))
        os.unlink(path)
    return path


def write_new(path: Path, data: bytes | str, *, perm: int = 0o644) -> Path:
    """Write a temporary file under a name this run owns, fsynced. An old file or link at that
    name (a dead run's leftover) is removed first; O_EXCL|O_NOFOLLOW then create a new file."""
    path = Path(path)
    if os.path.lexists(path):
        os.unlink(path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, perm)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data.encode("utf-8") if isinstance(data, str) else data)
        fh.flush()
        os.fsync(fh.fileno())
    return path


def write_atomic(path: Path, data: bytes | str, *, perm: int = 0o644, mkdir: bool = True) -> Path:
    """Write `path` whole: a fresh temporary in its folder (O_EXCL), fsync, rename over `path`.
    Readers see the old file or the new one, never a mix; a link at `path` is replaced, its
    target never written."""
    payload = data.encode("utf-8") if isinstance(data, str) else data
    return _replace_whole(Path(path), lambda fh: fh.write(payload), perm=perm, mkdir=mkdir)


def copy_atomic(src: Path, path: Path, *, perm: int = 0o644) -> Path:
    """`write_atomic` for a file's content, streamed (an imatrix can be a GB: never read whole)."""
    def fill(fh: IO[Any]) -> None:
        with open(src, "rb") as source:
            shutil.copyfileobj(source, fh, 16 << 20)
    return _replace_whole(Path(path), fill, perm=perm, mkdir=True)


def write_atomic_with(path: Path, fill: Callable[[IO[Any]], object], *, perm: int = 0o644) -> Path:
    """`write_atomic` for content that `fill(fh)` writes (a spliced GGUF, streamed from other files)."""
    return _replace_whole(Path(path), fill, perm=perm, mkdir=False)


def _replace_whole(path: Path, fill: Callable[[IO[Any]], object], *, perm: int, mkdir: bool) -> Path:
    if mkdir:
        path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            os.fchmod(fh.fileno(), perm)   # mkstemp's 0600 is for secrets; these are shareable files
            fill(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


# ---------------------------------------------------------------- inputs are never outputs

def _identity(p: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(p)
    except OSError:
        return None
    return (st.st_dev, st.st_ino) if stat.S_ISREG(st.st_mode) else None


def same_file(a: Path, b: Path) -> bool:
    """True when `a` and `b` name the same file: equal after resolving links, or the same
    device and inode (hard links)."""
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    ia, ib = _identity(Path(a)), _identity(Path(b))
    return ia is not None and ia == ib


def check_not_inputs(outputs: Iterable[Path], inputs: Iterable[Path | None], *, what: str = "output",
                     options: tuple[str, ...] = ("out", "out_dir"), hard_links_ok: bool = False) -> None:
    """OutputIsInputError when any output names the same file as any input. Run before anything.
    `what` and `options` say what to choose instead (the hint), by the caller's words and the
    parameters that set it. `hard_links_ok`: only the same path (after resolving links) counts —
    for an output that apex-orch itself hard-links to its input (the release's projector)."""
    ins = [Path(i) for i in inputs if i is not None]
    for out in outputs:
        out = Path(out)
        for src in ins:
            if (os.path.realpath(out) == os.path.realpath(src)) if hard_links_ok else same_file(out, src):
                how = ("the same file" if os.path.realpath(out) == os.path.realpath(src)
                       else "the same file through a hard link")
                raise OutputIsInputError(
                    f"output {out} is the input {src} ({how}); writing it would destroy the input",
                    hint=f"choose another {what}: apex-orch never writes over one of its inputs "
                         "(asking to replace outputs does not change that)", options=options)
