"""Quality benchmark: APEX tiers vs llama.cpp's uniform presets on the trained reference MoE.

    make bench-quality                      (= .venv/bin/python bench/bench_quality.py)
    .venv/bin/python bench/bench_quality.py --chunks 16        # less held-out text per domain (faster)
    .venv/bin/python bench/bench_quality.py --smoke --out /tmp/q   # CI: tiny random model, 2 tiers

What it does, on the reference model that `make reference-model` caches
(<cache>/models/reference-moe-<key>.gguf, bench/reference_model/):
  1. one importance matrix from the `diverse` corpus (apex_orch.calibration.imatrix, cached);
  2. every APEX tier: quality, balanced, compact without an imatrix, and I-Quality, I-Balanced,
     I-Compact, I-Mini, I-Nano, I-Micro with it (mini/nano/micro cannot be made without one:
     their IQ2/IQ1 experts need imatrix data; I-Mini is the mini layout + the diverse imatrix);
  3. llama.cpp's uniform presets with plain `llama-quantize SRC OUT PRESET`: Q8_0, Q6_K,
     Q5_K_M, Q4_K_M, Q3_K_M without an imatrix, IQ4_XS, IQ3_M, IQ2_M with it, and (fair to
     the I-tiers) Q6_K, Q5_K_M, Q4_K_M, Q3_K_M with it too;
  4. PPL and KL divergence against the F16 model (llama-perplexity's statistics through the
     bindings: apex_orch.evaluation.evaluate) on the model's two held-out texts (Python stdlib modules
     and pydoc reference topics it never trained on, neither in the imatrix corpus: checked);
  5. bench/results/quality.{json,md,png}: the tables, the KLD-vs-size Pareto plot, and for every
     APEX tier whether a uniform preset of equal or smaller size has a lower mean KLD.

If the reference model is not cached, it says so and exits with status 2 (`make reference-model`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO))
from common import RESULTS, load_note, machine, results_header, write_results, write_smoke_model  # noqa: E402

from apex_orch.core import settings  # noqa: E402
from apex_orch.demo import synthetic  # noqa: E402
from apex_orch.core.fingerprint import fast_fingerprint  # noqa: E402
from apex_orch.llama.tools import build_label, find_tool, run_tool  # noqa: E402

APEX_TIERS = ["quality", "i-quality", "balanced", "i-balanced", "compact", "i-compact", "i-mini", "i-nano",
              "i-micro"]
# (preset, with the diverse imatrix)
UNIFORM = [("Q8_0", False), ("Q6_K", False), ("Q5_K_M", False), ("Q4_K_M", False), ("Q3_K_M", False),
           ("IQ4_XS", True), ("IQ3_M", True), ("IQ2_M", True)]
UNIFORM_K_IMATRIX = [("Q6_K", True), ("Q5_K_M", True), ("Q4_K_M", True), ("Q3_K_M", True)]

SMOKE_TIERS = ["compact", "i-compact"]
SMOKE_UNIFORM = [("Q4_K_M", False)]

CORPUS = "diverse"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ----------------------------------------------------------------------------- inputs

@dataclass
class Domain:
    name: str
    path: Path
    description: str
    tokens: int | None = None


@dataclass
class Subject:
    """The model under test and its held-out texts."""
    model: Path
    name: str                      # file-name stem of the outputs
    label: str
    domains: list[Domain]
    record: dict = field(default_factory=dict)


class NoReferenceModel(Exception):
    pass


def find_reference_model(models_dir: Path | None = None) -> tuple[Path, dict]:
    """The newest cached reference model built with the FULL config whose export check passed."""
    from bench.reference_model.config import FULL

    models_dir = models_dir or settings.cache_root() / "models"
    want = json.loads(json.dumps(FULL.asdict()))
    found = []
    for rec_path in models_dir.glob("reference-moe-*.json"):
        gguf = rec_path.with_suffix(".gguf")
        if not gguf.is_file():
            continue
        try:
            rec = json.loads(rec_path.read_text())
        except (OSError, ValueError):
            continue
        if rec.get("config") == want and rec.get("validation", {}).get("passed"):
            found.append((gguf.stat().st_mtime, gguf, rec))
    if not found:
        raise NoReferenceModel(
            f"the trained reference model is not cached (no {models_dir}/reference-moe-*.gguf built with the "
            "full config whose export check passed).\nBuild it first: make reference-model   "
            "(about 40 minutes on 2 cores; then rerun make bench-quality)")
    _, gguf, rec = max(found, key=lambda t: t[0])
    return gguf, rec


def reference_subject(model: Path | None) -> Subject:
    if model is None:
        gguf, rec = find_reference_model()
    else:
        gguf = model
        rec_path = model.with_suffix(".json")
        if not rec_path.is_file():
            raise NoReferenceModel(f"{rec_path} (the reference model's record, naming its held-out texts) is missing")
        rec = json.loads(rec_path.read_text())
    texts = rec["data"]["heldout_text"]
    tokens = rec["data"].get("heldout_tokens", {})
    domains = [
        Domain("code", Path(texts["code"]), "held-out Python standard-library modules (every 20th file, never "
               "trained on)", tokens.get("code")),
        Domain("prose", Path(texts["prose"]), "held-out pydoc reference topics (every 5th topic, never "
               "trained on)", tokens.get("prose")),
    ]
    for d in domains:
        if not d.path.is_file():
            raise NoReferenceModel(f"held-out text {d.path} is missing; rebuild with make reference-model --force")
    return Subject(gguf, "Ref", f"trained reference MoE {gguf.name}", domains, rec)


def smoke_subject(work: Path) -> Subject:
    model = write_smoke_model(work / "bench-smoke-moe.gguf")
    a = work / "smoke-demo-text.txt"
    a.write_text(synthetic.demo_text(3000), encoding="utf-8")
    from apex_orch.evaluation.inputs import text_facts
    b = Path(text_facts(corpus="wikipedia").path)
    return Subject(model, "Smoke", "smoke: 4-block random-weight MoE", [
        Domain("demo-text", a, "synthetic demo text"),
        Domain("wikipedia", b, "built-in wikipedia corpus (also in diverse: smoke only)")])


def overlap_with_corpus(text: str, corpus_text: str, min_len: int = 30) -> dict:
    """How many of the text's lines (stripped, >= min_len chars) also occur as lines of the corpus."""
    corpus_lines = {ln.strip() for ln in corpus_text.splitlines() if len(ln.strip()) >= min_len}
    lines = [ln.strip() for ln in text.splitlines() if len(ln.strip()) >= min_len]
    shared = sum(1 for ln in lines if ln in corpus_lines)
    return {"lines_checked": len(lines), "lines_in_corpus": shared,
            "share": round(shared / len(lines), 6) if lines else 0.0}


