"""Set-up from nothing: your own llama.cpp build flags, profile folders, `apex-orch build`.

The CMake tests use a stand-in `cmake` on PATH (a FAKE: there is no CUDA here) that records its
arguments and creates the tool files, so what reaches CMake, the cache key and build-info.json
can be checked without a 10-minute compile. The sdist is the real one `make llama` downloaded.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from apex_orch.core import settings
from apex_orch.llama import build as build_lib
from apex_orch.llama import pin
from apex_orch.cli import main
from apex_orch.plan.profile_search import builtin_profiles_dir

REPO = Path(__file__).resolve().parent.parent
REAL_SDIST = settings.build_root() / "downloads" / pin.SDIST_NAME

FAKE_CMAKE = """#!{python}
# FAKE cmake for tests/test_setup.py: records argv, makes the targets' files, compiles nothing
import json, os, sys
with open(os.environ["FAKE_CMAKE_LOG"], "a") as fh:
    fh.write(json.dumps(sys.argv[1:]) + "\\n")
if "--build" in sys.argv:
    bin_dir = os.path.join(sys.argv[sys.argv.index("--build") + 1], "bin")
    os.makedirs(bin_dir, exist_ok=True)
    for target in sys.argv[sys.argv.index("--target") + 1:]:
        open(os.path.join(bin_dir, target), "w").write("#!/bin/sh\\n")
