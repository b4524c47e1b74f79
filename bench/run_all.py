"""`make bench`: every orchestration benchmark, one after the other, results in bench/results/.

    .venv/bin/python bench/run_all.py                  # plan, quantize (--big), eval, release, integrity
    .venv/bin/python bench/run_all.py --only quantize,release
    .venv/bin/python bench/run_all.py --smoke --out /tmp/b   # CI: every bench in its tiny mode

Each bench runs as its own process (a crash or a leak in one cannot skew the next) and writes
its own JSON + Markdown with the machine, date, commit and the load average at its start and
end. The quality benchmark is separate (`make bench-quality`): it needs the trained reference
model and takes about an hour on 2 busy cores.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import RESULTS, load_average  # noqa: E402

# name -> (script, arguments for the full run, arguments for --smoke)
BENCHES: dict[str, tuple[str, list[str], list[str]]] = {
    "plan": ("bench_plan.py", [], ["--smoke"]),
    "quantize": ("bench_quantize.py", ["--big"], ["--smoke"]),
    "eval": ("bench_eval.py", [], ["--smoke"]),
    "release": ("bench_release.py", [], ["--smoke"]),
    "integrity": ("bench_integrity.py", [], ["--smoke"]),
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def headline(name: str, out: Path) -> str:
    """One line with the figure each bench exists for (read back from its JSON)."""
    try:
        if name == "plan":
            d = json.loads((out / "plan-time.json").read_text())
            worst = max(d["profiles"].values(), key=lambda v: v["median_ms"])
            return (f"plan: median {min(v['median_ms'] for v in d['profiles'].values())}–{worst['median_ms']} ms per "
                    f"profile; `apex-orch plan` process {d['cli_process_median_s']} s")
        if name == "quantize":
            d = json.loads((out / "quantize-overhead.json").read_text())
            return "quantize: " + "; ".join(f"{r['model']} apex/raw {r['ratio']} (+{r['overhead_s']} s)"
                                            for r in d["results"])
        if name == "eval":
            d = json.loads(max(out.glob("eval-*.json"), key=lambda p: p.stat().st_mtime).read_text())
            s = d["summary"]
            return (f"eval: bindings/llama-perplexity end-to-end throughput "
                    f"{s['perplexity']['ratio_end_to_end']:.2f}x (PPL), "
                    f"{s['kl_divergence']['ratio_end_to_end']:.2f}x (KLD)")
        if name == "release":
            d = json.loads((out / "release-phases.json").read_text())
            t = d["totals"]
            return (f"release: {t['release_wall_s']:.1f} s wall vs {t['raw_tools_s']:.1f} s raw tools "
                    f"({t['ratio_wall_to_raw_tools']}x)")
        if name == "integrity":
            d = json.loads((out / "integrity.json").read_text())
            r = d["ratios"]
            return (f"integrity: checks {r['first_run_checks_to_tool']:.2%} of tool time on a first run, "
                    f"{r['rerun_checks_to_tool']:.3%} on an up-to-date rerun; sha256 {d['sha256']['gb_per_s']} GB/s")
    except (OSError, ValueError, KeyError) as exc:
        return f"{name}: no result to summarise ({exc})"
    return name


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="every bench in its CI mode")
    ap.add_argument("--out", type=Path, default=None, help="results folder (default bench/results)")
    ap.add_argument("--only", default=None, help=f"comma-separated subset of {','.join(BENCHES)}")
    ap.add_argument("--skip", default="", help="comma-separated benches to leave out")
    args = ap.parse_args(argv)
    names = [n.strip() for n in args.only.split(",")] if args.only else list(BENCHES)
    skip = {n.strip() for n in args.skip.split(",") if n.strip()}
    unknown = [n for n in names + list(skip) if n not in BENCHES]
    if unknown:
        ap.error(f"unknown bench {', '.join(unknown)}; choose from {', '.join(BENCHES)}")
    out = args.out or RESULTS
    start_load = load_average()
    log(f"load average at start {start_load}")
    failed, lines = [], []
    for name in [n for n in names if n not in skip]:
        script, full, smoke = BENCHES[name]
        cmd = [sys.executable, str(HERE / script), *(smoke if args.smoke else full), "--out", str(out)]
        log(f"{name}: {' '.join(cmd[1:])}")
        t0 = time.monotonic()
        rc = subprocess.run(cmd).returncode
        log(f"{name}: exit {rc} after {time.monotonic() - t0:.1f} s")
        if rc != 0:
            failed.append(name)
        else:
            lines.append(headline(name, out))
    log(f"load average at end {load_average()} (start {start_load})")
    print("\n".join(["", "summary:"] + [f"  {x}" for x in lines]))
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
