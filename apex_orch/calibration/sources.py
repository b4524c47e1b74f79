"""Corpus sources: read a builtin, path or hf source into Documents, within bounds.

Takes a SourceSpec (corpus_spec) and the folder of its YAML; gives a list of Documents: a
text, or a conversation (messages + optional tools) still to be rendered. JSON/JSONL records
hold `text`, `messages` (OpenAI style or ShareGPT `from`/`value`) or the field the source
names; text files are one document each, or split by paragraph or line.

Every source is bounded (a .gz expands, a file may hold one endless line): each line, and the
characters and documents of the whole source, so a wrong path fails with the file and the
source named instead of filling memory. `corpus:` sources are not read here: they are whole
corpora, built by corpus.py.
"""

from __future__ import annotations

import contextlib
import glob
import gzip
import io
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Iterator

from apex_orch.calibration.corpus_spec import HFFiles, SourceSpec, samples_dir
from apex_orch.core.errors import ConfigError, ToolNotFoundError
from apex_orch.core.infiles import open_input
from apex_orch.core.settings import hf_hub_offline
from apex_orch.core.translate import translate_hub_download_error

APPROX_BYTES_PER_TOKEN = 4
JSON_SUFFIXES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json"}
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system", "tool": "tool", "function": "tool"}

# Bounds on what one source may read: each line of a JSONL or text file, the characters and
# the documents of a whole source.
MAX_LINE_CHARS = 64 << 20
MAX_SOURCE_CHARS = 2 << 30
MAX_SOURCE_DOCUMENTS = 2_000_000


@dataclass
class Document:
    """One unit of sampling: a text, or a conversation (messages + optional tools)."""
    source: str
    origin: str                       # file:line it came from
    text: str | None = None
    messages: list[dict] | None = None
    tools: list[dict] | None = None
    rendered: str = ""

    @property
    def approx_tokens(self) -> int:
        return approx_tokens(self.rendered)


def approx_tokens(text: str) -> int:
    return math.ceil(len(text.encode("utf-8")) / APPROX_BYTES_PER_TOKEN)


def read_source(src: SourceSpec, folder: Path) -> list[Document]:
    """Every document of a builtin, path or hf source (`folder`: where relative paths start)."""
    if src.kind == "builtin":
        files = _builtin_files(str(src.value), src.where)
    elif src.kind == "path":
        files = _expand_local(str(src.value), folder, src.where)
    elif isinstance(src.value, HFFiles):
        files = _hf_files(src.value, src.where)
    else:
        raise ValueError(f"{src.kind} sources are corpora, built by corpus.build_corpus")
    docs: list[Document] = []
    budget = _SourceBudget(src)
    for f in files:
        fmt = _format_of(f, src)
        docs.extend(_read_json_file(f, src, fmt, budget) if fmt in ("jsonl", "json")
                    else _read_text_file(f, src, budget))
    return docs


# --------------------------------------------------------------------------- records

def _record_to_doc(record: Any, src: SourceSpec, origin: str) -> Document:
    if not isinstance(record, dict):
        raise ConfigError(f"expected a JSON object, got {type(record).__name__}", where=origin)
    if src.field:
        if src.field not in record:
            raise ConfigError(f"record has no field {src.field!r} (fields: {', '.join(sorted(record))})",
                              where=origin, hint=f"fix `field:` in {src.where}")
        value = record[src.field]
    elif "messages" in record:
        value = record["messages"]
    elif "text" in record:
        value = record["text"]
    else:
        raise ConfigError("record has neither 'text' nor 'messages' (fields: "
                          f"{', '.join(sorted(record))})", where=origin,
                          hint=f"set `field:` on the source at {src.where}")
    if isinstance(value, str):
        return Document(source=src.id, origin=origin, text=value)
    if isinstance(value, list):
        tools = record.get("tools")
        if tools is not None and not isinstance(tools, list):
            raise ConfigError("'tools' must be a list", where=origin)
        return Document(source=src.id, origin=origin, messages=_normalise_messages(value, origin), tools=tools)
    raise ConfigError(f"field holds {type(value).__name__}; expected text or a list of messages", where=origin)


