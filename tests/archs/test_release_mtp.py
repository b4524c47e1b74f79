"""Releases of a model with an MTP head (issue 23, phase 2), offline from a local checkpoint folder.

The tiny Qwen3-Next checkpoint of the matrix (tests/archs/archkit.py: transformers' own class plus
the MTP head its release ships) is released once per `mtp:` mode, through the real converter,
llama-quantize and llama.cpp:

- bundled: the converter's default; the tier carries the head at its profile's types.nextn (Q8_0);
- draft: the tier from the converter's --no-mtp output, the head converted alone (--mtp) and
  quantized once into mtp-<Model>.gguf (Q8_0, verified, with a manifest);
- none: --no-mtp; no file carries the head.

Each checks the files, their manifests, the card's MTP section and the LocalAI entries, the dry
run (text and JSON); bundled and draft also evaluate (a short eval on the tiny model) and so run
llama.cpp's speculative decoding with the released files in the eval phase (greedy output
unchanged, tokens drafted: release.speculative), and the card's drafting row is that record's.
Then the bad inputs, each one message, its own exit code and no file written: a mode on a model
without a head, a draft file of another model, an IQ type on the head (with a real imatrix, which
holds nothing for the MTP layers).
"""

from __future__ import annotations

import json

import pytest
import yaml
from click.testing import CliRunner

from apex_orch.cli import main
from apex_orch.core.manifest import manifest_path, read_manifest
from apex_orch.model.info import read_model
from apex_orch.model.roles import Role, classify

pytestmark = [pytest.mark.slow, pytest.mark.requires_tools("llama-quantize", "llama-speculative-simple")]

NAME = "Tiny-Qwen3-Next"
TIER = f"{NAME}-APEX-Compact.gguf"
DRAFT = f"mtp-{NAME}.gguf"
REPO = "apex-test/Tiny-Qwen3-Next-APEX-GGUF"
HEAD = 11          # quantized tensors of Qwen3-Next's MTP block (blk.4): its layer and eh_proj
COMMAND = f"llama-server -m {TIER} --spec-type draft-mtp --spec-draft-n-max 3"


def built(converted, arch):
    b = converted[arch]
    if isinstance(b, str):
        pytest.fail(f"{arch}: {b}")
    return b


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


# A short eval (the tiny model's PPL/KLD on two chunks), so the eval phase measures MTP drafting.
EVAL = {"corpus": "agentic", "ctx": 128, "chunks": 2, "speculative_tokens": 12}


def write_config(folder, mtp, *, source, tiers=("compact",), eval_=None, **extra):
    path = folder / "release.yaml"
    doc = {"name": NAME, "license": "apache-2.0", "source": source, "tiers": list(tiers),
           "eval": eval_ or {"enabled": False}, "publish": {"repo": REPO}, **extra}
    if mtp is not None:
        doc["mtp"] = mtp
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def mtp_line(cfg) -> str:
    """`release.yaml:N` of the config's `mtp:` key (where a mode the model cannot give is reported)."""
    n = next(i for i, line in enumerate(cfg.read_text().splitlines(), 1) if line.startswith("mtp:"))
    return f"{cfg.name}:{n}"


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def release(cfg, out, *more):
    r = cli("release", cfg, "--out-dir", out, "-j", "1", *more)
    assert r.exit_code == 0, r.output[-3000:]
    return r


def head_types(path) -> dict[str, str]:
    """The written types of the MTP head's tensors (role nextn) of a GGUF."""
    info = read_model(path)
    roles = classify(info)
    return {t.name: t.ggml_type.name for t in info.tensors if roles[t.name].role == Role.NEXTN}


def mtp_section(card: str) -> str:
    return card.split("## Multi-token prediction (MTP)\n\n", 1)[1].split("\n## ", 1)[0]


def localai(out) -> dict:
    entries = list((out / "localai").glob("*.yaml"))
    assert len(entries) == 1, entries
    return yaml.safe_load(entries[0].read_text())[0]


def converted_command(out, name) -> list[str]:
    return read_manifest(manifest_path(out / ".apex-release" / "source" / name))["command"]


