"""The calibration a release publishes: what its I-tiers were quantized with, so anyone can check it.

In `<release>/calibration/` (uploaded with `--push`, linked from the card; `--no-calibration-upload`
leaves them out):

- `imatrix.gguf`: the importance matrix llama-imatrix computed, byte for byte (every I-tier and
  imatrix baseline was made with it);
- `calibration.txt`: the calibration text llama-imatrix read, byte for byte (its sha256 is the one
  the imatrix cache is keyed by);
- `calibration.json`: that text's manifest: the corpus, its definition's sha256, every source with
  the sha256 of the text it contributed and its token count, the tokens of the whole text (the
  source model's tokenizer) and the chunks llama-imatrix used. No local path, no date: a rerun
  writes the same bytes.

`write_calibration(out, plan, imatrix_path, model_path)` writes the three (atomically) with a sidecar
manifest keyed by their inputs (the imatrix's and the text's sha256), so a rerun writes nothing;
`find_calibration(out, plan, imatrix_path)` reads back the record (names, sizes, sha256) when the
files are the recorded ones, made from that imatrix and text. The imatrix phase calls both; the
card and publish phases read the record.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from apex_orch import __version__
from apex_orch.calibration.corpus import MODEL_METHOD, count_tokens
from apex_orch.calibration.imatrix import ImatrixPlan
from apex_orch.core.errors import ApexError
from apex_orch.core.fingerprint import file_record, source_sha256
from apex_orch.core.manifest import inputs_key, manifest_path, read_manifest, up_to_date, write_manifest
from apex_orch.core.safefiles import copy_atomic, safe_mkdir, write_atomic
from apex_orch.llama.tools import build_label

FORMAT, FORMAT_VERSION = "apex-orch-calibration", 1
IMATRIX_NAME, TEXT_NAME, MANIFEST_NAME = "imatrix.gguf", "calibration.txt", "calibration.json"


def calibration_manifest(plan: ImatrixPlan, imatrix_sha256: str, model_path: Path) -> dict:
    """The published manifest of the calibration text (plain values, stable order)."""
    built = plan.corpus
    total = count_tokens(built, model_path)       # fills each source's tokens with the model's tokenizer
    sep = built.spec.separator
    sources = []
    for s in built.sources:
        text = sep.join(d.rendered for d in built.documents if d.source == s.id)
        sources.append({"id": _public_id(s.id), "kind": s.kind, "weight": s.weight, "documents": s.documents_used,
                         "bytes": len(text.encode("utf-8")), "tokens": s.tokens,
                         "sha256": hashlib.sha256(text.encode("utf-8")).hexdigest()})
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "corpus": built.name, "description": " ".join((built.spec.description or "").split()),
        "definition": Path(built.spec.path).name, "definition_sha256": built.spec.sha256,
        "text": {"file": TEXT_NAME, "sha256": plan.corpus_sha256, "bytes": len(built.data),
                 "documents": len(built.documents), "tokens": total, "tokens_method": MODEL_METHOD,
                 "chat_format": built.chat_format.origin, "parse_special": built.parse_special},
        "sources": sources,
        "imatrix": {"file": IMATRIX_NAME, "sha256": imatrix_sha256, "ctx": plan.ctx, "chunks": plan.chunks,
                    "tokens": plan.ctx * plan.chunks},
        "apex_orch": __version__, "llama_cpp": build_label(),
    }


def _public_id(source_id: str) -> str:
    """A source's id without a local folder: a `path:` source given by an absolute path (or ~) is named
    by its file name (the sha256 beside it says which bytes it gave)."""
    kind, _, value = source_id.partition(":")
    if kind == "path" and (value.startswith(("/", "~")) or ":\\" in value):
        return f"path:{Path(value).name}"
    return source_id


def _paths(folder: Path) -> list[Path]:
    return [folder / IMATRIX_NAME, folder / TEXT_NAME, folder / MANIFEST_NAME]


def _record(folder: Path) -> dict:
    doc = read_manifest(manifest_path(folder / IMATRIX_NAME))
    return {"files": [{"name": f["name"], "size": int(f["size"]), "sha256": f["sha256"]} for f in doc["files"]],
            **doc["calibration"]}


def _inputs(plan: ImatrixPlan, imatrix_sha: str) -> dict:
    return {"imatrix_sha256": imatrix_sha, "text_sha256": plan.corpus_sha256, "ctx": plan.ctx,
            "chunks": plan.chunks, "format_version": FORMAT_VERSION, "llama": build_label()}


def find_calibration(folder: Path, plan: ImatrixPlan, imatrix_path: Path) -> dict | None:
    """The record of the calibration files when they are there, were made from this imatrix and text,
    and are the recorded bytes; else None."""
    paths = _paths(folder)
    if not all(p.is_file() for p in paths):
        return None
    try:
        if up_to_date(paths, inputs_key(_inputs(plan, source_sha256(imatrix_path))))[0]:
            return _record(folder)
    except (ApexError, KeyError, TypeError, ValueError):
        pass                                   # a damaged record: not found (written again when run)
    return None


def write_calibration(folder: Path, plan: ImatrixPlan, imatrix_path: Path, model_path: Path) -> tuple[dict, bool]:
    """The three files in `folder` (their record, and whether anything was written)."""
    found = find_calibration(folder, plan, imatrix_path)
    if found is not None:
        return found, False
    imatrix_sha = source_sha256(imatrix_path)
    inputs = _inputs(plan, imatrix_sha)
    key = inputs_key(inputs)
    paths = _paths(folder)
    safe_mkdir(folder)
    copy_atomic(imatrix_path, paths[0])
    write_atomic(paths[1], plan.corpus.data)
    manifest = calibration_manifest(plan, imatrix_sha, model_path)
    write_atomic(paths[2], json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
    summary = {"corpus": manifest["corpus"], "tokens": manifest["text"]["tokens"], "ctx": plan.ctx,
               "chunks": plan.chunks}
    write_manifest(manifest_path(paths[0]), {"kind": "apex-orch release calibration", "inputs": inputs,
                                             "inputs_key": key, "calibration": summary,
                                             "files": [file_record(p) for p in paths]})
    return _record(folder), True
