"""Fit benchmark: profiles fitted to the size of every APEX tier and uniform preset, against those files.

    make bench-fit                           (= .venv/bin/python bench/bench_fit.py)
    .venv/bin/python bench/bench_fit.py --model <cache>/models/reference-moe-<key>.gguf
    .venv/bin/python bench/bench_fit.py --rerender      # tables and plot from bench/results/fit.json

On the trained reference MoE (bench/reference_model/, `make reference-model`):
  1. the `diverse` imatrix (cached, as bench_quality uses);
  2. measured sensitivity (apex_orch.fit.sensitivity, the default imatrix ladder IQ1_M..Q8_0) on a
     text cut from the *ends* of the two held-out texts, after the chunks step 5 evaluates: the
     cut is checked in tokens, so no measured token is ever scored;
  3. every APEX tier and uniform preset of bench_quality, quantized;
  4. one fitted profile per distinct file size among them (`fit_profile`, budget = that file's size);
  5. all of them evaluated on both held-out domains (KLD against F16, 32 chunks x 512), and the
     fitted ones also on the measurement text (predicted vs measured: the additivity check);
  6. the Mistral-Small-4 replica (real shapes): fitted at the card's ~72 / 62 / 48 / 38 GB with
     the reference model's sensitivity, and what measuring the flagship itself would cost,
     extrapolated from this run's rates.
Results: bench/results/fit.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO))
import bench_quality as bq  # noqa: E402
from common import machine, write_results  # noqa: E402

from apex_orch.core import settings  # noqa: E402

SMOKE_LADDER = "Q3_K,Q4_K,Q8_0"
CARD_SIZES_GB = {"I-Balanced / Balanced": 72, "I-Quality / Quality": 62, "I-Compact / Compact": 48, "I-Mini": 38}
SENS_CHUNKS_PER_DOMAIN = 5
CTX = 512
log = bq.log


def find_model(path: Path | None) -> Path:
    """The reference model: --model, else the newest cached one built with the full config (bf16 or not:
    a CPU without bf16 matmuls trains it in fp32, `--set bf16=false`)."""
    if path is not None:
        return path
    from bench.reference_model.config import FULL
    want = {k: v for k, v in json.loads(json.dumps(FULL.asdict())).items() if k != "bf16"}
    found = []
    for rec_path in (settings.cache_root() / "models").glob("reference-moe-*.json"):
        gguf = rec_path.with_suffix(".gguf")
        try:
            rec = json.loads(rec_path.read_text())
        except (OSError, ValueError):
            continue
        cfg = {k: v for k, v in rec.get("config", {}).items() if k != "bf16"}
        if gguf.is_file() and cfg == want and rec.get("validation", {}).get("passed"):
            found.append((gguf.stat().st_mtime, gguf))
    if not found:
        raise bq.NoReferenceModel("no trained reference model in the cache: make reference-model "
                                  "(or --set bf16=false on a CPU without bf16 matmuls)")
    return max(found)[1]


def measurement_text(subject, eval_chunks: int, work: Path, ctx: int = CTX,
                     per_domain: int = SENS_CHUNKS_PER_DOMAIN) -> tuple[Path, dict]:
    """SENS_CHUNKS_PER_DOMAIN chunks' worth from the end of each held-out text, proven (in tokens)
    to lie after the `eval_chunks` chunks the domains are scored on."""
    from apex_orch.evaluation.session import BindingsModel
    parts, proof = [], {}
    with BindingsModel(subject.model, vocab_only=True) as bm:
        for d in subject.domains:
            text = d.path.read_text(encoding="utf-8")
            need = per_domain * ctx + 64
            lo, hi = 0, len(text)   # the largest cut whose tail still holds `need` tokens
            while hi - lo > 64:
                mid = (lo + hi) // 2
                if len(bm.tokenize(text[mid:].encode())) >= need:
                    lo = mid
                else:
                    hi = mid
            head_tokens = len(bm.tokenize(text[:lo].encode()))
            if head_tokens <= (eval_chunks + 1) * ctx:
                raise SystemExit(f"{d.name}: the held-out text is too short to keep the measurement text apart")
            parts.append(text[lo:])
            proof[d.name] = {"cut_at_char": lo, "tokens_before_cut": head_tokens,
                             "scored_tokens_end_before": eval_chunks * ctx,
                             "tail_tokens": len(bm.tokenize(text[lo:].encode()))}
    path = work / "sensitivity-text.txt"
    # interleave so that the first chunks hold both domains
    path.write_text(parts[1] + "\n" + parts[0], encoding="utf-8")   # prose first: the text is cut to chunks
    return path, proof


# Sizes (of these APEX tiers) also fitted with a bound on the predicted KLD 99.9%: TAIL_FACTOR x the
# unbounded fit's prediction, to measure what `fit --max-kld-99-9` buys in the tail and costs in the mean.
TAIL_BOUND_TIERS = ("i-quality", "i-compact", "i-mini")
TAIL_FACTOR = 0.75


def fitted_variants(model: Path, sens, sizes: list[tuple[str, int]], imatrix_src, work: Path, threads: int):
    from apex_orch.core.errors import ApexError
    from apex_orch.fit.fitter import fit_profile
    from apex_orch.model.info import read_model
    from apex_orch.plan.profiles import load_profile
    from apex_orch.quantize.job import plan_quantize
    from apex_orch.quantize.run import run_quantize
    info = read_model(model)
    out = []
    jobs = [(label, size, None) for label, size in sizes]
    for label, size in sizes:
        if label in TAIL_BOUND_TIERS:
            jobs.append((label, size, TAIL_FACTOR))
    unbounded: dict[str, float] = {}
    for label, size, tail in jobs:
        name = f"fit@{label}" + ("+tail" if tail else "")
        t0 = time.monotonic()
        try:
            bound = tail * unbounded[label] if tail else None
            res = fit_profile(info, sens, size=size, tier=f"Fit-{label.replace('+', '-')}" + ("-tail" if tail else ""),
                              max_kld_p999=bound)
        except (ApexError, KeyError) as exc:   # below every group at the cheapest type, a bound no fit meets: said
            log(f"{name}: {getattr(exc, 'message', exc)}")
            continue
        sol = res.solution
        if not tail and sol.kld_p999 is not None:
            unbounded[label] = sol.kld_p999
        fit_s = time.monotonic() - t0
        path = work / f"{name.replace('@', '-').replace('+', '-').lower()}.yaml"
        path.write_text(res.yaml_text)
        job = plan_quantize(model, load_profile(path), out_dir=work, name="Ref", imatrix=imatrix_src, threads=threads,
                            model=info)
        q = run_quantize(job, force=True)
        v = bq.Variant(name, "fitted", True, path.name, q.files[0], q.seconds)
        uncorrected = sum(sol.shares[u] * sens.loss(u[0], t) for u, t in sol.types.items())
        v.fit = {"target_label": label, "budget_bytes": size, "file_bytes": q.files[0].stat().st_size,
                 "predicted_kld_mean": sol.kld_mean, "predicted_kld_mean_uncorrected": uncorrected,
                 "predicted_kld_p999": sol.kld_p999, "max_kld_p999": bound,
                 "additivity": {t.name: f for t, f in res.additivity.items()},
                 "within_0.5%": res.within, "fit_s": round(fit_s, 2), "yaml": res.yaml_text, "steps": sol.steps}
        log(f"{name}: {v.fit['file_bytes'] / 2**20:.2f} MiB (budget {size / 2**20:.2f}), predicted KLD "
            f"{sol.kld_mean:.6f} (sum of parts {uncorrected:.6f}), 99.9% {sol.kld_p999}, fit {fit_s:.1f} s")
        out.append(v)
    return out


def replica_fits(sens, work: Path) -> list[dict]:
    from apex_orch.demo.synthetic import write_mistral_small_4_replica
    from apex_orch.fit.fitter import fit_profile
    from apex_orch.model.info import read_model
    replica = read_model(write_mistral_small_4_replica(work / "ms4-replica.gguf"))
    rows = []
    from apex_orch.core.errors import RequestError, ResultFileError
    for label, gb in CARD_SIZES_GB.items():
        t0 = time.monotonic()
        try:
            res = fit_profile(replica, sens, size=gb * 10 ** 9, tier=f"Fit-{gb}GB")
        except (RequestError, ResultFileError) as exc:
            rows.append({"card_tier": label, "card_gb": gb, "error": exc.message})
            continue
        bands = {}
        for role, by_band in res.plan.band_table().items():
            bands[role] = {b: sorted(ts) for b, ts in by_band.items()}
        rows.append({"card_tier": label, "card_gb": gb, "file_bytes": res.file_bytes, "shortfall": res.shortfall,
                     "within_0.5%": res.within, "bpw": round(res.plan.bpw, 4), "fit_s": round(time.monotonic() - t0, 2),
                     "predicted_kld_mean_transferred": res.solution.kld_mean, "bands": bands, "yaml": res.yaml_text})
        log(f"replica @{gb} GB: {res.file_bytes / 1e9:.3f} GB ({100 * res.shortfall:.3f}% under), {res.plan.bpw:.3f} "
            f"bpw")
    src_bytes = sum(t.n_bytes for t in replica.tensors)
    return rows, src_bytes, replica


PROXY_CALIBRATION_TYPES = ("IQ2_S", "Q4_K")


def proxy_check(sens, model: Path, sizes: list[tuple[str, int]]) -> dict:
    """The proxy against the exact measurements: rank agreement over every (group, type), and what
    fitting from the proxy (calibrated on PROXY_CALIBRATION_TYPES only) gives up, scored by the exact table."""
    import copy
    from apex_orch.fit.fitter import fit_profile
    from apex_orch.fit.measurements import Sensitivity
    from apex_orch.fit.proxy import calibrate, spearman
    from apex_orch.model.info import read_model
    d = sens.data
    roles = {g["key"]: g["role"] for g in d["groups"]}
    pairs = [(d["proxy"][k][t], d["measurements"][k][t]["kld_mean"]) for k in roles for t in d["ladder"]]
    few = {k: {t: v for t, v in by.items() if t in PROXY_CALIBRATION_TYPES} for k, by in d["proxy"].items()}
    scales = calibrate(few, d["measurements"], roles)
    calibrated = [(scales[roles[k]] * d["proxy"][k][t], d["measurements"][k][t]["kld_mean"])
                  for k in roles for t in d["ladder"] if t not in PROXY_CALIBRATION_TYPES]
    proxy_data = copy.deepcopy(d)
    proxy_data["measurements"] = {k: {t: {"kld_mean": scales[roles[k]] * v} for t, v in by.items()}
                                  for k, by in d["proxy"].items()}
    proxy_sens = Sensitivity(proxy_data)
    info = read_model(model)
    fits = []
    from apex_orch.core.errors import RequestError, ResultFileError
    for label, size in sizes:
        try:
            ex = fit_profile(info, sens, size=size)
            px = fit_profile(info, proxy_sens, size=size)
        except (RequestError, ResultFileError):
            continue
        # the proxy fit's choice, scored with the exact table
        exact_of_proxy = sum(px.solution.shares[u] * d["measurements"][u[0]][t.name]["kld_mean"]
                             for u, t in px.solution.types.items())
        fits.append({"target": label, "exact_fit_predicted": ex.solution.kld_mean,
                     "proxy_fit_scored_exactly": exact_of_proxy,
                     "loss_given_up": exact_of_proxy / ex.solution.kld_mean - 1 if ex.solution.kld_mean else None})
    ratios = [m / p for p, m in calibrated if p > 0]
    return {"spearman_raw": spearman([p for p, _ in pairs], [m for _, m in pairs]),
            "spearman_calibrated_held_out": spearman([p for p, _ in calibrated], [m for _, m in calibrated]),
            "calibration_types": list(PROXY_CALIBRATION_TYPES), "scales": scales,
            "held_out_ratio_median": sorted(ratios)[len(ratios) // 2] if ratios else None,
            "proxy_s": d["cost"]["proxy_s"], "fits": fits}


def cost_extrapolation(sens, ref_model: Path, replica, replica_bytes: int) -> dict:
    """What `apex-orch sensitivity` (exact) would take on the flagship, from this run's measured rates."""
    from apex_orch.model.info import read_model
    c = sens.data["cost"]
    ref = read_model(ref_model)
    ref_bytes = sum(t.n_bytes for t in ref.tensors)
    n_groups, n_types = len(sens.data["groups"]), len(sens.data["ladder"])
    evals = (n_groups + 1) * n_types
    q_rate = ref_bytes * n_types / sum(c["quantize_s"].values())          # source bytes quantized per second
    splice_rate = ref_bytes * n_groups * n_types / max(c["splice_s"], 1e-9)   # bytes written per second
    eval_per = c["eval_s"] / evals
    tokens = sens.data["text"]["chunks"] * sens.data["text"]["ctx"] * evals
    return {
        "reference": {"source_bytes": ref_bytes, "groups": n_groups, "ladder": n_types, "evaluations": evals,
                      "total_s": c["total_s"], "one_tier_quantize_s": c["one_tier_quantize_s"],
                      "as_tier_quantizations": c["as_tier_quantizations"], "quantize_bytes_per_s": round(q_rate),
                      "splice_bytes_per_s": round(splice_rate), "eval_s_each": round(eval_per, 2),
                      "eval_tokens": tokens},
        "flagship": {"source_bytes": replica_bytes, "spliced_bytes_written": replica_bytes * n_groups * n_types,
                     "uniform_quantizations": n_types, "evaluations": evals, "eval_tokens": tokens,
                     "quantize_s_at_this_rate": round(replica_bytes * n_types / q_rate),
                     "splice_s_at_this_rate": round(replica_bytes * n_groups * n_types / splice_rate)},
    }


