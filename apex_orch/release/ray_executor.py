"""A release's heavy work as Ray tasks: `--executor ray` (the cluster RAY_ADDRESS names, or the one
`ray start` started on this machine) or `--executor ray://HOST:PORT` (Ray Client).

The only module that imports Ray (the extra `apex-orch[ray]`), inside its functions; only
`release.executor.make_executor` loads it. A task runs the library function the LocalExecutor runs
(`run_imatrix`, `run_quantize` for one tier, `ensure_base_cache`, `run_eval` for one tier) on a
worker that sees the same storage at the same paths, so outputs are written under a temporary
name, verified, renamed and given their manifest as on one machine. Workers get this process's
settings (`runtime_env`: core.settings.worker_environment) and return (result, worker, seconds).

Placement: `resources.cpus` CPUs (the tool's threads), memory (the config's, else a quantization's
estimate QuantizeJob.memory_bytes, which also bounds local parallelism, or the model's size)
and, for imatrix and eval, `resources.gpus`; a task no node can hold is refused before any starts.

Failures: a worker that dies makes Ray run its task elsewhere, at most MAX_RETRIES more times; the
retry holds the output's lock (the dead worker's flock went with it) and removes the partial.
apex-orch's own errors (full disk, a tool error) are not retried. All tiers are submitted at once;
the first failure in tier order is raised once all have ended (their results kept: a rerun
resumes); a task lost on every attempt has its partials removed here (an OutputGuard taken and
released) before an ExecutorError names its file. Tasks send progress lines to an actor on the
driver's node (the sink), drained while waiting: the release log shows them, prefixed by worker.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
import re
import signal
import socket
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from apex_orch.calibration.imatrix import ImatrixPlan, run_imatrix
from apex_orch.core import settings
from apex_orch.core.errors import ApexError, ExecutorError, InterruptedRun, ToolNotFoundError
from apex_orch.core.outputs import OutputGuard
from apex_orch.evaluation.evaluate import EvalPlan, ensure_base_cache, run_eval
from apex_orch.evaluation.inputs import EvalSettings, ModelFacts, TextFacts
from apex_orch.evaluation.results import EvalResult
from apex_orch.llama.tools import configured_bin_dir
from apex_orch.model.info import shard_paths
from apex_orch.quantize.job import QuantizeJob, check_distinct_outputs
from apex_orch.quantize.run import QuantizeResult, run_quantize
from apex_orch.release.config import ResourcesConfig
from apex_orch.release.tasks import OnResult, Progress, TaskRecord

RAY_REQUIREMENT = "ray[client]==2.60.0"      # the pin of the `ray` extra in pyproject.toml
MAX_RETRIES = 2                              # more attempts after a worker died
RECORD_INTERVAL_S = 1.0                      # a task forwards tool records ("[i/n] ...") at most this often


def import_ray():
    """The ray module, or a ToolNotFoundError saying what to install."""
    try:
        import ray
    except ImportError as exc:
        raise ToolNotFoundError(f"running on a Ray cluster needs Ray, which is not installed here ({exc}): "
                                "pip install 'apex-orch[ray]'", options=("executor",),
                                hint=f"the extra installs the pinned {RAY_REQUIREMENT}; every worker of the "
                                     "cluster needs the same apex-orch and Ray (docs/distributed.md)") from None
    return ray


# --------------------------------------------------------------------------- on the worker

class _Sink:
    """The driver's mailbox (a Ray actor): (tag, worker, line) from tasks; line None = an attempt started."""

    def __init__(self) -> None:
        self.items: list[tuple[str, str, str | None]] = []

    def put(self, tag: str, worker: str, line: str | None) -> None:
        self.items.append((tag, worker, line))

    def drain(self) -> list[tuple[str, str, str | None]]:
        items, self.items = self.items, []
        return items


