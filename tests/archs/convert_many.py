"""Run the pinned convert_hf_to_gguf.py's own main() for several checkpoints in one process.

Usage: python convert_many.py JOBS.json — JOBS is a list of {"argv": [...], "log": path}.
Each job is exactly `convert_hf_to_gguf.py ARGV` (the same argument parsing, model-class lookup
and writer); only the import of torch/transformers/gguf is shared, which saves ~5 s of CPU per
architecture. A job's failure (exception or SystemExit != 0) is recorded in its log and the
next job runs; the exit status is the number of failed jobs.
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
        if status:
            failed += 1
        Path(job["log"]).write_text(buf.getvalue() + f"\nexit status {status}\n")
    return failed


if __name__ == "__main__":
    sys.exit(main())
