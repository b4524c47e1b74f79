"""`fit`: a profile at a size (or bits per weight), from measured sensitivity, as ordinary YAML.

fit_profile(model, sensitivity, size=...) -> FitResult: the solver's choice (solver.py) rendered
as a profile (explicit bands, a type per role and band, overrides where a slot or some blocks
differ, and a `fitted:` record of where it came from), then planned again from that YAML and
checked tensor by tensor against the choice: what is written is what was solved. Sizes are the
plan's exact predicted file size (header, fallbacks and padding included).
"""

from __future__ import annotations

import json
import math
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from apex_orch.model.gguf_tables import GGMLQuantizationType as T

from apex_orch.core.errors import InternalError, PlanError, RequestError, ResultFileError
from apex_orch.core.safefiles import write_atomic
from apex_orch.core.sizes import MB
from apex_orch.core.text import gb
from apex_orch.fit.groups import ROUTED, bands_profile, bits, type_table
from apex_orch.fit.measurements import Sensitivity
from apex_orch.fit.solver import Problem, Solution
from apex_orch.model.info import ModelInfo
from apex_orch.plan.llama_rules import IMATRIX_REQUIRED
from apex_orch.plan.planner import Plan, make_plan
from apex_orch.plan.profiles import BANDED_ROLES, Profile, load_profile
from apex_orch.quantize.job import stamped_kv_allowance

TOLERANCE = 0.005           # "within 0.5% of the budget"
MAX_RESOLVES = 6
MIN_BUDGET = MB            # a budget under a megabyte is a typo (48 bytes for 48GB?)
# The llama-quantize FTYPE written as general.file_type: the one named after the type holding most bytes.
FTYPE_FOR = {T.Q8_0: "Q8_0", T.Q6_K: "Q6_K", T.Q5_K: "Q5_K_M", T.Q4_K: "Q4_K_M", T.IQ4_XS: "IQ4_XS",
             T.Q3_K: "Q3_K_M", T.IQ3_S: "IQ3_S", T.IQ3_XXS: "IQ3_XXS", T.Q2_K: "Q2_K", T.IQ2_S: "IQ2_S",
             T.IQ2_XS: "IQ2_XS", T.IQ2_XXS: "IQ2_XXS", T.IQ1_M: "IQ1_M"}


@dataclass
class FitResult:
    solution: Solution
    plan: Plan
    yaml_text: str
    budget_file_bytes: int
    target: str               # "48.00 GB" / "3.50 bpw", as asked
    within: bool              # within TOLERANCE under the budget
    file_bytes: int           # the file apex-orch quantize writes, at most (its stamped metadata at full length)
    additivity: dict = None   # type -> the factor its groups' summed mean KLD was scaled by

    @property
    def shortfall(self) -> float:
        return 1 - self.file_bytes / self.budget_file_bytes


