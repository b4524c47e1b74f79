"""`profile import`: turn an upstream apex-quant tensor-type file into a YAML profile.

Upstream files are lists of unanchored `PATTERN=TYPE` lines. Rather than parse their
regexes, we run them the way llama-quantize does (lowercased, regex search, first
match wins) over a tensor-name universe — the given model's names, or a canonical
MoE layout with N blocks — and read back which type each (role, slot, block) got.
Bands that came out uniform become `types:`; everything else becomes `overrides:`
with explicit blocks. Lines that hit nothing, lines that only hit tensors by a
substring accident, and invalid lines are reported, never dropped silently.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from apex_orch.core.errors import ProfileError
from apex_orch.core.infiles import KINDS, read_input
from apex_orch.model.info import block_of
from apex_orch.model.roles import Role, classify_name
from apex_orch.plan.llama_rules import allows_quantization
from apex_orch.plan.profiles import BANDED_ROLES, TARGET_TYPES, Bands

CANONICAL_SUFFIXES = (
    "attn_q.weight", "attn_k.weight", "attn_v.weight", "attn_qkv.weight", "attn_output.weight",
    "attn_gate.weight", "attn_q_a.weight", "attn_q_b.weight", "attn_kv_a_mqa.weight", "attn_kv_b.weight",
    "attn_k_b.weight", "attn_v_b.weight", "ffn_gate_exps.weight", "ffn_up_exps.weight",
    "ffn_gate_up_exps.weight", "ffn_down_exps.weight", "ffn_gate_shexp.weight", "ffn_up_shexp.weight",
    "ffn_down_shexp.weight", "ssm_in.weight", "ssm_out.weight", "ffn_gate.weight", "ffn_up.weight",
    "ffn_down.weight",
)


@dataclass
class ImportReport:
    profile: dict[str, Any]
    not_understood: list[str] = field(default_factory=list)
    accidental: list[str] = field(default_factory=list)
    unused: list[str] = field(default_factory=list)


def canonical_names(n_blocks: int) -> list[str]:
    names = ["token_embd.weight", "output.weight"]
    for b in range(n_blocks):
        names += [f"blk.{b}.{s}" for s in CANONICAL_SUFFIXES]
    return names


# Bounds on an imported file: its size, its rules, each pattern's length. Patterns whose
# matching time can grow exponentially with the name ((a+)+, (x|xy)*) are refused: llama-quantize
# would run them too (std::regex), and they would hang both.
MAX_IMPORT_BYTES = KINDS["tensor-types"].max_bytes
MAX_IMPORT_RULES = 1000
MAX_PATTERN_CHARS = 4096


def _nested_repeat(pattern: str) -> str | None:
    """What makes `pattern` a catastrophic-backtracking shape, or None: a repeated group holding
    another repeat or an alternation."""
    try:
        import re._parser as sre_parse  # Python 3.11+
    except ImportError:  # pragma: no cover - Python 3.10
        import sre_parse  # type: ignore[no-redef, unused-ignore]
    repeats = {sre_parse.MAX_REPEAT, sre_parse.MIN_REPEAT}
    if hasattr(sre_parse, "POSSESSIVE_REPEAT"):
        repeats.add(sre_parse.POSSESSIVE_REPEAT)

    def children(op: Any, av: Any) -> list[Any]:
        if op in repeats:
            return [av[2]]
        if op == sre_parse.SUBPATTERN:
            return [av[3]]
        if op == sre_parse.BRANCH:
            return list(av[1])
        if op in (sre_parse.ASSERT, sre_parse.ASSERT_NOT):
            return [av[1]]
        if op == getattr(sre_parse, "ATOMIC_GROUP", None):
            return [av]
        return []

    def inner_risk(sub: Any) -> str | None:
        for op, av in sub:
            if op in repeats and av[1] > 1:
                return "a repeated group that holds another repeat"
            if op == sre_parse.BRANCH:
                return "a repeated group that holds an alternation"
            for child in children(op, av):
                found = inner_risk(child)
                if found:
                    return found
        return None

    def walk(sub: Any) -> str | None:
        for op, av in sub:
            if op in repeats and av[1] > 1:
                found = inner_risk(av[2])
                if found:
                    return found
            for child in children(op, av):
                found = walk(child)
                if found:
                    return found
        return None

    return walk(sre_parse.parse(pattern))


def import_tensor_type_file(path: Path, *, names: list[str] | None = None, n_blocks: int = 36,
                            base_ftype: str = "Q4_K_M", tier: str | None = None) -> ImportReport:
    from apex_orch.core.errors import RequestError
    from apex_orch.model.info import MAX_BLOCKS
    if not 1 <= n_blocks <= MAX_BLOCKS:
        raise RequestError(f"{n_blocks} blocks: give 1 to {MAX_BLOCKS}", fields=("n_blocks",))
    # core.infiles: a regular file (a FIFO never blocks), at most MAX_IMPORT_BYTES
    text = read_input(path, "tensor-types").decode("utf-8", errors="replace")
    rules: list[tuple[int, str, re.Pattern[str], str]] = []
    report = ImportReport(profile={})
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        for token in line.split():  # llama-quantize reads whitespace-separated tokens
            pattern, sep, tname = token.partition("=")
            if not sep or not pattern or not tname:
                report.not_understood.append(f"{path}:{lineno}: {token!r} is not PATTERN=TYPE")
                continue
            qtype = TARGET_TYPES.get(tname.upper())
            if qtype is None:
                report.not_understood.append(f"{path}:{lineno}: unknown type {tname!r}")
                continue
            if len(pattern) > MAX_PATTERN_CHARS:
                raise ProfileError(f"pattern of {len(pattern):,} characters; at most {MAX_PATTERN_CHARS:,}",
                                   where=f"{path}:{lineno}", hint="split it into several PATTERN=TYPE lines")
            try:
                rx = re.compile(pattern.lower())
            except (re.error, RecursionError, OverflowError) as exc:
                report.not_understood.append(f"{path}:{lineno}: bad regex {pattern!r}: {exc}")
                continue
            risk = _nested_repeat(pattern.lower())
            if risk:
                raise ProfileError(f"pattern {pattern!r} has {risk}: its matching time can grow exponentially "
                                   "with the tensor name (in llama-quantize too)", where=f"{path}:{lineno}",
                                   hint="write the alternatives or repeats out without nesting them, "
                                        "e.g. blk\\.(1|2)\\.ffn_down_exps")
            if len(rules) >= MAX_IMPORT_RULES:
                raise ProfileError(f"more than {MAX_IMPORT_RULES} PATTERN=TYPE rules", where=f"{path}:{lineno}",
                                   hint="tensor-type files hold a few dozen rules; use a profile's bands instead")
            rules.append((lineno, pattern, rx, qtype.name))
    universe = names or canonical_names(n_blocks)
    blocks_in_universe = 1 + max((b for n in universe if (b := block_of(n)) is not None),
                                 default=n_blocks - 1)
    assigned: dict[str, str] = {}
    hits: dict[int, int] = defaultdict(int)
    for name in universe:
        if not allows_quantization(name, 2):
            continue
        for lineno, pattern, rx, tname in rules:
            if rx.search(name):
                assigned[name] = tname
                hits[lineno] += 1
                stem = name.split(".", 2)[-1].rsplit(".", 1)[0] if name.startswith("blk.") else name.rsplit(".", 1)[0]
                literal = re.sub(r"\\|\^|\$|\(.*?\)|\[.*?\]|\.\*|\.|\|", " ", pattern.lower()).split()
                words = [w for w in literal if not w.isdigit() and w not in ("blk", "weight")]
                if words and stem not in words and not any(w == stem for w in words):
                    report.accidental.append(f"line {lineno}: {pattern!r} hits {name} only by substring")
                break
    for lineno, pattern, _, _ in rules:
        if hits[lineno] == 0:
            report.unused.append(f"line {lineno}: {pattern!r} matches no tensor (or is shadowed by earlier lines)")

    bands = Bands().resolve(blocks_in_universe)
    per_role_band: dict[tuple[str, str], set[str]] = defaultdict(set)
    per_slot: dict[tuple[str, str, str], set[int]] = defaultdict(set)
    band_counts: dict[tuple[str, str], Counter[str]] = defaultdict(Counter)
    types: dict[str, Any] = {}
    for name, tname in assigned.items():
        tr = classify_name(name)
        if tr.role in (Role.EMBEDDING, Role.OUTPUT):
            types[tr.role.value] = tname
            continue
        if tr.role.value not in BANDED_ROLES or tr.block is None:
            continue
        if tr.role == Role.ROUTED_EXPERT:
            band = bands.expert_band(tr.block)
        else:
            band = bands.edge_rest(tr.block, attention=tr.role == Role.ATTENTION)
        per_role_band[(tr.role.value, band)].add(tname)
        band_counts[(tr.role.value, band)][tname] += 1
        per_slot[(tr.role.value, tr.slot, tname)].add(tr.block)
    overrides: list[dict[str, Any]] = []
    for role, band_names in BANDED_ROLES.items():
        chosen = {}
        for band in band_names:
            got = per_role_band.get((role, band))
            if got and len(got) == 1:
                chosen[band] = next(iter(got))
        if len(chosen) == len(band_names):
            types[role] = chosen
        elif any((role, band) in per_role_band for band in band_names):
            for (r, slot, tname), blocks in sorted(per_slot.items()):
                if r == role:
                    overrides.append({"role": role, "slot": slot, "blocks": _ranges(sorted(blocks)), "type": tname})
            if role == Role.ROUTED_EXPERT.value:
                # A profile needs the routed experts' bands (the overrides above keep every tensor the rules
                # typed): each band takes its most common type, a band the rules never reach its neighbour's.
                types[role] = _complete_bands({band: band_counts[(role, band)].most_common(1)[0][0]
                                               for band in band_names if band_counts[(role, band)]}, band_names)
    profile: dict[str, Any] = {"extends": "_apex", "tier": tier or path.stem.replace("_", "-").title(),
               "description": f"Imported from {path.name} by apex-orch profile import",
               "base_ftype": base_ftype, "types": types}
    if overrides:
        profile["overrides"] = overrides
    report.profile = profile
    return report


def _complete_bands(found: dict[str, str], names: tuple[str, ...]) -> dict[str, str]:
    out: dict[str, str] = {}
    last = next(iter(found.values()))
    for name in names:
        last = found.get(name, last)
        out[name] = last
    return out


def _ranges(blocks: list[int]) -> str:
    out: list[str] = []
    start: int | None = None
    prev = -2
    for b in blocks:
        if start is None:
            start = prev = b
        elif b == prev + 1:
            prev = b
        else:
            out.append(f"{start}-{prev}" if start != prev else str(start))
            start = prev = b
    if start is not None:
        out.append(f"{start}-{prev}" if start != prev else str(start))
    return ",".join(out)


def dump_profile(profile: dict[str, Any]) -> str:
    return str(yaml.safe_dump(profile, sort_keys=False, default_flow_style=None))


def check_importable(profile: dict[str, Any], source: Path, model: Any = None) -> None:
    """Refuse (ProfileError) an imported profile that would not load, or, with the model given, not
    plan: `profile import` never writes a profile `plan` then rejects. Loaded from a scratch file
    beside nothing of the user's (its `extends: _apex` resolves as any profile's would)."""
    import tempfile

    from apex_orch.core.safefiles import write_atomic
    from apex_orch.plan.planner import make_plan
    from apex_orch.plan.profiles import load_profile
    with tempfile.TemporaryDirectory(prefix="apex-orch-import-") as tmp:
        scratch = Path(tmp) / "imported.yaml"
        write_atomic(scratch, dump_profile(profile))
        try:
            loaded = load_profile(scratch)
            if model is not None:
                make_plan(model, loaded)
        except ProfileError as exc:
            what = exc.message.replace(str(scratch), "the imported profile")
            hint = ("give routed experts a type: add PATTERN=TYPE lines for ffn_*_exps (e.g. "
                    "ffn_down_exps=q4_k)" if "routed_expert" in exc.message else exc.hint)
            raise ProfileError(f"the rules do not make a profile that plans: {what}", where=str(source),
                               hint=hint) from None
