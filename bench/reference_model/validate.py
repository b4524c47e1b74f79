"""Export check: the same tokens through PyTorch and through llama.cpp must give the same
next-token distributions, and the held-out perplexity must be far below the uniform value.

The torch side evaluates the weights read back from the exported GGUF (`model.load_gguf`), in
F32; llama.cpp evaluates the same file. Chunking follows llama-perplexity exactly: the text is
tokenized with BOS, cut into chunks of n_ctx tokens, the first token of each chunk is replaced
by BOS, and only the second half of each chunk is scored (positions n_ctx/2 .. n_ctx-2 predict
the next token). So the PPL the bindings give here is the PPL `llama-perplexity -c n_ctx -b
n_ctx` prints for the same file, which is run too, as a third opinion.

Agreement is measured on every position of every chunk (not only the scored half):
  - KL(p_torch || p_llama) per position (mean and max),
  - |log p_torch(next) - log p_llama(next)| of the actual next token (mean, 99.9th percentile, max),
  - top-1 agreement (argmax equal), max |logit difference| and the number of positions whose
    expert routing is ambiguous (reported only).

Where the differences come from: llama.cpp rounds activations to F16 inside its F16 matmuls
and keeps the KV cache in F16, ~1e-3 relative noise. Through 12 blocks, and through expert
choices that flip where a token's last chosen and best unchosen experts are almost tied, that
noise reaches ~0.1 nats on single tokens while the mean KLD stays ~1e-6. The tolerances below
were set from measured controls (see the comment above them): F16 rounding alone passes, every
tried export bug fails.
"""

from __future__ import annotations

import ctypes
import math
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from apex_orch.llama.bindings import load_llama_cpp
from apex_orch.llama.tools import find_tool, run_tool

from .model import RefMoE

# Tolerances of the export check (the smoke test and the full build both assert them). They sit
# between two measured controls on the full model (bench/reference_model/controls.py,
# bench/results/reference-model-controls.md): F16 rounding alone (torch against itself with every
# matmul input rounded to F16) gives mean KLD 6e-7, max |dlog p| 0.087; the mildest export bug
# tried (one block's ffn_norm off by 1%) gives mean KLD 7.9e-6, p99.9 0.036, max 0.29, and
# swapping two experts of one block gives mean KLD 3.9e-5, max 0.18.
TOL_MEAN_KLD = 5e-6              # mean KL(torch || llama.cpp) per position, nats
TOL_TOP1 = 0.999                 # share of positions with the same argmax
TOL_P999_TARGET_LOGP = 0.03      # 99.9th percentile of |delta log p(next token)|, nats
TOL_MAX_TARGET_LOGP = 0.15       # worst |delta log p(next token)| over every position, nats
ROUTING_MARGIN = 1e-3            # routing margin (probability) below which a swap is possible (reported)
TOL_PPL_REL = 1e-3               # |PPL_llama / PPL_torch - 1|
TOL_TOOL_REL = 1e-4              # |PPL_llama-perplexity / PPL_bindings - 1| (same computation)


