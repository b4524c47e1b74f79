"""The Plan: every tensor's requested type, the type llama-quantize will write, and bytes.

`make_plan(model, profile)` is pure: header + profile in, a Plan out. Everything
downstream — the rendered rules (render.py), dry-run display, size checks, the
post-quantize verification, model cards — reads the same Plan. The plan carries its
rules, built once by render.build_rules, and predicts the exact size of the output file.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from apex_orch.model.gguf_tables import GGMLQuantizationType as T

from apex_orch.core.errors import PlanError
from apex_orch.model.gguf_header import shape_elements, tensor_nbytes
from apex_orch.model.info import ModelInfo
from apex_orch.model.roles import Role, classify, require_moe
from apex_orch.plan.llama_rules import (ModelHParams, TypeDecision, allows_quantization, ggml_n_dims, parse_ftype,
                                        predict_types, sort_key)
from apex_orch.plan.profiles import Profile, ResolvedBands, check_profile_fits
from apex_orch.plan.render import Rule, build_rules

GIB = 1024 ** 3


@dataclass(frozen=True)
class PlannedTensor:
    name: str
    role: Role
    slot: str
    block: int | None
    band: str | None
    shape: tuple[int, ...]
    source_type: T
    quantizable: bool
    requested: T | None        # from the profile (None: left to the FTYPE mixture / never quantized)
    reason: str                # where the requested type came from
    final_type: T              # what llama-quantize writes
    fell_back: bool
    requires_imatrix: bool
    n_bytes: int

    @property
    def n_elements(self) -> int:
        return shape_elements(self.shape)

    @property
    def source_bytes(self) -> int:
        return tensor_nbytes(self.source_type, self.shape)


@dataclass
class Plan:
    model: ModelInfo
    profile: Profile
    bands: ResolvedBands
    ftype: str
    has_imatrix: bool
    tensors: list[PlannedTensor]
    rules: list[Rule]
    warnings: list[str] = field(default_factory=list)
    # Who decided the final types: the port of the pinned rules (default), or the tool's own
    # dry-run when the user took it as the plan (toolcheck.plan_with_tool_types).
    types_from: str = "apex-orch (port of the pinned llama.cpp rules)"

    # ---- sizes
    @property
    def total_bytes(self) -> int:
        return sum(t.n_bytes for t in self.tensors)

    @property
    def n_elements(self) -> int:
        return sum(t.n_elements for t in self.tensors)

    @property
    def bpw(self) -> float:
        return self.total_bytes * 8 / max(1, self.n_elements)

    def predicted_file_size(self, extra_kv: dict[str, object] | None = None) -> int:
        return predict_file_size(self, extra_kv or {})

    @property
    def fallbacks(self) -> list[PlannedTensor]:
        return [t for t in self.tensors if t.fell_back]

    @property
    def needs_imatrix(self) -> list[PlannedTensor]:
        return [t for t in self.tensors if t.requires_imatrix]

    def by_name(self) -> dict[str, PlannedTensor]:
        return {t.name: t for t in self.tensors}

    def role_summary(self) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for t in self.tensors:
            r = out.setdefault(t.role.value, {"tensors": 0, "params": 0, "bytes": 0, "types": {}})
            r["tensors"] += 1
            r["params"] += t.n_elements
            r["bytes"] += t.n_bytes
            r["types"][t.final_type.name] = r["types"].get(t.final_type.name, 0) + 1
        return out

    def band_table(self) -> dict[str, dict[str, set[str]]]:
        """role -> band -> final types (blocked tensors only)."""
        table: dict[str, dict[str, set[str]]] = defaultdict(lambda: defaultdict(set))
        for t in self.tensors:
            if t.band and t.quantizable:
                table[t.role.value][t.band].add(t.final_type.name)
        return table

    def fallback_summary(self) -> list[dict[str, Any]]:
        groups: dict[tuple[str, str], dict[str, Any]] = {}
        for t in self.fallbacks:
            key = ((t.requested or t.final_type).name, t.final_type.name)
            g = groups.setdefault(key, {"from": key[0], "to": key[1], "count": 0, "bytes": 0, "tensors": []})
            g["count"] += 1
            g["bytes"] += t.n_bytes
            g["tensors"].append(t.name)
        return list(groups.values())

    def to_json(self) -> dict[str, Any]:
        return {
            "model": {"path": str(self.model.path), "name": self.model.name, "arch": self.model.arch,
                      "blocks": self.model.block_count},
            "profile": {"name": self.profile.name, "tier": self.profile.tier, "sha256": self.profile.sha256,
                        "base_ftype": self.ftype},
            "bands": {"edge": self.bands.edge, "near": self.bands.near,
                      "attention_edge": self.bands.attention_edge, "n_blocks": self.bands.n_blocks,
                      "scaled": self.bands.scaled},
            "has_imatrix": self.has_imatrix,
            "total_bytes": self.total_bytes,
            "predicted_file_size": self.predicted_file_size(),
            "bpw": round(self.bpw, 4),
            "fallbacks": self.fallback_summary(),
            "roles": self.role_summary(),
            "warnings": self.warnings,
            "rules": [r.render() for r in self.rules],
            "tensors": [
                {"name": t.name, "role": t.role.value, "slot": t.slot, "block": t.block, "band": t.band,
                 "shape": list(t.shape), "source": t.source_type.name,
                 "requested": t.requested.name if t.requested else None, "final": t.final_type.name,
                 "fallback": t.fell_back, "requires_imatrix": t.requires_imatrix, "bytes": t.n_bytes,
                 "reason": t.reason}
                for t in self.tensors
            ],
        }


# ------------------------------------------------------------------ planning

def hparams(model: ModelInfo) -> ModelHParams:
    def first_int(value: Any, default: int = 0) -> int:
        if isinstance(value, list):
            value = value[0] if value else default
        return int(value) if isinstance(value, (int, float)) else default
    return ModelHParams(arch=model.arch, n_layer=model.block_count, n_expert=model.expert_count,
                        n_head=first_int(model.head_count), n_head_kv=first_int(model.head_count_kv))


def _band_for(role: Role, block: int | None, bands: ResolvedBands, main_blocks: int) -> str | None:
    if block is None or block >= main_blocks:
        return None
    if role == Role.ROUTED_EXPERT:
        return bands.expert_band(block)
    if role == Role.ATTENTION:
        return bands.edge_rest(block, attention=True)
    if role in (Role.SHARED_EXPERT, Role.DENSE_FFN, Role.SSM):
        return bands.edge_rest(block)
    return None


# With `types.nextn: edge`, the MTP head's own matrices (blk.N.nextn.*) are typed like the
# edge-block role they stand in for.
_NEXTN_OWN = {"eh_proj": "attention", "embed_tokens": "embedding", "shared_head_head": "output"}


def _requested(profile: Profile, role: Role, slot: str, block: int | None, band: str | None,
               bands: ResolvedBands) -> tuple[T | None, str]:
    """The profile's type for one tensor and the profile key it came from."""
    req: T | None = None
    reason = ""
    eff_role, eff_band = role, band
    if role == Role.NEXTN:
        if isinstance(profile.nextn, T):
            explicit = "nextn" in (profile.raw.get("types") or {})
            req, reason = profile.nextn, "types.nextn" if explicit else \
                f"types.nextn (default {profile.nextn.name}, the MTP head as APEX-MTP keeps it)"
        else:  # MTP block treated like an edge block of the role inside it
            sub = slot.partition(".")[0]
            try:
                eff_role = Role(_NEXTN_OWN.get(sub, sub))
            except ValueError:
                eff_role = Role.UNASSIGNED
            eff_band = "edge"
    if req is None and eff_role.value in profile.types:
        bands_for_role = profile.types[eff_role.value]
        band_key = eff_band if eff_band in bands_for_role else "all"
        if band_key in bands_for_role:
            req = bands_for_role[band_key]
            reason = f"types.{eff_role.value}" + (f".{band_key}" if band_key != "all" else "")
            if role == Role.NEXTN:
                reason = f"types.nextn: edge -> {reason}"
    for i, o in enumerate(profile.overrides):
        if o.role != role.value and not (role == Role.NEXTN and o.role == "nextn"):
            continue
        if o.slot is not None and o.slot != slot:
            continue
        if o.band is not None and o.band != band:
            continue
        if o.blocks is not None and (block is None or block not in o.blocks):
            continue
        req, reason = o.type, f"overrides[{i}]"
    return req, reason


