"""Release: one YAML config -> a model's complete APEX file set, its card, LocalAI entries, the Hub.

Config (`releases/*.yaml`), strict: an unknown key, a wrong type or a bad value is a ConfigError
at `file:line`. Paths written in the YAML are relative to the YAML's folder (`~` and `${VAR}`
expand; an unset variable is reported where the path is first needed, so `--dry-run --source`
works on a machine without the models)::

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
    imatrix: {corpus: diverse, ctx: 512, chunks: 200, from_q8: false}   # once, for every I-tier
    eval: {enabled: true, corpus: NAME | text: path, ctx: 512, chunks: 64, speed: true,
           gates: {max_mean_kld: .., max_ppl_ratio: .., min_same_top_p: .., max_kld_99_9: ..}}
    mmproj:                             # optional vision projector, never touched by profiles
      file: path.gguf | hf: {repo, revision, file} | convert: {outtype: f16|q8_0, repo?, revision?}
                                        #   (convert without repo: the source's repo or checkpoint folder)
      name: mmproj.gguf                 # its file name in the release
    publish: {repo: owner/name, private: false}
    split_max_size: 48G                 # optional: split outputs larger than this
    output: path                        # release folder (default: out/release/<name> under the cwd)

Phases, in order: fetch -> convert -> imatrix -> quantize -> eval -> card -> publish. Each one
is idempotent (quantize/eval/convert/mmproj outputs carry manifests keyed by their inputs; the
imatrix and the base logits live in content-keyed caches; downloads sit in the Hugging Face cache
at a pinned commit; the card is rewritten only when its text changes), so an interrupted release
resumes where it stopped and a rerun is a no-op. `--only/--skip/--from` choose phases; a phase not
run still *resolves* its results (finding them, never recomputing) for the phases after it.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shlex
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from apex_orch.core.errors import (ApexError, ConfigError, GateFailedError, ImatrixError, LockedError, ModelError,
                              OutputExistsError, ToolNotFoundError, UsageError)
from apex_orch.core.settings import PACKAGE_DIR
from apex_orch.plan.profiles import Profile, load_profile
from apex_orch.core.yamlio import YamlDoc, load_yaml

Progress = Callable[[str], None]

PHASES = ("fetch", "convert", "imatrix", "quantize", "eval", "card", "publish")

TOP_KEYS = {"name", "title", "base_model", "license", "description", "tags", "source", "tiers", "imatrix",
            "eval", "mmproj", "publish", "split_max_size", "output"}
SOURCE_KINDS = ("gguf", "demo", "hf", "convert")
HF_KEYS = {"repo", "revision", "files"}
HF_FILE_KEYS = {"repo", "revision", "file"}
CONVERT_KEYS = {"repo", "revision", "path", "outtype", "mistral_format"}
MMPROJ_KEYS = {"file", "hf", "convert", "name"}
MMPROJ_CONVERT_KEYS = {"repo", "revision", "outtype", "mistral_format"}
TIER_KEYS = {"profile", "best_for"}
IMATRIX_KEYS = {"corpus", "ctx", "chunks", "from_q8"}
EVAL_KEYS = {"enabled", "text", "corpus", "ctx", "chunks", "speed", "gates"}
GATE_KEYS = ("max_mean_kld", "max_ppl_ratio", "min_same_top_p", "max_kld_99_9")
PUBLISH_KEYS = {"repo", "private"}

CONVERT_OUTTYPES = ("bf16", "f16", "f32", "q8_0")
MMPROJ_OUTTYPES = ("f16", "q8_0")
COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")
REPO_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}$")
SAFE_FILE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,200}$")
ENV_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
TAG_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,63}$")
SIZE_RE = re.compile(r"^\d+(?:\.\d+)?[KMGT]?$", re.I)
# HF snapshot files the converter reads (weights, configs, tokenizer, chat template, params.json).
CONVERT_PATTERNS = ("*.safetensors", "*.json", "tokenizer.model", "*.tiktoken", "*.txt", "*.jinja", "*.py")

WORK_DIR = ".apex-release"
CARD_NAME = "README.md"
LOCALAI_DIR = "localai"


# =========================================================================== config

@dataclass(frozen=True)
class ConfigPath:
    """A path as written in the YAML: expanded (env vars, ~) and resolved only when needed."""
    raw: str
    base: Path
    where: str

    def resolve(self) -> Path:
        def sub(m: re.Match) -> str:
            value = os.environ.get(m.group(1), "")
            if not value:
                raise ConfigError(f"path {self.raw!r} uses ${{{m.group(1)}}}, which is not set", where=self.where,
                                  hint=f"set {m.group(1)} (the nightly workflow sets it from the runner's "
                                       "variables); for the model itself, --source PATH also works")
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
class TierConfig:
    profile: Profile
    best_for: str
    where: str

    @property
    def tier(self) -> str:
        return self.profile.tier


@dataclass(frozen=True)
class ImatrixConfig:
    corpus: str
    ctx: int = 512
    chunks: int | None = None
    from_q8: bool = False
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

    def text_label(self) -> str:
        if self.text is not None:
            return Path(self.text.raw).name
        return f"corpus {self.corpus}"


@dataclass(frozen=True)
class PublishConfig:
    repo: str
    private: bool = False
    where: str = ""


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
    split_max_size: str | None
    output: ConfigPath | None
    warnings: list[str] = field(default_factory=list)
    doc: YamlDoc | None = field(default=None, repr=False)

    @property
    def i_tiers(self) -> list[TierConfig]:
        return [t for t in self.tiers if t.profile.imatrix_required]

    def display_path(self) -> str:
        """The config's path for cards and messages: relative to the project when inside it."""
        root = PACKAGE_DIR.parent
        try:
            return self.path.resolve().relative_to(root).as_posix()
        except ValueError:
            return self.path.name


class _Reader:
    """Typed access to the YAML with file:line errors."""

    def __init__(self, doc: YamlDoc):
        self.doc = doc

    def where(self, kp: tuple) -> str:
        return self.doc.where(kp)

    def fail(self, kp: tuple, message: str, hint: str | None = None) -> ConfigError:
        dotted = ".".join(str(k) for k in kp)
        return ConfigError(f"{dotted}: {message}" if dotted else message, where=self.where(kp), hint=hint)

    def mapping(self, kp: tuple, value, allowed: set[str]) -> dict:
        if not isinstance(value, dict):
            raise self.fail(kp, f"expected a mapping, got {_kind(value)}")
        for key in value:
            if key not in allowed:
                raise self.fail(kp + (key,), "unknown key", hint="allowed here: " + ", ".join(sorted(allowed)))
        return value

    def string(self, kp: tuple, value, *, pattern: re.Pattern | None = None, what: str = "a string",
               hint: str | None = None) -> str:
        if not isinstance(value, str) or not value.strip():
            raise self.fail(kp, f"expected {what}, got {_kind(value)}", hint=hint)
        value = value.strip()
        if pattern is not None and not pattern.match(value):
            raise self.fail(kp, f"{value!r} is not {what}", hint=hint)
        return value

    def integer(self, kp: tuple, value, minimum: int) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise self.fail(kp, f"expected an integer >= {minimum}, got {value!r}")
        return value

    def boolean(self, kp: tuple, value) -> bool:
        if not isinstance(value, bool):
            raise self.fail(kp, f"expected true or false, got {value!r}")
        return value

    def path(self, kp: tuple, value, *, suffix: str | None = ".gguf") -> ConfigPath:
        text = self.string(kp, value, what="a path")
        if suffix and not text.endswith(suffix):
            raise self.fail(kp, f"{text!r} must be a {suffix} file")
        return ConfigPath(text, self.doc.path.parent.resolve(), self.where(kp))

    def file_name(self, kp: tuple, value, suffix: str = ".gguf") -> str:
        text = self.string(kp, value, what="a file name")
        if not SAFE_FILE_RE.match(text) or ".." in text or not text.endswith(suffix):
            raise self.fail(kp, f"{text!r} is not a plain file name ending in {suffix}",
                            hint="letters, digits, '.', '_' and '-' only; no folders")
        return text

    def repo_path(self, kp: tuple, value) -> str:
        """A file path inside a Hub repo: relative, no '..', no backslashes."""
        text = self.string(kp, value, what="a file path in the repo")
        parts = text.split("/")
        if text.startswith("/") or "\\" in text or any(p in ("", ".", "..") for p in parts):
            raise self.fail(kp, f"{text!r} is not a plain path inside the repo",
                            hint="e.g. model-00001-of-00003.gguf or subfolder/model.gguf")
        return text

    def hf(self, kp: tuple, value, *, file_key: str) -> HFRef:
        allowed = HF_KEYS if file_key == "files" else HF_FILE_KEYS
        m = self.mapping(kp, value, allowed)
        for key in ("repo", "revision", file_key):
            if key not in m:
                raise self.fail(kp, f"missing key {key!r}")
        repo = self.string(kp + ("repo",), m["repo"], pattern=REPO_RE, what="a repo id like owner/name")
        revision = self._revision(kp + ("revision",), m["revision"])
        raw_files = m[file_key]
        if file_key == "file":
            raw_files = [raw_files]
        if not isinstance(raw_files, list) or not raw_files:
            raise self.fail(kp + (file_key,), "expected a non-empty list of file paths")
        files = tuple(self.repo_path(kp + (file_key, i) if file_key == "files" else kp + (file_key,), f)
                      for i, f in enumerate(raw_files))
        for i, f in enumerate(files):
            if not f.endswith(".gguf"):
                raise self.fail(kp + (file_key,), f"{f!r} is not a .gguf file")
        return HFRef(repo, revision, files, self.where(kp))

    def _revision(self, kp: tuple, value) -> str:
        text = self.string(kp, value, what="a commit hash")
        if not COMMIT_RE.match(text):
            raise self.fail(kp, f"{text!r} is not a pinned revision",
                            hint="use the full 40-character commit hash (a branch or tag can move between "
                                 "nightly runs); find it on the repo's 'Files' page or with "
                                 "`hf api models/ORG/NAME`")
        return text


