"""Importance-matrix files: read one, check it fits a model, check it covers a plan.

Takes an imatrix path (and a ModelInfo, or a quantization Plan); gives an ImatrixInfo, and
the entries that do not fit or the planned tensors that lack data. `quantize` runs these
checks before llama-quantize starts, which would otherwise abort halfway through.

File format (GGUF, what the pinned llama-imatrix writes): per tensor `<name>.in_sum2`
[ne0, n_mat] (ggml order) and `<name>.counts` [1, n_mat]; n_mat is the expert count for
`*_exps` tensors, so counts are tokens routed to each expert. Metadata: imatrix.datasets,
imatrix.chunk_count, imatrix.chunk_size.

Which tensors need data is the plan's decision (PlannedTensor.requires_imatrix, from
plan.llama_rules.IMATRIX_REQUIRED: the port of llama-quantize's tensor_requires_imatrix),
never decided again here.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from apex_orch.core.errors import ImatrixError
from apex_orch.core.infiles import open_input, read_gguf
from apex_orch.model.info import ModelInfo, TensorInfo
from apex_orch.model.roles import Role, nextn_blocks
from apex_orch.plan.llama_rules import ABORT_WITHOUT_IMATRIX_DATA, allows_quantization
from apex_orch.plan.planner import Plan

NOT_COLLECTED = ("token_embd.weight", "output.weight")   # never / only with --process-output
# Why an imatrix holds nothing for the MTP head (read from the pinned tree: llama-imatrix evaluates
# the model's decoder graph, which stops at the trunk; the MTP layers are built only in the
# separate LLM_GRAPH_TYPE_DECODER_MTP graph speculative decoding runs).
MTP_NOT_COLLECTED = ("llama-imatrix evaluates the trunk only: the MTP/NextN layers run in a separate graph "
                     "that only speculative decoding builds, so no imatrix holds data for them")
MAX_LISTED = 8


@dataclass(frozen=True)
class ImatrixEntry:
    name: str                 # the model tensor's name, e.g. blk.3.ffn_down_exps.weight
    ne0: int                  # row length (the tensor's ne0)
    n_mat: int                # matrices: experts for *_exps, else 1 (or heads for 3-D MLA tensors)
    counts: tuple[int, ...]   # tokens seen per matrix

    @property
    def tokens(self) -> int:
        return sum(self.counts)

    @property
    def zero(self) -> list[int]:
        """Matrices (experts) that saw no token."""
        return [i for i, c in enumerate(self.counts) if c == 0]

    @property
    def has_data(self) -> bool:
        return any(self.counts)


@dataclass(frozen=True)
class ImatrixInfo:
    path: Path
    chunk_count: int
    chunk_size: int
    datasets: tuple[str, ...]
    entries: dict[str, ImatrixEntry] = field(hash=False)

    def entry(self, name: str) -> ImatrixEntry | None:
        return self.entries.get(name)


def read_imatrix(path: str | os.PathLike) -> ImatrixInfo:
    """Read a GGUF imatrix. Missing, corrupt or legacy (.dat) files raise ImatrixError."""
    # imported here: numpy and gguf's reader are only needed when a file is read
    import numpy as np

    p = Path(path)
    if not os.path.lexists(p):
        raise ImatrixError(f"imatrix file not found: {p}",
                           hint="compute one with `apex-orch imatrix MODEL --corpus NAME`")
    with open_input(p, "imatrix") as fh:   # core.infiles: a regular file within its bound, never blocking
        try:
            magic = fh.read(4)
        except OSError as exc:
            raise ImatrixError(f"cannot read imatrix file: {exc.strerror}", where=str(p)) from None
    if magic != b"GGUF":
        raise ImatrixError("not a GGUF imatrix (legacy .dat or another file type)", where=str(p),
                           hint="recompute it with apex-orch (GGUF output), or convert it with "
                                "`llama-imatrix --in-file OLD.dat -o NEW.gguf`")
    try:
        reader = read_gguf(p, "imatrix")
    except ImatrixError:
        raise
    except Exception as exc:  # GGUFReader raises ValueError/IndexError/struct errors on damage
        raise ImatrixError(f"corrupt imatrix file: {exc}", where=str(p),
                           hint="delete it and compute it again") from None

    def scalar(key: str) -> int | None:
        f = reader.get_field(key)
        return int(f.contents()) if f is not None else None

    chunk_count, chunk_size = scalar("imatrix.chunk_count"), scalar("imatrix.chunk_size")
    if chunk_count is None or chunk_size is None:
        raise ImatrixError("GGUF file has no imatrix metadata (imatrix.chunk_count/chunk_size)",
                           where=str(p), hint="is this a model instead of an imatrix?")
    ds = reader.get_field("imatrix.datasets")
    datasets = tuple(ds.contents()) if ds is not None else ()

    sums: dict[str, Any] = {}
    counts: dict[str, Any] = {}
    try:
        for t in reader.tensors:
            if t.name.endswith(".in_sum2"):
                sums[t.name[: -len(".in_sum2")]] = t
            elif t.name.endswith(".counts"):
                counts[t.name[: -len(".counts")]] = np.asarray(t.data, dtype=np.float64).reshape(-1)
            else:
                raise ImatrixError(f"unexpected tensor {t.name!r} in imatrix", where=str(p))
    except (ValueError, IndexError, TypeError) as exc:
        raise ImatrixError(f"corrupt imatrix data: {exc}", where=str(p)) from None
    if set(sums) != set(counts):
        odd = sorted(set(sums) ^ set(counts))
        raise ImatrixError(f"imatrix entries without their in_sum2/counts pair: {', '.join(odd[:MAX_LISTED])}",
                           where=str(p))
    entries = {}
    for name, t in sums.items():
        shape = [int(x) for x in t.shape]          # ggml order: [ne0, n_mat]
        ne0, n_mat = shape[0], (shape[1] if len(shape) > 1 else 1)
        c = counts[name]
        if len(c) != n_mat:
            raise ImatrixError(f"{name}: {len(c)} counts for {n_mat} matrices", where=str(p))
        entries[name] = ImatrixEntry(name=name, ne0=ne0, n_mat=n_mat, counts=tuple(int(round(x)) for x in c))
    return ImatrixInfo(path=p, chunk_count=chunk_count, chunk_size=chunk_size, datasets=datasets,
                       entries=dict(sorted(entries.items())))


# =========================================================================== fit and coverage

def expected_tensors(model_info: ModelInfo) -> list[TensorInfo]:
    """Tensors an imatrix should hold: quantizable 2-D/3-D weights except token_embd/output and
    the MTP head's (MTP_NOT_COLLECTED)."""
    mtp = {t.name for t in mtp_tensors(model_info)}
    return [t for t in model_info.tensors
            if allows_quantization(t.name, t.shape, model_info.arch) and t.name not in NOT_COLLECTED
            and t.name not in mtp]


