"""apex-orch sensitivity and fit: spliced files equal llama-quantize's bytes, measurements
are real and cached, the solver lands on the budget under APEX's structure, and the YAML it writes
plans to exactly the types it chose."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from gguf.constants import GGMLQuantizationType as T

from apex_orch.cli import main
from apex_orch.demo import synthetic
from apex_orch.demo.spec import SyntheticSpec
from apex_orch.core.errors import ResultFileError
from apex_orch.core.sizes import parse_size
from apex_orch.fit.fitter import fit_profile
from apex_orch.fit.groups import LADDER_IMATRIX, bands_profile, bits, groups_of, uniform_profile
from apex_orch.fit.measurements import FORMAT, FORMAT_VERSION, Sensitivity
from apex_orch.fit.proxy import calibrate, spearman
from apex_orch.fit.splice import write_spliced
from apex_orch.model.gguf_header import read_header
from apex_orch.model.info import read_model
from apex_orch.plan.planner import make_plan
from apex_orch.plan.profiles import load_profile
from apex_orch.quantize.job import plan_quantize, stamped_kv_allowance

REPLICA_CARD_SIZES = ("72GB", "62GB", "48GB", "38GB")


def tensor_digests(path: Path) -> dict[str, tuple[str, str]]:
    """name -> (type, sha256 of its bytes)."""
    h = read_header(path)
    out = {}
    with open(path, "rb") as fh:
        for t in h.tensors:
            fh.seek(h.data_offset + t.offset)
            out[t.name] = (t.ggml_type.name, hashlib.sha256(fh.read(t.n_bytes)).hexdigest())
    return out


@pytest.fixture(scope="module")
def small_moe(tmp_path_factory) -> Path:
    spec = SyntheticSpec(n_layer=4, n_expert=4, name="Fit-Small-MoE", seed=5)
    return synthetic.write_model(tmp_path_factory.mktemp("fit") / "fit-small.gguf", spec)


def quantize_with(model: Path, profile: Path, out: Path) -> Path:
    r = CliRunner().invoke(main, ["quantize", str(model), "-p", str(profile), "-o", str(out), "-t", "2", "-q"])
    assert r.exit_code == 0, r.output
    return out


# ------------------------------------------------------------------ splicing

def test_spliced_group_equals_llama_quantize_bytes(small_moe, tmp_path, require_tools):
    """The measurement's premise: a group's bytes in a file where only it is Q4_K are the bytes
    llama-quantize writes for it when the profile gives only it Q4_K."""
    require_tools("llama-quantize")
    apex = bands_profile(None, tmp_path)
    uniform = quantize_with(small_moe, uniform_profile(T.Q4_K, tmp_path, bands_from=apex, imatrix=False).path,
                            tmp_path / "uniform.gguf")
    attention = [g for g in groups_of(make_plan(read_model(small_moe), apex)) if g.key == "attention.rest"][0]
    spliced = write_spliced(small_moe, {n: uniform for n in attention.tensors}, tmp_path / "spliced.gguf")
    only = tmp_path / "only-attention.yaml"
    only.write_text("tier: Only\nbase_ftype: Q8_0\nbands: {edge: 5, near: 5, attention_edge: 3, scale: auto, "
                    "reference_blocks: 36}\ntypes:\n  routed_expert: F16\n  shared_expert: F16\n"
                    "  attention: {edge: F16, rest: Q4_K}\n  embedding: F16\n  output: F16\n")
    direct = quantize_with(small_moe, only, tmp_path / "direct.gguf")
    got, want, source = tensor_digests(spliced), tensor_digests(direct), tensor_digests(small_moe)
    assert got == want
    changed = {n for n in got if got[n] != source[n]}
    assert changed == set(attention.tensors)
    # the spliced file loads and carries the source's metadata verbatim
    assert read_header(spliced).kv == read_header(small_moe).kv


def test_splice_refuses_a_donor_of_another_model(small_moe, mistral4_split, tmp_path):
    from apex_orch.core.errors import ModelError
    with pytest.raises(ModelError, match="quantization of this very source"):
        write_spliced(small_moe, {"blk.0.attn_q_a.weight": mistral4_split}, tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()


# ------------------------------------------------------------------ measuring

@pytest.fixture(scope="module")
def measured(small_moe, tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("sens") / "sens.json"
    r = CliRunner().invoke(main, ["sensitivity", str(small_moe), "--eval-corpus", "wikipedia", "--types", "Q4_K,Q8_0",
                                  "--chunks", "2", "-c", "128", "-t", "2", "-o", str(out)])
    assert r.exit_code == 0, r.output
    return out, r.output


@pytest.mark.slow
def test_sensitivity_measures_every_group_at_every_type(measured, small_moe):
    path, output = measured
    data = json.loads(path.read_text())
    keys = [g["key"] for g in data["groups"]]
    assert keys == ["routed_expert.down.edge", "routed_expert.down.near", "routed_expert.gate_up.edge",
                    "routed_expert.gate_up.near", "shared_expert.edge", "shared_expert.rest", "attention.edge",
                    "attention.rest", "embedding", "output"]
    assert data["ladder"] == ["Q4_K", "Q8_0"]
    for k in keys:
        for t in ("Q4_K", "Q8_0"):
            m = data["measurements"][k][t]
            assert m["kld_mean"] >= 0 and m["kld_p999"] >= m["kld_mean"] * 0  # finite numbers, measured
    # the output head moves the output less at Q8_0 than at Q4_K (8.5 vs 4.5 bits, same tensor)
    assert data["measurements"]["output"]["Q8_0"]["kld_mean"] < data["measurements"]["output"]["Q4_K"]["kld_mean"]
    u = data["uniform"]["Q4_K"]
    assert u["sum_of_groups"] == pytest.approx(sum(data["measurements"][k]["Q4_K"]["kld_mean"] for k in keys))
    c = data["cost"]
    assert set(c["quantize_s"]) == {"Q4_K", "Q8_0"} and c["as_tier_quantizations"] > 1
    assert "all groups (measured)" in output and "cost:" in output
    assert data["model"]["sha256"] == hashlib.sha256(small_moe.read_bytes()).hexdigest()


@pytest.mark.slow
def test_sensitivity_rerun_is_a_cache_hit(measured, small_moe, tmp_path):
    path, _ = measured
    r = CliRunner().invoke(main, ["sensitivity", str(small_moe), "--eval-corpus", "wikipedia", "--types", "Q8_0,Q4_K",
                                  "--chunks", "2", "-c", "128", "-o", str(tmp_path / "again.json")])
    assert r.exit_code == 0, r.output
    assert "cache hit" in r.output
    assert json.loads((tmp_path / "again.json").read_text()) == json.loads(path.read_text())


@pytest.mark.slow
def test_sensitivity_json_is_the_result(measured, small_moe):
    path, _ = measured
    r = CliRunner().invoke(main, ["sensitivity", str(small_moe), "--eval-corpus", "wikipedia", "--types", "Q4_K,Q8_0",
                                  "--chunks", "2", "-c", "128", "-t", "2", "--json", "-q"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert set(doc) == {"result", "output", "data"} and doc["output"] is None
    assert doc["data"] == json.loads(path.read_text()) and Path(doc["result"]).is_file()


@pytest.mark.parametrize("args, code, message", [
    ([], 2, "--text / --eval-corpus: give the held-out text the output is measured on"),
    (["--eval-corpus", "wikipedia", "--types", "IQ2_S"], 2, "needs an importance matrix"),
    (["--eval-corpus", "wikipedia", "--types", "F16"], 2, "not a quantized ggml type"),
    (["--eval-corpus", "wikipedia", "--types", "Q4_K,IQ2_XXS"], 2, "aborts writing token_embd/output"),
    (["--eval-corpus", "wikipedia", "--types", "Q9_K"], 2, "not a quantized ggml type"),
    (["--eval-corpus", "wikipedia", "--imatrix", "x.dat", "--corpus", "diverse"], 2, "not both"),
    (["--eval-corpus", "wikipedia", "--chunks", "0"], 2, "0"),
])
def test_sensitivity_refuses_bad_input(small_moe, args, code, message):
    r = CliRunner().invoke(main, ["sensitivity", str(small_moe), "--dry-run"] + args)
    assert r.exit_code == code, r.output
    assert message in r.output


def test_sensitivity_refuses_its_output_as_input_and_an_existing_output(small_moe, tmp_path):
    r = CliRunner().invoke(main, ["sensitivity", str(small_moe), "--eval-corpus", "wikipedia", "-o", str(small_moe)])
    assert r.exit_code == 2 and "same file" in r.output
    (tmp_path / "s.json").write_text("{}")
    r = CliRunner().invoke(main, ["sensitivity", str(small_moe), "--eval-corpus", "wikipedia", "-o",
                                  str(tmp_path / "s.json")])
    assert r.exit_code == 9 and "--force" in r.output
    assert (tmp_path / "s.json").read_text() == "{}"


def test_sensitivity_refuses_a_quantized_source(small_moe, tmp_path, require_tools):
    require_tools("llama-quantize")
    q = quantize_with(small_moe, Path("profiles/compact.yaml").resolve(), tmp_path / "q.gguf")
    r = CliRunner().invoke(main, ["sensitivity", str(q), "--eval-corpus", "wikipedia", "--dry-run"])
    assert r.exit_code != 0 and "quantized" in r.output


# ------------------------------------------------------------------ fitting (a synthetic sensitivity)

def synthetic_sensitivity(model: Path, ladder=tuple(t.name for t in LADDER_IMATRIX),
                          edge_weight: float = 3.0) -> Sensitivity:
    """Losses shaped like the measured ones: params x 2^(-2 bits), edges and attention heavier."""
    from apex_orch.plan.profiles import TARGET_TYPES
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        apex = bands_profile(None, Path(tmp))
        groups = groups_of(make_plan(read_model(model), apex))
    weight = {"edge": edge_weight, "near": 1.5, "middle": 1.0, "rest": 1.2, None: 2.0}
    role_w = {"attention": 4.0, "shared_expert": 3.0, "routed_expert": 1.0, "embedding": 0.5, "output": 2.0}
    meas = {}
    for g in groups:
        meas[g.key] = {n: {"kld_mean": g.n_params * 1e-9 * weight[g.band] * role_w.get(g.role, 1.0)
                           * 2 ** (-2 * bits(TARGET_TYPES[n])), "kld_p999": 0.0} for n in ladder}
    data = {"format": FORMAT, "format_version": FORMAT_VERSION, "key": "synthetic0000", "model": {
        "name": "synthetic", "arch": "mistral4", "blocks": 0, "sha256": "0"}, "ladder": list(ladder),
        "groups": [{"key": g.key} for g in groups], "measurements": meas,
        "method": {"name": "synthetic"}, "text": {"label": "none", "chunks": 0, "ctx": 0},
        "imatrix": {"corpus": "diverse"}, "bands": apex.raw["bands"], "bands_from": None}
    return Sensitivity(data)


@pytest.fixture(scope="module")
def replica_sens(ms4_replica) -> Sensitivity:
    return synthetic_sensitivity(ms4_replica)


def check_structure(plan) -> None:
    """APEX's shape in a plan: depth-monotone per role/slot class, attention and shared >= routed per block."""
    main = plan.bands.n_blocks
    depth = lambda b: min(b, main - 1 - b)  # noqa: E731
    by_class: dict = {}
    per_block: dict = {}
    for t in plan.tensors:
        if t.block is None or t.requested is None or t.band is None:
            continue
        cls = (t.role.value, "down" if t.slot == "down" else "x")
        by_class.setdefault(cls, []).append((depth(t.block), bits(t.requested)))
        per_block.setdefault(t.block, {}).setdefault(t.role.value, []).append(bits(t.requested))
    for items in by_class.values():
        for d1, b1 in items:
            for d2, b2 in items:
                assert not (d1 < d2 and b1 < b2), (d1, b1, d2, b2)
    for roles in per_block.values():
        routed = max(roles.get("routed_expert", [0]))
        for hi in ("attention", "shared_expert"):
            assert min(roles.get(hi, [99])) >= routed


