"""Release baselines, task sets and the calibration opt-out: the config's schema, the refusals (each one
message, its own exit code, nothing written), a baseline fetched from the (fake) Hub at its pinned
revision and checked against the source, the criterion that marks a tier, and the demo's task files.

The end-to-end release with a baseline, tasks, llama-bench speed, the plot and the published calibration
is tests/test_release.py's pipeline; the card's golden file pins the demo config's card.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from apex_orch.cli import main
from apex_orch.core.errors import BaselineError, ConfigError, RequestError, TaskError
from apex_orch.evaluation.baselines import Point, beats, closer_baselines, closer_sentence
from apex_orch.llama.tools import find_tool, run_tool
from apex_orch.release.config_reader import load_release

ROOT = Path(__file__).resolve().parent.parent
TASKS = ROOT / "releases" / "demo-tasks"


def invoke(*args: str):
    return CliRunner().invoke(main, list(args))


def write_cfg(folder: Path, eval_text: Path, **extra) -> Path:
    doc = {"name": "X", "license": "mit", "source": {"demo": True}, "tiers": ["compact"],
           "eval": {"text": str(eval_text), "ctx": 128, "chunks": 2}, "publish": {"repo": "o/x"}}
    doc.update(extra)
    path = folder / "r.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


# ----------------------------------------------------------------------------- the schema

@pytest.mark.parametrize("baselines, key, message", [
    (["Q4_K_X"], ("baselines", 0), "unknown preset 'Q4_K_X': not a quantized llama-quantize type"),
    ([{"preset": "F16"}], ("baselines", 0, "preset"), "unknown preset 'F16'"),
    (["IQ2_XS"], ("baselines", 0), "preset IQ2_XS needs an importance matrix"),
    ([{"preset": "Q4_K_M", "name": "Compact"}], ("baselines", 0), "its name 'Compact' is the name of a tier"),
    ([{"file": "X-APEX-Compact.gguf"}], ("baselines", 0),
     "its file name X-APEX-Compact.gguf is the file name of tier Compact; a baseline is never published as a tier"),
    (["Q8_0", {"preset": "q8_0"}], ("baselines", 1), "baseline 'Q8_0' is listed twice"),
    ([{"preset": "Q8_0", "file": "a.gguf"}], ("baselines", 0), "give exactly one of preset, file, hf (got preset, "
                                                               "file)"),
    ([{"file": "a.gguf", "imatrix": True}], ("baselines", 0, "imatrix"), "imatrix: true is for presets"),
    ([{"hf": {"repo": "o/m", "revision": "main", "file": "m.gguf"}}], ("baselines", 0, "hf", "revision"),
     "'main' is not a pinned revision"),
    ([{"preset": "Q8_0", "nmae": "x"}], ("baselines", 0, "nmae"), "unknown key 'baselines[0].nmae'"),
])
def test_baseline_config_errors_name_file_and_line(tmp_path, eval_text, baselines, key, message):
    p = write_cfg(tmp_path, eval_text, baselines=baselines)
    with pytest.raises(ConfigError) as err:
        load_release(p)
    assert message in err.value.message
    from apex_orch.core.yamlio import load_yaml
    assert err.value.where == load_yaml(p, ConfigError).where(key)


@pytest.mark.parametrize("eval_extra, key, message", [
    ({"tasks": ["hellaswagg"]}, ("eval", "tasks", 0, "task"), "eval.tasks[0].task must be one of hellaswag,"),
    ({"tasks": ["mmlu", {"task": "mmlu", "file": "m.bin"}]}, ("eval", "tasks", 1), "task mmlu is listed twice"),
    ({"tasks": [{"task": "mmlu", "count": 0}]}, ("eval", "tasks", 0, "count"),
     "eval.tasks[0].count must be an integer of at least 1"),
    ({"speed": {"repetitions": 0}}, ("eval", "speed", "repetitions"),
     "eval.speed.repetitions must be an integer of at least 1"),
    ({"speed": {"reps": 3}}, ("eval", "speed", "reps"), "unknown key 'eval.speed.reps'"),
    ({"task_ctx": 8}, ("eval", "task_ctx"), "expected an integer >= 16"),
])
def test_eval_task_and_speed_config_errors(tmp_path, eval_text, eval_extra, key, message):
    p = write_cfg(tmp_path, eval_text)
    doc = yaml.safe_load(p.read_text())
    doc["eval"].update(eval_extra)
    p.write_text(yaml.safe_dump(doc, sort_keys=False))
    with pytest.raises(ConfigError) as err:
        load_release(p)
    assert message in err.value.message
    from apex_orch.core.yamlio import load_yaml
    assert err.value.where == load_yaml(p, ConfigError).where(key)


def test_baselines_and_tasks_as_read(tmp_path, eval_text):
    p = write_cfg(tmp_path, eval_text, baselines=["q8_0", {"preset": "Q4_K_M", "imatrix": True},
                                                  {"file": "other.gguf", "name": "Other Q4_K_M"},
                                                  {"hf": {"repo": "o/m-GGUF", "revision": "a" * 40, "file": "m.gguf"}}])
    doc = yaml.safe_load(p.read_text())
    doc["eval"].update({"speed": {"repetitions": 3, "prompt": 64}, "task_ctx": 256,
                        "tasks": ["mmlu", {"task": "hellaswag", "file": "hs.txt", "count": 50}]})
    p.write_text(yaml.safe_dump(doc, sort_keys=False))
    cfg = load_release(p)
    assert [(b.kind, b.label, b.preset, b.imatrix) for b in cfg.baselines] == [
        ("preset", "Q8_0", "Q8_0", False), ("preset", "Q4_K_M (imatrix)", "Q4_K_M", True),
        ("file", "Other Q4_K_M", None, False), ("hf", "m", None, False)]
    assert cfg.baselines[2].path.resolve() == tmp_path / "other.gguf"
    assert (cfg.baselines[3].hf.repo, cfg.baselines[3].hf.files) == ("o/m-GGUF", ("m.gguf",))
    # an imatrix baseline needs the imatrix though no tier does: the corpus defaults to diverse
    assert cfg.imatrix is not None and cfg.imatrix.corpus == "diverse" and cfg.i_baselines == [cfg.baselines[1]]
    e = cfg.eval
    assert (e.speed, e.speed_repetitions, e.speed_tokens, e.task_ctx) == (True, 3, (64, 128), 256)
    assert [(t.task, t.file.resolve() if t.file else None, t.count) for t in e.tasks] == [
        ("mmlu", None, None), ("hellaswag", tmp_path / "hs.txt", 50)]


# ----------------------------------------------------------------------------- refusals, nothing written

def test_a_baseline_of_another_model_is_refused_before_anything_is_written(tmp_path, eval_text, qwen3moe,
                                                                          mistral4_split, mistral4_fused):
    out = tmp_path / "out"
    p = write_cfg(tmp_path, eval_text, baselines=[{"file": str(qwen3moe), "name": "Qwen"}])
    res = invoke("release", str(p), "--out-dir", str(out))
    assert res.exit_code == BaselineError.exit_code == 22, res.output
    assert res.output.startswith(f"error: {p}:") and "baseline 'Qwen' (qwen3moe.gguf) is not a quantization of this " \
        "release's source: its architecture is qwen3moe, the source's mistral4" in res.output
    assert not out.exists()
    # the same architecture and shape, other tensors (fused gate_up experts): the difference is named
    p = write_cfg(tmp_path, eval_text, source={"gguf": str(mistral4_split)}, baselines=[{"file": str(mistral4_fused)}])
    res = invoke("release", str(p), "--out-dir", str(out))
    assert res.exit_code == 22, res.output
    assert ("baseline 'mistral4-fused' (mistral4-fused.gguf) is not a quantization of this release's source: 24 of "
            "the source's tensors missing (blk.0.ffn_gate_exps.weight, blk.0.ffn_up_exps.weight, "
            "blk.1.ffn_gate_exps.weight ...); 12 tensors the source lacks (blk.0.ffn_gate_up_exps.weight") in res.output
    assert not out.exists()
    assert invoke("release", str(p), "--dry-run", "--out-dir", str(out)).exit_code == 22   # the dry run too


def test_an_unknown_preset_and_a_colliding_name_are_config_errors(tmp_path, eval_text):
    out = tmp_path / "out"
    for baselines, message in ((["Q4_K_X"], "unknown preset 'Q4_K_X'"),
                               ([{"file": "X-APEX-Compact.gguf"}], "is the file name of tier Compact")):
        p = write_cfg(tmp_path, eval_text, baselines=baselines)
        res = invoke("release", str(p), "--out-dir", str(out))
        assert res.exit_code == ConfigError.exit_code == 3 and message in res.output
        assert not out.exists()


def test_a_missing_task_file_is_refused_at_its_config_line(tmp_path, eval_text):
    out = tmp_path / "out"
    p = write_cfg(tmp_path, eval_text)
    doc = yaml.safe_load(p.read_text())
    doc["eval"]["tasks"] = [{"task": "mmlu", "file": str(TASKS / "mmlu.bin")}, {"task": "hellaswag", "file": "hs.txt"}]
    p.write_text(yaml.safe_dump(doc, sort_keys=False))
    from apex_orch.core.yamlio import load_yaml
    line = load_yaml(p, ConfigError).where(("eval", "tasks", 1))
    res = invoke("release", str(p), "--out-dir", str(out))
    assert res.exit_code == TaskError.exit_code == 21, res.output
    assert res.output.startswith(f"error: {line}: eval.tasks[1]: the HellaSwag task file {tmp_path / 'hs.txt'} "
                                 "does not exist\n")
    assert not out.exists()
    # a file that is there but malformed names its own line
    (tmp_path / "hs.txt").write_text("a context\n7\nA\nB\nC\nD\n")
    res = invoke("release", str(p), "--out-dir", str(out))
    assert res.exit_code == 21 and f"error: {tmp_path / 'hs.txt'}:2:" in res.output
    assert not out.exists()
    assert invoke("release", str(p), "--dry-run", "--out-dir", str(out)).exit_code == 21


def test_no_calibration_upload_without_a_calibration_is_a_usage_error(tmp_path, eval_text):
    out = tmp_path / "out"
    p = write_cfg(tmp_path, eval_text)             # Compact only: no imatrix anywhere
    res = invoke("release", str(p), "--out-dir", str(out), "--no-calibration-upload")
    assert res.exit_code == RequestError.exit_code == 2
    assert res.output.startswith("error: --no-calibration-upload: this release uses no importance matrix (no I-tier "
                                 "and no imatrix baseline), so there is no calibration to leave out of the upload")
    assert not out.exists()
    assert invoke("release", str(p), "--dry-run", "--no-calibration-upload").exit_code == 2


def test_dry_run_says_what_the_opt_out_leaves_out(tmp_path, eval_text):
    p = write_cfg(tmp_path, eval_text, tiers=["i-compact"])
    with_cal = json.loads(invoke("release", str(p), "--dry-run", "--json", "--out-dir", str(tmp_path / "o")).stdout)
    assert with_cal["calibration_files"] == ["calibration/imatrix.gguf", "calibration/calibration.txt",
                                             "calibration/calibration.json"]
    res = invoke("release", str(p), "--dry-run", "--no-calibration-upload", "--out-dir", str(tmp_path / "o"))
    assert res.exit_code == 0 and "the calibration is not published (the card says so)" in res.output
    assert not (tmp_path / "o").exists()


# ----------------------------------------------------------------------------- a Hub baseline

@pytest.fixture
def hub(monkeypatch):
    from hubserver import running_hub
    with running_hub(monkeypatch) as server:
        yield server


def test_a_hub_baseline_is_fetched_at_its_pinned_revision_and_checked(tmp_path, hub, eval_text, mistral4_split,
                                                                      qwen3moe):
    """Another publisher's quantization of the source, served by the fake Hub (tests/hubserver.py) to the real
    huggingface_hub client: downloaded at the pinned commit by the fetch phase, checked against the source by
    the convert phase, shown by the dry run with its real size; a file of another model is refused there."""
    q8 = tmp_path / "m-Q8_0.gguf"
    run_tool([find_tool("llama-quantize").path, mistral4_split, q8, "Q8_0", "2"])
    rev = hub.add_file("other/M-GGUF", "M-Q8_0.gguf", q8.read_bytes())
    bad_rev = hub.add_file("other/Q-GGUF", "Q-Q8_0.gguf", qwen3moe.read_bytes())
    entry = {"hf": {"repo": "other/M-GGUF", "revision": rev, "file": "M-Q8_0.gguf"}, "name": "other Q8_0"}
    p = write_cfg(tmp_path, eval_text, source={"gguf": str(mistral4_split)}, baselines=[entry])
    out = tmp_path / "out"
    before = json.loads(invoke("release", str(p), "--dry-run", "--json", "--out-dir", str(out)).stdout)
    [b] = before["baselines"]
    assert (b["name"], b["kind"], b["present"], b["size"]) == ("other Q8_0", "hf", False, None)
    assert "not in the Hugging Face cache" in b["problem"]
    res = invoke("release", str(p), "--only", "fetch,convert", "--out-dir", str(out))
    assert res.exit_code == 0, res.output
    resolves = [r.path for r in hub.requests if r.op == "resolve"]
    assert resolves and set(resolves) == {f"/other/M-GGUF/resolve/{rev}/M-Q8_0.gguf"}
    after = json.loads(invoke("release", str(p), "--dry-run", "--json", "--out-dir", str(out)).stdout)
    [b] = after["baselines"]
    assert (b["present"], b["size"], b["file"], b["problem"]) == (True, q8.stat().st_size, "M-Q8_0.gguf", None)
    assert Path(b["path"]).read_bytes() == q8.read_bytes()
    assert not list(out.glob("*.gguf"))                      # never in the release folder
    # a file of another model, at its pinned revision: refused once the source is known, before any tool
    entry["hf"].update(repo="other/Q-GGUF", revision=bad_rev, file="Q-Q8_0.gguf")
    p = write_cfg(tmp_path, eval_text, source={"gguf": str(mistral4_split)}, baselines=[entry])
    res = invoke("release", str(p), "--out-dir", str(tmp_path / "out2"))
    assert res.exit_code == 22 and "its architecture is qwen3moe, the source's mistral4" in res.output
    assert not [f for f in (tmp_path / "out2").rglob("*") if f.suffix in (".gguf", ".md") or "eval" in f.parts]


# ----------------------------------------------------------------------------- which tier a baseline beats

def test_a_tier_is_marked_only_when_a_baseline_no_larger_is_closer_beyond_the_errors():
    t = Point("Compact", 100, 0.5, 0.125, False)                      # its range: 0.375 .. 0.625
    assert beats(Point("Q4_K_M", 90, 0.25, 0.0625, True), t)          # 0.3125 < 0.375: clear of both errors
    assert beats(Point("Q4_K_M", 100, 0.25, 0.0625, True), t)         # no larger counts
    assert not beats(Point("Q4_K_M", 101, 0.0625, 0.0, True), t)      # larger: never
    assert not beats(Point("Q4_K_M", 90, 0.25, 0.125, True), t)       # the ranges touch: not beyond the errors
    assert not beats(Point("Q4_K_M", 90, 0.25, None, True), Point("Compact", 100, None, None, False))
    pts = [t, Point("I-Compact", 100, 0.25, 0.0625, False), Point("Q4_K_M", 95, 0.25, 0.0625, True),
           Point("IQ4_XS", 80, 0.3125, 0.0, True)]
    assert [(a.name, b.name) for a, b in closer_baselines(pts)] == [("Compact", "Q4_K_M")]   # the closest of two
    assert closer_sentence(pts[0], pts[2], lambda n: f"{n} B") == (
        "Q4_K_M is smaller and closer to the source than Compact: mean KLD 0.250000 ± 0.062500 at 95 B, against "
        "0.500000 ± 0.125000 at 100 B.")


def test_demo_task_files_are_the_writers_output_of_the_project_samples(tmp_path):
    """releases/demo-tasks/ holds what apex_orch's writers make of tests/task_samples.py (no benchmark data)."""
    import task_samples

    from apex_orch.evaluation.task_files import write_hellaswag, write_multiple_choice, write_winogrande
    for name, write, tasks in (("hellaswag.txt", write_hellaswag, task_samples.HELLASWAG),
                               ("winogrande.csv", write_winogrande, task_samples.WINOGRANDE),
                               ("mmlu.bin", write_multiple_choice, task_samples.CHOICES)):
        made = write(tmp_path / name, tasks)
        if os.environ.get("APEX_UPDATE_GOLDEN") == "1":
            (TASKS / name).write_bytes(made.read_bytes())
        assert (TASKS / name).read_bytes() == made.read_bytes(), name
