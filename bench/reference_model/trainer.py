"""Deterministic CPU training of the reference MoE.

Batches: each sequence is [BOS] + seq_len-1 consecutive tokens of one domain's training
stream (prose with probability `prose_fraction`, else code) from a seeded random offset, and
is trained to predict those tokens plus the next one, the same layout llama-perplexity
evaluates (BOS at position 0 of each chunk). AdamW, linear warmup then cosine decay, bf16
autocast for the matmuls with F32 master weights, Switch-style load-balancing loss.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from .config import RefConfig
from .model import RefMoE


@dataclass
class TrainResult:
    model: RefMoE
    seconds: float
    cpu_seconds: float                                 # process CPU time (all threads)
    tokens_seen: int
    loss_first: float                                  # mean LM loss of the first min(10, steps/2) steps
    loss_last: float                                   # mean LM loss of the last min(10, steps/2) steps
    history: list[dict] = field(default_factory=list)  # one record per logged step


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
    # Same result on every run of the same machine/torch; warn instead of failing on ops
    # without a deterministic variant (none are expected on CPU).
    torch.use_deterministic_algorithms(True, warn_only=True)


def lr_at(cfg: RefConfig, step: int) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * min(1.0, t)))


class BatchSampler:
    def __init__(self, cfg: RefConfig, streams: dict[str, np.ndarray], bos: int, seed: int):
        self.cfg, self.bos = cfg, bos
        self.code = torch.from_numpy(streams["code"])
        self.prose = torch.from_numpy(streams["prose"])
        for name, s in (("code", self.code), ("prose", self.prose)):
            if len(s) < cfg.seq_len + 1:
                raise ValueError(f"the {name} training stream has {len(s)} tokens, "
                                 f"fewer than one sequence ({cfg.seq_len})")
        self.gen = torch.Generator().manual_seed(seed)

    def next(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        T = self.cfg.seq_len
        inputs = torch.empty(n, T, dtype=torch.long)
        targets = torch.empty(n, T, dtype=torch.long)
        for i in range(n):
            pick_prose = torch.rand((), generator=self.gen).item() < self.cfg.prose_fraction
            stream = self.prose if pick_prose else self.code
            start = int(torch.randint(0, len(stream) - T + 1, (), generator=self.gen))
            window = stream[start:start + T]
            inputs[i, 0] = self.bos
            inputs[i, 1:] = window[:-1]
            targets[i] = window
        return inputs, targets


def _param_groups(model: RefMoE, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if name.endswith("norm.weight") else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def pick_device(name: str = "auto") -> torch.device:
    """"cpu", "cuda", or "auto": CUDA when a GPU is available (the same configuration trains there in
    minutes instead of hours), else the CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device cuda: no CUDA GPU is available to torch")
    if name not in ("cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, got {name!r}")
    return torch.device(name)


def train(cfg: RefConfig, streams: dict[str, np.ndarray], bos: int, n_vocab: int,
          log: Callable[[str], None] = print, log_every: int = 10,
          on_step: Callable[[int, RefMoE], None] | None = None, device: str = "cpu") -> TrainResult:
    """Train from the seed; `on_step(steps_done, model)` is called after every optimizer step
    (checkpoints: it must not change the model). The weights are initialised on the CPU (the same
    start on every device); on "cuda" the model then trains on the GPU, bf16 autocast included."""
    dev = pick_device(device)
    torch.set_num_threads(cfg.threads)
    seed_everything(cfg.seed)
    model = RefMoE(cfg, n_vocab)
    model.init_weights(torch.Generator().manual_seed(cfg.seed))
    model.to(dev)
    model.train()
    opt = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.lr,
                            betas=(0.9, 0.95), eps=1e-8)
    sampler = BatchSampler(cfg, streams, bos, cfg.seed + 1)
    if cfg.batch_seqs % cfg.micro_seqs:
        raise ValueError("batch_seqs must be a multiple of micro_seqs")
    n_micro = cfg.batch_seqs // cfg.micro_seqs

    history: list[dict] = []
    losses: list[float] = []
    start, cpu_start = time.monotonic(), time.process_time()
    for step in range(cfg.steps):
        lr = lr_at(cfg, step)
        for group in opt.param_groups:
            group["lr"] = lr
        lm_sum = aux_sum = 0.0
        for _ in range(n_micro):
            inputs, targets = (x.to(dev) for x in sampler.next(cfg.micro_seqs))
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cfg.bf16):
                hidden, aux, _ = model(inputs)
                logits = model.output(hidden)
            lm = F.cross_entropy(logits.float().view(-1, n_vocab), targets.view(-1))
            ((lm + cfg.aux_loss_coef * aux) / n_micro).backward()
            lm_sum += lm.item() / n_micro
            aux_sum += aux.item() / n_micro
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(lm_sum)
        if on_step is not None:
            on_step(step + 1, model)
        if step % log_every == 0 or step == cfg.steps - 1:
            elapsed = time.monotonic() - start
            rec = {"step": step, "loss": round(lm_sum, 4), "aux": round(aux_sum, 4),
                   "lr": lr, "seconds": round(elapsed, 1)}
            history.append(rec)
            tok_s = (step + 1) * cfg.batch_seqs * cfg.seq_len / max(elapsed, 1e-9)
            log(f"step {step:5d}/{cfg.steps}  loss {lm_sum:.4f}  aux {aux_sum:.3f}  "
                f"lr {lr:.2e}  {elapsed:7.1f}s  {tok_s:.0f} tok/s")
    seconds, cpu_seconds = time.monotonic() - start, time.process_time() - cpu_start
    model.eval()
    model.to("cpu")   # export, checkpoints and the export check run on the CPU
    k = max(1, min(10, len(losses) // 2))
    return TrainResult(model=model, seconds=seconds, cpu_seconds=cpu_seconds,
                       tokens_seen=cfg.steps * cfg.batch_seqs * cfg.seq_len,
                       loss_first=float(np.mean(losses[:k])), loss_last=float(np.mean(losses[-k:])),
                       history=history)
