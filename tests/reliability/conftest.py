"""Fixtures of the reliability suite (helpers live in relkit.py).

Header-only cases use the session models of tests/conftest.py (mistral4_split, qwen3moe,
dense_model). Cases that run the real llama-quantize / llama-imatrix / bindings use
`tiny_moe`, a 4-block, 4-expert synthetic mistral4 (MLA + shared expert) that quantizes in
about 2 s on one core.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from apex_orch.llama import pin
from apex_orch.demo import synthetic
from relkit import TINY_SPEC, TRIPWIRE, cli, make_fake_bin


@pytest.fixture(scope="session")
def tiny_moe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synthetic.write_model(tmp_path_factory.mktemp("tiny") / "tiny-moe.gguf", TINY_SPEC)


@pytest.fixture(scope="session")
def tiny_compact_dir(tmp_path_factory: pytest.TempPathFactory, tiny_moe: Path) -> Path:
    """A folder holding a finished, verified Compact output of tiny_moe (real llama-quantize).
    Tests copy it (`existing_output`) instead of quantizing again."""
    out = tmp_path_factory.mktemp("tiny-compact")
    r = cli("quantize", "-p", "compact", tiny_moe, "--out-dir", out, "-t", "2", "--no-eval", "-q")
    assert r.exit_code == 0, r.output
    return out


@pytest.fixture
def existing_output(tmp_path: Path, tiny_compact_dir: Path) -> Path:
    """A private copy of the finished Compact output folder (output, log, rules, manifest)."""
    dest = tmp_path / "out"
    shutil.copytree(tiny_compact_dir, dest)
    return dest


@pytest.fixture
def isolated_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """APEX_ORCH_CACHE in a temp folder (imatrix, eval and corpus caches start empty), with the
    pinned build linked in so the real tools and libllama keep resolving."""
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / pin.PIN_KEY).symlink_to(pin.pin_dir())
    monkeypatch.setenv("APEX_ORCH_CACHE", str(cache))
    monkeypatch.delenv("APEX_ORCH_EVAL_CACHE", raising=False)
    return cache


@pytest.fixture
def fake_bin(tmp_path: Path):
    """fake_bin(tool, body) -> a bin folder: the real build with `tool` replaced by a FAKE."""
    return lambda tool, body, name="fakebin": make_fake_bin(tmp_path / name, tool, body)


@pytest.fixture
def tripwire(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A FAKE llama-quantize that only records that it was started. Cases that must be refused
    before any tool runs assert the marker file never appears."""
    marker = tmp_path / "tripwire-fired"
    monkeypatch.setenv("APEX_LLAMA_BIN_DIR", str(make_fake_bin(tmp_path / "tripwire-bin", "llama-quantize", TRIPWIRE)))
    monkeypatch.setenv("APEX_TEST_TRIPWIRE", str(marker))
    return marker
