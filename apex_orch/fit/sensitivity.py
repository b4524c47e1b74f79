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
llama.cpp build; an interrupted run resumes from `<key>.partial.json`. Runs on one key share the
work: the first takes `<key>.lock` and measures, the others wait for it and read its result.
Everything read back (the cache entry, the partial) is checked like a manifest (measurements.py:
its own checksum, its values, its key, ladder and groups against the plan); a damaged entry is
discarded and measured again, with a notice. The text is checked before any tool runs: long enough
for the context and chunks, and never the imatrix's own text, however it was given.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import socket
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from apex_orch.model.gguf_tables import GGMLQuantizationType as T

from apex_orch.core import settings as env
from apex_orch.core.errors import ApexError, DiskSpaceError, LockedError, ModelError, RequestError, ResultFileError
from apex_orch.core.fingerprint import source_sha256
from apex_orch.core.infiles import read_input, read_json
from apex_orch.core.locks import FileLock
from apex_orch.core.safefiles import write_atomic
from apex_orch.evaluation.inputs import EvalSettings, TextFacts, text_facts
from apex_orch.fit.groups import Group, bands_profile, groups_of, parse_ladder, uniform_profile
from apex_orch.fit.measurements import (FORMAT, FORMAT_VERSION, Sensitivity, check_sensitivity, self_sha256,
                                        stamped)
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
    n_text_tokens: int = 0                # the text's tokens with the model's tokenizer (checked up front)
    n_chunks: int = 0                     # chunks each measurement scores

    @property
    def cache_path(self) -> Path:
        return cache_dir() / f"{self.key}.json"

    @property
    def partial_path(self) -> Path:
        return cache_dir() / f"{self.key}.partial.json"

    @property
    def lock_path(self) -> Path:
        return cache_dir() / f"{self.key}.lock"

    def cache_entry(self) -> tuple[Sensitivity | None, str]:
        """(the cached result, "hit"), or (None, "will be measured"), or (None, "damaged (...): will be
        measured again"): the entry is read and checked like a manifest, and must be this plan's."""
        if not os.path.lexists(self.cache_path):
            return None, "will be measured"
        try:
            data = read_json(self.cache_path, "sensitivity", what="a sensitivity result")
            check_sensitivity(data, str(self.cache_path))
            self._check_is_mine(data)
        except ApexError as exc:
            return None, f"damaged ({exc.message}): will be measured again"
        return Sensitivity(data, self.cache_path), "hit"

    def _check_is_mine(self, data: dict) -> None:
        want = (self.key, [t.name for t in self.ladder], [g.key for g in self.groups], self.method)
        got = (data["key"], data["ladder"], [g["key"] for g in data["groups"]], data["method"]["name"])
        if got != want:
            raise ResultFileError("the entry is not this measurement's (its key, ladder, groups or method differ)",
                                  where=str(self.cache_path))
        rows = data["measurements"] if self.method == "exact" else data.get("proxy") or {}
        if set(rows) != {g.key for g in self.groups}:
            raise ResultFileError("the entry does not measure every group", where=str(self.cache_path))

    @property
    def cached(self) -> bool:
        return self.cache_entry()[0] is not None

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
                 f"method    {self.method}"
                 + (f" (calibrated by {self.calibration.key[:12]})" if self.calibration
                    else " (uncalibrated: proxy units)" if self.method == "proxy" else ""),
                 f"work      {len(self.ladder)} uniform quantizations + {self.n_measurements} evaluations",
                 f"tokens    {self.n_text_tokens:,} in the text: {self.n_chunks} chunk(s) of {self.settings.n_ctx} "
                 f"measured, {self.n_chunks * self.settings.scored_per_chunk:,} tokens scored per measurement"
                 if self.n_text_tokens else "",
                 f"cache     {self.cache_path} ({self.cache_entry()[1]})"]
        lines = [line for line in lines if line]
        return "\n".join(lines)


def cache_dir() -> Path:
    return env.cache_root() / "sensitivity"


