"""Check what llama-quantize wrote against the Plan, before anything is published.

`verify_output(paths, plan)` reads only the header(s) of the written file (or of its split
parts) and compares every tensor's type and byte count with the plan; a tensor missing, extra
or different, or a torn header, raises VerificationError. It gives the counts and sizes that
go into the manifest.

Header-only on purpose: the tensor bytes follow from type and shape, so comparing them with
the plan catches a dropped rule or a different build without reading the weights again.
"""

from __future__ import annotations

from pathlib import Path

from apex_orch.core.errors import ModelError, VerificationError
from apex_orch.model.gguf_header import read_header
from apex_orch.plan.planner import Plan


def verify_output(paths: list[Path], plan: Plan) -> dict:
    """Compare the written header(s) with the plan: every tensor's type and bytes, file sizes."""
    found: dict[str, tuple] = {}
    for p in paths:
        try:
            hdr = read_header(p)
        except ModelError as exc:   # a torn or garbled file the tool claims to have written
            raise VerificationError(
                f"the file llama-quantize wrote is incomplete or damaged ({exc.message})",
                hint="nothing was published; check free disk space and the log beside the output, "
                     "then rerun") from None
        for t in hdr.tensors:
            found[t.name] = (t.ggml_type, t.n_bytes)
    problems = []
    planned = plan.by_name()
    for name, pt in planned.items():
        got = found.get(name)
        if got is None:
            problems.append(f"{name}: missing from the output")
        elif got[0] != pt.final_type:
            problems.append(f"{name}: planned {pt.final_type.name}, written {got[0].name}")
        elif got[1] != pt.n_bytes:
            problems.append(f"{name}: planned {pt.n_bytes} bytes, written {got[1]}")
    for name in found.keys() - planned.keys():
        problems.append(f"{name}: in the output but not in the plan")
    if problems:
        raise VerificationError(
            f"output does not match the plan ({len(problems)} tensor(s)): " + "; ".join(problems[:8])
            + (" ..." if len(problems) > 8 else ""),
            hint="the file was not published; check the llama-quantize log beside the output")
    return {"tensors": len(found), "tensor_bytes": sum(b for _, b in found.values()),
            "file_bytes": sum(p.stat().st_size for p in paths)}
