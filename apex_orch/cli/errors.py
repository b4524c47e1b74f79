"""How the CLI words errors: the library's parameter names as this command's flags.

Library errors name parameters (ApexError.options, RequestError.fields) by the library's names;
a command's Click parameters carry the same names (`split_max_size` is `--split-max-size`), so
the flag of each is read from the command that ran, never written twice. A parameter the command
does not have is left out of its message (the command offers no such option). Exit codes are the
error classes' own (apex_orch.core.errors, one table); `as_apex_error` turns anything else that
reaches the top into one of them, and apex_orch.cli's group prints it and exits with its code.
"""

from __future__ import annotations

import click

from apex_orch.core.errors import ApexError, InternalError, InterruptedRun, RequestError


def as_apex_error(exc: BaseException) -> ApexError:
    """Whatever reached the top of a command, as the one ApexError the CLI prints (its class says the
    exit code): apex-orch's own errors as they are; a file-system failure no layer translated through
    core.translate's table; Ctrl-C / SIGTERM as InterruptedRun; anything else is a bug (InternalError)."""
    if isinstance(exc, ApexError):
        return exc
    if isinstance(exc, OSError):
        from apex_orch.core.translate import translate_os_error
        return translate_os_error(exc)
    if isinstance(exc, KeyboardInterrupt):
        return InterruptedRun("interrupted; partial outputs were removed", hint="rerun the same command to start again")
    return InternalError(f"unexpected {type(exc).__name__}: {exc}",
                         hint="this is a bug in apex-orch; rerun with --debug for the traceback and report it")


class UsageError(RequestError):
    """Bad command-line arguments that Click itself cannot catch (two options that exclude each
    other...): raised by the commands only, worded with their flags."""


# Library parameter names that a command's Click parameter spells differently (used where the command
# has no parameter of the library's own name: `ctx` is eval's --ctx, and imatrix's --imatrix-ctx).
ALIASES: dict[str, tuple[str, ...]] = {
    "imatrix": ("imatrix_path",),
    "out": ("output",),
    "n_ctx": ("ctx",),
    "n_ubatch": ("ubatch",),
    "n_batch": ("batch",),
    "n_threads": ("threads",),
    "calibration": ("calibration_path",),
    "n_blocks": ("blocks",),
    "sensitivity": ("sensitivity_path",),
    "ctx": ("imatrix_ctx",),
    "chunks": ("imatrix_chunks",),
    "corpus": ("eval_corpus",),
    "text_corpus": ("eval_corpus",),
    "base": ("base_profile",),
    "bands_from": ("base_profile",),
    "calibration_upload": ("no_calibration_upload",),
    "baselines": ("baseline",),
}


def _flag(param: click.Parameter) -> str | None:
    """`--long-name` of an option, `NAME` of an argument."""
    if isinstance(param, click.Argument):
        return param.human_readable_name
    if not isinstance(param, click.Option) or not param.opts:
        return None
    return max(param.opts, key=len)


def _params(command: click.Command | None, ctx: click.Context | None) -> list[click.Parameter]:
    """The parameters of `command` and, for a group, of every subcommand (a nested command's
    context is gone once its error reaches the top)."""
    if command is None:
        return []
    found = list(command.params)
    if isinstance(command, click.Group) and ctx is not None:
        for name in command.list_commands(ctx):
            found += _params(command.get_command(ctx, name), ctx)
    return found


def flag_names(ctx: click.Context) -> dict[str, str]:
    """Library parameter name -> this command's flag (the group's global options included)."""
    names: dict[str, str] = {}
    sub = None
    if isinstance(ctx.command, click.Group) and ctx.invoked_subcommand:
        sub = ctx.command.get_command(ctx, ctx.invoked_subcommand)
    for param in [*_params(sub, ctx), *ctx.command.params]:
        flag = _flag(param)
        if flag and param.name and param.name not in names:
            names[param.name] = flag
    for library, spelled in ALIASES.items():
        flags = [names[s] for s in spelled if s in names]
        if flags and library not in names:
            names[library] = " / ".join(flags)
    return names
