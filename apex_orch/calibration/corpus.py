"""Calibration corpora: YAML definitions -> one reproducible text file (+ manifest).

A corpus YAML (in the repo's `corpora/` folder, or any path) names its sources and how
to sample them::

    description: Multi-step agent traces
    seed: 7                  # drives both shuffles
    budget_tokens: 40000     # approximate tokens (UTF-8 bytes / 4); omit to take everything
    sources:
      - builtin: agentic     # apex_orch/calibration/samples/agentic/*.jsonl (shipped, offline)
      - path: my-traces/*.jsonl            # files, folders, globs; relative to this YAML
        weight: 2
      - hf: {repo: org/data, revision: <40-hex commit>, files: [train.jsonl]}
        field: text
      - corpus: chat         # the documents `corpus build chat` would select

Building is deterministic: the same YAML, sample files and chat template give the same
bytes (and so the same sha256, which keys the imatrix cache). Steps: load documents from
every source, render conversations (the model's own `tokenizer.chat_template` when a model
is given, else the plain format below), drop duplicates, take each source's share of the
budget in seeded-shuffled order, shuffle the union with the seed, join with blank lines.

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

import contextlib
import glob
import gzip
import hashlib
import json
import math
import os
import random
import re
import tempfile
from dataclasses import dataclass, field
from datetime import datetime
from difflib import get_close_matches
from pathlib import Path
from typing import Any, Iterable

import yaml

from apex_orch.core.settings import PACKAGE_DIR
from apex_orch.core.errors import ConfigError, ModelError, OutputExistsError, ToolNotFoundError

APPROX_BYTES_PER_TOKEN = 4
APPROX_METHOD = "approximate: UTF-8 bytes / 4"
MODEL_METHOD = "model tokenizer"
SOURCE_KINDS = ("builtin", "path", "hf", "corpus")
TOP_KEYS = {"name", "description", "seed", "budget_tokens", "dedupe", "shuffle", "separator", "sources"}
SOURCE_KEYS = set(SOURCE_KINDS) | {"weight", "format", "field", "split"}
HF_KEYS = {"repo", "revision", "files", "repo_type"}
FORMATS = ("jsonl", "json", "text")
SPLITS = ("file", "paragraph", "line")
JSON_SUFFIXES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json"}
COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")
# Chat templates that print today's date would change the corpus (and the imatrix cache
# key) every day; rendering always sees this fixed instant instead.
TEMPLATE_NOW = datetime(2025, 1, 1, 12, 0, 0)
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system", "tool": "tool", "function": "tool"}


# --------------------------------------------------------------------------- locations

def corpora_dir() -> Path:
    """The built-in corpora: the checkout's top-level `corpora/`, or, in a wheel install, the
    same files packaged as `apex_orch/corpora/` (pyproject's package-dir; one source of truth)."""
    packaged = PACKAGE_DIR / "corpora"
    return packaged if packaged.is_dir() else PACKAGE_DIR.parent / "corpora"


def samples_dir() -> Path:
    """Built-in samples shipped inside the package."""
    return Path(__file__).resolve().parent / "samples"


def _check_name(name: str, what: str, where: str | None = None) -> None:
    if not name or "/" in name or "\\" in name or ".." in name or name.startswith("."):
        raise ConfigError(f"invalid {what} name {name!r}: names may not contain path separators or '..'",
                          where=where, hint=f"give a plain {what} name, or a path to a .yaml file")


def resolve_corpus(name_or_path: str | os.PathLike, *, search: Iterable[Path] = ()) -> Path:
    """A corpus name (looked up in `search` folders, then `corpora/`) or a YAML path."""
    text = os.fspath(name_or_path)
    looks_like_path = text.endswith((".yaml", ".yml")) or os.sep in text or "/" in text
    if looks_like_path:
        path = Path(text).expanduser()
        if not path.is_file():
            raise ConfigError(f"corpus file not found: {path}",
                              hint="give an existing .yaml file or a corpus name (`apex-orch corpus list`)")
        return path.resolve()
    _check_name(text, "corpus")
    folders = [*search, corpora_dir()]
    for folder in folders:
        for suffix in (".yaml", ".yml"):
            candidate = folder / f"{text}{suffix}"
            if candidate.is_file():
                return candidate.resolve()
    known = sorted(available_corpora())
    close = get_close_matches(text, known, n=1)
    raise ConfigError(f"unknown corpus {text!r}; known: {', '.join(known) or '(none)'}",
                      hint=f"did you mean {close[0]!r}?" if close else
                      f"add {corpora_dir()}/{text}.yaml or pass a path to a corpus YAML")


def available_corpora() -> list[str]:
    folder = corpora_dir()
    if not folder.is_dir():
        return []
    return sorted(p.stem for p in folder.iterdir() if p.suffix in (".yaml", ".yml") and p.is_file())


# --------------------------------------------------------------------------- YAML with lines

class _LineDict(dict):
    """A mapping that remembers the line of itself and of each key."""
    line: int = 0
    key_lines: dict


class _LineLoader(yaml.SafeLoader):
    pass


def _construct_mapping(loader: _LineLoader, node: yaml.MappingNode) -> _LineDict:
    loader.flatten_mapping(node)
    out = _LineDict()
    out.line = node.start_mark.line + 1
    out.key_lines = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        line = key_node.start_mark.line + 1
        if not isinstance(key, str):
            raise ConfigError(f"mapping key {key!r} must be a string", where=f"{loader.name}:{line}")
        if key in out:
            raise ConfigError(f"duplicate key {key!r} (first at line {out.key_lines[key]})",
                              where=f"{loader.name}:{line}")
        out[key] = loader.construct_object(value_node, deep=True)
        out.key_lines[key] = line
    return out


_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _load_yaml(path: Path) -> Any:
    from apex_orch.core.yamlio import check_yaml_size, read_config_text
    text = read_config_text(path, ConfigError)   # bounded: MAX_CONFIG_BYTES, regular files only
    loader = _LineLoader(text)
    loader.name = str(path)
    try:
        node = loader.get_single_node()
        check_yaml_size(node, path, ConfigError)   # bounded: aliases may not expand past MAX_YAML_VALUES
        return None if node is None else loader.construct_document(node)
    except RecursionError:
        raise ConfigError("YAML is nested too deeply", where=str(path), hint="configs are a few levels deep") from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ConfigError(f"invalid YAML: {exc.problem or exc}", where=where) from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"invalid YAML: {exc}", where=str(path)) from None
    finally:
        loader.dispose()


