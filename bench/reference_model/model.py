"""The reference MoE in PyTorch, written to compute exactly what llama.cpp's mistral4 graph
computes (src/models/deepseek2.cpp in the pinned tree), so its weights export 1:1.

Per block (pre-norm, RMSNorm eps 1e-6):
  attention (MLA, multi-head latent attention):
    q      = attn_q_b( attn_q_a_norm( attn_q_a(x) ) )            -> [n_head, qk_nope + qk_rope]
    kv     = attn_kv_a_mqa(x) = [c (kv_lora_rank), k_pe (qk_rope)]
    c      = attn_kv_a_norm(c)
    k_nope = c @ attn_k_b[h]            (llama.cpp absorbs this into q; same math)
    v      = attn_v_b[h] @ c            (llama.cpp applies it after the attention; same math)
    RoPE (ggml "normal" mode: adjacent pairs) on q_pe and the single shared k_pe,
    scale 1/sqrt(qk_nope + qk_rope), causal softmax, attn_output.
  MoE FFN:
    probs = softmax(ffn_gate_inp(h)); top-k experts; weights renormalised to sum 1
    (expert_weights_norm, clamp 6.1e-5); SwiGLU experts ffn_{gate,up,down}_exps;
    plus the shared expert ffn_{gate,up,down}_shexp (always on).
Output: output_norm, untied `output` projection (tying it to token_embd trained worse: held-out
PPL 834 vs 501 after 80 steps).

Parameter shapes are numpy order of the GGUF tensors (the reverse of ggml's ne), so export is
a rename (`gguf_weights`) and so is the way back (`load_gguf`).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from apex_orch.demo import synthetic

from .config import RefConfig

RMS_EPS = synthetic.RMS_EPS
ROPE_BASE = synthetic.ROPE_FREQ_BASE
WEIGHT_SUM_MIN = 6.103515625e-5  # llama.cpp clamps the top-k weight sum to the smallest F16 normal


class RMSNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + RMS_EPS)) * self.weight


def rope_tables(n_rot: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [seq_len, n_rot/2] as ggml_rope_ext computes them (freq_scale 1, no YaRN)."""
    inv = ROPE_BASE ** (-torch.arange(0, n_rot, 2, dtype=torch.float64) / n_rot)
    ang = torch.arange(seq_len, dtype=torch.float64)[:, None] * inv[None, :]
    return torch.cos(ang).float(), torch.sin(ang).float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [..., T, heads, n_rot]; rotates adjacent pairs (x[2i], x[2i+1]) (ggml normal mode)."""
    x0, x1 = x[..., 0::2].float(), x[..., 1::2].float()
    c, s = cos[:, None, :], sin[:, None, :]
    return torch.stack((x0 * c - x1 * s, x0 * s + x1 * c), dim=-1).flatten(-2)


class MLAttention(nn.Module):
    def __init__(self, cfg: RefConfig):
        super().__init__()
        E, H = cfg.n_embd, cfg.n_head
        self.cfg = cfg
        self.attn_q_a = nn.Linear(E, cfg.q_lora_rank, bias=False)
        self.attn_q_a_norm = RMSNorm(cfg.q_lora_rank)
        self.attn_q_b = nn.Linear(cfg.q_lora_rank, H * (cfg.qk_nope + cfg.qk_rope), bias=False)
        self.attn_kv_a_mqa = nn.Linear(E, cfg.kv_lora_rank + cfg.qk_rope, bias=False)
        self.attn_kv_a_norm = RMSNorm(cfg.kv_lora_rank)
        self.attn_k_b = nn.Parameter(torch.empty(H, cfg.kv_lora_rank, cfg.qk_nope))
        self.attn_v_b = nn.Parameter(torch.empty(H, cfg.v_head, cfg.kv_lora_rank))
        self.attn_output = nn.Linear(H * cfg.v_head, E, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        B, T, _ = x.shape
        H, nope, rope = cfg.n_head, cfg.qk_nope, cfg.qk_rope
        q = self.attn_q_b(self.attn_q_a_norm(self.attn_q_a(x))).view(B, T, H, nope + rope)
        q_nope, q_pe = q[..., :nope], q[..., nope:]
        kv = self.attn_kv_a_mqa(x)
        c = self.attn_kv_a_norm(kv[..., :cfg.kv_lora_rank])
        k_pe = kv[..., cfg.kv_lora_rank:].view(B, T, 1, rope)
        # Both up-projections of the latent as one matmul each: [kv_lora, H*nope], [kv_lora, H*v].
        k_nope = (c @ self.attn_k_b.permute(1, 0, 2).reshape(cfg.kv_lora_rank, H * nope)).view(B, T, H, nope)
        v = (c @ self.attn_v_b.permute(2, 0, 1).reshape(cfg.kv_lora_rank, H * cfg.v_head)).view(B, T, H, cfg.v_head)
        q_pe = apply_rope(q_pe, cos[:T], sin[:T])
        k_pe = apply_rope(k_pe, cos[:T], sin[:T]).expand(B, T, H, rope)
        qh = torch.cat((q_nope.float(), q_pe), -1).transpose(1, 2)
        kh = torch.cat((k_nope.float(), k_pe), -1).transpose(1, 2)
        y = F.scaled_dot_product_attention(qh, kh, v.float().transpose(1, 2), is_causal=True,
                                           scale=1.0 / math.sqrt(nope + rope))
        return self.attn_output(y.transpose(1, 2).reshape(B, T, H * cfg.v_head))


class MoE(nn.Module):
    def __init__(self, cfg: RefConfig):
        super().__init__()
        E, X, Fd = cfg.n_embd, cfg.n_expert, cfg.expert_ff
        S = Fd * cfg.n_expert_shared
        self.cfg = cfg
        self.ffn_gate_inp = nn.Linear(E, X, bias=False)
        self.ffn_gate_exps = nn.Parameter(torch.empty(X, Fd, E))
        self.ffn_up_exps = nn.Parameter(torch.empty(X, Fd, E))
        self.ffn_down_exps = nn.Parameter(torch.empty(X, E, Fd))
        self.ffn_gate_shexp = nn.Linear(E, S, bias=False)
        self.ffn_up_shexp = nn.Linear(E, S, bias=False)
        self.ffn_down_shexp = nn.Linear(S, E, bias=False)

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns (output, aux load-balancing loss, per-expert assignment counts [n_expert],
        routing margin [tokens]: probability of the last chosen expert minus the best unchosen
        one; where it is tiny, llama.cpp's F16 rounding upstream can pick another expert)."""
        cfg = self.cfg
        shape = h.shape
        x = h.reshape(-1, shape[-1])
        # Router in F32 (llama.cpp keeps ffn_gate_inp in F32 and computes the softmax in F32).
        logits = F.linear(x.float(), self.ffn_gate_inp.weight.float())
        probs = torch.softmax(logits, dim=-1)
        K = cfg.n_expert_used
        top_p, top_idx = torch.topk(probs, min(K + 1, cfg.n_expert), dim=-1)
        top_w, top_i = top_p[:, :K], top_idx[:, :K]
        margin = (top_p[:, K - 1] - top_p[:, K]).detach() if cfg.n_expert > K else torch.ones_like(top_p[:, 0])
        top_w = top_w / top_w.sum(-1, keepdim=True).clamp_min(WEIGHT_SUM_MIN)

        # Dispatch: sort the (token, slot) pairs by expert, run each expert on its contiguous
        # slice. The expert weights are unbound once (backward stacks the per-expert gradients
        # into one tensor; indexing the parameter per expert would materialise a full-size zero
        # gradient for every expert) and no padding is computed (a padded [n_expert, max_count]
        # batch wasted up to 6x while the routing is still unbalanced early in training).
        X, N = cfg.n_expert, x.shape[0]
        flat_e = top_i.reshape(-1)
        order = torch.argsort(flat_e, stable=True)
        counts = torch.bincount(flat_e, minlength=X)
        tok = order // K
        xs = x[tok]
        w = top_w.reshape(-1)[order]
        gates, ups, downs = (p.unbind(0) for p in (self.ffn_gate_exps, self.ffn_up_exps, self.ffn_down_exps))
        outs = []
        start = 0
        for e, n in enumerate(counts.tolist()):
            if n:
                xe = xs[start:start + n]
                outs.append(F.linear(F.silu(F.linear(xe, gates[e])) * F.linear(xe, ups[e]), downs[e]))
                start += n
        ys = torch.cat(outs).float() * w[:, None]
        out = torch.zeros(N, shape[-1], dtype=torch.float32, device=x.device).index_add_(0, tok, ys)
        shared = self.ffn_down_shexp(F.silu(self.ffn_gate_shexp(x)) * self.ffn_up_shexp(x))
        out = out + shared.float()

        frac = counts.float() / flat_e.numel()
        aux = cfg.n_expert * torch.sum(frac * probs.mean(0))
        return out.view(*shape[:-1], shape[-1]), aux, counts, margin


