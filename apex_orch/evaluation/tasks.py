"""Task accuracy through llama-perplexity's own scorers: HellaSwag, Winogrande, multiple choice.

Takes: a model, task specs (`hellaswag=FILE,winogrande=FILE,mmlu`), `TaskSettings`.
Gives: `parse_task_specs`, `plan_tasks` (every file read and checked, the counts resolved,
nothing run), `run_tasks` (one `TaskResult` per task, each cached by (model sha256, data sha256,
task count, settings, llama.cpp build)) and `evaluate_tasks` (both in one call).

How the pinned tool scores (tools/perplexity/perplexity.cpp), so what the numbers mean:
every candidate is the context + " " + ending (Winogrande: the sentence with the option in
place of "_") tokenized with BOS; the tokens all candidates share are decoded once, each
candidate's own tokens after them; a candidate's score is the mean log-probability of its own
tokens (HellaSwag, multiple choice: from the first token after the shared prefix to the last;
Winogrande: the words after the option, without the final token, when both candidates have
more than 3 tokens after the shared prefix, else from the shared prefix on). The highest score
is the model's answer (ties: the first). HellaSwag draws its tasks at random (std::mt19937
seeded 1) even when it scores all of them; Winogrande and multiple choice draw a subset the
same way only when fewer tasks than the file holds are asked for.

What it prints and we read, by record: one line per scored task with the running accuracy
(HellaSwag adds the Wilson 95% interval; Winogrande both candidates' scores, the model's answer
and the right one), then for Winogrande (>= 100 tasks) "Final Winogrande score(N tasks): A +/- E"
and for multiple choice "Final result: A +/- E" with E = 100 sqrt(p(1-p)/(N-1)). The accuracy we
report is what the APEX pipeline takes: the last task line (HellaSwag, Winogrande) or the
final result (multiple choice). The tool's count of tasks read must equal our reader's, and
the task lines must run 1..N: the pinned tool can lose its last log lines at exit, so a run
without them is run again (tool_backend.run_tool_logged).

Settings: `-c 4096` per sequence and `-np 16` for multiple choice, as the APEX pipeline runs
them; the tool makes its context n_parallel x ctx and keeps a logits buffer of that many rows
of the vocabulary (4 x 4096 x 131072 x 4 bytes = 8 GiB for the flagship's HellaSwag), so
`--task-ctx` can lower it (a task must fit in one sequence's ctx tokens).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Iterable, Mapping

from apex_orch.core.errors import EvalError, TaskError
from apex_orch.core.safefiles import check_not_inputs, write_atomic
from apex_orch.evaluation import base_cache, task_data
from apex_orch.evaluation.inputs import EvalSettings, ModelFacts, Progress, default_threads, model_facts
from apex_orch.evaluation.results import TaskResult
from apex_orch.evaluation.task_files import (HELLASWAG, MULTIPLE_CHOICE, WINOGRANDE, TaskKind, TaskSet,
                                             read_task_bytes, read_task_set, task_kind)
from apex_orch.evaluation.tool_backend import run_tool_logged, work_root
from apex_orch.llama.tools import build_label, find_tool
from apex_orch.model.info import shard_paths

DEFAULT_TASK_CTX = 4096      # the APEX pipeline's -c for the scorers
MC_PARALLEL = 16             # the APEX pipeline's -np for --multiple-choice
TOOL_MIN_PARALLEL = 4        # the tool's own floor for the task scorers
CACHE_FORMAT, CACHE_VERSION = "apex-orch-task-result", 1

_FLAGS = {HELLASWAG: ("-f", "--hellaswag", "--hellaswag-tasks"),
          WINOGRANDE: ("-f", "--winogrande", "--winogrande-tasks"),
          MULTIPLE_CHOICE: ("-bf", "--multiple-choice", "--multiple-choice-tasks")}
_NUM = r"(-?(?:\d+(?:\.\d*)?(?:[eE][-+]?\d+)?|nan|inf))"
_LINES = {HELLASWAG: re.compile(r"^(\d+)\t" + _NUM + r"%\t\[" + _NUM + r"%, " + _NUM + r"%\]$"),
          WINOGRANDE: re.compile(r"^(\d+)\t" + _NUM + r"\t\s*" + _NUM + r"\s+" + _NUM + r"\s+([12])\s+([12])$"),
          MULTIPLE_CHOICE: re.compile(r"^(\d+)\t" + _NUM + r"$")}
_LOADED = {HELLASWAG: re.compile(r"hellaswag_score : loaded (\d+) tasks"),
           WINOGRANDE: re.compile(r"winogrande_score : loaded (\d+) tasks"),
           MULTIPLE_CHOICE: re.compile(r"there are (\d+) tasks in prompt")}
_WG_FINAL = re.compile(r"Final Winogrande score\((\d+) tasks\): " + _NUM + r" \+/- " + _NUM)
_MC_FINAL = re.compile(r"Final result: " + _NUM + r" \+/- " + _NUM)
_MC_CHANCE = re.compile(r"Random chance: " + _NUM + r" \+/- " + _NUM)
_NO_FIT = re.compile(r"task (\d+) does not fit in the context window \(requires (\d+) tokens\)")
_TOOL_ERRORS = re.compile(r"not a multiple of 6|no tasks|failed to read task|found bad task|found empty answer|"
                          r"malformed tasks|requires a higher -np|llama_decode\(\) failed|failed to decode")


# --------------------------------------------------------------------------- settings and specs

@dataclass(frozen=True)
class TaskSettings:
    """What llama-perplexity's scorers run with. Threads change only the speed."""
    n_ctx: int = DEFAULT_TASK_CTX      # tokens per sequence (-c); the tool's context is n_parallel x this
    n_batch: int = 2048                # -b (the tool's default)
    n_ubatch: int = 512                # -ub
    n_threads: int = field(default_factory=default_threads)
    flash_attn: bool = True
    repack: bool = False

    def __post_init__(self) -> None:
        if min(self.n_ctx, self.n_batch, self.n_ubatch, self.n_threads) < 1:
            raise TaskError(f"task settings must be positive: ctx {self.n_ctx}, batch {self.n_batch}, "
                            f"ubatch {self.n_ubatch}, threads {self.n_threads}")

    @classmethod
    def from_eval(cls, s: EvalSettings, n_ctx: int = DEFAULT_TASK_CTX) -> "TaskSettings":
        """The evaluation's threads, ubatch, flash attention and repack; the scorers' own ctx and batch."""
        return cls(n_ctx=n_ctx, n_ubatch=s.n_ubatch, n_threads=s.n_threads, flash_attn=s.flash_attn,
                   repack=s.repack)

    def parallel(self, scorer: str, max_answers: int) -> int:
        return max(MC_PARALLEL, max_answers) if scorer == MULTIPLE_CHOICE else TOOL_MIN_PARALLEL

    def numeric(self, scorer: str, max_answers: int) -> dict:
        """The settings that change the numbers (the batch layout), as the tool will use them."""
        n_par = self.parallel(scorer, max_answers)
        return {"n_ctx": self.n_ctx, "n_parallel": n_par, "n_batch": min(self.n_batch, n_par * self.n_ctx),
                "n_ubatch": self.n_ubatch, "flash_attn": self.flash_attn, "repack": self.repack}


