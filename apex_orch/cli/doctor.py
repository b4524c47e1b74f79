"""`apex-orch doctor`: what apex-orch runs on, and what to do when something is missing."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import click

from apex_orch import __version__, pin
from apex_orch.errors import ToolNotFoundError
from apex_orch.llama import build_info, build_label, find_libllama, find_tool


def _bindings_probe(lib_dir: Path | None) -> dict:
    """Import the bindings in a child interpreter (so this process stays clean) and
    report which libllama it mapped."""
    code = (
        "import json,sys\n"
        "from apex_orch.bindings import load_llama_cpp, loaded_libllama\n"
        "m = load_llama_cpp()\n"
        "print(json.dumps({'version': getattr(m, '__version__', '?'), 'lib': str(loaded_libllama())}))\n"
    )
    env = dict(os.environ)
    if lib_dir:
        env["APEX_LLAMA_BIN_DIR"] = str(lib_dir)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["unknown error"])[-1]
        return {"ok": False, "error": last}
    return {"ok": True, **json.loads(proc.stdout.strip().splitlines()[-1])}


def collect(workdir: Path) -> dict:
    report: dict = {"apex_orch": __version__, "python": sys.version.split()[0],
                    "llama_cpp_build": build_label(), "build_info": build_info(),
                    "cache": str(pin.pin_dir()), "tools": {}, "problems": []}
    for tool in pin.TOOL_TARGETS:
        try:
            loc = find_tool(tool)
            report["tools"][tool] = {"path": str(loc.path), "source": loc.source}
        except ToolNotFoundError as exc:
            report["tools"][tool] = {"missing": exc.message}
            report["problems"].append(f"{tool} missing: run `make llama`")
    try:
        lib = find_libllama()
        report["libllama"] = str(lib.resolve())
    except ToolNotFoundError as exc:
        report["libllama"] = None
        report["problems"].append(f"{exc.message}: run `make llama`")
        lib = None
    bindings = _bindings_probe(lib.parent if lib else None)
    report["bindings"] = bindings
    if not bindings["ok"]:
        report["problems"].append(f"bindings: {bindings['error']}: run `make bindings`")
        report["shared_libllama"] = False
    else:
        report["shared_libllama"] = bool(lib) and Path(bindings["lib"]).resolve() == lib.resolve()
        if not report["shared_libllama"]:
            report["problems"].append(
                f"the bindings loaded {bindings['lib']}, not the tools' {lib}: run `make bindings`")
    usage = shutil.disk_usage(workdir)
    report["workdir"] = str(workdir)
    report["free_disk_bytes"] = usage.free
    return report


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
        click.echo(f"bindings         {'llama-cpp-python ' + b['version'] + ' -> ' + b['lib'] if b['ok'] else 'NOT USABLE'}")
        click.echo(f"one libllama     {'yes' if report['shared_libllama'] else 'NO'}")
        click.echo(f"free disk        {report['free_disk_bytes'] / 1e9:.1f} GB in {report['workdir']}")
        for problem in report["problems"]:
            click.echo(f"problem: {problem}")
    if report["problems"]:
        raise SystemExit(1)
