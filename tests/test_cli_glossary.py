"""The CLI speaks one language: every command walked against apex_orch.cli.glossary.

One flag, one meaning, one type, one short form in every command that has it; `--json` on every
command that produces a result, `-q` on every long-running one; `--debug` after the command as
before it; `--help` ends with the command's exit codes; progress on stderr through one Progress;
the old spellings still work, with a warning; docs/cli.md is the generated one. Fast: only
header-only commands and dry runs run here.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import inspect
import json
import re
import textwrap
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from apex_orch.cli import main
from apex_orch.cli.glossary import (EXITS, LONG_RUNNING, NO_JSON, RESULTS, SHORT, TERMS, exit_classes,
                                    exit_codes_of)
from apex_orch.core import errors
from apex_orch.core.errors import exit_codes

ROOT = Path(__file__).resolve().parent.parent


def _tool(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


docgen = _tool("gen_cli_docs")
COMMANDS = docgen.walk()
NAMES = [name for name, _ in COMMANDS]


def invoke(*args: object, **kwargs):
    return CliRunner(**kwargs).invoke(main, [str(a) for a in args])


def _options(cmd: click.Command) -> list[click.Option]:
    return docgen.visible_options(cmd)


def test_the_documentation_is_the_generated_one():
    assert (ROOT / "docs" / "cli.md").read_text(encoding="utf-8") == docgen.render(), \
        "regenerate with `python tools/gen_cli_docs.py`"


def test_every_command_is_in_every_table():
    assert sorted(EXITS) == sorted(NAMES)
    assert sorted(set(RESULTS) | set(NO_JSON)) == sorted(NAMES) and not set(RESULTS) & set(NO_JSON)
    assert set(LONG_RUNNING) <= set(NAMES)


def test_one_flag_one_meaning_one_type_one_short_form():
    types: dict[str, set[str]] = {}
    shorts: dict[str, set[tuple[str, ...]]] = {}
    missing = []
    for name, cmd in [("(global)", main), *COMMANDS]:
        for param in _options(cmd) if cmd is not main else [p for p in main.params if isinstance(p, click.Option)]:
            for flag in docgen.long_flags(param):
                if flag not in TERMS:
                    missing.append(f"{name}: {flag}")
                types.setdefault(flag, set()).add(docgen.type_label(param))
                if flag in param.opts:
                    shorts.setdefault(flag, set()).add(tuple(docgen.short_flags(param)))
            for short in docgen.short_flags(param):
                assert SHORT.get(short) in param.opts, \
                    f"{name}: {short} is {SHORT.get(short)} everywhere, not {param.opts}"
    assert missing == [], "add a row to apex_orch.cli.glossary.TERMS for each"
    assert {f: t for f, t in types.items() if len(t) > 1} == {}, "one flag, one type"
    assert {f: s for f, s in shorts.items() if len(s) > 1} == {}, "one flag, one short form (or none) everywhere"
    used = set(types)
    assert sorted(set(TERMS) - used) == [], "a glossary row no command uses"


def test_every_result_has_json_and_every_long_command_q():
    for name, cmd in COMMANDS:
        flags = {f for p in _options(cmd) for f in (*p.opts, *p.secondary_opts)}
        assert ("--json" in flags) == (name not in NO_JSON), name
        if name in LONG_RUNNING:
            assert {"-q", "--quiet"} <= flags, name
        assert "--debug" in flags, name


@pytest.mark.parametrize("name", NAMES)
def test_help_names_the_exit_codes(name):
    r = invoke(*name.split(), "--help")
    assert r.exit_code == 0, r.output
    block = r.output.split("Exit codes:\n", 1)[1]
    listed = [int(line.split()[0]) for line in block.splitlines() if line.strip()]
    assert listed == exit_codes_of(name)
    assert set(listed) <= set(exit_codes()) and {0, 2, 20, 70, 130} <= set(listed)


def _raised_in(fn) -> set[str]:
    fn = inspect.unwrap(fn)
    tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
    return {n.exc.func.id for n in ast.walk(tree) if isinstance(n, ast.Raise) and isinstance(n.exc, ast.Call)
            and isinstance(n.exc.func, ast.Name) and (n.exc.func.id == "UsageError" or hasattr(errors, n.exc.func.id))}


def test_the_errors_a_command_raises_itself_are_among_its_exit_codes():
    from apex_orch.cli.errors import UsageError
    for name, cmd in COMMANDS:
        declared = exit_classes(name)
        for cls_name in _raised_in(cmd.callback):
            cls = UsageError if cls_name == "UsageError" else getattr(errors, cls_name)
            assert any(issubclass(cls, d) for d in declared), f"{name} raises {cls_name}: add it to EXITS"


def test_debug_works_after_the_command(qwen3moe):
    r = invoke("plan", "-p", "no-such-profile", qwen3moe)
    assert r.exit_code == 3 and r.output.startswith("error: "), r.output
    for args in (["--debug", "plan", "-p", "no-such-profile", qwen3moe],
                 ["plan", "-p", "no-such-profile", qwen3moe, "--debug"],
                 ["profile", "show", "no-such-profile", "--debug"]):
        r = invoke(*args)
        assert isinstance(r.exception, errors.ProfileError), (args, r.output)   # the traceback, not one line


def test_progress_goes_to_stderr_through_one_style():
    """Outside progress.py the commands write to stderr only warnings, notes and errors; progress goes
    through cli.progress.Progress (throttled, one style), results to stdout."""
    found = []
    for path in sorted((ROOT / "apex_orch" / "cli").glob("*.py")):
        if path.name == "progress.py":   # the one style itself
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "echo" and \
                    any(k.arg == "err" for k in node.keywords):
                text = ast.unparse(node.args[0]) if node.args else ""
                if not re.match(r"""f?["'](warning|note|error): """, text):
                    found.append(f"{path.name}:{node.lineno}: {text[:60]}")
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "print":
                found.append(f"{path.name}:{node.lineno}: print()")
    assert found == []


