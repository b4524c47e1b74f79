"""Baselines beside the files they are measured against: which file a baseline beats, said plainly.

Takes: points (a name, the file's bytes, its mean KLD against the source and that mean's error
estimate, whether it is a baseline). Gives `closer_baselines`: for each file that is not a
baseline, the baseline no larger than it whose mean KLD is lower beyond the error estimates (the
closest such one), and `closer_sentence`, the sentence `compare` and the model card print for it.

"Beyond the error estimate": the two ranges mean ± error (llama-perplexity's "Mean KLD ± error",
the standard error of the mean over the scored tokens) do not overlap, i.e.
`kld_baseline + err_baseline < kld_file - err_file`. Both are measured on the same tokens, so
their errors are positively correlated and the error of the difference is smaller than either
range suggests: a baseline named here is closer to the source by a clear margin, and a baseline
that is closer by less is not named.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence


@dataclass(frozen=True)
class Point:
    name: str
    size: int                    # bytes of the file (all parts)
    kld: float | None            # mean KLD against the source; None: not measured
    kld_err: float | None        # its error estimate
    baseline: bool


def beats(b: Point, t: Point) -> bool:
    """`b` is no larger than `t` and closer to the source beyond both error estimates."""
    if b.kld is None or t.kld is None or b.size > t.size:
        return False
    return b.kld + (b.kld_err or 0.0) < t.kld - (t.kld_err or 0.0)


def closer_baselines(points: Sequence[Point]) -> list[tuple[Point, Point]]:
    """(file, baseline) for every non-baseline file some baseline beats: the baseline with the lowest
    mean KLD among those, in the order the files are given."""
    baselines = [p for p in points if p.baseline]
    out = []
    for t in points:
        if t.baseline:
            continue
        better = [b for b in baselines if beats(b, t)]
        if better:
            out.append((t, min(better, key=lambda b: (b.kld, b.size, b.name))))
    return out


def closer_sentence(t: Point, b: Point, size: Callable[[int], str]) -> str:
    """"Q4_K_M is smaller and closer to the source than Compact: mean KLD ... at ... against ... at ..."."""
    smaller = "smaller" if b.size < t.size else "no larger"
    return (f"{b.name} is {smaller} and closer to the source than {t.name}: mean KLD {b.kld:.6f} ± "
            f"{b.kld_err or 0.0:.6f} at {size(b.size)}, against {t.kld:.6f} ± {t.kld_err or 0.0:.6f} at "
            f"{size(t.size)}.")