def _where(path: Path, mapping: Any, key: str | None = None) -> str:
    if isinstance(mapping, _LineDict):
        line = mapping.key_lines.get(key, mapping.line) if key else mapping.line
        return f"{path}:{line}"
    return str(path)


def _reject_unknown(path: Path, mapping: _LineDict, allowed: set[str], what: str) -> None:
    for key in mapping:
        if key not in allowed:
            close = get_close_matches(key, sorted(allowed), n=1)
            raise ConfigError(
                f"unknown key {key!r} in {what}; allowed: {', '.join(sorted(allowed))}",
                where=_where(path, mapping, key),
                hint=f"did you mean {close[0]!r}?" if close else None)


# --------------------------------------------------------------------------- spec

@dataclass(frozen=True)
class HFFiles:
    repo: str
    revision: str
    files: tuple[str, ...]
    repo_type: str = "dataset"


@dataclass(frozen=True)
class SourceSpec:
    kind: str                 # builtin | path | hf | corpus
    value: Any                # str for builtin/path/corpus, HFFiles for hf
    weight: float
    format: str | None        # None: by file suffix
    field: str | None
    split: str
    where: str                # file:line of the entry

    @property
    def id(self) -> str:
        if self.kind == "hf":
            v: HFFiles = self.value
            return f"hf:{v.repo}@{v.revision[:12]}:{','.join(v.files)}"
        return f"{self.kind}:{self.value}"


@dataclass(frozen=True)
class CorpusSpec:
    name: str
    path: Path
    description: str
    seed: int
    budget_tokens: int | None
    dedupe: bool
    shuffle: bool
    separator: str
    sources: tuple[SourceSpec, ...]
    sha256: str               # of the YAML bytes

    @property
    def folder(self) -> Path:
        return self.path.parent


def _expect(path: Path, mapping: _LineDict, key: str, types, what: str):
    value = mapping[key]
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in _as_tuple(types)):
        raise ConfigError(f"{key!r} must be {what}, got {value!r}", where=_where(path, mapping, key))
    return value


def _as_tuple(types) -> tuple:
    return types if isinstance(types, tuple) else (types,)


