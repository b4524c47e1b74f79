"""Configurations of the reference model: the full one (`make reference-model`) and a tiny one
for the CI smoke test. Everything that changes the trained weights lives here, so the cache key
is a hash of this dataclass (plus the data, the code and the pinned versions).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from apex_orch.demo.spec import SyntheticSpec


@dataclass(frozen=True)
class RefConfig:
    # --- architecture (mistral4 as llama.cpp loads it: deepseek2 MLA + routed/shared experts).
    # The defaults are the first reference model's; FULL below is the one shaped like a real MoE.
    n_layer: int = 12
    n_embd: int = 256
    n_head: int = 4
    q_lora_rank: int = 256          # attn_q_b ne0
    kv_lora_rank: int = 256         # attn_v_b ne0 (and attn_kv_a_norm)
    qk_nope: int = 32               # attn_k_b ne0: the one row length the architecture keeps small
    qk_rope: int = 32               # q/k head 64 = v head, as in Mistral-Small-4 (64+64 = 128 = v):
    v_head: int = 64                # equal dims let torch use its fused CPU attention kernel
                                    # n_head * v_head = attn_output ne0 = 256
    n_expert: int = 16
    n_expert_used: int = 2
    n_expert_shared: int = 1
    expert_ff: int = 256
    seq_len: int = 512              # training context; written as mistral4.context_length
    # --- vocabulary
    vocab: str = "llama-spm"        # "llama-spm": the pinned tree's 32000 tokens; "bpe": a byte-level
    bpe_vocab_size: int = 4096      # BPE of this many tokens trained on the training text (bpe.py)
    # --- data
    code_bytes: int = 4_000_000     # stdlib .py training text (~1.2 M tokens)
    prose_bytes: int | None = None  # pydoc topics training text (all of it, ~0.37 MB)
    prose_fraction: float = 0.25    # share of training sequences drawn from prose
    heldout_bytes: int | None = None  # cap on each domain's held-out text (None: all of it)
    # --- training
    steps: int = 360                # ~3.2-3.9 s/step on 2 idle cores (AMX bf16): ~20-23 min
    batch_seqs: int = 4             # sequences per optimizer step (2048 tokens)
    micro_seqs: int = 4             # sequences per forward/backward (memory bound by the vocab)
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup: int = 30
    weight_decay: float = 0.1
    aux_loss_coef: float = 0.01     # Switch-style load balancing, keeps every expert in use
    init_std: float = 0.02
    bf16: bool = True               # autocast matmuls to bf16 (AMX/AVX512-BF16); master weights F32
    threads: int = 2
    seed: int = 1234
    # --- evaluation
    eval_chunks: int = 32           # held-out chunks of seq_len tokens per domain
    name: str = "APEX-Reference-MoE"

    def spec(self) -> SyntheticSpec:
        """The synthetic-model spec (apex_orch.demo.spec) with this architecture (the GGUF layout and metadata)."""
        return SyntheticSpec(
            arch="mistral4", n_layer=self.n_layer, n_embd=self.n_embd, n_expert=self.n_expert,
            n_expert_used=self.n_expert_used, n_expert_shared=self.n_expert_shared,
            expert_ff=self.expert_ff, n_head=self.n_head, q_lora_rank=self.q_lora_rank,
            kv_lora_rank=self.kv_lora_rank, qk_nope=self.qk_nope, qk_rope=self.qk_rope,
            v_head=self.v_head, context=self.seq_len, name=self.name, seed=self.seed,
        )

    def asdict(self) -> dict:
        return dataclasses.asdict(self)


# Shaped like the MoEs APEX targets: routed experts ~90% of the weights (Mistral-Small-4: ~97%),
# 32 routed experts with 4 used and a shared expert (Mistral-Small-4's 128/4/1, scaled), 16 blocks
# (so the APEX bands have a middle), MLA, and a 4096-token BPE vocabulary (embeddings ~2%).
# Every row length is a multiple of 256 except MLA's attn_k_b, as in the real model.
FULL = RefConfig(
    n_layer=16, n_expert=32, n_expert_used=4, n_expert_shared=1, expert_ff=256,
    vocab="bpe", bpe_vocab_size=4096, code_bytes=8_000_000,
    steps=360, batch_seqs=4, micro_seqs=4, lr=3e-3, min_lr=3e-4, warmup=40,
)

# The first reference model (61 M parameters, 37% of them token_embd + output with the 32000-token
# llama-spm vocabulary): the vocabulary-heavy case. `--config vocab-heavy` rebuilds it.
VOCAB_HEAVY = RefConfig()

# CI smoke: 2 blocks, tiny widths, a handful of steps on ~40 KB of text; exercises the whole
# path (tokenize, train, export, llama.cpp load, logit agreement) in well under a minute.
SMOKE = RefConfig(
    n_layer=2, n_embd=64, n_head=2, q_lora_rank=64, kv_lora_rank=64, qk_nope=16, qk_rope=16,
    v_head=32, n_expert=4, n_expert_used=2, expert_ff=64, seq_len=64,
    code_bytes=30_000, prose_bytes=10_000, heldout_bytes=4_000, steps=6, batch_seqs=4, micro_seqs=4,
    lr=1e-2, min_lr=1e-3, warmup=2, eval_chunks=2, vocab="bpe", bpe_vocab_size=512,
    name="APEX-Reference-MoE-Smoke",
)

# FULL trained on ~13x the tokens (9.8 M): what the measured curve says the experts need to carry
# 30% of the IQ2_S damage (3.0% after 0.74 M tokens, rising about linearly), with a stronger
# load-balancing loss (FULL left one expert of one block unused). Hours on 2 CPU cores, minutes on
# a GPU: `python -m bench.reference_model.train --config full-long --device cuda`.
FULL_LONG = dataclasses.replace(FULL, steps=600, batch_seqs=32, micro_seqs=32, warmup=60, aux_loss_coef=0.02)

CONFIGS = {"full": FULL, "full-long": FULL_LONG, "vocab-heavy": VOCAB_HEAVY, "smoke": SMOKE}
