"""One language across the commands and the library: one size grammar, domain errors below the
CLI (flags only in it), one subprocess runner, one copy of each table. Fast: no tool runs a
quantization here; the commands are stopped by their own checks before any work."""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from apex_orch.cli import main
from apex_orch.cli.errors import flag_names
from apex_orch.core.errors import BuildError, RequestError, ToolFailedError, ToolTimeoutError
from apex_orch.core.sizes import SizeError, parse_size, read_size
from apex_orch.llama import build as build_lib
from apex_orch.llama.tools import capture_tool

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "apex_orch"


def invoke(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


# ----------------------------------------------------------------------------- one size grammar

@pytest.mark.parametrize("text, expected", [
    ("48G", 48 * 10 ** 9), ("48GB", 48 * 10 ** 9), ("48 gb", 48 * 10 ** 9), ("48e9", 48 * 10 ** 9),
    ("4.8e+10", 48 * 10 ** 9), ("45GiB", 45 * 2 ** 30), ("1.5TiB", 3 * 2 ** 39), ("500M", 5 * 10 ** 8),
    ("500 MB", 5 * 10 ** 8), ("12k", 12_000), ("3KiB", 3072), ("1T", 10 ** 12), ("2000000", 2_000_000),
    ("2000000B", 2_000_000), (48_000_000, 48_000_000), (1.5e9, 1_500_000_000),
])
def test_sizes_read_one_way(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text, message", [
    ("lots", "'lots' is not a size such as 48G, 48GB, 45GiB, 48e9 or 500M (K/M/G/T and KB/MB/GB/TB are powers "
             "of 1000, KiB/MiB/GiB/TiB powers of 1024, a plain number is bytes)"),
    ("48 parsecs", "'48 parsecs' is not a size"), ("-1G", "'-1G' is not a size"), ("48GG", "'48GG' is not a size"),
    (True, "expected a size such as 48G, 48GB, 45GiB, 48e9 or 500M, got True"),
    ("1e30", "1e30 is too large: at most 1,000 TB"),
    ("48", "48 is too small: at least 1 MB (a plain number is bytes: write 48G or 48GB for gigabytes)"),
    ("0.5MB", "0.5MB is too small: at least 1 MB"),
])
def test_bad_sizes_say_what_is_wrong_and_not_where(text, message):
    with pytest.raises(SizeError) as err:
        parse_size(text, minimum=10 ** 6)
    assert str(err.value).startswith(message)


def test_size_keeps_its_text():
    size = read_size(" 48GB ")
    assert (str(size), size.bytes) == ("48GB", 48 * 10 ** 9)


@pytest.mark.parametrize("args, option, message", [
    (["quantize", "--demo", "-p", "compact", "--split-max-size", "48 parsecs"], "--split-max-size",
     "'48 parsecs' is not a size"),
    (["quantize", "--demo", "-p", "compact", "--split-max-size", "1K"], "--split-max-size",
     "1K is too small: at least 1 MB"),
    (["fit", "m.gguf", "--sensitivity", "s.json", "--size", "48"], "--size",
     "48 is too small: at least 1 MB (a plain number is bytes: write 48G or 48GB for gigabytes)"),
])
def test_a_size_option_names_itself(args, option, message):
    r = invoke(*args)
    assert r.exit_code == 2 and f"Invalid value for '{option}': {message}" in r.output, r.output


# ----------------------------------------------------------------------------- errors: domain below, flags above

def test_request_error_names_parameters_by_the_callers_words():
    err = RequestError("give exactly one target", fields=("size", "bpw"), hint="pick one", options=("force",))
    assert err.render() == "`size` / `bpw`: give exactly one target\nhint: pick one [`force`]"
    assert err.render({"size": "--size", "bpw": "--bpw", "force": "--force"}) == \
        "--size / --bpw: give exactly one target\nhint: pick one [--force]"
    # a parameter the command does not have is left out, never shown as a flag it lacks
    assert err.render({"size": "--size"}) == "--size: give exactly one target\nhint: pick one"


def test_flag_names_come_from_the_running_command():
    @click.group()
    @click.option("--llama-bin-dir")
    def group(llama_bin_dir):
        pass

    @group.command()
    @click.argument("model")
    @click.option("-o", "--output")
    @click.option("--imatrix", "imatrix_path")
    @click.option("-c", "--ctx", type=int)
    def sub(model, output, imatrix_path, ctx):
        pass

    ctx = click.Context(group)
    ctx.invoked_subcommand = "sub"
    names = flag_names(ctx)
    assert {k: names[k] for k in ("model", "output", "out", "imatrix", "n_ctx", "llama_bin_dir")} == {
        "model": "MODEL", "output": "--output", "out": "--output", "imatrix": "--imatrix", "n_ctx": "--ctx",
        "llama_bin_dir": "--llama-bin-dir"}


