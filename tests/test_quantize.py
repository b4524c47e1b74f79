"""apex-orch quantize with the real llama-quantize: verified outputs, atomicity, locks, reruns."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner

from apex_orch.cli import main
from apex_orch.core.errors import ImatrixError, LockedError, OutputExistsError, VerificationError
from apex_orch.model.gguf_header import read_header
from apex_orch.llama.tools import find_tool, run_tool
from apex_orch.core.manifest import manifest_path
from apex_orch.model.info import read_model
from apex_orch.core.outputs import OutputGuard
from apex_orch.plan.profile_search import list_profiles
from apex_orch.plan.profiles import load_profile
from apex_orch.quantize import job as q, run as qrun

pytestmark = pytest.mark.requires_tools("llama-quantize", "llama-imatrix")


@pytest.fixture(scope="session")
def model_imatrix(tmp_path_factory, mistral4_split, eval_text):
    """A real imatrix for the synthetic mistral4 model (llama-imatrix, 6 chunks of 128)."""
    out = tmp_path_factory.mktemp("imatrix") / "m4.imatrix.gguf"
    run_tool([find_tool("llama-imatrix").path, "-m", mistral4_split, "-f", eval_text, "-o", out,
              "-c", "128", "--chunks", "6", "-t", "2", "--no-repack"], log_path=out.with_suffix(".log"))
    return out


def quantize_one(model, profile, out_dir, imatrix=None, **kw):
    info = read_model(model)
    src = q.resolve_imatrix(info, imatrix) if imatrix else None
    job = q.plan_quantize(model, profile, out_dir=out_dir, imatrix=src, threads=2, model=info, **kw)
    return job, qrun.run_quantize(job, **{k: v for k, v in kw.items() if k == "force"})


@pytest.mark.parametrize("profile_name", list_profiles())
def test_every_profile_quantizes_and_verifies(profile_name, mistral4_split, model_imatrix, tmp_path):
    prof = load_profile(profile_name)
    job, res = quantize_one(mistral4_split, prof, tmp_path, imatrix=model_imatrix if prof.imatrix_required else None)
    out = res.files[0]
    assert out.name == f"APEX-Test-MoE-APEX-{prof.tier}.gguf" or out.name.endswith(f"-APEX-{prof.tier}.gguf")
    hdr = read_header(out)
    written = {t.name: t.ggml_type for t in hdr.tensors}
    assert written == {t.name: t.final_type for t in job.plan.tensors}
    assert out.stat().st_size == job.predicted_size            # the header prediction is exact
    assert hdr.kv["apex.profile"] == prof.name and hdr.kv["apex.tier"] == prof.tier
    assert hdr.kv["apex.profile_sha256"] == prof.sha256
    doc = json.loads(manifest_path(out).read_text())
    assert doc["files"][0]["size"] == out.stat().st_size
    assert (out.parent / (out.name + ".log")).exists()
    assert not list(tmp_path.glob(".*partial*")) and not list(tmp_path.glob("*.lock"))


@pytest.mark.parametrize("model_fixture", ["mistral4_fused", "mistral4_dense_lead", "qwen3moe"])
def test_other_layouts_quantize_and_verify(request, model_fixture, tmp_path):
    model = request.getfixturevalue(model_fixture)
    job, res = quantize_one(model, "compact", tmp_path)
    assert {t.name: t.ggml_type for t in read_header(res.files[0]).tensors} == \
        {t.name: t.final_type for t in job.plan.tensors}


def test_i_profile_without_imatrix_fails_before_writing(mistral4_split, tmp_path):
    with pytest.raises(ImatrixError, match="needs an importance matrix"):
        q.plan_quantize(mistral4_split, "i-compact", out_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_imatrix_from_another_model_is_refused(qwen3moe, model_imatrix):
    with pytest.raises(ImatrixError):
        q.resolve_imatrix(read_model(qwen3moe), model_imatrix)


def test_rerun_is_noop_and_force_redoes(mistral4_split, tmp_path):
    job, first = quantize_one(mistral4_split, "compact", tmp_path)
    inode = first.files[0].stat().st_ino
    again = qrun.run_quantize(job)
    assert again.skipped and again.message == "up to date"
    assert first.files[0].stat().st_ino == inode
    with pytest.raises(OutputExistsError):        # a new plan object, same output, inputs changed
        job2 = q.plan_quantize(mistral4_split, "compact", out_dir=tmp_path, threads=1)
        job2.inputs["note"] = "changed"
        qrun.run_quantize(job2)
    redo = qrun.run_quantize(job, force=True)
    assert not redo.skipped and redo.files[0].stat().st_ino != inode


def test_second_concurrent_run_is_refused(mistral4_split, tmp_path):
    job = q.plan_quantize(mistral4_split, "compact", out_dir=tmp_path)
    with OutputGuard(job.output):
        with pytest.raises(LockedError, match="another apex-orch run"):
            qrun.run_quantize(job)
    assert not job.output.exists()


def _drop_shexp_down_rule(monkeypatch):
    real = qrun.render_file

    def drop_one(plan):
        lines = real(plan).splitlines(keepends=True)
        return "".join(ln for ln in lines if "ffn_down_shexp" not in ln)

    monkeypatch.setattr(qrun, "render_file", drop_one)


def test_dropped_rule_is_caught_by_the_tool_dry_run_before_writing(mistral4_split, tmp_path, monkeypatch):
    """Fault injection (a fake): drop one rendered rule, as a past llama.cpp regression silently
    dropped overrides. The tool's own --dry-run then disagrees with the plan: stop before writing."""
    from apex_orch.core.errors import ToolPlanMismatchError
    _drop_shexp_down_rule(monkeypatch)
    job = q.plan_quantize(mistral4_split, "quality", out_dir=tmp_path)
    with pytest.raises(ToolPlanMismatchError,
                       match=r"blk\.0\.ffn_down_shexp\.weight: planned Q8_0, the tool's dry-run"):
        qrun.run_quantize(job)
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".log")] == []