def _normalise_messages(messages: list, origin: str) -> list[dict]:
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ConfigError(f"message {i} is not an object", where=origin)
        if "role" in m:
            msg = dict(m)
        elif "from" in m and "value" in m:  # ShareGPT style
            role = SHAREGPT_ROLES.get(str(m["from"]).lower())
            if role is None:
                raise ConfigError(f"message {i}: unknown speaker {m['from']!r}", where=origin)
            msg = {"role": role, "content": m["value"]}
        else:
            raise ConfigError(f"message {i} has no 'role' (or ShareGPT 'from'/'value')", where=origin)
        if msg["role"] not in ("system", "user", "assistant", "tool"):
            raise ConfigError(f"message {i}: unknown role {msg['role']!r}", where=origin)
        content = msg.get("content")
        if content is None:
            msg["content"] = ""
        elif not isinstance(content, str):
            raise ConfigError(f"message {i}: content must be a string", where=origin)
        out.append(msg)
    if not out:
        raise ConfigError("empty conversation", where=origin)
    return out


# --------------------------------------------------------------------------- bounded reading

class _SourceBudget:
    """Counts what a source has read; refuses (naming the file and the source) past the bounds."""

    def __init__(self, src: SourceSpec):
        self.src = src
        self.chars = 0
        self.documents = 0

    def refuse(self, what: str, where: str) -> None:
        raise ConfigError(f"{what}; the source defined at {self.src.where} may read at most "
                          f"{MAX_SOURCE_CHARS:,} characters in {MAX_SOURCE_DOCUMENTS:,} documents, "
                          f"each line at most {MAX_LINE_CHARS:,} characters", where=where,
                          hint="calibration needs a few MB of text: point the source at a sample of the data")

    def read(self, fh: IO[str], where: str, *, line: bool = False) -> str:
        """fh.read() (or one fh.readline() with line=True) within the bounds."""
        left = MAX_SOURCE_CHARS - self.chars
        room = min(MAX_LINE_CHARS, left) if line else left
        text = fh.readline(room + 1) if line else fh.read(room + 1)
        if len(text) > room:
            if line and room == MAX_LINE_CHARS:
                self.refuse(f"a line longer than {MAX_LINE_CHARS:,} characters", where)
            self.refuse(f"the source holds more than {MAX_SOURCE_CHARS:,} characters", where)
        self.chars += len(text)
        return text

    def document(self, where: str) -> None:
        self.documents += 1
        if self.documents > MAX_SOURCE_DOCUMENTS:
            self.refuse(f"the source holds more than {MAX_SOURCE_DOCUMENTS:,} documents", where)


@contextlib.contextmanager
def _open_text(path: Path) -> Iterator[IO[str]]:
    """A data file as text (gunzipped for .gz), opened the one way inputs are (core.infiles): a FIFO
    or device is refused, never read; what it may hold is bounded by _SourceBudget."""
    with open_input(path, "corpus-data", error=ConfigError) as raw:
        if path.suffix == ".gz":
            with gzip.GzipFile(fileobj=raw) as gz, io.TextIOWrapper(gz, encoding="utf-8") as fh:
                yield fh
        else:
            with io.TextIOWrapper(raw, encoding="utf-8") as fh:
                yield fh


def _read_json_file(path: Path, src: SourceSpec, fmt: str, budget: _SourceBudget) -> list[Document]:
    docs: list[Document] = []
    try:
        with _open_text(path) as fh:
            if fmt == "jsonl":
                lineno = 0
                while True:
                    line = budget.read(fh, f"{path}:{lineno + 1}", line=True)
                    if not line:
                        break
                    lineno += 1
                    if not line.strip():
                        continue
                    budget.document(f"{path}:{lineno}")
                    origin = f"{path}:{lineno}"
                    try:
                        record = json.loads(line)
                    except RecursionError:
                        raise ConfigError("invalid JSON line: nested too deeply", where=origin) from None
                    except ValueError as exc:
                        raise ConfigError(f"invalid JSON line: {exc}", where=origin) from None
                    docs.append(_record_to_doc(record, src, origin))
            else:
                try:
                    data = json.loads(budget.read(fh, str(path)))
                except RecursionError:
                    raise ConfigError("invalid JSON: nested too deeply", where=str(path)) from None
                except ValueError as exc:
                    raise ConfigError(f"invalid JSON: {exc}", where=str(path)) from None
                records = data if isinstance(data, list) else [data]
                for i, record in enumerate(records):
                    budget.document(f"{path}[{i}]")
                    docs.append(_record_to_doc(record, src, f"{path}[{i}]"))
    except (OSError, UnicodeDecodeError, EOFError, gzip.BadGzipFile) as exc:
        raise ConfigError(f"cannot read sample file: {exc}", where=str(path)) from None
    return docs


