"""Three findings of the converter matrix, on small GGUF headers shaped like the pinned converter's output.

(a) quantizability is decided as llama.cpp decides it: `ggml_n_dims` ignores trailing
    dimensions of 1, so Qwen2-MoE's shared-expert gate `ffn_gate_inp_shexp.weight`
    (ggml shape [n_embd, 1]) is 1-D for llama-quantize and stays F32;
(b) every tensor kind the converter writes for an MoE model has a role chosen on purpose
    (roles.ROLE_DECISIONS), none is `unassigned`;
(c) leading dense blocks, experts per block and NextN layers come from the tensors and are
    checked against the keys.
The real converter's output for the same architectures is tested in tests/archs/.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from apex_orch.model.info import read_model
from apex_orch.plan.planner import make_plan
from apex_orch.plan.profiles import load_profile
from apex_orch.plan.llama_rules import allows_quantization, ggml_n_dims
from apex_orch.model.roles import ROLE_DECISIONS, Role, classify, classify_name


def write_gguf(path, arch: str, kv: dict, tensors: dict[str, tuple[int, ...]]):
    """A GGUF with the given (ggml-order) shapes: F32 for 1-D and router-like tensors, F16 otherwise."""
    import gguf
    w = gguf.GGUFWriter(path, arch)
    w.add_name(f"tiny-{arch}")
    for key, value in kv.items():
        if isinstance(value, int):
            w.add_uint32(f"{arch}.{key}", value)
        else:
            w.add_float32(f"{arch}.{key}", value)
    for name, ne in tensors.items():
        np_shape = tuple(reversed(ne))
        f32 = len(ne) == 1 or "norm" in name or "gate_inp" in name
        w.add_tensor(name, np.zeros(np_shape, dtype=np.float32 if f32 else np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def qwen2moe_tensors(n_blocks=2, E=64, n_exp=4, ff=32, vocab=128) -> dict[str, tuple[int, ...]]:
    t = {"token_embd.weight": (E, vocab), "output_norm.weight": (E,), "output.weight": (E, vocab)}
    for b in range(n_blocks):
        p = f"blk.{b}."
        t.update({p + "attn_norm.weight": (E,), p + "attn_q.weight": (E, E), p + "attn_q.bias": (E,),
                  p + "attn_k.weight": (E, E), p + "attn_k.bias": (E,), p + "attn_v.weight": (E, E),
                  p + "attn_v.bias": (E,), p + "attn_output.weight": (E, E), p + "ffn_norm.weight": (E,),
                  p + "ffn_gate_inp.weight": (E, n_exp), p + "ffn_gate_exps.weight": (E, ff, n_exp),
                  p + "ffn_up_exps.weight": (E, ff, n_exp), p + "ffn_down_exps.weight": (ff, E, n_exp),
                  p + "ffn_gate_inp_shexp.weight": (E, 1), p + "ffn_gate_shexp.weight": (E, ff),
                  p + "ffn_up_shexp.weight": (E, ff), p + "ffn_down_shexp.weight": (ff, E)})
    return t


QWEN2MOE_KV = {"block_count": 2, "embedding_length": 64, "expert_count": 4, "expert_used_count": 2,
               "attention.head_count": 4, "attention.head_count_kv": 4, "context_length": 256}


# ---------------------------------------------------------------- (a) quantizable as ggml counts dims

def test_ggml_n_dims_ignores_trailing_ones():
    assert ggml_n_dims((64, 1)) == 1
    assert ggml_n_dims((64, 1, 1)) == 1
    assert ggml_n_dims((64, 1, 4)) == 3
    assert ggml_n_dims((1, 64)) == 2
    assert not allows_quantization("blk.0.ffn_gate_inp_shexp.weight", (64, 1))
    assert allows_quantization("blk.0.ffn_gate_shexp.weight", (64, 32))


def test_glm5_next_name_exclusions_are_per_architecture():
    # llama.cpp keeps these unquantized only for glm5-next
    assert not allows_quantization("blk.0.attn_kv_a_mqa.weight", (64, 32), arch="glm5-next")
    assert allows_quantization("blk.0.attn_kv_a_mqa.weight", (64, 32), arch="deepseek2")


def test_qwen2moe_shared_expert_gate_is_planned_as_written(tmp_path):
    """The issue's `blk.0.ffn_gate_inp_shexp.weight: planned Q5_0, written F32`."""
    path = write_gguf(tmp_path / "q2.gguf", "qwen2moe", QWEN2MOE_KV, qwen2moe_tensors())
    info = read_model(path)
    for profile in ("compact", "quality"):
        plan = make_plan(info, load_profile(profile))
        gate = {t.name: t for t in plan.tensors}["blk.0.ffn_gate_inp_shexp.weight"]
        assert not gate.quantizable
        assert gate.final_type.name == "F32"
        assert gate.role == Role.ROUTER


