"""Static guarantees over the package source (read with `ast`, nothing imported):

- no shell anywhere: no `shell=True`, no os.system / os.popen / os.exec* / os.spawn* /
  pty.spawn / subprocess.getoutput / asyncio.create_subprocess_shell, and no subprocess call
  whose command is a string (literal, f-string, concatenation or `%`);
- every subprocess is started by the one runner module, `apex_orch.llama.tools` (run_tool,
  capture_tool, start_worker): no other module of the package imports subprocess (or pty,
  multiprocessing), the build, doctor and the chat-template worker included;
- YAML only through safe loading: no yaml.load / load_all without a SafeLoader, no
  yaml.unsafe_load / full_load, no yaml.Loader / FullLoader / UnsafeLoader, and any custom
  loader class derives from a safe one.

The checks also run over bench/ for the shell rules (benchmarks start real processes too).
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "apex_orch"

# The one module that may import subprocess: the runner (argument lists only).
RUNNER = "apex_orch/llama/tools.py"
SUBPROCESS_FUNCS = {"run", "call", "check_call", "check_output", "Popen"}
SHELL_FUNCS = {("os", "system"), ("os", "popen"), ("subprocess", "getoutput"), ("subprocess", "getstatusoutput"),
               ("pty", "spawn"), ("asyncio", "create_subprocess_shell"), ("commands", "getoutput")}
UNSAFE_YAML_ATTRS = {"unsafe_load", "unsafe_load_all", "full_load", "full_load_all", "Loader", "FullLoader",
                     "UnsafeLoader", "CLoader", "CFullLoader", "CUnsafeLoader"}
SAFE_LOADERS = {"SafeLoader", "CSafeLoader", "BaseLoader", "CBaseLoader"}


def _sources(*folders: Path) -> list[Path]:
    return sorted(p for folder in folders if folder.exists() for p in folder.rglob("*.py")
                  if "__pycache__" not in p.parts)


def _rel(path: Path) -> str:
    try:
        return path.relative_to(ROOT).as_posix()
    except ValueError:   # the checker's self-tests scan snippets in a temp folder
        return path.name


@functools.lru_cache(maxsize=None)
def _parse(path: Path) -> tuple[ast.Module, tuple[ast.AST, ...]]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    return tree, tuple(ast.walk(tree))


def _dotted(node: ast.AST) -> tuple[str, ...]:
    """('subprocess', 'run') for subprocess.run; ('run',) for a bare name."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return tuple(reversed(parts))
    return ()


def _is_string_expr(node: ast.AST) -> bool:
    if isinstance(node, ast.Constant):
        return isinstance(node.value, (str, bytes))
    if isinstance(node, ast.JoinedStr):
        return True
    if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Mod)):
        return _is_string_expr(node.left) or _is_string_expr(node.right)
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in ("format", "join") \
            and _is_string_expr(node.func.value):
        return True
    return False


def _imported_names(nodes: tuple[ast.AST, ...]) -> dict[str, tuple[str, str]]:
    """Local name -> (module, attr) for `from subprocess import run as r` style imports."""
    out = {}
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.module:
            for alias in node.names:
                out[alias.asname or alias.name] = (node.module, alias.name)
    return out


def shell_problems(path: Path) -> list[str]:
    _, nodes = _parse(path)
    rel = _rel(path)
    imported = _imported_names(nodes)
    problems = []
    for node in nodes:
        if not isinstance(node, ast.Call):
            continue
        where = f"{rel}:{node.lineno}"
        name = _dotted(node.func)
        if len(name) == 1 and name[0] in imported:
            name = imported[name[0]]
        for kw in node.keywords:
            if kw.arg == "shell" and not (isinstance(kw.value, ast.Constant) and kw.value.value is False):
                problems.append(f"{where}: shell= must not be used")
        if len(name) == 2 and (name in SHELL_FUNCS or (name[0] == "os" and name[1].startswith(("exec", "spawn")))):
            problems.append(f"{where}: {'.'.join(name)} goes through a shell or replaces the process")
        if len(name) == 2 and name[0] == "subprocess" and name[1] in SUBPROCESS_FUNCS:
            command = node.args[0] if node.args else next((k.value for k in node.keywords if k.arg == "args"), None)
            if command is not None and _is_string_expr(command):
                problems.append(f"{where}: subprocess.{name[1]} with a command string")
        if name and name[-1] == "run_tool" and node.args and _is_string_expr(node.args[0]):
            problems.append(f"{where}: run_tool with a command string")
    return problems


def direct_subprocess_uses(path: Path) -> list[str]:
    _, nodes = _parse(path)
    uses = []
    for node in nodes:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            mods = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            if any(m.split(".")[0] in ("subprocess", "pty", "multiprocessing") for m in mods):
                uses.append(f"{_rel(path)}:{node.lineno}: imports {', '.join(mods)}")
    return uses


