"""apex_orch.demo.synthetic: layouts, types, metadata, determinism, the sparse replica, and that
every preset really loads and runs in the pinned llama.cpp."""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path

import gguf
import numpy as np
import pytest

from apex_orch.demo import synthetic
from apex_orch.demo.spec import PRESETS, SyntheticSpec
from apex_orch.core.errors import OutputExistsError
from apex_orch.llama.tools import find_tool, run_tool

F16, F32, BF16 = (gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.F32,
                  gguf.GGMLQuantizationType.BF16)

FIXTURE_OF = {
    "mistral4-split": "mistral4_split",
    "mistral4-fused": "mistral4_fused",
    "mistral4-dense-lead": "mistral4_dense_lead",
    "qwen3moe": "qwen3moe",
    "dense": "dense_model",
}
TENSOR_COUNT = {"mistral4-split": 207, "mistral4-fused": 195, "mistral4-dense-lead": 203,
                "qwen3moe": 147, "dense": 111}

MLA_ATTN = ["attn_norm", "attn_q_a_norm", "attn_kv_a_norm", "ffn_norm", "attn_q_a", "attn_q_b",
            "attn_kv_a_mqa", "attn_k_b", "attn_v_b", "attn_output"]
SHARED = ["ffn_gate_shexp", "ffn_up_shexp", "ffn_down_shexp"]
BLOCK = {
    "mistral4-split": MLA_ATTN + ["ffn_gate_inp", "ffn_gate_exps", "ffn_up_exps", "ffn_down_exps"] + SHARED,
    "mistral4-fused": MLA_ATTN + ["ffn_gate_inp", "ffn_gate_up_exps", "ffn_down_exps"] + SHARED,
    "qwen3moe": ["attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "attn_q_norm", "attn_k_norm",
                 "ffn_norm", "ffn_gate_inp", "ffn_gate_exps", "ffn_up_exps", "ffn_down_exps"],
    "dense": ["attn_norm", "attn_q", "attn_k", "attn_v", "attn_output",
              "ffn_norm", "ffn_gate", "ffn_up", "ffn_down"],
}
DENSE_LEAD_BLOCK0 = MLA_ATTN + ["ffn_gate", "ffn_up", "ffn_down"]

_readers: dict[Path, gguf.GGUFReader] = {}
_headers: dict[Path, tuple[dict, dict]] = {}


def reader(path: Path) -> gguf.GGUFReader:
    """GGUFReader parses 32000-token arrays slowly (~2 s): used where the reference reader
    matters (metadata, tokenizer, and the cross-check of the fast header reader)."""
    if path not in _readers:
        _readers[path] = gguf.GGUFReader(path)
    return _readers[path]


def header(path: Path) -> tuple[dict[str, object], dict[str, synthetic.HeaderTensor]]:
    """(kv, tensors by name in file order) from the fast header reader (checked against
    GGUFReader in test_fast_header_reader_agrees_with_gguf_reader)."""
    if path not in _headers:
        kv_list, tensors = synthetic._read_gguf_header(path)
        def text(v):
            return v.decode() if isinstance(v, bytes) else v
        kv = {k: ([text(x) for x in v] if isinstance(v, list) else text(v)) for k, v, _, _ in kv_list}
        _headers[path] = (kv, {t.name: t for t in tensors})
    return _headers[path]


def tensors(path: Path) -> dict[str, synthetic.HeaderTensor]:
    return header(path)[1]


def ne_of(path: Path) -> dict[str, list[int]]:
    return {n: list(t.ne) for n, t in tensors(path).items()}


def data_of(path: Path, name: str) -> np.ndarray:
    t = tensors(path)[name]
    dtype = {int(F16): np.float16, int(F32): np.float32}[t.ggml_type]
    return np.memmap(path, dtype=dtype, mode="r", offset=t.offset, shape=tuple(reversed(t.ne)))


def kv(path: Path) -> dict[str, object]:
    return {k: f.contents() for k, f in reader(path).fields.items() if not k.startswith("GGUF.")}


def expected_names(preset: str, n_layer: int = 12) -> list[str]:
    names = ["token_embd.weight"]
    for i in range(n_layer):
        block = DENSE_LEAD_BLOCK0 if preset == "mistral4-dense-lead" and i == 0 else \
            BLOCK["mistral4-split" if preset == "mistral4-dense-lead" else preset]
        names += [f"blk.{i}.{t}.weight" for t in block]
    return names + ["output_norm.weight", "output.weight"]


