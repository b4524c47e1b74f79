"""What a model card says, as values: the facts release.card gathers and renders.

Every value here comes from the release itself (headers, quantize manifests, eval records, the
calibration record), never from the clock or a local path, so the same release gives the same
facts. `eval_facts(summary)` and `base_facts(record)` read the eval phase's records
(release.phases.evaluate) into them; everything else is gathered by release.card.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from apex_orch import __version__
from apex_orch.evaluation.task_files import TASK_KINDS


@dataclass(frozen=True)
class FileFacts:
    names: tuple[str, ...]          # one file, or the parts of a split file (first part loads the rest)
    size: int                       # bytes, all parts
    sha256: tuple[str, ...]         # per part

    @property
    def name(self) -> str:
        return self.names[0]


@dataclass(frozen=True)
class TaskCell:
    """One task accuracy (percent) with llama-perplexity's own error estimate: `error` (the binomial
    standard error, Winogrande and multiple choice) or `ci95` (HellaSwag's Wilson interval)."""
    accuracy: float
    error: float | None = None
    ci95: tuple[float, float] | None = None


@dataclass(frozen=True)
class SpeedFacts:
    """llama-bench's pp512 / tg128 in tokens per second: mean, and standard deviation (None for one run)."""
    pp: float
    tg: float
    pp_sd: float | None = None
    tg_sd: float | None = None


@dataclass(frozen=True)
class EvalFacts:
    ppl: float
    ppl_err: float
    kld_mean: float | None = None
    same_top_p: float | None = None
    kld_mean_err: float | None = None
    kld_p999: float | None = None
    speed: SpeedFacts | None = None
    tasks: tuple[tuple[str, TaskCell], ...] = ()      # (task name, accuracy), in the config's order


@dataclass(frozen=True)
class TierFacts:
    tier: str
    profile: str
    best_for: str
    imatrix: bool
    base_ftype: str
    bpw: float
    file: FileFacts
    roles: tuple[tuple[str, int, tuple[tuple[str, int], ...]], ...]   # (role, tensors, ((type, count), ...))
    bands: tuple[tuple[str, tuple[tuple[str, str], ...]], ...]        # (role, ((band, "T1, T2"), ...))
    eval: EvalFacts | None = None
    fitted: str = ""                # a `fit:` tier: how its types were chosen (release.fit_tiers)


@dataclass(frozen=True)
class BaselineFacts:
    """A baseline (release.baselines): what it is, its file once made or fetched, its numbers."""
    label: str
    kind: str                       # preset | file | hf
    what: str                       # "llama-quantize Q8_0 of the same source, without an importance matrix"
    file: FileFacts | None = None   # None: not made or fetched yet
    origin: str | None = None       # hf: "owner/name@<revision>"; file: its file name
    eval: EvalFacts | None = None


@dataclass(frozen=True)
class ArchFacts:
    model: str
    arch: str
    blocks: int
    leading_dense: int
    nextn: int
    experts: int
    experts_used: int
    experts_shared: int
    total_params: int
    active_params: int
    attention: str                  # MLA / GQA / MHA / hybrid ...
    heads: int | None
    kv_heads: int | None
    q_lora_rank: int | None
    kv_lora_rank: int | None
    context: int | None
    rope_type: str | None
    rope_factor: float | None
    rope_original_context: int | None
    vocab: int | None
    edge: int
    near: int
    attention_edge: int
    band_blocks: int


@dataclass(frozen=True)
class MmprojFacts:
    file: FileFacts
    projector: str | None           # clip.projector_type, e.g. pixtral
    ftype: str | None               # F16 / Q8_0 / ...


@dataclass(frozen=True)
class CalibrationFacts:
    corpus: str
    description: str
    ctx: int
    chunks: int
    sha256: str


@dataclass(frozen=True)
class PublishedFile:
    """A calibration file in the repo: its path there, size and sha256."""
    path: str                       # e.g. calibration/imatrix.gguf
    size: int
    sha256: str


@dataclass(frozen=True)
class CalibrationFiles:
    """The calibration the release publishes (release.calibration), or says it does not."""
    published: bool                 # False: --no-calibration-upload
    files: tuple[PublishedFile, ...] = ()
    tokens: int | None = None       # tokens of the calibration text (the source's tokenizer)


@dataclass(frozen=True)
class BaseEvalFacts:
    file_type: str
    size: int
    ppl: float
    ppl_err: float
    speed: SpeedFacts | None = None
    tasks: tuple[tuple[str, TaskCell], ...] = ()


@dataclass(frozen=True)
class TaskSetFacts:
    """One task set as it was scored (llama-perplexity's scorer, its data and count)."""
    task: str
    title: str
    scorer: str                     # hellaswag | winogrande | multiple-choice
    n_tasks: int
    n_available: int
    data: str                       # the file's name, or hf:<repo>@<revision>/<file>
    sha256: str


@dataclass(frozen=True)
class TaskSetup:
    sets: tuple[TaskSetFacts, ...]
    ctx: int                        # -c per sequence
    n_batch: int
    n_ubatch: int
    flash_attn: bool


@dataclass(frozen=True)
class SpeedSetup:
    n_prompt: int                   # pp<n_prompt>: 512 unless the config says otherwise
    n_gen: int                      # tg<n_gen>: 128
    repetitions: int
    threads: int
    n_batch: int
    n_ubatch: int
    flash_attn: bool
    machine: str | None             # llama-bench's cpu_info (and gpu_info)


@dataclass(frozen=True)
class CardFacts:
    name: str
    title: str
    repo: str
    base_model: str | None
    license: str
    description: str
    tags: tuple[str, ...]
    arch: ArchFacts
    tiers: tuple[TierFacts, ...]
    mmproj: MmprojFacts | None
    calibration: CalibrationFacts | None
    base_eval: BaseEvalFacts | None
    eval_setup: str | None          # "corpus wikipedia, 4 chunks of 128 tokens" or None when not evaluated
    config_path: str
    apex_orch_version: str = __version__
    llama_build: str = ""
    extra: dict = field(default_factory=dict, compare=False)
    baselines: tuple[BaselineFacts, ...] = ()
    tasks: TaskSetup | None = None
    speed: SpeedSetup | None = None
    plot: str | None = None                       # the plot's file name in the repo, when there is one
    calibration_files: CalibrationFiles | None = None
    mtp: Any = None                 # card_mtp.MtpFacts: where the MTP head went (None: no head, no `mtp:`)


# =========================================================================== from the eval records

def _speed(sp: dict | None) -> SpeedFacts | None:
    if not sp:
        return None
    spread = sp.get("repetitions", 1) > 1
    return SpeedFacts(sp["pp_tokens_per_s"], sp["tg_tokens_per_s"], sp.get("pp_tokens_per_s_sd") if spread else None,
                      sp.get("tg_tokens_per_s_sd") if spread else None)


def _tasks(rows: list | None) -> tuple[tuple[str, TaskCell], ...]:
    return tuple((t["task"], TaskCell(t["accuracy"], t.get("error"), tuple(t["ci95"]) if t.get("ci95") else None))
                 for t in rows or [])


def eval_facts(s: dict) -> EvalFacts:
    """A tier's or baseline's record summary (release.phases.evaluate._summary)."""
    return EvalFacts(s["ppl"], s["ppl_err"], s.get("kld_mean"), s.get("same_top_p"), s.get("kld_mean_err"),
                     s.get("kld_p999"), _speed(s.get("speed")), _tasks(s.get("tasks")))


def base_facts(b: dict) -> BaseEvalFacts:
    """The source's record (release.phases.evaluate._base_record)."""
    return BaseEvalFacts(b.get("type") or "source", int(b["size"]), b["ppl"], b["ppl_err"], _speed(b.get("speed")),
                         _tasks(b.get("tasks")))


def task_setup(records: list[dict]) -> TaskSetup | None:
    """The task sets as the first record that has them scored them (every file used the same)."""
    for r in records:
        rows = (r.get("summary") or r).get("tasks") or []
        if rows:
            s = rows[0]["settings"]
            sets = tuple(TaskSetFacts(t["task"], t["title"], TASK_KINDS[t["task"]].scorer, t["n_tasks"],
                                      t["n_available"], _data_label(t["data"]), t["data_sha256"]) for t in rows)
            return TaskSetup(sets, s["n_ctx"], s["n_batch"], s["n_ubatch"], bool(s["flash_attn"]))
    return None


def speed_setup(records: list[dict]) -> SpeedSetup | None:
    for r in records:
        sp = (r.get("summary") or r).get("speed")
        if sp:
            machine = " + ".join(x for x in (sp.get("cpu_info"), sp.get("gpu_info")) if x) or None
            return SpeedSetup(sp["pp_tokens"], sp["tg_tokens"], sp["repetitions"], sp["n_threads"], sp["n_batch"],
                              sp["n_ubatch"], bool(sp["flash_attn"]), machine)
    return None


def _data_label(data: str) -> str:
    """A task file as the card names it: its file name (never a local path), or the Hub label."""
    return data if data.startswith("hf:") else Path(data).name
