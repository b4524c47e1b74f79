"""The real-converter matrix (issue 14): needs the `archs` extra (transformers + the CPU torch).

`make test-archs` runs this folder alone; `make test` installs the extra and runs it with the
rest. Without the extra installed the whole folder is skipped with that reason.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

pytest.importorskip("transformers", reason="the archs matrix needs the `archs` extra: pip install -e '.[archs]'")
pytest.importorskip("torch", reason="the archs matrix needs the `archs` extra: pip install -e '.[archs]'")

import archkit  # noqa: E402  (tests/archs is on sys.path, like tests/reliability)

RESULTS: dict[str, dict] = {}


class _Converted(dict):
    """id -> Built | reason; an id no selected test named is converted when first asked for."""

    def __missing__(self, arch: str):
        self.update(archkit.get_all([s for s in archkit.ARCHS if s.id == arch]))
        return self[arch]


def _archs_named(params: dict) -> set[str]:
    """The matrix ids a test's parameters name: `arch`, or `file_id` ("<id>" or "<id>/<kind>")."""
    return {str(params[k]).partition("/")[0] for k in ("arch", "file_id") if k in params}


@pytest.fixture(scope="session")
def converted(request) -> dict:
    """The architectures the selected tests name, converted in one batch (content-keyed cache):
    id -> Built | reason. `-k qwen35moe` converts only that one; others on first use."""
    wanted: set[str] = set()
    for item in request.session.items:
        callspec = getattr(item, "callspec", None)
        if callspec is not None:
            wanted |= _archs_named(callspec.params)
    t0 = time.monotonic()
    built = _Converted(archkit.get_all([s for s in archkit.ARCHS if s.id in wanted]))
    RESULTS["_convert_seconds"] = {"seconds": round(time.monotonic() - t0, 1)}
    return built


@pytest.fixture
def record():
    """record(arch_id, key, value): what the supported-architectures table is generated from."""
    def put(arch: str, key: str, value) -> None:
        RESULTS.setdefault(arch, {})[key] = value
    return put


def pytest_sessionfinish(session, exitstatus):
    target = os.environ.get("APEX_ORCH_ARCHS_RESULTS")
    if target and RESULTS:
        specs = {s.id: {"family": s.family, "hf_class": s.hf_class, "notes": s.notes} for s in archkit.ARCHS}
        for arch, meta in specs.items():
            if arch in RESULTS:
                RESULTS[arch].update(meta)
        Path(target).write_text(json.dumps(RESULTS, indent=1, sort_keys=True, default=str))
