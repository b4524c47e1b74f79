"""`inspect`: a model's MoE anatomy from its header, as a value and as text."""

from __future__ import annotations

from apex_orch.core.text import gb, gib, human_count, printable, table
from apex_orch.model.info import ModelInfo
from apex_orch.model.roles import Role, classify, decisions_used


def inspect_model(info: ModelInfo) -> dict:
    roles = classify(info)
    per_role: dict[str, dict] = {}
    for t in info.tensors:
        r = per_role.setdefault(roles[t.name].role.value, {"tensors": 0, "params": 0, "bytes": 0})
        r["tensors"] += 1
        r["params"] += t.n_elements
        r["bytes"] += t.n_bytes
    return {
        "path": [str(p) for p in info.paths],
        "name": info.name,
        "architecture": info.arch,
        "blocks": info.block_count,
        "embedding_length": info.embedding_length,
        "experts": {"routed": info.expert_count, "used": info.expert_used_count,
                    "shared": info.expert_shared_count},
        "leading_dense_blocks": info.leading_dense_blocks,
        "nextn_layers": info.nextn_layers,
        "mtp_draft": info.is_mtp_draft,
        "attention": {"kind": info.attention_kind, "heads": info.head_count, "kv_heads": info.head_count_kv,
                      "q_lora_rank": info.q_lora_rank, "kv_lora_rank": info.kv_lora_rank,
                      "key_length_mla": info.arch_kv("attention.key_length_mla"),
                      "value_length_mla": info.arch_kv("attention.value_length_mla")},
        "context_length": info.context_length,
        "rope": info.rope_scaling,
        "vocab_size": info.vocab_size,
        "total_parameters": info.total_parameters,
        "active_parameters": info.active_parameters,
        "active_parameters_counts": ("all tensors, routed-expert tensors scaled by used/routed experts, "
                                     "token_embd as one row (a lookup) when an untied output exists"),
        "file_size": info.file_size,
        "source_type": info.source_ftype_label,
        "roles": per_role,
        "role_decisions": decisions_used(roles),
        "structure": info.structure,
        "warnings": list(info.structure_warnings),
        "tensor_count": len(info.tensors),
    }


def format_inspect(d: dict) -> str:
    e = d["experts"]
    a = d["attention"]
    att = a["kind"]
    if a["q_lora_rank"] or a["kv_lora_rank"]:
        att += f" (q_lora_rank {a['q_lora_rank']}, kv_lora_rank {a['kv_lora_rank']}, heads {a['heads']})"
    elif a["heads"]:
        att += f" (heads {a['heads']}, kv heads {a['kv_heads']})"
    rope = ", ".join(f"{k.replace('rope.', '')}={printable(v)}" for k, v in d["rope"].items()) or "-"
    lines = [
        f"model            {printable(d['name'])}  [{printable(d['architecture'])}]",
        f"file             {printable(', '.join(d['path']))} ({gb(d['file_size'])}, mostly {d['source_type']})",
        f"blocks           {d['blocks'] - d['nextn_layers']}"
        + (f" ({d['leading_dense_blocks']} leading dense)" if d["leading_dense_blocks"] else "")
        + (f" + {d['nextn_layers']} MTP/nextn" if d["nextn_layers"] else "")
        + ("  (MTP draft file: only the MTP block(s), to load beside the full model)" if d["mtp_draft"] else ""),
        f"embedding        {d['embedding_length']}   vocab {d['vocab_size']}",
        f"experts          {e['routed']} routed, {e['used']} used per token, {e['shared']} shared",
        f"attention        {att}",
        f"context          {d['context_length']}   rope: {rope}",
        f"parameters       {human_count(d['total_parameters'])} total, {human_count(d['active_parameters'])} active per token",
        "",
    ]
    rows = [[role, str(r["tensors"]), human_count(r["params"]), gib(r["bytes"])]
            for role, r in sorted(d["roles"].items(), key=lambda kv: -kv[1]["bytes"])]
    lines.append(table(["role", "tensors", "params", "size"], rows))
    decisions = d.get("role_decisions") or []
    if decisions:
        lines.append("")
        lines.append("roles by tensor kind (apex_orch/model/roles.py ROLE_DECISIONS):")
        lines.append(table(["kind", "role", "tensors", "why"],
                           [[k["kind"], k["role"], str(k["tensors"]), k["reason"]] for k in decisions],
                           align="llrl"))
    for w in d.get("warnings") or []:
        lines.append(f"warning: {printable(w)}")
    if Role.UNASSIGNED.value in d["roles"]:
        lines.append("note: 'unassigned' tensors match no APEX role; plans leave them to the base FTYPE mixture")
    return "\n".join(lines)
