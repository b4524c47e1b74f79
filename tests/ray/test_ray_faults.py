"""Faults of a release on a real Ray cluster (tests/ray/conftest.py): a worker whose disk fills up while
it writes a tier, and a worker killed with SIGKILL in the middle of a tier. Either way nothing partial
is left, finished tiers are kept, and the result is the local release byte for byte.

The disk fills up for real: the worker node's processes get a file-size cap (RLIMIT_FSIZE, as
`prlimit --fsize`) between the sizes of the two tiers, so llama-quantize is stopped by the kernel
(SIGXFSZ) when it writes past it. The kill uses a FAKE llama-quantize (relkit.make_fake_bin) that
only records its pid and argument list, then execs the real one.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

import relkit
from apex_orch.core.errors import ToolFailedError
from apex_orch.core.manifest import manifest_path, read_manifest
from apex_orch.llama import pin

pytestmark = pytest.mark.requires_tools("llama-quantize", "llama-imatrix", "llama-perplexity")


def stat_of(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_ino, st.st_mtime_ns


def file_cap(pid: int) -> str:
    line = next(ln for ln in Path(f"/proc/{pid}/limits").read_text().splitlines() if ln.startswith("Max file size"))
    return line.split()[3]


def test_full_disk_on_a_worker_stops_that_tier_and_a_rerun_resumes(raykit, local_release, ray_cluster, demo_text,
                                                                    tmp_path):
    ray_cluster.ensure_workers(2)
    sizes = {t: (local_release / raykit.tier_file(t)).stat().st_size for t in raykit.TIERS}
    small, big = sorted(raykit.TIERS, key=sizes.get)
    assert sizes[small] < sizes[big], sizes
    cap = (sizes[small] + sizes[big]) // 2            # the smaller tier fits on the worker, the larger does not
    full, other = ray_cluster.workers[:2]
    full_id = ray_cluster.node_id(full)
    cfg = raykit.write_release(tmp_path, demo_text)
    out = tmp_path / "out"
    env = ray_cluster.driver_env("ray")
    t0 = time.monotonic()
    ray_cluster.limit_fsize(full, cap)
    try:
        raylet = next(p for p in ray_cluster.pids_of(full) if Path(f"/proc/{p}/comm").read_text().strip() == "raylet")
        assert file_cap(raylet) == str(cap)           # the fault is in place
        with ray_cluster.occupied(other):             # so every task goes to the worker whose disk fills up
            failed = raykit.release(cfg, out, "--executor", "ray", env=env)
    finally:
        ray_cluster.limit_fsize(full, None)           # the disk is freed
    raykit.TIMINGS.append(f"full-disk release (fails) in {time.monotonic() - t0:.1f} s")

    # one clear error naming the tier, the tool's exit code; the kernel stopped the tool for real
    output = failed.stdout + failed.stderr
    relkit.assert_one_error(output, ToolFailedError.exit_code, failed.returncode, raykit.tier_file(big),
                            "llama-quantize was killed by SIGXFSZ", "ulimit -f")
    # nothing under the failed tier's final names, nothing partial anywhere, no card
    final = out / raykit.tier_file(big)
    assert [p.name for p in (final, manifest_path(final), final.with_name(final.name + ".tensor-types.txt"))
            if p.exists()] == []
    assert raykit.partials(out) == []
    assert not (out / "README.md").exists() and not (out / "localai").exists()
    # the other tier is kept, verified: its manifest is valid and describes its bytes, the local ones
    kept = out / raykit.tier_file(small)
    doc = read_manifest(manifest_path(kept))
    assert [r["sha256"] for r in doc["files"]] == [raykit.sha256(kept)] == [raykit.sha256(local_release / kept.name)]
    record = raykit.last_run(out)
    assert {p["name"]: p["status"] for p in record["phases"]}["quantize"] == "failed"
    tasks = {t["target"]: t for t in record["tasks"] if t["phase"] == "quantize"}
    assert (tasks[final.name]["status"], tasks[kept.name]["status"]) == ("failed", "done")
    assert tasks[final.name]["worker"][:8] == tasks[kept.name]["worker"][:8] == full_id[:8]
    kept_stat = stat_of(kept)

    # a rerun on the healthy cluster quantizes only the failed tier; the result is the local release
    t1 = time.monotonic()
    rerun = raykit.release(cfg, out, "--executor", "ray", env=env)
    raykit.TIMINGS.append(f"full-disk rerun in {time.monotonic() - t1:.1f} s")
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert raykit.phase_table(rerun.stdout)["quantize"][2] == "1 written, 1 up to date"
    assert stat_of(kept) == kept_stat
    assert raykit.published(out) == raykit.published(local_release)
    assert raykit.partials(out) == []


def test_worker_killed_mid_tier_is_retried_on_the_other_worker(raykit, local_release, ray_cluster, demo_text,
                                                                tmp_path):
    """FAKE llama-quantize: records its pid and arguments, then execs the real one (same pid)."""
    ray_cluster.ensure_workers(2)
    markers = tmp_path / "markers"
    markers.mkdir()
    real = str(pin.bin_dir() / "llama-quantize")
    body = (f"open(os.path.join({str(markers)!r}, str(os.getpid())), 'w').write(chr(10).join(sys.argv))\n"
            "signal.signal(signal.SIGPIPE, signal.SIG_DFL)   # as the real tool gets it from apex-orch\n"
            f"os.execv({real!r}, [{real!r}] + sys.argv[1:])\n")
    fake = relkit.make_fake_bin(tmp_path / "bin", "llama-quantize", body)
    cfg = raykit.write_release(tmp_path, demo_text)
    out = tmp_path / "out"
    victim = raykit.tier_file("I-Compact")
    env = ray_cluster.driver_env("ray", APEX_LLAMA_BIN_DIR=str(fake))
    t0 = time.monotonic()
    with open(tmp_path / "run.out", "w") as so, open(tmp_path / "run.err", "w") as se:
        proc = subprocess.Popen(raykit.release_argv(cfg, out, "--executor", "ray"), stdout=so, stderr=se, env=env,
                                start_new_session=True)
    try:
        def tool_pid() -> int | None:
            """The pid of the llama-quantize writing the victim tier; -1 if the driver ended first."""
            if proc.poll() is not None:
                return -1
            return next((int(m.name) for m in markers.iterdir() if f"/.{victim}.partial-" in m.read_text()), None)
        pid = relkit.wait_for(tool_pid, f"llama-quantize writing {victim}", timeout=240)
        assert pid > 0, (tmp_path / "run.out").read_text() + (tmp_path / "run.err").read_text()
        writing = relkit.wait_for(lambda: [p.name for p in out.glob(f".{victim}.partial-*") if p.stat().st_size > 0],
                                  f"the partial of {victim}", timeout=60)
        node = ray_cluster.node_of(pid)
        assert node in ray_cluster.workers, (pid, node)
        survivor = next(w for w in ray_cluster.workers if w is not node)
        killed_id, survivor_id = ray_cluster.node_id(node), ray_cluster.node_id(survivor)
        assert not relkit.process_gone(pid)           # killed in the middle of the tier, its tool still writing
        killed = ray_cluster.kill_node(node)
        assert pid in killed
        proc.wait(timeout=400)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    raykit.TIMINGS.append(f"release with a worker killed mid-tier in {time.monotonic() - t0:.1f} s")
    stdout, stderr = (tmp_path / "run.out").read_text(), (tmp_path / "run.err").read_text()
    assert proc.returncode == 0, stdout + stderr
    assert [p for p in killed if not relkit.process_gone(p)] == []   # the worker node is really gone
    assert node.proc.poll() is not None

    # the release completed: the local release byte for byte, nothing partial anywhere
    assert raykit.published(out) == raykit.published(local_release)
    assert raykit.partials(out) == []
    # the task was retried on the surviving worker, which removed the dead attempt's partial
    tasks = {t["target"]: t for t in raykit.last_run(out)["tasks"] if t["phase"] == "quantize"}
    assert (tasks[victim]["attempts"], tasks[victim]["status"]) == (2, "done")
    assert tasks[victim]["worker"][:8] == survivor_id[:8] != killed_id[:8]
    assert tasks[raykit.tier_file("Compact")]["status"] == "done"
    row = next(r for r in raykit.task_table(stdout) if r[:2] == ["quantize", victim])
    assert (row[2], row[4]) == (tasks[victim]["worker"], "2")
    log = (out / ".apex-release" / "release.log").read_text()
    assert all(f"removed a partial file left by an interrupted run: {name}" in log for name in writing), log
    assert all(t["worker"][:8] == survivor_id[:8] for t in raykit.last_run(out)["tasks"] if t["phase"] == "eval")