def _kind(value) -> str:
    if value is None:
        return "nothing"
    return {dict: "a mapping", list: "a list", str: f"{value!r}", bool: f"{value!r}"}.get(type(value), repr(value))


def safe_display_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.")


def load_release(path: str | os.PathLike) -> ReleaseConfig:
    """Load and validate a release YAML (nothing is read or run besides the YAML and profiles)."""
    p = Path(path)
    doc = load_yaml(p, ConfigError)
    r = _Reader(doc)
    data = r.mapping((), doc.data, TOP_KEYS)
    for key in ("name", "license", "source", "tiers", "publish"):
        if key not in data:
            raise ConfigError(f"missing required key {key!r}", where=r.where(()),
                              hint="see docs/release.md for the schema")
    warnings: list[str] = []

    raw_name = r.string(("name",), data["name"], what="a model display name")
    name = safe_display_name(raw_name)
    if not name:
        raise r.fail(("name",), f"{raw_name!r} has no letters or digits to name files with")
    if name != raw_name:
        warnings.append(f"name {raw_name!r} is written as {name!r} in file names")
    title = r.string(("title",), data["title"]) if "title" in data else f"{name} APEX GGUF"
    base_model = None
    if data.get("base_model") is not None:
        base_model = r.string(("base_model",), data["base_model"], pattern=REPO_RE, what="a repo id like owner/name")
    license_ = r.string(("license",), data["license"], pattern=re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$"),
                        what="a license id like apache-2.0 or mit")
    description = " ".join(r.string(("description",), data["description"]).split()) if "description" in data else ""
    tags: list[str] = []
    if "tags" in data:
        if not isinstance(data["tags"], list):
            raise r.fail(("tags",), "expected a list of tags")
        for i, t in enumerate(data["tags"]):
            tags.append(r.string(("tags", i), t, pattern=TAG_RE, what="a tag (letters, digits, . _ + -)"))

    source = _parse_source(r, data["source"])
    tiers = _parse_tiers(r, data["tiers"])
    from apex_orch.quantize.job import check_distinct_outputs, output_name
    for i in range(len(tiers)):   # two tiers mapping to one file name: refused, naming both (issue 15)
        check_distinct_outputs([(t.profile.tier, Path(output_name(name, t.profile.tier))) for t in tiers[:i + 1]],
                               error=ConfigError, where=tiers[i].where)
    imatrix = _parse_imatrix(r, data.get("imatrix"), tiers)
    eval_cfg = _parse_eval(r, data.get("eval"))
    mmproj = _parse_mmproj(r, data["mmproj"], source) if data.get("mmproj") is not None else None
    pub = r.mapping(("publish",), data["publish"], PUBLISH_KEYS)
    if "repo" not in pub:
        raise r.fail(("publish",), "missing key 'repo' (the Hub repo the card and LocalAI entries point at)")
    publish = PublishConfig(
        repo=r.string(("publish", "repo"), pub["repo"], pattern=REPO_RE, what="a repo id like owner/name"),
        private=r.boolean(("publish", "private"), pub["private"]) if "private" in pub else False,
        where=r.where(("publish",)))
    split = None
    if data.get("split_max_size") is not None:
        split = str(data["split_max_size"]).strip()
        if not SIZE_RE.match(split):
            raise r.fail(("split_max_size",), f"{split!r} is not a size like 48G or 500M")
        from apex_orch.quantize.job import parse_size
        if parse_size(split) < 1_000_000:
            raise r.fail(("split_max_size",), f"{split} is too small (at least 1M)")
    output = r.path(("output",), data["output"], suffix=None) if data.get("output") is not None else None
    return ReleaseConfig(path=p, name=name, title=title, base_model=base_model, license=license_,
                         description=description, tags=tuple(tags), source=source, tiers=tiers, imatrix=imatrix,
                         eval=eval_cfg, mmproj=mmproj, publish=publish, split_max_size=split, output=output,
                         warnings=warnings, doc=doc)


def _parse_source(r: _Reader, value) -> SourceConfig:
    kp = ("source",)
    m = r.mapping(kp, value, set(SOURCE_KINDS))
    kinds = [k for k in SOURCE_KINDS if k in m]
    if len(kinds) != 1:
        raise r.fail(kp, f"give exactly one of {', '.join(SOURCE_KINDS)} (got {', '.join(kinds) or 'none'})")
    kind = kinds[0]
    where = r.where(kp + (kind,))
    v = m[kind]
    if kind == "demo":
        if v is not True:
            raise r.fail(kp + ("demo",), "expected `demo: true`")
        return SourceConfig("demo", where=where)
    if kind == "gguf":
        items = v if isinstance(v, list) else [v]
        if not items:
            raise r.fail(kp + ("gguf",), "expected a path or a list of shard paths")
        paths = tuple(r.path(kp + ("gguf", i) if isinstance(v, list) else kp + ("gguf",), item)
                      for i, item in enumerate(items))
        return SourceConfig("gguf", paths=paths, where=where)
    if kind == "hf":
        return SourceConfig("hf", hf=r.hf(kp + ("hf",), v, file_key="files"), where=where)
    c = r.mapping(kp + ("convert",), v, CONVERT_KEYS)
    if "path" in c:
        if "repo" in c or "revision" in c:
            raise r.fail(kp + ("convert",), "give either path (a local checkpoint folder) or repo + revision")
        outtype = str(c.get("outtype", "bf16")).lower()
        if outtype not in CONVERT_OUTTYPES:
            raise r.fail(kp + ("convert", "outtype"), f"{outtype!r} is not one of {', '.join(CONVERT_OUTTYPES)}")
        mf = r.boolean(kp + ("convert", "mistral_format"), c["mistral_format"]) if "mistral_format" in c else False
        return SourceConfig("convert", outtype=outtype, mistral_format=mf, where=where,
                            checkpoint=r.path(kp + ("convert", "path"), c["path"], suffix=None))
    for key in ("repo", "revision"):
        if key not in c:
            raise r.fail(kp + ("convert",), f"missing key {key!r}")
    repo = r.string(kp + ("convert", "repo"), c["repo"], pattern=REPO_RE, what="a repo id like owner/name")
    revision = r._revision(kp + ("convert", "revision"), c["revision"])
    outtype = str(c.get("outtype", "bf16")).lower()
    if outtype not in CONVERT_OUTTYPES:
        raise r.fail(kp + ("convert", "outtype"), f"{outtype!r} is not one of {', '.join(CONVERT_OUTTYPES)}")
    mf = r.boolean(kp + ("convert", "mistral_format"), c["mistral_format"]) if "mistral_format" in c else False
    return SourceConfig("convert", hf=HFRef(repo, revision, (), where), outtype=outtype, mistral_format=mf,
                        where=where)


def _parse_tiers(r: _Reader, value) -> list[TierConfig]:
    if not isinstance(value, list) or not value:
        raise r.fail(("tiers",), "expected a non-empty list of profile names")
    tiers: list[TierConfig] = []
    seen: dict[str, str] = {}
    for i, item in enumerate(value):
        kp = ("tiers", i)
        best_for = None
        if isinstance(item, dict):
            m = r.mapping(kp, item, TIER_KEYS)
            if "profile" not in m:
                raise r.fail(kp, "missing key 'profile'")
            ref = r.string(kp + ("profile",), m["profile"], what="a profile name")
            if "best_for" in m:
                best_for = r.string(kp + ("best_for",), m["best_for"])
        else:
            ref = r.string(kp, item, what="a profile name")
        if ref.endswith((".yaml", ".yml")) and not os.path.isabs(ref):
            ref = str(r.doc.path.parent / ref)
        try:
            prof = load_profile(ref)
        except ApexError as exc:
            raise ConfigError(f"tiers[{i}]: {exc.message}", where=r.where(kp), hint=exc.hint) from None
        if prof.tier in seen:
            raise r.fail(kp, f"tier {prof.tier} is listed twice (also at {seen[prof.tier]})")
        seen[prof.tier] = r.where(kp)
        tiers.append(TierConfig(prof, best_for or prof.best_for or prof.description, r.where(kp)))
    return tiers


