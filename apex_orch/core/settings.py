"""Where apex-orch lives and what the environment tells it: the one module that reads it.

Every environment variable apex-orch looks at is read here, by a function named for what it means
(tests/test_foundation.py fails when another module reads os.environ). Nothing is cached: a test or
an embedding program that sets a variable sees the next call follow it. Command-line options never
travel through the environment: they are passed as values to the code that needs them
(apex_orch.llama.tools and apex_orch.plan.profile_search hold the two global options).

Standard library only: `python -m apex_orch.llama.build` imports it before any dependency
is installed.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

# The installed package (apex_orch/); in a checkout its parent is the project root.
PACKAGE_DIR = Path(__file__).resolve().parents[1]

# Credentials no llama.cpp tool needs: removed from every child's environment, and their
# values masked in logs and error text (a tool that echoes its environment cannot leak them).
SECRET_ENV_VARS = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_TOKEN", "HUGGINGFACE_TOKEN")

_TRUE_WORDS = ("1", "true", "yes", "on")


def cache_root() -> Path:
    """User cache folder (XDG), overridable with APEX_ORCH_CACHE: imatrix, eval, corpora, models.

    APEX_ORCH_CACHE: the folder itself. XDG_CACHE_HOME: the user's cache base (default ~/.cache),
    under which apex-orch uses `apex-orch/`.
    """
    explicit = os.environ.get("APEX_ORCH_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "apex-orch"


def build_root() -> Path:
    """Where pinned llama.cpp builds live: APEX_ORCH_BUILD_ROOT, else the cache folder.

    Kept apart from cache_root() so the test suite can give every other cache a fresh
    folder while it reads the one (expensive) build that `make llama` made.
    """
    explicit = os.environ.get("APEX_ORCH_BUILD_ROOT")
    return Path(explicit).expanduser() if explicit else cache_root()


def eval_cache_dir() -> Path:
    """Where base-model log-probs are kept between evaluations: APEX_ORCH_EVAL_CACHE, else <cache>/eval."""
    explicit = os.environ.get("APEX_ORCH_EVAL_CACHE")
    return Path(explicit).expanduser() if explicit else cache_root() / "eval"


def llama_bin_dir() -> Path | None:
    """APEX_LLAMA_BIN_DIR: a folder holding the user's own llama.cpp tools and libllama, searched
    before the pinned build (the --llama-bin-dir option, passed as a value, takes its place)."""
    explicit = os.environ.get("APEX_LLAMA_BIN_DIR")
    return Path(explicit) if explicit else None


def llama_cmake_args() -> str:
    """LLAMA_CMAKE_ARGS: extra CMake flags for the user's own llama.cpp build (e.g. "-DGGML_CUDA=ON"),
    shell-quoted as one string; "" when unset (apex_orch.llama.pin parses and checks them)."""
    return os.environ.get("LLAMA_CMAKE_ARGS") or ""


def user_profile_dirs() -> list[Path]:
    """APEX_ORCH_PROFILES: the user's own profile folders (os.pathsep-separated), searched before
    the built-ins; the --profiles-dir options are added in front by apex_orch.plan.profile_search."""
    explicit = os.environ.get("APEX_ORCH_PROFILES", "")
    return [Path(part).expanduser() for part in explicit.split(os.pathsep) if part.strip()]


def debug() -> bool:
    """APEX_ORCH_DEBUG (any value but "" or "0"): tracebacks instead of one-line errors, and
    llama.cpp's own log lines from the bindings (the --debug option does the first per command)."""
    return os.environ.get("APEX_ORCH_DEBUG", "") not in ("", "0")


def hf_hub_offline() -> bool:
    """HF_HUB_OFFLINE (1/true/yes/on): huggingface_hub must not reach the network; apex-orch only
    reads it to say why a file missing from the Hugging Face cache could not be downloaded."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE_WORDS


def config_variable(name: str) -> str:
    """The value of a `${NAME}` a release config's path refers to ("" when unset): the user chooses
    the variable (the nightly workflow sets it from the runner's variables)."""
    return os.environ.get(name, "")


def secret_values(environ: Mapping[str, str] | None = None) -> list[str]:
    """Values of the credential variables (SECRET_ENV_VARS) set in `environ` (default: this process)."""
    env = os.environ if environ is None else environ
    return [env[k] for k in SECRET_ENV_VARS if env.get(k)]


def child_environment(base: Mapping[str, str] | None = None, **extra: str) -> dict[str, str]:
    """The environment a child process gets: `base` (default: ours) with `extra` set and the
    credential variables (SECRET_ENV_VARS) removed. Every child's environment is built here."""
    env = dict(os.environ if base is None else base, **extra)
    for key in SECRET_ENV_VARS:
        env.pop(key, None)
    return env


def export_llama_cpp_lib_path(folder: Path) -> None:
    """LLAMA_CPP_LIB_PATH: the folder the llama-cpp-python bindings (installed with -DLLAMA_BUILD=OFF)
    load libllama from. They read it at their first import, in this process, so it is set here
    (the one variable apex-orch sets for itself); a value the user set wins."""
    os.environ.setdefault("LLAMA_CPP_LIB_PATH", str(folder))


def worker_environment(llama_bin_dir_: Path | None = None) -> dict[str, str]:
    """The apex-orch settings in effect, as the variables a worker on another machine (a Ray task)
    must be given to use the same caches and tools as this process: the cache root, the build root,
    the eval cache (absolute: a worker's working folder differs), the llama.cpp folder
    (`llama_bin_dir_`, the --llama-bin-dir value, else $APEX_LLAMA_BIN_DIR) and the user's profile
    folders and debug switch when set. No credential is ever among them."""
    env = {"APEX_ORCH_CACHE": os.path.abspath(cache_root()), "APEX_ORCH_BUILD_ROOT": os.path.abspath(build_root()),
           "APEX_ORCH_EVAL_CACHE": os.path.abspath(eval_cache_dir())}
    bin_dir = llama_bin_dir_ or llama_bin_dir()
    if bin_dir is not None:
        env["APEX_LLAMA_BIN_DIR"] = os.path.abspath(bin_dir)
    for name in ("APEX_ORCH_PROFILES", "APEX_ORCH_DEBUG"):
        if os.environ.get(name):
            env[name] = os.environ[name]
    return env


def ray_address() -> str | None:
    """RAY_ADDRESS: the Ray cluster `--executor ray` joins (Ray reads it itself; apex-orch only
    names it in messages). None: the cluster `ray start` started on this machine."""
    return os.environ.get("RAY_ADDRESS") or None


def hub_endpoint() -> str | None:
    """HF_ENDPOINT: the Hugging Face Hub (or a mirror) `release --push` talks to; None: huggingface_hub's
    default. Read here and passed to HfApi as a value, because huggingface_hub reads HF_ENDPOINT only
    once, when it is first imported."""
    value = os.environ.get("HF_ENDPOINT", "").strip()
    return value.rstrip("/") or None
