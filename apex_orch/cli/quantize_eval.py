"""The table `apex-orch quantize --demo` ends with: the APEX file(s) against their source."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from apex_orch.core.outputs import atomic_write_text
from apex_orch.core.settings import cache_root

# Small enough to finish in seconds on 2 cores, large enough for stable KLD statistics.
DEMO_CTX = 256
DEMO_CHUNKS = 8
DEMO_SPEED_REPS = 1      # llama-bench's default is 5; one keeps the demo (and CI's cold run) quick


def demo_eval_text() -> Path:
    """Held-out text for the demo eval: generated prose, not part of any calibration corpus."""
    from apex_orch.demo.synthetic import demo_text
    path = cache_root() / "eval-text" / "demo-prose-v1.txt"
    if not path.exists():
        atomic_write_text(path, demo_text())
    return path


def eval_outputs(source: Path, outputs: list[Path], progress: Callable[[str], None], fmt: str = "md") -> str:
    """The table `quantize --eval` ends with (md), or its JSON (`quantize --json`)."""
    from apex_orch.evaluation.compare import eval_table
    from apex_orch.evaluation.inputs import EvalSettings

    settings = EvalSettings(n_ctx=DEMO_CTX, chunks=DEMO_CHUNKS)
    progress(f"eval: {len(outputs)} file(s) against {source.name} "
             f"(ctx {DEMO_CTX}, {DEMO_CHUNKS} chunks, bindings, flash attention on; "
             f"llama-bench speed, {DEMO_SPEED_REPS} repetition)")
    return eval_table(source, outputs, text=demo_eval_text(), settings=settings, speed=True, fmt=fmt,
                      progress=progress, speed_repetitions=DEMO_SPEED_REPS)
