"""llama.cpp tool faults and file-system faults during `apex-orch quantize`.

Where a tool must misbehave (exit non-zero, crash, hang, lie about success) the test puts a
FAKE llama-quantize in a bin folder that otherwise links the real build; the docstring of
each such test says so. Disk-full, file-size-limit and read-only cases use the REAL
llama-quantize and real kernel limits (tmpfs mounts need root; as root, chmod cannot stop a
write, so permission bits are not used).

Fault cases run with --redo over an existing, verified output: it must survive untouched.
"""

from __future__ import annotations

import os
import resource
import shutil
import subprocess

import pytest

from relkit import (assert_failed_cleanly, cli, cli_cmd, compact_output, make_fake_bin,
                    process_gone, run_cli, snapshot, tmpfs, wait_for)

HANG = ("open(sys.argv[-3], 'wb').write(b'partial')\n"
        "open(os.environ['APEX_TEST_PIDFILE'], 'w').write(str(os.getpid()))\n")


def force_run_with_fake(tmp_path, existing_output, body, *extra):
    """quantize --redo over an existing output with a FAKE llama-quantize running `body`."""
    bindir = make_fake_bin(tmp_path / "fakebin", "llama-quantize", body)
    before = snapshot(existing_output)
    r = cli("quantize", "-p", "compact", existing_output.parent / "model.gguf",
            "--out-dir", existing_output, "-t", "1", "--no-eval", "--redo", *extra,
            env={"APEX_LLAMA_BIN_DIR": str(bindir), "APEX_TEST_PIDFILE": str(tmp_path / "tool.pid")})
    return r, before


@pytest.fixture
def model_beside(existing_output, tiny_moe):
    """tiny_moe reachable as <tmp>/model.gguf (keeps command lines short in messages)."""
    (existing_output.parent / "model.gguf").symlink_to(tiny_moe)
    return existing_output


def test_tool_binary_missing(tiny_moe, tmp_path, monkeypatch):
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("APEX_LLAMA_BIN_DIR", str(empty))
    r = cli("quantize", "-p", "compact", tiny_moe, "--out-dir", tmp_path / "out", "--no-eval")
    assert_failed_cleanly(r.output, 7, r.exit_code, f"llama-quantize not found; searched: {empty}/llama-quantize (env)",
                          "run `make llama`", "APEX_LLAMA_BIN_DIR")
    assert not (tmp_path / "out").exists()


def test_tool_binary_missing_in_llama_bin_dir_flag(tiny_moe, tmp_path):
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    # (the flag is passed to tool discovery as a value; APEX_LLAMA_BIN_DIR is unset so only the flag counts)
    r = cli("--llama-bin-dir", empty, "quantize", "-p", "compact", tiny_moe, "--out-dir", tmp_path / "out", "--no-eval",
            env={"APEX_LLAMA_BIN_DIR": None})
    assert_failed_cleanly(r.output, 7, r.exit_code, f"{empty}/llama-quantize", "make llama")


def test_tool_exits_nonzero(model_beside, tmp_path):
    """FAKE llama-quantize: prints a reason and exits 3."""
    r, before = force_run_with_fake(tmp_path, model_beside,
                                    "print('llama_model_quantize: failed to mmap the input: Input/output error')\n"
                                    "sys.exit(3)\n")
    assert_failed_cleanly(r.output, 8, r.exit_code, "llama-quantize failed with exit code 3",
                          "failed to mmap the input", f"full log: {compact_output(model_beside)}.log",
                          out_dir=model_beside, before=before)


def test_tool_killed_by_a_signal(model_beside, tmp_path):
    """FAKE llama-quantize: starts writing, then dies by SIGSEGV."""
    r, before = force_run_with_fake(tmp_path, model_beside,
                                    "open(sys.argv[-3], 'wb').write(b'GGUF')\nprint('quantizing', flush=True)\n"
                                    "os.kill(os.getpid(), signal.SIGSEGV)\n")
    assert_failed_cleanly(r.output, 8, r.exit_code, "llama-quantize was killed by SIGSEGV", "the tool crashed",
                          out_dir=model_beside, before=before)


@pytest.mark.parametrize("ignores_sigterm", [False, True], ids=["hangs", "hangs-ignoring-sigterm"])
def test_tool_hangs_and_timeout_stops_it(model_beside, tmp_path, ignores_sigterm):
    """FAKE llama-quantize: writes a partial output, then sleeps forever (optionally ignoring
    SIGTERM, so only the SIGKILL escalation can stop it)."""
    ignore = "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n" if ignores_sigterm else ""
    r, before = force_run_with_fake(tmp_path, model_beside, ignore + HANG + "time.sleep(600)\n", "--timeout", "1")
    assert_failed_cleanly(r.output, 8, r.exit_code, "llama-quantize ran past the 1 s timeout and was stopped",
                          "allow more time, or check the log for a hang [--timeout]", out_dir=model_beside,
                          before=before)
    assert process_gone(int((tmp_path / "tool.pid").read_text()))


def test_tool_succeeds_but_writes_nothing(model_beside, tmp_path):
    """FAKE llama-quantize: exits 0 without writing its output."""
    r, before = force_run_with_fake(tmp_path, model_beside, "sys.exit(0)\n")
    assert_failed_cleanly(r.output, 8, r.exit_code, "llama-quantize exited 0 but wrote no output",
                          out_dir=model_beside, before=before)


