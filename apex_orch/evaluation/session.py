"""A llama.cpp session through the bindings' C API, decoding exactly as llama-perplexity does.

Takes: a GGUF path and the context parameters of an `EvalSettings`.
Gives: `BindingsModel` (tokenize, vocabulary signature), `BindingsContext` (decode a batch,
read its logits as a numpy view), `chunk_logits` (one chunk decoded the tool's way: empty KV
cache, BOS first, logits of the scored half only), and the vocabulary check that refuses a
base from another tokenizer.

Shaped so because the high-level `llama_cpp.Llama` builds its own batches and context
defaults; llama-perplexity's numbers depend on those (batch split, n_seq, swa_full), so we
set them by hand, as common_params would.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import sys
from pathlib import Path

import numpy as np

from apex_orch.core import settings as apex_settings
from apex_orch.core.errors import EvalError, ModelError
from apex_orch.evaluation.inputs import EvalSettings
from apex_orch.llama.bindings import load_llama_cpp

_LOG_CALLBACK = None     # kept referenced: llama.cpp calls it for the life of the process


def _llama():
    """The bindings, with llama.cpp's log chatter routed nowhere unless APEX_ORCH_DEBUG is set."""
    global _LOG_CALLBACK

    ll = load_llama_cpp()
    if _LOG_CALLBACK is None:
        verbose = apex_settings.debug()

        @ll.llama_log_callback
        def _log(level, text, _user):  # pragma: no cover - only prints
            if verbose or level == 3:  # GGML_LOG_LEVEL_ERROR
                sys.stderr.write(text.decode("utf-8", errors="replace"))

        _LOG_CALLBACK = _log
        ll.llama_log_set(_LOG_CALLBACK, ctypes.c_void_p(0))
        ll.llama_backend_init()
    return ll


