"""The package layout keeps its promises: packages import downwards along the flow,
no module imports itself back through others, no module grows past the size a newcomer can read,
and every package says what stage it is.

Read from the source with `ast` (every import, function-local ones included), so these hold for
code paths no other test happens to run.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "apex_orch"

# The flow, bottom to top: a package may import only from packages at its own level or below.
LAYERS = ("core", "llama", "model", "demo", "plan", "calibration", "quantize", "evaluation", "fit", "release", "cli")
MAX_LINES = 500


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        if "samples" in rel.parts:     # calibration samples that happen to be code: corpus data, not modules
            continue
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _imports(path: Path, module: str, known: set[str]) -> set[str]:
    """The apex_orch modules `module` imports (a `from pkg import name` counts pkg.name when that is
    a module, else pkg)."""
    found = set()
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        found.update(n for n in names if n == "apex_orch" or n.startswith("apex_orch."))
    found.discard(module)
    return found


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    known = set(mods)
    return {m: {i for i in _imports(p, m, known) if i in known} for m, p in mods.items()}


def _layer(module: str) -> int | None:
    parts = module.split(".")
    return LAYERS.index(parts[1]) if len(parts) > 1 and parts[1] in LAYERS else None


def test_packages_import_downwards_only():
    upward = []
    for mod, deps in _graph().items():
        here = _layer(mod)
        for dep in deps:
            there = _layer(dep)
            if here is not None and there is not None and there > here:
                upward.append(f"{mod} -> {dep}")
    assert upward == []


def test_no_import_cycles():
    graph = _graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:          # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert cycles == []


def test_no_module_is_too_long_to_read():
    long = {m: n for m, p in _modules().items() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}


@pytest.mark.parametrize("package", LAYERS)
def test_each_package_says_its_stage(package):
    doc = ast.get_docstring(ast.parse((PACKAGE / package / "__init__.py").read_text()))
    assert doc and len(doc.split()) >= 12


def test_the_checks_can_fail(tmp_path, monkeypatch):
    """The same functions on a planted package: an upward import and a cycle are found."""
    pkg = tmp_path / "apex_orch"
    for sub in ("core", "plan"):
        (pkg / sub).mkdir(parents=True)
        (pkg / sub / "__init__.py").write_text('"""x"""\n')
    (pkg / "__init__.py").write_text("")
    (pkg / "core" / "a.py").write_text("from apex_orch.plan import b\n")
    (pkg / "plan" / "b.py").write_text("import apex_orch.core.a\n")
    monkeypatch.setattr(__import__(__name__), "PACKAGE", pkg)
    graph = _graph()
    assert graph["apex_orch.core.a"] == {"apex_orch.plan.b"}
    assert graph["apex_orch.plan.b"] == {"apex_orch.core.a"}
    with pytest.raises(AssertionError):
        test_packages_import_downwards_only()
    with pytest.raises(AssertionError):
        test_no_import_cycles()
