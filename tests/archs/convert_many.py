"""Run the pinned convert_hf_to_gguf.py's own main() for several checkpoints in one process.

Usage: python convert_many.py JOBS.json — JOBS is a list of {"argv": [...], "log": path}.
Each job is exactly `convert_hf_to_gguf.py ARGV` (the same argument parsing, model-class lookup
and writer); only the import of torch/transformers/gguf is shared, which saves ~5 s of CPU per
architecture. A job's failure (exception or SystemExit != 0) is recorded in its log and the
next job runs; the exit status is the number of failed jobs.

The converter's main() keeps per-run state on the model CLASSES (`--mtp` sets
`model_class.mtp_only = True`, `--no-mtp` sets `no_mtp`, index_tensors stashes layer counts), which
a subclass inherits (Qwen3.5's classes derive from Qwen3-Next's). One model per process never
notices; here every class attribute is put back as it was after each job, so a job runs as it
would alone.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import logging
import sys
import traceback
from pathlib import Path


def main() -> int:
    jobs = json.loads(Path(sys.argv[1]).read_text())
    converter = Path(jobs[0]["converter"])
    sys.path.insert(0, str(converter.parent))
    spec = importlib.util.spec_from_file_location("convert_hf_to_gguf", converter)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    saved = _class_state(module)
    failed = 0
    for job in jobs:
        buf = io.StringIO()
        handler = logging.StreamHandler(buf)
        root = logging.getLogger()
        root.addHandler(handler)
        status = 0
        sys.argv = [str(converter), *job["argv"]]
        try:
            with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
                module.main()
        except SystemExit as e:
            status = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except BaseException:
            status = 1
            buf.write(traceback.format_exc())
        finally:
            root.removeHandler(handler)
            _restore_class_state(saved)
        if status:
            failed += 1
        Path(job["log"]).write_text(buf.getvalue() + f"\nexit status {status}\n")
    return failed


def _model_classes(base: type) -> list[type]:
    todo, seen = [base], []
    while todo:
        cls = todo.pop()
        if cls not in seen:
            seen.append(cls)
            todo.extend(cls.__subclasses__())
    return seen


def _class_state(module) -> dict[type, dict]:
    """Every model class's own attributes (dunders aside) with every model module imported (the
    converter imports them lazily, by architecture: ~1 s for all)."""
    import conversion   # the converter's package (its folder is on sys.path)
    conversion.load_all_models()
    return {cls: {k: v for k, v in vars(cls).items() if not k.startswith("__")}
            for cls in _model_classes(module.ModelBase)}


def _restore_class_state(saved: dict[type, dict]) -> None:
    for cls, before in saved.items():
        now = {k: v for k, v in vars(cls).items() if not k.startswith("__")}
        for key in now.keys() - before.keys():
            delattr(cls, key)
        for key, value in before.items():
            if now.get(key, _MISSING) is not value:
                setattr(cls, key, value)


_MISSING = object()


if __name__ == "__main__":
    sys.exit(main())
