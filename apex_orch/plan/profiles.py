"""APEX profiles: a type per role per depth band, loaded strictly from YAML.

Schema (every key optional unless marked; see profiles/*.yaml and docs/profiles.md):

    extends: NAME | path.yaml      # inherit, then override (cycle-checked)
    tier: Compact                  # display tier for file names and cards (required after extends)
    description: ...
    best_for: ...                  # the "Best For" line of model cards
    base_ftype: Q4_K_M             # llama-quantize FTYPE argument (must be a quantized type)
    imatrix: {required: bool, corpus: NAME}
    bands: {edge: 5, near: 5, attention_edge: 3, scale: auto|fixed|proportional, reference_blocks: 36}
    types:
      routed_expert: {edge: T, near: T, middle: T}   # or one type for all bands
      shared_expert: {edge: T, rest: T}
      attention:     {edge: T, rest: T}              # edge = attention_edge blocks from each end
      dense_ffn:     {edge: T, rest: T}
      ssm:           {edge: T, rest: T}
      embedding: T
      output: T
      nextn: Q8_0 | T | edge                         # the MTP head: one type (default Q8_0, APEX-MTP's),
                                                     #   or `edge`: typed like an edge block of each role
    overrides:                                       # applied in order after the bands; last wins
      - {role: routed_expert, slot: down, band: edge | blocks: "0-4,31-35", type: T}
    gates: {max_mean_kld: 0.05, max_ppl_ratio: 1.05, min_same_top_p: 90}
    fitted: {target: 48.00 GB, method: exact, ...}   # written by `apex-orch fit`: where the types came from

The schema is the dataclasses below (ProfileDoc and the sections it holds: ImatrixSpec, Bands,
TypesSpec, plan.gates.Gates, Override): their fields are the keys, their annotations and `bounds`
the checks (apex_orch.core.schema), so a new key is a new field. Every error names file:line and key.

The MTP head (`types.nextn`: the blk.N.nextn.* tensors and the decoder layer of each MTP block) is
Q8_0 on every tier unless a profile says otherwise, as the APEX-MTP releases keep it: llama-imatrix
never runs the MTP layers, so the head must take a type that needs no importance data, and a
drafter's quality is what decides how many of its tokens are accepted.

Bands are symmetric, counted from each end of the main blocks (MTP blocks excluded).
`scale: auto` keeps the counts when the model has room for a middle band at least as
deep as one edge, and otherwise scales them by blocks/reference_blocks (rounded, at
least 1): 5/5/3 on 36 blocks; 2/2/1 on 12 blocks; 1/1/1 on 8 blocks.

Which file a profile name means (user folders, then the built-ins): apex_orch.plan.profile_search.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from apex_orch.model.gguf_tables import GGMLQuantizationType as T

from apex_orch.core.errors import ProfileError
from apex_orch.core.schema import bounds, check_keys, read_section, yaml_keys
from apex_orch.core.yamlio import YamlDoc, load_yaml
from apex_orch.model.info import MAX_BLOCKS
from apex_orch.model.roles import NEVER_QUANTIZED_ROLES, Role
from apex_orch.plan.gates import Gates
from apex_orch.plan.llama_rules import FTYPE_BY_NAME, is_quantized
from apex_orch.plan.profile_search import PROFILE_NAME_RE, resolve_profile_path

# Types llama-quantize accepts as --tensor-type targets.
TARGET_TYPES: dict[str, T] = {t.name: t for t in (
    T.F32, T.F16, T.BF16, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K,
    T.Q6_K, T.IQ2_XXS, T.IQ2_XS, T.IQ2_S, T.IQ3_XXS, T.IQ3_S, T.IQ1_S, T.IQ1_M, T.IQ4_NL, T.IQ4_XS,
    T.TQ1_0, T.TQ2_0, T.MXFP4)}

BANDED_ROLES = {
    Role.ROUTED_EXPERT.value: ("edge", "near", "middle"),
    Role.SHARED_EXPERT.value: ("edge", "rest"),
    Role.ATTENTION.value: ("edge", "rest"),
    Role.DENSE_FFN.value: ("edge", "rest"),
    Role.SSM.value: ("edge", "rest"),
}
SINGLE_ROLES = (Role.EMBEDDING.value, Role.OUTPUT.value)
NEVER_TYPED = tuple(r.value for r in NEVER_QUANTIZED_ROLES)

SCALES = ("auto", "fixed", "proportional")
# APEX-MTP: the MTP head at Q8_0 on every tier (no imatrix data needed; llama-imatrix never runs it).
MTP_HEAD_DEFAULT = "Q8_0"
NEXTN_EDGE = "edge"       # `types.nextn: edge`: each MTP tensor typed like an edge block of its role


def _blocks(minimum: int) -> dict[str, Any]:
    """A count of blocks: a size past the largest model apex-orch handles is a typo, said as such."""
    return bounds(minimum=minimum, maximum=MAX_BLOCKS, why_maximum=f"apex-orch handles models of up to {MAX_BLOCKS} "
                  "blocks", hint_maximum="band sizes count blocks from each end of the model, e.g. edge: 5")


@dataclass(frozen=True)
class ImatrixSpec:
    """`imatrix:` of a profile."""
    required: bool = False
    corpus: str | None = field(default=None, metadata=bounds(pattern=PROFILE_NAME_RE, what="a corpus name"))


@dataclass(frozen=True)
class Bands:
    """`bands:` of a profile."""
    edge: int = field(default=5, metadata=_blocks(0))
    near: int = field(default=5, metadata=_blocks(0))
    attention_edge: int = field(default=3, metadata=_blocks(0))
    scale: str = field(default="auto", metadata=bounds(choices=SCALES))
    reference_blocks: int = field(default=36, metadata=_blocks(1))

    def resolve(self, n_blocks: int) -> "ResolvedBands":
        edge, near, attn = self.edge, self.near, self.attention_edge
        scaled = False
        if self.scale == "proportional" or (
                self.scale == "auto" and 2 * (edge + near) + max(edge, 1) > n_blocks):
            f = n_blocks / self.reference_blocks
            edge, near, attn = (max(1, round(v * f)) if v > 0 else 0 for v in (edge, near, attn))
            scaled = True
        # Never let the two sides overlap: shrink near first, then edge.
        while 2 * (edge + near) > n_blocks and near > 0:
            near -= 1
        while 2 * edge > n_blocks and edge > 0:
            edge -= 1
        attn = min(attn, n_blocks // 2)
        return ResolvedBands(n_blocks, edge, near, attn, scaled)


@dataclass(frozen=True)
class ResolvedBands:
    n_blocks: int
    edge: int
    near: int
    attention_edge: int
    scaled: bool

    def depth(self, block: int) -> int:
        return min(block, self.n_blocks - 1 - block)

    def expert_band(self, block: int) -> str:
        d = self.depth(block)
        if d < self.edge:
            return "edge"
        if d < self.edge + self.near:
            return "near"
        return "middle"

    def edge_rest(self, block: int, attention: bool = False) -> str:
        limit = self.attention_edge if attention else self.edge
        return "edge" if self.depth(block) < limit else "rest"

    def describe(self) -> str:
        middle = self.n_blocks - 2 * (self.edge + self.near)
        return (f"{self.edge}+{self.edge} edge, {self.near}+{self.near} near, {middle} middle "
                f"(attention edge {self.attention_edge}+{self.attention_edge}) over {self.n_blocks} blocks"
                + (" [scaled to the model]" if self.scaled else ""))


@dataclass(frozen=True)
class TypesSpec:
    """`types:` of a profile: a type per role, or per band of a banded role ({edge: T, ...} or one
    type for all bands; read by _types: their shape depends on the role), and the MTP head's."""
    routed_expert: dict[str, Any] | str | None = None
    shared_expert: dict[str, Any] | str | None = None
    attention: dict[str, Any] | str | None = None
    dense_ffn: dict[str, Any] | str | None = None
    ssm: dict[str, Any] | str | None = None
    embedding: str | None = None
    output: str | None = None
    nextn: str = field(default=MTP_HEAD_DEFAULT, metadata=bounds(
        what=f"a ggml type name or {NEXTN_EDGE!r}"))


