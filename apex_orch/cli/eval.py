"""`apex-orch eval` (PPL, KL divergence vs a base, task accuracy, speed) and `apex-orch compare` (a
table and a Pareto plot for several files against one base)."""

from __future__ import annotations

import json

import click

from apex_orch.cli.errors import UsageError
from apex_orch.cli.options import Renamed, json_option, quiet_option, renamed
from apex_orch.cli.params import COUNT, CTX, FINITE, THREADS
from apex_orch.cli.progress import Progress
from apex_orch.core.errors import TaskError
from apex_orch.evaluation.evaluate import BACKENDS, SPEED_REPETITIONS, plan_eval, run_eval
from apex_orch.evaluation.gates import check_gates
from apex_orch.evaluation.inputs import EvalSettings, default_threads
from apex_orch.evaluation.results import format_result
from apex_orch.plan.gates import RULES, Gates


def _settings_options(fn):
    """Options that change the numbers; shared by eval and compare."""
    options = [
        click.option("--text", "text", type=click.Path(exists=True, dir_okay=False), default=None,
                     help="Evaluation text file (at least 2 x ctx tokens)."),
        click.option("--eval-corpus", "eval_corpus", default=None,
                     help="Build the evaluation text from a corpus (corpora/NAME.yaml or a YAML path)."),
        click.option("-c", "--ctx", default=512, show_default=True, type=CTX,
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


class _TaskSpecs(click.ParamType):
    """NAME[=FILE][,NAME[=FILE]...]: the names are checked when parsed (exit 2); the files when read."""
    name = "NAME[=FILE],..."

    def convert(self, value, param, ctx):
        from apex_orch.evaluation.task_files import TASK_KINDS
        if not isinstance(value, str):
            return value
        for part in value.split(","):
            name = part.partition("=")[0].strip().lower()
            if name not in TASK_KINDS:
                self.fail(f"unknown task {name!r} in {value!r}; known: {', '.join(TASK_KINDS)}", param, ctx)
        return value


class _TaskCount(click.ParamType):
    name = "NAME=N|all"

    def convert(self, value, param, ctx):
        if not isinstance(value, str):
            return value
        name, eq, count = value.partition("=")
        count = count.strip().lower()
        if not eq or not (count == "all" or (count.isdigit() and int(count) > 0)):
            self.fail(f"{value!r}: write NAME=N (N >= 1) or NAME=all", param, ctx)
        return name.strip().lower(), 0 if count == "all" else int(count)


def _task_options(fn):
    options = [
        click.option("--tasks", "tasks", multiple=True, type=_TaskSpecs(),
                     help="Task accuracy by llama-perplexity's own scorers: hellaswag, winogrande, mmlu, "
                          "arc-challenge, arc-easy, truthfulqa, each =FILE (llama.cpp's formats) or alone for the "
                          "pinned data, e.g. --tasks hellaswag=hs.txt,winogrande=wg.csv,mmlu=mmlu.bin. See "
                          "docs/eval.md."),
        click.option("--task-count", "task_counts", multiple=True, type=_TaskCount(), metavar="NAME=N|NAME=all",
                     help="Tasks to score, NAME=N or NAME=all (defaults: hellaswag 400, winogrande 400, the "
                          "others all)."),
        click.option("--task-ctx", default=4096, show_default=True, type=click.IntRange(16, 1 << 20),
                     help="The scorers' context per sequence (-c), as the APEX pipeline runs them; the tool keeps "
                          "n_parallel x this many rows of logits."),
        click.option("--speed-reps", default=SPEED_REPETITIONS, show_default=True, type=click.IntRange(1, 100),
                     help="llama-bench repetitions per speed test (--speed)."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _task_specs(tasks: tuple[str, ...], counts: tuple[tuple[str, int], ...]):
    if not tasks:
        if counts:
            raise UsageError("--task-count needs --tasks")
        return None
    from apex_orch.evaluation.tasks import parse_task_specs
    try:
        return parse_task_specs(tasks, dict(counts))
    except TaskError as exc:        # a spelling mistake in the option itself: a usage error
        raise UsageError(f"--tasks: {exc.message}", hint=exc.hint) from None


def _settings(ctx: int, chunks: int | None, batch: int | None, ubatch: int, threads: int | None,
              flash_attn: bool, repack: bool) -> EvalSettings:
    return EvalSettings(n_ctx=ctx, chunks=chunks, n_batch=batch, n_ubatch=ubatch,
                        n_threads=threads or default_threads(), flash_attn=flash_attn, repack=repack)


# The evaluation text's old spelling in eval and compare (--corpus is the imatrix's calibration corpus).
_OLD_CORPUS = Renamed(("--corpus",), "--eval-corpus", "eval_corpus", type=str)


@renamed(_OLD_CORPUS)
@click.command("eval")
@click.argument("model", type=click.Path(exists=True, dir_okay=False))
@click.option("--base", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Reference model (the F16/BF16 source) for KL divergence; its log-probs are cached, keyed "
                   "by its full sha256 (~3 min once for 240 GB, then remembered by stat).")
@_settings_options
@_task_options
@click.option("--speed/--no-speed", default=False, show_default=True,
              help="Also measure llama-bench's pp512/tg128 tokens/s (mean ± sd over --speed-reps runs).")
@json_option
@click.option("--dry-run", is_flag=True, help="Print the plan (inputs, settings, cache) and stop.")
@quiet_option
def eval_cmd(model: str, base: str | None, text: str | None, eval_corpus: str | None, ctx: int, chunks: int | None,
             batch: int | None, ubatch: int, threads: int | None, flash_attn: bool, repack: bool, backend: str,
             tasks: tuple[str, ...], task_counts: tuple[tuple[str, int], ...], task_ctx: int, speed_reps: int,
             speed: bool, as_json: bool, dry_run: bool, quiet: bool, **bounds: float | None) -> None:
    """Perplexity of MODEL (and, with --base, llama-perplexity's KL-divergence statistics),
    computed exactly like llama-perplexity: chunks of --ctx tokens, BOS first, second half scored.
    With --tasks, task accuracies by llama-perplexity's own scorers (no text needed); with --speed,
    llama-bench's pp512/tg128.

    Exits 15 when a gate (the --max-*/--min-* options) fails.
    """
    from apex_orch.evaluation.tasks import TaskSettings

    gates = Gates(**bounds)
    if gates.active and base is None:
        raise UsageError("gates compare against a base: give --base")
    if dry_run and as_json:
        raise UsageError("--json prints the result; the dry run (--dry-run) prints its plan as text")
    specs = _task_specs(tasks, task_counts)
    settings = _settings(ctx, chunks, batch, ubatch, threads, flash_attn, repack)
    plan = plan_eval(model, base=base, text=text, corpus=eval_corpus, settings=settings, backend=backend,
                     speed=speed, tasks=specs, task_settings=TaskSettings.from_eval(settings, n_ctx=task_ctx),
                     speed_repetitions=speed_reps)
    if dry_run:
        click.echo(plan.describe())
        return
    result = run_eval(plan, progress=Progress(quiet))
    for note in result.notes:
        click.echo(f"warning: {note}", err=True)
    click.echo(result.to_json() if as_json else format_result(result))
    check_gates(result, gates)


def _format_choice(value: str) -> dict:
    return {"md": {}, "json": {"as_json": True}, "csv": {"as_csv": True}}[value]


@renamed(_OLD_CORPUS, Renamed(("--format",), "--json / --csv", "as_json", type=click.Choice(("md", "json", "csv")),
                              convert=_format_choice))
@click.command("compare")
@click.argument("files", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--base", required=True, type=click.Path(exists=True, dir_okay=False),
              help="Reference model (the F16/BF16 source); its log-probs are computed once and shared, keyed "
                   "by its full sha256 (~3 min once for 240 GB, then remembered by stat).")
@click.option("--baseline", "baseline", multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="A file to hold FILES against (repeatable): measured the same way, marked as a baseline, no "
                   "gates; a file that a baseline no larger than it beats on mean KLD beyond the error estimates "
                   "is marked † and named in a sentence under the table.")
@_settings_options
@_task_options
@click.option("--speed/--no-speed", default=True, show_default=True,
              help="Measure llama-bench's pp512/tg128 tokens/s of every file (and the base).")
@json_option
@click.option("--csv", "as_csv", is_flag=True, help="Print the table as CSV on stdout (default: Markdown).")
@click.option("--plot", "plot", type=click.Path(dir_okay=False), default=None,
              help="Write a Pareto plot (mean KLD vs size, log scales) to this .png/.svg/.pdf "
                   "(checked before the evaluation; an existing file only with --force).")
@click.option("--force", is_flag=True, help="Replace an existing --plot.")
@quiet_option
def compare(files: tuple[str, ...], base: str, baseline: tuple[str, ...], text: str | None, eval_corpus: str | None,
            ctx: int, chunks: int | None, batch: int | None, ubatch: int, threads: int | None, flash_attn: bool,
            repack: bool, backend: str, tasks: tuple[str, ...], task_counts: tuple[tuple[str, int], ...],
            task_ctx: int, speed_reps: int, speed: bool, as_json: bool, as_csv: bool, plot: str | None, force: bool,
            quiet: bool, **bounds: float | None) -> None:
    """One table for FILES (and each --baseline) against --base: tier, size, bpw, PPL, KLD
    mean/99.9%/max, same top p, a column per --tasks set, llama-bench speed. Exits 15 (after
    printing the table) when a gate fails for any of FILES."""
    from apex_orch.evaluation import compare as evalreport
    from apex_orch.evaluation.tasks import TaskSettings

    if as_json and as_csv:
        raise UsageError("give --json or --csv, not both")
    gates = Gates(**bounds)
    specs = _task_specs(tasks, task_counts)
    settings = _settings(ctx, chunks, batch, ubatch, threads, flash_attn, repack)
    if plot:   # the output's checks before minutes of evaluation: format, never an input, no overwrite
        from pathlib import Path

        from apex_orch.core.outputs import check_new_output
        check_new_output(plot, inputs=[Path(f) for f in (*files, *baseline, base, text) if f], force=force,
                         option="plot", what="plot file", suffixes=evalreport.PLOT_SUFFIXES)
    report = evalreport.compare(list(files), base, text=text, corpus=eval_corpus, settings=settings,
                                backend=backend, speed=speed, gates=gates, progress=Progress(quiet), tasks=specs,
                                task_settings=TaskSettings.from_eval(settings, n_ctx=task_ctx),
                                speed_repetitions=speed_reps, baselines=list(baseline))
    if as_json:   # the plot's file is part of the result
        path = evalreport.pareto_plot(report, plot, force=force) if plot else None
        click.echo(json.dumps({**report.to_dict(), "plot": str(path) if path else None}, indent=2, ensure_ascii=False))
    else:         # the table first: a plot that fails leaves it printed
        click.echo(evalreport.format_report(report, "csv" if as_csv else "md"), nl=False)
        path = evalreport.pareto_plot(report, plot, force=force) if plot else None
        if path and not as_csv:
            click.echo(f"wrote {path}")
    report.check_gates()
