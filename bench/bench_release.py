"""The demo release from cold caches: wall time per phase against the raw llama.cpp tool time.

    .venv/bin/python bench/bench_release.py [--config releases/demo.yaml] [--out DIR] [--keep DIR]
    .venv/bin/python bench/bench_release.py --smoke --out /tmp/r     # CI: tiny model, one I-tier

Runs `apex-orch release CONFIG --out-dir <temp>` as a new process with a fresh, empty
APEX_ORCH_CACHE (so the demo model, the corpus files, the imatrix and the base log-probs are all
computed: nothing is reused), while the pinned llama.cpp build stays where it is:
APEX_LLAMA_BIN_DIR points at apex_orch.llama.pin.bin_dir() and the temp cache links the pin folder
(the synthetic writer reads the tokenizer from the pinned tree). The cache is checked cold
before the run, and afterwards every cached artefact is checked to be new.

Raw tool time, from what the release wrote:
  imatrix   llama-imatrix seconds from the imatrix sidecar (<cache>/imatrix/<key>.json);
  quantize  llama-quantize seconds from each output's manifest (timings.llama_quantize_s);
  eval      the release evaluates in-process through the bindings, so there is no tool time to
            read: its raw-tool equivalent is measured here after the release, by running
            llama-perplexity with the same settings (--kl-divergence-base once on the F16 model,
            then --kl-divergence per tier, --no-repack, same ctx/chunks/threads/text).
fetch (the demo model is generated in Python), card and publish run no tool.
Writes bench/results/release-phases.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO))
from common import RESULTS, load_note, machine, write_results, write_smoke_model  # noqa: E402

from apex_orch.llama import pin  # noqa: E402

CACHE_PARTS = ("models", "imatrix", "eval", "corpora", "q8", "eval-text")

SMOKE_CONFIG = """\
# bench_release --smoke: a tiny local model, one I-tier, so every tool-running phase is exercised.
name: Bench-Smoke-Release
license: mit
description: Smoke run of bench_release (random weights).
source:
  gguf: {model}
