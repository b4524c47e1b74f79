"""A sensitivity result: how far each group alone moves the model's output at each type.

The JSON `apex-orch sensitivity` writes (and caches) and `apex-orch fit` reads. It is checked like a
manifest wherever it is read back (the cache entry, an `-o` file given to `fit --sensitivity`,
`sensitivity --calibration` or a release `fit:` tier): it carries `self_sha256` over its own
content (an edited or truncated file is detected), its structure is checked (a ladder of known
types, unique groups, a measurement of every group at every type) and its values too (finite,
non-negative KLDs and proxy values). A file that fails is a ResultFileError (exit 19) naming
what is wrong; a damaged cache entry is discarded and measured again (fit.sensitivity).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

from apex_orch.model.gguf_tables import GGMLQuantizationType as T

from apex_orch.core.errors import ResultFileError
from apex_orch.core.infiles import KINDS, read_json
from apex_orch.plan.profiles import TARGET_TYPES

FORMAT = "apex-orch-sensitivity"
FORMAT_VERSION = 2              # 2: self_sha256 over the content
MAX_FILE_BYTES = KINDS["sensitivity"].max_bytes
MAX_GROUPS = 4096
MAX_LADDER = 16
UNUSABLE = (T.F32, T.F16, T.BF16)


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

    @property
    def imatrix_corpus(self) -> str | None:
        """The corpus name the measurement's imatrix was built from; None without one, or when the
        imatrix was given as a file (its text is no corpus a profile can name)."""
        from apex_orch.plan.profile_search import PROFILE_NAME_RE
        corpus = (self.data.get("imatrix") or {}).get("corpus")
        return corpus if isinstance(corpus, str) and PROFILE_NAME_RE.match(corpus) else None

    def has(self, group: str, t: T) -> bool:
        return t.name in self.data["measurements"].get(group, {})

    def has_metric(self, metric: str) -> bool:
        """Every group at every ladder type, and every uniform file, has a finite `metric`."""
        d = self.data
        rows = [d["measurements"][g][t] for g in self.group_keys for t in d["ladder"]]
        return all(_number(r.get(metric)) for r in rows) and all(
            _number(d.get("uniform", {}).get(t, {}).get(metric)) for t in d["ladder"])

    def additivity(self, t: T, metric: str = "kld_mean") -> float | None:
        """Measured / predicted at `t`: `metric` of the uniform file (every group at t at once) over
        the sum of the groups' own effects at t. None without a usable uniform measurement (the proxy
        method, or a zero sum). The sum over-predicts high-bit types (small effects that partly
        cancel) and under-predicts the lowest; fit multiplies each group's effect at t by this."""
        u = self.data.get("uniform", {}).get(t.name)
        if not isinstance(u, dict) or not _number(u.get(metric)):
            return None
        parts = [self.data["measurements"][g][t.name].get(metric) for g in self.group_keys]
        if not all(_number(x) for x in parts) or sum(parts) <= 0:
            return None
        return float(u[metric]) / float(sum(parts))

    def summary(self) -> str:
        d = self.data
        return (f"{d['method']['name']} sensitivity of {d['model']['name']} ({len(d['groups'])} groups x "
                f"{len(d['ladder'])} types, {d['text']['label']}, {d['text']['chunks']} chunks x {d['text']['ctx']}; "
                f"key {d['key'][:12]})")

    def to_json(self) -> str:
        """The result as written: with its format and a fresh self checksum."""
        return json.dumps(stamped(self.data), indent=1, sort_keys=False) + "\n"


