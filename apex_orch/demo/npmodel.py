"""The mistral4 MoE (llama.cpp's deepseek2 graph: MLA + routed top-k experts + a shared expert)
in numpy, forward and a hand-written backward, so the base install (no torch) can train it.

It computes what bench/reference_model/model.py computes in PyTorch (and that what llama.cpp
computes), block by block, pre-norm, RMSNorm eps `synthetic.RMS_EPS`:
  attention (MLA):
    q      = attn_q_b( attn_q_a_norm( attn_q_a(x) ) )            -> [n_head, qk_nope + qk_rope]
    kv     = attn_kv_a_mqa(x) = [c (kv_lora_rank), k_pe (qk_rope)];  c = attn_kv_a_norm(c)
    k_nope = c @ attn_k_b[h];  v = attn_v_b[h] @ c
    RoPE in ggml's normal mode (adjacent pairs rotate) on q_pe and the one shared k_pe,
    scale 1/sqrt(qk_nope + qk_rope), causal softmax, attn_output.
  MoE FFN:
    probs = softmax(ffn_gate_inp(h)); the top-k experts (ties: the lower index); their weights
    renormalised to sum 1 (the sum clamped below at WEIGHT_SUM_MIN, as llama.cpp does);
    SwiGLU experts ffn_{gate,up,down}_exps, plus the always-on shared expert ffn_*_shexp.
Output: output_norm, then the untied `output` projection.
Training loss: mean next-token cross-entropy + aux_coef * the Switch-style load-balancing loss
averaged over blocks, n_expert * sum_e(frac_e * mean_n probs[n, e]), where frac_e (the share of
routed slots expert e got) is a count and carries no gradient.

Parameters are a dict keyed by GGUF tensor name, in the numpy shapes `synthetic.tensor_shapes()`
gives (the reverse of ggml's ne), so export is `synthetic.write_model(path, spec, weights=params)`.

Precision, and why float64 is the default: float64 makes *exact* numerics possible (npmath).
A training run is chaotic: two float64 runs whose initial weights differed by one ulp ended, after
200 steps, with 98% of their weights rounding to a different F16 (measured; float32 alike). So
precision alone does not make a trained file reproducible; any last-bit difference between two
machines grows. And last bits do differ: numpy's BLAS picks its GEMM kernel by CPU (four
OpenBLAS kernels gave four different float64 products, measured) and by thread count, and numpy's
exp/log/sin/cos are dispatched by CPU. With float64 parameters (`exact` None or True) every
matrix product goes through npmath.matmul, which rounds its operands to integers small enough
that the product is computed exactly (so the same bits on any BLAS kernel, any thread count),
and exp/log/sin/cos through npmath's polynomials (+ - * / only); the rest is elementwise IEEE
arithmetic and numpy's fixed-order sums. The same inputs then give the same bits on every x86
machine (and any IEEE-754 one). The operand rounding costs precision: ~21 bits per matrix row,
about float32's (the PyTorch reference trains in bf16, 8 bits). `exact=False` computes with
numpy's own matmul/exp (float64 or float32): faster, machine-dependent in the last bits, and
what the finite-difference gradient check needs (exact rounding makes the loss a step function
at the 1e-7 scale).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from apex_orch.demo import npmath
from apex_orch.demo.spec import SyntheticSpec, validate
from apex_orch.demo.synthetic import RMS_EPS, ROPE_FREQ_BASE

WEIGHT_SUM_MIN = 6.103515625e-5  # llama.cpp clamps the top-k weight sum to the smallest F16 normal

Params = Mapping[str, np.ndarray]


@dataclass(frozen=True)
class Dims:
    """The sizes the computation needs, from a mistral4 spec (see `dims`)."""
    n_layer: int
    n_embd: int
    n_head: int
    q_lora: int
    kv_lora: int
    nope: int
    rope: int
    v_head: int
    n_expert: int
    n_used: int
    expert_ff: int
    shared_ff: int


def dims(spec: SyntheticSpec) -> Dims:
    """The model's sizes; ValueError for a spec this module does not compute (only mistral4 with
    split gate/up experts and no leading dense blocks)."""
    if spec.arch != "mistral4":
        raise ValueError(f"the numpy model computes arch mistral4, not {spec.arch!r}")
    if spec.leading_dense or spec.fused_gate_up:
        raise ValueError("the numpy model has no leading dense blocks and no fused gate/up experts")
    validate(spec)
    return Dims(spec.n_layer, spec.n_embd, spec.n_head, spec.q_lora_rank, spec.kv_lora_rank, spec.qk_nope,
                spec.qk_rope, spec.v_head, spec.n_expert, spec.n_expert_used, spec.expert_ff,
                spec.expert_ff * spec.n_expert_shared)


class Numerics:
    """The operations whose results differ between machines, in one of two implementations:
    exact (npmath: the same bits everywhere, float64 only) or numpy's own (fast)."""

    def __init__(self, exact: bool):
        self.exact = exact
        self.mm = npmath.matmul if exact else np.matmul
        self.exp = npmath.exp if exact else np.exp
        self.log = npmath.log if exact else np.log

    def sincos(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return npmath.sincos(x) if self.exact else (np.sin(x), np.cos(x))


def numerics(dtype, exact: bool | None = None) -> Numerics:
    """exact None: exact for float64, numpy's own for float32 (exact needs float64's 53 bits)."""
    is64 = np.dtype(dtype) == np.float64
    if exact and not is64:
        raise ValueError("exact numerics need float64 parameters")
    return Numerics(is64 if exact is None else exact)


def rope_tables(n_rot: int, seq_len: int, dtype=np.float64,
                nm: Numerics | None = None) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin [seq_len, n_rot/2] as ggml_rope_ext computes them (freq_scale 1, no YaRN)."""
    nm = nm or numerics(dtype)
    inv = nm.exp(np.arange(0, n_rot, 2, dtype=np.float64) * (-nm.log(np.array(ROPE_FREQ_BASE)) / n_rot))
    ang = np.arange(seq_len, dtype=np.float64)[:, None] * inv[None, :]
    sin, cos = nm.sincos(ang)
    return cos.astype(dtype), sin.astype(dtype)


# ----------------------------------------------------------------------------- pieces

def _rms(x: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """RMSNorm over the last axis: (y, r) with r = 1/sqrt(mean(x^2) + eps), kept for backward."""
    r = 1.0 / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + RMS_EPS)
    return x * r * w, r


def _rms_back(dy: np.ndarray, x: np.ndarray, w: np.ndarray, r: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(dx, dw) of y = x * r * w."""
    xr = x * r
    dw = (dy * xr).reshape(-1, w.shape[0]).sum(axis=0)
    g = dy * w
    dx = r * (g - xr * np.mean(g * xr, axis=-1, keepdims=True))
    return dx, dw


def _rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """Rotate adjacent pairs (x[2i], x[2i+1]) by the angle of their position (ggml normal mode).
    x [..., n_rot]; cos/sin broadcast against x[..., ::2]."""
    x0, x1 = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2] = x0 * cos - x1 * sin
    out[..., 1::2] = x0 * sin + x1 * cos
    return out


