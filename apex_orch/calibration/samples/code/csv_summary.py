#!/usr/bin/env python3
"""Summarise a CSV file: column types, missing values, and basic statistics.

Usage:
    csv_summary.py data.csv [--delimiter ';'] [--top 5] [--json]

Numbers are detected per column: a column is numeric when every non-empty
value parses as a float. Text columns report their most common values.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
import sys
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path


@dataclass
class ColumnSummary:
    name: str
    kind: str = "empty"
    count: int = 0
    missing: int = 0
    unique: int = 0
    mean: float | None = None
    stdev: float | None = None
    minimum: float | None = None
    median: float | None = None
    maximum: float | None = None
    top: list[tuple[str, int]] = field(default_factory=list)


MISSING = {"", "na", "n/a", "null", "none", "-"}


def parse_number(text: str) -> float | None:
    cleaned = text.strip().replace(",", "")
    if cleaned.endswith("%"):
        cleaned = cleaned[:-1]
    try:
        value = float(cleaned)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def summarise_column(name: str, values: list[str], top: int) -> ColumnSummary:
    present = [v for v in values if v.strip().lower() not in MISSING]
    summary = ColumnSummary(name=name, count=len(present), missing=len(values) - len(present),
                            unique=len(set(present)))
    if not present:
        return summary
    numbers = [parse_number(v) for v in present]
    if all(n is not None for n in numbers):
        nums = [n for n in numbers if n is not None]
        summary.kind = "number"
        summary.mean = statistics.fmean(nums)
        summary.stdev = statistics.stdev(nums) if len(nums) > 1 else 0.0
        summary.minimum, summary.maximum = min(nums), max(nums)
        summary.median = statistics.median(nums)
    else:
        summary.kind = "text"
        summary.top = Counter(v.strip() for v in present).most_common(top)
    return summary


def read_rows(path: Path, delimiter: str | None) -> tuple[list[str], list[list[str]]]:
    with path.open(newline="", encoding="utf-8-sig") as fh:
        sample = fh.read(64 * 1024)
        fh.seek(0)
        if delimiter is None:
            try:
                delimiter = csv.Sniffer().sniff(sample, delimiters=",;\t|").delimiter
            except csv.Error:
                delimiter = ","
        reader = csv.reader(fh, delimiter=delimiter)
        header = next(reader, None)
        if header is None:
            raise SystemExit(f"{path}: empty file")
        rows = []
        for line_no, row in enumerate(reader, start=2):
            if len(row) != len(header):
                print(f"warning: {path}:{line_no}: expected {len(header)} fields, got {len(row)}",
                      file=sys.stderr)
                row = (row + [""] * len(header))[: len(header)]
            rows.append(row)
    return header, rows


def format_table(summaries: list[ColumnSummary]) -> str:
    lines = [f"{'column':<20} {'type':<7} {'count':>7} {'missing':>8} {'unique':>7}  details"]
    for s in summaries:
        if s.kind == "number":
            details = (f"mean={s.mean:.4g} sd={s.stdev:.4g} min={s.minimum:.4g} "
                       f"median={s.median:.4g} max={s.maximum:.4g}")
        elif s.kind == "text":
            details = ", ".join(f"{value!r} x{n}" for value, n in s.top)
        else:
            details = "(no values)"
        lines.append(f"{s.name[:20]:<20} {s.kind:<7} {s.count:>7} {s.missing:>8} {s.unique:>7}  {details}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", type=Path)
    parser.add_argument("--delimiter", default=None, help="field separator (default: detect)")
    parser.add_argument("--top", type=int, default=3, help="most common values to show for text columns")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)

    header, rows = read_rows(args.path, args.delimiter)
    columns = list(zip(*rows)) if rows else [()] * len(header)
    summaries = [summarise_column(name, list(col), args.top) for name, col in zip(header, columns)]
    if args.json:
        json.dump({"rows": len(rows), "columns": [asdict(s) for s in summaries]}, sys.stdout, indent=2)
        print()
    else:
        print(f"{args.path}: {len(rows)} rows, {len(header)} columns\n")
        print(format_table(summaries))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
