"""`apex-orch sensitivity` and `apex-orch fit`: measured sensitivity, and profiles fitted to a size."""

from __future__ import annotations

import json
from pathlib import Path

import click

from apex_orch.cli.errors import UsageError
from apex_orch.cli.options import Renamed, json_option, quiet_option, renamed
from apex_orch.cli.params import BUDGET_SIZE, COUNT, CTX, FINITE, THREADS
from apex_orch.cli.progress import Progress
from apex_orch.core.outputs import check_new_output, write_output
from apex_orch.core.text import md_table
from apex_orch.model.info import read_model


# The profile that defines the groups had the same spelling as release's first phase.
_OLD_FROM = Renamed(("--from",), "--base-profile", "base_profile", type=str)


@renamed(_OLD_FROM, Renamed(("--text-corpus",), "--eval-corpus", "eval_corpus", type=str))
@click.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--imatrix", type=click.Path(dir_okay=False),
              help="Importance matrix the quantizations use (measures the I-variant types, IQ1/IQ2 included).")
@click.option("--corpus", default=None, help="Build (or reuse from the cache) the imatrix from this corpus.")
@click.option("--text", type=click.Path(dir_okay=False), default=None,
              help="Held-out text the output is measured on (not the imatrix corpus).")
@click.option("--eval-corpus", default=None, help="Build the held-out text from this corpus instead of --text.")
@click.option("--chunks", type=COUNT, default=12, show_default=True, help="Chunks of the text per measurement.")
@click.option("-c", "--ctx", type=CTX, default=512, show_default=True, help="Context of each measurement.")
@click.option("--types", "ladder", default=None,
              help="Candidate types, comma-separated (default: IQ1_M..Q8_0 with an imatrix, Q2_K..Q8_0 without).")
@click.option("--base-profile", default=None,
              help="Profile whose bands define the groups (default: APEX's own, profiles/_apex.yaml); "
                   "a fit must use the same bands.")
@click.option("--method", type=click.Choice(["exact", "proxy"]), default="exact", show_default=True,
              help="exact: measure each group's KLD; proxy: imatrix-weighted quantization error only (no "
                   "evaluations, no spliced files: for models too big to measure exactly; see docs/fit.md).")
@click.option("--calibration", "calibration_path", type=click.Path(dir_okay=False), default=None,
              help="With --method proxy: an exact result (of a smaller model of the family) whose exact/proxy "
                   "ratios turn the proxy into KLD units per role.")
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None,
              help="Also write the result JSON here (it is always cached).")
