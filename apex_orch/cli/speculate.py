"""`apex-orch speculate MODEL [--draft DRAFT]`: greedy generation with the MTP head as llama.cpp's
speculative draft and without it: draft acceptance, tokens/s of both, and the proof that the
head changes no token."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import click

from apex_orch.cli.params import COUNT, THREADS
from apex_orch.evaluation.speculative import (DEFAULT_PROMPT, check_result, format_result, plan_speculative,
                                              run_speculative)


@click.command()
@click.argument("model", type=click.Path(exists=True, dir_okay=False))
@click.option("--draft", type=click.Path(exists=True, dir_okay=False), default=None,
              help="The MTP head as a separate draft file (the converter's --mtp output, quantized or not); "
                   "default: the head bundled in MODEL.")
@click.option("--prompt", default=DEFAULT_PROMPT, show_default=False, help="The prompt (default: a fixed sentence).")
@click.option("-n", "--n-predict", default=32, show_default=True, type=click.IntRange(min=2),
              help="Tokens to generate.")
@click.option("--draft-max", default=3, show_default=True, type=COUNT,
              help="Tokens the head drafts per step (llama.cpp's --spec-draft-n-max).")
@click.option("-c", "--ctx", default=1024, show_default=True, type=COUNT, help="Context size.")
@click.option("-t", "--threads", default=None, type=THREADS, help="CPU threads (default: all cores).")
@click.option("--repack/--no-repack", default=False, show_default=True,
              help="llama.cpp extra buffer types (CPU repack/AMX kernels); off by default, as for eval "
                   "(MLA models crash with them on AMX CPUs in the pinned build).")
@click.option("--log-dir", type=click.Path(file_okay=False), default=None,
              help="Keep the tool's logs here (default: a temporary folder, removed unless the run fails).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.option("--dry-run", is_flag=True, help="Print both command lines and stop.")
def speculate(model: str, draft: str | None, prompt: str, n_predict: int, draft_max: int, ctx: int,
              threads: int | None, repack: bool, log_dir: str | None, as_json: bool, dry_run: bool) -> None:
    """Speculative decoding with MODEL's MTP head (or --draft): llama-speculative-simple generates
    greedily with the head drafting (--spec-type draft-mtp) and without speculation, and reports
    drafted and accepted tokens, the acceptance rate and decode tokens/s of both runs.

    Exits 14 when the head drafted nothing or the two generations differ (greedy speculative
    decoding must not change a token)."""
    plan = plan_speculative(model, draft=draft, prompt=prompt, n_predict=n_predict, draft_max=draft_max,
                            ctx=ctx, threads=threads, repack=repack)
    if dry_run:
        click.echo(plan.describe())
        return
    logs = Path(log_dir) if log_dir else Path(tempfile.mkdtemp(prefix="apex-orch-speculate-"))
    result = run_speculative(plan, logs)
    click.echo(result.to_json() if as_json else format_result(result))
    check_result(result)
    if not log_dir:
        shutil.rmtree(logs, ignore_errors=True)
