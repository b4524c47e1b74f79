"""Calibration corpora: a corpus definition -> one reproducible text file (+ manifest).

Takes a corpus name or YAML path (corpus_spec) and, optionally, a model; gives a BuiltCorpus
in memory (build_corpus), then the text file and its manifest on disk (write_corpus).

Building is deterministic: the same YAML, sample files and chat template give the same
bytes (and so the same sha256, which keys the imatrix cache). Steps: load documents from
every source (sources.py; a `corpus:` source is built here, recursively), render
conversations (chat_format.py: the model's own `tokenizer.chat_template` when a model is
given, else the plain format), drop duplicates, take each source's share of the budget in
seeded-shuffled order, shuffle the union with the seed, join with the separator.

Token counts are approximate (UTF-8 bytes / 4) unless a model is given, then its own
tokenizer counts them (tokenizer.py), with special tokens parsed when a chat template wrote
the text, as llama-imatrix will read it.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path

from apex_orch import __version__
from apex_orch.calibration.chat_format import PLAIN, ChatFormat, ChatRenderer, chat_format_from_model
from apex_orch.calibration.corpus_spec import CorpusSpec, SourceSpec, load_corpus_spec, resolve_corpus
from apex_orch.calibration.sources import Document, approx_tokens, read_source
from apex_orch.calibration.tokenizer import ModelTokenizer
from apex_orch.core.errors import ConfigError, OutputExistsError
from apex_orch.core.infiles import holds
from apex_orch.core.safefiles import write_atomic

APPROX_METHOD = "approximate: UTF-8 bytes / 4"
MODEL_METHOD = "model tokenizer"


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
    template_fallback_reasons: dict[str, int] = field(default_factory=dict)
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


# --------------------------------------------------------------------------- building

def _dedupe_key(text: str) -> str:
    return hashlib.sha256(" ".join(text.split()).encode("utf-8")).hexdigest()


def _load_source(src: SourceSpec, spec: CorpusSpec, renderer: ChatRenderer, stack: tuple[Path, ...]) -> list[Document]:
    if src.kind != "corpus":
        return read_source(src, spec.folder)
    sub_path = resolve_corpus(str(src.value), search=[spec.folder])
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

def manifest_path_for(text_path: Path) -> Path:
    return text_path.with_name(text_path.name + ".manifest.json")


def make_manifest(built: BuiltCorpus, *, text_name: str, total_tokens: int | None,
                  model: str | os.PathLike | None) -> dict:
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
        same_text = holds(text_path, data)
        for p in (text_path, manifest_path):
            if p.exists() and not same_text:
                raise OutputExistsError(f"{p} exists", hint="ask to replace it, or choose another output",
                                        options=("force", "out"))
    total = count_tokens(built, model) if model else None
    manifest = make_manifest(built, text_name=text_path.name, total_tokens=total, model=model)
    write_atomic(text_path, data)
    write_atomic(manifest_path, json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
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
