"""The apex-orch command line: thin Click commands over the library.

Errors raised by the library (apex_orch.core.errors.ApexError) are translated here, once,
into `error: ...` + `hint: ...` and the error's exit code, the parameters they name worded as
the command's flags (apex_orch.cli.errors). Tracebacks only with --debug or APEX_ORCH_DEBUG=1.
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import click

from apex_orch import __version__
from apex_orch.core import settings
from apex_orch.core.errors import InternalError, InterruptedRun, exit_codes
from apex_orch.core.text import printable
from apex_orch.llama.tools import build_label, llama_bin_dir_option, mask_secrets
from apex_orch.plan.profile_search import profile_dirs_option


def _debug_enabled(ctx: click.Context | None) -> bool:
    if settings.debug():
        return True
    return bool(ctx and ctx.obj and ctx.obj.get("debug"))


class ApexGroup(click.Group):
    """Lazily loads commands; runs them and maps ApexError to one clear message and exit code."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        import importlib.util
        return sorted(n for n, (mod, _) in COMMANDS.items() if importlib.util.find_spec(mod) is not None)

    def get_command(self, ctx: click.Context, name: str):
        target = COMMANDS.get(name)
        if target is None:
            return None
        import importlib
        return getattr(importlib.import_module(target[0]), target[1])

    def invoke(self, ctx: click.Context):
        def on_sigterm(signum, frame):  # SIGTERM/SIGHUP are handled like Ctrl-C: clean up, then exit
            raise KeyboardInterrupt

        previous: dict = {}
        for sig in (signal.SIGTERM, signal.SIGHUP):
            try:
                previous[sig] = signal.signal(sig, on_sigterm)
            except ValueError:  # not in the main thread (e.g. some test runners)
                pass
        try:
            return super().invoke(ctx)
        except click.exceptions.Exit:
            raise   # click's own exits (ctx.exit below, --help): already a code of the table
        except click.ClickException as exc:
            if exc.exit_code != 2:   # click's base class exits 1 (doctor's code): here it is a usage error
                exc.exit_code = 2
            raise   # click's usage errors: already one message
        except click.Abort:   # Ctrl-C or end of input at a prompt
            if _debug_enabled(ctx):
                raise
            err = InterruptedRun("interrupted", hint="rerun the same command to start again")
            click.echo(f"error: {err.render()}", err=True)
            ctx.exit(err.exit_code)
        except SystemExit as exc:
            if isinstance(exc.code, int) and exc.code in exit_codes():
                raise
            if _debug_enabled(ctx):
                raise
            err = InternalError(f"unexpected exit {exc.code!r}", hint="this is a bug in apex-orch; rerun with --debug "
                                                                      "for the traceback and report it")
            click.echo(f"error: {_masked(err.render())}", err=True)
            ctx.exit(err.exit_code)
        except (Exception, KeyboardInterrupt) as exc:
            if _debug_enabled(ctx):
                raise
            from apex_orch.cli.errors import as_apex_error, flag_names
            err = as_apex_error(exc)
            click.echo(f"error: {_masked(err.render(flag_names(ctx)))}", err=True)
            # a code outside the table (a class that forgot its own) is a bug's code, never another one
            ctx.exit(err.exit_code if err.exit_code in exit_codes() else InternalError.exit_code)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def _masked(text: str) -> str:
    """Error text with credential values (HF_TOKEN...) replaced by *** (the tools' own masking),
    and control characters (from file names, GGUF strings, tool logs) shown as escapes, never
    sent to the terminal raw."""
    return printable(mask_secrets(text), keep="\n\t")


def _print_version(ctx: click.Context) -> None:
    if ctx.resilient_parsing:
        return
    click.echo(f"apex-orch {__version__}\nllama.cpp {build_label()}")
    ctx.exit()


@click.group(cls=ApexGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors.")
@click.option("--llama-bin-dir", type=click.Path(file_okay=False), default=None,
              help="Folder holding llama-quantize/llama-imatrix/llama-perplexity and libllama "
                   "(default: $APEX_LLAMA_BIN_DIR, then the pinned build cache, then PATH).")
@click.option("--profiles-dir", "profiles_dirs", multiple=True, type=click.Path(file_okay=False, exists=True),
              help="A folder of your own profiles (NAME.yaml), searched before the built-ins; "
                   "repeatable (default: $APEX_ORCH_PROFILES, os.pathsep-separated).")
@click.option("--version", is_flag=True, expose_value=False, is_eager=True,
              callback=lambda ctx, _p, value: _print_version(ctx) if value else None,
              help="Show apex-orch's version and the llama.cpp build, then exit.")
@click.pass_context
def main(ctx: click.Context, debug: bool, llama_bin_dir: str | None, profiles_dirs: tuple[str, ...]) -> None:
    """APEX quantization of Mixture-of-Experts GGUF models with llama.cpp.

    \b
    Typical flow:
      apex-orch inspect MODEL.gguf
      apex-orch plan --profile compact MODEL.gguf
      apex-orch quantize --profile compact MODEL.gguf
      apex-orch imatrix MODEL.gguf --corpus agentic
      apex-orch eval OUT.gguf --base MODEL.gguf
    """
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug
    # The two global options are values held by the modules that use them, for this command
    # only (undone when it ends), never exported through os.environ.
    if llama_bin_dir:
        ctx.with_resource(llama_bin_dir_option(Path(llama_bin_dir)))
    if profiles_dirs:
        ctx.with_resource(profile_dirs_option([Path(d).expanduser() for d in profiles_dirs]))


# Command name -> (module, attribute). Modules are imported only when their command runs
# (or for --help), so `apex-orch quantize` does not pay for the eval stack's imports.
COMMANDS: dict[str, tuple[str, str]] = {
    "build": ("apex_orch.cli.build", "build"),
    "doctor": ("apex_orch.cli.doctor", "doctor"),
    "inspect": ("apex_orch.cli.inspect", "inspect"),
    "profile": ("apex_orch.cli.profiles", "profile"),
    "plan": ("apex_orch.cli.plan", "plan"),
    "render": ("apex_orch.cli.plan", "render"),
    "quantize": ("apex_orch.cli.quantize", "quantize"),
    "corpus": ("apex_orch.cli.corpus", "corpus"),
    "imatrix": ("apex_orch.cli.imatrix", "imatrix"),
    "imatrix-report": ("apex_orch.cli.imatrix", "imatrix_report"),
    "eval": ("apex_orch.cli.eval", "eval_cmd"),
    "compare": ("apex_orch.cli.eval", "compare"),
    "speculate": ("apex_orch.cli.speculate", "speculate"),
    "sensitivity": ("apex_orch.cli.fit", "sensitivity"),
    "fit": ("apex_orch.cli.fit", "fit"),
    "release": ("apex_orch.cli.release", "release"),
}


def run() -> None:  # pragma: no cover - console entry helper
    sys.exit(main())
