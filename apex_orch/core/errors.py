"""One error hierarchy. Library code raises these; the CLI turns each into one message.

Every error carries what went wrong, where, and how to fix it. The CLI prints
`error: <message>` (plus `hint: <hint>` when there is one) and exits with `exit_code`;
tracebacks only with --debug or APEX_ORCH_DEBUG=1.

Errors pickle with all their fields (message, hint, where, and a subclass's own), so one raised
in a Ray task reaches the driver as the same error, with the same message and exit code.
"""

from __future__ import annotations


class ApexError(Exception):
    """Base class: a user-facing failure with an actionable message.

    Every class that introduces an exit code says what it means in `meaning`: the exit-code table
    of docs/reliability.md is generated from these (`exit_code_table`), and the CLI never exits
    with a code outside it. The base itself is never raised: its code is InternalError's.
    """

    exit_code = 70
    meaning = ""

    def __init__(self, message: str, *, hint: str | None = None, where: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.where = where

    def render(self) -> str:
        head = f"{self.where}: {self.message}" if self.where else self.message
        return head if not self.hint else f"{head}\nhint: {self.hint}"

    def __str__(self) -> str:  # keeps pytest output and logs readable
        return self.render()

    def __reduce__(self):
        # Exception pickles only `args`, and subclasses' __init__ differ: rebuild from the fields.
        return _rebuild, (type(self), dict(self.__dict__))


def _rebuild(cls: type, fields: dict) -> ApexError:
    err = cls.__new__(cls)
    Exception.__init__(err, fields.get("message", ""))
    err.__dict__.update(fields)
    return err


class UsageError(ApexError):
    """Bad command-line arguments that Click itself cannot catch."""

    exit_code = 2
    meaning = ("usage (bad flags, `--name` that is a path, an output that is an input, two tiers writing one "
               "file, an output whose name is too long)")


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
    meaning = "llama.cpp tool not found (or Ray, for `--executor ray`, not installed)"


class ToolFailedError(ApexError):
    """A llama.cpp tool exited non-zero, was killed, or timed out."""

    exit_code = 8
    meaning = "tool failed, was killed or timed out"

    def __init__(self, message: str, *, returncode: int | None = None, log_path=None,
                 log_tail: str = "", hint: str | None = None, where: str | None = None):
        super().__init__(message, hint=hint, where=where)
        self.returncode = returncode
        self.log_path = log_path
        self.log_tail = log_tail

    def render(self) -> str:
        # what went wrong, then the evidence (log tail), then how to fix it, last, where it is read
        text = f"{self.where}: {self.message}" if self.where else self.message
        if self.log_tail:
            text += "\n--- last lines of the tool's log ---\n" + self.log_tail.rstrip()
        if self.log_path:
            text += f"\nfull log: {self.log_path}"
        if self.hint:
            text += f"\nhint: {self.hint}"
        return text


class ToolTimeoutError(ToolFailedError):
    """A tool ran past --timeout and was stopped."""


class InterruptedRun(ApexError):
    """SIGINT/SIGTERM arrived; partial outputs were removed."""

    exit_code = 130
    meaning = "interrupted (SIGINT / SIGTERM / SIGHUP)"


class OutputExistsError(ApexError):
    """The output exists and --force was not given."""

    exit_code = 9
    meaning = "output exists (and is not up to date); pass `--force`"


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
    never writes through it, so nothing outside the output folder is touched (issue 15)."""


class OutputIsInputError(UsageError):
    """An output resolves to one of the run's inputs (same path, same file through a link):
    refused before anything runs, so an input is never overwritten (issue 15)."""


class ExecutorError(ApexError):
    """The Ray cluster cannot be reached, cannot place a task, or lost a task on every attempt."""

    exit_code = 18
    meaning = ("`release --executor ray`: the cluster cannot be reached, cannot place a task, or lost a tier on "
               "every attempt")


class InternalError(ApexError):
    """A failure no layer translated (a bug): still one message; the traceback with --debug."""

    exit_code = 70
    meaning = ("an unexpected failure no layer translated (a bug): still one `error: unexpected ...` line; the "
               "traceback only with `--debug`")


class ResultFileError(ApexError):
    """A result apex-orch wrote and reads back (a sensitivity result: the cache entry, an `-o` file, a
    `--sensitivity` / `--calibration` / release `fit:` file) is damaged, edited or not one: it fails
    its own checksum, its values (negative or non-finite KLDs) or its structure."""

    exit_code = 19
    meaning = ("a result file (a sensitivity result given with `--sensitivity`, `--calibration` or a release "
               "`fit:` tier) is damaged, edited, too large or not one")


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
    seen: list[type] = []
    todo: list[type] = [ApexError]
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
