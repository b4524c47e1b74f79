"""llama.cpp binaries: discovery, build info, and the one subprocess runner.

Discovery order for each tool: explicit --llama-bin-dir > $APEX_LLAMA_BIN_DIR >
the pinned build cache > PATH. Every subprocess apex-orch starts goes through
`run_tool`: an argument list (never a shell string), output streamed to a log file
and to a per-line callback, non-zero exit / signal / timeout raised as a typed error
with the log tail.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

from apex_orch import pin
from apex_orch.errors import InterruptedRun, ToolFailedError, ToolNotFoundError, ToolTimeoutError

TOOL_MAKE_TARGET = {
    "llama-quantize": "make llama",
    "llama-imatrix": "make llama",
    "llama-perplexity": "make llama",
    "llama-gguf-split": "make llama",
}


@dataclass(frozen=True)
class ToolLocation:
    name: str
    path: Path
    source: str  # "flag", "env", "cache", "PATH"


def _candidates(bin_dir: str | os.PathLike | None) -> list[tuple[str, Path | None]]:
    out: list[tuple[str, Path | None]] = []
    if bin_dir:
        out.append(("flag", Path(bin_dir)))
    env = os.environ.get("APEX_LLAMA_BIN_DIR")
    if env:
        out.append(("env", Path(env)))
    out.append(("cache", pin.bin_dir()))
    return out


def find_tool(name: str, bin_dir: str | os.PathLike | None = None) -> ToolLocation:
    """Locate a llama.cpp binary or raise ToolNotFoundError naming every place searched."""
    searched: list[str] = []
    for source, folder in _candidates(bin_dir):
        candidate = folder / name
        searched.append(f"{candidate} ({source})")
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return ToolLocation(name, candidate, source)
        if source in ("flag", "env"):
            # An explicit location that lacks the tool is a mistake worth stopping on,
            # not a reason to silently pick some other build.
            break
    else:
        on_path = shutil.which(name)
        searched.append("PATH")
        if on_path:
            return ToolLocation(name, Path(on_path), "PATH")
    target = TOOL_MAKE_TARGET.get(name, "make llama")
    raise ToolNotFoundError(
        f"{name} not found; searched: " + ", ".join(searched),
        hint=f"run `{target}` to build the pinned llama.cpp, or point --llama-bin-dir / "
             f"APEX_LLAMA_BIN_DIR at a folder that holds {name}",
    )


def find_libllama(bin_dir: str | os.PathLike | None = None) -> Path:
    """The libllama shared library apex-orch will load into the bindings."""
    searched = []
    for source, folder in _candidates(bin_dir):
        for libname in ("libllama.so", "libllama.dylib", "llama.dll"):
            candidate = folder / libname
            searched.append(str(candidate))
            if candidate.is_file():
                return candidate
        if source in ("flag", "env"):
            break
    raise ToolNotFoundError(
        "libllama not found; searched: " + ", ".join(searched),
        hint="run `make llama` to build the pinned llama.cpp with shared libraries",
    )


def build_info() -> dict:
    """What build-info.json (written by `make llama`) says about the cached build."""
    path = pin.build_info_path()
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def build_label() -> str:
    """Short, stable identifier of the llama.cpp build for manifests and metadata."""
    return f"llama.cpp@llama-cpp-python-{pin.LLAMA_CPP_PYTHON_VERSION}+sdist.{pin.SDIST_SHA256[:12]}"


# --------------------------------------------------------------------------- runner

@dataclass
class ToolResult:
    args: list[str]
    returncode: int
    seconds: float
    log_path: Path | None
    tail: list[str] = field(default_factory=list)


LineCallback = Callable[[str], None]

# Children currently running, so an interrupt in the main thread can stop tools that
# worker threads are waiting on (parallel quantize jobs).
_ACTIVE: set[subprocess.Popen] = set()
_ACTIVE_LOCK = threading.Lock()


def terminate_all() -> None:
    """Stop every running tool (used on SIGINT/SIGTERM with parallel jobs)."""
    with _ACTIVE_LOCK:
        procs = list(_ACTIVE)
    for proc in procs:
        _terminate(proc, grace=2.0)


def _terminate(proc: subprocess.Popen, grace: float = 5.0) -> None:
    """Stop the child's whole process group: TERM, then KILL after a grace period."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except (ProcessLookupError, PermissionError):
        return
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