@pytest.mark.requires_tools("llama-quantize")
def test_qwen2moe_plan_equals_dry_run(tmp_path):
    from apex_orch.llama.tools import find_tool, run_tool
    from apex_orch.plan.render import render_file
    from apex_orch.llama.quantlog import parse_records, quant_size_mib
    kv = dict(QWEN2MOE_KV, feed_forward_length=32, expert_feed_forward_length=32,
              expert_shared_feed_forward_length=32, **{"attention.layer_norm_rms_epsilon": 1e-6})
    path = write_gguf(tmp_path / "q2.gguf", "qwen2moe", kv, qwen2moe_tensors())
    plan = make_plan(read_model(path), load_profile("compact"))
    (tmp_path / "rules.txt").write_text(render_file(plan))
    run_tool([find_tool("llama-quantize").path, "--dry-run", "--tensor-type-file", tmp_path / "rules.txt",
              path, tmp_path / "never.gguf", plan.ftype, "1"], log_path=tmp_path / "dry.log")
    log = (tmp_path / "dry.log").read_text()
    tool = {r.name: r.final_type.lower() for r in parse_records(log)}
    assert {t.name: t.final_type.name.lower() for t in plan.tensors} == tool
    assert quant_size_mib(log) == pytest.approx(plan.total_bytes / 2**20, abs=0.006)


# ---------------------------------------------------------------- (b) a role for every tensor kind

# (name as the pinned converter writes it, expected role) — one per kind the issue lists
KINDS = [
    ("blk.3.ssm_a", Role.AUX), ("blk.3.ssm_d", Role.AUX), ("blk.3.ssm_dt.bias", Role.SSM),
    ("blk.3.ssm_in.weight", Role.SSM), ("blk.3.ssm_out.weight", Role.SSM),
    ("blk.3.ssm_conv1d.weight", Role.AUX), ("blk.3.ssm_conv1d.bias", Role.AUX),
    ("blk.3.ssm_alpha.weight", Role.SSM), ("blk.3.ssm_beta.weight", Role.SSM),
    ("blk.3.ssm_f_a.weight", Role.SSM), ("blk.3.ssm_g_b.weight", Role.SSM),
    ("blk.3.ssm_conv1d_q.weight", Role.AUX),
    ("blk.3.shortconv.in_proj.weight", Role.SSM), ("blk.3.shortconv.out_proj.weight", Role.SSM),
    ("blk.3.shortconv.conv.weight", Role.AUX),
    ("blk.3.indexer.attn_k.weight", Role.ATTENTION), ("blk.3.indexer.attn_q_b.weight", Role.ATTENTION),
    ("blk.3.indexer.proj.weight", Role.ATTENTION), ("blk.3.indexer.k_norm.weight", Role.NORM),
    ("blk.3.indexer.k_norm.bias", Role.NORM),
    ("rope_freqs.weight", Role.AUX), ("rope_factors_long.weight", Role.AUX),
    ("rope_factors_short.weight", Role.AUX), ("blk.3.rope_freqs.weight", Role.AUX),
    ("blk.3.exp_probs_b.bias", Role.ROUTER), ("blk.3.exp_probs_b", Role.ROUTER),
    ("blk.3.ffn_down_exps.scale", Role.AUX), ("blk.3.ffn_gate_up_exps.bias", Role.AUX),
    ("blk.3.layer_output_scale.weight", Role.AUX),
    ("blk.3.attn_sinks.weight", Role.ATTENTION), ("blk.3.attn_gate.weight", Role.ATTENTION),
    ("blk.3.ffn_gate_inp_shexp.weight", Role.ROUTER), ("blk.3.attn_q.bias", Role.ATTENTION),
    ("blk.3.nextn.eh_proj.weight", Role.NEXTN), ("blk.3.nextn.embed_tokens.weight", Role.NEXTN),
    ("blk.3.nextn.shared_head_head.weight", Role.NEXTN), ("blk.3.nextn.enorm.weight", Role.NORM),
    ("blk.3.nextn.hnorm.weight", Role.NORM), ("blk.3.nextn.shared_head_norm.weight", Role.NORM),
    ("blk.3.inp_gate.weight", Role.DENSE_FFN), ("blk.3.proj.weight", Role.DENSE_FFN),
    ("blk.3.ffn_gate_inp.scale", Role.ROUTER),
]


