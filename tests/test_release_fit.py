"""Release tiers by size (`fit:` in a release config, release.fit_tiers).

A real sensitivity is measured once on the demo model with the real tool (Q4_K and Q8_0, 2 chunks
of 128 tokens of the wikipedia corpus, no imatrix; a few minutes on two busy cores); the release
then fits a tier to 3.6 MB (between the all-Q4_K and all-Q8_0 files of the trained demo) next to an
ordinary tier, quantizes both with llama-quantize and writes the card. The config errors that come
before the sensitivity file is read need no measurement.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from gguf.constants import GGMLQuantizationType as T

from apex_orch.core.errors import ConfigError, ResultFileError
from apex_orch.core.text import disk_size
from apex_orch.demo.trained import demo_model_path
from apex_orch.fit.fitter import fit_profile
from apex_orch.fit.measurements import Sensitivity, load_sensitivity
from apex_orch.model.gguf_header import read_header
from apex_orch.model.info import read_model
from apex_orch.release import runner as rel
from apex_orch.release.config_reader import load_release
from apex_orch.cli.release_preview import format_preview
from apex_orch.release.dryrun import describe_release
from apex_orch.release.fit_tiers import fitted_sentence
from apex_orch.release.state import WORK_DIR

pytestmark = pytest.mark.requires_tools("llama-quantize")

NAME = "Fit-Demo"
SIZE = 3_600_000
TIER = "Compact-3.6MB"


@pytest.fixture(scope="module")
def sens_path(tmp_path_factory) -> Path:
    """`apex-orch sensitivity` on the demo model, run as a user would (a subprocess)."""
    out = tmp_path_factory.mktemp("sens") / "sens.json"
    argv = [sys.executable, "-m", "apex_orch.cli", "sensitivity", str(demo_model_path()), "--eval-corpus",
            "wikipedia", "--types", "Q4_K,Q8_0", "--chunks", "2", "-c", "128", "-t", "2", "-o", str(out)]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out


def write_config(folder: Path, sens: Path, tiers: list, **extra) -> Path:
    doc = {"name": NAME, "license": "mit", "source": {"demo": True}, "tiers": tiers,
           "publish": {"repo": "apex-test/Fit-Demo-APEX-GGUF"}}
    doc.update(extra)
    (folder / "sens.json").write_bytes(sens.read_bytes())   # relative to the YAML's folder
    path = folder / "release.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


FIT_TIER = {"fit": {"size": "3.6MB", "sensitivity": "sens.json"}, "tier": TIER}


@pytest.fixture(scope="module")
def released(tmp_path_factory, sens_path):
    """A release of the fit tier and Compact, phases fetch..card (no eval, no imatrix needed)."""
    folder = tmp_path_factory.mktemp("release")
    cfg_path = write_config(folder, sens_path, [FIT_TIER, "compact"])
    config = load_release(cfg_path)
    out = folder / "out"
    log: list[str] = []
    result = rel.run_release(config, phases=list(rel.PHASES[:-1]), out_dir=out, progress=log.append, jobs=1)
    fitted_yaml = out / WORK_DIR / "fitted" / f"{TIER}.yaml"
    snapshot = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.rglob("*") if p.is_file()}
    again = rel.run_release(load_release(cfg_path), phases=list(rel.PHASES[:-1]), out_dir=out, jobs=1)
    return {"folder": folder, "cfg": cfg_path, "config": config, "out": out, "log": log, "result": result,
            "again": again, "snapshot": snapshot, "fitted_yaml": fitted_yaml}


@pytest.fixture(scope="module")
def expected_fit(sens_path):
    """The fit `apex-orch fit --size 3.6MB --tier Compact-3.6MB` makes of the demo model, computed here."""
    return fit_profile(read_model(demo_model_path()), load_sensitivity(sens_path), size=SIZE, tier=TIER)


# ----------------------------------------------------------------------------- the release


@pytest.mark.slow
def test_fit_tier_is_fitted_written_and_quantized_to_the_plan(released, expected_fit):
    state = released["result"].state
    assert [t.tier for t in state.config.tiers] == [TIER, "Compact"]
    assert released["fitted_yaml"].read_text() == expected_fit.yaml_text
    job = state.jobs[0]
    assert (job.profile.tier, job.profile.name, job.imatrix) == (TIER, TIER, None)
    assert job.profile.path == released["fitted_yaml"]
    f = released["out"] / f"{NAME}-APEX-{TIER}.gguf"
    assert state.files[TIER] == [f]
    written = {t.name: t.ggml_type for t in read_header(f).tensors}
    planned = {t.name: t.final_type for t in expected_fit.plan.tensors}
    assert written == planned
    assert {t.name: t.final_type for t in job.plan.tensors} == planned
    # the file is exactly the plan's predicted size, and under the size (metadata included)
    assert f.stat().st_size == job.predicted_size
    assert job.plan.total_bytes == expected_fit.plan.total_bytes == expected_fit.solution.tensor_bytes
    assert job.predicted_size <= expected_fit.file_bytes <= SIZE
    assert read_header(f).kv["apex.tier"] == TIER
    line = next(m for m in released["log"] if m.startswith(f"fit: {TIER} fitted"))
    assert line == (f"fit: {TIER} fitted to 3.60 MB: {expected_fit.file_bytes:,} bytes "
                    f"({expected_fit.file_bytes / 1e6:.2f} MB, {expected_fit.plan.bpw:.3f} bpw), predicted mean KLD "
                    f"{expected_fit.solution.kld_mean:.5f}; profile {WORK_DIR}/fitted/{TIER}.yaml")
    assert any("nearest size" in m for m in released["log"]) == (not expected_fit.within)
    # the caller's config still holds the placeholder; the state holds the fitted profile
    assert released["config"].tiers[0].fit_pending and not state.config.tiers[0].fit_pending
    assert state.config.tiers[0].fit == released["config"].tiers[0].fit


@pytest.mark.slow
def test_card_says_how_the_fit_tier_was_chosen(released, expected_fit, sens_path):
    text = (released["out"] / "README.md").read_text()
    sens = json.loads(sens_path.read_text())
    sentence = (f"{TIER} was fitted by `apex-orch fit` to 3.60 MB from exact sensitivity measured on "
                f"{sens['model']['name']} ({sens['text']['label']}, sensitivity `{sens['key'][:12]}`): a type per "
                f"group minimising the predicted mean KLD ({float(f'{expected_fit.solution.kld_mean:.6g}'):.4g}) under "
                "the size, APEX structure kept.")
    assert sens["method"]["name"] == "exact"
    assert text.count(sentence) == 1
    assert text.count("was fitted by `apex-orch fit`") == 1           # Compact is an ordinary tier
    section = text.split(f"### {NAME}-APEX-{TIER}.gguf\n\n")[1].split("\n\n")
    assert section[0].startswith(f"Profile `{TIER}` ({TIER}), llama-quantize base ")
    assert section[1] == sentence
    assert f"| {NAME}-APEX-{TIER}.gguf | {TIER} | " in text and "| A file of exactly this size |" in text


@pytest.mark.slow
def test_rerun_fits_again_and_changes_nothing(released):
    rows = {r.name: r.status for r in released["again"].reports}
    assert rows == {"fetch": "not needed", "convert": "not needed", "imatrix": "not needed",
                    "quantize": "up to date", "eval": "not needed", "card": "up to date"}
    now = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in released["out"].rglob("*") if p.is_file()}
    changed = {p.name for p in now if now[p] != released["snapshot"].get(p)}
    assert changed == {"release.log", "last-run.json"}


@pytest.mark.slow
def test_dry_run_shows_the_fit_tier_and_writes_nothing(released, expected_fit, tmp_path):
    config = load_release(released["cfg"])
    out = tmp_path / "out"
    preview = describe_release(config, out_dir=out)
    text = format_preview(preview)
    job = released["result"].state.jobs[0]
    tier = next(t for t in preview.tiers if t.tier == TIER)
    assert (tier.file, tier.size, tier.bpw, tier.parts, tier.present) == (
        f"{NAME}-APEX-{TIER}.gguf", job.predicted_size, job.plan.bpw, 1, False)
    row = next(ln for ln in text.splitlines() if ln.startswith(f"{TIER} "))
    assert re.split(r"\s{2,}", row.strip()) == [
        TIER, f"{NAME}-APEX-{TIER}.gguf", disk_size(job.predicted_size), f"{job.predicted_size / 2**30:.2f}",
        f"{job.plan.bpw:.3f}", "1", "missing"]
    assert (f"note      fit: {TIER} fitted to 3.60 MB: {expected_fit.file_bytes:,} bytes "
            f"({expected_fit.file_bytes / 1e6:.2f} MB, {expected_fit.plan.bpw:.3f} bpw), predicted mean KLD "
            f"{expected_fit.solution.kld_mean:.5f}") in text.splitlines()
    assert f"  {TIER}: $ " in text
    assert not out.exists()
    assert config.tiers[0].fit_pending                               # the caller's config is untouched


@pytest.mark.slow
def test_a_fit_short_of_the_size_warns_with_the_nearest_size(tmp_path, sens_path):
    """6 MB is more than the all-Q8_0 file: the nearest size is that file, far more than 0.5% under."""
    cfg = load_release(write_config(tmp_path, sens_path, [{"fit": {"size": "6MB", "sensitivity": "sens.json"},
                                                           "tier": "Q8-6MB"}]))
    text = format_preview(describe_release(cfg, out_dir=tmp_path / "out"))
    fit = fit_profile(read_model(demo_model_path()), load_sensitivity(sens_path), size=6_000_000, tier="Q8-6MB")
    assert not fit.within and set(fit.solution.types.values()) == {T.Q8_0}
    assert (f"note      warning: fit: Q8-6MB: the nearest size the measured types reach is "
            f"{fit.file_bytes / 1e6:.2f} MB, {100 * (1 - fit.file_bytes / 6e6):.2f}% under 6.00 MB (more than 0.5%)"
            in text.splitlines())
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- config


@pytest.mark.slow
def test_fit_tier_config_placeholder(tmp_path, sens_path):
    cfg = load_release(write_config(tmp_path, sens_path, [
        {"fit": {"bpw": 5.5, "sensitivity": "sens.json", "from": "compact", "structure": "free"},
         "tier": "Compact-5.5bpw", "best_for": "One small GPU"}, "compact"]))
    t = cfg.tiers[0]
    assert (t.tier, t.best_for, t.where, t.fit_pending) == ("Compact-5.5bpw", "One small GPU", f"{cfg.path}:6", True)
    s = t.fit
    assert (s.size, s.bpw, s.base, s.structure, s.imatrix, s.tier, s.target) == (
        None, 5.5, "compact", False, None, "Compact-5.5bpw", "5.50 bpw")
    assert s.sensitivity.resolve() == tmp_path / "sens.json"
    p = t.profile
    assert (p.name, p.tier, p.imatrix_required, p.corpus, p.best_for) == (
        "Compact-5.5bpw", "Compact-5.5bpw", False, None, "Multi-GPU setups")
    assert "fitted" not in p.raw
    assert cfg.imatrix is None and cfg.i_tiers == []
    default = load_release(write_config(tmp_path, sens_path, [FIT_TIER])).tiers[0]
    assert (default.best_for, default.fit.size, default.fit.structure, default.fit.target) == (
        "A file of exactly this size", SIZE, True, "3.60 MB")


@pytest.mark.slow
def test_fit_tier_needs_the_imatrix_its_sensitivity_was_measured_with(tmp_path, sens_path):
    data = json.loads(sens_path.read_text())
    data["imatrix"] = {"file": "demo.imatrix.gguf", "sha256": "0" * 64, "corpus": "diverse"}
    measured = tmp_path / "im.json"
    measured.write_text(Sensitivity(data).to_json())   # an edited result: its checksum made anew
    cfg = load_release(write_config(tmp_path, measured, [
        {"fit": {"size": "3.7MB", "sensitivity": str(measured)}, "tier": "I-Fit"}, "compact"]))
    assert [t.tier for t in cfg.i_tiers] == ["I-Fit"]
    assert (cfg.tiers[0].profile.corpus, cfg.imatrix.corpus) == ("diverse", "diverse")
    off = load_release(write_config(tmp_path, measured, [
        {"fit": {"size": "3.7MB", "sensitivity": str(measured), "imatrix": False}, "tier": "Fit"}]))
    assert (off.tiers[0].profile.imatrix_required, off.imatrix, off.tiers[0].fit.imatrix) == (False, None, False)


def fit_config(tmp_path: Path, tiers: str) -> Path:
    """A config whose tiers section starts at line 4 (so a tier's own lines are 5, 6, ...)."""
    (tmp_path / "not-sens.json").write_text('{"format": "something else"}\n')
    p = tmp_path / "r.yaml"
    p.write_text("name: X\nlicense: mit\nsource: {demo: true}\ntiers:\n" + tiers + "publish: {repo: o/x}\n")
    return p


@pytest.mark.parametrize("tiers, line, message", [
    ("  - fit: {size: 55MB, bpw: 4.5, sensitivity: s.json}\n    tier: F\n", 5,
     "tiers[0].fit: give exactly one of size or bpw (got size and bpw)"),
    ("  - fit: {sensitivity: s.json}\n    tier: F\n", 5, "tiers[0].fit: give exactly one of size or bpw (got neither)"),
    ("  - fit:\n      size: 55 parsecs\n      sensitivity: s.json\n    tier: F\n", 6,
     "tiers[0].fit.size: '55 parsecs' is not a size such as 48G, 48GB, 45GiB, 48e9 or 500M (K/M/G/T and KB/MB/GB/TB "
     "are powers of 1000, KiB/MiB/GiB/TiB powers of 1024, a plain number is bytes)"),
    ("  - fit:\n      size: 0.5MB\n      sensitivity: s.json\n    tier: F\n", 6,
     "tiers[0].fit.size: 0.5MB is too small: at least 1 MB"),
    ("  - fit:\n      bpw: 40\n      sensitivity: s.json\n    tier: F\n", 6,
     "tiers[0].fit.bpw: expected bits per weight between 1 and 16, got 40"),
    ("  - fit:\n      size: 55MB\n      sensitivity: missing.json\n    tier: F\n", 7,
     "tiers[0].fit.sensitivity: {folder}/missing.json: sensitivity file not found"),
    ("  - fit:\n      size: 55MB\n      sensitivity: s.json\n      colour: red\n    tier: F\n", 8,
     "unknown key 'tiers[0].fit.colour'"),
    ("  - fit: {size: 55MB}\n    tier: F\n", 5,
     "tiers[0].fit: missing key 'sensitivity' (the result of `apex-orch sensitivity MODEL -o FILE`)"),
    ("  - fit: {size: 55MB, sensitivity: s.json}\n", 5,
     "tiers[0]: missing key 'tier' (the fitted file's display tier, e.g. I-Compact-48GB)"),
    ("  - fit: {size: 55MB, sensitivity: s.json}\n    tier: 'a: b'\n", 6, "tiers[0].tier: 'a: b' is not a tier name"),
    ("  - fit: {size: 55MB, sensitivity: s.json}\n    profile: compact\n    tier: F\n", 5,
     "tiers[0]: give profile or fit, not both"),
    ("  - {profile: compact, tier: F}\n", 5,
     "tiers[0].tier: a tier name is given only with `fit:` (a profile names its own tier)"),
    ("  - fit: [55MB]\n    tier: F\n", 5, "tiers[0].fit: expected a mapping, got a list"),
    ("  - fit: {size: 55MB, sensitivity: .}\n    tier: F\n", 5,
     "tiers[0].fit.sensitivity: {folder}: cannot be read (Is a directory)"),
])
def test_fit_config_errors_name_file_and_line(tmp_path, tiers, line, message):
    p = fit_config(tmp_path, tiers)
    with pytest.raises(ConfigError) as err:
        load_release(p)
    assert (err.value.where, err.value.message) == (f"{p}:{line}", message.format(folder=tmp_path))


def test_a_fit_tier_on_a_file_that_is_no_sensitivity_result_keeps_its_exit_code(tmp_path):
    p = fit_config(tmp_path, "  - fit:\n      size: 55MB\n      sensitivity: not-sens.json\n    tier: F\n")
    with pytest.raises(ResultFileError) as err:
        load_release(p)
    assert (err.value.where, err.value.message, err.value.exit_code) == (
        f"{p}:7", f"{tmp_path}/not-sens.json: not a sensitivity result (no format: apex-orch-sensitivity)", 19)


@pytest.mark.slow
@pytest.mark.parametrize("tiers, line, message", [
    ("  - compact\n  - fit: {size: 55MB, sensitivity: sens.json}\n    tier: Compact\n", 6,
     "tiers[1]: tier Compact is listed twice (also at {path}:5)"),
    ("  - fit: {size: 55MB, sensitivity: sens.json}\n    tier: Fit-55MB\n"
     "  - fit: {size: 50MB, sensitivity: sens.json}\n    tier: Fit+55MB\n", 7,
     "tiers 'Fit-55MB' and 'Fit+55MB' both map to the file X-APEX-Fit-55MB.gguf; one would silently replace the other"),
    ("  - fit:\n      size: 55MB\n      sensitivity: sens.json\n      from: wide.yaml\n    tier: F\n", 7,
     "tiers[0].fit.sensitivity: the sensitivity was measured with the bands of APEX's own profile, not those "
     "of wide.yaml"),
    ("  - fit: {size: 55MB, sensitivity: sens.json, from: nosuch}\n    tier: F\n", 5,
     "tiers[0].fit.from: unknown profile 'nosuch'"),
])
def test_fit_tier_checks_that_need_the_measurement(tmp_path, sens_path, tiers, line, message):
    (tmp_path / "sens.json").write_bytes(sens_path.read_bytes())
    (tmp_path / "wide.yaml").write_text("extends: compact\ntier: Wide\nbands: {edge: 1, near: 1}\n")
    p = fit_config(tmp_path, tiers)
    with pytest.raises(ConfigError) as err:
        load_release(p)
    assert (err.value.where, err.value.message) == (f"{p}:{line}", message.format(path=p))


def test_fitted_sentence_wording():
    record = {"target": "3.50 bpw", "method": "exact", "sensitivity": "0123456789abcdef" * 4,
              "measured_on": "Big_Model", "text": "corpus wikipedia", "structure": "free",
              "predicted_kld_mean": 0.0123456, "tensor_bytes": 1}
    assert fitted_sentence("I-Compact-3.5bpw", record) == (
        "I-Compact-3.5bpw was fitted by `apex-orch fit` to 3.50 bpw from exact sensitivity measured on "
        "Big_Model (corpus wikipedia, sensitivity `0123456789ab`): a type per group minimising the predicted "
        "mean KLD (0.01235) under the bits per weight, types chosen freely (no APEX structure).")