def _parse_imatrix(r: _Reader, value, tiers: list[TierConfig]) -> ImatrixConfig | None:
    kp = ("imatrix",)
    m = r.mapping(kp, value, IMATRIX_KEYS) if value is not None else {}
    needs = [t for t in tiers if t.profile.imatrix_required]
    if not needs:
        if value is not None:
            raise r.fail(kp, "no tier needs an imatrix, so this section would do nothing",
                         hint="remove it, or add an I-tier (i-balanced, i-compact, ...)")
        return None
    if "corpus" in m:
        corpus = r.string(kp + ("corpus",), m["corpus"], what="a corpus name or .yaml path")
        if corpus.endswith((".yaml", ".yml")) and not os.path.isabs(corpus):
            corpus = str(r.doc.path.parent / corpus)
    else:
        corpora = {t.profile.corpus or "diverse" for t in needs}
        if len(corpora) > 1:
            raise r.fail(kp, f"the I-tiers' profiles name different corpora ({', '.join(sorted(corpora))}); "
                             "one imatrix is shared by every I-tier", hint="set imatrix.corpus")
        corpus = corpora.pop()
    return ImatrixConfig(
        corpus=corpus,
        ctx=r.integer(kp + ("ctx",), m["ctx"], 64) if "ctx" in m else 512,
        chunks=r.integer(kp + ("chunks",), m["chunks"], 1) if m.get("chunks") is not None else None,
        from_q8=r.boolean(kp + ("from_q8",), m["from_q8"]) if "from_q8" in m else False,
        where=r.where(kp))


def _parse_eval(r: _Reader, value) -> EvalConfig:
    kp = ("eval",)
    if value is None:
        return EvalConfig(enabled=False, where=r.where(()))
    m = r.mapping(kp, value, EVAL_KEYS)
    enabled = r.boolean(kp + ("enabled",), m["enabled"]) if "enabled" in m else True
    text = corpus = None
    if "text" in m and "corpus" in m:
        raise r.fail(kp, "give text or corpus, not both")
    if "text" in m:
        text = r.path(kp + ("text",), m["text"], suffix=None)
    elif "corpus" in m:
        corpus = r.string(kp + ("corpus",), m["corpus"], what="a corpus name")
        if corpus.endswith((".yaml", ".yml")) and not os.path.isabs(corpus):
            corpus = str(r.doc.path.parent / corpus)
    elif enabled:
        raise r.fail(kp, "say what to evaluate on: `text: FILE` or `corpus: NAME`")
    ctx = r.integer(kp + ("ctx",), m["ctx"], 16) if "ctx" in m else 512
    if ctx % 2:
        raise r.fail(kp + ("ctx",), f"{ctx} must be even (the second half of each chunk is scored)")
    gates: list[tuple[str, float]] = []
    if m.get("gates") is not None:
        g = r.mapping(kp + ("gates",), m["gates"], set(GATE_KEYS))
        for key in GATE_KEYS:
            if key in g:
                v = g[key]
                if isinstance(v, bool) or not isinstance(v, (int, float)):
                    raise r.fail(kp + ("gates", key), f"expected a number, got {v!r}")
                gates.append((key, float(v)))
    return EvalConfig(enabled=enabled, text=text, corpus=corpus, ctx=ctx,
                      chunks=r.integer(kp + ("chunks",), m["chunks"], 1) if m.get("chunks") is not None else None,
                      speed=r.boolean(kp + ("speed",), m["speed"]) if "speed" in m else False,
                      gates=tuple(gates), where=r.where(kp))


def _parse_mmproj(r: _Reader, value, source: SourceConfig) -> MmprojConfig:
    kp = ("mmproj",)
    m = r.mapping(kp, value, MMPROJ_KEYS)
    kinds = [k for k in ("file", "hf", "convert") if k in m]
    if len(kinds) != 1:
        raise r.fail(kp, f"give exactly one of file, hf, convert (got {', '.join(kinds) or 'none'})")
    kind = kinds[0]
    name = r.file_name(kp + ("name",), m["name"]) if "name" in m else "mmproj.gguf"
    where = r.where(kp + (kind,))
    if kind == "file":
        return MmprojConfig("file", name, path=r.path(kp + ("file",), m["file"]), where=where)
    if kind == "hf":
        return MmprojConfig("hf", name, hf=r.hf(kp + ("hf",), m["hf"], file_key="file"), where=where)
    c = r.mapping(kp + ("convert",), m["convert"] if m["convert"] is not None else {}, MMPROJ_CONVERT_KEYS)
    outtype = str(c.get("outtype", "f16")).lower()
    if outtype not in MMPROJ_OUTTYPES:
        raise r.fail(kp + ("convert", "outtype"), f"{outtype!r} is not one of {', '.join(MMPROJ_OUTTYPES)}")
    if "repo" in c or "revision" in c:
        if not ("repo" in c and "revision" in c):
            raise r.fail(kp + ("convert",), "give both repo and revision (or neither, to use the source's)")
        ref = HFRef(r.string(kp + ("convert", "repo"), c["repo"], pattern=REPO_RE, what="a repo id"),
                    r._revision(kp + ("convert", "revision"), c["revision"]), (), where)
    elif source.kind == "convert":
        ref = source.hf
        if source.checkpoint is not None:
            mf = r.boolean(kp + ("convert", "mistral_format"), c["mistral_format"]) if "mistral_format" in c \
                else source.mistral_format
            return MmprojConfig("convert", name, outtype=outtype, mistral_format=mf, where=where,
                                checkpoint=source.checkpoint)
    else:
        raise r.fail(kp + ("convert",), "converting the projector needs the safetensors repo",
                     hint="give mmproj.convert.repo and .revision, or use `mmproj: {file: PATH}`")
    mf = r.boolean(kp + ("convert", "mistral_format"), c["mistral_format"]) if "mistral_format" in c \
        else (source.mistral_format if source.kind == "convert" else False)
    return MmprojConfig("convert", name, hf=ref, outtype=outtype, mistral_format=mf, where=where)


# =========================================================================== phase selection

def select_phases(only: str | None = None, skip: str | None = None, from_phase: str | None = None) -> list[str]:
    """The phases to run, in order. --only/--skip take comma-separated names; --from a single one."""
    def parse(text: str, flag: str) -> list[str]:
        names = [n.strip() for n in text.split(",") if n.strip()]
        bad = [n for n in names if n not in PHASES]
        if bad or not names:
            raise UsageError(f"{flag} {text!r}: unknown phase {', '.join(bad) or '(none)'}",
                             hint="phases: " + ", ".join(PHASES))
        return names
    if only and (skip or from_phase):
        raise UsageError("--only cannot be combined with --skip or --from")
    selected = list(PHASES)
    if only:
        wanted = set(parse(only, "--only"))
        selected = [p for p in PHASES if p in wanted]
    if from_phase:
        start = parse(from_phase, "--from")
        if len(start) != 1:
            raise UsageError("--from takes one phase")
        selected = list(PHASES[PHASES.index(start[0]):])
    if skip:
        dropped = set(parse(skip, "--skip"))
        selected = [p for p in selected if p not in dropped]
    return selected


# =========================================================================== state

@dataclass
class PhaseReport:
    name: str
    status: str           # ran | up to date | resolved | skipped | not needed | failed
    seconds: float = 0.0
    detail: str = ""


@dataclass
class ReleaseState:
    """Everything the phases hand to each other."""
    config: ReleaseConfig
    out_dir: Path
    progress: Progress
    source_override: Path | None = None
    source_paths: list[Path] = field(default_factory=list)   # fetched GGUF(s)
    snapshot_dir: Path | None = None                          # convert: the safetensors snapshot
    mmproj_snapshot: Path | None = None
    mmproj_src: Path | None = None                            # mmproj file to include as is
    model_path: Path | None = None                            # the GGUF the tiers are made from
    model: object = None                                      # ModelInfo
    mmproj: Path | None = None                                # the projector in the release folder
    imatrix: object = None                                    # quantize.ImatrixSource
    imatrix_record: dict | None = None
    jobs: list = field(default_factory=list)                  # quantize.QuantizeJob per tier
    files: dict[str, list[Path]] = field(default_factory=dict)
    evals: dict[str, dict] = field(default_factory=dict)
    base_eval: dict | None = None
    converted_now: bool = False
    reports: list[PhaseReport] = field(default_factory=list)
    force: bool = False                                       # --force: redo stale outputs, not refuse

    @property
    def work(self) -> Path:
        return self.out_dir / WORK_DIR

    def tier_of_job(self, job) -> TierConfig:
        return next(t for t in self.config.tiers if t.profile.tier == job.profile.tier)


def default_out_dir(config: ReleaseConfig) -> Path:
    if config.output is not None:
        return config.output.resolve()
    return Path(os.path.abspath(Path("out") / "release" / config.name))


def check_out_dir(out: Path, config: ReleaseConfig) -> None:
    """The release folder gets a README.md and many large files: keep it away from the project,
    the home folder and filesystem roots (a README.md there would be replaced)."""
    out = Path(os.path.abspath(out))
    protected = {Path("/"), Path.home(), config.path.resolve().parent}
    protected |= set(config.path.resolve().parents)
    if out in protected or out == Path(os.path.abspath(os.getcwd())):
        raise ConfigError(f"release folder {out} is a folder that must not receive release files",
                          where=config.output.where if config.output else str(config.path),
                          hint="use a dedicated folder such as out/release/NAME")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"release folder {out} exists and is not a folder", hint="choose another --out-dir")
    card = out / CARD_NAME
    if card.exists():
        from apex_orch.release.card import CARD_MARKER
        head = card.read_text(encoding="utf-8", errors="replace")
        if CARD_MARKER not in head:
            raise OutputExistsError(f"{card} exists and was not written by apex-orch",
                                    hint="move it away or choose another release folder; apex-orch replaces "
                                         "only cards it wrote")


