"""Every input file is opened one way: a regular file, within its kind's size, never blocking.

A path the user gives (a model, an imatrix, a text, a sensitivity result, a config, a tensor-type
file) and a result apex-orch reads back (a manifest, a cache entry, a record) is opened here and
nowhere else (tests/test_input_files.py walks the CLI and the source to prove it):

- opened with O_NONBLOCK, so a FIFO given as a path never blocks the open (`--dry-run` included);
- then fstat: anything but a regular file (a FIFO, a socket, a device such as /dev/zero) is refused
  with the kind's own error and exit code, before a byte is read;
- a size bound per kind (`KINDS`, stated in docs/reliability.md): a file over it is refused before it
  is read, and a reader never takes more than the bound even if the file grows meanwhile;
- JSON is read with a bound on its size and on its nesting (`read_json`), so a damaged or hostile
  file is one error, never a RecursionError or a MemoryError.

`open_input` gives the open file (for readers that stream or map it: GGUF headers, imatrix tensors,
corpus sources); `read_input` its bytes; `read_json` its JSON; `check_input` only the checks (for a
path handed to a llama.cpp tool, which opens it itself).
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Iterator

from apex_orch.core.errors import (ApexError, ConfigError, EvalError, ImatrixError, ManifestError, ModelError,
                                   ProfileError, ResultFileError, TaskError)

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
MAX_JSON_DEPTH = 64          # results and records are a few levels deep


@dataclass(frozen=True)
class InputKind:
    name: str
    what: str                       # "evaluation text": how messages name it
    max_bytes: int | None           # None: no bound on the file (read by header or streamed within bounds)
    error: type[ApexError]
    hint: str                       # how to fix a file of the wrong kind


KINDS: dict[str, InputKind] = {k.name: k for k in (
    # A GGUF's header is read by mapping it (a bounded walker); tools read the weights.
    InputKind("model", "GGUF models", None, ModelError,
              "pass the .gguf file itself (a pipe or device would block or change under the tools)"),
    InputKind("imatrix", "importance matrices", 16 * GiB, ImatrixError,
              "pass the .gguf imatrix file llama-imatrix wrote"),
    InputKind("config", "YAML configs (profiles, corpora, releases)", 1 * MiB, ProfileError,
              "pass a .yaml file; configs are a few KB"),
    InputKind("tensor-types", "tensor-type files", 1 * MiB, ProfileError,
              "tensor-type files hold a few dozen PATTERN=TYPE lines; is this the right file?"),
    InputKind("text", "evaluation and measurement texts", 512 * MiB, EvalError,
              "pass a UTF-8 text file (wikitext-2's test set is 1.3 MB); cut a larger one down"),
    InputKind("tasks", "task files", 256 * MiB, TaskError,
              "give a task file in llama.cpp's format (HellaSwag text, Winogrande CSV, multiple-choice binary)"),
    InputKind("checkpoint-config", "Hugging Face checkpoint configs (config.json)", 1 * MiB, ModelError,
              "point the source at a checkpoint folder whose config.json is the model's (a few KB)"),
    InputKind("sensitivity", "sensitivity results", 64 * MiB, ResultFileError,
              "pass the JSON `apex-orch sensitivity -o FILE` wrote (measure again if it was damaged)"),
    # Corpus data files are bounded by what they may hold once read (calibration.sources: per line,
    # per source, after gunzip), not by their compressed size.
    InputKind("corpus-data", "corpus data files", None, ConfigError,
              "point the corpus source at text, JSON or JSONL files"),
    # The base log-probs of an evaluation: chunks x ctx/2 x vocabulary x 2 bytes, checked by their format.
    InputKind("eval-cache", "base log-prob caches", None, EvalError, "delete the file; it will be recomputed"),
    InputKind("record", "records apex-orch wrote (manifests, cache entries, eval records)", 64 * MiB,
              ManifestError, "it cannot be trusted; rerun, forced, to rebuild it"),
)}


def _file_kind(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "FIFO / named pipe"
    if stat.S_ISSOCK(mode):
        return "socket"
    if stat.S_ISCHR(mode):
        return "character device"
    if stat.S_ISBLK(mode):
        return "block device"
    if stat.S_ISDIR(mode):
        return "folder"
    return "special file"


def _kind(kind: str | InputKind) -> InputKind:
    return kind if isinstance(kind, InputKind) else KINDS[kind]


def _where(path: Path) -> str:
    return str(path)


def _open_fd(path: Path, k: InputKind, error: type[ApexError]) -> tuple[int, os.stat_result]:
    """The checks every input gets: it opens (never blocking), it is a regular file within the bound."""
    try:
        # O_NONBLOCK: opening a FIFO for reading would otherwise wait forever for a writer.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise error("file not found", where=_where(path), hint="check the path") from None
    except IsADirectoryError:
        raise error("is a folder, not a file", where=_where(path)) from None
    except PermissionError:
        raise error("permission denied reading the file", where=_where(path)) from None
    except ValueError:   # a NUL byte in the path
        raise error("the path contains a NUL byte; no file can have this name", where=repr(str(path))) from None
    except OSError as exc:   # a name too long, a loop of links, an I/O error...
        raise error(f"cannot open the file: {exc.strerror}", where=_where(path)) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            if stat.S_ISDIR(st.st_mode):
                raise error("is a folder, not a file", where=_where(path))
            raise error(f"is not a regular file (a {_file_kind(st.st_mode)}); apex-orch reads {k.what} from "
                        "regular files only", where=_where(path), hint=k.hint)
        if k.max_bytes is not None and st.st_size > k.max_bytes:
            raise error(f"file is {st.st_size:,} bytes; {k.what} may hold at most {k.max_bytes:,}",
                        where=_where(path), hint=k.hint)
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd, st


def open_checked(path: str | os.PathLike[str], kind: str | InputKind, *,
                 error: type[ApexError] | None = None) -> BinaryIO:
    """The file opened for reading (binary), after the checks; the caller closes it."""
    k = _kind(kind)
    fd, _st = _open_fd(Path(path), k, error or k.error)
    return os.fdopen(fd, "rb")


@contextlib.contextmanager
def open_input(path: str | os.PathLike[str], kind: str | InputKind, *,
               error: type[ApexError] | None = None) -> Iterator[BinaryIO]:
    """The file opened for reading (binary), after the checks; `error` replaces the kind's class."""
    with open_checked(path, kind, error=error) as fh:
        yield fh


