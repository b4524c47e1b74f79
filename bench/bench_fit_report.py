"""Tables and plot of bench_fit.py's results (bench/results/fit.{md,png}), also rerendered from fit.json."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from common import results_header

KIND_STYLE = {"uniform": ("tab:blue", "s"), "apex": ("tab:orange", "o"), "fitted": ("tab:green", "D")}


def _mib(n) -> str:
    return f"{n / 2**20:.2f}"


def _kld(r) -> str:
    return f"{r['kld_mean']:.6f} ± {r['kld_mean_err']:.6f}"


def markdown(data: dict) -> str:
    s = data["sensitivity"]
    c = data["cost"]
    lines = ["# Fit: profiles fitted to a size from measured sensitivity, against the fixed files", ""]
    if data.get("mode") == "smoke":
        lines += ["**Smoke run** (CI plumbing check on a random-weight model, 3 types): the numbers mean nothing.", ""]
    rec = data["model"]["record"] or {}
    bf16 = (rec.get("config") or {}).get("bf16")
    lines += [f"Model: trained reference MoE `{data['model']['file']}` ({_mib(data['model']['size_bytes'])} MiB F16)"
              + ("; trained in fp32 (`--set bf16=false`: this CPU has no bf16 matmuls, where autocast made a "
                 "step 20x slower), otherwise the full config" if bf16 is False else ""),
              f"- imatrix: corpus `{data['imatrix']['corpus']}`, {data['imatrix']['chunks']} chunks x "
              f"{data['imatrix']['ctx']}", f"- llama.cpp: {data['llama_cpp']}",
              f"- evaluation: {data['settings']['chunks']} chunks x {data['settings']['n_ctx']} per held-out domain, "
              "KLD against the F16 model (apex_orch.evaluation)",
              f"- wall time {data['timing']['total_s'] / 60:.1f} min: " + ", ".join(
                  f"{k[:-2].replace('_', ' ')} {v:.0f} s" for k, v in data["timing"].items() if k != "total_s"), ""]
    lines += ["## Measured sensitivity", "",
              f"Method `{s['method']['name']}`: {s['method']['text']}. Text: {s['text']['chunks']} chunks x "
              f"{s['text']['ctx']} cut from the ends of both held-out texts, after every token the domains below "
              f"score:",
              ""]
    for dname, p in data["measurement_text"].items():
        lines.append(f"- {dname}: cut at character {p['cut_at_char']:,}; {p['tokens_before_cut']:,} tokens before the "
                     f"cut, the evaluation scores only the first {p['scored_tokens_end_before']:,}")
    lines += ["", "Mean KLD of the model with only that group at that type (everything else F16):", ""]
    ladder = s["ladder"]
    lines.append("| group | tensors | params | " + " | ".join(ladder) + " |")
    lines.append("|---|---|---|" + "---|" * len(ladder))
    for g in s["groups"]:
        m = s["measurements"][g["key"]]
        lines.append(f"| {g['key']} | {g['tensors']} | {g['params'] / 1e6:.2f} M | "
                     + " | ".join(f"{m[t]['kld_mean']:.5f}" for t in ladder) + " |")
    u = s["uniform"]
    lines.append("| **all at once (measured)** | | | " + " | ".join(f"{u[t]['kld_mean']:.5f}" for t in ladder) + " |")
    lines.append("| **sum of the groups** | | | " + " | ".join(f"{u[t]['sum_of_groups']:.5f}" for t in ladder) + " |")
    ref = c["reference"]
    lines += ["", f"Cost: {ref['total_s']:.0f} s = **{ref['as_tier_quantizations']} x one uniform quantization** "
              f"({ref['one_tier_quantize_s']:.1f} s): {ref['ladder']} quantizations, {ref['evaluations']} evaluations "
              f"of {s['text']['chunks']} chunks ({ref['eval_s_each']:.1f} s each), {ref['groups'] * ref['ladder']} "
              f"spliced files.", ""]
    lines += additivity(data)
    lines += proxy_section(data)
    for dname, d in data["domains"].items():
        lines += domain_table(dname, d)
    lines += verdict_table(data)
    lines += replica_table(data)
    return "\n".join(lines) + "\n"


def additivity(data: dict) -> list[str]:
    a = data["additivity"]
    out = ["## The additivity assumption, measured", "",
           "The sum of the groups' own effects, checked on the measurement text two ways: every group at one type "
           "at once (the uniform files: their ratio is the factor fit applies to that type's effects), and each "
           "fitted profile, against its corrected prediction (each group's effect times its type's factor) and the "
           "plain sum.", "",
           "| all groups at | sum of the groups | measured | measured / sum (the type's factor) |", "|---|---|---|---|"]
    for t, u in a["uniform"].items():
        out.append(f"| {t} | {u['sum_of_groups']:.6f} | {u['measured']:.6f} | "
                   f"{u['measured'] / u['sum_of_groups']:.2f} |")
    out += ["", "| fitted | predicted (corrected) | plain sum | measured | measured / predicted | measured / plain sum "
            "| KLD 99.9% predicted / measured |", "|---|---|---|---|---|---|---|"]
    for f in a["fitted"]:
        unc = f.get("predicted_uncorrected")
        tail = (f"{f['predicted_p999']:.4f} / {f['measured_p999']:.4f}" if f.get("predicted_p999") is not None
                else f"— / {f.get('measured_p999', 0):.4f}")
        out.append(f"| {f['fitted']} | {f['predicted']:.6f} | {unc:.6f} | {f['measured']:.6f} | "
                   f"{f['measured'] / f['predicted']:.2f} | {f['measured'] / unc:.2f} | {tail} |"
                   if unc is not None else
                   f"| {f['fitted']} | {f['predicted']:.6f} | — | {f['measured']:.6f} | "
                   f"{f['measured'] / f['predicted']:.2f} | — | {tail} |")
    ratios = [f["measured"] / f["predicted"] for f in a["fitted"] if f["predicted"]]
    if ratios:
        inside = sum(0.75 <= r <= 1.33 for r in ratios)
        out += ["", f"Measured / predicted over the {len(ratios)} fitted profiles: {min(ratios):.2f} to "
                    f"{max(ratios):.2f}; "
                f"{inside} of {len(ratios)} within 0.75-1.33."]
    bounded = [f for f in a["fitted"] if f.get("max_kld_p999")]
    if bounded:
        by = {f["fitted"]: f for f in a["fitted"]}
        out += ["", "`--max-kld-99-9` (bound = 0.75 x the unbounded fit's predicted KLD 99.9%), on the measurement "
                    "text:", "",
                "| size of | unbounded: mean / 99.9% | bounded: mean / 99.9% | bound (predicted) |",
                "|---|---|---|---|"]
        for f in bounded:
            base = by.get(f["fitted"].replace("+tail", ""))
            if base:
                out.append(f"| {f['fitted'].replace('+tail', '')[4:]} | {base['measured']:.6f} / "
                           f"{base['measured_p999']:.4f} | "
                           f"{f['measured']:.6f} / {f['measured_p999']:.4f} | {f['max_kld_p999']:.4f} |")
    return out + [""]


def proxy_section(data: dict) -> list[str]:
    p = data["proxy"]
    out = ["## The proxy against the exact measurements", "",
           f"The proxy (imatrix-weighted quantization error, docs/fit.md) took {p['proxy_s']:.0f} s for the whole "
           f"ladder (no evaluations). Rank agreement with the exact mean KLD over every (group, type): Spearman "
           f"{p['spearman_raw']:.3f} uncalibrated; {p['spearman_calibrated_held_out']:.3f} after scaling each role by "
           f"exact measurements at {' and '.join(p['calibration_types'])} only, on the other types (held out; median "
           f"exact / calibrated proxy {p['held_out_ratio_median']:.2f}).", "",
           "Fitting from the calibrated proxy instead of the exact table, each choice scored with the exact table:", "",
           "| size of | exact fit (predicted) | proxy fit (scored exactly) | loss given up |", "|---|---|---|---|"]
    for f in p["fits"]:
        out.append(f"| {f['target']} | {f['exact_fit_predicted']:.6f} | {f['proxy_fit_scored_exactly']:.6f} | "
                   f"{100 * f['loss_given_up']:+.1f}% |")
    return out + [""]


def pareto(rows: list[dict]) -> set[str]:
    front, best = set(), math.inf
    for r in sorted(rows, key=lambda r: (r["size_bytes"], r["kld_mean"])):
        if r["kld_mean"] < best:
            front.add(r["label"])
            best = r["kld_mean"]
    return front


def domain_table(dname: str, d: dict) -> list[str]:
    front = pareto(d["rows"])
    out = [f"## {dname}", "", f"{d['text']['description']}; {d['chunks']} chunks, {d['scored_tokens']:,} scored "
                              f"tokens; "
           f"F16 PPL {d['base_ppl']:.4f} ± {d['base_ppl_err']:.4f}", "",
           "| file | kind | size MiB | bpw | KLD mean | KLD 99.9% | KLD max | same top p |",
           "|---|---|---|---|---|---|---|---|"]
    for r in sorted(d["rows"], key=lambda r: -r["size_bytes"]):
        name = f"**{r['label']}**" if r["kind"] == "fitted" else r["label"]
        out.append(f"| {name}{' ◆' if r['label'] in front else ''} | {r['kind']} | {_mib(r['size_bytes'])} | "
                   f"{r['bpw']:.2f} | {_kld(r)} | {r['kld_p999']:.4f} | {r['kld_max']:.4f} | {r['same_top_p']:.2f}% |")
    return out + ["", "◆ on the Pareto front (no other file is both smaller and lower in mean KLD).", ""]


def verdict_table(data: dict) -> list[str]:
    out = ["## Fitted against the files of the same size", "",
           "Each fitted profile was given the exact size of the file(s) it is compared with as its budget. "
           "'beyond 2σ': the difference exceeds twice the combined standard error of the two means "
           "(unpaired, so conservative).", "",
           "| fitted | domain | fitted KLD | same-size file | its KLD | fitted lower | beyond 2σ | KLD 99.9% fitted / "
           "file |",
           "|---|---|---|---|---|---|---|---|"]
    beaten = []
    for e in data["comparison"]:
        for dname, d in e["domains"].items():
            for v in d["vs_same_size"]:
                out.append(f"| {e['fitted']} | {dname} | {d['kld_mean']:.6f} ± {d['kld_mean_err']:.6f} | {v['file']} "
                           f"({v['kind']}) | {v['kld_mean']:.6f} ± {v['kld_mean_err']:.6f} | "
                           f"{'yes' if v['fitted_lower'] else '**no**'} | {'yes' if v['beyond_2_sigma'] else 'no'} | "
                           f"{d['kld_p999']:.4f} / {v['kld_p999']:.4f} |")
            if d["uniform_at_or_below_that_beat_it"]:
                beaten.append(f"{e['fitted']} in {dname}: " + ", ".join(d["uniform_at_or_below_that_beat_it"]))
    out += ["", "Uniform presets of equal or smaller size with a lower mean KLD than a fitted profile: "
            + ("; ".join(beaten) if beaten else "**none**, in either domain."), ""]
    losses = [f"{e['fitted']} vs {v['file']} in {dname} ({d['kld_mean']:.6f} vs {v['kld_mean']:.6f}"
              + (", beyond 2σ" if v["beyond_2_sigma"] else ", within 2σ") + ")"
              for e in data["comparison"] for dname, d in e["domains"].items() for v in d["vs_same_size"]
              if not v["fitted_lower"]]
    tails = [f"{e['fitted']} vs {v['file']} in {dname} ({d['kld_p999']:.4f} vs {v['kld_p999']:.4f})"
             for e in data["comparison"] for dname, d in e["domains"].items() for v in d["vs_same_size"]
             if d["kld_p999"] > v["kld_p999"]]
    out += ["Where the fit loses on mean KLD to a file of its size: "
            + ("; ".join(losses) if losses else "nowhere") + ".", "",
            "Where its KLD 99.9% is higher than the same-size file's: "
            + ("; ".join(tails) if tails else "nowhere") + ".", ""]
    return out


def replica_table(data: dict) -> list[str]:
    c = data["cost"]["flagship"]
    out = ["## Mistral-Small-4-119B replica (real shapes): fitted at the card's sizes", "",
           "Fitted with the reference model's sensitivity, group by group (the same roles and APEX bands; a real "
           "release measures the flagship itself). The recipes give 86.8 / 78.7 / 56.2 / 45.9 GB for these tiers.", "",
           "| card tier | card size | fitted file | under the budget | bpw | routed experts (edge / near / middle) | "
           "attention | shared expert | fit time |", "|---|---|---|---|---|---|---|---|---|"]
    for r in data["replica"]:
        if "error" in r:
            out.append(f"| {r['card_tier']} | ~{r['card_gb']} GB | — ({r['error']}) | | | | | | |")
            continue
        b = r["bands"]
        routed = " / ".join(",".join(b.get("routed_expert", {}).get(x, [])) for x in ("edge", "near", "middle"))
        att = " / ".join(",".join(v) for v in b.get("attention", {}).values())
        sh = " / ".join(",".join(v) for v in b.get("shared_expert", {}).values())
        out.append(f"| {r['card_tier']} | ~{r['card_gb']} GB | {r['file_bytes'] / 1e9:.3f} GB | "
                   f"{100 * r['shortfall']:.3f}% | {r['bpw']:.3f} | {routed} | {att} | {sh} | {r['fit_s']:.1f} s |")
    gb = 1e9
    out += ["", "What measuring the flagship itself with `apex-orch sensitivity` (exact) would take, from this run's "
                "rates:", "",
            f"- {c['uniform_quantizations']} uniform quantizations of the {c['source_bytes'] / gb:.0f} GB source: "
            f"{c['quantize_s_at_this_rate'] / 3600:.1f} h at this machine's rate (= {c['uniform_quantizations']} tier "
            f"quantizations)",
            f"- {c['evaluations']} evaluations, {c['eval_tokens']:,} tokens of forward passes in all",
            f"- {c['spliced_bytes_written'] / 1e12:.1f} TB of spliced files written "
            f"({c['splice_s_at_this_rate'] / 3600:.1f} h at "
            "this machine's write rate): the exact method's cost is dominated by writing the whole model once per "
            "(group, type); see docs/fit.md for the proxy that avoids it", ""]
    return out


def plot(data: dict, out: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    doms = data["domains"]
    fig, axes = plt.subplots(1, len(doms), figsize=(6.5 * len(doms), 5), dpi=120, squeeze=False)
    for ax, (dname, d) in zip(axes[0], doms.items()):
        for kind, (color, marker) in KIND_STYLE.items():
            pts = [r for r in d["rows"] if r["kind"] == kind and r["kld_mean"] > 0]
            if pts:
                ax.errorbar([r["size_bytes"] / 2**20 for r in pts], [r["kld_mean"] for r in pts],
                            yerr=[r["kld_mean_err"] for r in pts], fmt=marker, color=color, ms=5, capsize=2,
                            label={"apex": "APEX fixed tiers", "uniform": "uniform presets", "fitted": "fitted"}[kind])
        fit = sorted((r for r in d["rows"] if r["kind"] == "fitted"), key=lambda r: r["size_bytes"])
        ax.plot([r["size_bytes"] / 2**20 for r in fit], [r["kld_mean"] for r in fit], "-", color="tab:green", alpha=0.5)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("file size (MiB, log)")
        ax.set_ylabel("mean KLD vs F16 (log)")
        ax.set_title(f"{dname}: {d['chunks']} chunks x 512", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Fitted profiles vs fixed APEX tiers and uniform presets (reference MoE)", fontsize=11)
    fig.tight_layout()
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, out)
    return out


def rerender(folder: Path) -> int:
    data = json.loads((folder / "fit.json").read_text())
    (folder / "fit.md").write_text(results_header("fit", data["machine"]) + markdown(data).rstrip() + "\n")
    plot(data, folder / "fit.png")
    return 0
