"""Helpers for the reliability suite: running the CLI, waiting, and the four checks every case makes.

Every case asserts (see `assert_failed_cleanly`): one `error:` message (what, where, how to
fix) and no traceback; the expected non-zero exit code; no partial, lock or new file under a
final name; the files that existed before are byte-identical.

Fakes are used only where a fault must be injected: `make_fake_bin` builds a folder of
symlinks to the real pinned llama.cpp build (tools and shared libraries) in which ONE tool is
replaced by a small Python script; every test using one says so in its docstring.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

import pytest
from click.testing import CliRunner, Result

from apex_orch.llama import pin
from apex_orch.demo.spec import SyntheticSpec
from apex_orch.cli import main

TINY_SPEC = SyntheticSpec(arch="mistral4", n_layer=4, n_embd=256, n_expert=4, n_expert_used=2,
                          n_expert_shared=1, expert_ff=256, name="Tiny-MoE", seed=7)
TINY_NAME = "Tiny-MoE"
PLANTED_TOKEN = "hf_PlantedTokenValue4Reliability0123456789"

# A FAKE llama-quantize body that only records it was started, then exits 99.
TRIPWIRE = ("open(os.environ['APEX_TEST_TRIPWIRE'], 'w').write(' '.join(sys.argv))\n"
            "sys.exit(99)\n")


def compact_output(folder: Path) -> Path:
    return folder / f"{TINY_NAME}-APEX-Compact.gguf"


def make_fake_bin(folder: Path, tool: str, body: str, *, dry_run_passthrough: bool = True) -> Path:
    """`folder` = the real build, with `tool` replaced by a FAKE Python script running `body`
    (with os, sys, signal, time imported; sys.argv is the argument list apex-orch passed).
    A FAKE llama-quantize passes `--dry-run` calls to the real one unless told not to."""
    folder.mkdir(parents=True, exist_ok=True)
    for f in pin.bin_dir().iterdir():
        if f.name != tool and not (folder / f.name).exists():
            (folder / f.name).symlink_to(f)
    script = folder / tool
    # quantize asks the tool for a --dry-run first (apex_orch.quantize.toolcheck); the fault is injected
    # into the real run, so the FAKE hands dry runs to the real binary.
    real = pin.bin_dir() / tool
    passthrough = (f"if '--dry-run' in sys.argv:\n    os.execv({str(real)!r}, [{str(real)!r}] + sys.argv[1:])\n"
                   if tool == "llama-quantize" and dry_run_passthrough else "")
    script.write_text(f"#!{sys.executable}\n# FAKE {tool} injected by tests/reliability\n"
                      "import os, sys, signal, time\n" + passthrough + body)
    script.chmod(0o755)
    return folder


# ---------------------------------------------------------------------------- running

def cli(*args: object, env: dict | None = None) -> Result:
    """Run the CLI in-process (CliRunner); .output holds stdout and stderr."""
    return CliRunner().invoke(main, [str(a) for a in args], env=env)


def cli_cmd(*args: object) -> list[str]:
    """Argument list for a real `python -m apex_orch.cli ...` subprocess."""
    return [sys.executable, "-m", "apex_orch.cli", *map(str, args)]


def run_cli(*args: object, env: dict | None = None, timeout: float = 120, **kw) -> subprocess.CompletedProcess:
    full_env = dict(os.environ, **(env or {}))
    return subprocess.run(cli_cmd(*args), capture_output=True, text=True, env=full_env, timeout=timeout, **kw)


def wait_for(predicate: Callable[[], object], what: str, timeout: float = 60.0, every: float = 0.02):
    """Poll until predicate() is truthy (a deadline for liveness, not a timing assertion)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    pytest.fail(f"gave up waiting for {what} after {timeout:.0f} s")


