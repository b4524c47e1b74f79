"""Tiers by size: a release tier written as `fit: {size: 48GB, sensitivity: sens.json}`.

Three steps, one per moment of a release:

- `parse_fit_tier` (config time, called by release.config_reader): reads the `fit:` entry
  strictly and the sensitivity file it names, and gives a FitSpec and a placeholder profile that
  says what the fitted one will (its tier, whether it needs an imatrix and on which corpus), so
  the imatrix phase, the duplicate-tier and file-name checks work before the model exists.
- `resolve_fit_tiers` (once the source model is known, at the start of planning the quantize
  jobs, the dry run's too): runs fit.fitter.fit_profile for each placeholder, writes the profile
  to `<release>/.apex-release/fitted/<tier>.yaml` (a dry run: to a temporary folder) and puts it
  in the tier's place; the fit is deterministic, so a rerun plans the same jobs.
- `fitted_sentence` (the card): how a fitted tier was chosen, from its profile's `fitted:` record.

See docs/release.md ("Tiers by size") and docs/fit.md for the method.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tempfile
from pathlib import Path

from apex_orch.core.errors import ApexError, ConfigError, RequestError, ResultFileError
from apex_orch.core.infiles import holds
from apex_orch.core.safefiles import safe_mkdir, write_atomic
from apex_orch.core.sizes import GRAMMAR, SizeError, parse_size
from apex_orch.core.text import file_name_part, gb, md_code, md_inline
from apex_orch.fit.fitter import MIN_BUDGET, fit_profile
from apex_orch.fit.groups import bands_profile
from apex_orch.fit.measurements import Sensitivity, load_sensitivity
from apex_orch.plan.llama_rules import IMATRIX_REQUIRED
from apex_orch.plan.profiles import Profile, load_profile
from apex_orch.release.config import FIT_KEYS, FitSpec

FITTED_DIR = "fitted"        # under the release's work folder (.apex-release)
# A fit tier's name is written into its profile YAML and file names: plain words only.
FIT_TIER_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,63}$")


# =========================================================================== config time

def parse_fit_tier(r, kp: tuple, m: dict) -> tuple[FitSpec, Profile]:
    """`r`: config_reader's _Reader; `m`: the tier entry (keys already checked against TIER_KEYS)."""
    fkp = kp + ("fit",)
    f = r.mapping(fkp, m["fit"], FIT_KEYS)
    if "tier" not in m:
        raise r.fail(kp, "missing key 'tier' (the fitted file's display tier, e.g. I-Compact-48GB)")
    tier = r.string(kp + ("tier",), m["tier"], pattern=FIT_TIER_RE, what="a tier name",
                    hint="letters, digits, '.', '_', '+' and '-' (e.g. I-Compact-48GB)")
    given = [k for k in ("size", "bpw") if k in f]
    if len(given) != 1:
        raise r.fail(fkp, f"give exactly one of size or bpw (got {' and '.join(given) or 'neither'})")
    size = bpw = None
    if "size" in f:
        try:
            size = parse_size(f["size"], minimum=MIN_BUDGET)
        except SizeError as exc:
            raise r.fail(fkp + ("size",), str(exc),
                         hint=f"GB = 10^9 bytes, as the Hub lists file sizes ({GRAMMAR})") from None
    else:
        bpw = f["bpw"]
        if isinstance(bpw, bool) or not isinstance(bpw, (int, float)) or not 1.0 <= bpw <= 16.0:
            raise r.fail(fkp + ("bpw",), f"expected bits per weight between 1 and 16, got {bpw!r}")
        bpw = float(bpw)
    if "sensitivity" not in f:
        raise r.fail(fkp, "missing key 'sensitivity' (the result of `apex-orch sensitivity MODEL -o FILE`)")
    skp = fkp + ("sensitivity",)
    sens_path = r.path(skp, f["sensitivity"], suffix=None)
    resolved = sens_path.resolve()          # an unset ${VAR}: a ConfigError at this line
    if resolved.is_dir():
        raise r.fail(skp, f"{resolved}: cannot be read (Is a directory)")
    if not resolved.exists():               # a wrong name in the config, not a damaged result
        raise r.fail(skp, f"{resolved}: sensitivity file not found",
                     hint="measure one first: apex-orch sensitivity MODEL -o sens.json")
    try:
        sens = load_sensitivity(resolved)
    except ResultFileError as exc:   # a damaged result keeps its own exit code, at the config's line
        raise ResultFileError(f"{exc.where + ': ' if exc.where else ''}{exc.message}", where=r.where(skp),
                              hint=exc.hint) from None
    except ApexError as exc:
        raise r.fail(skp, f"{exc.where + ': ' if exc.where else ''}{exc.message}", hint=exc.hint) from None
    except OSError as exc:                  # a folder, no permission...
        raise r.fail(skp, f"{resolved}: cannot be read ({exc.strerror or exc})") from None
    base = None
    if "from" in f:
        base = r.string(fkp + ("from",), f["from"], what="a profile name")
        if base.endswith((".yaml", ".yml")) and not os.path.isabs(base):
            base = str(r.doc.path.parent / base)
    structure = True
    if "structure" in f:
        if f["structure"] not in ("apex", "free"):
            raise r.fail(fkp + ("structure",), f"expected apex or free, got {f['structure']!r}")
        structure = f["structure"] == "apex"
    imatrix = r.boolean(fkp + ("imatrix",), f["imatrix"]) if "imatrix" in f else None
    with tempfile.TemporaryDirectory(prefix="apex-orch-fit-") as tmp:   # APEX's own bands: a generated file
        try:
            base_prof = bands_profile(base, Path(tmp))
        except ApexError as exc:
            raise r.fail(fkp + ("from",), exc.message, hint=exc.hint) from None
    if sens.data.get("bands") != base_prof.raw.get("bands"):
        measured = sens.data.get("bands_from") or "APEX's own profile"
        raise r.fail(skp, f"the sensitivity was measured with the bands of {measured}, not those of "
                          f"{f.get('from') or 'APEX (no from:)'}",
                     hint="fit from the profile the measurement used (from:), or measure with these bands")
    with_imatrix = sens.data.get("imatrix") is not None if imatrix is None else imatrix
    if not any(with_imatrix or t not in IMATRIX_REQUIRED for t in sens.ladder):
        raise r.fail(fkp + ("imatrix",), "without an imatrix none of the measured types can be written",
                     hint="measure types llama-quantize writes without one too (the ladder of `apex-orch sensitivity`)")
    spec = FitSpec(size=size, bpw=bpw, sensitivity=sens_path, base=base, structure=structure, imatrix=imatrix,
                   tier=tier, where=r.where(kp))
    return spec, _placeholder(spec, base_prof, sens, with_imatrix)


