"""What an evaluation gives: `EvalResult` (with its `TaskResult`s and `SpeedResult`), as JSON and text.

Takes: the facts and settings the run used, the numbers a backend computed.
Gives: one record both backends fill the same way, its JSON round trip (cards and releases
store it), and `format_result`, the text `apex-orch eval` prints: our header, then
llama-perplexity's own lines and names, so a reader can put the two side by side. A task-only
evaluation (`eval --tasks` without a text) has no perplexity part: `text` and `ppl` are None.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Mapping

from apex_orch.evaluation.inputs import ModelFacts, TextFacts
from apex_orch.evaluation.statistics import KLD_LINES, KLDStats


@dataclass
class SpeedResult:
    """llama-bench's pp<N> / tg<N>: mean tokens/s over the repetitions and their standard deviation
    (apex_orch.evaluation.speed). `tool` "bindings": a record written before llama-bench measured it."""
    pp_tokens: int
    pp_tokens_per_s: float
    tg_tokens: int
    tg_tokens_per_s: float
    n_threads: int
    n_batch: int
    n_ubatch: int
    flash_attn: bool
    repetitions: int
    pp_tokens_per_s_sd: float | None = None
    tg_tokens_per_s_sd: float | None = None
    repack: bool | None = None
    tool: str = "bindings"
    build_commit: str | None = None
    cpu_info: str | None = None          # what llama-bench reports of the machine (its cpu_info / gpu_info)
    gpu_info: str | None = None

    def describe(self) -> str:
        sd = lambda v: "" if v is None or self.repetitions < 2 else f" ± {v:.1f}"  # noqa: E731
        return (f"pp{self.pp_tokens} {self.pp_tokens_per_s:.1f}{sd(self.pp_tokens_per_s_sd)} t/s, "
                f"tg{self.tg_tokens} {self.tg_tokens_per_s:.1f}{sd(self.tg_tokens_per_s_sd)} t/s ({self.tool}, "
                f"threads {self.n_threads}, batch {self.n_batch}, ubatch {self.n_ubatch}, "
                f"flash-attn {'on' if self.flash_attn else 'off'}, {self.repetitions} repetition(s))")


@dataclass
class TaskResult:
    """One task set scored by llama-perplexity (apex_orch.evaluation.tasks), as the tool printed it.

    accuracy: percent. error: the tool's own "+/-" (percent, the binomial standard error it prints
    for Winogrande and multiple choice; None where it prints none: HellaSwag, and runs below 100
    tasks). ci95: HellaSwag's Wilson 95% interval (percent) from its last task line. outcomes: one
    character per scored task in the tool's order, "1" right, "0" wrong."""
    task: str                   # hellaswag, winogrande, mmlu, arc-challenge, arc-easy, truthfulqa
    title: str
    scorer: str                 # hellaswag | winogrande | multiple-choice
    accuracy: float
    n_tasks: int                # tasks scored
    n_available: int            # tasks the tool read from the file
    data: str                   # the file, or hf:<repo>@<revision>/<file>
    data_sha256: str
    settings: dict
    error: float | None = None
    ci95: tuple[float, float] | None = None
    random_chance: float | None = None     # multiple choice: 1 / answers, as the tool prints it (percent)
    outcomes: str = ""
    seconds: float = 0.0
    llama_build: str = ""
    cached: bool = False
    notes: list[str] = field(default_factory=list)

    def describe(self) -> str:
        if self.error is not None:
            spread = f" ± {self.error:.2f}"
        elif self.ci95 is not None:
            spread = f" [{self.ci95[0]:.2f}, {self.ci95[1]:.2f}]"
        else:
            spread = ""
        return f"{self.accuracy:.2f}{spread}"

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "TaskResult":
        d = dict(data)
        if d.get("ci95") is not None:
            d["ci95"] = tuple(d["ci95"])
        return cls(**d)


