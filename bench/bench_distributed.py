"""The cost of distribution: the demo release on a local Ray cluster vs the local executor, and
the flagship's plan on a real cluster.

    .venv/bin/python bench/bench_distributed.py [--config releases/demo.yaml]

1. Overhead. The same release config runs twice from a cold apex-orch cache (the same cache path,
   emptied in between, so the I-tiers' imatrix metadata and therefore the files are comparable):
   `apex-orch release` with the local executor, then `--executor ray` on a cluster of this
   machine (tests/ray's RayCluster: a head taking no tasks and two workers of one CPU each, on
   127.0.0.1). Both use the machine's two cores. Reported: each run's wall time, their ratio
   (the overhead of distribution), the per-phase times and the task table (which worker built
   which file), and whether every published file is byte-identical.
2. The flagship's plan (Mistral-Small-4-119B, releases/mistral-small-4-119b.yaml) from the
   header-only replica: each tier's predicted size, the data each task reads and writes, the
   memory each asks for, and the expected wall time of the quantize phase on workers of a given
   size, from the quantization rate measured here (bytes of source per second per thread) and the
   committed 1.86 GB measurement (bench/results/quantize-overhead.json).
Writes bench/results/distributed.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO))
from common import RESULTS, machine, write_results  # noqa: E402

from apex_orch.llama import pin  # noqa: E402

WORKER_CORES = (16, 32, 64)        # the flagship table: workers of these sizes


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def fresh_cache(root: Path) -> None:
    """An empty cache at `root` holding only a link to the pinned llama.cpp build and tree."""
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    (root / pin.PIN_KEY).symlink_to(pin.pin_dir().resolve(), target_is_directory=True)


def run_release(config: Path, out: Path, env: dict, *extra: str) -> tuple[float, dict]:
    argv = [sys.executable, "-m", "apex_orch.cli", "release", str(config), "--out-dir", str(out), *extra]
    t0 = time.monotonic()
    r = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=3600)
    seconds = time.monotonic() - t0
    if r.returncode != 0:
        raise SystemExit(f"release failed ({' '.join(extra) or 'local'}): exit {r.returncode}\n{r.stdout[-3000:]}"
                         f"\n{r.stderr[-3000:]}")
    return seconds, json.loads((out / ".apex-release" / "last-run.json").read_text())


def measure(config: Path, work: Path) -> dict:
    kit = _ray_test_kit()
    NODE_ENV, RayCluster, published = kit.NODE_ENV, kit.RayCluster, kit.published

    cache = work / "cache"
    base_env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    base_env.update(APEX_ORCH_CACHE=str(cache), APEX_LLAMA_BIN_DIR=str(pin.bin_dir()), RAY_AUTH_MODE="disabled")

    fresh_cache(cache)
    log("local executor: cold release")
    local_s, local_run = run_release(config, work / "local", base_env)
    log(f"local: {local_s:.1f} s")

    cluster_root = Path(tempfile.mkdtemp(prefix="ab", dir="/tmp"))
    node_env = dict(base_env, **NODE_ENV)
    cluster = RayCluster(cluster_root, node_env)
    t0 = time.monotonic()
    try:
        cluster.start_head()
        cluster.add_worker()
        cluster.add_worker()
        cluster.wait_workers(2)
        start_s = time.monotonic() - t0
        log(f"ray cluster up in {start_s:.1f} s")
        fresh_cache(cache)
        log("ray executor: cold release")
        ray_s, ray_run = run_release(config, work / "ray", dict(base_env, RAY_ADDRESS=cluster.address),
                                     "--executor", "ray")
        log(f"ray: {ray_s:.1f} s")
    finally:
        cluster.stop()
        shutil.rmtree(cluster_root, ignore_errors=True)
    same = published(work / "local") == published(work / "ray")
    return {"local_seconds": round(local_s, 1), "ray_seconds": round(ray_s, 1),
            "ratio": round(ray_s / local_s, 4), "cluster_start_seconds": round(start_s, 1),
            "byte_identical": same, "files": len(published(work / "local")),
            "local_phases": local_run["phases"], "ray_phases": ray_run["phases"],
            "local_tasks": local_run["tasks"], "ray_tasks": ray_run["tasks"]}


def _ray_test_kit():
    """tests/ray/conftest.py as a module: the cluster the tests start (one definition of it)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("ray_test_kit", REPO / "tests" / "ray" / "conftest.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module      # dataclasses look their module up while it loads
    spec.loader.exec_module(module)
    return module


def quantize_rate(tasks: list[dict], source_bytes: int, threads: int) -> float | None:
    """Bytes of source quantized per second per thread, median over the quantize tasks."""
    secs = sorted(t["seconds"] for t in tasks if t["phase"] == "quantize" and t["seconds"] > 0)
    return source_bytes / secs[len(secs) // 2] / threads if secs else None


def flagship_plan(work: Path, rate_per_thread: float) -> dict:
    from apex_orch.demo.synthetic import write_mistral_small_4_replica
    from apex_orch.model.info import read_model
    from apex_orch.plan.planner import make_plan
    from apex_orch.release.config_reader import load_release

    cfg = load_release(REPO / "releases" / "mistral-small-4-119b.yaml")
    replica = write_mistral_small_4_replica(work / "replica")
    model = read_model(replica)
    source = sum(t.n_bytes for t in model.tensors)            # what the real BF16 source holds
    biggest = max(t.n_elements for t in model.tensors)
    # The plan's file size (header included); an I-tier is planned as with its imatrix, which
    # changes no size: the types are the profile's either way.
    tiers = [{"tier": t.profile.tier,
              "predicted_bytes": make_plan(model, t.profile, has_imatrix=True).predicted_file_size()}
             for t in cfg.tiers]
    memory = biggest * 4 * 2 + (512 << 20)
    walls = {c: round(source / (rate_per_thread * c)) for c in WORKER_CORES}
    return {"source_bytes": source, "tiers": tiers, "written_bytes": sum(t["predicted_bytes"] for t in tiers),
            "read_bytes": source * len(tiers), "quantize_memory_bytes": memory,
            "imatrix_memory_bytes": source, "quantize_wall_seconds_by_cores": walls,
            "rate_bytes_per_s_per_thread": rate_per_thread}


def committed_rate() -> float | None:
    """Bytes of source per second per thread of the committed 1.86 GB quantization (raw llama-quantize,
    median, 2 threads): a model large enough for the rate to be the tool's, not its start-up."""
    path = RESULTS / "quantize-overhead.json"
    if not path.is_file():
        return None
    doc = json.loads(path.read_text())
    for row in doc.get("results", []):
        if row.get("source_bytes", 0) > 1e9 and row.get("raw_median_s"):
            return row["source_bytes"] / row["raw_median_s"] / row.get("threads", 2)
    return None


def gb(n: float) -> str:
    return f"{n / 1e9:,.1f} GB"


def markdown(doc: dict) -> str:
    o, f = doc["overhead"], doc["flagship"]
    lines = ["# The demo release on a local Ray cluster vs the local executor", "",
             f"`apex-orch release {doc['config']}` from a cold cache, twice: the local executor, then "
             "`--executor ray` on a cluster of this machine (a head taking no tasks, two workers of one CPU "
             "each, 127.0.0.1). Both runs use the machine's two cores.", "",
             "| executor | wall s |", "|---|---|",
             f"| local | {o['local_seconds']} |", f"| ray (2 workers) | {o['ray_seconds']} |", "",
             f"- **Overhead of distribution: {o['ratio']:.3f}x** the local wall time (ray / local, one run each).",
             f"- Starting the cluster (not counted above): {o['cluster_start_seconds']} s.",
             f"- Published files (GGUFs, card, LocalAI entries): {o['files']}, "
             f"{'byte-identical' if o['byte_identical'] else 'NOT byte-identical'} between the two runs.", "",
             "Phases (wall seconds):", "", "| phase | local | ray |", "|---|---|---|"]
    ray_phases = {p["name"]: p for p in o["ray_phases"]}
    for p in o["local_phases"]:
        r = ray_phases.get(p["name"], {})
        lines.append(f"| {p['name']} | {p['seconds']:.1f} ({p['status']}) | {r.get('seconds', 0):.1f} "
                     f"({r.get('status', '')}) |")
    lines += ["", "Tasks on the cluster:", "", "| phase | file | worker | s | attempts |", "|---|---|---|---|---|"]
    lines += [f"| {t['phase']} | {t['target']} | {t['worker']} | {t['seconds']:.1f} | {t['attempts']} |"
              for t in o["ray_tasks"]]
    lines += ["", "# Mistral-Small-4-119B on a cluster: the plan", "",
              f"From the header-only replica (real shapes) and releases/mistral-small-4-119b.yaml: source "
              f"{gb(f['source_bytes'])} (BF16), {len(f['tiers'])} tiers, one quantization task per tier.", "",
              "| tier | predicted size |", "|---|---|"]
    lines += [f"| {t['tier']} | {gb(t['predicted_bytes'])} |" for t in f["tiers"]]
    lines += ["",
              f"- Each quantize task reads the whole source from shared storage: {gb(f['source_bytes'])} per tier, "
              f"{gb(f['read_bytes'])} in all; the tiers write {gb(f['written_bytes'])}.",
              f"- Memory per quantize task (largest tensor as f32, twice, + 512 MiB): "
              f"{f['quantize_memory_bytes'] / 2**30:.1f} GiB; the imatrix and each evaluation hold a model: "
              f"{gb(f['imatrix_memory_bytes'])} for the imatrix on the BF16 source (about half with "
              "`imatrix: {from_q8: true}`), the tier's size for its evaluation.",
              f"- Rate used: {f['rate_bytes_per_s_per_thread'] / 1e6:.1f} MB of source per second per thread "
              f"({doc['rate_source']}).",
              "- Expected wall time of the quantize phase with one worker per tier (7 workers), every tier "
              "at once, assuming the rate scales with threads and the storage serves every worker at that "
              "rate (7 x the per-worker read rate):", "",
              "| cores per worker | per tier (and the phase) | storage read rate needed |", "|---|---|---|"]
    for cores, secs in f["quantize_wall_seconds_by_cores"].items():
        need = f["source_bytes"] * len(f["tiers"]) / secs
        lines.append(f"| {cores} | {secs / 3600:.1f} h | {need / 1e9:.2f} GB/s |")
    lines += ["", "Not extrapolated: the imatrix and the evaluations of a 119B model depend on the GPU or "
              "memory bandwidth of the worker that runs them; measure them on the cluster (the release's "
              "task table records each one's time)."]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", type=Path, default=REPO / "releases" / "demo.yaml")
    args = ap.parse_args()
    config = args.config.resolve()
    with tempfile.TemporaryDirectory(prefix="bench-distributed-") as tmp:
        work = Path(tmp)
        overhead = measure(config, work)
        from apex_orch.model.info import read_model
        demo_source = (work / "cache" / "models")
        sources = sorted(demo_source.glob("*.gguf"))
        source_bytes = sum(t.n_bytes for t in read_model(sources[0]).tensors) if sources else 0
        measured = quantize_rate(overhead["ray_tasks"], source_bytes, threads=1)
        committed = committed_rate()
        rate, rate_source = ((committed, "the committed 1.86 GB measurement, raw llama-quantize, 2 threads")
                             if committed else (measured, "the demo release's quantize tasks here, 1 thread each"))
        doc = {"machine": machine(), "config": config.relative_to(REPO).as_posix() if config.is_relative_to(REPO)
               else config.name, "overhead": overhead, "demo_rate_bytes_per_s_per_thread": measured,
               "rate_source": rate_source, "flagship": flagship_plan(work, rate)}
    write_results("distributed", doc, markdown(doc))
    log(f"overhead {overhead['ratio']:.3f}x; byte-identical: {overhead['byte_identical']}")


if __name__ == "__main__":
    main()