def _placeholder(spec: FitSpec, base: Profile, sens: Sensitivity, with_imatrix: bool) -> Profile:
    """The base profile renamed: tier, imatrix need, corpus and best-for as fit.fitter.render_yaml
    will write them. No `fitted:` record, which is how TierConfig.fit_pending tells it apart."""
    # as fit.fitter.render_yaml names it: an imatrix given as a file has no corpus name
    corpus = base.corpus or sens.imatrix_corpus or "diverse"
    raw = {k: v for k, v in base.raw.items() if k != "fitted"}
    return dataclasses.replace(
        base, name=file_name_part(spec.tier, "tier"), tier=spec.tier, imatrix_required=with_imatrix,
        corpus=corpus if with_imatrix else None,
        description=f"APEX fitted to {spec.target} once the source model is known",
        best_for=base.best_for if base.name != "apex-bands" else "A file of exactly this size",
        raw=raw | {"tier": spec.tier, "imatrix": {"required": with_imatrix}})


# =========================================================================== planning time

def resolve_fit_tiers(state, *, write: bool) -> None:
    """Fit every tier still holding its placeholder (release.state.ReleaseState, model known).
    `write`: keep the profile in the release's work folder; else a temporary folder (dry run).
    The config is replaced, not changed: the caller's ReleaseConfig keeps its placeholders."""
    cfg = state.config
    if not any(t.fit_pending for t in cfg.tiers):
        return
    model = state.model
    if model is None:
        from apex_orch.model.info import read_model
        model = read_model(state.model_path)
    tiers = list(cfg.tiers)
    with tempfile.TemporaryDirectory(prefix="apex-orch-fitted-") as tmp:
        folder = state.work / FITTED_DIR if write else Path(tmp)
        for i, t in enumerate(tiers):
            if t.fit_pending:
                profile = _fit_tier(state, model, t, folder, write)
                tiers[i] = dataclasses.replace(t, profile=profile)
    state.config = dataclasses.replace(cfg, tiers=tiers)


