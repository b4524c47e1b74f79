"""`apex-orch corpus list | show NAME | build NAME`: calibration corpora."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from apex_orch.calibration import corpus as corpus_lib
from apex_orch.calibration.corpus_spec import available_corpora, load_corpus_spec
from apex_orch.cli.options import json_option, quiet_option
from apex_orch.cli.progress import Progress


@click.group("corpus")
def corpus() -> None:
    """Calibration corpora for importance matrices (definitions in corpora/*.yaml)."""


@corpus.command("list")
@json_option
def list_cmd(as_json: bool) -> None:
    """List the corpora in the repo's corpora/ folder."""
    rows: list[dict[str, Any]] = []
    for name in available_corpora():
        spec = load_corpus_spec(name)
        rows.append({"name": name, "description": spec.description,
                     "budget_tokens_approx": spec.budget_tokens,
                     "sources": [s.id for s in spec.sources]})
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    width = max((len(r["name"]) for r in rows), default=4)
    for r in rows:
        budget = f"~{r['budget_tokens_approx']} tok" if r["budget_tokens_approx"] else "all text"
        click.echo(f"{r['name']:<{width}}  {budget:>12}  {r['description']}")


@corpus.command("show")
@click.argument("name")
@json_option
def show_cmd(name: str, as_json: bool) -> None:
    """Show a corpus: its sources, weights and what each supplies (plain chat format)."""
    info = corpus_lib.describe(load_corpus_spec(name))
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    click.echo(f"{info['name']}: {info['description']}")
    click.echo(f"  definition: {info['definition']}")
    budget = f"~{info['budget_tokens_approx']} tokens" if info["budget_tokens_approx"] else "all text"
    click.echo(f"  budget: {budget}   seed: {info['seed']}   dedupe: {info['dedupe']}   shuffle: {info['shuffle']}")
    click.echo(f"  built: {info['documents']} documents, {info['bytes']} bytes, ~{info['approx_tokens']} tokens "
               f"({corpus_lib.APPROX_METHOD})")
    for s in info["sources"]:
        click.echo(f"  - {s['id']}  weight {s['weight']:g}: {s['documents_used']}/{s['documents_available']} "
                   f"documents, {s['bytes']} bytes, ~{s['tokens']} tokens"
                   + (f", {s['duplicates_dropped']} duplicates dropped" if s["duplicates_dropped"] else ""))
    for w in info["warnings"]:
        click.echo(f"  warning: {w}")


@corpus.command("build")
@click.argument("name")
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None,
              help="Text file to write (default: ./NAME.txt); the manifest goes to FILE.manifest.json.")
@click.option("--model", "model", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Render conversations with this GGUF's chat template and count tokens with its tokenizer.")
@click.option("--force", is_flag=True, help="Replace existing output files.")
@quiet_option
@json_option
def build_cmd(name: str, output: str | None, model: str | None, force: bool, quiet: bool, as_json: bool) -> None:
    """Build a corpus into one text file plus a manifest (sha256, per-source bytes and tokens)."""
    progress = Progress(quiet)
    progress(f"corpus {name}: reading its sources" + (f", tokens counted with {model}" if model else ""))
    built = corpus_lib.build_corpus(name, model=model)
    target = Path(output) if output else Path.cwd() / f"{built.name}.txt"
    text_path, manifest_path, manifest = corpus_lib.write_corpus(built, target, model=model, force=force)
    for w in manifest["warnings"]:
        click.echo(f"warning: {w}", err=True)
    if as_json:
        click.echo(json.dumps({"text": str(text_path), "manifest": str(manifest_path), **manifest}, indent=2))
        return
    click.echo(f"{text_path}: {manifest['bytes']} bytes, {manifest['documents']} documents, "
               f"{manifest['tokens']} tokens ({manifest['tokens_method']}), sha256 {manifest['sha256']}")
    click.echo(f"manifest: {manifest_path}")