@pytest.mark.parametrize("size", REPLICA_CARD_SIZES)
def test_fit_hits_the_flagship_card_sizes_within_half_a_percent(ms4_replica, replica_sens, size):
    result = fit_profile(read_model(ms4_replica), replica_sens, size=parse_size(size))
    budget = parse_size(size)
    assert result.file_bytes <= budget
    assert result.file_bytes >= budget * 0.995, result.shortfall
    assert result.within
    check_structure(result.plan)


def test_fitted_yaml_is_an_ordinary_profile_that_plans_to_the_solution(ms4_replica, replica_sens, tmp_path):
    result = fit_profile(read_model(ms4_replica), replica_sens, size=parse_size("48GB"), tier="Fit-48")
    path = tmp_path / "fitted.yaml"
    path.write_text(result.yaml_text)
    prof = load_profile(path)
    assert prof.tier == "Fit-48" and prof.imatrix_required and prof.raw["fitted"]["sensitivity"] == "synthetic0000"
    plan = make_plan(read_model(ms4_replica), prof, has_imatrix=True)
    assert plan.predicted_file_size(stamped_kv_allowance(True)) == result.file_bytes
    assert {t.name: t.final_type for t in plan.tensors} == {t.name: t.final_type for t in result.plan.tensors}
    child = tmp_path / "child.yaml"   # extends-able
    child.write_text(f"extends: {path}\ntier: Child\n")
    assert make_plan(read_model(ms4_replica), load_profile(child), has_imatrix=True).total_bytes == plan.total_bytes