class _Relay:
    """A task's progress callback: every line to the sink (best effort: a lost sink never fails a task)."""

    def __init__(self, sink: Any, tag: str, worker: str):
        self.sink, self.tag, self.worker = sink, tag, worker
        self.last_record = 0.0
        self.last_ref = None

    def __call__(self, line: str | None) -> None:
        if line is not None and line.startswith("["):
            now = time.monotonic()
            if now - self.last_record < RECORD_INTERVAL_S:
                return
            self.last_record = now
        try:
            self.last_ref = self.sink.put.remote(self.tag, self.worker, line)
        except Exception:   # noqa: BLE001 - progress only
            self.last_ref = None

    def flush(self) -> None:
        """Wait until the sink has every line sent so far (an actor runs one caller's calls in order)."""
        try:
            if self.last_ref is not None:
                import_ray().get(self.last_ref, timeout=30)
        except Exception:   # noqa: BLE001 - progress only
            pass


def worker_name() -> str:
    """The Ray node (first 8 hex digits of its id), the host and the process running this task."""
    node = import_ray().get_runtime_context().get_node_id() or "?"
    return f"{node[:8]} ({socket.gethostname()}, pid {os.getpid()})"


def run_task(work: Callable[..., Any], progress_arg: str | None, sink: Any, tag: str, args: tuple,
             kwargs: dict) -> tuple[Any, str, float]:
    """What every Ray task runs: the library function `work(*args, **kwargs, <progress_arg>=...)`
    -> (its result, the worker, the seconds)."""
    relay = _Relay(sink, tag, worker_name())
    relay(None)     # an attempt started (the driver counts attempts and names the worker)
    relay.flush()
    t0 = time.monotonic()
    try:
        result = work(*args, **kwargs, **({progress_arg: relay} if progress_arg else {}))
    finally:
        relay.flush()
    return result, relay.worker, time.monotonic() - t0


def imatrix_work(plan: ImatrixPlan, threads: int, *, on_progress: Progress) -> Path:
    """run_imatrix on this worker: the plan's scratch names made for this process, `threads` threads."""
    return run_imatrix(plan.for_process(threads=threads), on_progress=on_progress)


# --------------------------------------------------------------------------- on the driver

@dataclass
class _Task:
    phase: str
    target: str                       # the file it makes: named in the summary and in errors
    call: tuple                       # (library function, its progress argument's name, args, kwargs)
    opts: dict                        # Ray's: num_cpus, memory, num_gpus, retries
    output: Path | None = None        # a tier's final name: its partials go when the task is lost
    ref: Any = None
    worker: str = "?"
    attempts: int = 0
    t0: float = 0.0

    @property
    def tag(self) -> str:
        return f"{self.phase} {self.target}"