def preset_path(request: pytest.FixtureRequest, preset: str) -> Path:
    return request.getfixturevalue(FIXTURE_OF[preset])


# ----------------------------------------------------------------------------- layout

def test_fast_header_reader_agrees_with_gguf_reader(mistral4_split):
    r = reader(mistral4_split)
    fast_kv, fast_tensors = header(mistral4_split)
    assert fast_kv == kv(mistral4_split)
    for key, _, vtype, sub in synthetic._read_gguf_header(mistral4_split)[0]:
        assert [int(x) for x in r.fields[key].types] == [vtype] + ([sub] if sub is not None else []), key
    assert [(t.name, [int(x) for x in t.shape], int(t.tensor_type), int(t.data_offset)) for t in r.tensors] == \
        [(t.name, list(t.ne), t.ggml_type, t.offset) for t in fast_tensors.values()]


@pytest.mark.parametrize("preset", list(FIXTURE_OF))
def test_preset_tensor_names_in_file_order(request, preset):
    names = list(tensors(preset_path(request, preset)))
    assert names == expected_names(preset)
    assert len(names) == TENSOR_COUNT[preset]
    assert synthetic.tensor_names(PRESETS[preset]) == names


@pytest.mark.parametrize("preset", list(FIXTURE_OF))
def test_preset_types_f16_weights_f32_norms_and_router(request, preset):
    for name, t in tensors(preset_path(request, preset)).items():
        is_f32 = name.endswith("norm.weight") or name.endswith("ffn_gate_inp.weight")
        assert t.ggml_type == (F32 if is_f32 else F16), name
        three_d = "_exps" in name or "attn_k_b" in name or "attn_v_b" in name
        assert len(t.ne) == (1 if name.endswith("norm.weight") else 3 if three_d else 2), name


def test_mistral4_shapes_match_the_deepseek2_loader(mistral4_split, mistral4_fused):
    spec = PRESETS["mistral4-split"]
    ne = ne_of(mistral4_split)
    E, H, V = spec.n_embd, spec.n_head, 32000
    assert ne["token_embd.weight"] == [E, V]
    assert ne["output.weight"] == [E, V]
    assert ne["output_norm.weight"] == [E]
    b = "blk.5."
    assert ne[b + "attn_q_a_norm.weight"] == [128]
    assert ne[b + "attn_kv_a_norm.weight"] == [128]
    assert ne[b + "attn_q_a.weight"] == [E, 128]
    assert ne[b + "attn_q_b.weight"] == [128, H * (32 + 32)]
    assert ne[b + "attn_kv_a_mqa.weight"] == [E, 128 + 32]
    assert ne[b + "attn_k_b.weight"] == [spec.qk_nope, spec.kv_lora_rank, H] == [32, 128, 4]
    assert ne[b + "attn_v_b.weight"] == [spec.kv_lora_rank, spec.v_head, H] == [128, 64, 4]
    assert ne[b + "attn_output.weight"] == [H * 64, E]
    assert ne[b + "ffn_gate_inp.weight"] == [E, 16]
    assert ne[b + "ffn_gate_exps.weight"] == ne[b + "ffn_up_exps.weight"] == [E, 256, 16]
    assert ne[b + "ffn_down_exps.weight"] == [256, E, 16]
    assert ne[b + "ffn_gate_shexp.weight"] == ne[b + "ffn_up_shexp.weight"] == [E, 256]
    assert ne[b + "ffn_down_shexp.weight"] == [256, E]
    assert ne_of(mistral4_fused)[b + "ffn_gate_up_exps.weight"] == [E, 2 * 256, 16]
    # numpy-order shapes from the API are the reverse of ggml ne
    shapes = synthetic.tensor_shapes(spec)
    assert list(shapes) == list(ne)
    assert all(list(shapes[n])[::-1] == ne[n] for n in ne)


def test_fused_and_split_differ_only_in_gate_up(mistral4_split, mistral4_fused):
    split, fused = set(tensors(mistral4_split)), set(tensors(mistral4_fused))
    assert split - fused == {f"blk.{i}.ffn_{p}_exps.weight" for i in range(12) for p in ("gate", "up")}
    assert fused - split == {f"blk.{i}.ffn_gate_up_exps.weight" for i in range(12)}


