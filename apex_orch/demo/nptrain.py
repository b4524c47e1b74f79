"""Seeded training of the numpy MoE (demo.npmodel) on one token stream, numpy only.

The recipe of bench/reference_model/trainer.py, without torch:
- batches: each sequence is [BOS] + seq_len-1 consecutive tokens of the stream from a seeded
  random offset, trained to predict those tokens plus the next one (the layout llama-perplexity
  evaluates: BOS at position 0 of each chunk);
- init: normal(0, init_std) everywhere, the projections that write into the residual stream
  (attn_output, ffn_down_exps, ffn_down_shexp) scaled by 1/sqrt(2 n_layer), norms 1;
- loss: cross-entropy + aux_loss_coef * the load-balancing loss (npmodel);
- AdamW (betas 0.9/0.95, eps 1e-8; weight decay on everything but the norms, torch's update
  formula), gradient norm clipped to grad_clip, linear warmup then cosine decay to min_lr.

Reproducible: with float64 (exact numerics, npmodel's default for it) the same inputs give the
same weights, bit for bit, on every machine; with float32 or exact=False, on the same machine and
BLAS thread count only. Randomness comes only from PCG64 bit streams (numpy guarantees those
across versions; it does not for Generator's distribution methods, so the normal draws and the
offsets are computed here from raw bits): the init of each tensor from SeedSequence([seed, hash
of its name]) (a tensor's init does not depend on the others), the batch offsets from seed + 1.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

from apex_orch.demo import npmath, npmodel, synthetic
from apex_orch.demo.spec import SyntheticSpec

OUT_PROJECTIONS = ("attn_output.weight", "ffn_down_exps.weight", "ffn_down_shexp.weight")
BETAS = (0.9, 0.95)
ADAM_EPS = 1e-8
DTYPES = ("float64", "float32")


@dataclass(frozen=True)
class TrainSettings:
    """Everything besides the architecture (the spec), the data and the step count that changes
    the trained weights."""
    seq_len: int | None = None      # None: spec.context
    batch_seqs: int = 4             # sequences per optimizer step
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup: int = 30
    weight_decay: float = 0.1
    aux_loss_coef: float = 0.01
    init_std: float = 0.02
    grad_clip: float = 1.0
    seed: int = 1234
    dtype: str = "float64"          # "float64" or "float32"
    exact: bool | None = None       # npmodel's exact numerics (same bits on every machine); None: for float64

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        npmodel.numerics(self.dtype, self.exact)     # refuses exact float32
        if self.batch_seqs < 1 or (self.seq_len is not None and self.seq_len < 2):
            raise ValueError("batch_seqs must be >= 1 and seq_len >= 2")

    def asdict(self) -> dict:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------- randomness

def _generator(seed: int, key: str | None = None) -> np.random.Generator:
    entropy = [seed] if key is None else [seed, int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little")]
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(entropy)))


def _uniform(rng: np.random.Generator, n: int) -> np.ndarray:
    """n float64 in [0, 1) from the top 53 bits of the raw 64-bit stream."""
    return (rng.bit_generator.random_raw(n) >> np.uint64(11)).astype(np.float64) * 2.0 ** -53


def _normal(rng: np.random.Generator, n: int) -> np.ndarray:
    """n standard normal float64 (Box-Muller on raw uniforms, with npmath's log/sin/cos so the
    draws are the same bits on every machine)."""
    m = (n + 1) // 2
    u1 = 1.0 - _uniform(rng, m)                     # (0, 1]: log is finite
    u2 = _uniform(rng, m)
    r = np.sqrt(-2.0 * npmath.log(u1))
    sin, cos = npmath.sincos((2 * np.pi) * u2)
    return np.concatenate((r * cos, r * sin))[:n]


def init_params(spec: SyntheticSpec, n_vocab: int, init_std: float = 0.02, seed: int = 1234,
                dtype: str = "float64") -> dict[str, np.ndarray]:
    """Initial weights by GGUF tensor name, in synthetic.tensor_shapes() order and shapes."""
    npmodel.dims(spec)
    out_std = init_std / math.sqrt(2 * spec.n_layer)
    params = {}
    for name, shape in synthetic.tensor_shapes(spec, n_vocab).items():
        if name.endswith("norm.weight"):
            params[name] = np.ones(shape, dtype=dtype)
            continue
        std = out_std if name.endswith(OUT_PROJECTIONS) else init_std
        params[name] = (_normal(_generator(seed, name), math.prod(shape)) * std).reshape(shape).astype(dtype)
    return params


class BatchSampler:
    """[BOS] + seq_len-1 tokens from a seeded offset as inputs, the seq_len tokens from that
    offset as targets (trainer.BatchSampler's layout, one stream)."""

    def __init__(self, tokens: np.ndarray, bos: int, seq_len: int, seed: int):
        self.tokens = np.asarray(tokens, dtype=np.int64)
        if self.tokens.ndim != 1 or len(self.tokens) < seq_len + 1:
            raise ValueError(f"the training stream has {self.tokens.size} tokens, fewer than one "
                             f"sequence of {seq_len} plus one")
        self.bos, self.seq_len = bos, seq_len
        self.rng = _generator(seed)

    def next(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        T = self.seq_len
        span = len(self.tokens) - T + 1
        starts = np.floor(_uniform(self.rng, n) * span).astype(np.int64)
        windows = self.tokens[starts[:, None] + np.arange(T)[None, :]]
        inputs = np.empty_like(windows)
        inputs[:, 0] = self.bos
        inputs[:, 1:] = windows[:, :-1]
        return inputs, windows


# ----------------------------------------------------------------------------- optimizer

def lr_at(settings: TrainSettings, steps: int, step: int) -> float:
    """Linear warmup over `warmup` steps, then cosine decay to min_lr at the last step."""
    if step < settings.warmup:
        return settings.lr * (step + 1) / settings.warmup
    t = (step - settings.warmup) / max(1, steps - settings.warmup)
    cos = float(npmath.sincos(np.array(math.pi * min(1.0, t)))[1])   # not libm's: the same bits everywhere
    return settings.min_lr + 0.5 * (settings.lr - settings.min_lr) * (1 + cos)


def clip_grads(grads: dict[str, np.ndarray], max_norm: float) -> float:
    """Scale the gradients in place to a global L2 norm of at most max_norm (torch's
    clip_grad_norm_: coefficient max_norm / (norm + 1e-6)); returns the norm before clipping."""
    # numpy's own pairwise sum, not BLAS's dot: OpenBLAS splits a long dot product between its
    # threads, so its result depends on the thread count (measured: 1 vs 2 threads differ).
    total = math.sqrt(sum(float(np.sum(g * g)) for g in grads.values()))
    coef = max_norm / (total + 1e-6)
    if coef < 1.0:
        for g in grads.values():
            g *= coef
    return total


class AdamW:
    """torch.optim.AdamW's update (decoupled weight decay, bias-corrected moments), in place.
    beta^t is kept as a running product (pow() is libm's, which may differ between machines)."""

    def __init__(self, params: dict[str, np.ndarray], weight_decay: float,
                 betas: tuple[float, float] = BETAS, eps: float = ADAM_EPS):
        self.params, self.betas, self.eps = params, betas, eps
        self.decay = {n: (0.0 if n.endswith("norm.weight") else weight_decay) for n in params}
        self.m = {n: np.zeros_like(p) for n, p in params.items()}
        self.v = {n: np.zeros_like(p) for n, p in params.items()}
        self.t = 0
        self.beta_pow = (1.0, 1.0)

    def step(self, grads: dict[str, np.ndarray], lr: float) -> None:
        self.t += 1
        b1, b2 = self.betas
        self.beta_pow = (self.beta_pow[0] * b1, self.beta_pow[1] * b2)
        bc1, bc2_sqrt = 1.0 - self.beta_pow[0], math.sqrt(1.0 - self.beta_pow[1])
        for name, p in self.params.items():
            g, m, v = grads[name], self.m[name], self.v[name]
            if self.decay[name]:
                p *= 1.0 - lr * self.decay[name]
            m *= b1
            m += (1.0 - b1) * g
            v *= b2
            v += (1.0 - b2) * (g * g)
            denom = np.sqrt(v)
            denom *= 1.0 / bc2_sqrt
            denom += self.eps
            p -= (lr / bc1) * (m / denom)


# ----------------------------------------------------------------------------- training

def train(spec: SyntheticSpec, token_stream: np.ndarray, bos: int, n_vocab: int, steps: int,
          settings: TrainSettings = TrainSettings(), *, log: Callable[[str], None] | None = None,
          log_every: int = 10) -> tuple[dict[str, np.ndarray], dict]:
    """Train the numpy MoE of `spec` for `steps` optimizer steps on `token_stream` (1-D token ids).

    Returns (params by GGUF tensor name in settings.dtype, record). The record: "loss" and "aux"
    (per step, the batch's LM and load-balancing loss before the update), "grad_norm" (before
    clipping), "lr", "tokens" (tokens trained on), "seconds" (wall), "cpu_seconds" (process, all
    threads), "steps", "settings", "loss_first"/"loss_last" (means of the first/last
    min(10, steps/2) steps)."""
    if steps < 1:
        raise ValueError("steps must be >= 1")
    tokens = np.asarray(token_stream, dtype=np.int64)
    if not 0 <= bos < n_vocab or (tokens.size and not 0 <= tokens.min() <= tokens.max() < n_vocab):
        raise ValueError(f"token ids (and bos {bos}) must lie in [0, {n_vocab})")
    seq_len = settings.seq_len or spec.context
    params = init_params(spec, n_vocab, settings.init_std, settings.seed, settings.dtype)
    opt = AdamW(params, settings.weight_decay)
    sampler = BatchSampler(tokens, bos, seq_len, settings.seed + 1)
    rec: dict = {"loss": [], "aux": [], "grad_norm": [], "lr": []}
    start, cpu_start = time.monotonic(), time.process_time()
    for step in range(steps):
        lr = lr_at(settings, steps, step)
        inputs, targets = sampler.next(settings.batch_seqs)
        lm, aux, grads, _ = npmodel.loss_and_grads(params, spec, inputs, targets, settings.aux_loss_coef,
                                                   exact=settings.exact)
        norm = clip_grads(grads, settings.grad_clip)
        opt.step(grads, lr)
        for key, value in (("loss", lm), ("aux", aux), ("grad_norm", norm), ("lr", lr)):
            rec[key].append(value)
        if log is not None and (step % log_every == 0 or step == steps - 1):
            elapsed = time.monotonic() - start
            log(f"step {step:5d}/{steps}  loss {lm:.4f}  aux {aux:.3f}  lr {lr:.2e}  {elapsed:7.1f}s  "
                f"{(step + 1) * settings.batch_seqs * seq_len / max(elapsed, 1e-9):.0f} tok/s")
    k = max(1, min(10, steps // 2))
    rec.update(tokens=steps * settings.batch_seqs * seq_len, seconds=time.monotonic() - start,
               cpu_seconds=time.process_time() - cpu_start, steps=steps,
               settings={**settings.asdict(), "seq_len": seq_len},
               loss_first=float(np.mean(rec["loss"][:k])), loss_last=float(np.mean(rec["loss"][-k:])))
    return params, rec