def drafting(out, section: str, draft=None) -> dict:
    """The eval phase's speculative record of the tier, checked, and the card's row and caveat
    against it: every number as the card prints it, from the record's own values."""
    record = json.loads((out / ".apex-release" / "eval" / f"speculative-{TIER}.json").read_text())
    s = record["summary"]
    assert (record["file"], record["draft"]) == (TIER, draft)
    assert s["drafted"] > 0 and 0 <= s["accepted"] <= s["drafted"] and s["same_output"] is True
    assert (s["n_predict"], s["draft_max"]) == (EVAL["speculative_tokens"], 3)
    rate = f"{100 * s['accepted'] / s['drafted']:.1f}%"
    row = (f"| {TIER} | {s['drafted']} | {s['accepted']} | {rate} | {s['tokens_per_s_with']:.2f} | "
           f"{s['tokens_per_s_without']:.2f} | {s['speed_ratio']:.3f}× |")
    assert "| File | Drafted | Accepted | Acceptance | Tokens/s with head | Tokens/s without | Ratio |" in section
    assert row in section.splitlines(), (row, section)
    assert (f"The speeds are the release machine's (llama.cpp build `{record['llama_cpp']}`, {s['threads']} "
            "threads), not yours") in section
    assert len(list((out / ".apex-release" / "speculative" / TIER).glob("*.log"))) == 2   # both runs' logs
    return record


def dry_run_json(cfg, out) -> dict:
    r = cli("release", cfg, "--out-dir", out, "--dry-run", "--json")
    assert r.exit_code == 0, r.output[-3000:]
    return json.loads(r.stdout)


# ----------------------------------------------------------------------------- the three modes

def test_release_mtp_bundled(converted, tmp_path, offline):
    ckpt = built(converted, "qwen3next").checkpoint
    cfg = write_config(tmp_path, "bundled", source={"convert": {"path": str(ckpt), "outtype": "f16"}}, eval_=EVAL)
    out = tmp_path / "out"
    preview = dry_run_json(cfg, out)["mtp"]
    assert (preview["mode"], preview["draft_file"]) == ("bundled", None)
    release(cfg, out)
    assert sorted(p.name for p in out.glob("*.gguf")) == [TIER]
    assert "--no-mtp" not in converted_command(out, f"{NAME}-F16.gguf")
    head = head_types(out / TIER)
    assert (len(head), set(head.values())) == (HEAD, {"Q8_0"})        # types.nextn's default
    assert {n.split(".")[1] for n in head} == {"4"}
    assert read_manifest(manifest_path(out / TIER))["roles"]["nextn"] == {"Q8_0": HEAD}
    card = (out / "README.md").read_text()
    section = mtp_section(card)
    assert section.startswith("Every file carries the model's multi-token-prediction (MTP) head (1 layer): ")
    assert f"| {TIER} | Q8_0 ×{HEAD} (" in section
    assert f"```bash\n{COMMAND}\n```" in section
    assert "not imatrix-calibrated" in section
    entry = localai(out)
    assert entry["overrides"]["options"] == ["spec_type:draft-mtp"] and "draft_model" not in entry["overrides"]
    assert "mtp" in entry["tags"] and [f["filename"] for f in entry["files"]] == [TIER]
    # the eval phase: llama.cpp drafted with the released tier's head and printed what it prints without it
    record = drafting(out, section)
    print(f"bundled drafting: {record['summary']}")