def load_corpus_spec(name_or_path: str | os.PathLike, *, search: Iterable[Path] = ()) -> CorpusSpec:
    """Parse and validate a corpus YAML; every error names file:line."""
    path = resolve_corpus(name_or_path, search=search)
    data = _load_yaml(path)
    if not isinstance(data, _LineDict):
        raise ConfigError("a corpus file must be a mapping (description, sources, ...)", where=f"{path}:1")
    _reject_unknown(path, data, TOP_KEYS, "corpus")
    name = path.stem
    if "name" in data:
        declared = _expect(path, data, "name", str, "a string")
        if declared != path.stem:
            raise ConfigError(f"name {declared!r} differs from the file name {path.stem!r}",
                              where=_where(path, data, "name"), hint="rename one so they agree")
    if "description" not in data:
        raise ConfigError("missing key 'description'", where=f"{path}:{data.line}",
                          hint="say in one line what the corpus holds")
    description = _expect(path, data, "description", str, "a string")
    seed = _expect(path, data, "seed", int, "an integer") if "seed" in data else 0
    budget = None
    if data.get("budget_tokens") is not None:
        budget = _expect(path, data, "budget_tokens", int, "a positive integer")
        if budget <= 0:
            raise ConfigError("'budget_tokens' must be positive", where=_where(path, data, "budget_tokens"))
    dedupe = _expect(path, data, "dedupe", bool, "true or false") if "dedupe" in data else True
    shuffle = _expect(path, data, "shuffle", bool, "true or false") if "shuffle" in data else True
    separator = _expect(path, data, "separator", str, "a string") if "separator" in data else "\n\n"
    if "sources" not in data:
        raise ConfigError("missing key 'sources'", where=f"{path}:{data.line}",
                          hint="list at least one source (builtin, path, hf or corpus)")
    raw_sources = data["sources"]
    if not isinstance(raw_sources, list) or not raw_sources:
        raise ConfigError("'sources' must be a non-empty list", where=_where(path, data, "sources"))
    sources = tuple(_parse_source(path, s) for s in raw_sources)
    if budget is None:
        for s in sources:
            if s.weight != 1:
                raise ConfigError(f"weight {s.weight:g} has no effect without budget_tokens "
                                  "(every document is taken)", where=s.where,
                                  hint="set budget_tokens, or drop the weight")
    return CorpusSpec(name=name, path=path, description=description.strip(), seed=seed,
                      budget_tokens=budget, dedupe=dedupe, shuffle=shuffle, separator=separator,
                      sources=sources, sha256=hashlib.sha256(path.read_bytes()).hexdigest())


def _parse_source(path: Path, raw: Any) -> SourceSpec:
    if not isinstance(raw, _LineDict):
        raise ConfigError(f"each source must be a mapping, got {raw!r}", where=str(path),
                          hint="e.g. `- builtin: chat`")
    _reject_unknown(path, raw, SOURCE_KEYS, "source")
    where = f"{path}:{raw.line}"
    kinds = [k for k in SOURCE_KINDS if k in raw]
    if len(kinds) != 1:
        raise ConfigError(f"a source needs exactly one of {', '.join(SOURCE_KINDS)}; got "
                          f"{', '.join(kinds) or 'none'}", where=where)
    kind = kinds[0]
    weight: float = 1.0
    if "weight" in raw:
        w = raw["weight"]
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w <= 0:
            raise ConfigError(f"'weight' must be a positive number, got {w!r}", where=_where(path, raw, "weight"))
        weight = float(w)
    fmt = raw.get("format")
    if fmt is not None and fmt not in FORMATS:
        raise ConfigError(f"'format' must be one of {', '.join(FORMATS)}, got {fmt!r}",
                          where=_where(path, raw, "format"))
    fld = raw.get("field")
    if fld is not None and not isinstance(fld, str):
        raise ConfigError("'field' must be a string", where=_where(path, raw, "field"))
    split = raw.get("split", "file")
    if split not in SPLITS:
        raise ConfigError(f"'split' must be one of {', '.join(SPLITS)}, got {split!r}",
                          where=_where(path, raw, "split"))
    if kind in ("builtin", "corpus"):
        for key in ("format", "field", "split"):
            if key in raw:
                raise ConfigError(f"{key!r} has no effect on a {kind} source", where=_where(path, raw, key))
    if fmt in ("jsonl", "json") and "split" in raw:
        raise ConfigError("'split' applies to text files only", where=_where(path, raw, "split"))
    if fmt == "text" and "field" in raw:
        raise ConfigError("'field' applies to json/jsonl files only", where=_where(path, raw, "field"))

    value: Any = raw[kind]
    kwhere = _where(path, raw, kind)
    if kind in ("builtin", "corpus", "path"):
        if not isinstance(value, str) or not value.strip():
            raise ConfigError(f"{kind!r} must be a non-empty string", where=kwhere)
        if kind == "corpus":
            _check_name(value, "corpus", kwhere)
        if kind == "builtin":
            parts = value.split("/")
            if any(p in ("", ".", "..") for p in parts) or "\\" in value:
                raise ConfigError(f"invalid builtin sample name {value!r}", where=kwhere,
                                  hint=f"a folder or file under {samples_dir()}")
    else:
        if not isinstance(value, _LineDict):
            raise ConfigError("'hf' must be a mapping with repo, revision, files", where=kwhere)
        _reject_unknown(path, value, HF_KEYS, "hf source")
        for key in ("repo", "revision", "files"):
            if key not in value:
                raise ConfigError(f"hf source is missing {key!r}", where=f"{path}:{value.line}")
        repo = value["repo"]
        if not isinstance(repo, str) or repo.count("/") != 1:
            raise ConfigError(f"'repo' must look like 'owner/name', got {repo!r}", where=_where(path, value, "repo"))
        revision = value["revision"]
        if not isinstance(revision, str) or not COMMIT_RE.match(revision):
            raise ConfigError(f"'revision' must be a full 40-hex commit id, got {revision!r}",
                              where=_where(path, value, "revision"),
                              hint="pin a commit (a branch or tag can change under you); "
                                   "see the dataset's 'Files and versions' history")
        files = value["files"]
        if isinstance(files, str):
            files = [files]
        if not isinstance(files, list) or not files or not all(isinstance(f, str) and f for f in files):
            raise ConfigError("'files' must be a non-empty list of file paths in the repo",
                              where=_where(path, value, "files"))
        for f in files:
            if f.startswith("/") or ".." in f.split("/"):
                raise ConfigError(f"invalid file path {f!r} in hf source", where=_where(path, value, "files"))
            if f.endswith(".parquet"):
                raise ConfigError(f"{f}: parquet files are not supported", where=_where(path, value, "files"),
                                  hint="use a .jsonl/.json/.txt file of the dataset (optionally .gz)")
        repo_type = value.get("repo_type", "dataset")
        if repo_type not in ("dataset", "model"):
            raise ConfigError(f"'repo_type' must be dataset or model, got {repo_type!r}",
                              where=_where(path, value, "repo_type"))
        value = HFFiles(repo=repo, revision=revision, files=tuple(files), repo_type=repo_type)
    return SourceSpec(kind=kind, value=value, weight=weight, format=fmt, field=fld, split=split, where=where)


