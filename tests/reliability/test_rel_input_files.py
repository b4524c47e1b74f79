"""Every input file is opened one way (apex_orch.core.infiles), at every entry point.

Two proofs that no entry point reads a path another way:
- the CLI walk: every file parameter of every command (found by walking the Click tree, so a new one
  fails here until it is listed) is given a FIFO, and the entry points that read a path from a name
  or a release config too: each run ends at once with the kind's exit code and `is not a regular
  file (a FIFO / named pipe)` (a FIFO that blocked would hang: a watchdog fails the case instead);
- the source scan: the reading primitives (open, read_text/read_bytes, GGUFReader, memmap, gzip/tar/
  zip opens, json.load, mmap) appear only in core/infiles.py and in the listed exceptions, each with
  its reason.
And the size bound per kind (docs/reliability.md): a file over it is refused before it is read;
/dev/zero (a device) is refused at the three entry points that used to read it until memory ran out.
"""

from __future__ import annotations

import ast
import os
import threading
from pathlib import Path

import click
import pytest
import yaml

from apex_orch.cli import main
from apex_orch.core.infiles import KINDS
from relkit import assert_one_error, cli, made_up_sensitivity

PACKAGE = Path(__file__).resolve().parents[2] / "apex_orch"
FIFO_MESSAGE = "is not a regular file (a FIFO / named pipe)"

# Parameters that name outputs (the output guard's business, tests/reliability/test_rel_entrypoints.py).
OUTPUT_PARAMS = {("compare", "plot"), ("corpus build", "output"), ("fit", "output"), ("imatrix", "output"),
                 ("profile import", "output"), ("quantize", "output"), ("render", "output"),
                 ("sensitivity", "output")}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tiny_moe) -> dict:
    """Valid values for every other argument: the model, a text, a sensitivity result, an imatrix, a
    release config, a tensor-type file."""
    folder = tmp_path_factory.mktemp("walk")
    text = folder / "text.txt"
    from apex_orch.demo.synthetic import demo_text
    text.write_text(demo_text())
    sens = folder / "sens.json"
    sens.write_text(made_up_sensitivity(tiny_moe).to_json())
    rules = folder / "rules.txt"
    rules.write_text("ffn_down_exps=q4_k\nffn_gate_exps=q4_k\nffn_up_exps=q4_k\n")
    im = folder / "im.gguf"
    r = cli("imatrix", tiny_moe, "--corpus", "wikipedia", "--imatrix-ctx", "64", "--imatrix-chunks", "2", "-o", im)
    assert r.exit_code == 0, r.output
    release = folder / "release.yaml"
    release.write_text(yaml.safe_dump({"name": "Walk", "license": "mit", "source": {"gguf": str(tiny_moe)},
                                       "tiers": ["compact"], "eval": {"enabled": False},
                                       "publish": {"repo": "apex-test/Walk"}}))
    return {"M": tiny_moe, "T": text, "S": sens, "R": rules, "I": im, "C": release, "D": folder}