# ----------------------------------------------------------------------------- the old spellings

@pytest.mark.parametrize("old, new", [
    (["plan", "-p", "compact", "{M}", "--imatrix"], ["plan", "-p", "compact", "{M}", "--with-imatrix"]),
    (["plan", "-p", "compact", "{M}", "--no-imatrix"], ["plan", "-p", "compact", "{M}", "--without-imatrix"]),
    (["render", "-p", "compact", "{M}", "--format", "args"], ["render", "-p", "compact", "{M}", "--args"]),
    (["render", "-p", "compact", "{M}", "--format", "file"], ["render", "-p", "compact", "{M}"]),
    (["release", "{C}", "--source", "{M}", "--dry-run", "--json", "--from", "quantize", "--out-dir", "{D}"],
     ["release", "{C}", "--source", "{M}", "--dry-run", "--json", "--from-phase", "quantize", "--out-dir", "{D}"]),
])
def test_an_old_spelling_warns_and_does_what_the_new_one_does(old, new, mistral4_split, tmp_path):
    values = {"{M}": str(mistral4_split), "{C}": str(ROOT / "releases" / "demo.yaml"), "{D}": str(tmp_path / "rel")}
    r_old = invoke(*[values.get(a, a) for a in old])
    r_new = invoke(*[values.get(a, a) for a in new])
    assert r_old.exit_code == r_new.exit_code == 0, r_old.output + r_new.output
    free = re.compile(r'"free": \d+')   # the release's disk check: free space moves between two runs
    assert free.sub("", r_old.stdout) == free.sub("", r_new.stdout)
    old_flag = next(a for a in old if a.startswith("--") and a not in new)
    (line,) = [x for x in r_old.stderr.splitlines() if "deprecated" in x]
    assert line.startswith("warning: --") and old_flag in line and " is deprecated: say --" in line, line
    assert "deprecated" not in r_new.stderr


def test_every_old_spelling_is_hidden_and_documented():
    rows = docgen.renamed_table()
    assert {(r[0], r[1]) for r in rows} == {
        ("compare", "`--corpus`"), ("compare", "`--format`"), ("eval", "`--corpus`"), ("fit", "`--from`"),
        ("fit", "`--no-imatrix`"), ("imatrix", "`--ctx`"), ("imatrix", "`--chunks`"),
        ("plan", "`--imatrix/--no-imatrix`"), ("release", "`--from`"), ("render", "`--format`"),
        ("sensitivity", "`--from`"), ("sensitivity", "`--text-corpus`")}
    for name, cmd in COMMANDS:
        help_text = invoke(*name.split(), "--help").output
        for spec in getattr(cmd, "renamed_specs", ()):
            for flag in spec.old:
                assert not re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", help_text) or flag in (
                    "--corpus", "--chunks", "--ctx"), (name, flag)   # still the names of other options there


