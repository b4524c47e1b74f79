"""`compare`: several files against one base, one table, one Pareto plot.

Every file is evaluated with the same text and settings against one base-logits cache (the
bindings backend computes it once; the llama-perplexity backend makes the tool's own base file
once per call). The table has one row per file plus the base itself; task sets (`tasks`) add a
column each (accuracy and llama-perplexity's error estimate, for the base too), `speed` adds
llama-bench's pp512 / tg128 (mean ± sd).

`baselines` are files measured the same way but marked as baselines (other quantizations of the
same model to hold the files against): a file that a baseline no larger than it beats on mean KLD
beyond the error estimates (evaluation.baselines) is marked with † and the table says so in a
sentence ("Q4_K_M is smaller and closer to the source than ...").

`eval_table(source, outputs)` is the one-call version the quantize demo prints.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

from apex_orch.core.errors import GateFailedError, RequestError
from apex_orch.core.outputs import write_output
from apex_orch.core.text import binary_size
from apex_orch.evaluation.base_cache import BaseLogProbs
from apex_orch.evaluation.baselines import Point, closer_baselines, closer_sentence
from apex_orch.evaluation.evaluate import SPEED_REPETITIONS, ensure_base_cache, plan_eval, run_eval
from apex_orch.evaluation.gates import check_gates, gate_failures
from apex_orch.evaluation.inputs import EvalSettings, ModelFacts, Progress, TextFacts, model_facts, text_facts
from apex_orch.evaluation.plot import FORMATS as PLOT_FORMATS
from apex_orch.evaluation.plot import PlotPoint, kld_size_plot, pareto_front  # noqa: F401  (pareto_front: API)
from apex_orch.evaluation.results import EvalResult, SpeedResult, TaskResult
from apex_orch.evaluation.speed import measure_speed
from apex_orch.evaluation.tasks import TaskPlan, TaskSettings, TaskSpec, plan_tasks, run_tasks
from apex_orch.evaluation.tool_backend import ToolBase, work_root
from apex_orch.plan.gates import Gates

FORMATS = ("md", "json", "csv")


@dataclass
class CompareRow:
    file: str
    tier: str
    size_bytes: int
    bpw: float
    ppl: float
    ppl_err: float
    kld_mean: float | None
    kld_p999: float | None
    kld_max: float | None
    same_top_p: float | None        # percent
    pp_tokens_per_s: float | None
    tg_tokens_per_s: float | None
    is_base: bool = False
    gate_failures: list[str] = field(default_factory=list)
    pp_tokens_per_s_sd: float | None = None
    tg_tokens_per_s_sd: float | None = None
    tasks: dict = field(default_factory=dict)     # task name -> {accuracy, error, ci95} (percent)
    is_baseline: bool = False
    kld_mean_err: float | None = None


def _task_cells(results: list[TaskResult]) -> dict:
    return {t.task: {"accuracy": t.accuracy, "error": t.error, "ci95": list(t.ci95) if t.ci95 else None}
            for t in results}


def _speed_fields(sp: SpeedResult | None) -> dict:
    spread = sp is not None and sp.repetitions > 1      # one run has no standard deviation to show
    return {"pp_tokens_per_s": sp.pp_tokens_per_s if sp else None,
            "tg_tokens_per_s": sp.tg_tokens_per_s if sp else None,
            "pp_tokens_per_s_sd": sp.pp_tokens_per_s_sd if spread else None,
            "tg_tokens_per_s_sd": sp.tg_tokens_per_s_sd if spread else None}


@dataclass
class CompareReport:
    base: ModelFacts
    base_ppl: float
    base_ppl_err: float
    base_speed: SpeedResult | None
    results: list[EvalResult]
    settings: dict
    text: TextFacts
    backend: str
    gates: Gates = field(default_factory=Gates)
    base_tasks: list[TaskResult] = field(default_factory=list)
    n_baselines: int = 0                    # the last n results are baselines

    def is_baseline(self, i: int) -> bool:
        return i >= len(self.results) - self.n_baselines

    def task_titles(self) -> dict[str, str]:
        """Task name -> title, in the order the tasks were given."""
        return {t.task: t.title for t in self.base_tasks}

    def rows(self) -> list[CompareRow]:
        out = [CompareRow(file=Path(self.base.path).name, tier=self.base.tier, size_bytes=self.base.size_bytes,
                          bpw=self.base.bpw, ppl=self.base_ppl, ppl_err=self.base_ppl_err, kld_mean=None,
                          kld_p999=None, kld_max=None, same_top_p=None, is_base=True,
                          tasks=_task_cells(self.base_tasks), **_speed_fields(self.base_speed))]
        for i, r in enumerate(self.results):
            k = r.kld
            baseline = self.is_baseline(i)
            out.append(CompareRow(
                file=Path(r.model.path).name, tier=r.model.tier, size_bytes=r.model.size_bytes, bpw=r.model.bpw,
                ppl=r.ppl, ppl_err=r.ppl_err, kld_mean=k.kld_mean if k else None,
                kld_p999=k.kld_p999 if k else None, kld_max=k.kld_max if k else None,
                same_top_p=k.same_top_p if k else None,
                gate_failures=[] if baseline else gate_failures(r, self.gates),
                tasks=_task_cells(r.tasks), is_baseline=baseline, kld_mean_err=k.kld_mean_err if k else None,
                **_speed_fields(r.speed)))
        return out

    def closer_baselines(self) -> list[tuple[Point, Point]]:
        """(file, baseline): each file a baseline no larger than it beats on mean KLD (evaluation.baselines)."""
        return closer_baselines([Point(r.file, r.size_bytes, r.kld_mean, r.kld_mean_err, r.is_baseline)
                                 for r in self.rows() if not r.is_base])

    def to_dict(self) -> dict:
        return {"backend": self.backend, "settings": self.settings, "text": asdict(self.text),
                "base": asdict(self.base), "base_ppl": self.base_ppl, "base_ppl_err": self.base_ppl_err,
                "base_speed": asdict(self.base_speed) if self.base_speed else None,
                "base_tasks": [asdict(t) for t in self.base_tasks], "gates": asdict(self.gates),
                "rows": [asdict(r) for r in self.rows()], "results": [r.to_dict() for r in self.results],
                "closer_baselines": [{"file": t.name, "baseline": b.name} for t, b in self.closer_baselines()]}

    def check_gates(self) -> None:
        """Gates hold for the files compared, not for the baselines they are held against."""
        check_gates([r for i, r in enumerate(self.results) if not self.is_baseline(i)], self.gates)


def compare(files: Sequence[str | os.PathLike], base: str | os.PathLike, *,
            text: str | os.PathLike | None = None, corpus: str | None = None,
            settings: EvalSettings | None = None, backend: str = "bindings", speed: bool = True,
            gates: Gates | None = None, progress: Progress | None = None, tasks: list[TaskSpec] | None = None,
            task_settings: TaskSettings | None = None, speed_repetitions: int = SPEED_REPETITIONS,
            baselines: Sequence[str | os.PathLike] = ()) -> CompareReport:
    """Evaluate every file (then every baseline) against `base` with one shared base cache (and,
    with `tasks`, every file and the base on the same task sets; with `speed`, llama-bench on each).
    Gates are recorded per row (not for baselines); call `report.check_gates()` to raise
    GateFailedError after printing the table."""
    if not files:
        raise RequestError("compare needs at least one file besides the base", fields=("files",))
    n_baselines = len(baselines)
    files = [*files, *baselines]
    settings = settings or EvalSettings()
    tf = text_facts(text, corpus)
    # Read every header and task file first: a corrupt one fails before minutes of evaluation.
    base_facts = model_facts(base)
    file_facts = [model_facts(f, fingerprint=False) for f in files]
    task_plan = plan_tasks(base_facts, tasks, task_settings or TaskSettings.from_eval(settings)) if tasks else None
    results: list[EvalResult] = []
    tool_base = None
    work = None
    try:
        if backend == "llama-perplexity":
            work = tempfile.TemporaryDirectory(prefix="apex-compare-", dir=work_root())
            tool_base = ToolBase(base_facts, tf, settings, Path(work.name))
        for f, facts in zip(files, file_facts):
            plan = plan_eval(f, base=base, settings=settings, backend=backend, speed=speed, text_facts_=tf,
                             speed_repetitions=speed_repetitions)
            result = run_eval(plan, progress=progress, tool_base=tool_base)
            if task_plan is not None:
                result.tasks = run_tasks(TaskPlan(facts, task_plan.settings, task_plan.tasks), progress=progress)
            results.append(result)
        if backend == "bindings":
            with BaseLogProbs(ensure_base_cache(base_facts, tf, settings)) as cache:
                base_ppl, base_err = cache.meta["base_ppl"], cache.meta["base_ppl_err"]
        else:
            tool_base.ensure()
            base_ppl, base_err = tool_base.ppl, tool_base.ppl_err
    finally:
        if work is not None:
            work.cleanup()
    base_tasks = run_tasks(task_plan, progress=progress) if task_plan is not None else []
    base_speed = measure_speed(base, settings, repetitions=speed_repetitions) if speed else None
    return CompareReport(base=base_facts, base_ppl=base_ppl, base_ppl_err=base_err, base_speed=base_speed,
                         results=results, settings={**settings.to_dict(), "chunks": results[0].n_chunks},
                         text=tf, backend=backend, gates=gates or Gates(), base_tasks=base_tasks,
                         n_baselines=n_baselines)


# --------------------------------------------------------------------------- formatting

def _num(v: float | None, fmt: str) -> str:
    return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)


COLUMNS = ("file", "tier", "size", "bpw", "PPL", "KLD mean", "KLD 99.9%", "KLD max", "same top p")
SPEED_COLUMNS = ("pp512 t/s", "tg128 t/s")


def _task_cell(cell: dict | None) -> str:
    if not cell:
        return "—"
    if cell["error"] is not None:
        return f"{cell['accuracy']:.2f} ± {cell['error']:.2f}"
    if cell["ci95"] is not None:
        return f"{cell['accuracy']:.2f} [{cell['ci95'][0]:.2f}, {cell['ci95'][1]:.2f}]"
    return f"{cell['accuracy']:.2f}"


def _speed_cell(value: float | None, sd: float | None) -> str:
    return _num(value, ".1f") + (f" ± {sd:.1f}" if value is not None and sd is not None else "")


def _cells(r: CompareRow, task_names: Sequence[str], speed: bool, beaten: set[str]) -> list[str]:
    name = r.file + (" (base)" if r.is_base else " (baseline)" if r.is_baseline else "") + \
        (" †" if r.file in beaten and not r.is_base else "") + (" ✗" if r.gate_failures else "")
    cells = [name, r.tier, binary_size(r.size_bytes), f"{r.bpw:.2f}", f"{r.ppl:.4f} ± {r.ppl_err:.4f}",
             _num(r.kld_mean, ".6f"), _num(r.kld_p999, ".6f"), _num(r.kld_max, ".6f"),
             _num(r.same_top_p, ".2f") + ("%" if r.same_top_p is not None else "")]
    cells += [_task_cell(r.tasks.get(n)) for n in task_names]
    if speed:
        cells += [_speed_cell(r.pp_tokens_per_s, r.pp_tokens_per_s_sd),
                  _speed_cell(r.tg_tokens_per_s, r.tg_tokens_per_s_sd)]
    return cells


def _speed_note(report: CompareReport) -> str:
    sp = report.base_speed or next((r.speed for r in report.results if r.speed), None)
    if sp is None:
        return "no speed measured"
    return (f"speed: {sp.tool} pp{sp.pp_tokens}/tg{sp.tg_tokens} t/s, mean ± sd of {sp.repetitions} repetition(s), "
            f"threads {sp.n_threads}")


def _tasks_note(report: CompareReport) -> str | None:
    if not report.base_tasks:
        return None
    t = report.base_tasks[0].settings
    sets = ", ".join(f"{b.title} {b.n_tasks} of {b.n_available} ({b.data}, sha256 {b.data_sha256[:12]})"
                     for b in report.base_tasks)
    return (f"tasks: llama-perplexity's scorers, accuracy % ± its error (HellaSwag: its Wilson 95% interval), "
            f"ctx {t['n_ctx']} per sequence; {sets}")


def format_report(report: CompareReport, fmt: str = "md") -> str:
    if fmt not in FORMATS:
        raise RequestError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}", fields=("fmt",))
    rows = report.rows()
    titles = report.task_titles()
    speed = any(r.pp_tokens_per_s is not None for r in rows)
    if fmt == "json":
        return json.dumps(report.to_dict(), indent=2, ensure_ascii=False)
    if fmt == "csv":
        buf = io.StringIO()
        names = [f for f in CompareRow.__dataclass_fields__ if f not in ("gate_failures", "tasks")]
        task_cols = [f"{n}_{k}" for n in titles for k in ("accuracy", "error")]
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(names + task_cols + ["gate_failures"])
        for r in rows:
            d = asdict(r)
            cells = [r.tasks.get(n, {}).get(k) for n in titles for k in ("accuracy", "error")]
            w.writerow(["" if d[n] is None else d[n] for n in names] + ["" if c is None else c for c in cells]
                       + ["; ".join(r.gate_failures)])
        return buf.getvalue()
    s = report.settings
    columns = [*COLUMNS, *titles.values(), *(SPEED_COLUMNS if speed else ())]
    closer = report.closer_baselines()
    table = [_cells(r, list(titles), speed, {t.name for t, _ in closer}) for r in rows]
    widths = [max(len(columns[i]), *(len(row[i]) for row in table)) for i in range(len(columns))]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    out = [line(columns), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(row) for row in table]
    out.append("")
    out.append(f"{report.backend}; text {report.text.label} (sha256 {report.text.sha256[:12]}); ctx {s['n_ctx']}, "
               f"{s['chunks']} chunks, batch {s['n_batch']}, ubatch {s['n_ubatch']}, threads {s['n_threads']}, "
               f"flash-attn {'on' if s['flash_attn'] else 'off'}, repack {'on' if s.get('repack') else 'off'}; "
               f"KLD vs the base; {_speed_note(report)}")
    if (note := _tasks_note(report)) is not None:
        out.append(note)
    out += ["† " + closer_sentence(t, b, binary_size) for t, b in closer]
    failures = [f for r in rows for f in r.gate_failures]
    if failures:
        out.append("gate failures: " + "; ".join(failures))
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------- plot

PLOT_SUFFIXES = tuple(f".{f}" for f in PLOT_FORMATS)


def pareto_plot(report: CompareReport, out: str | os.PathLike, *, force: bool = False) -> Path:
    """Mean KLD vs size (both log scales, evaluation.plot): baselines marked, the Pareto front
    joined, the base as a vertical line."""
    out = Path(out)
    pts = [PlotPoint(r.model.tier or Path(r.model.path).stem, r.model.size_bytes, r.kld.kld_mean, report.is_baseline(i))
           for i, r in enumerate(report.results) if r.kld is not None]
    data = kld_size_plot(pts, base_size=report.base.size_bytes, base_label=Path(report.base.path).name,
                         title=f"KLD vs size — ctx {report.settings['n_ctx']}, {report.settings['chunks']} chunks",
                         fmt=out.suffix.lstrip(".").lower())
    # the one way outputs are written (core.outputs: the guard, a temporary, normal permissions)
    write_output(out, data, force=force)
    return out


# --------------------------------------------------------------------------- one call for the demo

def eval_table(source: str | os.PathLike, outputs: Sequence[str | os.PathLike], *,
               text: str | os.PathLike | None = None, corpus: str | None = None,
               settings: EvalSettings | None = None, speed: bool = True, fmt: str = "md",
               gates: Gates | None = None, progress: Progress | None = None,
               speed_repetitions: int = SPEED_REPETITIONS) -> str:
    """Evaluate `outputs` against `source` (the F16/BF16 model they were quantized from) and
    return the rendered table. Defaults: ctx 512, every chunk of the text, flash attention on,
    all cores. Raises GateFailedError after building the table only if `gates` fail (the table
    is in the error's `table` field)."""
    report = compare(outputs, source, text=text, corpus=corpus, settings=settings, speed=speed,
                     gates=gates, progress=progress, speed_repetitions=speed_repetitions)
    rendered = format_report(report, fmt)
    try:
        report.check_gates()
    except GateFailedError as exc:
        exc.table = rendered
        raise
    return rendered
