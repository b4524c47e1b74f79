"""`apex-orch release` cross-checks: interrupts, the HF token, file names, where files go.

The release module's own tests (tests/test_release.py) cover its schema, phases, card and
publishing; these add the reliability view over a real, minimal release of the tiny model
(one tier, no imatrix, no eval) run as a real subprocess. Publishing is attempted with
HF_HUB_OFFLINE=1, so it fails without any network access — which is the point: its error
must not carry the token either.
"""

from __future__ import annotations

import fcntl
import signal
import subprocess
from pathlib import Path

import pytest

from relkit import PLANTED_TOKEN, assert_one_error, cli_cmd, leftovers, run_cli, snapshot, wait_for


def _config(tmp_path: Path, model: Path, name: str = "Tiny-Release") -> Path:
    cfg = tmp_path / "cfg" / "release.yaml"
    cfg.parent.mkdir()
    cfg.write_text(f"name: {name!r}\nlicense: mit\nsource:\n  gguf: {model}\ntiers: [compact]\n"
                   "eval: {enabled: false}\npublish: {repo: apex-orch/Tiny-Release-APEX-GGUF}\n")
    return cfg


def _lock_is_free(lock: Path) -> bool:
    with open(lock, "a+") as fh:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
        return True


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_during_release(sig, tiny_moe, tmp_path, isolated_cache):
    out = tmp_path / "release"
    proc = subprocess.Popen(cli_cmd("release", _config(tmp_path, tiny_moe), "--out-dir", out, "-j", "1"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: list(out.glob(".*.partial-*")) or proc.poll() is not None, "quantize to start writing")
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert_one_error(err, 130, proc.returncode, "interrupted")
    assert leftovers(out) == []
    assert not list(out.glob("*.gguf")) and not (out / "README.md").exists()
    assert _lock_is_free(out / ".apex-release" / "lock")


def test_release_never_leaks_the_token_and_sanitizes_names(tiny_moe, tmp_path, isolated_cache):
    """A hostile name, a planted HF_TOKEN and --push (offline: the upload must fail). Files are
    named from the sanitized name inside the release folder; the token is in no file, log,
    card, LocalAI entry, record or message."""
    cfg = _config(tmp_path, tiny_moe, name="../../Evil Name/..")
    out = tmp_path / "release"
    model_dir_before = snapshot(tiny_moe.parent)
    r = run_cli("release", cfg, "--out-dir", out, "-j", "1", "--push",
                env={"HF_TOKEN": PLANTED_TOKEN, "HF_HUB_OFFLINE": "1"}, timeout=300)
    assert_one_error(r.stderr, 16, r.returncode, "upload to apex-orch/Tiny-Release-APEX-GGUF failed")
    assert PLANTED_TOKEN not in r.stdout + r.stderr
    leaked = [str(p) for p in out.rglob("*") if p.is_file() and PLANTED_TOKEN.encode() in p.read_bytes()]
    assert leaked == []
    assert sorted(p.name for p in out.glob("*.gguf")) == ["Evil-Name-APEX-Compact.gguf"]
    assert (out / "README.md").is_file() and list((out / "localai").glob("*.yaml"))
    # nothing outside the release folder: the config's folder holds only the config, the model's is unchanged
    assert [p.name for p in cfg.parent.iterdir()] == ["release.yaml"]
    assert snapshot(tiny_moe.parent) == model_dir_before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "cfg", "release"]