# (command, parameter) -> (argument list with {F} for the FIFO, the kind whose error it is)
CASES = {
    ("compare", "files"): ("compare {F} --base {M} --text {T} --no-speed", "model"),
    ("compare", "base"): ("compare {M} --base {F} --text {T} --no-speed", "model"),
    ("compare", "text"): ("compare {M} --base {M} --text {F} --no-speed", "text"),
    ("compare", "baseline"): ("compare {M} --base {M} --baseline {F} --text {T} --no-speed", "model"),
    ("corpus build", "model"): ("corpus build wikipedia --model {F} -o {D}/c.txt", "model"),
    ("eval", "model"): ("eval {F} --text {T} --dry-run", "model"),
    ("eval", "base"): ("eval {M} --base {F} --text {T} --dry-run", "model"),
    ("eval", "text"): ("eval {M} --text {F} --dry-run", "text"),
    ("fit", "model"): ("fit {F} --sensitivity {S} --size 20MB", "model"),
    ("fit", "sensitivity_path"): ("fit {M} --sensitivity {F} --size 20MB", "sensitivity"),
    ("imatrix", "model"): ("imatrix {F} --corpus wikipedia --dry-run", "model"),
    ("imatrix-report", "file"): ("imatrix-report {F}", "imatrix"),
    ("imatrix-report", "model"): ("imatrix-report {I} --model {F}", "model"),
    ("inspect", "model"): ("inspect {F}", "model"),
    ("plan", "model"): ("plan -p compact {F}", "model"),
    ("profile import", "file"): ("profile import {F}", "tensor-types"),
    ("profile import", "model"): ("profile import {R} --model {F}", "model"),
    ("quantize", "model"): ("quantize {F} -p compact --dry-run", "model"),
    ("quantize", "imatrix"): ("quantize {M} -p compact --imatrix {F} --dry-run", "imatrix"),
    ("release", "config"): ("release {F} --dry-run", "config"),
    ("release", "source"): ("release {C} --source {F} --dry-run --out-dir {D}/rel", "model"),
    ("render", "model"): ("render -p compact {F}", "model"),
    ("sensitivity", "model"): ("sensitivity {F} --text {T} --dry-run", "model"),
    ("sensitivity", "imatrix"): ("sensitivity {M} --imatrix {F} --text {T} --dry-run", "imatrix"),
    ("speculate", "model"): ("speculate {F}", "model"),
    ("speculate", "draft"): ("speculate {M} --draft {F}", "model"),
    ("sensitivity", "text"): ("sensitivity {M} --text {F} --dry-run", "text"),
    ("sensitivity", "calibration_path"): ("sensitivity {M} --text {T} --method proxy --calibration {F} --dry-run",
                                          "sensitivity"),
}
# Entry points that take a name or a path (a FIFO named *.yaml), and paths inside a release config.
NAMED_CASES = {
    "profile -p": ("plan -p {F} {M}", "config"),
    "profile show": ("profile show {F}", "config"),
    "fit --base-profile": ("fit {M} --sensitivity {S} --size 20MB --base-profile {F}", "config"),
    "corpus show": ("corpus show {F}", "config"),
    "eval --eval-corpus": ("eval {M} --eval-corpus {F} --dry-run", "config"),
    "sensitivity --eval-corpus": ("sensitivity {M} --eval-corpus {F} --dry-run", "config"),
}


def _file_params() -> set[tuple[str, str]]:
    """(command path, parameter name) of every click.Path parameter that may name a file."""
    ctx = click.Context(main)
    found = set()

    def walk(cmd: click.Command, prefix: list[str]) -> None:
        if isinstance(cmd, click.Group):
            for name in cmd.list_commands(ctx):
                walk(cmd.get_command(ctx, name), prefix + [name])
            return
        for p in cmd.params:
            if isinstance(p.type, click.Path) and p.type.file_okay:
                found.add((" ".join(prefix), p.name))
    walk(main, [])
    return found


def test_every_file_parameter_of_the_cli_is_walked():
    assert _file_params() == set(CASES) | OUTPUT_PARAMS


def _run_on_fifo(args: list[str], fifo: Path):
    """The CLI in-process; a run still blocked after a minute is released (the FIFO opened for
    writing, then closed) and reported, never left hanging."""
    box: dict = {}
    worker = threading.Thread(target=lambda: box.setdefault("r", cli(*args)), daemon=True)
    worker.start()
    worker.join(60)
    if worker.is_alive():
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        os.close(fd)
        worker.join(60)
        pytest.fail(f"`apex-orch {' '.join(args)}` blocked on the FIFO")
    return box["r"]


def _args(template: str, fifo: Path, inputs: dict) -> list[str]:
    return [a.format(F=fifo, **inputs) for a in template.split()]


