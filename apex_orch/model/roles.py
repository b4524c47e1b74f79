"""Tensor roles, from the model's own tensor names.

A role says what a tensor does (routed expert, shared expert, attention incl. MLA,
SSM, dense FFN, router, embedding, output, norm, MTP/nextn); a slot says which
matrix of that role it is (gate/up/gate_up/down, q/k/v/q_a/kv_a_mqa/k_b/...).
Anything quantizable that no rule claims is `unassigned` — the plan refuses to
guess its type.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum
from typing import Any

from apex_orch.core.errors import DenseModelError, ModelError
from apex_orch.model.info import ModelInfo, split_block_name


class Role(str, Enum):
    ROUTED_EXPERT = "routed_expert"
    SHARED_EXPERT = "shared_expert"
    DENSE_FFN = "dense_ffn"
    ATTENTION = "attention"
    SSM = "ssm"
    ROUTER = "router"
    EMBEDDING = "embedding"
    OUTPUT = "output"
    NORM = "norm"
    AUX = "aux"          # small non-matrix parameters llama.cpp never quantizes (see ROLE_DECISIONS)
    NEXTN = "nextn"
    UNASSIGNED = "unassigned"

    def __str__(self) -> str:
        return self.value


# Roles llama.cpp never quantizes: a profile cannot give them a type.
NEVER_QUANTIZED_ROLES = (Role.ROUTER, Role.NORM, Role.AUX)

# The order roles are shown in (plan tables, the model card): the big, banded roles first, the
# fixed tensors after, then what llama.cpp never quantizes. Every role appears once.
ROLE_ORDER: tuple[str, ...] = tuple(r.value for r in (
    Role.ROUTED_EXPERT, Role.SHARED_EXPERT, Role.DENSE_FFN, Role.ATTENTION, Role.SSM, Role.NEXTN, Role.EMBEDDING,
    Role.OUTPUT, Role.ROUTER, Role.NORM, Role.AUX, Role.UNASSIGNED))

ATTENTION_SLOTS = ("q", "k", "v", "qkv", "output", "gate", "q_a", "q_b", "kv_a_mqa", "kv_b", "k_b",
                   "v_b", "sinks")


@dataclass(frozen=True)
class RoleDecision:
    """One row of the roles table: a tensor kind, how its name looks, the role it gets and why."""
    kind: str
    pattern: re.Pattern[str]       # matched against the name after `blk.N.` (block tensors) or the whole name
    role: Role
    slot: str | None          # fixed slot, or None: the pattern's first group
    reason: str
    block: bool = True        # a per-block tensor (blk.N.*) or a global one


def _d(kind: str, pattern: str, role: Role, slot: str | None, reason: str, *, block: bool = True) -> RoleDecision:
    return RoleDecision(kind, re.compile(pattern), role, slot, reason, block)


_ATT = "|".join(ATTENTION_SLOTS)
_W = r"\.(?:weight|bias)$"

# THE roles table: every tensor kind the pinned converter writes for an MoE model, decided on
# purpose. First match wins. A quantizable tensor that no row claims is `unassigned` (plans warn,
# `--strict` refuses, tests/archs fails). `apex-orch inspect` lists the rows a model uses.
ROLE_DECISIONS: tuple[RoleDecision, ...] = (
    # ---- global tensors
    _d("token embedding", r"^(token_embd|per_layer_token_embd)\.weight$", Role.EMBEDDING, "token_embd",
       "the input lookup table; typed by `embedding`", block=False),
    _d("output head", r"^(output)\.(?:weight|bias)$", Role.OUTPUT, "output",
       "the final projection to the vocabulary; typed by `output`", block=False),
    _d("rope factors", r"^(rope_freqs|rope_factors_long|rope_factors_short)\.weight$", Role.AUX, None,
       "per-frequency RoPE factors (1-D, F32): position math, never quantized", block=False),
    _d("norm", r"^(.*_norm)(?:_\d+)?" + _W, Role.NORM, "norm",
       "normalisation gains/biases (1-D): llama.cpp never quantizes *_norm.weight", block=False),
    _d("per-layer projection (Gemma)", r"^(per_layer_model_proj|altup_proj|altup_unembd_proj)\.weight$",
       Role.AUX, None, "llama.cpp keeps these by name (small, precision-sensitive)", block=False),
    # ---- the MTP/NextN head's own tensors (blk.N.nextn.*, N past the trunk; Qwen's mtp.* and
    # Nemotron's mtp.layers.* are renamed to these by the converter). Before the generic norm row:
    # nextn.shared_head_norm is decided here.
    _d("MTP input projection", r"^nextn\.(eh_proj)\.weight$", Role.NEXTN, None,
       "fuses the next token's embedding with the trunk's last hidden state ([2 n_embd -> n_embd]), the "
       "head's one matrix of its own: role nextn (typed by the profile's types.nextn: Q8_0 by default, as "
       "APEX-MTP keeps the head; `edge` types it like an edge block's attention)"),
    _d("MTP embedding copy", r"^nextn\.(embed_tokens)\.weight$", Role.NEXTN, None,
       "the head's own token embedding (DeepSeek-V3 and GLM-4.5 ship one; llama.cpp falls back to "
       "token_embd without it): role nextn (types.nextn: Q8_0 by default; `edge` types it like `embedding`)"),
    _d("MTP output head", r"^nextn\.(shared_head_head)\.weight$", Role.NEXTN, None,
       "the head's own projection to the vocabulary (llama.cpp falls back to output.weight without it): "
       "role nextn (types.nextn: Q8_0 by default; `edge` types it like `output`)"),
    _d("MTP norms", r"^nextn\.(enorm|hnorm|shared_head_norm)\.weight$", Role.NORM, None,
       "RMS norms of the head's two inputs and of its output (1-D): never quantized"),
    # ---- experts and routing
    _d("routed expert", r"^ffn_(gate_up|gate|up|down)_exps\.weight$", Role.ROUTED_EXPERT, None,
       "the routed experts: APEX's edge/near/middle bands"),
    _d("per-expert bias/scale", r"^ffn_(gate_up|gate|up|down)_exps\.(?:bias|scale)$", Role.AUX, None,
       "one vector per expert (gpt-oss biases, per-expert scales): not a .weight, never quantized; "
       "kept out of the expert matrices' bytes and bands"),
    _d("shared expert", r"^ffn_(gate|up|down)_shexp\.(?:weight|bias|scale)$", Role.SHARED_EXPERT, None,
       "the always-on expert(s): typed by `shared_expert`"),
    _d("router", r"^(ffn_gate_inp)(?:_shexp)?\.(?:weight|bias|scale)$", Role.ROUTER, "gate_inp",
       "expert scores (and Qwen's shared-expert gate, [n_embd, 1] = 1-D for ggml; Gemma-4's router "
       "input scale, 1-D): llama.cpp never quantizes ffn_gate_inp.weight"),
    _d("expert-probability bias", r"^(exp_probs_b)(?:_vl)?(?:\.bias|\.weight)?$", Role.ROUTER, "exp_probs_b",
       "the router's score-correction bias (1-D, with or without a .bias suffix): part of routing"),
    _d("dense FFN", r"^ffn_(gate_up|gate|up|down)" + _W, Role.DENSE_FFN, None,
       "leading dense blocks' FFN (and dense layers of interleaved MoE): typed by `dense_ffn`"),
    _d("per-layer input gate/projection (Gemma)", r"^(inp_gate|proj)" + _W, Role.DENSE_FFN, None,
       "Gemma-4's per-layer-input branch (gate from the hidden state, projection back to it): a small "
       "always-on MLP in every block, quantized by llama.cpp: typed by `dense_ffn`"),
    # ---- small per-layer parameters
    _d("norm", r"^(.*_norm)(?:_\d+)?" + _W, Role.NORM, "norm",
       "normalisation gains/biases (1-D): llama.cpp never quantizes *_norm.weight"),
    _d("per-layer output scale", r"^(layer_output_scale)(?:\.weight)?$", Role.AUX, None,
       "Gemma-4's per-layer residual scale (a scalar): never quantized"),
    _d("rope factors", r"^(rope_freqs|rope_factors_long|rope_factors_short)\.weight$", Role.AUX, None,
       "per-frequency RoPE factors (1-D, F32): position math, never quantized"),
    # ---- attention (MLA included) and what follows attention
    _d("attention", r"^attn_(" + _ATT + r")" + _W, Role.ATTENTION, None,
       "q/k/v/output, MLA's low-rank pieces, gates and sinks: typed by `attention`"),
    _d("sparse-attention indexer", r"^indexer\.(attn_k|attn_q_b|proj|q_proj|k_proj)" + _W, Role.ATTENTION,
       None, "the DSA indexer (GLM-DSA, DeepSeek-V3.2) scores keys for attention: follows attention"),
    # ---- SSM and short convolutions (hybrids)
    _d("ssm convolution", r"^(ssm_conv1d(?:_[qkv])?)" + _W, Role.AUX, None,
       "the SSM's small depthwise conv kernel: llama.cpp keeps ssm_conv1d by name"),
    _d("ssm state (no .weight)", r"^(ssm_a|ssm_d)$", Role.AUX, None,
       "the SSM's A/D state parameters: written without a .weight suffix, so never quantized"),
    _d("ssm projection", r"^ssm_([a-z0-9_]+)" + _W, Role.SSM, None,
       "the SSM/linear-attention projections of a hybrid: typed by `ssm` (the profiles give it "
       "attention's types)"),
    _d("short-conv kernel", r"^(shortconv\.conv)" + _W, Role.AUX, None,
       "LFM2's short-convolution kernel: llama.cpp keeps shortconv.conv.weight by name"),
    _d("short-conv projection", r"^shortconv\.(in_proj|out_proj)" + _W, Role.SSM, None,
       "LFM2's short-conv in/out projections play the SSM's part in the hybrid: typed by `ssm`"),
)

# Not matched by name: a tensor of an MTP block (blk.N, N >= the trunk's block count) that an
# ordinary row claims (attention, experts, shared expert, dense FFN, SSM) gets this decision.
MTP_BLOCK_LAYER = RoleDecision(
    "MTP block layer", re.compile(r"(?!)"), Role.NEXTN, None,
    "the MTP head's own decoder layer (attention, experts, shared expert: a full block past the trunk): "
    "role nextn, slot <role>.<slot>, typed by the profile's types.nextn (Q8_0 by default; `edge`: like an "
    "edge block of that role); "
    "its norms and router stay never quantized")

@dataclass(frozen=True)
class TensorRole:
    role: Role
    slot: str          # e.g. "down", "kv_a_mqa", "token_embd"
    block: int | None
    kind: str = ""     # the ROLE_DECISIONS row that decided it ("" for unassigned)


def _match(name: str, block: bool) -> tuple[RoleDecision, str] | None:
    for d in ROLE_DECISIONS:
        if d.block != block:
            continue
        m = d.pattern.match(name)
        if m:
            return d, d.slot or m.group(1)
    return None


def classify_name(name: str, nextn_blocks: frozenset[int] = frozenset()) -> TensorRole:
    in_block = split_block_name(name)
    if in_block is None:
        hit = _match(name, block=False)
        if hit:
            return TensorRole(hit[0].role, hit[1], None, hit[0].kind)
        return TensorRole(Role.UNASSIGNED, name, None)
    block, rest = in_block
    hit = _match(rest, block=True)
    if hit:
        d, slot = hit
        if block in nextn_blocks and d.role not in NEVER_QUANTIZED_ROLES and d.role != Role.NEXTN:
            return TensorRole(Role.NEXTN, f"{d.role.value}.{slot}", block, MTP_BLOCK_LAYER.kind)
        return TensorRole(d.role, slot, block, d.kind)
    return TensorRole(Role.UNASSIGNED, rest.rsplit(".", 1)[0], block)


def decisions_used(roles: dict[str, TensorRole]) -> list[dict[str, Any]]:
    """The ROLE_DECISIONS rows a model's tensors use (table order), with tensor counts."""
    counts: dict[str, int] = {}
    for tr in roles.values():
        if tr.kind:
            counts[tr.kind] = counts.get(tr.kind, 0) + 1
    out, seen = [], set()
    for d in (*ROLE_DECISIONS, MTP_BLOCK_LAYER):
        if d.kind in counts and d.kind not in seen:
            seen.add(d.kind)
            out.append({"kind": d.kind, "role": d.role.value, "tensors": counts[d.kind], "reason": d.reason})
    return out


