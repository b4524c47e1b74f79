"""CI smoke of the benchmark scripts: each runs in its tiny `--smoke` mode (a 43 MB random-weight
model, one repeat, one or two tiers) into a temp folder, and the result files must appear with the
keys the README and the lead's summary read. The numbers themselves are not checked (no timed
assertions); `make bench` / `make bench-quality` produce the real figures in bench/results/.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"

pytestmark = [pytest.mark.slow,
              pytest.mark.requires_tools("llama-quantize", "llama-imatrix", "llama-perplexity")]


def run(script: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(BENCH / script), *args], capture_output=True, text=True,
                          cwd=REPO, env=env or os.environ.copy())


def check_machine(data: dict) -> None:
    mach = data["machine"]
    assert mach["commit"] or mach.get("git_commit")
    assert len(mach["load_average_at_start"]) == 3 and len(mach["load_average_at_end"]) == 3


def md_header(md: Path) -> str:
    text = md.read_text()
    assert "load average" in text
    return text


def test_run_all_smoke_writes_every_orchestration_result(tmp_path: Path) -> None:
    env = os.environ.copy()
    env["APEX_ORCH_EVAL_CACHE"] = str(tmp_path / "eval-cache")
    p = run("run_all.py", "--smoke", "--out", str(tmp_path), env=env)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert sorted(x.name for x in tmp_path.glob("*.json")) == sorted(
        ["plan-time.json", "quantize-overhead.json", "release-phases.json", "integrity.json"]
        + [x.name for x in tmp_path.glob("eval-*.json")])
    assert len(list(tmp_path.glob("eval-*.json"))) == 1
    assert "summary:" in p.stdout

    plan = json.loads((tmp_path / "plan-time.json").read_text())
    check_machine(plan)
    assert plan["repeat"] == 1
    assert {"compact", "i-mini", "quality"} <= set(plan["profiles"])
    assert plan["profiles"]["compact"]["tensors"] == 615
    assert set(plan["profiles"]["compact"]) == {"median_ms", "max_ms", "tensors", "rules"}
    assert "cli_process_median_s" in plan
    md_header(tmp_path / "plan-time.md")

    q = json.loads((tmp_path / "quantize-overhead.json").read_text())
    check_machine(q)
    (row,) = q["results"]
    assert row["model"] == "bench-smoke-moe.gguf" and row["repeat"] == 1
    assert len(row["raw_s"]) == 1 and len(row["apex_s"]) == 1
    assert {"raw_median_s", "apex_median_s", "ratio", "overhead_s", "output_bytes", "in_run_overhead_median_s",
            "in_run_ratio_median"} <= set(row)
    assert len(row["apex_llama_quantize_s"]) == 1
    md_header(tmp_path / "quantize-overhead.md")

    e = json.loads(next(tmp_path.glob("eval-*.json")).read_text())
    assert len(e["machine"]["load_average_at_start"]) == 3 and len(e["machine"]["load_average_at_end"]) == 3
    assert e["settings"]["n_ctx"] == 128 and e["settings"]["chunks"] == 2
    for part in ("perplexity", "kl_divergence"):
        assert set(e["summary"][part]["median_wall_s"]) == {"bindings", "llama-perplexity"}
        assert "ratio_end_to_end" in e["summary"][part]
    assert e["runs"]["base_cache"]["scored_tokens"] == 2 * 63

    r = json.loads((tmp_path / "release-phases.json").read_text())
    check_machine(r)
    assert r["mode"] == "smoke" and r["tiers"] == ["i-compact"]
    assert [x["phase"] for x in r["phases"]] == ["fetch", "convert", "imatrix", "quantize", "eval", "card", "publish"]
    status = {x["phase"]: x["status"] for x in r["phases"]}
    assert status["imatrix"] == status["quantize"] == status["eval"] == "ran"   # cold cache: nothing reused
    assert status["publish"] == "skipped"
    assert all(not v for v in r["cold_cache"]["before"].values())
    assert r["cold_cache"]["older_than_the_run"] == []
    assert {"imatrix", "eval", "corpora"} <= set(r["cold_cache"]["created_by_the_run"])
    assert len(r["tools"]["imatrix"]) == 1 and len(r["tools"]["quantize"]) == 1
    assert len(r["tools"]["eval"]) == 2          # base + one tier through llama-perplexity
    assert {"release_wall_s", "raw_tools_s", "ratio_wall_to_raw_tools"} <= set(r["totals"])
    assert r["rerun"]["exit"] == 0
    assert r["rerun"]["phases"]["quantize"] == r["rerun"]["phases"]["eval"] == "up to date"
    assert "| imatrix | ran |" in md_header(tmp_path / "release-phases.md")


def test_bench_quality_smoke_writes_tables_plot_and_verdicts(tmp_path: Path) -> None:
    env = os.environ.copy()
    env["APEX_ORCH_EVAL_CACHE"] = str(tmp_path / "eval-cache")
    p = run("bench_quality.py", "--smoke", "--out", str(tmp_path / "out"), env=env)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    out = tmp_path / "out"
    assert sorted(x.name for x in out.iterdir()) == ["quality.json", "quality.md", "quality.png"]
    assert (out / "quality.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    d = json.loads((out / "quality.json").read_text())
    check_machine(d)
    assert d["mode"] == "smoke"
    assert list(d["domains"]) == ["demo-text", "wikipedia"]
    assert [v["label"] for v in d["variants"]] == ["compact", "i-compact", "Q4_K_M"]
    assert [v["imatrix"] for v in d["variants"]] == [False, True, False]
    assert d["imatrix"]["corpus"] == "diverse" and d["imatrix"]["chunks"] == 2
    for dom in d["domains"].values():
        assert dom["scored_tokens"] == 2 * 63
        assert [r["label"] for r in dom["rows"]] == ["compact", "i-compact", "Q4_K_M"]
        for r in dom["rows"]:
            assert {"size_bytes", "bpw", "ppl", "kld_mean", "kld_p999", "kld_max", "same_top_p"} <= set(r)
            assert r["kld_mean"] > 0
            t = r["types"]  # read back from the file: role bytes add up to less than the file
            assert sum(t[role]["bytes"] for role in ("routed_expert", "shared_expert", "attention", "embedding",
                                                     "output")) < r["size_bytes"]
        q4 = next(r for r in dom["rows"] if r["label"] == "Q4_K_M")["types"]
        # llama.cpp's Q4_K_M: Q4_K with some ffn_down in Q6_K, output Q6_K
        assert q4["routed_expert"]["types"].startswith("Q4_K ") and "Q6_K" in q4["routed_expert"]["types"]
        assert q4["output"]["types"] == "Q6_K"
    assert [v["tier"] for v in d["verdicts"]] == ["compact", "i-compact"]
    for v in d["verdicts"]:
        assert set(v["domains"]) == {"demo-text", "wikipedia"}
        assert isinstance(v["beaten_in_every_domain"], bool)
    # the overlap check sees that the built-in wikipedia text is part of the diverse imatrix corpus
    assert d["overlap"]["wikipedia"]["lines_in_corpus"] > 0
    assert d["overlap"]["demo-text"]["lines_in_corpus"] == 0
    md = (out / "quality.md").read_text()
    assert "Does a uniform preset of equal or smaller size beat each APEX tier" in md
    assert "Smoke run" in md
    assert "## What each file holds" in md and "| Q4_K_M | Q4_K " in md
    # --from-json re-renders the same Markdown (and a plot) from the results file, measuring nothing
    again = run("bench_quality.py", "--from-json", str(out / "quality.json"), "--out", str(tmp_path / "re"), env=env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert (tmp_path / "re" / "quality.md").read_text() == md
    assert sorted(x.name for x in (tmp_path / "re").iterdir()) == ["quality.md", "quality.png"]


def test_bench_quality_without_reference_model_says_how_to_build_it(tmp_path: Path) -> None:
    env = os.environ.copy()
    env["APEX_ORCH_CACHE"] = str(tmp_path / "empty-cache")
    p = run("bench_quality.py", "--out", str(tmp_path / "out"), env=env)
    assert p.returncode == 2
    assert "make reference-model" in p.stderr
    assert not (tmp_path / "out").exists()


def test_bench_integrity_smoke_measures_first_run_and_reruns(tmp_path: Path) -> None:
    """bench_integrity --smoke: a one-tier release of the smoke model, then reruns. An up-to-date
    rerun hashes no byte; a touched rerun re-hashes exactly the outputs; publish hashes them again."""
    p = run("bench_integrity.py", "--smoke", "--out", str(tmp_path))
    assert p.returncode == 0, p.stderr[-3000:]
    d = json.loads((tmp_path / "integrity.json").read_text())
    check_machine(d)
    assert d["mode"] == "smoke" and d["tiers"] == ["Compact"] and d["tools"]["quantize_runs"] == 1
    assert d["first_run"]["bytes_hashed"] > d["output_bytes"] > 0          # the source, then the output
    assert d["rerun_up_to_date"]["bytes_hashed"] == 0 and d["rerun_after_touched"]["bytes_hashed"] == 0
    assert d["rerun_touched"]["bytes_hashed"] == d["output_bytes"]
    assert d["publish_hash"]["bytes"] > d["output_bytes"]                  # the GGUF + README + LocalAI entry
    assert d["rerun_up_to_date"]["phases"]["quantize"] == "up to date"
    assert {"first_run_checks_to_tool", "rerun_checks_to_tool", "touched_rerun_checks_to_tool",
            "publish_hash_to_tool"} <= set(d["ratios"]) and d["sha256"]["seconds_for_240_gb"] > 0
    assert "| rerun, all up to date (stat as recorded) |" in md_header(tmp_path / "integrity.md")


def test_bench_fit_smoke_fits_measures_and_compares(tmp_path: Path) -> None:
    env = os.environ.copy()
    env["APEX_ORCH_EVAL_CACHE"] = str(tmp_path / "eval-cache")
    p = run("bench_fit.py", "--smoke", "--out", str(tmp_path / "out"), env=env)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    out = tmp_path / "out"
    assert sorted(x.name for x in out.iterdir()) == ["fit.json", "fit.md", "fit.png",
                                                      "quality.json", "quality.md", "quality.png"]
    q = json.loads((out / "quality.json").read_text())   # the same run's fixed files, as the quality results
    for dom in q["domains"].values():
        assert [r["label"] for r in dom["rows"]] == ["compact", "i-compact", "Q4_K_M"]
    assert [v["tier"] for v in q["verdicts"]] == ["compact", "i-compact"]
    d = json.loads((out / "fit.json").read_text())
    check_machine(d)
    assert d["mode"] == "smoke" and d["sensitivity"]["ladder"] == ["Q3_K", "Q4_K", "Q8_0"]
    # one fitted profile per distinct size among compact / i-compact / Q4_K_M, never over its budget
    assert [f["label"] for f in d["fitted"]] == ["fit@compact", "fit@Q4_K_M"]
    for f in d["fitted"]:
        assert f["file_bytes"] <= f["budget_bytes"]
    for dom in d["domains"].values():
        assert [r["label"] for r in dom["rows"]] == ["compact", "i-compact", "Q4_K_M", "fit@compact", "fit@Q4_K_M"]
    for c in d["comparison"]:
        for dom in c["domains"].values():
            assert dom["vs_same_size"] and all(isinstance(v["fitted_lower"], bool) for v in dom["vs_same_size"])
    for proof in d["measurement_text"].values():   # measured tokens come after every scored one
        assert proof["tokens_before_cut"] > proof["scored_tokens_end_before"]
    assert len(d["additivity"]["uniform"]) == 3 and len(d["additivity"]["fitted"]) == 2
    for f in d["additivity"]["fitted"]:   # the corrected prediction, and the plain sum beside it
        assert f["predicted"] > 0 and f["predicted_uncorrected"] > 0 and f["measured_p999"] >= 0
    assert -1 <= d["proxy"]["spearman_raw"] <= 1
    assert [r["card_gb"] for r in d["replica"]] == [72, 62, 48, 38]
    md = md_header(out / "fit.md")
    assert "Smoke run" in md and "## The additivity assumption, measured" in md
    re_dir = tmp_path / "re"
    re_dir.mkdir()
    (re_dir / "fit.json").write_text((out / "fit.json").read_text())
    again = run("bench_fit.py", "--rerender", "--out", str(re_dir), env=env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert (re_dir / "fit.md").read_text() == (out / "fit.md").read_text()