def compare(domains: dict, fitted: list, fixed: list) -> list[dict]:
    """Each fitted profile against the files of its size, and against every uniform preset of <= its size."""
    out = []
    for v in fitted:
        entry = {"fitted": v.label, "target": v.fit["target_label"], "file_bytes": v.fit["file_bytes"], "domains": {}}
        for dname, d in domains.items():
            rows = {r["label"]: r for r in d["rows"]}
            me = rows[v.label]
            same = [rows[f.label] for f in fixed if f.path is not None and f.label in rows
                    and abs(rows[f.label]["size_bytes"] - v.fit["budget_bytes"]) <= 0.001 * v.fit["budget_bytes"]]
            vs = []
            for r in same:
                sigma = 2 * math.hypot(r["kld_mean_err"], me["kld_mean_err"])
                vs.append({"file": r["label"], "kind": r["kind"], "size_bytes": r["size_bytes"],
                           "kld_mean": r["kld_mean"],
                           "kld_mean_err": r["kld_mean_err"], "kld_p999": r["kld_p999"],
                           "fitted_lower": me["kld_mean"] < r["kld_mean"],
                           "beyond_2_sigma": abs(me["kld_mean"] - r["kld_mean"]) > sigma})
            smaller_uniform = [r for r in d["rows"] if r["kind"] == "uniform" and r["size_bytes"] <= me["size_bytes"]]
            beaters = [r["label"] for r in smaller_uniform if r["kld_mean"] < me["kld_mean"]]
            entry["domains"][dname] = {"kld_mean": me["kld_mean"], "kld_mean_err": me["kld_mean_err"],
                                       "kld_p999": me["kld_p999"], "vs_same_size": vs,
                                       "uniform_at_or_below_that_beat_it": beaters}
        out.append(entry)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--chunks", type=int, default=32, help="evaluation chunks per held-out domain")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None, help="results folder (default bench/results)")
    ap.add_argument("--work", type=Path, default=None, help="work folder (default: a temporary one)")
    ap.add_argument("--rerender", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="CI: a tiny random model, 3 types, 2 tiers (numbers mean "
                                                         "nothing)")
    args = ap.parse_args(argv)
    if args.rerender:
        import bench_fit_report
        return bench_fit_report.rerender(args.out or bq.RESULTS)
    from apex_orch.evaluation.inputs import EvalSettings
    from apex_orch.fit.sensitivity import plan_sensitivity, run_sensitivity
    from apex_orch.model.info import read_model
    from apex_orch.quantize.job import resolve_imatrix

    t_start = time.monotonic()
    mach = machine()
    work_ctx = tempfile.TemporaryDirectory(prefix="bench-fit-") if args.work is None else None
    work = Path(work_ctx.name) if work_ctx else args.work
    work.mkdir(parents=True, exist_ok=True)
    if args.smoke:
        subject, ctx, per_domain, ladder = bq.smoke_subject(work), 128, 1, SMOKE_LADDER
        tiers, uniform = bq.SMOKE_TIERS, bq.SMOKE_UNIFORM
        args.chunks = min(args.chunks, 2)
    else:
        try:
            subject = bq.reference_subject(find_model(args.model))
        except bq.NoReferenceModel as exc:
            print(f"bench_fit: {exc}", file=sys.stderr)
            return 2
        ctx, per_domain, ladder = CTX, SENS_CHUNKS_PER_DOMAIN, None
        tiers, uniform = bq.APEX_TIERS, bq.UNIFORM + bq.UNIFORM_K_IMATRIX
    timing: dict[str, float] = {}
    im = bq.build_imatrix(subject.model, ctx, 8 if args.smoke else 64, args.threads)
    imatrix_src = resolve_imatrix(read_model(subject.model), im["path"])
    text, proof = measurement_text(subject, args.chunks, work, ctx, per_domain)
    t0 = time.monotonic()
    splan = plan_sensitivity(subject.model, imatrix=imatrix_src, text=text, chunks=2 * per_domain, ctx=ctx,
                             ladder=ladder, threads=args.threads, imatrix_corpus=bq.CORPUS)
    log("sensitivity:\n" + splan.describe())
    sens = run_sensitivity(splan, progress=lambda m: log(m))
    timing["sensitivity_s"] = time.monotonic() - t0

    t0 = time.monotonic()
    fixed = [bq.quantize_apex(subject, p, imatrix_src, work, args.threads) for p in tiers]
    fixed += [bq.quantize_uniform(subject, preset, im["path"] if imat else None, work, args.threads)
              for preset, imat in uniform]
    timing["quantize_fixed_s"] = time.monotonic() - t0
    sizes: list[tuple[str, int]] = []
    for v in fixed:
        if v.path is None:
            continue
        size = v.path.stat().st_size
        if all(abs(size - s) > 0.001 * s for _, s in sizes):
            sizes.append((v.label, size))
    t0 = time.monotonic()
    fitted = fitted_variants(subject.model, sens, sizes, imatrix_src, work, args.threads)
    timing["fit_and_quantize_s"] = time.monotonic() - t0

    settings_ = EvalSettings(n_ctx=ctx, chunks=args.chunks, n_threads=args.threads)
    t0 = time.monotonic()
    domains = {d.name: bq.evaluate_domain(subject, d, fixed + fitted, settings_) for d in subject.domains}
    measurement = bq.Domain("measurement", text, "the sensitivity measurement text")
    check = bq.evaluate_domain(subject, measurement, fitted, EvalSettings(n_ctx=ctx, chunks=2 * per_domain,
                                                                          n_threads=args.threads))
    timing["evaluate_s"] = time.monotonic() - t0
    additivity = []
    for v in fitted:
        row = next(r for r in check["rows"] if r["label"] == v.label)
        additivity.append({"fitted": v.label, "predicted": v.fit["predicted_kld_mean"],
                           "predicted_uncorrected": v.fit["predicted_kld_mean_uncorrected"],
                           "measured": row["kld_mean"], "measured_err": row["kld_mean_err"],
                           "predicted_p999": v.fit["predicted_kld_p999"], "measured_p999": row["kld_p999"],
                           "max_kld_p999": v.fit["max_kld_p999"]})
    proxy = proxy_check(sens, subject.model, sizes)
    log(f"proxy: Spearman {proxy['spearman_raw']:.3f} raw, {proxy['spearman_calibrated_held_out']:.3f} calibrated "
        f"(held out)")
    rows, replica_bytes, replica = replica_fits(sens, work)
    timing["total_s"] = time.monotonic() - t_start
    data = {
        "mode": "smoke" if args.smoke else "reference",
        "machine": mach, "llama_cpp": bq.build_label(),
        "model": {"file": subject.model.name, "record": {k: subject.record.get(k) for k in ("config", "key")},
                  "size_bytes": subject.model.stat().st_size},
        "imatrix": {k: v for k, v in im.items() if k != "corpus_text"},
        "measurement_text": proof, "sensitivity": sens.data,
        "settings": settings_.to_dict(),
        "fitted": [{"label": v.label, **{k: x for k, x in v.fit.items()}} for v in fitted],
        "domains": domains, "comparison": compare(domains, fitted, fixed),
        "additivity": {"uniform": {t: {"measured": u["kld_mean"], "sum_of_groups": u["sum_of_groups"]}
                                   for t, u in sens.data["uniform"].items()}, "fitted": additivity},
        "proxy": proxy, "replica": rows, "cost": cost_extrapolation(sens, subject.model, replica, replica_bytes),
        "timing": {k: round(v, 1) for k, v in timing.items()},
    }
    import bench_fit_report
    out = args.out or bq.RESULTS
    j, m = write_results("fit", data, bench_fit_report.markdown(data), out)
    bench_fit_report.plot(data, out / "fit.png")
    log(f"wrote {j}, {m}")
    # The same run's APEX tiers and uniform presets are the quality benchmark: written as its results too.
    fixed_labels = {v.label for v in fixed}
    q_domains = {name: {**d, "rows": [r for r in d["rows"] if r["label"] in fixed_labels], "n_ctx": ctx}
                 for name, d in domains.items()}
    im_q = {k: v for k, v in im.items() if k != "corpus_text"}
    im_q["sha256"] = imatrix_src.sha256
    overlap = {d.name: bq.overlap_with_corpus(d.path.read_text(encoding="utf-8", errors="replace"), im["corpus_text"])
               for d in subject.domains}
    qdata = bq.quality_data(subject, fixed, q_domains, im_q, overlap, settings_,
                            {"quantize_s": round(timing["quantize_fixed_s"], 1),
                             "eval_s": round(timing["evaluate_s"], 1),
                             "total_s": round(timing["total_s"], 1)}, "smoke" if args.smoke else "full")
    qdata["from_run"] = "bench/bench_fit.py (the APEX tiers and uniform presets of the fit benchmark's run)"
    bq.derive(qdata)
    png = bq.plot(q_domains, subject.model.stat().st_size, out / "quality.png",
                  f"{subject.label}: mean KLD vs size (lower left is better)")
    qdata["plot"] = png.name
    qj, qm = write_results("quality", qdata, bq.markdown(qdata), out)
    log(f"wrote {qj}, {qm}, {png}")
    if work_ctx:
        work_ctx.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
