"""`apex-orch quantize`: one or many APEX tiers, verified, never a broken file."""

from __future__ import annotations

from pathlib import Path

import click

from apex_orch.cli.params import COUNT, JOBS, SECONDS, THREADS
from apex_orch.cli.progress import Progress
from apex_orch.cli.quantize_eval import print_eval_table
from apex_orch.core.errors import UsageError
from apex_orch.demo.synthetic import demo_model_path
from apex_orch.model.info import model_display_name, read_model
from apex_orch.plan.planner import make_plan
from apex_orch.plan.profile_search import list_profiles
from apex_orch.plan.profiles import load_profile
from apex_orch.quantize.job import (build_imatrix_for, check_distinct_outputs, check_source_unquantized, output_name,
                                    parse_size, plan_quantize, resolve_imatrix, safe_model_name)
from apex_orch.quantize.run import run_many, share_threads


@click.command()
@click.option("-p", "--profile", "profiles", default=None,
              help="Profile name(s) or .yaml path(s), comma-separated (e.g. quality,balanced).")
@click.option("--all", "all_profiles", is_flag=True, help="Every profile in profiles/.")
@click.argument("model", type=click.Path(dir_okay=False), required=False)
@click.option("--demo", is_flag=True, help="Use the embedded synthetic demo model (generated on first use).")
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Output file (one profile only).")
@click.option("--out-dir", type=click.Path(file_okay=False), default="out", show_default=True,
              help="Folder for <ModelName>-APEX-<Tier>.gguf outputs.")
@click.option("--name", default=None, help="Model name used in output file names (default: general.name).")
@click.option("--imatrix", "imatrix_path", type=click.Path(dir_okay=False), help="Importance matrix (GGUF).")
@click.option("--corpus", default=None,
              help="Build (or reuse from cache) the imatrix from this corpus; default for I-profiles: "
                   "the profile's corpus.")
@click.option("--imatrix-ctx", type=int, default=None,
              help="Context for a built imatrix (default 512; 256 with --demo).")
@click.option("--imatrix-chunks", type=COUNT, default=None,
              help="Chunks for a built imatrix (default: the whole corpus; 16 with --demo).")
@click.option("-t", "--threads", type=THREADS, default=None, help="Threads per llama-quantize (default: all cores / jobs).")
@click.option("-j", "--jobs", type=JOBS, default=None, help="Tiers in parallel (default: from cores and free memory).")
@click.option("--split-max-size", default=None, help="Split outputs into parts of at most this size (e.g. 48G).")
@click.option("--force", is_flag=True, help="Redo and replace existing outputs (replaced only once verified).")
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
@click.option("-q", "--quiet", is_flag=True, help="No progress output.")
def quantize(profiles, all_profiles, model, demo, output, out_dir, name, imatrix_path, corpus, imatrix_ctx,
             imatrix_chunks, threads, jobs,
             split_max_size, force, dry_run, timeout, do_eval, trust_tool_plan, allow_requantize, quiet) -> None:
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
    if demo == bool(model):
        raise UsageError("give a MODEL path or --demo (not both)")
    if all_profiles == bool(profiles):
        raise UsageError("give --profile NAME[,NAME...] or --all")
    names = list_profiles() if all_profiles else [p.strip() for p in profiles.split(",") if p.strip()]
    if output and len(names) > 1:
        raise UsageError("-o/--output names one file; use --out-dir with several profiles")
    if imatrix_path and corpus:
        raise UsageError("give --imatrix or --corpus, not both")
    if timeout is not None and timeout <= 0:
        raise UsageError(f"--timeout must be a positive number of seconds, got {timeout:g}")
    if split_max_size:
        parse_size(split_max_size)   # checked before anything runs, not after the quantization
    progress = Progress(quiet)
    if demo:
        model = str(demo_model_path())
        progress(f"demo model: {model}")
        if do_eval is None:
            do_eval = True
        # The demo model is tiny; a few thousand calibration tokens are plenty and take seconds.
        imatrix_ctx = imatrix_ctx or 256
        imatrix_chunks = imatrix_chunks or 16
    info = read_model(model)
    check_source_unquantized(info, allow_requantize)   # before an imatrix is built or a tool runs
    loaded = [load_profile(n) for n in names]
    if not output:   # two tiers writing one file: refused before any imatrix or quantization runs
        display = safe_model_name(name) if name is not None else model_display_name(info)
        check_distinct_outputs([(p.tier, Path(out_dir) / output_name(display, p.tier)) for p in loaded])

    imatrix = resolve_imatrix(info, imatrix_path) if imatrix_path else None
    if imatrix is None and not dry_run:
        wanted = corpus or next((p.corpus or "diverse" for p in loaded if p.imatrix_required), None)
        if wanted:
            progress(f"imatrix: corpus {wanted} (computed once, cached, shared by every I-tier)")
            path = build_imatrix_for(Path(model), wanted, threads, progress, ctx=imatrix_ctx or 512,
                                     chunks=imatrix_chunks)
            imatrix = resolve_imatrix(info, path)
    job_list = [plan_quantize(model, p, out=Path(output) if output else None, out_dir=Path(out_dir), name=name,
                              imatrix=imatrix if (p.imatrix_required or corpus or imatrix_path) else None,
                              threads=threads, split_max_size=split_max_size, model=info,
                              allow_requantize=allow_requantize)
                for p in loaded] if not dry_run or imatrix or not any(p.imatrix_required for p in loaded) else []
    for job in job_list:
        job.trust_tool_plan = trust_tool_plan
    for job in job_list:   # loud, never silent: fallbacks to the mixture, partial imatrix coverage...
        for w in job.plan.warnings:
            click.echo(f"warning: {job.profile.tier}: {w}", err=True)
    if dry_run:
        if not job_list:  # I-profiles without an imatrix yet: show plans as if one were given
            for p in loaded:
                plan = make_plan(info, p, has_imatrix=True)
                click.echo(f"{p.tier}: {Path(out_dir) / output_name(name or info.name, p.tier)} "
                           f"({plan.total_bytes / 2**30:.2f} GiB predicted, {plan.bpw:.3f} bpw; imatrix from corpus "
                           f"{corpus or p.corpus or 'diverse'} will be built first)")
            return
        share_threads(job_list, jobs)   # the threads each tier's tool gets, as the run gives them
        for job in job_list:
            click.echo(job.describe())
        return
    results = run_many(job_list, parallel=jobs, force=force, progress=progress, timeout=timeout)
    for r in results:
        click.echo(f"{r.job.profile.tier}: {r.message}")
    if do_eval:
        print_eval_table(Path(model), [f for r in results for f in r.files[:1]], progress)