@click.option("--force", is_flag=True, help="Replace an existing --output.")
@click.option("-t", "--threads", type=THREADS, default=None, help="Threads for llama-quantize and evaluation.")
@click.option("--dry-run", is_flag=True, help="Print the groups, the ladder and the work, then stop.")
@quiet_option
@json_option
def sensitivity(model, imatrix, corpus, text, eval_corpus, chunks, ctx, ladder, base_profile, method,
                calibration_path, output, force, threads, dry_run, quiet, as_json) -> None:
    """Measure how much each group of tensors moves MODEL's output at each candidate type.

    A group is what one profile line types (a role in one depth band; routed experts split
    into gate/up and down). For each group and type: the source with only that group at that
    type (spliced byte for byte from one uniform llama-quantize run per type), its mean KLD
    and KLD 99.9% against the source on held-out chunks. Cost: one quantization per type plus
    (groups + 1) x types short evaluations, written into the result; cached by model, imatrix,
    text, settings and llama.cpp build, and resumed if interrupted. See docs/fit.md.
    """
    from apex_orch.fit.sensitivity import plan_sensitivity, run_sensitivity
    from apex_orch.quantize.job import build_imatrix_for, resolve_imatrix

    if imatrix and corpus:
        raise UsageError("give --imatrix or --corpus, not both")
    if dry_run and as_json:
        raise UsageError("--json prints the result; the dry run (--dry-run) prints its plan as text")
    progress = Progress(quiet)
    out = None
    if output is not None:   # before anything runs: never an input, no overwrite unless forced
        out = check_new_output(output, inputs=[Path(p) for p in (model, imatrix, text, calibration_path) if p],
                               force=force)
    info = read_model(model)
    source = resolve_imatrix(info, imatrix) if imatrix else None
    from apex_orch.fit.measurements import load_sensitivity
    calibration = load_sensitivity(calibration_path) if calibration_path else None
    plan_args = dict(text=text, text_corpus=eval_corpus, chunks=chunks, ctx=ctx, ladder=ladder, bands_from=base_profile,
                     threads=threads, method=method, calibration=calibration, imatrix_corpus=corpus)
    if corpus and not dry_run:
        # everything that can be checked is, before llama-imatrix runs (the text against the corpus too)
        plan_sensitivity(model, imatrix=None, imatrix_coming=True, **plan_args)
        path = build_imatrix_for(Path(model), corpus, threads, progress)
        source = resolve_imatrix(info, path)
    plan = plan_sensitivity(model, imatrix=source, imatrix_coming=bool(corpus), **plan_args)
    if dry_run:
        click.echo(plan.describe())
        return
    progress(plan.describe())
    result = run_sensitivity(plan, progress=progress)
    if out is not None:
        write_output(out, result.to_json(), force=force)
    if as_json:
        click.echo(json.dumps({"result": str(result.path), "output": str(out) if out else None, "data": result.data},
                              indent=1))
        return
    d = result.data
    rows = [[g["key"], str(g.get("tensors", ""))] + [f"{d['measurements'][g['key']][t]['kld_mean']:.5f}"
                                                     for t in d["ladder"]] for g in d["groups"]]
    uniform = d.get("uniform") or {}
    if uniform:
        rows.append(["all groups (measured)", ""] + [_cell(uniform.get(t), "kld_mean") for t in d["ladder"]])
        rows.append(["all groups (sum of parts)", ""] + [_cell(uniform.get(t), "sum_of_groups") for t in d["ladder"]])
    click.echo("\n".join(md_table(["group", "tensors"] + d["ladder"], rows)))
    c = d.get("cost") or {}
    if isinstance(c.get("total_s"), (int, float)) and isinstance(c.get("one_tier_quantize_s"), (int, float)):
        click.echo(f"cost: {c['total_s']:.0f} s = {c.get('as_tier_quantizations')} x one uniform quantization "
                   f"({c['one_tier_quantize_s']:.1f} s); result {result.path}")
    else:
        click.echo(f"result {result.path}")
    if out is not None:
        click.echo(f"wrote {out}")


def _cell(row, key: str) -> str:
    value = row.get(key) if isinstance(row, dict) else None
    return f"{value:.5f}" if isinstance(value, (int, float)) else "—"


@renamed(_OLD_FROM, Renamed(("--no-imatrix",), "--without-imatrix", "without_imatrix", flag=True))
@click.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--sensitivity", "sensitivity_path", type=click.Path(dir_okay=False), required=True,
              help="A result of `apex-orch sensitivity` (of this model, or of one with the same roles and bands).")
@click.option("--size", type=BUDGET_SIZE, default=None,
              help="Target file size: 48GB = 48G = 48e9 bytes (K/M/G/T are decimal, as the Hub lists sizes; "
                   "KiB/MiB/GiB/TiB binary), at least 1MB.")
@click.option("--bpw", type=FINITE, default=None, help="Target bits per weight (tensor bytes x 8 / weights).")
@click.option("--base-profile", default=None,
              help="Profile whose bands, best-for line and imatrix corpus the fitted profile keeps "
                   "(default: APEX's own bands); the sensitivity must have been measured with the same bands.")
