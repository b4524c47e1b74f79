"""Do the routed experts carry real weight? The share of a low-bit quantization's damage that the
routed experts alone cause.

    share = mean KLD(source + routed experts at TYPE) / mean KLD(every typed tensor at TYPE)

both against the F16 source on held-out text. The uniform file is made by the ordinary quantize
pipeline (apex_orch.fit.groups.uniform_profile: every tensor a profile can type at TYPE, with the
imatrix); the experts-only file is the source with the routed-expert tensors spliced byte for byte
from it (apex_orch.fit.splice, the sensitivity method's own tool), so both files hold exactly
the same expert bytes. On a model whose experts barely matter (the first reference model: 0.001
mean KLD for any expert group alone at IQ1_M, 0.087 for the output head alone) the share is near
zero; in a real MoE, with ~97% of the weights in routed experts, it is most of the damage.

    python -m bench.reference_model.expert_share MODEL.gguf --text code=HELD-OUT.txt [--imatrix F]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path[0] = str(Path(__file__).resolve().parents[2])
    __package__ = "bench.reference_model"  # noqa: A001

from gguf.constants import GGMLQuantizationType as T  # noqa: E402

DEFAULT_TYPE = "IQ2_S"
TARGET_SHARE = 0.30
ROUTED_SUFFIXES = ("_exps.weight",)


def routed_expert_tensors(model_path: Path) -> list[str]:
    from apex_orch.model.info import read_model
    from apex_orch.model.roles import classify

    info = read_model(model_path)
    roles = classify(info)
    return [t.name for t in info.tensors if str(roles[t.name].role) == "routed_expert"]


def measure(model_path: Path, texts: dict[str, Path], *, imatrix: Path | None, type_name: str = DEFAULT_TYPE,
            chunks: int = 16, ctx: int = 512, threads: int | None = None, work_dir: Path | None = None,
            log=print) -> dict:
    """{type, imatrix, domains: {name: {all, all_err, routed_only, routed_only_err, share}}, seconds}."""
    from apex_orch.evaluation.evaluate import evaluate
    from apex_orch.evaluation.inputs import EvalSettings
    from apex_orch.fit.splice import write_spliced
    from apex_orch.fit.sensitivity import uniform_profile_for
    from apex_orch.plan.profiles import load_profile
    from apex_orch.quantize.job import plan_quantize, resolve_imatrix
    from apex_orch.model.info import read_model
    from apex_orch.quantize.run import run_quantize

    t_start = time.monotonic()
    t = T[type_name]
    info = read_model(model_path)
    im = resolve_imatrix(info, imatrix) if imatrix else None
    work = Path(tempfile.mkdtemp(prefix="expert-share-", dir=work_dir))
    try:
        job = plan_quantize(model_path, uniform_profile_for(t, load_profile("compact"), im is not None),
                            out_dir=work, name="uniform", imatrix=im, threads=threads, model=info)
        uniform = run_quantize(job, force=True).files[0]
        routed = routed_expert_tensors(model_path)
        spliced = write_spliced(model_path, {n: uniform for n in routed}, work / "routed-only.gguf")
        settings = EvalSettings(n_ctx=ctx, chunks=chunks, **({"n_threads": threads} if threads else {}))
        domains = {}
        for name, text in texts.items():
            a = evaluate(uniform, base=model_path, text=text, settings=settings).kld
            r = evaluate(spliced, base=model_path, text=text, settings=settings).kld
            domains[name] = {"all": a.kld_mean, "all_err": a.kld_mean_err, "all_p999": a.kld_p999,
                             "routed_only": r.kld_mean, "routed_only_err": r.kld_mean_err,
                             "routed_only_p999": r.kld_p999,
                             "share": r.kld_mean / a.kld_mean if a.kld_mean > 0 else None}
            log(f"expert share at {type_name} ({name}): routed experts only {r.kld_mean:.5f} / all tensors "
                f"{a.kld_mean:.5f} = {domains[name]['share']:.3f}")
        return {"type": type_name, "imatrix": imatrix.name if imatrix else None, "routed_tensors": len(routed),
                "chunks": chunks, "ctx": ctx, "domains": domains, "target": TARGET_SHARE,
                "seconds": round(time.monotonic() - t_start, 1)}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", type=Path)
    ap.add_argument("--text", action="append", required=True, metavar="NAME=PATH")
    ap.add_argument("--imatrix", type=Path)
    ap.add_argument("--type", default=DEFAULT_TYPE)
    ap.add_argument("--chunks", type=int, default=16)
    args = ap.parse_args(argv)
    texts = {k: Path(v) for k, _, v in (t.partition("=") for t in args.text)}
    print(json.dumps(measure(args.model, texts, imatrix=args.imatrix, type_name=args.type, chunks=args.chunks),
                     indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
