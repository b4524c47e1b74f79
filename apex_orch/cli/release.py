"""`apex-orch release CONFIG`: a model's whole APEX file set, card, LocalAI entries, and the Hub."""

from __future__ import annotations

import json
from pathlib import Path

import click

from apex_orch.cli.errors import UsageError
from apex_orch.cli.options import Renamed, quiet_option, renamed
from apex_orch.cli.params import JOBS
from apex_orch.cli.progress import Progress
from apex_orch.cli.release_preview import format_preview
from apex_orch.release.config_reader import load_release
from apex_orch.release.dryrun import describe_release
from apex_orch.release.executor import parse_executor
from apex_orch.release.runner import PHASES, format_reports, run_release, select_phases


@renamed(Renamed(("--from",), "--from-phase", "from_phase", type=str))
@click.command("release")
@click.argument("config", type=click.Path(dir_okay=False))
@click.option("--dry-run", is_flag=True,
              help="Print the plan (tiers, predicted sizes, disk needed, commands) and stop; writes nothing.")
@click.option("--json", "as_json", is_flag=True,
              help="Print the result as JSON on stdout: the phases' reports, or with --dry-run the plan (schemas in "
                   "docs/cli.md and docs/release.md).")
@click.option("--only", default=None, metavar="PHASE[,PHASE]", help=f"Run only these phases ({', '.join(PHASES)}).")
@click.option("--skip", default=None, metavar="PHASE[,PHASE]", help="Run every phase except these.")
@click.option("--from-phase", default=None, metavar="PHASE", help="Start at this phase.")
@click.option("--push", is_flag=True,
              help="Upload to the config's Hugging Face repo (token from HF_TOKEN or `hf auth login`). "
                   "Every GGUF is hashed in full first and refused unless it is the one its manifest and "
                   "card record (~3 min per 240 GB at ~1.4 GB/s).")
@click.option("-j", "--jobs", type=JOBS, default=None,
              help="Tiers quantized in parallel (default: from cores and memory; with --executor ray, every tier "
                   "at once, placed by the cluster).")
@click.option("--source", type=click.Path(dir_okay=False), default=None,
              help="Use this local GGUF instead of the config's source (e.g. a header-only replica for --dry-run).")
@click.option("--out-dir", type=click.Path(file_okay=False), default=None,
              help="Release folder (default: the config's `output`, else out/release/<name>).")
@click.option("--force", is_flag=True,
              help="Redo the stale outputs of the selected phases (tier files whose bytes or inputs no longer "
                   "match their manifest) instead of stopping on them; up-to-date work is still skipped.")
@click.option("--executor", default="local", show_default=True, metavar="TEXT",
              help="Where imatrix, quantize and eval run: `local` (this machine), `ray` (the Ray cluster "
                   "RAY_ADDRESS names, else the one `ray start` started on this machine) or `ray://HOST:PORT` "
                   "(Ray Client). Ray needs `pip install 'apex-orch[ray]'` and storage every worker sees at the "
                   "same paths; see docs/distributed.md.")
@click.option("--no-calibration-upload", "no_calibration_upload", is_flag=True,
              help="Leave the calibration (the imatrix, its calibration text and manifest) out of the release "
                   "folder and the upload; the card says it is not published.")
@quiet_option
def release(config, dry_run, as_json, only, skip, from_phase, push, jobs, source, out_dir, force, executor,
            no_calibration_upload, quiet) -> None:
    """Build (and with --push publish) a model's complete APEX release from CONFIG.

    \b
    Phases: fetch -> convert -> imatrix -> quantize -> eval -> card -> publish.
    Every phase is idempotent: a rerun skips finished work, and an interrupted
    release resumes where it stopped. Phases not selected still find their earlier
    results for the phases after them (they never recompute).

    \b
    Integrity: a file is up to date only when its bytes are the recorded ones. A
    rerun whose files are unchanged (size, mtime, inode as recorded) reads no file
    data; a changed stat means a full sha256 (~3 min per 240 GB, once). The source
    is keyed by its full sha256 (~3 min per 240 GB, once, then remembered).
    """
    parse_executor(executor)
    cfg = load_release(config)
    phases = select_phases(only, skip, from_phase)
    if push and "publish" not in phases:
        raise UsageError("--push given but the publish phase is not selected")
    out = Path(out_dir) if out_dir else None
    src = Path(source) if source else None
    if dry_run:
        preview = describe_release(cfg, phases=phases, push=push, jobs=jobs, out_dir=out, source=src,
                                   calibration_upload=not no_calibration_upload)
        click.echo(json.dumps(preview.to_dict(), indent=2) if as_json else format_preview(preview))
        return
    result = run_release(cfg, phases=phases, push=push, jobs=jobs, out_dir=out, source=src,
                         progress=Progress(quiet, interval=10.0), force=force, executor=executor,
                         calibration_upload=not no_calibration_upload)
    if as_json:
        click.echo(json.dumps(_result_dict(result), indent=2))
    else:
        click.echo(format_reports(result))


def _result_dict(result) -> dict:
    """`release --json`: the run's phase reports and the tasks the executor ran."""
    return {"release_folder": str(result.state.out_dir), "seconds": round(result.seconds, 3),
            "phases": [{"name": r.name, "status": r.status, "seconds": round(r.seconds, 3), "detail": r.detail}
                       for r in result.reports],
            "tasks": [{"phase": t.phase, "target": t.target, "worker": t.worker, "seconds": round(t.seconds, 3),
                       "attempts": t.attempts} for t in result.state.executor.records]}
