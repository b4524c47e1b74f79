"""Overhead of `apex-orch quantize` over raw `llama-quantize` with the same arguments.

Run: .venv/bin/python bench/bench_quantize.py [--repeat N] [--big] [--out DIR]   (part of `make bench`)
     --smoke (CI): a ~43 MB 4-block model instead of the demo model, 1 repeat.
For each model (the demo model; with --big also a ~1.6 GB synthetic MoE), alternate:
  raw:  llama-quantize --tensor-type-file RULES --override-kv ... SRC OUT Q4_K_M THREADS
  apex: apex-orch quantize -p compact SRC --out-dir D --force --no-eval -q   (a new process)
and report the medians and their ratio. apex's extra work: Python start-up, header-only
planning, the rule simulation, header verification, sha256 + fingerprint of the output,
the manifest, the rename. On a busy machine the run-to-run spread of the tool itself can
exceed that overhead, so each apex run is also split from inside: its wall time minus the
llama-quantize seconds its manifest records (timings.llama_quantize_s), measured in the same
run, which load moves far less ("in-run overhead").
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, write_results, write_smoke_model  # noqa: E402

from apex_orch.demo import synthetic, trained  # noqa: E402
from apex_orch.demo.spec import SyntheticSpec  # noqa: E402
from apex_orch.core.manifest import manifest_path  # noqa: E402
from apex_orch.plan.render import render_file  # noqa: E402
from apex_orch.quantize.job import plan_quantize  # noqa: E402

BIG = SyntheticSpec(n_layer=16, n_embd=1024, n_expert=16, n_expert_used=2, expert_ff=1024,
                    name="Bench-MoE-1.6G", seed=7)


def bench_model(src: Path, repeat: int, threads: int, work: Path, warm: bool = True) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    job = plan_quantize(src, "compact", out_dir=work / "apex", threads=threads)
    rules = work / "rules.txt"
    rules.write_text(render_file(job.plan))
    raw_out = work / "raw.gguf"
    raw_argv = job.argv(raw_out, rules)
    apex_argv = [sys.executable, "-m", "apex_orch.cli", "quantize", "-p", "compact", str(src), "--out-dir",
                 str(work / "apex"), "--redo", "--no-eval", "-q", "-t", str(threads)]
    raw_t, apex_t, inner_t = [], [], []
    if warm:
        subprocess.run(raw_argv, check=True, capture_output=True)     # warm the page cache once
    for i in range(repeat):
        for kind in (("raw", "apex") if i % 2 == 0 else ("apex", "raw")):
            argv = raw_argv if kind == "raw" else apex_argv
            t0 = time.perf_counter()
            subprocess.run(argv, check=True, capture_output=True)
            (raw_t if kind == "raw" else apex_t).append(time.perf_counter() - t0)
            if kind == "apex":
                doc = json.loads(manifest_path(job.output).read_text())
                inner_t.append(doc["timings"]["llama_quantize_s"])
        raw_out.unlink(missing_ok=True)
    r, a = statistics.median(raw_t), statistics.median(apex_t)
    in_run = [w - t for w, t in zip(apex_t, inner_t)]
    in_ratio = [w / t for w, t in zip(apex_t, inner_t)]
    return {"model": src.name, "source_bytes": src.stat().st_size, "output_bytes": job.predicted_size,
            "threads": threads, "repeat": repeat, "raw_s": [round(x, 3) for x in raw_t],
            "apex_s": [round(x, 3) for x in apex_t], "raw_median_s": round(r, 3),
            "apex_median_s": round(a, 3), "ratio": round(a / r, 4), "overhead_s": round(a - r, 3),
            "apex_llama_quantize_s": [round(x, 3) for x in inner_t],
            "in_run_overhead_s": [round(x, 3) for x in in_run],
            "in_run_overhead_median_s": round(statistics.median(in_run), 3),
            "in_run_ratio_median": round(statistics.median(in_ratio), 4)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--big", action="store_true", help="also the ~1.6 GB model")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--out", type=Path, default=None, help="results folder (default bench/results)")
    ap.add_argument("--smoke", action="store_true", help="CI: a tiny model, 1 repeat, no --big")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if args.smoke:
            src = write_smoke_model(work / "bench-smoke-moe.gguf")
            rows.append(bench_model(src, 1, args.threads, work / "smoke", warm=False))
        else:
            rows.append(bench_model(trained.demo_model_path(), args.repeat, args.threads, work / "demo"))
        if args.big and not args.smoke:
            big = synthetic.write_model(work / "bench-moe-1.6g.gguf", BIG)
            rows.append(bench_model(big, max(3, args.repeat // 2), args.threads, work / "big"))
    data = {"machine": machine(), "results": rows}
    md = ["# apex-orch quantize vs raw llama-quantize (same arguments, profile compact)", "",
          "| model | source | raw median | apex-orch median | ratio | overhead | in-run overhead | in-run ratio | "
          "runs |",
          "|---|---|---|---|---|---|---|---|---|"]
    md += [f"| {r['model']} | {r['source_bytes'] / 1e9:.2f} GB | {r['raw_median_s']} s | {r['apex_median_s']} s | "
           f"{r['ratio']} | {r['overhead_s']} s | {r['in_run_overhead_median_s']} s | {r['in_run_ratio_median']} | "
           f"{r['repeat']} |" for r in rows]
    md += ["", "ratio/overhead: medians of alternating raw and apex-orch runs. In-run: each apex-orch process's "
           "wall time against the llama-quantize seconds inside it (its manifest), median over runs — the "
           "figure a busy machine disturbs least."]
    write_results("quantize-overhead", data, "\n".join(md), args.out)
    print("\n".join(md))


if __name__ == "__main__":
    main()