def fit_profile(model: ModelInfo, sens: Sensitivity, *, size: int | None = None, bpw: float | None = None,
                base: str | None = None, tier: str | None = None, structure: bool = True,
                imatrix: bool | None = None, work: Path | None = None, max_kld_p999: float | None = None,
                correct_additivity: bool = True) -> FitResult:
    """Solve and render. `base`: the profile whose bands, tier wording and imatrix corpus the fit keeps;
    `max_kld_p999`: an upper bound on the predicted KLD 99.9% (the tail users notice)."""
    if max_kld_p999 is not None and not (math.isfinite(max_kld_p999) and max_kld_p999 > 0):
        raise PlanError(f"the KLD 99.9% bound {max_kld_p999} must be a positive number")
    if (size is None) == (bpw is None):
        raise RequestError("give exactly one target: a size or bits per weight", fields=("size", "bpw"))
    if size is not None and size < MIN_BUDGET:
        raise RequestError(f"{size:,} bytes: at least 1 MB", fields=("size",))
    if bpw is not None and not 1.0 <= bpw <= 16.0:
        raise RequestError(f"{bpw} bits per weight: between 1 and 16", fields=("bpw",))
    scratch = tempfile.TemporaryDirectory(prefix="apex-orch-fit-")
    from_profile = bands_profile(base, Path(scratch.name))
    if sens.data.get("bands") != from_profile.raw.get("bands"):
        own = "APEX's own profile"
        raise ResultFileError(f"the sensitivity was measured with the bands of {sens.data.get('bands_from') or own}, "
                              f"not those of {base or own}", options=("base",),
                              hint="fit from the base profile the measurement used, or measure with these bands")
    with_imatrix = sens.data.get("imatrix") is not None if imatrix is None else imatrix
    ladder = tuple(t for t in sens.ladder if with_imatrix or t not in IMATRIX_REQUIRED)
    with scratch as tmp:
        folder = Path(tmp)
        table = type_table(model, ladder, bands_from=from_profile, work=folder)
        problem = Problem(table, sens, ladder, model.block_count - model.nextn_layers, structure,
                          correct_additivity=correct_additivity)
        stamped = stamped_kv_allowance(with_imatrix)
        overhead = _overhead(model, from_profile, ladder[0], folder, stamped)
        if size is not None:
            budget_file, target = size, gb(size)
        else:
            budget_file = int(bpw * table.n_elements / 8) + overhead
            target = f"{bpw:.2f} bpw"
        budget = budget_file - overhead
        for _ in range(MAX_RESOLVES):
            solution = (problem.solve(budget) if max_kld_p999 is None
                        else problem.solve_tail_bounded(budget, max_kld_p999))
            text = render_yaml(problem, solution, from_profile, tier=tier or _tier_name(target), target=target,
                               imatrix=with_imatrix, sens=sens, structure=structure, max_kld_p999=max_kld_p999)
            path = folder / "fitted.yaml"
            write_atomic(path, text)
            plan = make_plan(model, load_profile(path), has_imatrix=with_imatrix)
            _check_plan(problem, solution, plan)
            excess = plan.predicted_file_size(stamped) - budget_file
            if excess <= 0:
                break
            budget -= excess          # padding moved with the types: tighten by what it cost
        else:
            raise InternalError("fit: the plan stayed over the budget after re-solving")
    result = FitResult(solution, plan, text, budget_file, target, False, plan.predicted_file_size(stamped),
                       dict(problem.factors["kld_mean"]))
    result.within = result.file_bytes >= budget_file * (1 - TOLERANCE)
    return result


def _overhead(model: ModelInfo, profile: Profile, t: T, folder: Path, stamped: dict) -> int:
    """Header, padding and the metadata quantize stamps: the file bytes that are not tensor bytes."""
    from apex_orch.fit.groups import uniform_profile
    plan = make_plan(model, uniform_profile(t, folder, bands_from=profile, imatrix=True), has_imatrix=True)
    return plan.predicted_file_size(stamped) - plan.total_bytes


def _tier_name(target: str) -> str:
    return "Fit-" + target.replace(" ", "").replace(".00", "")


def _check_plan(problem: Problem, solution: Solution, plan: Plan) -> None:
    """The emitted YAML must plan to exactly the solved types and bytes."""
    by_name = plan.by_name()
    for (key, block), t in solution.types.items():
        g = problem.groups[key]
        for n in g.tensors:
            if block is not None and problem.table.block_of[n] != block:
                continue
            got = by_name[n].requested
            if got != t:
                raise InternalError(f"fit: the rendered profile gives {n} {got.name if got else 'no type'}, "
                                    f"the solver chose {t.name}")
    if plan.total_bytes != solution.tensor_bytes:
        raise InternalError(f"fit: plan bytes {plan.total_bytes:,} != solved {solution.tensor_bytes:,}")


def _majority(types: dict) -> T:
    counts = Counter(types.values())
    return max(counts, key=lambda t: (counts[t], bits(t)))


