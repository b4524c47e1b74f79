"""apex-orch release: config schema, plans, the real pipeline (kill -9 mid-quantize, resume, no-op
rerun), the model card (golden file), LocalAI entries, and publishing to a fake Hub (tests/hubserver.py).

The pipeline tests run the real llama.cpp tools and bindings on the synthetic demo model, with a
two-tier config (Compact, I-Compact) and small imatrix/eval settings to stay fast; the seven-tier
demo config is covered by the golden card (its real plans) and by `make release`.
Set APEX_UPDATE_GOLDEN=1 to rewrite tests/golden/demo-card.md after an intended change.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from click.testing import CliRunner

from apex_orch import __version__
from apex_orch.evaluation.baselines import Point, closer_baselines, closer_sentence
from apex_orch.release import card, card_facts, card_results
from apex_orch.release import runner as rel
from apex_orch.release.config_reader import load_release
from apex_orch.release.dryrun import preview_imatrix
from apex_orch.release.phases import fetch as fetch_phase
from apex_orch.release.phases.convert import convert_source, converter_script
from apex_orch.release.phases.fetch import fetch_source
from apex_orch.release.baselines import plan_baseline_jobs
from apex_orch.release.phases.quantize import plan_jobs
from apex_orch.release.state import WORK_DIR, ReleaseState, check_out_dir, default_out_dir
from apex_orch.cli import main
from apex_orch.core.errors import ConfigError, GateFailedError, OutputExistsError, PublishError, RequestError
from apex_orch.core.text import hub_size
from apex_orch.llama.tools import build_label
from apex_orch.plan.planner import make_plan
from apex_orch.plan.profiles import load_profile
from apex_orch.quantize.job import plan_quantize

pytestmark = pytest.mark.requires_tools("llama-quantize", "llama-imatrix")

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = ROOT / "tests" / "golden" / "demo-card.md"
PLANTED_TOKEN = "hf_PLANTEDtestTOKENvalue0123456789abcdef"
NAME = "Demo-Release"


# ----------------------------------------------------------------------------- helpers

def write_projector(path: Path) -> Path:
    """A tiny vision-projector GGUF (general.architecture clip, F16), like convert_hf_to_gguf --mmproj writes."""
    import gguf
    w = gguf.GGUFWriter(str(path), "clip")
    w.add_uint32("general.file_type", 1)
    w.add_string("clip.projector_type", "pixtral")
    w.add_tensor("v.patch_embd.weight", np.arange(64, dtype=np.float16).reshape(8, 8))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def release_yaml(folder: Path, text: Path, **extra) -> Path:
    (folder / "corpus.yaml").write_text(
        "description: Synthetic prose for the release tests\nseed: 1\n"
        f"sources:\n  - path: {text}\n    split: paragraph\n")
    tasks = ROOT / "releases" / "demo-tasks"
    doc = {"name": NAME, "base_model": "apex-orch/APEX-Demo-MoE", "license": "mit",
           "source": {"demo": True}, "tiers": ["compact", "i-compact"],
           "imatrix": {"corpus": "corpus.yaml", "ctx": 128, "chunks": 4},
           # llama-bench with short tests (the card's columns say pp32 / tg8) and two runs, for the sd
           "eval": {"text": str(text), "ctx": 128, "chunks": 2, "speed": {"repetitions": 2, "prompt": 32, "gen": 8},
                    "tasks": [{"task": "hellaswag", "file": str(tasks / "hellaswag.txt")},
                              {"task": "mmlu", "file": str(tasks / "mmlu.bin")}], "task_ctx": 128},
           "baselines": [{"preset": "Q4_K_M", "imatrix": True}],
           "mmproj": {"file": "projector.gguf", "name": "mmproj.gguf"},
           "publish": {"repo": "apex-test/Demo-Release-APEX-GGUF"}}
    doc.update(extra)
    path = folder / "release.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def children_of(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text().split()
        out += [int(x) for x in text]
    return out


def invoke(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def phase_row(output: str, phase: str) -> list[str]:
    line = next(ln for ln in output.splitlines() if re.match(rf"^{phase}\s+\S", ln) and "  " in ln)
    return re.split(r"\s{2,}", line.strip())


# ----------------------------------------------------------------------------- the real pipeline

@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, eval_text):
    """Run 1 killed with SIGKILL (it and its llama-quantize) while the second tier is being written;
    run 2 resumes; run 3 is a no-op. Returns what each run left behind."""
    folder = tmp_path_factory.mktemp("release")
    write_projector(folder / "projector.gguf")
    cfg = release_yaml(folder, eval_text)
    out = folder / "out"
    argv = [sys.executable, "-m", "apex_orch.cli", "release", str(cfg), "--out-dir", str(out), "-j", "1"]
    console = folder / "run1.txt"
    with open(console, "wb") as fh:
        proc = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    first = out / f"{NAME}-APEX-Compact.gguf"
    second = out / f"{NAME}-APEX-I-Compact.gguf"
    deadline = time.monotonic() + 300
    partials: list[Path] = []
    while time.monotonic() < deadline and proc.poll() is None:
        partials = list(out.glob(f".{second.name}.partial-*")) if out.is_dir() else []
        if partials and partials[0].stat().st_size > 0:
            break
        time.sleep(0.05)
    assert proc.poll() is None, console.read_text()
    tools = children_of(proc.pid)
    os.kill(proc.pid, signal.SIGKILL)          # the whole machine "dies": apex-orch first...
    for pid in tools:
        os.kill(pid, signal.SIGKILL)           # ...then the llama-quantize it was running
    proc.wait()
    killed = {"first_exists": first.exists(), "first_inode": first.stat().st_ino if first.exists() else None,
              "second_exists": second.exists(), "partials": [p.name for p in out.glob(f".{second.name}.partial-*")]}
    resumed = invoke("release", str(cfg), "--out-dir", str(out), "-j", "1")
    assert resumed.exit_code == 0, resumed.output
    snapshot = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.rglob("*") if p.is_file()}
    again = invoke("release", str(cfg), "--out-dir", str(out))
    assert again.exit_code == 0, again.output
    return {"cfg": cfg, "out": out, "folder": folder, "killed": killed, "resumed": resumed.output,
            "again": again.output, "snapshot": snapshot, "first": first, "second": second}


def test_kill_mid_quantize_then_rerun_finishes_only_what_is_missing(pipeline):
    k = pipeline["killed"]
    assert k["first_exists"] and not k["second_exists"]
    assert len(k["partials"]) == 1                              # the dead run's partial file...
    out = pipeline["out"]
    assert list(out.glob(".*partial*")) == []                   # ...removed by the resumed run
    assert f"removed a partial file left by an interrupted run: {k['partials'][0]}" in pipeline["resumed"]
    assert pipeline["first"].stat().st_ino == k["first_inode"]  # the finished tier was not redone
    assert phase_row(pipeline["resumed"], "quantize")[1:4:2] == ["ran", "2 written, 1 up to date (1 baseline(s))"]
    assert phase_row(pipeline["resumed"], "eval")[1:4:2] == ["ran", "3 evaluated, 0 up to date"]
    assert phase_row(pipeline["resumed"], "imatrix")[1] in ("ran", "up to date")


def test_rerun_is_a_noop(pipeline):
    rows = {p: phase_row(pipeline["again"], p)[1] for p in rel.PHASES}
    assert rows == {"fetch": "not needed", "convert": "up to date", "imatrix": "up to date",
                    "quantize": "up to date", "eval": "up to date", "card": "up to date", "publish": "skipped"}
    now = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in pipeline["out"].rglob("*") if p.is_file()}
    changed = {n for n in now if now[n] != pipeline["snapshot"].get(n)}
    assert changed == {"release.log", "last-run.json"}  # only the run's own log and summary
    assert not (pipeline["out"] / rel.WORK_DIR / "lock").exists()   # the release lock is removed when the run ends


def test_a_run_prints_its_reports_as_json(pipeline):
    res = CliRunner().invoke(main, ["release", str(pipeline["cfg"]), "--out-dir", str(pipeline["out"]), "--json", "-q"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert set(doc) == {"release_folder", "seconds", "phases", "tasks"}
    assert {p["name"]: p["status"] for p in doc["phases"]} == {
        "fetch": "not needed", "convert": "up to date", "imatrix": "up to date", "quantize": "up to date",
        "eval": "up to date", "card": "up to date", "publish": "skipped"}
    assert doc["release_folder"] == str(pipeline["out"]) and isinstance(doc["tasks"], list)
    assert res.stderr == ""   # -q: no progress


def test_release_folder_contents(pipeline):
    out = pipeline["out"]
    published = sorted(p.relative_to(out).as_posix() for p in out.rglob("*")
                       if p.is_file() and not p.relative_to(out).as_posix().startswith(WORK_DIR)
                       and not p.name.endswith((".manifest.json", ".log", ".tensor-types.txt")))
    assert published == ["Demo-Release-APEX-Compact.gguf", "Demo-Release-APEX-I-Compact.gguf", "README.md",
                         "calibration/calibration.json", "calibration/calibration.txt", "calibration/imatrix.gguf",
                         "kld-vs-size.png", "localai/demo-release-apex-compact.yaml",
                         "localai/demo-release-apex-i-compact.yaml", "mmproj.gguf"]
    # the baseline is made in the work folder, never beside the tiers
    assert [p.name for p in (out / WORK_DIR / "baselines").glob("*.gguf")] == [f"{NAME}-Q4_K_M-imatrix.gguf"]
    # the projector is included byte for byte, never quantized
    assert (out / "mmproj.gguf").read_bytes() == (pipeline["folder"] / "projector.gguf").read_bytes()
    # tier files are exactly what plan_quantize predicted and carry their tier's metadata
    from apex_orch.model.gguf_header import read_header
    for tier, profile in (("Compact", "compact"), ("I-Compact", "i-compact")):
        f = out / f"{NAME}-APEX-{tier}.gguf"
        kv = read_header(f).kv
        assert (kv["apex.tier"], kv["apex.profile"]) == (tier, profile)
        assert ("quantize.imatrix.file" in kv) == (tier == "I-Compact")


def test_card_is_the_render_of_the_release_and_states_real_facts(pipeline):
    out = pipeline["out"]
    text = (out / "README.md").read_text()
    state = rel.resolve_release(load_release(pipeline["cfg"]), out_dir=out)
    assert [(r.name, r.status) for r in state.reports] == [(p, "resolved") for p in rel.PHASES[:5]]
    facts = card.facts_from_release(state)
    assert text == card.render_card(facts)
    sha = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in out.glob("*.gguf")}
    for name, digest in sha.items():
        assert f"sha256 `{digest}`" in text
    sizes = {p.name: p.stat().st_size for p in out.glob("*.gguf")}
    assert (f"| {NAME}-APEX-Compact.gguf | Compact | {hub_size(sizes[f'{NAME}-APEX-Compact.gguf'])} "
            f"| Multi-GPU setups |") in text
    assert (f"| mmproj.gguf | Vision projector | {hub_size(sizes['mmproj.gguf'])} | "
            "Required for image understanding |") in text
    assert "- **Vision**: Pixtral encoder, shipped as a separate projector (mmproj.gguf, F16)" in text
    assert f"local-ai run apex-test/Demo-Release-APEX-GGUF@{NAME}-APEX-Compact.gguf" in text
    # eval numbers come from the eval records, one shared base-logits cache for the tiers and the baseline
    eval_dir = out / WORK_DIR / "eval"
    records = {r["tier"]: r for r in (json.loads((eval_dir / f"{NAME}-APEX-{t}.gguf.json").read_text())
                                      for t in ("Compact", "I-Compact"))}
    baseline = json.loads((eval_dir / "baseline-Q4_K_M-imatrix.json").read_text())
    base = json.loads((eval_dir / "base.json").read_text())
    every = [*records.values(), baseline]
    large = max([base["ppl"]] + [r["summary"]["ppl"] for r in every]) >= 1000

    def cells(e: dict) -> str:
        tasks = " | ".join(card_results.fmt_task(card_facts.TaskCell(t["accuracy"], t["error"],
                                                               tuple(t["ci95"]) if t["ci95"] else None))
                           for t in e["tasks"])
        sp = e["speed"]
        return (f"{card.fmt_ppl(e['ppl'], e['ppl_err'], large=large)} | {tasks} | "
                f"{sp['pp_tokens_per_s']:.1f} ± {sp['pp_tokens_per_s_sd']:.1f} | "
                f"{sp['tg_tokens_per_s']:.1f} ± {sp['tg_tokens_per_s_sd']:.1f} |")
    assert "| File | Size | Mean KLD | KLD 99.9% | Same top p | PPL | HellaSwag | MMLU | pp32 t/s | tg8 t/s |" in text
    assert f"| source (F16) | {hub_size(base['size'])} | — | — | — | {cells(base)}" in text
    for rec in every:
        s = rec["summary"]
        name = f"baseline: {rec['baseline']}" if "baseline" in rec else rec["file"]
        row = next(line for line in text.splitlines() if line.startswith(f"| {name}"))
        assert row.endswith(f" | {hub_size(rec['size'])} | {card.fmt_kld(s['kld_mean'])} | "
                            f"{card.fmt_kld(s['kld_p999'])} | {card.fmt_pct(s['same_top_p'])} | {cells(s)}")
        assert s["n_chunks"] == 2 and s["n_ctx"] == 128 and s["base_ppl"] == base["ppl"]   # one shared base cache
        assert (s["speed"]["repetitions"], s["speed"]["pp_tokens"], s["speed"]["tg_tokens"]) == (2, 32, 8)
        assert [t["task"] for t in s["tasks"]] == ["hellaswag", "mmlu"] and all(t["n_tasks"] == 12 for t in s["tasks"])
    # rows by size, largest first; a tier is marked exactly when a baseline no larger beats it beyond the errors
    section = text.split("## Benchmarks\n\n")[1].split("\n\n### ")[0]
    shown = [line.split(" | ")[0][2:].removesuffix(" †") for line in section.splitlines()
             if line.startswith(("| Demo-Release-APEX-", "| baseline: "))]
    ranked = sorted(enumerate(every), key=lambda ir: (-ir[1]["size"], ir[0]))
    assert shown == [f"baseline: {r['baseline']}" if "baseline" in r else r["file"] for _, r in ranked]
    points = [Point(r["tier"], r["size"], r["summary"]["kld_mean"], r["summary"]["kld_mean_err"], False)
              for r in records.values()]
    points.append(Point("Q4_K_M (imatrix)", baseline["size"], baseline["summary"]["kld_mean"],
                        baseline["summary"]["kld_mean_err"], True))
    expected = ["† " + closer_sentence(t, b, hub_size) for t, b in closer_baselines(points)] or [
        "No baseline that is no larger than a tier is closer to the source than that tier beyond the error "
        "estimates (mean KLD ± its standard error)."]
    assert [p for p in section.split("\n\n")[2:] if not p.startswith("![")] == expected
    assert "![Mean KLD against file size, tiers and baselines](kld-vs-size.png)" in text
    assert (out / "kld-vs-size.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the task sets, the speed setup and the baseline, as recorded
    assert (f"| HellaSwag | `--hellaswag` | 12 of 12 | hellaswag.txt | "
            f"`{hashlib.sha256((ROOT / 'releases/demo-tasks/hellaswag.txt').read_bytes()).hexdigest()}` |") in text
    assert "mean ± standard deviation of 2 repetitions after a warm-up run" in text
    bl_file = out / WORK_DIR / "baselines" / f"{NAME}-Q4_K_M-imatrix.gguf"
    assert (f"- **Q4_K_M (imatrix)**: llama-quantize Q4_K_M of the same source, with the release's importance "
            f"matrix; {bl_file.name}, {hub_size(bl_file.stat().st_size)}, sha256 "
            f"`{hashlib.sha256(bl_file.read_bytes()).hexdigest()}`.") in text
    # the calibration files: linked with their real sha256; the manifest describes the text and the imatrix
    cal = out / "calibration"
    for name in ("imatrix.gguf", "calibration.txt", "calibration.json"):
        data = (cal / name).read_bytes()
        assert (f"| [calibration/{name}](calibration/{name}) | ") in text
        assert f"| {hub_size(len(data))} | `{hashlib.sha256(data).hexdigest()}` |" in text
    manifest = json.loads((cal / "calibration.json").read_text())
    tier_manifest = json.loads((out / f"{NAME}-APEX-I-Compact.gguf.manifest.json").read_text())
    assert manifest["imatrix"]["sha256"] == hashlib.sha256((cal / "imatrix.gguf").read_bytes()).hexdigest() \
        == tier_manifest["imatrix"]["sha256"]
    assert manifest["text"]["sha256"] == hashlib.sha256((cal / "calibration.txt").read_bytes()).hexdigest()
    assert (manifest["corpus"], manifest["imatrix"]["ctx"], manifest["imatrix"]["chunks"]) == ("corpus", 128, 4)
    assert manifest["text"]["tokens"] >= 4 * 128 and sum(x["tokens"] for x in manifest["sources"]) > 0
    assert sum(x["documents"] for x in manifest["sources"]) == manifest["text"]["documents"]
    assert all(re.fullmatch(r"[0-9a-f]{64}", x["sha256"]) for x in manifest["sources"])
    # deterministic: no absolute paths, no dates (the card, and the published calibration manifest)
    text += (out / "calibration" / "calibration.json").read_text()
    for needle in (str(out), str(pipeline["folder"]), str(Path.home()), "/tmp/"):
        assert needle not in text
    assert not re.search(r"\d{4}-\d{2}-\d{2}", text)


def test_localai_entries(pipeline):
    out = pipeline["out"]
    entry = yaml.safe_load((out / "localai" / "demo-release-apex-i-compact.yaml").read_text())
    assert len(entry) == 1
    e = entry[0]
    digest = lambda p: hashlib.sha256(p.read_bytes()).hexdigest()  # noqa: E731
    assert e["name"] == "demo-release-apex-i-compact"
    assert e["overrides"] == {"parameters": {"model": f"{NAME}-APEX-I-Compact.gguf"}, "mmproj": "mmproj.gguf"}
    assert e["files"] == [
        {"filename": f"{NAME}-APEX-I-Compact.gguf", "sha256": digest(pipeline["second"]),
         "uri": f"huggingface://apex-test/Demo-Release-APEX-GGUF/{NAME}-APEX-I-Compact.gguf"},
        {"filename": "mmproj.gguf", "sha256": digest(out / "mmproj.gguf"),
         "uri": "huggingface://apex-test/Demo-Release-APEX-GGUF/mmproj.gguf"}]
    assert e["license"] == "mit" and "apex" in e["tags"] and "multimodal" in e["tags"]


def test_gates_stop_the_release_before_card_and_publish(pipeline):
    doc = yaml.safe_load(pipeline["cfg"].read_text())
    doc["eval"]["gates"] = {"max_mean_kld": 1e-9}
    strict = pipeline["folder"] / "strict.yaml"
    strict.write_text(yaml.safe_dump(doc, sort_keys=False))
    card_before = (pipeline["out"] / "README.md").read_bytes()
    res = CliRunner().invoke(main, ["release", str(strict), "--out-dir", str(pipeline["out"]), "--from-phase", "eval"])
    assert res.exit_code == GateFailedError.exit_code, res.output
    assert f"{NAME}-APEX-Compact.gguf: mean KLD" in res.output and "fails max_mean_kld 1e-09" in res.output
    assert f"{NAME}-APEX-I-Compact.gguf: mean KLD" in res.output
    assert (pipeline["out"] / "README.md").read_bytes() == card_before      # card and publish did not run


# ----------------------------------------------------------------------------- publishing

@pytest.fixture
def hub(monkeypatch):
    """A fake Hugging Face Hub on 127.0.0.1 (tests/hubserver.py) that the real huggingface_hub
    client talks to: HF_ENDPOINT names it, Xet is off. It records every request and keeps the files."""
    from hubserver import running_hub   # tests/hubserver.py: only the publishing tests need it
    with running_hub(monkeypatch) as server:
        yield server


HUB_REPO = "apex-test/Demo-Release-APEX-GGUF"
TEST_TOKEN = "hf_publishTestToken0123456789abcdef"


CALIBRATION = ["calibration/imatrix.gguf", "calibration/calibration.txt", "calibration/calibration.json"]


def _published_names(out: Path) -> list[str]:
    return sorted([f"{NAME}-APEX-Compact.gguf", f"{NAME}-APEX-I-Compact.gguf", "mmproj.gguf", "README.md",
                   "kld-vs-size.png", "localai/demo-release-apex-compact.yaml",
                   "localai/demo-release-apex-i-compact.yaml", *CALIBRATION])


def _published_ggufs() -> list[str]:
    return [f"{NAME}-APEX-Compact.gguf", f"{NAME}-APEX-I-Compact.gguf", "mmproj.gguf"]


def _lfs_files() -> list[str]:
    """What the (fake) Hub stores through LFS: the GGUFs, the imatrix and the plot (binary)."""
    return sorted(_published_ggufs() + ["calibration/imatrix.gguf", "kld-vs-size.png"])


def test_publish_plan_handed_to_huggingface_hub(pipeline, hub, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TEST_TOKEN)
    out = pipeline["out"]
    cfg = load_release(pipeline["cfg"])
    result = rel.run_release(cfg, phases=["publish"], push=True, out_dir=out)
    assert result.reports[-1].status == "ran"
    # each recorded file (GGUF, then calibration) one at a time: its upload mode, and for an LFS one the batch
    # ("basic"), one PUT, the verify; then create_commit: README.md's front matter, the card files' upload
    # mode, the plot's LFS upload (a binary file), the NDJSON commit
    lfs_steps = ["lfs_batch", "lfs_upload", "lfs_verify"]
    assert hub.ops() == ["create_repo", "paths_info", *(["preupload", *lfs_steps] * 4), "preupload", "preupload",
                         "validate_yaml", "preupload", *lfs_steps, "commit"]
    create, paths_info = hub.requests[0], hub.requests[1]
    assert create.body == {"name": "Demo-Release-APEX-GGUF", "organization": "apex-test", "visibility": "public",
                           "type": "model"}
    assert paths_info.path == f"/api/models/{HUB_REPO}/paths-info/main"
    assert sorted(paths_info.body["paths"]) == _published_names(out)
    preuploads = [[f["path"] for f in r.body["files"]] for r in hub.requests if r.op == "preupload"]
    assert sorted(preuploads[:3]) == sorted([g] for g in _published_ggufs())      # one recorded file at a time
    assert preuploads[3:6] == [[c] for c in CALIBRATION]
    assert sorted(preuploads[6]) == ["README.md", "kld-vs-size.png", "localai/demo-release-apex-compact.yaml",
                                     "localai/demo-release-apex-i-compact.yaml"]
    digest = {n: hashlib.sha256((out / n).read_bytes()).hexdigest() for n in _published_names(out)}
    assert sorted(r.path for r in hub.requests if r.op == "lfs_upload") == sorted(
        f"/lfs-objects/{digest[g]}" for g in _lfs_files())
    commit = hub.requests[-1]
    assert commit.path == f"/api/models/{HUB_REPO}/commit/main"         # a model repo, revision main
    header, *lines = commit.body
    assert header["key"] == "header"
    assert header["value"]["summary"] == f"{NAME} APEX GGUF: 2 tiers (apex-orch {__version__}, {build_label()})"
    description = header["value"]["description"]
    assert f"apex-orch {__version__}" in description and build_label() in description
    assert ": 3 GGUF file(s), the calibration files, the model card" in description
    assert sorted(line["value"]["path"] for line in lines) == _published_names(out)
    assert sorted(line["value"]["path"] for line in lines if line["key"] == "lfsFile") == _lfs_files()
    # what arrived is the release, byte for byte, and nothing else (no manifest, log, baseline or work file)
    repo = hub.repos[HUB_REPO]
    assert sorted(hub.stored(HUB_REPO)) == sorted(_published_names(out) + [".gitattributes"])
    for name in _published_names(out):
        assert hub.stored(HUB_REPO)[name] == (out / name).read_bytes(), name
    assert {g: repo.files[g].lfs_sha256 for g in _lfs_files()} == {g: digest[g] for g in _lfs_files()}
    record = json.loads((out / WORK_DIR / "publish.json").read_text())
    assert record["commit_oid"] == repo.commits[-1].oid and sorted(record["uploaded"]) == _published_names(out)
    assert record["commit_url"] == f"{hub.url}/{HUB_REPO}/commit/{repo.commits[-1].oid}"
    assert record["files"] == digest

    # the Hub already holds every byte: nothing is uploaded, no commit is made
    hub.requests.clear()
    commits = len(repo.commits)
    again = rel.run_release(cfg, phases=["publish"], push=True, out_dir=out)
    assert hub.ops() == ["create_repo", "paths_info"]      # create_repo: the Hub's 409 is exist_ok
    assert again.reports[-1].status == "up to date"
    assert len(repo.commits) == commits


def test_publish_without_push_uploads_nothing(pipeline, hub):
    res = invoke("release", str(pipeline["cfg"]), "--out-dir", str(pipeline["out"]), "--only", "publish")
    assert res.exit_code == 0
    assert phase_row(res.output, "publish")[1] == "skipped"
    assert hub.requests == []


def test_token_is_never_printed_logged_or_written(pipeline, hub, monkeypatch):
    """The token from the standard location (HF_TOKEN) reaches the Hub and nowhere else, even when the
    Hub answers with an error text that echoes it."""
    monkeypatch.setenv("HF_TOKEN", PLANTED_TOKEN)
    hub.fail("commit", 401, "401 Unauthorized: Authorization: {authorization}")
    res = CliRunner().invoke(main, ["release", str(pipeline["cfg"]), "--out-dir", str(pipeline["out"]),
                                    "--only", "publish", "--push"])
    assert res.exit_code == PublishError.exit_code
    assert hub.ops()[-1] == "commit"                    # the Hub refused the commit, echoing the token
    assert "Bearer ***" in res.output and PLANTED_TOKEN not in res.output
    hub.failures.clear()
    ok = CliRunner().invoke(main, ["release", str(pipeline["cfg"]), "--out-dir", str(pipeline["out"]),
                                   "--only", "publish", "--push"])
    assert ok.exit_code == 0 and PLANTED_TOKEN not in ok.output
    assert hub.ops().count("commit") == 2 and len(hub.repos[HUB_REPO].commits) == 2
    # every request to the Hub carried it; the LFS object PUT (storage, not the Hub) carries none
    assert {r.authorization for r in hub.requests if r.op != "lfs_upload"} == {f"Bearer {PLANTED_TOKEN}"}
    assert {r.authorization for r in hub.requests if r.op == "lfs_upload"} == {None}
    leaks = [p for p in pipeline["folder"].rglob("*") if p.is_file() and PLANTED_TOKEN.encode() in p.read_bytes()]
    assert leaks == []


def test_push_needs_a_token(pipeline, monkeypatch, tmp_path):
    import huggingface_hub.constants
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "token"))  # no token file
    res = CliRunner().invoke(main, ["release", str(pipeline["cfg"]), "--out-dir", str(pipeline["out"]),
                                    "--only", "publish", "--push"])
    assert res.exit_code == PublishError.exit_code
    assert "no Hugging Face token found" in res.output and "hf auth login" in res.output


# ----------------------------------------------------------------------------- golden card (seven tiers)

STAND_IN_SHA = "0123456789abcdef" * 4


def _stand_in_tasks(cfg, offset: int) -> list[dict]:
    """Task rows as the eval phase records them, for the config's real task files (their names, sha256
    and counts, the settings the scorers would run with); the accuracies are stand-ins."""
    from apex_orch.evaluation.task_files import TASK_KINDS, read_task_set
    from apex_orch.evaluation.tasks import TaskSettings
    rows = []
    settings = TaskSettings(n_ctx=cfg.eval.task_ctx, n_threads=2)
    for i, t in enumerate(cfg.eval.tasks):
        f = read_task_set(t.task, t.file.resolve()).file
        n = f.n_tasks if t.count is None else min(t.count, f.n_tasks)
        acc = 25.0 + 5 * i + offset
        rows.append({"task": t.task, "title": TASK_KINDS[t.task].title,
                     "accuracy": acc, "error": None if t.task == "hellaswag" else 12.5,
                     "ci95": [acc - 10.0, acc + 10.0] if t.task == "hellaswag" else None, "n_tasks": n,
                     "n_available": f.n_tasks, "data": f.path, "data_sha256": f.sha256,
                     "settings": {**settings.numeric(f.scorer, f.max_answers), "n_threads": 2}})
    return rows


def _stand_in_speed(i: int) -> dict:
    return {"pp_tokens": 512, "pp_tokens_per_s": 100.0 + 10 * i, "tg_tokens": 128, "tg_tokens_per_s": 10.0 + i,
            "n_threads": 2, "n_batch": 2048, "n_ubatch": 512, "flash_attn": True, "repetitions": 1,
            "pp_tokens_per_s_sd": 0.0, "tg_tokens_per_s_sd": 0.0, "repack": False, "tool": "llama-bench",
            "build_commit": "0c1e57098", "cpu_info": "stand-in CPU", "gpu_info": None}


def demo_card_facts(tmp_path: Path) -> card.CardFacts:
    """The demo release's card facts from its real config, model, plans and task files; the measured
    values (file sha256, imatrix sha256, eval numbers, task accuracies, speeds, the calibration files'
    sizes and hashes) are labelled stand-ins so the text is the same on every machine. Sizes are the
    plans' exact predictions. Two of the stand-in numbers make the Q4_K_M baseline beat three tiers."""
    cfg = load_release(ROOT / "releases" / "demo.yaml")
    state = ReleaseState(cfg, tmp_path / "out", lambda _m: None)
    fetch_source(state, run=False)
    convert_source(state, run=False)
    stand_in = preview_imatrix(state, None)
    state.jobs = plan_jobs(state, imatrix=stand_in)
    state.baseline_jobs = plan_baseline_jobs(state, stand_in)
    from apex_orch.calibration.corpus_spec import load_corpus_spec
    state.imatrix_record = {"corpus": "diverse", "description": load_corpus_spec("diverse").description,
                            "ctx": 128, "chunks": 8, "sha256": STAND_IN_SHA}
    common = {"n_chunks": 4, "n_ctx": 128}
    for i, job in enumerate(state.jobs):
        state.evals[job.profile.tier] = {
            "tier": job.profile.tier, "file": job.output.name, "size": job.predicted_size, "text": "corpus wikipedia",
            "summary": {"ppl": 12.0 + 0.25 * i, "ppl_err": 0.125, "kld_mean": 0.01 * (i + 1), "kld_mean_err": 0.0005,
                        "kld_p999": 0.1 * (i + 1), "same_top_p": 95.0 - 2 * i, "speed": _stand_in_speed(i + 1),
                        "tasks": _stand_in_tasks(cfg, i), **common}}
    for (label, kld), job in zip((("Q8_0", 0.002), ("Q4_K_M (imatrix)", 0.015)), state.baseline_jobs):
        assert job.profile.tier == label
        state.baseline_files[label] = [job.output]
        state.baseline_evals[label] = {
            "baseline": label, "file": job.output.name, "size": job.predicted_size, "text": "corpus wikipedia",
            "summary": {"ppl": 11.75, "ppl_err": 0.125, "kld_mean": kld,
                        "kld_mean_err": 0.0001 if kld < 0.01 else 0.0005,
                        "kld_p999": 10 * kld, "same_top_p": 97.0, "speed": _stand_in_speed(0),
                        "tasks": _stand_in_tasks(cfg, 1), **common}}
    state.base_eval = {"type": "F16", "size": state.model.file_size, "ppl": 11.5, "ppl_err": 0.12,
                       "speed": _stand_in_speed(0), "tasks": _stand_in_tasks(cfg, 2)}
    state.calibration = {"files": [{"name": n, "size": 1000 * (k + 1), "sha256": STAND_IN_SHA}
                                   for k, n in enumerate(("imatrix.gguf", "calibration.txt", "calibration.json"))],
                         "corpus": "diverse", "tokens": 123456, "ctx": 128, "chunks": 8}

    def stand_in_files(job, _files):
        return (card.FileFacts((job.output.name,), job.predicted_size, (STAND_IN_SHA,)),
                {r: s["types"] for r, s in job.plan.role_summary().items()})
    return card.facts_from_release(state, file_facts=stand_in_files)


