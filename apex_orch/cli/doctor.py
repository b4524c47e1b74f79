"""`apex-orch doctor`: what apex-orch runs on, and what to do when something is missing."""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from pathlib import Path

import click

from apex_orch import __version__
from apex_orch.core.errors import ApexError, ToolNotFoundError
from apex_orch.core.infiles import read_json
from apex_orch.llama import pin
from apex_orch.llama.tools import (build_info, build_label, capture_tool, configured_bin_dir, find_libllama,
                                   find_tool)


def _bindings_probe(lib_dir: Path | None) -> dict:
    """Import the bindings in a child interpreter (so this process stays clean) and
    report which libllama it mapped. The folder to load libllama from travels as an argument
    (the child does not see this process's --llama-bin-dir); "" lets the child search itself."""
    code = (
        "import json,sys\nfrom apex_orch.llama.bindings import load_llama_cpp, loaded_libllama\n"
        "m = load_llama_cpp(sys.argv[1] or None)\n"
        "print(json.dumps({'version': getattr(m, '__version__', '?'), 'lib': str(loaded_libllama())}))\n"
    )
    try:
        proc = capture_tool([sys.executable, "-c", code, str(lib_dir or "")], timeout=120, what="the bindings probe")
    except ApexError as exc:
        return {"ok": False, "error": exc.message}
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["unknown error"])[-1]
        return {"ok": False, "error": last}
    return {"ok": True, **json.loads(proc.stdout.strip().splitlines()[-1])}


def collect(workdir: Path) -> dict:
    report: dict = {"apex_orch": __version__, "python": sys.version.split()[0],
                    "llama_cpp_build": build_label(), "build_info": build_info(),
                    "cache": str(pin.pin_dir()), "tools": {}, "tool_versions": {}, "problems": [],
                    "warnings": []}
    setup = pin.setup_command("llama")
    for tool in pin.TOOL_TARGETS:
        try:
            loc = find_tool(tool)
            report["tools"][tool] = {"path": str(loc.path), "source": loc.source}
            report["tool_versions"][tool] = tool_build(loc.path)
        except ToolNotFoundError as exc:
            report["tools"][tool] = {"missing": exc.message}
            report["problems"].append(f"{tool} missing: run `{setup}`")
    versions = report["tool_versions"]
    report["pinned_build"] = bool(versions) and all(v["pinned"] for v in versions.values())
    for tool, v in versions.items():
        if not v["pinned"]:
            report["warnings"].append(
                f"{tool} is not the pinned build (it says version {v['version']}, commit {v['commit']}; "
                f"pinned: llama.cpp@{pin.LLAMA_CPP_COMMIT}): quantize cross-checks every plan with its "
                "--dry-run and stops on a difference (--trust-tool-plan takes its types)")
    try:
        lib = find_libllama()
        report["libllama"] = str(lib.resolve())
    except ToolNotFoundError as exc:
        report["libllama"] = None
        report["problems"].append(f"{exc.message}: run `{setup}`")
        lib = None
    bindings = _bindings_probe(lib.parent if lib else configured_bin_dir())
    report["bindings"] = bindings
    if not bindings["ok"]:
        report["problems"].append(f"bindings: {bindings['error']}: run `{pin.setup_command('bindings')}`")
        report["shared_libllama"] = False
    else:
        report["shared_libllama"] = bool(lib) and Path(bindings["lib"]).resolve() == lib.resolve()
        if not report["shared_libllama"]:
            report["problems"].append(
                f"the bindings loaded {bindings['lib']}, not the tools' {lib}: run `{pin.setup_command('bindings')}`")
    usage = shutil.disk_usage(workdir)
    report["workdir"] = str(workdir)
    report["free_disk_bytes"] = usage.free
    return report


# "version: 0.5.0-dev (build 1, commit 0c1e570)"; older builds: "version: 4567 (0c1e570)".
VERSION_LINE = re.compile(r"version:\s*(\S+)\s*\((?:build \d+, )?(?:commit )?([0-9a-zA-Z]+)\)")
# llama-quantize has no --version; it prints the same line first on any run, so a dry run of
# /dev/null (fails at once, writes nothing) shows it.
VERSION_PROBES = {"llama-quantize": ["--dry-run", os.devnull, os.devnull, "Q8_0"]}


def tool_build(path: Path) -> dict:
    """What a tool says of its build (`--version`: "version: N (commit)"), and whether it is the
    pin: built by apex-orch from the pinned sdist (its build-info.json says so), or printing the
    pinned commit."""
    try:
        proc = capture_tool([path, *VERSION_PROBES.get(path.name, ["--version"])], timeout=30)
        text = proc.stdout + proc.stderr
    except ApexError as exc:
        text = exc.message
    m = VERSION_LINE.search(text)
    version, commit = (m.group(1), m.group(2)) if m else ("?", "?")
    info_path = path.resolve().parent.parent / "build-info.json"
    try:
        info = read_json(info_path, "record")
    except ApexError:   # none, or damaged: judged by the tool's own --version below
        info = {}
    info = info if isinstance(info, dict) else {}
    from_pin = info.get("sdist_sha256") == pin.SDIST_SHA256 and info.get("commit") == pin.LLAMA_CPP_COMMIT
    pinned = from_pin or (commit != "?" and len(commit) >= 7 and
                          (pin.LLAMA_CPP_COMMIT.startswith(commit) or commit.startswith(pin.LLAMA_CPP_COMMIT)))
    return {"version": version, "commit": info.get("commit", commit) if from_pin else commit,
            "pinned": pinned, "extra_flags": info.get("extra_flags", []) if from_pin else None}


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def doctor(as_json: bool) -> None:
    """Show apex-orch's version, the llama.cpp build, where each binary and libllama
    come from, whether the bindings and the tools share one libllama, and free disk."""
    report = collect(Path.cwd())
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        click.echo(f"apex-orch        {report['apex_orch']} (python {report['python']})")
        click.echo(f"llama.cpp        {report['llama_cpp_build']}")
        info = report["build_info"]
        if info:
            click.echo(f"  build cache    {report['cache']} (built {info.get('built_at', '?')})")
        else:
            click.echo(f"  build cache    {report['cache']} (not built)")
        for tool, where in report["tools"].items():
            text = f"{where['path']} [{where['source']}]" if "path" in where else "MISSING"
            click.echo(f"{tool:<17}{text}")
        click.echo(f"libllama         {report['libllama'] or 'MISSING'}")
        b = report["bindings"]
        bindings = f"llama-cpp-python {b['version']} -> {b['lib']}" if b['ok'] else "NOT USABLE"
        click.echo(f"bindings         {bindings}")
        click.echo(f"one libllama     {'yes' if report['shared_libllama'] else 'NO'}")
        click.echo(f"free disk        {report['free_disk_bytes'] / 1e9:.1f} GB in {report['workdir']}")
        click.echo(f"pinned build     {'yes' if report['pinned_build'] else 'NO'}"
                   + (f" (extra CMake flags: {' '.join(flags)})"
                      if (flags := next((v['extra_flags'] for v in report['tool_versions'].values()
                                          if v.get('extra_flags')), None)) else ""))
        for warning in report["warnings"]:
            click.echo(f"warning: {warning}")
        for problem in report["problems"]:
            click.echo(f"problem: {problem}")
    if report["problems"]:
        raise SystemExit(1)
