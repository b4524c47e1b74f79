"""`apex-orch eval` (PPL, KL divergence vs a base, speed) and `apex-orch compare` (a table and a
Pareto plot for several files against one base)."""

from __future__ import annotations

import click

from apex_orch.cli.errors import UsageError
from apex_orch.cli.params import COUNT, FINITE, THREADS
from apex_orch.evaluation.evaluate import BACKENDS, plan_eval, run_eval
from apex_orch.evaluation.gates import check_gates
from apex_orch.evaluation.inputs import EvalSettings, default_threads
from apex_orch.evaluation.results import format_result
from apex_orch.plan.gates import RULES, Gates


def _settings_options(fn):
    """Options that change the numbers; shared by eval and compare."""
    options = [
        click.option("--text", "text", type=click.Path(exists=True, dir_okay=False), default=None,
                     help="Evaluation text file (at least 2 x ctx tokens)."),
        click.option("--corpus", "corpus", default=None,
                     help="Build the evaluation text from a corpus (corpora/NAME.yaml or a YAML path)."),
        click.option("-c", "--ctx", default=512, show_default=True, type=int,
                     help="Tokens per chunk; the second half of each chunk is scored."),
        click.option("--chunks", default=None, type=COUNT, help="Evaluate at most N chunks (default: all)."),
        click.option("-b", "--batch", default=None, type=int,
                     help="Logical batch (default: = ctx, one decode per chunk)."),
        click.option("-ub", "--ubatch", default=512, show_default=True, type=int, help="Physical batch."),
        click.option("-t", "--threads", default=None, type=THREADS, help="CPU threads (default: all cores)."),
        click.option("--flash-attn/--no-flash-attn", default=True, show_default=True,
                     help="Flash attention (llama-perplexity's `auto` turns it on for CPU)."),
        click.option("--repack/--no-repack", default=False, show_default=True,
                     help="llama.cpp extra buffer types (CPU repack/AMX kernels); they change the numbers "
                          "slightly, and crash MLA models on AMX CPUs in the pinned build."),
        click.option("--backend", type=click.Choice(BACKENDS), default="bindings", show_default=True,
                     help="Evaluate in-process, or run the llama-perplexity binary (same result fields)."),
    ]
    # The gates, one option per row of plan.gates.RULES (a new gate is one row there).
    options += [click.option(rule.option, rule.key, type=FINITE, default=None, help=rule.help) for rule in RULES]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _settings(ctx: int, chunks: int | None, batch: int | None, ubatch: int, threads: int | None,
              flash_attn: bool, repack: bool) -> EvalSettings:
    return EvalSettings(n_ctx=ctx, chunks=chunks, n_batch=batch, n_ubatch=ubatch,
                        n_threads=threads or default_threads(), flash_attn=flash_attn, repack=repack)


def _progress(quiet: bool):
    if quiet:
        return None
    return lambda msg: click.echo(msg, err=True)


@click.command("eval")
@click.argument("model", type=click.Path(exists=True, dir_okay=False))
@click.option("--base", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Reference model (the F16/BF16 source) for KL divergence; its log-probs are cached, keyed "
                   "by its full sha256 (~3 min once for 240 GB, then remembered by stat).")
@_settings_options
@click.option("--speed/--no-speed", default=False, show_default=True,
              help="Also measure pp512/tg128 tokens/s through the bindings.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.option("--dry-run", is_flag=True, help="Print the plan (inputs, settings, cache) and stop.")
@click.option("-q", "--quiet", is_flag=True, help="No progress lines on stderr.")
def eval_cmd(model: str, base: str | None, text: str | None, corpus: str | None, ctx: int, chunks: int | None,
             batch: int | None, ubatch: int, threads: int | None, flash_attn: bool, repack: bool, backend: str,
             speed: bool, as_json: bool, dry_run: bool, quiet: bool, **bounds: float | None) -> None:
    """Perplexity of MODEL (and, with --base, llama-perplexity's KL-divergence statistics),
    computed exactly like llama-perplexity: chunks of --ctx tokens, BOS first, second half scored.

    Exits 15 when a gate (the --max-*/--min-* options) fails.
    """
    gates = Gates(**bounds)
    if gates.active and base is None:
        raise UsageError("gates compare against a base: give --base")
    settings = _settings(ctx, chunks, batch, ubatch, threads, flash_attn, repack)
    plan = plan_eval(model, base=base, text=text, corpus=corpus, settings=settings, backend=backend,
                     speed=speed)
    if dry_run:
        click.echo(plan.describe())
        return
    result = run_eval(plan, progress=_progress(quiet))
    for note in result.notes:
        click.echo(f"warning: {note}", err=True)
    click.echo(result.to_json() if as_json else format_result(result))
    check_gates(result, gates)


@click.command("compare")
@click.argument("files", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--base", required=True, type=click.Path(exists=True, dir_okay=False),
              help="Reference model (the F16/BF16 source); its log-probs are computed once and shared, keyed "
                   "by its full sha256 (~3 min once for 240 GB, then remembered by stat).")
@_settings_options
@click.option("--speed/--no-speed", default=True, show_default=True,
              help="Measure pp512/tg128 tokens/s of every file (and the base).")
@click.option("--format", "fmt", type=click.Choice(("md", "json", "csv")), default="md", show_default=True)
@click.option("--plot", "plot", type=click.Path(dir_okay=False), default=None,
              help="Write a Pareto plot (mean KLD vs size, log scales) to this .png/.svg/.pdf "
                   "(checked before the evaluation; an existing file only with --force).")
@click.option("--force", is_flag=True, help="Replace an existing --plot.")
@click.option("-q", "--quiet", is_flag=True, help="No progress lines on stderr.")
def compare(files: tuple[str, ...], base: str, text: str | None, corpus: str | None, ctx: int,
            chunks: int | None, batch: int | None, ubatch: int, threads: int | None, flash_attn: bool,
            repack: bool, backend: str, speed: bool, fmt: str, plot: str | None, force: bool, quiet: bool,
            **bounds: float | None) -> None:
    """One table for FILES against --base: tier, size, bpw, PPL, KLD mean/99.9%/max, same top p,
    speed. Exits 15 (after printing the table) when a gate fails for any file."""
    from apex_orch.evaluation import compare as evalreport

    gates = Gates(**bounds)
    settings = _settings(ctx, chunks, batch, ubatch, threads, flash_attn, repack)
    if plot:   # the output's checks before minutes of evaluation: format, never an input, no overwrite
        from pathlib import Path

        from apex_orch.core.outputs import check_new_output
        check_new_output(plot, inputs=[Path(f) for f in (*files, base, text) if f], force=force, option="plot",
                         what="plot file", suffixes=evalreport.PLOT_SUFFIXES)
    report = evalreport.compare(list(files), base, text=text, corpus=corpus, settings=settings,
                                backend=backend, speed=speed, gates=gates, progress=_progress(quiet))
    click.echo(evalreport.format_report(report, fmt), nl=False)
    if plot:
        path = evalreport.pareto_plot(report, plot, force=force)
        click.echo(f"plot: {path}", err=True)
    report.check_gates()