def release_outputs(config: ReleaseConfig, out: Path) -> list[Path]:
    """Every file name a release writes in its folder that could meet an input (tiers and their
    sidecars, the projector, the card)."""
    from apex_orch.core.outputs import sidecars
    from apex_orch.quantize.job import output_name
    finals = [out / output_name(config.name, t.profile.tier) for t in config.tiers]
    if config.mmproj is not None:
        finals.append(out / config.mmproj.name)
    return [x for f in finals for x in (f, *sidecars(f))] + [out / CARD_NAME]


def release_inputs(config: ReleaseConfig, source: Path | None) -> list[Path]:
    """The local files a release reads (what it can know before fetching anything)."""
    found: list[Path] = []
    refs = []
    if source is not None:
        found.append(source)
    elif config.source.kind == "gguf":
        refs += list(config.source.paths)
    if config.mmproj is not None and config.mmproj.kind == "file":
        refs.append(config.mmproj.path)
    if config.eval.text is not None:
        refs.append(config.eval.text)
    for ref in refs:
        try:
            found.append(ref.resolve())
        except ApexError:   # an unset ${VAR}: reported where the path is first needed
            pass
    return found


def check_release_paths(config: ReleaseConfig, out: Path, source: Path | None) -> None:
    """Inputs are never outputs (issue 15): refused before the lock, the log or any phase. The
    projector included as is is hard-linked into the release on purpose: for it, only the same
    path counts."""
    from apex_orch.core.safefiles import check_not_inputs
    flag = "release folder (--out-dir / output:) or source"
    outputs, inputs = release_outputs(config, out), release_inputs(config, source)
    mm = out / config.mmproj.name if config.mmproj is not None and config.mmproj.kind == "file" else None
    check_not_inputs([o for o in outputs if o != mm], inputs, flag=flag)
    if mm is not None:
        check_not_inputs([mm], inputs, flag=flag, hard_links_ok=True)


class ReleaseLock:
    """One release run per folder (flock: released by the kernel even when the run is killed)."""

    def __init__(self, work: Path):
        self.path = work / "lock"
        self.fh = None

    def __enter__(self) -> "ReleaseLock":
        from apex_orch.core.safefiles import open_nofollow, safe_mkdir
        safe_mkdir(self.path.parent)             # .apex-release itself must not be a link elsewhere
        fh = open_nofollow(self.path, "lock")    # a planted link is refused, never truncated through
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "another process"
            fh.close()
            raise LockedError(f"another apex-orch release is running in {self.path.parent.parent} ({holder})",
                              hint="wait for it to finish; the lock frees itself when that process exits") from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()}")
        fh.flush()
        self.fh = fh
        return self

    def __exit__(self, *exc) -> None:
        if self.fh is not None:
            fcntl.flock(self.fh.fileno(), fcntl.LOCK_UN)
            self.fh.close()
            self.fh = None


# =========================================================================== fetch

def _hf_hub():
    try:
        import huggingface_hub
        from huggingface_hub import errors as hf_errors
    except ImportError as exc:  # pragma: no cover - declared dependency
        raise ToolNotFoundError(f"huggingface_hub is not installed: {exc}") from exc
    return huggingface_hub, hf_errors


def _hf_download(ref: HFRef, *, local_only: bool) -> list[Path]:
    """Each file at the pinned commit (the HF cache makes a rerun free and offline)."""
    hub, hf_errors = _hf_hub()
    out = []
    for filename in ref.files:
        try:
            out.append(Path(hub.hf_hub_download(repo_id=ref.repo, filename=filename, revision=ref.revision,
                                                local_files_only=local_only)))
        except (hf_errors.LocalEntryNotFoundError, hf_errors.OfflineModeIsEnabled) as exc:
            raise ConfigError(f"{ref.repo}@{ref.revision[:12]}/{filename} is not in the Hugging Face cache",
                              where=ref.where, hint="run the fetch phase with network access") from exc
        except hf_errors.HfHubHTTPError as exc:
            raise ConfigError(f"{ref.repo}@{ref.revision[:12]}/{filename}: download failed: {exc}",
                              where=ref.where, hint="check repo, revision and file name; gated repos need "
                                                    "`hf auth login`") from exc
    return out


def _hf_snapshot(ref: HFRef, *, local_only: bool) -> Path:
    hub, hf_errors = _hf_hub()
    try:
        return Path(hub.snapshot_download(repo_id=ref.repo, revision=ref.revision, allow_patterns=list(CONVERT_PATTERNS),
                                          local_files_only=local_only))
    except (hf_errors.LocalEntryNotFoundError, hf_errors.OfflineModeIsEnabled) as exc:
        raise ConfigError(f"{ref.repo}@{ref.revision[:12]} is not in the Hugging Face cache", where=ref.where,
                          hint="run the fetch phase with network access") from exc
    except hf_errors.HfHubHTTPError as exc:
        raise ConfigError(f"{ref.repo}@{ref.revision[:12]}: download failed: {exc}", where=ref.where,
                          hint="check repo and revision; gated repos need `hf auth login`") from exc


def _local_ggufs(paths: Iterable[ConfigPath]) -> list[Path]:
    out = []
    for cp in paths:
        p = cp.resolve()
        if not p.is_file():
            raise ConfigError(f"source file not found: {p}", where=cp.where,
                              hint="fix the path, or pass --source PATH")
        out.append(p)
    return out


def fetch_source(state: ReleaseState, run: bool) -> str:
    src = state.config.source
    if state.source_override is not None:
        p = state.source_override
        if not p.is_file():
            raise UsageError(f"--source {p}: file not found")
        state.source_paths = [p]
        return f"source {p.name} (--source)"
    if src.kind == "demo":
        from apex_orch.demo.synthetic import demo_model_path
        state.source_paths = [demo_model_path()]
        return "demo model"
    if src.kind == "gguf":
        state.source_paths = _local_ggufs(src.paths)
        return "local source"
    if src.kind == "hf":
        state.source_paths = _hf_download(src.hf, local_only=not run)
        return f"{len(state.source_paths)} file(s) from {src.hf.repo}"
    if src.checkpoint is not None:
        state.snapshot_dir = _local_checkpoint(src.checkpoint)
        return f"local checkpoint {state.snapshot_dir.name}"
    state.snapshot_dir = _hf_snapshot(src.hf, local_only=not run)
    return f"snapshot of {src.hf.repo}"


def _local_checkpoint(ref: ConfigPath) -> Path:
    p = ref.resolve()
    if not (p / "config.json").is_file():
        raise ConfigError(f"not a Hugging Face checkpoint folder (no config.json): {p}", where=ref.where,
                          hint="point source.convert.path at the folder with config.json and the safetensors")
    return p


def checkpoint_fingerprint(folder: Path) -> str:
    """The content of a local checkpoint folder (every regular file's name and sha256; the
    converter reads config, weights and tokenizer files from it): a changed file reconverts."""
    from apex_orch.core.fingerprint import sha256_bytes, source_sha256
    rows = [f"{f.relative_to(folder).as_posix()} {source_sha256(f)}" for f in sorted(folder.rglob("*"))
            if f.is_file() and not f.is_symlink() and not any(part.startswith(".") for part in
                                                                  f.relative_to(folder).parts)]
    return sha256_bytes("\n".join(rows).encode())


def fetch_mmproj(state: ReleaseState, run: bool) -> str:
    mm, src = state.config.mmproj, state.config.source
    if mm is None:
        return ""
    if mm.kind == "file":
        p = mm.path.resolve()
        if not p.is_file():
            raise ConfigError(f"mmproj file not found: {p}", where=mm.where)
        state.mmproj_src = p
        return ""
    if mm.kind == "hf":
        state.mmproj_src = _hf_download(mm.hf, local_only=not run)[0]
        return f"projector from {mm.hf.repo}"
    if mm.checkpoint is not None:
        state.mmproj_snapshot = _local_checkpoint(mm.checkpoint)
        return ""
    if state.source_override is None and src.kind == "convert" and mm.hf == src.hf:
        state.mmproj_snapshot = state.snapshot_dir
        return ""
    state.mmproj_snapshot = _hf_snapshot(mm.hf, local_only=not run)
    return f"projector snapshot of {mm.hf.repo}"


def phase_fetch(state: ReleaseState, run: bool) -> PhaseReport:
    did = [d for d in (fetch_source(state, run), fetch_mmproj(state, run)) if d]
    src, mm = state.config.source, state.config.mmproj
    remote = state.source_override is None and src.kind in ("hf", "convert") and src.checkpoint is None or (
        mm is not None and mm.kind != "file" and mm.checkpoint is None)
    status = ("ran" if remote else "not needed") if run else "resolved"
    return PhaseReport("fetch", status, detail=", ".join(did) + ("" if remote else " (local, nothing to download)"))