@dataclass
class EvalResult:
    model: ModelFacts
    backend: str
    settings: dict
    text: TextFacts | None      # None: a task-only evaluation (no perplexity part)
    n_tokens: int | None        # tokens in the text (with BOS); None: llama-perplexity does not print it
    n_chunks: int
    n_scored: int               # tokens scored in total
    ppl: float | None
    ppl_err: float | None
    base: ModelFacts | None = None
    base_ppl: float | None = None        # exact base PPL (perplexity mode) when a base is given
    base_ppl_err: float | None = None
    kld: KLDStats | None = None
    speed: SpeedResult | None = None
    tasks: list[TaskResult] = field(default_factory=list)
    seconds: float = 0.0
    eval_tokens_per_s: float | None = None  # decode throughput during the evaluation
    llama_build: str = ""
    cache: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def ppl_ratio(self) -> float | None:
        return self.kld.mean_ppl_ratio if self.kld else None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, ensure_ascii=False, allow_nan=True)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "EvalResult":
        d = dict(data)
        d["model"] = ModelFacts(**d["model"])
        d["text"] = TextFacts(**d["text"]) if d.get("text") else None
        d["base"] = ModelFacts(**d["base"]) if d.get("base") else None
        d["kld"] = KLDStats(**d["kld"]) if d.get("kld") else None
        d["speed"] = SpeedResult(**d["speed"]) if d.get("speed") else None
        d["tasks"] = [TaskResult.from_dict(t) for t in d.get("tasks") or []]
        return cls(**d)


def format_result(result: EvalResult) -> str:
    """Human-readable result: our header, then llama-perplexity's own lines and names; task
    accuracies as the tool printed them (its last task line), with its error estimate."""
    out = [f"model:    {result.model.path} [{result.model.tier}, {result.model.bpw:.2f} bpw, "
           f"{result.model.size_bytes / 2**20:.1f} MiB]"]
    if result.text is not None:
        out += _perplexity_lines(result)
    if result.tasks:
        s = result.tasks[0].settings
        out += ["", f"tasks:    llama-perplexity (ctx {s['n_ctx']} per sequence, batch {s['n_batch']}, "
                    f"ubatch {s['n_ubatch']}, threads {s['n_threads']}, "
                    f"flash-attn {'on' if s['flash_attn'] else 'off'}, "
                    f"repack {'on' if s.get('repack') else 'off'})"]
        for t in result.tasks:
            spread = (f" +/- {t.error!r}" if t.error is not None else
                      f" [{t.ci95[0]!r}%, {t.ci95[1]!r}%]" if t.ci95 is not None else "")
            out.append(f"{t.title + ':':<15}{t.accuracy!r}%{spread} ({t.n_tasks} of {t.n_available} tasks, "
                       f"{t.data}, sha256 {t.data_sha256[:12]}{', cached' if t.cached else ''})")
            out += [f"                note: {n}" for n in t.notes]
    if result.speed is not None:
        out += ["", f"speed:    {result.speed.describe()}"]
    return "\n".join(out)


def _perplexity_lines(result: EvalResult) -> list[str]:
    s = result.settings
    tokens = "?" if result.n_tokens is None else str(result.n_tokens)
    out = [f"backend:  {result.backend} (ctx {s['n_ctx']}, batch {s['n_batch']}, ubatch {s['n_ubatch']}, "
           f"threads {s['n_threads']}, flash-attn {'on' if s['flash_attn'] else 'off'}, "
           f"repack {'on' if s.get('repack') else 'off'})",
           f"text:     {result.text.label} ({tokens} tokens, {result.n_chunks} chunks, {result.n_scored} scored)"]
    if result.base is not None and result.base_ppl is not None:
        out.append(f"base:     {result.base.path} (PPL {result.base_ppl:.4f} +/- {result.base_ppl_err:.5f})")
    out.append(f"Final estimate: PPL = {result.ppl:.4f} +/- {result.ppl_err:.5f}")
    if result.kld is not None:
        k = result.kld
        out += ["", "====== Perplexity statistics ======"]
        for label, name, err, unit in KLD_LINES:
            if name == "kld_mean":
                out += ["", "====== KL divergence statistics ======"]
            elif name == "dp_mean":
                out += ["", "====== Token probability statistics ======"]
            value = getattr(k, name)
            if unit == "%":
                text = f"{value:6.3f}" + (f" ± {getattr(k, err):5.3f} %" if err else "%")
            else:
                text = f"{value:10.6f}" + (f" ± {getattr(k, err):10.6f}" if err else "")
            pad = 30 if name.startswith(("mean_ppl", "cor", "mean_ln")) else 0
            out.append(f"{label:<{pad}}: {text}" if pad else f"{label}: {text}")
    return out
