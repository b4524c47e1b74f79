"""Bad profiles are refused before anything runs: one message naming file:line and the fix.

Each case runs `apex-orch quantize` (the command a user runs) with a FAKE llama-quantize
tripwire in place: the refusal must come before any tool starts and before the output
folder is even created.
"""

from __future__ import annotations


import pytest

from relkit import assert_failed_cleanly, cli

BASE = "extends: compact\ntier: Test\n"

# id -> (profile text, message fragments: what, and how to fix; the line is checked separately)
CASES = {
    "malformed-yaml": (BASE + "types:\n  routed_expert: {edge: Q4_K\n  near: Q3_K\n", 5,
                       ["malformed YAML", "check indentation and quoting"]),
    "unknown-key": (BASE + "bandz: {edge: 2}\n", 3, ["unknown key 'bandz'", "allowed here: bands"]),
    "unknown-nested-key": (BASE + "bands: {edge: 2, nearr: 2}\n", 3, ["unknown key 'bands.nearr'"]),
    "unknown-ggml-type": (BASE + "types:\n  routed_expert: {edge: Q9_K, near: Q3_K, middle: Q3_K}\n", 4,
                          ["types.routed_expert.edge: unknown ggml type 'Q9_K'", "use one of: F32"]),
    "type-on-router": (BASE + "types:\n  router: Q8_0\n", 4,
                       ["types.router: llama.cpp never quantizes router tensors", "remove types.router"]),
    "type-on-norm-override": (BASE + "overrides:\n  - {role: norm, type: Q8_0}\n", 4,
                              ["overrides[0]: llama.cpp never quantizes norm tensors", "remove overrides[0]"]),
    "fixed-bands-too-wide": (BASE + "bands: {scale: fixed}\n", 3,
                             ["edge=5 + near=5 from each end need 20 blocks but the model has 12",
                              "use `scale: auto`"]),
    "fixed-bands-overlap": (BASE + "bands: {scale: fixed, edge: 4, near: 3, attention_edge: 1}\n", 3,
                            ["edge=4 + near=3 from each end need 14 blocks but the model has 12"]),
    "fixed-attention-edge-too-wide": (BASE + "bands: {scale: fixed, edge: 2, near: 2, attention_edge: 7}\n", 3,
                                      ["attention_edge=7 from each end needs 14 blocks but the model has 12"]),
    "override-block-out-of-range": (BASE + "overrides:\n  - {role: routed_expert, blocks: '10-40', type: Q8_0}\n",
                                    4, ["override names block 40 but the model has 12 blocks",
                                        "blocks run from 0 to 11"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_profile_is_refused_with_file_and_line(case, mistral4_split, tmp_path, tripwire):
    text, line, needles = CASES[case]
    prof = tmp_path / "profiles" / f"{case}.yaml"
    prof.parent.mkdir()
    prof.write_text(text)
    out = tmp_path / "out"
    r = cli("quantize", "-p", prof, mistral4_split, "--out-dir", out, "--no-eval")
    assert_failed_cleanly(r.output, 3, r.exit_code, f"{prof}:{line}", *needles)
    assert not out.exists() and not tripwire.exists()


def test_extends_cycle_is_refused(mistral4_split, tmp_path, tripwire):
    (tmp_path / "a.yaml").write_text("extends: b.yaml\ntier: A\n")
    (tmp_path / "b.yaml").write_text("extends: c.yaml\ntier: B\n")
    (tmp_path / "c.yaml").write_text("extends: a.yaml\ntier: C\n")
    r = cli("quantize", "-p", tmp_path / "a.yaml", mistral4_split, "--out-dir", tmp_path / "out", "--no-eval")
    assert_failed_cleanly(r.output, 3, r.exit_code, "`extends` cycle: a.yaml -> b.yaml -> c.yaml -> a.yaml",
                          "remove one of the extends links")
    assert not tripwire.exists()


@pytest.mark.parametrize("name", ["../profiles/compact", "foo/bar", "..", "compact/../../etc/passwd",
                                  "..\\compact", "/etc/passwd"])
def test_profile_name_with_path_parts_is_refused(name, mistral4_split, tmp_path, tripwire):
    r = cli("quantize", "-p", name, mistral4_split, "--out-dir", tmp_path / "out", "--no-eval")
    assert_failed_cleanly(r.output, 3, r.exit_code, f"{name!r} is not a profile name",
                          "no path separators or '..'", "apex-orch profile list")
    assert not tripwire.exists()


def test_extends_with_path_parts_is_refused(mistral4_split, tmp_path, tripwire):
    prof = tmp_path / "p.yaml"
    prof.write_text("extends: ../../etc/passwd\ntier: X\n")
    r = cli("quantize", "-p", prof, mistral4_split, "--out-dir", tmp_path / "out", "--no-eval")
    assert_failed_cleanly(r.output, 3, r.exit_code, f"{prof}:1", "extends: '../../etc/passwd' is not a profile name")
    assert not tripwire.exists()
