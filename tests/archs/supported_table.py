"""The README's supported-architectures table, generated from a matrix run's results.

    APEX_ORCH_ARCHS_RESULTS=archs.json make test-archs
    python tests/archs/supported_table.py archs.json      # Markdown on stdout

One row per architecture of tests/archs/archkit.py: the GGUF architecture the pinned converter
wrote, the roles its tensors got, how many built-in profiles planned exactly like
`llama-quantize --dry-run`, and whether it ran end to end (quantize + verify + eval).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import archkit  # noqa: E402

ROLE_SHORT = {"routed_expert": "experts", "shared_expert": "shared", "dense_ffn": "dense", "attention": "attn",
              "ssm": "ssm", "nextn": "nextn", "embedding": None, "output": None, "router": None, "norm": None,
              "aux": None, "unassigned": "UNASSIGNED"}


def table(results: dict) -> str:
    n_profiles = max((len(r.get("profiles_planned", [])) for k, r in results.items() if not k.startswith("_")),
                     default=0)
    rows = ["| architecture | HF class | GGUF arch | roles | plan = dry-run | end to end |",
            "|---|---|---|---|---|---|"]
    for spec in archkit.ARCHS:
        r = results.get(spec.id)
        if r is None or "gguf_arch" not in r:
            rows.append(f"| {spec.family} | `{spec.hf_class}` | — (not converted) | | | |")
            continue
        roles = ", ".join(x for x in (ROLE_SHORT.get(role, role) for role in r.get("roles", [])) if x)
        planned = r.get("profiles_planned")
        plan = "—" if planned is None else (f"all {len(planned)}" if len(planned) == n_profiles
                                            else f"{len(planned)}/{n_profiles}")
        e2e = ", ".join(r.get("end_to_end", [])) or ("—" if not spec.e2e else "failed")
        if r.get("mmproj"):
            e2e += f"; projector ({r['mmproj']['projector']}) by --mmproj"
        note = f" ({spec.notes})" if spec.notes else ""
        rows.append(f"| {spec.family}{note} | `{spec.hf_class}` | `{r['gguf_arch']}` | {roles} | {plan} | {e2e} |")
    for spec, reason in archkit.NOT_YET:
        rows.append(f"| {spec.family} | `{spec.hf_class}` | not yet: {reason} | | | |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    print(table(json.loads(Path(sys.argv[1]).read_text())), end="")
