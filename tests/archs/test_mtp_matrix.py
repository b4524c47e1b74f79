"""MTP heads through the real converter and llama.cpp.

Every MTP family of the matrix carries the head its release ships (archkit.MTP_LAYOUTS). Here:

- the head as the converter writes it: exactly the blk.N.nextn.* tensors the layout gives; where
  the converter supports --mtp/--no-mtp, the draft holds exactly the bundled file's MTP block plus
  the shared embedding/norm/head and the base exactly the rest, tensor for tensor and byte for byte;
  where it does not, its refusal; where it drops the head (DeepSeek-V3), that it is gone;
- one end-to-end run per family: `quantize -p compact` of the bundled, draft and no-MTP files
  (each verified), `eval` of the bundled tier, the quantized base equal to the bundled tier's trunk
  and the quantized draft equal to its head, byte for byte, and — where the pinned llama.cpp has
  an MTP graph for the architecture — `speculate`: greedy generation drafted by the quantized head
  (bundled, or as the draft file beside the base) gives the same tokens as without it;
- the proof with a head whose drafts are accepted (archkit.predictable_head, Qwen3.5-MoE).

(Roles, structure and plan = dry-run of all three files are in test_matrix.py.)
"""

from __future__ import annotations

import hashlib
import json

import pytest
from click.testing import CliRunner

import archkit
from apex_orch.cli import main
from apex_orch.model.gguf_header import read_header
from apex_orch.model.info import block_of, read_model

pytestmark = [pytest.mark.slow, pytest.mark.requires_tools("llama-quantize", "llama-perplexity",
                                                           "llama-speculative-simple")]

SPECS = {s.id: s for s in archkit.ARCHS}
MTP = [s.id for s in archkit.ARCHS if s.mtp]
HEADED = [s.id for s in archkit.ARCHS if s.mtp and s.nextn]

# The blk.N.nextn.* tensors of each layout (gguf-py's NEXTN_* names for the release's pieces)
NEXTN_OWN = {"qwen": {"eh_proj", "enorm", "hnorm", "shared_head_norm"},
             "nextn": {"eh_proj", "enorm", "hnorm", "shared_head_norm"},
             "nextn+head": {"eh_proj", "enorm", "hnorm", "shared_head_norm", "embed_tokens", "shared_head_head"},
             "hy": {"eh_proj", "enorm", "hnorm", "shared_head_norm"},
             "nemotron": {"eh_proj", "enorm", "hnorm", "shared_head_norm"}}

# What the pinned llama.cpp does with each family's tiny files, read from its tree and proven below:
# "drafts": src/models/<arch>.cpp builds an LLM_GRAPH_TYPE_DECODER_MTP graph (--spec-type draft-mtp);
# "runs": the head is loaded but unused (no MTP graph: speculative init fails); otherwise why the
# tiny model does not run at all (not the head's doing: the same holds for its --no-mtp file).
RUNTIME = {
    "qwen3next": "drafts", "qwen35moe": "drafts", "glm4moe": "drafts", "hy-v3": "drafts",
    "nemotron-h-moe": "drafts", "cohere2moe": "drafts", "exaone-moe": "runs",
    "glm47flash": "does not load: the converter writes leading_dense_block_count 0 for transformers' "
                  "GLM-4.7-Flash class, and llama.cpp then wants blk.0.ffn_gate_inp",
    "glm-dsa": "aborts in ggml_mul_mat (GGML_ASSERT(ggml_can_mul_mat)) on the tiny indexer sizes",
}


def built(converted, arch):
    b = converted[arch]
    if isinstance(b, str):
        pytest.fail(f"{arch}: {b}")
    return b


def trunk_blocks(spec) -> int:
    return len(spec.config["layers_block_type"]) if "layers_block_type" in spec.config \
        else spec.config["num_hidden_layers"]


def tensors(path) -> dict[str, tuple]:
    """name -> (type, shape, sha256 of the data) of every tensor of a GGUF (apex-orch's header
    reader: gguf.GGUFReader parses every vocabulary string, ~25 s for Qwen's 151936 on a busy CPU)."""
    header = read_header(path)
    out = {}
    with open(path, "rb") as f:
        for t in header.tensors:
            f.seek(header.data_offset + t.offset)
            out[t.name] = (t.ggml_type.name, t.shape, hashlib.sha256(f.read(t.n_bytes)).hexdigest())
    return out


def quantize(path, out) -> object:
    r = CliRunner().invoke(main, ["quantize", "-p", "compact", str(path), "--out-dir", str(out), "--no-eval",
                                  "-q", "-t", "2"])
    assert r.exit_code == 0, r.output[-3000:]
    files = sorted(out.glob("*.gguf"))
    assert len(files) == 1, files
    return files[0]


def speculate(model, draft=None, n=8) -> dict:
    args = ["speculate", str(model), "-n", str(n), "-t", "2", "--json"] + (["--draft", str(draft)] if draft else [])
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output[-3000:]
    return json.loads(r.stdout)   # progress lines go to stderr