def test_demo_card_golden(tmp_path):
    text = card.render_card(demo_card_facts(tmp_path))
    if os.environ.get("APEX_UPDATE_GOLDEN") == "1":
        GOLDEN.parent.mkdir(parents=True, exist_ok=True)
        GOLDEN.write_text(text)
    assert text == GOLDEN.read_text()


def test_demo_card_brief_shape(tmp_path):
    text = card.render_card(demo_card_facts(tmp_path))
    assert text.startswith("---\nbase_model: apex-orch/APEX-Demo-MoE\nbase_model_relation: quantized\nlicense: mit\n"
                           "tags:\n- gguf\n- moe\n- apex\n- quantized\n- mistral4\n---\n")
    assert "\n# APEX-Demo-MoE APEX GGUF\n" in text
    assert "| File | Profile | Size | Best For |" in text
    tiers = [ln.split(" | ")[1] for ln in text.splitlines() if ln.startswith("| APEX-Demo-MoE-APEX-") and " | " in ln
             and ln.count("|") == 5]
    assert tiers == ["I-Balanced", "I-Quality", "Quality", "Balanced", "I-Compact", "Compact", "I-Mini"]
    assert "- **APEX config**: 1+1 symmetric edge gradient across 2 layers, MLA-aware tensor mapping" in text
    assert "- **Experts**: 8 routed + 1 shared, 2 routed active per token" in text
    assert f"- llama.cpp build `{build_label()}`" in text
    assert "apex-orch release releases/demo.yaml" in text


