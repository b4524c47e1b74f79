"""Measured sensitivity: each group alone at each ladder type, KL divergence against the source.

Method ("exact"):
  1. one uniform quantization per ladder type (every typed tensor at that type, with the imatrix
     when there is one), through the ordinary quantize pipeline (plan, llama-quantize, verify);
  2. for each group and type, a spliced file (splice.py): the source with only that group's
     tensors taken from the uniform file of that type; the bytes are the ones llama-quantize
     writes for that group in any profile that gives it that type;
  3. KLD of the spliced file against the source (apex_orch.evaluation: llama-perplexity's
     statistics, the source's log-probs computed once and cached) on `chunks` chunks of a text
     that is neither the imatrix corpus nor training text;
  4. each uniform file is measured too: the additivity check (the sum of the groups' effects at a
     type against the measured effect of all of them at once).
Cost: len(ladder) quantizations + (groups + 1) x len(ladder) short evaluations; both written into
the result. Cached by model bytes, imatrix bytes, text bytes, settings, ladder, groups and the
llama.cpp build; an interrupted run resumes from `<key>.partial.json`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from gguf.constants import GGMLQuantizationType as T

from apex_orch.core import settings as env
from apex_orch.core.errors import ModelError, RequestError
from apex_orch.core.fingerprint import source_sha256
from apex_orch.core.safefiles import write_atomic
from apex_orch.evaluation.inputs import EvalSettings, TextFacts, text_facts
from apex_orch.fit.groups import Group, bands_profile, groups_of, parse_ladder, uniform_profile
from apex_orch.fit.measurements import FORMAT, FORMAT_VERSION, Sensitivity, check_sensitivity
from apex_orch.fit.proxy import calibrate, imatrix_weights, tensor_errors
from apex_orch.fit.splice import write_spliced
from apex_orch.llama.tools import build_label
from apex_orch.model.info import ModelInfo, read_model
from apex_orch.plan.planner import make_plan
from apex_orch.plan.profiles import Profile
from apex_orch.quantize.job import ImatrixSource, check_source_unquantized

Progress = Callable[[str], None]
DEFAULT_CHUNKS = 12
METHODS = {
    "exact": ("each group alone at each type (tensors spliced byte for byte from one uniform llama-quantize "
              "run per type), every other tensor at the source type; KLD against the source"),
    "proxy": ("imatrix-weighted squared quantization error of each group's tensors, dequantized from one "
              "uniform llama-quantize run per type, scaled to KLD per role by an exact measurement"),
}


@dataclass
class SensitivityPlan:
    model_path: Path
    model: ModelInfo
    bands_from: Profile
    groups: list[Group]
    ladder: tuple[T, ...]
    imatrix: ImatrixSource | None
    text: TextFacts
    settings: EvalSettings
    threads: int | None
    key: str
    key_material: dict = field(repr=False)
    method: str = "exact"
    calibration: Sensitivity | None = None
    imatrix_corpus: str | None = None     # the corpus name, when the imatrix was built from one here

    @property
    def cache_path(self) -> Path:
        return cache_dir() / f"{self.key}.json"

    @property
    def partial_path(self) -> Path:
        return cache_dir() / f"{self.key}.partial.json"

    @property
    def cached(self) -> bool:
        return self.cache_path.is_file()

    @property
    def n_measurements(self) -> int:
        return (len(self.groups) + 1) * len(self.ladder) if self.method == "exact" else 0

    def describe(self) -> str:
        im = f"{self.imatrix.path} (sha256 {self.imatrix.sha256[:12]})" if self.imatrix else "none"
        lines = [f"model     {self.model_path} ({self.model.arch}, {self.model.block_count} blocks)",
                 f"bands     from {self.bands_from.name}",
                 f"imatrix   {im}",
                 f"text      {self.text.label} (sha256 {self.text.sha256[:12]}), {self.settings.chunks} chunks x "
                 f"{self.settings.n_ctx}",
                 f"ladder    {', '.join(t.name for t in self.ladder)}",
                 f"groups    {len(self.groups)}: {', '.join(g.key for g in self.groups)}",
                 f"method    {self.method}" + (f" (calibrated by {self.calibration.key[:12]})" if self.calibration
                                                   else " (uncalibrated: proxy units)" if self.method == "proxy" else ""),
                 f"work      {len(self.ladder)} uniform quantizations + {self.n_measurements} evaluations",
                 f"cache     {self.cache_path} ({'hit' if self.cached else 'will be measured'})"]
        return "\n".join(lines)


def cache_dir() -> Path:
    return env.cache_root() / "sensitivity"


def plan_sensitivity(model_path: str | os.PathLike, *, imatrix: ImatrixSource | None = None,
                     text: str | os.PathLike | None = None, text_corpus: str | None = None,
                     chunks: int = DEFAULT_CHUNKS, ctx: int = 512, ladder: str | None = None,
                     bands_from: str | None = None, threads: int | None = None,
                     imatrix_corpus_text: bytes | None = None, method: str = "exact",
                     calibration: Sensitivity | None = None, imatrix_corpus: str | None = None) -> SensitivityPlan:
    """Resolve everything (reads headers and the text; runs nothing)."""
    path = Path(model_path)
    model = read_model(path)
    if model.is_split:
        raise ModelError("sensitivity measurement needs a single-file model", where=str(path),
                         hint="merge the parts first: llama-gguf-split --merge FIRST-PART OUT.gguf")
    if method not in METHODS:
        raise RequestError(f"method {method!r}: one of {', '.join(METHODS)}", fields=("method",))
    if calibration is not None and (method != "proxy" or "proxy" not in calibration.data):
        raise RequestError("a calibration is an exact result that recorded proxy values, for the proxy method",
                           fields=("calibration", "method"),
                           hint="measure a smaller model of the family with the exact method first")
    check_source_unquantized(model)   # raises: KLD against a quantized source measures the wrong thing
    profile = bands_profile(bands_from, cache_dir() / "profiles")
    types = parse_ladder(ladder, imatrix is not None)
    groups = groups_of(make_plan(model, uniform_profile_for(types[0], profile, imatrix is not None),
                                 has_imatrix=True))
    if (text is None) == (text_corpus is None):
        raise RequestError("give the held-out text the output is measured on: a file or a corpus name",
                           fields=("text", "text_corpus"),
                           hint="not the imatrix corpus: a text the model was not calibrated on")
    tf = text_facts(text, text_corpus)
    if imatrix_corpus_text is not None and hashlib.sha256(imatrix_corpus_text).hexdigest() == tf.sha256:
        raise RequestError("the measurement text is the imatrix corpus itself; it must be held out",
                           fields=("text_corpus",), hint="pick another corpus, or a text file", options=("text",))
    settings = EvalSettings(n_ctx=ctx, chunks=chunks, **({"n_threads": threads} if threads else {}))
    material = {
        "format": FORMAT_VERSION, "method": method, "calibration": calibration.key if calibration else None,
        "model": source_sha256(path),
        "imatrix": imatrix.sha256 if imatrix else None, "text": tf.sha256, "settings": settings.numeric_key(),
        "ladder": [t.name for t in types], "bands": profile.raw.get("bands"),
        "groups": [[g.key, list(g.tensors)] for g in groups], "llama": build_label(),
    }
    key = hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:20]
    return SensitivityPlan(path, model, profile, groups, types, imatrix, tf, settings, threads, key, material, method,
                           calibration, imatrix_corpus)


def uniform_profile_for(t: T, bands_from: Profile, imatrix: bool) -> Profile:
    """The all-`t` profile with `bands_from`'s bands (written under the cache: plans need a file)."""
    bands = hashlib.sha256(json.dumps(bands_from.raw.get("bands"), sort_keys=True).encode()).hexdigest()[:12]
    folder = cache_dir() / "profiles" / f"{bands}-{'imatrix' if imatrix else 'plain'}"
    return uniform_profile(t, folder, bands_from=bands_from, imatrix=imatrix)