def run_tool(
    args: Sequence[str | os.PathLike],
    *,
    log_path: Path | None = None,
    on_line: LineCallback | None = None,
    timeout: float | None = None,
    env: dict | None = None,
    cwd: Path | None = None,
    tail_lines: int = 30,
    what: str | None = None,
    secrets: Iterable[str] = (),
) -> ToolResult:
    """Run one tool to completion. stdout and stderr are merged (llama.cpp logs to stderr).

    Raises ToolFailedError (non-zero exit or signal), ToolTimeoutError, InterruptedRun
    (KeyboardInterrupt / SIGTERM delivered to us: the child is stopped first).
    `secrets` are masked in the log and in error text.
    """
    argv = [os.fspath(a) for a in args]
    if isinstance(args, (str, bytes)):
        raise TypeError("run_tool takes an argument list, never a shell string")
    label = what or Path(argv[0]).name
    masks = [s for s in secrets if s]

    def mask(text: str) -> str:
        for s in masks:
            text = text.replace(s, "***")
        return text

    log_fh = open(log_path, "w", encoding="utf-8", errors="replace") if log_path else None
    tail: deque[str] = deque(maxlen=tail_lines)
    start = time.monotonic()
    try:
        if log_fh:
            log_fh.write("$ " + mask(" ".join(argv)) + "\n")
            log_fh.flush()
        proc = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=env, cwd=cwd, start_new_session=True, bufsize=0,
        )
    except FileNotFoundError as exc:
        if log_fh:
            log_fh.close()
        raise ToolNotFoundError(f"cannot start {label}: {exc.strerror}: {argv[0]}",
                                hint="run `make llama` or check --llama-bin-dir") from exc

    with _ACTIVE_LOCK:
        _ACTIVE.add(proc)
    timed_out = threading.Event()
    timer = None
    if timeout:
        def on_timeout() -> None:
            timed_out.set()
            _terminate(proc, grace=2.0)
        timer = threading.Timer(timeout, on_timeout)
        timer.daemon = True
        timer.start()

    try:
        assert proc.stdout is not None
        pending = b""
        while True:
            chunk = proc.stdout.read(65536)
            if not chunk:
                break
            pending += chunk
            # llama.cpp writes records with \n; progress dots arrive without one.
            *lines, pending = pending.split(b"\n")
            for raw in lines:
                line = mask(raw.decode("utf-8", errors="replace"))
                tail.append(line)
                if log_fh:
                    log_fh.write(line + "\n")
                if on_line:
                    on_line(line)
            if log_fh:
                log_fh.flush()
        if pending:
            line = mask(pending.decode("utf-8", errors="replace"))
            tail.append(line)
            if log_fh:
                log_fh.write(line + "\n")
            if on_line:
                on_line(line)
        returncode = proc.wait()
    except BaseException as exc:
        _terminate(proc)
        if isinstance(exc, (KeyboardInterrupt, InterruptedRun)):
            raise InterruptedRun(f"{label} interrupted; it was stopped",
                                 hint="rerun the same command to start again") from None
        raise
    finally:
        with _ACTIVE_LOCK:
            _ACTIVE.discard(proc)
        if timer:
            timer.cancel()
        if log_fh:
            log_fh.close()

    seconds = time.monotonic() - start
    tail_text = "\n".join(tail)
    if timed_out.is_set():
        raise ToolTimeoutError(f"{label} ran past the {timeout:g} s timeout and was stopped",
                               returncode=returncode, log_path=log_path, log_tail=tail_text,
                               hint="raise --timeout, or check the log for a hang")
    if returncode != 0:
        if returncode < 0:
            try:
                signame = signal.Signals(-returncode).name
            except ValueError:
                signame = f"signal {-returncode}"
            msg = f"{label} was killed by {signame}"
        else:
            msg = f"{label} failed with exit code {returncode}"
        raise ToolFailedError(msg, returncode=returncode, log_path=log_path, log_tail=tail_text,
                              hint="the log tail above says why")
    return ToolResult(argv, returncode, seconds, log_path, list(tail))
