"""One error hierarchy. Library code raises these; the CLI turns each into one message.

Every error carries what went wrong, where, and how to fix it. The CLI prints
`error: <message>` (plus `hint: <hint>` when there is one) and exits with `exit_code`;
tracebacks only with --debug or APEX_ORCH_DEBUG=1. The classes below, each with its exit code,
are the one table of exit codes (docs/reliability.md lists it).

Library messages name no command-line flag: a library function does not know which command (or
program) called it. An error names the *parameters* involved instead, by the library's own names:
`fields` (RequestError: the arguments at fault) and `options` (any error: the arguments that fix
it, e.g. `force`). `render()` shows them by those names; the CLI renders them as its flags
(apex_orch.cli.errors), e.g. `options=("force",)` becomes `[--force]` after the hint.

Errors pickle with all their fields (message, hint, where, and a subclass's own), so one raised
in a Ray task reaches the driver as the same error, with the same message and exit code.
"""

from __future__ import annotations

from typing import Any, Mapping


class ApexError(Exception):
    """Base class: a user-facing failure with an actionable message.

    Every class that introduces an exit code says what it means in `meaning`: the exit-code table
    of docs/reliability.md is generated from these (`exit_code_table`), and the CLI never exits
    with a code outside it. The base itself is never raised: its code is InternalError's.
    """

    exit_code = 70
    meaning = ""
    options: tuple[str, ...] = ()

    def __init__(self, message: str, *, hint: str | None = None, where: str | None = None,
                 options: tuple[str, ...] | list[str] = ()):
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.where = where
        self.options = tuple(options)

    def render(self, names: Mapping[str, str] | None = None) -> str:
        """The message, where and hint; `names` maps parameter names to what the caller calls them
        (the CLI: its flags). Without it, parameters are shown by their library names."""
        head = f"{self.where}: {self.message}" if self.where else self.message
        hint = self.hint_text(names)
        return head if not hint else f"{head}\nhint: {hint}"

    def hint_text(self, names: Mapping[str, str] | None = None) -> str | None:
        """The hint, followed by the options that act on it as the caller names them."""
        shown = _named(self.options, names)
        if not shown:
            return self.hint
        return f"{self.hint} [{shown}]" if self.hint else f"see {shown}"

    def __str__(self) -> str:  # keeps pytest output and logs readable
        return self.render()

    def __reduce__(self) -> tuple[Any, ...]:
        # Exception pickles only `args`, and subclasses' __init__ differ: rebuild from the fields.
        return _rebuild, (type(self), dict(self.__dict__))


def _rebuild(cls: type[ApexError], fields: dict[str, Any]) -> ApexError:
    err = cls.__new__(cls)
    Exception.__init__(err, fields.get("message", ""))
    err.__dict__.update(fields)
    return err


def _named(params: tuple[str, ...], names: Mapping[str, str] | None) -> str:
    """Parameters as the caller names them: by `names` (those it lacks are left out: the caller
    has no such option), else by the library's own names."""
    if names is None:
        return ", ".join(f"`{p}`" for p in params)
    return ", ".join(dict.fromkeys(names[p] for p in params if p in names))


class RequestError(ApexError):
    """A library call asked for something these arguments cannot give: a value out of its range,
    two arguments that exclude each other, a name that would steer a file elsewhere. `fields` names
    the arguments at fault (by the library's parameter names); the CLI shows them as its flags in
    front of the message. Exit 2 like Click's own usage errors: the request is at fault."""

    exit_code = 2
    meaning = ("usage (bad arguments, a name that is a path, an output that is an input, two tiers writing "
               "one file, an output whose name is too long)")
    fields: tuple[str, ...] = ()

    def __init__(self, message: str, *, fields: tuple[str, ...] | list[str] = (), hint: str | None = None,
                 where: str | None = None, options: tuple[str, ...] | list[str] = ()):
        super().__init__(message, hint=hint, where=where, options=options)
        self.fields = tuple(fields)

    def render(self, names: Mapping[str, str] | None = None) -> str:
        shown = _named(self.fields, names)
        if shown and not self.where:
            head = f"{shown.replace(', ', ' / ')}: {self.message}"
            hint = self.hint_text(names)
            return head if not hint else f"{head}\nhint: {hint}"
        return super().render(names)


