"""A byte-level BPE vocabulary sized for the model, trained on its own training text.

Why: a 32000-token vocabulary makes token_embd and output a third of a 60 M-parameter model,
which is nothing like the MoEs APEX targets (routed experts ~97% of Mistral-Small-4). A few
thousand tokens keeps the embeddings a few percent of the weights.

How: the `tokenizers` library trains a GPT-2-style byte-level BPE (GPT-2's pre-tokenizer regex,
no normalizer, every byte in the initial alphabet, so no text is ever unknown). The GGUF form is
llama.cpp's `gpt2` tokenizer model with the `gpt-2` pre-tokenizer: the same regex (llama.cpp
implements it by hand in unicode.cpp), the same byte-to-unicode mapping of the token texts, the
merges in rank order. Two control tokens, BOS and EOS, are appended after the BPE tokens and
never produced from text (tokenizers' own vocabulary has none, so its encoding cannot split on
them either). `check_same_tokens` proves token for token that llama.cpp and `tokenizers` encode
a text identically; the build runs it on the held-out text before training.
"""

from __future__ import annotations

import json
from typing import Callable, Iterable

import numpy as np

from apex_orch.demo.vocab import bpe_tokenizer_kv

MIN_FREQUENCY = 2


def train(texts: Iterable[str], n_vocab: int):
    """A trained `tokenizers.Tokenizer` with n_vocab - 2 BPE tokens (the two control tokens are
    added in the GGUF form only)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=n_vocab - 2, min_frequency=MIN_FREQUENCY, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    tok.train_from_iterator(list(texts), trainer=trainer)
    if tok.get_vocab_size() != n_vocab - 2:
        raise ValueError(f"BPE training gave {tok.get_vocab_size()} tokens, wanted {n_vocab - 2}: "
                         "the training text is too small for this vocabulary")
    return tok


def from_json(text: str):
    from tokenizers import Tokenizer

    return Tokenizer.from_str(text)


def _merges(tok) -> list[str]:
    raw = json.loads(tok.to_str())["model"]["merges"]
    # tokenizers >= 0.20 stores [left, right] pairs, older releases "left right" strings
    return [m if isinstance(m, str) else f"{m[0]} {m[1]}" for m in raw]


def gguf_tokenizer_kv(tok) -> list[tuple[str, object, int, int | None]]:
    """The tokenizer as GGUF keys (apex_orch.demo.vocab.bpe_tokenizer_kv: gpt2 / gpt-2, the BPE
    tokens by id, then BOS and EOS as control tokens; BOS added at the start)."""
    tokens, merges = tokens_and_merges(tok)
    return bpe_tokenizer_kv(tokens, merges)


def tokens_and_merges(tok) -> tuple[list[str], list[str]]:
    vocab = tok.get_vocab()
    tokens = [""] * len(vocab)
    for text, idx in vocab.items():
        tokens[idx] = text
    if any(t == "" for t in tokens):
        raise ValueError("the BPE vocabulary has holes in its ids")
    return tokens, _merges(tok)


def encode(tok, text: str) -> np.ndarray:
    return np.asarray(tok.encode(text, add_special_tokens=False).ids, dtype=np.int64)


def check_same_tokens(tok, llama_tokenize: Callable[[str], np.ndarray], texts: dict[str, str]) -> dict:
    """Encode every text with `tokenizers` and with llama.cpp; equal token ids or a ValueError
    naming the first difference. Returns {name: token count}."""
    out = {}
    for name, text in texts.items():
        ours, theirs = encode(tok, text), llama_tokenize(text)
        if len(ours) != len(theirs) or not np.array_equal(ours, theirs):
            n = min(len(ours), len(theirs))
            diff = np.flatnonzero(ours[:n] != theirs[:n])
            at = int(diff[0]) if len(diff) else n
            pieces = tok.decode(ours[max(0, at - 3):at + 3].tolist())
            raise ValueError(f"{name}: llama.cpp and tokenizers disagree at token {at} of {len(ours)} / "
                             f"{len(theirs)} (tokenizers {ours[at:at + 4].tolist()}, llama.cpp "
                             f"{theirs[at:at + 4].tolist()}, text around it {pieces!r})")
        out[name] = int(len(ours))
    return out