def test_library_request_errors_reach_the_cli_with_its_flags(tmp_path):
    r = invoke("quantize", "--demo", "-p", "compact", "--imatrix", tmp_path / "i.gguf", "--corpus", "diverse")
    assert r.exit_code == 2
    assert r.output == ("error: --imatrix / --corpus: give an imatrix file or a corpus to build one from, "
                        "not both\n")
    r = invoke("release", ROOT / "releases" / "demo.yaml", "--only", "upload")
    assert r.exit_code == 2
    assert r.output.startswith("error: --only: 'upload': unknown phase upload\nhint: phases: fetch, convert")


def test_a_remedy_is_named_as_the_commands_flag(tmp_path):
    out = tmp_path / "chat.txt"
    out.write_text("something else\n")
    r = invoke("corpus", "build", "chat", "-o", out)
    assert r.exit_code == 9
    assert f"error: {out} exists\nhint: ask to replace it, or choose another output [--force, --output]" in r.output


def _cli_flags() -> set[str]:
    flags: set[str] = set()

    def walk(cmd: click.Command, ctx: click.Context) -> None:
        for p in cmd.params:
            flags.update(o for o in getattr(p, "opts", []) + getattr(p, "secondary_opts", []) if o.startswith("--"))
        if isinstance(cmd, click.Group):
            for name in cmd.list_commands(ctx):
                walk(cmd.get_command(ctx, name), ctx)
    walk(main, click.Context(main))
    return flags