def test_more_budget_never_predicts_more_loss(ms4_replica, replica_sens):
    model = read_model(ms4_replica)
    losses = [fit_profile(model, replica_sens, size=parse_size(s)).solution.loss
              for s in ("38GB", "48GB", "62GB", "72GB")]
    assert losses == sorted(losses, reverse=True)


def test_free_structure_is_never_worse_than_apex_structure(ms4_replica):
    sens = synthetic_sensitivity(ms4_replica, edge_weight=0.2)   # edges cheap: APEX's shape costs loss
    model = read_model(ms4_replica)
    apex = fit_profile(model, sens, size=parse_size("48GB"))
    free = fit_profile(model, sens, size=parse_size("48GB"), structure=False)
    assert free.solution.loss <= apex.solution.loss
    check_structure(apex.plan)


def test_fit_by_bits_per_weight(ms4_replica, replica_sens):
    result = fit_profile(read_model(ms4_replica), replica_sens, bpw=3.5)
    assert 3.5 * 0.995 <= result.plan.bpw <= 3.5


def test_fit_without_imatrix_uses_no_imatrix_only_types(ms4_replica, replica_sens):
    result = fit_profile(read_model(ms4_replica), replica_sens, size=parse_size("62GB"), imatrix=False)
    assert not any(t.requires_imatrix for t in result.plan.tensors)
    assert "required: false" in result.yaml_text


