"""llama.cpp binaries: discovery, build info, and the one subprocess runner.

Discovery order for each tool: an explicit `bin_dir` argument > the configured folder
(the --llama-bin-dir option, held here for one command by `llama_bin_dir_option`, else
$APEX_LLAMA_BIN_DIR) > the pinned build cache > PATH.

Every subprocess apex-orch starts, the build's cmake and pip included, is started in this module
(the only one that imports subprocess; tests/test_no_shell_strings.py checks it), always from an
argument list (never a shell string), always with settings.child_environment (no credentials):
- `run_tool`: a tool run to completion, output streamed to a log file and to a per-line callback,
  a non-zero exit / signal / timeout raised as a typed error with the log tail;
- `capture_tool`: a short probe whose output is read back (a `--version`, `pip show`, a throw-away
  Python that loads the bindings), its exit status returned, not raised;
- `start_worker`: a long-lived helper process spoken to over pipes (the chat-template renderer).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import threading
import time
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

from apex_orch.core import settings
from apex_orch.core.errors import ApexError, InterruptedRun, ToolFailedError, ToolNotFoundError, ToolTimeoutError
from apex_orch.core.infiles import read_json
from apex_orch.llama import pin


@dataclass(frozen=True)
class ToolLocation:
    name: str
    path: Path
    # "flag" (a bin_dir argument), "env" (the configured folder: --llama-bin-dir or
    # $APEX_LLAMA_BIN_DIR; users and tests know it by this label), "cache", "PATH"
    source: str


# The global --llama-bin-dir option of the command being run. A module value, not a ContextVar:
# parallel quantize jobs look their tools up from worker threads.
_bin_dir_option: Path | None = None


@contextmanager
def llama_bin_dir_option(folder: Path | None) -> Iterator[None]:
    """Look tools and libllama up in `folder` (the --llama-bin-dir option) while the block runs, in
    place of $APEX_LLAMA_BIN_DIR; the previous value comes back afterwards, so in-process callers
    (tests, embedding programs) see no leftover."""
    global _bin_dir_option
    previous, _bin_dir_option = _bin_dir_option, folder
    try:
        yield
    finally:
        _bin_dir_option = previous


def configured_bin_dir() -> Path | None:
    """The folder the user named for llama.cpp: --llama-bin-dir, else $APEX_LLAMA_BIN_DIR."""
    return _bin_dir_option or settings.llama_bin_dir()


def _candidates(bin_dir: str | os.PathLike | None) -> list[tuple[str, Path | None]]:
    out: list[tuple[str, Path | None]] = []
    if bin_dir:
        out.append(("flag", Path(bin_dir)))
    configured = configured_bin_dir()
    if configured:
        out.append(("env", configured))
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
        if candidate.is_file():
            # Present but not runnable: say so (not "not found"), and never fall through to another build.
            mode = candidate.stat().st_mode & 0o7777
            raise ToolNotFoundError(
                f"{name} at {candidate} ({source}) is not executable (mode {mode:04o})",
                hint=f"make it executable (chmod +x {candidate}), or run `{pin.setup_command('llama')}` "
                     "to rebuild the pinned llama.cpp")
        if source in ("flag", "env"):
            # An explicit location that lacks the tool is a mistake worth stopping on,
            # not a reason to silently pick some other build.
            break
    else:
        on_path = shutil.which(name)
        searched.append("PATH")
        if on_path:
            return ToolLocation(name, Path(on_path), "PATH")
    target = pin.setup_command("llama")
    raise ToolNotFoundError(
        f"{name} not found; searched: " + ", ".join(searched),
        hint=f"run `{target}` to build the pinned llama.cpp, or point APEX_LLAMA_BIN_DIR at a folder that "
             f"holds {name}", options=("llama_bin_dir",),
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
        hint=f"run `{pin.setup_command()}` to build the pinned llama.cpp with shared libraries",
    )


def build_info() -> dict:
    """What build-info.json (written by `make llama`) says about the cached build."""
    path = pin.build_info_path()
    if not path.exists():
        return {}
    try:
        info = read_json(path, "record")
    except ApexError:   # damaged: no build info (doctor says the build is not the pinned one)
        return {}
    return info if isinstance(info, dict) else {}


def build_label() -> str:
    """Short, stable identifier of the llama.cpp build for manifests and metadata."""
    return (f"llama.cpp@{pin.LLAMA_CPP_COMMIT} (llama-cpp-python-{pin.LLAMA_CPP_PYTHON_VERSION} "
            f"sdist {pin.SDIST_SHA256[:12]})")


# --------------------------------------------------------------------------- runner

@dataclass
class ToolResult:
    args: list[str]
    returncode: int
    seconds: float
    log_path: Path | None
    tail: list[str] = field(default_factory=list)


LineCallback = Callable[[str], None]

# Why a tool may die by a signal it did not send itself, said in words.
SIGNAL_HINTS = {
    "SIGKILL": "killed from outside: often the out-of-memory killer (see `dmesg`); lower -j or use a "
               "machine with more RAM",
    "SIGXFSZ": "the file size limit (`ulimit -f`) was reached while writing; raise it or write elsewhere",
    "SIGSEGV": "the tool crashed; the log tail shows how far it got",
    "SIGABRT": "the tool aborted (a failed assertion); the log tail shows why",
    "SIGBUS": "the tool crashed reading a memory-mapped file (a file truncated or changed while in use?)",
}


def mask_secrets(text: str, secrets: Iterable[str] = ()) -> str:
    """`text` with every credential value (settings.SECRET_ENV_VARS of this process, plus `secrets`)
    replaced by ***: the one masking of tool logs and of the CLI's error text. Values shorter than
    4 characters are left alone (masking them would garble every line); longest first, so a secret
    that contains another is masked whole."""
    for s in sorted({*settings.secret_values(), *secrets}, key=len, reverse=True):
        if s and len(s) >= 4:
            text = text.replace(s, "***")
    return text


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
    The child never sees credential variables (settings.SECRET_ENV_VARS); their values and
    `secrets` are masked in the log and in error text. A log that cannot be written
    (disk full) is noted in the error, never raised over the tool's own result.
    """
    if isinstance(args, (str, bytes)):
        raise TypeError("run_tool takes an argument list, never a shell string")
    argv = [os.fspath(a) for a in args]
    label = what or Path(argv[0]).name
    extra_secrets = [*secrets, *settings.secret_values(env or {})]
    log = _Log(log_path)
    tail: deque[str] = deque(maxlen=tail_lines)
    start = time.monotonic()
    log.write("$ " + mask_secrets(" ".join(argv), extra_secrets) + "\n")
    log.flush()
    try:
        proc = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=settings.child_environment(env), cwd=cwd, start_new_session=True, bufsize=0,
        )
    except OSError as exc:   # missing, not executable, wrong format
        log.close()
        raise ToolNotFoundError(f"cannot start {label}: {exc.strerror}: {argv[0]}",
                                hint=f"run `{pin.setup_command()}` or check the llama.cpp folder",
                                options=("llama_bin_dir",)) from exc

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
                line = mask_secrets(raw.decode("utf-8", errors="replace"), extra_secrets)
                tail.append(line)
                log.write(line + "\n")
                if on_line:
                    on_line(line)
            log.flush()
        if pending:
            line = mask_secrets(pending.decode("utf-8", errors="replace"), extra_secrets)
            tail.append(line)
            log.write(line + "\n")
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
        log.close()

    seconds = time.monotonic() - start
    tail_text = "\n".join(tail)
    if log.error:
        tail_text += f"\n(apex-orch could not write the log {log_path}: {log.error})"
    if timed_out.is_set():
        raise ToolTimeoutError(f"{label} ran past the {timeout:g} s timeout and was stopped",
                               returncode=returncode, log_path=log_path, log_tail=tail_text,
                               hint="allow more time, or check the log for a hang", options=("timeout",))
    if returncode != 0:
        hint = "the tool's log (above) says why"
        if returncode < 0:
            try:
                signame = signal.Signals(-returncode).name
            except ValueError:
                signame = f"signal {-returncode}"
            msg = f"{label} was killed by {signame}"
            hint = SIGNAL_HINTS.get(signame, hint)
        else:
            msg = f"{label} failed with exit code {returncode}"
        raise ToolFailedError(msg, returncode=returncode, log_path=log_path, log_tail=tail_text, hint=hint)
    return ToolResult(argv, returncode, seconds, log_path, list(tail))


