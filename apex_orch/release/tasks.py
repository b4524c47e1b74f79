"""What a release's executor reports and takes: one `TaskRecord` per task for the summary, and the
callbacks (`Progress`, `OnResult`). Apart from release.executor so that the Ray executor, which
that module loads on demand, can use them without importing it back.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable

from apex_orch.evaluation.results import EvalResult

Progress = Callable[[str], None]
OnResult = Callable[[int, EvalResult], None]   # (index of the plan, its result), as each one finishes


@dataclass(frozen=True)
class TaskRecord:
    """One task of a release, for its summary: the phase, what it made, where, how long."""
    phase: str           # "imatrix", "quantize", "eval", "eval-base"
    target: str          # the tier's file name, the imatrix or base model file name
    worker: str          # "local (host)", or the Ray node, host and process that ran it
    seconds: float
    attempts: int = 1
    status: str = "done"  # "done", "failed" (an error: not retried), "lost" (every attempt's worker died)

    def to_dict(self) -> dict:
        return {**asdict(self), "seconds": round(self.seconds, 3)}