class Block(nn.Module):
    def __init__(self, cfg: RefConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.n_embd)
        self.attn = MLAttention(cfg)
        self.ffn_norm = RMSNorm(cfg.n_embd)
        self.moe = MoE(cfg)

    def forward(self, x, cos, sin):
        x = x + self.attn(self.attn_norm(x), cos, sin).float()
        y, aux, counts, margin = self.moe(self.ffn_norm(x))
        return x + y, aux, counts, margin


class RefMoE(nn.Module):
    def __init__(self, cfg: RefConfig, n_vocab: int):
        super().__init__()
        self.cfg = cfg
        self.token_embd = nn.Embedding(n_vocab, cfg.n_embd)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.output_norm = RMSNorm(cfg.n_embd)
        self.output = nn.Linear(cfg.n_embd, n_vocab, bias=False)
        cos, sin = rope_tables(cfg.qk_rope, cfg.seq_len)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def init_weights(self, generator: torch.Generator) -> None:
        """Normal(0, init_std) everywhere; residual-writing projections scaled by
        1/sqrt(2 n_layer) (GPT-2 style) so the deep stack starts near the identity."""
        std = self.cfg.init_std
        out_std = std / math.sqrt(2 * self.cfg.n_layer)
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.ones_(p)
            elif name.endswith(("attn_output.weight", "ffn_down_exps", "ffn_down_shexp.weight")):
                nn.init.normal_(p, 0.0, out_std, generator=generator)
            else:
                nn.init.normal_(p, 0.0, std, generator=generator)

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """tokens [B, T] -> (final hidden [B, T, E] after output_norm, aux loss, routing stats:
        "counts" per block [n_expert], "margin" [B*T] the smallest routing margin over blocks)."""
        x = self.token_embd(tokens).float()
        aux = x.new_zeros(())
        counts, margin = [], None
        for blk in self.blocks:
            x, a, c, m = blk(x, self.rope_cos, self.rope_sin)
            aux = aux + a
            counts.append(c)
            margin = m if margin is None else torch.minimum(margin, m)
        return self.output_norm(x), aux / len(self.blocks), {"counts": counts, "margin": margin}

    def logits(self, tokens: torch.Tensor) -> torch.Tensor:
        h, _, _ = self.forward(tokens)
        return self.output(h)


