"""Arithmetic whose float64 results are the same bits on every machine: the numerics of
demo.npmodel's exact mode.

Why: a training run is chaotic. Two float64 trainings of the numpy MoE whose initial weights
differed by one ulp ended 200 steps later with 98% of their weights rounding to a different F16
(measured; float32 the same). So "float64 is precise enough" does not make a trained file
reproducible: any last-bit difference grows. And last bits do differ between machines: numpy's
BLAS (OpenBLAS, DYNAMIC_ARCH) picks its GEMM kernel by CPU, and the Haswell, SkylakeX,
Sandybridge and Prescott kernels give four different results for the same float64 product
(measured); 1 and 2 threads differ too. numpy's exp/log/sin/cos are dispatched by CPU as well.

What this module does instead:
- `matmul`: each row of the left operand, and the right operand as a whole, is scaled by a
  power of two and rounded to an integer of at most `bits` bits, chosen so that every product
  and every partial sum of the dot products is an integer below 2^53. Such sums are exact in
  float64 in any order, with or without FMA, on any kernel and thread count, so BLAS returns
  the same bits everywhere; the result is scaled back by powers of two (exact). The price is
  the rounding of the operands: 21 bits relative to the largest entry of the row (left) or
  matrix (right) for sums over up to 1024 terms, about float32's precision (the PyTorch
  reference trains with bf16 matmuls: 8 bits).
- `exp`, `log`, `sincos`: range reduction and polynomials written with + - * / only (IEEE
  correctly rounded, hence deterministic in any SIMD width), accurate to ~1e-14.
Everything else npmodel does is elementwise + - * / sqrt (correctly rounded), comparisons, and
numpy's own sums, whose order is fixed by numpy's source (pairwise in blocks of 8 along a
contiguous axis), not by the CPU. Assumed: IEEE float64 with subnormals (no flush-to-zero mode
set in the process).
"""

from __future__ import annotations

import math

import numpy as np

# fdlibm's splits: the high parts have enough trailing zero bits that k * HI is exact for |k| < 2^20.
LN2_HI, LN2_LO = 6.93147180369123816490e-01, 1.90821492927058770002e-10
INV_LN2 = 1.44269504088896338700e+00
PIO2_HI, PIO2_LO = 1.57079632673412561417e+00, 6.07710050650619224932e-11
INV_PIO2 = 6.36619772367581382433e-01
_EXP_COEF = tuple(1.0 / math.factorial(n) for n in range(11, -1, -1))     # Horner, r^11 .. r^0
_SIN_COEF = tuple((-1.0) ** (n // 2) / math.factorial(n) for n in range(17, 0, -2))
_COS_COEF = tuple((-1.0) ** (n // 2) / math.factorial(n) for n in range(16, -1, -2))
EXP_MIN = -708.0            # below: 0 exactly (also no subnormals); exp(-inf) = 0 for masks
EXP_MAX = 709.0
EXP_BLOCK = 1 << 14


def _horner(coef: tuple[float, ...], r: np.ndarray) -> np.ndarray:
    p = np.full_like(r, coef[0])
    for c in coef[1:]:
        p *= r
        p += c
    return p


def exp(x: np.ndarray) -> np.ndarray:
    """e^x: x = k ln2 + r, |r| <= ln2/2, e^r by its Taylor polynomial to r^11 (error < 1e-14).
    In blocks of EXP_BLOCK elements, so the ~30 passes of the polynomial stay in cache."""
    x = np.asarray(x, dtype=np.float64)
    out = np.empty_like(x)
    flat_x, flat_out = x.reshape(-1), out.reshape(-1)
    for lo in range(0, flat_x.size, EXP_BLOCK):
        xb = flat_x[lo:lo + EXP_BLOCK]
        xc = np.clip(xb, EXP_MIN, EXP_MAX)
        k = xc * INV_LN2
        np.rint(k, out=k)
        r = xc - k * LN2_HI
        r -= k * LN2_LO
        p = _horner(_EXP_COEF, r)
        ob = flat_out[lo:lo + EXP_BLOCK]
        np.ldexp(p, k.astype(np.int32), out=ob)
        ob[xb < EXP_MIN] = 0.0
    return out


def log(x: np.ndarray) -> np.ndarray:
    """ln x for x > 0: x = m 2^e with m in [sqrt(1/2), sqrt(2)), ln m = 2 atanh((m-1)/(m+1))
    by its series to s^21 (|s| <= 0.172, error < 1e-17)."""
    x = np.asarray(x, dtype=np.float64)
    m, e = np.frexp(x)
    low = m < 0.7071067811865476
    m = np.where(low, m * 2.0, m)
    e = (e - low).astype(np.float64)
    s = (m - 1.0) / (m + 1.0)
    s2 = s * s
    p = _horner(tuple(1.0 / n for n in range(21, 0, -2)), s2)
    return e * LN2_HI + (e * LN2_LO + 2.0 * s * p)


def sincos(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(sin x, cos x) for |x| < 2^19: x = k pi/2 + r, |r| <= pi/4, Taylor to r^17 / r^16."""
    x = np.asarray(x, dtype=np.float64)
    if x.size and not np.abs(x).max() < 2.0 ** 19:
        raise ValueError("sincos: |x| must be below 2^19")
    k = np.rint(x * INV_PIO2)
    r = (x - k * PIO2_HI) - k * PIO2_LO
    r2 = r * r
    s = r * _horner(_SIN_COEF, r2)
    c = _horner(_COS_COEF, r2)
    q = k.astype(np.int64) % 4
    return np.choose(q, (s, c, -s, -c)), np.choose(q, (c, -s, -c, s))


def _exponents(top: np.ndarray) -> np.ndarray:
    """e with top < 2^e (top >= 0, finite)."""
    if not np.all(np.isfinite(top)):
        raise FloatingPointError("non-finite values in a matrix product (training diverged?)")
    return np.frexp(top)[1]


def matmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a @ b (float64, numpy's broadcasting) computed exactly on operands rounded to `bits`-bit
    integers: a per row, b per matrix (see the module docstring)."""
    k = a.shape[-1]
    bits = (52 - (k - 1).bit_length()) // 2        # k * (2^bits)^2 <= 2^52: every partial sum exact
    ea = _exponents(np.maximum(a.max(axis=-1, keepdims=True), -a.min(axis=-1, keepdims=True)))
    eb = _exponents(np.maximum(b.max(axis=(-2, -1), keepdims=True), -b.min(axis=(-2, -1), keepdims=True)))
    ai = a * np.ldexp(1.0, bits - ea)
    np.rint(ai, out=ai)
    bi = b * np.ldexp(1.0, bits - eb)
    np.rint(bi, out=bi)
    out = ai @ bi
    out *= np.ldexp(1.0, ea - bits) * np.ldexp(1.0, eb - bits)    # a product of powers of two: exact
    return out
