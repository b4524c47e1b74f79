"""Tokenization with llama.cpp itself (through the bindings), so training and evaluation see
exactly the tokens llama-perplexity / llama-imatrix will see for the same text.

The vocabulary is read from a GGUF: the pinned tree's llama-spm file (32000 tokens) or a
vocab-only file written for a trained BPE (bpe.py).
"""

from __future__ import annotations

import atexit
import functools
from pathlib import Path

import numpy as np

from apex_orch.demo import synthetic
from apex_orch.llama.bindings import load_llama_cpp


@functools.lru_cache(maxsize=4)
def _vocab_model(path: str):
    llama_cpp = load_llama_cpp()
    model = llama_cpp.Llama(path, vocab_only=True, verbose=False)
    atexit.register(model.close)  # free it before the interpreter tears the bindings down
    return model


class Vocab:
    """llama.cpp's tokenizer of one GGUF (None: the pinned llama-spm vocabulary)."""

    def __init__(self, gguf_path: Path | None = None):
        self.path = Path(gguf_path) if gguf_path else synthetic.vocab_gguf_path()

    def tokenize(self, text: str) -> np.ndarray:
        """Token ids (int64) of `text` without BOS, as llama.cpp gives them."""
        ids = _vocab_model(str(self.path)).tokenize(text.encode("utf-8"), add_bos=False, special=False)
        return np.asarray(ids, dtype=np.int64)

    def bos_id(self) -> int:
        return int(_vocab_model(str(self.path)).token_bos())

    def n_vocab(self) -> int:
        return int(_vocab_model(str(self.path)).n_vocab())