def test_card_says_when_the_calibration_is_not_published(tmp_path):
    """--no-calibration-upload: the card links no calibration file and says why; publish sends none."""
    import dataclasses
    facts = demo_card_facts(tmp_path)
    text = card.render_card(dataclasses.replace(facts, calibration_files=card.CalibrationFiles(False)))
    section = text.split("## Calibration\n\n")[1].split("\n\n## ")[0]
    assert section.endswith("\n\nThe calibration files (the importance matrix and its calibration text) are not "
                            "published with this release: it was made with `--no-calibration-upload`.")
    assert "calibration/imatrix.gguf" not in text
    cfg = load_release(ROOT / "releases" / "demo.yaml")
    state = ReleaseState(cfg, tmp_path / "out", lambda _m: None, calibration_upload=False)
    state.calibration = {"files": [{"name": "imatrix.gguf", "size": 1, "sha256": STAND_IN_SHA}]}   # left from a run
    assert card._calibration_files(state) == card.CalibrationFiles(False)
    from apex_orch.release.phases.publish import publish_request
    state.jobs, state.files = [], {}
    assert publish_request(state).calibration == []


def test_benchmarks_pending_without_eval(tmp_path):
    facts = demo_card_facts(tmp_path)
    import dataclasses
    bare = dataclasses.replace(facts, tiers=tuple(dataclasses.replace(t, eval=None) for t in facts.tiers),
                               baselines=tuple(dataclasses.replace(b, eval=None) for b in facts.baselines),
                               base_eval=None, eval_setup=None, tasks=None, speed=None, plot=None)
    text = card.render_card(bare)
    section = text.split("## Benchmarks\n\n")[1].split("\n\n##")[0]
    # no table, no task or speed section; the baselines are still said (what they are), without numbers
    assert section.split("\n\n### ")[0] == "Benchmarks pending: these files have not been evaluated yet."
    assert "### Task accuracy" not in text and "### Speed" not in text and "kld-vs-size.png" not in text
    assert "### Baselines" in text


