"""A real install: the wheel, built from this checkout, installed into a fresh venv outside it.

The wheel must carry the built-in profiles and corpora (packaged from the top-level profiles/
and corpora/, the one copy users edit). The venv gets the wheel's own files only; its
dependencies (click, gguf, numpy, the bindings...) come from the test venv through a .pth line,
so nothing is downloaded or compiled. Every command runs with its working directory outside
the checkout.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

from apex_orch.llama import pin

REPO = Path(__file__).resolve().parent.parent
BUILT_IN = sorted(p.stem for p in (REPO / "profiles").glob("*.yaml") if not p.stem.startswith("_"))
CORPORA = sorted(p.stem for p in (REPO / "corpora").glob("*.yaml"))


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("wheel-install")
    src = root / "src"   # a copy, so the build leaves no build/ or egg-info in the checkout
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    for folder in ("apex_orch", "profiles", "corpora"):
        shutil.copytree(REPO / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    dist = root / "dist"
    p = subprocess.run([sys.executable, "-m", "pip", "wheel", "-v", "--no-deps", "--no-build-isolation", "--no-index",
                        "-w", str(dist), str(src)], capture_output=True, text=True)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    build_log = p.stdout + p.stderr
    wheel = next(dist.glob("apex_orch-*.whl"))
    env_dir = root / "venv"
    venv.create(env_dir, with_pip=True)
    py = env_dir / "bin" / "python"
    p = subprocess.run([str(py), "-m", "pip", "install", "--no-deps", "--no-index", str(wheel)],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    site = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    (site / "zz-test-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    work = root / "work"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    env["PATH"] = f"{env_dir / 'bin'}{os.pathsep}{env['PATH']}"
    return {"bin": env_dir / "bin", "python": py, "work": work, "env": env, "wheel": wheel, "site": site,
            "build_log": build_log}


def test_the_build_is_quiet(installed):
    """Package data is declared (every folder under apex_orch/ is a listed package with its files as data):
    setuptools has nothing to warn about, so a newcomer's `make install` shows no screens of warnings."""
    warnings = [line.strip() for line in installed["build_log"].splitlines()
                if "Warning" in line or "is absent from the `packages`" in line]
    assert warnings == []


def test_the_wheel_carries_the_package_data(installed):
    """Every calibration sample, the card template, the trained demo's vocabulary and record (when the
    checkout has them), the built-in profiles and corpora: the checkout's files, byte for byte."""
    import zipfile
    wheel = zipfile.ZipFile(installed["wheel"])
    data = {n for n in wheel.namelist() if n.startswith("apex_orch/") and not n.endswith(".py")}
    expected = {f"apex_orch/{p.relative_to(REPO / 'apex_orch').as_posix()}"
                for p in (REPO / "apex_orch").rglob("*") if p.is_file() and p.suffix not in (".py", ".pyc")}
    expected |= {f"apex_orch/{folder}/{p.name}" for folder in ("profiles", "corpora")
                 for p in (REPO / folder).glob("*.yaml")}
    assert data == expected
    assert "apex_orch/release/card.md.j2" in data and len([n for n in data if "/samples/" in n]) > 40
    for name in sorted(data):
        local = REPO / name.removeprefix("apex_orch/")
        if name.split("/")[1] not in ("profiles", "corpora"):
            local = REPO / name
        assert wheel.read(name) == local.read_bytes(), name


def run(installed: dict, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(installed["bin"] / "apex-orch"), *args], cwd=installed["work"], text=True,
                          capture_output=True, env=env or installed["env"], timeout=600)


def test_the_wheel_is_what_runs(installed):
    p = subprocess.run([str(installed["python"]), "-c", "import apex_orch; print(apex_orch.__file__)"],
                       cwd=installed["work"], capture_output=True, text=True, env=installed["env"])
    assert Path(p.stdout.strip()).is_relative_to(installed["site"]), p.stdout + p.stderr
    import zipfile
    names = zipfile.ZipFile(installed["wheel"]).namelist()
    assert sorted(n[len("apex_orch/profiles/"):-5] for n in names
                  if n.startswith("apex_orch/profiles/") and not n.split("/")[-1].startswith("_")) == BUILT_IN
    assert sorted(n[len("apex_orch/corpora/"):-5] for n in names if n.startswith("apex_orch/corpora/")) == CORPORA