@pytest.mark.parametrize("name,role", KINDS)
def test_every_kind_has_a_role_on_purpose(name, role):
    assert classify_name(name).role == role, name


def test_never_quantized_roles_are_never_quantizable_as_llama_cpp_decides():
    """A kind put among the never-quantized tensors must really be kept by llama-quantize at the
    shapes the converter writes (the role is about what APEX types, llama.cpp has the last word)."""
    for name, role in KINDS:
        if role in (Role.NORM, Role.AUX) or name.endswith("_shexp.weight"):
            assert not allows_quantization(name, (64,)), name
            if not name.endswith(".weight") or "conv" in name:
                # not a .weight, or excluded by name: kept even as a matrix
                assert not allows_quantization(name, (4, 64)), name


def test_role_decisions_table_documents_every_rule():
    kinds = {d.kind for d in ROLE_DECISIONS}
    assert {"ssm state (no .weight)", "short-conv projection", "sparse-attention indexer", "rope factors",
            "expert-probability bias", "per-expert bias/scale", "per-layer output scale"} <= kinds
    for d in ROLE_DECISIONS:
        assert d.reason and d.role in Role


def test_inspect_shows_role_decisions(tmp_path):
    from apex_orch.model.describe import format_inspect, inspect_model
    t = qwen2moe_tensors()
    t["rope_freqs.weight"] = (8,)
    t["blk.0.exp_probs_b.bias"] = (4,)
    path = write_gguf(tmp_path / "q2.gguf", "qwen2moe", QWEN2MOE_KV, t)
    d = inspect_model(read_model(path))
    assert "unassigned" not in d["roles"]
    kinds = {k["kind"] for k in d["role_decisions"]}
    assert {"rope factors", "expert-probability bias"} <= kinds
    text = format_inspect(d)
    assert "rope factors" in text and "expert-probability bias" in text


# ---------------------------------------------------------------- (c) structure from the tensors

def glm_like_tensors(n_blocks=3, dense=(0,), E=64, n_exp=4, ff=32, vocab=128, nextn=0):
    t = {"token_embd.weight": (E, vocab), "output_norm.weight": (E,), "output.weight": (E, vocab)}
    for b in range(n_blocks):
        p = f"blk.{b}."
        t.update({p + "attn_norm.weight": (E,), p + "attn_q.weight": (E, E), p + "attn_k.weight": (E, E),
                  p + "attn_v.weight": (E, E), p + "attn_output.weight": (E, E), p + "ffn_norm.weight": (E,)})
        if b in dense:
            t.update({p + "ffn_gate.weight": (E, ff), p + "ffn_up.weight": (E, ff), p + "ffn_down.weight": (ff, E)})
        else:
            t.update({p + "ffn_gate_inp.weight": (E, n_exp), p + "ffn_gate_exps.weight": (E, ff, n_exp),
                      p + "ffn_up_exps.weight": (E, ff, n_exp), p + "ffn_down_exps.weight": (ff, E, n_exp),
                      p + "exp_probs_b.bias": (n_exp,)})
        if b >= n_blocks - nextn:
            t.update({p + "nextn.eh_proj.weight": (2 * E, E), p + "nextn.enorm.weight": (E,),
                      p + "nextn.hnorm.weight": (E,), p + "nextn.shared_head_norm.weight": (E,)})
    return t


GLM_KV = {"block_count": 3, "embedding_length": 64, "expert_count": 4, "expert_used_count": 2,
          "attention.head_count": 4, "attention.head_count_kv": 4}


def test_leading_dense_blocks_from_tensors_beat_a_zero_key(tmp_path):
    """GLM-4.7-Flash through the current transformers: leading_dense_block_count = 0 written,
    block 0 has a dense FFN and no experts."""
    path = write_gguf(tmp_path / "g.gguf", "deepseek2", dict(GLM_KV, leading_dense_block_count=0),
                      glm_like_tensors())
    info = read_model(path)
    assert info.leading_dense_blocks == 1
    assert any("leading_dense_block_count" in w for w in info.structure_warnings)
    plan = make_plan(info, load_profile("compact"))
    assert any("leading_dense_block_count" in w for w in plan.warnings)
    roles = classify(info)
    assert roles["blk.0.ffn_down.weight"].role == Role.DENSE_FFN