def _read_text_file(path: Path, src: SourceSpec, budget: _SourceBudget) -> list[Document]:
    try:
        with _open_text(path) as fh:
            text = budget.read(fh, str(path))
    except (OSError, UnicodeDecodeError, EOFError, gzip.BadGzipFile) as exc:
        raise ConfigError(f"cannot read text file: {exc}", where=str(path)) from None
    if src.split != "file":
        # str.splitlines' separators, counted before splitting: a file of millions of short lines
        # would otherwise become millions of objects before the document count is checked.
        breaks = sum(text.count(c) for c in "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029")
        if breaks > 4 * MAX_SOURCE_DOCUMENTS:
            budget.refuse(f"{breaks:,} lines (split: {src.split})", str(path))
    if src.split == "file":
        pieces = [(1, text)]
    elif src.split == "line":
        pieces = [(i, line) for i, line in enumerate(text.splitlines(), 1)]
    else:
        pieces, start = [], 1
        block: list[str] = []
        for line_no, raw in enumerate(text.splitlines(), 1):
            if raw.strip():
                if not block:
                    start = line_no
                block.append(raw)
            elif block:
                pieces.append((start, "\n".join(block)))
                block = []
        if block:
            pieces.append((start, "\n".join(block)))
    docs = []
    for n, t in pieces:
        if t.strip():
            budget.document(f"{path}:{n}")
            docs.append(Document(source=src.id, origin=f"{path}:{n}", text=t))
    return docs


def _format_of(path: Path, src: SourceSpec) -> str:
    if src.format:
        return src.format
    suffixes = path.suffixes
    last = suffixes[-2] if suffixes and suffixes[-1] == ".gz" and len(suffixes) > 1 else path.suffix
    return JSON_SUFFIXES.get(last, "text")


# --------------------------------------------------------------------------- locating files

def _expand_local(pattern: str, base: Path, where: str) -> list[Path]:
    raw = Path(pattern).expanduser()
    full = raw if raw.is_absolute() else base / raw
    if any(ch in pattern for ch in "*?["):
        matches = [Path(p) for p in sorted(glob.glob(str(full), recursive=True))]
        files = [p for p in matches if p.is_file()]
    elif full.is_dir():
        files = sorted(p for p in full.rglob("*") if p.is_file()
                       and not any(part.startswith(".") for part in p.relative_to(full).parts))
    elif os.path.lexists(full):
        files = [full]   # a FIFO or device is refused when it is opened (core.infiles), never read
    else:
        raise ConfigError(f"path not found: {full}", where=where,
                          hint="paths are relative to the corpus YAML's folder")
    if not files:
        raise ConfigError(f"{pattern!r} matches no files (looked in {full.parent if full.name else full})",
                          where=where)
    return files


def _builtin_files(name: str, where: str) -> list[Path]:
    root = samples_dir()
    target = root / name
    if target.is_dir():
        # every file is one source: .jsonl/.json records, anything else (code, prose) is one document
        files = sorted(p for p in target.iterdir() if p.is_file() and not p.name.startswith("."))
    elif target.is_file():
        files = [target]
    else:
        known = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
        raise ConfigError(f"no built-in samples named {name!r}; known: {', '.join(known)}", where=where)
    if not files:
        raise ConfigError(f"built-in sample folder {target} is empty", where=where)
    return files


def _hf_files(spec: HFFiles, where: str) -> list[Path]:
    """Download (or reuse from the Hugging Face cache) each file at the pinned revision."""
    try:   # imported here: huggingface_hub is slow to import and only hf sources need it
        import huggingface_hub
        import huggingface_hub.errors  # noqa: F401  (core.translate reads the Hub's error types from it)
    except ImportError as exc:  # pragma: no cover - it is a declared dependency
        raise ToolNotFoundError(f"huggingface_hub is not installed: {exc}") from exc
    out = []
    for filename in spec.files:
        try:
            local = huggingface_hub.hf_hub_download(
                repo_id=spec.repo, filename=filename, revision=spec.revision, repo_type=spec.repo_type)
        except Exception as exc:
            label = f"{spec.repo}@{spec.revision[:12]}/{filename}"
            state = "HF_HUB_OFFLINE=1 and the file is not in the cache" if hf_hub_offline() else \
                "the Hub cannot be reached and the file is not in the cache"
            error = translate_hub_download_error(
                exc, label=label, where=where, not_cached=f"{label}: {state}",
                not_cached_hint="run once with network access (unset HF_HUB_OFFLINE) to fill the cache, "
                                "or remove this source",
                failed_hint="check the repo, revision and file name, and HF_TOKEN for gated datasets")
            if error is None:
                raise
            raise error from exc
        out.append(Path(local))
    return out
