"""Text rendering of a Plan (what `apex-orch plan` prints)."""

from __future__ import annotations

from apex_orch.core.text import gb, gib, human_count, table
from apex_orch.model.roles import ROLE_ORDER
from apex_orch.plan.planner import Plan


def format_plan(plan: Plan, *, show_tensors: bool = False) -> str:
    m, p, b = plan.model, plan.profile, plan.bands
    lines = [
        f"model    {m.name} [{m.arch}], {m.block_count} blocks, {m.expert_count} experts "
        f"({m.expert_used_count} used, {m.expert_shared_count} shared), attention {m.attention_kind}",
        f"profile  {p.name} -> tier {p.tier}, base {plan.ftype}, "
        f"imatrix {'yes' if plan.has_imatrix else 'no'}{' (required)' if p.imatrix_required else ''}",
        f"bands    {b.describe()}",
        "",
    ]
    table_data = plan.band_table()
    bands_cols = ("edge", "near", "middle", "rest")
    rows = []
    for role in ROLE_ORDER:
        if role not in table_data:
            continue
        cells = [", ".join(sorted(table_data[role].get(c, set()))) or "" for c in bands_cols]
        rows.append([role] + cells)
    if rows:
        lines.append(table(["role \\ band", *bands_cols], rows, align="lllll"))
        lines.append("")
    summary = plan.role_summary()
    rows = []
    for role in ROLE_ORDER:
        if role not in summary:
            continue
        s = summary[role]
        types = ", ".join(f"{t} x{n}" for t, n in sorted(s["types"].items()))
        rows.append([role, str(s["tensors"]), human_count(s["params"]), gib(s["bytes"]), types])
    lines.append(table(["role", "tensors", "params", "size", "types"], rows, align="lrrrl"))
    lines.append("")
    fb = plan.fallback_summary()
    if fb:
        lines.append(f"fallbacks ({len(plan.fallbacks)} tensors; row length not a multiple of the type's block):")
        for g in fb:
            sample = ", ".join(g["tensors"][:3]) + (" ..." if len(g["tensors"]) > 3 else "")
            lines.append(f"  {g['from']} -> {g['to']}: {g['count']} tensors, {gib(g['bytes'])} ({sample})")
        lines.append("")
    need = plan.needs_imatrix
    if need:
        lines.append(f"imatrix data required for {len(need)} tensors (IQ1/IQ2/IQ3_XXS types)")
    size = plan.predicted_file_size()
    lines.append(f"total    {gib(plan.total_bytes)} tensor data ({plan.total_bytes:,} bytes), "
                 f"file ~{gib(size)} / {gb(size)}, {plan.bpw:.3f} bits per weight, {len(plan.rules)} override rules")
    for w in plan.warnings:
        lines.append(f"warning: {w}")
    if show_tensors:
        lines.append("")
        rows = [[t.name, t.role.value, t.band or "-", t.source_type.name,
                 t.requested.name if t.requested else "-", t.final_type.name + (" (fallback)" if t.fell_back else ""),
                 gib(t.n_bytes), t.reason] for t in plan.tensors]
        lines.append(table(["tensor", "role", "band", "source", "requested", "final", "size", "reason"], rows,
                           align="llllllrl"))
    return "\n".join(lines)