def test_structure_agrees_with_keys_gives_no_warning(tmp_path):
    path = write_gguf(tmp_path / "g.gguf", "deepseek2", dict(GLM_KV, leading_dense_block_count=1),
                      glm_like_tensors())
    info = read_model(path)
    assert info.leading_dense_blocks == 1
    assert info.structure_warnings == []
    assert info.structure["experts_per_block"] == {1: 4, 2: 4}


def test_nextn_layers_from_tensors(tmp_path):
    kv = dict(GLM_KV, leading_dense_block_count=1, nextn_predict_layers=1)
    path = write_gguf(tmp_path / "g.gguf", "glm4moe", kv, glm_like_tensors(nextn=1))
    info = read_model(path)
    assert info.nextn_layers == 1 and info.structure_warnings == []
    # the key missing: the tensors say block 2 is a NextN layer
    kv.pop("nextn_predict_layers")
    path = write_gguf(tmp_path / "g2.gguf", "glm4moe", kv, glm_like_tensors(nextn=1))
    info = read_model(path)
    assert info.nextn_layers == 1
    assert any("nextn_predict_layers" in w for w in info.structure_warnings)
    assert classify(info)["blk.2.nextn.eh_proj.weight"].role == Role.NEXTN


def test_dense_block_in_the_middle_is_an_error_of_the_keys(tmp_path):
    """A key saying 2 leading dense blocks when block 1 has experts: the tensors win, loudly."""
    path = write_gguf(tmp_path / "g.gguf", "deepseek2", dict(GLM_KV, leading_dense_block_count=2),
                      glm_like_tensors())
    info = read_model(path)
    assert info.leading_dense_blocks == 1
    assert any("leading_dense_block_count is 2" in w for w in info.structure_warnings)


@pytest.mark.requires_tools("llama-quantize")
def test_predicted_size_counts_dims_as_gguf_writes_them(tmp_path):
    """llama-quantize writes ggml_n_dims() dimensions per tensor: four [64, 1] shared-expert gates
    make its header 32 bytes (one alignment unit) shorter than a count of the input's dims. The
    real quantization's size must equal the plan's prediction (it was 32 bytes off before)."""
    from apex_orch.quantize import job as q, run as qrun
    kv = {**QWEN2MOE_KV, "block_count": 4, "attention.layer_norm_rms_epsilon": 1e-6,
          "expert_feed_forward_length": 32, "expert_shared_feed_forward_length": 32}
    path = write_gguf(tmp_path / "qwen2moe.gguf", "qwen2moe", kv, qwen2moe_tensors(n_blocks=4))
    job = q.plan_quantize(path, "compact", out_dir=tmp_path / "out", threads=2)
    res = qrun.run_quantize(job)
    written = res.files[0].stat().st_size
    assert written == job.predicted_size
    header_dims = {t.name: len(t.shape) for t in read_model(res.files[0]).tensors}
    assert header_dims["blk.3.ffn_gate_inp_shexp.weight"] == 1


# ---- the release starts from a local checkpoint folder; the real run is tests/archs
def test_release_source_convert_from_a_local_checkpoint_folder(tmp_path):
    import yaml

    from apex_orch.release.config_reader import load_release
    from apex_orch.release.phases.convert import checkpoint_fingerprint
    from apex_orch.core.errors import ConfigError
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text("{}")
    doc = {"name": "Tiny", "license": "mit", "source": {"convert": {"path": "ckpt", "outtype": "f16"}},
           "tiers": ["compact"], "eval": {"enabled": False}, "mmproj": {"convert": {}},
           "publish": {"repo": "apex-test/Tiny-APEX-GGUF"}}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(doc))
    cfg = load_release(tmp_path / "r.yaml")
    assert cfg.source.kind == "convert" and cfg.source.hf is None
    assert cfg.source.checkpoint.resolve() == ckpt
    assert cfg.mmproj.kind == "convert" and cfg.mmproj.checkpoint == cfg.source.checkpoint
    assert "local checkpoint ckpt" in cfg.source.describe()
    before = checkpoint_fingerprint(ckpt)
    (ckpt / "config.json").write_text('{"changed": 1}')
    assert checkpoint_fingerprint(ckpt) != before
    doc["source"]["convert"]["repo"] = "org/name"
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(doc))
    with pytest.raises(ConfigError, match="either path"):
        load_release(tmp_path / "r.yaml")