# --------------------------------------------------------------------------- documents

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


# Bounds on what one source may read (a .gz expands, a file may have one endless line): each
# line of a JSONL or text file, the characters and the documents of a whole source.
MAX_LINE_CHARS = 64 << 20
MAX_SOURCE_CHARS = 2 << 30
MAX_SOURCE_DOCUMENTS = 2_000_000


class _SourceBudget:
    """Counts what a source has read; refuses (naming the file and the source) past the bounds."""

    def __init__(self, src: SourceSpec):
        self.src = src
        self.chars = 0
        self.documents = 0

    def _refuse(self, what: str, where: str) -> None:
        raise ConfigError(f"{what}; the source defined at {self.src.where} may read at most "
                          f"{MAX_SOURCE_CHARS:,} characters in {MAX_SOURCE_DOCUMENTS:,} documents, "
                          f"each line at most {MAX_LINE_CHARS:,} characters", where=where,
                          hint="calibration needs a few MB of text: point the source at a sample of the data")

    def read(self, fh, where: str, *, line: bool = False) -> str:
        """fh.read() (or one fh.readline() with line=True) within the bounds."""
        left = MAX_SOURCE_CHARS - self.chars
        room = min(MAX_LINE_CHARS, left) if line else left
        text = fh.readline(room + 1) if line else fh.read(room + 1)
        if len(text) > room:
            if line and room == MAX_LINE_CHARS:
                self._refuse(f"a line longer than {MAX_LINE_CHARS:,} characters", where)
            self._refuse(f"the source holds more than {MAX_SOURCE_CHARS:,} characters", where)
        self.chars += len(text)
        return text

    def document(self, where: str) -> None:
        self.documents += 1
        if self.documents > MAX_SOURCE_DOCUMENTS:
            self._refuse(f"the source holds more than {MAX_SOURCE_DOCUMENTS:,} documents", where)


def _read_json_file(path: Path, src: SourceSpec, fmt: str, budget: _SourceBudget | None = None) -> list[Document]:
    opener = gzip.open if path.suffix == ".gz" else open
    budget = budget or _SourceBudget(src)
    docs: list[Document] = []
    try:
        with opener(path, "rt", encoding="utf-8") as fh:
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


