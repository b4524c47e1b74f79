"""One lock mechanism: an exclusive flock on a lock file that names its holder and cleans up.

`FileLock(path, record=..., busy=...)` is a context manager:
- the lock file is opened with O_NOFOLLOW (a planted link is refused, never truncated through);
- flock, so the kernel drops the lock when the holder dies, even on kill -9; a lock file left by
  a dead run is therefore stale by construction and simply taken over;
- the holder writes `record` (its pid, ...) into the file, so a refused run can say who holds it
  (`busy(holder_text)` builds that error);
- with `on_wait`, a busy lock is waited for instead (after `on_wait(holder_text)` says so);
- on release the file is removed. Because removal lets a new file appear under the same name,
  acquiring checks that the locked file is still the one at `path` and retries otherwise — the
  usual flock-and-unlink protocol, so two runs never both hold "the" lock.

Used for every output (`core.outputs.OutputGuard`), a release folder and the imatrix cache.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import Any, Callable, IO

from apex_orch.core.errors import ApexError
from apex_orch.core.safefiles import open_nofollow
from apex_orch.core.translate import translate_os_error


class FileLock:
    def __init__(self, path: Path, *, record: str, busy: Callable[[str], ApexError],
                 on_wait: Callable[[str], None] | None = None):
        self.path = Path(path)
        self.record = record
        self.busy = busy
        self.on_wait = on_wait
        self._fh: IO[Any] | None = None

    def __enter__(self) -> "FileLock":
        while True:
            try:
                fh = open_nofollow(self.path, "lock")
            except OSError as exc:
                raise translate_os_error(exc, self.path) from None
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                fh.seek(0)
                holder = fh.read().strip()
                if self.on_wait is None:
                    fh.close()
                    raise self.busy(holder) from None
                self.on_wait(holder)
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            if self._still_at_path(fh):
                break
            fh.close()          # the holder removed the file we waited on: lock the new one
        fh.seek(0)
        fh.truncate()
        fh.write(self.record)
        fh.flush()
        self._fh = fh
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fh is None:
            return
        try:
            if self._still_at_path(self._fh):
                self.path.unlink(missing_ok=True)
        finally:
            fcntl.flock(self._fh.fileno(), fcntl.LOCK_UN)
            self._fh.close()
            self._fh = None

    def _still_at_path(self, fh: IO[Any]) -> bool:
        try:
            now = os.stat(self.path, follow_symlinks=False)
        except FileNotFoundError:
            return False
        mine = os.fstat(fh.fileno())
        return (now.st_dev, now.st_ino) == (mine.st_dev, mine.st_ino)