# ---------------------------------------------------------------- MTP draft files (the converter's --mtp)

def mtp_draft_tensors(n_blocks=3, **kw) -> dict[str, tuple[int, ...]]:
    """What --mtp writes: the last block (the MTP head) and the shared embedding, norm and head."""
    last = f"blk.{n_blocks - 1}."
    return {n: s for n, s in glm_like_tensors(n_blocks, nextn=1, **kw).items()
            if n.startswith(last) or not n.startswith("blk.")}


def test_an_mtp_draft_file_is_read_and_planned(tmp_path):
    kv = dict(GLM_KV, leading_dense_block_count=1, nextn_predict_layers=1)
    info = read_model(write_gguf(tmp_path / "mtp.gguf", "glm4moe", kv, mtp_draft_tensors()))
    assert (info.is_mtp_draft, info.nextn_layers, info.leading_dense_blocks) == (True, 1, 1)
    assert info.structure_warnings == []
    roles = classify(info)
    assert {n: (r.role, r.slot, r.kind) for n, r in roles.items() if n.startswith("blk.2.")} == {
        "blk.2.attn_norm.weight": (Role.NORM, "norm", "norm"),
        "blk.2.attn_q.weight": (Role.NEXTN, "attention.q", "MTP block layer"),
        "blk.2.attn_k.weight": (Role.NEXTN, "attention.k", "MTP block layer"),
        "blk.2.attn_v.weight": (Role.NEXTN, "attention.v", "MTP block layer"),
        "blk.2.attn_output.weight": (Role.NEXTN, "attention.output", "MTP block layer"),
        "blk.2.ffn_norm.weight": (Role.NORM, "norm", "norm"),
        "blk.2.ffn_gate_inp.weight": (Role.ROUTER, "gate_inp", "router"),
        "blk.2.ffn_gate_exps.weight": (Role.NEXTN, "routed_expert.gate", "MTP block layer"),
        "blk.2.ffn_up_exps.weight": (Role.NEXTN, "routed_expert.up", "MTP block layer"),
        "blk.2.ffn_down_exps.weight": (Role.NEXTN, "routed_expert.down", "MTP block layer"),
        "blk.2.exp_probs_b.bias": (Role.ROUTER, "exp_probs_b", "expert-probability bias"),
        "blk.2.nextn.eh_proj.weight": (Role.NEXTN, "eh_proj", "MTP input projection"),
        "blk.2.nextn.enorm.weight": (Role.NORM, "enorm", "MTP norms"),
        "blk.2.nextn.hnorm.weight": (Role.NORM, "hnorm", "MTP norms"),
        "blk.2.nextn.shared_head_norm.weight": (Role.NORM, "shared_head_norm", "MTP norms"),
    }
    plan = make_plan(info, load_profile("compact"))
    types = {t.name: t.requested.name for t in plan.tensors if t.requested is not None}
    # the whole head at APEX-MTP's Q8_0 (types.nextn's default): its projection and its layer
    assert types["blk.2.nextn.eh_proj.weight"] == types["blk.2.attn_q.weight"] == "Q8_0"
    assert types["blk.2.ffn_down_exps.weight"] == "Q8_0"


def test_only_the_last_nextn_blocks_make_a_draft_file(tmp_path):
    """Blocks missing anywhere else is still a broken header, one message, nothing planned."""
    from apex_orch.core.errors import ModelError
    kv = dict(GLM_KV, leading_dense_block_count=1, nextn_predict_layers=1)
    t = mtp_draft_tensors()
    t.update({n: s for n, s in glm_like_tensors().items() if n.startswith("blk.0.")})   # block 0 too, not 1
    with pytest.raises(ModelError, match=r"glm4moe.block_count is 3 but 1 of those blocks have no tensors \(block 1\)"):
        read_model(write_gguf(tmp_path / "broken.gguf", "glm4moe", kv, t))
    kv.pop("nextn_predict_layers")      # without the key nothing says which block is the head
    with pytest.raises(ModelError, match="2 of those blocks have no tensors"):
        read_model(write_gguf(tmp_path / "nokey.gguf", "glm4moe", kv, mtp_draft_tensors()))