# =========================================================================== convert

def converter_script() -> Path:
    from apex_orch.llama import pin
    return pin.llama_source() / "convert_hf_to_gguf.py"


def convert_argv(snapshot: Path | str, outfile: Path | str, outtype: str, *, mmproj: bool = False,
                 mistral_format: bool = False, name: str | None = None) -> list[str]:
    """The pinned converter, run by this virtualenv's Python (it has gguf/numpy/torch)."""
    argv = [sys.executable, str(converter_script()), str(snapshot), "--outfile", str(outfile),
            "--outtype", outtype]
    if mmproj:
        argv.append("--mmproj")
    if mistral_format:
        argv.append("--mistral-format")
    if name and not mmproj:
        argv += ["--model-name", name]
    return argv


def _converted_path(state: ReleaseState) -> Path:
    src = state.config.source
    return state.work / "source" / f"{state.config.name}-{src.outtype.upper()}.gguf"


def _run_converter(argv_for: Callable[[Path], list[str]], final: Path, inputs: dict, what: str,
                   progress: Progress) -> bool:
    """Run the converter into a temporary name beside `final`; manifest, then rename. False when up to date."""
    from apex_orch.core.fingerprint import file_record
    from apex_orch.llama.tools import build_label, run_tool
    from apex_orch.core.manifest import inputs_key, manifest_path, up_to_date, write_manifest
    from apex_orch.core.outputs import OutputGuard

    key = inputs_key(inputs)
    if final.exists() and up_to_date([final], key)[0]:
        return False
    with OutputGuard(final, force=True) as guard:
        tmp = guard.temp_for(final)
        tmp = tmp.with_name(tmp.name + ".gguf")  # the converter wants a .gguf name
        guard.adopt(tmp, final)
        argv = argv_for(tmp)
        progress(f"convert: {what} -> {final.name}")
        t0 = time.monotonic()
        if not converter_script().is_file():
            raise ToolNotFoundError(f"converter not found: {converter_script()}",
                                    hint=f"run `{pin.setup_command()}` to unpack the pinned llama.cpp source")
        run_tool(argv, log_path=final.with_name(final.name + ".log"), what=f"convert_hf_to_gguf ({what})")
        if not tmp.is_file():
            raise ModelError(f"the converter exited 0 but wrote no {tmp.name}",
                             hint=f"see {final.name}.log beside it")
        from apex_orch.model.gguf_header import read_header
        read_header(tmp)   # a torn or non-GGUF output is an error now, not at quantize time
        guard.commit()
        write_manifest(manifest_path(final), {
            "kind": f"apex-orch convert ({what})", "inputs": inputs, "inputs_key": key, "command": argv,
            "llama_cpp": build_label(),
            "files": [file_record(final)],
            "timings": {"seconds": round(time.monotonic() - t0, 3)}})
    return True


def _include_as_is(src: Path, final: Path, progress: Progress) -> bool:
    """Copy (hard-link when possible) the projector into the release folder, with a manifest."""
    from apex_orch.core.fingerprint import file_record, source_sha256
    from apex_orch.core.manifest import inputs_key, manifest_path, up_to_date, write_manifest
    from apex_orch.core.outputs import OutputGuard

    inputs = {"mmproj_source_sha256": source_sha256(src), "mode": "as is"}
    key = inputs_key(inputs)
    if final.exists() and up_to_date([final], key)[0]:
        return False
    with OutputGuard(final, force=True) as guard:
        tmp = guard.temp_for(final)
        try:
            os.link(os.path.realpath(src), tmp)
        except OSError:
            shutil.copyfile(src, tmp)
        guard.commit()
    write_manifest(manifest_path(final), {
        "kind": "apex-orch mmproj (included as is)", "inputs": inputs, "inputs_key": key,
        "source_name": src.name,
        "files": [file_record(final)]})
    progress(f"convert: projector {src.name} included as is -> {final.name}")
    return True


def check_projector(path: Path) -> dict:
    """An mmproj must be a GGUF vision projector (general.architecture clip)."""
    from apex_orch.model.gguf_header import read_header
    hdr = read_header(path)
    arch = hdr.kv.get("general.architecture")
    if arch != "clip":
        raise ModelError(f"{path.name} is not a vision projector (general.architecture = {arch!r}, expected 'clip')",
                         where=str(path), hint="point mmproj at the projector GGUF (mmproj-*.gguf)")
    return hdr.kv


def convert_source(state: ReleaseState, run: bool) -> str:
    from apex_orch.llama.tools import build_label
    from apex_orch.model.info import read_model
    cfg = state.config
    did = ""
    if state.snapshot_dir is not None:
        final = _converted_path(state)
        origin = {"checkpoint_sha256": checkpoint_fingerprint(state.snapshot_dir)} \
            if cfg.source.checkpoint is not None else {"repo": cfg.source.hf.repo, "revision": cfg.source.hf.revision}
        inputs = {**origin, "outtype": cfg.source.outtype,
                  "mistral_format": cfg.source.mistral_format, "converter": build_label()}
        if run:
            final.parent.mkdir(parents=True, exist_ok=True)
            wrote = _run_converter(lambda tmp: convert_argv(state.snapshot_dir, tmp, cfg.source.outtype,
                                                            mistral_format=cfg.source.mistral_format, name=cfg.name),
                                   final, inputs, "model", state.progress)
            did = ("converted " if wrote else "up to date: ") + final.name
            state.converted_now = state.converted_now or wrote
        elif not final.is_file():
            raise ModelError(f"the converted source {final} does not exist yet",
                             hint="run the convert phase (drop --skip convert / --from)")
        state.model_path = final
    else:
        state.model_path = state.source_paths[0]
    state.model = read_model(state.model_path)
    if len(state.source_paths) > 1 and [Path(os.path.abspath(p)) for p in state.model.paths] != \
            [Path(os.path.abspath(p)) for p in state.source_paths]:
        raise ModelError(f"the source lists {len(state.source_paths)} files but they are not the shards of one "
                         f"split model in order (its shards: {', '.join(p.name for p in state.model.paths)})",
                         where=state.config.source.where, hint="list every shard, first to last, or only the first")
    return did


def convert_mmproj(state: ReleaseState, run: bool) -> str:
    from apex_orch.llama.tools import build_label
    from apex_orch.core.manifest import manifest_path
    mm = state.config.mmproj
    if mm is None:
        return ""
    final = state.out_dir / mm.name
    did = ""
    if run:
        state.out_dir.mkdir(parents=True, exist_ok=True)
        if mm.kind == "convert":
            origin = {"checkpoint_sha256": checkpoint_fingerprint(state.mmproj_snapshot)} if mm.checkpoint is not None \
                else {"repo": mm.hf.repo, "revision": mm.hf.revision}
            inputs = {**origin, "outtype": mm.outtype, "mmproj": True,
                      "mistral_format": mm.mistral_format, "converter": build_label()}
            wrote = _run_converter(lambda tmp: convert_argv(state.mmproj_snapshot, tmp, mm.outtype, mmproj=True,
                                                            mistral_format=mm.mistral_format),
                                   final, inputs, f"projector {mm.outtype.upper()}", state.progress)
        else:
            wrote = _include_as_is(state.mmproj_src, final, state.progress)
        did = ("projector " if wrote else "projector up to date: ") + final.name
        state.converted_now = state.converted_now or wrote
    elif not (final.is_file() and manifest_path(final).is_file()):
        raise ModelError(f"the projector {final} is not in the release folder yet",
                         hint="run the convert phase (drop --skip convert / --from)")
    check_projector(final)
    state.mmproj = final
    return did


def phase_convert(state: ReleaseState, run: bool) -> PhaseReport:
    did = [d for d in (convert_source(state, run), convert_mmproj(state, run)) if d]
    if not did:
        return PhaseReport("convert", "not needed" if run else "resolved", detail="source is already GGUF")
    if not run:
        return PhaseReport("convert", "resolved", detail="; ".join(did))
    return PhaseReport("convert", "ran" if state.converted_now else "up to date", detail="; ".join(did))


# =========================================================================== imatrix

def _imatrix_plan(state: ReleaseState, threads: int | None = None):
    from apex_orch.calibration import imatrix as im
    c = state.config.imatrix
    return im.plan_imatrix(state.model_path, c.corpus, ctx=c.ctx, chunks=c.chunks, threads=threads,
                           from_q8=c.from_q8)


