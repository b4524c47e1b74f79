"""A sensitivity result: how far each group alone moves the model's output at each type.

The JSON `apex-orch sensitivity` writes (and caches) and `apex-orch fit` reads. Loaded strictly:
a file that is not one, or that lacks a measurement a fit needs, is a clear error, never a guess.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from gguf.constants import GGMLQuantizationType as T

from apex_orch.core.errors import ResultFileError
from apex_orch.plan.profiles import TARGET_TYPES

FORMAT = "apex-orch-sensitivity"
FORMAT_VERSION = 1
MAX_FILE_BYTES = 64 << 20


@dataclass
class Sensitivity:
    data: dict
    path: Path | None = None

    @property
    def ladder(self) -> tuple[T, ...]:
        return tuple(TARGET_TYPES[n] for n in self.data["ladder"])

    @property
    def group_keys(self) -> list[str]:
        return [g["key"] for g in self.data["groups"]]

    @property
    def model_sha256(self) -> str:
        return self.data["model"]["sha256"]

    @property
    def key(self) -> str:
        return self.data["key"]

    def loss(self, group: str, t: T, metric: str = "kld_mean") -> float:
        return float(self.data["measurements"][group][t.name][metric])

    def has(self, group: str, t: T) -> bool:
        return t.name in self.data["measurements"].get(group, {})

    def has_metric(self, metric: str) -> bool:
        """Every group at every ladder type, and every uniform file, has a finite `metric`."""
        d = self.data
        rows = [d["measurements"][g][t] for g in self.group_keys for t in d["ladder"]]
        return all(_finite(r.get(metric)) for r in rows) and all(
            _finite(d.get("uniform", {}).get(t, {}).get(metric)) for t in d["ladder"])

    def additivity(self, t: T, metric: str = "kld_mean") -> float | None:
        """Measured / predicted at `t`: `metric` of the uniform file (every group at t at once) over
        the sum of the groups' own effects at t. None without a usable uniform measurement (the proxy
        method, or a zero sum). The sum over-predicts high-bit types (small effects that partly
        cancel) and under-predicts the lowest; fit multiplies each group's effect at t by this."""
        u = self.data.get("uniform", {}).get(t.name)
        if not isinstance(u, dict) or not _finite(u.get(metric)):
            return None
        parts = [self.data["measurements"][g][t.name].get(metric) for g in self.group_keys]
        if not all(_finite(x) for x in parts) or sum(parts) <= 0:
            return None
        return float(u[metric]) / float(sum(parts))

    def summary(self) -> str:
        d = self.data
        return (f"{d['method']['name']} sensitivity of {d['model']['name']} ({len(d['groups'])} groups x "
                f"{len(d['ladder'])} types, {d['text']['label']}, {d['text']['chunks']} chunks x {d['text']['ctx']}; "
                f"key {d['key'][:12]})")

    def to_json(self) -> str:
        return json.dumps(self.data, indent=1, sort_keys=False) + "\n"


def load_sensitivity(path: str | Path) -> Sensitivity:
    p = Path(path)
    try:
        if p.stat().st_size > MAX_FILE_BYTES:
            raise ResultFileError(f"{p} is over {MAX_FILE_BYTES >> 20} MiB: not a sensitivity result")
        data = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ResultFileError("sensitivity file not found", where=str(p),
                         hint="measure one first: apex-orch sensitivity MODEL -o sens.json") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise ResultFileError(f"not a sensitivity result (not JSON: {exc})", where=str(p)) from None
    check_sensitivity(data, str(p))
    return Sensitivity(data, p)


def check_sensitivity(data, where: str) -> None:
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ResultFileError("not a sensitivity result (no format: apex-orch-sensitivity)", where=where)
    if data.get("format_version") != FORMAT_VERSION:
        raise ResultFileError(f"sensitivity format {data.get('format_version')!r}; this apex-orch reads "
                         f"{FORMAT_VERSION}", where=where, hint="measure again with this version")
    for key in ("key", "model", "ladder", "groups", "measurements", "method", "text"):
        if key not in data:
            raise ResultFileError(f"sensitivity result lacks {key!r}", where=where)
    for name in data["ladder"]:
        if name not in TARGET_TYPES:
            raise ResultFileError(f"sensitivity ladder names an unknown type {name!r}", where=where)
    for g in data["groups"]:
        row = data["measurements"].get(g.get("key"))
        if not isinstance(row, dict):
            raise ResultFileError(f"sensitivity result has no measurements for group {g.get('key')!r}", where=where)
        for name in data["ladder"]:
            m = row.get(name)
            if not isinstance(m, dict) or not _finite(m.get("kld_mean")):
                raise ResultFileError(f"sensitivity result lacks {g['key']} at {name} (an interrupted measurement?)",
                                 where=where, hint="rerun apex-orch sensitivity: it resumes where it stopped")


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