def test_dense_lead_block_zero_is_dense(mistral4_dense_lead):
    ne = ne_of(mistral4_dense_lead)
    assert {"blk.0.ffn_gate.weight", "blk.0.ffn_up.weight", "blk.0.ffn_down.weight"} <= set(ne)
    assert not any(n.startswith("blk.0.") and ("exps" in n or "shexp" in n or "gate_inp" in n) for n in ne)
    assert "blk.1.ffn_down_exps.weight" in ne and "blk.1.ffn_gate.weight" not in ne
    assert ne["blk.0.ffn_gate.weight"] == [256, 512]
    assert ne["blk.0.ffn_down.weight"] == [512, 256]
    assert header(mistral4_dense_lead)[0]["mistral4.leading_dense_block_count"] == 1


def test_qwen3moe_and_dense_shapes(qwen3moe, dense_model):
    ne = ne_of(qwen3moe)
    assert ne["blk.0.attn_q.weight"] == [256, 4 * 64]
    assert ne["blk.0.attn_k.weight"] == ne["blk.0.attn_v.weight"] == [256, 2 * 64]
    assert ne["blk.0.attn_q_norm.weight"] == ne["blk.0.attn_k_norm.weight"] == [64]
    assert ne["blk.0.ffn_gate_exps.weight"] == [256, 256, 16]
    dne = ne_of(dense_model)
    assert dne["blk.11.ffn_up.weight"] == [256, 512]
    assert not any("exps" in n or "gate_inp" in n for n in dne)


# ----------------------------------------------------------------------------- metadata

