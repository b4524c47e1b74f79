"""Offline training text for the reference model, selected deterministically.

Two domains, both shipped with every CPython install (so no download is needed):
- "code":  the standard library's own `.py` sources (`<base python>/lib/python3.X/`), minus
  tests, site-packages, generated codec tables (`encodings/`) and `pydoc_data/`.
- "prose": the English text of the Python language/library reference that CPython ships for
  `help()` (`pydoc_data/topics.py`, a dict of topic -> plain text).

Split: files (code) and topics (prose) are sorted by name; every 20th file / 5th topic is
held out (never trained on), the rest is training text. The code training set is capped at
`code_bytes`, taking files in the order of a SHA-256 of their relative path (a stable,
alphabet-independent sample). Everything is a pure function of the Python install, so the
SHA-256 of the selected text keys the model cache.
"""

from __future__ import annotations

import ast
import hashlib
import sys
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path

EXCLUDED_DIRS = {"site-packages", "test", "tests", "idle_test", "__pycache__", "encodings",
                 "pydoc_data", "lib2to3"}
DOC_SEPARATOR = "\n\n"


@dataclass
class Corpus:
    train: dict[str, str]            # domain -> text
    heldout: dict[str, str]          # domain -> text
    manifest: dict = field(default_factory=dict)

    def sha256(self) -> str:
        h = hashlib.sha256()
        for split in (self.train, self.heldout):
            for domain in sorted(split):
                h.update(domain.encode() + b"\0" + split[domain].encode("utf-8") + b"\0")
        return h.hexdigest()


def stdlib_dir() -> Path:
    """The base interpreter's standard library (the venv has none of its own)."""
    return Path(sysconfig.get_paths(vars={"base": sys.base_prefix, "installed_base": sys.base_prefix})["stdlib"])


def _code_files(root: Path) -> list[str]:
    out = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        if EXCLUDED_DIRS.intersection(rel.parts[:-1]):
            continue
        out.append(rel.as_posix())
    return sorted(out)


def _read(path: Path) -> str:
    # A few stdlib files are not UTF-8 clean; keep the text deterministic anyway.
    return path.read_bytes().decode("utf-8", errors="replace").replace("\r\n", "\n")


def _prose_topics(root: Path) -> dict[str, str]:
    tree = ast.parse((root / "pydoc_data" / "topics.py").read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "topics":
            return ast.literal_eval(node.value)
    raise ValueError("pydoc_data/topics.py has no `topics` dict")


def _every(names: list[str], every: int, held: bool) -> list[str]:
    """Every `every`-th name (offset every // 2) is held out."""
    return [n for i, n in enumerate(names) if (i % every == every // 2) == held]


def collect(code_bytes: int | None, prose_bytes: int | None, *, code_heldout_every: int = 20,
            prose_heldout_every: int = 5, heldout_bytes: int | None = None,
            root: Path | None = None) -> Corpus:
    """Select the training and held-out text (see the module docstring)."""
    root = root or stdlib_dir()
    files = _code_files(root)
    held_code = _every(files, code_heldout_every, held=True)
    train_pool = _every(files, code_heldout_every, held=False)
    train_pool.sort(key=lambda rel: hashlib.sha256(rel.encode()).hexdigest())

    def take(names: list[str], budget: int | None, read) -> tuple[list[str], list[str]]:
        chosen, texts, size = [], [], 0
        for name in names:
            if budget is not None and size >= budget:
                break
            text = read(name)
            chosen.append(name)
            texts.append(text)
            size += len(text.encode("utf-8"))
        return chosen, texts

    code_train_names, code_train = take(train_pool, code_bytes, lambda rel: _read(root / rel))
    code_held_names, code_held = take(held_code, heldout_bytes, lambda rel: _read(root / rel))

    topics = _prose_topics(root)
    keys = sorted(topics)
    held_keys = _every(keys, prose_heldout_every, held=True)
    train_keys = _every(keys, prose_heldout_every, held=False)
    prose_train_names, prose_train = take(train_keys, prose_bytes, topics.__getitem__)
    prose_held_names, prose_held = take(held_keys, heldout_bytes, topics.__getitem__)

    corpus = Corpus(
        train={"code": DOC_SEPARATOR.join(code_train), "prose": DOC_SEPARATOR.join(prose_train)},
        heldout={"code": DOC_SEPARATOR.join(code_held), "prose": DOC_SEPARATOR.join(prose_held)},
    )
    corpus.manifest = {
        "stdlib": str(root),
        "python": sys.version.split()[0],
        "code": {"train_files": len(code_train_names), "heldout_files": code_held_names},
        "prose": {"train_topics": len(prose_train_names), "heldout_topics": prose_held_names},
        "bytes": {f"{split}/{d}": len(t.encode("utf-8"))
                  for split, texts in (("train", corpus.train), ("heldout", corpus.heldout))
                  for d, t in texts.items()},
    }
    return corpus