# ----------------------------------------------------------------------------- quantizing

@dataclass
class Variant:
    label: str
    kind: str                 # "apex" | "uniform"
    imatrix: bool
    name: str                 # profile or preset
    path: Path | None = None
    quantize_s: float | None = None
    skipped: bool = False
    warnings: list[str] = field(default_factory=list)
    error: str | None = None


def build_imatrix(model: Path, ctx: int, chunks: int | None, threads: int) -> dict:
    from apex_orch.calibration import imatrix as im
    plan = im.plan_imatrix(model, CORPUS, ctx=ctx, chunks=chunks, threads=threads)
    cached = plan.cached
    log(f"imatrix: {CORPUS}, {plan.chunks} chunks x {ctx} of {plan.available_chunks} available "
        f"({'cache hit' if cached else 'computing'})")
    path = im.run_imatrix(plan)
    sidecar = plan.cache_path.with_suffix(".json")
    seconds = json.loads(sidecar.read_text()).get("seconds") if sidecar.is_file() else None
    return {"path": str(path), "corpus": CORPUS, "ctx": ctx, "chunks": plan.chunks,
            "available_chunks": plan.available_chunks, "corpus_tokens": plan.tokens,
            "corpus_sha256": plan.corpus_sha256, "llama_imatrix_s": seconds, "cache_hit": cached,
            "corpus_text": plan.corpus.text}


def quantize_apex(subject: Subject, profile: str, imatrix_src, work: Path, threads: int) -> Variant:
    from apex_orch.plan.profiles import load_profile
    from apex_orch.quantize.job import plan_quantize
    from apex_orch.quantize.run import run_quantize
    prof = load_profile(profile)
    v = Variant(profile, "apex", prof.imatrix_required, profile)
    job = plan_quantize(subject.model, prof, out_dir=work, name=subject.name,
                        imatrix=imatrix_src if prof.imatrix_required else None, threads=threads)
    v.warnings = list(job.plan.warnings)
    res = run_quantize(job)
    v.path, v.quantize_s, v.skipped = res.files[0], res.seconds, res.skipped
    return v


def quantize_uniform(subject: Subject, preset: str, imatrix_path: str | None, work: Path, threads: int) -> Variant:
    label = preset + ("+imat" if imatrix_path else "")
    v = Variant(label, "uniform", imatrix_path is not None, preset)
    out = work / f"{subject.name}-{preset}{'-imat' if imatrix_path else ''}.gguf"
    stamp = out.with_name(out.name + ".inputs.json")
    inputs = {"source": fast_fingerprint(subject.model), "preset": preset, "llama": build_label(),
              "imatrix": fast_fingerprint(Path(imatrix_path)) if imatrix_path else None}
    if out.is_file() and stamp.is_file() and json.loads(stamp.read_text()) == inputs:
        v.path, v.skipped, v.quantize_s = out, True, 0.0
        return v
    tmp = out.with_name(f".{out.name}.partial")
    argv = [str(find_tool("llama-quantize").path)]
    if imatrix_path:
        argv += ["--imatrix", imatrix_path]
    argv += [str(subject.model), str(tmp), preset, str(threads)]
    try:
        res = run_tool(argv, log_path=out.with_name(out.name + ".log"), what=f"llama-quantize {preset}")
        os.replace(tmp, out)
    except Exception as exc:  # recorded in the results: a preset llama.cpp refuses is a finding, not a crash
        tmp.unlink(missing_ok=True)
        v.error = f"{type(exc).__name__}: {exc}".splitlines()[0]
        return v
    stamp.write_text(json.dumps(inputs))
    v.path, v.quantize_s = out, res.seconds
    return v


