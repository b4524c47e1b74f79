"""How conversations become corpus text: the model's own chat template, or the plain format.

Takes a model path (chat_format_from_model) or nothing (PLAIN); gives a ChatFormat, and a
ChatRenderer that turns a Document's conversation into text. The template is the model's
`tokenizer.chat_template` with the texts of its BOS/EOS tokens, read from the GGUF header by
model.gguf_header (bounds-checked; the vocabulary is stepped over, never decoded). It runs in
calibration.chat_template's sandboxed worker, bounded in time, memory and output, and always
sees the same date (TEMPLATE_NOW), so the same inputs give the same bytes.

Plain conversation format (used without a model, or for a conversation the model's
template refuses; the latter is counted and reported, never silent)::

    Tools available: [...json...]        (only when the sample declares tools)

    System: ...

    User: ...

    Assistant: ...

    Assistant calls get_weather: {"city": "Lyon"}

    Tool result (get_weather): {"temp_c": 12}
"""

from __future__ import annotations

import json
import os
import weakref
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import cast

from apex_orch.calibration.chat_template import TEMPLATE_KEY, TemplateWorker
from apex_orch.calibration.sources import Document
from apex_orch.core.errors import ModelError
from apex_orch.core.infiles import check_input

# Chat templates that print today's date would change the corpus (and the imatrix cache
# key) every day; rendering always sees this fixed instant instead.
TEMPLATE_NOW = datetime(2025, 1, 1, 12, 0, 0)
BOS_KEY, EOS_KEY, TOKENS_KEY = "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id", "tokenizer.ggml.tokens"


@dataclass(frozen=True)
class ChatFormat:
    """How conversations become text: a Jinja chat template, or the plain format."""
    template: str | None = None
    bos_token: str = ""
    eos_token: str = ""
    origin: str = "plain"             # "plain" or "model:<path>"

    @property
    def is_template(self) -> bool:
        return self.template is not None


PLAIN = ChatFormat()


def chat_format_from_model(model_path: str | os.PathLike) -> ChatFormat:
    """The model's own `tokenizer.chat_template` (+ BOS/EOS text), or PLAIN when it has none."""
    path = Path(model_path)
    if not os.path.lexists(path):
        raise ModelError(f"model not found: {path}")
    check_input(path, "model")   # core.infiles: a FIFO or device is refused, never read
    # imported here: the header reader loads gguf and numpy, which `corpus list/show` never need
    from apex_orch.model.gguf_header import read_array_items, read_kv

    try:
        keys = read_kv(path, (TEMPLATE_KEY, BOS_KEY, EOS_KEY))
        template = keys.get(TEMPLATE_KEY)
        if not isinstance(template, str) or not template:
            return PLAIN
        # token ids of an integer type (a BOOL, being an int to Python, passes as it always did)
        ids = cast("dict[str, int]", {k: keys[k] for k in (BOS_KEY, EOS_KEY) if isinstance(keys.get(k), int)})
        texts = read_array_items(path, TOKENS_KEY, ids.values()) if ids else {}
    except ModelError as exc:
        if not exc.message.startswith("GGUF header is"):   # not a GGUF file, unreadable: as the walker says
            raise
        # damage found inside the header keeps the words this reader has always used
        raise ModelError(f"truncated or corrupt GGUF header: {exc.message}", where=exc.where, hint=exc.hint) from None

    def token_text(key: str) -> str:
        text = texts.get(ids[key]) if key in ids else None
        return text if isinstance(text, str) else ""

    return ChatFormat(template=template, bos_token=token_text(BOS_KEY), eos_token=token_text(EOS_KEY),
                      origin=f"model:{path}")


class ChatRenderer:
    """Renders conversations: the model's chat template in a bounded sandbox worker
    (apex_orch.calibration.chat_template: time, memory and output bounded), or the plain format."""

    def __init__(self, fmt: ChatFormat):
        self.fmt = fmt
        self.fallbacks = 0
        self.fallback_reasons: dict[str, int] = {}
        self._worker: TemplateWorker | None = None
        if fmt.template is not None:
            self._worker = TemplateWorker(fmt.template, fmt.bos_token, fmt.eos_token, TEMPLATE_NOW.isoformat(),
                                          where=fmt.origin.removeprefix("model:"))
            weakref.finalize(self, self._worker.close)

    def render(self, doc: Document) -> str:
        if doc.messages is None:
            return doc.text or ""
        if self._worker is not None:
            # The worker gets a JSON copy of the messages, so a template can never change the corpus.
            text, reason = self._worker.render(doc.messages, doc.tools, doc.origin)
            if text is not None:
                return text
            self.fallbacks += 1
            self.fallback_reasons[reason] = self.fallback_reasons.get(reason, 0) + 1
        return render_plain(doc.messages, doc.tools)

    def close(self) -> None:
        if self._worker is not None:
            self._worker.close()


def render_plain(messages: list[dict], tools: list[dict] | None = None) -> str:
    """The documented plain conversation format (see the module docstring)."""
    parts = []
    if tools:
        parts.append("Tools available: " + json.dumps(tools, ensure_ascii=False))
    names = {"system": "System", "user": "User", "assistant": "Assistant"}
    for m in messages:
        role, content = m["role"], m.get("content") or ""
        if role == "tool":
            parts.append(f"Tool result ({m.get('name') or 'tool'}): {content}")
            continue
        if content:
            parts.append(f"{names[role]}: {content}")
        for call in m.get("tool_calls") or []:
            fn = call.get("function", call)
            args = fn.get("arguments", {})
            args_text = args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)
            parts.append(f"Assistant calls {fn.get('name', '?')}: {args_text}")
    return "\n\n".join(parts)