def make_plan(model: ModelInfo, profile: Profile, *, has_imatrix: bool | None = None,
              strict: bool = False) -> Plan:
    roles = classify(model)
    require_moe(model, roles)
    main_blocks = model.block_count - model.nextn_layers
    bands = check_profile_fits(profile, main_blocks)
    ftype = parse_ftype(profile.base_ftype)
    if has_imatrix is None:
        has_imatrix = profile.imatrix_required
    warnings: list[str] = list(model.structure_warnings)

    requested: dict[str, tuple[T | None, str, str | None]] = {}
    missing_roles: dict[str, int] = defaultdict(int)
    unassigned: list[str] = []
    for t in model.tensors:
        tr = roles[t.name]
        band = _band_for(tr.role, tr.block, bands, main_blocks)
        quantizable = allows_quantization(t.name, t.shape, model.arch)
        if not quantizable:
            requested[t.name] = (None, f"never quantized ({tr.role.value})", band)
            continue
        if tr.role == Role.UNASSIGNED:
            unassigned.append(t.name)
            requested[t.name] = (None, "UNASSIGNED: no role claims it; base FTYPE mixture", band)
            continue
        req, reason = _requested(profile, tr.role, tr.slot, tr.block, band, bands)
        if req is None:
            missing_roles[tr.role.value] += 1
            reason = f"profile has no type for {tr.role.value}: base FTYPE mixture"
        requested[t.name] = (req, reason, band)
    if unassigned:
        msg = (f"{len(unassigned)} quantizable tensor(s) match no APEX role and get the {profile.base_ftype} "
               f"mixture: {', '.join(unassigned[:5])}{' ...' if len(unassigned) > 5 else ''}")
        if strict:
            raise PlanError(msg, hint="add an override for them or report the architecture")
        warnings.append(msg)
    for role, n in sorted(missing_roles.items()):
        warnings.append(f"profile {profile.name} gives no type for role {role} ({n} tensors); "
                        f"they get the {profile.base_ftype} mixture")

    rules = build_rules(model, {n: r[0] for n, r in requested.items() if r[0] is not None})
    decisions = predict_types([(t.name, t.shape, t.ggml_type) for t in model.tensors], hparams(model), ftype,
                              [(r.pattern, r.type) for r in rules], has_imatrix=has_imatrix)
    by_name: dict[str, TypeDecision] = {d.name: d for d in decisions}
    planned: list[PlannedTensor] = []
    for t in sorted(model.tensors, key=lambda x: sort_key(x.name)):
        d = by_name[t.name]
        tr = roles[t.name]
        req, reason, band = requested[t.name]
        if d.quantizable and req is not None and d.chosen != req:
            raise PlanError(f"internal: rule for {t.name} resolved to {d.chosen.name}, expected {req.name}")
        if d.quantizable and req is None and d.mixture_type is not None:
            reason = f"{reason} -> {d.mixture_type.name}" if "mixture" in reason else reason
        planned.append(PlannedTensor(
            name=t.name, role=tr.role, slot=tr.slot, block=tr.block, band=band, shape=t.shape,
            source_type=t.ggml_type, quantizable=d.quantizable, requested=req, reason=reason,
            final_type=d.final, fell_back=d.fell_back, requires_imatrix=d.requires_imatrix,
            n_bytes=tensor_nbytes(d.final, t.shape)))
    plan = Plan(model=model, profile=profile, bands=bands, ftype=profile.base_ftype, has_imatrix=has_imatrix,
                tensors=planned, rules=rules, warnings=warnings)
    if strict and plan.fallbacks:
        lines = [f"{g['count']} x {g['from']} -> {g['to']}" for g in plan.fallback_summary()]
        raise PlanError(f"strict plan: {len(plan.fallbacks)} tensor(s) need a row-size fallback: " + "; ".join(lines),
                        hint="give those tensors a type whose block size divides their row length "
                             "(e.g. a 32-block type like Q8_0/Q5_0/IQ4_NL), or accept the fallbacks",
                        options=("strict",))
    return plan


