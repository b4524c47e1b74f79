"""Quality gates as a profile or a release promises them: which bounds exist and their values.

Takes: a mapping such as a profile's or release config's `gates:` ({max_mean_kld: 0.05, ...})
or the eval/compare options. Gives: `Gates` (the bounds that are set) and `RULES`, one row per
gate: its key, the statistic it bounds, how eval, the release and the CLI word it. A new gate is one
row here (and its field in Gates): eval's and compare's options are made from RULES.

The one definition of the gates. It lives with the profiles (the lowest stage that declares
gates) so plan, evaluation and release all read it without importing upwards; checking a
measurement against it is evaluation.gates.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

from apex_orch.core.errors import ConfigError


@dataclass(frozen=True)
class GateRule:
    key: str               # the config key; the CLI option is --key-with-dashes
    stat: str              # the KLDStats field it bounds
    summary_field: str     # the same number in a release's per-tier summary
    eval_name: str         # how eval / compare name it
    release_name: str      # how the release names it
    upper: bool            # True: a maximum; False: a minimum
    decimals: int          # eval shows the value with this many decimals
    described: str         # what the option's help says it bounds: "Gate: fail if <described> is above this."
    unit: str = ""

    @property
    def option(self) -> str:
        return "--" + self.key.replace("_", "-")

    @property
    def help(self) -> str:
        return f"Gate: fail if {self.described} is {'above' if self.upper else 'below'} this."

    def passes(self, value: float, bound: float) -> bool:
        # Written so that NaN fails both kinds of bound.
        return value <= bound if self.upper else value >= bound


RULES: tuple[GateRule, ...] = (
    GateRule("max_mean_kld", "kld_mean", "kld_mean", "mean KLD", "mean KLD", upper=True, decimals=6,
             described="mean KLD"),
    GateRule("max_ppl_ratio", "mean_ppl_ratio", "ppl_ratio", "PPL(Q)/PPL(base)", "PPL(Q)/PPL(base)",
             upper=True, decimals=6, described="PPL(Q)/PPL(base)"),
    GateRule("min_same_top_p", "same_top_p", "same_top_p", "same top p", "same top p %", upper=False,
             decimals=3, described="'Same top p' (percent)", unit="%"),
    GateRule("max_kld_99_9", "kld_p999", "kld_p999", "KLD 99.9%", "KLD 99.9%", upper=True, decimals=6,
             described="the 99.9th percentile of KLD"),
)
GATE_KEYS: tuple[str, ...] = tuple(rule.key for rule in RULES)


@dataclass(frozen=True)
class Gates:
    """Quality thresholds; None = not checked. same_top_p is in percent like the tool prints."""
    max_mean_kld: float | None = None
    max_ppl_ratio: float | None = None
    min_same_top_p: float | None = None
    max_kld_99_9: float | None = None

    KEYS = GATE_KEYS

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any] | None, *, where: str | None = None) -> "Gates":
        """From a release config / profile dict, e.g. {max_mean_kld: 0.05, max_ppl_ratio: 1.02}: the keys
        and types of the fields below (core.schema, the checker every config uses)."""
        from apex_orch.core.schema import read_section
        gates: Gates = read_section(cls, dict(data or {}), lambda _kp: where, error=ConfigError)
        return gates

    def bounds(self) -> dict[str, float]:
        """The gates that are set, by key."""
        return {key: value for key, value in dataclasses.asdict(self).items() if value is not None}

    @property
    def active(self) -> bool:
        return bool(self.bounds())


# Gates holds one field per row of RULES, in the same order: a gate added to one and not the other
# fails here, at import, not in some later comparison.
if tuple(f.name for f in dataclasses.fields(Gates)) != GATE_KEYS:   # pragma: no cover - a contributor's slip
    raise AssertionError(f"plan.gates: Gates fields {[f.name for f in dataclasses.fields(Gates)]} != RULES {GATE_KEYS}")