class BindingsModel:
    """A model loaded through llama_cpp's C API (no high-level wrapper: we build the exact
    batches llama-perplexity builds)."""

    def __init__(self, path: str | os.PathLike, *, vocab_only: bool = False, repack: bool = False):
        self.ll = ll = _llama()
        self.path = Path(path)
        params = ll.llama_model_default_params()
        params.vocab_only = vocab_only
        params.use_extra_bufts = repack
        self.model = ll.llama_model_load_from_file(str(self.path).encode(), params)
        if not self.model:
            raise ModelError("llama.cpp could not load this model", where=str(self.path),
                             hint="run with APEX_ORCH_DEBUG=1 to see llama.cpp's reason; the file may be "
                                  "damaged or of an architecture the pinned llama.cpp does not know")
        self.vocab = ll.llama_model_get_vocab(self.model)
        self.n_vocab = int(ll.llama_vocab_n_tokens(self.vocab))
        self.add_bos = bool(ll.llama_vocab_get_add_bos(self.vocab))
        self.bos = int(ll.llama_vocab_bos(self.vocab))

    def tokenize(self, data: bytes) -> np.ndarray:
        """common_tokenize(ctx, text, add_special=true, parse_special=false)."""
        n_max = len(data) + 2
        buf = (self.ll.llama_token * n_max)()
        n = self.ll.llama_tokenize(self.vocab, data, len(data), buf, n_max, True, False)
        if n < 0:
            n_max = -n
            buf = (self.ll.llama_token * n_max)()
            n = self.ll.llama_tokenize(self.vocab, data, len(data), buf, n_max, True, False)
        return np.ctypeslib.as_array(buf)[:n].astype(np.int32)

    def token_text(self, token: int) -> str:
        raw = self.ll.llama_vocab_get_text(self.vocab, token)
        return raw.decode("utf-8", errors="replace") if raw else ""

    def vocab_signature(self) -> dict:
        """n_vocab, a few token strings and a hash of them all (to refuse a foreign base)."""
        h = hashlib.sha256()
        for i in range(self.n_vocab):
            h.update(self.token_text(i).encode("utf-8", errors="replace") + b"\0")
        picks = sorted({0, 1, 2, min(100, self.n_vocab - 1), self.n_vocab // 2, self.n_vocab - 1})
        return {"n_vocab": self.n_vocab, "add_bos": self.add_bos, "bos": self.bos,
                "sample": {str(i): self.token_text(i) for i in picks}, "sha256": h.hexdigest()}

    def context(self, *, n_ctx: int, n_batch: int, n_ubatch: int, n_threads: int,
                flash_attn: bool) -> "BindingsContext":
        return BindingsContext(self, n_ctx=n_ctx, n_batch=n_batch, n_ubatch=n_ubatch,
                               n_threads=n_threads, flash_attn=flash_attn)

    def close(self) -> None:
        if self.model:
            self.ll.llama_model_free(self.model)
            self.model = None

    def __enter__(self) -> "BindingsModel":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class BindingsContext:
    """One llama_context with the parameters llama-perplexity's common_params give it."""

    def __init__(self, model: BindingsModel, *, n_ctx: int, n_batch: int, n_ubatch: int,
                 n_threads: int, flash_attn: bool):
        ll = self.ll = model.ll
        self.model = model
        self.n_vocab = model.n_vocab
        self.n_batch = n_batch
        cp = ll.llama_context_default_params()
        cp.n_ctx = n_ctx
        cp.n_batch = n_batch
        cp.n_ubatch = n_ubatch
        cp.n_seq_max = 1
        cp.n_threads = n_threads
        cp.n_threads_batch = n_threads
        cp.flash_attn_type = ll.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash_attn else ll.LLAMA_FLASH_ATTN_TYPE_DISABLED
        cp.swa_full = False          # common_params default (the C default is true)
        cp.kv_unified = False
        cp.no_perf = False
        self.ctx = ll.llama_init_from_model(model.model, cp)
        if not self.ctx:
            raise EvalError(f"llama.cpp could not create a context (n_ctx={n_ctx}, n_batch={n_batch})",
                            where=str(model.path), hint="lower the context or free memory")
        self.batch = ll.llama_batch_init(n_batch, 0, 1)
        self._tok = np.ctypeslib.as_array(self.batch.token, shape=(n_batch,))
        self._pos = np.ctypeslib.as_array(self.batch.pos, shape=(n_batch,))
        self._nseq = np.ctypeslib.as_array(self.batch.n_seq_id, shape=(n_batch,))
        self._out = np.ctypeslib.as_array(self.batch.logits, shape=(n_batch,))
        for i in range(n_batch):
            self.batch.seq_id[i][0] = 0
        self._nseq[:] = 1

    def clear(self) -> None:
        self.ll.llama_memory_clear(self.ll.llama_get_memory(self.ctx), True)

    def decode(self, tokens: np.ndarray, pos0: int, outputs: np.ndarray) -> int:
        """Decode tokens at positions pos0.. in sequence 0; `outputs` marks rows that want logits."""
        n = len(tokens)
        self._tok[:n] = tokens
        self._pos[:n] = np.arange(pos0, pos0 + n, dtype=np.int32)
        self._out[:n] = outputs.astype(np.int8)
        self.batch.n_tokens = n
        ret = self.ll.llama_decode(self.ctx, self.batch)
        if ret != 0:
            raise EvalError(f"llama_decode failed (code {ret})", where=str(self.model.path),
                            hint="run with APEX_ORCH_DEBUG=1 to see llama.cpp's log")
        return int(outputs.sum())

    def logits(self, n_outputs: int) -> np.ndarray:
        """View of the last decode's logits, [n_outputs, n_vocab] float32 (valid until the next decode)."""
        ptr = self.ll.llama_get_logits(self.ctx)
        return np.ctypeslib.as_array(ptr, shape=(n_outputs, self.n_vocab))

    def synchronize(self) -> None:
        self.ll.llama_synchronize(self.ctx)

    def close(self) -> None:
        if self.ctx:
            self.ll.llama_batch_free(self.batch)
            self.ll.llama_free(self.ctx)
            self.ctx = None

    def __enter__(self) -> "BindingsContext":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def chunk_logits(cx: BindingsContext, tokens: np.ndarray, start: int, settings: EvalSettings,
                 add_bos: bool, bos: int) -> np.ndarray:
    """Decode one chunk like llama-perplexity and return the logits of positions first..n_ctx-1."""
    n_ctx, n_batch, first = settings.n_ctx, settings.batch, settings.first
    chunk = tokens[start:start + n_ctx].copy()
    if add_bos:
        chunk[0] = bos
    cx.clear()
    pos = np.arange(n_ctx)
    n_batches = (n_ctx + n_batch - 1) // n_batch
    if n_batches == 1:
        n_out = cx.decode(chunk, 0, pos >= first)
        return cx.logits(n_out)
    parts = []
    for j in range(n_batches):
        lo, hi = j * n_batch, min(n_ctx, (j + 1) * n_batch)
        n_out = cx.decode(chunk[lo:hi], lo, pos[lo:hi] >= first)
        if n_out:
            parts.append(cx.logits(n_out).copy())
    return np.concatenate(parts, axis=0)


# --------------------------------------------------------------------------- vocabulary

def vocab_signature(path: str | os.PathLike) -> dict:
    with BindingsModel(path, vocab_only=True) as bm:
        return bm.vocab_signature()


def check_same_vocab(model_sig: dict, base_sig: dict, model_path: str, base_path: str) -> None:
    """Refuse a base whose tokenizer differs: KL divergence compares token by token."""
    if model_sig["n_vocab"] != base_sig["n_vocab"]:
        raise EvalError(
            f"the base has a different vocabulary: {model_sig['n_vocab']} tokens here, "
            f"{base_sig['n_vocab']} in the base {base_path}", where=model_path,
            hint="KL divergence needs the base the file was quantized from (same tokenizer)")
    for tok, text in base_sig["sample"].items():
        if model_sig["sample"].get(tok) != text:
            raise EvalError(
                f"the base has a different vocabulary: token {tok} is {model_sig['sample'].get(tok)!r} here "
                f"but {text!r} in the base {base_path}", where=model_path,
                hint="KL divergence needs the base the file was quantized from (same tokenizer)")
    if model_sig["sha256"] != base_sig["sha256"]:
        raise EvalError(f"the base has a different vocabulary (same size, different token strings): {base_path}",
                        where=model_path, hint="KL divergence needs the base the file was quantized from")
