"""The same guarantees at the entry points added later: sensitivity, fit, compare, profiles, import.

One case per finding of the adversarial pass on them, each class at more than one entry point:
results read back are checked like manifests (the sensitivity cache, `-o` files, `--sensitivity`,
`--calibration`, a release `fit:` tier); outputs go through the quantize guard (`compare --plot`,
`profile import`); profile layers stack; the wrong answers (threads, fit tiers after `--imatrix FILE`,
the imatrix's own text); fail early (text length, scored tokens, split size, name length, a release's
eval text); the sensitivity lock; Ray's unreachable address and phases that need no cluster.
Real tools throughout; the cheap measurement is `--method proxy --types Q8_0` (one llama-quantize of
the 4-block model, no evaluation). Results whose numbers do not matter are MADE UP
(relkit.made_up_sensitivity, real groups of the model).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml

from apex_orch.core.manifest import manifest_path
from apex_orch.demo.synthetic import demo_text
from relkit import (assert_failed_cleanly, assert_one_error, cli, cli_cmd, made_up_sensitivity, run_cli, snapshot,
                    tmpfs, wait_for)

pytestmark = pytest.mark.requires_tools("llama-quantize")


@pytest.fixture(scope="module")
def text(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("text") / "held-out.txt"
    path.write_text(demo_text())
    return path


def own_text(tmp_path: Path, text: Path, tag: str) -> Path:
    """The held-out text with one line of its own: a measurement key no other case shares."""
    path = tmp_path / f"text-{tag}.txt"
    path.write_text(text.read_text() + f"\n{tag}\n")
    return path


PROXY = ("--method", "proxy", "--types", "Q8_0", "-t", "2")


def cache_line(output: str) -> str:
    return next(line for line in output.splitlines() if line.startswith("cache     "))


def cache_path_of(output: str) -> Path:
    return Path(cache_line(output).split()[1])


# ============================================================================ results read back

def test_a_truncated_cache_entry_is_discarded_and_measured_again(tiny_moe, text, tmp_path):
    t = own_text(tmp_path, text, "truncated")
    first = cli("sensitivity", tiny_moe, "--text", t, *PROXY)
    assert first.exit_code == 0, first.output
    entry = cache_path_of(first.output)
    good = json.loads(entry.read_text())
    entry.write_bytes(entry.read_bytes()[: entry.stat().st_size // 2])
    dry = cli("sensitivity", tiny_moe, "--text", t, *PROXY, "--dry-run")
    assert dry.exit_code == 0, dry.output
    assert cache_line(dry.output).startswith(f"cache     {entry} (damaged (not a sensitivity result: JSONDecodeError")
    assert cache_line(dry.output).endswith("): will be measured again)")
    again = cli("sensitivity", tiny_moe, "--text", t, *PROXY, "-o", tmp_path / "s.json")
    assert again.exit_code == 0, again.output
    assert f"notice: the cached result {entry} is damaged (not a sensitivity result: JSONDecodeError" in again.output
    assert "uniform Q8_0: llama-quantize" in again.output            # measured again, not served
    remeasured = json.loads(entry.read_text())
    assert remeasured["proxy"] == good["proxy"] and remeasured["self_sha256"] != ""
    assert json.loads((tmp_path / "s.json").read_text()) == remeasured


@pytest.mark.parametrize("restamp", [False, True], ids=["edited", "edited-with-a-new-checksum"])
def test_an_edited_cache_entry_is_never_served_nor_copied(tiny_moe, text, tmp_path, restamp):
    t = own_text(tmp_path, text, f"edited-{restamp}")
    first = cli("sensitivity", tiny_moe, "--text", t, *PROXY)
    assert first.exit_code == 0, first.output
    entry = cache_path_of(first.output)
    from apex_orch.fit.measurements import Sensitivity
    data = json.loads(entry.read_text())
    data["measurements"]["output"]["Q8_0"]["kld_mean"] = -1.0
    entry.write_text(Sensitivity(data).to_json() if restamp else json.dumps(data))
    why = ("output at Q8_0: kld_mean is -1.0: KL divergence and quantization error are never negative" if restamp
           else "sensitivity result does not match its own checksum (edited or damaged)")
    again = cli("sensitivity", tiny_moe, "--text", t, *PROXY, "-o", tmp_path / "s.json")
    assert again.exit_code == 0, again.output
    assert f"notice: the cached result {entry} is damaged ({why}" in again.output
    copied = json.loads((tmp_path / "s.json").read_text())
    assert copied["measurements"]["output"]["Q8_0"]["kld_mean"] > 0


def damaged(kind: str, model: Path) -> str:
    """The text of a damaged sensitivity file: a consistent checksum over a wrong content, or no JSON."""
    from apex_orch.fit.measurements import stamped
    if kind == "negative":
        return made_up_sensitivity(model, edit=lambda d: d["measurements"]["attention.edge"]["Q4_K"].update(
            kld_mean=-0.25)).to_json()
    if kind == "empty-ladder":
        return json.dumps(stamped({**made_up_sensitivity(model).data, "ladder": []}))
    if kind == "nested":
        return "[" * 100_000 + "]" * 100_000
    if kind == "nan":
        return made_up_sensitivity(model, edit=lambda d: d["measurements"]["output"]["Q8_0"].update(
            kld_p999=float("nan"))).to_json()
    raise ValueError(kind)


MESSAGES = {"negative": "attention.edge at Q4_K: kld_mean is -0.25: KL divergence and quantization error are "
                        "never negative",
            "empty-ladder": "sensitivity ladder holds 0 types; a measurement has 1 to 16",
            "nested": "not a sensitivity result: nested more than 64 levels deep",
            "nan": "output at Q8_0: kld_p999 is nan, not a finite number"}


@pytest.mark.parametrize("kind", sorted(MESSAGES))
def test_fit_refuses_a_damaged_sensitivity_file(tiny_moe, tmp_path, kind):
    sens = tmp_path / "sens.json"
    sens.write_text(damaged(kind, tiny_moe))
    out = tmp_path / "fitted.yaml"
    r = cli("fit", tiny_moe, "--sensitivity", sens, "--bpw", "6", "-o", out)
    assert_one_error(r.output, 19, r.exit_code, f"{sens}: {MESSAGES[kind]}", "measure again")
    assert not out.exists()


@pytest.mark.parametrize("kind", ["negative", "nested"])
def test_sensitivity_refuses_a_damaged_calibration_file(tiny_moe, text, tmp_path, kind):
    cal = tmp_path / "cal.json"
    cal.write_text(damaged(kind, tiny_moe))
    r = cli("sensitivity", tiny_moe, "--text", text, "--method", "proxy", "--calibration", cal, "--dry-run")
    assert_one_error(r.output, 19, r.exit_code, f"{cal}: {MESSAGES[kind]}")


def test_a_release_fit_tier_refuses_a_damaged_sensitivity_file(tiny_moe, tmp_path):
    (tmp_path / "sens.json").write_text(damaged("negative", tiny_moe))
    cfg = tmp_path / "release.yaml"
    cfg.write_text(yaml.safe_dump({"name": "Fit-Rel", "license": "mit", "source": {"gguf": str(tiny_moe)},
                                   "tiers": [{"fit": {"bpw": 6, "sensitivity": "sens.json"}, "tier": "Fit-6"}],
                                   "eval": {"enabled": False}, "publish": {"repo": "apex-test/Fit-Rel"}}))
    r = cli("release", cfg, "--dry-run", "--out-dir", tmp_path / "out")
    assert_one_error(r.output, 19, r.exit_code, f"{cfg}:", f": {tmp_path / 'sens.json'}: {MESSAGES['negative']}")


def test_a_damaged_partial_result_is_discarded_with_a_notice(tiny_moe, text, tmp_path):
    t = own_text(tmp_path, text, "partial")
    dry = cli("sensitivity", tiny_moe, "--text", t, *PROXY, "--dry-run")
    partial = cache_path_of(dry.output).with_name(cache_path_of(dry.output).stem + ".partial.json")
    partial.parent.mkdir(parents=True, exist_ok=True)
    partial.write_text('{"format": "apex-orch-sensitivity-partial/v2", "key": "x", "measurements": {')
    r = cli("sensitivity", tiny_moe, "--text", t, *PROXY)
    assert r.exit_code == 0, r.output
    assert (f"notice: the partial result {partial} is damaged (not a partial sensitivity result: "
            "JSONDecodeError") in r.output
    assert not partial.exists()


def test_two_runs_on_one_key_share_the_work(tiny_moe, text, tmp_path):
    """Two real processes: the second waits for the first's lock (or finds its result) and measures nothing."""
    t = own_text(tmp_path, text, "shared")
    args = ("sensitivity", tiny_moe, "--text", t, *PROXY)
    lock = cache_path_of(cli(*args, "--dry-run").output).with_suffix(".lock")
    first = subprocess.Popen(cli_cmd(*args), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lock.exists, "the first run's lock")
        second = run_cli(*args)
    finally:
        out_first = first.communicate(timeout=300)[0]
    outputs = [out_first, second.stdout + second.stderr]
    assert first.returncode == 0 and second.returncode == 0, outputs
    assert sum("uniform Q8_0: llama-quantize" in o for o in outputs) == 1, outputs
    assert "cache hit: " in outputs[1], outputs[1]