def plan_sensitivity(model_path: str | os.PathLike, *, imatrix: ImatrixSource | None = None,
                     text: str | os.PathLike | None = None, text_corpus: str | None = None,
                     chunks: int = DEFAULT_CHUNKS, ctx: int = 512, ladder: str | None = None,
                     bands_from: str | None = None, threads: int | None = None, method: str = "exact",
                     calibration: Sensitivity | None = None, imatrix_corpus: str | None = None,
                     imatrix_coming: bool = False) -> SensitivityPlan:
    """Resolve everything and check it before any tool runs (reads headers, the text and its tokens).
    `imatrix_coming`: the imatrix is built from `imatrix_corpus` after this (check the ladder as with one)."""
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
    with_imatrix = imatrix is not None or imatrix_coming
    types = parse_ladder(ladder, with_imatrix)
    groups = groups_of(make_plan(model, uniform_profile_for(types[0], profile, with_imatrix),
                                 has_imatrix=True))
    if (text is None) == (text_corpus is None):
        raise RequestError("give the held-out text the output is measured on: a file or a corpus name",
                           fields=("text", "text_corpus"),
                           hint="not the imatrix corpus: a text the model was not calibrated on")
    settings = (EvalSettings(n_ctx=ctx, chunks=chunks, n_threads=threads) if threads
                else EvalSettings(n_ctx=ctx, chunks=chunks))
    tf = text_facts(text, text_corpus)
    calibrated_on = imatrix_texts(path, imatrix, imatrix_corpus).get(tf.sha256)
    if calibrated_on is not None:
        raise RequestError(f"the measurement text {tf.label} is the text the imatrix was computed on "
                           f"({calibrated_on}); it must be held out", fields=("text", "text_corpus"),
                           hint="pick another corpus, or a text file the imatrix never saw")
    n_tokens = n_chunks = 0
    if method == "exact":   # every measurement is an evaluation: the text must hold enough scored tokens
        from apex_orch.evaluation.evaluate import check_eval_text
        n_tokens, n_chunks = check_eval_text(path, tf, settings, kld=True)
    material = {
        "format": FORMAT_VERSION, "method": method, "calibration": calibration.key if calibration else None,
        "model": source_sha256(path),
        "imatrix": imatrix.sha256 if imatrix else None, "text": tf.sha256, "settings": settings.numeric_key(),
        "ladder": [t.name for t in types], "bands": profile.raw.get("bands"),
        "groups": [[g.key, list(g.tensors)] for g in groups], "llama": build_label(),
    }
    key = hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:20]
    return SensitivityPlan(path, model, profile, groups, types, imatrix, tf, settings, threads, key, material, method,
                           calibration, imatrix_corpus, n_tokens, n_chunks)


def imatrix_texts(model_path: Path, imatrix: ImatrixSource | None, corpus: str | None) -> dict[str, str]:
    """sha256 -> what it is, of every text the imatrix was (or will be) computed on: the corpus built
    plain and for this model (its chat template), the file llama-imatrix read (`imatrix.datasets`),
    and the corpus digest apex-orch's imatrix cache recorded beside the file."""
    found: dict[str, str] = {}
    if corpus is not None:
        from apex_orch.calibration.corpus import build_corpus
        found[build_corpus(corpus).sha256] = f"corpus {corpus}"
        found.setdefault(build_corpus(corpus, model=model_path).sha256, f"corpus {corpus} for this model")
    if imatrix is not None:
        for name in imatrix.info.datasets[:1]:
            try:
                found.setdefault(hashlib.sha256(read_input(name, "text")).hexdigest(), f"{name}, its dataset")
            except (ApexError, TypeError, ValueError):
                pass   # the file it names is gone or unreadable: nothing to compare with
        try:
            sidecar = read_json(imatrix.path.with_suffix(".json"), "record")
        except ApexError:
            sidecar = None
        if isinstance(sidecar, dict) and sidecar.get("sha256") == imatrix.sha256:
            digest = (sidecar.get("inputs") or {}).get("corpus_sha256")
            if isinstance(digest, str):
                found.setdefault(digest, f"corpus {sidecar.get('corpus')}")
    return found


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
    """Measure (or load from the cache) and return the result. Runs on one key share the work: the
    first holds `<key>.lock` while it measures; the others wait, then read its result."""
    emit = progress or (lambda _m: None)
    entry, _state = plan.cache_entry()
    if entry is not None:
        emit(f"cache hit: {plan.cache_path}")
        return entry
    cache_dir().mkdir(parents=True, exist_ok=True)
    record = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()})

    def waiting(holder: str) -> None:
        emit(f"another apex-orch run ({holder or 'a process'}) is measuring this sensitivity; waiting for it, "
             "then using its result")
    with FileLock(plan.lock_path, record=record, on_wait=waiting,
                  busy=lambda holder: LockedError(f"{plan.cache_path} is being measured ({holder})")):
        entry, state = plan.cache_entry()
        if entry is not None:
            emit(f"cache hit: {plan.cache_path} (measured by the run this one waited for)")
            return entry
        if state.startswith("damaged"):
            emit(f"notice: the cached result {plan.cache_path} is {state.rsplit(':', 1)[0]}; it was discarded and "
                 "is measured again")
            plan.cache_path.unlink(missing_ok=True)
        try:
            return _measure(plan, emit, work_dir)
        except DiskSpaceError as exc:   # the uniform files and spliced copies go to the temporary folder
            raise DiskSpaceError(exc.message, where=exc.where,
                                 hint="sensitivity writes its uniform quantizations and spliced files to the "
                                      f"temporary folder ({work_dir or tempfile.gettempdir()}); free some space "
                                      "there or point TMPDIR at a disk with room, then rerun (finished "
                                      "measurements are kept)") from None


