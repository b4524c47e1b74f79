"""Load the llama-cpp-python bindings against the pinned, shared libllama.

The bindings are installed with -DLLAMA_BUILD=OFF (no second compile), so they need
LLAMA_CPP_LIB_PATH to find libllama; we set it here (apex_orch.core.settings), before the
first import, so users never have to. libggml is found through libllama's RUNPATH.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
from pathlib import Path
from typing import IO, Iterator

from apex_orch.core import settings
from apex_orch.core.errors import ToolNotFoundError
from apex_orch.llama import pin
from apex_orch.llama.tools import find_libllama


def load_llama_cpp(bin_dir: str | os.PathLike | None = None):
    """Import and return the `llama_cpp` module bound to our libllama."""
    if "llama_cpp" in sys.modules:
        return sys.modules["llama_cpp"]
    lib = find_libllama(bin_dir)
    settings.export_llama_cpp_lib_path(lib.parent)
    try:
        import llama_cpp  # noqa: PLC0415 - import must follow the env var
    except ImportError as exc:
        raise ToolNotFoundError(
            f"llama-cpp-python bindings cannot be imported: {exc}",
            hint=f"run `{pin.setup_command('bindings')}` (installs them against the pinned libllama)",
        ) from exc
    except (OSError, RuntimeError, FileNotFoundError) as exc:
        raise ToolNotFoundError(
            f"llama-cpp-python could not load libllama from {lib.parent}: {exc}",
            hint=f"rebuild with `{pin.setup_command()}` and reinstall the bindings with "
                 f"`{pin.setup_command('bindings')}`",
        ) from exc
    return llama_cpp


def loaded_libllama() -> Path | None:
    """Path of the libllama the bindings actually loaded (from /proc/self/maps on Linux)."""
    maps = Path("/proc/self/maps")
    if not maps.exists():
        return None
    for line in maps.read_text().splitlines():
        if line.endswith("libllama.so") or "/libllama.so" in line:
            return Path(line.split()[-1]).resolve()
    return None


@contextlib.contextmanager
def stderr_to(fh: IO[bytes]) -> Iterator[None]:
    """Point file descriptor 2 (what libllama writes to) at `fh` for the duration, and sys.stderr
    (what the bindings' own log callback prints to) at a buffer whose text is added to `fh` after."""
    try:
        sys.stderr.flush()
    except (AttributeError, ValueError):
        pass
    saved = os.dup(2)
    printed = io.StringIO()
    try:
        os.dup2(fh.fileno(), 2)
        with contextlib.redirect_stderr(printed):
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        fh.write(printed.getvalue().encode("utf-8", "replace"))