@dataclass(frozen=True)
class TaskSpec:
    task: str                   # a TASK_KINDS name
    path: str | None = None     # None: the pinned Hub file
    limit: int | None = None    # None: the task's default count; 0: every task in the file


def parse_task_specs(text: str | Iterable[str], counts: Mapping[str, int] | None = None) -> list[TaskSpec]:
    """`hellaswag=FILE,winogrande=FILE,mmlu` (a string or several) as TaskSpecs; `counts`: task
    name -> how many tasks to score (0: all)."""
    items = [text] if isinstance(text, str) else list(text)
    specs: list[TaskSpec] = []
    for item in items:
        for part in item.split(","):
            if not part.strip():
                raise TaskError(f"empty entry in {item!r}", hint="write NAME or NAME=FILE, separated by commas")
            name, eq, path = part.partition("=")
            kind = task_kind(name)
            if eq and not path.strip():
                raise TaskError(f"{kind.name}= names no file", hint=f"write {kind.name}=FILE, or {kind.name} alone")
            if any(s.task == kind.name for s in specs):
                raise TaskError(f"{kind.name} is given twice")
            specs.append(TaskSpec(kind.name, path if eq else None))
    for name, n in (counts or {}).items():
        kind = task_kind(name)
        if n < 0:
            raise TaskError(f"{kind.name}: a task count of {n}; give a count >= 1, or 0 for all")
        if not any(s.task == kind.name for s in specs):
            raise TaskError(f"a count is given for {kind.name}, which is not among the tasks")
        specs = [replace(s, limit=n) if s.task == kind.name else s for s in specs]
    return specs


