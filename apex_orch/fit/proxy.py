"""The proxy: imatrix-weighted quantization error, read back from the uniform quantizations.

For a weight matrix W (per expert for `*_exps`) and Ŵ, the same tensor dequantized (gguf's numpy
dequantizers) from a uniform quantization, with a_c the mean squared input activation of column c
(the imatrix: in_sum2 / count), the proxy of the tensor is

    E = sum over experts e of  p_e * sum_r sum_c  a_(e,c) * (W - Ŵ)²_(e,r,c)

the expected squared change of the tensor's outputs per token (p_e: the share of routed tokens
expert e received; 1 for a dense tensor). Tensors the imatrix does not cover (token_embd, output)
use a_c = 1. A group's proxy is the sum over its tensors. It costs one uniform quantization per
type plus one read of every tensor, against the exact method's one evaluation and one full-model
write per (group, type); `calibrate` turns it into KLD units per role from exact measurements.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

MIN_ROLE_POINTS = 2


def imatrix_weights(path: Path | None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """tensor name -> (mean squared activation [n_mat, ne0], token share per matrix [n_mat])."""
    if path is None:
        return {}
    from apex_orch.core.infiles import read_gguf
    reader = read_gguf(path, "imatrix")
    sums, counts = {}, {}
    for t in reader.tensors:
        if t.name.endswith(".in_sum2"):
            sums[t.name[:-8]] = np.asarray(t.data, dtype=np.float64)
        elif t.name.endswith(".counts"):
            counts[t.name[:-7]] = np.asarray(t.data, dtype=np.float64).reshape(-1)
    out = {}
    for name, s in sums.items():
        c = counts.get(name)
        if c is None:
            continue
        s = s.reshape(len(c), -1)
        mean = s / np.maximum(c, 1.0)[:, None]
        share = c / c.sum() if c.sum() > 0 else np.full(len(c), 1.0 / len(c))
        out[name] = (mean, share)
    return out


def tensor_errors(source: Path, quantized: Path, names: set[str],
                  weights: dict[str, tuple[np.ndarray, np.ndarray]]) -> dict[str, float]:
    """The proxy E of each named tensor of `quantized` against `source` (one matrix at a time)."""
    from gguf.quants import dequantize

    from apex_orch.core.infiles import read_gguf
    src = {t.name: t for t in read_gguf(source, "model").tensors if t.name in names}
    out: dict[str, float] = {}
    for t in read_gguf(quantized, "model").tensors:
        if t.name not in names:
            continue
        s = src[t.name]
        w_all = np.asarray(s.data)
        q_all = np.asarray(t.data)
        n_mat = w_all.shape[0] if w_all.ndim == 3 else 1
        mean, share = weights.get(t.name, (None, None))
        ne0 = w_all.shape[-1]
        if mean is not None and mean.shape != (n_mat, ne0) and mean.shape != (1, ne0):
            # the imatrix saw this tensor's input under another layout (an MLA k_b/v_b batched over
            # heads): per matrix when the sizes allow it, else its mean activation for every column
            mean = mean.reshape(n_mat, ne0) if mean.size == n_mat * ne0 else np.full((1, ne0), float(mean.mean()))
        total = 0.0
        for e in range(n_mat):
            w = (w_all[e] if w_all.ndim == 3 else w_all).astype(np.float32)
            q = dequantize(q_all[e] if w_all.ndim == 3 else q_all, t.tensor_type).reshape(w.shape)
            d2 = np.square(w - q, dtype=np.float32).sum(axis=tuple(range(w.ndim - 1)), dtype=np.float64)  # per column
            if mean is None:
                total += float(d2.sum())
            else:
                row = mean[e] if mean.shape[0] == n_mat else mean[0]
                # experts: weighted by the tokens routed to each; other 3-D tensors (MLA heads): summed
                p = share[e] if "_exps" in t.name and mean.shape[0] == n_mat and len(share) == n_mat else 1.0
                total += p * float(np.dot(row, d2))
        out[t.name] = total
    return out


def calibrate(proxy: dict[str, dict[str, float]], exact: dict[str, dict[str, dict]],
              roles: dict[str, str]) -> dict[str, float]:
    """Per role, the scale from proxy units to mean KLD: the geometric mean of exact / proxy over
    that role's (group, type) points (a role with too few points takes the median of the others)."""
    ratios: dict[str, list[float]] = {}
    for key, by_type in proxy.items():
        for t, value in by_type.items():
            kld = exact.get(key, {}).get(t, {}).get("kld_mean")
            if kld is not None and kld > 0 and value > 0:
                ratios.setdefault(roles[key], []).append(math.log(kld / value))
    scales = {role: math.exp(sum(r) / len(r)) for role, r in ratios.items() if len(r) >= MIN_ROLE_POINTS}
    fallback = float(np.median(list(scales.values()))) if scales else 1.0
    return {role: scales.get(role, fallback) for role in set(roles.values())}


def spearman(xs: list[float], ys: list[float]) -> float:
    """Rank correlation (no ties expected in measured floats)."""
    rx = np.argsort(np.argsort(xs))
    ry = np.argsort(np.argsort(ys))
    return float(np.corrcoef(rx, ry)[0, 1])