def test_inspect_names_a_draft_and_counts_trunk_blocks(tmp_path):
    from apex_orch.model.describe import format_inspect, inspect_model
    kv = dict(GLM_KV, leading_dense_block_count=1, nextn_predict_layers=1)
    full = inspect_model(read_model(write_gguf(tmp_path / "g.gguf", "glm4moe", kv, glm_like_tensors(nextn=1))))
    assert "blocks           2 (1 leading dense) + 1 MTP/nextn\n" in format_inspect(full)
    draft = inspect_model(read_model(write_gguf(tmp_path / "mtp.gguf", "glm4moe", kv, mtp_draft_tensors())))
    assert draft["mtp_draft"] is True
    assert ("blocks           2 (1 leading dense) + 1 MTP/nextn  (MTP draft file: only the MTP block(s), "
            "to load beside the full model)\n") in format_inspect(draft)
    assert {d["kind"] for d in draft["role_decisions"]} >= {"MTP block layer", "MTP input projection", "MTP norms"}


def test_speculate_refuses_a_draft_file_as_the_model(tmp_path):
    from click.testing import CliRunner
    from apex_orch.cli import main
    kv = dict(GLM_KV, leading_dense_block_count=1, nextn_predict_layers=1)
    draft = write_gguf(tmp_path / "mtp.gguf", "glm4moe", kv, mtp_draft_tensors())
    r = CliRunner().invoke(main, ["speculate", str(draft)])
    assert r.exit_code == 14, r.output
    assert "this is an MTP draft file (only the MTP head): it drafts for a full model" in r.output
    full = write_gguf(tmp_path / "full.gguf", "glm4moe", dict(kv, block_count=4), glm_like_tensors(4, nextn=1))
    r = CliRunner().invoke(main, ["speculate", str(full), "--draft", str(draft)])
    assert r.exit_code == 14, r.output
    assert ("the draft is the MTP head of another model: architecture, width, vocabulary and trunk blocks are "
            "glm4moe/64/128/2, the model's glm4moe/64/128/3") in r.output


# ---------------------------------------------------------------- the MTP head's type (types.nextn)

def mtp_model(tmp_path, ff=256):
    """A glm4moe GGUF whose last block is the MTP head; ff 256 keeps the experts' down projection at
    row length 256, so low-bit types are written as asked (64-wide rows fall back)."""
    kv = dict(GLM_KV, leading_dense_block_count=1, nextn_predict_layers=1)
    return write_gguf(tmp_path / "mtp-model.gguf", "glm4moe", kv, glm_like_tensors(nextn=1, ff=ff))


def head_plan(tmp_path, profile_text: str | None, **kw):
    info = read_model(mtp_model(tmp_path))
    if profile_text is None:
        return make_plan(info, load_profile("compact"), **kw)
    (tmp_path / "p.yaml").write_text(profile_text)
    return make_plan(info, load_profile(tmp_path / "p.yaml"), **kw)


def test_the_mtp_head_defaults_to_q8_0_on_every_tier(tmp_path):
    from apex_orch.core.schema import yaml_keys
    from apex_orch.plan.profiles import BANDED_ROLES, SINGLE_ROLES, TypesSpec
    assert yaml_keys(TypesSpec) == [*BANDED_ROLES, *SINGLE_ROLES, "nextn"] and TypesSpec().nextn == "Q8_0"
    for name in ("compact", "i-nano", "micro", "quality"):
        plan = head_plan(tmp_path, f"extends: {name}\n", has_imatrix=True)
        head = {t.name: (t.final_type.name, t.reason) for t in plan.tensors if t.role == Role.NEXTN}
        assert set(head) == {"blk.2.attn_q.weight", "blk.2.attn_k.weight", "blk.2.attn_v.weight",
                             "blk.2.attn_output.weight", "blk.2.ffn_gate_exps.weight", "blk.2.ffn_up_exps.weight",
                             "blk.2.ffn_down_exps.weight", "blk.2.nextn.eh_proj.weight"}, name
        assert set(head.values()) == {("Q8_0", "types.nextn (default Q8_0, the MTP head as APEX-MTP keeps it)")}
        assert not any(t.requires_imatrix for t in plan.tensors if t.role == Role.NEXTN)


