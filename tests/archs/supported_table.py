"""The README's supported-architectures table, generated from a matrix run's results.

    APEX_ORCH_ARCHS_RESULTS=archs.json make test-archs
    python tests/archs/supported_table.py archs.json      # Markdown on stdout

One row per architecture of tests/archs/archkit.py: the GGUF architecture the pinned converter
wrote, the roles its tensors got, how many built-in profiles planned exactly like
`llama-quantize --dry-run`, whether it ran end to end (quantize + verify + eval), and what became
of the MTP head its checkpoint carries: the files the converter wrote (bundled, the --mtp draft,
the --no-mtp base), plan = dry-run on each, and the MTP end-to-end run (test_mtp_matrix.py).
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
    rows = ["| architecture | HF class | GGUF arch | roles | plan = dry-run | end to end | MTP head |",
            "|---|---|---|---|---|---|---|"]
    for spec in archkit.ARCHS:
        r = results.get(spec.id)
        if r is None or "gguf_arch" not in r:
            rows.append(f"| {spec.family} | `{spec.hf_class}` | — (not converted) | | | | |")
            continue
        roles = ", ".join(x for x in (ROLE_SHORT.get(role, role) for role in r.get("roles", [])) if x)
        planned = r.get("profiles_planned")
        plan = "—" if planned is None else (f"all {len(planned)}" if len(planned) == n_profiles
                                            else f"{len(planned)}/{n_profiles}")
        e2e = ", ".join(r.get("end_to_end", [])) or ("—" if not spec.e2e else "failed")
        if r.get("mmproj"):
            e2e += f"; projector ({r['mmproj']['projector']}) by --mmproj"
        note = f" ({spec.notes})" if spec.notes else ""
        rows.append(f"| {spec.family}{note} | `{spec.hf_class}` | `{r['gguf_arch']}` | {roles} | {plan} | {e2e} | "
                    f"{mtp_cell(spec, results, n_profiles)} |")
    for spec, reason in archkit.NOT_YET:
        rows.append(f"| {spec.family} | `{spec.hf_class}` | not yet: {reason} | | | | |")
    return "\n".join(rows) + "\n"


def mtp_cell(spec, results: dict, n_profiles: int) -> str:
    """"—" without a head; else the files the converter wrote, plan = dry-run on each, and how far
    the MTP end-to-end run got (a llama.cpp limit in words where it stopped short)."""
    mtp = results.get(spec.id, {}).get("mtp")
    if not spec.mtp:
        return "—"
    if mtp is None:
        return "not run"
    files = mtp["files"]
    if files == ["dropped by the converter"]:
        return "dropped by the converter"
    planned = [len(results.get(spec.id if f == "bundled" else f"{spec.id}/{f}", {}).get("profiles_planned", []))
               for f in files]
    plan = (f"all {n_profiles}" + (" each" if len(files) > 1 else "") if all(n == n_profiles for n in planned)
            else "/".join(map(str, planned)))
    cell = f"{', '.join(files)}: {plan}"
    if "mtp-refused" in spec.mtp_files:
        cell += " (--mtp/--no-mtp refused)"
    done = results.get(spec.id, {}).get("mtp_end_to_end", [])
    steps = {"quantize+verify": "compact + verify", "eval": "eval", "speculate": "llama.cpp drafts, same tokens"}
    cell += "; " + (", ".join(steps[d] for d in done) if done else "end to end not run")
    runtime = mtp.get("runtime", "")
    if runtime == "runs":
        cell += " (llama.cpp loads the head but has no MTP graph for it)"
    elif runtime and runtime != "drafts":
        cell += f" (the tiny model {runtime})"
    return cell


if __name__ == "__main__":
    print(table(json.loads(Path(sys.argv[1]).read_text())), end="")