# --------------------------------------------------------------------------- plan

@dataclass
class PlannedTask:
    spec: TaskSpec
    kind: TaskKind
    set: TaskSet | None                 # None: pinned data not fetched yet
    source: task_data.TaskSource | None

    @property
    def n_tasks(self) -> int | None:
        if self.set is None:
            return None
        avail = self.set.file.n_tasks
        limit = self.kind.default_limit if self.spec.limit is None else self.spec.limit
        return avail if not limit else min(limit, avail)

    def resolve(self) -> TaskSet:
        if self.set is None:
            path, source = task_data.fetch(self.kind.name, self.source)
            self.set = read_task_set(self.kind, path, label=source.label)
        return self.set


@dataclass(frozen=True)
class TaskCost:
    """What one task set costs llama-perplexity, computed from the file and the model's tokenizer."""
    n_tasks: int
    tokens: int                 # tokens decoded: per task the shared prefix once and every candidate's own tokens
    logit_rows: int             # rows of n_vocab log-softmax it computes
    longest: int                # the largest task (it must fit the tool's context, n_parallel x ctx)
    n_vocab: int
    logits_buffer_bytes: int    # the tool's buffer: n_parallel x ctx rows of n_vocab floats


def _candidates(task) -> list[str]:
    if hasattr(task, "endings"):
        return [task.context + " " + e for e in task.endings]
    if hasattr(task, "choices"):
        first, second = task.parts
        return [first + c + second for c in task.choices]
    return [task.question + " " + a for a in task.answers]


def task_cost(model_path: str | os.PathLike, tset: TaskSet, n_tasks: int, settings: TaskSettings) -> TaskCost:
    """Tokens the tool decodes for `n_tasks` of the set (a subset drawn at random: the file's mean
    per task times n_tasks), with the model's own tokenizer (vocabulary only, no weights)."""
    from apex_orch.evaluation.session import BindingsModel
    per_task, rows = [], []
    with BindingsModel(model_path, vocab_only=True) as bm:
        for task in tset.tasks:
            seqs = [bm.tokenize(c.encode("utf-8")).tolist() for c in _candidates(task)]
            cp = 0
            while cp < min(map(len, seqs)) and len({s[cp] for s in seqs}) == 1:
                cp += 1
            own = [len(s) - cp for s in seqs]
            per_task.append(cp + sum(own))
            rows.append(1 + sum(own) - (0 if tset.file.scorer == WINOGRANDE else len(seqs)))
        n_vocab = bm.n_vocab
    scale = n_tasks / len(per_task)
    n_par = settings.parallel(tset.file.scorer, tset.file.max_answers)
    return TaskCost(n_tasks, round(sum(per_task) * scale), round(sum(rows) * scale), max(per_task), n_vocab,
                    n_par * settings.n_ctx * n_vocab * 4)


