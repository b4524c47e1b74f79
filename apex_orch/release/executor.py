"""Where a release's heavy work runs: this machine (the default) or a Ray cluster.

A release has three kinds of heavy, independent work: the importance matrix (once), one
quantization per tier (with its verification), and one evaluation per tier (after the base
log-probabilities, computed once). The phases hand that work to an `Executor`:

- `imatrix(plan)` -> the imatrix path;
- `quantize(jobs, force=, parallel=)` -> one QuantizeResult per job, in job order;
- `base_cache(base, text, settings)` -> the base log-prob cache file;
- `evaluate(plans, on_result=)` -> one EvalResult per plan, in plan order; `on_result(i, result)`
  is called on this machine as each one finishes, so the phase keeps (writes the record of) every
  finished evaluation even when another one fails.

Each call also appends one `TaskRecord` per task (what, which worker built it, how long) to
`records`, which the release summary prints. `LocalExecutor` runs the same library functions the
CLI runs (`run_imatrix`, `run_many`, `ensure_base_cache`, `run_eval`) in this process: a local
release is exactly what it was before executors existed. `release.ray_executor.RayExecutor` runs
each task as a Ray task on a worker that sees the same storage (the only module that imports
Ray; `make_executor` loads it only when asked for).

Guarantees both keep: every output is written under a temporary name, verified and renamed by
the worker that made it (the library does that); a failed task leaves nothing under a final
name; the first failure is raised after the tasks already running have finished (their results
are kept, so a rerun resumes), naming the tier. A Ray task's error is the worker's own ApexError
(errors pickle with their fields), so the CLI prints the same line and exit code as locally.

`make_executor(spec, resources=)` takes the release config's `resources` section (what a Ray
task asks for); a local run ignores it.
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from apex_orch.calibration.imatrix import ImatrixPlan, run_imatrix
from apex_orch.core.errors import RequestError
from apex_orch.evaluation.evaluate import EvalPlan, ensure_base_cache, run_eval
from apex_orch.evaluation.inputs import EvalSettings, ModelFacts, TextFacts
from apex_orch.evaluation.results import EvalResult
from apex_orch.quantize.job import QuantizeJob
from apex_orch.quantize.run import QuantizeResult, run_many
from apex_orch.release.config import ResourcesConfig
from apex_orch.release.tasks import OnResult, Progress, TaskRecord

LOCAL = "local"
TASK_PHASES = ("imatrix", "quantize", "eval")   # the phases whose work an executor runs (the others: here)


class Executor(Protocol):
    name: str
    records: list[TaskRecord]

    def imatrix(self, plan: ImatrixPlan, *, progress: Progress) -> Path: ...

    def quantize(self, jobs: list[QuantizeJob], *, force: bool, parallel: int | None,
                 progress: Progress) -> list[QuantizeResult]: ...

    def base_cache(self, base: ModelFacts, text: TextFacts, settings: EvalSettings, *, progress: Progress) -> Path: ...

    def evaluate(self, plans: list[EvalPlan], *, progress: Progress,
                 on_result: OnResult | None = None) -> list[EvalResult]: ...

    def close(self) -> None: ...


def local_worker() -> str:
    return f"local ({socket.gethostname()})"


@dataclass
class LocalExecutor:
    """This process, as before: tiers in parallel threads (`-j`), evaluations one after another."""
    name: str = LOCAL
    records: list[TaskRecord] = field(default_factory=list)

    def imatrix(self, plan: ImatrixPlan, *, progress: Progress) -> Path:
        t0 = time.monotonic()
        path = run_imatrix(plan, on_progress=progress)
        self.records.append(TaskRecord("imatrix", path.name, local_worker(), time.monotonic() - t0))
        return path

    def quantize(self, jobs: list[QuantizeJob], *, force: bool, parallel: int | None,
                 progress: Progress) -> list[QuantizeResult]:
        results = run_many(jobs, parallel=parallel, force=force, progress=progress)
        self.records.extend(TaskRecord("quantize", r.job.output.name, local_worker(), r.seconds) for r in results)
        return results

    def base_cache(self, base: ModelFacts, text: TextFacts, settings: EvalSettings, *, progress: Progress) -> Path:
        t0 = time.monotonic()
        path = ensure_base_cache(base, text, settings, progress=progress)
        self.records.append(TaskRecord("eval-base", Path(base.path).name, local_worker(), time.monotonic() - t0))
        return path

    def evaluate(self, plans: list[EvalPlan], *, progress: Progress,
                 on_result: OnResult | None = None) -> list[EvalResult]:
        out = []
        for i, plan in enumerate(plans):
            t0 = time.monotonic()
            out.append(run_eval(plan, progress=progress))
            self.records.append(TaskRecord("eval", Path(plan.model.path).name, local_worker(), time.monotonic() - t0))
            if on_result is not None:
                on_result(i, out[-1])
        return out

    def close(self) -> None:
        pass


def parse_executor(spec: str) -> tuple[str, str | None]:
    """`local`, `ray` (the cluster RAY_ADDRESS names, or the one started on this machine with
    `ray start`), `ray://HOST:PORT` (Ray Client) -> (kind, address)."""
    text = spec.strip()
    if text == LOCAL:
        return LOCAL, None
    if text == "ray":
        return "ray", None
    if text.startswith("ray://") and len(text) > len("ray://"):
        host, sep, port = text[len("ray://"):].rpartition(":")
        if sep and host and port.isdigit() and 0 < int(port) < 65536:
            return "ray", text
    raise RequestError(f"{spec!r}: expected local, ray or ray://HOST:PORT", fields=("executor",))


def make_executor(spec: str = LOCAL, *, progress: Progress | None = None,
                  resources: ResourcesConfig | None = None) -> Executor:
    kind, address = parse_executor(spec)
    if kind == LOCAL:
        return LocalExecutor()
    # Imported only here: Ray is an optional extra (apex-orch[ray]), imported by that module alone.
    from apex_orch.release.ray_executor import RayExecutor
    return RayExecutor.connect(address, progress=progress, resources=resources or ResourcesConfig())