@pytest.mark.parametrize("args, message", [
    (["--size", "48GB", "--bpw", "3"], "exactly one of --size or --bpw"),
    ([], "exactly one of --size or --bpw"),
    (["--size", "lots"], "is not a size"),
    (["--size", "1GB"], "below the smallest file"),
    (["--bpw", "40"], "between 1 and 16"),
])
def test_fit_refuses_bad_budgets(ms4_replica, replica_sens, tmp_path, args, message):
    sens = tmp_path / "s.json"
    sens.write_text(replica_sens.to_json())
    r = CliRunner().invoke(main, ["fit", str(ms4_replica), "--sensitivity", str(sens)] + args)
    assert r.exit_code == 2, r.output
    assert message in r.output


def test_fit_refuses_a_sensitivity_that_does_not_cover_the_model(mistral4_dense_lead, ms4_replica, replica_sens,
                                                                   tmp_path):
    sens = tmp_path / "s.json"
    sens.write_text(replica_sens.to_json())
    r = CliRunner().invoke(main, ["fit", str(mistral4_dense_lead), "--sensitivity", str(sens), "--size", "20MB"])
    assert r.exit_code == ResultFileError.exit_code and "dense_ffn" in r.output
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"format": "something-else"}))
    r = CliRunner().invoke(main, ["fit", str(ms4_replica), "--sensitivity", str(bad), "--size", "48GB"])
    assert r.exit_code == ResultFileError.exit_code and "not a sensitivity result" in r.output
    partial = json.loads(replica_sens.to_json())
    del partial["measurements"]["output"]["Q8_0"]
    bad.write_text(Sensitivity(partial).to_json())   # a consistent checksum: the structure is what fails
    r = CliRunner().invoke(main, ["fit", str(ms4_replica), "--sensitivity", str(bad), "--size", "48GB"])
    assert r.exit_code == ResultFileError.exit_code and "output at Q8_0" in r.output
    r = CliRunner().invoke(main, ["fit", str(ms4_replica), "--sensitivity", str(sens), "--size", "48GB",
                                  "--base-profile", "compact"])
    assert r.exit_code == 0, r.output   # compact keeps APEX's bands: the same groups


