"""What a synthetic model is: its spec, the presets, and the tensors it holds (names and shapes).

Takes a SyntheticSpec; gives `tensor_layout(spec, n_vocab)`, the tensors in file order with their
numpy-order shapes (the reverse of ggml's ne) and a role that sets their initial scale.
Kept apart from demo.synthetic, which writes the files: this part is pure data (no numpy, no
gguf), and `validate` refuses a spec the pinned llama.cpp could not load before anything is written.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

ARCHES = ("mistral4", "qwen3moe", "llama")


@dataclass(frozen=True)
class SyntheticSpec:
    # "mistral4" (MLA, deepseek2 loader) | "qwen3moe" (GQA, no shared expert) | "llama" (dense)
    arch: str = "mistral4"
    n_layer: int = 12
    n_embd: int = 256
    n_expert: int = 16               # ignored for "llama"
    n_expert_used: int = 2           # ignored for "llama"
    n_expert_shared: int = 1         # mistral4 only
    expert_ff: int = 256
    dense_ff: int = 512              # leading dense blocks / dense model
    leading_dense: int = 0           # mistral4: leading dense blocks (ffn_gate/up/down) before the MoE ones
    fused_gate_up: bool = False      # mistral4: one ffn_gate_up_exps instead of ffn_gate_exps + ffn_up_exps
    n_head: int = 4
    n_head_kv: int = 2               # GQA arches
    q_lora_rank: int = 128           # MLA
    kv_lora_rank: int = 128          # MLA (attn_v_b ne0) -> not a multiple of 256: exercises fallbacks
    qk_nope: int = 32                # MLA (attn_k_b ne0) -> fallback exercised
    qk_rope: int = 32
    v_head: int = 64
    context: int = 4096
    name: str = "Synthetic-MoE"      # general.name
    seed: int = 0


PRESETS: dict[str, SyntheticSpec] = {
    "mistral4-split": SyntheticSpec(name="Synthetic-Mistral4-Split"),
    "mistral4-fused": SyntheticSpec(fused_gate_up=True, name="Synthetic-Mistral4-Fused"),
    "mistral4-dense-lead": SyntheticSpec(leading_dense=1, name="Synthetic-Mistral4-DenseLead"),
    "qwen3moe": SyntheticSpec(arch="qwen3moe", name="Synthetic-Qwen3MoE"),
    "dense": SyntheticSpec(arch="llama", n_expert=0, n_expert_used=0, n_expert_shared=0,
                           name="Synthetic-Dense"),
}

# Mistral-Small-4-119B-2603 as llama.cpp sees it (its published config and GGUF file set).
MISTRAL_SMALL_4_SPEC = SyntheticSpec(
    arch="mistral4", n_layer=36, n_embd=4096, n_expert=128, n_expert_used=4, n_expert_shared=1,
    expert_ff=2048, dense_ff=12288, leading_dense=0, n_head=32, n_head_kv=1,
    q_lora_rank=1024, kv_lora_rank=256, qk_nope=64, qk_rope=64, v_head=128,
    context=1048576, name="Mistral-Small-4-119B-2603",
)
MISTRAL_SMALL_4_VOCAB = 131072
MISTRAL_SMALL_4_YARN = {"type": "yarn", "factor": 128.0, "original_context_length": 8192}

class TensorPlan(NamedTuple):
    name: str
    shape: tuple[int, ...]   # numpy order
    role: str                # "norm", "router", "embd", "output", "in", "out"


# ----------------------------------------------------------------------------- validation

def validate(spec: SyntheticSpec) -> None:
    """Refuse specs the pinned llama.cpp could not load (ValueError naming the field)."""
    if spec.arch not in ARCHES:
        raise ValueError(f"arch must be one of {ARCHES}, got {spec.arch!r}")
    if spec.n_layer < 1 or spec.n_embd < 1 or spec.n_head < 1:
        raise ValueError("n_layer, n_embd and n_head must be positive")
    if spec.context < 1:
        raise ValueError("context must be positive")
    if spec.arch != "llama":
        if spec.n_expert < 1 or not 1 <= spec.n_expert_used <= spec.n_expert:
            raise ValueError("a MoE spec needs n_expert >= 1 and 1 <= n_expert_used <= n_expert")
        if spec.expert_ff < 1:
            raise ValueError("expert_ff must be positive")
    if spec.arch == "mistral4":
        if spec.n_layer in (26, 27):
            # llama.cpp's deepseek2 loader treats 26/27 blocks as the "lite" variant (no q_lora).
            raise ValueError("mistral4 with 26 or 27 blocks is loaded as DeepSeek-V2-Lite; pick another n_layer")
        if not 0 <= spec.leading_dense < spec.n_layer:
            raise ValueError("leading_dense must be in [0, n_layer)")
        if spec.n_expert_shared < 1:
            raise ValueError("mistral4 needs n_expert_shared >= 1 (the loader requires ffn_*_shexp)")
        if min(spec.q_lora_rank, spec.kv_lora_rank, spec.qk_nope, spec.qk_rope, spec.v_head) < 1:
            raise ValueError("MLA ranks and head dims must be positive")
        if spec.qk_rope % 2:
            raise ValueError("qk_rope must be even")
        if spec.leading_dense and spec.dense_ff < 1:
            raise ValueError("dense_ff must be positive when there are leading dense blocks")
    else:
        if spec.leading_dense:
            raise ValueError("leading_dense is only supported for mistral4")
        if spec.fused_gate_up:
            # The pinned qwen3moe loader requires ffn_gate_exps + ffn_up_exps.
            raise ValueError("fused_gate_up is only supported for mistral4 (the qwen3moe loader needs split experts)")
        if spec.n_embd % spec.n_head:
            raise ValueError("n_embd must be a multiple of n_head")
        if spec.n_head_kv < 1 or spec.n_head % spec.n_head_kv:
            raise ValueError("n_head must be a multiple of n_head_kv")
        if (spec.n_embd // spec.n_head) % 2:
            raise ValueError("the head dimension n_embd / n_head must be even (RoPE)")
        if spec.arch == "llama" and spec.dense_ff < 1:
            raise ValueError("dense_ff must be positive")


# ----------------------------------------------------------------------------- layout

def tensor_layout(spec: SyntheticSpec, n_vocab: int) -> list[TensorPlan]:
    """Every tensor of the model, in file order (validates the spec first)."""
    validate(spec)
    E, V = spec.n_embd, n_vocab
    out: list[TensorPlan] = [TensorPlan("token_embd.weight", (V, E), "embd")]
    for i in range(spec.n_layer):
        p = f"blk.{i}."
        if spec.arch == "mistral4":
            out += _mistral4_block(spec, p, i)
        elif spec.arch == "qwen3moe":
            out += _gqa_attention(spec, p) + _routed_experts(spec, p)
        else:
            out += _gqa_attention(spec, p) + _dense_ffn(p, E, spec.dense_ff)
    out += [TensorPlan("output_norm.weight", (E,), "norm"),
            TensorPlan("output.weight", (V, E), "output")]
    return out


def _mistral4_block(spec: SyntheticSpec, p: str, i: int) -> list[TensorPlan]:
    E, H = spec.n_embd, spec.n_head
    k_mla = spec.qk_nope + spec.qk_rope
    block = [
        TensorPlan(p + "attn_norm.weight", (E,), "norm"),
        TensorPlan(p + "attn_q_a_norm.weight", (spec.q_lora_rank,), "norm"),
        TensorPlan(p + "attn_kv_a_norm.weight", (spec.kv_lora_rank,), "norm"),
        TensorPlan(p + "ffn_norm.weight", (E,), "norm"),
        TensorPlan(p + "attn_q_a.weight", (spec.q_lora_rank, E), "in"),
        TensorPlan(p + "attn_q_b.weight", (H * k_mla, spec.q_lora_rank), "in"),
        TensorPlan(p + "attn_kv_a_mqa.weight", (spec.kv_lora_rank + spec.qk_rope, E), "in"),
        TensorPlan(p + "attn_k_b.weight", (H, spec.kv_lora_rank, spec.qk_nope), "in"),
        TensorPlan(p + "attn_v_b.weight", (H, spec.v_head, spec.kv_lora_rank), "in"),
        TensorPlan(p + "attn_output.weight", (E, H * spec.v_head), "out"),
    ]
    if i < spec.leading_dense:
        return block + _dense_ffn(p, E, spec.dense_ff, with_norm=False)
    shared_ff = spec.expert_ff * spec.n_expert_shared
    return block + _routed_experts(spec, p, with_norm=False) + [
        TensorPlan(p + "ffn_gate_shexp.weight", (shared_ff, E), "in"),
        TensorPlan(p + "ffn_up_shexp.weight", (shared_ff, E), "in"),
        TensorPlan(p + "ffn_down_shexp.weight", (E, shared_ff), "out"),
    ]


def _gqa_attention(spec: SyntheticSpec, p: str) -> list[TensorPlan]:
    E, H, HKV = spec.n_embd, spec.n_head, spec.n_head_kv
    hd = E // H
    block = [
        TensorPlan(p + "attn_norm.weight", (E,), "norm"),
        TensorPlan(p + "attn_q.weight", (H * hd, E), "in"),
        TensorPlan(p + "attn_k.weight", (HKV * hd, E), "in"),
        TensorPlan(p + "attn_v.weight", (HKV * hd, E), "in"),
        TensorPlan(p + "attn_output.weight", (E, H * hd), "out"),
    ]
    if spec.arch == "qwen3moe":
        block += [TensorPlan(p + "attn_q_norm.weight", (hd,), "norm"),
                  TensorPlan(p + "attn_k_norm.weight", (hd,), "norm")]
    return block


def _dense_ffn(p: str, E: int, ff: int, with_norm: bool = True) -> list[TensorPlan]:
    norm = [TensorPlan(p + "ffn_norm.weight", (E,), "norm")] if with_norm else []
    return norm + [
        TensorPlan(p + "ffn_gate.weight", (ff, E), "in"),
        TensorPlan(p + "ffn_up.weight", (ff, E), "in"),
        TensorPlan(p + "ffn_down.weight", (E, ff), "out"),
    ]


def _routed_experts(spec: SyntheticSpec, p: str, with_norm: bool = True) -> list[TensorPlan]:
    E, X, F = spec.n_embd, spec.n_expert, spec.expert_ff
    norm = [TensorPlan(p + "ffn_norm.weight", (E,), "norm")] if with_norm else []
    gate_up = ([TensorPlan(p + "ffn_gate_up_exps.weight", (X, 2 * F, E), "in")] if spec.fused_gate_up else
               [TensorPlan(p + "ffn_gate_exps.weight", (X, F, E), "in"),
                TensorPlan(p + "ffn_up_exps.weight", (X, F, E), "in")])
    return norm + [TensorPlan(p + "ffn_gate_inp.weight", (X, E), "router")] + gate_up + [
        TensorPlan(p + "ffn_down_exps.weight", (X, E, F), "out")]