# ----------------------------------------------------------------------------- dry runs

def test_flagship_dry_run_on_the_replica(ms4_replica, monkeypatch):
    monkeypatch.delenv("APEX_MODELS_DIR", raising=False)
    monkeypatch.delenv("APEX_TASKS_DIR", raising=False)
    cfg = ROOT / "releases" / "mistral-small-4-119b.yaml"
    res = invoke("release", str(cfg), "--dry-run", "--source", str(ms4_replica))
    assert res.exit_code == 0, res.output
    rows = {}
    for line in res.output.splitlines():
        cells = line.split()
        if len(cells) == 8 and cells[1].startswith("Mistral-Small-4-119B-APEX-"):
            assert (cells[3], cells[7]) == ("GB", "missing")
            rows[cells[0]] = (cells[1], cells[2], cells[5], cells[6])
    from apex_orch.model.info import read_model
    info = read_model(ms4_replica)
    expected = {}
    for prof_name in ("i-balanced", "i-quality", "quality", "balanced", "i-compact", "compact", "i-mini"):
        prof = load_profile(prof_name)
        if prof.imatrix_required:
            plan = make_plan(info, prof, has_imatrix=True)
            size, bpw = plan.predicted_file_size(), plan.bpw
        else:
            job = plan_quantize(ms4_replica, prof, name="Mistral-Small-4-119B", model=info)
            size, bpw = job.predicted_size, job.plan.bpw
        parts = str(-(-size // 48_000_000_000))
        expected[prof.tier] = (f"Mistral-Small-4-119B-APEX-{prof.tier}.gguf", f"{size / 1e9:.2f}", f"{bpw:.3f}", parts)
    assert rows == expected
    assert list(rows) == ["I-Balanced", "I-Quality", "Quality", "Balanced", "I-Compact", "Compact", "I-Mini"]
    assert "split into parts of at most 48G" in res.output
    assert "publish   mudler/Mistral-Small-4-119B-2603-APEX-GGUF (public); not without --push" in res.output
    assert "mistral-small-4-119b.yaml:" in res.output and "${APEX_MODELS_DIR}, which is not set" in res.output
    assert re.search(r"^disk      the release needs [\d.]+ GB", res.output, re.M)
    assert res.output.count("$ ") == 9                 # one llama-quantize command per tier and preset baseline
    assert not (ROOT / "out" / "release" / "Mistral-Small-4-119B").exists()   # a dry run writes nothing
    # --json: the same plan, from the same object, as data
    js = invoke("release", str(cfg), "--dry-run", "--json", "--source", str(ms4_replica))
    assert js.exit_code == 0, js.output
    data = json.loads(js.stdout)
    assert (data["format"], data["format_version"]) == ("apex-orch-release-dry-run", 1)
    assert data["phases"] == data["selected"] == list(rel.PHASES) and data["push"] is False
    assert data["fetch"]["given"] == str(ms4_replica) and data["source"]["path"] == str(ms4_replica)
    assert data["split_max_size"] == {"text": "48G", "bytes": 48_000_000_000}
    assert {t["tier"]: (t["file"], f"{t['size'] / 1e9:.2f}", f"{t['bpw']:.3f}", str(t["parts"]))
            for t in data["tiers"]} == expected
    assert all(not t["present"] and f"  {t['tier']}: $ {shlex.join(t['argv'])}" in res.output for t in data["tiers"])
    largest = max(t["size"] for t in data["tiers"])
    # the baselines: uniform presets of the same source, sized by their plans, in the work folder
    from apex_orch.release.baselines import preset_profile
    cfg_ = load_release(cfg)
    bsizes = {b.label: plan_quantize(ms4_replica, preset_profile(b), name="Mistral-Small-4-119B", model=info,
                                     imatrix=None).predicted_size for b in cfg_.baselines if not b.imatrix}
    assert [(b["name"], b["kind"], b["file"], b["present"]) for b in data["baselines"]] == [
        ("Q8_0", "preset", "Mistral-Small-4-119B-Q8_0.gguf", False),
        ("Q4_K_M (imatrix)", "preset", "Mistral-Small-4-119B-Q4_K_M-imatrix.gguf", False)]
    assert data["baselines"][0]["size"] == bsizes["Q8_0"]
    assert "/.apex-release/baselines/" in data["baselines"][0]["path"]
    # the replica has no vocabulary to build the imatrix with: the same placeholder as the I-tiers'
    assert data["baselines"][1]["argv"][1:3] == ["--imatrix", "<imatrix from phase imatrix>.gguf"] \
        == data["tiers"][0]["argv"][1:3]
    assert data["imatrix"]["i_baselines"] == ["Q4_K_M (imatrix)"]
    baseline_bytes = sum(b["size"] for b in data["baselines"])
    assert data["disk"]["baselines"] == baseline_bytes
    assert data["disk"]["need"] == data["disk"]["tiers"] + largest + baseline_bytes
    # the task sets and llama-bench, as asked; the task files live on the runner (${APEX_TASKS_DIR})
    e = data["eval"]
    assert (e["files"], e["speed"], e["speed_repetitions"], e["speed_tokens"], e["task_ctx"]) == \
        (9, True, 5, [512, 128], 4096)
    assert [t["task"] for t in e["tasks"]] == ["hellaswag", "winogrande", "mmlu", "arc-challenge", "arc-easy",
                                               "truthfulqa"]
    assert all("${APEX_TASKS_DIR}, which is not set" in t["problem"] for t in e["tasks"])
    assert data["calibration_upload"] and data["calibration_files"] == [
        "calibration/imatrix.gguf", "calibration/calibration.txt", "calibration/calibration.json"]
    assert data["publish_repo"] == "mudler/Mistral-Small-4-119B-2603-APEX-GGUF" and data["private"] is False


def test_dry_run_of_a_converted_source_shows_the_pinned_converter(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    cfg = tmp_path / "conv.yaml"
    cfg.write_text(yaml.safe_dump({
        "name": "Conv", "license": "apache-2.0",
        "source": {"convert": {"repo": "org/model", "revision": "a" * 40, "mistral_format": True}},
        "tiers": ["compact"], "mmproj": {"convert": {"outtype": "q8_0"}},
        "publish": {"repo": "org/Conv-APEX-GGUF"}}))
    res = invoke("release", str(cfg), "--dry-run", "--out-dir", str(tmp_path / "out"))
    assert res.exit_code == 0, res.output
    script = str(converter_script())
    lines = [ln for ln in res.output.splitlines() if ln.startswith("convert   $ ")]
    assert lines == [
        f"convert   $ {sys.executable} {script} '<snapshot>' --outfile "
        f"{tmp_path}/out/.apex-release/source/Conv-BF16.gguf "
        "--outtype bf16 --mistral-format --model-name Conv",
        f"convert   $ {sys.executable} {script} '<snapshot>' --outfile {tmp_path}/out/mmproj.gguf --outtype q8_0 "
        "--mmproj --mistral-format"]
    assert "org/model@aaaaaaaaaaaa is not in the Hugging Face cache" in res.output
    assert not (tmp_path / "out").exists()


def test_hf_source_is_fetched_at_the_pinned_revision(tmp_path, monkeypatch, mistral4_split):
    """huggingface_hub.hf_hub_download replaced by a FAKE that records its arguments (no network)."""
    import huggingface_hub
    seen = []

    def fake_download(**kw):
        seen.append(kw)
        return str(mistral4_split)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    cfg = tmp_path / "hf.yaml"
    cfg.write_text(yaml.safe_dump({"name": "Hf", "license": "mit", "tiers": ["compact"],
                                   "source": {"hf": {"repo": "org/m-GGUF", "revision": "b" * 40, "files": ["m.gguf"]}},
                                   "publish": {"repo": "org/Hf-APEX-GGUF"}}))
    state = ReleaseState(load_release(cfg), tmp_path / "out", lambda _m: None)
    assert fetch_phase.run_phase(state, run=True).status == "ran"
    assert seen == [{"repo_id": "org/m-GGUF", "filename": "m.gguf", "revision": "b" * 40, "local_files_only": False}]
    assert state.source_paths == [mistral4_split]


# ----------------------------------------------------------------------------- config schema

BASE = {"name": "X", "license": "mit", "source": {"demo": True}, "tiers": ["compact"], "publish": {"repo": "o/x"}}


def write_cfg(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "r.yaml"
    p.write_text(text)
    return p


@pytest.mark.parametrize("text, line, message", [
    ("name: X\nlicense: mit\nsource: {demo: true}\ntiers: [compact]\npublish: {repo: o/x}\nsplit: 48G\n", 6,
     "unknown key 'split'"),
    ("name: X\nlicense: mit\nsource: {demo: true}\ntiers: [compact]\npublish: {repo: o/x}\neval:\n  corpus: c\n"
     "  chunk: 3\n", 8, "unknown key 'eval.chunk'"),
    ("name: X\nlicense: mit\nsource:\n  hf: {repo: o/m, revision: main, files: [m.gguf]}\ntiers: [compact]\n"
     "publish: {repo: o/x}\n", 4, "is not a pinned revision"),
    ("name: X\nlicense: mit\nsource: {demo: true}\ntiers: [compact]\npublish: {repo: o/x}\nmmproj:\n"
     "  file: p.gguf\n  name: ../mmproj.gguf\n", 8, "is not a plain file name"),
    ("name: X\nlicense: mit\nsource:\n  hf:\n    repo: o/m\n    revision: " + "c" * 40 + "\n    files: [../m.gguf]\n"
     "tiers: [compact]\npublish: {repo: o/x}\n", 7, "is not a plain path inside the repo"),
    ("name: X\nlicense: mit\nsource: {demo: true}\ntiers:\n  - compact\n  - compact\npublish: {repo: o/x}\n", 6,
     "tier Compact is listed twice"),
    ("name: X\nlicense: mit\nsource: {demo: true}\ntiers: [compact]\nimatrix: {corpus: diverse}\n"
     "publish: {repo: o/x}\n", 5, "no tier needs an imatrix"),
    ("name: X\nlicense: mit\nsource: {demo: true}\ntiers: [compact]\npublish: {repo: o/x}\nsplit_max_size: big\n", 6,
     "split_max_size: 'big' is not a size such as 48G, 48GB"),
    ("name: X\nlicense: mit\nsource: {demo: true, gguf: a.gguf}\ntiers: [compact]\npublish: {repo: o/x}\n", 3,
     "give exactly one of gguf, demo, hf, convert"),
    ("name: X\nlicense: mit\nsource: {demo: true}\ntiers: [nosuch]\npublish: {repo: o/x}\n", 4,
     "tiers[0]: unknown profile 'nosuch'"),
    ("name: X\nlicense: mit\nsource: {demo: true}\ntiers: [compact]\npublish: {repo: not-a-repo}\n", 5,
     "is not a repo id like owner/name"),
    # `mtp:` (release.mtp): its schema is MtpConfig's fields
    ("name: X\nlicense: mit\nsource: {demo: true}\ntiers: [compact]\npublish: {repo: o/x}\nmtp: both\n", 6,
     "mtp.mode must be one of bundled, draft, none"),
    ("name: X\nlicense: mit\nsource: {demo: true}\ntiers: [compact]\npublish: {repo: o/x}\nmtp:\n  mode: draft\n"
     "  typ: Q8_0\n", 8, "unknown key 'mtp.typ'"),
    ("name: X\nlicense: mit\nsource: {demo: true}\ntiers: [compact]\npublish: {repo: o/x}\nmtp: {type: Q8_0}\n", 6,
     "mtp: missing key 'mode' (bundled, draft, none)"),
    ("name: X\nlicense: mit\nsource: {demo: true}\ntiers: [compact]\npublish: {repo: o/x}\nmtp:\n  mode: draft\n"
     "  file: d.gguf\n  type: iq2_xxs\n", 9, "mtp.type must be one of Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K"),
    ("name: X\nlicense: mit\nsource: {demo: true}\ntiers: [compact]\npublish: {repo: o/x}\nmtp:\n  mode: bundled\n"
     "  type: Q6_K\n", 8, "mtp.type: only a draft has its own type (mode is bundled)"),
    ("name: X\nlicense: mit\nsource: {demo: true}\ntiers: [compact]\npublish: {repo: o/x}\nmtp:\n  mode: none\n"
     "  file: d.gguf\n", 8, "mtp.file: only a draft has its own file (mode is none)"),
    ("name: X\nlicense: mit\nsource: {demo: true}\ntiers: [compact]\npublish: {repo: o/x}\nmtp: draft\n", 6,
     "mtp: a draft needs the MTP head as its own GGUF, but a demo source is not converted here"),
    # eval.speculative measures the MTP head's drafting: refused without a head, or with eval off
    ("name: X\nlicense: mit\nsource: {demo: true}\ntiers: [compact]\npublish: {repo: o/x}\nmtp: none\neval:\n"
     "  corpus: c\n  speculative: true\n", 9, "eval.speculative: llama.cpp's drafting with the MTP head cannot be "
     "measured: this release has no head (mtp: none)"),
    ("name: X\nlicense: mit\nsource: {demo: true}\ntiers: [compact]\npublish: {repo: o/x}\neval:\n"
     "  corpus: c\n  speculative: true\n", 8, "this release has no head (no `mtp:` in the config)"),
    ("name: X\nlicense: mit\nsource: {demo: true}\ntiers: [compact]\npublish: {repo: o/x}\nmtp: bundled\neval:\n"
     "  enabled: false\n  speculative: true\n", 9, "eval.speculative: the eval phase measures it, and this config "
     "turns eval off"),
    ("name: X\nlicense: mit\nsource: {demo: true}\ntiers: [compact]\npublish: {repo: o/x}\nmtp: bundled\neval:\n"
     "  corpus: c\n  speculative_tokens: 1000\n", 9, "eval.speculative_tokens is 1,000; at most 512"),
    ("name: X\nlicense: mit\nsource: {demo: true}\ntiers: [compact]\npublish: {repo: o/x}\nmtp: none\neval:\n"
     "  corpus: c\n  speculative_tokens: 8\n", 9, "eval.speculative_tokens: the speculative measurement is off"),
])
def test_config_errors_name_file_and_line(tmp_path, text, line, message):
    p = write_cfg(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_release(p)
    assert err.value.where == f"{p}:{line}"
    assert message in err.value.message


def test_mtp_config_forms(tmp_path):
    """`mtp: MODE` or a mapping; a draft's type (upper-cased, default Q8_0) and file (relative to the YAML)."""
    head = "name: X\nlicense: mit\nsource: {demo: true}\ntiers: [compact]\npublish: {repo: o/x}\n"
    assert load_release(write_cfg(tmp_path, head)).mtp is None
    cfg = load_release(write_cfg(tmp_path, head + "mtp: bundled\n")).mtp
    assert (cfg.mode, cfg.type, cfg.file, cfg.where) == ("bundled", "Q8_0", None, f"{tmp_path / 'r.yaml'}:6")
    cfg = load_release(write_cfg(tmp_path, head + "mtp: {mode: draft, type: q6_k, file: heads/d.gguf}\n")).mtp
    assert (cfg.mode, cfg.type, cfg.file.resolve()) == ("draft", "Q6_K", tmp_path / "heads" / "d.gguf")
    # eval.speculative: on by default with a head (bundled or draft) and eval on, off otherwise
    for mtp, ev, expected in [("bundled", "{corpus: c}", (True, 32)), ("draft", "{corpus: c, speculative: false}",
                                                                         (False, 32)),
                              ("bundled", "{enabled: false}", (False, 32)), ("none", "{corpus: c}", (False, 32)),
                              ("bundled", "{corpus: c, speculative_tokens: 8}", (True, 8))]:
        src = "source: {demo: true}\n" if mtp != "draft" else "source: {convert: {path: ckpt}}\n"
        text = head.replace("source: {demo: true}\n", src) + f"mtp: {mtp}\neval: {ev}\n"
        e = load_release(write_cfg(tmp_path, text)).eval
        assert (e.speculative, e.speculative_tokens) == expected, (mtp, ev)
    assert load_release(write_cfg(tmp_path, head + "eval: {corpus: c}\n")).eval.speculative is False


@pytest.mark.parametrize("arch, layers, mode, flag, problem", [
    ("MixtralForCausalLM", None, "bundled", None, "the checkpoint (MixtralForCausalLM) has no MTP head"),
    ("MixtralForCausalLM", None, "none", None, None),                 # nothing to leave out
    ("Qwen3NextForCausalLM", None, "draft", "--no-mtp", None),        # its converter counts the head's weights
    ("Qwen3_5MoeForCausalLM", 0, "bundled", None, "has no MTP head"),
    ("Qwen3_5MoeForCausalLM", 1, "none", "--no-mtp", None),
    ("DeepseekV3ForCausalLM", 1, "bundled", None, "the pinned convert_hf_to_gguf.py drops the MTP head"),
    ("DeepseekV3ForCausalLM", 1, "none", None, None),
    ("Cohere2MoeForCausalLM", 1, "bundled", None, None),
    ("Cohere2MoeForCausalLM", 1, "draft", "--no-mtp", "cannot split the MTP head of Cohere2MoeForCausalLM off"),
    ("Cohere2MoeForCausalLM", 1, "none", None, "cannot leave the MTP head of Cohere2MoeForCausalLM out"),
])
def test_an_mtp_mode_against_the_checkpoint(arch, layers, mode, flag, problem):
    """Decided from config.json before the converter runs (release.mtp); the GGUF check settles the rest."""
    from apex_orch.release.config import MtpConfig
    from apex_orch.release.mtp import CheckpointHead, check_checkpoint, converter_flag
    cfg, head = MtpConfig(mode, where="r.yaml:9"), CheckpointHead(arch, layers)
    assert converter_flag(cfg, head) == flag and converter_flag(None, head) is None
    if problem is None:
        check_checkpoint(cfg, head)
        return
    with pytest.raises(ConfigError) as err:
        check_checkpoint(cfg, head)
    assert problem in err.value.message and err.value.where == "r.yaml:9"


def test_a_checkpoints_mtp_layers_from_its_config(tmp_path):
    from apex_orch.release.mtp import checkpoint_head
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["Qwen3_5MoeForConditionalGeneration"],
                                                      "text_config": {"mtp_num_hidden_layers": 1}}))
    head = checkpoint_head(tmp_path)
    assert (head.architecture, head.layers) == ("Qwen3_5MoeForConditionalGeneration", 1)
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["MixtralForCausalLM"]}))
    assert checkpoint_head(tmp_path).layers is None