class ProfileError(ApexError):
    """A YAML profile (or corpus/release config) is malformed or inconsistent."""

    exit_code = 3
    meaning = ("profile / config invalid (also a tensor-type file for `profile import`, or imported rules that "
               "would not plan)")


class ConfigError(ProfileError):
    """A corpus or release configuration file is invalid."""


class ModelError(ApexError):
    """A GGUF file is missing, unreadable, truncated, or not something APEX can handle."""

    exit_code = 4
    meaning = ("model file invalid (not GGUF, truncated, torn, dense, unknown architecture, bad split, not a "
               "regular file)")


class DenseModelError(ModelError):
    """APEX is for Mixture-of-Experts models; a dense model is refused."""


class PlanError(ApexError):
    """A plan cannot be made or violates a constraint (e.g. a fallback under --strict)."""

    exit_code = 5
    meaning = "plan cannot be made"


class ToolPlanMismatchError(PlanError):
    """The llama-quantize that would run assigns other types than the plan (its own --dry-run)."""


class RenderError(PlanError):
    """An override rule would match nothing or the wrong tensors."""


class ImatrixError(ApexError):
    """An importance matrix is missing, corrupt, from another model, or lacks needed data."""

    exit_code = 6
    meaning = "imatrix missing, corrupt, from another model, lacking data"


class ToolNotFoundError(ApexError):
    """A llama.cpp binary or library could not be found."""

    exit_code = 7
    meaning = "llama.cpp tool not found (or Ray, for releases on a Ray cluster, not installed)"


class ToolFailedError(ApexError):
    """A llama.cpp tool exited non-zero, was killed, or timed out."""

    exit_code = 8
    meaning = "tool failed, was killed or timed out"

    def __init__(self, message: str, *, returncode: int | None = None, log_path: Any = None,
                 log_tail: str = "", hint: str | None = None, where: str | None = None,
                 options: tuple[str, ...] | list[str] = ()):
        super().__init__(message, hint=hint, where=where, options=options)
        self.returncode = returncode
        self.log_path = log_path
        self.log_tail = log_tail

    def render(self, names: Mapping[str, str] | None = None) -> str:
        # what went wrong, then the evidence (log tail), then how to fix it, last, where it is read
        text = f"{self.where}: {self.message}" if self.where else self.message
        if self.log_tail:
            text += "\n--- last lines of the tool's log ---\n" + self.log_tail.rstrip()
        if self.log_path:
            text += f"\nfull log: {self.log_path}"
        hint = self.hint_text(names)
        if hint:
            text += f"\nhint: {hint}"
        return text


class BuildError(ToolFailedError):
    """Setting up the pinned llama.cpp failed: the download, its sha256, the unpacked tree, the
    CMake build or the bindings install (what `make llama` / `apex-orch build` do)."""


class ToolTimeoutError(ToolFailedError):
    """A tool ran past --timeout and was stopped."""


class InterruptedRun(ApexError):
    """SIGINT/SIGTERM arrived; partial outputs were removed."""

    exit_code = 130
    meaning = "interrupted (SIGINT / SIGTERM / SIGHUP)"


class OutputExistsError(ApexError):
    """The output exists and --force was not given."""

    exit_code = 9
    meaning = "output exists (and is not up to date); replacing it must be asked for"


class OutputNotWritableError(ApexError):
    """The output folder cannot be created or written (read-only file system, permissions)."""

    exit_code = 17
    meaning = ("output folder not writable (read-only file system, permissions), or a link / hard link / FIFO "
               "planted at a name apex-orch writes")


class LockedError(ApexError):
    """Another apex-orch run holds the lock on this output."""

    exit_code = 10
    meaning = "locked by another run"


class DiskSpaceError(ApexError):
    """Not enough free disk for the predicted output (checked before starting)."""

    exit_code = 11
    meaning = "disk space (before starting, or filled while writing)"


class VerificationError(ApexError):
    """A written file does not match its plan (types, size, hash)."""

    exit_code = 12
    meaning = "written file does not match the plan"


class ManifestError(ApexError):
    """A manifest is corrupt or does not describe the file beside it."""

    exit_code = 13
    meaning = "manifest damaged"


class EvalError(ApexError):
    """An evaluation cannot run (text too short, vocabulary mismatch, corrupt file...)."""

    exit_code = 14
    meaning = ("evaluation cannot run (the text is too short for the context and chunks, not a regular file, too"
               " large, vocabularies differ)")