# ============================================================================ outputs: one guard

@pytest.fixture(scope="module")
def quantized(tiny_compact_dir) -> Path:
    return next(tiny_compact_dir.glob("*.gguf"))


def test_compare_plot_refuses_an_existing_file_before_evaluating(tiny_moe, quantized, text, tmp_path):
    plot = tmp_path / "pareto.png"
    plot.write_bytes(b"mine")
    before = snapshot(tmp_path)
    r = cli("compare", quantized, "--base", tiny_moe, "--text", text, "-c", "128", "--chunks", "2", "--no-speed",
            "--plot", plot)
    assert_failed_cleanly(r.output, 9, r.exit_code, f"{plot} exists", "--force", out_dir=tmp_path, before=before)
    assert "base log-probs" not in r.output


def test_compare_plot_checks_the_format_before_evaluating(tiny_moe, quantized, text, tmp_path):
    r = cli("compare", quantized, "--base", tiny_moe, "--text", text, "-c", "128", "--chunks", "2", "--no-speed",
            "--plot", tmp_path / "out.txt")
    assert_one_error(r.output, 2, r.exit_code, "--plot", "out.txt: the file name must end in .png, .svg, .pdf")
    assert "base log-probs" not in r.output and not (tmp_path / "out.txt").exists()


def test_compare_plot_replaces_with_force_and_normal_permissions(tiny_moe, quantized, text, tmp_path):
    plot = tmp_path / "pareto.png"
    plot.write_bytes(b"old")
    r = cli("compare", quantized, "--base", tiny_moe, "--text", text, "-c", "128", "--chunks", "2", "--no-speed",
            "--plot", plot, "--force", "-q")
    assert r.exit_code == 0, r.output
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    umask = os.umask(0)
    os.umask(umask)
    assert plot.stat().st_mode & 0o777 == 0o644 & ~umask
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pareto.png"]    # no temporary, no lock left


