"""Profiles (strict loading, extends, bands), roles, inspect, render and import — exact values."""

from __future__ import annotations

import json
import re

import pytest
from click.testing import CliRunner
from gguf.constants import GGMLQuantizationType as T

from apex_orch.cli import main
from apex_orch.core.errors import DenseModelError, ProfileError, RenderError
from apex_orch.model.info import read_model
from apex_orch.plan.planner import make_plan
from apex_orch.plan.render import render_file
from apex_orch.plan.profiles import Bands, load_profile
from apex_orch.plan.profile_import import import_tensor_type_file
from apex_orch.model.roles import Role, classify_name


# ------------------------------------------------------------------ profiles

def test_published_recipes_are_reproduced():
    expect = {
        "quality": ((T.Q6_K, T.Q5_K, T.IQ4_XS), (T.Q8_0, T.Q8_0), (T.Q6_K, T.Q6_K), "Q6_K"),
        "balanced": ((T.Q6_K, T.Q5_K, T.Q5_K), (T.Q8_0, T.Q8_0), (T.Q6_K, T.Q6_K), "Q6_K"),
        "compact": ((T.Q4_K, T.Q3_K, T.Q3_K), (T.Q6_K, T.Q6_K), (T.Q4_K, T.Q4_K), "Q4_K_M"),
        "mini": ((T.Q3_K, T.Q3_K, T.IQ2_S), (T.Q5_K, T.Q4_K), (T.Q4_K, T.Q3_K), "Q3_K_M"),
        "nano": ((T.Q3_K, T.IQ2_S, T.IQ2_XXS), (T.Q5_K, T.Q4_K), (T.Q4_K, T.Q3_K), "Q3_K_M"),
        "micro": ((T.Q3_K, T.IQ2_XS, T.IQ1_M), (T.Q5_K, T.Q4_K), (T.Q4_K, T.Q3_K), "Q3_K_M"),
    }
    for name, (experts, shexp, attn, base) in expect.items():
        for variant in (name, f"i-{name}"):
            p = load_profile(variant)
            assert tuple(p.types["routed_expert"][b] for b in ("edge", "near", "middle")) == experts
            assert tuple(p.types["shared_expert"][b] for b in ("edge", "rest")) == shexp
            assert tuple(p.types["attention"][b] for b in ("edge", "rest")) == attn
            assert p.base_ftype == base
            assert (p.bands.edge, p.bands.near, p.bands.attention_edge) == (5, 5, 3)
        ip = load_profile(f"i-{name}")
        assert ip.imatrix_required and ip.corpus == "diverse" and ip.tier.startswith("I-")
    assert not load_profile("compact").imatrix_required
    assert load_profile("mini").imatrix_required          # IQ2_S needs imatrix data anyway


@pytest.mark.parametrize("n_blocks,expected", [(36, (5, 5, 3, 16)), (12, (2, 2, 1, 4)), (8, (1, 1, 1, 4)),
                                               (48, (5, 5, 3, 28)), (20, (3, 3, 2, 8))])