def test_release_mtp_draft(converted, tmp_path, offline):
    ckpt = built(converted, "qwen3next").checkpoint
    cfg = write_config(tmp_path, "draft", source={"convert": {"path": str(ckpt), "outtype": "f16"}}, eval_=EVAL)
    out = tmp_path / "out"
    before = cli("release", cfg, "--out-dir", out, "--dry-run")
    assert before.exit_code == 0, before.output
    assert f"mtp       draft: the MTP head as one Q8_0 draft file beside head-less tiers -> {DRAFT}" in before.output
    assert any(line.startswith("convert   $ ") and line.endswith(f"--mtp --model-name {NAME}")
               for line in before.output.splitlines()), before.output
    release(cfg, out)
    assert sorted(p.name for p in out.glob("*.gguf")) == sorted([TIER, DRAFT])
    assert "--no-mtp" in converted_command(out, f"{NAME}-F16.gguf")
    assert "--mtp" in converted_command(out, f"mtp-{NAME}-F16.gguf")
    assert head_types(out / TIER) == {}                                 # the tier carries no head
    draft = read_model(out / DRAFT)
    assert draft.is_mtp_draft and {t.ggml_type.name for t in draft.tensors if t.n_dims >= 2} >= {"Q8_0"}
    assert len(head_types(out / DRAFT)) == HEAD and set(head_types(out / DRAFT).values()) == {"Q8_0"}
    manifest = read_manifest(manifest_path(out / DRAFT))
    assert manifest["roles"] == {"nextn": {"Q8_0": HEAD}, "embedding": {"Q8_0": 1}, "output": {"Q8_0": 1},
                                 "norm": manifest["roles"]["norm"], "router": manifest["roles"]["router"]}
    sha = manifest["files"][0]["sha256"]
    card = (out / "README.md").read_text()
    assert f"| {DRAFT} | MTP draft | " in card                          # Available Files
    section = mtp_section(card)
    assert section.startswith("The tiers carry no MTP head; the model's multi-token-prediction head (1 layer) is "
                              f"published once as a separate draft file, `{DRAFT}`")
    assert f"| {DRAFT} | Q8_0 ×{HEAD + 2} (" in section and f"| {TIER} | none |" in section
    assert f"```bash\n{COMMAND} -md {DRAFT}\n```" in section
    entry = localai(out)
    assert entry["overrides"]["draft_model"] == DRAFT and entry["overrides"]["options"] == ["spec_type:draft-mtp"]
    assert {f["filename"]: f["sha256"] for f in entry["files"]}[DRAFT] == sha
    # the dry run of the finished release: the draft planned, present
    preview = dry_run_json(cfg, out)["mtp"]
    assert (preview["mode"], preview["draft_file"], preview["draft_type"], preview["draft_present"],
            preview["head_layers"]) == ("draft", DRAFT, "Q8_0", True, 1)
    assert preview["draft_size"] == (out / DRAFT).stat().st_size
    # the eval phase: llama.cpp drafted with the published draft file beside the tier
    record = drafting(out, section, draft=DRAFT)
    print(f"draft drafting: {record['summary']}")
    # a rerun converts, quantizes and measures nothing; the card keeps the same row
    again = release(cfg, out)
    assert "quantize  up to date" in again.output and "convert   up to date" in again.output
    assert "MTP drafting: 0 measured, 1 up to date" in again.output, again.output
    assert mtp_section((out / "README.md").read_text()) == section


def test_release_mtp_none(converted, tmp_path, offline):
    ckpt = built(converted, "qwen3next").checkpoint
    cfg = write_config(tmp_path, "none", source={"convert": {"path": str(ckpt), "outtype": "f16"}})
    out = tmp_path / "out"
    release(cfg, out)
    assert sorted(p.name for p in out.glob("*.gguf")) == [TIER]
    assert "--no-mtp" in converted_command(out, f"{NAME}-F16.gguf")
    assert head_types(out / TIER) == {} and read_model(out / TIER).nextn_layers == 0
    section = mtp_section((out / "README.md").read_text())
    assert section.startswith("These files carry no multi-token-prediction (MTP) head (`mtp: none`)")
    assert f"| {TIER} | none |" in section and "llama-server" not in section
    assert "Acceptance" not in section and not (out / ".apex-release" / "speculative").exists()
    entry = localai(out)
    assert "options" not in entry["overrides"] and "mtp" not in entry["tags"]


# ----------------------------------------------------------------------------- bad inputs

def assert_refused(r, code, message, out):
    assert r.exit_code == code, r.output
    assert message in r.output, r.output
    assert r.output.count("error: ") == 1, r.output
    assert not list(out.glob("*.gguf")) and not (out / "README.md").exists()


def test_a_mode_on_a_model_without_a_head_is_refused_up_front(converted, tmp_path, offline):
    """Mixtral has no MTP head: `mtp: bundled` is refused from its config.json before the converter
    runs (dry run too); a head-less GGUF source from its header."""
    ckpt = built(converted, "mixtral").checkpoint
    cfg = write_config(tmp_path, "draft", source={"convert": {"path": str(ckpt), "outtype": "f16"}}, eval_=EVAL)
    out = tmp_path / "out"
    message = (f"{mtp_line(cfg)}: mtp: draft, but the checkpoint (MixtralForCausalLM) has no MTP head: its "
               "config.json counts no MTP layers (num_nextn_predict_layers / mtp_num_hidden_layers)")
    for extra in (["--dry-run"], []):
        assert_refused(cli("release", cfg, "--out-dir", out, *extra), 3, message, out)
    assert not (out / ".apex-release" / "source").exists()             # the converter never ran
    base = built(converted, "qwen3next").variants["no-mtp"]
    cfg = write_config(tmp_path, "bundled", source={"gguf": str(base)})
    assert_refused(cli("release", cfg, "--out-dir", out, "--dry-run"), 3,
                   f"{mtp_line(cfg)}: mtp: bundled, but the source {base.name} (qwen3next) has no MTP head "
                   "(no blk.N.nextn.* tensors)", out)