def test_every_module_of_the_checkout_is_in_the_wheel(installed):
    """pyproject lists packages by hand: a subpackage left out (release.phases once was) installs a
    CLI whose `release` dies on import. Every module of the source tree must import from the wheel."""
    import zipfile
    source = sorted(p.relative_to(REPO).with_suffix("").as_posix() for p in (REPO / "apex_orch").rglob("*.py")
                    if "__pycache__" not in p.parts)
    names = zipfile.ZipFile(installed["wheel"]).namelist()
    assert sorted(n[:-3] for n in names if n.startswith("apex_orch/") and n.endswith(".py")) == source
    modules = [m.replace("/", ".").removesuffix(".__init__") for m in source   # samples/ is corpus data
               if not m.endswith("__main__") and "/samples/" not in m]
    p = subprocess.run([str(installed["python"]), "-c", f"import importlib; [importlib.import_module(m) for m in "
                                                        f"{modules!r}]"],
                       cwd=installed["work"], capture_output=True, text=True, env=installed["env"])
    assert p.returncode == 0, p.stderr[-3000:]


def test_the_card_template_is_in_the_wheel(installed):
    """The model card is rendered from a jinja2 template shipped as package data: the installed
    package finds and compiles it from site-packages."""
    import zipfile
    assert "apex_orch/release/card.md.j2" in zipfile.ZipFile(installed["wheel"]).namelist()
    code = "from apex_orch.release import card; print(card._environment().get_template(card.TEMPLATE).filename)"
    p = subprocess.run([str(installed["python"]), "-c", code], cwd=installed["work"], capture_output=True, text=True,
                       env=installed["env"])
    assert p.returncode == 0 and Path(p.stdout.strip()).is_relative_to(installed["site"]), p.stdout + p.stderr


def test_profile_list_from_the_wheel_shows_every_built_in(installed):
    p = run(installed, "profile", "list")
    assert p.returncode == 0, p.stderr
    listed = sorted(line.split()[0] for line in p.stdout.splitlines())
    assert listed == BUILT_IN
    assert all(line.endswith("[built-in]") for line in p.stdout.splitlines())
    c = run(installed, "corpus", "list")
    assert c.returncode == 0, c.stderr
    assert all(name in c.stdout for name in CORPORA)


def test_plan_from_the_wheel(installed, qwen3moe):
    p = run(installed, "plan", "-p", "compact", str(qwen3moe))
    assert p.returncode == 0, p.stderr
    assert "Compact" in p.stdout


def test_quantize_demo_from_the_wheel(installed):
    p = run(installed, "quantize", "--demo", "-p", "compact", "--out-dir", "out")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    out = installed["work"] / "out" / "APEX-Demo-MoE-APEX-Compact.gguf"
    assert out.is_file()
    doc = json.loads(out.with_name(out.name + ".manifest.json").read_text())
    assert doc["files"][0]["size"] == out.stat().st_size
    assert "PPL" in p.stdout   # the demo's eval table ran through the bindings


def test_wheel_install_says_to_run_apex_orch_build(installed, tmp_path):
    env = dict(installed["env"], APEX_ORCH_BUILD_ROOT=str(tmp_path / "no-build"),
               APEX_ORCH_CACHE=str(tmp_path / "no-cache"), PATH="/usr/bin:/bin")
    p = run(installed, "doctor", env=env)
    assert p.returncode == 1
    assert "llama-quantize missing: run `apex-orch build llama`" in p.stdout
    assert not (installed["site"].parent / "vendor").exists()
    assert pin.in_source_checkout()   # and the test process itself runs from the checkout
