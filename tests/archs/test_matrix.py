"""Issue 14's matrix: tiny random checkpoints of real MoE architectures (transformers' own classes),
converted by the pinned, unpatched convert_hf_to_gguf.py, then checked tensor by tensor:

- every tensor has a role (roles.ROLE_DECISIONS), none is `unassigned`;
- routed/used/shared experts, leading dense blocks and NextN layers equal the checkpoint's config,
  read from the tensors, with no disagreement warning unless the spec expects one;
- `plan` equals `llama-quantize --dry-run` (every tensor's type, the total) for every built-in profile;
- one model per family: quantize (compact, and i-compact with a real imatrix) + verify + eval.

MTP families (their checkpoints carry the head as the release does, archkit.MTP_LAYOUTS) are
checked as three files where the converter can write them: bundled (the default), the draft
(`--mtp`: only the head) and the base without it (`--no-mtp`) — roles, structure and plan =
dry-run on each, the three files' tensors byte for byte against each other, and one end-to-end
run per family (test_mtp_matrix.py).
"""

from __future__ import annotations

import pytest
from click.testing import CliRunner

import archkit
from apex_orch.cli import main
from apex_orch.llama.tools import find_tool, run_tool
from apex_orch.model.info import read_model
from apex_orch.plan.planner import make_plan
from apex_orch.plan.render import render_file
from apex_orch.plan.profile_search import list_profiles
from apex_orch.plan.profiles import load_profile
from apex_orch.llama.quantlog import parse_records, quant_size_mib
from apex_orch.model.roles import Role, classify

pytestmark = [pytest.mark.slow, pytest.mark.requires_tools("llama-quantize")]

IDS = [s.id for s in archkit.ARCHS]
SPECS = {s.id: s for s in archkit.ARCHS}
PROFILES = [p for p in list_profiles() if not p.startswith("_")]
# Every GGUF the matrix plans: each spec's default conversion ("<id>": the MTP head bundled where
# the checkpoint has one) and the MTP families' draft and no-MTP conversions ("<id>/draft", ...).
FILES = IDS + [f"{s.id}/{kind}" for s in archkit.ARCHS for kind in s.mtp_files if kind in ("draft", "no-mtp")]


def built_model(converted, arch):
    b = converted[arch]
    if isinstance(b, str):
        pytest.fail(f"{arch}: {b}")
    return b


def built_file(converted, file_id: str):
    """(spec, the GGUF path) of a FILES entry."""
    arch, _, kind = file_id.partition("/")
    b = built_model(converted, arch)
    return SPECS[arch], (b.file(kind) if kind else b.gguf)


@pytest.mark.parametrize("arch", IDS)
def test_converts(converted, record, arch):
    b = built_model(converted, arch)
    info = read_model(b.gguf)
    record(arch, "gguf_arch", info.arch)
    record(arch, "tensors", len(info.tensors))
    if SPECS[arch].gguf_arch:
        assert info.arch == SPECS[arch].gguf_arch


@pytest.mark.parametrize("file_id", FILES)
def test_every_tensor_has_a_role(converted, record, file_id):
    _spec, path = built_file(converted, file_id)
    info = read_model(path)
    roles = classify(info)
    unassigned = sorted(n for n, r in roles.items() if r.role == Role.UNASSIGNED)
    record(file_id, "roles", sorted({r.role.value for r in roles.values()}))
    assert unassigned == []


@pytest.mark.parametrize("file_id", FILES)
def test_structure_equals_the_config(converted, file_id):
    spec, path = built_file(converted, file_id)
    info = read_model(path)
    draft = file_id.endswith("/draft")    # only the head: no trunk whose leading dense blocks could be counted
    got = (info.expert_count, info.expert_used_count, info.expert_shared_count,
           None if draft else info.leading_dense_blocks, info.nextn_layers, info.is_mtp_draft)
    nextn = 0 if file_id.endswith("/no-mtp") else spec.nextn
    assert got == (spec.routed, spec.used, spec.shared, None if draft else spec.leading_dense, nextn, draft)
    assert set(info.structure["experts_per_block"].values()) == {spec.routed}