def _kld_row(result) -> dict:
    k = result.kld
    return {"kld_mean": k.kld_mean, "kld_mean_err": k.kld_mean_err, "kld_p999": k.kld_p999,
            "kld_max": k.kld_max, "ppl_ratio": k.mean_ppl_ratio, "same_top_p": k.same_top_p,
            "seconds": round(result.seconds, 3)}


def run_sensitivity(plan: SensitivityPlan, *, progress: Progress | None = None,
                    work_dir: Path | None = None) -> Sensitivity:
    """Measure (or load from the cache) and return the result."""
    from apex_orch.evaluation.evaluate import evaluate
    from apex_orch.quantize.job import plan_quantize
    from apex_orch.quantize.run import run_quantize

    emit = progress or (lambda _m: None)
    if plan.cached:
        data = json.loads(plan.cache_path.read_text())
        check_sensitivity(data, str(plan.cache_path))
        emit(f"cache hit: {plan.cache_path}")
        return Sensitivity(data, plan.cache_path)
    partial = _load_partial(plan)
    rows: dict[str, dict[str, dict]] = partial.get("measurements", {})
    uniform_rows: dict[str, dict] = partial.get("uniform", {})
    proxy_rows: dict[str, dict[str, float]] = partial.get("proxy", {})
    cost = partial.get("cost", {"quantize_s": {}, "splice_s": 0.0, "eval_s": 0.0, "proxy_s": 0.0})
    weights = imatrix_weights(plan.imatrix.path if plan.imatrix else None)
    exact = plan.method == "exact"
    start = time.monotonic()
    earlier_s = cost.get("total_s", 0.0)     # a resumed run: the time the interrupted one(s) spent

    def save_progress() -> None:
        cost["total_s"] = round(earlier_s + time.monotonic() - start, 3)
        _save_partial(plan, rows, uniform_rows, cost, proxy_rows)

    work = Path(tempfile.mkdtemp(prefix="sensitivity-", dir=work_dir)) if work_dir else \
        Path(tempfile.mkdtemp(prefix="apex-orch-sensitivity-"))
    done = sum(len(r) for r in rows.values()) + len(uniform_rows)
    try:
        for i, t in enumerate(plan.ladder, 1):
            if all(t.name in proxy_rows.get(g.key, {}) for g in plan.groups) and (not exact or (
                    all(t.name in rows.get(g.key, {}) for g in plan.groups) and t.name in uniform_rows)):
                continue
            emit(f"[{i}/{len(plan.ladder)}] uniform {t.name}: llama-quantize")
            job = plan_quantize(plan.model_path, uniform_profile_for(t, plan.bands_from, plan.imatrix is not None),
                                out_dir=work, name="uniform", imatrix=plan.imatrix, threads=plan.threads,
                                model=plan.model)
            qr = run_quantize(job, force=True)
            cost["quantize_s"][t.name] = round(qr.seconds, 3)
            donor = qr.files[0]
            t0 = time.monotonic()
            errors = tensor_errors(plan.model_path, donor, {n for g in plan.groups for n in g.tensors}, weights)
            for g in plan.groups:
                proxy_rows.setdefault(g.key, {})[t.name] = sum(errors[n] for n in g.tensors)
            cost["proxy_s"] += time.monotonic() - t0
            if not exact:
                save_progress()
            elif t.name not in uniform_rows:
                r = evaluate(donor, base=plan.model_path, text=plan.text.path, settings=plan.settings)
                uniform_rows[t.name] = _kld_row(r)
                cost["eval_s"] += r.seconds
                done += 1
            for g in plan.groups if exact else ():
                if t.name in rows.get(g.key, {}):
                    continue
                t0 = time.monotonic()
                spliced = write_spliced(plan.model_path, {n: donor for n in g.tensors}, work / "spliced.gguf")
                cost["splice_s"] += time.monotonic() - t0
                r = evaluate(spliced, base=plan.model_path, text=plan.text.path, settings=plan.settings)
                spliced.unlink()
                rows.setdefault(g.key, {})[t.name] = _kld_row(r)
                cost["eval_s"] += r.seconds
                done += 1
                emit(f"  {done}/{plan.n_measurements} {g.key} at {t.name}: mean KLD {r.kld.kld_mean:.6f} "
                     f"(99.9% {r.kld.kld_p999:.4f})")
                save_progress()
            for p in work.iterdir():   # the next type's file replaces this one: keep one on disk
                if p.is_file():
                    p.unlink()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    cost["total_s"] = round(earlier_s + time.monotonic() - start, 3)
    if not exact:
        rows = _calibrated(plan, proxy_rows)
    data = _result(plan, rows, uniform_rows, cost, proxy_rows)
    write_atomic(plan.cache_path, json.dumps(data, indent=1) + "\n")
    plan.partial_path.unlink(missing_ok=True)
    return Sensitivity(data, plan.cache_path)


