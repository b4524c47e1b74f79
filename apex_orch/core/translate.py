"""Foreign exceptions as the project's errors: one table, one wording per failure.

Three families of exceptions reach apex-orch from code it does not own: OSError from the file
system, yaml.YAMLError from config files, and huggingface_hub's errors from downloads. The code
that meets one knows what it was doing (the path, the config, the repo) and asks this module
for the ApexError to raise, so a full disk or a file the Hub cannot serve reads the same
wherever it happens, and the exit code follows the kind of failure.

Every function returns the error (or None: "not one of ours, re-raise it"); the caller raises
it, `raise translate_os_error(exc, path) from None`, so a traceback (--debug) shows the line
that met the failure. yaml and huggingface_hub are never imported here: an exception of theirs
exists only once its module is loaded, so it is looked up in sys.modules (huggingface_hub
costs a second to import; the CLI's start-up must not pay for it).
"""

from __future__ import annotations

import errno
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from apex_orch.core.errors import ApexError, ConfigError, DiskSpaceError, FileSystemError, OutputNotWritableError

# --------------------------------------------------------------------------- the file system

@dataclass(frozen=True)
class _WriteFailure:
    """How one errno met while writing reads. Message fields: {verb} ("cannot write", or "cannot
    create" for a folder), {access} ("cannot access", or "cannot create"), {where}, {reason}."""
    error: type[ApexError]
    message: str
    hint: str
    options: tuple[str, ...] = ("out_dir", "out")   # the parameters that choose another place


_DISK_FULL = _WriteFailure(DiskSpaceError, "the disk is full: {verb} {where} ({reason})",
                           "free some space or write to another folder, then rerun")
_NO_PERMISSION = _WriteFailure(OutputNotWritableError, "{access} {where}: {reason}",
                               "fix the permissions, or choose another output folder")

WRITE_FAILURES: dict[int, _WriteFailure] = {
    errno.ENOSPC: _DISK_FULL,
    errno.EDQUOT: _DISK_FULL,
    errno.EFBIG: _WriteFailure(DiskSpaceError,
                               "file too large: {verb} {where} ({reason}; a file size limit, `ulimit -f`?)",
                               "raise the file size limit or write to another file system"),
    errno.EROFS: _WriteFailure(OutputNotWritableError, "{verb} {where}: {reason}",
                               "choose another output folder, on a writable file system"),
    errno.EACCES: _NO_PERMISSION,
    errno.EPERM: _NO_PERMISSION,
    errno.ENAMETOOLONG: _WriteFailure(FileSystemError, "{verb} {where}: {reason} (file systems allow 255 bytes "
                                      "per name)",
                                      "use a shorter name (a tier, the model's, the output file or folder)",
                                      ("name", "out", "out_dir")),
}


def translate_os_error(exc: OSError, path: Path | str | None = None, *, creating: bool = False) -> ApexError:
    """An OSError met while writing outputs (or one no layer translated, in the CLI), as one
    actionable ApexError: WRITE_FAILURES by errno, else a FileSystemError naming the path (so every
    OSError ends with a code of the exit-code table)."""
    where = str(path or exc.filename or "")
    failure = WRITE_FAILURES.get(exc.errno) if exc.errno is not None else None
    if failure is not None:
        return failure.error(failure.message.format(
            verb="cannot create" if creating else "cannot write",
            access="cannot create" if creating else "cannot access",
            where=where, reason=exc.strerror), hint=failure.hint, options=failure.options)
    return FileSystemError(f"{exc.strerror or exc}: {where}" if where else f"{exc.strerror or exc}",
                           hint="check that path and its file system, then rerun")


def translate_read_error(exc: OSError, error_cls: type[ApexError], where: str, *, thing: str = "file") -> ApexError:
    """An OSError met while reading an input `thing` (a config file...), as `error_cls`:
    "<thing> not found" for a missing file, "cannot read <thing>: <reason>" for anything else."""
    if isinstance(exc, FileNotFoundError):
        return error_cls(f"{thing} not found", where=where)
    return error_cls(f"cannot read {thing}: {exc.strerror}", where=where)


# --------------------------------------------------------------------------- YAML

def translate_yaml_error(exc: Exception, path: Path, error_cls: type[ApexError]) -> ApexError | None:
    """A yaml.YAMLError met parsing the config at `path`, as `error_cls` at the line it points to;
    None when `exc` is not a YAML error."""
    yaml = sys.modules.get("yaml")
    if yaml is None or not isinstance(exc, yaml.YAMLError):
        return None
    mark = getattr(exc, "problem_mark", None)
    where = f"{path}:{mark.line + 1}" if mark else str(path)
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    return error_cls(f"malformed YAML: {problem}", where=where,
                     hint="check indentation and quoting around that line")


# --------------------------------------------------------------------------- Hugging Face Hub

def _hub_errors() -> Any:
    """huggingface_hub.errors if something already imported it (then its exceptions can exist)."""
    return sys.modules.get("huggingface_hub.errors")


def is_hub_not_cached(exc: BaseException) -> bool:
    """The file is not in the local Hugging Face cache, and the Hub could not (or may not,
    HF_HUB_OFFLINE) be asked for it."""
    hub = _hub_errors()
    return hub is not None and isinstance(exc, (hub.LocalEntryNotFoundError, hub.OfflineModeIsEnabled))


def is_hub_missing_revision(exc: BaseException) -> bool:
    """The Hub says the revision or file does not exist (e.g. a new, empty repo)."""
    hub = _hub_errors()
    return hub is not None and isinstance(exc, (hub.RevisionNotFoundError, hub.EntryNotFoundError))


def translate_hub_download_error(exc: BaseException, *, label: str, where: str | None, not_cached: str,
                                 not_cached_hint: str, failed_hint: str) -> ConfigError | None:
    """A huggingface_hub download failure of `label` (repo@revision[/file]) as a ConfigError:
    `not_cached` (the whole message) when the file is not in the cache and the Hub cannot be
    asked, "<label>: download failed: <the Hub's answer>" when the Hub refused; None otherwise."""
    hub = _hub_errors()
    if hub is None:
        return None
    if is_hub_not_cached(exc):
        return ConfigError(not_cached, where=where, hint=not_cached_hint)
    if isinstance(exc, hub.HfHubHTTPError):
        return ConfigError(f"{label}: download failed: {exc}", where=where, hint=failed_hint)
    return None
