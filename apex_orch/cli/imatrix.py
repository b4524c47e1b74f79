"""`apex-orch imatrix` (compute, cached) and `apex-orch imatrix-report` (inspect, check)."""

from __future__ import annotations

import json

import click

from apex_orch.calibration import imatrix as imatrix_lib
from apex_orch.calibration.imatrix_file import read_imatrix
from apex_orch.calibration.imatrix_report import build_report, format_report, report_problems
from apex_orch.cli.errors import UsageError
from apex_orch.cli.params import COUNT, SECONDS, THREADS
from apex_orch.core.errors import ImatrixError


@click.command("imatrix")
@click.argument("model", type=click.Path(exists=True, dir_okay=False), required=False)
@click.option("--demo", is_flag=True, help="Use the demo model: a small trained MoE, trained once on first use (about two minutes).")
@click.option("--corpus", "corpus_name", default="diverse", show_default=True,
              help="Corpus name (corpora/NAME.yaml) or path to a corpus YAML.")
@click.option("-o", "--output", "out", type=click.Path(dir_okay=False), default=None,
              help="Also copy the imatrix here (it always lands in the cache).")
@click.option("-c", "--ctx", default=512, show_default=True, type=int, help="Context per chunk.")
@click.option("--chunks", default=None, type=COUNT, help="Process at most N chunks (default: all the corpus holds).")
@click.option("--ngl", default=0, show_default=True, type=int, help="Layers to offload to the GPU.")
@click.option("-t", "--threads", default=None, type=THREADS, help="CPU threads (default: all cores).")
@click.option("--from-q8", is_flag=True,
              help="Compute on a cached Q8_0 copy of the model (for models larger than RAM).")
@click.option("--force", is_flag=True, help="Replace an existing, different -o file.")
@click.option("--timeout", default=None, type=SECONDS, help="Stop llama-imatrix after this many seconds.")
@click.option("--dry-run", is_flag=True, help="Print the plan (command, cache key, output) and stop.")
def imatrix(model: str | None, demo: bool, corpus_name: str, out: str | None, ctx: int, chunks: int | None,
            ngl: int, threads: int | None, from_q8: bool, force: bool, timeout: float | None,
            dry_run: bool) -> None:
    """Compute an importance matrix for MODEL on a calibration corpus (cached: a rerun is free).

    The cache key includes the model's full sha256, so a model whose bytes changed is
    a new key: ~3 min for a 240 GB model the first time (sha256 at ~1.4 GB/s), then
    remembered by path, size, mtime, inode and ctime (a rerun costs one stat).
    -o may not be the model itself (refused before anything runs, --force or not).
    """
    if demo == bool(model):
        raise UsageError("give a MODEL path or --demo (not both)")
    if demo:
        from apex_orch.demo.trained import demo_model_path
        model = str(demo_model_path(progress=lambda m: click.echo(m, err=True)))
        click.echo(f"demo model: {model}", err=True)
    plan = imatrix_lib.plan_imatrix(model, corpus_name, ctx=ctx, chunks=chunks, ngl=ngl, threads=threads,
                                    out=out, from_q8=from_q8, force=force)
    for w in plan.corpus.warnings():
        click.echo(f"warning: {w}", err=True)
    if chunks and chunks > plan.available_chunks:
        click.echo(f"warning: the corpus holds {plan.available_chunks} chunks of {ctx} tokens; "
                   f"using {plan.chunks}, not {chunks}", err=True)
    if dry_run:
        click.echo(plan.describe())
        return
    path = imatrix_lib.run_imatrix(plan, on_progress=lambda line: click.echo(line, err=True), timeout=timeout)
    click.echo(str(path))


@click.command("imatrix-report")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--model", "model", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Check names/shapes against this GGUF and list tensors without data.")
@click.option("--profile", "profile", default=None,
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