# ----------------------------------------------------------------------------- what is in a file

SUMMARY_ROLES = ("routed_expert", "shared_expert", "attention", "embedding", "output")


def type_summary(path: Path) -> dict:
    """Per role: bytes and the ggml types by share of the role's bytes, read from the GGUF header
    (what llama-quantize really wrote), e.g. {"routed_expert": {"bytes": .., "types": "Q4_K 62%, Q6_K 38%"}}."""
    from apex_orch.model.info import read_model
    from apex_orch.model.roles import classify

    info = read_model(path)
    roles = classify(info)
    per: dict[str, dict[str, int]] = {}
    for t in info.tensors:
        per.setdefault(str(roles[t.name].role), {}).setdefault(t.ggml_type.name, 0)
        per[str(roles[t.name].role)][t.ggml_type.name] += t.n_bytes
    out = {}
    for role in SUMMARY_ROLES:
        by_type = per.get(role, {})
        total = sum(by_type.values())
        ranked = sorted(by_type.items(), key=lambda kv: -kv[1])
        out[role] = {"bytes": total,
                     "types": ", ".join(name if len(ranked) == 1 else f"{name} {b / total:.0%}" for name, b in ranked)}
    out["file_share"] = {role: round(out[role]["bytes"] / info.file_size, 4) for role in SUMMARY_ROLES}
    return out


# ----------------------------------------------------------------------------- evaluating

def evaluate_domain(subject: Subject, domain: Domain, variants: list[Variant], settings) -> dict:
    from apex_orch.evaluation import base_cache as evalcache
    from apex_orch.evaluation.evaluate import ensure_base_cache, plan_eval, run_eval
    from apex_orch.evaluation.inputs import model_facts, text_facts
    tf = text_facts(text=domain.path)
    base = model_facts(subject.model)
    t0 = time.monotonic()
    with evalcache.BaseLogProbs(ensure_base_cache(base, tf, settings)) as c:
        base_ppl, base_err = c.meta["base_ppl"], c.meta["base_ppl_err"]
        n_chunks, n_text_tokens = c.n_chunks, int(c.meta["n_text_tokens"])
    log(f"{domain.name}: base PPL {base_ppl:.4f} ({n_chunks} chunks, {time.monotonic() - t0:.1f} s)")
    rows = []
    for v in variants:
        if v.path is None:
            continue
        r = run_eval(plan_eval(v.path, base=subject.model, settings=settings, text_facts_=tf))
        k = r.kld
        rows.append({"label": v.label, "kind": v.kind, "imatrix": v.imatrix, "file": v.path.name,
                     "size_bytes": r.model.size_bytes, "bpw": round(r.model.bpw, 4),
                     "ppl": r.ppl, "ppl_err": r.ppl_err, "ppl_ratio": k.mean_ppl_ratio,
                     "ppl_ratio_err": k.mean_ppl_ratio_err, "kld_mean": k.kld_mean, "kld_mean_err": k.kld_mean_err,
                     "kld_median": k.kld_median, "kld_p99": k.kld_p990, "kld_p999": k.kld_p999,
                     "kld_max": k.kld_max, "same_top_p": k.same_top_p, "same_top_p_err": k.same_top_p_err,
                     "rms_dp": k.rms_dp, "eval_s": round(r.seconds, 2), "types": type_summary(v.path)})
        log(f"{domain.name}: {v.label:<14} {r.model.size_bytes / 2**20:7.2f} MiB  PPL {r.ppl:.4f}  "
            f"KLD {k.kld_mean:.6f}  same top {k.same_top_p:.2f}%  ({r.seconds:.1f} s)")
    return {"text": {"path": str(domain.path), "sha256": tf.sha256, "bytes": tf.n_bytes,
                     "description": domain.description, "tokens": n_text_tokens},
            "chunks": n_chunks, "scored_tokens": n_chunks * settings.scored_per_chunk,
            "base_ppl": base_ppl, "base_ppl_err": base_err, "rows": rows}


# ----------------------------------------------------------------------------- verdicts

