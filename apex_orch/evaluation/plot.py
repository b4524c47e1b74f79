"""Mean KLD against file size: the one plot `compare --plot` and a release card show.

Takes: points (a label, the file's bytes, its mean KLD, whether it is a baseline), the source's
size and name. Gives `kld_size_plot(...) -> bytes`: both axes on log scales, APEX files and
baselines with different markers, the Pareto front of all of them joined (files no other file beats
on both size and KLD), the source's size as a vertical line. matplotlib (the `plot` extra), Agg,
rendered in memory; no date or software version is written into the file, so the same points give
the same bytes (a release's rerun does not rewrite it).
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import Sequence

from apex_orch.core.errors import EvalError, ToolNotFoundError

FORMATS = ("png", "svg", "pdf")
# What each backend would otherwise stamp into the file (a date, its version): left out.
_NO_STAMPS = {"png": {"Software": None}, "svg": {"Date": None, "Creator": None},
              "pdf": {"CreationDate": None, "Creator": None, "Producer": None}}


@dataclass(frozen=True)
class PlotPoint:
    label: str
    size: int            # bytes
    kld: float           # mean KLD against the source
    baseline: bool = False


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of points no other point beats on both axes (smaller size and smaller KLD)."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], points[i][1]))
    front, best = [], math.inf
    for i in order:
        if points[i][1] < best:
            front.append(i)
            best = points[i][1]
    return front


def matplotlib_available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def kld_size_plot(points: Sequence[PlotPoint], *, base_size: int, base_label: str, title: str,
                  fmt: str = "png") -> bytes:
    """The plot as `fmt` bytes. Points with a mean KLD of 0 or less cannot sit on a log scale: left out
    (an EvalError when none is left)."""
    if fmt not in FORMATS:
        raise EvalError(f"unknown plot format {fmt!r}; one of {', '.join(FORMATS)}")
    try:
        import matplotlib
    except ImportError as exc:
        raise ToolNotFoundError(f"matplotlib is not installed ({exc})",
                                hint="install the plot extra: pip install 'apex-orch[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import ScalarFormatter

    pts = [p for p in points if p.kld > 0]
    if not pts:
        raise EvalError("nothing to plot: no file has a positive mean KLD")
    unit, div = ("GiB", 2**30) if base_size >= 2**30 else ("MiB", 2**20)
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    try:
        for baseline, marker, label in ((False, "o", "APEX"), (True, "s", "baseline")):
            group = [p for p in pts if p.baseline == baseline]
            if group:
                ax.scatter([p.size / div for p in group], [p.kld for p in group], marker=marker, zorder=3,
                           label=label if any(p.baseline for p in pts) else None)
        for p in pts:
            ax.annotate(p.label, (p.size / div, p.kld), textcoords="offset points", xytext=(5, 4), fontsize=8)
        front = sorted(pareto_front([(p.size, p.kld) for p in pts]), key=lambda i: pts[i].size)
        ax.plot([pts[i].size / div for i in front], [pts[i].kld for i in front], "--", color="tab:orange",
                label="Pareto front")
        ax.axvline(base_size / div, color="gray", linestyle=":", label=f"source ({base_label})")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(ScalarFormatter())
        ax.set_xlabel(f"file size ({unit})")
        ax.set_ylabel("mean KL divergence vs source (nats)")
        ax.set_title(title, fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format=fmt, metadata=_NO_STAMPS[fmt])
        return buf.getvalue()
    finally:
        plt.close(fig)