class TaskError(EvalError):
    """A task set for llama-perplexity's scorers (HellaSwag, Winogrande, multiple choice) cannot be
    used: an unknown task name, a missing or non-regular file, a malformed file (the line or task
    named), data whose sha256 is not the pinned one, a task the tool could not score."""

    exit_code = 21
    meaning = ("a task set for llama-perplexity's scorers cannot be used (unknown task, malformed file, data "
               "not the pinned sha256, a task the tool could not score)")


class BaselineError(ApexError):
    """A release baseline is not a quantization of the release's source model: another architecture,
    other tensor names or other shapes (read from the headers, before anything is measured)."""

    exit_code = 22
    meaning = ("a release baseline is not a quantization of the release's source model (another architecture, "
               "tensor names or shapes)")


class GateFailedError(ApexError):
    """A quality gate (max KLD, max PPL ratio...) was not met."""

    exit_code = 15
    meaning = "a quality gate failed"
    table: str | None = None    # the rendered comparison the failures were found in (compare.eval_table)


class PublishError(ApexError):
    """Publishing to Hugging Face failed or was refused."""

    exit_code = 16
    meaning = "publishing failed"


class UnsafeOutputError(OutputNotWritableError):
    """A name apex-orch writes is a symbolic link (or a hard link / not a regular file): apex-orch
    never writes through it, so nothing outside the output folder is touched."""


class OutputIsInputError(RequestError):
    """An output resolves to one of the run's inputs (same path, same file through a link):
    refused before anything runs, so an input is never overwritten."""


class ExecutorError(ApexError):
    """The Ray cluster cannot be reached, cannot place a task, or lost a task on every attempt."""

    exit_code = 18
    meaning = ("a release on a Ray cluster: the cluster cannot be reached, cannot place a task, or lost a tier on "
               "every attempt")


class InternalError(ApexError):
    """A failure no layer translated (a bug): still one message; the traceback with --debug."""

    exit_code = 70
    meaning = ("an unexpected failure no layer translated (a bug): still one `error: unexpected ...` line; the "
               "traceback only in debug mode")


class ResultFileError(ApexError):
    """A result apex-orch wrote and reads back (a sensitivity result: the cache entry, an `-o` file, a
    `--sensitivity` / `--calibration` / release `fit:` file) is missing, damaged, edited or not one:
    it fails its own checksum, its values (negative or non-finite KLDs) or its structure, is of
    another format version, or does not describe the model or settings it is used with."""

    exit_code = 19
    meaning = ("a result file (a sensitivity result given to `fit`, to `sensitivity` as its calibration, or in "
               "a release `fit:` tier) is damaged, edited, too large or not one")


class FileSystemError(ApexError):
    """An OSError with no more specific meaning (an I/O error, a name the file system refuses, too many
    open files...): one message naming the path, never a traceback."""

    exit_code = 20
    meaning = "a file-system failure without a more specific cause (an I/O error, a name the file system refuses)"


# Exit codes that are no ApexError's: success, and `doctor` reporting a problem.
OTHER_EXIT_CODES = {
    0: "success",
    1: "`doctor` found a problem (its report says what to run)",
}


def exit_codes() -> dict[int, str]:
    """Every exit code apex-orch can end with -> its meaning: the classes' own, and OTHER_EXIT_CODES."""
    codes = dict(OTHER_EXIT_CODES)
    seen: list[type[ApexError]] = []
    todo: list[type[ApexError]] = [ApexError]
    while todo:
        cls = todo.pop(0)
        seen.append(cls)
        todo.extend(c for c in cls.__subclasses__() if c not in seen and c.__module__ == __name__)
    for cls in seen:
        if cls is ApexError:
            continue
        if cls.__dict__.get("meaning"):
            codes.setdefault(cls.exit_code, cls.__dict__["meaning"])
    return dict(sorted(codes.items()))


def exit_code_table() -> str:
    """The Markdown table docs/reliability.md shows (tests/test_exit_codes.py keeps them equal)."""
    rows = ["| code | meaning |", "|---|---|"]
    rows += [f"| {code} | {text} |" for code, text in exit_codes().items()]
    return "\n".join(rows) + "\n"


if __name__ == "__main__":   # python -m apex_orch.core.errors: the table for docs/reliability.md
    print(exit_code_table(), end="")
