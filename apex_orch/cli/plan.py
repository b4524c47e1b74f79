"""`apex-orch plan` and `apex-orch render`."""

from __future__ import annotations

import json
from pathlib import Path

import click

from apex_orch.cli.options import Renamed, json_option, renamed
from apex_orch.model.info import read_model
from apex_orch.plan.planner import make_plan
from apex_orch.plan.profiles import load_profile
from apex_orch.plan.render import render_args, render_file
from apex_orch.plan.report import format_plan


def _plan(profile: str, model: str, strict: bool = False, imatrix: bool | None = None):
    return make_plan(read_model(model), load_profile(profile), strict=strict, has_imatrix=imatrix)


@renamed(Renamed(("--imatrix",), "--with-imatrix/--without-imatrix", "imatrix", secondary=("--no-imatrix",)))
@click.command()
@click.option("-p", "--profile", "profile_name", required=True, help="Profile name or .yaml path.")
@click.argument("model", type=click.Path(dir_okay=False))
@json_option
@click.option("--strict", is_flag=True, help="Fail if any tensor needs a row-size fallback or has no role.")
@click.option("--tensors", "show_tensors", is_flag=True, help="Also list every tensor with its reason.")
@click.option("--with-imatrix/--without-imatrix", "imatrix", default=None,
              help="Plan as if an importance matrix is / is not given (default: what the profile requires).")
def plan(profile_name: str, model: str, as_json: bool, strict: bool, show_tensors: bool,
         imatrix: bool | None) -> None:
    """Predict, for every tensor, the type requested by the profile and the type llama-quantize
    will really write (FTYPE mixture, never-quantized tensors, row-size fallbacks), with a
    band x role table, bytes per role, total size and bits per weight. Header only; no writing."""
    p = _plan(profile_name, model, strict, imatrix)
    click.echo(json.dumps(p.to_json(), indent=2) if as_json else format_plan(p, show_tensors=show_tensors))


def _format_choice(value: str) -> dict:
    return {"as_args": True} if value == "args" else {}


@renamed(Renamed(("--format",), "--args", "as_args", type=click.Choice(["args", "file"]), convert=_format_choice))
@click.command()
@click.option("-p", "--profile", "profile_name", required=True, help="Profile name or .yaml path.")
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--args", "as_args", is_flag=True,
              help="Print llama-quantize's --tensor-type arguments, one per line, instead of the file "
                   "--tensor-type-file reads.")
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Write to a file instead of stdout.")
@click.option("--force", is_flag=True, help="Replace --output if it exists.")
@json_option
def render(profile_name: str, model: str, as_args: bool, output: str | None, force: bool, as_json: bool) -> None:
    """Render the plan's overrides for llama-quantize: every rule anchored and escaped so it can
    only hit the tensors the plan means; a rule that would match nothing is an error."""
    p = _plan(profile_name, model)
    if as_args:
        args = render_args(p)
        text = "".join(f"{a} {v}\n" for a, v in zip(args[::2], args[1::2]))
    else:
        text = render_file(p)
    out = None
    if output:
        from apex_orch.core.outputs import write_new_text   # the safe-file machinery only when writing
        out = Path(output)
        write_new_text(out, text, force=force)
    if as_json:
        click.echo(json.dumps({"profile": p.profile.name, "model": str(model),
                               "rules": [{"pattern": r.pattern, "type": r.type.name, "tensors": list(r.tensors)}
                                         for r in p.rules],
                               "text": text, "output": str(out) if out else None}, indent=2))
    elif out is not None:
        click.echo(f"wrote {len(p.rules)} rules to {out}")
    else:
        click.echo(text, nl=False)
