"""Shared pytest fixtures: synthetic GGUF models, an evaluation text, isolation, tool checks.

Models (session-scoped, each written once by `apex_orch.demo.synthetic` into a tmp dir; Path):
- `mistral4_split`       preset "mistral4-split": 12 MLA blocks, 16 experts (2 used), 1 shared
                         expert, split ffn_gate_exps/ffn_up_exps; 207 tensors; F16 + F32.
- `mistral4_fused`       preset "mistral4-fused": same, one ffn_gate_up_exps per block; 195 tensors.
- `mistral4_dense_lead`  preset "mistral4-dense-lead": block 0 dense (ffn_gate/up/down); 203 tensors.
- `qwen3moe`             preset "qwen3moe": GQA (4 heads, 2 KV) + q/k norms, 16 experts, no
                         shared expert; 147 tensors.
- `dense_model`          preset "dense": llama architecture, no experts; 111 tensors.
- `ms4_replica`          header-only Mistral-Small-4-119B-2603 (split, 615 tensors, BF16 weights,
                         sparse data hole ~238 GB apparent); for --dry-run / planning only.
All presets use the llama-spm tokenizer (32000 tokens) and load in the pinned llama.cpp.

Text:
- `eval_text`            Path of a deterministic ~20k-word English-like text
                         (`apex_orch.demo.synthetic.demo_text()`), enough for llama-perplexity /
                         llama-imatrix with any -c up to ~4096 and several chunks.

Isolation (set in pytest_configure, before collection): the whole suite runs with HOME and the XDG
folders (cache, config, data, state) in a throwaway folder, and every cache the suite touches —
models, imatrix, eval base log-probs, corpora, downloads, the Hugging Face cache — in a fresh
per-session folder (APEX_ORCH_CACHE, HF_HOME). Only the pinned llama.cpp build is shared, read
from where `make llama` put it (APEX_ORCH_BUILD_ROOT, resolved before HOME moves). When the session
ends, the places apex-orch's cache would land if some code ignored APEX_ORCH_CACHE (the throwaway
HOME's .cache/apex-orch and XDG_CACHE_HOME/apex-orch) must still be absent: anything there fails
the run. The user's own cache is never looked at, so an apex-orch run of the user's beside the
suite cannot fail it (tests/test_isolation.py proves both on real runs).

Tools: tests that run llama.cpp binaries use `@pytest.mark.requires_tools("llama-perplexity", ...)`
(also as `pytestmark`), or call the `require_tools` fixture: `require_tools("llama-imatrix")`
returns {name: Path}. A missing build FAILS the test with a message saying how to build it;
tests never skip silently. (Do not `from conftest import ...`: tests/reliability has its own
conftest module, so the name is ambiguous.)

llama.cpp caveat: on CPUs with AMX, pass `--no-repack` to llama-perplexity / llama-imatrix for
the mistral4 (MLA) models; see the apex_orch.demo.synthetic docstring.
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
from pathlib import Path

import pytest

from apex_orch.core import settings
from apex_orch.demo import synthetic
from apex_orch.core.errors import ToolNotFoundError
from apex_orch.llama.tools import find_tool

# Started in the background (`cmd &` in a non-interactive shell, nohup, some CI runners), pytest
# inherits SIGINT *ignored*, its children inherit that through exec, and an ignored Ctrl-C makes
# every "SIGINT during ..." test see a run that finishes with exit 0. A Python handler is reset to
# the default on exec, so with this the CLI processes the tests start receive SIGINT as they would
# in a terminal. (apex-orch itself keeps an inherited SIG_IGN, as background jobs should.)
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


def require_tools(*names: str) -> dict[str, Path]:
    """Paths of the named llama.cpp tools; pytest.fail (never skip) when one is missing."""
    found: dict[str, Path] = {}
    for name in names:
        try:
            found[name] = find_tool(name).path
        except ToolNotFoundError as exc:
            pytest.fail(f"llama.cpp tool {name} is missing, so this test cannot run: {exc}\n"
                        f"build the pinned llama.cpp first (`make llama`)", pytrace=False)
    return found


def pytest_configure(config: pytest.Config) -> None:
    _isolate_environment()   # before collection: module-level code already sees the session cache
    config.addinivalue_line(
        "markers", "requires_tools(*names): the test runs these llama.cpp tools; fails if missing")


def pytest_runtest_setup(item: pytest.Item) -> None:
    for marker in item.iter_markers(name="requires_tools"):
        require_tools(*marker.args)


@pytest.fixture(name="require_tools")
def require_tools_fixture():
    """The require_tools helper, for tests that decide at run time which tools they need."""
    return require_tools


# The pinned build (the user's cache, or CI's own fresh one under .ci/run), resolved before the
# session moves HOME and the caches.
BUILD_ROOT = settings.build_root()
_SAVED_ENV: dict[str, str | None] = {}
_SESSION_ROOT: list[Path] = []


def session_root() -> Path:
    """The throwaway folder of this session: HOME, the XDG folders and the caches live under it."""
    return _SESSION_ROOT[0]


def session_cache() -> Path:
    """The per-session folder that stands in for the user's cache (APEX_ORCH_CACHE points into it)."""
    return session_root() / "cache"