@dataclass
class TaskPlan:
    model: ModelFacts
    settings: TaskSettings
    tasks: list[PlannedTask]

    def describe(self, cost: bool = True) -> str:
        s = self.settings
        lines = [f"tasks    llama-perplexity, ctx {s.n_ctx} per sequence, batch {s.n_batch}, ubatch {s.n_ubatch}, "
                 f"threads {s.n_threads}, flash-attn {'on' if s.flash_attn else 'off'}, "
                 f"repack {'on' if s.repack else 'off'}"]
        for t in self.tasks:
            if t.set is None:
                lines.append(f"  {t.kind.title}: {t.source.label} (sha256 {t.source.sha256[:12]}, will be fetched)")
                continue
            f = t.set.file
            lines.append(f"  {t.kind.title}: {t.n_tasks} of {f.n_tasks} tasks from {f.label} (sha256 {f.sha256[:12]}), "
                         f"--{t.kind.scorer}, -np {s.parallel(f.scorer, f.max_answers)}")
            if cost:
                c = task_cost(self.model.path, t.set, t.n_tasks, s)
                fits = c.longest <= s.parallel(f.scorer, f.max_answers) * s.n_ctx
                lines.append(f"    cost: ~{c.tokens:,} tokens decoded, ~{c.logit_rows:,} log-softmax rows of "
                             f"{c.n_vocab:,}; "
                             f"the tool's logits buffer {c.logits_buffer_bytes / 2**30:.2f} GiB; largest task "
                             f"{c.longest} tokens{'' if fits else ' (does NOT fit: raise the task context)'}")
            lines += [f"    note: {n}" for n in f.notes]
        return "\n".join(lines)


def plan_tasks(model: str | os.PathLike | ModelFacts, specs: Iterable[TaskSpec],
               settings: TaskSettings | None = None) -> TaskPlan:
    """Read and check every task file (pinned data from the cache when it is there); run nothing."""
    facts = model if isinstance(model, ModelFacts) else model_facts(model, fingerprint=False)
    planned = []
    for spec in specs:
        kind = task_kind(spec.task)
        if spec.path is not None:
            planned.append(PlannedTask(spec, kind, read_task_set(kind, spec.path), None))
            continue
        source = task_data.pinned_source(kind.name)
        cached, tset = task_data.cached_path(source), None
        if cached.is_file():
            data = read_task_bytes(cached)
            if hashlib.sha256(data).hexdigest() == source.sha256:     # else damaged: fetched again at run time
                tset = read_task_set(kind, cached, label=source.label, data=data)
        planned.append(PlannedTask(spec, kind, tset, source))
    if not planned:
        raise TaskError("no tasks given", hint="e.g. hellaswag=FILE,winogrande=FILE,mmlu=FILE", options=("tasks",))
    return TaskPlan(facts, settings or TaskSettings(), planned)


# --------------------------------------------------------------------------- run

def tool_argv(model: str, path: str, scorer: str, n_tasks: int, max_answers: int, s: TaskSettings) -> list[str]:
    file_flag, flag, count_flag = _FLAGS[scorer]
    argv = [str(find_tool("llama-perplexity").path), "-m", model, file_flag, path, flag, count_flag, str(n_tasks),
            "-c", str(s.n_ctx), "-np", str(s.parallel(scorer, max_answers)), "-b", str(s.n_batch),
            "-ub", str(s.n_ubatch), "-t", str(s.n_threads), "-fa", "on" if s.flash_attn else "off", "-fit", "off"]
    return argv + ([] if s.repack else ["-nr"])


def _task_lines(lines: list[str], scorer: str) -> list[re.Match]:
    return [m for m in (_LINES[scorer].match(line.strip()) for line in lines) if m]


def _expects_final(scorer: str, n_tasks: int, n_available: int) -> bool:
    if scorer == WINOGRANDE:
        return n_tasks >= 100
    return scorer == MULTIPLE_CHOICE and not (n_tasks < 100 and n_tasks < n_available)


