"""Interrupts, kill -9, concurrent runs and damaged manifests: nothing half-written is ever
published, locks are released, and a damaged record is never trusted.

Real `python -m apex_orch.cli` subprocesses receive real signals; the tools are the real
llama-quantize / llama-imatrix / bindings except where a test says it uses a FAKE (a tool
that hangs, so that a second run can meet the first one's lock).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from apex_orch.core.manifest import manifest_path
from relkit import (TINY_NAME, assert_failed_cleanly, assert_one_error, cli, cli_cmd, compact_output, leftovers,
                    make_fake_bin, pids_running, process_gone, snapshot, wait_for)


def partials(folder: Path) -> list[Path]:
    return list(folder.glob(".*.gguf.partial-*")) if folder.exists() else []


def start(*args: object, env: dict | None = None, **kw) -> subprocess.Popen:
    return subprocess.Popen(cli_cmd(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, **(env or {})), **kw)


def wait_for_line(proc: subprocess.Popen, pattern: str, timeout: float = 60) -> list[str]:
    """Read the child's stderr until a line matches (the child keeps running)."""
    seen = []
    rx = re.compile(pattern)

    def found():
        line = proc.stderr.readline()
        if not line:
            pytest.fail(f"the command ended before printing {pattern!r}:\n{''.join(seen)}")
        seen.append(line)
        return rx.search(line)
    wait_for(found, f"a line matching {pattern!r}", timeout=timeout, every=0)
    return seen


# ---------------------------------------------------------------------------- quantize

@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP], ids=["SIGINT", "SIGTERM", "SIGHUP"])
def test_signal_during_parallel_quantize(sig, tiny_moe, tmp_path):
    """Two tiers in parallel (-j 2): the signal stops both tools, removes both partials and
    both locks; exit 130. (SIGHUP: the terminal was closed.)"""
    out = tmp_path / "out"
    proc = start("quantize", "-p", "compact,quality", tiny_moe, "--out-dir", out, "-j", "2", "-t", "1", "--no-eval")
    wait_for(lambda: partials(out) or proc.poll() is not None, "a partial output")
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert_one_error(err, 130, proc.returncode, "interrupted", "rerun the same command")
    assert leftovers(out) == []
    assert wait_for(lambda: pids_running(str(out)) == [], "the tools to stop", timeout=10)
    for f in out.glob("*.gguf"):   # a tier that finished before the signal is complete and recorded
        assert manifest_path(f).exists()


def test_sigterm_during_forced_redo_keeps_the_existing_output(tiny_moe, existing_output):
    before = snapshot(existing_output)
    proc = start("quantize", "-p", "compact", tiny_moe, "--out-dir", existing_output, "-t", "1", "--no-eval", "--redo")
    wait_for(lambda: partials(existing_output), "a partial output")
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert_failed_cleanly(err, 130, proc.returncode, "interrupted", out_dir=existing_output, before=before)


def test_kill_9_then_next_run_recovers(tiny_moe, tmp_path):
    """kill -9 of apex-orch alone (as the OOM killer would): the tool must not outlive it (it
    dies on its next log line, SIGPIPE), the partial and lock file stay behind, and the next
    run removes them and finishes."""
    out = tmp_path / "out"
    proc = start("quantize", "-p", "quality", tiny_moe, "--out-dir", out, "-t", "1", "--no-eval")
    wait_for(lambda: partials(out), "a partial output")
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=30)
    wait_for(lambda: pids_running(str(out)) == [], "the orphaned llama-quantize to die", timeout=30)
    assert partials(out) and list(out.glob("*.lock"))          # what kill -9 leaves
    r = cli("quantize", "-p", "quality", tiny_moe, "--out-dir", out, "-t", "2", "--no-eval")
    assert r.exit_code == 0, r.output
    assert "removed a partial file left by an interrupted run" in r.output
    assert leftovers(out) == []
    assert [p.name for p in out.glob("*.gguf")] == [f"{TINY_NAME}-APEX-Quality.gguf"]


