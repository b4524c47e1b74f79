"""Reads a release YAML into release.config's types, strictly, with `file:line` in every error.

`load_release(path)` takes the YAML's path and gives a ReleaseConfig; it reads nothing but the
YAML, the tier profiles and the sensitivity results of `fit:` tiers (release.fit_tiers; no model,
no network), so `--dry-run` and the schema tests are cheap.
`_Reader` is the typed access (a mapping with only allowed keys, a string matching a pattern, a
path relative to the YAML's folder...) that turns any mismatch into a ConfigError pointing at the
line; the `_parse_*` functions read one section each, in the order the schema lists them.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from apex_orch.core.errors import ApexError, ConfigError
from apex_orch.core.schema import check_keys, key_name, read_section, yaml_keys
from apex_orch.core.sizes import MB, Size, SizeError, read_size
from apex_orch.core.text import file_name_part
from apex_orch.core.yamlio import YamlDoc, load_yaml
from apex_orch.evaluation.task_files import TASK_KINDS
from apex_orch.evaluation.tasks import TaskSettings
from apex_orch.plan.gates import GATE_KEYS
from apex_orch.plan.profiles import load_profile
from apex_orch.quantize.job import MIN_SPLIT_SIZE, check_distinct_outputs, output_name
from apex_orch.release.config import (CONVERT_KEYS, CONVERT_OUTTYPES, EVAL_KEYS, HF_FILE_KEYS, HF_KEYS, IMATRIX_KEYS,
                                      MMPROJ_CONVERT_KEYS, MMPROJ_KEYS, MMPROJ_OUTTYPES, PUBLISH_KEYS, RESOURCES_KEYS,
                                      SOURCE_KINDS, TIER_KEYS, TOP_KEYS, ConfigPath, EvalConfig, HFRef, ImatrixConfig,
                                      MmprojConfig, MtpConfig, PublishConfig, ReleaseConfig, ResourcesConfig,
                                      SourceConfig, SpeculativeDoc, SpeedDoc, TaskConfig, TaskDoc, TierConfig)
from apex_orch.release.baselines import parse_baselines
from apex_orch.release.fit_tiers import parse_fit_tier
from apex_orch.release.mtp import parse_mtp

COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")
REPO_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}$")
SAFE_FILE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,200}$")
TAG_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,63}$")


class _Reader:
    """Typed access to the YAML with file:line errors."""

    def __init__(self, doc: YamlDoc):
        self.doc = doc

    def where(self, kp: tuple) -> str:
        return self.doc.where(kp)

    def fail(self, kp: tuple, message: str, hint: str | None = None) -> ConfigError:
        dotted = key_name(kp)
        return ConfigError(f"{dotted}: {message}" if dotted else message, where=self.where(kp), hint=hint)

    def mapping(self, kp: tuple, value, allowed: set[str]) -> dict:
        if not isinstance(value, dict):
            raise self.fail(kp, f"expected a mapping, got {_kind(value)}")
        check_keys(value, allowed, self.where, kp, ConfigError)
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

    def size(self, kp: tuple, value, minimum: int) -> Size:
        """A size in the one grammar (core.sizes), kept as written for messages."""
        try:
            return read_size(value, minimum=minimum)
        except SizeError as exc:
            raise self.fail(kp, str(exc)) from None

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


def load_release(path: str | os.PathLike) -> ReleaseConfig:
    """Load and validate a release YAML (nothing is read or run besides the YAML, profiles and
    the sensitivity results `fit:` tiers name)."""
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
    name = file_name_part(raw_name)
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
    # two tiers mapping to one file name: refused, naming both (one would overwrite the other)
    for i in range(len(tiers)):
        check_distinct_outputs([(t.profile.tier, Path(output_name(name, t.profile.tier))) for t in tiers[:i + 1]],
                               error=ConfigError, where=tiers[i].where)
    baselines = parse_baselines(r, data["baselines"], name, tiers) if data.get("baselines") is not None else []
    imatrix = _parse_imatrix(r, data.get("imatrix"), tiers, baselines)
    mtp = parse_mtp(r, data["mtp"], source) if data.get("mtp") is not None else None
    eval_cfg = _parse_eval(r, data.get("eval"), mtp)
    if baselines and not eval_cfg.enabled:
        raise r.fail(("baselines",), "baselines are measured by the eval phase, which this config turns off",
                     hint="give an `eval:` section (text or corpus), or remove `baselines`")
    mmproj = _parse_mmproj(r, data["mmproj"], source) if data.get("mmproj") is not None else None
    pub = r.mapping(("publish",), data["publish"], PUBLISH_KEYS)
    if "repo" not in pub:
        raise r.fail(("publish",), "missing key 'repo' (the Hub repo the card and LocalAI entries point at)")
    publish = PublishConfig(
        repo=r.string(("publish", "repo"), pub["repo"], pattern=REPO_RE, what="a repo id like owner/name"),
        private=r.boolean(("publish", "private"), pub["private"]) if "private" in pub else False,
        where=r.where(("publish",)))
    split = r.size(("split_max_size",), data["split_max_size"], MIN_SPLIT_SIZE) \
        if data.get("split_max_size") is not None else None
    output = r.path(("output",), data["output"], suffix=None) if data.get("output") is not None else None
    resources = _parse_resources(r, data["resources"]) if data.get("resources") is not None else ResourcesConfig()
    return ReleaseConfig(path=p, name=name, title=title, base_model=base_model, license=license_,
                         description=description, tags=tuple(tags), source=source, tiers=tiers, imatrix=imatrix,
                         eval=eval_cfg, mmproj=mmproj, publish=publish, split_max_size=split, output=output,
                         warnings=warnings, resources=resources, doc=doc, mtp=mtp, baselines=baselines)


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
        fit = None
        if isinstance(item, dict) and "fit" in item:
            m = r.mapping(kp, item, TIER_KEYS)
            if "profile" in m:
                raise r.fail(kp, "give profile or fit, not both")
            fit, prof = parse_fit_tier(r, kp, m)
            if "best_for" in m:
                best_for = r.string(kp + ("best_for",), m["best_for"])
        elif isinstance(item, dict):
            m = r.mapping(kp, item, TIER_KEYS)
            if "tier" in m:
                raise r.fail(kp + ("tier",), "a tier name is given only with `fit:` (a profile names its own tier)")
            if "profile" not in m:
                raise r.fail(kp, "missing key 'profile' (or 'fit')")
            ref = r.string(kp + ("profile",), m["profile"], what="a profile name")
            if "best_for" in m:
                best_for = r.string(kp + ("best_for",), m["best_for"])
        else:
            ref = r.string(kp, item, what="a profile name")
        if fit is None:
            try:
                prof = load_profile(_relative(r, ref))
            except ApexError as exc:
                raise ConfigError(f"tiers[{i}]: {exc.message}", where=r.where(kp), hint=exc.hint) from None
        if prof.tier in seen:
            raise r.fail(kp, f"tier {prof.tier} is listed twice (also at {seen[prof.tier]})")
        seen[prof.tier] = r.where(kp)
        tiers.append(TierConfig(prof, best_for or prof.best_for or prof.description, r.where(kp), fit))
    return tiers


def _relative(r: _Reader, ref: str) -> str:
    """A profile reference: a relative .yaml path is relative to the release YAML's folder."""
    if ref.endswith((".yaml", ".yml")) and not os.path.isabs(ref):
        return str(r.doc.path.parent / ref)
    return ref


