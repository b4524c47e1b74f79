"""The plan's rendering into llama-quantize's `--tensor-type` rules.

`build_rules(model, requested)` takes the header and the type the profile requests for each
tensor, and gives anchored, escaped rules (`^blk\\.(0|1|35)\\.ffn_down_exps\\.weight$=q4_k`),
after simulating llama-quantize's own matching against every tensor of the model.
`render_args(plan)` / `render_file(plan)` give those rules as command-line arguments or as
the text `--tensor-type-file` reads.

Why a module of its own: the tool matches rules as regular expressions searched in
lower-cased names, first match wins. Getting that exactly right (escaping, anchoring, one
rule per suffix and type, no rule hitting a tensor the plan leaves alone) is separate from
deciding the types, which is planner.py's job; planner.py calls `build_rules` once.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass
from typing import Protocol, Sequence

from apex_orch.model.gguf_tables import GGMLQuantizationType as T

from apex_orch.core.errors import RenderError
from apex_orch.model.info import ModelInfo, split_block_name


@dataclass(frozen=True)
class Rule:
    pattern: str     # what llama-quantize receives (already lowercase, anchored)
    type: T
    tensors: tuple[str, ...]

    def render(self) -> str:
        return f"{self.pattern}={self.type.name.lower()}"


def _escape(text: str) -> str:
    """Escape for an ECMAScript regex that llama-quantize lowercases: only [a-z0-9_] stay bare."""
    return "".join(ch if (ch.isalnum() and ch.islower()) or ch.isdigit() or ch == "_" else "\\" + ch
                   for ch in text)


def build_rules(model: ModelInfo, requested: dict[str, T]) -> list[Rule]:
    """Anchored rules, one per (tensor suffix, type): `^blk\\.(0|1|35)\\.ffn_down_exps\\.weight$`.

    Every rule is a full-name anchor over an explicit set of names, so rules are disjoint:
    no substring hits (attn_q vs attn_q_a), no blk.1 vs blk.1x, no order dependence.
    """
    groups: dict[tuple[str, T], list[int]] = defaultdict(list)
    singles: list[tuple[str, T]] = []
    for name, t in requested.items():
        if name != name.lower():
            raise RenderError(f"tensor {name!r} has upper-case letters; llama-quantize lowercases patterns, "
                              "so no rule can match it exactly", hint="report this model's tensor names")
        in_block = split_block_name(name)
        if in_block:
            block, suffix = in_block
            groups[(suffix, t)].append(block)
        else:
            singles.append((name, t))
    rules: list[Rule] = []
    for name, t in sorted(singles):
        rules.append(Rule(f"^{_escape(name)}$", t, (name,)))
    for (suffix, t), blocks in sorted(groups.items(), key=lambda kv: (kv[0][0], min(kv[1]))):
        blocks = sorted(blocks)
        alt = "|".join(str(b) for b in blocks)
        body = f"({alt})" if len(blocks) > 1 else alt
        rules.append(Rule(f"^blk\\.{body}\\.{_escape(suffix)}$", t, tuple(f"blk.{b}.{suffix}" for b in blocks)))
    check_rules(model, rules, requested)
    return rules


def check_rules(model: ModelInfo, rules: list[Rule], requested: dict[str, T]) -> None:
    """Simulate llama-quantize's matching (lowercase, regex search, first match wins)."""
    compiled = [(re.compile(r.pattern.lower()), r) for r in rules]
    hits: dict[str, int] = defaultdict(int)
    for t in model.tensors:
        first = next((r for rx, r in compiled if rx.search(t.name)), None)
        if first is not None:
            hits[first.pattern] += 1
        want = requested.get(t.name)
        got = first.type if first else None
        if want is not None and got != want:
            raise RenderError(f"rule for {t.name} would give {got.name if got else 'nothing'}, "
                              f"planned {want.name}")
        if want is None and first is not None:
            raise RenderError(f"rule {first.pattern} would also hit {t.name}, which the plan leaves alone")
    for rx, r in compiled:
        if hits[r.pattern] == 0:
            raise RenderError(f"rule {r.pattern} matches no tensor of {model.name}")


class RuledPlan(Protocol):
    """What rendering needs of a plan (planner.Plan): its rules. A protocol, not the class, because
    planner.py imports this module to build those rules."""

    @property
    def rules(self) -> Sequence[Rule]: ...


def render_args(plan: RuledPlan) -> list[str]:
    out: list[str] = []
    for r in plan.rules:
        out += ["--tensor-type", r.render()]
    return out


def render_file(plan: RuledPlan) -> str:
    """The --tensor-type-file form: one PATTERN=TYPE per line (the tool reads whitespace-separated
    tokens and has no comment syntax)."""
    return "".join(r.render() + "\n" for r in plan.rules)