def test_the_mtp_section_and_localai_options():
    """The card's MTP section and the LocalAI settings per mode (release.card_mtp; the real files:
    tests/archs/test_release_mtp.py)."""
    from apex_orch.release.card import FileFacts
    from apex_orch.release.card_mtp import MtpFacts, localai_mtp, mtp_context
    tier, heads = "X-APEX-Compact.gguf", (("X-APEX-Compact.gguf", "Q8_0 ×11", 300_000),)
    assert mtp_context(None, tier) is None and localai_mtp(None) == ({}, [])
    bundled = mtp_context(MtpFacts("bundled", 1, heads), tier)
    assert bundled["table"] == "| File | MTP head |\n|---|---|\n| X-APEX-Compact.gguf | Q8_0 ×11 (300.0 KB) |"
    assert bundled["command"] == "llama-server -m X-APEX-Compact.gguf --spec-type draft-mtp --spec-draft-n-max 3"
    assert localai_mtp(MtpFacts("bundled", 1, heads)) == ({"options": ["spec_type:draft-mtp"]}, ["mtp"])
    draft = MtpFacts("draft", 1, (("X-APEX-Compact.gguf", "", 0),), FileFacts(("mtp-X.gguf",), 2_500_000, ("0" * 64,)),
                     "Q8_0 ×13")
    ctx = mtp_context(draft, tier)
    assert ctx["table"].splitlines()[2:] == ["| mtp-X.gguf | Q8_0 ×13 (2.5 MB, the draft file) |",
                                             "| X-APEX-Compact.gguf | none |"]
    assert ctx["command"].endswith("--spec-type draft-mtp --spec-draft-n-max 3 -md mtp-X.gguf")
    assert localai_mtp(draft) == ({"options": ["spec_type:draft-mtp"], "draft_model": "mtp-X.gguf"}, ["mtp"])
    none = mtp_context(MtpFacts("none", 0, (("X-APEX-Compact.gguf", "", 0),)), tier)
    assert (none["command"], none["calibration"]) == (None, None) and localai_mtp(MtpFacts("none", 0, ())) == ({}, [])


