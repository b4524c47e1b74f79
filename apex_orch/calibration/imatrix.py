"""Importance matrices: compute them with llama-imatrix (cached), read them, check they fit.

Stages (see DESIGN.md):
- `plan_imatrix(...)` -> ImatrixPlan: pure (reads the model header, builds the corpus in
  memory, counts its tokens with the model's tokenizer; writes nothing). Holds the exact
  llama-imatrix argument list, the cache key and the output path.
- `run_imatrix(plan)` -> Path: writes the corpus text, optionally makes a Q8_0 copy of the
  model, runs llama-imatrix into a temporary name and renames it into the cache; a rerun
  with the same inputs is a cache hit and runs nothing.

Cache: `<cache_root>/imatrix/<key>.gguf` (+ `<key>.json` saying what it was computed from),
key = sha256 of {the model's full sha256 (every shard; memoised by stat under <cache>/hashes, so
an unchanged 240 GB model is hashed once, ~3 min), corpus sha256, ctx, effective chunk count,
from_q8, parse_special, llama.cpp build}: a model whose bytes changed is a new key, and so is its
--from-q8 Q8_0 copy (named from the same hash). Threads and -ngl do not change the key: every I-tier of a
release shares one imatrix.

File format (GGUF, what the pinned llama-imatrix writes): per tensor `<name>.in_sum2`
[ne0, n_mat] (ggml order) and `<name>.counts` [1, n_mat]; n_mat is the expert count for
`*_exps` tensors, so counts are tokens routed to each expert. Metadata: imatrix.datasets,
imatrix.chunk_count, imatrix.chunk_size.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import statistics
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from gguf.constants import GGMLQuantizationType as T

from apex_orch.core.errors import (ImatrixError, LockedError, ModelError, OutputExistsError,
                              ToolFailedError)

# The types llama-quantize refuses to write without imatrix data (tensor_requires_imatrix).
LOW_BIT_TYPES = frozenset({T.IQ1_S, T.IQ1_M, T.IQ2_XXS, T.IQ2_XS, T.IQ2_S, T.IQ3_XXS})
NOT_COLLECTED = ("token_embd.weight", "output.weight")   # never / only with --process-output
KEY_SCHEME = "imatrix-v2"      # v2: the model is keyed by its full sha256 (issue 15)
MAX_LISTED = 8

ProgressCallback = Callable[[str], None]


# =========================================================================== reading

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
    import numpy as np
    from gguf import GGUFReader

    p = Path(path)
    if not p.is_file():
        raise ImatrixError(f"imatrix file not found: {p}",
                           hint="compute one with `apex-orch imatrix MODEL --corpus NAME`")
    try:
        with open(p, "rb") as fh:
            magic = fh.read(4)
    except OSError as exc:
        raise ImatrixError(f"cannot read imatrix file: {exc.strerror}", where=str(p)) from None
    if magic != b"GGUF":
        raise ImatrixError("not a GGUF imatrix (legacy .dat or another file type)", where=str(p),
                           hint="recompute it with apex-orch (GGUF output), or convert it with "
                                "`llama-imatrix --in-file OLD.dat -o NEW.gguf`")
    try:
        reader = GGUFReader(p, "r")
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

def _n_mat(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape[2:]:
        n *= d
    return n


def expected_tensors(model_info) -> list:
    """Tensors an imatrix should hold: quantizable 2-D/3-D weights except token_embd/output."""
    from apex_orch.plan.llama_rules import allows_quantization

    return [t for t in model_info.tensors
            if allows_quantization(t.name, t.shape, model_info.arch) and t.name not in NOT_COLLECTED]


def fit_problems(info: ImatrixInfo, model_info) -> list[str]:
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
        shape = tuple(int(x) for x in t.shape)
        want_ne0, want_mat = shape[0], _n_mat(shape)
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


def check_imatrix_fits(info: ImatrixInfo, model_info) -> None:
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
    model_name = getattr(model_info, "name", "") or getattr(model_info, "path", "the model")
    raise ImatrixError(
        f"the imatrix does not fit {model_name}: {len(problems)} of {len(info.entries)} entries "
        f"mismatch{more}:\n  " + "\n  ".join(shown),
        where=str(info.path),
        hint="compute an imatrix for this model: `apex-orch imatrix MODEL --corpus NAME`")


def _final_type(planned) -> T | None:
    value = getattr(planned, "final_type", None)
    if value is None or isinstance(value, T):
        return value
    return T.__members__.get(str(value).upper())


def _requires_imatrix(planned) -> bool:
    explicit = getattr(planned, "requires_imatrix", None)
    if explicit is not None:
        return bool(explicit)
    return _final_type(planned) in LOW_BIT_TYPES and planned.name not in NOT_COLLECTED


def check_plan_coverage(info: ImatrixInfo, plan) -> list[str]:
    """Names of planned tensors that need imatrix data (IQ1/IQ2/IQ3_XXS) but have none.

    `quantize` calls this first: llama-quantize would otherwise abort halfway through.
    A tensor whose entry exists but saw no token at all counts as having none.
    """
    lacking = []
    for planned in plan.tensors:
        if not _requires_imatrix(planned):
            continue
        entry = info.entries.get(planned.name)
        if entry is None or not entry.has_data:
            lacking.append(planned.name)
    return lacking


# =========================================================================== report

def _layer(name: str) -> int | None:
    m = re.match(r"^blk\.(\d+)(?:\.|$)", name)
    return int(m.group(1)) if m else None


def _natural(name: str) -> tuple:
    layer = _layer(name)
    return (layer is None, layer or 0, name)


def build_report(info: ImatrixInfo, model_info=None, plan=None, profile_name: str | None = None) -> dict:
    """Everything `imatrix-report` shows, as plain data (also the --json output)."""
    report: dict[str, Any] = {
        "file": str(info.path),
        "chunks": info.chunk_count,
        "chunk_size": info.chunk_size,
        "datasets": list(info.datasets),
        "entries": len(info.entries),
        "tensors": {name: {"ne0": e.ne0, "n_mat": e.n_mat, "counts": list(e.counts)}
                    for name, e in info.entries.items()},
    }
    experts: dict[str, dict] = {}
    for name, e in sorted(info.entries.items(), key=lambda kv: _natural(kv[0])):
        if "_exps" not in name:
            continue
        layer = _layer(name)
        key = f"blk.{layer}" if layer is not None else name
        if key in experts and experts[key]["counts"] == list(e.counts):
            experts[key]["tensors"].append(name)
            continue
        if key in experts:  # tensors of one layer disagree: keep them apart
            key = name
        experts[key] = {"tensors": [name], "counts": list(e.counts), "never_routed": e.zero}
    experts = dict(sorted(experts.items(), key=lambda kv: _natural(kv[0])))
    report["experts"] = experts
    report["experts_never_routed"] = {k: v["never_routed"] for k, v in experts.items() if v["never_routed"]}
    report["entries_without_data"] = sorted((n for n, e in info.entries.items() if not e.has_data), key=_natural)

    if model_info is not None:
        expected = [t.name for t in expected_tensors(model_info)]
        covered = [n for n in expected if n in info.entries and info.entries[n].has_data]
        report["model"] = {
            "name": getattr(model_info, "name", None),
            "arch": getattr(model_info, "arch", None),
            "expert_count": getattr(model_info, "expert_count", None),
            "expected": len(expected),
            "covered": len(covered),
            "missing": [n for n in expected if n not in info.entries or not info.entries[n].has_data],
            "not_expected": sorted((n for n in info.entries if n not in set(expected)), key=_natural),
            "mismatches": fit_problems(info, model_info),
        }
    if plan is not None:
        needing = [p.name for p in plan.tensors if _requires_imatrix(p)]
        report["profile"] = {
            "name": profile_name,
            "low_bit_tensors": len(needing),
            "lacking_data": check_plan_coverage(info, plan),
        }
    return report


def report_problems(report: dict) -> list[str]:
    """What makes `imatrix-report` exit non-zero: a misfit, or planned low-bit tensors without data."""
    out = []
    model = report.get("model")
    if model and model["mismatches"]:
        out.append(f"{len(model['mismatches'])} imatrix entries do not fit the model "
                   f"(first: {model['mismatches'][0]})")
    prof = report.get("profile")
    if prof and prof["lacking_data"]:
        out.append(f"{len(prof['lacking_data'])} planned low-bit tensors lack imatrix data "
                   f"(first: {prof['lacking_data'][0]})")
    return out


def _names(names: list[str], limit: int = MAX_LISTED) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def format_report(report: dict) -> str:
    lines = [f"imatrix: {report['file']}",
             f"  chunks: {report['chunks']} x {report['chunk_size']} tokens",
             f"  datasets: {', '.join(report['datasets']) or '(none recorded)'}",
             f"  entries: {report['entries']} tensors"]
    if report["entries_without_data"]:
        lines.append(f"  entries with no data at all ({len(report['entries_without_data'])}): "
                     f"{_names(report['entries_without_data'])}")
    experts = report["experts"]
    if experts:
        lines.append("  tokens per routed expert:")
        for key, v in experts.items():
            counts = v["counts"]
            never = v["never_routed"]
            lines.append(f"    {key:<10} min {min(counts)}  median {statistics.median(counts):g}  "
                         f"max {max(counts)}  never routed: {never if never else 'none'}")
        never_total = sum(len(v) for v in report["experts_never_routed"].values())
        lines.append(f"  experts never routed to: {never_total}"
                     + (" (their rows are quantized without importance data)" if never_total else ""))
    model = report.get("model")
    if model:
        lines.append(f"  model: {model['name']} ({model['arch']}): {model['covered']} of "
                     f"{model['expected']} expected tensors have data")
        if model["missing"]:
            lines.append(f"  missing data ({len(model['missing'])}): {_names(model['missing'])}")
        if model["not_expected"]:
            lines.append(f"  entries beyond the expected set ({len(model['not_expected'])}): "
                         f"{_names(model['not_expected'])}")
        if model["mismatches"]:
            lines.append(f"  DOES NOT FIT the model ({len(model['mismatches'])} entries):")
            lines.extend(f"    {m}" for m in model["mismatches"][:MAX_LISTED])
    prof = report.get("profile")
    if prof:
        label = prof["name"] or "profile"
        if prof["lacking_data"]:
            lines.append(f"  {label}: {len(prof['lacking_data'])} of {prof['low_bit_tensors']} planned "
                         f"IQ1/IQ2/IQ3_XXS tensors lack data: {_names(prof['lacking_data'])}")
        else:
            lines.append(f"  {label}: all {prof['low_bit_tensors']} planned IQ1/IQ2/IQ3_XXS tensors have data")
    return "\n".join(lines)


# =========================================================================== planning

def _cache_dir() -> Path:
    from apex_orch.llama.pin import cache_root
    return cache_root() / "imatrix"


def _model_fingerprint(model_path: Path) -> str:
    from apex_orch.core.fingerprint import source_sha256
    from apex_orch.model.info import shard_paths

    return "+".join(source_sha256(p) for p in shard_paths(model_path))


def _uses_mla(model_path: Path) -> bool:
    from apex_orch.model.info import read_model

    return any(t.name.endswith("attn_k_b.weight") for t in read_model(model_path).tensors)


@dataclass
class ImatrixPlan:
    model_path: Path
    corpus_name: str
    corpus_sha256: str
    corpus_file: Path             # where the corpus text is written for llama-imatrix
    ctx: int
    chunks: int                   # effective chunk count (what llama-imatrix will process)
    requested_chunks: int | None
    available_chunks: int
    tokens: int                   # corpus tokens with the model's tokenizer
    ngl: int
    threads: int
    from_q8: bool
    parse_special: bool
    key: str
    key_material: dict
    cache_path: Path
    tmp_path: Path
    log_path: Path
    out: Path | None
    force: bool
    argv: list[str]
    q8_path: Path | None = None
    q8_argv: list[str] | None = None
    corpus: Any = field(default=None, repr=False)    # the BuiltCorpus (text in memory)

    @property
    def output(self) -> Path:
        return self.out or self.cache_path

    @property
    def cached(self) -> bool:
        return self.cache_path.is_file()

    def describe(self) -> str:
        lines = [f"model:    {self.model_path}",
                 f"corpus:   {self.corpus_name} (sha256 {self.corpus_sha256[:16]}..., {self.tokens} tokens, "
                 f"{self.available_chunks} chunks of {self.ctx} available)",
                 f"chunks:   {self.chunks} x {self.ctx} tokens",
                 f"cache:    {self.cache_path} ({'present: cache hit' if self.cached else 'not computed yet'})"]
        if self.out:
            lines.append(f"output:   {self.out}")
        if self.q8_argv:
            lines.append("q8 copy:  " + " ".join(self.q8_argv))
        lines.append("command:  " + " ".join(self.argv))
        return "\n".join(lines)


def plan_imatrix(model_path: str | os.PathLike, corpus_name: str, ctx: int = 512, chunks: int | None = None,
                 ngl: int = 0, threads: int | None = None, out: str | os.PathLike | None = None, *,
                 from_q8: bool = False, force: bool = False, bin_dir: str | os.PathLike | None = None,
                 tokens: int | None = None) -> ImatrixPlan:
    """Decide everything about an imatrix run without writing anything.

    `tokens` may be given by a caller that already counted the corpus with this model's
    tokenizer; otherwise the tokenizer is loaded (vocab only) through the bindings.
    """
    from apex_orch.calibration import corpus as corpus_mod
    from apex_orch.llama.tools import build_label, find_tool
    from apex_orch.llama.pin import cache_root

    model = Path(model_path)
    if not model.is_file() and not model.exists():
        raise ModelError(f"model not found: {model}")
    from apex_orch.model.info import read_model
    read_model(model)   # the header checked against itself (a FIFO, a folder refused) before anything runs
    if ctx < 8:
        raise ImatrixError(f"context {ctx} is too small", hint="use -c 512 (the usual) or at least 64")
    if chunks is not None and chunks < 1:
        raise ImatrixError(f"--chunks must be at least 1, got {chunks}")
    if ngl < 0:
        raise ImatrixError(f"--ngl must be 0 or more, got {ngl}")
    threads = threads or os.cpu_count() or 1
    if out is not None:   # inputs are never outputs (issue 15): refused before anything runs
        from apex_orch.model.info import shard_paths
        from apex_orch.core.safefiles import check_not_inputs
        check_not_inputs([Path(out)], shard_paths(model), flag="-o")

    built = corpus_mod.build_corpus(corpus_name, model=model)
    if tokens is None:
        tok = corpus_mod.ModelTokenizer(model)
        try:
            tokens = tok.count(built.text, special=built.parse_special)
        finally:
            tok.close()
    need = 2 * ctx
    if tokens < need:
        raise ImatrixError(
            f"corpus {built.name!r} has {tokens} tokens with this model's tokenizer; llama-imatrix "
            f"needs at least {need} (2 x context {ctx})",
            hint="add text to the corpus (a local or hf source), raise its budget_tokens, or lower -c")
    available = tokens // ctx
    effective = min(chunks, available) if chunks else available

    material = {
        "scheme": KEY_SCHEME,
        "model": _model_fingerprint(model),
        "corpus_sha256": built.sha256,
        "ctx": ctx,
        "chunks": effective,
        "from_q8": from_q8,
        "parse_special": built.parse_special,
        "llama_cpp": build_label(),
    }
    key = hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:32]
    cache_dir = _cache_dir()
    cache_path = cache_dir / f"{key}.gguf"
    # Per-process name (a killed run's orphan can never share it); .gguf suffix: llama-imatrix
    # warns otherwise. Stale partials of this key are removed under the lock before running.
    tmp_path = cache_dir / f".{key}.partial-{os.getpid()}.gguf"
    corpus_file = cache_root() / "corpora" / f"{built.name}-{built.sha256[:12]}.txt"

    run_model = model
    q8_path = q8_argv = None
    if from_q8:
        fp = hashlib.sha256(material["model"].encode()).hexdigest()[:24]
        q8_path = cache_root() / "q8" / f"{model.stem}.{fp}.Q8_0.gguf"
        q8_argv = [str(find_tool("llama-quantize", bin_dir).path), str(model),
                   str(q8_path.with_name(f".{q8_path.name}.partial-{os.getpid()}")), "Q8_0", str(threads)]
        run_model = q8_path

    argv = [str(find_tool("llama-imatrix", bin_dir).path), "-m", str(run_model), "-f", str(corpus_file),
            "-o", str(tmp_path), "-c", str(ctx)]
    if chunks is not None:
        argv += ["--chunks", str(effective)]
    argv += ["-ngl", str(ngl), "-t", str(threads)]
    if built.parse_special:
        argv.append("--parse-special")
    if _uses_mla(model):
        # On CPUs with AMX, repacked attn_k_b cannot take MLA's permuted q_nope and llama.cpp
        # aborts (GGML_ASSERT(*cur_backend_id != -1)); repacking only speeds up, never changes data.
        argv.append("--no-repack")

    return ImatrixPlan(
        model_path=model, corpus_name=built.name, corpus_sha256=built.sha256, corpus_file=corpus_file,
        ctx=ctx, chunks=effective, requested_chunks=chunks, available_chunks=available, tokens=tokens,
        ngl=ngl, threads=threads, from_q8=from_q8, parse_special=built.parse_special, key=key,
        key_material=material, cache_path=cache_path, tmp_path=tmp_path,
        log_path=cache_dir / f"{key}.log", out=Path(out) if out else None, force=force, argv=argv,
        q8_path=q8_path, q8_argv=q8_argv, corpus=built)


# =========================================================================== running

class _Lock:
    """One run per cache key: an flock (the kernel drops it when the holder dies, even on
    kill -9), with the holder's pid written in for the error message."""

    def __init__(self, path: Path):
        self.path = path
        self._fh = None

    def __enter__(self):
        import fcntl
        from apex_orch.core.safefiles import open_nofollow
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fh = open_nofollow(self.path, "lock")   # a planted link is refused, never truncated through
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "?"
            fh.close()
            raise LockedError(f"another apex-orch run (pid {holder}) is computing this imatrix",
                              where=str(self.path), hint="wait for it; a rerun then is a cache hit") from None
        fh.seek(0)
        fh.truncate()
        fh.write(str(os.getpid()))
        fh.flush()
        self._fh = fh
        return self

    def __exit__(self, *exc):
        import fcntl
        if self._fh is not None:
            self.path.unlink(missing_ok=True)
            fcntl.flock(self._fh.fileno(), fcntl.LOCK_UN)
            self._fh.close()
            self._fh = None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class ImatrixProgress:
    """Turns llama-imatrix's log into a few progress lines.

    The tool prints `computing over N chunks`, `X seconds per pass - ETA Y minutes`, then
    `[i]ppl,` marks with no newline, so the per-chunk marks arrive together at the end.
    """

    COMPUTING = re.compile(r"computing over (\d+) chunks, n_ctx=(\d+)")
    PASS = re.compile(r"([\d.]+) seconds per pass - ETA (.*)$")
    MARK = re.compile(r"\[(\d+)\]([\d.]+|nan|inf)")
    FINAL = re.compile(r"Final estimate: PPL = ([\d.]+)")

    def __init__(self, emit: ProgressCallback | None):
        self.emit = emit or (lambda _line: None)
        self.total: int | None = None
        self.done = 0
        self.ppl: float | None = None
        self.tail: list[str] = []

    def __call__(self, line: str) -> None:
        if m := self.COMPUTING.search(line):
            self.total = int(m.group(1))
            self.emit(f"imatrix: computing over {self.total} chunks of {m.group(2)} tokens")
        elif m := self.PASS.search(line):
            self.emit(f"imatrix: {float(m.group(1)):.2f} s per pass, ETA {m.group(2).strip()}")
        if marks := self.MARK.findall(line):
            self.done = max(self.done, max(int(i) for i, _ in marks))
            try:
                self.ppl = float(marks[-1][1])
            except ValueError:
                pass
            total = self.total or self.done
            self.emit(f"imatrix: chunk {self.done}/{total}" + (f", PPL {self.ppl:.2f}" if self.ppl else ""))
        if m := self.FINAL.search(line):
            self.ppl = float(m.group(1))


