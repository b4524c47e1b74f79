"""The suite leans on nothing in the machine's cache, writes nothing where code that ignores the cache
setting would, and does not blame a user's own apex-orch run beside it.

conftest.py runs the whole session with HOME, the XDG folders and every cache in a throwaway folder,
and when the session ends fails the run if anything exists where apex-orch's cache goes when
APEX_ORCH_CACHE is not followed (the throwaway HOME's .cache/apex-orch, XDG_CACHE_HOME/apex-orch).
These tests prove it: the caches are where the session put them; the commands that fill every cache
(the demo model, a corpus and an imatrix for an I-tier, the eval base log-probs), run as real
subprocesses, leave those places absent; and a pytest session of its own, with this conftest, fails
on a stray write there and passes while the user's cache changes under it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from apex_orch.core import settings
from apex_orch.llama import pin

TESTS = Path(__file__).resolve().parent


def test_caches_live_in_the_session_folder(isolated_cache_root):
    assert settings.cache_root().is_relative_to(isolated_cache_root)
    for name in ("HOME", "XDG_CACHE_HOME", "XDG_CONFIG_HOME", "XDG_DATA_HOME", "XDG_STATE_HOME", "HF_HOME"):
        assert Path(os.environ[name]).is_relative_to(isolated_cache_root), name
    assert Path.home() == isolated_cache_root / "home"
    # only the pinned build is shared, read where `make llama` put it
    assert not pin.pin_dir().is_relative_to(isolated_cache_root) and pin.bin_dir().is_dir()


def test_real_commands_write_nothing_where_the_default_cache_is(isolated_cache_root, tmp_path):
    defaults = [isolated_cache_root / "xdg-cache" / "apex-orch", isolated_cache_root / "home" / ".cache" / "apex-orch"]
    out = tmp_path / "out"
    p = subprocess.run([sys.executable, "-m", "apex_orch.cli", "quantize", "--demo", "-p", "i-compact",
                        "--out-dir", str(out), "--imatrix-chunks", "4", "--eval"],
                       capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert [d for d in defaults if d.exists()] == []
    filled = sorted(d.name for d in settings.cache_root().iterdir())
    for cache in ("models", "imatrix", "corpora", "eval"):
        assert cache in filled, filled


INNER = '''
import os
from pathlib import Path

from apex_orch.core import settings


def test_code_that_ignores_the_cache_setting(monkeypatch):
    monkeypatch.delenv("APEX_ORCH_CACHE")       # as if the code never read it
    target = settings.cache_root() / "models" / "stray.gguf"
    target.parent.mkdir(parents=True)
    target.write_bytes(b"GGUF")


def test_code_that_writes_under_home(monkeypatch):
    target = Path.home() / ".cache" / "apex-orch" / "stray.txt"
    target.parent.mkdir(parents=True)
    target.write_text("x")


def test_a_users_own_run_beside_the_suite():
    target = Path(os.environ["USERS_OWN_HOME"]) / ".cache" / "apex-orch" / "imatrix" / "users-run.gguf"
    target.parent.mkdir(parents=True)
    target.write_bytes(b"GGUF")
'''


def _inner_session(tmp_path: Path, test: str) -> tuple[subprocess.CompletedProcess, Path]:
    """A pytest session with this suite's conftest as its only plugin, the user's HOME a folder of
    the test's; returns the run and that HOME."""
    (tmp_path / "test_inner.py").write_text(INNER)
    user_home = tmp_path / "user-home"
    user_home.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("XDG_", "APEX_", "HF_HOME", "PYTEST_"))}
    env.update(HOME=str(user_home), USERS_OWN_HOME=str(user_home),
               PYTHONPATH=os.pathsep.join([str(TESTS), str(TESTS.parent), env.get("PYTHONPATH", "")]))
    p = subprocess.run([sys.executable, "-m", "pytest", "-p", "conftest", "-p", "no:cacheprovider", "-q",
                        "--rootdir", str(tmp_path), f"test_inner.py::{test}"],
                       cwd=tmp_path, capture_output=True, text=True, env=env, timeout=300)
    return p, user_home


def test_a_stray_write_fails_the_session(tmp_path):
    for test, stray in [("test_code_that_ignores_the_cache_setting", "xdg-cache/apex-orch/models/stray.gguf"),
                        ("test_code_that_writes_under_home", "home/.cache/apex-orch/stray.txt")]:
        p, user_home = _inner_session(tmp_path, test)
        assert p.returncode == 1 and "1 passed" in p.stdout, p.stdout + p.stderr
        line = next(x for x in p.stdout.splitlines() if x.startswith("ISOLATION FAILURE"))
        assert line.startswith("ISOLATION FAILURE: the suite wrote ") and line.endswith(stray), line
        assert not (user_home / ".cache").exists()


def test_a_users_own_run_is_not_blamed(tmp_path):
    p, user_home = _inner_session(tmp_path, "test_a_users_own_run_beside_the_suite")
    assert p.returncode == 0 and "1 passed" in p.stdout and "ISOLATION" not in p.stdout, p.stdout + p.stderr
    assert (user_home / ".cache" / "apex-orch" / "imatrix" / "users-run.gguf").read_bytes() == b"GGUF"
