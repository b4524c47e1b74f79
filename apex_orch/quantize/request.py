"""A quantize request: one or many tiers of one model, as a command or a program asks for them.

`QuantizeRequest` holds what the caller chose (the model or the demo, the profiles, where outputs
go, an imatrix file or a corpus to build one from, threads, split size...). `plan_request` decides
everything else, the policy `apex-orch quantize` follows, without running a tool:

- exactly one of a model and the demo; at least one profile; one output file names one tier; an
  imatrix file or a corpus, not both; the demo's own defaults (a short imatrix, an eval table);
- the source is refused when already quantized (unless accepted), two tiers mapping to one file
  are refused, before any imatrix is built;
- an I-tier with neither an imatrix nor a corpus gets one built from its profile's corpus (the
  first I-tier's, else `diverse`), computed once and shared by every tier that takes it.

It gives a QuantizeSetup: the jobs (job.QuantizeJob), or, while the imatrix they need is still to
be built, what will be built. `describe()` is the dry run; `prepare_imatrix` builds the imatrix
and plans the jobs; run.run_many runs them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from apex_orch.core.errors import RequestError
from apex_orch.model.info import ModelInfo, model_display_name, read_model
from apex_orch.plan.planner import make_plan
from apex_orch.plan.profiles import Profile, load_profile
from apex_orch.quantize.job import (ImatrixSource, QuantizeJob, build_imatrix_for, check_distinct_outputs,
                                    check_mtp_head_types, check_source_unquantized, output_name, plan_quantize,
                                    resolve_imatrix, safe_model_name)

Progress = Callable[[str], None]

IMATRIX_CTX = 512
# The demo model is tiny: a few thousand calibration tokens are plenty and take seconds.
DEMO_IMATRIX_CTX = 256
DEMO_IMATRIX_CHUNKS = 16
DEFAULT_CORPUS = "diverse"


@dataclass
class QuantizeRequest:
    profiles: Sequence[str | Profile]          # names, .yaml paths or loaded profiles
    model: str | os.PathLike | None = None
    demo: bool = False                         # the embedded synthetic model (generated on first use)
    out: Path | None = None                    # one output file (one profile only)
    out_dir: Path = Path("out")
    name: str | None = None                    # model name in output file names (default: general.name)
    imatrix: Path | None = None                # an importance matrix file
    corpus: str | None = None                  # build (or reuse from the cache) the imatrix from this corpus
    imatrix_ctx: int | None = None
    imatrix_chunks: int | None = None
    threads: int | None = None
    split_max_size: int | None = None          # bytes per part (core.sizes)
    trust_tool_plan: bool = False
    allow_requantize: bool = False
    evaluate: bool | None = None               # the eval table after quantizing (None: with the demo only)


@dataclass
class ImatrixToBuild:
    corpus: str
    ctx: int
    chunks: int | None


@dataclass
class QuantizeSetup:
    request: QuantizeRequest
    model_path: Path
    model: ModelInfo
    profiles: list[Profile]
    imatrix: ImatrixSource | None
    build: ImatrixToBuild | None               # an imatrix to build before the jobs can be planned
    evaluate: bool
    jobs: list[QuantizeJob] = field(default_factory=list)

    @property
    def warnings(self) -> list[str]:
        """What the plans say loudly (fallbacks, partial imatrix coverage...), per tier."""
        return [f"{job.profile.tier}: {w}" for job in self.jobs for w in job.plan.warnings]

    def describe(self) -> str:
        """The dry run: each tier's output, predicted size and command; tiers that wait for an
        imatrix are sized as if it were there."""
        if self.jobs:
            return "\n".join(job.describe() for job in self.jobs)
        assert self.build is not None
        lines = []
        for p in self.profiles:
            plan = make_plan(self.model, p, has_imatrix=True)
            lines.append(f"{p.tier}: {_output_for(self, p)} ({plan.total_bytes / 2**30:.2f} GiB predicted, "
                         f"{plan.bpw:.3f} bpw; imatrix from corpus {self.build.corpus} will be built first)")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        """The dry run as data (`quantize --dry-run --json`): what describe() prints."""
        tiers = []
        for job in self.jobs:
            tiers.append({"tier": job.profile.tier, "profile": job.profile.name, "output": str(job.output),
                          "predicted_bytes": job.predicted_size, "bpw": round(job.plan.bpw, 4),
                          "argv": job.argv(job.output, job.rules_path), "waits_for_imatrix": False})
        if not self.jobs:
            for p in self.profiles:
                plan = make_plan(self.model, p, has_imatrix=True)
                tiers.append({"tier": p.tier, "profile": p.name, "output": str(_output_for(self, p)),
                              "predicted_bytes": plan.total_bytes, "bpw": round(plan.bpw, 4), "argv": None,
                              "waits_for_imatrix": True})
        build = self.build
        return {"model": str(self.model_path), "tiers": tiers,
                "imatrix_to_build": ({"corpus": build.corpus, "ctx": build.ctx, "chunks": build.chunks}
                                     if build else None),
                "warnings": self.warnings}


def _display_name(req: QuantizeRequest, model: ModelInfo) -> str:
    return safe_model_name(req.name) if req.name is not None else model_display_name(model)


def _output_for(setup: QuantizeSetup, profile: Profile) -> Path:
    req = setup.request
    if req.out:
        return Path(req.out)
    return Path(req.out_dir) / output_name(_display_name(req, setup.model), profile.tier,
                                           mtp_draft=setup.model.is_mtp_draft)


def check_request(req: QuantizeRequest) -> None:
    """What the request itself must satisfy (RequestError naming the fields), before any file is read."""
    if req.demo == (req.model is not None):
        raise RequestError("give a model path or ask for the demo model (not both)", fields=("model", "demo"))
    if not req.profiles:
        raise RequestError("give at least one profile", fields=("profiles",))
    if req.out and len(req.profiles) > 1:
        raise RequestError("one output file names one tier; with several profiles give an output folder",
                           fields=("out",), options=("out_dir",))
    if req.imatrix and req.corpus:
        raise RequestError("give an imatrix file or a corpus to build one from, not both", fields=("imatrix", "corpus"))


def plan_request(req: QuantizeRequest, *, progress: Progress | None = None) -> QuantizeSetup:
    """Everything decided before a tool runs (see the module docstring). Reads headers, profiles
    and a given imatrix; writes nothing but the demo model, generated on first use."""
    emit = progress or (lambda _m: None)
    check_request(req)
    if req.demo:
        from apex_orch.demo.trained import demo_model_path
        model_path = Path(demo_model_path(progress=emit))
        emit(f"demo model: {model_path}")
    else:
        model_path = Path(req.model)
    info = read_model(model_path)
    check_source_unquantized(info, req.allow_requantize)   # before an imatrix is built or a tool runs
    profiles = [p if isinstance(p, Profile) else load_profile(p) for p in req.profiles]
    evaluate = req.demo if req.evaluate is None else req.evaluate
    setup = QuantizeSetup(req, model_path, info, profiles, None, None, evaluate)
    if not req.out:   # two tiers writing one file: refused before any imatrix or quantization runs
        check_distinct_outputs([(p.tier, _output_for(setup, p)) for p in profiles])
    setup.imatrix = resolve_imatrix(info, req.imatrix) if req.imatrix else None
    if setup.imatrix is None:
        wanted = req.corpus or next((p.corpus or DEFAULT_CORPUS for p in profiles if p.imatrix_required), None)
        if wanted:
            ctx = req.imatrix_ctx or (DEMO_IMATRIX_CTX if req.demo else IMATRIX_CTX)
            chunks = req.imatrix_chunks or (DEMO_IMATRIX_CHUNKS if req.demo else None)
            setup.build = ImatrixToBuild(wanted, ctx, chunks)
            for p in profiles:   # a head no imatrix can cover is refused before one is built
                check_mtp_head_types(make_plan(info, p, has_imatrix=True), None)
    if setup.build is None:
        setup.jobs = _plan_jobs(setup)
    return setup


def prepare_imatrix(setup: QuantizeSetup, *, progress: Progress | None = None) -> QuantizeSetup:
    """Build (or reuse from the cache) the imatrix the setup waits for, then plan its jobs."""
    if setup.build is not None:
        b = setup.build
        emit = progress or (lambda _m: None)
        emit(f"imatrix: corpus {b.corpus} (computed once, cached, shared by every I-tier)")
        path = build_imatrix_for(setup.model_path, b.corpus, setup.request.threads, emit, ctx=b.ctx, chunks=b.chunks)
        setup.imatrix = resolve_imatrix(setup.model, path)
        setup.build = None
        setup.jobs = _plan_jobs(setup)
    return setup


def _plan_jobs(setup: QuantizeSetup) -> list[QuantizeJob]:
    req = setup.request
    # The imatrix goes to the tiers that need one, and to every tier when the caller asked for one.
    explicit = bool(req.imatrix or req.corpus)
    return [plan_quantize(setup.model_path, p, out=Path(req.out) if req.out else None, out_dir=Path(req.out_dir),
                          name=req.name, imatrix=setup.imatrix if (p.imatrix_required or explicit) else None,
                          threads=req.threads, split_max_size=req.split_max_size, model=setup.model,
                          allow_requantize=req.allow_requantize, trust_tool_plan=req.trust_tool_plan)
            for p in setup.profiles]
