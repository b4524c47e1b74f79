"""A model's own tokenizer, for counting a corpus's tokens exactly as llama-imatrix will.

Takes a GGUF path; gives ModelTokenizer.count(text, special=...). Loads the vocabulary only
(no weights) through the llama-cpp-python bindings, so a model of any size loads quickly.
libllama writes its log to file descriptor 2 whatever `verbose` says; that log is
kept off the user's terminal and shown only when loading fails.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from apex_orch.core.errors import ModelError
from apex_orch.llama.bindings import stderr_to


class ModelTokenizer:
    """The model's own tokenizer through the bindings (vocab only: no weights are loaded)."""

    def __init__(self, model_path: str | os.PathLike):
        # imported here: loading the bindings loads libllama (seconds), only token counts need it
        from apex_orch.llama.bindings import load_llama_cpp

        llama_cpp = load_llama_cpp()
        self.path = Path(model_path)
        with tempfile.TemporaryFile(mode="w+b") as log, stderr_to(log):
            try:
                self._llm = llama_cpp.Llama(model_path=str(self.path), vocab_only=True, verbose=False)
                failure = None
            except (ValueError, RuntimeError, OSError) as exc:
                failure = exc
            if failure is not None:
                log.seek(0)
                tail = log.read().decode("utf-8", "replace").strip().splitlines()[-3:]
        if failure is not None:
            detail = f" ({' | '.join(tail)})" if tail else ""
            raise ModelError(f"cannot load the tokenizer: {failure}{detail}", where=str(self.path))

    def count(self, text: str, *, special: bool) -> int:
        """Tokens in `text` (no BOS added); `special`: chat markers count as the single tokens they are."""
        if not text:
            return 0
        return len(self._llm.tokenize(text.encode("utf-8"), add_bos=False, special=special))

    def close(self) -> None:
        close = getattr(self._llm, "close", None)   # older bindings have no close()
        if close:
            close()