def test_mistral4_metadata(mistral4_split):
    meta = kv(mistral4_split)
    expected = {
        "general.architecture": "mistral4", "general.name": "Synthetic-Mistral4-Split",
        "general.file_type": 1, "general.quantization_version": 2,
        "mistral4.context_length": 4096, "mistral4.embedding_length": 256, "mistral4.block_count": 12,
        "mistral4.feed_forward_length": 512, "mistral4.attention.head_count": 4,
        "mistral4.attention.head_count_kv": 1, "mistral4.expert_count": 16,
        "mistral4.expert_used_count": 2, "mistral4.expert_gating_func": 1,
        "mistral4.leading_dense_block_count": 0, "mistral4.vocab_size": 32000,
        "mistral4.attention.q_lora_rank": 128, "mistral4.attention.kv_lora_rank": 128,
        "mistral4.attention.key_length": 160, "mistral4.attention.value_length": 128,
        "mistral4.attention.key_length_mla": 64, "mistral4.attention.value_length_mla": 64,
        "mistral4.expert_feed_forward_length": 256, "mistral4.expert_shared_count": 1,
        "mistral4.expert_weights_scale": 1.0, "mistral4.expert_weights_norm": True,
        "mistral4.rope.dimension_count": 32, "mistral4.rope.freq_base": 10000.0,
    }
    for key, value in expected.items():
        assert meta[key] == value, key
    assert meta["mistral4.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-6)
    fields = reader(mistral4_split).fields
    assert fields["mistral4.block_count"].types == [gguf.GGUFValueType.UINT32]
    assert fields["mistral4.expert_weights_norm"].types == [gguf.GGUFValueType.BOOL]
    assert fields["mistral4.rope.freq_base"].types == [gguf.GGUFValueType.FLOAT32]
    assert not any(k.startswith("mistral4.rope.scaling") for k in meta)


def test_gqa_metadata(qwen3moe, dense_model):
    q = header(qwen3moe)[0]
    for key, value in {"general.architecture": "qwen3moe", "qwen3moe.block_count": 12,
                       "qwen3moe.attention.head_count": 4, "qwen3moe.attention.head_count_kv": 2,
                       "qwen3moe.attention.key_length": 64, "qwen3moe.attention.value_length": 64,
                       "qwen3moe.expert_count": 16, "qwen3moe.expert_used_count": 2,
                       "qwen3moe.expert_feed_forward_length": 256, "qwen3moe.rope.dimension_count": 64,
                       "qwen3moe.vocab_size": 32000}.items():
        assert q[key] == value, key
    d = header(dense_model)[0]
    assert d["general.architecture"] == "llama"
    assert d["llama.rope.dimension_count"] == 64 and d["llama.feed_forward_length"] == 512
    assert d["llama.attention.head_count_kv"] == 2
    assert not any("expert" in k for k in d)


def test_tokenizer_copied_with_value_types(mistral4_split):
    def tokenizer(path):
        kv_list, _ = synthetic._read_gguf_header(path)
        return [item for item in kv_list if item[0].startswith("tokenizer.")]

    copied, source = tokenizer(mistral4_split), tokenizer(synthetic.vocab_gguf_path())
    assert copied == source  # keys, order, value types, array sub-types and raw values
    assert [(k, t, sub) for k, _, t, sub in copied] == [
        ("tokenizer.ggml.model", 8, None), ("tokenizer.ggml.pre", 8, None),
        ("tokenizer.ggml.tokens", 9, 8), ("tokenizer.ggml.scores", 9, 6),
        ("tokenizer.ggml.token_type", 9, 5), ("tokenizer.ggml.bos_token_id", 4, None),
        ("tokenizer.ggml.eos_token_id", 4, None), ("tokenizer.ggml.unknown_token_id", 4, None),
        ("tokenizer.ggml.add_bos_token", 7, None), ("tokenizer.ggml.add_eos_token", 7, None)]
    fields = reader(mistral4_split).fields
    assert len(fields["tokenizer.ggml.tokens"].data) == 32000
    assert fields["tokenizer.ggml.tokens"].contents()[:4] == ["<unk>", "<s>", "</s>", "<0x00>"]
    assert fields["tokenizer.ggml.token_type"].types == [gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.INT32]
    assert fields["tokenizer.ggml.model"].contents() == "llama"


# ----------------------------------------------------------------------------- data and determinism

def test_same_spec_is_byte_identical_and_seed_changes_data(mistral4_split, tmp_path):
    again = synthetic.write_preset("mistral4-split", tmp_path / "again.gguf")
    assert again.read_bytes() == mistral4_split.read_bytes()
    small = SyntheticSpec(n_layer=2, n_expert=4)
    a = synthetic.write_model(tmp_path / "a.gguf", small)
    b = synthetic.write_model(tmp_path / "b.gguf", dataclasses.replace(small, seed=1))
    assert a.stat().st_size == b.stat().st_size and a.read_bytes() != b.read_bytes()


def test_weight_statistics_are_usable(mistral4_split):
    assert np.all(data_of(mistral4_split, "blk.3.attn_norm.weight") == 1.0)
    router = np.asarray(data_of(mistral4_split, "blk.3.ffn_gate_inp.weight"), dtype=np.float64)
    assert router.shape == (16, 256) and 0.12 < router.std() < 0.13        # 2 / sqrt(n_embd)
    exps = np.asarray(data_of(mistral4_split, "blk.3.ffn_gate_exps.weight"), dtype=np.float64)
    assert exps.shape == (16, 256, 256)
    assert np.isfinite(exps).all() and 0.062 < exps.std() < 0.063          # 1 / sqrt(fan_in)
    assert abs(exps.mean()) < 0.001
    down = np.asarray(data_of(mistral4_split, "blk.3.ffn_down_exps.weight"), dtype=np.float64)
    assert 0.0310 < down.std() < 0.0315                                    # 0.5 / sqrt(fan_in)
    # different experts and different layers hold different data
    assert not np.array_equal(exps[0], exps[1])
    assert not np.array_equal(exps, data_of(mistral4_split, "blk.4.ffn_gate_exps.weight"))


def test_supplied_weights_are_written_and_checked(tmp_path):
    spec = SyntheticSpec(n_layer=2, n_expert=4)
    shape = synthetic.tensor_shapes(spec)["blk.1.attn_k_b.weight"]
    assert shape == (4, 128, 32)
    arr = np.arange(np.prod(shape), dtype=np.float32).reshape(shape) / 1000.0
    path = synthetic.write_model(tmp_path / "w.gguf", spec, {"blk.1.attn_k_b.weight": arr})
    np.testing.assert_array_equal(data_of(path, "blk.1.attn_k_b.weight"), arr.astype(np.float16))
    with pytest.raises(ValueError, match="expected"):
        synthetic.write_model(tmp_path / "x.gguf", spec, {"blk.1.attn_k_b.weight": arr[:2]})
    with pytest.raises(ValueError, match="not in the mistral4 layout"):
        synthetic.write_model(tmp_path / "x.gguf", spec, {"blk.9.attn_k_b.weight": arr})


def test_failed_write_leaves_nothing_and_existing_output_is_kept(tmp_path):
    spec = SyntheticSpec(n_layer=2, n_expert=4)
    bad = np.full(synthetic.tensor_shapes(spec)["output.weight"], np.nan, dtype=np.float32)
    with pytest.raises(ValueError, match="non-finite"):
        synthetic.write_model(tmp_path / "m.gguf", spec, {"output.weight": bad})
    assert list(tmp_path.iterdir()) == []
    path = synthetic.write_model(tmp_path / "m.gguf", spec)
    with pytest.raises(OutputExistsError):
        synthetic.write_model(path, spec)
    assert synthetic.write_model(path, spec, overwrite=True) == path
    assert [p.name for p in tmp_path.iterdir()] == ["m.gguf"]


@pytest.mark.parametrize("change, message", [
    (dict(n_layer=26), "26 or 27"),
    (dict(n_layer=27), "26 or 27"),
    (dict(arch="qwen3moe", fused_gate_up=True), "fused_gate_up"),
    (dict(arch="qwen3moe", leading_dense=1), "leading_dense"),
    (dict(n_expert_used=17), "n_expert_used"),
    (dict(arch="gpt2"), "arch must be"),
    (dict(leading_dense=12), "leading_dense"),
])
def test_invalid_specs_are_refused(change, message):
    with pytest.raises(ValueError, match=message):
        synthetic.tensor_names(dataclasses.replace(SyntheticSpec(), **change))


def test_demo_text_is_deterministic_and_long():
    text = synthetic.demo_text(20000)
    assert text == synthetic.demo_text(20000)
    assert 20000 <= len(text.split()) < 20100
    assert len(set(text.split())) > 300
    assert synthetic.demo_text(500, seed=1) != synthetic.demo_text(500, seed=0)


# ----------------------------------------------------------------------------- the replica

def test_replica_layout_types_and_metadata(ms4_replica):
    r = reader(ms4_replica)
    names = [t.name for t in r.tensors]
    assert len(names) == 615
    per_block = ["attn_norm", "attn_q_a_norm", "attn_kv_a_norm", "ffn_norm", "attn_q_a", "attn_q_b",
                 "attn_kv_a_mqa", "attn_k_b", "attn_v_b", "attn_output", "ffn_gate_inp",
                 "ffn_gate_exps", "ffn_up_exps", "ffn_down_exps"] + SHARED
    assert names == (["token_embd.weight"] + [f"blk.{i}.{t}.weight" for i in range(36) for t in per_block]
                     + ["output_norm.weight", "output.weight"])
    ne = {t.name: [int(x) for x in t.shape] for t in r.tensors}
    types = {t.name: t.tensor_type for t in r.tensors}
    assert ne["token_embd.weight"] == ne["output.weight"] == [4096, 131072]
    assert ne["blk.0.attn_k_b.weight"] == [64, 256, 32]
    assert ne["blk.0.attn_v_b.weight"] == [256, 128, 32]
    assert ne["blk.0.attn_q_b.weight"] == [1024, 32 * 128]
    assert ne["blk.0.attn_kv_a_mqa.weight"] == [4096, 256 + 64]
    assert ne["blk.35.ffn_down_exps.weight"] == [2048, 4096, 128]
    assert ne["blk.35.ffn_gate_inp.weight"] == [4096, 128]
    for name, t in types.items():
        f32 = name.endswith("norm.weight") or name.endswith("ffn_gate_inp.weight")
        assert t == (F32 if f32 else BF16), name
    meta = kv(ms4_replica)
    for key, value in {"general.name": "Mistral-Small-4-119B-2603", "general.file_type": 32,
                       "mistral4.block_count": 36, "mistral4.context_length": 1048576,
                       "mistral4.embedding_length": 4096, "mistral4.expert_count": 128,
                       "mistral4.expert_used_count": 4, "mistral4.expert_shared_count": 1,
                       "mistral4.expert_feed_forward_length": 2048, "mistral4.feed_forward_length": 12288,
                       "mistral4.attention.head_count": 32, "mistral4.attention.q_lora_rank": 1024,
                       "mistral4.attention.kv_lora_rank": 256, "mistral4.attention.key_length_mla": 128,
                       "mistral4.attention.value_length_mla": 128, "mistral4.rope.dimension_count": 64,
                       "mistral4.vocab_size": 131072, "mistral4.rope.scaling.type": "yarn",
                       "mistral4.rope.scaling.factor": 128.0,
                       "mistral4.rope.scaling.original_context_length": 8192}.items():
        assert meta[key] == value, key
    n_params = sum(int(np.prod(t.shape)) for t in r.tensors)
    assert 118.5e9 < n_params < 119.5e9


def test_replica_is_sparse(ms4_replica):
    st = ms4_replica.stat()
    r = reader(ms4_replica)
    last = r.tensors[-1]
    assert st.st_size >= last.data_offset + last.n_bytes
    assert st.st_size > 237 * 10**9                # apparent size of the real BF16 weights
    assert st.st_blocks * 512 < 4 * 2**20          # allocated: the header only


def test_replica_fused_layout(tmp_path):
    path = synthetic.write_mistral_small_4_replica(tmp_path / "fused.gguf", layout="fused")
    names = [t.name for t in gguf.GGUFReader(path).tensors]
    assert len(names) == 579
    assert "blk.17.ffn_gate_up_exps.weight" in names and "blk.17.ffn_gate_exps.weight" not in names
    with pytest.raises(ValueError, match="layout"):
        synthetic.write_mistral_small_4_replica(tmp_path / "x.gguf", layout="both")


@pytest.mark.requires_tools("llama-quantize")
def test_replica_dry_run_q4_k_m(ms4_replica, tmp_path):
    lines: list[str] = []
    run_tool([find_tool("llama-quantize").path, "--dry-run", ms4_replica, tmp_path / "out.gguf", "Q4_K_M", "2"],
             log_path=tmp_path / "quantize.log", on_line=lines.append, timeout=120)
    text = "\n".join(lines)
    assert "quant size  = 68808.38 MiB (4.85 BPW)" in text
    assert "WARNING: 36 of 615 tensor(s) required fallback quantization" in text
    assert len(re.findall(r"blk\.\d+\.attn_k_b\.weight .*falling back to\s+q5_0", text)) == 36
    assert not (tmp_path / "out.gguf").exists()


# ----------------------------------------------------------------------------- llama.cpp runs

# --no-repack: on CPUs with AMX, llama.cpp puts F16/Q8_0/Q4_0 attn_k_b into the AMX buffer, whose
# matmul cannot take the permuted q_nope of the MLA graph -> GGML_ASSERT(*cur_backend_id != -1).
NO_REPACK = "--no-repack"


def _perplexity(model: Path, text: Path, log: Path) -> float:
    lines: list[str] = []
    run_tool([find_tool("llama-perplexity").path, "-m", model, "-f", text, "-c", "128", "--chunks", "2",
              "-t", "2", NO_REPACK], log_path=log, on_line=lines.append, timeout=300)
    found = [m.group(1) for line in lines if (m := re.search(r"Final estimate: PPL = (\S+)", line))]
    assert len(found) == 1, f"no single 'Final estimate' line in {log}:\n" + "\n".join(lines[-40:])
    return float(found[0])


@pytest.mark.requires_tools("llama-perplexity")
@pytest.mark.parametrize("preset", list(FIXTURE_OF))
def test_preset_runs_in_llama_perplexity(request, preset, eval_text, tmp_path):
    ppl = _perplexity(preset_path(request, preset), eval_text, tmp_path / "ppl.log")
    assert math.isfinite(ppl)
    # random weights: far from a trained model, yet context-dependent (uniform would be 32000 * e^(s^2/2))
    assert 1000.0 < ppl < 5e6


@pytest.mark.requires_tools("llama-imatrix")
@pytest.mark.parametrize("fixture, n_exps_tensors", [("mistral4_fused", 12 * 2), ("qwen3moe", 12 * 3)])
def test_every_expert_gets_tokens(request, fixture, n_exps_tensors, eval_text, tmp_path):
    out = tmp_path / "imatrix.gguf"
    run_tool([find_tool("llama-imatrix").path, "-m", request.getfixturevalue(fixture), "-f", eval_text,
              "-o", out, "-c", "128", "--chunks", "2", "-t", "2", NO_REPACK],
             log_path=tmp_path / "imatrix.log", timeout=300)
    counts = {t.name: np.asarray(t.data).ravel() for t in gguf.GGUFReader(out).tensors
              if t.name.endswith("_exps.weight.counts")}
    assert len(counts) == n_exps_tensors
    for name, c in counts.items():
        assert c.shape == (16,) and c.min() > 0, name