def test_the_mtp_example_config(monkeypatch):
    """releases/qwen3.5-35b-a3b-mtp.yaml: an APEX-MTP release from a checkpoint folder."""
    monkeypatch.delenv("APEX_MODELS_DIR", raising=False)
    cfg = load_release(ROOT / "releases" / "qwen3.5-35b-a3b-mtp.yaml")
    assert (cfg.mtp.mode, cfg.source.kind, cfg.source.checkpoint.raw) == (
        "bundled", "convert", "${APEX_MODELS_DIR}/Qwen3.5-35B-A3B")
    assert [t.tier for t in cfg.tiers] == ["I-Balanced", "I-Quality", "I-Compact", "Compact", "I-Mini"]


def test_config_error_through_the_cli(tmp_path):
    p = write_cfg(tmp_path, "name: X\nlicense: mit\nsource: {demo: true}\ntiers: [compact]\npublish: {repo: o/x}\n"
                            "colour: red\n")
    res = CliRunner().invoke(main, ["release", str(p), "--dry-run"])
    assert res.exit_code == ConfigError.exit_code
    assert res.output.startswith(f"error: {p}:6: unknown key 'colour'\nhint: allowed here: ")


def test_unset_variable_is_reported_where_the_path_is_needed(tmp_path, monkeypatch):
    monkeypatch.delenv("APEX_TEST_UNSET", raising=False)
    p = write_cfg(tmp_path, "name: X\nlicense: mit\nsource:\n  gguf: ${APEX_TEST_UNSET}/m.gguf\ntiers: [compact]\n"
                            "publish: {repo: o/x}\n")
    cfg = load_release(p)            # loading is fine: the variable may be set on the runner
    with pytest.raises(ConfigError) as err:
        cfg.source.paths[0].resolve()
    assert err.value.where == f"{p}:4" and "${APEX_TEST_UNSET}, which is not set" in err.value.message