def test_the_mtp_head_type_per_profile(tmp_path):
    from apex_orch.core.errors import ProfileError
    plan = head_plan(tmp_path, "extends: compact\ntypes: {nextn: q6_k}\n")
    head = {t.name: (t.requested.name, t.final_type.name, t.reason) for t in plan.tensors if t.role == Role.NEXTN}
    assert head["blk.2.ffn_down_exps.weight"] == ("Q6_K", "Q6_K", "types.nextn")
    assert head["blk.2.nextn.eh_proj.weight"] == ("Q6_K", "Q8_0", "types.nextn")   # 64-wide rows: the fallback
    plan = head_plan(tmp_path, "extends: compact\ntypes: {nextn: edge}\n")   # like an edge block of its role
    head = {t.name: (t.requested.name, t.reason) for t in plan.tensors if t.role == Role.NEXTN}
    assert head["blk.2.nextn.eh_proj.weight"] == ("Q4_K", "types.nextn: edge -> types.attention.edge")
    assert head["blk.2.ffn_down_exps.weight"] == ("Q4_K", "types.nextn: edge -> types.routed_expert.edge")
    (tmp_path / "bad.yaml").write_text("extends: compact\ntypes:\n  nextn: Q9\n")
    with pytest.raises(ProfileError) as err:
        load_profile(tmp_path / "bad.yaml")
    assert err.value.where == f"{tmp_path / 'bad.yaml'}:3"
    assert err.value.message == "types.nextn: 'Q9' is neither a ggml type nor 'edge'"


IQ_HEAD = "extends: i-compact\ntier: I-Compact-IQ-Head\ntypes: {nextn: IQ2_XXS}\n"


def test_an_mtp_head_needing_imatrix_data_is_refused_before_the_tool(tmp_path):
    """llama-imatrix never runs the MTP layers: with an imatrix covering every trunk tensor, the
    head's IQ2_XXS tensors are still refused (ImatrixError, exit 6), naming them."""
    from apex_orch.calibration.imatrix_file import ImatrixEntry, ImatrixInfo, expected_tensors
    from apex_orch.core.errors import ImatrixError
    from apex_orch.quantize.job import ImatrixSource, plan_quantize
    path = mtp_model(tmp_path)
    info = read_model(path)
    entries = {t.name: ImatrixEntry(t.name, t.shape[0], math.prod(t.shape[2:]), (1,) * math.prod(t.shape[2:]))
               for t in expected_tensors(info)}
    assert not any(n.startswith("blk.2.") for n in entries)      # the head is never expected in an imatrix
    im = ImatrixSource(tmp_path / "im.gguf", "0" * 64, "x", ImatrixInfo(tmp_path / "im.gguf", 1, 128, ("x",), entries))
    (tmp_path / "iq-head.yaml").write_text(IQ_HEAD)
    with pytest.raises(ImatrixError) as err:
        plan_quantize(path, load_profile(tmp_path / "iq-head.yaml"), out_dir=tmp_path / "out", imatrix=im)
    assert err.value.message == (
        "profile iq-head gives 1 tensor(s) of the MTP head IQ2_XXS (types.nextn), a type llama-quantize writes only "
        "with imatrix data, and no imatrix can have it (llama-imatrix evaluates the trunk only: the MTP/NextN layers "
        "run in a separate graph that only speculative decoding builds, so no imatrix holds data for them): "
        "blk.2.ffn_down_exps.weight")
    assert err.value.where == str(tmp_path / "iq-head.yaml")
    job = plan_quantize(path, "i-compact", out_dir=tmp_path / "out", imatrix=im)   # the default head: planned
    assert {t.final_type.name for t in job.plan.tensors if t.role == Role.NEXTN} == {"Q8_0"}


def test_quantize_refuses_the_head_before_building_an_imatrix(tmp_path, isolated_cache_root):
    from click.testing import CliRunner
    from apex_orch.cli import main
    (tmp_path / "iq-head.yaml").write_text(IQ_HEAD)
    r = CliRunner().invoke(main, ["quantize", str(mtp_model(tmp_path)), "-p", str(tmp_path / "iq-head.yaml"),
                                  "--corpus", "agentic", "--out-dir", str(tmp_path / "out")])
    assert r.exit_code == 6, r.output
    assert r.output.startswith(f"error: {tmp_path / 'iq-head.yaml'}: profile iq-head gives 1 tensor(s) of the MTP head")
    assert not (tmp_path / "out").exists() and not list(isolated_cache_root.glob("imatrix/*.gguf"))
