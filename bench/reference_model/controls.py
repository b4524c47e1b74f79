"""Controls for the export check's tolerances: what F16 arithmetic alone does to the torch vs
llama.cpp comparison, and what plausible export bugs do.

    .venv/bin/python -m bench.reference_model.controls            # the cached full model
    .venv/bin/python -m bench.reference_model.controls --model X.gguf --chunks 8 --no-results

Every comparison uses validate.compare's statistics on the model's held-out chunks (both domains):
  - `llama.cpp`: the export check itself (torch F32 vs llama.cpp on the GGUF);
  - `F16 rounding only`: torch F32 vs the same torch model with every matmul input rounded to
    F16 (what llama.cpp does to activations): the noise floor, must PASS the tolerances;
  - export bugs, each applied to the torch side and compared with llama.cpp: two routed experts
    swapped in one block, two attn_k_b heads swapped, one ffn_norm off by 1%, the shared
    expert's gate rows reversed. Each must FAIL the tolerances.
Writes bench/results/reference-model-controls.{json,md}.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

if __package__ in (None, ""):
    sys.path[0] = str(Path(__file__).resolve().parents[2])
    __package__ = "bench.reference_model"  # noqa: A001

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from . import validate  # noqa: E402
from .vocab import Vocab  # noqa: E402
from .config import FULL, RefConfig  # noqa: E402
from .model import RefMoE, load_gguf  # noqa: E402


def _swap_experts(m: RefMoE, block: int) -> None:
    moe = m.blocks[block].moe
    for p in (moe.ffn_gate_exps, moe.ffn_up_exps, moe.ffn_down_exps):
        p[[0, 1]] = p[[1, 0]]


def _swap_k_b_heads(m: RefMoE, block: int) -> None:
    p = m.blocks[block].attn.attn_k_b
    p[[0, 1]] = p[[1, 0]]


def _scale_ffn_norm(m: RefMoE, block: int) -> None:
    m.blocks[block].ffn_norm.weight.mul_(1.01)


def _reverse_shexp_gate(m: RefMoE, block: int) -> None:
    w = m.blocks[block].moe.ffn_gate_shexp.weight
    w.copy_(w.flip(0))


# (name, corruption of the torch model; block = the middle block)
EXPORT_BUGS: list[tuple[str, Callable[[RefMoE, int], None]]] = [
    ("routed experts 0 and 1 swapped", _swap_experts),
    ("attn_k_b heads 0 and 1 swapped", _swap_k_b_heads),
    ("ffn_norm scaled by 1.01", _scale_ffn_norm),
    ("ffn_gate_shexp rows reversed", _reverse_shexp_gate),
]


@contextlib.contextmanager
def f16_matmul_inputs() -> Iterator[None]:
    """Round every F32 matmul input to F16 (F.linear, which nn.Linear and the experts use)."""
    orig = F.linear
    F.linear = lambda x, w, b=None: orig(x.half().float() if x.dtype == torch.float32 else x, w, b)
    try:
        yield
    finally:
        F.linear = orig


class _FixedLogits:
    """A runner that returns precomputed logits (the reference side of a torch-vs-torch control)."""

    def __init__(self, logits: list[np.ndarray]):
        self._it = iter(logits)

    def logits(self, chunk: np.ndarray) -> np.ndarray:
        return next(self._it)


def load_model(cfg: RefConfig, gguf: Path) -> RefMoE:
    m = RefMoE(cfg, Vocab(gguf).n_vocab())
    load_gguf(m, gguf)
    return m.eval()


def run(cfg: RefConfig, gguf: Path, heldout: dict[str, Path], chunks: int, threads: int) -> list[dict]:
    torch.set_num_threads(threads)
    voc = Vocab(gguf)
    bos = voc.bos_id()
    block = cfg.n_layer // 2
    rows = []
    runner = validate.LlamaRunner(gguf, cfg.seq_len, threads)
    try:
        for domain, path in heldout.items():
            text = path.read_text(encoding="utf-8")
            toks = np.concatenate(([bos], voc.tokenize(text[:-1] if text.endswith("\n") else text)))
            parts = validate.chunks(toks, cfg.seq_len, chunks, bos)

            def add(name: str, expect_pass: bool, rep: validate.DomainReport) -> None:
                failures = rep.failures()
                rows.append({"domain": domain, "control": name, "expected": "pass" if expect_pass else "fail",
                             "passed": not failures, "as_expected": (not failures) == expect_pass,
                             "failures": failures, "mean_kld": rep.mean_kld, "max_kld": rep.max_kld,
                             "top1_agreement": rep.top1_agreement, "p999_abs_target_logp": rep.p999_abs_target_logp,
                             "max_abs_target_logp": rep.max_abs_target_logp,
                             "ppl_rel": rep.ppl_llama / rep.ppl_torch - 1})
                print(f"[{time.strftime('%H:%M:%S')}] {domain}: {name}: mean KLD {rep.mean_kld:.2e} "
                      f"p99.9 {rep.p999_abs_target_logp:.4f} max {rep.max_abs_target_logp:.4f} -> "
                      f"{'pass' if not failures else 'FAIL'}", flush=True)

            model = load_model(cfg, gguf)
            add("export check: torch F32 vs llama.cpp", True,
                validate.compare(model, runner, domain, toks, cfg.seq_len, chunks, bos))
            # torch against itself with F16-rounded activations: the "llama.cpp" side is torch F32.
            f32 = [validate.torch_logits(model, c)[0] for c in parts]
            with f16_matmul_inputs():
                add("F16 rounding only: torch F32 vs torch with F16 matmul inputs", True,
                    validate.compare(model, _FixedLogits(f32), domain, toks, cfg.seq_len, chunks, bos))
            for name, bug in EXPORT_BUGS:
                bad = load_model(cfg, gguf)
                with torch.no_grad():
                    bug(bad, block)
                add(f"export bug, block {block}: {name}", False,
                    validate.compare(bad, runner, domain, toks, cfg.seq_len, chunks, bos))
    finally:
        runner.close()
    return rows


def markdown(rec: dict) -> str:
    tol = rec["tolerances"]
    lines = [
        "# Export-check controls (reference model)",
        "",
        f"Model `{rec['model']}`, {rec['chunks']} held-out chunks x {rec['n_ctx']} tokens per domain, every position "
        f"compared; {rec['date_utc']}, commit `{(rec['git_commit'] or 'unknown')[:12]}`. "
        "Rerun: `.venv/bin/python -m bench.reference_model.controls`.",
        "",
        f"Tolerances: mean KLD <= {tol['mean_kld']}, top-1 >= {tol['top1']}, p99.9 |dlog p(next)| <= {tol['p999']}, "
        f"max |dlog p(next)| <= {tol['max']}, PPL within {tol['ppl_rel']:.1%}.",
        "In the *F16 rounding only* row the two sides are torch F32 and torch with every matmul input rounded "
        "to F16 (the noise llama.cpp's F16 matmuls add); export bugs are applied to the torch side and compared "
        "with llama.cpp on the correct file.",
        "",
        "| domain | control | expected | result | mean KLD | max KLD | top-1 | p99.9 abs dlog p | max abs dlog p |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rec["rows"]:
        res = ("pass" if r["passed"] else "fail") + ("" if r["as_expected"] else " **(unexpected)**")
        lines.append(f"| {r['domain']} | {r['control']} | {r['expected']} | {res} | {r['mean_kld']:.2e} | "
                     f"{r['max_kld']:.2e} | {r['top1_agreement']:.5f} | {r['p999_abs_target_logp']:.4f} | "
                     f"{r['max_abs_target_logp']:.4f} |")
    lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from . import train

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, help="reference-moe-*.gguf (default: the cached full model)")
    ap.add_argument("--chunks", type=int, default=FULL.eval_chunks)
    ap.add_argument("--no-results", action="store_true")
    args = ap.parse_args(argv)
    if args.model:
        gguf = args.model
    else:
        sys.path.insert(0, str(train.REPO / "bench"))
        from bench_quality import NoReferenceModel, find_reference_model
        try:
            gguf, _ = find_reference_model()
        except NoReferenceModel as exc:
            print(f"controls: {exc}", file=sys.stderr)
            return 2
    stem = gguf.name[:-len(".gguf")]
    heldout = {d: gguf.with_name(f"{stem}.heldout-{d}.txt") for d in ("code", "prose")}
    rows = run(FULL, gguf, heldout, args.chunks, FULL.threads)
    env = train.environment()
    rec = {"model": gguf.name, "chunks": args.chunks, "n_ctx": FULL.seq_len, "date_utc": env["date_utc"],
           "git_commit": env["git_commit"], "environment": env,
           "tolerances": {"mean_kld": validate.TOL_MEAN_KLD, "top1": validate.TOL_TOP1,
                          "p999": validate.TOL_P999_TARGET_LOGP, "max": validate.TOL_MAX_TARGET_LOGP,
                          "ppl_rel": validate.TOL_PPL_REL},
           "rows": rows, "all_as_expected": all(r["as_expected"] for r in rows)}
    if not args.no_results:
        out = train.RESULTS_DIR
        train._atomic_write(out / "reference-model-controls.json", json.dumps(rec, indent=2) + "\n")
        train._atomic_write(out / "reference-model-controls.md", markdown(rec))
        print(f"wrote {out / 'reference-model-controls.md'}")
    return 0 if rec["all_as_expected"] else 1


if __name__ == "__main__":
    sys.exit(main())
