"""apex-orch eval / compare: agreement with llama-perplexity, the base cache, errors, gates.

Real components: the synthetic models from conftest, the real llama-quantize to make a
Q4_K_M file, the real llama-perplexity binary and the real bindings. Settings are kept small
(ctx 128, 4 chunks = 252 scored tokens, 2 threads) so the file runs in about a minute.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from apex_orch.evaluation import base_cache as evalcache
from apex_orch.evaluation import compare as evalreport
from apex_orch.evaluation import evaluate as ev
from apex_orch.evaluation import gates
from apex_orch.plan.gates import Gates
from apex_orch.evaluation import inputs
from apex_orch.evaluation import results
from apex_orch.evaluation import tool_backend
from apex_orch.demo import synthetic
from apex_orch.demo.spec import SyntheticSpec
from apex_orch.cli import main
from apex_orch.core.errors import ConfigError, EvalError, GateFailedError, ModelError, RequestError
from apex_orch.llama import pin
from apex_orch.llama.tools import find_tool, run_tool

SETTINGS = inputs.EvalSettings(n_ctx=128, chunks=4, n_threads=2)
CLI_SETTINGS = ["-c", "128", "--chunks", "4", "-t", "2"]

pytestmark = pytest.mark.requires_tools("llama-perplexity", "llama-quantize")


@pytest.fixture(scope="module", autouse=True)
def eval_cache(tmp_path_factory: pytest.TempPathFactory):
    """Base log-prob caches go to a fresh folder for this module (never the user's cache)."""
    folder = tmp_path_factory.mktemp("eval-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("APEX_ORCH_EVAL_CACHE", str(folder))
        yield folder


@pytest.fixture(scope="module")
def q4(mistral4_split: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("quant") / "mistral4-split-Q4_K_M.gguf"
    run_tool([find_tool("llama-quantize").path, mistral4_split, out, "Q4_K_M", "2"])
    return out


@pytest.fixture(scope="module")
def kld_pair(q4: Path, mistral4_split: Path, eval_text: Path) -> tuple[results.EvalResult, results.EvalResult]:
    ours = ev.evaluate(q4, base=mistral4_split, text=eval_text, settings=SETTINGS)
    tool = ev.evaluate(q4, base=mistral4_split, text=eval_text, settings=SETTINGS, backend="llama-perplexity")
    return ours, tool


def rel(a: float, b: float) -> float:
    return abs(a / b - 1.0)


# --------------------------------------------------------------------------- agreement

@pytest.mark.parametrize(("preset", "n_batch"), [("mistral4_split", None), ("qwen3moe", 64)])
def test_ppl_equals_llama_perplexity(preset: str, n_batch: int | None, request: pytest.FixtureRequest,
                                     eval_text: Path) -> None:
    """mistral4 with one decode per chunk; qwen3moe with two batches per chunk (-b 64)."""
    model = request.getfixturevalue(preset)
    settings = inputs.EvalSettings(n_ctx=128, chunks=4, n_threads=2, n_batch=n_batch)
    ours = ev.evaluate(model, text=eval_text, settings=settings)
    tool = ev.evaluate(model, text=eval_text, settings=settings, backend="llama-perplexity")
    assert (ours.backend, tool.backend) == ("bindings", "llama-perplexity")
    assert ours.n_chunks == tool.n_chunks == 4
    assert ours.n_scored == tool.n_scored == 4 * 63
    assert rel(ours.ppl, tool.ppl) < 1e-4            # the bar: 0.01%
    assert rel(ours.ppl_err, tool.ppl_err) < 1e-4
    assert ours.settings == tool.settings
    assert ours.settings["n_batch"] == (n_batch or 128) and ours.settings["flash_attn"] is True
    assert ours.n_tokens > 2 * 128 and tool.n_tokens is None   # the tool does not print it


def test_kld_equals_llama_perplexity(kld_pair) -> None:
    ours, tool = kld_pair
    a, b = ours.kld, tool.kld
    assert a.count == b.count == 252
    assert rel(a.mean_ppl_q, b.mean_ppl_q) < 1e-4
    assert rel(a.mean_ppl_base, b.mean_ppl_base) < 1e-4
    assert rel(ours.base_ppl, tool.base_ppl) < 1e-4
    assert rel(a.kld_mean, b.kld_mean) < 0.005         # the bar: 0.5%
    assert abs(a.same_top_p - b.same_top_p) < 0.1      # percentage points
    # The rest agree to the tool's printed precision (6 decimals, 3 for percents).
    for name in ("kld_max", "kld_p999", "kld_p990", "kld_median", "kld_min", "mean_ln_ppl_ratio"):
        assert abs(getattr(a, name) - getattr(b, name)) < 2e-6, name
    assert abs(a.cor_ln_ppl - b.cor_ln_ppl) < 0.01
    assert abs(a.rms_dp - b.rms_dp) < 0.001
    assert ours.ppl == a.mean_ppl_q and tool.ppl == b.mean_ppl_q
    assert 0 < a.kld_min <= a.kld_median <= a.kld_p999 <= a.kld_max
    # results travel as JSON (cards, releases) and come back equal
    assert results.EvalResult.from_dict(json.loads(ours.to_json())) == ours


def test_base_cache_is_reused_and_readable_by_the_tool(kld_pair, q4: Path, mistral4_split: Path,
                                                        eval_text: Path, tmp_path: Path) -> None:
    ours, _ = kld_pair
    cache_file = Path(ours.cache)
    assert cache_file.parent.parent == evalcache.cache_dir()
    stamp = cache_file.stat().st_mtime_ns
    again = ev.evaluate(q4, base=mistral4_split, text=eval_text, settings=SETTINGS)
    assert cache_file.stat().st_mtime_ns == stamp        # not recomputed
    assert again.kld == ours.kld                         # same numbers, bit for bit

    with evalcache.BaseLogProbs(cache_file) as cache:
        assert (cache.n_ctx, cache.n_chunks, cache.n_scored, cache.n_vocab) == (128, 4, 63, 32000)
        assert cache.meta["inputs"]["text_sha256"] == ours.text.sha256
        assert cache.meta["settings"]["flash_attn"] is True
        assert cache.size_bytes() <= cache.dense_bytes() * 1.01
        tool_file = evalcache.write_tool_base_file(cache, tmp_path / "base.kld")
        assert tool_file.stat().st_size == cache.dense_bytes()
    # llama-perplexity, reading the base from our cache, prints our numbers.
    lines: list[str] = []
    run_tool(tool_backend.tool_argv(str(q4), SETTINGS, base_file=str(tool_file), kl=True), on_line=lines.append)
    parsed = tool_backend.parse_kld_block(lines)
    assert "kld_mean" in parsed, "\n".join(lines[-60:])
    assert abs(parsed["kld_mean"] - ours.kld.kld_mean) < 2e-6
    assert abs(parsed["same_top_p"] - ours.kld.same_top_p) < 0.001
    assert rel(parsed["mean_ppl_base"], ours.kld.mean_ppl_base) < 1e-6


def test_quantized_log_probs_are_within_half_a_step(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    logits = (rng.standard_normal((8, 5000)) * 6).astype(np.float32)
    targets = rng.integers(0, 5000, 8)
    rows = evalcache.quantize_rows(logits, targets)
    exact = logits.astype(np.float64) - np.log(np.exp(logits.astype(np.float64)).sum(axis=1, keepdims=True))
    approx = rows.scale[:, None].astype(np.float64) * rows.q + rows.min_log_prob[:, None]
    kept = approx > evalcache.LOG_PROB_FLOOR
    step = rows.scale[:, None].astype(np.float64) * np.ones_like(exact)
    assert np.all(np.abs(approx - exact)[kept] <= step[kept] / 2 + 1e-5)
    assert np.all(rows.scale <= 16 / 65535 + 1e-9)
    # what the tool ignores is zeroed (compresses), except each row's scored token
    assert np.all(rows.q[exact < -16.01] == 0) or np.all(exact[rows.q == 0] < -15.99)
    assert np.all(rows.q[np.arange(8), targets] == np.rint((logits[np.arange(8), targets] - np.maximum(
        logits.min(axis=1), logits.max(axis=1) - 16)) / rows.scale).clip(0))
    np.testing.assert_allclose(rows.nll, -exact[np.arange(8), targets], rtol=1e-6)
    # round trip through both codecs
    dense = np.arange(6 * 7, dtype=np.uint16).reshape(6, 7) + 1
    sparse = np.zeros((6, 7), np.uint16)
    sparse[2, 3] = 40000
    for q in (dense, sparse):
        assert np.array_equal(evalcache._unpack(evalcache._pack(q), q.shape), q)
    assert evalcache._pack(dense)[0] == evalcache.CODEC_RAW
    assert evalcache._pack(sparse)[0] == evalcache.CODEC_PLANES_ZLIB


def test_parse_kld_block_reads_the_tools_names() -> None:
    block = """====== Perplexity statistics ======
Mean PPL(Q)                   :  12.345678 ±   0.123456
Mean PPL(base)                :  12.000000 ±   0.120000
Cor(ln(PPL(Q)), ln(PPL(base))):  99.12%
Mean ln(PPL(Q)/PPL(base))     :   0.028371 ±   0.001000
Mean PPL(Q)/PPL(base)         :   1.028781 ±   0.001029
Mean PPL(Q)-PPL(base)         :   0.345678 ±   0.012345

====== KL divergence statistics ======
Mean    KLD:   0.012345 ±   0.000456
Maximum KLD:   1.500000
99.9%   KLD:   0.900000
99.0%   KLD:   0.200000
95.0%   KLD:   0.050000
90.0%   KLD:   0.030000
Median  KLD:   0.005000
10.0%   KLD:   0.000100
 5.0%   KLD:   0.000050
 1.0%   KLD:   0.000010
 0.1%   KLD:   0.000001
Minimum KLD:  -0.000002

====== Token probability statistics ======
Mean    Δp: -0.123 ± 0.045 %
Maximum Δp: 45.678%
RMS Δp    :  3.456 ± 0.123 %
Same top p: 95.432 ± 0.321 %
"""
    f = tool_backend.parse_kld_block(block.splitlines())
    assert f["mean_ppl_q"] == 12.345678 and f["mean_ppl_q_err"] == 0.123456
    assert f["mean_ppl_ratio"] == 1.028781 and f["mean_ppl_diff"] == 0.345678
    assert f["cor_ln_ppl"] == 99.12
    assert f["kld_mean"] == 0.012345 and f["kld_mean_err"] == 0.000456
    assert f["kld_p001"] == 0.000001 and f["kld_p010"] == 0.00001 and f["kld_min"] == -0.000002
    assert f["dp_mean"] == -0.123 and f["dp_max"] == 45.678
    assert f["rms_dp"] == 3.456 and f["same_top_p"] == 95.432 and f["same_top_p_err"] == 0.321


# --------------------------------------------------------------------------- compare, gates, speed

def test_compare_table_formats_and_plot(kld_pair, q4: Path, mistral4_split: Path, eval_text: Path,
                                        tmp_path: Path) -> None:
    ours, _ = kld_pair
    report = evalreport.compare([q4], mistral4_split, text=eval_text, settings=SETTINGS, speed=False)
    base_row, row = report.rows()
    assert base_row.is_base and base_row.tier == "F16" and base_row.kld_mean is None
    assert base_row.ppl == ours.base_ppl
    assert row.tier == "Q4_K_M" and row.kld_mean == ours.kld.kld_mean and row.same_top_p == ours.kld.same_top_p
    assert 4.5 < row.bpw < 6 and row.size_bytes < base_row.size_bytes / 2
    md = evalreport.format_report(report, "md")
    assert md.splitlines()[0].split("|")[1].strip() == "file"
    assert f"{ours.kld.kld_mean:.6f}" in md and "mistral4-split.gguf (base)" in md
    data = json.loads(evalreport.format_report(report, "json"))
    assert data["rows"][1]["kld_mean"] == ours.kld.kld_mean and data["settings"]["n_ctx"] == 128
    csv_lines = evalreport.format_report(report, "csv").splitlines()
    assert csv_lines[0].startswith("file,tier,size_bytes,bpw,ppl") and len(csv_lines) == 3
    png = evalreport.pareto_plot(report, tmp_path / "pareto.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert evalreport.pareto_front([(1, 5), (2, 3), (3, 4), (4, 1)]) == [0, 1, 3]


def test_compare_holds_files_against_baselines(kld_pair, q4: Path, mistral4_split: Path, eval_text: Path,
                                              tmp_path: Path) -> None:
    """A file as large as Q8_0 but with Q2_K's loss (Q2_K requantized to Q8_0) against the Q4_K_M as a
    baseline: smaller and closer beyond the errors, so the file is marked and the sentence says so;
    the other way round nothing is marked, and the gates hold for the files only."""
    from click.testing import CliRunner

    from apex_orch.cli import main
    from apex_orch.evaluation.baselines import closer_sentence
    from apex_orch.core.text import binary_size
    tool = find_tool("llama-quantize").path
    q2 = tmp_path / "mistral4-split-Q2_K.gguf"
    run_tool([tool, mistral4_split, q2, "Q2_K", "2"])
    bloated = tmp_path / "bloated-Q8_0.gguf"
    run_tool([tool, "--allow-requantize", q2, bloated, "Q8_0", "2"])
    res = CliRunner().invoke(main, ["compare", str(bloated), "--baseline", str(q4), "--base", str(mistral4_split),
                                    "--text", str(eval_text), *CLI_SETTINGS, "--no-speed", "-q"])
    assert res.exit_code == 0, res.output
    lines = res.stdout.splitlines()
    assert lines[3].startswith("| bloated-Q8_0.gguf † ")
    assert lines[4].startswith("| mistral4-split-Q4_K_M.gguf (baseline) ")
    report = evalreport.compare([bloated], mistral4_split, baselines=[q4], text=eval_text, settings=SETTINGS,
                                speed=False)
    _base, file_row, base_row = report.rows()
    assert (file_row.is_baseline, base_row.is_baseline) == (False, True)
    assert base_row.kld_mean == kld_pair[0].kld.kld_mean and base_row.kld_mean_err == kld_pair[0].kld.kld_mean_err
    assert base_row.kld_mean + base_row.kld_mean_err < file_row.kld_mean - file_row.kld_mean_err
    [(t, b)] = report.closer_baselines()
    sentence = closer_sentence(t, b, binary_size)
    assert sentence.startswith("mistral4-split-Q4_K_M.gguf is smaller and closer to the source than "
                               "bloated-Q8_0.gguf: ")
    assert f"† {sentence}" in lines
    assert json.loads(evalreport.format_report(report, "json"))["closer_baselines"] == [
        {"file": "bloated-Q8_0.gguf", "baseline": "mistral4-split-Q4_K_M.gguf"}]
    # the other way round: the baseline is larger, so nothing is marked; a gate the baseline fails is not checked
    swapped = evalreport.compare([q4], mistral4_split, baselines=[bloated], text=eval_text, settings=SETTINGS,
                                 speed=False, gates=Gates(max_mean_kld=(file_row.kld_mean + base_row.kld_mean) / 2))
    assert swapped.closer_baselines() == [] and "†" not in evalreport.format_report(swapped, "md")
    swapped.check_gates()
    assert [r.gate_failures for r in swapped.rows()] == [[], [], []]


def test_gates(kld_pair) -> None:
    ours, tool = kld_pair
    kld = ours.kld.kld_mean
    gates.check_gates([ours, tool], Gates(max_mean_kld=kld * 1.1, max_ppl_ratio=2.0, min_same_top_p=1.0))
    with pytest.raises(GateFailedError) as err:
        gates.check_gates(ours, Gates.from_mapping({"max_mean_kld": 0.001, "min_same_top_p": 99.5}))
    text = str(err.value)
    assert f"mean KLD {kld:.6f} > max 0.001" in text
    assert f"same top p {ours.kld.same_top_p:.3f}% < min 99.5%" in text
    assert err.value.exit_code == 15
    with pytest.raises(ConfigError, match="unknown key 'max_kld'"):
        Gates.from_mapping({"max_kld": 0.1})
    with pytest.raises(ConfigError, match="max_ppl_ratio must be a number"):
        Gates.from_mapping({"max_ppl_ratio": "1.1"})


def test_kld_99_9_gate_and_release_summary_gates(kld_pair, q4: Path, mistral4_split: Path,
                                                 eval_text: Path) -> None:
    """The fourth gate (the release's max_kld_99_9) on eval, and the release's wording over a summary."""
    ours, _ = kld_pair
    p999 = ours.kld.kld_p999
    assert gates.gate_failures(ours, Gates.from_mapping({"max_kld_99_9": p999 * 1.01})) == []
    assert gates.gate_failures(ours, Gates(max_kld_99_9=p999 / 2)) == [
        f"{q4.name}: KLD 99.9% {p999:.6f} > max {p999 / 2:g}"]
    summary = {"kld_mean": 0.0123, "ppl_ratio": 1.01, "same_top_p": 95.5, "kld_p999": None}
    bounds = {"max_mean_kld": 0.01, "max_ppl_ratio": 1.02, "min_same_top_p": 99, "max_kld_99_9": 1}
    assert gates.summary_gate_failures(summary, bounds, "x.gguf") == [
        "x.gguf: mean KLD 0.0123 fails max_mean_kld 0.01",
        "x.gguf: same top p % 95.5 fails min_same_top_p 99",
        "x.gguf: KLD 99.9% n/a fails max_kld_99_9 1"]
    assert gates.summary_gate_failures(summary, {}, "x.gguf") == []
    res = CliRunner().invoke(main, ["eval", str(q4), "--base", str(mistral4_split), "--text", str(eval_text),
                                    *CLI_SETTINGS, "--max-kld-99-9", "0.0001", "-q"])
    assert res.exit_code == 15, res.output
    assert f"KLD 99.9% {p999:.6f} > max 0.0001" in res.output


def test_cli_eval_gate_failure_exits_15(q4: Path, mistral4_split: Path, eval_text: Path, kld_pair) -> None:
    res = CliRunner().invoke(main, ["eval", str(q4), "--base", str(mistral4_split), "--text", str(eval_text),
                                    *CLI_SETTINGS, "--max-mean-kld", "0.0001", "-q"])
    assert res.exit_code == 15, res.output
    assert "Mean    KLD:" in res.output and "Same top p:" in res.output
    assert "quality gate failed" in res.output and "> max 0.0001" in res.output


def test_cli_compare_json_and_eval_dry_run(q4: Path, mistral4_split: Path, eval_text: Path, kld_pair,
                                           tmp_path: Path) -> None:
    ours, _ = kld_pair
    res = CliRunner().invoke(main, ["compare", str(q4), "--base", str(mistral4_split), "--text", str(eval_text),
                                    *CLI_SETTINGS, "--no-speed", "--json", "-q",
                                    "--plot", str(tmp_path / "p.png")])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["rows"][1]["kld_mean"] == ours.kld.kld_mean
    assert (tmp_path / "p.png").is_file()
    dry = CliRunner().invoke(main, ["eval", str(q4), "--base", str(mistral4_split), "--text", str(eval_text),
                                    *CLI_SETTINGS, "--dry-run"])
    assert dry.exit_code == 0, dry.output
    assert "cache" in dry.output and "(hit)" in dry.output and "ctx 128, chunks 4" in dry.output


@pytest.mark.requires_tools("llama-bench")
def test_speed_is_llama_bench_with_the_evaluation_settings(mistral4_split: Path) -> None:
    """llama-bench's own records (-o jsonl), run with the evaluation's threads, ubatch, flash
    attention and repack (off: the MLA model would abort on AMX with it on)."""
    sp = ev.measure_speed(mistral4_split, SETTINGS, n_prompt=64, n_gen=8, repetitions=2)
    assert (sp.tool, sp.pp_tokens, sp.tg_tokens, sp.repetitions) == ("llama-bench", 64, 8, 2)
    assert (sp.n_threads, sp.n_ubatch, sp.n_batch, sp.flash_attn, sp.repack) == (2, 512, 2048, True, False)
    assert sp.build_commit and pin.LLAMA_CPP_COMMIT.startswith(sp.build_commit)
    assert sp.pp_tokens_per_s > 0 and sp.tg_tokens_per_s > 0
    assert sp.pp_tokens_per_s_sd is not None and sp.tg_tokens_per_s_sd is not None
    no_fa = ev.measure_speed(mistral4_split, replace(SETTINGS, flash_attn=False), n_prompt=16, n_gen=2, repetitions=1)
    assert (no_fa.flash_attn, no_fa.repetitions, no_fa.pp_tokens) == (False, 1, 16)


def test_speed_records_are_checked() -> None:
    from apex_orch.evaluation.speed import _records
    good = ('{"n_prompt": 512, "n_gen": 0, "n_threads": 2, "n_batch": 2048, "n_ubatch": 512, "avg_ts": 1.5, '
            '"stddev_ts": 0.1, "samples_ts": [1.4, 1.6]}')
    assert _records(["llama-bench: loading", good], "m.gguf")[0]["avg_ts"] == 1.5
    with pytest.raises(EvalError, match="lacks avg_ts"):
        _records([good.replace('"avg_ts": 1.5', '"avg_ts": "fast"')], "m.gguf")
    with pytest.raises(EvalError, match="not JSON"):
        _records(['{"n_prompt": 512,}'], "m.gguf")


def test_corpus_text_is_written_for_the_tool(eval_text: Path, tmp_path: Path) -> None:
    spec = tmp_path / "prose.yaml"
    spec.write_text(f"description: prose for eval\nseed: 1\nsources:\n  - path: {eval_text}\n")
    tf = inputs.text_facts(corpus=str(spec))
    assert tf.label == f"corpus:{spec}"
    data = Path(tf.path).read_bytes()
    assert hashlib.sha256(data).hexdigest() == tf.sha256 and len(data) == tf.n_bytes > 100_000
    assert Path(tf.path).parent == evalcache.cache_dir() / "texts"
    assert inputs.text_facts(corpus=str(spec)) == tf            # deterministic: same file, same hash
    with pytest.raises(RequestError, match="exactly one evaluation text") as info:
        inputs.text_facts(eval_text, corpus=str(spec))
    assert info.value.fields == ("text", "corpus")


# --------------------------------------------------------------------------- errors

def test_text_shorter_than_two_contexts(mistral4_split: Path, tmp_path: Path) -> None:
    short = tmp_path / "short.txt"
    short.write_text("Only a few words here. " * 10)
    for backend in ev.BACKENDS:
        with pytest.raises(EvalError, match=r"too short: \d+ tokens, but .*(needs at least 256|256)") as err:
            ev.evaluate(mistral4_split, text=short, settings=SETTINGS, backend=backend)
        assert "smaller context" in err.value.hint


def test_base_with_another_vocabulary(mistral4_split: Path, eval_text: Path, tmp_path: Path,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    # A real model with the phi-3 tokenizer (32064 tokens) from the pinned tree's vocab files.
    phi3 = synthetic.vocab_gguf_path().with_name("ggml-vocab-phi-3.gguf")
    monkeypatch.setattr(synthetic, "vocab_gguf_path", lambda: phi3)
    synthetic._tokenizer_kv.cache_clear()
    try:
        other = synthetic.write_model(tmp_path / "phi3-vocab.gguf",
                                      SyntheticSpec(arch="qwen3moe", n_layer=2, name="OtherVocab"))
    finally:
        monkeypatch.undo()
        synthetic._tokenizer_kv.cache_clear()
    for backend in ev.BACKENDS:
        with pytest.raises(EvalError, match="different vocabulary: 32064 tokens here, 32000 in the base"):
            ev.evaluate(other, base=mistral4_split, text=eval_text, settings=SETTINGS, backend=backend)


def test_corrupt_and_non_gguf_files(mistral4_split: Path, eval_text: Path, tmp_path: Path) -> None:
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"PK\x03\x04 this is a zip, not a model" * 10)
    torn = tmp_path / "torn.gguf"
    with open(mistral4_split, "rb") as src:
        torn.write_bytes(src.read(4 << 20))
    with pytest.raises(ModelError, match="not a GGUF file"):
        ev.evaluate(junk, text=eval_text, settings=SETTINGS)
    with pytest.raises(ModelError, match="shorter than its tensors"):
        ev.evaluate(mistral4_split, base=torn, text=eval_text, settings=SETTINGS)
    res = CliRunner().invoke(main, ["eval", str(junk), "--text", str(eval_text), *CLI_SETTINGS])
    assert res.exit_code == ModelError.exit_code
    assert res.output.startswith("error: ") and "not a GGUF file" in res.output and "Traceback" not in res.output


def test_settings_are_validated() -> None:
    with pytest.raises(RequestError, match="must be between 1 and the context"):
        inputs.EvalSettings(n_ctx=128, n_batch=256)
    with pytest.raises(RequestError, match="even number"):
        inputs.EvalSettings(n_ctx=127)
    assert inputs.EvalSettings(n_ctx=128).numeric_key() == {
        "n_ctx": 128, "chunks": None, "n_batch": 128, "n_ubatch": 128, "flash_attn": True, "repack": False}


def test_tier_detection() -> None:
    assert inputs.tier_of({"apex.profile": "compact"}, Path("x-Q4_K_M.gguf")) == "compact"
    assert inputs.tier_of({"apex.profile": "i-compact", "apex.tier": "I-Compact"}, Path("x.gguf")) == "I-Compact"
    assert inputs.tier_of({}, Path("Qwen3-30B-A3B-APEX-balanced.gguf")) == "balanced"
    assert inputs.tier_of({}, Path("model-APEX-I-Compact-00001-of-00003.gguf")) == "I-Compact"
    assert inputs.tier_of({}, Path("model.Q8_0.gguf")) == "Q8_0"
    assert inputs.tier_of({"general.file_type": 1}, Path("model.gguf")) == "F16"
    assert inputs.tier_of({}, Path("model.gguf")) == "?"
    assert inputs.tier_of({"general.file_type": 1}, Path("apex-demo-moe-94abb7ea.gguf")) == "F16"