def test_profile_import_refuses_its_own_input_as_output(tmp_path):
    rules = tmp_path / "in.txt"
    rules.write_text("ffn_down_exps=q4_k\nffn_gate_exps=q3_k\nffn_up_exps=q3_k\n")
    before = rules.read_bytes()
    r = cli("profile", "import", rules, "-o", rules, "--force")
    assert_one_error(r.output, 2, r.exit_code, f"output {rules} is the input {rules}", "(asking to replace outputs "
                                                                                       "does not change that)")
    assert rules.read_bytes() == before


def test_profile_import_writes_through_the_guard(tmp_path):
    rules = tmp_path / "in.txt"
    rules.write_text("ffn_down_exps=q4_k\nffn_gate_exps=q3_k\nffn_up_exps=q3_k\n")
    out = tmp_path / "p.yaml"
    out.write_text("mine")
    r = cli("profile", "import", rules, "-o", out)
    assert_one_error(r.output, 9, r.exit_code, f"{out} exists", "--force")
    assert out.read_text() == "mine"
    r = cli("profile", "import", rules, "-o", out, "--force")
    assert r.exit_code == 0, r.output
    assert yaml.safe_load(out.read_text())["types"]["routed_expert"] == {"edge": "Q3_K", "near": "Q3_K",
                                                                         "middle": "Q3_K"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.txt", "p.yaml"]


# ============================================================================ profile layers

def test_two_user_folders_that_shadow_a_built_in_stack(tmp_path, tiny_moe):
    one, two = tmp_path / "one", tmp_path / "two"
    for folder, words in ((one, "layer one"), (two, "layer two")):
        folder.mkdir()
        (folder / "compact.yaml").write_text(f"extends: compact\nbest_for: {words}\n")
    (two / "house.yaml").write_text("extends: compact\ntier: House\n")
    r = cli("--profiles-dir", one, "--profiles-dir", two, "profile", "show", "compact")
    assert r.exit_code == 0, r.output
    assert (f"chain      compact [user {one}, shadows the built-in] <- compact [user {two}, shadows the built-in] "
            "<- compact [built-in] <- _apex [built-in]") in r.output.splitlines()
    assert "best for: layer one" in r.output
    r = cli("--profiles-dir", one, "--profiles-dir", two, "plan", "-p", "house", tiny_moe)
    assert r.exit_code == 0, r.output                                       # house reaches the top compact
    r = cli("--profiles-dir", two, "--profiles-dir", one, "profile", "show", "compact")
    assert "best for: layer two" in r.output                               # the order given is the order


def test_extends_of_its_own_name_without_a_layer_below_is_an_error(tmp_path):
    (tmp_path / "only.yaml").write_text("extends: only\ntier: Only\n")
    r = cli("--profiles-dir", tmp_path, "profile", "show", "only")
    assert_one_error(r.output, 3, r.exit_code, "extends: 'only' names its own file's name, and no layer below")


def test_a_user_base_that_changes_every_built_in_is_shown(tmp_path):
    (tmp_path / "_apex.yaml").write_text("tier: APEX\nbase_ftype: Q8_0\nbands: {edge: 1, near: 1}\n"
                                         "types: {routed_expert: Q8_0}\n")
    r = cli("--profiles-dir", tmp_path, "profile", "list")
    assert r.exit_code == 0, r.output
    line = next(ln for ln in r.output.splitlines() if ln.startswith("quality "))
    assert line.endswith(f"[built-in; extends _apex from user {tmp_path} (shadows the built-in)]")
    r = cli("--profiles-dir", tmp_path, "profile", "show", "quality")
    assert f"chain      quality [built-in] <- _apex [user {tmp_path}, shadows the built-in]" in r.output.splitlines()


@pytest.mark.parametrize("with_model", [False, True])
def test_profile_import_refuses_rules_that_would_not_plan(tmp_path, tiny_moe, with_model):
    rules = tmp_path / "attention-only.txt"
    rules.write_text("attn_output=q8_0\nattn_q_a=q8_0\n")
    out = tmp_path / "p.yaml"
    r = cli("profile", "import", rules, "-o", out, *(["--model", tiny_moe] if with_model else []))
    assert_one_error(r.output, 3, r.exit_code, f"{rules}: the rules do not make a profile that plans: ",
                     "types.routed_expert is required", "ffn_*_exps")
    assert not out.exists()


@pytest.mark.parametrize("command", [["profile", "list"], ["plan", "-p", "compact", "MODEL"]])
def test_a_missing_profiles_folder_in_the_environment_is_an_error(tmp_path, tiny_moe, command, monkeypatch):
    monkeypatch.setenv("APEX_ORCH_PROFILES", str(tmp_path / "nonexistent"))
    r = cli(*[tiny_moe if a == "MODEL" else a for a in command])
    assert_one_error(r.output, 3, r.exit_code, f"APEX_ORCH_PROFILES names {tmp_path / 'nonexistent'}, which is not "
                                                "a folder")


# ============================================================================ wrong answers

def test_threads_reach_every_parallel_job(tiny_moe, tmp_path):
    r = cli("quantize", tiny_moe, "-p", "compact,quality", "-j", "2", "-t", "7", "--out-dir", tmp_path, "--no-eval",
            "-q")
    assert r.exit_code == 0, r.output
    for tier in ("Compact", "Quality"):
        doc = json.loads(manifest_path(tmp_path / f"Tiny-MoE-APEX-{tier}.gguf").read_text())
        assert doc["command"][-1] == "7", doc["command"]


@pytest.fixture(scope="module")
def imatrix_file(tmp_path_factory, tiny_moe) -> Path:
    out = tmp_path_factory.mktemp("im") / "tiny.imatrix.gguf"
    r = cli("imatrix", tiny_moe, "--corpus", "wikipedia", "--imatrix-ctx", "64", "--imatrix-chunks", "2", "-o", out)
    assert r.exit_code == 0, r.output
    return out


def test_a_fit_tier_measured_with_an_imatrix_file_plans(tiny_moe, text, imatrix_file, tmp_path):
    sens = tmp_path / "sens.json"
    r = cli("sensitivity", tiny_moe, "--imatrix", imatrix_file, "--text", text, "--method", "proxy", "--types",
            "Q4_K,Q8_0", "-t", "2", "-o", sens)
    assert r.exit_code == 0, r.output
    cfg = tmp_path / "release.yaml"
    cfg.write_text(yaml.safe_dump({"name": "Fit-Im", "license": "mit", "source": {"gguf": str(tiny_moe)},
                                   "tiers": [{"fit": {"bpw": 6, "sensitivity": "sens.json"}, "tier": "Fit-6"}],
                                   "eval": {"enabled": False}, "publish": {"repo": "apex-test/Fit-Im"}}))
    r = cli("release", cfg, "--dry-run", "--out-dir", tmp_path / "out")
    assert r.exit_code == 0, r.output
    assert "imatrix   corpus diverse, " in r.output and "cannot be planned here" not in r.output
    assert "Fit-6 " in r.output and not (tmp_path / "out").exists()
    assert json.loads(sens.read_text())["imatrix"]["corpus"] is None     # a file: no corpus name


def test_the_imatrix_text_is_refused_as_measurement_text_however_given(tiny_moe, imatrix_file, tmp_path):
    from apex_orch.calibration.imatrix_file import read_imatrix
    dataset = Path(read_imatrix(imatrix_file).datasets[0])
    r = cli("sensitivity", tiny_moe, "--imatrix", imatrix_file, "--text", dataset, "--dry-run")
    assert_one_error(r.output, 2, r.exit_code, f"the measurement text {dataset} is the text the imatrix was "
                                                "computed on", "it must be held out")
    copy = tmp_path / "copy.txt"                       # the same bytes under another name
    copy.write_bytes(dataset.read_bytes())
    r = cli("sensitivity", tiny_moe, "--imatrix", imatrix_file, "--text", copy, "--dry-run")
    assert_one_error(r.output, 2, r.exit_code, "is the text the imatrix was computed on")


# ============================================================================ fail early, name the right thing

def test_a_long_tier_name_is_refused_before_any_tool(tiny_moe, tmp_path, tripwire):
    prof = tmp_path / "long.yaml"
    prof.write_text(f"extends: compact\ntier: {'T' * 300}\n")
    r = cli("quantize", tiny_moe, "-p", prof, "--out-dir", tmp_path / "out", "--no-eval", "-q")
    assert_one_error(r.output, 2, r.exit_code, "exceeds the 255 bytes a file name may have", "shorter tier name")
    assert not tripwire.exists() and not (tmp_path / "out").exists()


def test_a_long_output_name_is_refused_before_the_fit(tiny_moe, tmp_path):
    sens = tmp_path / "s.json"
    sens.write_text(made_up_sensitivity(tiny_moe).to_json())
    out = tmp_path / ("f" * 300 + ".yaml")
    r = cli("fit", tiny_moe, "--sensitivity", sens, "--bpw", "6", "-o", out)
    assert_one_error(r.output, 2, r.exit_code, "the name is 305 bytes; at most")
    assert "fitted to" not in r.output


@pytest.mark.parametrize("command", ["sensitivity", "eval"])
def test_too_few_scored_tokens_are_refused_before_any_tool(tiny_moe, text, command):
    args = (["sensitivity", tiny_moe, "--text", text] if command == "sensitivity"
            else ["eval", tiny_moe, "--base", tiny_moe, "--text", text])
    r = cli(*args, "-c", "64", "--chunks", "2", "--dry-run")
    assert_one_error(r.output, 14, r.exit_code, f"{text}: 2 chunk(s) of 64 tokens score 62 tokens; KL statistics "
                                                 "need at least 100", "--chunks")


@pytest.mark.parametrize("command", ["sensitivity", "eval"])
def test_a_short_text_is_blamed_on_the_text(tiny_moe, tmp_path, command):
    short = tmp_path / "short.txt"
    short.write_text(demo_text()[:400])
    args = (["sensitivity", tiny_moe, "--text", short] if command == "sensitivity"
            else ["eval", tiny_moe, "--text", short])
    r = cli(*args, "-c", "128", "--dry-run")
    assert_one_error(r.output, 14, r.exit_code, f"{short}: the evaluation text is too short: ",
                     "tokens, but a context of 128 needs at least 256")


def test_a_release_checks_its_eval_text_before_any_tier(tiny_moe, tmp_path, tripwire):
    (tmp_path / "short.txt").write_text(demo_text()[:400])
    cfg = tmp_path / "release.yaml"
    cfg.write_text(yaml.safe_dump({"name": "Short", "license": "mit", "source": {"gguf": str(tiny_moe)},
                                   "tiers": ["compact"], "eval": {"text": "short.txt", "ctx": 128},
                                   "publish": {"repo": "apex-test/Short"}}))
    out = tmp_path / "out"
    for dry in (True, False):
        r = cli("release", cfg, "--out-dir", out, *(["--dry-run"] if dry else []))
        assert_one_error(r.output, 14, r.exit_code, f"{tmp_path / 'short.txt'}: the evaluation text is too short",
                         "eval.text")
    assert not tripwire.exists()
    assert not list(out.glob("*.gguf"))


@pytest.mark.parametrize("where", ["quantize", "release"])
def test_a_split_size_below_the_largest_tensor_is_refused_up_front(tiny_moe, tmp_path, where, tripwire):
    if where == "quantize":
        r = cli("quantize", tiny_moe, "-p", "compact", "--split-max-size", "1M", "--out-dir", tmp_path, "--no-eval")
    else:
        cfg = tmp_path / "release.yaml"
        cfg.write_text(yaml.safe_dump({"name": "Split", "license": "mit", "source": {"gguf": str(tiny_moe)},
                                       "tiers": ["compact"], "split_max_size": "1M", "eval": {"enabled": False},
                                       "publish": {"repo": "apex-test/Split"}}))
        r = cli("release", cfg, "--dry-run", "--out-dir", tmp_path / "out")
    named = "--split-max-size: " if where == "quantize" else ""   # the release's comes from its config
    assert_one_error(r.output, 2, r.exit_code, f"error: {named}parts of 1,000,000 bytes: the tensor output.weight "
                                               f"alone is ",
                     "more than a part may hold (1,000,000 bytes)", "use at least 7M")
    assert not tripwire.exists() and not list(tmp_path.glob("*.gguf"))


def test_a_full_temporary_folder_names_tmpdir(tiny_moe, text, tmp_path):
    t = own_text(tmp_path, text, "tmpdir")
    with tmpfs(tmp_path / "small-tmp", "1M") as small:
        p = run_cli("sensitivity", tiny_moe, "--text", t, *PROXY, env={"TMPDIR": str(small)})
        assert_one_error(p.stdout + p.stderr, 11, p.returncode, f"not enough free disk in {small}",
                         f"temporary folder ({small}); free some space there or point TMPDIR at a disk with room")
        assert os.listdir(small) == []


# ============================================================================ Ray

@pytest.fixture(scope="module")
def small_release(tmp_path_factory, tiny_moe) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("rel")
    cfg = folder / "release.yaml"
    cfg.write_text(yaml.safe_dump({"name": "Ray-Less", "license": "mit", "source": {"gguf": str(tiny_moe)},
                                   "tiers": ["compact"], "eval": {"enabled": False},
                                   "publish": {"repo": "apex-test/Ray-Less"}}))
    out = folder / "out"
    r = cli("release", cfg, "--out-dir", out, "-j", "1")
    assert r.exit_code == 0, r.output
    return cfg, out


def test_an_unreachable_ray_address_is_refused_by_the_port_probe(small_release):
    pytest.importorskip("ray", reason="the ray extra is not installed")
    cfg, out = small_release
    r = cli("release", cfg, "--out-dir", out, "--only", "quantize", "--executor", "ray://127.0.0.1:1")
    assert_one_error(r.output, 18, r.exit_code, "cannot reach the Ray cluster at ray://127.0.0.1:1: "
                                                 "ConnectionRefusedError")
    assert "Warning" not in r.output


def test_a_phase_that_runs_no_task_never_asks_for_the_cluster(small_release):
    cfg, out = small_release
    card = (out / "README.md").read_bytes()
    r = cli("release", cfg, "--out-dir", out, "--only", "card", "--executor", "ray://127.0.0.1:1")
    assert r.exit_code == 0, r.output
    assert "card" in r.output and (out / "README.md").read_bytes() == card
