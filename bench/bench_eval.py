"""Benchmark: apex-orch eval through the bindings vs llama-perplexity, same settings.

Measures, on the synthetic mistral4-split model (32000-token vocabulary) and its Q4_K_M:
  * perplexity pass: wall time and decode tokens/s, bindings vs the binary (alternating runs);
  * KL-divergence pass against the F16 base (base cache already built), bindings vs the binary;
  * the base pass: building our base-logits cache vs llama-perplexity --kl-divergence-base,
    with the size of each file;
  * pp512 / tg128 through the bindings.
Writes bench/results/eval-<date>T<hhmm>.json and .md with the machine, date and git commit.

    .venv/bin/python bench/bench_eval.py [--ctx 512] [--chunks 8] [--threads N] [--repeats 2]
    .venv/bin/python bench/bench_eval.py --smoke --out /tmp/e   # CI: ~43 MB 4-block model, ctx 128 x 2, 1 repeat
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from apex_orch.evaluation import base_cache as evalcache  # noqa: E402
from apex_orch.demo import synthetic  # noqa: E402
from apex_orch.evaluation.evaluate import ensure_base_cache, evaluate, measure_speed, plan_eval, run_eval  # noqa: E402
from apex_orch.evaluation.inputs import EvalSettings, default_threads, model_facts, text_facts  # noqa: E402
from apex_orch.evaluation.tool_backend import ToolBase  # noqa: E402
from apex_orch.llama.tools import find_tool, run_tool  # noqa: E402
from common import machine  # noqa: E402


def timed(fn):
    t = time.monotonic()
    out = fn()
    return out, time.monotonic() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--chunks", type=int, default=8)
    ap.add_argument("--threads", type=int, default=default_threads())
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    ap.add_argument("--smoke", action="store_true", help="CI: a tiny model, ctx 128 x 2 chunks, 1 repeat")
    args = ap.parse_args()
    if args.smoke:
        args.ctx, args.chunks, args.repeats = 128, 2, 1

    work = Path(tempfile.mkdtemp(prefix="bench-eval-"))
    os.environ["APEX_ORCH_EVAL_CACHE"] = str(work / "cache")
    try:
        if args.smoke:
            sys.path.insert(0, str(REPO / "bench"))
            from common import write_smoke_model
            base = write_smoke_model(work / "mistral4-split.gguf")
        else:
            base = synthetic.write_preset("mistral4-split", work / "mistral4-split.gguf")
        q4 = work / "mistral4-split-Q4_K_M.gguf"
        run_tool([find_tool("llama-quantize").path, base, q4, "Q4_K_M", str(args.threads)])
        text = work / "text.txt"
        text.write_text(synthetic.demo_text(40000), encoding="utf-8")
        # tool_log_verbosity 4 keeps llama_perf_context_print's decode timings in the tool's output
        s = EvalSettings(n_ctx=args.ctx, chunks=args.chunks, n_threads=args.threads, tool_log_verbosity=4)
        n_tok = args.ctx * args.chunks
        info = {"machine": machine(), "settings": s.to_dict(), "model": "synthetic mistral4-split "
                "(12 MLA blocks, 16 experts, 2 used, n_embd 256, 32000-token vocab)", "runs": {}}
        if args.smoke:
            info["model"] = "smoke: synthetic 4-block mistral4, 4 experts (CI plumbing check; numbers mean nothing)"

        # 1. perplexity, alternating backends
        ppl = {"bindings": [], "llama-perplexity": []}
        for _ in range(args.repeats):
            for backend in ("bindings", "llama-perplexity"):
                r, sec = timed(lambda: evaluate(q4, text=text, settings=s, backend=backend))
                ppl[backend].append({"wall_s": sec, "decode_tokens_per_s": r.eval_tokens_per_s, "ppl": r.ppl})
        info["runs"]["perplexity"] = ppl

        # 2. base pass: our cache vs the tool's base file
        cache, cache_s = timed(lambda: ensure_base_cache(model_facts(base), text_facts(text), s))
        tool_dir = work / "toolbase"
        tool_dir.mkdir()
        tb = ToolBase(model_facts(base), text_facts(text), s, tool_dir)
        tool_file, tool_s = timed(tb.ensure)
        with evalcache.BaseLogProbs(cache) as c:
            cache_info = {"n_vocab": c.n_vocab, "scored_tokens": c.n_chunks * c.n_scored,
                          "ours_bytes": c.size_bytes(), "tool_bytes": tool_file.stat().st_size,
                          "ours_build_s": cache_s, "tool_build_s": tool_s,
                          "ours_bytes_per_token": c.size_bytes() / (c.n_chunks * c.n_scored)}
        info["runs"]["base_cache"] = cache_info

        # 3. KL divergence (base already prepared for both)
        kl = {"bindings": [], "llama-perplexity": []}
        for _ in range(args.repeats):
            r, sec = timed(lambda: evaluate(q4, base=base, text=text, settings=s))
            kl["bindings"].append({"wall_s": sec, "decode_tokens_per_s": r.eval_tokens_per_s,
                                   "kld_mean": r.kld.kld_mean, "same_top_p": r.kld.same_top_p})
            plan = plan_eval(q4, base=base, settings=s, backend="llama-perplexity",
                             text_facts_=text_facts(text))
            r, sec = timed(lambda: run_eval(plan, tool_base=tb))
            kl["llama-perplexity"].append({"wall_s": sec, "decode_tokens_per_s": r.eval_tokens_per_s,
                                           "kld_mean": r.kld.kld_mean, "same_top_p": r.kld.same_top_p})
        info["runs"]["kl_divergence"] = kl

        # 4. speed through the bindings
        info["runs"]["speed"] = {} if args.smoke else {  # smoke: tg128 alone takes ~15 s on a busy machine
            name: measure_speed(p, s, repetitions=2).__dict__ for name, p in (("F16", base), ("Q4_K_M", q4))}

        def summary(runs: dict) -> dict:
            med = {b: statistics.median(x["wall_s"] for x in v) for b, v in runs.items()}
            dec = {b: statistics.median([x["decode_tokens_per_s"] for x in v if x["decode_tokens_per_s"]]
                                        or [float("nan")]) for b, v in runs.items()}
            return {"median_wall_s": med, "end_to_end_tokens_per_s": {b: n_tok / t for b, t in med.items()},
                    "median_decode_tokens_per_s": dec,
                    "ratio_end_to_end": med["llama-perplexity"] / med["bindings"],
                    "ratio_decode": dec["bindings"] / dec["llama-perplexity"]}

        info["summary"] = {"perplexity": summary(ppl), "kl_divergence": summary(kl)}
        info["machine"]["load_average_at_end"] = list(os.getloadavg())
        write(info, args.out)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def write(info: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    day = info["machine"]["time"][:16].replace(":", "")  # e.g. 2026-11-26T2227: several runs a day
    (out / f"eval-{day}.json").write_text(json.dumps(info, indent=2) + "\n")
    m, s, sm = info["machine"], info["settings"], info["summary"]
    c = info["runs"]["base_cache"]
    lines = [f"# eval benchmark — {m['time']}", "",
             f"- machine: {m['cpu']}, nproc {m['cores']}, {m['platform']}; load average "
             f"{m['load_average_at_start'][0]:.2f} at start, {m['load_average_at_end'][0]:.2f} at end "
             "(shared machine: absolute numbers are noisy, ratios come from alternating runs)",
             f"- git {m['commit']}, {m['llama_build']}",
             f"- model: {info['model']}; Q4_K_M made with llama-quantize",
             f"- settings: ctx {s['n_ctx']}, {s['chunks']} chunks, batch {s['n_batch']}, ubatch {s['n_ubatch']}, "
             f"threads {s['n_threads']}, flash-attn {'on' if s['flash_attn'] else 'off'}, "
             f"repack {'on' if s['repack'] else 'off'}", "",
             "| pass | backend | median wall s | end-to-end tok/s | decode tok/s |",
             "|---|---|---|---|---|"]
    for name in ("perplexity", "kl_divergence"):
        for b in ("bindings", "llama-perplexity"):
            lines.append(f"| {name} | {b} | {sm[name]['median_wall_s'][b]:.2f} | "
                         f"{sm[name]['end_to_end_tokens_per_s'][b]:.1f} | "
                         f"{sm[name]['median_decode_tokens_per_s'][b]:.1f} |")
    lines += ["", f"bindings / llama-perplexity throughput: perplexity {sm['perplexity']['ratio_end_to_end']:.3f}x "
              f"end-to-end, {sm['perplexity']['ratio_decode']:.3f}x decode; KL divergence "
              f"{sm['kl_divergence']['ratio_end_to_end']:.3f}x end-to-end, {sm['kl_divergence']['ratio_decode']:.3f}x "
              f"decode (target >= 0.9x)", "",
              f"Base log-probs for {c['scored_tokens']} scored tokens, {c['n_vocab']}-token vocabulary: ours "
              f"{c['ours_bytes'] / 2**20:.1f} MiB ({c['ours_bytes_per_token'] / 1024:.1f} KiB/token) built in "
              f"{c['ours_build_s']:.1f} s; llama-perplexity's --kl-divergence-base file {c['tool_bytes'] / 2**20:.1f} "
              f"MiB in {c['tool_build_s']:.1f} s. (Random synthetic weights give near-uniform distributions, so "
              "few entries fall below the -16-nat floor: this is the worst case for our sparse storage.)", "",
              "| model | pp512 t/s | tg128 t/s | threads | ubatch | flash-attn |", "|---|---|---|---|---|---|"]
    for name, sp in info["runs"]["speed"].items():
        lines.append(f"| {name} | {sp['pp_tokens_per_s']:.1f} | {sp['tg_tokens_per_s']:.1f} | {sp['n_threads']} | "
                     f"{sp['n_ubatch']} | {'on' if sp['flash_attn'] else 'off'} |")
    (out / f"eval-{day}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
