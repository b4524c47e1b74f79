"""Your own llama.cpp build: the plan is cross-checked with the tool's own --dry-run first.

The stand-in tool (a FAKE llama-quantize, said here as everywhere a fake is used) is the real
pinned binary started with `--output-tensor-type q8_0` in front of apex-orch's arguments: a
build whose rules give `output.weight` another type, in its dry runs and its real runs alike.
"""

from __future__ import annotations

import json

from gguf.constants import GGMLQuantizationType as T

from apex_orch.llama import pin
from apex_orch.model.gguf_header import read_header
from apex_orch.core.manifest import manifest_path
from relkit import TINY_NAME, cli, make_fake_bin

OTHER_RULES = ("real = {real!r}\n"
               "os.execv(real, [real, '--output-tensor-type', 'q8_0'] + sys.argv[1:])\n")


def _other_build(tmp_path):
    real = str(pin.bin_dir() / "llama-quantize")
    return make_fake_bin(tmp_path / "other-build", "llama-quantize", OTHER_RULES.format(real=real),
                         dry_run_passthrough=False)   # its dry runs carry the other rules too


def test_pinned_build_agrees_and_the_manifest_says_whose_types(tmp_path, tiny_moe):
    out = tmp_path / "out"
    r = cli("quantize", "-p", "compact", tiny_moe, "--out-dir", out, "-t", "2", "--no-eval")
    assert r.exit_code == 0, r.output
    doc = json.loads(manifest_path(out / f"{TINY_NAME}-APEX-Compact.gguf").read_text())
    assert doc["plan_types_from"] == "apex-orch (port of the pinned llama.cpp rules)"
    assert doc["llama_quantize"] == str(pin.bin_dir() / "llama-quantize")


def test_other_build_that_disagrees_stops_before_writing(tmp_path, tiny_moe):
    """FAKE llama-quantize: the real binary with an extra --output-tensor-type q8_0."""
    out = tmp_path / "out"
    r = cli("--llama-bin-dir", _other_build(tmp_path), "quantize", "-p", "compact", tiny_moe,
            "--out-dir", out, "-t", "2", "--no-eval")
    assert r.exit_code == 5, r.output
    assert "would write other types than the plan for 1 tensor(s): output.weight: planned Q6_K, " \
           "the tool's dry-run Q8_0" in r.output
    assert "--trust-tool-plan" in r.output and "Traceback" not in r.output
    assert sorted(p.name for p in out.iterdir() if not p.name.endswith(".log")) == []


def test_other_build_with_opt_in_verifies_against_the_tools_types(tmp_path, tiny_moe):
    """FAKE llama-quantize: the real binary with an extra --output-tensor-type q8_0."""
    out = tmp_path / "out"
    r = cli("--llama-bin-dir", _other_build(tmp_path), "quantize", "-p", "compact", tiny_moe,
            "--out-dir", out, "-t", "2", "--no-eval", "--trust-tool-plan")
    assert r.exit_code == 0, r.output
    assert "as asked, its dry-run is the plan" in r.output
    final = out / f"{TINY_NAME}-APEX-Compact.gguf"
    types = {t.name: t.ggml_type for t in read_header(final).tensors}
    assert types["output.weight"] == T.Q8_0
    doc = json.loads(manifest_path(final).read_text())
    assert doc["plan_types_from"] == "llama-quantize --dry-run"
    assert doc["files"][0]["size"] == final.stat().st_size
    assert doc["roles"]["output"] == {"Q8_0": 1}