def check_input(path: str | os.PathLike[str], kind: str | InputKind, *, error: type[ApexError] | None = None) -> int:
    """Only the checks (a path a llama.cpp tool opens itself): its size in bytes."""
    k = _kind(kind)
    fd, st = _open_fd(Path(path), k, error or k.error)
    os.close(fd)
    return st.st_size


def read_input(path: str | os.PathLike[str], kind: str | InputKind, *, error: type[ApexError] | None = None) -> bytes:
    """The whole file, at most the kind's bound (a file that grew past it meanwhile is refused too)."""
    k = _kind(kind)
    err = error or k.error
    with open_input(path, k, error=err) as fh:
        try:
            data = fh.read() if k.max_bytes is None else fh.read(k.max_bytes + 1)
        except OSError as exc:
            raise err(f"cannot read the file: {exc.strerror}", where=str(path)) from None
    if k.max_bytes is not None and len(data) > k.max_bytes:
        raise err(f"file grew past {k.max_bytes:,} bytes while it was read; {k.what} may hold at most that",
                  where=str(path), hint=k.hint)
    return data


def read_gguf(path: str | os.PathLike[str], kind: str | InputKind, *, error: type[ApexError] | None = None) -> Any:
    """gguf's GGUFReader over the file opened here (the checks first): the reader maps the open file,
    and the mapping outlives it."""
    from gguf import GGUFReader
    with open_input(path, kind, error=error) as fh:
        return GGUFReader(fh, "r")   # type: ignore[arg-type]   # it maps any file object (gguf types a path)


def holds(path: str | os.PathLike[str], data: bytes | str) -> bool:
    """True when `path` is a regular file whose bytes are `data` (an output apex-orch would write
    again: unchanged, nothing to rewrite); anything else, a FIFO or a link included, is False."""
    want = data.encode("utf-8") if isinstance(data, str) else data
    p = Path(path)
    if p.is_symlink() or not p.is_file():
        return False
    try:
        with open_input(p, InputKind("output", "outputs", len(want), ApexError, "")) as fh:
            return fh.read(len(want) + 1) == want
    except ApexError:
        return False


def json_depth_within(data: object, limit: int = MAX_JSON_DEPTH) -> bool:
    """True when `data` nests at most `limit` containers deep (iterative: no recursion to exhaust)."""
    stack: list[tuple[object, int]] = [(data, 1)]
    while stack:
        value, depth = stack.pop()
        children: Any
        if isinstance(value, dict):
            children = value.values()
        elif isinstance(value, list):
            children = value
        else:
            continue
        if depth > limit:
            return False
        stack.extend((c, depth + 1) for c in children if isinstance(c, (dict, list)))
    return True


def parse_json(raw: bytes, where: str, error: type[ApexError], *, what: str = "JSON",
               hint: str | None = None) -> Any:
    """JSON text -> data, with its nesting bounded; damage is one `error`, never a foreign exception."""
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise error(f"not {what}: not UTF-8 text ({exc.reason} at byte {exc.start})", where=where, hint=hint) from None
    except RecursionError:
        raise error(f"not {what}: nested more than {MAX_JSON_DEPTH} levels deep", where=where, hint=hint) from None
    except ValueError as exc:   # JSONDecodeError: truncated, edited, not JSON
        raise error(f"not {what}: {exc.__class__.__name__}: {exc}", where=where, hint=hint) from None
    if not json_depth_within(data):
        raise error(f"not {what}: nested more than {MAX_JSON_DEPTH} levels deep", where=where, hint=hint)
    return data


def read_json(path: str | os.PathLike[str], kind: str | InputKind, *, error: type[ApexError] | None = None,
              what: str = "JSON") -> Any:
    """A JSON file of this kind: the file checks, then `parse_json`."""
    k = _kind(kind)
    err = error or k.error
    return parse_json(read_input(path, k, error=err), str(path), err, what=what, hint=k.hint)