def _name_map(cfg: RefConfig) -> dict[str, str]:
    """GGUF tensor name -> state_dict key."""
    out = {"token_embd.weight": "token_embd.weight", "output_norm.weight": "output_norm.weight",
           "output.weight": "output.weight"}
    for i in range(cfg.n_layer):
        p, b = f"blk.{i}.", f"blocks.{i}."
        out[p + "attn_norm.weight"] = b + "attn_norm.weight"
        out[p + "ffn_norm.weight"] = b + "ffn_norm.weight"
        for name in ("attn_q_a", "attn_q_a_norm", "attn_q_b", "attn_kv_a_mqa", "attn_kv_a_norm", "attn_output"):
            out[p + name + ".weight"] = b + "attn." + name + ".weight"
        out[p + "attn_k_b.weight"] = b + "attn.attn_k_b"
        out[p + "attn_v_b.weight"] = b + "attn.attn_v_b"
        for name in ("ffn_gate_inp", "ffn_gate_shexp", "ffn_up_shexp", "ffn_down_shexp"):
            out[p + name + ".weight"] = b + "moe." + name + ".weight"
        for name in ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps"):
            out[p + name + ".weight"] = b + "moe." + name
    return out


def gguf_weights(model: RefMoE) -> dict[str, np.ndarray]:
    """GGUF tensor name -> F32 numpy array (numpy order), for apex_orch.demo.synthetic.write_model."""
    sd = model.state_dict()
    return {g: sd[k].detach().float().cpu().numpy() for g, k in _name_map(model.cfg).items()}


def load_gguf(model: RefMoE, path) -> None:
    """Load the weights of an exported GGUF back into `model` (the export round trip: the
    torch side of the export check evaluates exactly the bytes llama.cpp reads)."""
    import gguf

    reader = gguf.GGUFReader(path)
    tensors = {t.name: t for t in reader.tensors}
    sd = model.state_dict()
    names = _name_map(model.cfg)
    if set(tensors) != set(names):
        raise ValueError(f"{path}: tensors differ from the model's: {sorted(set(tensors) ^ set(names))[:5]}")
    with torch.no_grad():
        for g, k in names.items():
            data = torch.from_numpy(np.array(tensors[g].data, dtype=np.float32))
            if tuple(data.shape) != tuple(sd[k].shape):
                raise ValueError(f"{path}: {g} has shape {tuple(data.shape)}, expected {tuple(sd[k].shape)}")
            sd[k].copy_(data)
