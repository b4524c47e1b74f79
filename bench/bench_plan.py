"""Plan time on the Mistral-Small-4-119B header-only replica (615 tensors), every profile.

Run: .venv/bin/python bench/bench_plan.py [--repeat N] [--out DIR] [--smoke]   (part of `make bench`)
Measures read_model (header parse) + load_profile + make_plan (incl. rendering and the rule
simulation), median of 20 runs per profile, and the same for `apex-orch plan` as a process.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, write_results  # noqa: E402

from apex_orch.model.info import read_model  # noqa: E402
from apex_orch.plan.planner import make_plan  # noqa: E402
from apex_orch.plan.profile_search import list_profiles  # noqa: E402
from apex_orch.plan.profiles import load_profile  # noqa: E402
from apex_orch.demo.synthetic import write_mistral_small_4_replica  # noqa: E402

REPEAT = 20
CLI_RUNS = 5


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
        cli = []
        for _ in range(cli_runs):
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-m", "apex_orch.cli", "plan", "-p", "compact", str(replica)],
                           check=True, capture_output=True)
            cli.append(time.perf_counter() - t0)
    data = {"machine": machine(), "repeat": repeat, "profiles": rows,
            "cli_process_median_s": round(statistics.median(cli), 3)}
    md = ["# Plan time on the Mistral-Small-4-119B replica (615 tensors)", "",
          "| profile | median | max | rules |", "|---|---|---|---|"]
    md += [f"| {k} | {v['median_ms']} ms | {v['max_ms']} ms | {v['rules']} |" for k, v in rows.items()]
    md += ["", f"Whole `apex-orch plan -p compact` process (Python start-up included): "
               f"{data['cli_process_median_s']} s median of {cli_runs}."]
    write_results("plan-time", data, "\n".join(md), args.out)
    print("\n".join(md))


if __name__ == "__main__":
    main()
