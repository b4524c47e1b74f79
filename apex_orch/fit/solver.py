"""Choose a type per group (and, to land on the budget, per block) that minimises predicted loss.

The model of loss is additive, corrected per type: the predicted mean KLD of a profile is the sum,
over groups, of the mean KLD measured when that group alone took its type, times that type's
additivity factor (the measured KLD of the all-at-that-type file over the sum of its parts; the
plain sum over-predicts high-bit types up to 2x); a group split between two types by block
contributes each type's measurement in proportion to the parameters of its blocks. KLD 99.9% is
predicted the same way from its own measurements and factors; `solve_tail_bounded` keeps it under a
bound by adding it to the objective with the smallest weight that meets the bound. Bytes are exact:
every tensor's bytes at every type from the planner (fallbacks included).

Search, in three steps:
  1. greedy: from every group at the cheapest type, repeatedly take the upgrade (a group to any
     higher type, with the upgrades the structure rules force on other groups) that removes the
     most loss per byte and still fits;
  2. exchange: try lowering one group and raising another while that lowers loss and fits;
  3. fill: spend what is left block by block, edge blocks first (a group's blocks nearest the
     ends of the model take the next type up), so the plan lands within a fraction of a block's
     bytes under the budget.
With `structure` on, APEX's shape is a constraint everywhere: within a role (and, for routed
experts, a slot class) a block never has more bits than a block nearer the model's ends, and in
every block the attention and the shared expert have at least the bits of the routed experts.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from apex_orch.model.gguf_tables import GGMLQuantizationType as T

from apex_orch.core.errors import PlanError, RequestError, ResultFileError
from apex_orch.fit.groups import ROUTED, Group, TypeTable, bits
from apex_orch.fit.measurements import Sensitivity

Unit = tuple[str, int | None]   # (group key, block) ; block None = the whole group (unsplittable)
MAX_ROUNDS = 400


@dataclass
class Solution:
    types: dict[Unit, T]
    tensor_bytes: int           # grouped tensors + fixed tensors
    budget_bytes: int
    loss: float                 # the objective: predicted mean KLD (+ tail_weight x predicted KLD 99.9%)
    steps: list[str] = field(default_factory=list)
    shares: dict[Unit, float] = field(default_factory=dict)   # each unit's share of its group's parameters
    kld_mean: float = 0.0       # predicted mean KLD (group effects x the additivity factor of their type)
    kld_p999: float | None = None   # predicted KLD 99.9% (same model), None without tail measurements
    tail_weight: float = 0.0

    def group_types(self, key: str) -> dict[int | None, T]:
        return {u[1]: t for u, t in self.types.items() if u[0] == key}


TAIL = "kld_p999"


class Problem:
    def __init__(self, table: TypeTable, sens: Sensitivity, ladder: tuple[T, ...], n_main_blocks: int,
                 structure: bool = True, correct_additivity: bool = True):
        self.table, self.sens, self.ladder, self.structure = table, sens, ladder, structure
        self.n_main = n_main_blocks
        self.bits = {t: bits(t) for t in ladder}
        missing = [g.key for g in table.groups if g.key not in sens.group_keys]
        if missing:
            raise ResultFileError(f"the sensitivity result has no measurement for group(s) {', '.join(missing)}",
                             hint="measure this model (or one with the same roles and bands) with apex-orch "
                                  "sensitivity")
        self.groups: dict[str, Group] = {g.key: g for g in table.groups}
        self.units: dict[str, list[Unit]] = {}
        self.unit_bytes: dict[Unit, dict[T, int]] = {}
        self.unit_share: dict[Unit, float] = {}
        for g in table.groups:
            splittable = g.role not in ("embedding", "output", "nextn") and g.blocks
            blocks: list[int | None] = sorted(g.blocks, key=lambda b: (self.depth(b), b)) if splittable else [None]
            self.units[g.key] = [(g.key, b) for b in blocks]
            params: dict[int | None, int] = defaultdict(int)
            for n in g.tensors:
                b = table.block_of[n] if splittable else None
                params[b] += table.elements[n]
            total = sum(params.values()) or 1
            for b in blocks:
                u = (g.key, b)
                self.unit_share[u] = params[b] / total
                self.unit_bytes[u] = {t: table.group_bytes(g, t, None if b is None else {b}) for t in ladder}
        self._classes, self._block_pairs = self._rules() if structure else ([], [])
        # The sum of the groups' own effects mispredicts a whole profile by a factor that depends on the
        # type (measured on the reference MoE: x0.99 at IQ1_M, x0.33 at Q8_0); each uniform file
        # measures that factor, and every group's effect at a type is scaled by it.
        self.factors = {m: {t: (sens.additivity(t, m) or 1.0) if correct_additivity else 1.0 for t in ladder}
                        for m in ("kld_mean", TAIL)}
        self.mean_table = {(k, t): self.factors["kld_mean"][t] * sens.loss(k, t) for k in self.groups for t in ladder}
        self.tail_table = ({(k, t): self.factors[TAIL][t] * sens.loss(k, t, TAIL) for k in self.groups for t in ladder}
                           if sens.has_metric(TAIL) else None)
        self.set_tail_weight(0.0)

    def set_tail_weight(self, weight: float) -> None:
        """The objective: predicted mean KLD + weight x predicted KLD 99.9%."""
        if weight and self.tail_table is None:
            raise PlanError("the sensitivity result has no KLD 99.9% for every group and type (a proxy result?), "
                            "so the tail cannot be bounded", hint="measure with the exact method")
        self.tail_weight = weight
        self.loss_table = {key: v + (weight * self.tail_table[key] if weight else 0.0)
                           for key, v in self.mean_table.items()}

    def predict(self, types: dict[Unit, T], table: dict) -> float:
        return sum(self.unit_share[u] * table[(u[0], t)] for u, t in types.items())

    def depth(self, block: int) -> int:
        return min(block, self.n_main - 1 - block)

    def _rules(self) -> tuple[list[list[list[Unit]]], list[tuple[Unit, list[Unit]]]]:
        """The structure rules: per role and slot class, units grouped by depth (edge first), each
        depth never above a shallower one; per block, attention/shared-expert units >= routed ones."""
        by_class: dict[tuple[str, str], dict[int, list[Unit]]] = defaultdict(lambda: defaultdict(list))
        at_block: dict[int, dict[str, list[Unit]]] = defaultdict(lambda: defaultdict(list))
        for key, units in self.units.items():
            g = self.groups[key]
            if g.band is None:
                continue
            slot_class = key.split(".")[1] if g.role == ROUTED else ""
            for u in units:
                if u[1] is None:
                    continue
                by_class[(g.role, slot_class)][self.depth(u[1])].append(u)
                at_block[u[1]][g.role].append(u)
        classes = [[depths[d] for d in sorted(depths)] for depths in by_class.values()]
        pairs = [(hi, roles.get(ROUTED, [])) for roles in at_block.values()
                 for hi_role in ("attention", "shared_expert") for hi in roles.get(hi_role, [])]
        return classes, [(hi, los) for hi, los in pairs if los]

    def first_violation(self, types: dict[Unit, T]) -> tuple[Unit, Unit] | None:
        """(a unit that must rise, the unit it must reach), or None when the rules hold."""
        b = self.bits
        for depths in self._classes:
            low_unit, low = None, float("inf")
            for units in depths:
                for u in units:
                    if b[types[u]] > low:
                        return low_unit, u
                for u in units:
                    if b[types[u]] < low:
                        low_unit, low = u, b[types[u]]
        for hi, los in self._block_pairs:
            for lo in los:
                if b[types[hi]] < b[types[lo]]:
                    return hi, lo
        return None

    # ---------------------------------------------------------------- evaluation of a state
    def loss(self, types: dict[Unit, T]) -> float:
        return sum(self.unit_share[u] * self.loss_table[(u[0], t)] for u, t in types.items())

    def nbytes(self, types: dict[Unit, T]) -> int:
        return self.table.fixed_bytes + sum(self.unit_bytes[u][t] for u, t in types.items())

    def _with_group(self, types: dict[Unit, T], key: str, t: T) -> dict[Unit, T] | None:
        """`types` with group `key` at `t`, and every group the rules force upward raised with it."""
        out = dict(types)
        for u in self.units[key]:
            out[u] = t
        for _ in range(len(self.groups) * len(self.ladder) + 1):
            bad = self.first_violation(out)
            if bad is None:
                return out
            hi, lo = bad
            need = bits(out[lo])
            up = next((x for x in self.ladder if bits(x) >= need and bits(x) >= bits(out[hi])), None)
            if up is None:
                return None
            for u in self.units[hi[0]]:
                out[u] = max(out[u], up, key=bits)
        return None

    # ---------------------------------------------------------------- search
    def solve(self, budget: int) -> Solution:
        cheapest = {u: self.ladder[0] for units in self.units.values() for u in units}
        floor = self.nbytes(cheapest)
        if floor > budget:
            raise RequestError(f"the budget is below the smallest file this ladder can make ({floor:,} bytes of "
                               f"tensors, every group at {self.ladder[0].name})", fields=("size", "bpw"),
                               hint="give a larger size, or measure a ladder with smaller types")
        state = cheapest
        steps: list[str] = []
        for find in (self._best_upgrade, self._best_exchange, self._best_fill):
            state = self._repeat(find, state, budget, steps)
        return Solution(state, self.nbytes(state), budget, self.loss(state), steps, dict(self.unit_share),
                        kld_mean=self.predict(state, self.mean_table),
                        kld_p999=None if self.tail_table is None else self.predict(state, self.tail_table),
                        tail_weight=self.tail_weight)

    def solve_tail_bounded(self, budget: int, max_p999: float, rounds: int = 8) -> Solution:
        """The lowest predicted mean KLD whose predicted KLD 99.9% is at most `max_p999`: the
        tail enters the objective with the smallest weight that meets the bound (found by
        doubling, then bisection); a bound no weight meets is an error naming the lowest reached."""
        self.set_tail_weight(1.0)   # refuses a result without tail measurements
        self.set_tail_weight(0.0)
        best = self.solve(budget)
        assert best.kld_p999 is not None
        if best.kld_p999 <= max_p999:
            return best
        lowest = best.kld_p999
        low, high, found = 0.0, None, None
        weight = max(best.kld_mean / max(best.kld_p999, 1e-12), 1e-9)
        for _ in range(40):
            self.set_tail_weight(weight)
            s = self.solve(budget)
            lowest = min(lowest, s.kld_p999)
            if s.kld_p999 <= max_p999:
                high, found = weight, s
                break
            low, weight = weight, weight * 4
        if found is None:
            raise PlanError(f"no profile of this size is predicted to keep KLD 99.9% at or under {max_p999:g}: "
                            f"the lowest predicted is {lowest:.4g}",
                            hint="raise the size or the tail bound")
        for _ in range(rounds):
            mid = (low * high) ** 0.5 if low > 0 else high / 4
            self.set_tail_weight(mid)
            s = self.solve(budget)
            if s.kld_p999 <= max_p999:
                high, found = mid, s
            else:
                low = mid
        self.set_tail_weight(high)
        return found

    @staticmethod
    def _repeat(find, state, budget, steps):
        """Apply `find`'s best move until it finds none (bounded: every move lowers the loss)."""
        for _ in range(MAX_ROUNDS):
            move = find(state, budget)
            if move is None:
                break
            state, text = move
            steps.append(text)
        return state

    def _best_upgrade(self, state, budget):
        base_loss, base_bytes = self.loss(state), self.nbytes(state)
        best = None
        for key in self.groups:
            current = min(bits(state[u]) for u in self.units[key])
            for t in self.ladder:
                if bits(t) <= current:
                    continue
                cand = self._with_group(state, key, t)
                if cand is None:
                    continue
                db, dl = self.nbytes(cand) - base_bytes, self.loss(cand) - base_loss
                if db <= 0 or dl >= 0 or base_bytes + db > budget:
                    continue
                ratio = -dl / db
                if best is None or ratio > best[0]:
                    best = (ratio, cand, f"{key} -> {t.name}")
        return None if best is None else (best[1], best[2])

    def _best_exchange(self, state, budget):
        """Lower one group a step and raise another, when that lowers the loss and fits."""
        base = self.loss(state)
        best = None
        for down in self.groups:
            cur = self.units[down][0]
            lower = [t for t in self.ladder if bits(t) < bits(state[cur])]
            if not lower:
                continue
            reduced = dict(state)
            for u in self.units[down]:
                reduced[u] = lower[-1]
            if self.first_violation(reduced) is not None:
                continue
            for up in self.groups:
                if up == down:
                    continue
                for t in self.ladder:
                    if bits(t) <= bits(reduced[self.units[up][0]]):
                        continue
                    cand = self._with_group(reduced, up, t)
                    if cand is None or cand[cur] != lower[-1] or self.nbytes(cand) > budget:
                        continue
                    gain = base - self.loss(cand)
                    if gain > 1e-12 and (best is None or gain > best[0]):
                        best = (gain, cand, f"exchange: {down} -> {lower[-1].name}, {up} -> {t.name}")
        return None if best is None else (best[1], best[2])

    def _best_fill(self, state, budget):
        """Spend what is left on some blocks of a group, edge blocks first."""
        left = budget - self.nbytes(state)
        best = None
        for key, units in self.units.items():
            for t in self.ladder:
                below = [u for u in units if bits(state[u]) < bits(t)]
                cand, spent, k = dict(state), 0, 0
                for u in below:   # edge blocks first (units are in depth order)
                    extra = self.unit_bytes[u][t] - self.unit_bytes[u][state[u]]
                    if spent + extra > left:
                        break
                    cand[u] = t
                    spent += extra
                    k += 1
                while k and self.first_violation(cand) is not None:   # give back the deepest until the rules hold
                    k -= 1
                    cand[below[k]] = state[below[k]]
                if not k:
                    continue
                gain = self.loss(state) - self.loss(cand)
                if gain > 0 and (best is None or gain > best[0]):
                    best = (gain, cand, f"fill: {k} block(s) of {key} -> {t.name}")
        return None if best is None else (best[1], best[2])