def test_name_is_made_safe_for_file_names(tmp_path):
    p = write_cfg(tmp_path, "name: My Model/v2\nlicense: mit\nsource: {demo: true}\ntiers: [compact]\n"
                            "publish: {repo: o/x}\n")
    cfg = load_release(p)
    assert cfg.name == "My-Model-v2" and cfg.title == "My-Model-v2 APEX GGUF"
    assert cfg.warnings == ["name 'My Model/v2' is written as 'My-Model-v2' in file names"]


def test_release_folder_must_stay_out_of_the_project(tmp_path):
    (tmp_path / "releases").mkdir()
    p = tmp_path / "releases" / "r.yaml"
    p.write_text("name: X\nlicense: mit\nsource: {demo: true}\ntiers: [compact]\npublish: {repo: o/x}\noutput: ..\n")
    cfg = load_release(p)
    with pytest.raises(ConfigError, match="must not receive release files") as err:
        check_out_dir(default_out_dir(cfg), cfg)
    assert err.value.where == f"{p}:6"
    foreign = tmp_path / "elsewhere"
    foreign.mkdir()
    (foreign / "README.md").write_text("# someone else's card\n")
    with pytest.raises(OutputExistsError, match="was not written by apex-orch"):
        check_out_dir(foreign, cfg)


