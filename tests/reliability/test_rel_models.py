"""Bad model files are refused from the header alone, before any tool runs.

Each case runs `apex-orch quantize` with a FAKE llama-quantize tripwire in place (it must
never start). Split models are made with the real `llama-gguf-split --split-max-tensors N`.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest

from apex_orch.llama.tools import find_tool, run_tool
from relkit import assert_failed_cleanly, cli


def quantize_refused(model: Path, tmp_path: Path, tripwire: Path, code: int, *needles: str) -> None:
    out = tmp_path / "out"
    r = cli("quantize", "-p", "compact", model, "--out-dir", out, "--no-eval")
    assert_failed_cleanly(r.output, code, r.exit_code, *needles)
    assert not out.exists(), "the output folder must not even be created"
    assert not tripwire.exists(), "llama-quantize must not start"


def test_not_a_gguf(tmp_path, tripwire):
    model = tmp_path / "model.gguf"
    model.write_text("<!DOCTYPE html><html>404 Not Found</html>\n" * 20)   # a saved error page
    quantize_refused(model, tmp_path, tripwire, 4, f"{model}: not a GGUF file (magic b'<!DO'",
                     "pass a .gguf model file")


def test_truncated_header(mistral4_split, tmp_path, tripwire):
    model = tmp_path / "model.gguf"
    model.write_bytes(mistral4_split.read_bytes()[:5000])
    quantize_refused(model, tmp_path, tripwire, 4, f"{model}: GGUF header is truncated",
                     "the file has 5000", "fetch it again")


def test_torn_download_data_shorter_than_tensors(mistral4_split, tmp_path, tripwire):
    model = tmp_path / "model.gguf"
    with open(mistral4_split, "rb") as src, open(model, "wb") as dst:
        dst.write(src.read(mistral4_split.stat().st_size // 2))
    quantize_refused(model, tmp_path, tripwire, 4, f"{model}: file is shorter than its tensors",
                     f"it has {model.stat().st_size:,} bytes but its header describes "
                     f"{mistral4_split.stat().st_size:,}", "fetch or copy the file again")


def test_dense_model_is_refused(dense_model, tmp_path, tripwire):
    quantize_refused(dense_model, tmp_path, tripwire, 4, "is a dense model: it has no routed expert tensors",
                     "APEX is for Mixture-of-Experts models")


def test_architecture_with_no_known_tensor(tmp_path, tripwire):
    model = tmp_path / "alien.gguf"
    w = gguf.GGUFWriter(str(model), "alien")
    w.add_block_count(2)
    for i in range(2):
        w.add_tensor(f"blk.{i}.mixer_in.weight", np.zeros((64, 64), dtype=np.float16))
        w.add_tensor(f"blk.{i}.mixer_out.weight", np.zeros((64, 64), dtype=np.float16))
    w.add_tensor("token_embd.weight", np.zeros((64, 64), dtype=np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    quantize_refused(model, tmp_path, tripwire, 4, "architecture 'alien' has no tensor apex-orch recognises",
                     "is this a model GGUF")


def test_imatrix_given_as_model(tmp_path, tripwire):
    model = tmp_path / "imatrix.gguf"
    w = gguf.GGUFWriter(str(model), arch="")
    w.add_type("imatrix")
    w.add_uint32("imatrix.chunk_count", 1)
    w.add_tensor("blk.0.ffn_down_exps.weight.in_sum2", np.ones((4, 256), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    quantize_refused(model, tmp_path, tripwire, 4, "GGUF has no general.architecture key",
                     "not an imatrix, LoRA or vocab-only file")


def test_model_path_missing(tmp_path, tripwire):
    quantize_refused(tmp_path / "nope.gguf", tmp_path, tripwire, 4, f"{tmp_path / 'nope.gguf'}: file not found")


# ---------------------------------------------------------------------------- split models

@pytest.fixture(scope="module")
def splits(tmp_path_factory, mistral4_split, qwen3moe) -> dict[str, Path]:
    """Real llama-gguf-split outputs: mistral4 in 3 shards two ways (80 / 100 tensors per shard),
    qwen3moe in 3 shards."""
    root = tmp_path_factory.mktemp("splits")
    tool = find_tool("llama-gguf-split").path
    made = {}
    for key, model, n, stem in (("m4-80", mistral4_split, 80, "m4"), ("m4-100", mistral4_split, 100, "m4"),
                                ("q3-50", qwen3moe, 50, "m4")):   # qwen3 parts named like m4's on purpose
        folder = root / key
        folder.mkdir()
        run_tool([tool, "--split", "--split-max-tensors", str(n), model, folder / stem],
                 log_path=root / f"{key}.log")
        assert len(list(folder.glob("*-of-00003.gguf"))) == 3
        made[key] = folder
    return made


def _assemble(tmp_path: Path, parts: list[Path]) -> Path:
    folder = tmp_path / "model"
    folder.mkdir()
    for p in parts:
        shutil.copyfile(p, folder / p.name)
    return folder


def test_split_model_with_a_missing_shard(splits, tmp_path, tripwire):
    src = splits["m4-80"]
    folder = _assemble(tmp_path, [src / "m4-00001-of-00003.gguf", src / "m4-00003-of-00003.gguf"])
    quantize_refused(folder / "m4-00001-of-00003.gguf", tmp_path, tripwire, 4,
                     "split model is missing 1 of 3 shard(s): m4-00002-of-00003.gguf",
                     "download every shard into the same folder")


def test_split_model_with_a_shard_from_another_split_of_it(splits, tmp_path, tripwire):
    a, b = splits["m4-80"], splits["m4-100"]
    folder = _assemble(tmp_path, [a / "m4-00001-of-00003.gguf", b / "m4-00002-of-00003.gguf",
                                  a / "m4-00003-of-00003.gguf"])
    quantize_refused(folder / "m4-00001-of-00003.gguf", tmp_path, tripwire, 4,
                     "shards hold 227 tensors but split.tensors.count is 207", "from another split")


def test_split_model_with_a_shard_of_another_model(splits, tmp_path, tripwire):
    a, q = splits["m4-80"], splits["q3-50"]
    folder = _assemble(tmp_path, [a / "m4-00001-of-00003.gguf", q / "m4-00002-of-00003.gguf",
                                  a / "m4-00003-of-00003.gguf"])
    quantize_refused(folder / "m4-00003-of-00003.gguf", tmp_path, tripwire, 4,
                     f"{folder / 'm4-00002-of-00003.gguf'}: shard disagrees on split.tensors.count (147 vs 207)",
                     "the shards come from different splits")


def test_split_model_with_a_torn_shard(splits, tmp_path, tripwire):
    a = splits["m4-80"]
    folder = _assemble(tmp_path, [a / "m4-00001-of-00003.gguf", a / "m4-00002-of-00003.gguf"])
    last = a / "m4-00003-of-00003.gguf"
    (folder / last.name).write_bytes(last.read_bytes()[: last.stat().st_size - 4096])
    quantize_refused(folder / "m4-00001-of-00003.gguf", tmp_path, tripwire, 4,
                     f"{folder / last.name}: file is shorter than its tensors")
