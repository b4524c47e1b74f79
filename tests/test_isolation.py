"""The suite leans on nothing in the machine's cache, and writes nothing there.

conftest.py points every cache at a per-session folder before collection and checks the user's
cache again when the session ends (any change fails the run). This test runs the commands that
fill every cache — the demo model, a corpus build and an imatrix (an I-tier), the eval base
log-probs — as real subprocesses, and compares the user's cache before and after, file by file.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from apex_orch.core import settings
from apex_orch.llama import pin


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    out = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            p = Path(folder) / name
            st = p.lstat()
            out[str(p.relative_to(root))] = (st.st_size, 0 if p.is_dir() and not p.is_symlink() else st.st_mtime_ns)
    return out


def test_caches_live_in_the_session_folder(user_cache, isolated_cache_root):
    assert settings.cache_root().is_relative_to(isolated_cache_root)
    assert not settings.cache_root().is_relative_to(user_cache)
    # only the pinned build is shared, read where `make llama` put it
    assert not pin.pin_dir().is_relative_to(isolated_cache_root) and pin.bin_dir().is_dir()
    assert Path(os.environ["HF_HOME"]).is_relative_to(isolated_cache_root)


def test_real_commands_write_nothing_under_the_user_cache(user_cache, tmp_path):
    before = _tree(user_cache)
    out = tmp_path / "out"
    p = subprocess.run([sys.executable, "-m", "apex_orch.cli", "quantize", "--demo", "-p", "i-compact",
                        "--out-dir", str(out), "--imatrix-chunks", "4", "--eval"],
                       capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert _tree(user_cache) == before
    filled = sorted(d.name for d in settings.cache_root().iterdir())
    for cache in ("models", "imatrix", "corpora", "eval"):
        assert cache in filled, filled
