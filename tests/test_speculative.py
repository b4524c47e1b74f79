"""`apex-orch speculate` / apex_orch.evaluation.speculative: the parts that need no MTP model.

The tool's --log-jsonl output is parsed by count (prompt tokens from its `encoded` line, generated
tokens from `n_predict`), on logs shaped exactly like the pinned llama-speculative-simple's (one
JSON object per log entry, one `none` entry per token). Real runs on converted MTP models, with
the heads quantized by apex-orch, are in tests/archs/test_mtp_matrix.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from apex_orch.cli import main
from apex_orch.core.errors import EvalError
from apex_orch.evaluation.speculative import (DecodeRun, SpeculativePlan, SpeculativeResult, check_result,
                                              format_result, parse_jsonl_log)


def entry(level: str, msg: str) -> str:
    return json.dumps({"type": "log", "time": 1, "level": level, "msg": msg})


def tool_log(prompt: list[str], generated: list[str], *, drafted: int, accepted: int, decoded_s: float = 2.0,
             summary: bool = True) -> list[str]:
    """The entries llama-speculative-simple writes with --log-jsonl, in its order."""
    lines = [entry("info", "cmn          init: llama threadpool init, n_threads = 2\n"),
             "ggml_something: a line not from the logger",
             entry("none", "\n\n"), *(entry("none", p) for p in prompt), *(entry("none", g) for g in generated),
             entry("none", "\n\n")]
    if summary:
        lines += [entry("info", f"encoded {len(prompt):4d} tokens in    0.248 seconds, speed:   16.161 t/s\n"),
                  entry("info", f"decoded {len(generated):4d} tokens in {decoded_s:8.3f} seconds, speed: 7.0 t/s\n"),
                  entry("info", "\n"), entry("info", "n_draft   = 3\n"),
                  entry("info", f"n_predict = {len(generated)}\n"), entry("info", f"n_drafted = {drafted}\n"),
                  entry("info", f"n_accept  = {accepted}\n"), entry("info", "accept    = 75.000%\n")]
    lines += [json.dumps({"type": "fit_memory_breakdown", "data": {"unit": "MiB"}}), entry("none", "\n\n")]
    return lines


PROMPT = ["The", " quick", " brown", " fox"]
TEXT = [" jumps", " over", "\n\n", " the", " lazy", " dog", ".", " It"]   # a generated "\n\n" token too


def test_the_generated_tokens_are_cut_out_by_count():
    run = parse_jsonl_log(tool_log(PROMPT, TEXT, drafted=8, accepted=6, decoded_s=2.0))
    assert run == DecodeRun(pieces=tuple(TEXT), n_predict=8, n_drafted=8, n_accept=6, decoded=8, decode_seconds=2.0)
    assert run.tokens_per_s == 4.0
    assert run.text == " jumps over\n\n the lazy dog. It"


def test_a_run_that_lost_its_summary_is_none():
    """The pinned llama.cpp can lose its last log lines at exit (llama.cpp#22142): retried."""
    assert parse_jsonl_log(tool_log(PROMPT, TEXT, drafted=8, accepted=6, summary=False)) is None


def _result(with_head: list[str], without: list[str], drafted=6, accepted=3, n_predict=8) -> SpeculativeResult:
    plan = SpeculativePlan(model=Path("m.gguf"), draft=None, prompt="p", n_predict=n_predict, draft_max=3, ctx=64,
                           threads=2, repack=False, tool=Path("llama-speculative-simple"), head="bundled: blk.4")
    a = DecodeRun(tuple(with_head), len(with_head), drafted, accepted, len(with_head), 1.0)
    b = DecodeRun(tuple(without), len(without), 0, 0, len(without), 2.0)
    return SpeculativeResult(plan, a, b, "llama.cpp@test", Path("logs"))


def test_the_head_may_overshoot_but_never_change_a_token():
    # the run with the head accepts drafts in groups: it may stop a few tokens later
    r = _result(TEXT + [" was"], TEXT, n_predict=8)       # 9 tokens in 1 s with the head, 8 in 2 s without
    assert r.same_output and r.acceptance == 0.5 and r.speed_ratio == 2.25
    check_result(r)
    assert "same output   yes (8 tokens compared)" in format_result(r)
    changed = _result(TEXT[:5] + [" cat"] + TEXT[6:], TEXT)
    assert not changed.same_output
    with pytest.raises(EvalError, match=r"differs from generation without it at token 6 \(8 and 8 tokens generated\)"):
        check_result(changed)
    short = _result(TEXT[:4], TEXT, n_predict=8)      # a run that stopped early without an end token
    assert not short.same_output


def test_a_head_that_drafted_nothing_proves_nothing():
    with pytest.raises(EvalError, match=r"llama.cpp drafted no token with the MTP head \(bundled: blk.4\)"):
        check_result(_result(TEXT, TEXT, drafted=0, accepted=0))


def test_a_model_without_a_head_is_refused(qwen3moe):
    r = CliRunner().invoke(main, ["speculate", str(qwen3moe)])
    assert r.exit_code == 14, r.output
    assert "has no MTP head: no blk.N.nextn.* tensors" in r.output
    assert "hint: give the head as a separate draft file (what convert_hf_to_gguf.py --mtp writes), or convert " \
           "the model with its head [--draft]" in r.output
    r = CliRunner().invoke(main, ["speculate", str(qwen3moe), "--draft", str(qwen3moe)])
    assert r.exit_code == 14, r.output
    assert "the draft is not an MTP draft file: it must hold only the MTP block(s)" in r.output and "hint: see --draft" in r.output
    r = CliRunner().invoke(main, ["speculate", str(qwen3moe), "-n", "1"])
    assert r.exit_code == 2 and "-n" in r.output
    r = CliRunner().invoke(main, ["speculate", str(qwen3moe), "--prompt", "  "])
    assert r.exit_code == 14 and "error: the prompt is empty" in r.output
