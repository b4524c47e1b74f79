"""Small text helpers for human-readable output (sizes, counts, aligned tables)."""

from __future__ import annotations


def gib(n: int | float) -> str:
    return f"{n / 1024 ** 3:.2f} GiB" if n >= 1024 ** 3 else f"{n / 1024 ** 2:.2f} MiB"


def gb(n: int | float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.2f} MB"


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


def md_table(headers: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


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
