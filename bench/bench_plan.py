"""Plan time on the Mistral-Small-4-119B header-only replica (615 tensors), every profile.

Run: .venv/bin/python bench/bench_plan.py [--repeat N] [--out DIR] [--smoke]   (part of `make bench`)
Measures read_model (header parse) + load_profile + make_plan (incl. rendering and the rule
simulation), median of 20 runs per profile; then, side by side on the same header, the whole
`apex-orch plan -p compact` process against the pinned `llama-quantize --dry-run` process given the
same plan's rules (what quantize's own check runs): wall and CPU time, interleaved runs, and their
ratio (the target: the plan process at most 3x the tool's).
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, write_results  # noqa: E402

from apex_orch.llama.tools import find_tool  # noqa: E402
from apex_orch.model.info import read_model  # noqa: E402
from apex_orch.plan.planner import make_plan  # noqa: E402
from apex_orch.plan.profile_search import list_profiles  # noqa: E402
from apex_orch.plan.profiles import load_profile  # noqa: E402
from apex_orch.demo.synthetic import write_mistral_small_4_replica  # noqa: E402

REPEAT = 20
CLI_RUNS = 11
TARGET_RATIO = 3.0


# As an installed apex-orch runs: from compiled bytecode (a PYTHONDONTWRITEBYTECODE=1 environment would
# compile every module in every process and time the compiler).
ENV = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}


def timed_process(argv: list[str]) -> tuple[float, float]:
    """(wall seconds, CPU seconds: user + system) of one child process run to its end."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    subprocess.run(argv, check=True, capture_output=True, env=ENV)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def side_by_side(replica: Path, folder: Path, runs: int) -> dict:
    """`apex-orch plan -p compact` and `llama-quantize --dry-run` (the compact plan's rules, its base
    type) on the same header, interleaved so both see the same load; medians and ratios."""
    rules = folder / "compact.tensor-types.txt"
    subprocess.run([sys.executable, "-m", "apex_orch.cli", "render", "-p", "compact", str(replica), "-o", str(rules)],
                   check=True, capture_output=True)
    base = load_profile("compact").base_ftype
    tool = [str(find_tool("llama-quantize").path), "--dry-run", "--tensor-type-file", str(rules), str(replica),
            str(folder / "never-written.gguf"), base, str(os.cpu_count() or 1)]
    plan = [sys.executable, "-m", "apex_orch.cli", "plan", "-p", "compact", str(replica)]
    # the floor of any Python command line reading YAML: the interpreter with click and PyYAML imported
    floor = [sys.executable, "-c", "import click, yaml"]
    argvs = {"plan": plan, "tool": tool, "floor": floor}
    timings: dict[str, list[tuple[float, float]]] = {k: [] for k in argvs}
    for argv in argvs.values():
        timed_process(argv)   # untimed: writes the bytecode, warms the page cache
    for _ in range(runs):
        for key, argv in argvs.items():
            timings[key].append(timed_process(argv))
    med = {k: {"wall_s": round(statistics.median(w for w, _ in v), 3),
               "cpu_s": round(statistics.median(c for _, c in v), 3)} for k, v in timings.items()}
    return {"runs": runs, "plan_process": med["plan"], "tool_dry_run_process": med["tool"],
            "python_click_yaml_process": med["floor"],
            "floor_ratio_cpu": round(med["floor"]["cpu_s"] / max(med["tool"]["cpu_s"], 1e-3), 2),
            "tool_argv": ["llama-quantize", *tool[1:3], "RULES", "REPLICA", "OUT", *tool[-2:]],
            "ratio_wall": round(med["plan"]["wall_s"] / med["tool"]["wall_s"], 2),
            "ratio_cpu": round(med["plan"]["cpu_s"] / max(med["tool"]["cpu_s"], 1e-3), 2),
            "target_ratio": TARGET_RATIO}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=REPEAT, help="plans per profile (median reported)")
    ap.add_argument("--cli-runs", type=int, default=CLI_RUNS, help="`apex-orch plan` processes timed")
    ap.add_argument("--out", type=Path, default=None, help="results folder (default bench/results)")
    ap.add_argument("--smoke", action="store_true", help="CI: 1 plan per profile, 1 process")
    args = ap.parse_args()
    repeat, cli_runs = (1, 1) if args.smoke else (args.repeat, args.cli_runs)
    with tempfile.TemporaryDirectory() as tmp:
        replica = write_mistral_small_4_replica(Path(tmp) / "ms4-replica.gguf")
        rows = {}
        for name in list_profiles():
            times = []
            for _ in range(repeat):
                t0 = time.perf_counter()
                plan = make_plan(read_model(replica), load_profile(name))
                times.append(time.perf_counter() - t0)
            rows[name] = {"median_ms": round(statistics.median(times) * 1000, 2),
                          "max_ms": round(max(times) * 1000, 2), "tensors": len(plan.tensors),
                          "rules": len(plan.rules)}
        startup = side_by_side(replica, Path(tmp), cli_runs)
    data = {"machine": machine(), "repeat": repeat, "profiles": rows,
            "cli_process_median_s": startup["plan_process"]["wall_s"], "startup": startup}
    md = ["# Plan time on the Mistral-Small-4-119B replica (615 tensors)", "",
          "| profile | median | max | rules |", "|---|---|---|---|"]
    md += [f"| {k} | {v['median_ms']} ms | {v['max_ms']} ms | {v['rules']} |" for k, v in rows.items()]
    pp, tp = startup["plan_process"], startup["tool_dry_run_process"]
    md += ["", "## The `apex-orch plan -p compact` process vs `llama-quantize --dry-run`, same header", "",
           f"Medians of {cli_runs} interleaved runs of each after one untimed run (Python start-up included, from "
           "compiled bytecode; the tool given the compact plan's rules and base type, as quantize's own check runs "
           "it). No numpy and no gguf are imported by `plan` (tests/test_startup.py).", "",
           "| process | wall | CPU (user + sys) |", "|---|---|---|",
           f"| `apex-orch plan -p compact` | {pp['wall_s']} s | {pp['cpu_s']} s |",
           f"| `llama-quantize --dry-run` | {tp['wall_s']} s | {tp['cpu_s']} s |",
           f"| ratio (target at most {TARGET_RATIO:g}x) | {startup['ratio_wall']}x | {startup['ratio_cpu']}x |",
           f"| `python -c 'import click, yaml'` (the floor of a Python CLI reading YAML) | "
           f"{startup['python_click_yaml_process']['wall_s']} s | {startup['python_click_yaml_process']['cpu_s']} s "
           f"({startup['floor_ratio_cpu']}x the tool) |"]
    write_results("plan-time", data, "\n".join(md), args.out)
    print("\n".join(md))


if __name__ == "__main__":
    main()