@dataclass(frozen=True)
class Override:
    """One entry of `overrides:` (read by _override: its values depend on each other)."""
    role: str
    slot: str | None
    band: str | None
    blocks: frozenset[int] | None
    type: T
    where: str = field(default="", metadata={"yaml": False})


@dataclass(frozen=True)
class ProfileDoc:
    """The keys of a profile document (after `extends`); the module docstring shows them."""
    extends: str | None = None
    name: str | None = None
    tier: str | None = None
    description: str | None = None
    best_for: str | None = None
    base_ftype: str | None = None
    imatrix: ImatrixSpec | None = None
    bands: Bands | None = None
    types: TypesSpec | None = None
    overrides: list[Any] | None = None
    gates: Gates | None = None
    fitted: dict[str, Any] | None = None     # written by `apex-orch fit`: where the types came from


# The mappings of a profile whose keys are dataclass fields, by key path.
SECTIONS: dict[tuple[Any, ...], type] = {("imatrix",): ImatrixSpec, ("bands",): Bands, ("gates",): Gates}
TOP_KEYS = set(yaml_keys(ProfileDoc))
OVERRIDE_KEYS = set(yaml_keys(Override))


@dataclass
class Profile:
    name: str
    path: Path
    tier: str
    description: str
    best_for: str
    base_ftype: str
    imatrix_required: bool
    corpus: str | None
    bands: Bands
    types: dict[str, dict[str, T]]        # role -> band -> type ("all" for single-type roles)
    nextn: str | T                        # the MTP head: a type (default Q8_0), or "edge"
    overrides: list[Override]
    gates: dict[str, float]
    chain: list[str] = field(default_factory=list)   # extends chain, child first
    chain_paths: list[Path] = field(default_factory=list)   # the files of that chain, child first
    raw: dict[str, Any] = field(default_factory=dict, repr=False)
    doc: YamlDoc | None = field(default=None, repr=False)

    @property
    def sha256(self) -> str:
        """Hash of the fully resolved profile (after extends), stable across formatting."""
        blob = json.dumps(self.raw, sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()

    @property
    def imatrix(self) -> bool:
        return self.imatrix_required

    def type_for(self, role: str, band: str) -> T | None:
        by_band = self.types.get(role)
        if not by_band:
            return None
        return by_band.get(band, by_band.get("all"))

    def all_types(self) -> set[T]:
        out = {t for bands in self.types.values() for t in bands.values()}
        out |= {o.type for o in self.overrides}
        if isinstance(self.nextn, T):
            out.add(self.nextn)
        return out


# ------------------------------------------------------------------ loading

def _merge(parent: dict[str, Any], child: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(parent)
    for key, value in child.items():
        if key == "extends":
            continue
        if key == "overrides":
            out[key] = list(out.get(key, [])) + list(value or [])
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _load_chain(path: Path, seen: list[Path]) -> tuple[dict[str, Any], list[YamlDoc]]:
    resolved = path.resolve()
    if resolved in seen:
        cycle = " -> ".join(p.name for p in seen + [resolved])
        raise ProfileError(f"`extends` cycle: {cycle}", where=str(path),
                           hint="remove one of the extends links")
    doc = load_yaml(path, ProfileError)
    if not isinstance(doc.data, dict):
        raise ProfileError("a profile must be a YAML mapping", where=doc.where())
    check_keys(doc.data, TOP_KEYS, doc.where)
    parent_ref = doc.data.get("extends")
    if parent_ref is None:
        return doc.data, [doc]
    if not isinstance(parent_ref, str):
        raise ProfileError("extends must be a profile name or a .yaml path", where=doc.where(("extends",)))
    try:
        parent_path = resolve_profile_path(parent_ref, base_dir=path.parent, skip=path)
    except ProfileError as exc:
        raise ProfileError(f"extends: {exc.message}", where=doc.where(("extends",)), hint=exc.hint) from None
    parent_data, docs = _load_chain(parent_path, seen + [resolved])
    return _merge(parent_data, doc.data), [doc] + docs


def _where(docs: list[YamlDoc], kp: tuple[Any, ...]) -> str:
    """The first document in the extends chain (child first) that defines this key path."""
    for doc in docs:
        probe = kp
        while probe:
            if probe in doc.lines:
                return doc.where(probe)
            probe = probe[:-1]
    return docs[0].where(kp)


def parse_type(value: Any, docs: list[YamlDoc], kp: tuple[Any, ...], role: str | None = None) -> T:
    dotted = ".".join(str(k) for k in kp)
    if not isinstance(value, str):
        raise ProfileError(f"{dotted}: expected a ggml type name, got {value!r}", where=_where(docs, kp))
    t = TARGET_TYPES.get(value.strip().upper())
    if t is None:
        raise ProfileError(f"{dotted}: unknown ggml type {value!r}", where=_where(docs, kp),
                           hint="use one of: " + ", ".join(TARGET_TYPES))
    return t


def load_profile(name_or_path: str | os.PathLike[str]) -> Profile:
    path = resolve_profile_path(str(name_or_path))
    data, docs = _load_chain(path, [])
    return _validate(path, data, docs)


def _check_document_keys(docs: list[YamlDoc]) -> None:
    """Nested keys, each checked in the file of the extends chain that wrote it."""
    for doc in docs:
        d = doc.data
        if not isinstance(d, dict):
            continue   # a document that is not a mapping is refused where it is loaded
        for kp, cls in SECTIONS.items():
            if isinstance(d.get(kp[0]), dict):
                check_keys(d[kp[0]], yaml_keys(cls), doc.where, kp)
        if isinstance(d.get("types"), dict):
            for role in d["types"]:
                if role in NEVER_TYPED:
                    raise ProfileError(
                        f"types.{role}: llama.cpp never quantizes {role} tensors "
                        f"({'ffn_gate_inp / exp_probs_b' if role == 'router' else '*_norm'}); "
                        "a type here would be silently ignored", where=doc.where(("types", role)),
                        hint=f"remove types.{role}")
            check_keys(d["types"], yaml_keys(TypesSpec), doc.where, ("types",))
            for role, bands_ in d["types"].items():
                if role in BANDED_ROLES and isinstance(bands_, dict):
                    check_keys(bands_, BANDED_ROLES[role], doc.where, ("types", role))


def _section(cls: type, data: dict[str, Any], key: str, docs: list[YamlDoc]) -> Any:
    value = data.get(key) or {}
    if not isinstance(value, dict):
        raise ProfileError(f"{key} must be a mapping", where=_where(docs, (key,)))
    return read_section(cls, value, lambda kp: _where(docs, kp), (key,))


def _validate(path: Path, data: dict[str, Any], docs: list[YamlDoc]) -> Profile:
    _check_document_keys(docs)
    tier = data.get("tier")
    if not isinstance(tier, str) or not tier.strip():
        raise ProfileError("missing `tier` (the display name, e.g. Compact or I-Compact)", where=_where(docs, ()))
    # Names printed in messages, tables and cards: no terminal escapes, bells or NULs (a newline
    # is allowed only in the longer texts, which are escaped where they are shown).
    for key, allowed in (("tier", ""), ("best_for", "\n\t"), ("description", "\n\t")):
        text = data.get(key)
        bad = (next((ch for ch in text if _is_control(ch) and ch not in allowed), None)
               if isinstance(text, str) else None)
        if bad is not None:
            raise ProfileError(f"{key}: contains a control character (U+{ord(bad):04X})", where=_where(docs, (key,)),
                               hint=f"{key} is display text; remove the escape or control character")
    base = data.get("base_ftype")
    if not isinstance(base, str) or base.upper() not in FTYPE_BY_NAME:
        raise ProfileError(f"base_ftype: unknown llama-quantize type {base!r}", where=_where(docs, ("base_ftype",)),
                           hint="e.g. Q4_K_M, Q6_K, Q3_K_M")
    from apex_orch.plan.llama_rules import default_type
    if not is_quantized(default_type(FTYPE_BY_NAME[base.upper()])):
        raise ProfileError(
            f"base_ftype {base}: with an unquantized FTYPE llama-quantize ignores every --tensor-type override",
            where=_where(docs, ("base_ftype",)), hint="use a quantized FTYPE such as Q4_K_M or Q6_K")
    im: ImatrixSpec = _section(ImatrixSpec, data, "imatrix", docs)
    bands: Bands = _section(Bands, data, "bands", docs)
    gates: Gates = _section(Gates, data, "gates", docs)
    types, nextn = _types(data, docs)
    raw_overrides = data.get("overrides") or []
    if not isinstance(raw_overrides, list):
        raise ProfileError("overrides must be a list of {role, slot, band|blocks, type}",
                           where=_where(docs, ("overrides",)))
    overrides = [_override(o, i, docs) for i, o in enumerate(raw_overrides)]
    fitted = data.get("fitted")
    if fitted is not None and not (isinstance(fitted, dict) and all(
            isinstance(v, (str, int, float, bool)) for v in fitted.values())):
        raise ProfileError("fitted: a mapping of plain values (the record `apex-orch fit` writes)",
                           where=_where(docs, ("fitted",)))
    return Profile(name=path.stem, path=path, tier=tier.strip(), description=str(data.get("description", "")).strip(),
                   best_for=str(data.get("best_for", "")).strip(), base_ftype=base.upper(),
                   imatrix_required=im.required, corpus=im.corpus, bands=bands, types=types, nextn=nextn,
                   overrides=overrides, gates=gates.bounds(), chain=[d.path.stem for d in docs],
                   chain_paths=[d.path for d in docs], raw=data, doc=docs[0])


def _types(data: dict[str, Any], docs: list[YamlDoc]) -> tuple[dict[str, dict[str, T]], str | T]:
    """`types:` -> (role -> band -> type, with "all" for one type; the nextn choice)."""
    raw_types = data.get("types") or {}
    if not isinstance(raw_types, dict):
        raise ProfileError("types must be a mapping of role -> types", where=_where(docs, ("types",)))
    types: dict[str, dict[str, T]] = {}
    nextn: str | T = parse_type(TypesSpec.nextn, docs, ("types", "nextn"))
    for role, spec in raw_types.items():
        kp = ("types", role)
        if role == "nextn":
            if spec == NEXTN_EDGE:
                nextn = NEXTN_EDGE
            elif isinstance(spec, str) and spec.strip().upper() in TARGET_TYPES:
                nextn = parse_type(spec, docs, kp)
            else:
                raise ProfileError(f"types.nextn: {spec!r} is neither a ggml type nor {NEXTN_EDGE!r}",
                                   where=_where(docs, kp),
                                   hint=f"the MTP head's type: {MTP_HEAD_DEFAULT} (the default, APEX-MTP's), "
                                        f"another type such as Q6_K, or {NEXTN_EDGE!r} to type each of its "
                                        "tensors like an edge block of its role")
        elif role in SINGLE_ROLES or isinstance(spec, str):
            types[role] = {"all": parse_type(spec, docs, kp)}
        elif isinstance(spec, dict):
            expected = BANDED_ROLES[role]
            missing = [band for band in expected if band not in spec]
            if missing:
                raise ProfileError(f"types.{role}: missing band(s) {', '.join(missing)}",
                                   where=_where(docs, kp), hint=f"give {', '.join(expected)} (or one type for all)")
            types[role] = {band: parse_type(spec[band], docs, kp + (band,)) for band in expected}
        else:
            raise ProfileError(f"types.{role}: expected a type or a mapping of bands", where=_where(docs, kp))
    if Role.ROUTED_EXPERT.value not in types:
        raise ProfileError(f"types.{Role.ROUTED_EXPERT.value} is required (it is what APEX is about)",
                           where=_where(docs, ("types",)))
    return types, nextn


def _override(o: Any, i: int, docs: list[YamlDoc]) -> Override:
    kp = ("overrides", i)
    if not isinstance(o, dict):
        raise ProfileError("each override is a mapping {role, slot, band|blocks, type}", where=_where(docs, kp))
    check_keys(o, OVERRIDE_KEYS, lambda k: _where(docs, k), kp)
    role = o.get("role")
    if role in NEVER_TYPED:
        raise ProfileError(f"overrides[{i}]: llama.cpp never quantizes {role} tensors; a type here would be "
                           "silently ignored", where=_where(docs, kp + ("role",)),
                           hint=f"remove overrides[{i}] ({role} tensors keep their source type)")
    if role not in BANDED_ROLES and role not in SINGLE_ROLES and role != "nextn":
        raise ProfileError(f"overrides[{i}].role: unknown role {role!r}", where=_where(docs, kp + ("role",)),
                           hint="roles: " + ", ".join(list(BANDED_ROLES) + list(SINGLE_ROLES) + ["nextn"]))
    band = o.get("band")
    if band is not None and band not in BANDED_ROLES.get(role, ()):
        raise ProfileError(f"overrides[{i}].band: {band!r} is not a band of {role}", where=_where(docs, kp + ("band",)),
                           hint="bands: " + ", ".join(BANDED_ROLES.get(role, ("(none)",))))
    blocks = o.get("blocks")
    block_set = parse_blocks(blocks, docs, kp + ("blocks",)) if blocks is not None else None
    if band is not None and block_set is not None:
        raise ProfileError(f"overrides[{i}]: give band or blocks, not both", where=_where(docs, kp))
    slot = o.get("slot")
    if slot is not None and not isinstance(slot, str):
        raise ProfileError(f"overrides[{i}].slot must be a string", where=_where(docs, kp + ("slot",)))
    if "type" not in o:
        raise ProfileError(f"overrides[{i}]: missing type", where=_where(docs, kp))
    return Override(role, slot, band, block_set, parse_type(o["type"], docs, kp + ("type",)), _where(docs, kp))


def _is_control(ch: str) -> bool:
    return ord(ch) < 0x20 or 0x7F <= ord(ch) <= 0x9F


def parse_blocks(spec: Any, docs: list[YamlDoc], kp: tuple[Any, ...]) -> frozenset[int]:
    """"0-4,31-35" or [0, 1, 2] -> {0,...}."""
    items = spec if isinstance(spec, list) else str(spec).split(",")
    out: set[int] = set()
    for item in items:
        text = str(item).strip()
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", text)
        if not m:
            raise ProfileError(f"blocks: {text!r} is not a block number or range like 0-4",
                               where=_where(docs, kp))
        if len(m.group(1)) > 6 or len(m.group(2) or "") > 6 or int(m.group(2) or m.group(1)) >= MAX_BLOCKS:
            raise ProfileError(f"blocks: {text!r} names a block past {MAX_BLOCKS - 1} (apex-orch handles models "
                               f"of up to {MAX_BLOCKS} blocks)", where=_where(docs, kp),
                               hint="blocks run from 0 to the model's block count - 1")
        lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
        if hi < lo:
            raise ProfileError(f"blocks: range {text!r} runs backwards", where=_where(docs, kp))
        out.update(range(lo, hi + 1))
    return frozenset(out)


def check_profile_fits(profile: Profile, n_blocks: int) -> ResolvedBands:
    """Resolve bands for a model; `fixed` bands wider than the model are an error."""
    b = profile.bands
    if b.scale == "fixed":
        need = max(2 * (b.edge + b.near), 2 * b.attention_edge)
        if need > n_blocks:
            which = (f"edge={b.edge} + near={b.near} from each end need {2 * (b.edge + b.near)} blocks"
                     if 2 * (b.edge + b.near) >= 2 * b.attention_edge else
                     f"attention_edge={b.attention_edge} from each end needs {2 * b.attention_edge} blocks")
            raise ProfileError(
                f"bands (scale: fixed): {which} but the model has {n_blocks}; the two sides would overlap",
                where=_where([profile.doc], ("bands",)) if profile.doc else str(profile.path),
                hint="use `scale: auto` to scale the bands to the model, or smaller counts")
    for o in profile.overrides:
        if o.blocks and max(o.blocks) >= n_blocks:
            raise ProfileError(f"override names block {max(o.blocks)} but the model has {n_blocks} blocks",
                               where=o.where, hint=f"blocks run from 0 to {n_blocks - 1}")
    return b.resolve(n_blocks)