def _complete(scorer: str, n_tasks: int, n_available: int):
    final = {WINOGRANDE: _WG_FINAL, MULTIPLE_CHOICE: _MC_FINAL}.get(scorer)

    def check(lines: list[str]) -> bool:
        if any(_NO_FIT.search(x) or _TOOL_ERRORS.search(x) for x in lines):
            return True                       # an error the tool only logs: reported by _parse
        if len(_task_lines(lines, scorer)) != n_tasks:
            return False
        return not _expects_final(scorer, n_tasks, n_available) or any(final.search(x) for x in lines)
    return check


def _parse(lines: list[str], planned: PlannedTask, n_tasks: int, model: str, settings: TaskSettings) -> TaskResult:
    kind, f = planned.kind, planned.set.file
    for line in lines:
        m = _NO_FIT.search(line)
        if m:
            n_par = settings.parallel(f.scorer, f.max_answers)
            raise TaskError(f"{kind.title}: a task needs {m.group(2)} tokens, more than the scorer's context of "
                            f"{n_par * settings.n_ctx} ({n_par} sequences x {settings.n_ctx})", where=f.label,
                            hint="raise the task context (the tool's memory grows with it) or drop that task",
                            options=("task_ctx",))
        if _TOOL_ERRORS.search(line):
            raise TaskError(f"{kind.title}: llama-perplexity refused the task file: {line.strip()}", where=f.label)
    loaded = next((int(m.group(1)) for m in map(_LOADED[kind.scorer].search, lines) if m), None)
    if loaded != f.n_tasks:
        raise EvalError(f"{kind.title}: llama-perplexity read {loaded} tasks from the file, apex-orch's reader "
                        f"{f.n_tasks}", where=f.label,
                        hint="a bug in apex-orch's reader of this format: please report it")
    rows = _task_lines(lines, kind.scorer)
    if [int(m.group(1)) for m in rows] != list(range(1, n_tasks + 1)):
        raise EvalError(f"{kind.title}: llama-perplexity printed {len(rows)} task lines, expected 1..{n_tasks}",
                        where=model)
    if kind.scorer == WINOGRANDE:
        outcomes = "".join("1" if m.group(5) == m.group(6) else "0" for m in rows)
    else:       # the running accuracy gives each task's outcome
        counts = [round(float(m.group(2)) * (i + 1) / 100.0) for i, m in enumerate(rows)]
        steps = [c - p for c, p in zip(counts, [0] + counts[:-1])]
        if any(d not in (0, 1) for d in steps):
            raise EvalError(f"{kind.title}: the running accuracies llama-perplexity printed are inconsistent",
                            where=model)
        outcomes = "".join(map(str, steps))
    last = rows[-1]
    accuracy, error, ci95, chance = float(last.group(2)), None, None, None
    if kind.scorer == HELLASWAG:
        ci95 = (float(last.group(3)), float(last.group(4)))
    elif kind.scorer == WINOGRANDE:
        m = next(filter(None, map(_WG_FINAL.search, lines)), None)
        error = float(m.group(3)) if m else None
    else:
        m = next(filter(None, map(_MC_FINAL.search, lines)), None)
        if m:
            accuracy, error = float(m.group(1)), float(m.group(2))
        c = next(filter(None, map(_MC_CHANCE.search, lines)), None)
        chance = float(c.group(1)) if c else None
    if abs(100.0 * outcomes.count("1") / n_tasks - accuracy) > 0.01:
        raise EvalError(f"{kind.title}: {outcomes.count('1')} of {n_tasks} right, but the tool printed {accuracy}%",
                        where=model)
    notes = list(f.notes)
    if error is None and kind.scorer != HELLASWAG:
        notes.append("llama-perplexity prints no error estimate below 100 tasks")
    return TaskResult(task=kind.name, title=kind.title, scorer=kind.scorer, accuracy=accuracy, n_tasks=n_tasks,
                      n_available=f.n_tasks, data=f.label, data_sha256=f.sha256,
                      settings={**settings.numeric(kind.scorer, f.max_answers), "n_threads": settings.n_threads},
                      error=error, ci95=ci95, random_chance=chance, outcomes=outcomes, llama_build=build_label(),
                      notes=notes)