def test_bands_scale_to_the_model(n_blocks, expected):
    rb = Bands().resolve(n_blocks)
    assert (rb.edge, rb.near, rb.attention_edge, n_blocks - 2 * (rb.edge + rb.near)) == expected
    bands = [rb.expert_band(b) for b in range(n_blocks)]
    assert bands == bands[::-1]                             # symmetric
    assert bands[0] == "edge" and bands[n_blocks // 2] == "middle"


def test_bands_on_36_blocks_exactly():
    rb = Bands().resolve(36)
    assert [b for b in range(36) if rb.expert_band(b) == "edge"] == [0, 1, 2, 3, 4, 31, 32, 33, 34, 35]
    assert [b for b in range(36) if rb.expert_band(b) == "near"] == [5, 6, 7, 8, 9, 26, 27, 28, 29, 30]
    assert [b for b in range(36) if rb.edge_rest(b, attention=True) == "edge"] == [0, 1, 2, 33, 34, 35]


def write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return p


@pytest.mark.parametrize("text,line,fragment", [
    ("tier: X\nbase_ftype: Q4_K_M\ntypes:\n  routed_expert: Q4_K\nbogus: 1\n", 5, "unknown key 'bogus'"),
    ("tier: X\nbase_ftype: Q4_K_M\ntypes:\n  routed_expert: {edge: Q4_K, near: Q9_K, middle: Q3_K}\n", 4,
     "unknown ggml type 'Q9_K'"),
    ("tier: X\nbase_ftype: Q4_K_M\ntypes:\n  routed_expert: Q4_K\n  router: Q8_0\n", 5, "never quantizes router"),
    ("tier: X\nbase_ftype: Q4_K_M\ntypes:\n  routed_expert: Q4_K\n  norm: Q8_0\n", 5, "never quantizes norm"),
    ("tier: X\nbase_ftype: F16\ntypes:\n  routed_expert: Q4_K\n", 2, "ignores every --tensor-type"),
    ("tier: X\nbase_ftype: Q4_K_M\ntypes:\n  routed_expert: {edge: Q4_K}\n", 4, "missing band(s) near, middle"),
    ("tier: X\nbase_ftype: Q4_K_M\nbands: {edge: -1}\ntypes:\n  routed_expert: Q4_K\n", 3, "non-negative"),
    ("tier: X\nbase_ftype: Q4_K_M\ntypes:\n  routed_expert: Q4_K\n  attention: {edge: Q4_K, middle: Q4_K}\n", 5,
     "unknown key 'types.attention.middle'"),
    ("tier: X\nbase_ftype: Q4_K_M\ntypes: [\n", 4, "malformed YAML"),
])
def test_bad_profiles_name_file_line_and_key(tmp_path, text, line, fragment):
    p = write(tmp_path, "bad.yaml", text)
    with pytest.raises(ProfileError) as err:
        load_profile(str(p))
    msg = err.value.render()
    assert fragment in msg
    assert f"{p}:{line}" in msg


def test_extends_cycle_is_detected(tmp_path):
    write(tmp_path, "a.yaml", "extends: b.yaml\ntier: A\n")
    write(tmp_path, "b.yaml", "extends: a.yaml\ntier: B\n")
    with pytest.raises(ProfileError, match=r"`extends` cycle: a.yaml -> b.yaml -> a.yaml"):
        load_profile(str(tmp_path / "a.yaml"))


def test_extends_merges_and_child_wins(tmp_path):
    p = write(tmp_path, "mine.yaml", "extends: compact\ntier: Mine\ntypes:\n  output: Q8_0\n")
    prof = load_profile(str(p))
    assert prof.types["output"]["all"] == T.Q8_0
    assert prof.types["routed_expert"]["edge"] == T.Q4_K     # inherited
    assert prof.chain == ["mine", "compact", "_apex"]


@pytest.mark.parametrize("name", ["../compact", "a/b", "..", "Compact!"])
def test_profile_names_with_paths_are_refused(name):
    with pytest.raises(ProfileError, match="not a profile name"):
        load_profile(name)


def test_fixed_bands_too_wide_for_model(tmp_path, mistral4_split):
    p = write(tmp_path, "fixed.yaml", "extends: compact\ntier: F\nbands: {scale: fixed}\n")
    with pytest.raises(ProfileError, match="need 20 blocks but the model has 12"):
        make_plan(read_model(mistral4_split), load_profile(str(p)))


# ------------------------------------------------------------------ roles and inspect

@pytest.mark.parametrize("name,role,slot", [
    ("blk.3.ffn_gate_up_exps.weight", Role.ROUTED_EXPERT, "gate_up"),
    ("blk.3.ffn_down_exps.weight", Role.ROUTED_EXPERT, "down"),
    ("blk.3.ffn_up_shexp.weight", Role.SHARED_EXPERT, "up"),
    ("blk.0.ffn_down.weight", Role.DENSE_FFN, "down"),
    ("blk.3.attn_kv_a_mqa.weight", Role.ATTENTION, "kv_a_mqa"),
    ("blk.3.attn_k_b.weight", Role.ATTENTION, "k_b"),
    ("blk.3.attn_q.weight", Role.ATTENTION, "q"),
    ("blk.3.attn_q_a_norm.weight", Role.NORM, "norm"),
    ("blk.3.ffn_gate_inp.weight", Role.ROUTER, "gate_inp"),
    ("blk.3.exp_probs_b.bias", Role.ROUTER, "exp_probs_b"),
    ("blk.3.ssm_out.weight", Role.SSM, "out"),
    ("token_embd.weight", Role.EMBEDDING, "token_embd"),
    ("output.weight", Role.OUTPUT, "output"),
    ("blk.3.mystery_proj.weight", Role.UNASSIGNED, "mystery_proj"),
])
def test_roles_from_names(name, role, slot):
    tr = classify_name(name)
    assert (tr.role, tr.slot) == (role, slot)


def test_nextn_blocks_get_their_own_role():
    tr = classify_name("blk.61.ffn_down_exps.weight", frozenset({61}))
    assert tr.role == Role.NEXTN and tr.slot == "routed_expert.down"


def test_inspect_json_on_the_replica(ms4_replica):
    r = CliRunner().invoke(main, ["inspect", str(ms4_replica), "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)
    assert d["architecture"] == "mistral4" and d["blocks"] == 36 and d["tensor_count"] == 615
    assert d["experts"] == {"routed": 128, "used": 4, "shared": 1}
    assert d["attention"]["kind"] == "MLA"
    assert (d["attention"]["q_lora_rank"], d["attention"]["kv_lora_rank"]) == (1024, 256)
    assert d["context_length"] == 1048576 and d["rope"]["rope.scaling.factor"] == 128.0
    assert d["roles"]["routed_expert"]["tensors"] == 108
    assert d["roles"]["routed_expert"]["params"] == 36 * 3 * 128 * 4096 * 2048
    assert 118e9 < d["total_parameters"] < 120e9
    assert 5.5e9 < d["active_parameters"] < 7e9


def test_inspect_text_and_dense_refusal(mistral4_split, dense_model):
    r = CliRunner().invoke(main, ["inspect", str(mistral4_split)])
    assert r.exit_code == 0 and "16 routed, 2 used per token, 1 shared" in r.output
    with pytest.raises(DenseModelError, match="dense model"):
        make_plan(read_model(dense_model), load_profile("compact"))
    r = CliRunner().invoke(main, ["plan", "-p", "compact", str(dense_model)])
    assert r.exit_code == 4 and "APEX is for Mixture-of-Experts" in r.output


def test_plan_json_and_strict_fallbacks(mistral4_split):
    r = CliRunner().invoke(main, ["plan", "-p", "compact", str(mistral4_split), "--json"])
    d = json.loads(r.output)
    assert len(d["tensors"]) == len(read_model(mistral4_split).tensors)
    fb = d["fallbacks"]
    assert fb and all(g["from"] == "Q4_K" and g["to"] == "Q5_0" for g in fb)
    r = CliRunner().invoke(main, ["plan", "-p", "compact", str(mistral4_split), "--strict"])
    assert r.exit_code == 5 and "--strict" in r.output and "Q4_K -> Q5_0" in r.output


# ------------------------------------------------------------------ rendering

def test_rendered_rules_are_anchored_and_disjoint(ms4_replica):
    plan = make_plan(read_model(ms4_replica), load_profile("i-mini"))
    text = render_file(plan)
    for line in text.splitlines():
        pattern, _, qtype = line.partition("=")
        assert pattern.startswith("^") and pattern.endswith("$"), line
        assert pattern == pattern.lower() and qtype == qtype.lower()
        assert not re.search(r"\\[SDWB]", pattern)
    # blk\.1\. must never reach blk.10-19: simulate llama-quantize's search on every name
    names = [t.name for t in plan.tensors]
    rules = [(re.compile(ln.split("=")[0]), ln) for ln in text.splitlines()]
    for n in names:
        hits = [ln for rx, ln in rules if rx.search(n)]
        assert len(hits) <= 1, (n, hits)
    edge_rule = next(ln for ln in text.splitlines() if "ffn_down_exps" in ln and ln.endswith("=q3_k"))
    assert "(0|1|2|3|4|5|6|7|8|9|26|27|28|29|30|31|32|33|34|35)" in edge_rule


def test_rule_matching_nothing_is_an_error(mistral4_split):
    info = read_model(mistral4_split)
    with pytest.raises(RenderError, match="matches no tensor"):
        from apex_orch.plan.render import Rule, check_rules
        check_rules(info, [Rule("^blk\\.99\\.ffn_down_exps\\.weight$", T.Q4_K, ())], {})


def test_render_cli_formats(mistral4_split, tmp_path):
    r = CliRunner().invoke(main, ["render", "-p", "compact", str(mistral4_split), "--args"])
    assert r.exit_code == 0 and r.output.startswith("--tensor-type ^")
    out = tmp_path / "rules.txt"
    r = CliRunner().invoke(main, ["render", "-p", "compact", str(mistral4_split), "-o", str(out)])
    assert r.exit_code == 0 and out.read_text() == render_file(make_plan(read_model(mistral4_split),
                                                                         load_profile("compact")))
    r = CliRunner().invoke(main, ["render", "-p", "compact", str(mistral4_split), "-o", str(out)])
    assert r.exit_code == 9 and "--force" in r.output


def test_profile_import_of_an_upstream_file(tmp_path):
    upstream = write(tmp_path, "apex-compact.txt", "\n".join([
        r"blk\.([0-4]|3[1-5])\.ffn_(up|gate|down)_exps=q4_k",
        r"blk\.([5-9]|[12][0-9]|30)\.ffn_(up|gate|down)_exps=q3_k",
        r"ffn_(up|gate|down)_shexp=q6_k",
        r"attn_q=q4_k", r"attn_output=q4_k", "attn_k=q4_k", "attn_v=q4_k",
        "nothing_here=q8_0", "broken-line",
    ]) + "\n")
    rep = import_tensor_type_file(upstream, n_blocks=36)
    t = rep.profile["types"]
    assert t["routed_expert"] == {"edge": "Q4_K", "near": "Q3_K", "middle": "Q3_K"}
    assert t["shared_expert"] == {"edge": "Q6_K", "rest": "Q6_K"}
    assert any("broken-line" in x for x in rep.not_understood)
    assert any("nothing_here" in x for x in rep.unused)
    assert any("attn_q_a" in x or "attn_q_b" in x for x in rep.accidental)   # attn_q hits MLA by substring
    out = tmp_path / "imported.yaml"
    r = CliRunner().invoke(main, ["profile", "import", str(upstream), "-o", str(out)])
    assert r.exit_code == 0, r.output
    assert load_profile(str(out)).types["routed_expert"]["edge"] == T.Q4_K


def test_profile_cli_list_and_show():
    r = CliRunner().invoke(main, ["profile", "list"])
    assert r.exit_code == 0 and "i-compact" in r.output and "I-Compact" in r.output
    r = CliRunner().invoke(main, ["profile", "show", "i-mini"])
    assert "routed_expert  edge=Q3_K, near=Q3_K, middle=IQ2_S" in r.output
    assert "required, corpus diverse" in r.output