def test_fit_writes_only_with_force(ms4_replica, replica_sens, tmp_path):
    sens = tmp_path / "s.json"
    sens.write_text(replica_sens.to_json())
    out = tmp_path / "fitted.yaml"
    args = ["fit", str(ms4_replica), "--sensitivity", str(sens), "--size", "48GB", "-o", str(out)]
    assert CliRunner().invoke(main, args).exit_code == 0
    first = out.read_text()
    out.write_text("mine")
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 9 and out.read_text() == "mine"
    assert CliRunner().invoke(main, args + ["--force"]).exit_code == 0 and out.read_text() == first
    # without the imatrix types the ladder's smallest file (every group at Q3_K) is 51.2 GB: 55 GB fits
    no_im = [a if a != "48GB" else "55GB" for a in args]
    r = CliRunner().invoke(main, no_im + ["--force", "--json", "--without-imatrix"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)   # stdout holds the JSON alone; the file written is in it
    assert {"target", "file_bytes", "bpw", "predicted_kld_mean", "output", "profile_yaml"} <= set(doc)
    assert doc["output"] == str(out) and out.read_text() == doc["profile_yaml"]
    assert not any(t in doc["profile_yaml"] for t in ("IQ1", "IQ2", "IQ3_XXS"))   # the types that need an imatrix
    r = CliRunner().invoke(main, ["fit", str(ms4_replica), "--sensitivity", str(sens), "--size", "48GB",
                                  "-o", str(sens)])
    assert r.exit_code == 2 and "same file" in r.output


@pytest.mark.slow
def test_a_fitted_profile_quantizes_to_its_planned_bytes(small_moe, measured, tmp_path):
    sens_path, _ = measured
    model = read_model(small_moe)
    apex = bands_profile(None, tmp_path)
    low = make_plan(model, uniform_profile(T.Q4_K, tmp_path, bands_from=apex, imatrix=False)).predicted_file_size()
    high = make_plan(model, uniform_profile(T.Q8_0, tmp_path, bands_from=apex, imatrix=False)).predicted_file_size()
    target = (low + high) // 2
    out = tmp_path / "fitted.yaml"
    r = CliRunner().invoke(main, ["fit", str(small_moe), "--sensitivity", str(sens_path), "--size", f"{target}B",
                                  "-o", str(out)])
    assert r.exit_code == 0, r.output
    prof = load_profile(out)
    gguf = quantize_with(small_moe, out, tmp_path / "fitted.gguf")
    job = plan_quantize(small_moe, prof, out=tmp_path / "again.gguf")
    plan = job.plan
    assert gguf.stat().st_size == job.predicted_size <= target
    assert set(job.metadata) <= set(stamped_kv_allowance(False))
    assert {t.name: t.ggml_type for t in read_header(gguf).tensors} == {t.name: t.final_type for t in plan.tensors}
    assert {bits(t.requested) for t in plan.tensors if t.requested} == {bits(T.Q4_K), bits(T.Q8_0)}


# ------------------------------------------------------------------ the proxy

@pytest.mark.slow
def test_proxy_is_recorded_and_a_calibrated_proxy_run_evaluates_nothing(measured, small_moe, tmp_path):
    path, _ = measured
    data = json.loads(path.read_text())
    for key, by_type in data["proxy"].items():
        assert 0 < by_type["Q8_0"] < by_type["Q4_K"], key
    out = tmp_path / "proxy.json"
    r = CliRunner().invoke(main, ["sensitivity", str(small_moe), "--eval-corpus", "wikipedia", "--types", "Q4_K,Q8_0",
                                  "--chunks", "2", "-c", "128", "--method", "proxy", "--calibration", str(path),
                                  "-o", str(out)])
    assert r.exit_code == 0, r.output
    proxy = json.loads(out.read_text())
    assert proxy["cost"]["eval_s"] == 0 and proxy["cost"]["splice_s"] == 0 and proxy["uniform"] == {}
    assert proxy["proxy"] == data["proxy"]          # the same quantizations, read back the same way
    roles = {g["key"]: g["role"] for g in data["groups"]}
    scales = calibrate(data["proxy"], data["measurements"], roles)
    for key, by_type in proxy["measurements"].items():
        for t, m in by_type.items():
            assert m["kld_mean"] == pytest.approx(scales[roles[key]] * data["proxy"][key][t])
    assert proxy["method"]["calibration"] == data["key"]


def test_calibrate_scales_each_role_by_its_exact_over_proxy_ratio():
    proxy = {"a.x": {"Q4_K": 2.0, "Q8_0": 1.0}, "b": {"Q4_K": 10.0, "Q8_0": 5.0}, "c": {"Q4_K": 1.0}}
    exact = {"a.x": {"Q4_K": {"kld_mean": 4.0}, "Q8_0": {"kld_mean": 2.0}},
             "b": {"Q4_K": {"kld_mean": 1.0}, "Q8_0": {"kld_mean": 0.5}}, "c": {"Q4_K": {"kld_mean": 3.0}}}
    scales = calibrate(proxy, exact, {"a.x": "attention", "b": "output", "c": "embedding"})
    assert scales["attention"] == pytest.approx(2.0) and scales["output"] == pytest.approx(0.1)
    assert scales["embedding"] == pytest.approx(float(np.median([2.0, 0.1])))   # one point: the others' median
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)