# ------------------------------------------------------------------ file size

def _kv_entry_size(key: str, value: object) -> int:
    base = 8 + len(key.encode()) + 4
    if isinstance(value, bool):
        return base + 1
    if isinstance(value, int):
        return base + 4          # llama-quantize writes integer overrides as u32
    if isinstance(value, float):
        return base + 4
    if isinstance(value, str):
        return base + 8 + len(value.encode()[:127])
    raise TypeError(f"unsupported metadata value for {key}: {value!r}")


def predict_file_size(plan: Plan, extra_kv: dict[str, object]) -> int:
    """Exact size of the file llama-quantize writes: header (input KV minus split keys, plus
    general.quantization_version, general.file_type and our --override-kv) + tensor infos,
    aligned, then each tensor's data padded to the alignment."""
    m = plan.model
    sizes = dict(m.kv_sizes)
    for key in ("split.no", "split.count", "split.tensors.count"):
        sizes.pop(key, None)
    for key in ("general.quantization_version", "general.file_type"):
        sizes[key] = 8 + len(key) + 4 + 4
    for key, value in extra_kv.items():
        sizes[key] = _kv_entry_size(key, value)
    header = 4 + 4 + 8 + 8 + sum(sizes.values())
    for t in plan.tensors:
        # gguf writes ggml_n_dims() dimensions: trailing 1s are dropped, so a converter's 2-D
        # [n_embd, 1] tensor (Qwen2-MoE's ffn_gate_inp_shexp) takes 8 header bytes fewer.
        header += 8 + len(t.name.encode()) + 4 + 8 * ggml_n_dims(t.shape) + 4 + 8
    align = m.alignment
    def pad(n: int) -> int:
        return int((n + align - 1) // align * align)
    return pad(header) + sum(pad(t.n_bytes) for t in plan.tensors)
