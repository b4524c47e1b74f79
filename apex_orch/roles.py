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

from apex_orch.errors import DenseModelError, ModelError
from apex_orch.model import ModelInfo


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
    NEXTN = "nextn"
    UNASSIGNED = "unassigned"

    def __str__(self) -> str:
        return self.value


# Roles a profile may give a type to (router and norm are never quantized by llama.cpp).
TYPEABLE_ROLES = (Role.ROUTED_EXPERT, Role.SHARED_EXPERT, Role.DENSE_FFN, Role.ATTENTION, Role.SSM,
                  Role.EMBEDDING, Role.OUTPUT, Role.NEXTN)
NEVER_QUANTIZED_ROLES = (Role.ROUTER, Role.NORM)

ATTENTION_SLOTS = ("q", "k", "v", "qkv", "output", "gate", "q_a", "q_b", "kv_a_mqa", "kv_b", "k_b",
                   "v_b", "sinks")
EXPERT_SLOTS = ("gate", "up", "gate_up", "down")

_RULES: list[tuple[re.Pattern, Role, str | None]] = [
    (re.compile(r"^ffn_(gate_up|gate|up|down)_exps\.(weight|bias|scale)$"), Role.ROUTED_EXPERT, None),
    (re.compile(r"^ffn_(gate|up|down)_shexp\.(weight|bias|scale)$"), Role.SHARED_EXPERT, None),
    (re.compile(r"^ffn_gate_inp(_shexp)?\.(weight|bias)$"), Role.ROUTER, "gate_inp"),
    (re.compile(r"^exp_probs_b\.bias$"), Role.ROUTER, "exp_probs_b"),
    (re.compile(r"^ffn_(gate_up|gate|up|down)\.(weight|bias)$"), Role.DENSE_FFN, None),
    (re.compile(r"^.*_norm(_\d+)?\.(weight|bias)$"), Role.NORM, "norm"),
    (re.compile(r"^attn_(" + "|".join(ATTENTION_SLOTS) + r")\.(weight|bias)$"), Role.ATTENTION, None),
    (re.compile(r"^ssm_([a-z0-9_]+)\.(weight|bias)$"), Role.SSM, None),
    (re.compile(r"^(nextn|mtp)\.([a-z0-9_.]+)$"), Role.NEXTN, None),
]

_BLOCK_RE = re.compile(r"^blk\.(\d+)\.(.+)$")


@dataclass(frozen=True)
class TensorRole:
    role: Role
    slot: str          # e.g. "down", "kv_a_mqa", "token_embd"
    block: int | None


def classify_name(name: str, nextn_blocks: frozenset[int] = frozenset()) -> TensorRole:
    if name == "token_embd.weight" or name == "per_layer_token_embd.weight":
        return TensorRole(Role.EMBEDDING, "token_embd", None)
    if name in ("output.weight", "output.bias"):
        return TensorRole(Role.OUTPUT, "output", None)
    m = _BLOCK_RE.match(name)
    if not m:
        if re.match(r"^.*_norm\.(weight|bias)$", name):
            return TensorRole(Role.NORM, "norm", None)
        return TensorRole(Role.UNASSIGNED, name, None)
    block, rest = int(m.group(1)), m.group(2)
    for rx, role, fixed_slot in _RULES:
        mm = rx.match(rest)
        if mm:
            slot = fixed_slot or mm.group(1)
            if block in nextn_blocks and role not in (Role.NORM, Role.ROUTER):
                return TensorRole(Role.NEXTN, f"{role.value}.{slot}" if role != Role.NEXTN else slot, block)
            return TensorRole(role, slot, block)
    if block in nextn_blocks:
        return TensorRole(Role.NEXTN, rest.rsplit(".", 1)[0], block)
    return TensorRole(Role.UNASSIGNED, rest.rsplit(".", 1)[0], block)


def nextn_blocks(info: ModelInfo) -> frozenset[int]:
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
    if not any(r.role in (Role.ATTENTION, Role.ROUTED_EXPERT, Role.DENSE_FFN, Role.SSM) for r in known):
        raise ModelError(
            f"architecture {info.arch!r} has no tensor apex-orch recognises "
            f"(no attention, expert, FFN or SSM tensors among {len(info.tensors)})",
            where=str(info.path), hint="apex-orch knows llama.cpp's blk.N.<role> tensor names; "
                                       "is this a model GGUF (not an imatrix or mmproj)?")
    if not any(r.role == Role.ROUTED_EXPERT for r in roles.values()):
        raise DenseModelError(
            f"{info.name} ({info.arch}) is a dense model: it has no routed expert tensors "
            "(ffn_*_exps), so there is nothing for APEX's expert-aware precision to act on",
            where=str(info.path),
            hint="APEX is for Mixture-of-Experts models; quantize dense models with plain "
                 "llama-quantize presets (e.g. Q4_K_M)")