def test_second_concurrent_run_on_one_output_is_refused(tiny_moe, tmp_path):
    """The first run uses a FAKE llama-quantize that hangs (so it holds the lock); the second
    (real tools) must be refused without touching the first one's files."""
    out = tmp_path / "out"
    fake = make_fake_bin(tmp_path / "fakebin", "llama-quantize",
                         "open(sys.argv[-3], 'wb').write(b'partial')\ntime.sleep(600)\n")
    first = start("quantize", "-p", "compact", tiny_moe, "--out-dir", out, "--no-eval",
                  env={"APEX_LLAMA_BIN_DIR": str(fake)})
    wait_for(lambda: partials(out), "the first run's partial output")
    before = snapshot(out)
    r = cli("quantize", "-p", "compact", tiny_moe, "--out-dir", out, "--no-eval", "--force")
    assert_one_error(r.output, 10, r.exit_code, f"{compact_output(out)} is being written by another apex-orch run",
                     f'"pid": {first.pid}', "wait for it to finish")
    assert snapshot(out) == before
    first.send_signal(signal.SIGTERM)
    _, err = first.communicate(timeout=60)
    assert first.returncode == 130, err
    assert leftovers(out) == []                               # lock released, partial removed


# ---------------------------------------------------------------------------- manifests

def _flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def test_corrupted_manifest_is_detected_not_trusted(tiny_moe, existing_output, tripwire):
    """One digit changed in the manifest (still valid JSON, a plausible size): the rerun must not
    say 'up to date' (nor run a tool)."""
    mpath = manifest_path(compact_output(existing_output))
    text = mpath.read_text()
    m = re.search(r'"size": \d*(\d)', text)
    digit = m.group(1)
    mpath.write_text(text[:m.start(1)] + str((int(digit) + 1) % 10) + text[m.end(1):])
    before = snapshot(existing_output)
    r = cli("quantize", "-p", "compact", tiny_moe, "--out-dir", existing_output, "--no-eval")
    assert_failed_cleanly(r.output, 13, r.exit_code, f"{mpath}: manifest content does not match its own checksum",
                          "rerun, forced, to rebuild the output [--force]", out_dir=existing_output, before=before)
    assert "up to date" not in r.output and not tripwire.exists()


def test_truncated_manifest_is_detected(tiny_moe, existing_output, tripwire):
    mpath = manifest_path(compact_output(existing_output))
    mpath.write_text(mpath.read_text()[:200])
    before = snapshot(existing_output)
    r = cli("quantize", "-p", "compact", tiny_moe, "--out-dir", existing_output, "--no-eval")
    assert_failed_cleanly(r.output, 13, r.exit_code, f"{mpath}: manifest is corrupt", "cannot be trusted",
                          out_dir=existing_output, before=before)
    assert not tripwire.exists()


def test_output_without_manifest_is_not_up_to_date(tiny_moe, existing_output, tripwire):
    manifest_path(compact_output(existing_output)).unlink()
    before = snapshot(existing_output)
    r = cli("quantize", "-p", "compact", tiny_moe, "--out-dir", existing_output, "--no-eval")
    assert_failed_cleanly(r.output, 9, r.exit_code, "already exists and is not up to date (no manifest)",
                          "ask to replace it", "[--force]", out_dir=existing_output, before=before)
    assert not tripwire.exists()


def test_output_changed_after_writing_is_not_up_to_date(tiny_moe, existing_output, tripwire):
    """Same size, one byte changed inside the file: the manifest no longer vouches for it."""
    _flip_byte(compact_output(existing_output), 4000)
    before = snapshot(existing_output)
    r = cli("quantize", "-p", "compact", tiny_moe, "--out-dir", existing_output, "--no-eval")
    assert_failed_cleanly(r.output, 9, r.exit_code,
                          f"not up to date ({TINY_NAME}-APEX-Compact.gguf changed since it was written)",
                          out_dir=existing_output, before=before)
    assert not tripwire.exists()