@click.option("--tier", default=None, help="Display tier of the fitted profile (default Fit-<size>).")
@click.option("--structure", type=click.Choice(["apex", "free"]), default="apex", show_default=True,
              help="apex: edge >= near >= middle, shared expert and attention >= routed experts per block.")
@click.option("--without-imatrix", is_flag=True,
              help="Fit without the IQ1/IQ2/IQ3_XXS types (a profile that needs no imatrix).")
@click.option("--max-kld-99-9", "max_kld_p999", type=FINITE, default=None,
              help="Keep the predicted KLD 99.9% (the tail users notice) at or under this value; the mean KLD "
                   "is minimised under that bound.")
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None, help="Write the profile YAML here.")
@click.option("--force", is_flag=True, help="Replace an existing --output.")
@json_option
@quiet_option
def fit(model, sensitivity_path, size, bpw, base_profile, tier, structure, without_imatrix, max_kld_p999, output,
        force, as_json, quiet) -> None:
    """Fit an APEX profile to a size (or bits per weight) from measured sensitivity.

    Chooses a type per group (and, to land on the budget, per block, edge blocks first) that
    minimises the predicted mean KLD (the sum of the groups' measured effects, each scaled by
    its type's measured additivity factor) under the budget, using the plan's exact bytes. Writes an
    ordinary profile: quantize, release and the card use it like any other. The plan of the result is at
    most the budget and, when
    the ladder allows, within 0.5% of it (otherwise the nearest size is printed).
    """
    from apex_orch.fit.fitter import fit_profile
    from apex_orch.fit.measurements import load_sensitivity

    if (size is None) == (bpw is None):
        raise UsageError("give exactly one of --size or --bpw")
    out = None
    if output is not None:   # before anything is read: never an input, no overwrite unless forced
        out = check_new_output(output, inputs=[Path(model), Path(sensitivity_path)], force=force)
    sens = load_sensitivity(sensitivity_path)
    info = read_model(model)
    m = sens.data["model"]
    progress = Progress(quiet)
    if (m["arch"], m["blocks"], m["name"]) != (info.arch, info.block_count, info.name):
        progress(f"note: the sensitivity was measured on {m['name']} ({m['arch']}, {m['blocks']} blocks); "
                 "applied here group by group")
    result = fit_profile(info, sens, size=size, bpw=bpw, base=base_profile, tier=tier, structure=structure == "apex",
                         imatrix=False if without_imatrix else None, max_kld_p999=max_kld_p999)
    plan = result.plan
    summary = {"target": result.target, "budget_bytes": result.budget_file_bytes,
               "file_bytes": result.file_bytes, "under_budget_by": round(result.shortfall, 6),
               "within_0.5%": result.within, "bpw": round(plan.bpw, 4),
               "predicted_kld_mean": result.solution.kld_mean, "predicted_kld_p999": result.solution.kld_p999,
               "max_kld_p999": max_kld_p999,
               "additivity": {t.name: f for t, f in result.additivity.items()}, "steps": result.solution.steps}
    if out is not None:
        write_output(out, result.yaml_text, force=force)
    if as_json:
        summary.update(output=str(out) if out else None, profile_yaml=result.yaml_text)
        click.echo(json.dumps(summary, indent=1))
        return
    click.echo(f"fitted to {result.target}: {result.file_bytes:,} bytes ({result.file_bytes / 1e9:.3f} GB, "
               f"{plan.bpw:.3f} bpw), {100 * result.shortfall:.2f}% under the budget; predicted mean KLD "
               f"{result.solution.kld_mean:.5f}"
               + (f", KLD 99.9% {result.solution.kld_p999:.4f}" if result.solution.kld_p999 is not None else ""))
    if not result.within:
        click.echo(f"note: the nearest size this ladder reaches is {100 * result.shortfall:.2f}% under the "
                   "budget (more than 0.5%)", err=True)
    if out is not None:
        click.echo(f"wrote {out}")
    else:
        click.echo(result.yaml_text, nl=False)