def test_planted_mismatch_fails_verification(mistral4_split, tmp_path, monkeypatch):
    """Fault injection (two fakes): drop one rendered rule AND skip the dry-run cross-check, so
    the tool writes the mixture's type; the verification of the written bytes must catch it."""
    _drop_shexp_down_rule(monkeypatch)
    monkeypatch.setattr(qrun, "_check_tool_agrees", lambda *a, **k: None)
    job = q.plan_quantize(mistral4_split, "quality", out_dir=tmp_path)
    with pytest.raises(VerificationError, match="ffn_down_shexp"):
        qrun.run_quantize(job)
    assert not job.output.exists()
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".log")] == []


def test_split_output_parts_are_verified(mistral4_split, tmp_path):
    job, res = quantize_one(mistral4_split, "compact", tmp_path, split_max_size=12_000_000)
    assert len(res.files) >= 2
    assert all("-of-" in f.name for f in res.files)
    names = set()
    for f in res.files:
        names |= {t.name for t in read_header(f).tensors}
    assert names == {t.name for t in job.plan.tensors}
    # and the split output reads back as one model
    assert len(read_model(res.files[0]).tensors) == len(job.plan.tensors)


def _cli(*args):
    return [sys.executable, "-m", "apex_orch.cli", *map(str, args)]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupt_leaves_no_partial_and_no_lock(mistral4_split, tmp_path, sig):
    out_dir = tmp_path / "out"
    proc = subprocess.Popen(_cli("quantize", "-p", "quality", mistral4_split, "--out-dir", out_dir, "-t", "1",
                                 "--no-eval"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while time.time() < deadline and not list(out_dir.glob(".*partial*")):
        time.sleep(0.05)
    assert list(out_dir.glob(".*partial*")), "quantize never started writing"
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted" in err
    leftovers = [p.name for p in out_dir.iterdir() if not p.name.endswith(".log")]
    assert leftovers == []


def test_kill_9_is_recovered_by_next_run(mistral4_split, tmp_path):
    out_dir = tmp_path / "out"
    proc = subprocess.Popen(_cli("quantize", "-p", "quality", mistral4_split, "--out-dir", out_dir, "-t", "1",
                                 "--no-eval"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 60
    while time.time() < deadline and not list(out_dir.glob(".*partial*")):
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert list(out_dir.glob(".*partial*")) and list(out_dir.glob("*.lock"))   # what kill -9 leaves
    r = CliRunner().invoke(main, ["quantize", "-p", "quality", str(mistral4_split), "--out-dir", str(out_dir),
                                  "--no-eval"])
    assert r.exit_code == 0, r.output
    assert "partial file left by an interrupted run" in r.output
    assert not list(out_dir.glob(".*partial*")) and not list(out_dir.glob("*.lock"))
    assert len(list(out_dir.glob("*.gguf"))) == 1


def test_cli_dry_run_and_usage_errors(mistral4_split, tmp_path):
    r = CliRunner().invoke(main, ["quantize", "-p", "compact,quality", str(mistral4_split), "--out-dir",
                                  str(tmp_path), "--dry-run"])
    assert r.exit_code == 0, r.output
    assert "Compact:" in r.output and "Quality:" in r.output and "GiB predicted" in r.output
    assert list(tmp_path.iterdir()) == []
    r = CliRunner().invoke(main, ["quantize", str(mistral4_split)])
    assert r.exit_code == 2 and "--profile" in r.output
    r = CliRunner().invoke(main, ["quantize", "-p", "i-mini", str(mistral4_split), "--out-dir", str(tmp_path),
                                  "--no-eval", "--corpus", "no-such-corpus"])
    assert r.exit_code != 0 and "error:" in r.output


@pytest.mark.parametrize("role, tensor", [("output", "output.weight"), ("embedding", "token_embd.weight")])
def test_a_type_ggml_aborts_on_without_imatrix_data_is_refused_before_running(role, tensor, mistral4_split,
                                                                              model_imatrix, tmp_path):
    """IQ2_XXS/IQ2_XS/IQ1_S on token_embd/output: llama-quantize's own check exempts those tensors, then
    ggml asserts (the imatrix has no data for them). The plan refuses it; the tool really aborts."""
    prof = tmp_path / "abort.yaml"
    prof.write_text(f"extends: i-compact\ntier: Abort\ntypes:\n  {role}: IQ2_XXS\n")
    info = read_model(mistral4_split)
    with pytest.raises(ImatrixError, match=tensor.replace(".", r"\.")):
        q.plan_quantize(mistral4_split, load_profile(prof), out_dir=tmp_path / "out",
                        imatrix=q.resolve_imatrix(info, model_imatrix))
    assert not (tmp_path / "out").exists()
    p = subprocess.run([str(find_tool("llama-quantize").path), "--imatrix", str(model_imatrix), "--tensor-type",
                        f"^{tensor.replace('.', chr(92) + '.')}$=iq2_xxs", str(mistral4_split),
                        str(tmp_path / "raw.gguf"), "Q4_K_M", "2"], capture_output=True, text=True)
    assert p.returncode != 0 and "GGML_ASSERT(imatrix != NULL)" in p.stderr + p.stdout


def test_the_request_decides_the_imatrix_and_the_jobs(mistral4_split, model_imatrix, tmp_path):
    """quantize's policy lives in the library (quantize.request): an I-tier without an imatrix waits for
    one built from its profile's corpus; a given imatrix goes to every tier; the request's own errors
    name its fields, which the CLI words as flags."""
    from apex_orch.core.errors import RequestError
    from apex_orch.quantize.request import ImatrixToBuild, QuantizeRequest, plan_request
    out = tmp_path / "out"
    setup = plan_request(QuantizeRequest(["i-compact", "compact"], model=mistral4_split, out_dir=out, threads=3))
    assert setup.build == ImatrixToBuild("diverse", 512, None) and setup.jobs == [] and not setup.evaluate
    assert setup.describe().splitlines()[0].startswith(f"I-Compact: {out}/")
    assert all(line.endswith("imatrix from corpus diverse will be built first)")
               for line in setup.describe().splitlines())
    given = plan_request(QuantizeRequest(["i-compact", "compact"], model=mistral4_split, out_dir=out, threads=3,
                                         imatrix=model_imatrix, split_max_size=12_000_000))
    assert given.build is None and [j.profile.tier for j in given.jobs] == ["I-Compact", "Compact"]
    assert all(j.imatrix is not None and j.threads == 3 and j.split_max_size == 12_000_000 for j in given.jobs)
    assert given.describe() == "\n".join(j.describe() for j in given.jobs) and not out.exists()
    for request, fields in [
        (QuantizeRequest(["compact"]), ("model", "demo")),
        (QuantizeRequest(["compact", "quality"], model=mistral4_split, out=tmp_path / "x.gguf"), ("out",)),
        (QuantizeRequest(["compact"], model=mistral4_split, imatrix=model_imatrix, corpus="diverse"),
         ("imatrix", "corpus")),
        (QuantizeRequest(["compact"], model=mistral4_split, split_max_size=999_999), ("split_max_size",)),
    ]:
        with pytest.raises(RequestError) as err:
            plan_request(request)
        assert err.value.fields == fields
