"""Quality gates checked: does a measured file meet the bounds its profile or config promises?

Takes: bounds (`plan.gates.Gates`, the one definition of the gates, from the eval/compare
options or a profile / release config dict) and either an `EvalResult` or the per-tier summary
dict a release stores.
Gives: the failed gates as lines of text (`gate_failures`, `summary_gate_failures`), and the
GateFailedError (exit 15) that lists them (`check_gates`, `gate_failed`).

Shaped so because eval, compare and the release check the same four bounds; each bound is
one `GateRule` row (its key, the statistic it reads, how it is worded), so a fifth gate is
one more row. The eval and release wordings differ slightly and are kept as they were:
scripts and tests read them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Mapping

from apex_orch.core.errors import GateFailedError
from apex_orch.evaluation.results import EvalResult
from apex_orch.plan.gates import RULES, Gates


def gate_failures(result: EvalResult, gates: Gates) -> list[str]:
    """Human-readable failed gates for one result (empty when it passes)."""
    bounds = gates.bounds()
    if not bounds:
        return []
    name = Path(result.model.path).name
    if result.kld is None:
        return [f"{name}: gates need KL statistics, measured against a base model"]
    out = []
    for rule in RULES:
        if rule.key not in bounds:
            continue
        value, bound = getattr(result.kld, rule.stat), bounds[rule.key]
        if not rule.passes(value, bound):
            op, word = (">", "max") if rule.upper else ("<", "min")
            out.append(f"{name}: {rule.eval_name} {value:.{rule.decimals}f}{rule.unit} {op} {word} "
                       f"{bound:g}{rule.unit}")
    return out


def summary_gate_failures(summary: Mapping[str, Any], gates: Mapping[str, float], label: str) -> list[str]:
    """Failed gates for one release tier, from its stored summary (kld_mean, ppl_ratio,
    same_top_p, kld_p999; a missing number fails its gate) and the merged gate dict."""
    out = []
    for rule in RULES:
        if rule.key not in gates:
            continue
        value = summary.get(rule.summary_field)
        if value is None or not rule.passes(value, gates[rule.key]):
            shown = "n/a" if value is None else f"{value:.6g}"
            out.append(f"{label}: {rule.release_name} {shown} fails {rule.key} {gates[rule.key]:g}")
    return out


def gate_failed(failures: list[str], *, hint: str) -> GateFailedError:
    """The error that lists every failed gate (exit 15)."""
    return GateFailedError("quality gate failed:\n  " + "\n  ".join(failures), hint=hint)


def check_gates(results: EvalResult | Iterable[EvalResult], gates: Gates) -> None:
    """Raise GateFailedError listing every failed threshold with its numbers."""
    items = [results] if isinstance(results, EvalResult) else list(results)
    failures = [f for r in items for f in gate_failures(r, gates)]
    if failures:
        raise gate_failed(failures, hint="the file is worse than the thresholds allow; pick a larger tier "
                                         "or relax the gate")