def _read_text_file(path: Path, src: SourceSpec, budget: _SourceBudget | None = None) -> list[Document]:
    opener = gzip.open if path.suffix == ".gz" else open
    budget = budget or _SourceBudget(src)
    try:
        with opener(path, "rt", encoding="utf-8") as fh:
            text = budget.read(fh, str(path))
    except (OSError, UnicodeDecodeError, EOFError, gzip.BadGzipFile) as exc:
        raise ConfigError(f"cannot read text file: {exc}", where=str(path)) from None
    if src.split != "file":
        # str.splitlines' separators, counted before splitting: a file of millions of short lines
        # would otherwise become millions of objects before the document count is checked.
        breaks = sum(text.count(c) for c in "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029")
        if breaks > 4 * MAX_SOURCE_DOCUMENTS:
            budget._refuse(f"{breaks:,} lines (split: {src.split})", str(path))
    if src.split == "file":
        pieces = [(1, text)]
    elif src.split == "line":
        pieces = [(i, line) for i, line in enumerate(text.splitlines(), 1)]
    else:
        pieces, line, block, start = [], 1, [], 1
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


def _read_files(files: list[Path], src: SourceSpec) -> list[Document]:
    docs: list[Document] = []
    budget = _SourceBudget(src)
    for f in files:
        fmt = _format_of(f, src)
        docs.extend(_read_json_file(f, src, fmt, budget) if fmt in ("jsonl", "json")
                    else _read_text_file(f, src, budget))
    return docs


def _expand_local(pattern: str, base: Path, where: str) -> list[Path]:
    raw = Path(pattern).expanduser()
    full = raw if raw.is_absolute() else base / raw
    if any(ch in pattern for ch in "*?["):
        matches = [Path(p) for p in sorted(glob.glob(str(full), recursive=True))]
        files = [p for p in matches if p.is_file()]
    elif full.is_dir():
        files = sorted(p for p in full.rglob("*") if p.is_file()
                       and not any(part.startswith(".") for part in p.relative_to(full).parts))
    elif full.is_file():
        files = [full]
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
    try:
        import huggingface_hub
        from huggingface_hub import errors as hf_errors
    except ImportError as exc:  # pragma: no cover - it is a declared dependency
        raise ToolNotFoundError(f"huggingface_hub is not installed: {exc}") from exc
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    out = []
    for filename in spec.files:
        try:
            local = huggingface_hub.hf_hub_download(
                repo_id=spec.repo, filename=filename, revision=spec.revision, repo_type=spec.repo_type)
        except (hf_errors.LocalEntryNotFoundError, hf_errors.OfflineModeIsEnabled) as exc:
            state = "HF_HUB_OFFLINE=1 and the file is not in the cache" if offline else \
                "the Hub cannot be reached and the file is not in the cache"
            raise ConfigError(f"{spec.repo}@{spec.revision[:12]}/{filename}: {state}", where=where,
                              hint="run once with network access (unset HF_HUB_OFFLINE) to fill the cache, "
                                   "or remove this source") from exc
        except hf_errors.HfHubHTTPError as exc:
            raise ConfigError(f"{spec.repo}@{spec.revision[:12]}/{filename}: download failed: {exc}",
                              where=where, hint="check the repo, revision and file name, "
                                                "and HF_TOKEN for gated datasets") from exc
        out.append(Path(local))
    return out


# --------------------------------------------------------------------------- chat rendering

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


