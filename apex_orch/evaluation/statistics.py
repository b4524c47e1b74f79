"""llama-perplexity's statistics, ported: PPL from per-token NLL, and the KL-divergence block.

Takes: logits rows (float32, [n, n_vocab]) and the tokens they predict; for KL divergence,
the base's quantized log-probs as `base_cache` stores them (q, scale, min_log_prob).
Gives: per-token NLL / KLD / Δp arrays (`ppl_rows`, `kld_rows`), then the numbers the tool
prints (`ppl_from_nll`, `kld_stats` -> `KLDStats`), with the tool's labels (`KLD_LINES`).

Shaped so because the point is equality with tools/perplexity/perplexity.cpp in the pinned
tree: the same sums (float64), the same float32 percentile interpolation, the same skipped
entries (base log p <= -16), the same minimum count. Rows are processed in blocks of
ROW_BLOCK so that a 131k-token vocabulary does not need [n_ctx, n_vocab] float64 temporaries.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from apex_orch.evaluation import base_cache

MIN_KLD_TOKENS = 100            # llama-perplexity prints no statistics below this
ROW_BLOCK = 64                  # rows of logits processed at once (bounds memory for 131k vocabs)


@dataclass
class KLDStats:
    """llama-perplexity's KL-divergence block. Percent values (cor, Δp, same top p) are in
    percent, as the tool prints them; the rest are plain numbers."""
    mean_ppl_q: float
    mean_ppl_q_err: float
    mean_ppl_base: float
    mean_ppl_base_err: float
    cor_ln_ppl: float                  # Cor(ln(PPL(Q)), ln(PPL(base))), %
    mean_ln_ppl_ratio: float
    mean_ln_ppl_ratio_err: float
    mean_ppl_ratio: float
    mean_ppl_ratio_err: float
    mean_ppl_diff: float
    mean_ppl_diff_err: float
    kld_mean: float
    kld_mean_err: float
    kld_max: float
    kld_p999: float
    kld_p990: float
    kld_p950: float
    kld_p900: float
    kld_median: float
    kld_p100: float
    kld_p050: float
    kld_p010: float
    kld_p001: float
    kld_min: float
    dp_mean: float                     # Mean Δp, %
    dp_mean_err: float
    dp_max: float
    dp_p999: float
    dp_p990: float
    dp_p950: float
    dp_p900: float
    dp_p750: float
    dp_median: float
    dp_p250: float
    dp_p100: float
    dp_p050: float
    dp_p010: float
    dp_p001: float
    dp_min: float
    rms_dp: float                      # RMS Δp, %
    rms_dp_err: float
    same_top_p: float                  # Same top p, %
    same_top_p_err: float
    count: int = 0


# (tool label, field, error field or None, unit suffix) in the order the tool prints them.
KLD_LINES: tuple[tuple[str, str, str | None, str], ...] = (
    ("Mean PPL(Q)", "mean_ppl_q", "mean_ppl_q_err", ""),
    ("Mean PPL(base)", "mean_ppl_base", "mean_ppl_base_err", ""),
    ("Cor(ln(PPL(Q)), ln(PPL(base)))", "cor_ln_ppl", None, "%"),
    ("Mean ln(PPL(Q)/PPL(base))", "mean_ln_ppl_ratio", "mean_ln_ppl_ratio_err", ""),
    ("Mean PPL(Q)/PPL(base)", "mean_ppl_ratio", "mean_ppl_ratio_err", ""),
    ("Mean PPL(Q)-PPL(base)", "mean_ppl_diff", "mean_ppl_diff_err", ""),
    ("Mean    KLD", "kld_mean", "kld_mean_err", ""),
    ("Maximum KLD", "kld_max", None, ""),
    ("99.9%   KLD", "kld_p999", None, ""),
    ("99.0%   KLD", "kld_p990", None, ""),
    ("95.0%   KLD", "kld_p950", None, ""),
    ("90.0%   KLD", "kld_p900", None, ""),
    ("Median  KLD", "kld_median", None, ""),
    ("10.0%   KLD", "kld_p100", None, ""),
    (" 5.0%   KLD", "kld_p050", None, ""),
    (" 1.0%   KLD", "kld_p010", None, ""),
    (" 0.1%   KLD", "kld_p001", None, ""),
    ("Minimum KLD", "kld_min", None, ""),
    ("Mean    Δp", "dp_mean", "dp_mean_err", "%"),
    ("Maximum Δp", "dp_max", None, "%"),
    ("99.9%   Δp", "dp_p999", None, "%"),
    ("99.0%   Δp", "dp_p990", None, "%"),
    ("95.0%   Δp", "dp_p950", None, "%"),
    ("90.0%   Δp", "dp_p900", None, "%"),
    ("75.0%   Δp", "dp_p750", None, "%"),
    ("Median  Δp", "dp_median", None, "%"),
    ("25.0%   Δp", "dp_p250", None, "%"),
    ("10.0%   Δp", "dp_p100", None, "%"),
    (" 5.0%   Δp", "dp_p050", None, "%"),
    (" 1.0%   Δp", "dp_p010", None, "%"),
    (" 0.1%   Δp", "dp_p001", None, "%"),
    ("Minimum Δp", "dp_min", None, "%"),
    ("RMS Δp", "rms_dp", "rms_dp_err", "%"),
    ("Same top p", "same_top_p", "same_top_p_err", "%"),
)


# --------------------------------------------------------------------------- the tool's formulas

def _mean_and_uncertainty(s: float, s2: float, count: int) -> tuple[float, float]:
    if count < 1:
        return 0.0, 0.0
    f = s / count
    df = s2 / count - f * f
    df = math.sqrt(df / (count - 1)) if df > 0 and count > 10 else 0.0
    return f, df


def _covariance(sa: float, sb: float, sab: float, count: int) -> float:
    if count < 10:
        return 0.0
    return (sab / count - (sa / count) * (sb / count)) / (count - 1)


def _percentile(sorted_values: np.ndarray, fraction: float) -> float:
    """The tool's interpolation, in float32 as it does it."""
    f = np.float32(fraction)
    if f <= 0:
        return float(sorted_values[0])
    if f >= 1:
        return float(sorted_values[-1])
    p = np.float32(f * np.float32(sorted_values.size - 1))
    ip = int(p)
    p = np.float32(p - np.float32(ip))
    a = sorted_values[ip]
    b = sorted_values[min(ip + 1, sorted_values.size - 1)]
    return float(np.float32((np.float32(1) - p) * a + p * b))