def test_calibration_needs_the_proxy_method(small_moe, tmp_path, replica_sens):
    sens = tmp_path / "s.json"
    sens.write_text(replica_sens.to_json())
    r = CliRunner().invoke(main, ["sensitivity", str(small_moe), "--eval-corpus", "wikipedia", "--dry-run",
                                  "--calibration", str(sens)])
    assert r.exit_code == 2 and "--calibration / --method: a calibration is an exact result" in r.output
    r = CliRunner().invoke(main, ["sensitivity", str(small_moe), "--eval-corpus", "wikipedia", "--dry-run",
                                  "--method", "proxy", "--calibration", str(tmp_path / "missing.json")])
    assert r.exit_code == ResultFileError.exit_code == 19 and "not found" in r.output


# ------------------------------------------------------------------ corrected prediction, tail bound

def with_uniform(sens: Sensitivity, mean_factor: dict, tail_shape: dict) -> Sensitivity:
    """`sens` with KLD 99.9% per group (its mean x a per-role tail weight) and uniform files whose
    measured effects are the sums of the parts times `mean_factor[type]` (1.0 where absent)."""
    data = json.loads(sens.to_json())
    roles = {g.split(".")[0] for g in (x["key"] for x in data["groups"])}
    for key, by_type in data["measurements"].items():
        for row in by_type.values():
            row["kld_p999"] = row["kld_mean"] * tail_shape.get(key.split(".")[0], 10.0)
    data["uniform"] = {}
    for t in data["ladder"]:
        parts = [data["measurements"][g["key"]][t] for g in data["groups"]]
        data["uniform"][t] = {"kld_mean": mean_factor.get(t, 1.0) * sum(p["kld_mean"] for p in parts),
                              "kld_p999": sum(p["kld_p999"] for p in parts)}
    assert roles
    return Sensitivity(data)


