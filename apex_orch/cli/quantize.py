"""`apex-orch quantize`: one or many APEX tiers, verified, never a broken file."""

from __future__ import annotations

import json
from pathlib import Path

import click

from apex_orch.cli.errors import UsageError
from apex_orch.cli.options import json_option, quiet_option
from apex_orch.cli.params import CTX, COUNT, JOBS, SECONDS, SPLIT_SIZE, THREADS
from apex_orch.cli.progress import Progress
from apex_orch.cli.quantize_eval import eval_outputs
from apex_orch.plan.profile_search import list_profiles
from apex_orch.quantize.request import QuantizeRequest, plan_request, prepare_imatrix
from apex_orch.quantize.run import run_many, share_threads


@click.command()
@click.option("-p", "--profile", "profiles", default=None,
              help="Profile name(s) or .yaml path(s), comma-separated (e.g. quality,balanced).")
@click.option("--all", "all_profiles", is_flag=True, help="Every profile in profiles/.")
@click.argument("model", type=click.Path(dir_okay=False), required=False)
@click.option("--demo", is_flag=True, help="Use the demo model: a small trained MoE, trained once on first use (about "
                                           "two minutes).")
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Output file (one profile only).")
@click.option("--out-dir", type=click.Path(file_okay=False), default="out", show_default=True,
              help="Folder for <ModelName>-APEX-<Tier>.gguf outputs.")
@click.option("--name", default=None, help="Model name used in output file names (default: general.name).")
@click.option("--imatrix", type=click.Path(dir_okay=False), help="Importance matrix (GGUF).")
@click.option("--corpus", default=None,
              help="Build (or reuse from cache) the imatrix from this corpus; default for I-profiles: "
                   "the profile's corpus.")
@click.option("--imatrix-ctx", type=CTX, default=None,
              help="Context for a built imatrix (default 512; 256 with --demo).")
@click.option("--imatrix-chunks", type=COUNT, default=None,
              help="Chunks for a built imatrix (default: the whole corpus; 16 with --demo).")
@click.option("-t", "--threads", type=THREADS, default=None,
              help="Threads per llama-quantize (default: all cores / jobs).")
@click.option("-j", "--jobs", type=JOBS, default=None, help="Tiers in parallel (default: from cores and free memory).")
@click.option("--split-max-size", type=SPLIT_SIZE, default=None,
              help="Split outputs into parts of at most this size: 48G = 48GB = 48e9 bytes (K/M/G/T are decimal, "
                   "as llama-gguf-split reads them; KiB/MiB/GiB/TiB binary), at least 1M.")
@click.option("--force", is_flag=True,
              help="Replace outputs that exist and are not up to date (replaced only once the new file is verified); "
                   "up-to-date outputs are kept.")
@click.option("--redo", is_flag=True, help="Quantize again even when an output is up to date (replaced once verified).")
@click.option("--dry-run", is_flag=True, help="Print what would run (outputs, sizes, commands) and stop.")
@click.option("--timeout", type=SECONDS, default=None, help="Stop llama-quantize after this many seconds.")
@click.option("--eval/--no-eval", "do_eval", default=None,
              help="After quantizing, print a PPL/KLD table against the source (default: on with --demo).")
@click.option("--trust-tool-plan", is_flag=True,
              help="Before writing, every run compares the plan with llama-quantize's own --dry-run and stops "
                   "if they differ (your own llama.cpp build may assign types differently). With this flag, "
                   "take the tool's types as the plan instead; verification and manifest use them and say so.")
@click.option("--allow-requantize", is_flag=True,
              help="Accept an already-quantized MODEL (refused by default: quantizing twice compounds both "
                   "rounding errors); passes llama-quantize's own --allow-requantize.")
@quiet_option
@json_option
def quantize(profiles, all_profiles, model, demo, output, out_dir, name, imatrix, corpus, imatrix_ctx,
             imatrix_chunks, threads, jobs, split_max_size, force, redo, dry_run, timeout, do_eval, trust_tool_plan,
             allow_requantize, quiet, as_json) -> None:
    """Quantize MODEL with one or more APEX profiles into verified GGUF files.

    Outputs go to OUT_DIR/<ModelName>-APEX-<Tier>.gguf, written under a temporary name,
    checked tensor by tensor against the plan, then renamed; a manifest and the tool log
    sit beside each file. A rerun with the same inputs is a no-op ("up to date").

    \b
    What the checks cost (sha256 runs at ~1.4 GB/s on one core):
    - the source is keyed by its full sha256: ~3 min for a 240 GB source, once
      (remembered under the cache by path, size, mtime, inode and ctime);
    - each output is hashed once for its manifest (~3 min per 240 GB);
    - a rerun reads no file data when size, mtime and inode are as recorded,
      and re-hashes an output in full when they differ.
    An output that resolves to an input, a link planted at any name the run
    writes, and two tiers mapping to one file name are refused before anything runs.
    """
    if all_profiles == bool(profiles):
        raise UsageError("give --profile NAME[,NAME...] or --all")
    names = list_profiles() if all_profiles else [p.strip() for p in profiles.split(",") if p.strip()]
    progress = Progress(quiet)
    setup = plan_request(QuantizeRequest(
        names, model=model, demo=demo, out=Path(output) if output else None, out_dir=Path(out_dir), name=name,
        imatrix=Path(imatrix) if imatrix else None, corpus=corpus, imatrix_ctx=imatrix_ctx,
        imatrix_chunks=imatrix_chunks, threads=threads, split_max_size=split_max_size,
        trust_tool_plan=trust_tool_plan, allow_requantize=allow_requantize, evaluate=do_eval), progress=progress)
    if not dry_run:
        prepare_imatrix(setup, progress=progress)
    for warning in setup.warnings:   # loud, never silent: fallbacks to the mixture, partial imatrix coverage...
        click.echo(f"warning: {warning}", err=True)
    if dry_run:
        if setup.jobs:   # the threads each tier's tool gets, as the run gives them
            share_threads(setup.jobs, jobs)
        click.echo(json.dumps(setup.to_dict(), indent=2) if as_json else setup.describe())
        return
    results = run_many(setup.jobs, parallel=jobs, force=redo, replace_stale=force, progress=progress, timeout=timeout)
    outputs = [f for r in results for f in r.files[:1]]
    table = eval_outputs(setup.model_path, outputs, progress, "json" if as_json else "md") \
        if setup.evaluate and outputs else None
    if as_json:
        click.echo(json.dumps({"model": str(setup.model_path), "tiers": [
            {"tier": r.job.profile.tier, "profile": r.job.profile.name, "output": str(r.job.output),
             "files": [str(f) for f in r.files], "status": "up to date" if r.skipped else "written",
             "seconds": round(r.seconds, 3), "message": r.message} for r in results],
            "eval": json.loads(table) if table else None}, indent=2))
        return
    for r in results:
        click.echo(f"{r.job.profile.tier}: {r.message}")
    if table:
        click.echo(table)
