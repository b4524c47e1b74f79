"""The groups of tensors a profile can address, and the type ladders a fit chooses from.

A group is what one profile line types: a role in one depth band (`attention.edge`), with the
routed experts split by slot because their down projection and their gate/up projections take
different types in practice (`routed_expert.down.middle`, `routed_expert.gate_up.middle`);
`embedding`, `output` and `nextn` are one group each. Membership comes from the planner itself
(a plan of the model under the profile whose bands the fit keeps), so a group holds exactly the
tensors the emitted profile's line will reach, MTP blocks and fallbacks included.

`TypeTable` holds, for every quantizable tensor and every ladder type, the bytes llama-quantize
will write (the plan's final type after its row-size fallbacks, so a "Q4_K" attention tensor
whose rows are 32 long counts as what it really becomes), from one plan per type.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from apex_orch.model.gguf_tables import GGML_QUANT_SIZES
from apex_orch.model.gguf_tables import GGMLQuantizationType as T

from apex_orch.core.errors import InternalError, RequestError
from apex_orch.core.safefiles import write_atomic
from apex_orch.model.info import ModelInfo
from apex_orch.model.roles import Role
from apex_orch.plan.llama_rules import ABORT_WITHOUT_IMATRIX_DATA, IMATRIX_REQUIRED
from apex_orch.plan.planner import Plan, make_plan
from apex_orch.plan.profiles import BANDED_ROLES, SINGLE_ROLES, TARGET_TYPES, Profile, load_profile

# The candidate types, cheapest first. With an importance matrix the IQ types below 3 bits are
# allowed (llama-quantize refuses them without one) except IQ2_XXS/IQ2_XS/IQ1_S, which abort on
# token_embd/output (no imatrix data for them: llama_rules.ABORT_WITHOUT_IMATRIX_DATA); Q3_K stands for
# the 3.4-bit class (IQ3_S
# has the same size) and IQ4_XS/Q4_K both stay because their 6% size step is a useful fill.
LADDER_IMATRIX = (T.IQ1_M, T.IQ2_S, T.Q3_K, T.IQ4_XS, T.Q4_K, T.Q5_K, T.Q6_K, T.Q8_0)
LADDER_PLAIN = (T.Q2_K, T.Q3_K, T.IQ4_XS, T.Q4_K, T.Q5_K, T.Q6_K, T.Q8_0)
ROUTED = Role.ROUTED_EXPERT.value
MAX_LADDER = 16


def bits(t: T) -> float:
    """Nominal bits per weight of a ggml type (block bytes * 8 / block elements)."""
    block, size = GGML_QUANT_SIZES[t]
    return size * 8 / block


def parse_ladder(text: str | None, has_imatrix: bool) -> tuple[T, ...]:
    """'Q3_K,Q4_K,Q6_K' -> types sorted by bits; None -> the default ladder."""
    if text is None:
        return LADDER_IMATRIX if has_imatrix else LADDER_PLAIN
    names = [n.strip().upper() for n in text.split(",") if n.strip()]
    if not names or len(names) > MAX_LADDER:
        raise RequestError(f"give 1 to {MAX_LADDER} ggml types, comma-separated (got {len(names)})", fields=("ladder",))
    out = []
    for n in names:
        t = TARGET_TYPES.get(n)
        if t is None or t in (T.F32, T.F16, T.BF16):
            raise RequestError(f"{n!r} is not a quantized ggml type", fields=("ladder",),
                               hint="e.g. IQ2_S,Q3_K,Q4_K,Q5_K,Q6_K,Q8_0")
        if t in ABORT_WITHOUT_IMATRIX_DATA:
            raise RequestError(f"{n} cannot be measured: llama-quantize aborts writing token_embd/output at "
                               "it (the imatrix has no data for them)", fields=("ladder",),
                               hint="use IQ1_M or IQ2_S for the lowest bits")
        if t in IMATRIX_REQUIRED and not has_imatrix:
            raise RequestError(f"{n} needs an importance matrix (llama-quantize refuses it without one)",
                               fields=("ladder",), hint="give an imatrix, or drop the IQ1/IQ2/IQ3_XXS types",
                               options=("imatrix",))
        out.append(t)
    return tuple(sorted(set(out), key=lambda t: (bits(t), t.value)))


@dataclass(frozen=True)
class Group:
    key: str                    # "routed_expert.down.middle", "attention.edge", "embedding"
    role: str                   # profile role ("nextn" for the MTP group)
    band: str | None            # profile band (None: single-type roles)
    slots: tuple[str, ...]      # the tensor slots it covers (routed experts only; () = the whole role)
    tensors: tuple[str, ...]
    blocks: tuple[int, ...]     # blocks that hold its tensors (sorted)
    n_params: int


def _group_key(role: Role, slot: str, band: str | None) -> tuple[str, str | None, str] | None:
    """(profile role, band, slot class) of a planned tensor, or None when no profile line types it."""
    if role == Role.NEXTN:
        return "nextn", None, ""
    if role.value in SINGLE_ROLES:
        return role.value, None, ""
    if role.value in BANDED_ROLES and band is not None:
        if role.value == ROUTED:
            return ROUTED, band, "down" if slot == "down" else "gate_up"
        return role.value, band, ""
    return None


def groups_of(plan: Plan) -> list[Group]:
    """The groups of a plan's model, in a stable order (roles as the profile lists them, bands
    from the edge inward)."""
    members: dict[tuple, list] = defaultdict(list)
    for t in plan.tensors:
        if not t.quantizable:
            continue
        key = _group_key(t.role, t.slot, t.band)
        if key is not None:
            members[key].append(t)
    order = {r: i for i, r in enumerate(list(BANDED_ROLES) + list(SINGLE_ROLES) + ["nextn"])}
    band_order = {"edge": 0, "near": 1, "middle": 2, "rest": 1, None: 0}
    out = []
    for (role, band, slot_class), ts in sorted(
            members.items(), key=lambda kv: (order[kv[0][0]], kv[0][2], band_order[kv[0][1]])):
        name = ".".join(p for p in (role, slot_class, band) if p)
        slots = tuple(sorted({t.slot for t in ts})) if role == ROUTED else ()
        out.append(Group(name, role, band, slots, tuple(t.name for t in ts),
                         tuple(sorted({t.block for t in ts if t.block is not None})),
                         sum(t.n_elements for t in ts)))
    return out


def bands_profile(name: str | None, folder: Path) -> Profile:
    """The profile whose bands a measurement or fit uses; None: APEX's own (profiles/_apex.yaml,
    which has no tier of its own, so it is wrapped in a one-line child)."""
    if name is not None:
        return load_profile(name)
    path = folder / "apex-bands.yaml"
    write_atomic(path, "extends: _apex\ntier: APEX\nbase_ftype: Q8_0\ntypes: {routed_expert: Q8_0}\n")
    return load_profile(path)


UNIFORM_ROLES = list(BANDED_ROLES) + list(SINGLE_ROLES)


def uniform_profile_text(t: T, *, bands_from: Profile, imatrix: bool, tier: str | None = None) -> str:
    """A profile that gives every typed tensor the type `t`, with the bands of `bands_from`."""
    b = bands_from.bands
    lines = [f"tier: {tier or 'Uniform-' + t.name}", "base_ftype: Q8_0",
             f"imatrix: {{required: {'true' if imatrix else 'false'}}}",
             f"bands: {{edge: {b.edge}, near: {b.near}, attention_edge: {b.attention_edge}, scale: {b.scale}, "
             f"reference_blocks: {b.reference_blocks}}}", "types:"]
    lines += [f"  {role}: {t.name}" for role in UNIFORM_ROLES] + [f"  nextn: {t.name}"]
    return "\n".join(lines) + "\n"


def uniform_profile(t: T, folder: Path, *, bands_from: Profile, imatrix: bool) -> Profile:
    path = folder / f"uniform-{t.name.lower()}.yaml"
    write_atomic(path, uniform_profile_text(t, bands_from=bands_from, imatrix=imatrix))
    return load_profile(path)


@dataclass
class TypeTable:
    """Exact bytes per tensor per ladder type, and the bytes no group owns (router, norms...)."""
    ladder: tuple[T, ...]
    groups: list[Group]
    tensor_bytes: dict[str, dict[T, int]]      # tensor -> type -> bytes written
    final_types: dict[str, dict[T, T]]         # tensor -> requested type -> type written (fallbacks)
    fixed_bytes: int                           # tensors outside every group (same in every plan)
    n_elements: int                            # every tensor of the model (the plan's bpw denominator)
    block_of: dict[str, int | None]
    elements: dict[str, int]

    def group_bytes(self, g: Group, t: T, blocks: set[int] | None = None) -> int:
        return sum(self.tensor_bytes[n][t] for n in g.tensors
                   if blocks is None or self.block_of[n] in blocks)


def type_table(model: ModelInfo, ladder: tuple[T, ...], *, bands_from: Profile, work: Path) -> TypeTable:
    """Plan the model once per ladder type (plans are pure and fast) and read the bytes back."""
    tensor_bytes: dict[str, dict[T, int]] = defaultdict(dict)
    final_types: dict[str, dict[T, T]] = defaultdict(dict)
    groups: list[Group] | None = None
    fixed: set[int] = set()
    plan = None
    for t in ladder:
        plan = make_plan(model, uniform_profile(t, work, bands_from=bands_from, imatrix=True), has_imatrix=True)
        gs = groups_of(plan)
        if groups is None:
            groups = gs
        grouped = {n for g in gs for n in g.tensors}
        for pt in plan.tensors:
            if pt.name in grouped:
                tensor_bytes[pt.name][t] = pt.n_bytes
                final_types[pt.name][t] = pt.final_type
        fixed.add(sum(pt.n_bytes for pt in plan.tensors if pt.name not in grouped))
    assert plan is not None and groups is not None
    if len(fixed) != 1:  # an unassigned tensor's mixture type would depend on the base FTYPE only
        raise InternalError("fit: the bytes outside the fit's groups changed with the ladder type")
    return TypeTable(ladder, groups, dict(tensor_bytes), dict(final_types), fixed.pop(), plan.n_elements,
                     {pt.name: pt.block for pt in plan.tensors}, {pt.name: pt.n_elements for pt in plan.tensors})