def _library_strings() -> list[tuple[str, str]]:
    """(file:line, text) of every string literal below cli/ that is not a docstring."""
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if rel.startswith("apex_orch/cli/"):
            continue
        tree = ast.parse(path.read_text())
        docs = {id(n.body[0].value) for n in ast.walk(tree)
                if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and n.body
                and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs:
                out.append((f"{rel}:{node.lineno}", node.value))
    return out


def test_no_library_message_names_a_flag_of_the_cli():
    """Flags are the CLI's words: a library message names a parameter (`options=`, `fields=`) and the
    CLI words it. Allowed: a tool's own flags (llama-quantize --dry-run), a whole command to run
    (`apex-orch imatrix MODEL --corpus NAME`), and argument lists."""
    flags = _cli_flags()
    assert {"--force", "--out-dir", "--split-max-size", "--llama-bin-dir"} <= flags
    found = []
    for where, text in _library_strings():
        if re.fullmatch(r"--[a-z0-9-]+", text) or "apex-orch " in text:
            continue   # an argument of an argument list; a command line to run
        for m in re.finditer(r"(?<![\w-])--[a-z][a-z0-9-]*", text):
            before = text[:m.start()]
            if re.search(r"llama-[a-z-]+[^,;.]*$|convert_hf_to_gguf|cmake|pip ", before):
                continue   # a llama.cpp tool's own flag, or the build's
            if m.group() in flags:
                found.append(f"{where}: {text[:90]!r}")
    assert found == []


def test_usage_error_lives_in_the_cli_only():
    hits = [f"{p.relative_to(ROOT)}:{i}" for p in PACKAGE.rglob("*.py") if "cli" not in p.relative_to(PACKAGE).parts[:1]
            for i, line in enumerate(p.read_text().splitlines(), 1) if "UsageError" in line]
    assert hits == []


# ----------------------------------------------------------------------------- one runner

def test_capture_tool_returns_output_and_status_without_credentials(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_secretvalue")
    r = capture_tool([sys.executable, "-c", "import os, sys; print(os.environ.get('HF_TOKEN', 'none')); "
                                            "print('to stderr', file=sys.stderr); sys.exit(3)"], timeout=60)
    assert (r.returncode, r.stdout, r.stderr) == (3, "none\n", "to stderr\n")
    with pytest.raises(ToolTimeoutError, match="ran past the 0.5 s timeout"):
        capture_tool([sys.executable, "-c", "import time; time.sleep(30)"], timeout=0.5, what="sleeper")


def test_a_failed_build_step_is_a_typed_error_with_its_log(tmp_path):
    log = tmp_path / "step.log"
    with pytest.raises(BuildError) as err:
        build_lib.run([sys.executable, "-c", "print('compiling x'); raise SystemExit(3)"], log_file=log)
    assert isinstance(err.value, ToolFailedError) and err.value.exit_code == 8
    assert "failed with exit code 3" in err.value.message and "compiling x" in err.value.log_tail
    assert err.value.log_path == log and "compiling x" in log.read_text()
    with pytest.raises(BuildError, match="needs cmake"):
        build_lib.run([str(tmp_path / "no-such-tool")], log_file=log)


def test_the_build_entry_point_prints_one_error(capsys, monkeypatch):
    assert build_lib.main(["everything"]) == 2
    assert capsys.readouterr().err == "usage: python -m apex_orch.llama.build [llama|bindings|all]\n"
    monkeypatch.setenv("LLAMA_CMAKE_ARGS", "GGML_CUDA=ON")
    assert build_lib.main(["llama"]) == 2
    assert capsys.readouterr().err.startswith("error: LLAMA_CMAKE_ARGS: ")


# ----------------------------------------------------------------------------- single truths

def _definitions(name: str) -> list[str]:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef) and node.name == name:
                found.append(path.relative_to(ROOT).as_posix())
            elif isinstance(node, (ast.Assign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                if any(isinstance(t, ast.Name) and t.id == name for t in targets):
                    found.append(path.relative_to(ROOT).as_posix())
    return found


@pytest.mark.parametrize("name, home", [
    ("sha256_file", "apex_orch/core/fingerprint.py"), ("ROLE_ORDER", "apex_orch/model/roles.py"),
    ("NEVER_QUANTIZED_ROLES", "apex_orch/model/roles.py"), ("parse_size", "apex_orch/core/sizes.py"),
    ("ftype_label", "apex_orch/plan/llama_rules.py"), ("check_keys", "apex_orch/core/schema.py"),
])
def test_one_definition(name, home):
    assert _definitions(name) == [home]


def test_role_order_names_every_role_once():
    from apex_orch.model.roles import ROLE_ORDER, Role
    assert sorted(ROLE_ORDER) == sorted(r.value for r in Role)


def test_gate_options_are_the_gates_table():
    from apex_orch.cli.eval import compare, eval_cmd
    from apex_orch.plan.gates import RULES
    for cmd in (eval_cmd, compare):
        opts = {p.name: p for p in cmd.params}
        assert [r.key for r in RULES if r.key in opts] == [r.key for r in RULES]
        assert [opts[r.key].opts for r in RULES] == [[r.option] for r in RULES]
        assert opts["max_kld_99_9"].help == "Gate: fail if the 99.9th percentile of KLD is above this."


def test_no_argv_surgery_in_the_release_executor():
    text = (PACKAGE / "release" / "ray_executor.py").read_text()
    assert ".replace(" not in text.replace("dataclasses.replace(", "")


# ----------------------------------------------------------------------------- the schema is the dataclasses

def test_profile_keys_and_checks_come_from_the_dataclasses(tmp_path):
    from apex_orch.core.errors import ProfileError
    from apex_orch.core.schema import yaml_keys
    from apex_orch.plan import profiles
    assert profiles.TOP_KEYS == {"extends", "name", "tier", "description", "best_for", "base_ftype", "imatrix",
                                 "bands", "types", "overrides", "gates", "fitted"}
    assert yaml_keys(profiles.Bands) == ["edge", "near", "attention_edge", "scale", "reference_blocks"]
    assert profiles.OVERRIDE_KEYS == {"role", "slot", "band", "blocks", "type"}   # `where` is not a key
    base = "extends: compact\ntier: T\n"
    for body, line, message in [
        ("bands: {edge: 2.5}\n", 3, "bands.edge must be a non-negative integer"),
        ("bands: {reference_blocks: 0}\n", 3, "bands.reference_blocks must be an integer of at least 1"),
        ("bands: {scale: 5}\n", 3, "bands.scale must be one of auto, fixed, proportional"),
        ("imatrix: {required: yes please}\n", 3, "imatrix.required must be true or false"),
        ("imatrix: {corpus: ../x}\n", 3, "imatrix.corpus: '../x' is not a corpus name"),
        ("gates: {max_mean_kld: high}\n", 3, "gates.max_mean_kld must be a number"),
        ("gates:\n  max_kld: 1\n", 4, "unknown key 'gates.max_kld'"),
        ("overrides:\n  - {role: output, type: Q8_0, colour: red}\n", 4, "unknown key 'overrides[0].colour'"),
    ]:
        p = tmp_path / "p.yaml"
        p.write_text(base + body)
        with pytest.raises(ProfileError) as err:
            profiles.load_profile(p)
        assert (err.value.where, err.value.message) == (f"{p}:{line}", message), body
    p.write_text(base + "bands: {edge: 1, near: 1, scale: fixed}\ngates: {max_mean_kld: 1}\n")
    prof = profiles.load_profile(p)
    assert prof.bands == profiles.Bands(edge=1, near=1, scale="fixed") and prof.gates == {"max_mean_kld": 1.0}
