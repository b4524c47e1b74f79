"""The demo model (apex_orch/demo/trained.py): trained on first use by the numpy trainer, the same
bytes on every machine, and a real model whose quantizations order with their size.

The session builds it once into its own cache (about two minutes on 2 cores): that build is the
proof that a first use gives the committed bytes (apex_orch/demo/demo-model.json's sha256).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from apex_orch.demo import synthetic, trained
from apex_orch.evaluation.evaluate import evaluate
from apex_orch.evaluation.inputs import EvalSettings

PPL_BOUND = 20.0   # the F16 demo's perplexity on its evaluation text (committed build: 6.59; 1024 tokens)

pytestmark = pytest.mark.requires_tools("llama-quantize", "llama-imatrix", "llama-perplexity")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def demo() -> Path:
    return trained.demo_model_path()


@pytest.fixture(scope="module")
def eval_text(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("demo-eval") / "demo-prose.txt"
    path.write_text(synthetic.demo_text(), encoding="utf-8")
    return path


@pytest.mark.slow
def test_a_first_use_builds_the_committed_bytes(demo):
    committed = trained.committed_record()
    assert committed is not None and committed["format"] == "apex-orch-demo-model"
    record = json.loads(demo.with_name(demo.name + ".json").read_text())
    assert sha256(demo) == record["sha256"] == committed["sha256"]
    assert record["tokens_trained"] == trained.DEMO_STEPS * 4 * 256
    assert record["loss_last"] < record["loss_first"] - 2          # it learned (6.24 -> 3.60 in the committed build)
    assert demo.stat().st_size == committed["size_bytes"]
    assert trained.build_key(trained.build_inputs()) in demo.name  # a changed input is a new file, never a stale one


@pytest.mark.slow
def test_the_demo_is_a_language_model_of_its_text(demo, eval_text):
    r = evaluate(demo, text=eval_text, settings=EvalSettings(n_ctx=256, chunks=8))
    assert r.ppl < PPL_BOUND, r.ppl                                 # a random model gives ~the vocabulary size
    # the same bytes give the committed number; llama.cpp's CPU kernels may differ in the last digits
    assert r.ppl == pytest.approx(trained.committed_record()["source_eval"]["ppl"], rel=1e-3)


@pytest.mark.slow
def test_quantizations_order_with_their_size(demo, eval_text, tmp_path, require_tools):
    """Q8_0 < Compact < Mini in mean KLD, and the other way round in size: what a trained model
    shows and a random one did not (its Compact came out 'better' than its source)."""
    from apex_orch.calibration.imatrix import plan_imatrix, run_imatrix
    from apex_orch.llama.tools import run_tool
    from apex_orch.model.info import read_model
    from apex_orch.quantize.job import plan_quantize, resolve_imatrix
    from apex_orch.quantize.run import run_quantize

    tools = require_tools("llama-quantize")
    q8 = tmp_path / "demo-Q8_0.gguf"
    run_tool([str(tools["llama-quantize"]), str(demo), str(q8), "Q8_0", "2"], log_path=tmp_path / "q8.log",
             what="llama-quantize Q8_0")
    imatrix = run_imatrix(plan_imatrix(demo, "diverse", ctx=256, chunks=16, threads=2))
    im = resolve_imatrix(read_model(demo), imatrix)
    files = {"Q8_0": q8}
    for profile in ("compact", "mini"):
        job = plan_quantize(demo, profile, out_dir=tmp_path, imatrix=im if profile == "mini" else None, threads=2)
        files[profile] = run_quantize(job).files[0]
    settings = EvalSettings(n_ctx=256, chunks=8)
    kld = {k: evaluate(p, base=demo, text=eval_text, settings=settings).kld.kld_mean for k, p in files.items()}
    size = {k: p.stat().st_size for k, p in files.items()}
    assert 0 < kld["Q8_0"] < kld["compact"] < kld["mini"], kld
    assert size["Q8_0"] > size["compact"] > size["mini"], size