@dataclass
class CapturedRun:
    args: list[str]
    returncode: int
    stdout: str
    stderr: str


def capture_tool(args: Sequence[str | os.PathLike], *, timeout: float, env: dict | None = None,
                 what: str | None = None) -> CapturedRun:
    """Run a short probe to completion and return its exit status and output (text). Raises only
    when it cannot start (ToolNotFoundError) or runs past `timeout` (ToolTimeoutError; it is killed)."""
    if isinstance(args, (str, bytes)):
        raise TypeError("capture_tool takes an argument list, never a shell string")
    argv = [os.fspath(a) for a in args]
    label = what or Path(argv[0]).name
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, errors="replace", timeout=timeout,
                              stdin=subprocess.DEVNULL, env=settings.child_environment(env))
    except subprocess.TimeoutExpired:
        raise ToolTimeoutError(f"{label} ran past the {timeout:g} s timeout and was stopped") from None
    except OSError as exc:
        raise ToolNotFoundError(f"cannot start {label}: {exc.strerror}: {argv[0]}") from None
    return CapturedRun(argv, proc.returncode, mask_secrets(proc.stdout), mask_secrets(proc.stderr))


def start_worker(args: Sequence[str | os.PathLike]) -> subprocess.Popen:
    """A long-lived helper process with binary pipes to its stdin and stdout (stderr discarded),
    in this process's session (Ctrl-C reaches it too). The caller owns it: write requests, read
    answers, and kill() and wait() it when done."""
    if isinstance(args, (str, bytes)):
        raise TypeError("start_worker takes an argument list, never a shell string")
    return subprocess.Popen([os.fspath(a) for a in args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, env=settings.child_environment())


class _Log:
    """The tool's log file. A failing log write (disk full) must not hide the tool's own
    result, so write errors are remembered and logging stops; the tool keeps being drained."""

    def __init__(self, path: Path | None):
        self.error: str | None = None
        self._fh = None
        if path is not None:
            from apex_orch.core.safefiles import open_nofollow
            try:   # never through a link planted at the log's name (UnsafeOutputError, before the tool starts)
                self._fh = open_nofollow(path, "w")
            except OSError as exc:
                self.error = exc.strerror or str(exc)

    def _guard(self, op) -> None:
        if self._fh is None:
            return
        try:
            op(self._fh)
        except OSError as exc:
            self.error = exc.strerror or str(exc)
            self.close()

    def write(self, text: str) -> None:
        self._guard(lambda fh: fh.write(text))

    def flush(self) -> None:
        self._guard(lambda fh: fh.flush())

    def close(self) -> None:
        fh, self._fh = self._fh, None
        if fh is not None:
            try:
                fh.close()
            except OSError as exc:
                self.error = self.error or exc.strerror or str(exc)
