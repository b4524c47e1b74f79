"""The one pinned llama.cpp: the tree vendored in the llama-cpp-python sdist.

Standard library only (the build step imports this before anything is installed).
Changing any value here changes the cache key, so the next build starts fresh.
"""

from __future__ import annotations

import hashlib
import shlex
from pathlib import Path

from apex_orch.core import settings

LLAMA_CPP_PYTHON_VERSION = "0.3.36"
SDIST_NAME = f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}.tar.gz"
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"

# Targets every apex-orch command may need: llama-bench for the speed the community quotes
# (pp512/tg128), llama-speculative-simple to prove an MTP head drafts (it links only llama-common
# and llama; llama-cli would pull in the server, whose build downloads a web UI).
TOOL_TARGETS = ("llama-quantize", "llama-imatrix", "llama-perplexity", "llama-gguf-split", "llama-bench",
                "llama-speculative-simple")

# Configure flags: shared libs (the bindings reuse libllama), nothing that downloads.
CMAKE_FLAGS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DBUILD_SHARED_LIBS=ON",
    "-DLLAMA_CURL=OFF",
    "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=ON",      # configured, never built whole: only TOOL_TARGETS are
    "-DLLAMA_BUILD_SERVER=OFF",
    "-DLLAMA_LLGUIDANCE=OFF",
    "-DGGML_CPU_KLEIDIAI=OFF",
)

# The llama.cpp commit that sdist vendors (its CHANGELOG: "update llama.cpp to ggml-org/llama.cpp@...");
# `make llama` checks the unpacked CHANGELOG agrees, so this line cannot drift from the pin.
LLAMA_CPP_COMMIT = "0c1e57098"

PIN_KEY = f"llama-cpp-python-{LLAMA_CPP_PYTHON_VERSION}-{SDIST_SHA256[:12]}"


def in_source_checkout() -> bool:
    """True when apex_orch runs from the project's checkout (the Makefile's world), not a wheel."""
    repo = settings.PACKAGE_DIR.parent
    return all((repo / name).is_file() for name in ("pyproject.toml", "Makefile", "apex_orch/llama/build.py"))


def setup_command(step: str = "llama") -> str:
    """What a user runs to build `step` ("llama" or "bindings"): make in a checkout, else the CLI."""
    return f"make {step}" if in_source_checkout() else f"apex-orch build {step}"


def pin_dir() -> Path:
    """Everything built from the pin lives here: sdist tree, builds, bin."""
    return settings.build_root() / PIN_KEY


def sdist_tree() -> Path:
    return pin_dir() / f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}"


def llama_source() -> Path:
    return sdist_tree() / "vendor" / "llama.cpp"


def parse_extra_cmake_args(text: str | None) -> tuple[str, ...]:
    """User CMake flags for their own build (e.g. "-DGGML_CUDA=ON"), from LLAMA_CMAKE_ARGS or --cmake-arg."""
    args = tuple(shlex.split(text or ""))
    for arg in args:
        if not arg.startswith("-D") or "=" not in arg:
            raise ValueError(f"LLAMA_CMAKE_ARGS: {arg!r} is not a -DNAME=VALUE cache entry")
    return args


def variant_key(extra_args: tuple[str, ...]) -> str:
    """Build folder name: "build" for the plain pin, "build-<hash>" when extra flags are given,
    so a CUDA build and a CPU build of the same pin never overwrite each other."""
    if not extra_args:
        return "build"
    return "build-" + hashlib.sha256("\0".join(extra_args).encode()).hexdigest()[:12]


def active_build_file() -> Path:
    """Names the build variant the last `make llama` / `apex-orch build` produced."""
    return pin_dir() / "active-build"


def build_dir(extra_args: tuple[str, ...] | None = None) -> Path:
    """The build folder of the given flags, or (None) of the active variant."""
    if extra_args is not None:
        return pin_dir() / variant_key(extra_args)
    try:
        name = active_build_file().read_text().strip()
    except OSError:
        name = ""
    # Only our own variant names are followed: the file cannot point outside the pin folder.
    if name == "build" or (name.startswith("build-") and name[6:].isalnum() and len(name) == 18):
        return pin_dir() / name
    return pin_dir() / "build"


def bin_dir() -> Path:
    """llama.cpp's CMake puts executables and shared libraries in build/bin."""
    return build_dir() / "bin"


def build_info_path(extra_args: tuple[str, ...] | None = None) -> Path:
    return build_dir(extra_args) / "build-info.json"