@pytest.mark.parametrize("key", sorted(CASES), ids=lambda k: f"{k[0]}:{k[1]}")
def test_a_fifo_is_refused_at_every_file_parameter(key, inputs, tmp_path):
    template, kind = CASES[key]
    fifo = tmp_path / "input.fifo"
    os.mkfifo(fifo)
    r = _run_on_fifo(_args(template, fifo, inputs), fifo)
    assert_one_error(r.output, KINDS[kind].error.exit_code, r.exit_code, f"{fifo}: {FIFO_MESSAGE}")


@pytest.mark.parametrize("name", sorted(NAMED_CASES))
def test_a_fifo_is_refused_where_a_name_or_a_path_is_taken(name, inputs, tmp_path):
    template, kind = NAMED_CASES[name]
    fifo = tmp_path / "named.yaml"
    os.mkfifo(fifo)
    r = _run_on_fifo(_args(template, fifo, inputs), fifo)
    assert_one_error(r.output, KINDS[kind].error.exit_code, r.exit_code, f"{fifo}: {FIFO_MESSAGE}")


@pytest.mark.parametrize("field", ["eval_text", "fit_sensitivity", "source_gguf", "mmproj_file"])
def test_a_fifo_is_refused_inside_a_release_config(field, inputs, tmp_path):
    fifo = tmp_path / ("inside.gguf" if field in ("source_gguf", "mmproj_file") else "inside.fifo")
    os.mkfifo(fifo)
    doc = {"name": "Walk", "license": "mit", "source": {"gguf": str(inputs["M"])}, "tiers": ["compact"],
           "eval": {"enabled": False}, "publish": {"repo": "apex-test/Walk"}}
    if field == "eval_text":
        doc["eval"] = {"text": str(fifo), "ctx": 64}
    elif field == "fit_sensitivity":
        doc["tiers"] = [{"fit": {"size": "20MB", "sensitivity": str(fifo)}, "tier": "Fit-20MB"}]
    elif field == "source_gguf":
        doc["source"] = {"gguf": str(fifo)}
    else:
        doc["mmproj"] = {"file": str(fifo)}
    cfg = tmp_path / "release.yaml"
    cfg.write_text(yaml.safe_dump(doc))
    r = _run_on_fifo(["release", str(cfg), "--dry-run", "--out-dir", str(tmp_path / "out")], fifo)
    assert r.exit_code != 0 and f"{fifo}: {FIFO_MESSAGE}" in r.output, r.output
    assert "Traceback" not in r.output and not (tmp_path / "out").exists()


@pytest.mark.parametrize("args, kind", [
    ("eval {M} --text /dev/zero --dry-run", "text"),
    ("sensitivity {M} --text /dev/zero --dry-run", "text"),
    ("fit {M} --sensitivity /dev/zero --size 20MB", "sensitivity"),
])
def test_a_device_is_refused_before_a_byte_is_read(args, kind, inputs):
    r = cli(*[a.format(**inputs) for a in args.split()])
    assert_one_error(r.output, KINDS[kind].error.exit_code, r.exit_code,
                     "/dev/zero: is not a regular file (a character device)")


@pytest.mark.parametrize("args, kind", [
    ("eval {M} --text {big} --dry-run", "text"),
    ("sensitivity {M} --text {big} --dry-run", "text"),
    ("fit {M} --sensitivity {big} --size 20MB", "sensitivity"),
    ("profile import {big}", "tensor-types"),
    ("plan -p {big} {M}", "config"),
])
def test_a_file_over_its_kind_bound_is_refused_before_it_is_read(args, kind, inputs, tmp_path):
    """A sparse file one byte over the bound (no disk used): refused from its size, never read."""
    big = tmp_path / ("big.yaml" if kind == "config" else "big.txt")
    with open(big, "wb") as fh:
        fh.truncate(KINDS[kind].max_bytes + 1)
    r = cli(*[a.format(big=big, **inputs) for a in args.split()])
    assert_one_error(r.output, KINDS[kind].error.exit_code, r.exit_code,
                     f"{big}: file is {KINDS[kind].max_bytes + 1:,} bytes; ",
                     f"may hold at most {KINDS[kind].max_bytes:,}")


# ---------------------------------------------------------------------------- the source scan

