"""Small text helpers for human-readable output (sizes, counts, aligned and Markdown tables).

Every size the project prints goes through one unit ladder (`_scaled`); the named styles below
differ only in their units and decimals, each kept exactly as its output has always read (plan
tables, the model card, the dry run, comparison tables).
"""

from __future__ import annotations

import re

_UNSAFE_IN_NAME = re.compile(r"[^A-Za-z0-9._-]+")

# (divisor, unit, decimals) from the largest unit down. Divisors keep their original int or float
# type so every division rounds exactly as it did when each style was written on its own.
_Ladder = tuple[tuple[float, str, int | None], ...]
_GIB_MIB: _Ladder = ((1024 ** 3, "GiB", 2), (1024 ** 2, "MiB", 2))
_GB_MB: _Ladder = ((1e9, "GB", 2), (1e6, "MB", 2))
_HUB: _Ladder = ((1e9, "GB", 1), (1e6, "MB", 1), (1e3, "KB", 1))
_DISK: _Ladder = ((1e9, "GB", 2), (1e6, "MB", 1))
_BINARY: _Ladder = ((2 ** 30, "GiB", 2), (2 ** 20, "MiB", 2), (2 ** 10, "KiB", 2), (1, "B", None))


def _scaled(n: int | float, ladder: _Ladder) -> str:
    """n in the first unit it reaches; the last unit takes anything smaller. Decimals None: n as is."""
    for div, unit, decimals in ladder:
        if n >= div or div == ladder[-1][0]:
            return f"{n} {unit}" if decimals is None else f"{n / div:.{decimals}f} {unit}"
    raise AssertionError("unreachable: the last unit always matches")


def gib(n: int | float) -> str:
    """Binary units, 2 decimals, MiB at least: '1.50 GiB', '0.25 MiB' (plan and inspect tables)."""
    return _scaled(n, _GIB_MIB)


def gb(n: int | float) -> str:
    """Decimal units, 2 decimals, MB at least: '1.50 GB', '0.25 MB'."""
    return _scaled(n, _GB_MB)


def hub_size(n: int) -> str:
    """Decimal units, 1 decimal, as the Hugging Face Hub shows file sizes: '1.5 GB', '0.3 KB' (the card)."""
    return _scaled(n, _HUB)


def disk_size(n: int) -> str:
    """Decimal units, GB to 2 decimals, MB to 1: '1.50 GB', '12.3 MB' (the release dry run)."""
    return _scaled(n, _DISK)


def binary_size(n: int) -> str:
    """Binary units, 2 decimals, down to bytes: '1.50 GiB', '3.00 KiB', '512 B' (comparison tables)."""
    return _scaled(n, _BINARY)


def human_count(n: int | float) -> str:
    for unit, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(int(n))


def table(headers: list[str], rows: list[list[str]], align: str | None = None) -> str:
    widths = [len(h) for h in headers]
    for row in rows:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))
    align = align or ("l" + "r" * (len(headers) - 1))

    def fmt(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if a == "l" else c.rjust(w) for c, w, a in zip(cells, widths, align)).rstrip()

    out = [fmt(headers), "  ".join("-" * w for w in widths)]
    out += [fmt(r) for r in rows]
    return "\n".join(out)


_SPACE_RE = re.compile(r"\s+")
_CONTROL_RE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def md_inline(text: object) -> str:
    """Text from configs, profiles or a GGUF on one line of Markdown: control characters dropped,
    whitespace (newlines) collapsed so it can neither end the line nor start a heading, list or
    table row, and '<' escaped so it cannot open HTML (a comment would hide the rest of the card)."""
    return _CONTROL_RE.sub("", _SPACE_RE.sub(" ", str(text))).strip().replace("<", "&lt;")


def md_cell(text: object) -> str:
    """md_inline for a table cell: '|' escaped so it cannot split the row."""
    return md_inline(text).replace("|", "\\|")


def md_code(text: object) -> str:
    """md_inline inside a `code span`: a backquote would end it."""
    return md_inline(text).replace("`", "'")


def md_table(headers: list[str], rows: list[list[str]]) -> list[str]:
    """A Markdown table's lines; every cell passes md_cell, the headers are the caller's own text."""
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(md_cell(c) for c in r) + " |" for r in rows]
    return out


def printable(text: object, keep: str = "") -> str:
    """Text from a file, a GGUF header or the command line, safe to print on a terminal: control
    characters (but those in `keep`) shown as escapes (\\x1b, \\n) and undecodable file-name bytes
    as \\xNN, never raw."""
    out = []
    for ch in str(text):
        o = ord(ch)
        if ch in keep:
            out.append(ch)
        elif o < 0x20 or 0x7F <= o <= 0x9F:
            out.append(ch.encode("unicode_escape").decode("ascii"))
        elif 0xDC80 <= o <= 0xDCFF:          # a byte os.fsdecode could not decode
            out.append(f"\\x{o - 0xDC00:02x}")
        elif 0xD800 <= o <= 0xDFFF:
            out.append(f"\\u{o:04x}")
        else:
            out.append(ch)
    return "".join(out)


def file_name_part(text: str, fallback: str = "") -> str:
    """`text` reduced to [A-Za-z0-9._-] (each other run becomes '-', no leading/trailing '-' or
    '.'), so a model or tier name can never steer a path; `fallback` when nothing is left. The
    one sanitizer for names that become parts of file names."""
    return _UNSAFE_IN_NAME.sub("-", text).strip("-.") or fallback