def phase_imatrix(state: ReleaseState, run: bool) -> PhaseReport:
    from apex_orch.calibration import imatrix as im
    from apex_orch.quantize.job import resolve_imatrix
    cfg = state.config
    if cfg.imatrix is None:
        return PhaseReport("imatrix", "not needed", detail="no I-tier")
    plan = _imatrix_plan(state)
    status = "up to date" if plan.cached else "ran"
    if not plan.cached:
        if not run:
            raise ImatrixError(f"the imatrix for corpus {cfg.imatrix.corpus} has not been computed yet",
                               hint="run the imatrix phase (drop --skip imatrix / --from)")
        state.progress(f"imatrix: corpus {plan.corpus_name}, {plan.chunks} chunks x {plan.ctx} tokens "
                       f"(one imatrix for {len(cfg.i_tiers)} I-tiers)")
    path = im.run_imatrix(plan, on_progress=state.progress) if run else plan.cache_path
    state.imatrix = resolve_imatrix(state.model, path)
    description = ""
    try:
        from apex_orch.calibration.corpus import load_corpus_spec
        description = load_corpus_spec(cfg.imatrix.corpus).description or ""
    except ApexError:
        pass
    state.imatrix_record = {"corpus": plan.corpus_name, "description": " ".join(description.split()),
                            "ctx": plan.ctx, "chunks": plan.chunks, "tokens": plan.tokens,
                            "sha256": state.imatrix.sha256}
    if not run:
        status = "resolved"
    return PhaseReport("imatrix", status, detail=f"{plan.chunks} chunks x {plan.ctx} from {plan.corpus_name}")


# =========================================================================== quantize

def plan_jobs(state: ReleaseState, imatrix=None) -> list:
    from apex_orch.quantize.job import plan_quantize
    cfg = state.config
    imatrix = imatrix if imatrix is not None else state.imatrix
    jobs = []
    for t in cfg.tiers:
        jobs.append(plan_quantize(state.model_path, t.profile, out_dir=state.out_dir, name=cfg.name,
                                  imatrix=imatrix if t.profile.imatrix_required else None,
                                  split_max_size=cfg.split_max_size, model=state.model))
    return jobs


def tier_files(job) -> list[Path]:
    """The final names of a tier's output: its split parts when they exist, else the one file."""
    if job.split_max_size:
        parts = sorted(job.output.parent.glob(job.output.name[:-5] + "-*-of-*.gguf"))
        if parts:
            return parts
    return [job.output]


def existing_outputs(job) -> list[Path] | None:
    """The tier's files when a valid manifest says they come from exactly these inputs."""
    from apex_orch.core.manifest import up_to_date
    finals = tier_files(job)
    if not all(f.exists() for f in finals):
        return None
    return finals if up_to_date(finals, job.key)[0] else None


def stale_outputs(job) -> bool:
    """True when some of the tier's files exist but are not the ones its manifest and inputs
    describe (changed bytes, other inputs, a damaged or missing manifest)."""
    from apex_orch.core.errors import ManifestError
    from apex_orch.core.manifest import up_to_date
    finals = tier_files(job)
    if not any(f.exists() for f in finals):
        return False
    if not all(f.exists() for f in finals):
        return True
    try:
        return not up_to_date(finals, job.key)[0]
    except ManifestError:
        return True


def phase_quantize(state: ReleaseState, run: bool, jobs_n: int | None) -> PhaseReport:
    from apex_orch.quantize.job import run_many
    state.jobs = plan_jobs(state)
    if run:
        # --force redoes exactly the stale tiers; up-to-date tiers are still skipped.
        stale = [j for j in state.jobs if stale_outputs(j)] if state.force else []
        for j in stale:
            state.progress(f"quantize: {j.output.name} is stale; --force redoes it")
        rest = [j for j in state.jobs if j not in stale]
        done = (run_many(rest, parallel=jobs_n, progress=state.progress) if rest else []) + \
            (run_many(stale, parallel=jobs_n, force=True, progress=state.progress) if stale else [])
        order = {id(j): i for i, j in enumerate(state.jobs)}
        results = sorted(done, key=lambda r: order[id(r.job)])
        state.files = {r.job.profile.tier: list(r.files) for r in results}
        skipped = sum(1 for r in results if r.skipped)
        status = "up to date" if skipped == len(results) else "ran"
        return PhaseReport("quantize", status,
                           detail=f"{len(results) - skipped} written, {skipped} up to date")
    for job in state.jobs:
        files = existing_outputs(job)
        if files:
            state.files[job.profile.tier] = files
    missing = [j.profile.tier for j in state.jobs if j.profile.tier not in state.files]
    return PhaseReport("quantize", "resolved",
                       detail=f"{len(state.files)} tiers present" + (f"; missing: {', '.join(missing)}" if missing else ""))


def _require_all_files(state: ReleaseState, phase: str) -> None:
    missing = [j.profile.tier for j in state.jobs if j.profile.tier not in state.files]
    if missing:
        raise ModelError(f"{phase}: no up-to-date output for tier(s) {', '.join(missing)}",
                         hint="run the quantize phase first (drop --skip quantize / --only)")


# =========================================================================== eval

def _eval_record_path(state: ReleaseState, file_name: str) -> Path:
    return state.work / "eval" / f"{file_name}.json"


def _eval_settings(cfg: EvalConfig):
    from apex_orch.evaluation.evaluate import EvalSettings, default_threads
    return EvalSettings(n_ctx=cfg.ctx, chunks=cfg.chunks, n_threads=default_threads())


def _text_facts(state: ReleaseState):
    from apex_orch.evaluation.evaluate import text_facts
    e = state.config.eval
    if e.text is not None:
        return text_facts(text=e.text.resolve())
    return text_facts(corpus=e.corpus)


def _eval_inputs(files: list[Path], base_fp: str, text_sha: str, settings, speed: bool) -> dict:
    from apex_orch.core.fingerprint import source_sha256
    from apex_orch.llama.tools import build_label
    # full sha256 of each file (free after the quantize phase verified it: memoised by stat)
    return {"files": [source_sha256(f) for f in files], "base": base_fp, "text_sha256": text_sha,
            "settings": settings.numeric_key(), "speed": speed, "llama": build_label()}


def _summary(result) -> dict:
    k = result.kld
    sp = result.speed
    return {"ppl": result.ppl, "ppl_err": result.ppl_err, "base_ppl": result.base_ppl,
            "kld_mean": k.kld_mean if k else None, "kld_p999": k.kld_p999 if k else None,
            "ppl_ratio": k.mean_ppl_ratio if k else None, "same_top_p": k.same_top_p if k else None,
            "pp_tokens_per_s": sp.pp_tokens_per_s if sp else None, "tg_tokens_per_s": sp.tg_tokens_per_s if sp else None,
            "n_chunks": result.n_chunks, "n_ctx": result.settings.get("n_ctx")}


def _read_record(path: Path, key: str) -> dict | None:
    from apex_orch.core.manifest import up_to_date
    if not path.is_file():
        return None
    try:
        fresh, _ = up_to_date([path], key)
    except ApexError:
        return None
    return json.loads(path.read_text()) if fresh else None


def _write_record(path: Path, key: str, inputs: dict, body: dict) -> None:
    from apex_orch.core.fingerprint import file_record
    from apex_orch.core.manifest import manifest_path, write_manifest
    from apex_orch.core.outputs import atomic_write_text
    from apex_orch.core.safefiles import safe_mkdir
    safe_mkdir(path.parent)
    atomic_write_text(path, json.dumps(body, indent=2, sort_keys=True, default=str) + "\n")
    write_manifest(manifest_path(path), {"kind": "apex-orch release eval", "inputs": inputs, "inputs_key": key,
                                         "files": [file_record(path)]})


def tier_gate_failures(summary: dict, gates: dict[str, float], label: str) -> list[str]:
    out = []
    checks = [("max_mean_kld", "kld_mean", "mean KLD", lambda v, g: v <= g),
              ("max_ppl_ratio", "ppl_ratio", "PPL(Q)/PPL(base)", lambda v, g: v <= g),
              ("min_same_top_p", "same_top_p", "same top p %", lambda v, g: v >= g),
              ("max_kld_99_9", "kld_p999", "KLD 99.9%", lambda v, g: v <= g)]
    for key, field_, name, ok in checks:
        if key not in gates:
            continue
        value = summary.get(field_)
        if value is None or not ok(value, gates[key]):
            shown = "n/a" if value is None else f"{value:.6g}"
            out.append(f"{label}: {name} {shown} fails {key} {gates[key]:g}")
    return out