def render_yaml(problem: Problem, solution: Solution, base: Profile, *, tier: str, target: str, imatrix: bool,
                sens: Sensitivity, structure: bool, max_kld_p999: float | None = None) -> str:
    band_type: dict[str, dict[str, T]] = {}
    overrides: list[str] = []
    singles: dict[str, T] = {}
    for key, g in problem.groups.items():
        per_block = solution.group_types(key)
        main = _majority(per_block)
        if g.band is None:
            singles[g.role] = main
            continue
        if g.role == ROUTED and key.split(".")[1] == "down":
            continue   # rendered below as overrides of the gate/up bands
        band_type.setdefault(g.role, {})[g.band] = main
        for slot in g.slots or (None,):   # routed gate/up: per slot, so that down is left alone
            overrides += _block_overrides(g.role, slot, per_block, main)
    for key, g in problem.groups.items():   # routed experts' down projection
        if g.role == ROUTED and key.split(".")[1] == "down":
            per_block = solution.group_types(key)
            main = _majority(per_block)
            gate_up = band_type.get(ROUTED, {}).get(g.band)
            for slot in g.slots:
                if main != gate_up:
                    overrides.append(f"  - {{role: {ROUTED}, slot: {slot}, band: {g.band}, type: {main.name}}}")
                overrides += _block_overrides(ROUTED, slot, per_block, main)
    b = base.bands
    heaviest: Counter[T] = Counter()
    for u, t in solution.types.items():
        heaviest[t] += problem.unit_bytes[u][t]
    ftype = FTYPE_FOR.get(heaviest.most_common(1)[0][0], "Q4_K_M") if heaviest else "Q4_K_M"
    measured = sens.data["imatrix"] or {}
    corpus = base.corpus or sens.imatrix_corpus
    unknown = corpus is None
    if unknown:   # an imatrix given as a file: the profile cannot name its text
        corpus = "diverse"
    q = json.dumps   # a JSON string is a valid, exactly-read YAML scalar: names with ': ' or '#' stay intact
    lines = ([f"# Measured with imatrix {measured.get('file')} (no corpus name): quantize with that imatrix file "
               "to use the same one; `corpus: diverse` below is only what quantize builds without it."]
             if imatrix and unknown else []) + [
        f"# Fitted by apex-orch fit to {target} from measured sensitivity ({sens.key[:12]}); edit freely:",
        "# it is an ordinary profile (quantize, release and extends treat it like any other).",
        f"tier: {q(tier)}",
        f"description: >-\n  APEX fitted to {target}: a type per group chosen to minimise the measured mean KLD "
        f"under the size budget{' with APEX structure' if structure else ''}.",
        f"best_for: {q(base.best_for if base.name != 'apex-bands' else 'A file of exactly this size')}",
        f"base_ftype: {ftype}",
        f"imatrix: {{required: {'true' if imatrix else 'false'}" + (f", corpus: {q(corpus)}}}" if imatrix else "}"),
        f"bands: {{edge: {b.edge}, near: {b.near}, attention_edge: {b.attention_edge}, scale: {b.scale}, "
        f"reference_blocks: {b.reference_blocks}}}",
        "types:",
    ]
    for role in BANDED_ROLES:
        if role in band_type:
            bands = _complete(band_type[role], BANDED_ROLES[role])
            lines.append(f"  {role}: {{" + ", ".join(f"{k}: {v.name}" for k, v in bands.items()) + "}")
    for role in ("embedding", "output", "nextn"):
        if role in singles:
            lines.append(f"  {role}: {singles[role].name}")
    if overrides:
        lines.append("overrides:")
        lines += overrides
    lines += [
        "fitted:",
        f"  target: {q(target)}",
        f"  method: {q(sens.data['method']['name'])}",
        f"  sensitivity: {q(sens.key)}",
        f"  measured_on: {q(sens.data['model']['name'])}",
        f"  text: {q(sens.data['text']['label'])}",
        f"  structure: {'apex' if structure else 'free'}",
        f"  predicted_kld_mean: {solution.kld_mean:.6g}",
    ]
    if solution.kld_p999 is not None:
        lines.append(f"  predicted_kld_p999: {solution.kld_p999:.6g}")
    if max_kld_p999 is not None:
        lines.append(f"  max_kld_p999: {max_kld_p999:.6g}")
    factors = problem.factors["kld_mean"]
    lines += [
        "  additivity: " + q(", ".join(f"{t.name} x{factors[t]:.4g}" for t in problem.ladder)),
        f"  tensor_bytes: {solution.tensor_bytes}",
    ]
    return "\n".join(lines) + "\n"


def _complete(bands: dict[str, T], names: tuple[str, ...]) -> dict[str, T]:
    """Every band a role needs (a band the model lacks takes its outer neighbour's type)."""
    out: dict[str, T] = {}
    last = next(iter(bands.values()))
    for name in names:
        last = bands.get(name, last)
        out[name] = last
    return out


def _block_overrides(role: str, slot: str | None, per_block: dict, main: T) -> list[str]:
    by_type: dict[T, list[int]] = {}
    for block, t in per_block.items():
        if block is not None and t != main:
            by_type.setdefault(t, []).append(block)
    slot_part = f" slot: {slot}," if slot else ""
    return [f"  - {{role: {role},{slot_part} blocks: \"{','.join(str(b) for b in sorted(blocks))}\", type: {t.name}}}"
            for t, blocks in sorted(by_type.items(), key=lambda kv: bits(kv[0]))]