def yaml_problems(path: Path) -> list[str]:
    _, nodes = _parse(path)
    rel = _rel(path)
    problems = []
    for node in nodes:
        where = f"{rel}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Attribute) and _dotted(node)[:1] == ("yaml",) and node.attr in UNSAFE_YAML_ATTRS:
            problems.append(f"{where}: yaml.{node.attr} can build arbitrary objects")
        if isinstance(node, ast.ImportFrom) and node.module == "yaml":
            bad = [a.name for a in node.names if a.name in UNSAFE_YAML_ATTRS or a.name in ("load", "load_all")]
            if bad:
                problems.append(f"{where}: imports {', '.join(bad)} from yaml")
        if isinstance(node, ast.Call) and _dotted(node.func) in (("yaml", "load"), ("yaml", "load_all")):
            loader = next((k.value for k in node.keywords if k.arg == "Loader"),
                          node.args[1] if len(node.args) > 1 else None)
            if loader is None or not (_dotted(loader) and _dotted(loader)[-1] in SAFE_LOADERS):
                problems.append(f"{where}: yaml.{node.func.attr} without Loader=yaml.SafeLoader (use yaml.safe_load)")
        if isinstance(node, ast.ClassDef):
            for base in node.bases:
                d = _dotted(base)
                if d[:1] == ("yaml",) and d[-1].endswith("Loader") and d[-1] not in SAFE_LOADERS:
                    problems.append(f"{where}: class {node.name} derives from unsafe yaml.{d[-1]}")
    return problems


# ---------------------------------------------------------------------------- the checks

def test_no_shell_strings_in_package_or_bench():
    files = _sources(PACKAGE, ROOT / "bench")
    assert len(files) > 20
    problems = [p for f in files for p in shell_problems(f)]
    assert problems == [], "\n".join(problems)


def test_subprocesses_only_through_the_runner():
    files = _sources(PACKAGE)
    assert any(_rel(f) == RUNNER for f in files) and direct_subprocess_uses(ROOT / RUNNER)
    uses = [u for f in files if _rel(f) != RUNNER for u in direct_subprocess_uses(f)]
    assert uses == [], ("start processes through apex_orch.llama.tools (run_tool: a tool with a log and typed "
                        "errors; capture_tool: a short probe; start_worker: a helper over pipes):\n" + "\n".join(uses))


@pytest.mark.parametrize("snippet", ["import subprocess\n", "from subprocess import run\n",
                                     "import multiprocessing.pool\n", "import pty\n"])
def test_checker_catches_a_subprocess_import(snippet, tmp_path):
    src = tmp_path / "probe.py"
    src.write_text(snippet)
    assert direct_subprocess_uses(src)


def test_yaml_only_through_safe_loading():
    problems = [p for f in _sources(PACKAGE, ROOT / "bench") for p in yaml_problems(f)]
    assert problems == [], "\n".join(problems)


# ---------------------------------------------------------------------------- the checker checks itself

BAD_SNIPPETS = {
    "shell=True": "import subprocess\nsubprocess.run(['ls'], shell=True)\n",
    "shell=flag": "import subprocess\nsubprocess.run(['ls'], shell=flag)\n",
    "os.system": "import os\nos.system('ls')\n",
    "os.popen": "import os\nos.popen('ls')\n",
    "os.execv": "import os\nos.execv('/bin/ls', ['ls'])\n",
    "string command": "import subprocess\nsubprocess.run('ls -l')\n",
    "f-string command": "import subprocess\nsubprocess.Popen(f'ls {x}')\n",
    "joined command": "import subprocess\nsubprocess.check_output(' '.join(argv))\n",
    "imported run": "from subprocess import run\nrun('ls -l')\n",
    "getoutput": "import subprocess\nsubprocess.getoutput('ls')\n",
    "run_tool string": "from apex_orch.llama.tools import run_tool\nrun_tool('llama-quantize a b')\n",
}
BAD_YAML = {
    "yaml.load": "import yaml\nyaml.load(text)\n",
    "yaml.load Loader": "import yaml\nyaml.load(text, Loader=yaml.Loader)\n",
    "unsafe_load": "import yaml\nyaml.unsafe_load(text)\n",
    "full_load": "import yaml\nyaml.full_load(text)\n",
    "FullLoader class": "import yaml\nclass L(yaml.FullLoader):\n    pass\n",
    "from yaml import load": "from yaml import load\n",
}


@pytest.mark.parametrize("case", list(BAD_SNIPPETS))
def test_checker_catches_shell_use(case, tmp_path):
    src = tmp_path / "probe.py"
    src.write_text(BAD_SNIPPETS[case])
    assert shell_problems(src), case


@pytest.mark.parametrize("case", list(BAD_YAML))
def test_checker_catches_unsafe_yaml(case, tmp_path):
    src = tmp_path / "probe.py"
    src.write_text(BAD_YAML[case])
    assert yaml_problems(src), case


def test_checker_accepts_argument_lists_and_safe_yaml(tmp_path):
    src = tmp_path / "probe.py"
    src.write_text("import subprocess, yaml\nsubprocess.run(['ls', '-l'], shell=False)\nsubprocess.run(argv)\n"
                   "yaml.safe_load(t)\nyaml.load(t, Loader=yaml.SafeLoader)\nclass L(yaml.SafeLoader):\n    pass\n")
    assert shell_problems(src) == [] and yaml_problems(src) == []
