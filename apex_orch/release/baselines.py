"""Baselines: files of the same model that a release's tiers are measured against, in the same run.

A release's `baselines:` (release.config.BaselineConfig) names

- uniform presets (`Q8_0`, `{preset: Q4_K_M, imatrix: true}`): llama-quantize's own FTYPE mixture
  of the same source, with or without the release's imatrix. Each is a QuantizeJob like a tier's
  (the same plan, tool dry-run check, verification and manifest, so a rerun skips it), written into
  the work folder `.apex-release/baselines/`, which is never published;
- existing GGUFs of the same model: a local file, or one file of a Hub repo at a pinned revision
  (another publisher's quantization), downloaded into the Hugging Face cache.

A baseline is measured like a tier (the same base log-probs, text, tasks, speed and settings) and
shown beside the tiers on the card; it is never uploaded and has no LocalAI entry.

One function per moment of a release:
- `parse_baselines` (config time, called by release.config_reader): the entries, strictly, with
  their labels; an unknown preset, a preset that needs an imatrix without one, a label or file
  name that is a tier's, or two entries with one label are ConfigErrors at `file:line`;
- the fetch phase (release.phases.fetch.fetch_baselines): local files checked as inputs, Hub files
  downloaded;
- `check_baselines` (once the source is known, before any tool runs): each file must be a
  quantization of the source (the same architecture, tensor names and shapes; BaselineError);
- `plan_baseline_jobs` (the quantize phase and the dry run): the presets' QuantizeJobs.
"""

from __future__ import annotations

from pathlib import Path

from apex_orch.core.errors import ApexError, BaselineError, ConfigError
from apex_orch.core.schema import read_section
from apex_orch.core.text import file_name_part
from apex_orch.model.info import ModelInfo, read_model
from apex_orch.plan.llama_rules import FTYPE_BY_NAME, IMATRIX_REQUIRED, default_type, is_quantized
from apex_orch.plan.profiles import Bands, Profile
from apex_orch.quantize.job import ImatrixSource, QuantizeJob, output_name, plan_quantize
from apex_orch.release.config import BaselineConfig, BaselineDoc

BASELINE_DIR = "baselines"       # under the release's work folder (.apex-release): never published
PRESET_NAMES = tuple(n for n in FTYPE_BY_NAME if is_quantized(default_type(FTYPE_BY_NAME[n])))


# =========================================================================== config time

def default_label(kind: str, preset: str | None, imatrix: bool, file_name: str | None) -> str:
    if kind == "preset":
        return f"{preset} (imatrix)" if imatrix else str(preset)
    return Path(str(file_name)).name.removesuffix(".gguf")


def parse_baselines(r, value, name: str, tiers: list) -> list[BaselineConfig]:
    """`r`: config_reader's _Reader; `name`: the release's file-name prefix; `tiers`: TierConfigs."""
    kp = ("baselines",)
    if not isinstance(value, list) or not value:
        raise r.fail(kp, "expected a list of baselines", hint="e.g. [Q8_0, {preset: Q4_K_M, imatrix: true}]")
    tier_names = {t.tier.casefold(): t.tier for t in tiers}
    tier_files = {output_name(name, t.tier).casefold(): t.tier for t in tiers}
    out: list[BaselineConfig] = []
    seen: dict[str, str] = {}
    for i, item in enumerate(value):
        ikp = kp + (i,)
        doc = read_section(BaselineDoc, item if isinstance(item, dict) else {"preset": item}, r.where, ikp,
                           ConfigError)
        kinds = [k for k in ("preset", "file", "hf") if getattr(doc, k) is not None]
        if len(kinds) != 1:
            raise r.fail(ikp, f"give exactly one of preset, file, hf (got {', '.join(kinds) or 'none'})")
        kind = kinds[0]
        where = r.where(ikp)
        if kind == "preset":
            preset = _preset(r, ikp + (("preset",) if isinstance(item, dict) else ()), doc.preset, doc.imatrix)
            b = BaselineConfig("preset", "", preset=preset, imatrix=doc.imatrix, where=where)
            file_name = None
        else:
            if doc.imatrix:
                raise r.fail(ikp + ("imatrix",), "imatrix: true is for presets (an existing file is measured as it is)")
            if kind == "file":
                b = BaselineConfig("file", "", path=r.path(ikp + ("file",), doc.file), where=where)
                file_name = Path(doc.file).name
            else:
                ref = r.hf(ikp + ("hf",), doc.hf, file_key="file")
                b = BaselineConfig("hf", "", hf=ref, where=where)
                file_name = Path(ref.files[0]).name
            if file_name.casefold() in tier_files:
                raise r.fail(ikp, f"its file name {file_name} is the file name of tier "
                                  f"{tier_files[file_name.casefold()]}; a baseline is never published as a tier",
                             hint="use another release `name`, or measure that file under another name (copy it)")
        label = doc.name or default_label(kind, b.preset, b.imatrix, file_name)
        folded = file_name_part(label).casefold()
        if label.casefold() in tier_names or folded in {file_name_part(t).casefold() for t in tier_names.values()}:
            raise r.fail(ikp, f"its name {label!r} is the name of a tier; baselines and tiers share one table",
                         hint="give the baseline another `name:`")
        if folded in seen:
            raise r.fail(ikp, f"baseline {label!r} is listed twice (also at {seen[folded]})",
                         hint="give one of them another `name:`")
        seen[folded] = where
        out.append(BaselineConfig(b.kind, label, b.preset, b.imatrix, b.path, b.hf, where))
    return out


