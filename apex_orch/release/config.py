"""The release YAML schema: what `releases/*.yaml` may say, as typed values.

A config is strict: an unknown key, a wrong type or a bad value is a ConfigError at `file:line`
(config_reader.load_release reads the YAML into these types). Paths written in the YAML are
relative to the YAML's folder (`~` and `${VAR}` expand; an unset variable is reported where the
path is first needed, so `--dry-run --source` works on a machine without the models)::

    name: Mistral-Small-4-119B          # files: <name>-APEX-<Tier>.gguf (made safe for file names)
    title: ...                          # card title (default "<name> APEX GGUF")
    base_model: mistralai/Mistral-Small-4-119B-2603   # card front matter
    license: apache-2.0
    description: ...                    # one paragraph for the card and LocalAI entries
    tags: [mistral4, vision]            # added to gguf / moe / apex / quantized
    source:                             # exactly one of:
      gguf: path.gguf | [shard paths]   #   local GGUF (a split model: its shards)
      demo: true                        #   the embedded demo model (apex_orch.demo.synthetic)
      hf: {repo: org/name, revision: <40-hex commit>, files: [model.gguf]}
      convert: {repo: org/name, revision: <40-hex>, outtype: bf16, mistral_format: false}
      convert: {path: checkpoint-folder, outtype: bf16}   #   a local Hugging Face checkpoint folder
    tiers: [i-balanced, quality, ...]   # profile names / .yaml paths, or {profile: NAME, best_for: TEXT}
      - fit: {size: 48GB | bpw: 3.5,    #   or a tier fitted to a size (exactly one of size / bpw) when
              sensitivity: sens.json,   #   the source is known, from `apex-orch sensitivity`'s result
              from: i-balanced,         #   optional: the profile whose bands, best-for and corpus it keeps
              structure: apex | free,   #   optional (default apex: APEX's ordering kept)
              imatrix: true | false}    #   optional (default: as the sensitivity was measured)
        tier: I-Compact-48GB            #   required: its display tier (file name, card)
        best_for: TEXT                  #   optional
    imatrix: {corpus: diverse, ctx: 512, chunks: 200, from_q8: false}   # once, for every I-tier
    eval: {enabled: true, corpus: NAME | text: path, ctx: 512, chunks: 64,
           speed: true | {repetitions: 5, prompt: 512, gen: 128},   # llama-bench pp512 / tg128 of every file
           tasks: [hellaswag, {task: winogrande, file: wg.csv, count: 400}, ...],   # llama-perplexity's
           task_ctx: 4096,                          #   scorers (a name alone: the pinned Hub data)
           gates: {max_mean_kld: .., max_ppl_ratio: .., min_same_top_p: .., max_kld_99_9: ..},
           speculative: true | false,               # default true with `mtp: bundled | draft`: every tier
           speculative_tokens: 32}                  #   generates greedily with the MTP head drafting and
                                                    #   without (evaluation.speculative; the card's numbers)
    baselines:                          # optional: files of the same size to measure the tiers against,
      - Q8_0                            #   in the same run; never published (release.baselines)
      - {preset: Q4_K_M, imatrix: true, name: Q4_K_M (imatrix)}   # uniform llama-quantize presets
      - {file: other-Q4_K_M.gguf, name: other Q4_K_M}             # an existing GGUF of this model
      - {hf: {repo: org/name-GGUF, revision: <40-hex>, file: name-Q4_K_M.gguf}, name: org Q4_K_M}
    mmproj:                             # optional vision projector, never touched by profiles
      file: path.gguf | hf: {repo, revision, file} | convert: {outtype: f16|q8_0, repo?, revision?}
                                        #   (convert without repo: the source's repo or checkpoint folder)
      name: mmproj.gguf                 # its file name in the release
    publish: {repo: owner/name, private: false}
    split_max_size: 48G                 # optional: split outputs larger than this (48G = 48GB = 48e9
                                        #   bytes; sizes as apex_orch/core/sizes.py reads them)
    output: path                        # release folder (default: out/release/<name> under the cwd)
    mtp: bundled | draft | none         # optional: the model's MTP head in every tier, as one draft file
                                        #   mtp-<name>.gguf beside head-less tiers, or nowhere (release.mtp);
                                        #   or {mode: draft, type: Q8_0, file: mtp-draft.gguf}
    resources: {cpus: 8, gpus: 1, memory: 64G}   # optional, --executor ray only: what each task asks
                                        #   the cluster for (cpus: also its tools' threads, default 1;
                                        #   gpus: imatrix and eval tasks, default 0; memory: default
                                        #   estimated from the model)

A `fit:` tier is read with a placeholder profile (its tier, imatrix need and corpus, from the
sensitivity file, so the imatrix phase and the name checks work before the model exists); once
the source model is known, release.fit_tiers fits it and puts the fitted profile in its place.

Only types and key sets live here (no YAML reading, no file access), so every phase, the dry run
and the card can name a config's parts without pulling in the reader.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from apex_orch.core.errors import ConfigError
from apex_orch.core.schema import bounds
from apex_orch.core.settings import PACKAGE_DIR, config_variable
from apex_orch.core.sizes import Size
from apex_orch.core.text import gb
from apex_orch.core.yamlio import YamlDoc
from apex_orch.evaluation.speculative import DEFAULT_CTX, DEFAULT_N_PREDICT
from apex_orch.evaluation.task_files import TASK_KINDS
from apex_orch.plan.llama_rules import ABORT_WITHOUT_IMATRIX_DATA, IMATRIX_REQUIRED, is_quantized
from apex_orch.plan.profiles import MTP_HEAD_DEFAULT, TARGET_TYPES, Profile

# The keys each section allows (the `gates` keys are plan.gates.GATE_KEYS).
TOP_KEYS = {"name", "title", "base_model", "license", "description", "tags", "source", "tiers", "imatrix",
            "eval", "baselines", "mmproj", "publish", "split_max_size", "output", "resources", "mtp"}
SOURCE_KINDS = ("gguf", "demo", "hf", "convert")
HF_KEYS = {"repo", "revision", "files"}
HF_FILE_KEYS = {"repo", "revision", "file"}
CONVERT_KEYS = {"repo", "revision", "path", "outtype", "mistral_format"}
MMPROJ_KEYS = {"file", "hf", "convert", "name"}
MMPROJ_CONVERT_KEYS = {"repo", "revision", "outtype", "mistral_format"}
TIER_KEYS = {"profile", "best_for", "fit", "tier"}
FIT_KEYS = {"size", "bpw", "sensitivity", "from", "structure", "imatrix"}
IMATRIX_KEYS = {"corpus", "ctx", "chunks", "from_q8"}
EVAL_KEYS = {"enabled", "text", "corpus", "ctx", "chunks", "speed", "tasks", "task_ctx", "gates", "speculative",
             "speculative_tokens"}
PUBLISH_KEYS = {"repo", "private"}
RESOURCES_KEYS = {"cpus", "gpus", "memory"}

CONVERT_OUTTYPES = ("bf16", "f16", "f32", "q8_0")
MTP_MODES = ("bundled", "draft", "none")
# A draft's type: quantized, and written without imatrix data (no imatrix covers the MTP head).
DRAFT_TYPES = tuple(n for n, t in TARGET_TYPES.items() if is_quantized(t) and t not in IMATRIX_REQUIRED
                    and t not in ABORT_WITHOUT_IMATRIX_DATA)
MMPROJ_OUTTYPES = ("f16", "q8_0")
ENV_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


@dataclass(frozen=True)
class ConfigPath:
    """A path as written in the YAML: expanded (env vars, ~) and resolved only when needed."""
    raw: str
    base: Path
    where: str

    def resolve(self) -> Path:
        def sub(m: re.Match) -> str:
            value = config_variable(m.group(1))
            if not value:
                raise ConfigError(f"path {self.raw!r} uses ${{{m.group(1)}}}, which is not set", where=self.where,
                                  hint=f"set {m.group(1)} (the nightly workflow sets it from the runner's "
                                       "variables); for the model itself, a local GGUF given in place of the "
                                       "config's source also works", options=("source",))
            return value
        text = os.path.expanduser(ENV_RE.sub(sub, self.raw))
        p = Path(text)
        return Path(os.path.abspath(p if p.is_absolute() else self.base / p))


@dataclass(frozen=True)
class HFRef:
    repo: str
    revision: str
    files: tuple[str, ...] = ()
    where: str = ""


@dataclass(frozen=True)
class SourceConfig:
    kind: str                              # gguf | demo | hf | convert
    paths: tuple[ConfigPath, ...] = ()     # gguf
    hf: HFRef | None = None                # hf (files) / convert (repo + revision)
    outtype: str = "bf16"                  # convert
    mistral_format: bool = False           # convert
    where: str = ""
    checkpoint: ConfigPath | None = None   # convert: a local checkpoint folder instead of repo + revision

    def describe(self) -> str:
        if self.kind == "demo":
            return "the embedded demo model (apex_orch.demo.synthetic, generated offline)"
        if self.kind == "gguf":
            return "local GGUF " + ", ".join(p.raw for p in self.paths)
        if self.checkpoint is not None:
            return f"local checkpoint {self.checkpoint.raw}, converted to {self.outtype.upper()} GGUF"
        assert self.hf is not None
        ref = f"{self.hf.repo}@{self.hf.revision[:12]}"
        if self.kind == "hf":
            return f"Hugging Face {ref}: " + ", ".join(self.hf.files)
        return f"Hugging Face safetensors {ref}, converted to {self.outtype.upper()} GGUF"


@dataclass(frozen=True)
class MmprojConfig:
    kind: str                              # file | hf | convert
    name: str                              # file name in the release folder
    path: ConfigPath | None = None
    hf: HFRef | None = None                # hf: one file; convert: repo + revision (or the source's)
    outtype: str | None = None             # convert
    mistral_format: bool = False
    where: str = ""
    checkpoint: ConfigPath | None = None   # convert: the source's local checkpoint folder


@dataclass(frozen=True)
class FitSpec:
    """A `fit:` tier: what to fit it to and from which measurement (fit.fitter.fit_profile's arguments)."""
    size: int | None               # file bytes (GB = 10^9), or
    bpw: float | None              # bits per weight
    sensitivity: ConfigPath        # the result of `apex-orch sensitivity`
    base: str | None               # `from:` profile name or path (bands, best-for, corpus); None: APEX's own
    structure: bool                # apex (True) or free
    imatrix: bool | None           # None: with an imatrix when the sensitivity was measured with one
    tier: str
    where: str

    @property
    def target(self) -> str:
        return gb(self.size) if self.size is not None else f"{self.bpw:.2f} bpw"


@dataclass(frozen=True)
class TierConfig:
    profile: Profile               # for a fit tier: a placeholder until release.fit_tiers fits it
    best_for: str
    where: str
    fit: FitSpec | None = None

    @property
    def tier(self) -> str:
        return self.profile.tier

    @property
    def fit_pending(self) -> bool:
        """A fit tier whose profile is still the placeholder (a fitted profile carries `fitted:`)."""
        return self.fit is not None and "fitted" not in self.profile.raw


@dataclass(frozen=True)
class ImatrixConfig:
    corpus: str
    ctx: int = 512
    chunks: int | None = None
    from_q8: bool = False
    where: str = ""


@dataclass(frozen=True)
class SpeedDoc:
    """`eval.speed` as a mapping (`speed: true` is these defaults)."""
    repetitions: int = field(default=5, metadata=bounds(minimum=1, maximum=100))
    prompt: int = field(default=512, metadata=bounds(minimum=1, maximum=65536))   # llama-bench -p: pp512
    gen: int = field(default=128, metadata=bounds(minimum=1, maximum=65536))      # llama-bench -n: tg128


@dataclass(frozen=True)
class SpeculativeDoc:
    """`eval.speculative` and `eval.speculative_tokens` (the MTP head's drafting measured per tier)."""
    speculative: bool | None = None         # None: on when `mtp:` is bundled or draft (and eval is on)
    speculative_tokens: int = field(default=DEFAULT_N_PREDICT, metadata=bounds(
        minimum=2, maximum=DEFAULT_CTX // 2, why_maximum=f"the runs' context is {DEFAULT_CTX} tokens, the prompt "
                                                          "and the drafts included"))


@dataclass(frozen=True)
class TaskDoc:
    """One entry of `eval.tasks` as a mapping (a name alone is `{task: NAME}`)."""
    task: str = field(default="", metadata=bounds(choices=tuple(TASK_KINDS)))
    file: str | None = None                 # llama.cpp's task file; None: the pinned Hub data
    count: int | None = field(default=None, metadata=bounds(minimum=1))   # None: the task's default


@dataclass(frozen=True)
class TaskConfig:
    task: str                               # a TASK_KINDS name
    file: ConfigPath | None                 # None: the pinned Hub data (evaluation.task_data)
    count: int | None                       # tasks scored; None: the APEX pipeline's default
    where: str = ""


@dataclass(frozen=True)
class EvalConfig:
    enabled: bool = True
    text: ConfigPath | None = None
    corpus: str | None = None
    ctx: int = 512
    chunks: int | None = None
    speed: bool = False
    gates: tuple[tuple[str, float], ...] = ()
    where: str = ""
    speed_repetitions: int = 5              # llama-bench's -r
    speed_tokens: tuple[int, int] = (512, 128)   # llama-bench's -p / -n (the card's pp512 / tg128)
    tasks: tuple[TaskConfig, ...] = ()
    task_ctx: int = 4096                    # the scorers' -c per sequence
    speculative: bool = False               # every tier's MTP drafting measured (release.speculative)
    speculative_tokens: int = DEFAULT_N_PREDICT   # tokens each of its runs generates

    def text_label(self) -> str:
        if self.text is not None:
            return Path(self.text.raw).name
        return f"corpus {self.corpus}"


@dataclass(frozen=True)
class BaselineDoc:
    """One entry of `baselines:` as a mapping (a name alone is `{preset: NAME}`); exactly one of
    preset, file, hf. `hf` is a mapping read by the config reader ({repo, revision, file})."""
    preset: str | None = field(default=None, metadata=bounds(pattern=re.compile(r"^[A-Za-z0-9_]{1,16}$"),
                                                               what="a llama-quantize type such as Q4_K_M"))
    imatrix: bool = False
    file: str | None = None
    hf: dict | None = None
    name: str | None = field(default=None, metadata=bounds(pattern=re.compile(r"^[A-Za-z0-9][A-Za-z0-9 ._+()-]{0,47}$"),
                                                             what="a short name (letters, digits, space, . _ + ( ) -)"))


@dataclass(frozen=True)
class BaselineConfig:
    """A file the tiers are measured against in the same run, never published."""
    kind: str                      # preset | file | hf
    label: str                     # its name in tables, the card and its eval record
    preset: str | None = None      # preset: the llama-quantize FTYPE (Q8_0, Q4_K_M, IQ4_XS...)
    imatrix: bool = False          # preset: quantized with the release's imatrix
    path: ConfigPath | None = None # file
    hf: HFRef | None = None        # hf: one file at a pinned revision
    where: str = ""

    def describe(self) -> str:
        if self.kind == "preset":
            return (f"llama-quantize {self.preset} of the same source, "
                    + ("with the release's importance matrix" if self.imatrix else "without an importance matrix"))
        if self.kind == "file":
            return f"local GGUF {self.path.raw}"
        assert self.hf is not None
        return f"Hugging Face {self.hf.repo}@{self.hf.revision[:12]}: {self.hf.files[0]}"


@dataclass(frozen=True)
class PublishConfig:
    repo: str
    private: bool = False
    where: str = ""


@dataclass(frozen=True)
class ResourcesConfig:
    """What each task of a release asks a Ray cluster for (`--executor ray`; a local run ignores it).
    GPUs decide placement only: the pinned tools and bindings run where the task is placed."""
    cpus: int = 1                  # per task, and the threads its tool runs with
    gpus: float = 0                # per imatrix and eval task (a quantization never asks for one)
    memory: int | None = None      # bytes per task; None: estimated from the model (ray_executor)
    where: str = ""


@dataclass(frozen=True)
class MtpConfig:
    """`mtp:` of a release (release.mtp reads it and says what each mode means)."""
    mode: str = field(default="bundled", metadata=bounds(choices=MTP_MODES))
    type: str = field(default=MTP_HEAD_DEFAULT, metadata=bounds(choices=DRAFT_TYPES))   # the draft file's
    file: ConfigPath | None = None         # draft: the head as its own GGUF (the converter's --mtp output)
    where: str = field(default="", metadata={"yaml": False})


@dataclass
class ReleaseConfig:
    path: Path
    name: str
    title: str
    base_model: str | None
    license: str
    description: str
    tags: tuple[str, ...]
    source: SourceConfig
    tiers: list[TierConfig]
    imatrix: ImatrixConfig | None
    eval: EvalConfig
    mmproj: MmprojConfig | None
    publish: PublishConfig
    split_max_size: Size | None                    # as written, and its bytes (core.sizes)
    output: ConfigPath | None
    warnings: list[str] = field(default_factory=list)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    doc: YamlDoc | None = field(default=None, repr=False)
    mtp: MtpConfig | None = None                   # None: the files hold what the source holds
    baselines: list[BaselineConfig] = field(default_factory=list)

    @property
    def i_tiers(self) -> list[TierConfig]:
        return [t for t in self.tiers if t.profile.imatrix_required]

    @property
    def i_baselines(self) -> list[BaselineConfig]:
        return [b for b in self.baselines if b.imatrix]

    def display_path(self) -> str:
        """The config's path for cards and messages: relative to the project when inside it."""
        root = PACKAGE_DIR.parent
        try:
            return self.path.resolve().relative_to(root).as_posix()
        except ValueError:
            return self.path.name