def default_cache_locations() -> list[Path]:
    """Where apex-orch's cache goes when APEX_ORCH_CACHE is not followed: under XDG_CACHE_HOME, and
    under HOME's .cache (XDG_CACHE_HOME unset). Both lie in the throwaway folder and stay absent."""
    root = session_root()
    return [root / "xdg-cache" / "apex-orch", root / "home" / ".cache" / "apex-orch"]


def _isolate_environment() -> None:
    root = Path(tempfile.mkdtemp(prefix="apex-orch-test-"))
    _SESSION_ROOT.append(root)
    for name in ("home", "xdg-cache", "xdg-config", "xdg-data", "xdg-state"):
        (root / name).mkdir()
    wanted = {"HOME": str(root / "home"), "XDG_CACHE_HOME": str(root / "xdg-cache"),
              "XDG_CONFIG_HOME": str(root / "xdg-config"), "XDG_DATA_HOME": str(root / "xdg-data"),
              "XDG_STATE_HOME": str(root / "xdg-state"),
              "APEX_ORCH_CACHE": str(session_cache()), "APEX_ORCH_BUILD_ROOT": str(BUILD_ROOT),
              "HF_HOME": str(root / "hf-home"), "APEX_ORCH_EVAL_CACHE": None, "APEX_ORCH_PROFILES": None,
              "APEX_LLAMA_BIN_DIR": None, "LLAMA_CMAKE_ARGS": None}
    for name, value in wanted.items():
        _SAVED_ENV[name] = os.environ.get(name)
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


def stray_cache_files() -> list[str]:
    """Every path under the default cache locations (default_cache_locations): written by code that
    did not follow APEX_ORCH_CACHE."""
    found = []
    for location in default_cache_locations():
        if location.exists() or location.is_symlink():
            found.append(str(location))
            if location.is_dir() and not location.is_symlink():
                found += sorted(str(p) for p in location.rglob("*"))
    return found


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Fail the run if anything was written where the cache goes when APEX_ORCH_CACHE is ignored."""
    if not _SESSION_ROOT:
        return
    stray = stray_cache_files()
    if stray:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write("\n")   # after the progress line, which the reporter has not ended yet
            reporter.write_line(f"ISOLATION FAILURE: the suite wrote {len(stray)} path(s) where apex-orch's cache "
                                "goes when APEX_ORCH_CACHE is not followed: " + ", ".join(stray[:10]), red=True)


def pytest_unconfigure(config: pytest.Config) -> None:
    for name, value in _SAVED_ENV.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    for root in _SESSION_ROOT:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def isolated_cache_root() -> Path:
    """The throwaway folder of the session: HOME, the XDG folders and APEX_ORCH_CACHE are in it."""
    return session_root()


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("synthetic-models")


def _preset(folder: Path, name: str) -> Path:
    return synthetic.write_preset(name, folder / f"{name}.gguf")


@pytest.fixture(scope="session")
def mistral4_split(synthetic_dir: Path) -> Path:
    return _preset(synthetic_dir, "mistral4-split")


@pytest.fixture(scope="session")
def mistral4_fused(synthetic_dir: Path) -> Path:
    return _preset(synthetic_dir, "mistral4-fused")


@pytest.fixture(scope="session")
def mistral4_dense_lead(synthetic_dir: Path) -> Path:
    return _preset(synthetic_dir, "mistral4-dense-lead")


@pytest.fixture(scope="session")
def qwen3moe(synthetic_dir: Path) -> Path:
    return _preset(synthetic_dir, "qwen3moe")


@pytest.fixture(scope="session")
def dense_model(synthetic_dir: Path) -> Path:
    return _preset(synthetic_dir, "dense")


@pytest.fixture(scope="session")
def ms4_replica(synthetic_dir: Path) -> Path:
    return synthetic.write_mistral_small_4_replica(synthetic_dir / "Mistral-Small-4-replica.gguf")


@pytest.fixture(scope="session")
def eval_text(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("text") / "eval.txt"
    path.write_text(synthetic.demo_text(20000), encoding="utf-8")
    return path