@pytest.mark.parametrize("only, skip, start, expected", [
    (None, None, None, list(rel.PHASES)),
    ("card,quantize", None, None, ["quantize", "card"]),
    (None, "eval,publish", None, ["fetch", "convert", "imatrix", "quantize", "card"]),
    (None, "publish", "quantize", ["quantize", "eval", "card"]),
])
def test_phase_selection(only, skip, start, expected):
    assert rel.select_phases(only, skip, start) == expected


def test_phase_selection_errors():
    with pytest.raises(RequestError, match="unknown phase upload") as info:
        rel.select_phases(only="upload")
    assert info.value.fields == ("only",)
    with pytest.raises(RequestError, match="cannot be combined") as info:
        rel.select_phases(only="card", skip="eval")
    assert info.value.fields == ("only", "skip", "from_phase")


def test_every_cli_option_is_documented():
    from apex_orch.cli.release import release
    docs = (ROOT / "docs" / "release.md").read_text()
    for param in release.params:
        if getattr(param, "hidden", False):
            continue   # an old spelling kept for one release (docs/cli.md lists them)
        for opt in getattr(param, "opts", []):
            if opt.startswith("-"):
                assert opt in docs, f"{opt} is not in docs/release.md"


def test_a_list_of_source_files_must_be_the_shards_of_one_model(tmp_path, mistral4_split):
    other = tmp_path / "other.gguf"
    other.symlink_to(mistral4_split)
    p = write_cfg(tmp_path, f"name: X\nlicense: mit\nsource:\n  gguf: [{mistral4_split}, {other}]\ntiers: [compact]\n"
                            "publish: {repo: o/x}\n")
    state = ReleaseState(load_release(p), tmp_path / "out", lambda _m: None)
    fetch_source(state, run=True)
    from apex_orch.core.errors import ModelError
    with pytest.raises(ModelError, match="not the shards of one split model") as err:
        convert_source(state, run=True)
    assert err.value.where == f"{p}:4"