def test_a_draft_file_of_another_model_is_refused(converted, tmp_path, offline):
    base = built(converted, "qwen3next").variants["no-mtp"]
    other = built(converted, "glm4moe").variants["draft"]
    cfg = write_config(tmp_path, {"mode": "draft", "file": str(other)}, source={"gguf": str(base)})
    out = tmp_path / "out"
    for extra in (["--dry-run"], []):
        assert_refused(cli("release", cfg, "--out-dir", out, *extra), 4,
                       f"{other}: the draft is the MTP head of another model: architecture, width, vocabulary and "
                       "trunk blocks are glm4moe/64/50304/3, the model's qwen3next/64/50304/4", out)


@pytest.mark.requires_tools("llama-imatrix")
def test_an_iq_type_on_the_head_is_refused_before_any_imatrix(converted, tmp_path, offline, isolated_cache_root):
    """A profile giving the head IQ2_XXS: llama-imatrix never runs the MTP layers (shown on a real
    imatrix of the bundled model: imatrix-report says the head has no data, and why), so the plan
    is refused before llama-quantize runs, and in a release before the imatrix is built."""
    bundled = built(converted, "qwen3next").gguf
    (tmp_path / "iq-head.yaml").write_text("extends: i-compact\ntier: I-Compact-IQ-Head\ntypes: {nextn: IQ2_XXS}\n")
    imatrix = tmp_path / "imatrix.gguf"
    r = cli("imatrix", bundled, "--corpus", "agentic", "--imatrix-ctx", "128", "--imatrix-chunks", "2", "-t", "2",
            "-o", imatrix)
    assert r.exit_code == 0, r.output[-3000:]
    r = cli("imatrix-report", imatrix, "--model", bundled, "--json")
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert report["model"]["mtp"]["tensors"] == HEAD and report["model"]["mtp"]["covered"] == 0
    assert not any(name.startswith("blk.4.") for name in report["tensors"])
    text = cli("imatrix-report", imatrix, "--model", bundled).output
    assert f"  MTP head: 0 of {HEAD} tensors have data (llama-imatrix evaluates the trunk only" in text
    message = ("profile iq-head gives 2 tensor(s) of the MTP head IQ2_XXS (types.nextn), a type llama-quantize "
               "writes only with imatrix data, and no imatrix can have it")
    out = tmp_path / "out"
    r = cli("quantize", bundled, "-p", tmp_path / "iq-head.yaml", "--imatrix", imatrix, "--out-dir", out)
    assert_refused(r, 6, message, out)
    assert "blk.4.ffn_down_exps.weight, blk.4.ffn_down_shexp.weight" in r.output
    cached = sorted((isolated_cache_root / "imatrix").glob("*.gguf")) if (isolated_cache_root / "imatrix").exists() \
        else []
    cfg = write_config(tmp_path, "bundled", source={"gguf": str(bundled)}, tiers=["iq-head.yaml"],
                       imatrix={"corpus": "agentic", "ctx": 128, "chunks": 2})
    for extra in (["--dry-run"], []):
        assert_refused(cli("release", cfg, "--out-dir", out, *extra), 6, message, out)
    now = sorted((isolated_cache_root / "imatrix").glob("*.gguf")) if (isolated_cache_root / "imatrix").exists() \
        else []
    assert now == cached                                                # no imatrix was built for it


# ----------------------------------------------------------------------------- the converter's own tables

CLASS_TABLE = """
import json, sys
sys.path[:0] = [sys.argv[1], sys.argv[1] + "/gguf-py"]
from conversion import TEXT_MODEL_MAP, get_model_class
export, dropped = [], []
for name in sorted(TEXT_MODEL_MAP):
    try:
        cls = get_model_class(name)
    except Exception:        # a class the converter cannot import here (speech models): no MTP
        continue
    if getattr(cls, "supports_mtp_export", False):
        export.append(name)
    if getattr(cls, "skip_mtp", False) is True:
        dropped.append(name)
print(json.dumps({"export": export, "dropped": dropped}))
"""


def test_the_mtp_tables_are_the_pinned_converters():
    """release.mtp decides before the converter runs which architectures it can split the head off
    (--mtp / --no-mtp) and which it drops the head of: the converter's own classes say the same."""
    import subprocess
    import sys
    from archkit import LLAMA_TREE, converter_env
    from apex_orch.release.mtp import HEAD_DROPPED, MTP_EXPORT
    r = subprocess.run([sys.executable, "-c", CLASS_TABLE, str(LLAMA_TREE)], capture_output=True, text=True,
                       env=converter_env(), timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    found = json.loads(r.stdout.strip().splitlines()[-1])
    assert (set(found["export"]), set(found["dropped"])) == (MTP_EXPORT, HEAD_DROPPED)
