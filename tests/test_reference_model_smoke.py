"""Smoke test of the trained reference model's build: a tiny mistral4 MoE (2 blocks, n_embd 64,
4 experts, a 512-token BPE trained on its own text) is trained for 6 steps on a few KB of the
standard library's text, exported to an
F16 GGUF with apex_orch.demo.synthetic.write_model, and run through llama.cpp. This is the export
correctness test: llama.cpp and PyTorch must agree on every logit of the held-out chunks
within the tolerances of bench/reference_model/validate.py (the full build uses the same ones).

torch is an optional extra (`pip install .[bench]`) that CI does not install: the test SKIPS,
with that reason, only when torch cannot be imported. A missing llama.cpp build FAILS it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch", reason="torch is not installed (optional `bench` extra); "
                                             "the reference-model smoke test needs it")

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.reference_model import train, validate  # noqa: E402
from bench.reference_model.config import SMOKE  # noqa: E402


@pytest.mark.slow
@pytest.mark.requires_tools("llama-perplexity")
def test_tiny_model_trains_exports_and_matches_llama_cpp(tmp_path: Path) -> None:
    rec = train.build(SMOKE, out_dir=tmp_path, log=lambda _msg: None)

    gguf = Path(rec["model"]["path"])
    assert gguf.is_file() and gguf.parent == tmp_path
    assert gguf.name == f"reference-moe-{rec['cache_key']}.gguf"
    assert not list(tmp_path.glob(".*staging*")), "no staging file may remain"
    assert not list(tmp_path.glob("*.unvalidated.gguf")), "the checked model is promoted, not copied"
    assert rec["model"]["arch"] == "mistral4"
    assert rec["model"]["n_vocab"] == 512
    # the BPE vocabulary trained on the training text: llama.cpp encodes every text exactly as tokenizers
    voc = rec["vocabulary"]
    assert voc["kind"] == "bpe" and voc["n_vocab"] == 512 and voc["gguf_pre"] == "gpt-2"
    assert set(voc["identical_encoding_tokens"]) == {"heldout/code", "heldout/prose", "train/code", "train/prose"}
    assert all(n > 100 for n in voc["identical_encoding_tokens"].values())
    assert rec["model"]["params"]["tensors"] == 3 + 2 * 17   # token_embd, output_norm, output + 17 per block
    assert rec["training"]["loss_last10"] < rec["training"]["loss_first10"]

    val = rec["validation"]
    assert val["passed"] is True
    for domain in ("code", "prose"):
        r = val["domains"][domain]
        assert r["n_chunks"] == 2 and r["n_ctx"] == 64
        assert r["positions_compared"] == 128
        assert r["mean_kld"] <= validate.TOL_MEAN_KLD
        assert r["top1_agreement"] >= validate.TOL_TOP1
        assert r["p999_abs_target_logp"] <= validate.TOL_P999_TARGET_LOGP
        assert r["max_abs_target_logp"] <= validate.TOL_MAX_TARGET_LOGP
        assert abs(r["ppl_llama"] / r["ppl_torch"] - 1) <= validate.TOL_PPL_REL
        # the bindings reproduce llama-perplexity (same chunks, batch = ctx, flash attention on)
        assert r["ppl_llama_perplexity_tool"] == pytest.approx(r["ppl_llama"], rel=validate.TOL_TOOL_REL)
        assert r["ppl_llama"] < val["uniform_ppl"]

    # A second build with the cache present is a no-op: same record, the file untouched.
    mtime = gguf.stat().st_mtime_ns
    again = train.build(SMOKE, out_dir=tmp_path, log=lambda _msg: None)
    assert again == rec
    assert gguf.stat().st_mtime_ns == mtime


@pytest.mark.slow
@pytest.mark.requires_tools("llama-perplexity")
def test_export_check_passes_f16_noise_and_fails_export_bugs(tmp_path: Path) -> None:
    """The tolerances must be able to fail: on the tiny model, F16 rounding alone passes them and
    a swapped pair of routed experts or a reversed shared-expert gate (export bugs applied to the
    torch side) fails them (mean KLD ~1e-5 against a tolerance of 5e-6)."""
    from bench.reference_model import controls

    rec = train.build(SMOKE, out_dir=tmp_path, log=lambda _msg: None, run_perplexity_tool=False)
    rows = controls.run(SMOKE, Path(rec["model"]["path"]),
                        {"code": Path(rec["data"]["heldout_text"]["code"])}, chunks=2, threads=2)
    by = {r["control"].split(": ", 1)[-1]: r for r in rows}
    assert by["torch F32 vs llama.cpp"]["passed"]
    assert by["torch F32 vs torch with F16 matmul inputs"]["passed"]
    for bug in ("routed experts 0 and 1 swapped", "ffn_gate_shexp rows reversed"):
        assert not by[bug]["passed"], bug
        assert by[bug]["mean_kld"] > validate.TOL_MEAN_KLD


def test_the_device_is_chosen_on_purpose() -> None:
    """`--device auto` trains on a CUDA GPU when torch sees one, else on the CPU; asking for CUDA
    without one is an error, not a silent CPU run; a GPU-trained model gets its own cache key."""
    from bench.reference_model.trainer import pick_device

    assert pick_device("cpu").type == "cpu"
    assert pick_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU"):
            pick_device("cuda")
    assert train.cache_key(SMOKE, "0" * 64, "cuda") != train.cache_key(SMOKE, "0" * 64, "cpu")
