"""The one pinned llama.cpp: the tree vendored in the llama-cpp-python sdist.

Standard library only (the build step imports this before anything is installed).
Changing any value here changes the cache key, so the next build starts fresh.
"""

from __future__ import annotations

import os
from pathlib import Path

LLAMA_CPP_PYTHON_VERSION = "0.3.36"
SDIST_NAME = f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}.tar.gz"
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"

# Targets every apex-orch command may need.
TOOL_TARGETS = ("llama-quantize", "llama-imatrix", "llama-perplexity", "llama-gguf-split")

# Configure flags: shared libs (the bindings reuse libllama), nothing that downloads.
CMAKE_FLAGS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DBUILD_SHARED_LIBS=ON",
    "-DLLAMA_CURL=OFF",
    "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_SERVER=OFF",
    "-DLLAMA_LLGUIDANCE=OFF",
    "-DGGML_CPU_KLEIDIAI=OFF",
)

# The llama.cpp commit that sdist vendors (its CHANGELOG: "update llama.cpp to ggml-org/llama.cpp@...");
# `make llama` checks the unpacked CHANGELOG agrees, so this line cannot drift from the pin.
LLAMA_CPP_COMMIT = "0c1e57098"

PIN_KEY = f"llama-cpp-python-{LLAMA_CPP_PYTHON_VERSION}-{SDIST_SHA256[:12]}"


def cache_root() -> Path:
    """User cache folder (XDG), overridable with APEX_ORCH_CACHE."""
    explicit = os.environ.get("APEX_ORCH_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "apex-orch"


def pin_dir() -> Path:
    """Everything built from the pin lives here: sdist tree, build, bin."""
    return cache_root() / PIN_KEY


def sdist_tree() -> Path:
    return pin_dir() / f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}"


def llama_source() -> Path:
    return sdist_tree() / "vendor" / "llama.cpp"


def build_dir() -> Path:
    return pin_dir() / "build"


def bin_dir() -> Path:
    """llama.cpp's CMake puts executables and shared libraries in build/bin."""
    return build_dir() / "bin"


def build_info_path() -> Path:
    return pin_dir() / "build-info.json"