READERS = {"open", "read_text", "read_bytes", "GGUFReader", "memmap", "ZipFile", "mmap", "os.open", "gzip.open",
           "tarfile.open", "io.open", "json.load"}

# module -> {primitive: count}: the reads that do not go through core.infiles, each for a reason.
EXCEPTIONS = {
    "core/infiles.py": None,   # the one way (any number)
    "core/fingerprint.py": ({"open": 2}, "hashes files their readers opened through core.infiles first (models, "
                                         "imatrices) or that apex-orch wrote and verified"),
    "core/safefiles.py": ({"os.open": 2, "open": 1}, "creates outputs (O_EXCL / O_NOFOLLOW); copies an imatrix "
                                                     "read_imatrix has checked"),
    "model/gguf_header.py": ({"mmap": 1}, "maps the file core.infiles.open_input opened"),
    "evaluation/base_cache.py": ({"ZipFile": 2}, "writes its own cache; reads the file core.infiles opened"),
    "llama/build.py": ({"read_text": 3, "tarfile.open": 1},
                       "the build (standard library only, run before apex-orch is installed): its own logs, the "
                       "sha256-checked sdist and its build records"),
    "llama/pin.py": ({"read_text": 1}, "the build's own record of the active build (standard library only)"),
    "llama/bindings.py": ({"read_text": 1}, "this process's own memory map (/proc/self/maps)"),
    "calibration/chat_template.py": ({"open": 1}, "the sandbox worker's own memory use (/proc/self/statm)"),
    "demo/synthetic.py": ({"open": 1}, "patches the model file it is writing"),
    "demo/trained.py": ({"read_bytes": 3, "read_text": 2}, "package data apex-orch ships (the demo's committed "
                                                           "vocabulary and record, the calibration samples) and the "
                                                           "demo file it has just written, to hash it"),
}


def _reads(path: Path) -> dict[str, int]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    counts: dict[str, int] = {}
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        name = None
        if isinstance(f, ast.Name) and f.id in ("open", "GGUFReader"):
            name = f.id
        elif isinstance(f, ast.Attribute):
            owner = f.value.id if isinstance(f.value, ast.Name) else None
            if f.attr in ("read_text", "read_bytes", "GGUFReader", "memmap", "ZipFile") or (
                    f.attr == "mmap" and owner == "mmap"):
                name = f.attr
            elif f.attr in ("open", "load") and owner in ("os", "gzip", "tarfile", "io", "json"):
                name = f"{owner}.{f.attr}"
        if name is not None:
            counts[name] = counts.get(name, 0) + 1
    return counts


def test_no_module_reads_a_file_another_way():
    found = {}
    for p in sorted(PACKAGE.rglob("*.py")):
        rel = str(p.relative_to(PACKAGE))
        if rel.startswith("calibration/samples/") or "__pycache__" in p.parts:   # sample code is corpus data
            continue
        counts = _reads(p)
        if counts and rel != "core/infiles.py":
            found[rel] = counts
    allowed = {k: v[0] for k, v in EXCEPTIONS.items() if v is not None}
    assert found == allowed, "read files through apex_orch.core.infiles (or list the exception and its reason)"


def test_the_scan_sees_every_spelling(tmp_path):
    planted = {"a.py": "open('x')\n", "b.py": "from pathlib import Path\nPath('x').read_text()\n",
               "c.py": "import os\nos.open('x', 0)\n", "d.py": "import gzip\ngzip.open('x')\n",
               "e.py": "from gguf import GGUFReader\nGGUFReader('x')\n", "f.py": "import json\njson.load(fh)\n",
               "g.py": "import numpy as np\nnp.memmap('x')\n", "h.py": "p.read_bytes()\n"}
    for name, text in planted.items():
        (tmp_path / name).write_text(text)
        assert _reads(tmp_path / name), name
    (tmp_path / "clean.py").write_text("import json\njson.loads('{}')\nx.open()\n")
    assert _reads(tmp_path / "clean.py") == {}