def pids_running(needle: str) -> list[int]:
    """Processes whose command line contains `needle` (a unique temp path), zombies excluded."""
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes()
            state = (d / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if needle.encode() in cmd and state != "Z":
            found.append(int(d.name))
    return found


def process_gone(pid: int) -> bool:
    """True when pid no longer runs (absent, or a zombie awaiting its reaper)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state == "Z"


# ---------------------------------------------------------------------------- checks

def snapshot(folder: Path) -> dict[str, str]:
    """relative name -> sha256 of every regular file under folder, hidden files included."""
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and not p.is_symlink()}


def leftovers(folder: Path) -> list[str]:
    """Partial files and locks in folder (what a failed or interrupted run must not leave)."""
    if not folder.exists():
        return []
    return sorted(p.name for p in folder.iterdir() if ".partial" in p.name or p.name.endswith(".lock"))


def assert_one_error(output: str, exit_code: int, actual_code: int, *needles: str) -> None:
    """One actionable message: exactly one `error:`, the expected exit code, no traceback."""
    assert actual_code == exit_code, f"exit {actual_code}, expected {exit_code}:\n{output}"
    assert "Traceback" not in output, output
    assert output.count("error:") == 1, output
    for needle in needles:
        assert needle in output, f"{needle!r} not in:\n{output}"


def assert_failed_cleanly(output: str, exit_code: int, actual_code: int, *needles: str,
                          out_dir: Path | None = None, before: dict[str, str] | None = None) -> None:
    """assert_one_error, plus in out_dir: no partials or locks; every file there before is
    byte-identical; no new file except logs (the evidence the message points at)."""
    assert_one_error(output, exit_code, actual_code, *needles)
    if out_dir is None:
        return
    assert leftovers(out_dir) == [], leftovers(out_dir)
    after = snapshot(out_dir)
    before = before or {}
    changed = [n for n, h in before.items() if after.get(n) != h and not n.endswith(".log")]
    assert changed == [], f"existing files changed or removed: {changed}"
    new = [n for n in after if n not in before and not n.endswith(".log")]
    assert new == [], f"new files under final names: {new}"


# ---------------------------------------------------------------------------- mounts

@contextlib.contextmanager
def tmpfs(path: Path, size: str, read_only: bool = False) -> Iterator[Path]:
    """A small tmpfs at `path`. Root ignores permission bits, so a read-only mount or a full
    file system is the honest way to make writes fail when the suite runs as root."""
    path.mkdir(parents=True, exist_ok=True)
    opts = f"size={size}" + (",ro" if read_only else "")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs ({proc.stderr.strip() or 'not root'}): this case needs root "
                    "(CAP_SYS_ADMIN) to make writes fail for real")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


# ---------------------------------------------------------------------------- sensitivity results

def made_up_sensitivity(model: Path, ladder: tuple[str, ...] = ("Q4_K", "Q8_0"), *, edit=None):
    """A sensitivity result of `model`'s real groups with MADE-UP numbers (loss falls with bits), in
    this format with a valid self checksum; `edit(data)` changes it before the checksum is stamped
    (a consistent file whose content is what a test wants checked). For checks of what is read back,
    never for fitting claims."""
    import copy

    from apex_orch.fit.measurements import Sensitivity, stamped
    from apex_orch.fit.sensitivity import plan_sensitivity
    from apex_orch.demo.synthetic import demo_text
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        text = Path(tmp) / "t.txt"
        text.write_text(demo_text())
        plan = plan_sensitivity(model, text=text, ladder=",".join(ladder), method="proxy")
    bits = {"Q2_K": 2.6, "Q3_K": 3.4, "IQ4_XS": 4.2, "Q4_K": 4.5, "Q5_K": 5.5, "Q6_K": 6.6, "Q8_0": 8.5}
    rows = {g.key: {t: {"kld_mean": g.n_params * 1e-6 * 2 ** -bits[t], "kld_p999": g.n_params * 1e-5 * 2 ** -bits[t]}
                    for t in ladder} for g in plan.groups}
    data = {"format": "apex-orch-sensitivity", "key": plan.key,
            "method": {"name": "exact", "text": "made up", "calibration": None},
            "model": {"name": plan.model.name, "file": model.name, "arch": plan.model.arch,
                      "blocks": plan.model.block_count, "sha256": plan.key_material["model"]},
            "bands_from": None, "bands": plan.bands_from.raw.get("bands"), "imatrix": None,
            "text": {"label": "made-up", "sha256": "0" * 64, "chunks": 2, "ctx": 128}, "llama": "made up",
            "ladder": list(ladder),
            "groups": [{"key": g.key, "role": g.role, "band": g.band, "slots": list(g.slots),
                        "tensors": len(g.tensors), "params": g.n_params, "blocks": list(g.blocks)}
                       for g in plan.groups],
            "measurements": rows, "uniform": {}, "proxy": {}, "cost": {"total_s": 0.0}}
    data = copy.deepcopy(data)
    if edit is not None:
        edit(data)
    return Sensitivity(stamped(data))