def _load_partial(plan: SensitivityPlan) -> dict:
    try:
        data = json.loads(plan.partial_path.read_text())
    except (OSError, ValueError):
        return {}
    return data if data.get("key") == plan.key else {}


def _save_partial(plan: SensitivityPlan, rows: dict, uniform_rows: dict, cost: dict, proxy_rows: dict) -> None:
    write_atomic(plan.partial_path, json.dumps({"key": plan.key, "measurements": rows, "uniform": uniform_rows,
                                                "cost": cost, "proxy": proxy_rows}) + "\n")


def _calibrated(plan: SensitivityPlan, proxy_rows: dict) -> dict:
    """The proxy in KLD units: per role, scaled by the calibration's exact / proxy ratio (or 1)."""
    roles = {g.key: g.role for g in plan.groups}
    scales = {role: 1.0 for role in roles.values()}
    if plan.calibration is not None:
        c = plan.calibration.data
        scales.update(calibrate(c["proxy"], c["measurements"], {g["key"]: g["role"] for g in c["groups"]}))
    return {key: {t: {"kld_mean": scales.get(roles[key], 1.0) * v, "kld_p999": None, "proxy": v}
                  for t, v in by_type.items()} for key, by_type in proxy_rows.items()}


def _result(plan: SensitivityPlan, rows: dict, uniform_rows: dict, cost: dict, proxy_rows: dict) -> dict:
    quantize = cost["quantize_s"]
    one_tier = sorted(quantize.values())[len(quantize) // 2] if quantize else None
    for t in plan.ladder:   # additivity check: the sum of the parts against all of them at once
        u = uniform_rows.get(t.name)
        if u is not None and rows:
            u["sum_of_groups"] = sum(rows[g.key][t.name]["kld_mean"] for g in plan.groups)
    m = plan.model
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION, "key": plan.key,
        "method": {"name": plan.method, "text": METHODS[plan.method],
                   "calibration": plan.calibration.key if plan.calibration else None},
        "model": {"name": m.name, "file": plan.model_path.name, "arch": m.arch, "blocks": m.block_count,
                  "sha256": plan.key_material["model"]},
        "bands_from": plan.bands_from.name if plan.bands_from.name != "apex-bands" else None, "bands": plan.bands_from.raw.get("bands"),
        "imatrix": ({"file": plan.imatrix.path.name, "sha256": plan.imatrix.sha256,
                     "corpus": plan.imatrix_corpus or plan.imatrix.corpus}
                    if plan.imatrix else None),
        "text": {"label": Path(plan.text.label).name if not plan.text.label.startswith("corpus:") else plan.text.label,
                 "sha256": plan.text.sha256, "chunks": plan.settings.chunks, "ctx": plan.settings.n_ctx},
        "llama": build_label(),
        "ladder": [t.name for t in plan.ladder],
        "groups": [{"key": g.key, "role": g.role, "band": g.band, "slots": list(g.slots),
                    "tensors": len(g.tensors), "params": g.n_params, "blocks": list(g.blocks)} for g in plan.groups],
        "measurements": rows,
        "uniform": uniform_rows,
        "proxy": proxy_rows,
        "cost": {**cost, "splice_s": round(cost["splice_s"], 3), "eval_s": round(cost["eval_s"], 3),
                 "proxy_s": round(cost["proxy_s"], 3),
                 "one_tier_quantize_s": one_tier,
                 "as_tier_quantizations": round(cost["total_s"] / one_tier, 1) if one_tier else None},
    }