def _preset(r, kp: tuple, value: str, imatrix: bool) -> str:
    preset = str(value).strip().upper()
    if preset not in PRESET_NAMES:
        raise r.fail(kp, f"unknown preset {value!r}: not a quantized llama-quantize type",
                     hint="one of " + ", ".join(PRESET_NAMES))
    ftype = FTYPE_BY_NAME[preset]
    if not imatrix and (default_type(ftype) in IMATRIX_REQUIRED or preset == "Q2_K_S"):
        raise r.fail(kp, f"preset {preset} needs an importance matrix (llama-quantize refuses it without one)",
                     hint=f"write {{preset: {preset}, imatrix: true}} (the release's imatrix)")
    return preset


# =========================================================================== the files

def baseline_output(config, work: Path, b: BaselineConfig) -> Path:
    """Where a preset baseline is written: `<work>/baselines/<name>-<PRESET>[-imatrix].gguf`."""
    stem = f"{file_name_part(config.name, 'model')}-{b.preset}" + ("-imatrix" if b.imatrix else "")
    return work / BASELINE_DIR / f"{stem}.gguf"


def record_stem(b: BaselineConfig) -> str:
    """The baseline's eval record name (labels are unique after this reduction)."""
    return "baseline-" + file_name_part(b.label, "baseline")


def preset_profile(b: BaselineConfig) -> Profile:
    """A profile with no types: every tensor gets the preset FTYPE's own mixture, as
    `llama-quantize SRC OUT <PRESET>` writes it (no override rule at all)."""
    name = f"preset-{b.preset.lower()}" + ("-imatrix" if b.imatrix else "")
    return Profile(name=name, path=Path(f"<preset {b.preset}>"), tier=b.label,
                   description=b.describe(), best_for="", base_ftype=b.preset, imatrix_required=b.imatrix,
                   corpus=None, bands=Bands(), types={}, nextn="edge", overrides=[], gates={},
                   chain=[name], raw={"preset": b.preset, "imatrix": b.imatrix, "label": b.label})


def plan_baseline_jobs(state, imatrix: ImatrixSource | None) -> list[QuantizeJob]:
    """The presets' quantize jobs, in config order (`imatrix`: the release's, or the dry run's stand-in)."""
    cfg = state.config
    jobs = []
    for b in cfg.baselines:
        if b.kind != "preset":
            continue
        jobs.append(plan_quantize(state.model_path, preset_profile(b), out=baseline_output(cfg, state.work, b),
                                  imatrix=imatrix if b.imatrix else None, model=state.model))
    return jobs


def check_baselines(state) -> None:
    """Every baseline file found so far is a quantization of the source: refused before any tool runs."""
    for b in state.config.baselines:
        files = state.baseline_files.get(b.label)
        if b.kind != "preset" and files:
            check_same_model(state.model, read_model(files[0]), b)


def check_same_model(source: ModelInfo, other: ModelInfo, b: BaselineConfig) -> None:
    """The same architecture, the same tensor names and shapes (types may differ: that is the point)."""
    what = f"baseline {b.label!r} ({Path(other.path).name}) is not a quantization of this release's source"
    hint = "a baseline must be made from the same model (same architecture and tensors); remove it or fix its file"
    if other.arch != source.arch:
        raise BaselineError(f"{what}: its architecture is {other.arch}, the source's {source.arch}",
                            where=b.where, hint=hint)
    mine = {t.name: t.shape for t in source.tensors}
    theirs = {t.name: t.shape for t in other.tensors}
    missing = sorted(set(mine) - set(theirs))
    extra = sorted(set(theirs) - set(mine))
    shapes = sorted(n for n in set(mine) & set(theirs) if tuple(mine[n]) != tuple(theirs[n]))
    if not (missing or extra or shapes):
        return
    parts = []
    if missing:
        parts.append(f"{len(missing)} of the source's tensors missing ({', '.join(missing[:3])}"
                     f"{' ...' if len(missing) > 3 else ''})")
    if extra:
        parts.append(f"{len(extra)} tensors the source lacks ({', '.join(extra[:3])}"
                     f"{' ...' if len(extra) > 3 else ''})")
    if shapes:
        n = shapes[0]
        parts.append(f"{len(shapes)} of another shape ({n}: {list(theirs[n])}, the source's {list(mine[n])}"
                     f"{' ...' if len(shapes) > 1 else ''})")
    raise BaselineError(f"{what}: {'; '.join(parts)}", where=b.where, hint=hint)


def local_baseline_files(config) -> list[Path]:
    """The local files `baselines` names (inputs of the release; an unset ${VAR} is skipped here)."""
    out = []
    for b in config.baselines:
        if b.kind == "file":
            try:
                out.append(b.path.resolve())
            except ApexError:
                pass
    return out
