"""`apex-orch inspect MODEL`: header-only anatomy of a GGUF."""

from __future__ import annotations

import json

import click

from apex_orch.model.describe import format_inspect, inspect_model
from apex_orch.model.info import read_model


@click.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object instead of text.")
def inspect(model: str, as_json: bool) -> None:
    """Show a model's architecture, experts, attention (MLA ranks), context, parameters
    (total and active per token) and a per-role table — from the GGUF header only.
    For split models pass any shard; all shards are read."""
    info = inspect_model(read_model(model))
    click.echo(json.dumps(info, indent=2) if as_json else format_inspect(info))