def _cache_inputs(model: ModelFacts, planned: PlannedTask, n_tasks: int, settings: TaskSettings) -> dict:
    f = planned.set.file
    return {"format": CACHE_FORMAT, "version": CACHE_VERSION, "model": model.fingerprint, "task": f.task,
            "scorer": f.scorer, "data_sha256": f.sha256, "n_tasks": n_tasks,
            "settings": settings.numeric(f.scorer, f.max_answers), "llama": build_label()}


def cache_path(inputs: dict) -> Path:
    return base_cache.cache_dir() / "tasks" / f"{base_cache.cache_key(inputs)[:24]}.json"


def _cached(path: Path, inputs: dict) -> TaskResult | None:
    from apex_orch.core.errors import ApexError
    from apex_orch.core.infiles import read_json
    if not path.is_file():
        return None
    try:
        doc = read_json(path, "record")
        if not isinstance(doc, dict) or doc.get("inputs") != inputs:
            return None
        return replace(TaskResult.from_dict(doc["result"]), cached=True)
    except (ApexError, ValueError, KeyError, TypeError):
        return None                           # damaged or another entry's: computed again


def run_task(model: ModelFacts, planned: PlannedTask, settings: TaskSettings, *, progress: Progress | None = None,
             refresh: bool = False) -> TaskResult:
    """One task set on one model: the cached result, else llama-perplexity's."""
    say = progress or (lambda _m: None)
    tset = planned.resolve()
    n_tasks = planned.n_tasks
    if not model.fingerprint:
        model = model_facts(model.path)
    inputs = _cache_inputs(model, planned, n_tasks, settings)
    path = cache_path(inputs)
    check_not_inputs([path], [*shard_paths(Path(model.path)), Path(tset.file.path)],
                     what="eval cache folder (APEX_ORCH_EVAL_CACHE)", options=())
    if not refresh and (hit := _cached(path, inputs)) is not None:
        return replace(hit, data=tset.file.label)
    say(f"{planned.kind.title}: llama-perplexity --{planned.kind.scorer} on {Path(model.path).name} "
        f"({n_tasks} of {tset.file.n_tasks} tasks)")
    t0 = time.monotonic()
    argv = tool_argv(model.path, tset.file.path, tset.file.scorer, n_tasks, tset.file.max_answers, settings)
    with tempfile.TemporaryDirectory(prefix="apex-tasks-", dir=work_root()) as work:
        lines = run_tool_logged(argv, planned.kind.name, Path(work),
                                _complete(tset.file.scorer, n_tasks, tset.file.n_tasks))
    result = _parse(lines, planned, n_tasks, model.path, settings)
    result.seconds = time.monotonic() - t0
    write_atomic(path, json.dumps({"format": CACHE_FORMAT, "version": CACHE_VERSION, "inputs": inputs,
                                   "result": asdict(result)}, indent=1) + "\n")
    return result


def run_tasks(plan: TaskPlan, *, progress: Progress | None = None) -> list[TaskResult]:
    model = plan.model if plan.model.fingerprint else model_facts(plan.model.path)
    return [run_task(model, t, plan.settings, progress=progress) for t in plan.tasks]


def evaluate_tasks(model: str | os.PathLike, specs: Iterable[TaskSpec] | str, settings: TaskSettings | None = None,
                   *, progress: Progress | None = None) -> list[TaskResult]:
    """One call: plan and run the task sets on `model`."""
    specs = parse_task_specs(specs) if isinstance(specs, str) else list(specs)
    return run_tasks(plan_tasks(model, specs, settings), progress=progress)