_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
_WANTED = ("tokenizer.chat_template", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id")


def _read_chat_keys(path: Path) -> tuple[dict, dict[int, str]]:
    """The chat-template keys and the BOS/EOS token texts, walking the GGUF header once.

    gguf.GGUFReader builds an object per vocabulary entry (seconds for 131k tokens); this
    walk only unpacks lengths, so it stays in the tens of milliseconds.
    """
    import mmap
    import struct

    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        if buf[:4] != b"GGUF":
            raise ModelError("not a GGUF file", where=str(path))
        pos = 4 + 4
        _n_tensors, n_kv = struct.unpack_from("<QQ", buf, pos)
        pos += 16
        found: dict = {}
        tokens_at = None

        def read_str(at: int) -> tuple[str, int]:
            (length,) = struct.unpack_from("<Q", buf, at)
            at += 8
            return buf[at:at + length].decode("utf-8", "replace"), at + length

        def skip(vtype: int, at: int) -> int:
            if vtype in _SCALARS:
                return at + struct.calcsize(_SCALARS[vtype])
            if vtype == _STRING:
                (length,) = struct.unpack_from("<Q", buf, at)
                return at + 8 + length
            if vtype == _ARRAY:
                etype, count = struct.unpack_from("<IQ", buf, at)
                at += 12
                if etype in _SCALARS:
                    return at + count * struct.calcsize(_SCALARS[etype])
                for _ in range(count):
                    at = skip(etype, at)
                return at
            raise ModelError(f"unknown GGUF value type {vtype}", where=str(path))

        try:
            for _ in range(n_kv):
                key, pos = read_str(pos)
                (vtype,) = struct.unpack_from("<I", buf, pos)
                pos += 4
                if key in _WANTED and vtype == _STRING:
                    found[key], pos = read_str(pos)
                elif key in _WANTED and vtype in _SCALARS:
                    found[key] = struct.unpack_from(_SCALARS[vtype], buf, pos)[0]
                    pos += struct.calcsize(_SCALARS[vtype])
                else:
                    if key == "tokenizer.ggml.tokens" and vtype == _ARRAY:
                        tokens_at = pos
                    pos = skip(vtype, pos)
            texts: dict[int, str] = {}
            wanted_ids = sorted({int(found[k]) for k in _WANTED[1:] if isinstance(found.get(k), int)})
            if tokens_at is not None and wanted_ids:
                etype, count = struct.unpack_from("<IQ", buf, tokens_at)
                at, index = tokens_at + 12, 0
                for target in wanted_ids:
                    if etype != _STRING or target >= count:
                        break
                    while index < target:
                        at = skip(_STRING, at)
                        index += 1
                    texts[target], _ = read_str(at)
        except (struct.error, IndexError) as exc:
            raise ModelError(f"truncated or corrupt GGUF header: {exc}", where=str(path)) from None
    return found, texts


def chat_format_from_model(model_path: str | os.PathLike) -> ChatFormat:
    """The model's own `tokenizer.chat_template` (+ BOS/EOS text), or PLAIN when it has none."""
    path = Path(model_path)
    if not path.is_file():
        if path.exists():   # a FIFO or device would block the read below
            raise ModelError("is not a regular file; apex-orch reads GGUF models from regular files only",
                             where=str(path), hint="pass the .gguf file itself")
        raise ModelError(f"model not found: {path}")
    keys, texts = _read_chat_keys(path)
    template = keys.get("tokenizer.chat_template")
    if not template:
        return PLAIN

    def token_text(key: str) -> str:
        ident = keys.get(key)
        return texts.get(int(ident), "") if isinstance(ident, int) else ""

    return ChatFormat(template=template, bos_token=token_text("tokenizer.ggml.bos_token_id"),
                      eos_token=token_text("tokenizer.ggml.eos_token_id"), origin=f"model:{path}")


from apex_orch.calibration.chat_template import TemplateRefused  # noqa: E402,F401  (re-exported)


class ChatRenderer:
    """Renders conversations: the model's chat template in a bounded sandbox worker
    (apex_orch.calibration.chat_template: time, memory and output bounded), or the plain format."""

    def __init__(self, fmt: ChatFormat):
        import weakref

        from apex_orch.calibration.chat_template import TemplateWorker
        self.fmt = fmt
        self.fallbacks = 0
        self.fallback_reasons: dict[str, int] = {}
        self._worker = None
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


# --------------------------------------------------------------------------- building

@dataclass
class SourceStats:
    id: str
    kind: str
    weight: float
    where: str
    documents_available: int = 0
    duplicates_dropped: int = 0
    documents_used: int = 0
    bytes: int = 0
    approx_tokens: int = 0
    target_tokens: int | None = None
    tokens: int | None = None          # with the model's tokenizer, when counted

    @property
    def short(self) -> bool:
        return self.target_tokens is not None and self.approx_tokens < self.target_tokens

    def to_json(self, method: str) -> dict:
        out = {
            "id": self.id, "kind": self.kind, "weight": self.weight, "defined_at": self.where,
            "documents_available": self.documents_available, "duplicates_dropped": self.duplicates_dropped,
            "documents_used": self.documents_used, "bytes": self.bytes,
            "target_tokens_approx": self.target_tokens,
            "tokens": self.tokens if self.tokens is not None else self.approx_tokens,
            "tokens_method": method if self.tokens is not None else APPROX_METHOD,
        }
        if self.short:
            out["note"] = (f"supplied ~{self.approx_tokens} of its ~{self.target_tokens}-token share; "
                           "add text or lower its weight")
        return out


@dataclass
class BuiltCorpus:
    spec: CorpusSpec
    documents: list[Document]
    sources: list[SourceStats]
    chat_format: ChatFormat
    template_fallbacks: int = 0
    template_fallback_reasons: dict = field(default_factory=dict)
    _text: str | None = None

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def text(self) -> str:
        if self._text is None:
            self._text = self.spec.separator.join(d.rendered for d in self.documents) + "\n"
        return self._text

    @property
    def data(self) -> bytes:
        return self.text.encode("utf-8")

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    @property
    def approx_tokens(self) -> int:
        return approx_tokens(self.text)

    @property
    def parse_special(self) -> bool:
        """Text rendered with a chat template carries special tokens that must be parsed as such."""
        return self.chat_format.is_template and any(d.messages is not None for d in self.documents)

    def warnings(self) -> list[str]:
        out = []
        for s in self.sources:
            if s.short:
                out.append(f"source {s.id} supplied ~{s.approx_tokens} of its ~{s.target_tokens}-token share")
        if self.template_fallbacks:
            reasons = "; ".join(f"{n}x {r}" for r, n in self.template_fallback_reasons.items())
            out.append(f"the model's chat template refused {self.template_fallbacks} conversation(s); "
                       f"they were written in the plain format ({reasons})")
        return out


def _dedupe_key(text: str) -> str:
    return hashlib.sha256(" ".join(text.split()).encode("utf-8")).hexdigest()


def _load_source(src: SourceSpec, spec: CorpusSpec, renderer: ChatRenderer, stack: tuple[Path, ...]) -> list[Document]:
    if src.kind == "builtin":
        return _read_files(_builtin_files(src.value, src.where), src)
    if src.kind == "path":
        return _read_files(_expand_local(src.value, spec.folder, src.where), src)
    if src.kind == "hf":
        return _read_files(_hf_files(src.value, src.where), src)
    sub_path = resolve_corpus(src.value, search=[spec.folder])
    if sub_path in stack:
        chain = " -> ".join(p.stem for p in (*stack, sub_path))
        raise ConfigError(f"corpus include cycle: {chain}", where=src.where)
    sub = _build(load_corpus_spec(sub_path), renderer, (*stack, sub_path))
    docs = []
    for d in sub.documents:
        docs.append(Document(source=src.id, origin=d.origin, text=d.text, messages=d.messages,
                             tools=d.tools, rendered=d.rendered))
    return docs


def _build(spec: CorpusSpec, renderer: ChatRenderer, stack: tuple[Path, ...]) -> BuiltCorpus:
    seen: set[str] = set()
    per_source: list[tuple[SourceSpec, SourceStats, list[Document]]] = []
    for src in spec.sources:
        docs = _load_source(src, spec, renderer, stack)
        stats = SourceStats(id=src.id, kind=src.kind, weight=src.weight, where=src.where,
                            documents_available=len(docs))
        kept = []
        for d in docs:
            if not d.rendered:
                d.rendered = renderer.render(d).strip("\n")
            if not d.rendered.strip():
                continue
            if spec.dedupe:
                key = _dedupe_key(d.rendered)
                if key in seen:
                    stats.duplicates_dropped += 1
                    continue
                seen.add(key)
            kept.append(d)
        per_source.append((src, stats, kept))

    total_weight = sum(src.weight for src in spec.sources)
    chosen: list[Document] = []
    for index, (src, stats, kept) in enumerate(per_source):
        order = list(kept)
        if spec.shuffle:
            random.Random(f"{spec.seed}:{index}:{src.id}").shuffle(order)
        if spec.budget_tokens is not None:
            target = round(spec.budget_tokens * src.weight / total_weight)
            stats.target_tokens = target
            taken, used = [], 0
            for d in order:
                if used >= target:
                    break
                taken.append(d)
                used += d.approx_tokens
            order = taken
        stats.documents_used = len(order)
        stats.bytes = sum(len(d.rendered.encode("utf-8")) for d in order)
        stats.approx_tokens = sum(d.approx_tokens for d in order)
        chosen.extend(order)
    if spec.shuffle:
        random.Random(f"{spec.seed}:all").shuffle(chosen)
    if not chosen:
        raise ConfigError("the corpus is empty: its sources hold no text", where=str(spec.path))
    return BuiltCorpus(spec=spec, documents=chosen, sources=[s for _, s, _ in per_source],
                       chat_format=renderer.fmt)


def build_corpus(name_or_path: str | os.PathLike, *, model: str | os.PathLike | None = None,
                 chat_format: ChatFormat | None = None) -> BuiltCorpus:
    """Build a corpus in memory (reads sources; writes nothing)."""
    spec = load_corpus_spec(name_or_path)
    if chat_format is None:
        chat_format = chat_format_from_model(model) if model else PLAIN
    renderer = ChatRenderer(chat_format)
    try:
        built = _build(spec, renderer, (spec.path,))
    finally:
        renderer.close()
    built.template_fallbacks = renderer.fallbacks
    built.template_fallback_reasons = dict(renderer.fallback_reasons)
    return built


# --------------------------------------------------------------------------- token counting

class ModelTokenizer:
    """The model's own tokenizer through the bindings (vocab only: no weights are loaded)."""

    def __init__(self, model_path: str | os.PathLike):
        from apex_orch.llama.bindings import load_llama_cpp

        llama_cpp = load_llama_cpp()
        self.path = Path(model_path)
        # libllama logs to fd 2 even with verbose=False; keep it off the user's terminal,
        # but show it when loading fails.
        with tempfile.TemporaryFile(mode="w+b") as log, _stderr_to(log):
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
        if not text:
            return 0
        return len(self._llm.tokenize(text.encode("utf-8"), add_bos=False, special=special))

    def close(self) -> None:
        close = getattr(self._llm, "close", None)
        if close:
            close()


@contextlib.contextmanager
def _stderr_to(fh):
    import sys
    try:
        sys.stderr.flush()
    except (AttributeError, ValueError):
        pass
    saved = os.dup(2)
    try:
        os.dup2(fh.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def count_tokens(built: BuiltCorpus, model_path: str | os.PathLike) -> int:
    """Fill per-source token counts with the model's tokenizer; return the total for the text."""
    tok = ModelTokenizer(model_path)
    try:
        special = built.parse_special
        by_source: dict[str, int] = {}
        for d in built.documents:
            by_source[d.source] = by_source.get(d.source, 0) + tok.count(d.rendered, special=special)
        for s in built.sources:
            s.tokens = by_source.get(s.id, 0)
        return tok.count(built.text, special=special)
    finally:
        tok.close()


# --------------------------------------------------------------------------- writing

def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a fresh temp file in the destination folder (fsync), then rename over the final
    name: the one helper, apex_orch.core.safefiles.write_atomic (a link at `path` is replaced, never
    written through)."""
    from apex_orch.core.safefiles import write_atomic
    write_atomic(path, data)


def manifest_path_for(text_path: Path) -> Path:
    return text_path.with_name(text_path.name + ".manifest.json")


def make_manifest(built: BuiltCorpus, *, text_name: str, total_tokens: int | None,
                  model: str | os.PathLike | None) -> dict:
    from apex_orch import __version__

    method = MODEL_METHOD if total_tokens is not None else APPROX_METHOD
    return {
        "kind": "apex-orch corpus",
        "apex_orch_version": __version__,
        "corpus": built.name,
        "description": built.spec.description,
        "definition": str(built.spec.path),
        "definition_sha256": built.spec.sha256,
        "text_file": text_name,
        "sha256": built.sha256,
        "bytes": len(built.data),
        "documents": len(built.documents),
        "tokens": total_tokens if total_tokens is not None else built.approx_tokens,
        "tokens_method": method,
        "tokenizer_model": str(model) if model else None,
        "seed": built.spec.seed,
        "budget_tokens_approx": built.spec.budget_tokens,
        "chat_format": built.chat_format.origin,
        "parse_special": built.parse_special,
        "template_fallbacks": built.template_fallbacks,
        "sources": [s.to_json(MODEL_METHOD) for s in built.sources],
        "warnings": built.warnings(),
    }


def write_corpus(built: BuiltCorpus, out: str | os.PathLike, *, model: str | os.PathLike | None = None,
                 force: bool = False) -> tuple[Path, Path, dict]:
    """Write the text and its manifest (both atomically). Tokens are counted with the model when given."""
    text_path = Path(out)
    manifest_path = manifest_path_for(text_path)
    data = built.data
    if not force:
        same_text = text_path.is_file() and text_path.read_bytes() == data
        for p in (text_path, manifest_path):
            if p.exists() and not same_text:
                raise OutputExistsError(f"{p} exists", hint="pass --force to replace it, or choose -o")
    total = count_tokens(built, model) if model else None
    manifest = make_manifest(built, text_name=text_path.name, total_tokens=total, model=model)
    atomic_write_bytes(text_path, data)
    atomic_write_bytes(manifest_path, (json.dumps(manifest, indent=2, ensure_ascii=False) + "\n").encode())
    return text_path, manifest_path, manifest


def describe(spec: CorpusSpec) -> dict:
    """What `corpus show` prints: the definition plus what each source holds (plain format)."""
    built = _build(spec, ChatRenderer(PLAIN), (spec.path,))
    return {
        "name": spec.name, "definition": str(spec.path), "description": spec.description,
        "seed": spec.seed, "budget_tokens_approx": spec.budget_tokens, "dedupe": spec.dedupe,
        "shuffle": spec.shuffle, "documents": len(built.documents), "bytes": len(built.data),
        "approx_tokens": built.approx_tokens,
        "sources": [s.to_json(MODEL_METHOD) for s in built.sources], "warnings": built.warnings(),
    }