tiers: [i-compact]
imatrix: {{corpus: diverse, ctx: 128, chunks: 2}}
eval: {{corpus: wikipedia, ctx: 128, chunks: 2, speed: false}}
publish: {{repo: apex-orch/bench-smoke, private: true}}
"""


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def cold_cache(root: Path) -> Path:
    """A new cache folder holding only a link to the pinned llama.cpp build and tree."""
    real_pin = pin.pin_dir().resolve()
    root.mkdir(parents=True)
    (root / pin.PIN_KEY).symlink_to(real_pin, target_is_directory=True)
    return root


def cache_state(root: Path) -> dict[str, list[str]]:
    return {part: sorted(p.name for p in (root / part).iterdir()) if (root / part).is_dir() else []
            for part in CACHE_PARTS}


def eval_tool_equivalent(model: Path, tiers: list[Path], cfg_eval, work: Path) -> list[dict]:
    """llama-perplexity doing what the eval phase did through the bindings: the base log-probs once,
    then the KL divergence of every tier (same text, ctx, chunks, threads, flash attention, no repack)."""
    from apex_orch.evaluation.inputs import EvalSettings, default_threads, text_facts
    from apex_orch.evaluation.tool_backend import tool_argv
    from apex_orch.llama.tools import run_tool

    settings = EvalSettings(n_ctx=cfg_eval.ctx, chunks=cfg_eval.chunks, n_threads=default_threads())
    tf = text_facts(text=cfg_eval.text.resolve()) if cfg_eval.text is not None else text_facts(corpus=cfg_eval.corpus)
    work.mkdir(parents=True, exist_ok=True)
    base_file = work / "base.kld"
    runs = []
    argv = tool_argv(str(model), settings, text=tf.path, base_file=str(base_file))
    res = run_tool(argv, log_path=work / "base.log", what="llama-perplexity (base)")
    runs.append({"what": f"--kl-divergence-base {model.name}", "seconds": round(res.seconds, 3)})
    for f in tiers:
        argv = tool_argv(str(f), settings, base_file=str(base_file), kl=True)
        res = run_tool(argv, log_path=work / f"{f.name}.log", what="llama-perplexity (KLD)")
        runs.append({"what": f"--kl-divergence {f.name}", "seconds": round(res.seconds, 3)})
    return runs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", type=Path, default=REPO / "releases" / "demo.yaml")
    ap.add_argument("--smoke", action="store_true", help="CI: tiny model, one I-tier")
    ap.add_argument("--out", type=Path, default=None, help="results folder (default bench/results)")
    ap.add_argument("--keep", type=Path, default=None, help="keep the release folder and cache here (must not exist)")
    args = ap.parse_args(argv)

    bin_dir = pin.bin_dir().resolve()          # resolved before APEX_ORCH_CACHE changes
    if args.keep:
        if args.keep.exists():
            print(f"bench-release: --keep {args.keep} already exists", file=sys.stderr)
            return 2
        args.keep.mkdir(parents=True)
        tmp = None
        work = args.keep
    else:
        tmp = tempfile.TemporaryDirectory(prefix="bench-release-")
        work = Path(tmp.name)
    try:
        cache = cold_cache(work / "cache")
        os.environ["APEX_LLAMA_BIN_DIR"] = str(bin_dir)
        os.environ["APEX_ORCH_CACHE"] = str(cache)
        os.environ.pop("APEX_ORCH_EVAL_CACHE", None)
        from apex_orch.evaluation.base_cache import cache_dir as eval_cache_dir
        from apex_orch.llama.tools import find_tool
        assert eval_cache_dir() == cache / "eval" and find_tool("llama-quantize").path.parent == bin_dir
        before = cache_state(cache)
        if any(before.values()):
            raise SystemExit(f"bench-release: the temp cache is not cold: {before}")

        config = args.config.resolve()
        if args.smoke:
            model = write_smoke_model(work / "bench-smoke-moe.gguf")
            config = work / "smoke-release.yaml"
            config.write_text(SMOKE_CONFIG.format(model=json.dumps(str(model))), encoding="utf-8")
        from apex_orch.release.config_reader import load_release
        cfg = load_release(config)
        release_dir = work / "release"
        cmd = [sys.executable, "-m", "apex_orch.cli", "release", str(config), "--out-dir", str(release_dir)]
        log(f"cold cache {cache}; running: apex-orch release {config.name} --out-dir {release_dir}")
        t0 = time.time()
        mono = time.monotonic()
        with open(work / "release-stdout.log", "w") as fh:
            proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=os.environ.copy())
        wall = time.monotonic() - mono
        if proc.returncode != 0:
            tail = (work / "release-stdout.log").read_text()[-3000:]
            print(f"bench-release: apex-orch release failed (exit {proc.returncode}):\n{tail}", file=sys.stderr)
            return 1
        log(f"release finished in {wall:.1f} s")

        run = json.loads((release_dir / ".apex-release" / "last-run.json").read_text())
        phases = {p["name"]: p for p in run["phases"]}

        # the same command again: every phase must find its results (resume / no-op cost)
        mono = time.monotonic()
        with open(work / "release-rerun.log", "w") as fh:
            rerun_rc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=os.environ.copy()).returncode
        rerun_wall = time.monotonic() - mono
        rerun = json.loads((release_dir / ".apex-release" / "last-run.json").read_text())
        rerun_status = {p["name"]: p["status"] for p in rerun["phases"]}
        log(f"rerun (nothing to do) finished in {rerun_wall:.1f} s: {rerun_status}")
        after = cache_state(cache)
        new_entries = {k: v for k, v in after.items() if v}
        stale = [str(p) for p in cache.rglob("*") if p.is_file() and not p.is_symlink()
                 and pin.PIN_KEY not in p.parts and p.stat().st_mtime < t0 - 1]

        # raw tool seconds the release itself ran
        tools: dict[str, list[dict]] = {"imatrix": [], "quantize": [], "eval": []}
        for sidecar in sorted((cache / "imatrix").glob("*.json")):
            doc = json.loads(sidecar.read_text())
            tools["imatrix"].append({"what": f"llama-imatrix ({doc.get('chunks')} chunks, {doc.get('corpus')})",
                                     "seconds": doc["seconds"]})
        ggufs = sorted(p for p in release_dir.glob("*.gguf"))
        for g in ggufs:
            man = g.with_name(g.name + ".manifest.json")
            if man.is_file():
                doc = json.loads(man.read_text())
                tools["quantize"].append({"what": f"llama-quantize {doc['profile']['name']} -> {g.name}",
                                          "seconds": doc["timings"]["llama_quantize_s"],
                                          "apex_total_s": doc["timings"]["total_s"]})
        manifests = [json.loads(g.with_name(g.name + ".manifest.json").read_text()) for g in ggufs]
        src_model = Path(manifests[0]["source"][0]) if manifests else None
        if cfg.eval.enabled and phases.get("eval", {}).get("status") == "ran":
            log("measuring the eval phase's raw-tool equivalent with llama-perplexity")
            tools["eval"] = eval_tool_equivalent(src_model, ggufs, cfg.eval, work / "perplexity")

        rows = []
        for name in ("fetch", "convert", "imatrix", "quantize", "eval", "card", "publish"):
            p = phases.get(name, {"status": "absent", "seconds": 0.0, "detail": ""})
            t = round(sum(x["seconds"] for x in tools.get(name, [])), 3)
            kind = {"imatrix": "ran by the release", "quantize": "ran by the release",
                    "eval": "llama-perplexity equivalent, measured after the release"}.get(name, "no tool")
            rows.append({"phase": name, "status": p["status"], "seconds": p["seconds"], "detail": p.get("detail", ""),
                         "tool_seconds": t if name in tools else None, "tool_kind": kind,
                         "overhead_s": round(p["seconds"] - t, 3) if name in ("imatrix", "quantize") else None})
        phase_sum = round(sum(r["seconds"] for r in rows), 3)
        ran_tools = round(sum(x["seconds"] for k in ("imatrix", "quantize") for x in tools[k]), 3)
        eval_equiv = round(sum(x["seconds"] for x in tools["eval"]), 3)
        data = {
            "machine": machine(),
            "mode": "smoke" if args.smoke else "full",
            "config": ("smoke (generated)" if args.smoke else
                       args.config.resolve().relative_to(REPO).as_posix() if args.config.resolve().is_relative_to(REPO)
                       else args.config.name),   # the project speaks of itself only: no machine paths
            "tiers": [t.profile.name for t in cfg.tiers],
            "settings": {"imatrix": ({"corpus": cfg.imatrix.corpus, "ctx": cfg.imatrix.ctx,
                                      "chunks": cfg.imatrix.chunks}
                                     if cfg.imatrix else None),
                         "eval": {"corpus": cfg.eval.corpus, "ctx": cfg.eval.ctx, "chunks": cfg.eval.chunks,
                                  "speed": cfg.eval.speed}},
            "cold_cache": {"before": before, "created_by_the_run": new_entries, "older_than_the_run": stale,
                           "llama_bin_dir": str(bin_dir)},
            "process_wall_s": round(wall, 3),
            "rerun": {"exit": rerun_rc, "wall_s": round(rerun_wall, 3), "phases": rerun_status},
            "phases": rows,
            "phase_sum_s": phase_sum,
            "tools": tools,
            "tool_seconds_run_by_release": ran_tools,
            "eval_tool_equivalent_s": eval_equiv,
            "totals": {
                "release_wall_s": round(wall, 3),
                "raw_tools_s": round(ran_tools + eval_equiv, 3),
                "ratio_wall_to_raw_tools": (round(wall / (ran_tools + eval_equiv), 4)
                                            if ran_tools + eval_equiv else None),
                "imatrix_quantize_phases_s": round(sum(r["seconds"] for r in rows
                                                       if r["phase"] in ("imatrix", "quantize")), 3),
                "imatrix_quantize_tools_s": ran_tools,
            },
        }
        write_results("release-phases", data, markdown(data), args.out)
        log(f"wrote {(args.out or RESULTS) / 'release-phases.md'}; {load_note(data['machine'])}")
        return 0
    finally:
        if tmp is not None:
            tmp.cleanup()


def markdown(d: dict) -> str:
    t = d["totals"]
    ev = d["settings"]["eval"]
    im = d["settings"]["imatrix"]
    lines = ["# Demo release from cold caches: wall time by phase vs raw llama.cpp tool time", ""]
    if d["mode"] == "smoke":
        lines += ["**Smoke run** (CI): a tiny model and one tier; the figures mean nothing.", ""]
    lines += [f"`apex-orch release {d['config']}`: {len(d['tiers'])} tiers ({', '.join(d['tiers'])}); imatrix "
              + (f"{im['corpus']} {im['chunks']} x {im['ctx']}" if im else "none")
              + f"; eval {ev['corpus']} {ev['chunks']} x {ev['ctx']}. Fresh APEX_ORCH_CACHE (checked empty before the "
              f"run; created by the run: "
              f"{', '.join(f'{k} ({len(v)})' for k, v in d['cold_cache']['created_by_the_run'].items())}).",
              "",
              "| phase | status | wall s | raw tool s | tool time is | wall − tool s |",
              "|---|---|---|---|---|---|"]
    for r in d["phases"]:
        tool = "—" if r["tool_seconds"] is None else f"{r['tool_seconds']:.1f}"
        over = "—" if r["overhead_s"] is None else f"{r['overhead_s']:.1f}"
        lines.append(f"| {r['phase']} | {r['status']} | {r['seconds']:.1f} | {tool} | {r['tool_kind']} | {over} |")
    lines += ["",
              f"- Whole `apex-orch release` process: **{t['release_wall_s']:.1f} s** (phases {d['phase_sum_s']:.1f} "
              f"s; the rest is Python start-up, config and profile loading).",
              f"- imatrix + quantize phases {t['imatrix_quantize_phases_s']:.1f} s vs "
              f"{t['imatrix_quantize_tools_s']:.1f} s inside "
              "llama-imatrix/llama-quantize (the difference: corpus build and tokenization, planning, header "
              "verification, sha256 + manifests).",
              f"- Eval phase (in-process bindings, base log-probs included) vs the same work done by llama-perplexity: "
              f"{next(r['seconds'] for r in d['phases'] if r['phase'] == 'eval'):.1f} s vs "
              f"{d['eval_tool_equivalent_s']:.1f} s.",
              f"- Release wall time / sum of raw tool times: {t['release_wall_s']:.1f} / {t['raw_tools_s']:.1f} s = "
              f"**{t['ratio_wall_to_raw_tools']}x**.",
              f"- The same command again (every phase finds its results): {d['rerun']['wall_s']:.1f} s, exit "
              f"{d['rerun']['exit']} (" + ", ".join(f"{k} {v}" for k, v in d["rerun"]["phases"].items()) + ").", "",
              "Raw tool runs:", ""]
    for phase, runs in d["tools"].items():
        for x in runs:
            lines.append(f"- {phase}: {x['what']}: {x['seconds']:.2f} s")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