def verdicts(domains: dict[str, dict]) -> list[dict]:
    """For each APEX tier: in each domain, the uniform preset of equal or smaller file size with the
    lowest mean KLD, and whether it beats the tier; also the smallest uniform that matches the tier."""
    out = []
    first = next(iter(domains.values()))
    for row in first["rows"]:
        if row["kind"] != "apex":
            continue
        entry = {"tier": row["label"], "size_bytes": row["size_bytes"], "bpw": row["bpw"], "domains": {}}
        for dname, d in domains.items():
            me = next(r for r in d["rows"] if r["label"] == row["label"])
            uni = [r for r in d["rows"] if r["kind"] == "uniform"]
            smaller = [r for r in uni if r["size_bytes"] <= me["size_bytes"]]
            best = min(smaller, key=lambda r: r["kld_mean"]) if smaller else None
            matching = [r for r in uni if r["kld_mean"] <= me["kld_mean"]]
            match = min(matching, key=lambda r: r["size_bytes"]) if matching else None
            sigma = None
            if best is not None:
                sigma = 2 * math.hypot(best["kld_mean_err"], me["kld_mean_err"])
            entry["domains"][dname] = {
                "kld_mean": me["kld_mean"], "kld_mean_err": me["kld_mean_err"],
                "best_uniform_at_or_below": best["label"] if best else None,
                "best_uniform_size_bytes": best["size_bytes"] if best else None,
                "best_uniform_kld_mean": best["kld_mean"] if best else None,
                "beaten": bool(best and best["kld_mean"] < me["kld_mean"]),
                "difference_beyond_2_sigma": bool(best and abs(best["kld_mean"] - me["kld_mean"]) > sigma),
                "smallest_uniform_matching": match["label"] if match else None,
                "smallest_uniform_matching_size_bytes": match["size_bytes"] if match else None,
            }
        entry["beaten_in_every_domain"] = all(x["beaten"] for x in entry["domains"].values())
        entry["beaten_in_some_domain"] = any(x["beaten"] for x in entry["domains"].values())
        out.append(entry)
    return out


def pareto_labels(rows: list[dict]) -> list[str]:
    pts = sorted(rows, key=lambda r: (r["size_bytes"], r["kld_mean"]))
    front, best = [], math.inf
    for r in pts:
        if r["kld_mean"] < best:
            front.append(r["label"])
            best = r["kld_mean"]
    return front


# ----------------------------------------------------------------------------- outputs

def label_clusters(rows: list[dict], size_tol: float = 0.04, kld_tol: float = 0.15) -> list[list[dict]]:
    """Group points that would print on top of each other (within size_tol and kld_tol in natural-log
    units of the group's first point), so each group gets one label."""
    clusters: list[list[dict]] = []
    for r in sorted(rows, key=lambda r: (r["size_bytes"], r["kld_mean"])):
        for c in clusters:
            if (abs(math.log(r["size_bytes"] / c[0]["size_bytes"])) < size_tol
                    and abs(math.log(r["kld_mean"] / c[0]["kld_mean"])) < kld_tol):
                c.append(r)
                break
        else:
            clusters.append([r])
    return clusters


def plot(domains: dict[str, dict], base_size: int, out: Path, title: str) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import ScalarFormatter

    fig, axes = plt.subplots(1, len(domains), figsize=(6.5 * len(domains), 5), dpi=120, squeeze=False)
    for ax, (dname, d) in zip(axes[0], domains.items()):
        rows = [r for r in d["rows"] if r["kld_mean"] > 0]
        for kind, color in (("uniform", "tab:blue"), ("apex", "tab:orange")):
            for imat in (False, True):
                pts = [r for r in rows if r["kind"] == kind and r["imatrix"] == imat]
                if not pts:
                    continue
                ax.scatter([r["size_bytes"] / 2**20 for r in pts], [r["kld_mean"] for r in pts],
                           color=color if imat else "white", edgecolors=color, linewidths=1.5, zorder=3,
                           marker="o" if kind == "apex" else "s",
                           label=f"{'APEX' if kind == 'apex' else 'uniform'} {'with' if imat else 'without'} imatrix")
        # points that nearly coincide share one label; neighbouring labels alternate above / below
        for i, members in enumerate(label_clusters(rows)):
            lead = members[0]
            ax.annotate(" / ".join(r["label"] for r in members), (lead["size_bytes"] / 2**20, lead["kld_mean"]),
                        textcoords="offset points", xytext=(5, 4) if i % 2 == 0 else (5, -10), fontsize=7)
        front = [next(r for r in rows if r["label"] == lab) for lab in pareto_labels(rows)]
        ax.plot([r["size_bytes"] / 2**20 for r in front], [r["kld_mean"] for r in front], "--", color="gray",
                zorder=2, label="Pareto front")
        ax.axvline(base_size / 2**20, color="gray", linestyle=":", label="F16 base")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(ScalarFormatter())
        ax.tick_params(axis="x", which="minor", labelsize=7)
        ax.set_xlabel("file size (MiB, log)")
        ax.set_ylabel("mean KL divergence vs F16 (nats, log)")
        ax.set_title(f"{dname}: {d['chunks']} x {d.get('n_ctx', '')} tokens, {d['scored_tokens']} scored", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, loc="upper right")
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, out)
    return out