def test_fit_scales_each_types_effects_by_its_measured_additivity(ms4_replica, replica_sens):
    sens = with_uniform(replica_sens, {"Q8_0": 0.5, "Q6_K": 0.5, "Q5_K": 0.6, "IQ1_M": 1.2}, {})
    model = read_model(ms4_replica)
    corrected = fit_profile(model, sens, size=parse_size("48GB"))
    plain = fit_profile(model, sens, size=parse_size("48GB"), correct_additivity=False)
    assert corrected.additivity[T.Q8_0] == pytest.approx(0.5) and corrected.additivity[T.IQ1_M] == pytest.approx(1.2)
    assert plain.additivity[T.Q8_0] == 1.0
    # the prediction is each unit's share of its group's effect at its type, times that type's factor
    sol = corrected.solution
    expected = sum(sol.shares[u] * corrected.additivity[t] * sens.loss(u[0], t) for u, t in sol.types.items())
    assert sol.kld_mean == pytest.approx(expected, rel=1e-12)
    assert sol.loss == sol.kld_mean                       # no tail weight: the objective is the mean
    fitted = load_profile_text(corrected.yaml_text)["fitted"]
    assert "Q8_0 x0.5" in fitted["additivity"] and fitted["predicted_kld_mean"] == pytest.approx(sol.kld_mean, rel=1e-5)


def load_profile_text(text: str) -> dict:
    import yaml
    return yaml.safe_load(text)


def test_fit_keeps_the_predicted_tail_under_a_bound(ms4_replica, replica_sens, tmp_path):
    # the token embedding dominates the tail here (not the mean): the mean-optimal fit leaves it at a
    # low type, the bounded one must raise it and pay for that elsewhere
    sens = with_uniform(replica_sens, {}, {"embedding": 20000.0})
    model = read_model(ms4_replica)
    free = fit_profile(model, sens, size=parse_size("48GB"))
    bound = free.solution.kld_p999 * 0.5
    bounded = fit_profile(model, sens, size=parse_size("48GB"), max_kld_p999=bound)
    assert bounded.solution.kld_p999 <= bound < free.solution.kld_p999
    assert bounded.solution.kld_mean >= free.solution.kld_mean       # the price of the bound, in mean KLD
    assert bounded.file_bytes <= parse_size("48GB") and bounded.within
    assert load_profile_text(bounded.yaml_text)["fitted"]["max_kld_p999"] == pytest.approx(bound, rel=1e-5)
    check_structure(bounded.plan)
    # a bound no profile of this size meets: one message, exit 5 (a plan that cannot be made), nothing written
    path = tmp_path / "s.json"
    path.write_text(sens.to_json())
    out = tmp_path / "fitted.yaml"
    r = CliRunner().invoke(main, ["fit", str(ms4_replica), "--sensitivity", str(path), "--size", "48GB",
                                  "--max-kld-99-9", "1e-12", "-o", str(out)])
    assert r.exit_code == 5, r.output
    assert "no profile of this size is predicted to keep KLD 99.9% at or under 1e-12" in r.output
    assert not out.exists()


def test_tail_bound_needs_tail_measurements(ms4_replica, replica_sens, tmp_path):
    path = tmp_path / "s.json"                           # no uniform files: no tail factors
    path.write_text(replica_sens.to_json())
    r = CliRunner().invoke(main, ["fit", str(ms4_replica), "--sensitivity", str(path), "--size", "48GB",
                                  "--max-kld-99-9", "0.5"])
    assert r.exit_code == 5 and "has no KLD 99.9%" in r.output, r.output