def test_intact_output_rerun_is_up_to_date_and_runs_nothing(tiny_moe, existing_output, tripwire):
    before = snapshot(existing_output)
    r = cli("quantize", "-p", "compact", tiny_moe, "--out-dir", existing_output, "--no-eval")
    assert r.exit_code == 0, r.output
    assert "Compact: up to date" in r.output
    assert snapshot(existing_output) == before and not tripwire.exists()


# ---------------------------------------------------------------------------- imatrix and eval

IMATRIX_ARGS = ("--corpus", "agentic", "--imatrix-ctx", "128", "--imatrix-chunks", "8", "-t", "1")


def _imatrix_dir(cache: Path) -> Path:
    return cache / "imatrix"


def test_sigterm_during_imatrix(tiny_moe, isolated_cache):
    proc = start("imatrix", tiny_moe, *IMATRIX_ARGS)
    wait_for_line(proc, r"running llama-imatrix")
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert_one_error(err, 130, proc.returncode, "interrupted")
    folder = _imatrix_dir(isolated_cache)
    assert [p.name for p in folder.iterdir() if "partial" in p.name or p.suffix in (".lock", ".gguf")] == []
    assert wait_for(lambda: pids_running(str(folder)) == [], "llama-imatrix to stop", timeout=10)


def test_kill_9_during_imatrix_then_next_run_recovers(tiny_moe, isolated_cache):
    proc = start("imatrix", tiny_moe, *IMATRIX_ARGS)
    wait_for_line(proc, r"running llama-imatrix")
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=30)
    folder = _imatrix_dir(isolated_cache)
    locks = list(folder.glob("*.lock"))
    assert len(locks) == 1 and process_gone(int(locks[0].read_text()))   # a stale lock: its owner is dead
    wait_for(lambda: pids_running(str(folder)) == [], "the orphaned llama-imatrix to stop", timeout=60)
    r = cli("imatrix", tiny_moe, *IMATRIX_ARGS)
    assert r.exit_code == 0, r.output
    assert list(folder.glob("*.lock")) == [] and list(folder.glob(".*partial*")) == []
    assert len(list(folder.glob("*.gguf"))) == 1


def test_second_concurrent_imatrix_run_is_refused(tiny_moe, isolated_cache, tmp_path):
    plan = cli("imatrix", tiny_moe, *IMATRIX_ARGS, "--dry-run")
    assert plan.exit_code == 0, plan.output
    cache_file = Path(re.search(r"cache:\s+(\S+\.gguf)", plan.output).group(1))
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    lock = cache_file.with_suffix(".lock")
    # A real holder: another process that has the flock (and wrote its pid, as apex-orch does).
    holder = subprocess.Popen([sys.executable, "-c",
                               "import fcntl, os, sys, time; fh = open(sys.argv[1], 'a+'); "
                               "fcntl.flock(fh, fcntl.LOCK_EX); fh.write(str(os.getpid())); fh.flush(); "
                               "print('locked', flush=True); time.sleep(120)", str(lock)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        r = cli("imatrix", tiny_moe, *IMATRIX_ARGS)
        assert_one_error(r.output, 10, r.exit_code, f"another apex-orch run (pid {holder.pid}) is computing this "
                                                    f"imatrix",
                         "wait for it")
        assert not cache_file.exists()
    finally:
        holder.kill()
        holder.wait()


def test_sigint_during_eval(tiny_moe, isolated_cache, eval_text):
    """Ctrl-C while the base model's log-probs are being cached: no half-written cache entry."""
    proc = start("eval", tiny_moe, "--base", tiny_moe, "--text", eval_text, "-c", "128", "--chunks", "12", "-t", "1")
    wait_for_line(proc, r"base log-probs: chunk 1/")
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert_one_error(err, 130, proc.returncode, "interrupted")
    written = [p for p in (isolated_cache / "eval").rglob("*") if p.is_file()]
    assert written == [], written