@pytest.mark.parametrize("file_id", FILES)
def test_plan_equals_dry_run_for_every_profile(converted, record, tmp_path, file_id):
    _spec, path = built_file(converted, file_id)
    info = read_model(path)
    problems, planned = [], []
    for name in PROFILES:
        plan = make_plan(info, load_profile(name), has_imatrix=False)
        rules = tmp_path / f"{name}.rules.txt"
        rules.write_text(render_file(plan))
        log = tmp_path / f"{name}.log"
        run_tool([find_tool("llama-quantize").path, "--dry-run", "--tensor-type-file", rules, path,
                  tmp_path / "never-written.gguf", plan.ftype, "1"], log_path=log)
        text = log.read_text()
        tool = {r.name: r.final_type.lower() for r in parse_records(text)}
        mine = {t.name: t.final_type.name.lower() for t in plan.tensors}
        diff = [f"{n}: planned {mine.get(n)}, dry-run {tool.get(n)}" for n in sorted(mine.keys() | tool.keys())
                if mine.get(n) != tool.get(n)]
        if diff:
            problems.append(f"{name}: " + "; ".join(diff[:4]))
        elif quant_size_mib(text) != pytest.approx(plan.total_bytes / 2**20, abs=0.006):
            problems.append(f"{name}: total {plan.total_bytes / 2**20:.2f} MiB vs dry-run {quant_size_mib(text)}")
        else:
            planned.append(name)
    record(file_id, "profiles_planned", planned)
    assert problems == []


E2E = [s.id for s in archkit.ARCHS if s.e2e]


@pytest.mark.requires_tools("llama-quantize", "llama-imatrix", "llama-perplexity")
@pytest.mark.parametrize("arch", E2E)
def test_end_to_end(converted, record, tmp_path, eval_text, arch):
    """compact, and i-compact with an imatrix built by llama-imatrix from the agentic corpus:
    plan -> the tool's dry-run agrees -> llama-quantize -> verify (inside `quantize`) -> eval."""
    path = built_model(converted, arch).gguf
    out = tmp_path / "out"
    r = CliRunner().invoke(main, ["quantize", "-p", "compact,i-compact", str(path), "--out-dir", str(out),
                                  "--corpus", "agentic", "--imatrix-ctx", "128", "--imatrix-chunks", "2",
                                  "-t", "2", "-j", "1", "--no-eval", "-q"])
    assert r.exit_code == 0, r.output[-3000:]
    files = sorted(out.glob("*.gguf"))
    assert len(files) == 2, [f.name for f in files]
    for f in files:
        r = CliRunner().invoke(main, ["eval", str(f), "--base", str(path), "--text", str(eval_text),
                                      "-c", "128", "--chunks", "2", "-t", "2", "-q"])
        assert r.exit_code == 0, r.output[-3000:]
        assert "KLD" in r.output
    record(arch, "end_to_end", ["compact", "i-compact"])


MMPROJ = [s.id for s in archkit.ARCHS if s.mmproj]


@pytest.mark.parametrize("arch", MMPROJ)
def test_projector_written_by_the_converters_mmproj(converted, record, arch):
    """A vision model's projector comes from the converter's own --mmproj path (a `clip` GGUF of
    v.*/mm.* tensors); the text GGUF that apex-orch plans holds none of them."""
    import gguf
    b = built_model(converted, arch)
    assert b.mmproj is not None and b.mmproj.exists()
    r = gguf.GGUFReader(b.mmproj)
    assert r.fields["general.architecture"].contents() == "clip"
    prefixes = {t.name.split(".")[0] for t in r.tensors}
    assert prefixes == {"v", "mm"}, prefixes
    assert not any(t.name.startswith(("v.", "mm.")) for t in read_model(b.gguf).tensors)
    record(arch, "mmproj", {"projector": r.fields["clip.projector_type"].contents(), "tensors": len(r.tensors)})