def self_sha256(data: dict) -> str:
    body = {k: v for k, v in data.items() if k != "self_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def stamped(data: dict) -> dict:
    """`data` with this format's version and its own checksum (the last key)."""
    out = {k: v for k, v in data.items() if k != "self_sha256"}
    out.setdefault("format", FORMAT)
    out["format_version"] = FORMAT_VERSION
    out["self_sha256"] = self_sha256(out)
    return out


def load_sensitivity(path: str | Path) -> Sensitivity:
    """A result file given by the user: read (core.infiles: regular file, at most 64 MiB, JSON nested
    at most 64 deep) and checked; anything wrong, a missing file included, is a ResultFileError."""
    p = Path(path)
    if not p.exists() and not p.is_symlink():
        raise ResultFileError("sensitivity file not found", where=str(p),
                              hint="measure one first: apex-orch sensitivity MODEL -o sens.json")
    data = read_json(p, "sensitivity", what="a sensitivity result")
    check_sensitivity(data, str(p))
    return Sensitivity(data, p)


def _fail(where: str, message: str, hint: str | None = None) -> ResultFileError:
    return ResultFileError(message, where=where,
                           hint=hint or "measure again with apex-orch sensitivity (a damaged result is never used)")


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _check_value(where: str, what: str, x, *, optional: bool = False) -> None:
    """A KLD or proxy value: a finite number >= 0 (KL divergence and squared errors are never negative)."""
    if x is None and optional:
        return
    if not _number(x):
        raise _fail(where, f"{what} is {x!r}, not a finite number")
    if x < 0:
        raise _fail(where, f"{what} is {x!r}: KL divergence and quantization error are never negative "
                           "(the result was edited or damaged)")


def check_sensitivity(data, where: str) -> None:
    """Raise ResultFileError unless `data` is a whole, unedited sensitivity result of this format."""
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise _fail(where, "not a sensitivity result (no format: apex-orch-sensitivity)",
                    hint="pass the JSON `apex-orch sensitivity -o FILE` wrote")
    if data.get("format_version") != FORMAT_VERSION:
        raise _fail(where, f"sensitivity format {data.get('format_version')!r}; this apex-orch reads "
                           f"{FORMAT_VERSION}", hint="measure again with this version")
    if data.get("self_sha256") != self_sha256(data):
        raise _fail(where, "sensitivity result does not match its own checksum (edited or damaged)")
    for key, kind in (("key", str), ("model", dict), ("ladder", list), ("groups", list), ("measurements", dict),
                      ("method", dict), ("text", dict)):
        if not isinstance(data.get(key), kind):
            raise _fail(where, f"sensitivity result lacks {key!r}" if key not in data else
                        f"sensitivity result's {key!r} is not a {kind.__name__}")
    model, text, method = data["model"], data["text"], data["method"]
    for k, want in (("name", str), ("arch", str), ("blocks", int), ("sha256", str)):
        if not isinstance(model.get(k), want) or isinstance(model.get(k), bool):
            raise _fail(where, f"sensitivity result's model.{k} is missing or not a {want.__name__}")
    if not isinstance(method.get("name"), str) or not isinstance(text.get("label"), str):
        raise _fail(where, "sensitivity result's method.name or text.label is missing")
    for k in ("chunks", "ctx"):
        if not isinstance(text.get(k), int) or isinstance(text.get(k), bool):
            raise _fail(where, f"sensitivity result's text.{k} is missing or not an integer")
    if not isinstance(data.get("imatrix"), (dict, type(None))) or not isinstance(data.get("bands"), (dict, type(None))):
        raise _fail(where, "sensitivity result's imatrix or bands is not a mapping")
    ladder = data["ladder"]
    if not 1 <= len(ladder) <= MAX_LADDER:
        raise _fail(where, f"sensitivity ladder holds {len(ladder)} types; a measurement has 1 to {MAX_LADDER}")
    for name in ladder:
        if not isinstance(name, str) or name not in TARGET_TYPES or TARGET_TYPES[name] in UNUSABLE:
            raise _fail(where, f"sensitivity ladder names an unknown type {name!r}")
    if len(set(ladder)) != len(ladder):
        raise _fail(where, "sensitivity ladder names a type twice")
    groups = data["groups"]
    if not 1 <= len(groups) <= MAX_GROUPS:
        raise _fail(where, f"sensitivity result holds {len(groups)} groups; 1 to {MAX_GROUPS}")
    keys = []
    for i, g in enumerate(groups):
        if not isinstance(g, dict) or not isinstance(g.get("key"), str) or not g["key"]:
            raise _fail(where, f"sensitivity result's groups[{i}] has no key")
        if "role" in g and not isinstance(g["role"], str):
            raise _fail(where, f"sensitivity result's group {g['key']!r} has a role that is not a string")
        keys.append(g["key"])
    if len(set(keys)) != len(keys):
        raise _fail(where, "sensitivity result names a group twice")
    unknown = sorted(set(data["measurements"]) - set(keys))
    if unknown:
        raise _fail(where, f"sensitivity result measures group(s) it does not list: {', '.join(unknown[:5])}")
    for g in keys:
        row = data["measurements"].get(g)
        if not isinstance(row, dict):
            raise _fail(where, f"sensitivity result has no measurements for group {g!r}")
        for name in ladder:
            m = row.get(name)
            if not isinstance(m, dict) or "kld_mean" not in m:
                raise _fail(where, f"sensitivity result lacks {g} at {name} (an interrupted measurement?)",
                            hint="rerun apex-orch sensitivity: it resumes where it stopped")
            _check_value(where, f"{g} at {name}: kld_mean", m["kld_mean"])
            _check_value(where, f"{g} at {name}: kld_p999", m.get("kld_p999"), optional=True)
    proxy = data.get("proxy")
    if proxy is not None:
        if not isinstance(proxy, dict) or not set(proxy) <= set(keys):
            raise _fail(where, "sensitivity result's proxy values do not match its groups")
        for g, by_type in proxy.items():
            if not isinstance(by_type, dict):
                raise _fail(where, f"sensitivity result's proxy values of {g} are not a mapping")
            for name, v in by_type.items():
                _check_value(where, f"proxy of {g} at {name}", v)
    uniform = data.get("uniform")
    if uniform is not None:
        if not isinstance(uniform, dict):
            raise _fail(where, "sensitivity result's uniform measurements are not a mapping")
        for name, m in uniform.items():
            if not isinstance(m, dict):
                raise _fail(where, f"sensitivity result's uniform measurement at {name} is not a mapping")
            _check_value(where, f"all groups at {name}: kld_mean", m.get("kld_mean"))
            if "sum_of_groups" in m:
                _check_value(where, f"all groups at {name}: sum_of_groups", m["sum_of_groups"])
