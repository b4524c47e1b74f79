"""Bad importance matrices are refused before llama-quantize starts (it would abort halfway,
or silently use flat weights).

Cases use the `mini` profile on the 12-block synthetic mistral4 (IQ2_S routed experts in
the middle blocks 4-7). imatrix files are written here with gguf.GGUFWriter in the exact
layout the pinned llama-imatrix writes (`<tensor>.in_sum2` [ne0, n_mat], `<tensor>.counts`
[1, n_mat], imatrix.* metadata), so each fault is precise. A FAKE llama-quantize tripwire
proves nothing started.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import gguf
import numpy as np

from apex_orch.calibration.imatrix_file import expected_tensors
from apex_orch.model.info import read_model
from relkit import assert_failed_cleanly, cli

IQ2_BLOCKS = ("blk.4.", "blk.5.", "blk.6.", "blk.7.")   # mini's middle band on 12 blocks


def write_imatrix(path: Path, model: Path, counts: Callable[[str, int], list[int]] = lambda n, k: [64] * k,
                  drop: Callable[[str], bool] = lambda n: False) -> Path:
    w = gguf.GGUFWriter(str(path), arch="")
    w.add_type("imatrix")
    w.add_array("imatrix.datasets", ["reliability-suite"])
    w.add_uint32("imatrix.chunk_count", 4)
    w.add_uint32("imatrix.chunk_size", 128)
    for t in expected_tensors(read_model(model)):
        if drop(t.name):
            continue
        ne0, n_mat = t.shape[0], 1
        if len(t.shape) > 2:
            if "_exps" in t.name:
                n_mat = t.shape[2]
            else:   # MLA attn_k_b / attn_v_b: one collapsed row, as llama-imatrix writes it
                ne0 = t.shape[0] * t.shape[2]
        c = np.array(counts(t.name, n_mat), dtype=np.float32).reshape(n_mat, 1)
        w.add_tensor(t.name + ".in_sum2", np.ones((n_mat, ne0), dtype=np.float32) * c)
        w.add_tensor(t.name + ".counts", c)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def refused(model: Path, imatrix: Path, tmp_path: Path, tripwire: Path, *needles: str) -> None:
    out = tmp_path / "out"
    r = cli("quantize", "-p", "mini", model, "--imatrix", imatrix, "--out-dir", out, "--no-eval")
    assert_failed_cleanly(r.output, 6, r.exit_code, *needles)
    assert not out.exists() and not tripwire.exists()


def test_imatrix_file_missing(mistral4_split, tmp_path, tripwire):
    refused(mistral4_split, tmp_path / "none.gguf", tmp_path, tripwire,
            f"{tmp_path / 'none.gguf'}: imatrix file not found", "name a corpus to build one from [--imatrix, "
                                                                 "--corpus]")


def test_imatrix_corrupt(mistral4_split, tmp_path, tripwire):
    bad = tmp_path / "bad.imatrix.gguf"
    bad.write_bytes(b"GGUF" + os.urandom(4096))
    refused(mistral4_split, bad, tmp_path, tripwire, f"{bad}: corrupt imatrix file", "compute it again")


def test_imatrix_torn(mistral4_split, tmp_path, tripwire):
    good = write_imatrix(tmp_path / "good.gguf", mistral4_split)
    torn = tmp_path / "torn.imatrix.gguf"
    torn.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    refused(mistral4_split, torn, tmp_path, tripwire, f"{torn}: corrupt imatrix", "compute it again")


def test_imatrix_legacy_or_not_gguf(mistral4_split, tmp_path, tripwire):
    legacy = tmp_path / "imatrix.dat"
    legacy.write_bytes(os.urandom(2048))
    refused(mistral4_split, legacy, tmp_path, tripwire, "not a GGUF imatrix (legacy .dat", "llama-imatrix --in-file")


def test_imatrix_from_another_model(mistral4_split, qwen3moe, tmp_path, tripwire):
    other = write_imatrix(tmp_path / "qwen.imatrix.gguf", qwen3moe)
    refused(mistral4_split, other, tmp_path, tripwire, f"{other}: the imatrix does not fit Synthetic-Mistral4-Split",
            "blk.0.attn_k.weight: not a tensor of this model", "compute an imatrix for this model")


def test_imatrix_lacking_entries_for_planned_iq2_tensors(mistral4_split, tmp_path, tripwire):
    im = write_imatrix(tmp_path / "dropped.gguf", mistral4_split, drop=lambda n: "ffn_down_exps" in n)
    refused(mistral4_split, im, tmp_path, tripwire, "the imatrix has no data for 4 planned low-bit tensor(s): "
            "blk.4.ffn_down_exps.weight, blk.5.ffn_down_exps.weight, blk.6.ffn_down_exps.weight, "
            "blk.7.ffn_down_exps.weight", "routes tokens to every expert")


def test_imatrix_with_zero_counts_for_a_planned_iq2_tensor(mistral4_split, tmp_path, tripwire):
    im = write_imatrix(tmp_path / "zero.gguf", mistral4_split,
                       counts=lambda n, k: [0] * k if n == "blk.5.ffn_up_exps.weight" else [64] * k)
    refused(mistral4_split, im, tmp_path, tripwire,
            "the imatrix has no data for 1 planned low-bit tensor(s): blk.5.ffn_up_exps.weight")


def test_imatrix_missing_some_experts_is_a_loud_warning(mistral4_split, tmp_path):
    """Experts that saw no token get flat weights from llama-quantize: allowed (small corpora
    leave some experts cold) but never silent. A complete imatrix gives no such warning."""
    good = write_imatrix(tmp_path / "good.gguf", mistral4_split)
    r = cli("quantize", "-p", "mini", mistral4_split, "--imatrix", good, "--out-dir", tmp_path / "out", "--dry-run")
    assert r.exit_code == 0, r.output
    assert "warning" not in r.output
    cold = write_imatrix(tmp_path / "cold.gguf", mistral4_split,
                         counts=lambda n, k: [0 if (e == 3 and "_exps" in n) else 64 for e in range(k)])
    r = cli("quantize", "-p", "mini", mistral4_split, "--imatrix", cold, "--out-dir", tmp_path / "out", "--dry-run")
    assert r.exit_code == 0, r.output
    assert ("warning: Mini: the imatrix saw no tokens for some experts of 12 planned low-bit tensor(s) "
            "(blk.4.ffn_down_exps.weight: experts 3 of 16;") in r.output
    assert "flat importance weights" in r.output
    assert not (tmp_path / "out").exists()