def _sha256(path: Path) -> str:
    from apex_orch.core.fingerprint import sha256_file
    return sha256_file(path)


def _atomic_copy(src: Path, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".partial", dir=dest.parent)
    os.close(fd)
    try:
        shutil.copyfile(src, tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _publish(plan: ImatrixPlan, emit: ProgressCallback) -> Path:
    """Copy the cached imatrix to -o (atomic; refuses to overwrite a different file without force)."""
    if plan.out is None:
        return plan.cache_path
    out = plan.out
    if out.exists():
        if out.is_file() and _sha256(out) == _sha256(plan.cache_path):
            emit(f"imatrix: {out} is already this imatrix")
            return out
        if not plan.force:
            raise OutputExistsError(f"{out} exists and holds a different imatrix",
                                    hint="pass --force to replace it, or choose another -o")
    _atomic_copy(plan.cache_path, out)
    return out


def _ensure_q8(plan: ImatrixPlan, emit: ProgressCallback, timeout: float | None) -> None:
    from apex_orch.llama.tools import run_tool

    assert plan.q8_path is not None and plan.q8_argv is not None
    if plan.q8_path.is_file():
        emit(f"imatrix: using cached Q8_0 copy {plan.q8_path}")
        return
    import fcntl

    from apex_orch.core.safefiles import open_nofollow
    plan.q8_path.parent.mkdir(parents=True, exist_ok=True)
    # One Q8_0 copy per model, shared by runs on other corpora (other imatrix keys): each run writes
    # its own scratch name, and the copy is made under its own lock, which a second run waits for
    # (then finds the copy) instead of writing the same file at the same time.
    with open_nofollow(plan.q8_path.with_name(plan.q8_path.name + ".lock"), "lock") as lock:
        try:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            emit("imatrix: waiting for another run's Q8_0 copy of this model")
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        if plan.q8_path.is_file():
            emit(f"imatrix: using cached Q8_0 copy {plan.q8_path}")
            return
        partial = Path(plan.q8_argv[2])
        for stale in plan.q8_path.parent.glob(f".{plan.q8_path.name}.partial*"):
            if stale != partial:   # left by a killed run (we hold the lock: nobody else is writing)
                stale.unlink(missing_ok=True)
        emit(f"imatrix: making a Q8_0 copy of the model: {plan.q8_path}")
        try:
            from apex_orch.core.safefiles import clear_name
            clear_name(partial)   # a link planted at the scratch name is removed, never written through
            run_tool(plan.q8_argv, log_path=plan.q8_path.with_suffix(".log"), timeout=timeout,
                     what="llama-quantize (Q8_0 copy)")
            os.replace(partial, plan.q8_path)
        except BaseException:
            partial.unlink(missing_ok=True)
            raise


def _write_corpus_file(plan: ImatrixPlan) -> None:
    from apex_orch.calibration.corpus import atomic_write_bytes, make_manifest, manifest_path_for

    path = plan.corpus_file
    data = plan.corpus.data
    if not (path.is_file() and path.stat().st_size == len(data) and _sha256(path) == plan.corpus_sha256):
        atomic_write_bytes(path, data)
    manifest = make_manifest(plan.corpus, text_name=path.name, total_tokens=plan.tokens, model=plan.model_path)
    atomic_write_bytes(manifest_path_for(path), (json.dumps(manifest, indent=2) + "\n").encode())


def run_imatrix(plan: ImatrixPlan, *, on_progress: ProgressCallback | None = None,
                timeout: float | None = None) -> Path:
    """Execute a plan; return the imatrix path (-o if given, else the cache file)."""
    from apex_orch.llama.tools import run_tool

    emit = on_progress or (lambda _line: None)
    if plan.cached:
        read_imatrix(plan.cache_path)   # a damaged cache entry is an error, not a silent reuse
        emit(f"imatrix: cache hit: {plan.cache_path}")
        return _publish(plan, emit)

    plan.cache_path.parent.mkdir(parents=True, exist_ok=True)
    from apex_orch.core.safefiles import refuse_links
    refuse_links([plan.cache_path.with_suffix(".lock"), plan.log_path, plan.cache_path,
                  plan.cache_path.with_suffix(".json"), *([plan.out] if plan.out else []),
                  *([plan.q8_path, plan.q8_path.with_suffix(".log")] if plan.q8_path else [])])
    with _Lock(plan.cache_path.with_suffix(".lock")):
        if plan.cached:  # finished by another run while we waited for the lock
            emit(f"imatrix: cache hit: {plan.cache_path}")
            return _publish(plan, emit)
        for stale in plan.cache_path.parent.glob(f".{plan.key}.partial*"):
            if stale != plan.tmp_path:
                stale.unlink(missing_ok=True)
                emit(f"imatrix: removed a partial file left by an interrupted run: {stale.name}")
        _write_corpus_file(plan)
        if plan.from_q8:
            _ensure_q8(plan, emit, timeout)
        progress = ImatrixProgress(emit)
        emit(f"imatrix: running llama-imatrix on {plan.corpus_name} ({plan.chunks} chunks x {plan.ctx})")
        try:
            result = run_tool(plan.argv, log_path=plan.log_path, on_line=progress, timeout=timeout,
                              what="llama-imatrix")
            if not plan.tmp_path.is_file():
                raise ToolFailedError("llama-imatrix exited 0 but wrote no imatrix",
                                      log_path=plan.log_path, log_tail="\n".join(result.tail))
            info = read_imatrix(plan.tmp_path)
            os.replace(plan.tmp_path, plan.cache_path)
        except BaseException:
            plan.tmp_path.unlink(missing_ok=True)
            raise
        sidecar = {
            "kind": "apex-orch imatrix",
            "key": plan.key,
            "inputs": plan.key_material,
            "model_path": str(plan.model_path),
            "corpus": plan.corpus_name,
            "corpus_file": str(plan.corpus_file),
            "tokens": plan.tokens,
            "command": plan.argv,
            "q8_command": plan.q8_argv,
            "seconds": round(result.seconds, 3),
            "chunks": info.chunk_count,
            "entries": len(info.entries),
            "sha256": _sha256(plan.cache_path),
        }
        from apex_orch.calibration.corpus import atomic_write_bytes
        atomic_write_bytes(plan.cache_path.with_suffix(".json"), (json.dumps(sidecar, indent=2) + "\n").encode())
        ppl = f", PPL {progress.ppl:.2f}" if progress.ppl else ""
        emit(f"imatrix: done in {result.seconds:.1f} s: {info.chunk_count} chunks, "
             f"{len(info.entries)} tensors{ppl} -> {plan.cache_path}")
    return _publish(plan, emit)