"""


@pytest.fixture
def fake_pin_tree(tmp_path, monkeypatch):
    """A build root holding an 'unpacked' pin (CHANGELOG naming the pinned commit) and a cache whose
    downloads/ links the real sdist; a stand-in cmake first on PATH."""
    root = tmp_path / "build-root"
    monkeypatch.setenv("APEX_ORCH_BUILD_ROOT", str(root))
    monkeypatch.setenv("APEX_ORCH_CACHE", str(root))
    tree = pin.sdist_tree()
    pin.llama_source().mkdir(parents=True)
    (tree / "CHANGELOG.md").write_text(f"## [{pin.LLAMA_CPP_PYTHON_VERSION}]\n\n"
                                       f"- feat: Update llama.cpp to ggml-org/llama.cpp@{pin.LLAMA_CPP_COMMIT}\n")
    (pin.pin_dir() / ".unpacked").write_text(pin.SDIST_SHA256 + "\n")
    (root / "downloads").mkdir()
    (root / "downloads" / pin.SDIST_NAME).symlink_to(REAL_SDIST)
    bin_dir = tmp_path / "fake-bin"
    bin_dir.mkdir()
    cmake = bin_dir / "cmake"
    cmake.write_text(FAKE_CMAKE.format(python=sys.executable))
    cmake.chmod(0o755)
    log = tmp_path / "cmake-calls.jsonl"
    monkeypatch.setenv("FAKE_CMAKE_LOG", str(log))
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(build_lib, "link_vendor", lambda: None)   # the checkout's link is not the subject
    return log


def _calls(log: Path) -> list[list[str]]:
    return [json.loads(line) for line in log.read_text().splitlines()]


def test_extra_cmake_flags_reach_cmake_the_key_and_build_info(fake_pin_tree):
    r = CliRunner().invoke(main, ["build", "llama", "--cmake-arg", "-DGGML_CUDA=ON",
                                  "--cmake-arg", "-DCMAKE_CUDA_ARCHITECTURES=90"])
    assert r.exit_code == 0, r.output
    extra = ("-DGGML_CUDA=ON", "-DCMAKE_CUDA_ARCHITECTURES=90")
    bdir = pin.pin_dir() / pin.variant_key(extra)
    assert bdir.name.startswith("build-") and bdir.name != "build"
    configure, build = _calls(fake_pin_tree)
    assert configure == ["-S", str(pin.llama_source()), "-B", str(bdir), *pin.CMAKE_FLAGS, *extra]
    assert build[:2] == ["--build", str(bdir)] and build[-len(pin.TOOL_TARGETS):] == list(pin.TOOL_TARGETS)
    info = json.loads((bdir / "build-info.json").read_text())
    assert info["extra_flags"] == list(extra) and info["build_key"] == bdir.name
    assert info["commit"] == pin.LLAMA_CPP_COMMIT
    # the flagged build is now the one apex-orch uses
    assert pin.bin_dir() == bdir / "bin"
    # same flags again: cached, CMake not called; the plain build is another folder
    r = CliRunner().invoke(main, ["build", "llama", "--cmake-arg", "-DGGML_CUDA=ON",
                                  "--cmake-arg", "-DCMAKE_CUDA_ARCHITECTURES=90"])
    assert r.exit_code == 0 and "cached build is current" in r.output and len(_calls(fake_pin_tree)) == 2
    assert pin.build_dir(()) == pin.pin_dir() / "build"


def test_llama_cmake_args_from_the_environment(fake_pin_tree, monkeypatch):
    monkeypatch.setenv("LLAMA_CMAKE_ARGS", "-DGGML_VULKAN=ON")
    r = CliRunner().invoke(main, ["build", "llama"])
    assert r.exit_code == 0, r.output
    assert _calls(fake_pin_tree)[0][-1] == "-DGGML_VULKAN=ON"
    assert pin.bin_dir().parent.name == pin.variant_key(("-DGGML_VULKAN=ON",))


def test_bad_cmake_flag_is_a_usage_error(fake_pin_tree):
    r = CliRunner().invoke(main, ["build", "llama", "--cmake-arg", "GGML_CUDA"])
    assert r.exit_code == 2 and "is not a -DNAME=VALUE cache entry" in r.output
    assert not fake_pin_tree.exists()


def test_make_llama_passes_llama_cmake_args():
    p = subprocess.run(["make", "-n", "llama", "LLAMA_CMAKE_ARGS=-DGGML_CUDA=ON"], cwd=REPO,
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert "LLAMA_CMAKE_ARGS='-DGGML_CUDA=ON'" in p.stdout and "-m apex_orch.llama.build llama" in p.stdout


# ------------------------------------------------------------------ profiles: built-in + user folders

def _write(folder: Path, name: str, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.yaml"
    path.write_text(text)
    return path


def test_profile_list_shows_where_each_profile_comes_from(tmp_path):
    mine = tmp_path / "mine"
    _write(mine, "house", "extends: compact\ntier: House\nbest_for: our fleet\n")
    _write(mine, "compact", "extends: compact\nbest_for: our own compact\n")   # extends the built-in
    r = CliRunner().invoke(main, ["--profiles-dir", str(mine), "profile", "list"])
    assert r.exit_code == 0, r.output
    lines = {line.split()[0]: line for line in r.output.splitlines()}
    # house extends compact, which the user's compact shadows: the list says where that link comes from
    assert lines["house"].endswith(f"[user {mine}; extends compact from user {mine} (shadows the built-in)]")
    assert "House" in lines["house"]
    assert lines["i-compact"].endswith(f"[built-in; extends compact from user {mine} (shadows the built-in)]")
    assert lines["compact"].endswith(f"[user {mine} (shadows the built-in)]")
    assert "our own compact" in lines["compact"]
    assert lines["quality"].endswith("[built-in]")
    builtin = sorted(p.stem for p in builtin_profiles_dir().glob("*.yaml") if not p.stem.startswith("_"))
    assert sorted(lines) == sorted(set(builtin) | {"house"})


def test_profiles_env_variable_adds_folders(tmp_path, monkeypatch):
    mine = tmp_path / "env-profiles"
    _write(mine, "envtier", "extends: quality\ntier: EnvTier\n")
    monkeypatch.setenv("APEX_ORCH_PROFILES", str(mine))
    r = CliRunner().invoke(main, ["profile", "show", "envtier"])
    assert r.exit_code == 0, r.output
    assert "tier       EnvTier" in r.output


def test_profile_list_that_finds_nothing_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setattr("apex_orch.plan.profile_search.builtin_profiles_dir", lambda: tmp_path / "nothing-here")
    r = CliRunner().invoke(main, ["profile", "list"])
    assert r.exit_code == 3
    assert r.output.startswith("error: no profiles found; searched: ") and "Traceback" not in r.output


# ------------------------------------------------------------------ doctor and `apex-orch build` hints

def test_doctor_reports_the_pinned_build():
    r = CliRunner().invoke(main, ["doctor", "--json"])
    assert r.exit_code == 0, r.output
    report = json.loads(r.output)
    assert report["pinned_build"] is True
    assert report["tool_versions"]["llama-quantize"]["commit"] == pin.LLAMA_CPP_COMMIT


def test_doctor_names_a_foreign_build(tmp_path):
    """FAKE tools: a bin folder whose llama-quantize prints another build's version."""
    from apex_orch.llama.tools import find_libllama
    folder = tmp_path / "foreign"
    folder.mkdir()
    for f in find_libllama().parent.iterdir():
        (folder / f.name).symlink_to(f)
    (folder / "llama-quantize").unlink()
    fake = folder / "llama-quantize"
    fake.write_text("#!/bin/sh\necho 'version: 0.9.0 (build 9999, commit abcdef1)' >&2\necho 'built with GNU 99' >&2\n")
    fake.chmod(0o755)
    r = CliRunner().invoke(main, ["--llama-bin-dir", str(folder), "doctor", "--json"])
    report = json.loads(r.output)
    assert report["pinned_build"] is False
    assert report["tool_versions"]["llama-quantize"]["commit"] == "abcdef1"
    assert any("not the pinned build" in w and "abcdef1" in w for w in report["warnings"])
    assert r.exit_code == 0   # a user's own build is allowed: quantize cross-checks its types
