"""Options every command spells the same way, and the old spellings kept for one release.

`json_option`, `quiet_option`: the one `--json` and `-q/--quiet` (apex_orch.cli.glossary says what
they mean; tests/test_cli_glossary.py checks every command against it). `renamed(...)`: an option
that changed its name keeps the old spelling, hidden, for one release: given, it prints a warning
to stderr and its value goes to the new option (both at once is a usage error).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable

import click

json_option = click.option("--json", "as_json", is_flag=True,
                           help="Print the result as JSON on stdout (its schema: docs/cli.md).")
quiet_option = click.option("-q", "--quiet", is_flag=True,
                            help="No progress output on stderr (results, warnings and errors are still printed).")


@dataclass(frozen=True)
class Renamed:
    """An old spelling: `old` (the flags, e.g. ("--from",)) now `new` (the flag users should say).

    `param` is the new option's parameter name; `convert` turns the old value into the new
    parameters' values when they differ ({"as_json": True} for `--format json`); `flag` and
    `type` describe the old option as it was parsed."""

    old: tuple[str, ...]
    new: str
    param: str
    flag: bool = False
    type: Any = None
    secondary: tuple[str, ...] = ()
    convert: Callable[[Any], dict[str, Any]] | None = None

    @property
    def hidden_name(self) -> str:
        return "renamed_" + max(self.old, key=len).lstrip("-").replace("-", "_")


def _hidden_option(r: Renamed) -> click.Option:
    decls = list(r.old)
    if r.secondary:
        decls = ["/".join([max(r.old, key=len), *r.secondary])] + [o for o in r.old if o != max(r.old, key=len)]
    kwargs: dict[str, Any] = {"hidden": True, "default": None}
    if r.flag and not r.secondary:
        kwargs.update(is_flag=True, default=False)
    elif r.secondary:
        kwargs.update(default=None)
    else:
        kwargs["type"] = r.type
    return click.Option([*decls, r.hidden_name], **kwargs)


def renamed(*specs: Renamed) -> Callable[[click.Command], click.Command]:
    """Keep each spec's old spelling as a hidden option of the command (applied on top of @click.command)."""

    def apply(cmd: click.Command) -> click.Command:
        cmd.params.extend(_hidden_option(r) for r in specs)
        callback = cmd.callback
        assert callback is not None

        @functools.wraps(callback)
        def run(*args: Any, **kwargs: Any) -> Any:
            ctx = click.get_current_context()
            for r in specs:
                value = kwargs.pop(r.hidden_name)
                if ctx.get_parameter_source(r.hidden_name) is not click.core.ParameterSource.COMMANDLINE:
                    continue
                spelled = _spelled(r)
                click.echo(f"warning: {spelled} is deprecated: say {r.new} (the old spelling goes in the next "
                           "release)", err=True)
                for name, new_value in (r.convert(value) if r.convert else {r.param: value}).items():
                    if ctx.get_parameter_source(name) is click.core.ParameterSource.COMMANDLINE:
                        raise click.UsageError(f"give {r.new} or its old spelling {spelled}, not both", ctx=ctx)
                    kwargs[name] = new_value
            return callback(*args, **kwargs)

        cmd.callback = run
        renamed_specs = getattr(cmd, "renamed_specs", ())
        cmd.renamed_specs = (*renamed_specs, *specs)   # type: ignore[attr-defined]
        return cmd

    return apply


def _spelled(r: Renamed) -> str:
    """The old flag as the user gave it (the ones of a flag pair, joined)."""
    return "/".join([max(r.old, key=len), *r.secondary])