class RayExecutor:
    """Runs the release's tasks on a Ray cluster (see the module docstring)."""

    name = "ray"

    def __init__(self, ray: Any, resources: ResourcesConfig, owns_connection: bool):
        self.ray = ray
        self.resources = resources
        self.owns_connection = owns_connection
        self.records: list[TaskRecord] = []
        self._remote = ray.remote(run_task)
        self._tasks: dict[str, _Task] = {}
        self._restore_messages: Callable[[], None] = lambda: None
        self.sink = ray.remote(num_cpus=0)(_Sink).options(**_near_driver(ray)).remote()

    @classmethod
    def connect(cls, address: str | None, *, progress: Progress | None = None,
                resources: ResourcesConfig | None = None) -> "RayExecutor":
        ray = import_ray()
        say = progress or (lambda _m: None)
        named = address or settings.ray_address() or "this machine (started with `ray start`)"
        owns = not ray.is_initialized()
        if owns:
            # Workers get this process's settings, so they use the same caches and llama.cpp.
            env = settings.worker_environment(configured_bin_dir())
            main = threading.current_thread() is threading.main_thread()
            sigterm = signal.getsignal(signal.SIGTERM) if main else None
            try:
                _check_reachable(address)
                # "auto": RAY_ADDRESS if set (Ray reads it), else the cluster `ray start` started here;
                # never a new cluster of our own.
                with warnings.catch_warnings():   # Ray Client's own warnings: the error below says it once
                    warnings.simplefilter("ignore")
                    ray.init(address=address or "auto", runtime_env={"env_vars": env}, log_to_driver=False,
                             logging_level=logging.WARNING)
            except Exception as exc:   # noqa: BLE001 - ConnectionError, a bad address, a version mismatch
                raise ExecutorError(f"cannot reach the Ray cluster at {named}: {_first_line(exc)}",
                                    hint="start it (`ray start --head`, docs/distributed.md), check the address, "
                                         "or run on this machine (the local executor)", options=("executor",)) from None
            finally:
                if sigterm is not None:   # ray.init replaces it with sys.exit; ours cleans up first
                    signal.signal(signal.SIGTERM, sigterm)
        ex = cls(ray, resources or ResourcesConfig(), owns)
        ex._restore_messages = _route_ray_messages(say)
        nodes = _alive_nodes(ray)
        cpus = sum(n.get("Resources", {}).get("CPU", 0) for n in nodes)
        say(f"executor: Ray cluster at {named} ({len(nodes)} node(s), {cpus:g} CPUs)")
        return ex

    # ---- the Executor protocol
    def imatrix(self, plan: ImatrixPlan, *, progress: Progress) -> Path:
        memory = sum(p.stat().st_size for p in shard_paths(plan.model_path))
        call: tuple[Any, ...] = (imatrix_work, "on_progress", (plan, self.resources.cpus), {})
        task = self._task("imatrix", plan.cache_path.name, call, memory, gpu=True)
        return self._run([task], progress)[0]

    def quantize(self, jobs: list[QuantizeJob], *, force: bool, parallel: int | None,
                 progress: Progress) -> list[QuantizeResult]:
        """Every tier at once (`parallel` is the local executor's: Ray places tasks by their resources)."""
        check_distinct_outputs([(j.profile.tier, j.output) for j in jobs])
        tasks = []
        for job in jobs:
            _ = job.key   # the source's sha256: computed here once, not on every worker
            remote_job = copy.copy(job)
            remote_job.threads = self.resources.cpus
            call = (run_quantize, "progress", (remote_job,), {"force": force})
            tasks.append(self._task("quantize", job.output.name, call, job.memory_bytes, output=job.output))
        results = self._run(tasks, progress)
        for job, result in zip(jobs, results):
            if job.trust_tool_plan:
                job.replace_plan(result.job.plan)   # the worker took the tool's types as the plan
            result.job = job   # the phase matches results to its own jobs
        return results

    def base_cache(self, base: ModelFacts, text: TextFacts, settings_: EvalSettings, *, progress: Progress) -> Path:
        call: tuple[Any, ...] = (ensure_base_cache, "progress", (base, text, self._threads(settings_)), {})
        task = self._task("eval-base", Path(base.path).name, call, base.size_bytes, gpu=True)
        return self._run([task], progress)[0]

    def evaluate(self, plans: list[EvalPlan], *, progress: Progress,
                 on_result: OnResult | None = None) -> list[EvalResult]:
        tasks = [self._task("eval", Path(p.model.path).name,
                            (run_eval, "progress", (dataclasses.replace(p, settings=self._threads(p.settings)),), {}),
                            p.model.size_bytes, gpu=True) for p in plans]
        return self._run(tasks, progress, on_result)

    def close(self) -> None:
        self._restore_messages()
        try:
            self.ray.kill(self.sink)
        except Exception:   # noqa: BLE001 - already gone with the cluster
            pass
        if self.owns_connection:
            self.ray.shutdown()

    # ---- submitting and waiting
    def _threads(self, s: EvalSettings) -> EvalSettings:
        return dataclasses.replace(s, n_threads=self.resources.cpus)

    def _task(self, phase: str, target: str, call: tuple, memory: int, *, gpu: bool = False,
              output: Path | None = None) -> _Task:
        r = self.resources
        opts: dict[str, Any] = {"num_cpus": r.cpus, "memory": int(r.memory or memory), "max_retries": MAX_RETRIES,
                                "retry_exceptions": False, "name": f"apex-orch {phase} {target}"}
        if gpu and r.gpus:
            opts["num_gpus"] = r.gpus
        return _Task(phase, target, call, opts, output=output)

    def _run(self, tasks: list[_Task], progress: Progress, on_result: OnResult | None = None) -> list:
        """Check that every task fits a node, submit them all, wait for them all."""
        nodes = [n.get("Resources", {}) for n in _alive_nodes(self.ray)]
        for task in tasks:
            need = {"CPU": task.opts["num_cpus"], "memory": task.opts["memory"], "GPU": task.opts.get("num_gpus", 0)}
            # Ray would wait forever for a task no node can hold. (No node list: let Ray place it.)
            if nodes and not any(all(n.get(k, 0) >= v for k, v in need.items()) for n in nodes):
                biggest = max(nodes, key=lambda n: (n.get("CPU", 0), n.get("memory", 0)))
                raise ExecutorError(
                    f"{task.target}: the {task.phase} task needs {_describe(need)} and no node of the Ray cluster "
                    f"has that much (the largest: {_describe(biggest)})",
                    hint="add a bigger worker, or lower `resources:` (cpus, gpus, memory) in the release config")
        for task in tasks:
            task.t0 = time.monotonic()
            work, progress_arg, args, kwargs = task.call
            task.ref = self._remote.options(**task.opts).remote(work, progress_arg, self.sink, task.tag, args, kwargs)
            self._tasks[task.tag] = task
        return self._wait(tasks, progress, on_result)

    def _wait(self, tasks: list[_Task], progress: Progress, on_result: OnResult | None = None) -> list:
        """Every task's result, in order; the first failure (in order) raised once all have ended."""
        ray = self.ray
        index = {t.ref: i for i, t in enumerate(tasks)}
        results: list[Any] = [None] * len(tasks)
        records: dict[int, TaskRecord] = {}
        failures: dict[int, BaseException] = {}
        pending = [t.ref for t in tasks]
        try:
            while pending:
                ready, pending = ray.wait(pending, num_returns=1, timeout=1.0)
                self._drain(progress)
                for ref in ready:
                    i = index[ref]
                    task = tasks[i]
                    try:
                        value, task.worker, seconds = ray.get(ref)
                    except Exception as exc:   # noqa: BLE001 - translated below
                        self._drain(progress)
                        failures[i], records[i] = self._failed(task, exc, progress)
                        continue
                    results[i] = value
                    records[i] = TaskRecord(task.phase, task.target, task.worker, seconds, max(1, task.attempts))
                    if on_result is not None:
                        on_result(i, value)
        except KeyboardInterrupt:
            self._cancel([tasks[index[r]] for r in pending], progress)
            raise InterruptedRun("release interrupted; the cluster's tasks were cancelled and their partial "
                                 "outputs removed", hint="rerun the same command: finished work is kept") from None
        finally:
            self.records.extend(records[i] for i in sorted(records))   # in task order, not finishing order
        self._drain(progress)
        if failures:
            raise failures[min(failures)]
        return results

    def _drain(self, progress: Progress) -> None:
        try:
            items = self.ray.get(self.sink.drain.remote(), timeout=30)
        except Exception:   # noqa: BLE001 - progress only: the tasks' results still arrive
            return
        for tag, worker, line in items:
            task = self._tasks.get(tag)
            short = worker.split(" ")[0] + ":" + worker.rsplit("pid ", 1)[-1].rstrip(")")
            if line is None:
                if task is not None:
                    task.attempts += 1
                    task.worker = worker
                    again = f" (attempt {task.attempts}: the previous worker was lost)" if task.attempts > 1 else ""
                    progress(f"{tag}: on {worker}{again}")
            elif line.startswith("["):
                progress(f"[{short}] {line}")
            else:
                progress(f"({short}) {line}")

    def _failed(self, task: _Task, exc: BaseException, progress: Progress) -> tuple[BaseException, TaskRecord]:
        """The error to raise for a task that ended without a result, and its record."""
        cause = getattr(exc, "cause", None) if isinstance(exc, self.ray.exceptions.RayTaskError) else None
        if isinstance(cause, ApexError):   # apex-orch's own error on the worker: not retried, raised as is
            error: BaseException = cause
            if task.target not in cause.render():
                cause.message = f"{task.target}: {cause.message}"
                cause.args = (cause.message,)
            status = "failed"
        elif cause is not None and not isinstance(cause, self.ray.exceptions.RayError):
            error, status = cause, "failed"   # a bug on the worker: the CLI reports it as unexpected
        else:   # the task's worker died on every attempt (killed, out of memory, node lost) or Ray gave up
            status = "lost"
            if task.output is not None:
                self._remove_partials(task.output, progress)
            error = ExecutorError(
                f"{task.target}: the {task.phase} task did not finish on the Ray cluster "
                f"({max(1, task.attempts)} attempt(s), the last on {task.worker}): {_first_line(exc)}",
                hint="a worker died or ran out of memory on every attempt; its partial files were removed. Check the "
                     "cluster (`ray status`), then rerun the same command: finished work is kept")
        progress(f"{task.tag}: {status} on {task.worker}: {_first_line(error)}")
        return error, TaskRecord(task.phase, task.target, task.worker, time.monotonic() - task.t0,
                                 max(1, task.attempts), status)

    def _cancel(self, tasks: list[_Task], progress: Progress) -> None:
        """Ctrl-C/SIGTERM here: each task gets KeyboardInterrupt (the library cleans up), then partials go."""
        try:
            for t in tasks:
                self.ray.cancel(t.ref)
            self.ray.wait([t.ref for t in tasks], num_returns=len(tasks), timeout=30)
        except Exception:   # noqa: BLE001 - finished or gone meanwhile
            pass
        for t in tasks:
            if t.output is not None:
                self._remove_partials(t.output, progress)

    @staticmethod
    def _remove_partials(output: Path, progress: Progress) -> None:
        """Take and release the output's lock: under it, any partial of the output is a dead run's."""
        try:
            with OutputGuard(output, force=True) as guard:
                removed = list(guard.cleaned_stale)
        except ApexError as exc:   # still held by a live writer (LockedError), or the folder is gone
            progress(f"{output.name}: partial files not removed ({_first_line(exc)})")
            return
        for p in removed:
            progress(f"removed a partial file left by a lost task: {p.name}")