def phase_eval(state: ReleaseState, run: bool) -> PhaseReport:
    from apex_orch.evaluation.evaluate import ensure_base_cache, measure_speed, model_facts, plan_eval, run_eval
    cfg = state.config
    e = cfg.eval
    if not e.enabled:
        return PhaseReport("eval", "not needed", detail="eval.enabled is false: benchmarks pending")
    settings = _eval_settings(e)
    tf = _text_facts(state)
    base = model_facts(state.model_path)
    ran = fresh = 0
    failures: list[str] = []
    base_inputs = {"base": base.fingerprint, "text_sha256": tf.sha256, "settings": settings.numeric_key(),
                   "speed": e.speed, "kind": "base"}
    from apex_orch.core.manifest import inputs_key
    base_key = inputs_key(base_inputs)
    base_path = _eval_record_path(state, "base")
    for job in state.jobs:
        files = state.files.get(job.profile.tier)
        if not files:
            continue
        inputs = _eval_inputs(files, base.fingerprint, tf.sha256, settings, e.speed)
        key = inputs_key(inputs)
        path = _eval_record_path(state, files[0].name)
        record = _read_record(path, key)
        if record is None and run:
            state.progress(f"eval: {files[0].name} against {Path(base.path).name} ({e.text_label()}, "
                           f"ctx {e.ctx}, chunks {e.chunks or 'all'})")
            plan = plan_eval(files[0], base=state.model_path, settings=settings, speed=e.speed, text_facts_=tf)
            result = run_eval(plan, progress=state.progress)
            record = {"tier": job.profile.tier, "file": files[0].name, "size": sum(f.stat().st_size for f in files),
                      "summary": _summary(result), "text": e.text_label(), "settings": settings.to_dict()}
            _write_record(path, key, inputs, record)
            ran += 1
        elif record is not None:
            fresh += 1
        if record is not None:
            state.evals[job.profile.tier] = record
            gates = dict(job.profile.gates)
            gates.update(dict(e.gates))
            failures += tier_gate_failures(record["summary"], gates, files[0].name)
    if state.evals:
        record = _read_record(base_path, base_key)
        if record is None and run:
            from apex_orch.evaluation.base_cache import BaseLogProbs
            with BaseLogProbs(ensure_base_cache(base, tf, settings, progress=state.progress)) as cache:
                ppl, err = cache.meta["base_ppl"], cache.meta["base_ppl_err"]
            sp = measure_speed(state.model_path, settings) if e.speed else None
            record = {"file": Path(base.path).name, "size": base.size_bytes, "type": _source_type(state.model),
                      "ppl": ppl, "ppl_err": err, "pp_tokens_per_s": sp.pp_tokens_per_s if sp else None,
                      "tg_tokens_per_s": sp.tg_tokens_per_s if sp else None}
            _write_record(base_path, base_key, base_inputs, record)
        state.base_eval = record
    if failures:
        raise GateFailedError("quality gate failed:\n  " + "\n  ".join(failures),
                              hint="the results are kept in the release folder; the card and publish phases "
                                   "did not run. Pick other tiers or relax eval.gates in the release config")
    pending = len(state.jobs) - len(state.evals)
    detail = f"{ran} evaluated, {fresh} up to date" + (f", {pending} pending" if pending else "")
    if not run:
        return PhaseReport("eval", "resolved", detail=detail)
    return PhaseReport("eval", "ran" if ran else "up to date", detail=detail)


def _source_type(model) -> str:
    return getattr(model, "source_ftype_label", "?")


# =========================================================================== card + LocalAI

def collect_card_facts(state: ReleaseState):
    from apex_orch.release import card
    return card.facts_from_release(state)


def phase_card(state: ReleaseState, run: bool, push: bool = False) -> PhaseReport:
    from apex_orch.release import card
    from apex_orch.release import localai
    from apex_orch.core.outputs import atomic_write_text
    _require_all_files(state, "card")
    facts = collect_card_facts(state)
    text = card.render_card(facts)
    entries = localai.render_entries(facts)
    if not run:
        card_path = state.out_dir / CARD_NAME
        if push and not (card_path.is_file() and card_path.read_text(encoding="utf-8") == text):
            from apex_orch.core.errors import PublishError
            raise PublishError(f"{card_path} is missing or out of date, so it cannot be published",
                               hint="run the card phase (drop --skip card / --from)")
        return PhaseReport("card", "resolved")
    changed = 0
    targets = {state.out_dir / CARD_NAME: text}
    targets.update({state.out_dir / LOCALAI_DIR / name: body for name, body in entries.items()})
    from apex_orch.core.safefiles import safe_mkdir
    safe_mkdir(state.out_dir / LOCALAI_DIR)   # never a link to a folder elsewhere
    for path, body in targets.items():
        if path.is_file() and path.read_text(encoding="utf-8") == body:
            continue
        atomic_write_text(path, body)
        changed += 1
    stale = [p for p in (state.out_dir / LOCALAI_DIR).glob("*.yaml") if p not in targets]
    for p in stale:   # an entry for a tier the config no longer lists
        p.unlink()
        changed += 1
    return PhaseReport("card", "ran" if changed else "up to date",
                       detail=f"{CARD_NAME} + {len(entries)} LocalAI entries" + ("" if changed else " unchanged"))


# =========================================================================== publish

def phase_publish(state: ReleaseState, run: bool, push: bool, api=None) -> PhaseReport:
    from apex_orch.release import publish
    if not (run and push):
        return PhaseReport("publish", "skipped", detail=f"local release only; --push uploads it to "
                                                        f"{state.config.publish.repo}")
    _require_all_files(state, "publish")
    plan = publish.plan_publish(state)
    result = publish.execute_publish(plan, api=api, progress=state.progress)
    publish.write_record(state, plan, result)
    return PhaseReport("publish", "ran" if result.uploaded else "up to date", detail=result.message)


# =========================================================================== runner

@dataclass
class ReleaseResult:
    state: ReleaseState
    reports: list[PhaseReport]
    seconds: float


class _Log:
    """Progress to the caller and to <release>/.apex-release/release.log (timestamped there only)."""

    def __init__(self, path: Path, emit: Progress):
        self.path = path
        self.emit = emit
        self.fh = None

    def open(self) -> None:
        from apex_orch.core.safefiles import open_nofollow, safe_mkdir
        safe_mkdir(self.path.parent)
        self.fh = open_nofollow(self.path, "a")   # never appended through a planted link
        self.fh.write(f"\n=== release run started {time.strftime('%Y-%m-%d %H:%M:%S')} pid {os.getpid()}\n")
        self.fh.flush()

    def __call__(self, msg: str) -> None:
        if self.fh is not None and not msg.startswith("["):
            self.fh.write(f"{time.strftime('%H:%M:%S')} {msg}\n")
            self.fh.flush()
        self.emit(msg)

    def close(self) -> None:
        if self.fh is not None:
            self.fh.close()
            self.fh = None


def run_release(config: ReleaseConfig, *, phases: list[str] | None = None, push: bool = False,
                jobs: int | None = None, out_dir: Path | None = None, source: Path | None = None,
                progress: Progress | None = None, api=None, force: bool = False) -> ReleaseResult:
    """Run the selected phases; the others resolve their earlier results for the ones after them.
    `force`: a selected phase redoes its stale outputs instead of stopping on them."""
    selected = list(phases) if phases is not None else list(PHASES)
    out = Path(os.path.abspath(out_dir)) if out_dir else default_out_dir(config)
    check_out_dir(out, config)
    check_release_paths(config, out, Path(os.path.abspath(source)) if source else None)
    emit = progress or (lambda _m: None)
    log = _Log(out / WORK_DIR / "release.log", emit)
    state = ReleaseState(config, out, log, source_override=Path(os.path.abspath(source)) if source else None)
    state.force = force
    t_all = time.monotonic()
    with ReleaseLock(out / WORK_DIR):
        log.open()
        try:
            for w in config.warnings:
                log(f"warning: {w}")
            last_needed = max(PHASES.index(p) for p in selected) if selected else -1
            for i, name in enumerate(PHASES):
                if i > last_needed:
                    break
                run = name in selected
                t0 = time.monotonic()
                if run:
                    log(f"== {name}")
                try:
                    report = _PHASE_FUNCS[name](state, run, jobs=jobs, push=push, api=api)
                except BaseException:
                    state.reports.append(PhaseReport(name, "failed", time.monotonic() - t0))
                    _write_run_record(state, selected)
                    raise
                report.seconds = time.monotonic() - t0
                state.reports.append(report)
                if run:
                    log(f"{name}: {report.status} in {report.seconds:.1f} s" + (f" ({report.detail})" if report.detail else ""))
            _write_run_record(state, selected)
        finally:
            log.close()
    return ReleaseResult(state, state.reports, time.monotonic() - t_all)


def resolve_release(config: ReleaseConfig, *, out_dir: Path | None = None, source: Path | None = None,
                    through: str = "eval") -> ReleaseState:
    """Find (never compute) every phase's results up to `through`, e.g. to re-render a card."""
    out = Path(os.path.abspath(out_dir)) if out_dir else default_out_dir(config)
    state = ReleaseState(config, out, lambda _m: None,
                         source_override=Path(os.path.abspath(source)) if source else None)
    for name in PHASES[:PHASES.index(through) + 1]:
        state.reports.append(_PHASE_FUNCS[name](state, False))
    return state


_PHASE_FUNCS = {
    "fetch": lambda s, run, **kw: phase_fetch(s, run),
    "convert": lambda s, run, **kw: phase_convert(s, run),
    "imatrix": lambda s, run, **kw: phase_imatrix(s, run),
    "quantize": lambda s, run, jobs=None, **kw: phase_quantize(s, run, jobs),
    "eval": lambda s, run, **kw: phase_eval(s, run),
    "card": lambda s, run, push=False, **kw: phase_card(s, run, push),
    "publish": lambda s, run, push=False, api=None, **kw: phase_publish(s, run, push, api),
}


def _write_run_record(state: ReleaseState, selected: list[str]) -> None:
    from apex_orch.core.outputs import atomic_write_text
    doc = {"config": str(state.config.path), "selected": selected,
           "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
           "phases": [{"name": r.name, "status": r.status, "seconds": round(r.seconds, 3), "detail": r.detail}
                      for r in state.reports]}
    atomic_write_text(state.work / "last-run.json", json.dumps(doc, indent=2) + "\n")