def nextn_blocks(info: ModelInfo) -> frozenset[int]:
    """The MTP/NextN blocks: those holding nextn/mtp tensors, else the last nextn_predict_layers."""
    if info.structure["nextn_blocks"]:
        return frozenset(info.structure["nextn_blocks"])
    n = info.nextn_layers
    if n <= 0:
        return frozenset()
    total = info.block_count
    return frozenset(range(total - n, total))


def classify(info: ModelInfo) -> dict[str, TensorRole]:
    nb = nextn_blocks(info)
    return {t.name: classify_name(t.name, nb) for t in info.tensors}


def require_moe(info: ModelInfo, roles: dict[str, TensorRole] | None = None) -> None:
    """APEX assigns precision by expert role; refuse models without routed experts."""
    roles = roles or classify(info)
    known = [r for r in roles.values() if r.role not in (Role.UNASSIGNED,)]
    if not any(r.role in (Role.ATTENTION, Role.ROUTED_EXPERT, Role.DENSE_FFN, Role.SSM, Role.NEXTN) for r in known):
        raise ModelError(
            f"architecture {info.arch!r} has no tensor apex-orch recognises "
            f"(no attention, expert, FFN or SSM tensors among {len(info.tensors)})",
            where=str(info.path), hint="apex-orch knows llama.cpp's blk.N.<role> tensor names; "
                                       "is this a model GGUF (not an imatrix or mmproj)?")
    if not any(r.role == Role.ROUTED_EXPERT or (r.role == Role.NEXTN and r.slot.startswith("routed_expert."))
               for r in roles.values()):   # an MTP draft file's experts are its head's
        raise DenseModelError(
            f"{info.name} ({info.arch}) is a dense model: it has no routed expert tensors "
            "(ffn_*_exps), so there is nothing for APEX's expert-aware precision to act on",
            where=str(info.path),
            hint="APEX is for Mixture-of-Experts models; quantize dense models with plain "
                 "llama-quantize presets (e.g. Q4_K_M)")