def test_old_and_new_spelling_together_is_a_usage_error(mistral4_split):
    r = invoke("render", "-p", "compact", mistral4_split, "--format", "args", "--args")
    assert r.exit_code == 2 and "give --args or its old spelling --format, not both" in r.output


# ----------------------------------------------------------------------------- the JSON results

def test_profile_list_json(tmp_path):
    r = invoke("profile", "list", "--json")
    assert r.exit_code == 0, r.output
    rows = json.loads(r.stdout)
    assert [row["name"] for row in rows] == sorted(p.stem for p in (ROOT / "profiles").glob("*.yaml")
                                                   if not p.stem.startswith("_"))
    compact = next(row for row in rows if row["name"] == "compact")
    assert set(compact) == {"name", "tier", "base_ftype", "imatrix_required", "corpus", "best_for", "source",
                            "shadows_builtin", "path", "chain"}
    assert (compact["tier"], compact["base_ftype"], compact["source"]) == ("Compact", "Q4_K_M", "built-in")
    assert [link["path"].rsplit("/", 1)[1] for link in compact["chain"]] == ["compact.yaml", "_apex.yaml"]


def test_render_json_and_wrote_line(mistral4_split, tmp_path):
    out = tmp_path / "rules.txt"
    r = invoke("render", "-p", "compact", mistral4_split, "-o", out, "--json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert set(doc) == {"profile", "model", "rules", "text", "output"}
    assert doc["output"] == str(out) and out.read_text() == doc["text"]
    assert doc["text"] == "".join(f"{x['pattern']}={x['type'].lower()}\n" for x in doc["rules"])
    r = invoke("render", "-p", "compact", mistral4_split, "-o", out, "--force")
    assert (r.exit_code, r.stdout) == (0, f"wrote {len(doc['rules'])} rules to {out}\n")


def test_quantize_dry_run_json(mistral4_split, tmp_path):
    r = invoke("quantize", "-p", "compact,i-compact", mistral4_split, "--out-dir", tmp_path, "--dry-run", "--json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert set(doc) == {"model", "tiers", "imatrix_to_build", "warnings"}
    assert [t["tier"] for t in doc["tiers"]] == ["Compact", "I-Compact"]
    assert all(t["waits_for_imatrix"] and t["argv"] is None for t in doc["tiers"])
    assert doc["imatrix_to_build"] == {"corpus": "diverse", "ctx": 512, "chunks": None}
    r = invoke("quantize", "-p", "compact", mistral4_split, "--out-dir", tmp_path, "--dry-run", "--json")
    (tier,) = json.loads(r.stdout)["tiers"]
    assert tier["argv"][0].endswith("llama-quantize")
    assert tier["output"] == str(tmp_path / tier["output"].rsplit("/")[-1])


def test_imatrix_dry_run_json(mistral4_split, tmp_path):
    r = invoke("imatrix", mistral4_split, "--corpus", "reasoning", "--imatrix-ctx", "128", "--imatrix-chunks", "2",
               "-o", tmp_path / "im.gguf", "--dry-run", "--json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert set(doc) == {"imatrix", "cache", "cached", "model", "corpus", "corpus_sha256", "ctx", "chunks",
                        "available_chunks", "tokens", "key", "output", "argv", "warnings"}
    assert (doc["imatrix"], doc["cached"], doc["corpus"], doc["ctx"], doc["chunks"]) == \
        (None, False, "reasoning", 128, 2)
    assert doc["output"] == str(tmp_path / "im.gguf") and not (tmp_path / "im.gguf").exists()


def test_corpus_build_json(tmp_path):
    out = tmp_path / "chat.txt"
    r = invoke("corpus", "build", "chat", "-o", out, "--json", "-q")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert (doc["text"], doc["manifest"]) == (str(out), str(out) + ".manifest.json")
    assert doc["bytes"] == out.stat().st_size and doc["sha256"] == hashlib.sha256(out.read_bytes()).hexdigest()
    assert r.stderr == ""
