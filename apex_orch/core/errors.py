"""One error hierarchy. Library code raises these; the CLI turns each into one message.

Every error carries what went wrong, where, and how to fix it. The CLI prints
`error: <message>` (plus `hint: <hint>` when there is one) and exits with `exit_code`;
tracebacks only with --debug or APEX_ORCH_DEBUG=1.

Errors pickle with all their fields (message, hint, where, and a subclass's own), so one raised
in a Ray task reaches the driver as the same error, with the same message and exit code.
"""

from __future__ import annotations


class ApexError(Exception):
    """Base class: a user-facing failure with an actionable message."""

    exit_code = 1

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


class ProfileError(ApexError):
    """A YAML profile (or corpus/release config) is malformed or inconsistent."""

    exit_code = 3


class ConfigError(ProfileError):
    """A corpus or release configuration file is invalid."""


class ModelError(ApexError):
    """A GGUF file is missing, unreadable, truncated, or not something APEX can handle."""

    exit_code = 4


class DenseModelError(ModelError):
    """APEX is for Mixture-of-Experts models; a dense model is refused."""


class PlanError(ApexError):
    """A plan cannot be made or violates a constraint (e.g. a fallback under --strict)."""

    exit_code = 5


class ToolPlanMismatchError(PlanError):
    """The llama-quantize that would run assigns other types than the plan (its own --dry-run)."""


class RenderError(PlanError):
    """An override rule would match nothing or the wrong tensors."""


class ImatrixError(ApexError):
    """An importance matrix is missing, corrupt, from another model, or lacks needed data."""

    exit_code = 6


class ToolNotFoundError(ApexError):
    """A llama.cpp binary or library could not be found."""

    exit_code = 7


class ToolFailedError(ApexError):
    """A llama.cpp tool exited non-zero, was killed, or timed out."""

    exit_code = 8

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


class OutputExistsError(ApexError):
    """The output exists and --force was not given."""

    exit_code = 9


class OutputNotWritableError(ApexError):
    """The output folder cannot be created or written (read-only file system, permissions)."""

    exit_code = 17


class LockedError(ApexError):
    """Another apex-orch run holds the lock on this output."""

    exit_code = 10


class DiskSpaceError(ApexError):
    """Not enough free disk for the predicted output (checked before starting)."""

    exit_code = 11


class VerificationError(ApexError):
    """A written file does not match its plan (types, size, hash)."""

    exit_code = 12


class ManifestError(ApexError):
    """A manifest is corrupt or does not describe the file beside it."""

    exit_code = 13


class EvalError(ApexError):
    """An evaluation cannot run (text too short, vocabulary mismatch, corrupt file...)."""

    exit_code = 14


class TaskError(EvalError):
    """A task set for llama-perplexity's scorers (HellaSwag, Winogrande, multiple choice) cannot be
    used: an unknown task name, a missing or non-regular file, a malformed file (the line or task
    named), data whose sha256 is not the pinned one, a task the tool could not score."""

    exit_code = 19


class GateFailedError(ApexError):
    """A quality gate (max KLD, max PPL ratio...) was not met."""

    exit_code = 15
    table: str | None = None    # the rendered comparison the failures were found in (compare.eval_table)


class PublishError(ApexError):
    """Publishing to Hugging Face failed or was refused."""

    exit_code = 16


class UnsafeOutputError(OutputNotWritableError):
    """A name apex-orch writes is a symbolic link (or a hard link / not a regular file): apex-orch
    never writes through it, so nothing outside the output folder is touched (issue 15)."""


class OutputIsInputError(UsageError):
    """An output resolves to one of the run's inputs (same path, same file through a link):
    refused before anything runs, so an input is never overwritten (issue 15)."""


class ExecutorError(ApexError):
    """The Ray cluster cannot be reached, cannot place a task, or lost a task on every attempt."""

    exit_code = 18


class InternalError(ApexError):
    """A failure no layer translated (a bug): still one message; the traceback with --debug."""

    exit_code = 70