def mtp_tensors(model_info: ModelInfo) -> list[TensorInfo]:
    """The quantizable tensors of the MTP/NextN block(s): what no imatrix covers."""
    blocks = nextn_blocks(model_info)
    return [t for t in model_info.tensors if t.block in blocks
            and allows_quantization(t.name, t.shape, model_info.arch)]


def mtp_lacking_data(info: ImatrixInfo | None, plan: Plan) -> list[str]:
    """Names of the MTP head's planned tensors whose type needs imatrix data (IQ1/IQ2/IQ3_XXS,
    and the head's embedding/output copies at IQ2_XXS/IQ2_XS/IQ1_S) that `info` (None: no
    imatrix) does not hold. llama-imatrix never collects any for them (MTP_NOT_COLLECTED), so a
    plan that needs it is refused before llama-quantize runs, with or without an imatrix."""
    lacking = []
    for planned in plan.tensors:
        if planned.role != Role.NEXTN or not planned.quantizable:
            continue
        if not (planned.requires_imatrix or planned.final_type in ABORT_WITHOUT_IMATRIX_DATA):
            continue
        entry = info.entries.get(planned.name) if info is not None else None
        if entry is None or not entry.has_data:
            lacking.append(planned.name)
    return lacking


def fit_problems(info: ImatrixInfo, model_info: ModelInfo) -> list[str]:
    """Every entry whose name or shape does not fit the model (empty list: it fits).

    `*_exps` entries must hold one row of ne0 values per expert. Other 3-D tensors (MLA's
    attn_k_b/attn_v_b) are written collapsed when every head saw the same tokens: one row of
    ne0 x ne2 values, which is also what llama-quantize checks (size == ne0 * ne2).
    """
    by_name = {t.name: t for t in model_info.tensors}
    problems = []
    for name, e in info.entries.items():
        t = by_name.get(name)
        if t is None:
            problems.append(f"{name}: not a tensor of this model")
            continue
        want_ne0, want_mat = t.shape[0], math.prod(t.shape[2:])
        if e.ne0 == want_ne0 and e.n_mat == want_mat:
            continue
        if "_exps" not in name and e.n_mat == 1 and e.ne0 == want_ne0 * want_mat:
            continue  # collapsed 3-D entry
        if "_exps" in name and e.ne0 == want_ne0:
            problems.append(f"{name}: {e.n_mat} experts in the imatrix, {want_mat} in the model")
        else:
            problems.append(f"{name}: {e.n_mat} x {e.ne0} values in the imatrix, the model's tensor "
                            f"needs {want_mat} x {want_ne0}")
    return problems


def check_imatrix_fits(info: ImatrixInfo, model_info: ModelInfo) -> None:
    """Raise ImatrixError naming the first mismatches when the imatrix is from another model."""
    if not info.entries:
        raise ImatrixError("the imatrix holds no entries", where=str(info.path),
                           hint="recompute it: `apex-orch imatrix MODEL --corpus NAME`")
    problems = fit_problems(info, model_info)
    if not problems:
        if info.entries and not (set(info.entries) & {t.name for t in expected_tensors(model_info)}):
            raise ImatrixError("the imatrix covers none of the model's quantizable tensors", where=str(info.path))
        return
    shown = problems[:MAX_LISTED]
    more = f" (and {len(problems) - len(shown)} more)" if len(problems) > len(shown) else ""
    raise ImatrixError(
        f"the imatrix does not fit {model_info.name or model_info.path}: {len(problems)} of "
        f"{len(info.entries)} entries mismatch{more}:\n  " + "\n  ".join(shown),
        where=str(info.path),
        hint="compute an imatrix for this model: `apex-orch imatrix MODEL --corpus NAME`")


def check_plan_coverage(info: ImatrixInfo, plan: Plan) -> list[str]:
    """Names of planned tensors that need imatrix data (IQ1/IQ2/IQ3_XXS; and token_embd/output at
    IQ2_XXS/IQ2_XS/IQ1_S, where ggml asserts) but have none.

    `quantize` calls this first: llama-quantize would otherwise abort halfway through.
    A tensor whose entry exists but saw no token at all counts as having none.
    """
    lacking = []
    for planned in plan.tensors:
        if not (planned.requires_imatrix or (planned.quantizable and planned.final_type in ABORT_WITHOUT_IMATRIX_DATA)):
            continue
        entry = info.entries.get(planned.name)
        if entry is None or not entry.has_data:
            lacking.append(planned.name)
    return lacking
