"""`apex-orch imatrix` (compute, cached) and `apex-orch imatrix-report` (inspect, check)."""

from __future__ import annotations

import json

import click

from apex_orch.calibration import imatrix as imatrix_lib
from apex_orch.calibration.imatrix_file import read_imatrix
from apex_orch.calibration.imatrix_report import build_report, format_report, report_problems
from apex_orch.cli.errors import UsageError
from apex_orch.cli.options import Renamed, json_option, quiet_option, renamed
from apex_orch.cli.params import COUNT, CTX, SECONDS, THREADS
from apex_orch.cli.progress import Progress
from apex_orch.core.errors import ImatrixError


@renamed(Renamed(("-c", "--ctx"), "--imatrix-ctx", "imatrix_ctx", type=CTX),
         Renamed(("--chunks",), "--imatrix-chunks", "imatrix_chunks", type=COUNT))
@click.command("imatrix")
@click.argument("model", type=click.Path(exists=True, dir_okay=False), required=False)
@click.option("--demo", is_flag=True,
              help="Use the demo model: a small trained MoE, trained once on first use (about two minutes).")
@click.option("--corpus", default="diverse", show_default=True,
              help="Corpus name (corpora/NAME.yaml) or path to a corpus YAML.")
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None,
              help="Also copy the imatrix here (it always lands in the cache).")
@click.option("--imatrix-ctx", default=512, show_default=True, type=CTX, help="Context per chunk.")
@click.option("--imatrix-chunks", default=None, type=COUNT,
              help="Process at most N chunks (default: all the corpus holds).")
@click.option("--ngl", default=0, show_default=True, type=click.IntRange(min=0), help="Layers to offload to the GPU.")
@click.option("-t", "--threads", default=None, type=THREADS, help="CPU threads (default: all cores).")
@click.option("--from-q8", is_flag=True,
              help="Compute on a cached Q8_0 copy of the model (for models larger than RAM).")
@click.option("--force", is_flag=True, help="Replace an existing, different --output file.")
@click.option("--timeout", default=None, type=SECONDS, help="Stop llama-imatrix after this many seconds.")
@click.option("--dry-run", is_flag=True, help="Print the plan (command, cache key, output) and stop.")
@quiet_option
@json_option
def imatrix(model: str | None, demo: bool, corpus: str, output: str | None, imatrix_ctx: int,
            imatrix_chunks: int | None, ngl: int, threads: int | None, from_q8: bool, force: bool,
            timeout: float | None, dry_run: bool, quiet: bool, as_json: bool) -> None:
    """Compute an importance matrix for MODEL on a calibration corpus (cached: a rerun is free).

    The cache key includes the model's full sha256, so a model whose bytes changed is
    a new key: ~3 min for a 240 GB model the first time (sha256 at ~1.4 GB/s), then
    remembered by path, size, mtime, inode and ctime (a rerun costs one stat).
    --output may not be the model itself (refused before anything runs, --force or not).
    """
    if demo == bool(model):
        raise UsageError("give a MODEL path or --demo (not both)")
    progress = Progress(quiet)
    if demo:
        from apex_orch.demo.trained import demo_model_path
        model = str(demo_model_path(progress=progress))
        progress(f"demo model: {model}")
    plan = imatrix_lib.plan_imatrix(model, corpus, ctx=imatrix_ctx, chunks=imatrix_chunks, ngl=ngl, threads=threads,
                                    out=output, from_q8=from_q8, force=force)
    warnings = list(plan.corpus.warnings())
    if imatrix_chunks and imatrix_chunks > plan.available_chunks:
        warnings.append(f"the corpus holds {plan.available_chunks} chunks of {imatrix_ctx} tokens; "
                        f"using {plan.chunks}, not {imatrix_chunks}")
    for w in warnings:
        click.echo(f"warning: {w}", err=True)
    if dry_run and not as_json:
        click.echo(plan.describe())
        return
    cached = plan.cached
    path = None if dry_run else imatrix_lib.run_imatrix(plan, on_progress=progress, timeout=timeout)
    if as_json:
        click.echo(json.dumps({"imatrix": str(path) if path else None, "cache": str(plan.cache_path),
                               "cached": cached, "model": str(plan.model_path), "corpus": plan.corpus_name,
                               "corpus_sha256": plan.corpus_sha256, "ctx": plan.ctx, "chunks": plan.chunks,
                               "available_chunks": plan.available_chunks, "tokens": plan.tokens, "key": plan.key,
                               "output": str(plan.out) if plan.out else None, "argv": plan.argv,
                               "warnings": warnings}, indent=2))
        return
    click.echo(str(path))


@click.command("imatrix-report")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--model", "model", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Check names/shapes against this GGUF and list tensors without data.")
@click.option("-p", "--profile", "profile", default=None,
              help="With --model: list the profile's planned IQ1/IQ2/IQ3_XXS tensors that lack data.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def imatrix_report(file: str, model: str | None, profile: str | None, as_json: bool) -> None:
    """Inspect an imatrix: chunks, datasets, coverage, tokens per expert.

    Exits non-zero when the imatrix does not fit --model, or when --profile plans
    low-bit tensors the imatrix has no data for.
    """
    if profile and not model:
        raise UsageError("--profile needs --model (the plan is made for a model)")
    info = read_imatrix(file)
    model_info = plan = None
    if model:
        from apex_orch.model.info import read_model
        model_info = read_model(model)
    if profile:
        from apex_orch.plan.planner import make_plan
        from apex_orch.plan.profiles import load_profile
        plan = make_plan(model_info, load_profile(profile), has_imatrix=True)
    report = build_report(info, model_info, plan, profile_name=profile)
    click.echo(json.dumps(report, indent=2) if as_json else format_report(report))
    problems = report_problems(report)
    if problems:
        raise ImatrixError("; ".join(problems), where=file,
                           hint="compute the imatrix for this model with `apex-orch imatrix MODEL --corpus NAME`")
