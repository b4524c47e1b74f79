"""The eval phase's records: one JSON file per measured thing in `.apex-release/eval/`, each with
a manifest keyed by what it depends on, so a rerun with the same inputs measures nothing.

`read_record` gives a record only when its manifest says it is fresh for `key` and its bytes are
the recorded ones (read back the one way, bounded); anything else is None (measured again).
`write_record` writes the record atomically, then its manifest. The tiers' and baselines' PPL/KLD
records (release.phases.evaluate) and the MTP speculative records (release.speculative) use them.
"""

from __future__ import annotations

import json
from pathlib import Path

from apex_orch.core.errors import ApexError
from apex_orch.core.fingerprint import file_record
from apex_orch.core.infiles import read_json
from apex_orch.core.manifest import manifest_path, up_to_date, write_manifest
from apex_orch.core.outputs import atomic_write_text
from apex_orch.core.safefiles import safe_mkdir

EVAL_DIR = "eval"


def record_path(work: Path, stem: str) -> Path:
    return work / EVAL_DIR / f"{stem}.json"


def read_record(path: Path, key: str) -> dict | None:
    if not path.is_file():
        return None
    try:
        fresh, _ = up_to_date([path], key)
    except ApexError:
        return None
    if not fresh:
        return None
    try:   # its bytes are the recorded ones (the manifest's sha256); read back the one way, bounded
        record = read_json(path, "record")
    except ApexError:
        return None
    return record if isinstance(record, dict) and isinstance(record.get("summary", {}), dict) else None


def write_record(path: Path, key: str, inputs: dict, body: dict) -> None:
    safe_mkdir(path.parent)
    atomic_write_text(path, json.dumps(body, indent=2, sort_keys=True, default=str) + "\n")
    write_manifest(manifest_path(path), {"kind": "apex-orch release eval", "inputs": inputs, "inputs_key": key,
                                         "files": [file_record(path)]})
