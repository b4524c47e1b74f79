"""The plan's predictions equal `llama-quantize --dry-run` on the same rendered arguments.

For every profile x every synthetic MoE model x the header-only Mistral-Small-4 replica:
identical final type for every tensor, identical total (to the MiB the tool prints), and
the same fallback count. Real binary, real files.
"""

from __future__ import annotations

import pytest

from apex_orch.llama.tools import find_tool, run_tool
from apex_orch.model.info import read_model
from apex_orch.plan.planner import make_plan
from apex_orch.plan.render import render_file
from apex_orch.plan.profile_search import list_profiles
from apex_orch.plan.profiles import load_profile
from apex_orch.llama.quantlog import fallback_count, parse_records, quant_size_mib

PROFILES = list_profiles()
MODELS = ["mistral4_split", "mistral4_fused", "mistral4_dense_lead", "qwen3moe", "ms4_replica"]


def dry_run(model_path, plan, tmp_path):
    rules = tmp_path / "rules.txt"
    rules.write_text(render_file(plan))
    args = [find_tool("llama-quantize").path, "--dry-run", "--tensor-type-file", rules]
    if plan.has_imatrix:
        pass  # the dry run never needs imatrix data; the plan's has_imatrix only changes mixtures we avoid
    args += [model_path, tmp_path / "never-written.gguf", plan.ftype, "1"]
    result = run_tool(args, log_path=tmp_path / "dry.log")
    text = (tmp_path / "dry.log").read_text()
    assert not (tmp_path / "never-written.gguf").exists()
    return result, text


def test_profiles_exist():
    expected = {"quality", "balanced", "compact", "mini", "nano", "micro"}
    assert expected | {f"i-{p}" for p in expected} <= set(PROFILES)


@pytest.mark.requires_tools("llama-quantize")
@pytest.mark.parametrize("model_fixture", MODELS)
@pytest.mark.parametrize("profile_name", PROFILES)
def test_plan_equals_dry_run(request, tmp_path, model_fixture, profile_name):
    model_path = request.getfixturevalue(model_fixture)
    info = read_model(model_path)
    plan = make_plan(info, load_profile(profile_name), has_imatrix=False)
    _, log = dry_run(model_path, plan, tmp_path)
    records = {r.name: r for r in parse_records(log)}
    assert len(records) == len(info.tensors)
    mismatches = [(t.name, t.final_type.name.lower(), records[t.name].final_type.lower())
                  for t in plan.tensors if t.final_type.name.lower() != records[t.name].final_type.lower()]
    assert mismatches == []
    tool_mib = quant_size_mib(log)
    assert tool_mib == pytest.approx(plan.total_bytes / 2**20, abs=0.006)  # tool prints 2 decimals
    assert fallback_count(log) == len(plan.fallbacks)
    # every override rule was applied by the tool ("applying manual override" or already that type)
    for t in plan.tensors:
        if t.requested is not None:
            assert t.final_type == t.requested or t.fell_back, t.name


@pytest.mark.requires_tools("llama-quantize")
def test_replica_q4_k_m_baseline_matches_known_figure(ms4_replica, tmp_path):
    """Plain Q4_K_M (no overrides) on the replica: the brief's 68,808 MiB and 36/615 fallbacks."""
    from apex_orch.plan.llama_rules import parse_ftype, predict_types
    from apex_orch.plan.planner import hparams
    from apex_orch.model.gguf_header import tensor_nbytes
    info = read_model(ms4_replica)
    decisions = predict_types([(t.name, t.shape, t.ggml_type) for t in info.tensors], hparams(info),
                              parse_ftype("Q4_K_M"), [])
    total = sum(tensor_nbytes(d.final, info.by_name[d.name].shape) for d in decisions)
    run_tool([find_tool("llama-quantize").path, "--dry-run", ms4_replica, tmp_path / "x.gguf", "Q4_K_M", "1"],
             log_path=tmp_path / "q4.log")
    log = (tmp_path / "q4.log").read_text()
    records = {r.name: r.final_type.lower() for r in parse_records(log)}
    assert {d.name: d.final.name.lower() for d in decisions} == records
    assert round(total / 2**20) == 68808
    assert quant_size_mib(log) == pytest.approx(total / 2**20, abs=0.006)
    assert fallback_count(log) == 36 == sum(d.fell_back for d in decisions)


def test_fused_and_split_layouts_get_same_types_and_sizes(mistral4_split, mistral4_fused):
    for name in PROFILES:
        prof = load_profile(name)
        split = make_plan(read_model(mistral4_split), prof).role_summary()
        fused = make_plan(read_model(mistral4_fused), prof).role_summary()
        for role in ("routed_expert", "shared_expert", "attention", "embedding", "output"):
            assert split[role]["bytes"] == fused[role]["bytes"], (name, role)
            assert split[role]["params"] == fused[role]["params"]
        # gate+up of the split layout = gate_up of the fused one, type for type
        split_types = split["routed_expert"]["types"]
        fused_types = fused["routed_expert"]["types"]
        assert {t: n * 2 // 3 for t, n in split_types.items()} == fused_types or \
            sum(split_types.values()) * 2 == sum(fused_types.values()) * 3


def test_replica_tier_sizes_are_stable(ms4_replica):
    """The flagship sizes quoted in the README come from these plans (bytes of tensor data)."""
    info = read_model(ms4_replica)
    sizes = {p: make_plan(info, load_profile(p)).total_bytes for p in
             ("i-balanced", "i-quality", "quality", "balanced", "i-compact", "compact", "i-mini")}
    assert sizes["quality"] == sizes["i-quality"]
    assert sizes["balanced"] == sizes["i-balanced"]
    assert sizes["compact"] == sizes["i-compact"]
    assert sizes["i-mini"] < sizes["compact"] < sizes["quality"] < sizes["balanced"]
    assert round(sizes["compact"] / 2**20) == 53634


MIXTURE_FTYPES = ["Q2_K", "Q2_K_S", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M",
                  "Q6_K", "Q8_0", "IQ4_XS", "IQ4_NL", "IQ3_M", "IQ3_XS", "IQ3_XXS", "IQ2_M", "IQ2_XS",
                  "IQ1_M", "Q4_0", "MXFP4_MOE"]


@pytest.mark.requires_tools("llama-quantize")
@pytest.mark.parametrize("ftype", MIXTURE_FTYPES)
@pytest.mark.parametrize("model_fixture", ["qwen3moe", "mistral4_dense_lead"])
def test_ftype_mixture_port_equals_tool(request, tmp_path, model_fixture, ftype):
    """A profile that only types the routed experts leaves every other tensor to the FTYPE's own
    mixture: the port of llama_tensor_get_type must agree with the tool for every FTYPE."""
    model_path = request.getfixturevalue(model_fixture)
    prof = tmp_path / "experts-only.yaml"
    prof.write_text(f"tier: Test\nbase_ftype: {ftype}\ntypes:\n  routed_expert: Q4_K\n")
    info = read_model(model_path)
    plan = make_plan(info, load_profile(str(prof)), has_imatrix=False)
    assert any("base FTYPE mixture" in w or "mixture" in w for w in plan.warnings)
    _, log = dry_run(model_path, plan, tmp_path)
    records = {r.name: r.final_type.lower() for r in parse_records(log)}
    assert {t.name: t.final_type.name.lower() for t in plan.tensors} == records
    assert quant_size_mib(log) == pytest.approx(plan.total_bytes / 2**20, abs=0.006)
