"""What llama-quantize really writes: a port of the pinned src/llama-quant.cpp rules.

`predict_types` reproduces, tensor by tensor, `llama_tensor_get_type` of the pinned
llama.cpp: which tensors may be quantized at all, manual `--tensor-type` overrides
(first regex_search match wins), the FTYPE's own mixture for tensors without an
override (use_more_bits, attn_v counters, output/embedding rules), and the row-size
fallbacks. Tests compare it with `llama-quantize --dry-run` on every synthetic model
and profile, so a change in a future pin shows up as a failing test, not a wrong file.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from apex_orch.model.gguf_tables import GGML_QUANT_SIZES
from apex_orch.model.gguf_tables import GGMLQuantizationType as T
from apex_orch.model.gguf_tables import LlamaFileType as F

from apex_orch.core.errors import PlanError
from apex_orch.model.info import block_of

# llama-quantize's FTYPE names (tools/quantize/quantize.cpp QUANT_OPTIONS), case-insensitive.
FTYPE_BY_NAME: dict[str, F] = {
    "Q4_0": F.MOSTLY_Q4_0, "Q4_1": F.MOSTLY_Q4_1, "MXFP4_MOE": F.MOSTLY_MXFP4_MOE,
    "Q5_0": F.MOSTLY_Q5_0, "Q5_1": F.MOSTLY_Q5_1, "IQ2_XXS": F.MOSTLY_IQ2_XXS,
    "IQ2_XS": F.MOSTLY_IQ2_XS, "IQ2_S": F.MOSTLY_IQ2_S, "IQ2_M": F.MOSTLY_IQ2_M,
    "IQ1_S": F.MOSTLY_IQ1_S, "IQ1_M": F.MOSTLY_IQ1_M, "TQ1_0": F.MOSTLY_TQ1_0,
    "TQ2_0": F.MOSTLY_TQ2_0, "Q2_K": F.MOSTLY_Q2_K, "Q2_K_S": F.MOSTLY_Q2_K_S,
    "IQ3_XXS": F.MOSTLY_IQ3_XXS, "IQ3_S": F.MOSTLY_IQ3_S, "IQ3_M": F.MOSTLY_IQ3_M,
    "Q3_K": F.MOSTLY_Q3_K_M, "IQ3_XS": F.MOSTLY_IQ3_XS, "Q3_K_S": F.MOSTLY_Q3_K_S,
    "Q3_K_M": F.MOSTLY_Q3_K_M, "Q3_K_L": F.MOSTLY_Q3_K_L, "IQ4_NL": F.MOSTLY_IQ4_NL,
    "IQ4_XS": F.MOSTLY_IQ4_XS, "Q4_K": F.MOSTLY_Q4_K_M, "Q4_K_S": F.MOSTLY_Q4_K_S,
    "Q4_K_M": F.MOSTLY_Q4_K_M, "Q5_K": F.MOSTLY_Q5_K_M, "Q5_K_S": F.MOSTLY_Q5_K_S,
    "Q5_K_M": F.MOSTLY_Q5_K_M, "Q6_K": F.MOSTLY_Q6_K, "Q8_0": F.MOSTLY_Q8_0,
    "F16": F.MOSTLY_F16, "BF16": F.MOSTLY_BF16, "F32": F.ALL_F32,
}



def ftype_label(file_type: object) -> str | None:
    """A GGUF's `general.file_type` as llama.cpp names the FTYPE (MOSTLY_Q4_K_M -> Q4_K_M,
    ALL_F32 -> F32); None when it is not a known value. The one way apex-orch labels it."""
    if isinstance(file_type, bool) or not isinstance(file_type, int):
        return None
    try:
        return F(file_type).name.removeprefix("MOSTLY_").removeprefix("ALL_")
    except ValueError:
        return None


_DEFAULT_TYPE: dict[F, T] = {
    F.MOSTLY_Q4_0: T.Q4_0, F.MOSTLY_Q4_1: T.Q4_1, F.MOSTLY_Q5_0: T.Q5_0, F.MOSTLY_Q5_1: T.Q5_1,
    F.MOSTLY_Q8_0: T.Q8_0, F.MOSTLY_F16: T.F16, F.MOSTLY_BF16: T.BF16, F.ALL_F32: T.F32,
    F.MOSTLY_MXFP4_MOE: T.MXFP4, F.MOSTLY_Q2_K_S: T.Q2_K, F.MOSTLY_Q2_K: T.Q2_K,
    F.MOSTLY_IQ3_XS: T.IQ3_S, F.MOSTLY_Q3_K_S: T.Q3_K, F.MOSTLY_Q3_K_M: T.Q3_K,
    F.MOSTLY_Q3_K_L: T.Q3_K, F.MOSTLY_Q4_K_S: T.Q4_K, F.MOSTLY_Q4_K_M: T.Q4_K,
    F.MOSTLY_Q5_K_S: T.Q5_K, F.MOSTLY_Q5_K_M: T.Q5_K, F.MOSTLY_Q6_K: T.Q6_K,
    F.MOSTLY_TQ1_0: T.TQ1_0, F.MOSTLY_TQ2_0: T.TQ2_0, F.MOSTLY_IQ2_XXS: T.IQ2_XXS,
    F.MOSTLY_IQ2_XS: T.IQ2_XS, F.MOSTLY_IQ2_S: T.IQ2_XS, F.MOSTLY_IQ2_M: T.IQ2_S,
    F.MOSTLY_IQ3_XXS: T.IQ3_XXS, F.MOSTLY_IQ1_S: T.IQ1_S, F.MOSTLY_IQ1_M: T.IQ1_M,
    F.MOSTLY_IQ4_NL: T.IQ4_NL, F.MOSTLY_IQ4_XS: T.IQ4_XS, F.MOSTLY_IQ3_S: T.IQ3_S,
    F.MOSTLY_IQ3_M: T.IQ3_S,
}

NOT_QUANTIZED = {T.F32, T.F16, T.BF16, T.F64, T.I8, T.I16, T.I32, T.I64}

# Types that llama-quantize refuses to write without imatrix data (tensor_requires_imatrix).
IMATRIX_REQUIRED = {T.IQ3_XXS, T.IQ2_XXS, T.IQ2_XS, T.IQ2_S, T.IQ1_M, T.IQ1_S}
# ggml_quantize_requires_imatrix(): ggml itself aborts (GGML_ASSERT) quantizing these types without
# imatrix data for the tensor. tensor_requires_imatrix() exempts token_embd and output from the
# polite check above, so a profile giving them one of these types, with no entry for them (the
# imatrix never has token_embd; output only with --process-output), kills llama-quantize mid-run.
ABORT_WITHOUT_IMATRIX_DATA = {T.IQ2_XXS, T.IQ2_XS, T.IQ1_S}

_IQ_LOW_FTYPES = {F.MOSTLY_IQ2_XXS, F.MOSTLY_IQ2_XS, F.MOSTLY_IQ1_S, F.MOSTLY_IQ2_S,
                  F.MOSTLY_IQ2_M, F.MOSTLY_IQ1_M}


def parse_ftype(name: str) -> F:
    ft = FTYPE_BY_NAME.get(name.upper())
    if ft is None:
        raise PlanError(f"unknown llama-quantize type {name!r}",
                        hint="use one of: " + ", ".join(sorted(FTYPE_BY_NAME)))
    return ft


def default_type(ft: F) -> T:
    return _DEFAULT_TYPE[ft]


def is_quantized(t: T) -> bool:
    return t not in NOT_QUANTIZED


def block_size(t: T) -> int:
    return GGML_QUANT_SIZES[t][0]


# ---------------------------------------------------------------- per-tensor rules

def ggml_n_dims(shape: tuple[int, ...]) -> int:
    """ggml_n_dims(): trailing dimensions of 1 do not count, so a [4096, 1] tensor is 1-D."""
    for i in range(len(shape) - 1, 0, -1):
        if shape[i] > 1:
            return i + 1
    return 1


# tensor_allows_quantization(): names llama-quantize keeps as they are, for one architecture only
_ARCH_BLOCKED = {
    "glm5-next": ("hc_", "indexer.attn_q_b", "indexer.attn_k", "indexer.proj", "indexer_compressor_gate",
                  "indexer_compressor_ape", "ssm_f_a.weight", "ssm_f_b.weight", "ssm_g_a.weight",
                  "ssm_g_b.weight", "ssm_beta.weight", "attn_kv_a_mqa.weight", "attn_k_b.weight",
                  "attn_v_b.weight"),
}


# tensor_allows_quantization(): name parts llama-quantize keeps as they are, for every architecture (one
# regular expression: a plan tests every tensor name of the header against all of them)
_BLOCKED_PARTS = ("_norm.weight", "ffn_gate_inp.weight", "ffn_gate_tid2eid.weight", "altup", "laurel",
                  "per_layer_model_proj", "ssm_conv1d", "shortconv.conv.weight", "indexer.k_proj.weight",
                  "indexer.q_proj.weight", "time_mix_first.weight", "time_mix_w0.weight", "time_mix_w1.weight",
                  "time_mix_w2.weight", "time_mix_v0.weight", "time_mix_v1.weight", "time_mix_v2.weight",
                  "time_mix_a0.weight", "time_mix_a1.weight", "time_mix_a2.weight", "time_mix_g1.weight",
                  "time_mix_g2.weight", "time_mix_decay_w1.weight", "time_mix_decay_w2.weight",
                  "time_mix_lerp_fused.weight", "attn_rel_b.weight", ".position_embd", "sam.pos_embd", "sam.neck.",
                  "sam.net_", ".rel_pos", ".patch_embd", ".patch_merger", "a.rvq.codebook", "mm.a.code_embd")
_BLOCKED = re.compile("|".join(re.escape(part) for part in _BLOCKED_PARTS))


def allows_quantization(name: str, shape: tuple[int, ...] | int, arch: str = "") -> bool:
    """tensor_allows_quantization() of the pinned llama.cpp.

    `shape` is the ggml shape (ne0 first); its dimensions are counted as ggml_n_dims counts them
    (trailing 1s dropped: Qwen2-MoE's `ffn_gate_inp_shexp.weight` [n_embd, 1] is 1-D and stays
    F32). An int is taken as that count already. `arch` adds the per-architecture exclusions.
    """
    n_dims = shape if isinstance(shape, int) else ggml_n_dims(tuple(shape))
    if n_dims < 2 or not name.endswith("weight"):
        return False
    if any(b in name for b in _ARCH_BLOCKED.get(arch, ())):
        return False
    if _BLOCKED.search(name):
        return False
    if name in ("position_embd.weight", "token_types.weight"):
        return False
    return True


def category(name: str) -> str:
    """tensor_get_category(): substring tests, in the same order as the C++."""
    if name == "output.weight":
        return "OUTPUT"
    if name in ("token_embd.weight", "per_layer_token_embd.weight"):
        return "TOKEN_EMBD"
    for frag, cat in (("attn_qkv.weight", "ATTENTION_QKV"), ("attn_kv_b.weight", "ATTENTION_KV_B"),
                      ("attn_v.weight", "ATTENTION_V"), ("attn_k.weight", "ATTENTION_K"),
                      ("attn_q.weight", "ATTENTION_Q"), ("attn_output.weight", "ATTENTION_OUTPUT"),
                      ("ffn_up", "FFN_UP"), ("ffn_gate", "FFN_GATE"), ("ffn_down", "FFN_DOWN")):
        if frag in name:
            return cat
    return "OTHER"


def _is_attn_v(cat: str) -> bool:
    return cat in ("ATTENTION_V", "ATTENTION_QKV", "ATTENTION_KV_B")


def _use_more_bits(i: int, n: int) -> bool:
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def fallback(t: T, ne0: int) -> tuple[T, bool]:
    """tensor_type_fallback(): (type written, whether a fallback happened)."""
    qk = block_size(t)
    if ne0 % qk == 0:
        return t, False
    table = {T.IQ1_S: T.IQ4_NL, T.IQ1_M: T.IQ4_NL, T.IQ2_XXS: T.IQ4_NL, T.IQ2_XS: T.IQ4_NL,
             T.IQ2_S: T.IQ4_NL, T.IQ3_XXS: T.IQ4_NL, T.IQ3_S: T.IQ4_NL, T.IQ4_XS: T.IQ4_NL,
             T.Q2_K: T.Q4_0, T.Q3_K: T.Q4_0, T.TQ1_0: T.Q4_0, T.TQ2_0: T.Q4_0,
             T.Q4_K: T.Q5_0, T.Q5_K: T.Q5_1, T.Q6_K: T.Q8_0}
    out = table.get(t)
    if out is None:
        if qk <= 32:
            out = t
        else:
            raise PlanError(f"llama-quantize has no fallback for type {t.name} with row length {ne0}")
    if ne0 % block_size(out) != 0:
        out = T.F16
    return out, True


@dataclass(frozen=True)
class ModelHParams:
    arch: str
    n_layer: int          # hparams.n_layer_all (block_count, nextn layers included)
    n_expert: int
    n_head: int
    n_head_kv: int

    @property
    def n_gqa(self) -> int:
        return self.n_head // self.n_head_kv if self.n_head_kv else 0


@dataclass(frozen=True)
class TypeDecision:
    name: str
    quantizable: bool
    manual: bool              # an override rule matched
    mixture_type: T | None    # what the FTYPE mixture picked (None when manual / not quantizable)
    chosen: T                 # before fallback
    final: T                  # written
    fell_back: bool
    requires_imatrix: bool


def sort_key(name: str) -> tuple[int, str]:
    """weight_name_comparer: by block number (non-block tensors first), then name."""
    block = block_of(name)
    return (-1 if block is None else block, name)


def predict_types(
    tensors: list[tuple[str, tuple[int, ...], T]],
    hp: ModelHParams,
    ftype: F,
    rules: list[tuple[str, T]],
    *,
    has_imatrix: bool = False,
) -> list[TypeDecision]:
    """Decide every tensor's type as llama_model_quantize_impl does (processing order included).

    `tensors`: (name, ggml shape, current type). `rules`: (pattern as given, type), applied
    lowercased with regex search, first match wins — like llama-quantize.
    """
    base = default_type(ftype)
    ordered = sorted(tensors, key=lambda t: sort_key(t[0]))
    compiled = [(re.compile(p.lower()), t) for p, t in rules]
    cats = {name: category(name) for name, _, _ in ordered}
    n_attention_wv = sum(1 for c in cats.values() if _is_attn_v(c))
    tied = not any(c == "OUTPUT" for c in cats.values())
    state = {"i_attention_wv": 0, "i_ffn_down": 0, "i_ffn_gate": 0, "i_ffn_up": 0}
    out: list[TypeDecision] = []
    for name, shape, cur in ordered:
        if not allows_quantization(name, shape, hp.arch):
            out.append(TypeDecision(name, False, False, None, cur, cur, False, False))
            continue
        new = base
        manual = False
        mixture = None
        fell = False
        if is_quantized(base):
            for rx, rt in compiled:
                if rx.search(name):
                    new, manual = rt, True
                    break
            if not manual:
                new = _mixture(name, shape, new, ftype, cats[name], hp, state, n_attention_wv, tied,
                               has_imatrix)
                mixture = new
            chosen = new
            new, fell = fallback(new, shape[0])
        else:
            chosen = new
        req = (name not in ("token_embd.weight", "per_layer_token_embd.weight", "output.weight")
               and (new in IMATRIX_REQUIRED or (new == T.Q2_K and ftype == F.MOSTLY_Q2_K_S)))
        out.append(TypeDecision(name, True, manual, mixture, chosen, new, fell, req))
    return out


def _mixture(name: str, shape: tuple[int, ...], new: T, ftype: F, cat: str, hp: ModelHParams, st: dict[str, Any],
             n_attention_wv: int, tied: bool, has_imatrix: bool) -> T:
    """llama_tensor_get_type_impl() for one tensor (mutates the counters in `st`)."""
    n_expert = max(1, hp.n_expert)

    def layer_info(counter: str) -> tuple[int, int]:
        n_layer = hp.n_layer
        if n_expert > 1:
            block = block_of(name)
            if block is None:
                raise PlanError(f"llama-quantize cannot determine the layer of {name}")
            return block, n_layer
        return st[counter], n_layer

    if hp.arch == "glm5-next" and any(s in name for s in ("attn_q_a", "attn_q_b", "nextn.eh_proj")):
        if new not in (T.F32, T.BF16, T.F16):
            return T.Q8_0

    if cat == "OUTPUT" or (tied and cat == "TOKEN_EMBD"):
        nx = shape[0]
        if ftype == F.MOSTLY_MXFP4_MOE:
            new = T.Q8_0
        elif hp.arch == "falcon" or nx % block_size(new) != 0:
            new = T.Q8_0
        elif ftype in (F.MOSTLY_IQ2_XXS, F.MOSTLY_IQ2_XS, F.MOSTLY_IQ3_XXS, F.MOSTLY_IQ1_S,
                       F.MOSTLY_IQ2_S, F.MOSTLY_IQ2_M, F.MOSTLY_IQ1_M):
            new = T.Q5_K
        elif new != T.Q8_0:
            new = T.Q6_K
    elif ftype == F.MOSTLY_MXFP4_MOE:
        is_bm3_expert = hp.arch == "bailingmoe3" and cat in ("FFN_UP", "FFN_GATE", "FFN_DOWN")
        if len(shape) > 2 and shape[2] > 1 and (hp.arch != "bailingmoe3" or is_bm3_expert):
            new = T.MXFP4
        else:
            new = T.Q8_0
    elif cat == "TOKEN_EMBD":
        if ftype in (F.MOSTLY_IQ2_XXS, F.MOSTLY_IQ2_XS, F.MOSTLY_IQ1_S, F.MOSTLY_IQ1_M):
            new = T.Q2_K
        elif ftype in (F.MOSTLY_IQ2_S, F.MOSTLY_IQ2_M, F.MOSTLY_IQ3_XXS):
            new = T.IQ3_S
        elif ftype in (F.MOSTLY_TQ1_0, F.MOSTLY_TQ2_0):
            new = T.Q4_K
    elif ftype in _IQ_LOW_FTYPES:
        if _is_attn_v(cat):
            if hp.n_gqa >= 4 or hp.n_expert >= 4:
                new = T.Q4_K
            else:
                new = T.IQ3_S if ftype in (F.MOSTLY_IQ2_S, F.MOSTLY_IQ2_M) else T.Q2_K
            st["i_attention_wv"] += 1
        elif hp.n_expert == 8 and cat == "ATTENTION_K":
            new = T.Q4_K
        elif cat == "FFN_DOWN":
            if st["i_ffn_down"] < hp.n_layer // 8:
                new = T.IQ3_S if ftype in (F.MOSTLY_IQ2_S, F.MOSTLY_IQ2_M) else T.Q2_K
            st["i_ffn_down"] += 1
        elif cat == "ATTENTION_OUTPUT":
            if hp.n_expert == 8:
                new = T.Q5_K
            elif ftype in (F.MOSTLY_IQ1_S, F.MOSTLY_IQ1_M):
                new = T.IQ2_XXS
            elif ftype in (F.MOSTLY_IQ2_S, F.MOSTLY_IQ2_M):
                new = T.IQ3_S
    elif _is_attn_v(cat):
        i, n = st["i_attention_wv"], n_attention_wv
        if ftype == F.MOSTLY_Q2_K:
            new = T.Q4_K if hp.n_gqa >= 4 else T.Q3_K
        elif ftype == F.MOSTLY_Q2_K_S and hp.n_gqa >= 4:
            new = T.Q4_K
        elif ftype == F.MOSTLY_IQ3_XXS:
            new = T.Q4_K if hp.n_gqa >= 4 else (T.IQ3_S if not has_imatrix else T.IQ3_XXS)
        elif ftype in (F.MOSTLY_IQ3_XS, F.MOSTLY_IQ3_S) and hp.n_gqa >= 4:
            new = T.Q4_K
        elif ftype == F.MOSTLY_IQ3_M:
            new = T.Q4_K
        elif ftype == F.MOSTLY_Q3_K_M:
            new = T.Q5_K if i < 2 else T.Q4_K
        elif ftype == F.MOSTLY_Q3_K_L:
            new = T.Q5_K
        elif ftype in (F.MOSTLY_IQ4_NL, F.MOSTLY_IQ4_XS) and hp.n_gqa >= 4:
            new = T.Q5_K
        elif ftype in (F.MOSTLY_Q4_K_M, F.MOSTLY_Q5_K_M) and _use_more_bits(i, n):
            new = T.Q6_K
        elif ftype == F.MOSTLY_Q4_K_S and i < 4:
            new = T.Q5_K
        if hp.arch == "llama" and hp.n_layer == 80 and hp.n_head != hp.n_head_kv:  # LLM_TYPE_70B
            if new in (T.Q3_K, T.Q4_K):
                new = T.Q5_K
        if hp.n_expert == 8:
            new = T.Q8_0
        st["i_attention_wv"] += 1
    elif cat == "ATTENTION_K":
        if hp.n_expert == 8:
            new = T.Q8_0
        elif ftype == F.MOSTLY_IQ3_XS:
            new = T.IQ3_XXS
        elif ftype == F.MOSTLY_IQ3_XXS:
            new = T.IQ2_S
    elif cat == "ATTENTION_Q":
        if ftype == F.MOSTLY_IQ3_XS:
            new = T.IQ3_XXS
        elif ftype == F.MOSTLY_IQ3_XXS:
            new = T.IQ2_S
    elif cat == "FFN_DOWN":
        i_layer, n_layer = layer_info("i_ffn_down")
        falcon = hp.arch == "falcon"
        if ftype == F.MOSTLY_Q2_K:
            new = T.Q3_K
        elif ftype == F.MOSTLY_Q2_K_S:
            if i_layer < n_layer // 8:
                new = T.Q4_K
        elif ftype == F.MOSTLY_IQ3_XXS and not has_imatrix:
            new = T.Q4_K if i_layer < n_layer // 8 else T.Q3_K
        elif ftype == F.MOSTLY_Q3_K_M:
            new = (T.Q5_K if i_layer < n_layer // 16
                   else T.Q4_K if (not falcon or _use_more_bits(i_layer, n_layer)) else T.Q3_K)
        elif ftype == F.MOSTLY_IQ3_M and (i_layer < n_layer // 8 or
                                          (hp.n_expert == 8 and _use_more_bits(i_layer, n_layer))):
            new = T.Q4_K
        elif ftype == F.MOSTLY_Q3_K_L:
            new = T.Q4_K if falcon else T.Q5_K
        elif ftype == F.MOSTLY_Q4_K_M:
            if falcon:
                new = (T.Q6_K if i_layer < n_layer // 16
                       else T.Q5_K if _use_more_bits(i_layer, n_layer) else T.Q4_K)
            elif _use_more_bits(i_layer, n_layer):
                new = T.Q6_K
        elif (i_layer < n_layer // 8 and ftype in (F.MOSTLY_IQ4_NL, F.MOSTLY_IQ4_XS)
              and not has_imatrix):
            new = T.Q5_K
        elif ftype == F.MOSTLY_Q5_K_M and _use_more_bits(i_layer, n_layer):
            new = T.Q6_K
        elif ftype == F.MOSTLY_Q4_K_S and not falcon and i_layer < n_layer // 8:
            new = T.Q5_K
        elif ftype in (F.MOSTLY_Q4_0, F.MOSTLY_Q5_0) and has_imatrix and i_layer < n_layer // 8:
            new = T.Q4_1 if ftype == F.MOSTLY_Q4_0 else T.Q5_1
        st["i_ffn_down"] += 1
    elif cat == "ATTENTION_OUTPUT":
        if hp.arch != "falcon":
            if hp.n_expert == 8:
                if ftype in (F.MOSTLY_Q2_K, F.MOSTLY_IQ3_XS, F.MOSTLY_IQ3_XXS, F.MOSTLY_Q3_K_S,
                             F.MOSTLY_Q3_K_M, F.MOSTLY_IQ4_NL, F.MOSTLY_Q4_K_S, F.MOSTLY_Q4_K_M,
                             F.MOSTLY_IQ3_S, F.MOSTLY_IQ3_M, F.MOSTLY_IQ4_XS):
                    new = T.Q5_K
            else:
                new = {F.MOSTLY_Q2_K: T.Q3_K, F.MOSTLY_IQ3_XXS: T.IQ3_S, F.MOSTLY_Q3_K_M: T.Q4_K,
                       F.MOSTLY_Q3_K_L: T.Q5_K, F.MOSTLY_IQ3_M: T.Q4_K}.get(ftype, new)
        elif ftype == F.MOSTLY_Q3_K_L:
            new = T.Q4_K
    elif cat == "ATTENTION_QKV":
        if ftype in (F.MOSTLY_Q3_K_M, F.MOSTLY_Q3_K_L, F.MOSTLY_IQ3_M):
            new = T.Q4_K
        elif ftype == F.MOSTLY_Q4_K_M:
            new = T.Q5_K
        elif ftype == F.MOSTLY_Q5_K_M:
            new = T.Q6_K
    elif cat in ("FFN_GATE", "FFN_UP"):
        counter = "i_ffn_gate" if cat == "FFN_GATE" else "i_ffn_up"
        i_layer, n_layer = layer_info(counter)
        if ftype == F.MOSTLY_IQ3_XS and n_layer // 8 <= i_layer < 7 * n_layer // 8:
            new = T.IQ3_XXS
        st[counter] += 1
    return new