def _rope_back(dy: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """The transpose of `_rope` (a rotation: rotate back)."""
    d0, d1 = dy[..., 0::2], dy[..., 1::2]
    out = np.empty_like(dy)
    out[..., 0::2] = d0 * cos + d1 * sin
    out[..., 1::2] = d1 * cos - d0 * sin
    return out


def _sigmoid(nm: Numerics, x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):   # exp overflows to inf for x << 0: the result is 0, as it should be
        return 1.0 / (1.0 + nm.exp(-x))


def _softmax(nm: Numerics, x: np.ndarray) -> np.ndarray:
    e = nm.exp(x - x.max(axis=-1, keepdims=True))
    e /= e.sum(axis=-1, keepdims=True)
    return e


def _swiglu_back(da: np.ndarray, g: np.ndarray, u: np.ndarray, sg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(dg, du) of a = silu(g) * u, with sg = sigmoid(g)."""
    return da * u * sg * (1.0 + g * (1.0 - sg)), da * g * sg


# ----------------------------------------------------------------------------- attention

def _attention(nm: Numerics, p: Params, pre: str, d: Dims, x: np.ndarray, B: int, T: int,
               cos: np.ndarray, sin: np.ndarray) -> tuple[np.ndarray, dict]:
    """x [B*T, E] (already attn_norm'ed) -> (attention output [B*T, E], cache for backward)."""
    H, nope, rope, C = d.n_head, d.nope, d.rope, d.kv_lora
    N, mm = B * T, nm.mm
    # Products that share an operand are one product (fewer, larger matmuls): x @ [q_a; kv_a]^T,
    # and the latent's up-projections c @ [k_b | v_b] ([C, H*nope] and [C, H*v_head] side by side).
    w_in = np.concatenate((p[pre + "attn_q_a.weight"], p[pre + "attn_kv_a_mqa.weight"]))
    qkv = mm(x, w_in.T)
    qa, kv = qkv[:, :d.q_lora], qkv[:, d.q_lora:]
    qan, r_qa = _rms(qa, p[pre + "attn_q_a_norm.weight"])
    q = mm(qan, p[pre + "attn_q_b.weight"].T).reshape(B, T, H, nope + rope)
    cr = kv[:, :C]
    c, r_c = _rms(cr, p[pre + "attn_kv_a_norm.weight"])
    w_up = np.concatenate((p[pre + "attn_k_b.weight"].transpose(1, 0, 2).reshape(C, H * nope),
                           p[pre + "attn_v_b.weight"].transpose(2, 0, 1).reshape(C, H * d.v_head)), axis=1)
    kv_up = mm(c, w_up)
    k_nope = kv_up[:, :H * nope].reshape(B, T, H, nope)
    v = kv_up[:, H * nope:].reshape(B, T, H, d.v_head)
    q_pe = _rope(q[..., nope:], cos[:T, None, :], sin[:T, None, :])
    k_pe = _rope(kv[:, C:].reshape(B, T, rope), cos[:T], sin[:T])
    qh = np.concatenate((q[..., :nope], q_pe), axis=-1).transpose(0, 2, 1, 3)         # B,H,T,D
    kh = np.concatenate((k_nope, np.broadcast_to(k_pe[:, :, None, :], (B, T, H, rope))),
                        axis=-1).transpose(0, 2, 1, 3)
    vh = v.transpose(0, 2, 1, 3)                                                       # B,H,T,Vh
    scale = 1.0 / math.sqrt(nope + rope)
    s = mm(qh, kh.transpose(0, 1, 3, 2)) * scale
    s[:, :, np.triu(np.ones((T, T), dtype=bool), 1)] = -np.inf
    prob = _softmax(nm, s)
    y = mm(prob, vh).transpose(0, 2, 1, 3).reshape(N, H * d.v_head)
    out = mm(y, p[pre + "attn_output.weight"].T)
    cache = dict(x=x, w_in=w_in, qa=qa, r_qa=r_qa, qan=qan, cr=cr, r_c=r_c, c=c, w_up=w_up,
                 qh=qh, kh=kh, vh=vh, prob=prob, y=y, scale=scale)
    return out, cache


def _attention_back(nm: Numerics, p: Params, pre: str, d: Dims, dout: np.ndarray, cc: dict, B: int, T: int,
                    cos: np.ndarray, sin: np.ndarray, g: dict) -> np.ndarray:
    """Gradients of the attention's weights into g; returns d(input x)."""
    H, nope, rope, C, Vh = d.n_head, d.nope, d.rope, d.kv_lora, d.v_head
    N, mm = B * T, nm.mm
    x = cc["x"]
    g[pre + "attn_output.weight"] = mm(dout.T, cc["y"])
    dy = mm(dout, p[pre + "attn_output.weight"]).reshape(B, T, H, Vh).transpose(0, 2, 1, 3)
    prob = cc["prob"]
    dvh = mm(prob.transpose(0, 1, 3, 2), dy)
    dprob = mm(dy, cc["vh"].transpose(0, 1, 3, 2))
    ds = prob * (dprob - np.sum(dprob * prob, axis=-1, keepdims=True)) * cc["scale"]
    dq = mm(ds, cc["kh"]).transpose(0, 2, 1, 3)                                         # B,T,H,D
    dk = mm(ds.transpose(0, 1, 3, 2), cc["qh"]).transpose(0, 2, 1, 3)
    dq_pe = _rope_back(dq[..., nope:], cos[:T, None, :], sin[:T, None, :])
    dk_pe = _rope_back(dk[..., nope:].sum(axis=2), cos[:T], sin[:T])                    # shared by the heads
    d_up = np.concatenate((dk[..., :nope].reshape(N, H * nope), dvh.transpose(0, 2, 1, 3).reshape(N, H * Vh)), axis=1)
    dw_up = mm(cc["c"].T, d_up)
    g[pre + "attn_k_b.weight"] = dw_up[:, :H * nope].reshape(C, H, nope).transpose(1, 0, 2)
    g[pre + "attn_v_b.weight"] = dw_up[:, H * nope:].reshape(C, H, Vh).transpose(1, 2, 0)
    dc = mm(d_up, cc["w_up"].T)
    dcr, g[pre + "attn_kv_a_norm.weight"] = _rms_back(dc, cc["cr"], p[pre + "attn_kv_a_norm.weight"], cc["r_c"])
    dq_all = np.concatenate((dq[..., :nope], dq_pe), axis=-1).reshape(N, H * (nope + rope))
    g[pre + "attn_q_b.weight"] = mm(dq_all.T, cc["qan"])
    dqan = mm(dq_all, p[pre + "attn_q_b.weight"])
    dqa, g[pre + "attn_q_a_norm.weight"] = _rms_back(dqan, cc["qa"], p[pre + "attn_q_a_norm.weight"], cc["r_qa"])
    d_in = np.concatenate((dqa, dcr, dk_pe.reshape(N, rope)), axis=1)
    dw_in = mm(d_in.T, x)
    g[pre + "attn_q_a.weight"], g[pre + "attn_kv_a_mqa.weight"] = dw_in[:d.q_lora], dw_in[d.q_lora:]
    return mm(d_in, cc["w_in"])


# ----------------------------------------------------------------------------- MoE

EXPERT_WEIGHTS = ("ffn_gate_exps.weight", "ffn_up_exps.weight", "ffn_down_exps.weight")


def _moe(nm: Numerics, p: Params, pre: str, d: Dims, h: np.ndarray) -> tuple[np.ndarray, float, dict]:
    """h [N, E] (already ffn_norm'ed) -> (output [N, E], aux loss, cache). The cache holds the
    routing too: "counts" [n_expert] and "margin" [N] (probability of the last chosen expert
    minus the best unchosen one: where it is tiny, rounding elsewhere can pick another expert)."""
    X, K = d.n_expert, d.n_used
    N, mm = h.shape[0], nm.mm
    probs = _softmax(nm, mm(h, p[pre + "ffn_gate_inp.weight"].T))
    order = np.argsort(-probs, axis=1, kind="stable")      # ties: the lower expert index first
    top_i = order[:, :K]
    p_sel = np.take_along_axis(probs, top_i, axis=1)
    s = p_sel.sum(axis=1, keepdims=True)
    sc = np.maximum(s, WEIGHT_SUM_MIN)
    w = p_sel / sc
    margin = (p_sel[:, K - 1] - np.take_along_axis(probs, order[:, K:K + 1], axis=1)[:, 0]
              if X > K else np.ones(N, dtype=h.dtype))
    flat_e = top_i.reshape(-1)
    perm = np.argsort(flat_e, kind="stable")
    counts = np.bincount(flat_e, minlength=X)
    tok = perm // K
    wf = w.reshape(-1)[perm]
    gates, ups, downs = (p[pre + n] for n in EXPERT_WEIGHTS)
    out = np.zeros_like(h)
    experts: list[Any] = []
    start = 0
    for e in range(X):
        n = int(counts[e])
        if not n:
            experts.append(None)
            continue
        te = tok[start:start + n]            # distinct tokens: an expert is chosen once per token
        xe = h[te]
        w_gu = np.concatenate((gates[e], ups[e]))
        gu = mm(xe, w_gu.T)
        ge, ue = gu[:, :d.expert_ff], gu[:, d.expert_ff:]
        sg = _sigmoid(nm, ge)
        a = ge * sg * ue
        oe = mm(a, downs[e].T)
        out[te] += wf[start:start + n, None] * oe
        experts.append((start, n, te, xe, w_gu, ge, ue, sg, a, oe))
        start += n
    w_sh = np.concatenate((p[pre + "ffn_gate_shexp.weight"], p[pre + "ffn_up_shexp.weight"]))
    gus = mm(h, w_sh.T)
    gs, us = gus[:, :d.shared_ff], gus[:, d.shared_ff:]
    sgs = _sigmoid(nm, gs)
    a_sh = gs * sgs * us
    out += mm(a_sh, p[pre + "ffn_down_shexp.weight"].T)
    frac = counts.astype(h.dtype) / (N * K)
    aux = float(X * np.sum(frac * probs.mean(axis=0)))
    cache = dict(h=h, probs=probs, top_i=top_i, p_sel=p_sel, s=s, sc=sc, perm=perm, wf=wf, frac=frac,
                 experts=experts, w_sh=w_sh, gs=gs, us=us, sgs=sgs, a_sh=a_sh, counts=counts, margin=margin)
    return out, aux, cache


def _moe_back(nm: Numerics, p: Params, pre: str, d: Dims, dout: np.ndarray, cc: dict, daux: float,
              g: dict) -> np.ndarray:
    """Gradients of the MoE weights into g (daux: d loss / d this block's aux); returns d(input h)."""
    X, K = d.n_expert, d.n_used
    h, mm = cc["h"], nm.mm
    N = h.shape[0]
    g[pre + "ffn_down_shexp.weight"] = mm(dout.T, cc["a_sh"])
    dgu = np.concatenate(_swiglu_back(mm(dout, p[pre + "ffn_down_shexp.weight"]), cc["gs"], cc["us"], cc["sgs"]),
                         axis=1)
    dw = mm(dgu.T, h)
    g[pre + "ffn_gate_shexp.weight"], g[pre + "ffn_up_shexp.weight"] = dw[:d.shared_ff], dw[d.shared_ff:]
    dh = mm(dgu, cc["w_sh"])

    downs = p[pre + EXPERT_WEIGHTS[2]]
    dgates, dups, ddowns = (np.zeros_like(p[pre + n]) for n in EXPERT_WEIGHTS)
    dwf = np.zeros(N * K, dtype=h.dtype)
    wf = cc["wf"]
    for e, ex in enumerate(cc["experts"]):
        if ex is None:
            continue
        start, n, te, xe, w_gu, ge, ue, sg, a, oe = ex
        do = dout[te]
        dwf[start:start + n] = np.sum(do * oe, axis=1)
        doe = do * wf[start:start + n, None]
        ddowns[e] = mm(doe.T, a)
        dgu = np.concatenate(_swiglu_back(mm(doe, downs[e]), ge, ue, sg), axis=1)
        dw = mm(dgu.T, xe)
        dgates[e], dups[e] = dw[:d.expert_ff], dw[d.expert_ff:]
        dh[te] += mm(dgu, w_gu)
    for name, grad in zip(EXPERT_WEIGHTS, (dgates, dups, ddowns)):
        g[pre + name] = grad

    # Routing weights w = p_sel / max(sum(p_sel), WEIGHT_SUM_MIN): the clamp passes the sum's
    # gradient only where it does not bind (torch's clamp_min backward).
    dw = np.empty(N * K, dtype=h.dtype)
    dw[cc["perm"]] = dwf
    dw = dw.reshape(N, K)
    p_sel, sc = cc["p_sel"], cc["sc"]
    through = (cc["s"] >= WEIGHT_SUM_MIN).astype(h.dtype)
    dp_sel = dw / sc - through * np.sum(dw * p_sel, axis=1, keepdims=True) / (sc * sc)
    probs = cc["probs"]
    dprobs = np.zeros_like(probs)
    np.put_along_axis(dprobs, cc["top_i"], dp_sel, axis=1)
    dprobs += (daux * X / N) * cc["frac"][None, :]           # aux = X * sum(frac * mean_n probs)
    dlogit = probs * (dprobs - np.sum(dprobs * probs, axis=1, keepdims=True))
    g[pre + "ffn_gate_inp.weight"] = mm(dlogit.T, h)
    dh += mm(dlogit, p[pre + "ffn_gate_inp.weight"])
    return dh


# ----------------------------------------------------------------------------- model

@dataclass
class Forward:
    """One forward pass: the final hidden state after output_norm [B*T, E], the aux loss (mean
    over blocks), routing statistics, and what backward needs."""
    hidden: np.ndarray
    aux: float
    counts: list[np.ndarray]       # per block, assignments per expert [n_expert]
    margin: np.ndarray             # [B*T], the smallest routing margin over the blocks
    cache: dict


def forward(params: Params, spec: SyntheticSpec, tokens: np.ndarray, *, exact: bool | None = None) -> Forward:
    """tokens [B, T] (int) -> Forward. exact: see `numerics` (None: exact for float64 weights)."""
    d = dims(spec)
    tokens = np.asarray(tokens)
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be [batch, seq], got shape {tokens.shape}")
    B, T = tokens.shape
    dtype = params["token_embd.weight"].dtype
    nm = numerics(dtype, exact)
    cos, sin = rope_tables(d.rope, T, dtype, nm)
    x = params["token_embd.weight"][tokens.reshape(-1)]
    blocks, counts, aux = [], [], 0.0
    margin = None
    for i in range(d.n_layer):
        pre = f"blk.{i}."
        x0 = x
        h, r1 = _rms(x0, params[pre + "attn_norm.weight"])
        att, ac = _attention(nm, params, pre, d, h, B, T, cos, sin)
        x1 = x0 + att
        h2, r2 = _rms(x1, params[pre + "ffn_norm.weight"])
        moe, a, mc = _moe(nm, params, pre, d, h2)
        x = x1 + moe
        aux += a
        counts.append(mc["counts"])
        margin = mc["margin"] if margin is None else np.minimum(margin, mc["margin"])
        blocks.append(dict(x0=x0, r1=r1, att=ac, x1=x1, r2=r2, moe=mc))
    hidden, rf = _rms(x, params["output_norm.weight"])
    cache = dict(nm=nm, tokens=tokens, B=B, T=T, cos=cos, sin=sin, blocks=blocks, x=x, rf=rf)
    return Forward(hidden, aux / d.n_layer, counts, margin, cache)


def logits(params: Params, spec: SyntheticSpec, tokens: np.ndarray, *, exact: bool | None = None) -> np.ndarray:
    """Next-token logits [B, T, n_vocab] of tokens [B, T]."""
    B, T = np.shape(tokens)
    fw = forward(params, spec, tokens, exact=exact)
    return fw.cache["nm"].mm(fw.hidden, params["output.weight"].T).reshape(B, T, -1)


def log_softmax(x: np.ndarray, nm: Numerics | None = None) -> np.ndarray:
    """log softmax over the last axis (nm None: numpy's own exp and log)."""
    nm = nm or Numerics(False)
    m = x.max(axis=-1, keepdims=True)
    return x - m - nm.log(nm.exp(x - m).sum(axis=-1, keepdims=True))


def loss_and_grads(params: Params, spec: SyntheticSpec, inputs: np.ndarray, targets: np.ndarray,
                   aux_coef: float, *,
                   exact: bool | None = None) -> tuple[float, float, dict[str, np.ndarray], Forward]:
    """The training loss lm + aux_coef * aux of one batch and its gradient.

    inputs, targets [B, T]; lm is the mean cross-entropy of targets. Returns (lm, aux, grads
    keyed like params, the forward pass)."""
    d = dims(spec)
    fw = forward(params, spec, inputs, exact=exact)
    cc = fw.cache
    nm, B, T = cc["nm"], cc["B"], cc["T"]
    N, mm = B * T, nm.mm
    w_out = params["output.weight"]
    z = mm(fw.hidden, w_out.T)
    z -= z.max(axis=-1, keepdims=True)
    dlogits = nm.exp(z)
    total = dlogits.sum(axis=-1, keepdims=True)
    tgt = np.asarray(targets).reshape(-1)
    rows = np.arange(N)
    lm = float(np.mean(nm.log(total)[:, 0] - z[rows, tgt]))
    dlogits /= total
    dlogits[rows, tgt] -= 1.0
    dlogits *= 1.0 / N

    g: dict[str, np.ndarray] = {}
    g["output.weight"] = mm(dlogits.T, fw.hidden)
    dhidden = mm(dlogits, w_out)
    dx, g["output_norm.weight"] = _rms_back(dhidden, cc["x"], params["output_norm.weight"], cc["rf"])
    daux = aux_coef / d.n_layer
    for i in reversed(range(d.n_layer)):
        pre = f"blk.{i}."
        bc = cc["blocks"][i]
        dh2 = _moe_back(nm, params, pre, d, dx, bc["moe"], daux, g)
        dx1, g[pre + "ffn_norm.weight"] = _rms_back(dh2, bc["x1"], params[pre + "ffn_norm.weight"], bc["r2"])
        dx = dx + dx1
        dh = _attention_back(nm, params, pre, d, dx, bc["att"], B, T, cc["cos"], cc["sin"], g)
        dx0, g[pre + "attn_norm.weight"] = _rms_back(dh, bc["x0"], params[pre + "attn_norm.weight"], bc["r1"])
        dx = dx + dx0
    demb = np.zeros_like(params["token_embd.weight"])
    np.add.at(demb, cc["tokens"].reshape(-1), dx)
    g["token_embd.weight"] = demb
    return lm, fw.aux, {name: g[name] for name in params}, fw
