"""Tokenization with llama.cpp itself (through the bindings), so training and evaluation see
exactly the tokens llama-perplexity / llama-imatrix will see for the same text."""

from __future__ import annotations

import atexit
import functools

import numpy as np

from apex_orch.demo import synthetic
from apex_orch.llama.bindings import load_llama_cpp


@functools.lru_cache(maxsize=1)
def _vocab_model():
    llama_cpp = load_llama_cpp()
    model = llama_cpp.Llama(str(synthetic.vocab_gguf_path()), vocab_only=True, verbose=False)
    atexit.register(model.close)  # free it before the interpreter tears the bindings down
    return model


def tokenize(text: str) -> np.ndarray:
    """Token ids (int64) of `text` without BOS, as llama.cpp's llama-spm tokenizer gives them."""
    ids = _vocab_model().tokenize(text.encode("utf-8"), add_bos=False, special=False)
    return np.asarray(ids, dtype=np.int64)


def bos_id() -> int:
    return int(_vocab_model().token_bos())


def n_vocab() -> int:
    return int(_vocab_model().n_vocab())