def _parse_imatrix(r: _Reader, value, tiers: list[TierConfig], baselines: list) -> ImatrixConfig | None:
    kp = ("imatrix",)
    m = r.mapping(kp, value, IMATRIX_KEYS) if value is not None else {}
    needs = [t for t in tiers if t.profile.imatrix_required]
    if not needs and not any(b.imatrix for b in baselines):
        if value is not None:
            raise r.fail(kp, "no tier needs an imatrix, so this section would do nothing",
                         hint="remove it, or add an I-tier (i-balanced, i-compact, ...)")
        return None
    if "corpus" in m:
        corpus = r.string(kp + ("corpus",), m["corpus"], what="a corpus name or .yaml path")
        if corpus.endswith((".yaml", ".yml")) and not os.path.isabs(corpus):
            corpus = str(r.doc.path.parent / corpus)
    else:
        corpora = {t.profile.corpus or "diverse" for t in needs} or {"diverse"}
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


def _parse_eval(r: _Reader, value, mtp: MtpConfig | None) -> EvalConfig:
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
    speed, sd = False, SpeedDoc()
    if isinstance(m.get("speed"), dict):
        speed, sd = True, read_section(SpeedDoc, m["speed"], r.where, kp + ("speed",), ConfigError)
    elif "speed" in m:
        speed = r.boolean(kp + ("speed",), m["speed"])
    task_ctx = r.integer(kp + ("task_ctx",), m["task_ctx"], 16) if "task_ctx" in m else TaskSettings().n_ctx
    speculative, spec_tokens = _parse_speculative(r, m, enabled, mtp)
    return EvalConfig(enabled=enabled, text=text, corpus=corpus, ctx=ctx,
                      chunks=r.integer(kp + ("chunks",), m["chunks"], 1) if m.get("chunks") is not None else None,
                      speed=speed, speed_repetitions=sd.repetitions, speed_tokens=(sd.prompt, sd.gen),
                      gates=tuple(gates), where=r.where(kp),
                      tasks=_parse_tasks(r, m["tasks"]) if m.get("tasks") is not None else (), task_ctx=task_ctx,
                      speculative=speculative, speculative_tokens=spec_tokens)


