"""Click parameter types shared by the commands: numbers are checked when parsed (exit 2, the
option named), never accepted silently (`-j 0`, `-t 0`, `--timeout nan`)."""

from __future__ import annotations

import math

import click

from apex_orch.core.sizes import MB, SizeError, parse_size

# Bounded: a thread or job count far past any machine is a typo, not a request.
THREADS = click.IntRange(1, 4096)
JOBS = click.IntRange(1, 256)
COUNT = click.IntRange(min=1)


class _FiniteFloat(click.ParamType):
    """A finite float (nan and inf refused), optionally > 0."""

    def __init__(self, positive: bool, what: str):
        self.positive = positive
        self.name = what

    def convert(self, value, param, ctx):
        if isinstance(value, float) and math.isfinite(value) and (value > 0 or not self.positive):
            return value
        try:
            number = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number", param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        if self.positive and number <= 0:
            self.fail(f"{value!r} is not a positive number of seconds", param, ctx)
        return number


SECONDS = _FiniteFloat(True, "seconds")
FINITE = _FiniteFloat(False, "number")


class _Size(click.ParamType):
    """A size in the one grammar (apex_orch.core.sizes): 48G, 48GB, 45GiB, 48e9; whole bytes.
    A bad value is Click's usage error naming the option (exit 2)."""

    name = "size"

    def __init__(self, minimum: int):
        self.minimum = minimum

    def convert(self, value, param, ctx):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        try:
            return parse_size(value, minimum=self.minimum)
        except SizeError as exc:
            self.fail(str(exc), param, ctx)


# Split parts and size budgets: at least a megabyte (llama-gguf-split splits in whole megabytes).
SPLIT_SIZE = _Size(MB)
BUDGET_SIZE = _Size(MB)

# A llama.cpp context in tokens: every --ctx and --imatrix-ctx (small enough contexts stay usable for
# the tiny test models; a million tokens is past any model this runs).
CTX = click.IntRange(16, 1 << 20)