def format_reports(result: ReleaseResult) -> str:
    from apex_orch.core.text import table
    rows = [[r.name, r.status, f"{r.seconds:.1f}", r.detail] for r in result.reports]
    return table(["phase", "status", "seconds", "detail"], rows, align="llrl") + \
        f"\nrelease folder: {result.state.out_dir}  ({result.seconds:.1f} s)"


# =========================================================================== dry run

def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def _preview_imatrix(state: ReleaseState, plan_or_none):
    """A stand-in ImatrixSource for sizing and commands before the imatrix exists: full coverage,
    the cache path it will have (or a placeholder), a 64-hex placeholder hash."""
    from apex_orch.calibration.imatrix import ImatrixEntry, ImatrixInfo, expected_tensors
    from apex_orch.quantize.job import ImatrixSource
    entries = {}
    for t in expected_tensors(state.model):
        n_mat = 1
        for d in t.shape[2:]:
            n_mat *= d
        entries[t.name] = ImatrixEntry(t.name, t.shape[0], n_mat, (1,) * n_mat)
    c = state.config.imatrix
    path = plan_or_none.cache_path if plan_or_none is not None else Path("<imatrix from phase imatrix>.gguf")
    dataset = str(plan_or_none.corpus_file) if plan_or_none is not None else f"{c.corpus}.txt"
    info = ImatrixInfo(path=path, chunk_count=plan_or_none.chunks if plan_or_none else (c.chunks or 0),
                       chunk_size=c.ctx, datasets=(dataset,), entries=entries)
    return ImatrixSource(path, "0" * 64, dataset, info)


def describe_release(config: ReleaseConfig, *, phases: list[str] | None = None, push: bool = False,
                     jobs: int | None = None, out_dir: Path | None = None, source: Path | None = None) -> str:
    """The whole plan, computed without running or writing anything."""
    from apex_orch.quantize.job import default_jobs
    selected = list(phases) if phases is not None else list(PHASES)
    out = Path(os.path.abspath(out_dir)) if out_dir else default_out_dir(config)
    check_out_dir(out, config)
    check_release_paths(config, out, Path(os.path.abspath(source)) if source else None)
    notes: list[str] = []
    state = ReleaseState(config, out, notes.append,
                         source_override=Path(os.path.abspath(source)) if source else None)
    cfg = config
    lines = [f"release   {cfg.name}  ({cfg.display_path()})",
             f"title     {cfg.title}",
             f"output    {out}",
             f"phases    {' -> '.join(p if p in selected else f'({p})' for p in PHASES)}"
             + ("" if push else "   [publish uploads only with --push]")]
    for w in cfg.warnings:
        lines.append(f"warning   {w}")
    lines.append("")
    # fetch + convert
    lines.append(f"fetch     {cfg.source.describe() if source is None else f'local GGUF {source} (--source)'}")
    try:
        fetch_source(state, run=False)
        fetched = True
    except ApexError as exc:
        fetched = False
        lines.append(f"          not fetched yet: {exc.message}")
    mmproj_size = 0
    if cfg.mmproj is not None:
        mm = cfg.mmproj
        what = {"file": lambda: f"file {mm.path.raw}",
                "hf": lambda: f"{mm.hf.repo}@{mm.hf.revision[:12]}/{mm.hf.files[0]}",
                "convert": lambda: ("converted from " + (f"local checkpoint {mm.checkpoint.raw}" if mm.checkpoint
                                                         else f"{mm.hf.repo}@{mm.hf.revision[:12]}")
                                    + f" at {mm.outtype.upper()}")}[mm.kind]()
        lines.append(f"mmproj    {what} -> {mm.name} (never touched by profiles)")
        try:
            fetch_mmproj(state, run=False)
            if state.mmproj_src is not None:
                mmproj_size = state.mmproj_src.stat().st_size
                lines.append(f"          {state.mmproj_src} ({_gb(mmproj_size)})")
        except ApexError as exc:
            lines.append("          not available here: " + exc.render().replace("\n", "\n          "))
    if cfg.source.kind == "convert" and source is None:
        snap = state.snapshot_dir or Path("<snapshot>")
        lines.append("convert   $ " + shlex.join(convert_argv(snap, _converted_path(state), cfg.source.outtype,
                                                           mistral_format=cfg.source.mistral_format, name=cfg.name)))
    if cfg.mmproj is not None and cfg.mmproj.kind == "convert":
        snap = state.mmproj_snapshot or Path("<snapshot>")
        lines.append("convert   $ " + shlex.join(convert_argv(snap, out / cfg.mmproj.name, cfg.mmproj.outtype,
                                                           mmproj=True, mistral_format=cfg.mmproj.mistral_format)))
    model_known = False
    if fetched:
        try:
            convert_source(state, run=False)
            model_known = True
        except ApexError as exc:
            if state.model_path is not None and Path(state.model_path).is_file():
                raise   # the source exists but is refused (a header that disagrees with itself...)
            lines.append(f"          not converted yet: {exc.message}")
    if not model_known:
        lines.append("")
        lines.append("the source GGUF does not exist yet, so tier sizes cannot be predicted; run the fetch and "
                     "convert phases first (or pass --source PATH)")
        return "\n".join(lines)
    m = state.model
    lines.append(f"source    {state.model_path} ({_gb(m.file_size)}, {m.arch}, {m.block_count} blocks, "
                 f"{m.expert_count} experts, {m.source_ftype_label})")
    lines.append("")
    # imatrix
    im_plan = None
    if cfg.imatrix is not None:
        c = cfg.imatrix
        lines.append(f"imatrix   corpus {c.corpus}, ctx {c.ctx}, chunks {c.chunks or 'all'}; computed once for "
                     f"{len(cfg.i_tiers)} I-tiers ({', '.join(t.tier for t in cfg.i_tiers)})")
        try:
            im_plan = _imatrix_plan(state)
            lines.append(f"          {'cached: ' + str(im_plan.cache_path) if im_plan.cached else 'not computed yet'}")
            lines.append("          $ " + shlex.join(im_plan.argv))
        except ApexError as exc:
            lines.append(f"          cannot be planned here: {exc.message}")
    else:
        lines.append("imatrix   not needed (no I-tier)")
    # quantize
    stand_in = None
    if cfg.imatrix is not None:
        if im_plan is not None and im_plan.cached:
            from apex_orch.quantize.job import resolve_imatrix
            stand_in = resolve_imatrix(m, im_plan.cache_path)
        else:
            stand_in = _preview_imatrix(state, im_plan)
    job_list = plan_jobs(state, imatrix=stand_in)
    from apex_orch.quantize.job import parse_size
    split = parse_size(cfg.split_max_size) if cfg.split_max_size else None
    lines.append("")
    n_par = jobs or default_jobs(job_list)
    lines.append(f"quantize  {len(job_list)} tiers, {n_par} at a time"
                 + (f", split into parts of at most {cfg.split_max_size}" if split else ""))
    from apex_orch.core.text import table
    rows = []
    total = 0
    for job in job_list:
        size = job.predicted_size
        total += size
        parts = -(-size // split) if split and size > split else 1
        state_txt = "present" if existing_outputs(job) else "missing"
        rows.append([job.profile.tier, job.output.name, _gb(size), f"{size / 2**30:.2f}", f"{job.plan.bpw:.3f}",
                     str(parts) if parts > 1 else "1", state_txt])
    lines.append(table(["tier", "file", "size", "GiB", "bpw", "parts", "state"], rows, align="llrrrrl"))
    for job in job_list:
        argv = job.argv(job.output, job.output.with_name(job.output.name + ".tensor-types.txt"))
        lines.append(f"  {job.profile.tier}: $ " + shlex.join(argv))
    # eval
    lines.append("")
    e = cfg.eval
    if e.enabled:
        gates = ", ".join(f"{k} {v:g}" for k, v in e.gates) or "none"
        lines.append(f"eval      {len(job_list)} files against {state.model_path.name} on {e.text_label()}, ctx {e.ctx}, "
                     f"chunks {e.chunks or 'all'}, one base-logits cache; speed {'yes' if e.speed else 'no'}; "
                     f"gates: {gates}")
    else:
        lines.append("eval      disabled (the card says benchmarks pending)")
    lines.append(f"card      {out / CARD_NAME} + {len(job_list)} LocalAI entries in {out / LOCALAI_DIR}")
    lines.append(f"publish   {cfg.publish.repo} ({'private' if cfg.publish.private else 'public'}); "
                 + ("runs with --push" if push else "not without --push"))
    # disk
    need = total
    if split:
        need += max((j.predicted_size for j in job_list if j.predicted_size > split), default=0)
    if cfg.mmproj is not None:
        need += mmproj_size
    probe = out
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    present = sum(f.stat().st_size for j in job_list for f in (existing_outputs(j) or []))
    lines.append("")
    lines.append(f"disk      the release needs {_gb(need)} (tiers {_gb(total)}"
                 + (", split scratch for the largest tier" if split else "")
                 + (f", projector {_gb(mmproj_size)}" if mmproj_size else "") + ")"
                 + (f", {_gb(present)} already present" if present else "")
                 + f"; {_gb(free)} free in {probe}"
                 + ("" if free + present >= need else "  -> NOT ENOUGH"))
    for n in notes:
        lines.append(f"note      {n}")
    return "\n".join(lines)