def _median(sorted_values: np.ndarray) -> float:
    n = sorted_values.size
    if n % 2 == 0:
        return float(np.float32(0.5) * (sorted_values[n // 2] + sorted_values[n // 2 - 1]))
    return float(sorted_values[n // 2])


def ppl_from_nll(nll: np.ndarray) -> tuple[float, float]:
    """PPL and its error from per-token NLL, as llama-perplexity's perplexity pass does."""
    count = nll.size
    mean = float(nll.sum(dtype=np.float64)) / count
    mean2 = float((nll.astype(np.float64) ** 2).sum()) / count - mean * mean
    ppl = math.exp(mean)
    return ppl, (math.sqrt(mean2 / (count - 1)) * ppl if mean2 > 0 else 0.0)


def kld_stats(nll: np.ndarray, nll_base: np.ndarray, kld: np.ndarray, p_diff: np.ndarray,
              same_top: int) -> KLDStats:
    """The statistics block of llama-perplexity --kl-divergence, from per-token arrays."""
    count = int(nll.size)
    nll64, base64 = nll.astype(np.float64), nll_base.astype(np.float64)
    kld64, dp64 = kld.astype(np.float64), p_diff.astype(np.float64)
    log_ppl = _mean_and_uncertainty(float(nll64.sum()), float((nll64 ** 2).sum()), count)
    log_base = _mean_and_uncertainty(float(base64.sum()), float((base64 ** 2).sum()), count)
    cov = _covariance(float(nll64.sum()), float(base64.sum()), float((nll64 * base64).sum()), count)
    ppl_val = math.exp(log_ppl[0])
    ppl_unc = ppl_val * log_ppl[1]
    base_val = math.exp(log_base[0])
    base_unc = base_val * log_base[1]
    denom = log_ppl[1] * log_base[1]
    cor = cov / denom if denom else float("nan")
    ratio_ln = log_ppl[0] - log_base[0]
    ratio_ln_unc = math.sqrt(max(0.0, log_ppl[1] ** 2 + log_base[1] ** 2 - 2.0 * cov))
    ratio = math.exp(ratio_ln)
    ppl_cov = ppl_val * base_val * cov
    diff_unc = math.sqrt(max(0.0, ppl_unc ** 2 + base_unc ** 2 - 2.0 * ppl_cov))
    kl = _mean_and_uncertainty(float(kld64.sum()), float((kld64 ** 2).sum()), count)
    dp = _mean_and_uncertainty(float(dp64.sum()), float((dp64 ** 2).sum()), count)
    dp2 = dp64 ** 2
    mse = _mean_and_uncertainty(float(dp2.sum()), float((dp2 ** 2).sum()), count)
    rms = math.sqrt(mse[0])
    rms_unc = 0.5 / rms * mse[1] if rms else 0.0
    same = same_top / count
    kv = np.sort(kld.astype(np.float32))
    dv = np.sort(p_diff.astype(np.float32))
    pct = lambda v, f: _percentile(v, f)  # noqa: E731
    return KLDStats(
        mean_ppl_q=ppl_val, mean_ppl_q_err=ppl_unc, mean_ppl_base=base_val, mean_ppl_base_err=base_unc,
        cor_ln_ppl=100.0 * cor, mean_ln_ppl_ratio=ratio_ln, mean_ln_ppl_ratio_err=ratio_ln_unc,
        mean_ppl_ratio=ratio, mean_ppl_ratio_err=ratio * ratio_ln_unc,
        mean_ppl_diff=ppl_val - base_val, mean_ppl_diff_err=diff_unc,
        kld_mean=kl[0], kld_mean_err=kl[1], kld_max=float(kv[-1]), kld_p999=pct(kv, 0.999),
        kld_p990=pct(kv, 0.990), kld_p950=pct(kv, 0.950), kld_p900=pct(kv, 0.900),
        kld_median=_median(kv), kld_p100=pct(kv, 0.100), kld_p050=pct(kv, 0.050),
        kld_p010=pct(kv, 0.010), kld_p001=pct(kv, 0.001), kld_min=float(kv[0]),
        dp_mean=100.0 * dp[0], dp_mean_err=100.0 * dp[1], dp_max=100.0 * float(dv[-1]),
        dp_p999=100.0 * pct(dv, 0.999), dp_p990=100.0 * pct(dv, 0.990), dp_p950=100.0 * pct(dv, 0.950),
        dp_p900=100.0 * pct(dv, 0.900), dp_p750=100.0 * pct(dv, 0.750), dp_median=100.0 * _median(dv),
        dp_p250=100.0 * pct(dv, 0.250), dp_p100=100.0 * pct(dv, 0.100), dp_p050=100.0 * pct(dv, 0.050),
        dp_p010=100.0 * pct(dv, 0.010), dp_p001=100.0 * pct(dv, 0.001), dp_min=100.0 * float(dv[0]),
        rms_dp=100.0 * rms, rms_dp_err=100.0 * rms_unc, same_top_p=100.0 * same,
        same_top_p_err=100.0 * math.sqrt(same * (1.0 - same) / (count - 1)), count=count)


# --------------------------------------------------------------------------- per-token rows

def map_row_blocks(n: int, fn: Callable[[int, int], Any], threads: int) -> list:
    """Run fn(lo, hi) over ROW_BLOCK-row slices of range(n), on `threads` threads (numpy
    releases the GIL in its loops; llama-perplexity likewise spreads its log-softmax over
    all cores)."""
    spans = [(lo, min(n, lo + ROW_BLOCK)) for lo in range(0, n, ROW_BLOCK)]
    if threads <= 1 or len(spans) == 1:
        return [fn(lo, hi) for lo, hi in spans]
    with ThreadPoolExecutor(max_workers=min(threads, len(spans))) as pool:
        return list(pool.map(lambda span: fn(*span), spans))


def ppl_rows(logits: np.ndarray, targets: np.ndarray, threads: int = 1) -> np.ndarray:
    """-log p(target) per row, as the tool's plain perplexity pass computes it."""
    out = np.empty(len(targets), np.float64)

    def block(lo: int, hi: int) -> None:
        L = logits[lo:hi]
        t = targets[lo:hi]
        max_l = L.max(axis=1)
        sum_exp = np.exp(L - max_l[:, None]).sum(axis=1, dtype=np.float64)
        out[lo:hi] = -((L[np.arange(hi - lo), t] - max_l).astype(np.float64) - np.log(sum_exp))

    map_row_blocks(len(targets), block, threads)
    return out


@dataclass
class KLDRows:
    """Per-token values of one chunk, concatenated over chunks before `kld_stats`."""
    nll: np.ndarray
    nll_base: np.ndarray
    kld: np.ndarray
    p_diff: np.ndarray
    same_top: int


def kld_rows(logits: np.ndarray, targets: np.ndarray, q: np.ndarray, scale: np.ndarray,
             min_log_prob: np.ndarray, threads: int = 1) -> KLDRows:
    """Per-token values of the tool's log_softmax(..., base_log_prob, tok, kld), vectorized in
    float32 like the C code (sums in float64), in place to spare memory passes."""
    n = len(targets)
    nll = np.empty(n, np.float32)
    nll_base = np.empty(n, np.float32)
    kld = np.empty(n, np.float64)
    floor = np.float32(base_cache.LOG_PROB_FLOOR)

    def block(lo: int, hi: int) -> int:
        L = np.asarray(logits[lo:hi], dtype=np.float32)
        t = targets[lo:hi]
        idx = np.arange(hi - lo)
        max_l = L.max(axis=1)
        imax = L.argmax(axis=1)
        work = np.subtract(L, max_l[:, None])
        np.exp(work, out=work)
        log_z = max_l + np.log(work.sum(axis=1, dtype=np.float64)).astype(np.float32)  # max + log Σ
        nll[lo:hi] = log_z - L[idx, t]
        qb = q[lo:hi]
        sc = scale[lo:hi].astype(np.float32)
        mn = min_log_prob[lo:hi].astype(np.float32)
        nll_base[lo:hi] = -(sc * qb[idx, t].astype(np.float32) + mn)
        log_pb = np.multiply(qb, sc[:, None], dtype=np.float32)
        log_pb += mn[:, None]
        np.subtract(log_pb, L, out=work)                 # log p_base - logit
        work += log_z[:, None]                           # log p_base - log q
        # Rows whose range was clipped at max-16 hold entries the tool skips (log p <= -16).
        skip = (log_pb <= floor) if bool((mn <= floor).any()) else None
        np.exp(log_pb, out=log_pb)
        work *= log_pb
        if skip is not None:
            work[skip] = 0
        kld[lo:hi] = work.sum(axis=1, dtype=np.float64)
        return int((imax == qb.argmax(axis=1)).sum())

    same = sum(map_row_blocks(n, block, threads))
    p_diff = np.exp(-nll) - np.exp(-nll_base)
    return KLDRows(nll, nll_base, kld, p_diff.astype(np.float32), same)