def chunks(tokens_with_bos: np.ndarray, n_ctx: int, max_chunks: int, bos: int) -> list[np.ndarray]:
    """llama-perplexity's chunks: n_ctx tokens each, first token replaced by BOS."""
    n = min(len(tokens_with_bos) // n_ctx, max_chunks)
    if n < 1:
        raise ValueError(f"held-out text has {len(tokens_with_bos)} tokens, fewer than one chunk of {n_ctx}")
    out = []
    for i in range(n):
        c = tokens_with_bos[i * n_ctx:(i + 1) * n_ctx].copy()
        c[0] = bos
        out.append(c)
    return out


def torch_logits(model: RefMoE, chunk: np.ndarray) -> tuple[np.ndarray, list[np.ndarray], np.ndarray]:
    """F32 logits [n_ctx, n_vocab], per-block expert assignment counts, routing margin [n_ctx]."""
    with torch.no_grad():
        hidden, _, stats = model(torch.from_numpy(chunk.astype(np.int64))[None])
        logits = model.output(hidden)[0]
    return logits.numpy(), [c.numpy() for c in stats["counts"]], stats["margin"].numpy()


class LlamaRunner:
    """The exported GGUF in llama.cpp through the bindings' C API: one chunk per decode, logits
    for every position. Extra buffer types (CPU weight repacking) are off, like
    `llama-perplexity --no-repack`: on AMX machines the pinned llama.cpp aborts in its scheduler
    (GGML_ASSERT cur_backend_id != -1) with them on, for any mistral4 model."""

    _log_callback = None  # keep the ctypes callback alive

    def __init__(self, gguf_path: Path, n_ctx: int, threads: int):
        ll = self.ll = load_llama_cpp()
        if LlamaRunner._log_callback is None:
            verbose = os.environ.get("APEX_ORCH_DEBUG", "") not in ("", "0")

            @ll.llama_log_callback
            def _log(level, text, _user):  # pragma: no cover - only prints
                if verbose or level == 3:  # GGML_LOG_LEVEL_ERROR
                    sys.stderr.write(text.decode("utf-8", errors="replace"))

            LlamaRunner._log_callback = _log
            ll.llama_log_set(_log, ctypes.c_void_p(0))
            ll.llama_backend_init()
        self.n_ctx = n_ctx
        mp = ll.llama_model_default_params()
        mp.use_extra_bufts = False
        self.model = ll.llama_model_load_from_file(str(gguf_path).encode(), mp)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {gguf_path}")
        self.n_vocab = int(ll.llama_vocab_n_tokens(ll.llama_model_get_vocab(self.model)))
        cp = ll.llama_context_default_params()
        cp.n_ctx = cp.n_batch = cp.n_ubatch = n_ctx
        cp.n_seq_max = 1
        cp.n_threads = cp.n_threads_batch = threads
        cp.flash_attn_type = ll.LLAMA_FLASH_ATTN_TYPE_ENABLED  # llama-perplexity's `auto` on CPU
        self.ctx = ll.llama_init_from_model(self.model, cp)
        if not self.ctx:
            ll.llama_model_free(self.model)
            raise RuntimeError(f"llama.cpp could not create a context for {gguf_path}")
        self.batch = ll.llama_batch_init(n_ctx, 0, 1)
        for i in range(n_ctx):
            self.batch.seq_id[i][0] = 0
            self.batch.n_seq_id[i] = 1
            self.batch.pos[i] = i
            self.batch.logits[i] = 1

    def logits(self, chunk: np.ndarray) -> np.ndarray:
        ll, n = self.ll, len(chunk)
        ll.llama_memory_clear(ll.llama_get_memory(self.ctx), True)
        np.ctypeslib.as_array(self.batch.token, shape=(self.n_ctx,))[:n] = chunk
        self.batch.n_tokens = n
        if ll.llama_decode(self.ctx, self.batch) != 0:
            raise RuntimeError("llama_decode failed")
        return np.ctypeslib.as_array(ll.llama_get_logits(self.ctx), shape=(n, self.n_vocab)).copy()

    def close(self) -> None:
        if self.ctx:
            self.ll.llama_batch_free(self.batch)
            self.ll.llama_free(self.ctx)
            self.ll.llama_model_free(self.model)
            self.ctx = None


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


@dataclass
class DomainReport:
    domain: str
    n_chunks: int
    n_ctx: int
    scored_tokens: int
    ppl_torch: float
    ppl_llama: float
    ppl_llama_perplexity_tool: float | None
    positions_compared: int
    mean_kld: float
    max_kld: float
    top1_agreement: float
    mean_abs_target_logp: float
    p999_abs_target_logp: float
    max_abs_target_logp: float
    ambiguous_routing_positions: int      # positions with a routing margin < ROUTING_MARGIN
    max_abs_target_logp_clear: float      # worst |delta log p(next)| over the other positions
    max_abs_logit: float
    expert_share_min: float               # smallest share of routed assignments any expert got (any block)
    expert_share_max: float
    expert_token_fraction_min: float = 0.0  # smallest share of the positions routed to one expert (any block)

    def failures(self) -> list[str]:
        checks = [
            (self.mean_kld <= TOL_MEAN_KLD, f"mean KLD {self.mean_kld:.3g} > {TOL_MEAN_KLD}"),
            (self.top1_agreement >= TOL_TOP1, f"top-1 agreement {self.top1_agreement:.4f} < {TOL_TOP1}"),
            (self.p999_abs_target_logp <= TOL_P999_TARGET_LOGP,
             f"99.9th percentile |delta log p(next)| {self.p999_abs_target_logp:.3g} > {TOL_P999_TARGET_LOGP}"),
            (self.max_abs_target_logp <= TOL_MAX_TARGET_LOGP,
             f"max |delta log p(next)| {self.max_abs_target_logp:.3g} > {TOL_MAX_TARGET_LOGP}"),
            (abs(self.ppl_llama / self.ppl_torch - 1) <= TOL_PPL_REL,
             f"PPL llama.cpp {self.ppl_llama:.4f} vs torch {self.ppl_torch:.4f} differs by more than "
             f"{TOL_PPL_REL:.1%}"),
        ]
        if self.ppl_llama_perplexity_tool is not None:
            checks.append((abs(self.ppl_llama_perplexity_tool / self.ppl_llama - 1) <= TOL_TOOL_REL,
                           f"llama-perplexity PPL {self.ppl_llama_perplexity_tool} vs bindings {self.ppl_llama:.4f}"))
        return [f"{self.domain}: {msg}" for ok, msg in checks if not ok]


def compare(model: RefMoE, runner: LlamaRunner, domain: str, tokens_with_bos: np.ndarray,
            n_ctx: int, max_chunks: int, bos: int) -> DomainReport:
    first = n_ctx // 2
    nll_t = nll_l = 0.0
    scored = 0
    max_logit = 0.0
    klds, dlogp, margins = [], [], []
    same = positions = 0
    expert_counts: list[np.ndarray] | None = None
    parts = chunks(tokens_with_bos, n_ctx, max_chunks, bos)
    for chunk in parts:
        lt, counts, margin = torch_logits(model, chunk)
        ll = runner.logits(chunk)
        expert_counts = counts if expert_counts is None else [a + b for a, b in zip(expert_counts, counts)]
        max_logit = max(max_logit, float(np.abs(lt - ll).max()))
        pt, pl = _log_softmax(lt), _log_softmax(ll)
        nxt = chunk[1:]
        idx = np.arange(len(nxt))
        tgt_t, tgt_l = pt[idx, nxt], pl[idx, nxt]
        dlogp.append(np.abs(tgt_t - tgt_l))
        margins.append(margin[:-1])
        klds.append((np.exp(pt) * (pt - pl)).sum(-1))
        same += int((pt.argmax(-1) == pl.argmax(-1)).sum())
        positions += len(chunk)
        # Scored half: logits at positions first .. n_ctx-2 predict tokens first+1 .. n_ctx-1.
        nll_t -= float(tgt_t[first:n_ctx - 1].sum())
        nll_l -= float(tgt_l[first:n_ctx - 1].sum())
        scored += n_ctx - 1 - first
    assert expert_counts is not None
    shares = [c / c.sum() for c in expert_counts]
    d, m, kld = np.concatenate(dlogp), np.concatenate(margins), np.concatenate(klds)
    clear = m >= ROUTING_MARGIN
    return DomainReport(
        domain=domain, n_chunks=len(parts), n_ctx=n_ctx, scored_tokens=scored,
        ppl_torch=math.exp(nll_t / scored), ppl_llama=math.exp(nll_l / scored),
        ppl_llama_perplexity_tool=None, positions_compared=positions,
        mean_kld=float(kld.mean()), max_kld=float(kld.max()), top1_agreement=same / positions,
        mean_abs_target_logp=float(d.mean()), p999_abs_target_logp=float(np.quantile(d, 0.999)),
        max_abs_target_logp=float(d.max()), ambiguous_routing_positions=int((~clear).sum()),
        max_abs_target_logp_clear=float(d[clear].max()) if clear.any() else 0.0,
        max_abs_logit=max_logit,
        expert_share_min=float(min(x.min() for x in shares)),
        expert_share_max=float(max(x.max() for x in shares)),
        expert_token_fraction_min=float(min(c.min() for c in expert_counts)) / positions,
    )


_FINAL_PPL = re.compile(r"Final estimate: PPL = ([0-9.]+) \+/- ([0-9.]+)")


def llama_perplexity_tool(gguf_path: Path, text_path: Path, n_ctx: int, max_chunks: int,
                          threads: int, log_path: Path | None = None, attempts: int = 5) -> float | None:
    """PPL printed by the pinned llama-perplexity (one sequence per batch, flash attention on,
    no weight repacking: see LlamaRunner).

    The pinned llama.cpp logs through an asynchronous queue that is never flushed at exit
    (common_log_main() is leaked), so under CPU load the tool sometimes exits 0 with its last
    lines, "Final estimate" included, lost (2 of 8 runs on a loaded 2-core machine). Such a run
    is repeated, up to `attempts` times; None if every attempt lost the line.
    """
    tool = find_tool("llama-perplexity").path
    argv = [tool, "-m", gguf_path, "-f", text_path, "-c", str(n_ctx), "-b", str(n_ctx),
            "--chunks", str(max_chunks), "-t", str(threads), "-fa", "on", "--no-repack"]
    for _ in range(attempts):
        result = run_tool(argv, log_path=log_path, timeout=1800, tail_lines=200)
        for line in reversed(result.tail):
            m = _FINAL_PPL.search(line)
            if m:
                return float(m.group(1))
    return None