def test_tool_succeeds_but_output_is_truncated(model_beside, tmp_path):
    """FAKE llama-quantize: writes the first MiB of its input as the output and exits 0 (what a
    tool that ignores write errors would leave)."""
    r, before = force_run_with_fake(tmp_path, model_beside,
                                    "open(sys.argv[-3], 'wb').write(open(sys.argv[-4], 'rb').read(1 << 20))\n")
    assert_failed_cleanly(r.output, 12, r.exit_code, "the file llama-quantize wrote is incomplete or damaged",
                          "file is shorter than its tensors", "nothing was published",
                          out_dir=model_beside, before=before)


def test_tool_succeeds_but_ignored_the_overrides(model_beside, tmp_path):
    """FAKE llama-quantize: copies its F16 input to the output and exits 0 (a tool that dropped
    every --tensor-type rule). Verification against the plan must catch it."""
    r, before = force_run_with_fake(tmp_path, model_beside,
                                    "import shutil\nshutil.copyfile(sys.argv[-4], sys.argv[-3])\n")
    assert_failed_cleanly(r.output, 12, r.exit_code, "output does not match the plan",
                          "token_embd.weight: planned Q4_K, written F16", "the file was not published",
                          out_dir=model_beside, before=before)


# ---------------------------------------------------------------------------- disk and folders

def test_disk_fills_during_writing(tiny_moe, tmp_path):
    """Real llama-quantize on a 100 MB tmpfs that passes the pre-flight check; the test fills
    the file system as soon as the partial output appears."""
    with tmpfs(tmp_path / "fs", "100m") as fs:
        out = fs / "out"
        proc = subprocess.Popen(cli_cmd("quantize", "-p", "quality", tiny_moe, "--out-dir", out, "-t", "1",
                                        "--no-eval"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        wait_for(lambda: list(out.glob(".*.partial-*")) or proc.poll() is not None, "the partial output")
        with open(fs / "filler", "wb") as fh:
            try:
                while True:
                    fh.write(b"\0" * (1 << 20))
                    fh.flush()
            except OSError:
                pass
        output, _ = proc.communicate(timeout=120)
        (fs / "filler").unlink()
        assert_failed_cleanly(output, 11, proc.returncode, "is full", str(out), "choose another output folder",
                              "[--out-dir, --output]",
                              out_dir=out, before={})
        assert not any(p.suffix == ".gguf" for p in out.iterdir())


def test_file_size_limit_reached(tiny_moe, existing_output, tmp_path):
    """Real llama-quantize under RLIMIT_FSIZE = 4 MiB (like `ulimit -f 4096`): it dies by
    SIGXFSZ part-way through writing."""
    before = snapshot(existing_output)

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (4 << 20, 4 << 20))

    r = run_cli("quantize", "-p", "compact", tiny_moe, "--out-dir", existing_output, "-t", "1", "--no-eval",
                "--redo", preexec_fn=limit)
    assert_failed_cleanly(r.stderr, 8, r.returncode, "llama-quantize was killed by SIGXFSZ",
                          "the file size limit (`ulimit -f`)", out_dir=existing_output, before=before)


def test_not_enough_free_disk_refused_before_starting(tiny_moe, tmp_path, tripwire):
    with tmpfs(tmp_path / "fs", "20m") as fs:
        r = cli("quantize", "-p", "compact", tiny_moe, "--out-dir", fs, "--no-eval")
        assert_failed_cleanly(r.output, 11, r.exit_code, f"not enough free disk in {fs}", "0.02 GB free",
                              "choose another output folder", "[--out-dir, --output]", out_dir=fs, before={})
        assert os.listdir(fs) == [] and not tripwire.exists()


def test_output_folder_read_only(tiny_moe, existing_output, tmp_path, tripwire):
    """A read-only mount holding a finished output: --redo must be refused before anything
    runs, and the output stays as it was."""
    with tmpfs(tmp_path / "fs", "100m") as fs:
        shutil.copytree(existing_output, fs / "out")
        subprocess.run(["mount", "-o", "remount,ro", str(fs)], check=True)
        before = snapshot(fs / "out")
        r = cli("quantize", "-p", "compact", tiny_moe, "--out-dir", fs / "out", "--no-eval", "--redo")
        assert_failed_cleanly(r.output, 17, r.exit_code, f"output folder {fs / 'out'} is not writable "
                              "(read-only file system)", "choose another output folder", "[--out-dir, --output]",
                              out_dir=fs / "out", before=before)
        assert not tripwire.exists()


def test_output_folder_cannot_be_created(tiny_moe, tmp_path, tripwire):
    with tmpfs(tmp_path / "fs", "1m", read_only=True) as fs:
        r = cli("quantize", "-p", "compact", tiny_moe, "--out-dir", fs / "new" / "out", "--no-eval")
        assert_failed_cleanly(r.output, 17, r.exit_code, f"cannot create {fs / 'new'}", "Read-only file system",
                              "choose another output folder", "[--out-dir, --output]")
        assert not tripwire.exists()


def test_small_output_into_read_only_folder_is_one_message(tiny_moe, tmp_path):
    """`render -o` writes through the quantize guard too (core.outputs.write_output): a read-only
    folder is one message before anything is written (no traceback)."""
    with tmpfs(tmp_path / "fs", "1m", read_only=True) as fs:
        r = cli("render", "-p", "compact", tiny_moe, "-o", fs / "rules.txt")
        assert_failed_cleanly(r.output, 17, r.exit_code, f"output folder {fs} is not writable (read-only file system)",
                              "hint: choose another output folder [--output]")
