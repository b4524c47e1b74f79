"""The one size grammar: every option and YAML key that takes a size reads it here.

A size is a number (`48`, `45.2`, `48e9`) with an optional unit, case-insensitive, spaces allowed
between the two:

- `K`, `M`, `G`, `T` and `KB`, `MB`, `GB`, `TB` are decimal: powers of 1000. `48G` = `48GB` =
  `48e9` = 48,000,000,000 bytes. This is what llama-gguf-split's `--split-max-size 48G` means and
  how the Hugging Face Hub lists file sizes, so a release split at `48G` gives files the Hub shows
  as 48.0 GB at most.
- `KiB`, `MiB`, `GiB`, `TiB` are binary: powers of 1024. `45GiB` = 48,318,382,080 bytes.
- `B`, or no unit: bytes. `48` is 48 bytes (a bound below then says so).

`parse_size` gives whole bytes or raises SizeError, whose message says what is wrong with the text
and never where it came from: the caller names that (the CLI's option, through its parameter type;
a YAML reader's `file:line: key`).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

UNITS: dict[str, int] = {
    "": 1, "B": 1,
    "K": 1000, "KB": 1000, "M": 1000 ** 2, "MB": 1000 ** 2, "G": 1000 ** 3, "GB": 1000 ** 3,
    "T": 1000 ** 4, "TB": 1000 ** 4,
    "KIB": 1024, "MIB": 1024 ** 2, "GIB": 1024 ** 3, "TIB": 1024 ** 4,
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?(?:e\+?\d+)?)\s*([KMGT]i?B|[KMGT]|B)?\s*$", re.I)

MB = 1000 ** 2
MAX_SIZE = 1000 ** 5              # 1000 TB: anything larger is a typo
EXAMPLES = "48G, 48GB, 45GiB, 48e9 or 500M"
GRAMMAR = ("K/M/G/T and KB/MB/GB/TB are powers of 1000, KiB/MiB/GiB/TiB powers of 1024, "
           "a plain number is bytes")


class SizeError(ValueError):
    """A size that does not parse or is out of bounds; the caller says where it came from."""


@dataclass(frozen=True)
class Size:
    """A size as written (shown back to the user) and its bytes (what the code uses)."""
    text: str
    bytes: int

    def __str__(self) -> str:
        return self.text


def parse_size(text: object, *, minimum: int = 1, maximum: int = MAX_SIZE) -> int:
    """`text` (a str, or an int/float read from YAML) in whole bytes, within [minimum, maximum]."""
    if isinstance(text, bool) or not isinstance(text, (str, int, float)):
        raise SizeError(f"expected a size such as {EXAMPLES}, got {text!r}")
    shown = str(text).strip()
    m = _SIZE_RE.match(shown)
    if not m:
        raise SizeError(f"{shown!r} is not a size such as {EXAMPLES} ({GRAMMAR})")
    value = float(m.group(1)) * UNITS[(m.group(2) or "").upper()]
    if not math.isfinite(value) or value > maximum:
        raise SizeError(f"{shown} is too large: at most {describe_bytes(maximum)}")
    if value < minimum:
        plain = "" if m.group(2) else f" (a plain number is bytes: write {shown}G or {shown}GB for gigabytes)"
        raise SizeError(f"{shown} is too small: at least {describe_bytes(minimum)}{plain}")
    return int(value)


def read_size(text: object, *, minimum: int = 1, maximum: int = MAX_SIZE) -> Size:
    """parse_size, keeping the text as written (for messages and dry runs)."""
    return Size(str(text).strip(), parse_size(text, minimum=minimum, maximum=maximum))


def describe_bytes(n: int) -> str:
    """A bound in the grammar's own decimal units: '1 MB', '1000 TB', '1,234 bytes'."""
    for unit in ("TB", "GB", "MB", "KB"):
        if n >= UNITS[unit] and n % UNITS[unit] == 0:
            return f"{n // UNITS[unit]:,} {unit}"
    return f"{n:,} bytes"
