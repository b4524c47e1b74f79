"""Sidecar manifests: every output explains itself, and reruns skip finished work.

A manifest is JSON beside its output (`X.gguf.manifest.json`). It records what went in
(`inputs`: fingerprints, profile hash, imatrix hash, llama.cpp build, parameters — hashed
into `inputs_key`), what came out (`files`: each file's size, mtime_ns, inode and full sha256 — see
fingerprint.check_record), the command and timings. It carries `self_sha256` over its own content: a manifest that was
edited or truncated is detected and never trusted.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from apex_orch.core.errors import ManifestError
from apex_orch.core.fingerprint import check_record
from apex_orch.core.infiles import json_depth_within, read_input
from apex_orch.core.outputs import atomic_write_text

SCHEMA = "apex-orch/manifest/v1"


def manifest_path(output: Path) -> Path:
    return output.with_name(output.name + ".manifest.json")


def inputs_key(inputs: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()


def _self_hash(doc: dict[str, Any]) -> str:
    body = {k: v for k, v in doc.items() if k != "self_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()


def manifest_text(doc: dict[str, Any]) -> str:
    """The manifest's JSON text, schema and self checksum included (for writing to a temporary)."""
    doc = {"schema": SCHEMA, **doc}
    doc["self_sha256"] = _self_hash(doc)
    return json.dumps(doc, indent=2, sort_keys=False, default=str) + "\n"


def write_manifest(path: Path, doc: dict[str, Any]) -> dict[str, Any]:
    text = manifest_text(doc)
    atomic_write_text(path, text)
    written: dict[str, Any] = json.loads(text)
    return written


def read_manifest(path: Path) -> dict[str, Any]:
    if not os.path.lexists(path):
        raise FileNotFoundError(errno.ENOENT, "no manifest", str(path))
    raw = read_input(path, "record")   # core.infiles: a regular file, at most 64 MiB, never blocking
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as exc:   # UnicodeDecodeError is a ValueError
        raise ManifestError(f"manifest is corrupt ({exc.__class__.__name__}: {exc})", where=str(path),
                            hint="it cannot be trusted; rerun, forced, to rebuild the output",
                            options=("force",)) from None
    if not json_depth_within(doc):
        raise ManifestError("manifest is corrupt (nested too deeply)", where=str(path),
                            hint="it cannot be trusted; rerun, forced, to rebuild the output",
                            options=("force",))
    if not isinstance(doc, dict) or doc.get("schema") != SCHEMA:
        raise ManifestError("not an apex-orch manifest (unknown schema)", where=str(path),
                            hint="rerun, forced, to rebuild the output", options=("force",))
    if doc.get("self_sha256") != _self_hash(doc):
        raise ManifestError("manifest content does not match its own checksum (edited or damaged)",
                            where=str(path), hint="it cannot be trusted; rerun, forced, to rebuild the output",
                            options=("force",))
    return doc


def up_to_date(output_files: list[Path], key: str) -> tuple[bool, str]:
    """(True, why) when a valid manifest says these exact files came from these exact inputs and
    their bytes are the recorded ones (cheap when size, mtime_ns and inode are as recorded; a full
    sha256 otherwise: about 3 min per 240 GB)."""
    mpath = manifest_path(output_files[0])
    if not mpath.exists():
        return False, "no manifest"
    doc = read_manifest(mpath)          # raises ManifestError when corrupt
    if doc.get("inputs_key") != key:
        return False, "inputs changed"
    recorded = {f["name"]: f for f in doc.get("files", [])}
    for f in output_files:
        rec = recorded.get(f.name)
        if rec is None or not f.exists():
            return False, f"{f.name} missing"
        same, _how = check_record(f, rec)   # stat as recorded, else a full sha256 equal to the recorded one
        if not same:
            return False, f"{f.name} changed since it was written"
    return True, "up to date"
