"""A byte-level BPE vocabulary as the GGUF keys llama.cpp loads (`gpt2` model, `gpt-2` pre-tokenizer).

The token texts are in GPT-2's byte-to-unicode form and the merges in rank order, as the
`tokenizers` library writes them; two control tokens, BOS and EOS, come after the BPE tokens and
are never produced from text. Used for the demo model's committed vocabulary and the reference
model's trained one (bench/reference_model/bpe.py), which also proves, token for token, that
llama.cpp encodes text with these keys exactly as `tokenizers` does.
"""

from __future__ import annotations

BOS_TEXT = "<|bos|>"
EOS_TEXT = "<|endoftext|>"   # a name llama.cpp counts as end-of-generation
TOKEN_NORMAL, TOKEN_CONTROL = 1, 3     # gguf.TokenType


def bpe_tokenizer_kv(tokens: list[str], merges: list[str]) -> list[tuple[str, object, int, int | None]]:
    """GGUF tokenizer keys (apex_orch.demo.synthetic.TokenizerKV) for BPE `tokens` (by id) and
    `merges` ("left right", rank order); BOS and EOS are appended as control tokens."""
    from gguf import GGUFValueType as V

    if not tokens or any(not isinstance(t, str) or not t for t in tokens):
        raise ValueError("a BPE vocabulary needs non-empty token texts")
    if len(set(tokens)) != len(tokens):
        raise ValueError("a BPE vocabulary has duplicate token texts")
    if any(not isinstance(m, str) or m.count(" ") != 1 for m in merges):
        raise ValueError("BPE merges are 'left right' strings")
    bos, eos = len(tokens), len(tokens) + 1
    all_tokens = list(tokens) + [BOS_TEXT, EOS_TEXT]
    types = [TOKEN_NORMAL] * len(tokens) + [TOKEN_CONTROL, TOKEN_CONTROL]
    return [
        ("tokenizer.ggml.model", "gpt2", int(V.STRING), None),
        ("tokenizer.ggml.pre", "gpt-2", int(V.STRING), None),
        ("tokenizer.ggml.tokens", all_tokens, int(V.ARRAY), int(V.STRING)),
        ("tokenizer.ggml.token_type", types, int(V.ARRAY), int(V.INT32)),
        ("tokenizer.ggml.merges", list(merges), int(V.ARRAY), int(V.STRING)),
        ("tokenizer.ggml.bos_token_id", bos, int(V.UINT32), None),
        ("tokenizer.ggml.eos_token_id", eos, int(V.UINT32), None),
        ("tokenizer.ggml.add_bos_token", True, int(V.BOOL), None),
        ("tokenizer.ggml.add_eos_token", False, int(V.BOOL), None),
    ]
