"""Cross-check the plan against the llama-quantize that will run, before it writes anything.

apex-orch predicts every tensor's type with a port of the pinned llama.cpp's rules
(plan/llama_rules.py). A user's own build (CUDA, Metal, a newer release) may assign types
differently; without this check that is found only after a long quantization, by the
verification. So every quantize first runs the tool's own `--dry-run` with the rendered
rules (header only, ~60 ms on the 119B header) and compares it with the plan tensor by
tensor. Different: stop with the differences, unless the user opted in to taking the
tool's types as the plan (`--trust-tool-plan`); verification, manifest and card then use
them and say so.
"""

from __future__ import annotations

import dataclasses
import tempfile
from dataclasses import dataclass
from pathlib import Path

from apex_orch.model.gguf_tables import GGMLQuantizationType as T

from apex_orch.core.errors import ToolFailedError, ToolPlanMismatchError
from apex_orch.core.infiles import read_input
from apex_orch.llama.quantlog import parse_records
from apex_orch.llama.tools import run_tool
from apex_orch.model.gguf_header import tensor_nbytes
from apex_orch.plan.planner import Plan

TOOL_TYPES_SOURCE = "llama-quantize --dry-run"


@dataclass(frozen=True)
class TypeDifference:
    tensor: str
    planned: str
    tool: str

    def __str__(self) -> str:
        return f"{self.tensor}: planned {self.planned}, the tool's dry-run {self.tool}"


def tool_dry_run_types(dry_argv: list[str], out_placeholder: Path) -> dict[str, str]:
    """Run a llama-quantize --dry-run command line (QuantizeJob.argv(..., dry_run=True)) whose output
    would be `out_placeholder`; tensor -> type name."""
    with tempfile.TemporaryDirectory(prefix="apex-orch-dry-run-") as tmp:
        log = Path(tmp) / "dry-run.log"
        run_tool(dry_argv, log_path=log, what="llama-quantize --dry-run")
        text = read_input(log, "record").decode("utf-8", errors="replace")
    if out_placeholder.exists():  # a dry run must never write; if this one did, nothing downstream is safe
        raise ToolFailedError(f"llama-quantize --dry-run wrote {out_placeholder}; this build's dry run writes "
                              "files", hint="use the pinned build (`apex-orch build`)")
    records = parse_records(text)
    if not records:
        raise ToolFailedError("llama-quantize --dry-run printed no per-tensor records, so its types cannot "
                              "be compared with the plan", log_tail="\n".join(text.splitlines()[-12:]))
    return {r.name: r.final_type.upper() for r in records}


def compare(plan: Plan, tool_types: dict[str, str]) -> list[TypeDifference]:
    planned = {t.name: t.final_type.name for t in plan.tensors}
    diffs = [TypeDifference(n, planned[n], tool_types.get(n, "(absent)")) for n in planned
             if tool_types.get(n) != planned[n]]
    diffs += [TypeDifference(n, "(absent)", tool_types[n]) for n in tool_types if n not in planned]
    return diffs


def mismatch_error(tool: str, diffs: list[TypeDifference]) -> ToolPlanMismatchError:
    shown = "; ".join(str(d) for d in diffs[:8]) + (f"; ... ({len(diffs) - 8} more)" if len(diffs) > 8 else "")
    return ToolPlanMismatchError(
        f"{tool} would write other types than the plan for {len(diffs)} tensor(s): {shown}",
        hint="this llama.cpp build assigns types differently from the pinned rules apex-orch plans with. "
             "Use the pinned build (`apex-orch build`, and no other llama.cpp folder or APEX_LLAMA_BIN_DIR), or "
             "take the tool's dry-run as the plan (verification, manifest and card then use its types and say "
             "so)", options=("llama_bin_dir", "trust_tool_plan"))


def plan_with_tool_types(plan: Plan, tool_types: dict[str, str]) -> Plan:
    """The plan with each tensor's final type (and bytes) as the tool's dry-run says."""
    tensors = []
    for t in plan.tensors:
        name = tool_types.get(t.name)
        if name is None:
            raise ToolPlanMismatchError(f"the tool's dry-run has no record of {t.name}, so it cannot be "
                                        "taken as the plan", hint="check the llama.cpp build")
        try:
            final = T[name]
        except KeyError:
            raise ToolPlanMismatchError(f"the tool's dry-run names type {name!r} for {t.name}, which this "
                                        "gguf package does not know", hint="upgrade the gguf package") from None
        if final != t.final_type:
            t = dataclasses.replace(t, final_type=final, n_bytes=tensor_nbytes(final, t.shape),
                                    reason=f"{t.reason}; type from {TOOL_TYPES_SOURCE}")
        tensors.append(t)
    unknown = set(tool_types) - {t.name for t in plan.tensors}
    if unknown:
        raise ToolPlanMismatchError(f"the tool's dry-run lists {len(unknown)} tensor(s) the model header does "
                                    f"not have ({', '.join(sorted(unknown)[:3])})", hint="check the llama.cpp build")
    return dataclasses.replace(plan, tensors=tensors, types_from=TOOL_TYPES_SOURCE)