@pytest.mark.parametrize("arch", MTP)
def test_mtp_head_as_the_converter_writes_it(converted, record, arch):
    spec, b = SPECS[arch], built(converted, arch)
    n_trunk = trunk_blocks(spec)
    bundled = tensors(b.gguf)
    info = read_model(b.gguf)
    head = {n for n in bundled if (blk := block_of(n)) is not None and blk >= n_trunk}
    if not spec.nextn:   # the converter dropped it
        assert (info.block_count, head, info.arch_kv("nextn_predict_layers")) == (n_trunk, set(), None)
        modes = ["dropped by the converter"]
    else:
        assert (info.block_count, info.arch_kv("nextn_predict_layers")) == (n_trunk + spec.nextn, spec.nextn)
        own = {n.split(".")[3] for n in head if n.split(".")[2] == "nextn"}
        assert own == NEXTN_OWN[spec.mtp]
        modes = ["bundled"]
    if "mtp-refused" in spec.mtp_files:
        assert f"--mtp / --no-nextn are not supported for {spec.hf_class}" in b.variants["mtp-refused"]
    if "draft" in spec.mtp_files:
        draft, base = tensors(b.variants["draft"]), tensors(b.variants["no-mtp"])
        shared = {"token_embd.weight", "output_norm.weight"} | ({"output.weight"} & bundled.keys())
        assert draft.keys() == head | shared
        assert {n: draft[n] for n in draft} == {n: bundled[n] for n in draft}
        assert base.keys() == bundled.keys() - head
        assert {n: base[n] for n in base} == {n: bundled[n] for n in base}
        b_info = read_model(b.variants["no-mtp"])
        assert (b_info.block_count, b_info.arch_kv("nextn_predict_layers")) == (n_trunk, None)
        modes += ["draft", "no-mtp"]
    record(arch, "mtp", {"layout": spec.mtp, "files": modes, "head_tensors": len(head),
                         "runtime": RUNTIME.get(arch, "")})


@pytest.mark.parametrize("arch", HEADED)
def test_mtp_end_to_end(converted, record, tmp_path, eval_text, arch):
    """compact on every file the converter writes, verified; the bundled tier evaluated; the base
    tier is the bundled tier's trunk and the draft tier its head, byte for byte (the head neither
    changes the trunk's plan nor is planned differently alone); llama.cpp drafts with the quantized
    head where it can (same tokens as without it)."""
    spec, b = SPECS[arch], built(converted, arch)
    tier = quantize(b.gguf, tmp_path / "bundled")
    done = ["quantize+verify"]
    runtime = RUNTIME.get(arch) or pytest.fail(f"{arch}: say in RUNTIME what the pinned llama.cpp does with its head")
    if runtime in ("drafts", "runs"):
        r = CliRunner().invoke(main, ["eval", str(tier), "--base", str(b.gguf), "--text", str(eval_text),
                                      "-c", "128", "--chunks", "2", "-t", "2", "-q"])
        assert r.exit_code == 0, r.output[-3000:]
        assert "KLD" in r.output
        done.append("eval")
    drafted = {}
    if "draft" in spec.mtp_files:
        q = tensors(tier)
        n_trunk = trunk_blocks(spec)
        head = {n for n in q if (blk := block_of(n)) is not None and blk >= n_trunk}
        base_tier = quantize(b.variants["no-mtp"], tmp_path / "no-mtp")
        draft_tier = quantize(b.variants["draft"], tmp_path / "draft")
        base, draft = tensors(base_tier), tensors(draft_tier)
        assert base == {n: q[n] for n in q.keys() - head}
        assert draft == {n: q[n] for n in draft} and draft.keys() >= head
        if runtime == "drafts":
            drafted = speculate(base_tier, draft=draft_tier)
    elif runtime == "drafts":
        drafted = speculate(tier)
    if drafted:
        assert drafted["with_head"]["n_drafted"] > 0 and drafted["same_output"] is True
        done.append("speculate")
    record(arch, "mtp_end_to_end", done)


def test_speculative_decoding_with_heads_quantized_by_apex_orch(converted, record, tmp_path):
    """Qwen3.5-MoE with a head whose drafts can be accepted: quantized by apex-orch (compact), the
    head bundled in its tier and as a draft file beside the no-MTP tier. Both draft (accepted
    tokens > 0) and both print exactly what greedy decoding without the head prints; the two runs
    draft identically (the same head bytes on the same trunk bytes)."""
    files = archkit.predictable_head(built(converted, "qwen35moe"))
    tiers = {kind: quantize(path, tmp_path / kind) for kind, path in files.items()}
    bundled = speculate(tiers["bundled"], n=24)
    as_draft = speculate(tiers["no-mtp"], draft=tiers["draft"], n=24)
    for run in (bundled, as_draft):
        assert run["same_output"] is True
        assert run["with_head"]["n_drafted"] > 0 and run["with_head"]["n_accept"] > 0
        assert run["without_head"]["n_drafted"] == 0
    keys = ("n_predict", "n_drafted", "n_accept", "text")
    assert [bundled["with_head"][k] for k in keys] == [as_draft["with_head"][k] for k in keys]
    assert bundled["without_head"]["text"] == as_draft["without_head"]["text"]
    record("qwen35moe", "speculative", {"drafted": bundled["with_head"]["n_drafted"],
                                        "accepted": bundled["with_head"]["n_accept"]})


def test_a_draft_from_another_model_is_refused(converted):
    """The head of Qwen3-Next beside a Qwen3.5-MoE base: one message, exit 14, nothing run."""
    target = built(converted, "qwen35moe").variants["no-mtp"]
    draft = built(converted, "qwen3next").variants["draft"]
    r = CliRunner().invoke(main, ["speculate", str(target), "--draft", str(draft)])
    assert r.exit_code == 14, r.output
    assert ("the draft is the MTP head of another model: architecture, width, vocabulary and trunk blocks are "
            "qwen3next/64/50304/4, the model's qwen35moe/64/151936/4") in r.output
