"""`apex-orch imatrix` / `imatrix-report` with the real llama-imatrix on synthetic models.

Real: llama-imatrix, llama-quantize, the bindings' tokenizer, the synthetic GGUF models, the
shipped corpora. Fakes only to inject faults, each said where it is used: a failing/hanging
stand-in for llama-imatrix, a guard that fails if a tool runs on a cache hit, and imatrix files
written by the test with entries removed.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import gguf
import numpy as np
import pytest
from click.testing import CliRunner

from apex_orch.calibration import imatrix as I
from apex_orch.calibration.imatrix_file import check_imatrix_fits, check_plan_coverage, read_imatrix
from apex_orch.llama import tools as llama
from apex_orch.llama import pin
from apex_orch.cli import main
from apex_orch.core.errors import ImatrixError, ToolFailedError, ToolTimeoutError
from apex_orch.model.info import read_model

CTX, CHUNKS, THREADS = 128, 4, 2
# resolved before the `cache` fixture points APEX_ORCH_CACHE elsewhere
MISTRAL_TEMPLATE = pin.llama_source() / "models" / "templates" / "Mistral-Small-3.2-24B-Instruct-2506.jinja"


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """An empty apex-orch cache for this module; the pinned build keeps resolving."""
    bin_dir = str(pin.bin_dir())
    root = tmp_path_factory.mktemp("apex-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("APEX_LLAMA_BIN_DIR", bin_dir)
        mp.setenv("APEX_ORCH_CACHE", str(root))
        mp.delenv("HF_HUB_OFFLINE", raising=False)
        yield root


@pytest.fixture(scope="module")
def agentic_run(cache, mistral4_split, tmp_path_factory):
    """One real run: --corpus agentic on the synthetic mistral4 model."""
    out = tmp_path_factory.mktemp("imx") / "agentic.imatrix.gguf"
    res = CliRunner().invoke(main, ["imatrix", str(mistral4_split), "--corpus", "agentic", "--imatrix-ctx", str(CTX),
                                    "--imatrix-chunks", str(CHUNKS), "-t", str(THREADS), "-o", str(out)])
    assert res.exit_code == 0, res.output
    return out, res


@pytest.fixture(scope="module")
def qwen_imatrix(cache, qwen3moe):
    plan = I.plan_imatrix(qwen3moe, "agentic", ctx=CTX, chunks=2, threads=THREADS)
    return I.run_imatrix(plan)


def routed_expert_tensors(model: Path) -> list[str]:
    return sorted(t.name for t in read_model(model).tensors if "_exps" in t.name)


@pytest.mark.requires_tools("llama-imatrix")
def test_agentic_imatrix_covers_every_routed_expert(agentic_run, mistral4_split, cache):
    out, res = agentic_run
    assert "cache hit" not in res.output
    assert f"imatrix: computing over {CHUNKS} chunks of {CTX} tokens" in res.output
    assert f"imatrix: chunk {CHUNKS}/{CHUNKS}, PPL" in res.output
    assert res.stdout.strip() == str(out)
    info = read_imatrix(out)
    assert (info.chunk_count, info.chunk_size) == (CHUNKS, CTX)
    (dataset,) = info.datasets
    assert Path(dataset).parent == cache / "corpora" and Path(dataset).name.startswith("agentic-")
    exps = routed_expert_tensors(mistral4_split)
    assert len(exps) == 12 * 3
    for name in exps:
        entry = info.entries[name]
        assert entry.n_mat == 16 and entry.has_data, name
        # every token is routed to 2 of the 16 experts
        assert entry.tokens == 2 * CHUNKS * CTX, name
    check_imatrix_fits(info, read_model(mistral4_split))
    # the cache holds the same bytes, with a sidecar saying what it was computed from
    (cached,) = (cache / "imatrix").glob("*.gguf")
    assert cached.read_bytes() == out.read_bytes()
    sidecar = json.loads(cached.with_suffix(".json").read_text())
    assert sidecar["inputs"]["ctx"] == CTX and sidecar["inputs"]["chunks"] == CHUNKS
    assert sidecar["inputs"]["llama_cpp"] == llama.build_label()
    assert not list((cache / "imatrix").glob(".*partial*")) and not list((cache / "imatrix").glob("*.lock"))


@pytest.mark.requires_tools("llama-imatrix")
def test_rerun_is_a_cache_hit(agentic_run, mistral4_split, monkeypatch):
    out, _ = agentic_run
    before = out.read_bytes()

    def must_not_run(*args, **kwargs):  # guard (a fake): a cache hit starts no tool
        raise AssertionError(f"a tool ran on a cache hit: {args}")

    monkeypatch.setattr(llama, "run_tool", must_not_run)
    res = CliRunner().invoke(main, ["imatrix", str(mistral4_split), "--corpus", "agentic", "--imatrix-ctx", str(CTX),
                                    "--imatrix-chunks", str(CHUNKS), "-t", "1", "-o", str(out)])
    assert res.exit_code == 0, res.output
    assert "imatrix: cache hit: " in res.output
    assert out.read_bytes() == before


def test_cache_key_and_plan_purity(cache, mistral4_split):
    listing = sorted(p.relative_to(cache) for p in cache.rglob("*"))
    base = I.plan_imatrix(mistral4_split, "agentic", ctx=CTX, chunks=CHUNKS, threads=2)
    assert I.plan_imatrix(mistral4_split, "agentic", ctx=CTX, chunks=CHUNKS, threads=1).key == base.key
    assert I.plan_imatrix(mistral4_split, "agentic", ctx=CTX, chunks=CHUNKS, threads=2, ngl=4).key == base.key
    assert I.plan_imatrix(mistral4_split, "agentic", ctx=CTX, chunks=CHUNKS + 1).key != base.key
    assert I.plan_imatrix(mistral4_split, "agentic", ctx=2 * CTX, chunks=CHUNKS).key != base.key
    assert I.plan_imatrix(mistral4_split, "reasoning", ctx=CTX, chunks=CHUNKS).key != base.key
    every = I.plan_imatrix(mistral4_split, "agentic", ctx=CTX)
    assert every.chunks == every.available_chunks == every.tokens // CTX and "--chunks" not in every.argv
    assert sorted(p.relative_to(cache) for p in cache.rglob("*")) == listing   # planning wrote nothing
    tool = str(llama.find_tool("llama-imatrix").path)
    assert base.argv == [tool, "-m", str(mistral4_split), "-f", str(base.corpus_file), "-o", str(base.tmp_path),
                         "-c", str(CTX), "--chunks", str(CHUNKS), "-ngl", "0", "-t", "2", "--no-repack"]
    assert base.cache_path == cache / "imatrix" / f"{base.key}.gguf"
    assert base.tmp_path == cache / "imatrix" / f".{base.key}.partial-{os.getpid()}.gguf"
    # Another process (a Ray worker) runs the same plan with its own threads and scratch names: the
    # command line is built again from those values, never edited.
    worker = base.for_process(threads=7, pid=4242)
    assert (worker.key, worker.cache_path, base.threads) == (base.key, base.cache_path, 2)
    assert worker.argv == [tool, "-m", str(mistral4_split), "-f", str(base.corpus_file), "-o",
                           str(cache / "imatrix" / f".{base.key}.partial-4242.gguf"), "-c", str(CTX), "--chunks",
                           str(CHUNKS), "-ngl", "0", "-t", "7", "--no-repack"]
    q8 = I.plan_imatrix(mistral4_split, "agentic", ctx=CTX, chunks=CHUNKS, threads=2, from_q8=True)
    moved = q8.for_process(threads=5, pid=4242)
    assert moved.q8_argv == [str(llama.find_tool("llama-quantize").path), str(mistral4_split),
                             str(q8.q8_path.with_name(f".{q8.q8_path.name}.partial-4242")), "Q8_0", "5"]
    assert moved.argv[moved.argv.index("-m") + 1] == str(q8.q8_path)


@pytest.fixture(scope="module")
def mistral4_with_template(mistral4_split, tmp_path_factory) -> Path:
    """The synthetic model plus a real chat template (Mistral Small 3.2's), copied with gguf-py's tool."""
    from gguf.scripts.gguf_new_metadata import MetadataDetails, copy_with_new_metadata

    dest = tmp_path_factory.mktemp("templated") / "mistral4-templated.gguf"
    reader = gguf.GGUFReader(mistral4_split)
    writer = gguf.GGUFWriter(dest, arch=reader.get_field("general.architecture").contents(),
                             endianess=reader.endianess)
    template = MISTRAL_TEMPLATE.read_text()
    copy_with_new_metadata(reader, writer, {gguf.Keys.Tokenizer.CHAT_TEMPLATE: MetadataDetails(
        gguf.GGUFValueType.STRING, template)}, [])
    return dest


@pytest.mark.requires_tools("llama-imatrix")
def test_templated_corpus_runs_with_special_tokens(cache, mistral4_with_template):
    plan = I.plan_imatrix(mistral4_with_template, "agentic", ctx=CTX, chunks=2, threads=THREADS)
    assert plan.parse_special and "--parse-special" in plan.argv
    assert plan.corpus.template_fallbacks == 0
    text = plan.corpus.text
    assert text.count("[TOOL_CALLS]") > 0 and "[TOOL_RESULTS]" in text and "[/INST]" in text
    assert text.startswith("<s>[SYSTEM_PROMPT]") or "\n\n<s>[SYSTEM_PROMPT]" in text
    info = read_imatrix(I.run_imatrix(plan))
    assert info.chunk_count == 2
    assert json.loads(plan.corpus_file.with_name(plan.corpus_file.name + ".manifest.json").read_text())[
        "chat_format"] == f"model:{mistral4_with_template}"


@pytest.mark.requires_tools("llama-imatrix")
def test_report_counts_equal_what_the_file_holds(agentic_run, mistral4_split):
    out, _ = agentic_run
    res = CliRunner().invoke(main, ["imatrix-report", str(out), "--model", str(mistral4_split), "--json"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)

    # read the file independently
    reader = gguf.GGUFReader(out)
    counts = {t.name[:-len(".counts")]: [int(x) for x in np.asarray(t.data).ravel()]
              for t in reader.tensors if t.name.endswith(".counts")}
    assert report["chunks"] == int(reader.get_field("imatrix.chunk_count").contents())
    assert report["chunk_size"] == int(reader.get_field("imatrix.chunk_size").contents())
    assert report["datasets"] == reader.get_field("imatrix.datasets").contents()
    assert report["entries"] == len(counts)
    assert {n: v["counts"] for n, v in report["tensors"].items()} == counts
    for key, group in report["experts"].items():
        for name in group["tensors"]:
            assert group["counts"] == counts[name]
            assert group["never_routed"] == [i for i, c in enumerate(counts[name]) if c == 0]
    assert sorted(n for g in report["experts"].values() for n in g["tensors"]) == routed_expert_tensors(mistral4_split)

    model = read_model(mistral4_split)
    expected = [t.name for t in model.tensors
                if len(t.shape) >= 2 and t.name not in ("token_embd.weight", "output.weight")
                and "ffn_gate_inp" not in t.name]
    assert report["model"]["expected"] == len(expected) == 144
    assert report["model"]["covered"] == sum(1 for n in expected if n in counts and any(counts[n]))
    assert report["model"]["mismatches"] == []
    assert report["model"]["not_expected"] == [f"blk.{i}.ffn_gate_inp.weight" for i in range(12)]

    text = CliRunner().invoke(main, ["imatrix-report", str(out), "--model", str(mistral4_split)]).output
    assert f"chunks: {CHUNKS} x {CTX} tokens" in text
    assert f"{report['model']['covered']} of 144 expected tensors have data" in text


@pytest.mark.requires_tools("llama-imatrix")
def test_imatrix_from_another_model_is_refused_naming_mismatches(qwen_imatrix, mistral4_split):
    info = read_imatrix(qwen_imatrix)
    with pytest.raises(ImatrixError) as err:
        check_imatrix_fits(info, read_model(mistral4_split))
    msg = err.value.message
    assert "does not fit Synthetic-Mistral4-Split" in msg
    assert "blk.0.attn_k.weight: not a tensor of this model" in msg
    assert err.value.where == str(qwen_imatrix)
    res = CliRunner().invoke(main, ["imatrix-report", str(qwen_imatrix), "--model", str(mistral4_split)])
    assert res.exit_code == ImatrixError.exit_code
    assert "DOES NOT FIT the model" in res.output and "do not fit the model" in res.output


def _rewrite_imatrix(src: Path, dest: Path, drop: callable, zero: callable = lambda name: False) -> None:
    """Test-made fault: copy an imatrix, leaving out entries (or zeroing their counts)."""
    reader = gguf.GGUFReader(src)
    writer = gguf.GGUFWriter(dest, arch="imatrix")
    writer.add_string("general.type", "imatrix")
    writer.add_array("imatrix.datasets", reader.get_field("imatrix.datasets").contents())
    writer.add_uint32("imatrix.chunk_count", int(reader.get_field("imatrix.chunk_count").contents()))
    writer.add_uint32("imatrix.chunk_size", int(reader.get_field("imatrix.chunk_size").contents()))
    for t in reader.tensors:
        base = t.name.rsplit(".", 1)[0]
        if drop(base):
            continue
        data = np.array(t.data, dtype=np.float32)
        if zero(base) and t.name.endswith(".counts"):
            data[:] = 0
        writer.add_tensor(t.name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.requires_tools("llama-imatrix")
def test_uncovered_low_bit_plan_is_caught_before_quantizing(agentic_run, mistral4_split, tmp_path):
    from apex_orch.plan.planner import make_plan
    from apex_orch.plan.profiles import load_profile

    out, _ = agentic_run
    holed = tmp_path / "holed.imatrix.gguf"
    _rewrite_imatrix(out, holed, drop=lambda n: "ffn_down_exps" in n, zero=lambda n: n == "blk.5.ffn_up_exps.weight")
    info = read_imatrix(holed)
    plan = make_plan(read_model(mistral4_split), load_profile("nano"), has_imatrix=True)
    needing = [t.name for t in plan.tensors if t.requires_imatrix]
    assert needing, "the nano profile plans IQ2 routed experts"
    lacking = check_plan_coverage(info, plan)
    assert lacking == [n for n in needing if "ffn_down_exps" in n or n == "blk.5.ffn_up_exps.weight"]
    assert any("ffn_down_exps" in n for n in lacking)
    assert check_plan_coverage(read_imatrix(out), plan) == []

    res = CliRunner().invoke(main, ["imatrix-report", str(holed), "--model", str(mistral4_split), "--profile", "nano"])
    assert res.exit_code == ImatrixError.exit_code
    assert f"{len(lacking)} planned low-bit tensors lack imatrix data (first: {lacking[0]})" in res.output
    ok = CliRunner().invoke(main, ["imatrix-report", str(out), "--model", str(mistral4_split), "--profile", "nano"])
    assert ok.exit_code == 0 and f"nano: all {len(needing)} planned IQ1/IQ2/IQ3_XXS tensors have data" in ok.output


@pytest.mark.requires_tools("llama-imatrix")
def test_missing_and_corrupt_files_name_the_path(agentic_run, mistral4_split, tmp_path):
    out, _ = agentic_run
    with pytest.raises(ImatrixError, match="imatrix file not found"):
        read_imatrix(tmp_path / "nope.gguf")
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(out.read_bytes()[:5000])
    with pytest.raises(ImatrixError) as err:
        read_imatrix(truncated)
    assert err.value.where == str(truncated) and "corrupt" in err.value.message
    text = tmp_path / "legacy.dat"
    text.write_bytes(b"\x05\x00\x00\x00legacy")
    with pytest.raises(ImatrixError, match="legacy .dat"):
        read_imatrix(text)
    with pytest.raises(ImatrixError, match="no imatrix metadata"):
        read_imatrix(mistral4_split)
    res = CliRunner().invoke(main, ["imatrix-report", str(truncated)])
    assert res.exit_code == ImatrixError.exit_code and str(truncated) in res.output


def test_too_little_text_fails_before_running(cache, mistral4_split, tmp_path):
    (tmp_path / "few.jsonl").write_text(json.dumps({"text": "Only a few words here."}) + "\n")
    (tmp_path / "tiny.yaml").write_text("description: tiny\nsources:\n  - path: few.jsonl\n")
    with pytest.raises(ImatrixError) as err:
        I.plan_imatrix(mistral4_split, str(tmp_path / "tiny.yaml"), ctx=512)
    assert "needs at least 1024 (2 x context 512)" in err.value.message
    assert not (cache / "imatrix").exists() or not list((cache / "imatrix").glob("*partial*"))


def _fake_tool(folder: Path, body: str) -> Path:
    """FAKE llama-imatrix (fault injection): writes a partial output, then misbehaves."""
    folder.mkdir(parents=True, exist_ok=True)
    script = folder / "llama-imatrix"
    script.write_text("#!/bin/sh\n"
                      'while [ $# -gt 0 ]; do if [ "$1" = "-o" ]; then out="$2"; fi; shift; done\n'
                      'printf "GGUF partial" > "$out"\n' + body)
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return folder


@pytest.mark.parametrize("body, error", [
    ('echo "compute_imatrix: failed to eval"; exit 1\n', ToolFailedError),
    ("exec sleep 30\n", ToolTimeoutError),
])
def test_failed_or_stopped_run_leaves_no_partial_output(cache, mistral4_split, tmp_path, body, error):
    fake_bin = _fake_tool(tmp_path / "bin", body)
    plan = I.plan_imatrix(mistral4_split, "agentic", ctx=CTX, chunks=3, threads=1, bin_dir=fake_bin)
    with pytest.raises(error):
        I.run_imatrix(plan, timeout=2 if error is ToolTimeoutError else None)
    assert not plan.tmp_path.exists() and not plan.cache_path.exists()
    assert not plan.cache_path.with_suffix(".lock").exists()
    assert plan.log_path.exists()


@pytest.mark.slow
@pytest.mark.requires_tools("llama-imatrix", "llama-quantize")
def test_from_q8_computes_on_a_cached_q8_copy(cache, mistral4_split):
    plan = I.plan_imatrix(mistral4_split, "agentic", ctx=CTX, chunks=2, threads=THREADS, from_q8=True)
    assert plan.q8_path is not None and plan.argv[plan.argv.index("-m") + 1] == str(plan.q8_path)
    assert plan.key != I.plan_imatrix(mistral4_split, "agentic", ctx=CTX, chunks=2).key
    lines: list[str] = []
    path = I.run_imatrix(plan, on_progress=lines.append)
    types = {t.ggml_type for t in read_model(plan.q8_path).tensors if t.name.endswith("_exps.weight")}
    assert types == {gguf.GGMLQuantizationType.Q8_0}
    assert any("making a Q8_0 copy" in line for line in lines)
    info = read_imatrix(path)
    check_imatrix_fits(info, read_model(mistral4_split))
    assert all(info.entries[n].has_data for n in routed_expert_tensors(mistral4_split))
    assert not list(plan.q8_path.parent.glob(".*partial"))


def test_dry_run_prints_the_plan_and_runs_nothing(cache, mistral4_split):
    res = CliRunner().invoke(main, ["imatrix", str(mistral4_split), "--corpus", "reasoning", "--imatrix-ctx", str(CTX),
                                    "--imatrix-chunks", "2", "-t", "1", "--dry-run"])
    assert res.exit_code == 0, res.output
    plan = I.plan_imatrix(mistral4_split, "reasoning", ctx=CTX, chunks=2, threads=1)
    assert "command:  " + " ".join(plan.argv) in res.output
    assert not plan.cache_path.exists() and not plan.corpus_file.exists()
