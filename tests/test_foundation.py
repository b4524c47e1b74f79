"""The pinned build, tool discovery, doctor, --version, --help staying true to the code."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from apex_orch import __version__
from apex_orch.llama import pin
from apex_orch.cli import COMMANDS, main
from apex_orch.core.errors import ToolNotFoundError
from apex_orch.llama.tools import build_info, find_libllama, find_tool

TOOLS = ("llama-quantize", "llama-imatrix", "llama-perplexity", "llama-gguf-split", "llama-bench",
         "llama-speculative-simple")


def test_pin_is_the_llama_cpp_python_sdist():
    assert pin.LLAMA_CPP_PYTHON_VERSION == "0.3.36"
    assert len(pin.SDIST_SHA256) == 64
    assert pin.PIN_KEY.endswith(pin.SDIST_SHA256[:12])
    for flag in ("-DBUILD_SHARED_LIBS=ON", "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_OPENSSL=OFF"):
        assert flag in pin.CMAKE_FLAGS


@pytest.mark.requires_tools(*TOOLS)
def test_build_cache_holds_every_tool_and_build_info():
    info = build_info()
    assert info["targets"] == list(TOOLS)
    assert info["sdist_sha256"] == pin.SDIST_SHA256
    for tool in TOOLS:
        loc = find_tool(tool)
        assert loc.path.parent == pin.bin_dir() or loc.source in ("env", "flag")
    assert (Path(__file__).resolve().parent.parent / "vendor" / "llama.cpp" / "tools" / "quantize").is_dir()


def test_discovery_error_names_every_place_searched(tmp_path, monkeypatch):
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("APEX_LLAMA_BIN_DIR", str(empty))
    with pytest.raises(ToolNotFoundError) as err:
        find_tool("llama-quantize")
    text = err.value.render()
    assert str(empty / "llama-quantize") in text and "(env)" in text
    assert "make llama" in text


def test_discovery_order_flag_beats_env(tmp_path, monkeypatch):
    a, b = tmp_path / "a", tmp_path / "b"
    for d in (a, b):
        d.mkdir()
        tool = d / "llama-quantize"
        tool.write_text("#!/bin/sh\nexit 0\n")
        tool.chmod(tool.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("APEX_LLAMA_BIN_DIR", str(b))
    assert find_tool("llama-quantize", a).path == a / "llama-quantize"
    assert find_tool("llama-quantize").path == b / "llama-quantize"


def test_discovery_falls_back_to_path(tmp_path, monkeypatch):
    monkeypatch.delenv("APEX_LLAMA_BIN_DIR", raising=False)
    monkeypatch.setenv("APEX_ORCH_CACHE", str(tmp_path / "no-cache"))
    monkeypatch.delenv("APEX_ORCH_BUILD_ROOT", raising=False)
    d = tmp_path / "onpath"
    d.mkdir()
    tool = d / "llama-gguf-split"
    tool.write_text("#!/bin/sh\nexit 0\n")
    tool.chmod(0o755)
    monkeypatch.setenv("PATH", f"{d}{os.pathsep}{os.environ['PATH']}")
    loc = find_tool("llama-gguf-split")
    assert loc.source == "PATH" and loc.path == tool


@pytest.mark.requires_tools("llama-quantize")
def test_doctor_reports_one_shared_libllama():
    r = CliRunner().invoke(main, ["doctor", "--json"])
    assert r.exit_code == 0, r.output
    report = json.loads(r.output)
    assert report["shared_libllama"] is True
    assert report["bindings"]["ok"] and report["bindings"]["version"] == "0.3.36"
    assert Path(report["libllama"]) == find_libllama().resolve()
    assert report["problems"] == []
    assert report["free_disk_bytes"] > 0


def test_doctor_without_build_says_what_to_run(tmp_path):
    env = dict(os.environ, APEX_ORCH_CACHE=str(tmp_path / "empty-cache"), PATH="/usr/bin:/bin")
    env.pop("APEX_LLAMA_BIN_DIR", None)
    env.pop("APEX_ORCH_BUILD_ROOT", None)
    proc = subprocess.run([sys.executable, "-m", "apex_orch.cli", "doctor"], capture_output=True, text=True,
                          env=env)
    assert proc.returncode == 1
    assert "llama-quantize missing: run `make llama`" in proc.stdout
    assert "MISSING" in proc.stdout


def test_version_names_apex_and_llama_cpp():
    r = CliRunner().invoke(main, ["--version"])
    assert r.exit_code == 0
    assert r.output.splitlines()[0] == f"apex-orch {__version__}"
    assert "llama-cpp-python-0.3.36" in r.output


def test_help_lists_every_command_and_each_command_loads():
    r = CliRunner().invoke(main, ["--help"])
    assert r.exit_code == 0
    for name in COMMANDS:
        assert name in r.output, name
        sub = CliRunner().invoke(main, [name, "--help"])
        assert sub.exit_code == 0, (name, sub.output)


def test_readme_commands_exist():
    """Every `apex-orch <cmd>` the README shows is a real command (docs can't drift)."""
    import re
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    used = set(re.findall(r"`apex-orch ([a-z][a-z-]+)", readme))
    used |= set(re.findall(r"^apex-orch ([a-z][a-z-]+)", readme, flags=re.M))
    assert {"quantize", "plan", "doctor"} <= used
    for name in used:
        assert name in COMMANDS, f"README mentions `apex-orch {name}`, which does not exist"


def test_bindings_load_against_the_pinned_libllama():
    code = ("from apex_orch.llama.bindings import load_llama_cpp, loaded_libllama; m = load_llama_cpp(); "
            "import llama_cpp; llama_cpp.llama_backend_init(); print(loaded_libllama())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert Path(out.strip()) == find_libllama().resolve()


def test_build_records_the_vendored_llama_cpp_commit():
    """The commit comes from the sdist's CHANGELOG and must equal the pin's constant."""
    from apex_orch.llama.tools import build_label
    info = build_info()
    assert info["commit"] == pin.LLAMA_CPP_COMMIT
    assert pin.LLAMA_CPP_COMMIT in build_label() and pin.SDIST_SHA256[:12] in build_label()
    changelog = (pin.sdist_tree() / "CHANGELOG.md").read_text()
    section = changelog.split(f"## [{pin.LLAMA_CPP_PYTHON_VERSION}]", 1)[1].split("\n## [", 1)[0]
    assert f"llama.cpp@{pin.LLAMA_CPP_COMMIT}" in section


def test_an_untranslated_failure_is_one_line_and_debug_shows_the_traceback(monkeypatch):
    """Fault injection (a fake): a library function raises an exception no layer translates."""
    def broken():
        raise ZeroDivisionError("planted")
    monkeypatch.setattr("apex_orch.cli.profiles.profile_sources", broken)
    r = CliRunner().invoke(main, ["profile", "list"])
    assert r.exit_code == 70
    assert r.output.startswith("error: unexpected ZeroDivisionError: planted\nhint: this is a bug")
    assert "Traceback" not in r.output
    r = CliRunner().invoke(main, ["--debug", "profile", "list"])
    assert isinstance(r.exception, ZeroDivisionError)


# ------------------------------------------------------------------ the environment is read in one module

PACKAGE = Path(__file__).resolve().parent.parent / "apex_orch"
SETTINGS = PACKAGE / "core" / "settings.py"
ENV_ATTRS = {"environ", "environb", "getenv", "getenvb", "putenv", "unsetenv"}


def _env_reads(path: Path) -> list[str]:
    """`file:line` of every use of os.environ / os.getenv (and friends) in one source file,
    through `import os`, `import os as x` or `from os import environ`."""
    import ast
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    os_names = {"os"}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            os_names |= {a.asname or a.name.split(".")[0] for a in node.names if a.name.split(".")[0] == "os"}
        elif isinstance(node, ast.ImportFrom) and node.module == "os":
            found += [f"{path.name}:{node.lineno}" for a in node.names if a.name in ENV_ATTRS]
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and node.attr in ENV_ATTRS and isinstance(node.value, ast.Name)
                and node.value.id in os_names):
            found.append(f"{path.name}:{node.lineno}")
    return found


def test_only_settings_reads_the_environment():
    """Every environment variable is read in apex_orch/core/settings.py, by a named function."""
    offenders = {str(p.relative_to(PACKAGE.parent)): reads for p in sorted(PACKAGE.rglob("*.py"))
                 if p != SETTINGS and "__pycache__" not in p.parts and (reads := _env_reads(p))}
    assert offenders == {}, "read the environment through apex_orch.core.settings, not os.environ/getenv"
    assert _env_reads(SETTINGS)   # the checker sees the reads where they belong


def test_the_environment_checker_finds_every_spelling(tmp_path):
    planted = {"a.py": "import os\nx = os.environ.get('A')\n", "b.py": "import os\nx = os.getenv('B')\n",
               "c.py": "from os import environ\n", "d.py": "import os as o\no.environ['D'] = '1'\n",
               "e.py": "import os.path\nx = dict(os.environ)\n"}
    for name, text in planted.items():
        (tmp_path / name).write_text(text)
        assert _env_reads(tmp_path / name), name
    (tmp_path / "clean.py").write_text("import os\nx = os.path.join('a', 'b')\nenviron = {}\n")
    assert _env_reads(tmp_path / "clean.py") == []


@click.command("probe-options")
def _probe_options() -> None:
    """Test stand-in command: what the global options reached, and what os.environ holds."""
    from apex_orch.llama.tools import configured_bin_dir
    from apex_orch.plan.profile_search import user_profile_dirs
    click.echo(json.dumps({"bin_dir": str(configured_bin_dir()), "profiles": [str(p) for p in user_profile_dirs()],
                           "env": [os.environ.get(k) for k in ("APEX_LLAMA_BIN_DIR", "APEX_ORCH_PROFILES")]}))


def test_global_options_travel_as_values_not_through_the_environment(tmp_path, monkeypatch):
    from apex_orch.llama.tools import configured_bin_dir
    from apex_orch.plan.profile_search import user_profile_dirs
    monkeypatch.setitem(COMMANDS, "probe-options", (__name__, "_probe_options"))
    env_profiles = tmp_path / "env-profiles"
    monkeypatch.setenv("APEX_ORCH_PROFILES", str(env_profiles))
    mine, tools = tmp_path / "mine", tmp_path / "bin"
    mine.mkdir()
    r = CliRunner().invoke(main, ["--llama-bin-dir", str(tools), "--profiles-dir", str(mine), "probe-options"])
    assert r.exit_code == 0, r.output
    seen = json.loads(r.output)
    assert seen["bin_dir"] == str(tools)
    assert seen["profiles"] == [str(mine), str(env_profiles)]   # the options first, then the variable
    assert seen["env"] == [None, str(env_profiles)]              # os.environ untouched
    # the command is over: nothing of its options is left behind
    assert configured_bin_dir() is None and user_profile_dirs() == [env_profiles]


def test_write_failures_keep_their_words_and_exit_codes(tmp_path):
    import errno
    from apex_orch.core.errors import DiskSpaceError, OutputNotWritableError
    from apex_orch.core.translate import translate_os_error
    target = tmp_path / "out.gguf"
    cases = {errno.ENOSPC: (DiskSpaceError, f"the disk is full: cannot write {target} (No space left on device)"),
             errno.EROFS: (OutputNotWritableError, f"cannot write {target}: Read-only file system"),
             errno.EACCES: (OutputNotWritableError, f"cannot access {target}: Permission denied")}
    for code, (cls, message) in cases.items():
        err = translate_os_error(OSError(code, os.strerror(code)), target)
        assert type(err) is cls and err.message == message, (code, err.message)
    err = translate_os_error(OSError(errno.EACCES, os.strerror(errno.EACCES)), tmp_path, creating=True)
    assert err.message == f"cannot create {tmp_path}: Permission denied" and err.exit_code == 17
    err = translate_os_error(OSError(errno.EIO, os.strerror(errno.EIO)), target)
    assert err.message == f"Input/output error: {target}" and err.exit_code == 20   # FileSystemError, in the table