def _route_ray_messages(progress: Progress) -> Callable[[], None]:
    """What the cluster reports (a worker died, a retry) into the log, not onto stdout, where the summary
    goes (a private hook of the pinned Ray; absent: left alone). Returns what puts Ray's printer back."""
    try:
        from ray._private import worker as ray_worker
        original = ray_worker.print_to_stdstream
    except (ImportError, AttributeError):
        return lambda: None

    def to_log(data: dict, ignore_prefix: bool = False) -> None:
        for line in data.get("lines", []):
            text = _ANSI.sub("", str(line)).strip()
            if text:
                progress(f"(ray) {text[:300]}")
    ray_worker.print_to_stdstream = to_log
    return lambda: setattr(ray_worker, "print_to_stdstream", original)


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


CONNECT_TIMEOUT_S = 5.0


def _check_reachable(address: str | None) -> None:
    """ray.init retries for many minutes where nothing listens (and Ray Client for half a minute, with a
    warning of its own): try the port first, so an unreachable address fails in seconds."""
    if address is None:
        address = settings.ray_address()
    if address is None or address == "auto":
        from ray._private.services import canonicalize_bootstrap_address   # RAY_ADDRESS, else `ray start`'s
        address = canonicalize_bootstrap_address("auto")
    if address is None:
        return
    if address.startswith("ray://"):
        address = address[len("ray://"):]
    elif "://" in address:
        return   # another scheme: Ray's own
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        return
    socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT_S).close()


def _near_driver(ray: Any) -> dict:
    """Scheduling options that keep the sink on the driver's node (if that node is lost, so is the run)."""
    try:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
        node = ray.get_runtime_context().get_node_id()
        # hard: a soft affinity lets Ray put it on a worker (seen with 2 of 3 runs), whose death loses it
        return {"scheduling_strategy": NodeAffinitySchedulingStrategy(node, soft=False)} if node else {}
    except Exception:   # noqa: BLE001 - Ray Client: wherever Ray puts it
        return {}


def _alive_nodes(ray: Any) -> list[dict]:
    try:
        return [n for n in ray.nodes() if n.get("Alive")]
    except Exception:   # noqa: BLE001
        return []


def _describe(r: dict) -> str:
    gpus = f", {r['GPU']:g} GPU(s)" if r.get("GPU") else ""
    return f"{r.get('CPU', 0):g} CPU(s), {r.get('memory', 0) / 2**30:.1f} GiB of memory{gpus}"


def _first_line(exc: BaseException) -> str:
    text = exc.render() if isinstance(exc, ApexError) else f"{type(exc).__name__}: {exc}"
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__
