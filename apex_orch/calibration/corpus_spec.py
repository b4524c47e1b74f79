"""Corpus definitions: find a corpus YAML by name or path, load it, validate it.

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

Takes a name or a path; gives a CorpusSpec (frozen: what to read, never read yet). The YAML
is read by core.yamlio (bounded size, safe tags, a line for every key), so every error here
names file:line; only the wording of a YAML syntax error ("invalid YAML") is this module's.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from difflib import get_close_matches
from pathlib import Path
from typing import Any, Iterable

import yaml

from apex_orch.core.errors import ConfigError
from apex_orch.core.fingerprint import sha256_file
from apex_orch.core.schema import check_keys
from apex_orch.core.settings import PACKAGE_DIR
from apex_orch.core.yamlio import YamlDoc, compose_config, node_to_doc, read_config_text

SOURCE_KINDS = ("builtin", "path", "hf", "corpus")
TOP_KEYS = {"name", "description", "seed", "budget_tokens", "dedupe", "shuffle", "separator", "sources"}
SOURCE_KEYS = set(SOURCE_KINDS) | {"weight", "format", "field", "split"}
HF_KEYS = {"repo", "revision", "files", "repo_type"}
FORMATS = ("jsonl", "json", "text")
SPLITS = ("file", "paragraph", "line")
COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")


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
        if not os.path.lexists(path) or path.is_dir():   # a FIFO is refused when it is read (core.infiles)
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
    value: str | HFFiles      # str for builtin/path/corpus, HFFiles for hf
    weight: float
    format: str | None        # None: by file suffix
    field: str | None
    split: str
    where: str                # file:line of the entry

    @property
    def id(self) -> str:
        if isinstance(self.value, HFFiles):
            v = self.value
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


def _load_yaml(path: Path) -> YamlDoc:
    text = read_config_text(path, ConfigError)   # bounded: MAX_CONFIG_BYTES, regular files only
    try:
        node = compose_config(text, path, ConfigError)   # bounded: aliases, nesting
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ConfigError(f"invalid YAML: {exc.problem or exc}", where=where) from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"invalid YAML: {exc}", where=str(path)) from None
    doc = node_to_doc(node, path, ConfigError)
    if node is None or not isinstance(doc.data, dict):
        raise ConfigError("a corpus file must be a mapping (description, sources, ...)", where=f"{path}:1")
    return doc


def _expect(doc: YamlDoc, key: str, types: type | tuple[type, ...], what: str) -> Any:
    """A top-level value of the given type(s); a bool is not an int unless bool is named."""
    value = doc.data[key]
    named = types if isinstance(types, tuple) else (types,)
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in named):
        raise ConfigError(f"{key!r} must be {what}, got {value!r}", where=doc.where((key,)))
    return value


def load_corpus_spec(name_or_path: str | os.PathLike, *, search: Iterable[Path] = ()) -> CorpusSpec:
    """Parse and validate a corpus YAML; every error names file:line."""
    path = resolve_corpus(name_or_path, search=search)
    doc = _load_yaml(path)
    data = doc.data
    check_keys(data, TOP_KEYS, doc.where, (), ConfigError)
    if "name" in data:
        declared = _expect(doc, "name", str, "a string")
        if declared != path.stem:
            raise ConfigError(f"name {declared!r} differs from the file name {path.stem!r}",
                              where=doc.where(("name",)), hint="rename one so they agree")
    if "description" not in data:
        raise ConfigError("missing key 'description'", where=doc.where_value(),
                          hint="say in one line what the corpus holds")
    description = _expect(doc, "description", str, "a string")
    seed = _expect(doc, "seed", int, "an integer") if "seed" in data else 0
    budget = None
    if data.get("budget_tokens") is not None:
        budget = _expect(doc, "budget_tokens", int, "a positive integer")
        if budget <= 0:
            raise ConfigError("'budget_tokens' must be positive", where=doc.where(("budget_tokens",)))
    dedupe = _expect(doc, "dedupe", bool, "true or false") if "dedupe" in data else True
    shuffle = _expect(doc, "shuffle", bool, "true or false") if "shuffle" in data else True
    separator = _expect(doc, "separator", str, "a string") if "separator" in data else "\n\n"
    if "sources" not in data:
        raise ConfigError("missing key 'sources'", where=doc.where_value(),
                          hint="list at least one source (builtin, path, hf or corpus)")
    raw_sources = data["sources"]
    if not isinstance(raw_sources, list) or not raw_sources:
        raise ConfigError("'sources' must be a non-empty list", where=doc.where(("sources",)))
    sources = tuple(_parse_source(doc, i) for i in range(len(raw_sources)))
    if budget is None:
        for s in sources:
            if s.weight != 1:
                raise ConfigError(f"weight {s.weight:g} has no effect without budget_tokens "
                                  "(every document is taken)", where=s.where,
                                  hint="set budget_tokens, or drop the weight")
    return CorpusSpec(name=path.stem, path=path, description=description.strip(), seed=seed,
                      budget_tokens=budget, dedupe=dedupe, shuffle=shuffle, separator=separator,
                      sources=sources, sha256=sha256_file(path))


def _parse_source(doc: YamlDoc, index: int) -> SourceSpec:
    at = ("sources", index)
    raw = doc.data["sources"][index]
    if not isinstance(raw, dict):
        raise ConfigError(f"each source must be a mapping, got {raw!r}", where=str(doc.path),
                          hint="e.g. `- builtin: chat`")
    check_keys(raw, SOURCE_KEYS, doc.where, at, ConfigError)
    where = doc.where_value(at)
    kinds = [k for k in SOURCE_KINDS if k in raw]
    if len(kinds) != 1:
        raise ConfigError(f"a source needs exactly one of {', '.join(SOURCE_KINDS)}; got "
                          f"{', '.join(kinds) or 'none'}", where=where)
    kind = kinds[0]
    weight: float = 1.0
    if "weight" in raw:
        w = raw["weight"]
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w <= 0:
            raise ConfigError(f"'weight' must be a positive number, got {w!r}", where=doc.where(at + ("weight",)))
        weight = float(w)
    fmt = raw.get("format")
    if fmt is not None and fmt not in FORMATS:
        raise ConfigError(f"'format' must be one of {', '.join(FORMATS)}, got {fmt!r}",
                          where=doc.where(at + ("format",)))
    fld = raw.get("field")
    if fld is not None and not isinstance(fld, str):
        raise ConfigError("'field' must be a string", where=doc.where(at + ("field",)))
    split = raw.get("split", "file")
    if split not in SPLITS:
        raise ConfigError(f"'split' must be one of {', '.join(SPLITS)}, got {split!r}",
                          where=doc.where(at + ("split",)))
    if kind in ("builtin", "corpus"):
        for key in ("format", "field", "split"):
            if key in raw:
                raise ConfigError(f"{key!r} has no effect on a {kind} source", where=doc.where(at + (key,)))
    if fmt in ("jsonl", "json") and "split" in raw:
        raise ConfigError("'split' applies to text files only", where=doc.where(at + ("split",)))
    if fmt == "text" and "field" in raw:
        raise ConfigError("'field' applies to json/jsonl files only", where=doc.where(at + ("field",)))

    value = raw[kind]
    kwhere = doc.where(at + (kind,))
    if kind == "hf":
        value = _parse_hf(doc, at + ("hf",), value, kwhere)
    else:
        if not isinstance(value, str) or not value.strip():
            raise ConfigError(f"{kind!r} must be a non-empty string", where=kwhere)
        if kind == "corpus":
            _check_name(value, "corpus", kwhere)
        if kind == "builtin":
            parts = value.split("/")
            if any(p in ("", ".", "..") for p in parts) or "\\" in value:
                raise ConfigError(f"invalid builtin sample name {value!r}", where=kwhere,
                                  hint=f"a folder or file under {samples_dir()}")
    return SourceSpec(kind=kind, value=value, weight=weight, format=fmt, field=fld, split=split, where=where)


def _parse_hf(doc: YamlDoc, at: tuple, value: Any, kwhere: str) -> HFFiles:
    if not isinstance(value, dict):
        raise ConfigError("'hf' must be a mapping with repo, revision, files", where=kwhere)
    check_keys(value, HF_KEYS, doc.where, at, ConfigError)
    for key in ("repo", "revision", "files"):
        if key not in value:
            raise ConfigError(f"hf source is missing {key!r}", where=doc.where_value(at))
    repo = value["repo"]
    if not isinstance(repo, str) or repo.count("/") != 1:
        raise ConfigError(f"'repo' must look like 'owner/name', got {repo!r}", where=doc.where(at + ("repo",)))
    revision = value["revision"]
    if not isinstance(revision, str) or not COMMIT_RE.match(revision):
        raise ConfigError(f"'revision' must be a full 40-hex commit id, got {revision!r}",
                          where=doc.where(at + ("revision",)),
                          hint="pin a commit (a branch or tag can change under you); "
                               "see the dataset's 'Files and versions' history")
    files = value["files"]
    if isinstance(files, str):
        files = [files]
    files_where = doc.where(at + ("files",))
    if not isinstance(files, list) or not files or not all(isinstance(f, str) and f for f in files):
        raise ConfigError("'files' must be a non-empty list of file paths in the repo", where=files_where)
    for f in files:
        if f.startswith("/") or ".." in f.split("/"):
            raise ConfigError(f"invalid file path {f!r} in hf source", where=files_where)
        if f.endswith(".parquet"):
            raise ConfigError(f"{f}: parquet files are not supported", where=files_where,
                              hint="use a .jsonl/.json/.txt file of the dataset (optionally .gz)")
    repo_type = value.get("repo_type", "dataset")
    if repo_type not in ("dataset", "model"):
        raise ConfigError(f"'repo_type' must be dataset or model, got {repo_type!r}",
                          where=doc.where(at + ("repo_type",)))
    return HFFiles(repo=repo, revision=revision, files=tuple(files), repo_type=repo_type)
