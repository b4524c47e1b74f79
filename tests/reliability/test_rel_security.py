"""Security: the HF token never leaks, YAML is plain data, nothing is written outside the chosen
output folder. (The static checks — no shell strings, safe YAML loading only — are in
tests/test_no_shell_strings.py.)

A planted token value goes in through HF_TOKEN / HUGGING_FACE_HUB_TOKEN; a FAKE
llama-quantize wrapper that prints its whole environment (then runs the real tool) shows
that even a tool echoing everything it was given cannot leak it.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from apex_orch.llama import pin
from apex_orch.demo import synthetic
from relkit import (PLANTED_TOKEN, TINY_SPEC, assert_failed_cleanly, assert_one_error, cli, make_fake_bin, run_cli,
                    snapshot)

TOKEN_ENV = {"HF_TOKEN": PLANTED_TOKEN, "HUGGING_FACE_HUB_TOKEN": PLANTED_TOKEN}
ECHO_ENV = ("print('FAKE-WRAPPER argv:', ' '.join(sys.argv), flush=True)\n"
            "for k, v in sorted(os.environ.items()):\n"
            "    print(f'FAKE-WRAPPER env {k}={v}', flush=True)\n")


def files_containing(folder: Path, needle: str) -> list[str]:
    raw = needle.encode()
    return [str(p) for p in folder.rglob("*") if p.is_file() and raw in p.read_bytes()]


def test_hf_token_never_reaches_tool_log_manifest_or_output(tiny_moe, tmp_path):
    """FAKE wrapper around the real llama-quantize: it prints its environment, then execs the
    real tool. The run succeeds; the token is nowhere: console, log, rules, manifest, GGUF."""
    real = pin.bin_dir() / "llama-quantize"
    fake = make_fake_bin(tmp_path / "fakebin", "llama-quantize",
                         ECHO_ENV + f"os.execv({str(real)!r}, [{str(real)!r}] + sys.argv[1:])\n")
    out = tmp_path / "out"
    model_dir_before = snapshot(tiny_moe.parent)
    r = run_cli("quantize", "-p", "compact", tiny_moe, "--out-dir", out, "-t", "2", "--no-eval",
                env={**TOKEN_ENV, "APEX_LLAMA_BIN_DIR": str(fake)})
    assert r.returncode == 0, r.stderr
    log = (out / "Tiny-MoE-APEX-Compact.gguf.log").read_text()
    assert "FAKE-WRAPPER env PATH=" in log                      # the wrapper did echo its environment
    assert "HF_TOKEN" not in log and "HUGGING_FACE_HUB_TOKEN" not in log
    assert PLANTED_TOKEN not in r.stdout + r.stderr
    assert files_containing(out, PLANTED_TOKEN) == []
    assert files_containing(out, PLANTED_TOKEN[:16]) == []
    # and nothing was written outside --out-dir: the model's folder is as it was
    assert snapshot(tiny_moe.parent) == model_dir_before


def test_hf_token_masked_in_a_failing_tools_error(tiny_moe, tmp_path, monkeypatch):
    """FAKE llama-quantize: prints the token it was (not) given, then exits 1. Even if a
    credential reached a tool by another variable, its value is masked in the log tail."""
    fake = make_fake_bin(tmp_path / "fakebin", "llama-quantize",
                         "print('token seen by the tool:', os.environ.get('HF_TOKEN'))\n"
                         "print('echo of a value:', os.environ.get('APEX_TEST_LEAK'))\nsys.exit(1)\n")
    for k, v in TOKEN_ENV.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("APEX_TEST_LEAK", PLANTED_TOKEN)        # the same value under another name
    monkeypatch.setenv("APEX_LLAMA_BIN_DIR", str(fake))
    out = tmp_path / "out"
    r = cli("quantize", "-p", "compact", tiny_moe, "--out-dir", out, "--no-eval")
    assert_failed_cleanly(r.output, 8, r.exit_code, "failed with exit code 1", "token seen by the tool: None",
                          "echo of a value: ***", out_dir=out, before={})
    assert PLANTED_TOKEN not in r.output
    assert files_containing(out, PLANTED_TOKEN) == []


def test_hf_token_masked_in_error_messages(tiny_moe, tmp_path, monkeypatch):
    """An error that quotes user input containing the token value prints *** instead."""
    monkeypatch.setenv("HF_TOKEN", PLANTED_TOKEN)
    missing = tmp_path / f"{PLANTED_TOKEN}.yaml"
    r = cli("quantize", "-p", missing, tiny_moe, "--out-dir", tmp_path / "out", "--no-eval")
    assert_one_error(r.output, 3, r.exit_code, "profile file not found", "***.yaml")
    assert PLANTED_TOKEN not in r.output


# ---------------------------------------------------------------------------- YAML

@pytest.mark.parametrize("value", [
    '!!python/object/apply:os.system ["touch {marker}"]',
    "!!python/name:os.system",
    '!!python/object/new:subprocess.Popen [["touch", "{marker}"]]',
    "!!binary aGVsbG8=",
], ids=["object-apply", "name", "object-new", "binary"])
def test_profile_yaml_tags_are_refused_not_run(value, tiny_moe, tmp_path, tripwire):
    marker = tmp_path / "PWNED"
    prof = tmp_path / "evil.yaml"
    prof.write_text(f"extends: compact\ntier: Evil\ndescription: {value.format(marker=marker)}\n")
    r = cli("quantize", "-p", prof, tiny_moe, "--out-dir", tmp_path / "out", "--no-eval")
    assert_failed_cleanly(r.output, 3, r.exit_code, f"{prof}:3: YAML tag", "is not allowed", "safe loading only")
    assert not marker.exists() and not tripwire.exists()


def test_corpus_yaml_tags_are_refused_not_run(tmp_path):
    marker = tmp_path / "PWNED"
    corpus = tmp_path / "evil.yaml"
    corpus.write_text(f'name: evil\nsources:\n  - !!python/object/apply:os.system ["touch {marker}"]\n')
    r = cli("corpus", "show", corpus)
    assert_one_error(r.output, 3, r.exit_code, f"{corpus}:3", "python/object/apply")
    assert not marker.exists()


# ---------------------------------------------------------------------------- where files go

@pytest.mark.parametrize("name", ["../../evil", "a/b", "..", ".hidden", "..\\evil"])
def test_name_cannot_steer_files_out_of_out_dir(name, tiny_moe, tmp_path, tripwire):
    root = tmp_path / "root"
    out = root / "a" / "b" / "out"
    before = snapshot(tmp_path)
    r = cli("quantize", "-p", "compact", tiny_moe, "--out-dir", out, "--name", name, "--no-eval")
    assert_one_error(r.output, 2, r.exit_code, f"--name: {name!r} is not a plain model name",
                     "give an output path or another output folder", "[--output, --out-dir]")
    assert snapshot(tmp_path) == before and not root.exists() and not tripwire.exists()


def _tool_output_path(tripwire: Path) -> Path:
    """The output path apex-orch gave the (FAKE, tripwire) llama-quantize: argv[-3], a partial."""
    argv = tripwire.read_text().split()
    return Path(argv[-3])


def test_hostile_model_name_and_tier_stay_inside_out_dir(tmp_path, tripwire):
    """general.name from the model file and tier from the profile both try to climb out."""
    model = synthetic.write_model(tmp_path / "m.gguf",
                                  dataclasses.replace(TINY_SPEC, name="../../../tmp/Evil Model/x"))
    prof = tmp_path / "evil-tier.yaml"
    prof.write_text("extends: compact\ntier: ../../Evil/Tier\n")
    out = tmp_path / "deep" / "out"
    r = cli("quantize", "-p", prof, model, "--out-dir", out, "--no-eval")
    assert r.exit_code == 8 and tripwire.exists(), r.output         # reached the (fake) tool, which exits 99
    written = _tool_output_path(tripwire)
    assert written.parent == out
    assert written.name.startswith(".tmp-Evil-Model-x-APEX-Evil-Tier.gguf.partial-")
    assert sorted(p.name for p in out.iterdir()) == ["tmp-Evil-Model-x-APEX-Evil-Tier.gguf.log"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["deep", "evil-tier.yaml", "m.gguf",
                                                                 "tripwire-bin", "tripwire-fired"])


def test_explicit_output_outside_out_dir_is_honoured(tiny_moe, tmp_path, tripwire):
    """-o is the user's explicit choice of file: it may be anywhere; --out-dir stays untouched."""
    elsewhere = tmp_path / "elsewhere" / "my.gguf"
    out = tmp_path / "out"
    r = cli("quantize", "-p", "compact", tiny_moe, "-o", elsewhere, "--out-dir", out, "--no-eval")
    assert r.exit_code == 8 and tripwire.exists(), r.output
    assert _tool_output_path(tripwire).parent == elsewhere.parent
    assert not out.exists()