def _fit_tier(state, model, t, folder: Path, write: bool) -> Profile:
    spec = t.fit
    where = spec.sensitivity.where
    try:
        sens = load_sensitivity(spec.sensitivity.resolve())
    except ResultFileError as exc:
        raise ResultFileError(f"tier {spec.tier}: {exc.message}", where=where, hint=exc.hint) from None
    except ApexError as exc:
        raise ConfigError(f"tier {spec.tier}: {exc.message}", where=where, hint=exc.hint) from None
    m = sens.data["model"]
    if (m["arch"], m["blocks"], m["name"]) != (model.arch, model.block_count, model.name):
        state.progress(f"fit: note: {spec.tier}'s sensitivity was measured on {m['name']} ({m['arch']}, "
                       f"{m['blocks']} blocks); applied here group by group")
    try:
        result = fit_profile(model, sens, size=spec.size, bpw=spec.bpw, base=spec.base, tier=spec.tier,
                             structure=spec.structure, imatrix=spec.imatrix)
    except (RequestError, ResultFileError) as exc:   # the sensitivity does not fit this model, bands or size
        raise ConfigError(f"tier {spec.tier}: fit: {exc.message}", where=spec.where, hint=exc.hint) from None
    path = folder / (file_name_part(spec.tier, "tier") + ".yaml")
    if write:
        safe_mkdir(state.work)
        safe_mkdir(folder)
    if not holds(path, result.yaml_text):
        write_atomic(path, result.yaml_text, mkdir=False)   # unchanged on a rerun: nothing rewritten
    profile = load_profile(path)
    if (profile.tier, profile.imatrix_required) != (t.profile.tier, t.profile.imatrix_required):
        raise ConfigError(f"tier {spec.tier}: the fitted profile ({profile.tier}, imatrix "
                          f"{'required' if profile.imatrix_required else 'not required'}) differs from what the "
                          "config promised; did the sensitivity file change since the config was read?",
                          where=spec.where, hint="run the release again")
    shown = os.path.relpath(path, state.out_dir) if write else path.name
    state.progress(f"fit: {spec.tier} fitted to {result.target}: {result.file_bytes:,} bytes "
                   f"({gb(result.file_bytes)}, {result.plan.bpw:.3f} bpw), predicted mean KLD "
                   f"{result.solution.kld_mean:.5f}" + (f"; profile {shown}" if write else ""))
    if not result.within:
        state.progress(f"warning: fit: {spec.tier}: the nearest size the measured types reach is "
                       f"{gb(result.file_bytes)}, {100 * result.shortfall:.2f}% under {result.target} "
                       "(more than 0.5%)")
    return profile


# =========================================================================== the card

def fitted_sentence(tier: str, fitted: dict) -> str:
    """One line for the card: how a fitted tier's types were chosen (its profile's `fitted:` record)."""
    target = str(fitted.get("target", "?"))
    kld = fitted.get("predicted_kld_mean")
    kld_text = f"{kld:.4g}" if isinstance(kld, (int, float)) and not isinstance(kld, bool) else str(kld)
    key = str(fitted.get("sensitivity", ""))[:12]
    what = "the bits per weight" if target.endswith("bpw") else "the size"
    structure = "APEX structure kept" if fitted.get("structure", "apex") == "apex" else \
        "types chosen freely (no APEX structure)"
    return (f"{md_inline(tier)} was fitted by `apex-orch fit` to {md_inline(target)} from "
            f"{md_inline(str(fitted.get('method', '?')))} sensitivity measured on "
            f"{md_inline(str(fitted.get('measured_on', '?')))} ({md_inline(str(fitted.get('text', '?')))}, "
            f"sensitivity `{md_code(key)}`): a type per group minimising the predicted mean KLD ({kld_text}) "
            f"under {what}, {structure}.")
