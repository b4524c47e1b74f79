"""`apex-orch release --executor ray`: the demo release on a real Ray cluster (tests/ray/conftest.py:
a head and two one-CPU workers on this machine) is the local release, byte for byte.

One release runs through Ray Client (`ray://`) and makes everything on the cluster: the imatrix
(the local one moved aside), the base log-probabilities (into an eval cache only the driver is told
about), both tiers and their evaluations. While it runs, a second driver on the same folder is
refused; then a rerun through `--executor ray` (RAY_ADDRESS) finds everything up to date.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time

import pytest

import relkit
from apex_orch.core import settings
from apex_orch.core.errors import ExecutorError, LockedError
from apex_orch.core.manifest import manifest_path, read_manifest

pytestmark = pytest.mark.requires_tools("llama-quantize", "llama-imatrix", "llama-perplexity")


@pytest.fixture(scope="module")
def ray_release(raykit, local_release, ray_cluster, demo_text, tmp_path_factory):
    ray_cluster.ensure_workers(2)
    folder = tmp_path_factory.mktemp("ray-release")
    cfg = raykit.write_release(folder, demo_text)
    out = folder / "out"
    # The cluster makes the imatrix again, at the path the local release used: llama-quantize writes
    # that path into the I-tier's file. The local one is moved aside, to compare.
    imatrix_dir = settings.cache_root() / "imatrix"
    local_imatrix = folder / "imatrix-local"
    shutil.move(imatrix_dir, local_imatrix)
    # An eval cache only the driver is told about: the base log-probs land there if the workers got
    # the driver's settings.
    eval_cache = folder / "eval-cache"
    client_env = ray_cluster.driver_env("client", APEX_ORCH_EVAL_CACHE=str(eval_cache))
    ray_env = ray_cluster.driver_env("ray", APEX_ORCH_EVAL_CACHE=str(eval_cache))
    t0 = time.monotonic()
    try:
        with open(folder / "first.out", "w") as so, open(folder / "first.err", "w") as se:
            first = subprocess.Popen(raykit.release_argv(cfg, out, "--executor", ray_cluster.client_address),
                                     stdout=so, stderr=se, env=client_env, start_new_session=True)
        try:
            lock = out / ".apex-release" / "lock"
            relkit.wait_for(lambda: lock.exists() or first.poll() is not None, "the first driver to lock its folder",
                            timeout=120)
            second = raykit.release(cfg, out, "--executor", "ray", env=ray_env, timeout=120)
            first_was_running = first.poll() is None
            first.wait(timeout=400)
        finally:
            if first.poll() is None:
                os.killpg(first.pid, signal.SIGKILL)
                first.wait()
        stdout, stderr, code = (folder / "first.out").read_text(), (folder / "first.err").read_text(), first.returncode
        if code == ExecutorError.exit_code and "Initialization failure from server" in stdout + stderr:
            # Ray's client proxy takes the port of each client's server from one fixed range (23000+) for
            # every cluster on the machine: another cluster's client connecting at the same moment can
            # take it first (Ray's race, seen with two sessions at once). Once more, then it must work.
            why = ray_cluster.ray_logs("*client_server_*", 3).replace("\n", " | ")[:300]
            raykit.TIMINGS.append(f"Ray Client: the connection failed once ({why}); retried")
            again = raykit.release(cfg, out, "--executor", ray_cluster.client_address, env=client_env)
            stdout, stderr, code = again.stdout, again.stderr, again.returncode
    finally:
        if not imatrix_dir.exists():      # the run failed early: the next tests still find the local one
            shutil.copytree(local_imatrix, imatrix_dir)
    raykit.TIMINGS.append(f"demo release on the cluster (Ray Client) in {time.monotonic() - t0:.1f} s")
    assert code == 0, stdout + stderr + ray_cluster.ray_logs("*client_server_*")
    files = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.rglob("*") if p.is_file()}
    record = raykit.last_run(out)
    t1 = time.monotonic()
    rerun = raykit.release(cfg, out, "--executor", "ray", env=ray_env)
    raykit.TIMINGS.append(f"no-op rerun on the cluster (RAY_ADDRESS) in {time.monotonic() - t1:.1f} s")
    return {"out": out, "imatrix_dir": imatrix_dir, "local_imatrix": local_imatrix, "eval_cache": eval_cache,
            "stdout": stdout, "stderr": stderr, "record": record, "second": second,
            "first_was_running": first_was_running, "files": files, "rerun": rerun}


def test_files_are_the_local_release_byte_for_byte(raykit, ray_release, local_release):
    """Same names, same sha256 for every GGUF, the same card and LocalAI entries."""
    ray_files, local_files = raykit.published(ray_release["out"]), raykit.published(local_release)
    assert sorted(ray_files) == [raykit.tier_file(t) for t in raykit.TIERS] + [
        "README.md", "calibration/calibration.json", "calibration/calibration.txt", "calibration/imatrix.gguf",
        "kld-vs-size.png", "localai/demo-release-apex-compact.yaml", "localai/demo-release-apex-i-compact.yaml"]
    assert ray_files == local_files
    assert (ray_release["out"] / "README.md").read_bytes() == (local_release / "README.md").read_bytes()
    assert raykit.partials(ray_release["out"]) == []


def test_manifests_verify_and_record_the_same_inputs(raykit, ray_release, local_release):
    for tier in raykit.TIERS:
        f = ray_release["out"] / raykit.tier_file(tier)
        doc = read_manifest(manifest_path(f))                       # schema and self checksum
        local = read_manifest(manifest_path(local_release / f.name))
        assert doc["inputs_key"] == local["inputs_key"]
        assert [r["sha256"] for r in doc["files"]] == [raykit.sha256(f)] == [r["sha256"] for r in local["files"]]
        assert doc["verified"] == local["verified"]


def test_summary_names_two_workers_for_two_tiers_and_phase_times(raykit, ray_release, ray_cluster):
    stdout = ray_release["stdout"]
    phases = raykit.phase_table(stdout)
    assert {p: phases[p][0] for p in ("imatrix", "quantize", "eval", "card")} == dict.fromkeys(
        ("imatrix", "quantize", "eval", "card"), "ran")
    assert phases["quantize"][2] == "2 written, 0 up to date"
    assert all(float(phases[p][1]) > 0 for p in ("imatrix", "quantize", "eval")), phases
    workers = {ray_cluster.node_id(w)[:8] for w in ray_cluster.workers}
    head = ray_cluster.node_id(ray_cluster.nodes[0])[:8]
    tasks = ray_release["record"]["tasks"]
    assert ray_release["record"]["executor"] == "ray"
    assert sorted(t["phase"] for t in tasks) == ["eval", "eval", "eval-base", "imatrix", "quantize", "quantize"]
    for phase in ("quantize", "eval"):
        assert sorted(t["target"] for t in tasks if t["phase"] == phase) == [raykit.tier_file(t) for t in raykit.TIERS]
    assert all(t["worker"][:8] in workers and t["status"] == "done" and t["attempts"] == 1 for t in tasks), tasks
    assert head not in {t["worker"][:8] for t in tasks}                    # the head takes no task
    quantize = {t["target"]: t["worker"] for t in tasks if t["phase"] == "quantize"}
    assert len({w[:8] for w in quantize.values()}) == 2, quantize          # one tier per worker
    rows = raykit.task_table(stdout)
    assert sorted((r[1], r[2]) for r in rows if r[0] == "quantize") == sorted(quantize.items())
    # seconds as measured (an eval of the 9 MB demo can round to 0.0), one attempt each
    assert all(float(r[3]) >= 0 and r[4] == "1" for r in rows), rows


def test_the_cluster_made_the_imatrix_and_base_logprobs_with_the_drivers_settings(ray_release):
    """The imatrix task wrote into the driver's cache the same bytes the local release made; the base
    log-probs are in the eval cache only the driver was told about (settings travel with the tasks)."""
    tasks = ray_release["record"]["tasks"]
    imatrix = next(t["target"] for t in tasks if t["phase"] == "imatrix")
    made = ray_release["imatrix_dir"] / imatrix
    assert made.read_bytes() == (ray_release["local_imatrix"] / imatrix).read_bytes()
    assert len(list(ray_release["eval_cache"].rglob("*.zip"))) == 1, sorted(ray_release["eval_cache"].rglob("*"))


def test_second_driver_on_the_folder_is_refused(ray_release):
    second = ray_release["second"]
    assert ray_release["first_was_running"]        # the two drivers really overlapped
    relkit.assert_one_error(second.stdout + second.stderr, LockedError.exit_code, second.returncode,
                            f"another apex-orch release is running in {ray_release['out']}")


def test_rerun_on_the_cluster_is_a_noop(raykit, ray_release):
    rerun = ray_release["rerun"]
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    status = {p: row[0] for p, row in raykit.phase_table(rerun.stdout).items()}
    assert status == {"fetch": "not needed", "convert": status["convert"], "imatrix": "up to date",
                      "quantize": "up to date", "eval": "up to date", "card": "up to date", "publish": "skipped"}
    assert status["convert"] in ("not needed", "up to date")
    out = ray_release["out"]
    now = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.rglob("*") if p.is_file()}
    assert {n for n in now if now[n] != ray_release["files"].get(n)} == {"release.log", "last-run.json"}
    assert raykit.phase_table(rerun.stdout)["quantize"][2] == "0 written, 2 up to date"
    assert [t for t in raykit.last_run(out)["tasks"] if t["phase"] in ("eval-base", "eval")] == []