def _parse_speculative(r: _Reader, m: dict, enabled: bool, mtp: MtpConfig | None) -> tuple[bool, int]:
    """`eval.speculative` (default: on when the release has an MTP head, bundled or as a draft, and
    eval is on) and `eval.speculative_tokens`; asked for without a head, or with eval off, refused."""
    kp = ("eval",)
    doc = read_section(SpeculativeDoc, {k: m[k] for k in yaml_keys(SpeculativeDoc) if k in m}, r.where, kp,
                       ConfigError)
    head = mtp is not None and mtp.mode in ("bundled", "draft")
    on = (head and enabled) if doc.speculative is None else doc.speculative
    if on and not head:
        said = "mtp: none" if mtp is not None else "no `mtp:` in the config"
        raise r.fail(kp + ("speculative",), f"llama.cpp's drafting with the MTP head cannot be measured: this "
                                            f"release has no head ({said})",
                     hint="say `mtp: bundled` or `mtp: draft` for a model with an MTP head, or remove "
                          "eval.speculative")
    if on and not enabled:
        raise r.fail(kp + ("speculative",), "the eval phase measures it, and this config turns eval off "
                                            "(eval.enabled is false)",
                     hint="remove eval.speculative, or turn eval on")
    if "speculative_tokens" in m and not on:
        raise r.fail(kp + ("speculative_tokens",), "the speculative measurement is off",
                     hint="remove it, or say `speculative: true` (with `mtp: bundled` or `mtp: draft`)")
    return on, doc.speculative_tokens


def _parse_tasks(r: _Reader, value) -> tuple[TaskConfig, ...]:
    """`eval.tasks`: names (the pinned Hub data) or {task, file, count}; each task once."""
    kp = ("eval", "tasks")
    if not isinstance(value, list) or not value:
        raise r.fail(kp, "expected a list of tasks", hint="e.g. [hellaswag, {task: mmlu, file: mmlu-validation.bin}]")
    out: list[TaskConfig] = []
    for i, item in enumerate(value):
        ikp = kp + (i,)
        doc = read_section(TaskDoc, item if isinstance(item, dict) else {"task": item}, r.where, ikp, ConfigError)
        if not doc.task:
            raise r.fail(ikp, "missing key 'task'", hint="one of " + ", ".join(TASK_KINDS))
        if any(t.task == doc.task for t in out):
            raise r.fail(ikp, f"task {doc.task} is listed twice")
        file = r.path(ikp + ("file",), doc.file, suffix=None) if doc.file is not None else None
        out.append(TaskConfig(doc.task, file, doc.count, r.where(ikp)))
    return tuple(out)


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


def _parse_resources(r: _Reader, value) -> ResourcesConfig:
    kp = ("resources",)
    m = r.mapping(kp, value, RESOURCES_KEYS)
    gpus = m.get("gpus", 0)
    if isinstance(gpus, bool) or not isinstance(gpus, (int, float)) or gpus < 0:
        raise r.fail(kp + ("gpus",), f"expected a number >= 0, got {gpus!r}")
    memory = r.size(kp + ("memory",), m["memory"], MB).bytes if m.get("memory") is not None else None
    return ResourcesConfig(cpus=r.integer(kp + ("cpus",), m["cpus"], 1) if "cpus" in m else 1,
                           gpus=gpus, memory=memory, where=r.where(kp))
