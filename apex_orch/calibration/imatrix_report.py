"""What `imatrix-report` shows: an imatrix's chunks, coverage and tokens per expert.

Takes an ImatrixInfo (imatrix_file.read_imatrix) and, optionally, the model it is for and a
quantization plan; gives the report as plain data (build_report: also the --json output),
the problems that make the command exit non-zero (report_problems), and its text
(format_report). Nothing is read or checked here that imatrix_file does not decide.
"""

from __future__ import annotations

import statistics
from typing import Any

from apex_orch.calibration.imatrix_file import (MAX_LISTED, MTP_NOT_COLLECTED, ImatrixInfo, check_plan_coverage,
                                                expected_tensors, fit_problems, mtp_tensors)
from apex_orch.model.info import ModelInfo, block_of
from apex_orch.plan.planner import Plan


def _natural(name: str) -> tuple:
    """Sort key: block tensors by block number, then the rest by name."""
    block = block_of(name)
    return (block is None, block or 0, name)


def build_report(info: ImatrixInfo, model_info: ModelInfo | None = None, plan: Plan | None = None,
                 profile_name: str | None = None) -> dict:
    """Everything `imatrix-report` shows, as plain data (also the --json output)."""
    report: dict[str, Any] = {
        "file": str(info.path),
        "chunks": info.chunk_count,
        "chunk_size": info.chunk_size,
        "datasets": list(info.datasets),
        "entries": len(info.entries),
        "tensors": {name: {"ne0": e.ne0, "n_mat": e.n_mat, "counts": list(e.counts)}
                    for name, e in info.entries.items()},
    }
    experts: dict[str, dict] = {}
    for name, e in sorted(info.entries.items(), key=lambda kv: _natural(kv[0])):
        if "_exps" not in name:
            continue
        block = block_of(name)
        key = f"blk.{block}" if block is not None else name
        if key in experts and experts[key]["counts"] == list(e.counts):
            experts[key]["tensors"].append(name)
            continue
        if key in experts:  # tensors of one layer disagree: keep them apart
            key = name
        experts[key] = {"tensors": [name], "counts": list(e.counts), "never_routed": e.zero}
    # a group sorts by its first tensor ("blk.12" after "blk.2", a split-off tensor after its layer's group)
    experts = dict(sorted(experts.items(), key=lambda kv: _natural(kv[1]["tensors"][0])))
    report["experts"] = experts
    report["experts_never_routed"] = {k: v["never_routed"] for k, v in experts.items() if v["never_routed"]}
    report["entries_without_data"] = sorted((n for n, e in info.entries.items() if not e.has_data), key=_natural)

    if model_info is not None:
        expected = [t.name for t in expected_tensors(model_info)]
        covered = [n for n in expected if n in info.entries and info.entries[n].has_data]
        report["model"] = {
            "name": model_info.name,
            "arch": model_info.arch,
            "expert_count": model_info.expert_count,
            "expected": len(expected),
            "covered": len(covered),
            "missing": [n for n in expected if n not in info.entries or not info.entries[n].has_data],
            "not_expected": sorted((n for n in info.entries if n not in set(expected)), key=_natural),
            "mismatches": fit_problems(info, model_info),
        }
        mtp = [t.name for t in mtp_tensors(model_info)]
        if mtp:   # never expected: llama-imatrix does not run the MTP layers
            report["model"]["mtp"] = {
                "tensors": len(mtp), "covered": sum(1 for n in mtp if n in info.entries and info.entries[n].has_data),
                "why": MTP_NOT_COLLECTED}
    if plan is not None:
        needing = [p.name for p in plan.tensors if p.requires_imatrix]
        report["profile"] = {
            "name": profile_name,
            "low_bit_tensors": len(needing),
            "lacking_data": check_plan_coverage(info, plan),
        }
    return report


def report_problems(report: dict) -> list[str]:
    """What makes `imatrix-report` exit non-zero: a misfit, or planned low-bit tensors without data."""
    out = []
    model = report.get("model")
    if model and model["mismatches"]:
        out.append(f"{len(model['mismatches'])} imatrix entries do not fit the model "
                   f"(first: {model['mismatches'][0]})")
    prof = report.get("profile")
    if prof and prof["lacking_data"]:
        out.append(f"{len(prof['lacking_data'])} planned low-bit tensors lack imatrix data "
                   f"(first: {prof['lacking_data'][0]})")
    return out


def _names(names: list[str], limit: int = MAX_LISTED) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def format_report(report: dict) -> str:
    lines = [f"imatrix: {report['file']}",
             f"  chunks: {report['chunks']} x {report['chunk_size']} tokens",
             f"  datasets: {', '.join(report['datasets']) or '(none recorded)'}",
             f"  entries: {report['entries']} tensors"]
    if report["entries_without_data"]:
        lines.append(f"  entries with no data at all ({len(report['entries_without_data'])}): "
                     f"{_names(report['entries_without_data'])}")
    experts = report["experts"]
    if experts:
        lines.append("  tokens per routed expert:")
        for key, v in experts.items():
            counts = v["counts"]
            never = v["never_routed"]
            lines.append(f"    {key:<10} min {min(counts)}  median {statistics.median(counts):g}  "
                         f"max {max(counts)}  never routed: {never if never else 'none'}")
        never_total = sum(len(v) for v in report["experts_never_routed"].values())
        lines.append(f"  experts never routed to: {never_total}"
                     + (" (their rows are quantized without importance data)" if never_total else ""))
    model = report.get("model")
    if model:
        lines.append(f"  model: {model['name']} ({model['arch']}): {model['covered']} of "
                     f"{model['expected']} expected tensors have data")
        if model["missing"]:
            lines.append(f"  missing data ({len(model['missing'])}): {_names(model['missing'])}")
        if model["not_expected"]:
            lines.append(f"  entries beyond the expected set ({len(model['not_expected'])}): "
                         f"{_names(model['not_expected'])}")
        mtp = model.get("mtp")
        if mtp:
            lines.append(f"  MTP head: {mtp['covered']} of {mtp['tensors']} tensors have data ({mtp['why']}); "
                         "they need types that use none (types.nextn: Q8_0 by default)")
        if model["mismatches"]:
            lines.append(f"  DOES NOT FIT the model ({len(model['mismatches'])} entries):")
            lines.extend(f"    {m}" for m in model["mismatches"][:MAX_LISTED])
    prof = report.get("profile")
    if prof:
        label = prof["name"] or "profile"
        if prof["lacking_data"]:
            lines.append(f"  {label}: {len(prof['lacking_data'])} of {prof['low_bit_tensors']} planned "
                         f"IQ1/IQ2/IQ3_XXS tensors lack data: {_names(prof['lacking_data'])}")
        else:
            lines.append(f"  {label}: all {prof['low_bit_tensors']} planned IQ1/IQ2/IQ3_XXS tensors have data")
    return "\n".join(lines)