def _mib(n: int | None) -> str:
    return "—" if n is None else f"{n / 2**20:.2f}"


def markdown(data: dict) -> str:
    s, im, doms = data["settings"], data["imatrix"], data["domains"]
    m = data["model"]
    lines = ["# Quality: APEX tiers vs llama.cpp uniform presets", ""]
    if data["mode"] == "smoke":
        lines += ["**Smoke run** (CI plumbing check on a random-weight model): the numbers mean nothing.", ""]
    lines += [f"Model: {m['label']} — {m.get('description', '')}", "",
              f"- F16 size {_mib(m['size_bytes'])} MiB; {m.get('params_note', '')}",
              f"- imatrix: corpus `{im['corpus']}`, {im['chunks']} chunks x {im['ctx']} tokens "
              f"(sha256 {im['sha256'][:12]}), llama-imatrix {im['llama_imatrix_s']} s"
              + (" (cache hit)" if im["cache_hit"] else ""),
              f"- evaluation: apex_orch.evaluation.evaluate (llama-perplexity's statistics through the bindings), ctx "
              f"{s['n_ctx']}, "
              f"batch {s['n_batch']}, {s['n_threads']} threads, flash-attn {'on' if s['flash_attn'] else 'off'}, "
              f"repack {'on' if s['repack'] else 'off'}; KLD against the F16 model",
              f"- llama.cpp: {data['llama_cpp']}; wall time {data['timing']['total_s'] / 60:.1f} min "
              f"(quantize {data['timing']['quantize_s']:.0f} s, eval {data['timing']['eval_s']:.0f} s)", ""]
    lines += ["Held-out texts (neither trained on nor in the imatrix corpus):", ""]
    for dname, d in doms.items():
        ov = data["overlap"].get(dname, {})
        lines.append(f"- **{dname}**: {d['text']['description']}; {d['text']['tokens']:,} tokens, "
                     f"{d['chunks']} chunks x {s['n_ctx']} evaluated ({d['scored_tokens']:,} scored tokens); "
                     f"F16 PPL {d['base_ppl']:.4f} ± {d['base_ppl_err']:.4f}; lines shared with the "
                     f"`{im['corpus']}` corpus: {ov.get('lines_in_corpus', '?')} of {ov.get('lines_checked', '?')}")
    lines.append("")
    for dname, d in doms.items():
        lines += [f"## {dname}", "",
                  "| file | kind | imatrix | size MiB | bpw | PPL | PPL ratio | KLD mean | KLD 99.9% | KLD max | same "
                  "top p |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        front = set(pareto_labels(d["rows"]))
        for r in sorted(d["rows"], key=lambda r: -r["size_bytes"]):
            name = f"**{r['label']}**" if r["kind"] == "apex" else r["label"]
            name += " ◆" if r["label"] in front else ""
            lines.append(f"| {name} | {'APEX' if r['kind'] == 'apex' else 'uniform'} | "
                         f"{'yes' if r['imatrix'] else 'no'} | "
                         f"{_mib(r['size_bytes'])} | {r['bpw']:.2f} | {r['ppl']:.4f} ± {r['ppl_err']:.4f} | "
                         f"{r['ppl_ratio']:.4f} | {r['kld_mean']:.6f} ± {r['kld_mean_err']:.6f} | {r['kld_p999']:.4f} "
                         f"| {r['kld_max']:.4f} | {r['same_top_p']:.2f}% |")
        lines += ["", "◆ on the Pareto front (no other file is both smaller and lower in mean KLD).", ""]
    first = next(iter(doms.values()))
    base_types = data["model"].get("types")
    lines += ["## What each file holds (ggml types by share of each role's bytes, from the file headers)", "",
              "| file | routed experts | shared expert | attention | token_embd | output | "
              "share of the file: experts / embd + output |",
              "|---|---|---|---|---|---|---|"]
    for r in ([{"label": "F16 base", "types": base_types}] if base_types else []) + sorted(
            first["rows"], key=lambda r: -r["size_bytes"]):
        t = r["types"]
        fs = t["file_share"]
        lines.append(f"| {r['label']} | {t['routed_expert']['types']} | {t['shared_expert']['types']} | "
                     f"{t['attention']['types']} | {t['embedding']['types']} | {t['output']['types']} | "
                     f"{fs['routed_expert']:.0%} / {fs['embedding'] + fs['output']:.0%} |")
    lines.append("")
    if data.get("failed"):
        lines += ["Not produced: " + "; ".join(f"{f['label']}: {f['error']}" for f in data["failed"]), ""]
    dnames = list(doms)
    lines += ["## Does a uniform preset of equal or smaller size beat each APEX tier on mean KLD?", "",
              "| APEX tier | size MiB | "
              + " | ".join(f"{d}: tier KLD | {d}: best uniform ≤ size (KLD)" for d in dnames)
              + " | beaten? | smallest uniform with ≤ KLD (" + dnames[0] + ") |",
              "|---|---|" + "---|---|" * len(dnames) + "---|---|"]
    for v in data["verdicts"]:
        cells = []
        for d in dnames:
            x = v["domains"][d]
            best = (f"{x['best_uniform_at_or_below']} {_mib(x['best_uniform_size_bytes'])} MiB "
                    f"({x['best_uniform_kld_mean']:.6f})" if x["best_uniform_at_or_below"] else "none that small")
            mark = ""
            if x["beaten"]:
                mark = " — **beats it**" + ("" if x["difference_beyond_2_sigma"] else " (within 2σ)")
            cells += [f"{x['kld_mean']:.6f}", best + mark]
        if v["beaten_in_every_domain"]:
            verdict = "**yes** (both domains)" if len(dnames) == 2 else "**yes**"
        elif v["beaten_in_some_domain"]:
            verdict = "partly (" + ", ".join(d for d in dnames if v["domains"][d]["beaten"]) + ")"
        else:
            verdict = "no"
        x0 = v["domains"][dnames[0]]
        match = (f"{x0['smallest_uniform_matching']} ({_mib(x0['smallest_uniform_matching_size_bytes'])} MiB)"
                 if x0["smallest_uniform_matching"] else "none")
        lines.append(f"| **{v['tier']}** | {_mib(v['size_bytes'])} | " + " | ".join(cells) + f" | {verdict} | {match} "
                                                                                             f"|")
    lines += ["", "σ: the KLD-mean standard errors of the two files combined in quadrature (they are measured on "
              "the same tokens, so this is conservative).", ""]
    lines += ["## Reading the results", ""] + data["findings"] + [""]
    if data["mode"] == "full":
        lines += ["## Caveats", "",
                  f"- One small model ({data['model'].get('params_note') or 'see above'}): n_embd 256 and 256-wide "
                  "experts, so every matrix is small and the per-tensor type choices weigh differently than in a "
                  "100B+ MoE. The result says how the tiers behave on a real trained MoE of this shape, not on "
                  "Mistral-Small-4 itself.",
                  f"- {data['settings']['chunks']} chunks x {data['settings']['n_ctx']} tokens per domain; the ± are "
                  "the statistical errors llama-perplexity reports. Differences inside 2σ are marked; they are not "
                  "evidence either way.",
                  "- Sizes are whole files (metadata included); APEX files carry a few extra `apex.*` keys (< 1 KiB).",
                  "- Uniform presets are plain `llama-quantize SRC OUT PRESET` (llama.cpp's own per-tensor rules for "
                  "the preset); `+imat` rows use the same diverse imatrix as the I-tiers.", ""]
    return "\n".join(lines)


def findings(data: dict) -> list[str]:
    """Plain statements derived from the numbers (no adjectives the data does not support)."""
    v = data["verdicts"]
    out = []
    beaten_all = [x["tier"] for x in v if x["beaten_in_every_domain"]]
    beaten_some = [x["tier"] for x in v if x["beaten_in_some_domain"] and not x["beaten_in_every_domain"]]
    unbeaten = [x["tier"] for x in v if not x["beaten_in_some_domain"]]
    n = len(v)
    out.append(f"- {len(beaten_all)} of {n} APEX tiers are beaten on mean KLD by a uniform preset of equal or smaller "
               f"size in every domain: {', '.join(beaten_all) or 'none'}.")
    if beaten_some:
        out.append(f"- Beaten in one domain only: {', '.join(beaten_some)}.")
    out.append(f"- Not beaten in any domain: {', '.join(unbeaten) or 'none'}.")
    for dname, d in data["domains"].items():
        front = pareto_labels(d["rows"])
        apex_front = [lab for lab in front if any(r["label"] == lab and r["kind"] == "apex" for r in d["rows"])]
        out.append(f"- {dname}: Pareto front {' → '.join(front)} ({len(apex_front)} APEX of {len(front)}).")
    apex_rows = [r for r in data["domains"][next(iter(data["domains"]))]["rows"] if r["kind"] == "apex"]
    for me in apex_rows:
        # another APEX tier no larger and no worse in every domain (strictly better in one or smaller)
        def dominates(o: dict) -> bool:
            mine = {d: next(r for r in dd["rows"] if r["label"] == me["label"]) for d, dd in data["domains"].items()}
            other = {d: next(r for r in dd["rows"] if r["label"] == o["label"]) for d, dd in data["domains"].items()}
            no_worse = all(other[d]["kld_mean"] <= mine[d]["kld_mean"] for d in mine)
            return o["size_bytes"] <= me["size_bytes"] and no_worse and (
                o["size_bytes"] < me["size_bytes"] or any(other[d]["kld_mean"] < mine[d]["kld_mean"] for d in mine))
        better = [o["label"] for o in apex_rows if o["label"] != me["label"] and dominates(o)]
        if better:
            out.append(f"- {me['label']} is dominated by another APEX tier (no larger, no higher mean KLD in any "
                       f"domain; point estimates, differences may be inside σ): {', '.join(better)}.")
    pairs = [("quality", "i-quality"), ("balanced", "i-balanced"), ("compact", "i-compact")]
    for dname, d in data["domains"].items():
        by = {r["label"]: r for r in d["rows"]}
        gains = [f"{a} {by[a]['kld_mean']:.4g} → {b} {by[b]['kld_mean']:.4g} "
                 f"({(by[b]['kld_mean'] / by[a]['kld_mean'] - 1) * 100:+.0f}%)"
                 for a, b in pairs if a in by and b in by]
        if gains:
            out.append(f"- imatrix effect ({dname}, mean KLD): " + "; ".join(gains) + ".")
    return out


# ----------------------------------------------------------------------------- main

def derive(data: dict) -> None:
    """The verdicts, Pareto fronts and findings, all computed from data["domains"]."""
    data["verdicts"] = verdicts(data["domains"])
    data["pareto_front"] = {k: pareto_labels(d["rows"]) for k, d in data["domains"].items()}
    data["findings"] = findings(data)


def rerender(json_path: Path, out_dir: Path) -> int:
    """quality.md and quality.png again from a quality.json (presentation changes need no new run;
    the numbers, machine and commit stay those of the measuring run)."""
    data = json.loads(json_path.read_text())
    derive(data)
    out_dir.mkdir(parents=True, exist_ok=True)
    png = plot(data["domains"], data["model"]["size_bytes"], out_dir / "quality.png",
               f"{data['model']['label']}: mean KLD vs size (lower left is better)")
    path = out_dir / "quality.md"
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(results_header("quality", data["machine"]) + markdown(data).rstrip() + "\n", encoding="utf-8")
    os.replace(tmp, path)
    log(f"re-rendered {path} and {png} from {json_path}")
    return 0


def quality_data(subject: Subject, variants: list[Variant], domains: dict, im: dict, overlap: dict, settings,
                 timing: dict, mode: str) -> dict:
    """The quality results (quality.json's shape) from the measured rows; bench_fit calls it too."""
    rec = subject.record
    params = rec.get("model", {}).get("params", {})
    params_note = ""
    if params:
        share = params.get("share") or {}
        embd_out = share.get("embedding_and_output")
        if embd_out is None:   # records of the first reference model: 32000-token vocabulary
            embd_out = 2 * rec.get("model", {}).get("n_vocab", 32000) * rec["config"]["n_embd"] / params["total"]
        params_note = (f"{params['total'] / 1e6:.1f} M parameters ({params['routed_experts'] / params['total']:.0%} "
                       f"in routed experts; token_embd + output are {embd_out:.0%})")
    cfg = rec.get("config", {})
    n_vocab = rec.get("model", {}).get("n_vocab")
    vocab = (f"{n_vocab}-token BPE vocabulary" if rec.get("vocabulary", {}).get("kind") == "bpe"
             else f"{n_vocab or 32000}-token vocabulary")
    return {
        "machine": machine(),
        "mode": mode,
        "llama_cpp": build_label(),
        "model": {"label": subject.label, "file": subject.model.name, "size_bytes": subject.model.stat().st_size,
                  "cache_key": rec.get("cache_key"), "params": params, "params_note": params_note,
                  "types": type_summary(subject.model),
                  "description": (f"mistral4, {cfg['n_layer']} blocks, n_embd {cfg['n_embd']}, {cfg['n_expert']} "
                                  f"experts (top-{cfg['n_expert_used']}) + {cfg['n_expert_shared']} shared, "
                                  f"expert FFN {cfg['expert_ff']}, {vocab}; trained "
                                  f"{cfg['steps']} steps on Python stdlib code + pydoc prose") if cfg else "",
                  "heldout_ppl_at_build": {k: v.get("ppl_llama") for k, v in
                                           rec.get("validation", {}).get("domains", {}).items()}},
        "imatrix": im,
        "settings": settings.to_dict(),
        "overlap": overlap,
        "variants": [{"label": v.label, "kind": v.kind, "profile_or_preset": v.name, "imatrix": v.imatrix,
                      "file": v.path.name if v.path else None, "quantize_s": v.quantize_s,
                      "up_to_date": v.skipped, "plan_warnings": v.warnings, "error": v.error}
                     for v in variants],
        "failed": [{"label": v.label, "error": v.error} for v in variants if v.error],
        "domains": domains,
        "timing": timing,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="CI: tiny random model, compact + i-compact vs Q4_K_M")
    ap.add_argument("--model", type=Path, help="a reference-moe-*.gguf (default: the cached one)")
    ap.add_argument("--out", type=Path, default=None, help="results folder (default bench/results)")
    ap.add_argument("--work", type=Path, help="keep the quantized files here (reused when up to date)")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--chunks", type=int, default=32, help="held-out chunks per domain")
    ap.add_argument("--imatrix-ctx", type=int, default=512)
    ap.add_argument("--imatrix-chunks", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--no-uniform-k-imatrix", action="store_true",
                    help="skip Q6_K/Q5_K_M/Q4_K_M/Q3_K_M with the imatrix")
    ap.add_argument("--from-json", type=Path, metavar="QUALITY_JSON",
                    help="only re-render quality.md and quality.png from a results file (no measuring)")
    args = ap.parse_args(argv)
    if args.from_json:
        return rerender(args.from_json, args.out or RESULTS)

    from apex_orch.evaluation.inputs import EvalSettings, default_threads
    from apex_orch.model.info import read_model
    from apex_orch.quantize.job import resolve_imatrix

    threads = args.threads or default_threads()
    t_start = time.monotonic()
    tmp_ctx = None
    if args.work:
        work = args.work
        work.mkdir(parents=True, exist_ok=True)
    else:
        tmp_ctx = tempfile.TemporaryDirectory(prefix="bench-quality-")
        work = Path(tmp_ctx.name)
    if args.smoke:
        os.environ.setdefault("APEX_ORCH_EVAL_CACHE", str(work / "eval-cache"))
    try:
        if args.smoke:
            subject = smoke_subject(work)
            tiers, uniform = SMOKE_TIERS, SMOKE_UNIFORM
            ctx, chunks, im_ctx, im_chunks = 128, 2, 128, 2
        else:
            try:
                subject = reference_subject(args.model)
            except NoReferenceModel as exc:
                print(f"bench-quality: {exc}", file=sys.stderr)
                return 2
            tiers = APEX_TIERS
            uniform = UNIFORM + ([] if args.no_uniform_k_imatrix else UNIFORM_K_IMATRIX)
            ctx, chunks, im_ctx, im_chunks = args.ctx, args.chunks, args.imatrix_ctx, args.imatrix_chunks
        log(f"model: {subject.model} ({subject.model.stat().st_size / 2**20:.1f} MiB)")

        im = build_imatrix(subject.model, im_ctx, im_chunks, threads)
        corpus_text = im.pop("corpus_text")
        im_src = resolve_imatrix(read_model(subject.model), im["path"])
        im["sha256"] = im_src.sha256
        overlap = {d.name: overlap_with_corpus(d.path.read_text(encoding="utf-8", errors="replace"), corpus_text)
                   for d in subject.domains}
        for dname, ov in overlap.items():
            log(f"{dname}: {ov['lines_in_corpus']} of {ov['lines_checked']} lines also in the {CORPUS} corpus")

        t_q = time.monotonic()
        variants: list[Variant] = []
        for profile in tiers:
            v = quantize_apex(subject, profile, im_src, work, threads)
            log(f"quantized {v.label}: {v.path.stat().st_size / 2**20:.2f} MiB"
                + (" (up to date)" if v.skipped else f" in {v.quantize_s:.1f} s"))
            variants.append(v)
        for preset, with_im in uniform:
            v = quantize_uniform(subject, preset, im["path"] if with_im else None, work, threads)
            if v.error:
                log(f"{v.label}: FAILED: {v.error}")
            else:
                log(f"quantized {v.label}: {v.path.stat().st_size / 2**20:.2f} MiB"
                    + (" (up to date)" if v.skipped else f" in {v.quantize_s:.1f} s"))
            variants.append(v)
        quantize_s = time.monotonic() - t_q

        settings = EvalSettings(n_ctx=ctx, chunks=chunks, n_threads=threads)
        t_e = time.monotonic()
        domains = {}
        for d in subject.domains:
            domains[d.name] = evaluate_domain(subject, d, variants, settings)
            domains[d.name]["n_ctx"] = ctx
        eval_s = time.monotonic() - t_e

        data = quality_data(subject, variants, domains, im, overlap, settings,
                            {"quantize_s": round(quantize_s, 1), "eval_s": round(eval_s, 1),
                             "total_s": round(time.monotonic() - t_start, 1)}, "smoke" if args.smoke else "full")
        derive(data)
        out_dir = args.out or RESULTS
        png = plot(domains, subject.model.stat().st_size, out_dir / "quality.png",
                   f"{subject.label}: mean KLD vs size (lower left is better)")
        data["plot"] = png.name
        j, m = write_results("quality", data, markdown(data), out_dir)
        log(f"wrote {j}, {m}, {png}; {load_note(data['machine'])}")
        return 0
    finally:
        if tmp_ctx is not None:
            tmp_ctx.cleanup()


if __name__ == "__main__":
    sys.exit(main())