def _measure(plan: SensitivityPlan, emit: Progress, work_dir: Path | None) -> Sensitivity:
    from apex_orch.evaluation.evaluate import evaluate
    from apex_orch.quantize.job import plan_quantize
    from apex_orch.quantize.run import run_quantize

    partial = _load_partial(plan, emit)
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
    data = stamped(_result(plan, rows, uniform_rows, cost, proxy_rows))
    check_sensitivity(data, str(plan.cache_path))   # what is cached is what a reader accepts
    write_atomic(plan.cache_path, json.dumps(data, indent=1) + "\n")
    plan.partial_path.unlink(missing_ok=True)
    return Sensitivity(data, plan.cache_path)


PARTIAL_FORMAT = "apex-orch-sensitivity-partial/v2"


def _load_partial(plan: SensitivityPlan, emit: Progress) -> dict:
    """An interrupted run's measurements, when they are whole and this plan's; a damaged one is
    discarded (with a notice) and the measurement starts over."""
    if not os.path.lexists(plan.partial_path):
        return {}
    try:
        data = read_json(plan.partial_path, "record", what="a partial sensitivity result")
        if not (isinstance(data, dict) and data.get("format") == PARTIAL_FORMAT
                and data.get("self_sha256") == self_sha256(data)):
            raise ResultFileError("it fails its own checksum (edited or damaged)", where=str(plan.partial_path))
        if data.get("key") != plan.key:
            return {}
        try:
            _check_partial_values(data, str(plan.partial_path))
        except (TypeError, KeyError, AttributeError) as exc:
            raise ResultFileError(f"its structure is not a partial result's ({exc.__class__.__name__})",
                                  where=str(plan.partial_path)) from None
    except ApexError as exc:
        emit(f"notice: the partial result {plan.partial_path} is damaged ({exc.message}); it was discarded and the "
             "measurement starts over")
        plan.partial_path.unlink(missing_ok=True)
        return {}
    return data


def _check_partial_values(data: dict, where: str) -> None:
    def bad(what: str) -> ResultFileError:
        return ResultFileError(f"{what} is not a finite non-negative number", where=where)
    ok = lambda x: isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x >= 0  # noqa: E731
    for kind in ("measurements", "proxy"):
        for g, by_type in (data.get(kind) or {}).items():
            for t, v in by_type.items():
                if not ok(v["kld_mean"] if kind == "measurements" else v):
                    raise bad(f"{kind} of {g} at {t}")
    for t, row in (data.get("uniform") or {}).items():
        if not ok(row["kld_mean"]):
            raise bad(f"uniform at {t}")
    if not isinstance(data.get("cost"), dict) or not isinstance(data["cost"].get("quantize_s"), dict):
        raise ResultFileError("its cost record is missing", where=where)


def _save_partial(plan: SensitivityPlan, rows: dict, uniform_rows: dict, cost: dict, proxy_rows: dict) -> None:
    doc = {"format": PARTIAL_FORMAT, "key": plan.key, "measurements": rows, "uniform": uniform_rows,
           "cost": cost, "proxy": proxy_rows}
    doc["self_sha256"] = self_sha256(doc)
    write_atomic(plan.partial_path, json.dumps(doc) + "\n")


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
        "bands_from": plan.bands_from.name if plan.bands_from.name != "apex-bands" else None,
        "bands": plan.bands_from.raw.get("bands"),
        # `corpus` is a corpus name (or None: an imatrix given as a file); the text it read is `dataset`
        "imatrix": ({"file": plan.imatrix.path.name, "sha256": plan.imatrix.sha256,
                     "corpus": plan.imatrix_corpus, "dataset": plan.imatrix.corpus}
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
