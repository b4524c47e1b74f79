"""Parse llama-quantize's per-tensor records (real runs and --dry-run).

A record starts with `[  13/ 207] name - [shape], type = f16, ` and ends with the size
(`size = 2.00 MiB -> 0.82 MiB`, plus `(q6_K)` in dry runs). Other log lines (imatrix
notices, fallback warnings) can be inserted in the middle of a record, so we parse the
whole text by record starts, never line by line.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

RECORD_START = re.compile(r"\[\s*(\d+)/\s*(\d+)\]\s+(\S+)\s+-\s+\[([^\]]*)\],\s+type\s+=\s+(\w+),")
CONVERT = re.compile(r"converting to (\w+)")
DRY_TYPE = re.compile(r"size =\s+[\d.]+ MiB ->\s+[\d.]+ MiB \((\w+)\)")
SIZE_NEW = re.compile(r"size =\s+([\d.]+) MiB(?: ->\s+([\d.]+) MiB)?")
QUANT_SIZE = re.compile(r"quant size\s+=\s+([\d.]+) MiB")
FALLBACKS = re.compile(r"WARNING: (\d+) of (\d+) tensor\(s\) required fallback quantization")


@dataclass(frozen=True)
class TensorRecord:
    index: int
    total: int
    name: str
    source_type: str
    final_type: str
    new_mib: float | None


def parse_records(text: str) -> list[TensorRecord]:
    starts = list(RECORD_START.finditer(text))
    out: list[TensorRecord] = []
    for i, m in enumerate(starts):
        end = starts[i + 1].start() if i + 1 < len(starts) else len(text)
        body = text[m.end():end]
        conv = CONVERT.search(body) or DRY_TYPE.search(body)
        final = conv.group(1) if conv else m.group(5)
        size = SIZE_NEW.search(body)
        new_mib = None
        if size:
            new_mib = float(size.group(2) or size.group(1))
        out.append(TensorRecord(int(m.group(1)), int(m.group(2)), m.group(3), m.group(5), final, new_mib))
    return out


def quant_size_mib(text: str) -> float | None:
    m = QUANT_SIZE.search(text)
    return float(m.group(1)) if m else None


def fallback_count(text: str) -> int:
    m = FALLBACKS.search(text)
    return int(m.group(1)) if m else 0


def progress_of(line: str) -> tuple[int, int, str] | None:
    """(i, N, tensor name) when a log line starts a record — drives progress bars."""
    m = RECORD_START.search(line)
    return (int(m.group(1)), int(m.group(2)), m.group(3)) if m else None
