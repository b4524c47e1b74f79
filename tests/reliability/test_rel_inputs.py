"""Reliability of inputs: headers and bounds.

- The header is checked against itself before anything plans or runs: block count, expert
  counts, dimensions, tensor offsets and sizes (exit 4 from every entry point).
- Bounded work for any input: profile block ranges and band values, YAML alias expansion,
  chat templates from a GGUF (time, memory, output size), imported regular expressions, corpus
  lines. A huge value is one error naming the key, never an out-of-memory kill or a hang.
- No traceback for any input, control characters in names included.
- The rest of the adversarial run: release --force, --split-max-size 1K, an already-quantized
  source, concurrent --from-q8 runs, -j 0 / -t 0 / --timeout nan, a non-executable tool, a FIFO
  as MODEL, Markdown injected into the model card.

Broken models are real GGUF files: the tiny synthetic model, patched in place with gguf's own
GGUFReader (mode r+) or copied with gguf's gguf_new_metadata, then run through the real tools.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
from pathlib import Path

import gguf
import pytest
from gguf.scripts.gguf_new_metadata import MetadataDetails, copy_with_new_metadata

from apex_orch.calibration import chat_template as chat_sandbox
from apex_orch.calibration import sources
from apex_orch.llama import pin
from relkit import assert_failed_cleanly, assert_one_error, cli, compact_output, run_cli


# ============================================================================ helpers

def patched(src: Path, dst: Path, *, kv: dict | None = None, dims: dict | None = None,
            offsets: dict | None = None) -> Path:
    """A copy of src with scalar keys, tensor dimensions or tensor data offsets rewritten in place."""
    shutil.copyfile(src, dst)
    reader = gguf.GGUFReader(dst, "r+")
    for key, value in (kv or {}).items():
        field = reader.fields[key]
        field.parts[field.data[0]][0] = value
    by_name = {t.name: t for t in reader.tensors}
    for (name, axis), value in (dims or {}).items():
        by_name[name].field.parts[3][axis] = value
    for name, value in (offsets or {}).items():
        by_name[name].field.parts[5][0] = value
    del reader
    return dst


def with_metadata(src: Path, dst: Path, **strings: str) -> Path:
    """A copy of src with string keys added or replaced (gguf's own gguf_new_metadata)."""
    reader = gguf.GGUFReader(src)
    arch = reader.fields["general.architecture"].contents()
    writer = gguf.GGUFWriter(dst, arch)
    copy_with_new_metadata(reader, writer, {k.replace("__", "."): MetadataDetails(gguf.GGUFValueType.STRING, v)
                                            for k, v in strings.items()}, [])
    return dst


def offset_of(model: Path, name: str) -> int:
    return next(t for t in gguf.GGUFReader(model).tensors if t.name == name).field.parts[5][0].item()


@pytest.fixture
def tiny_copy(tiny_moe, tmp_path):
    return lambda **kw: patched(tiny_moe, tmp_path / "broken.gguf", **kw)


def release_config(tmp_path: Path, model: Path, tiers: str = "[compact]", extra: str = "") -> Path:
    cfg = tmp_path / "cfg" / "release.yaml"
    cfg.parent.mkdir(exist_ok=True)
    cfg.write_text(f"name: Tiny-Release\nlicense: mit\nsource:\n  gguf: {model}\ntiers: {tiers}\n"
                   "eval: {enabled: false}\npublish: {repo: apex-orch/Tiny-Release-APEX-GGUF}\n" + extra)
    return cfg


# Every entry point that reads a model, run so that it must be refused before any tool starts.
ENTRY_POINTS = {
    "inspect": lambda m, tmp: cli("inspect", m),
    "plan": lambda m, tmp: cli("plan", "-p", "compact", m),
    "quantize": lambda m, tmp: cli("quantize", "-p", "compact", m, "--out-dir", tmp / "out", "--no-eval"),
    "imatrix": lambda m, tmp: cli("imatrix", m, "--corpus", "agentic"),
    "eval": lambda m, tmp: cli("eval", m, "--eval-corpus", "agentic", "--dry-run"),
    "release": lambda m, tmp: cli("release", release_config(tmp, m), "--out-dir", tmp / "rel", "--dry-run"),
}


def refused_everywhere(model: Path, tmp_path: Path, tripwire: Path, *needles: str) -> None:
    for name, run in ENTRY_POINTS.items():
        r = run(model, tmp_path)
        assert r.exit_code == 4, f"{name}: exit {r.exit_code}\n{r.output}"
        assert_one_error(r.output, 4, r.exit_code, *needles)
        assert "GGML_ASSERT" not in r.output
    assert not tripwire.exists(), "llama-quantize must not start"
    assert not (tmp_path / "out").exists() and not (tmp_path / "rel").exists()


# ============================================================================ header self-consistency

def test_block_count_larger_than_the_tensors(tiny_copy, tmp_path, tripwire, isolated_cache):
    model = tiny_copy(kv={"mistral4.block_count": 5})
    refused_everywhere(model, tmp_path, tripwire, f"{model}: GGUF header is inconsistent: mistral4.block_count "
                       "is 5 but 1 of those blocks have no tensors (block 4)", "convert the model again")


def test_block_count_smaller_than_the_tensors(tiny_copy, tmp_path, tripwire, isolated_cache):
    model = tiny_copy(kv={"mistral4.block_count": 3})
    refused_everywhere(model, tmp_path, tripwire, "mistral4.block_count is 3 but the file has tensors of "
                       "block 3 (blk.3.*)")


def test_expert_count_disagrees_with_the_expert_tensors(tiny_copy, tmp_path, tripwire, isolated_cache):
    model = tiny_copy(kv={"mistral4.expert_count": 8})
    refused_everywhere(model, tmp_path, tripwire, "mistral4.expert_count is 8 but the router "
                       "'blk.0.ffn_gate_inp.weight' scores 4 experts")


def test_more_used_experts_than_experts(tiny_copy, tmp_path, tripwire, isolated_cache):
    model = tiny_copy(kv={"mistral4.expert_used_count": 5})
    refused_everywhere(model, tmp_path, tripwire, "mistral4.expert_used_count is 5 but mistral4.expert_count "
                       "is 4 (each token uses 1 to 4 experts)")


def test_zero_dimension(tiny_copy, tmp_path, tripwire, isolated_cache):
    model = tiny_copy(dims={("blk.1.attn_output.weight", 1): 0})
    refused_everywhere(model, tmp_path, tripwire, "tensor 'blk.1.attn_output.weight' has a zero dimension "
                       "(shape [256, 0])")


def test_overlapping_tensor_data(tiny_moe, tiny_copy, tmp_path, tripwire, isolated_cache):
    first = offset_of(tiny_moe, "blk.0.attn_q_a.weight")
    model = tiny_copy(offsets={"blk.0.attn_q_b.weight": first})
    refused_everywhere(model, tmp_path, tripwire, "GGUF header is inconsistent: tensors",
                       "'blk.0.attn_q_a.weight' and 'blk.0.attn_q_b.weight' overlap")


def test_tensor_data_past_the_end_of_the_file(tiny_moe, tiny_copy, tmp_path, tripwire, isolated_cache):
    size = tiny_moe.stat().st_size
    model = tiny_copy(offsets={"blk.0.attn_q_a.weight": size})
    refused_everywhere(model, tmp_path, tripwire, "file is shorter than its tensors")


def test_misaligned_tensor_offset(tiny_moe, tiny_copy, tmp_path, tripwire):
    model = tiny_copy(offsets={"blk.0.attn_q_a.weight": offset_of(tiny_moe, "blk.0.attn_q_a.weight") + 1})
    r = cli("quantize", "-p", "compact", model, "--out-dir", tmp_path / "out", "--no-eval")
    assert_failed_cleanly(r.output, 4, r.exit_code, "tensor 'blk.0.attn_q_a.weight' starts at data offset",
                          "not a multiple of the file's alignment 32")
    assert not tripwire.exists()


def test_a_consistent_model_still_quantizes_and_verifies(tiny_moe, tmp_path):
    """The checks refuse nothing real: the unpatched tiny model quantizes with the real tool."""
    r = cli("quantize", "-p", "compact", tiny_moe, "--out-dir", tmp_path / "out", "-t", "2", "--no-eval", "-q")
    assert r.exit_code == 0, r.output
    assert compact_output(tmp_path / "out").is_file()


def test_fifo_as_model_is_refused_not_waited_on(tmp_path, tripwire):
    fifo = tmp_path / "model.gguf"
    os.mkfifo(fifo)
    for args in (["inspect", fifo], ["quantize", "-p", "compact", fifo, "--out-dir", tmp_path / "out", "--no-eval"],
                 ["plan", "-p", "compact", fifo]):
        proc = run_cli(*args, timeout=60)   # before the fix: blocked forever in open()
        assert_one_error(proc.stderr, 4, proc.returncode,
                         f"{fifo}: is not a regular file (a FIFO / named pipe)", "pass the .gguf file itself")
    assert not tripwire.exists()


# ============================================================================ bounded work: profiles

def _profile(tmp_path: Path, body: str) -> Path:
    p = tmp_path / "p.yaml"
    p.write_text("extends: compact\ntier: Custom\n" + body)
    return p


@pytest.mark.parametrize("cmd", ["plan", "quantize"])
def test_huge_band_value_is_refused_by_key(cmd, mistral4_split, tmp_path, tripwire):
    prof = _profile(tmp_path, "bands: {edge: 1000000000000, scale: fixed}\n")
    r = cli(cmd, "-p", prof, mistral4_split, *(["--out-dir", tmp_path / "out"] if cmd == "quantize" else []))
    assert_failed_cleanly(r.output, 3, r.exit_code, f"{prof}:3: bands.edge is 1,000,000,000,000; at most 4096")
    assert not tripwire.exists()


@pytest.mark.parametrize("cmd", ["plan", "quantize"])
def test_huge_block_range_is_refused_by_key(cmd, mistral4_split, tmp_path, tripwire):
    prof = _profile(tmp_path, "overrides:\n  - {role: routed_expert, blocks: '0-99999999999', type: Q8_0}\n")
    r = cli(cmd, "-p", prof, mistral4_split, *(["--out-dir", tmp_path / "out"] if cmd == "quantize" else []))
    assert_failed_cleanly(r.output, 3, r.exit_code, f"{prof}:4: blocks: '0-99999999999' names a block past 4095")
    assert not tripwire.exists()


# ============================================================================ bounded work: YAML aliases

LAUGHS = "".join(f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 10) + "]\n" for i in range(1, 10))


def test_billion_laughs_profile(mistral4_split, tmp_path, tripwire):
    prof = tmp_path / "laughs.yaml"
    prof.write_text("l0: &l0 lol\n" + LAUGHS + "tier: X\n")
    r = cli("plan", "-p", prof, mistral4_split)
    assert_one_error(r.output, 3, r.exit_code, f"{prof}:6: key 'l5' expands to more than 100,000 values")


def test_billion_laughs_corpus(tmp_path):
    c = tmp_path / "laughs.yaml"
    c.write_text("description: lol\nl0: &l0 lol\n" + LAUGHS + "sources: [{builtin: chat}]\n")
    r = cli("corpus", "build", c, "-o", tmp_path / "c.txt")
    assert_one_error(r.output, 3, r.exit_code, f"{c}:7: key 'l5' expands to more than 100,000 values")
    assert not (tmp_path / "c.txt").exists()


def test_billion_laughs_release_config(tiny_moe, tmp_path):
    cfg = release_config(tmp_path, tiny_moe, extra="l0: &l0 lol\n" + LAUGHS)
    r = cli("release", cfg, "--dry-run", "--out-dir", tmp_path / "rel")
    assert_one_error(r.output, 3, r.exit_code, f"{cfg}:13: key 'l5' expands to more than 100,000 values")


def test_deeply_nested_yaml_is_one_error(mistral4_split, tmp_path):
    prof = tmp_path / "deep.yaml"
    prof.write_text("tier: " + "[" * 20000 + "]" * 20000 + "\n")
    r = cli("plan", "-p", prof, mistral4_split)
    assert_one_error(r.output, 3, r.exit_code, f"{prof}: YAML is nested too deeply")


# ============================================================================ bounded work: imported regexes

@pytest.mark.parametrize("pattern,what", [
    (r"(a+)+$", "a repeated group that holds another repeat"),
    (r"blk\.(0|00)*x", "a repeated group that holds an alternation"),
])
def test_imported_catastrophic_regex_is_refused(pattern, what, tmp_path):
    src = tmp_path / "apex.txt"
    src.write_text(f"ffn_down_exps=q4_k\n{pattern}=q8_0\n")
    r = cli("profile", "import", src)
    assert_one_error(r.output, 3, r.exit_code, f"{src}:2: pattern {pattern!r} has {what}",
                     "its matching time can grow exponentially")


def test_imported_file_with_too_many_rules_or_blocks(tmp_path):
    src = tmp_path / "apex.txt"
    src.write_text("".join(f"blk\\.{i}\\.ffn_down_exps=q4_k\n" for i in range(1001)))
    r = cli("profile", "import", src)
    assert_one_error(r.output, 3, r.exit_code, f"{src}:1001: more than 1000 PATTERN=TYPE rules")
    src.write_text("ffn_down_exps=q4_k\n")
    r = cli("profile", "import", src, "--blocks", "1000000000")
    assert_one_error(r.output, 2, r.exit_code, "--blocks: 1000000000 blocks: give 1 to 4096")


# ============================================================================ bounded work: chat templates

def _chat_corpus(tmp_path: Path) -> Path:
    c = tmp_path / "talk.yaml"
    c.write_text("description: two conversations\nshuffle: false\nsources: [{builtin: chat}]\n")
    return c


@pytest.fixture
def templated(tiny_moe, tmp_path):
    return lambda template: with_metadata(tiny_moe, tmp_path / "templated.gguf", tokenizer__chat_template=template)


HANGS = "{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}"
FLOODS = "{% for a in range(100000) %}{{ messages[0].content * 1000 }}{% endfor %}"
EATS_MEMORY = "{% set x = 'x' * 1000 %}{% set y = x * 3000000 %}{{ y | length }}"


def test_template_that_never_ends_is_stopped(templated, tmp_path, monkeypatch):
    monkeypatch.setattr(chat_sandbox, "TEMPLATE_SECONDS", 2.0)
    model = templated(HANGS)
    r = cli("corpus", "build", _chat_corpus(tmp_path), "--model", model, "-o", tmp_path / "c.txt")
    assert_one_error(r.output, 4, r.exit_code, f"{model}: tokenizer.chat_template ran past 2 s rendering the "
                     "conversation at", "build the corpus without the model's template")


def test_template_that_floods_output_is_stopped(templated, tmp_path):
    model = templated(FLOODS)
    r = cli("corpus", "build", _chat_corpus(tmp_path), "--model", model, "-o", tmp_path / "c.txt")
    assert_one_error(r.output, 4, r.exit_code, f"{model}: tokenizer.chat_template rendered the conversation at",
                     "and was stopped", "repeats text without bound")


def test_template_that_eats_memory_is_stopped(templated, tmp_path):
    model = templated(EATS_MEMORY)
    r = cli("corpus", "build", _chat_corpus(tmp_path), "--model", model, "-o", tmp_path / "c.txt")
    assert_one_error(r.output, 4, r.exit_code, f"{model}: tokenizer.chat_template needed more than 1024 MiB")


def test_template_bound_from_imatrix_too(templated, tmp_path, isolated_cache, monkeypatch):
    """The second entry point: imatrix renders the corpus with the model's template."""
    monkeypatch.setattr(chat_sandbox, "TEMPLATE_SECONDS", 2.0)
    model = templated(HANGS)
    r = cli("imatrix", model, "--corpus", "agentic")
    assert_one_error(r.output, 4, r.exit_code, "tokenizer.chat_template ran past 2 s")
    assert not list(isolated_cache.glob("imatrix/*.gguf"))


def test_well_behaved_template_still_renders(templated, tmp_path):
    model = templated("{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}")
    r = cli("corpus", "build", _chat_corpus(tmp_path), "--model", model, "-o", tmp_path / "c.txt")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "c.txt").read_text().startswith("<")


# ============================================================================ bounded work: corpus lines

def test_corpus_line_too_long(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "MAX_LINE_CHARS", 1000)
    data = tmp_path / "rows.jsonl"
    data.write_text('{"text": "short"}\n{"text": "' + "x" * 2000 + '"}\n')
    c = tmp_path / "rows.yaml"
    c.write_text("description: rows\nsources: [{path: rows.jsonl}]\n")
    r = cli("corpus", "build", c, "-o", tmp_path / "c.txt")
    assert_one_error(r.output, 3, r.exit_code, f"{data}:2: a line longer than 1,000 characters",
                     f"the source defined at {c}:2")


def test_corpus_too_many_documents(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "MAX_SOURCE_DOCUMENTS", 10)
    data = tmp_path / "lines.txt"
    data.write_text("".join(f"line {i}\n" for i in range(11)))
    c = tmp_path / "lines.yaml"
    c.write_text("description: lines\nsources: [{path: lines.txt, split: line}]\n")
    r = cli("corpus", "build", c, "-o", tmp_path / "c.txt")
    assert_one_error(r.output, 3, r.exit_code, f"{data}:11: the source holds more than 10 documents")


def test_corpus_gzip_bomb(tmp_path, monkeypatch):
    import gzip
    monkeypatch.setattr(sources, "MAX_SOURCE_CHARS", 1 << 20)
    data = tmp_path / "bomb.txt.gz"
    with gzip.open(data, "wt") as fh:
        fh.write("a" * (4 << 20))
    c = tmp_path / "bomb.yaml"
    c.write_text("description: bomb\nsources: [{path: bomb.txt.gz}]\n")
    r = cli("corpus", "build", c, "-o", tmp_path / "c.txt")
    assert_one_error(r.output, 3, r.exit_code, f"{data}: the source holds more than 1,048,576 characters")


# ============================================================================ no traceback, control characters

def test_control_characters_in_gguf_name_are_shown_escaped(tiny_moe, tmp_path):
    model = patched(tiny_moe, tmp_path / "ctl.gguf")
    reader = gguf.GGUFReader(model, "r+")
    field = reader.fields["general.name"]
    field.parts[field.data[0]][:] = list(b"Ti\x1b[2J\n\x07")   # same length as "Tiny-MoE"
    del reader
    r = cli("inspect", model)
    assert r.exit_code == 0, r.output
    assert "\x1b" not in r.output and "\x07" not in r.output
    assert "model            Ti\\x1b[2J\\n\\x07  [mistral4]" in r.output


@pytest.mark.parametrize("field", ["tier", "best_for"])
def test_control_characters_in_profile_text_are_refused(field, mistral4_split, tmp_path, tripwire):
    prof = tmp_path / "p.yaml"
    prof.write_text(f'extends: compact\n{field}: "Bad\\e[31mTier"\n')
    r = cli("quantize", "-p", prof, mistral4_split, "--out-dir", tmp_path / "out")
    assert_failed_cleanly(r.output, 3, r.exit_code, f"{prof}:2: {field}: contains a control character (U+001B)")
    assert not tripwire.exists()


@pytest.mark.parametrize("name", ["bad\x1bname.gguf", "line\nbreak.gguf",
                                  os.fsdecode(b"latin1-\xe9.gguf")])
def test_odd_file_names_give_one_message(name, tmp_path):
    model = tmp_path / name
    for args in (["inspect", model], ["plan", "-p", "compact", model]):
        proc = run_cli(*args)
        assert_one_error(proc.stderr, 4, proc.returncode, "file not found")
        assert "\x1b" not in proc.stderr


def test_nul_in_a_model_path_is_one_error(tmp_path):
    """No process can receive a NUL in its arguments; a library caller can."""
    from apex_orch.core.errors import ModelError
    from apex_orch.model.info import read_model
    with pytest.raises(ModelError, match="the path contains a NUL byte"):
        read_model(tmp_path / "nul\x00byte.gguf")


# ============================================================================ the rest of the adversarial run

def test_release_force_redoes_exactly_the_stale_tier(tiny_moe, tmp_path, isolated_cache):
    cfg = release_config(tmp_path, tiny_moe, tiers="[compact, balanced]")
    out = tmp_path / "rel"
    r = cli("release", cfg, "--out-dir", out, "--only", "quantize", "-j", "1")
    assert r.exit_code == 0, r.output
    compact, other = out / "Tiny-Release-APEX-Compact.gguf", out / "Tiny-Release-APEX-Balanced.gguf"
    other_stat = other.stat()
    with open(compact, "r+b") as fh:   # damage the compact tier's bytes
        fh.seek(compact.stat().st_size // 2)
        fh.write(b"\xff" * 4096)
    r = cli("release", cfg, "--out-dir", out, "--only", "quantize")
    assert r.exit_code == 9 and "[--force]" in r.output, r.output
    assert "--force" in cli("release", "--help").output
    r = cli("release", cfg, "--out-dir", out, "--only", "quantize", "--force", "-j", "1")
    assert r.exit_code == 0, r.output
    assert "1 written, 1 up to date" in r.output
    assert other.stat().st_mtime_ns == other_stat.st_mtime_ns and other.stat().st_ino == other_stat.st_ino
    r = cli("release", cfg, "--out-dir", out, "--only", "quantize")
    assert r.exit_code == 0 and "0 written, 2 up to date" in r.output, r.output


def test_split_max_size_too_small_is_refused_up_front(tiny_moe, tmp_path, tripwire):
    r = cli("quantize", "-p", "compact", tiny_moe, "--out-dir", tmp_path / "out", "--split-max-size", "1K")
    assert r.exit_code == 2 and "Invalid value for '--split-max-size': 1K is too small: at least 1 MB" in r.output
    assert not tripwire.exists()
    r = cli("quantize", "-p", "compact", tiny_moe, "--out-dir", tmp_path / "out", "--split-max-size", "9" * 400)
    assert r.exit_code == 2 and "Invalid value for '--split-max-size': " + "9" * 400 + " is too large" in r.output


@pytest.fixture(scope="module")
def quantized_source(tmp_path_factory, tiny_compact_dir):
    return compact_output(tiny_compact_dir)


def test_already_quantized_source_is_refused(quantized_source, tmp_path, tripwire):
    r = cli("quantize", "-p", "balanced", quantized_source, "--out-dir", tmp_path / "out", "--no-eval")
    assert_failed_cleanly(r.output, 4, r.exit_code, f"{quantized_source}: the source is already quantized:",
                          "compounds the rounding errors", "accept the loss", "[--allow-requantize]")
    assert not tripwire.exists()


def test_allow_requantize_passes_the_tools_flag(quantized_source, tmp_path):
    r = cli("quantize", "-p", "balanced", quantized_source, "--out-dir", tmp_path / "out", "--no-eval",
            "--allow-requantize", "-t", "2", "--name", "Requant")
    assert r.exit_code == 0, r.output
    assert "warning: Balanced: requantizing an already-quantized source (accepted on request)" in r.output
    out = tmp_path / "out" / "Requant-APEX-Balanced.gguf"
    manifest = json.loads(out.with_name(out.name + ".manifest.json").read_text())
    assert "--allow-requantize" in manifest["command"], manifest["command"]


@pytest.mark.parametrize("args,needle", [
    (["-j", "0"], "Invalid value for '-j' / '--jobs': 0 is not in the range 1<=x<=256"),
    (["-t", "0"], "Invalid value for '-t' / '--threads': 0 is not in the range 1<=x<=4096"),
    (["--timeout", "nan"], "Invalid value for '--timeout': 'nan' is not a finite number"),
    (["--timeout", "-1"], "Invalid value for '--timeout': '-1' is not a positive number of seconds"),
])
def test_bad_numbers_are_refused(args, needle, tiny_moe, tmp_path, tripwire):
    r = cli("quantize", "-p", "compact", tiny_moe, "--out-dir", tmp_path / "out", *args)
    assert r.exit_code == 2 and needle in r.output, r.output
    assert not tripwire.exists()
    if args[0] in ("-t", "--timeout"):
        r = cli("imatrix", tiny_moe, *args)
        assert r.exit_code == 2 and needle in r.output, r.output
    if args[0] == "-j":
        r = cli("release", release_config(tmp_path, tiny_moe), *args)
        assert r.exit_code == 2 and needle in r.output, r.output


def test_eval_gate_nan_is_refused(tiny_moe):
    r = cli("eval", tiny_moe, "--base", tiny_moe, "--max-mean-kld", "nan")
    assert r.exit_code == 2 and "'nan' is not a finite number" in r.output, r.output


def test_non_executable_tool_is_reported_as_such(tiny_moe, tmp_path, monkeypatch):
    """FAKE: a bin folder where llama-quantize is a copy of the real one without its x bits."""
    folder = tmp_path / "bin"
    folder.mkdir()
    for f in pin.bin_dir().iterdir():
        (folder / f.name).symlink_to(f)
    (folder / "llama-quantize").unlink()
    shutil.copyfile(pin.bin_dir() / "llama-quantize", folder / "llama-quantize")
    os.chmod(folder / "llama-quantize", 0o644)
    r = cli("--llama-bin-dir", folder, "quantize", "-p", "compact", tiny_moe, "--out-dir", tmp_path / "out")
    assert_one_error(r.output, 7, r.exit_code, f"llama-quantize at {folder / 'llama-quantize'} (env) is not "
                     "executable (mode 0644)", f"chmod +x {folder / 'llama-quantize'}")
    assert "not found" not in r.output


def test_concurrent_from_q8_runs_use_their_own_scratch_and_share_the_copy(tiny_moe, isolated_cache, tmp_path):
    from apex_orch.calibration import imatrix as im
    plans = [im.plan_imatrix(tiny_moe, c, ctx=64, chunks=2, threads=1, from_q8=True) for c in ("agentic", "code")]
    assert plans[0].key != plans[1].key and plans[0].q8_path == plans[1].q8_path
    assert f".partial-{os.getpid()}" in plans[0].q8_argv[2]
    # Two runs (other keys, one model) at the same time: one makes the copy, the other waits for it.
    errors, lines = [], []

    def run(plan):
        try:
            im.run_imatrix(plan, on_progress=lines.append)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(p,)) for p in plans]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert errors == []
    assert sum("making a Q8_0 copy" in line for line in lines) == 1
    assert sum("using cached Q8_0 copy" in line for line in lines) == 1
    assert not list(plans[0].q8_path.parent.glob("*.partial*"))


def test_card_escapes_tier_and_best_for(tiny_moe, tmp_path, isolated_cache):
    prof = tmp_path / "cfg" / "evil.yaml"
    prof.parent.mkdir(exist_ok=True)
    prof.write_text("extends: compact\ntier: 'A|B <!-- C'\n")
    cfg = release_config(tmp_path, tiny_moe, tiers="[{profile: " + str(prof) + ", best_for: \"x | y\\n## Injected\"}]")
    out = tmp_path / "rel"
    r = cli("release", cfg, "--out-dir", out, "--skip", "publish,eval", "-j", "1")
    assert r.exit_code == 0, r.output
    card = (out / "README.md").read_text()
    assert "\n## Injected" not in card and "<!-- C" not in card
    size = card.split("| Tiny-Release-APEX-A-B----C.gguf | ")[1].split(" | ")[1]
    assert f"| Tiny-Release-APEX-A-B----C.gguf | A\\|B &lt;!-- C | {size} | x \\| y ## Injected |\n" in card
    assert "The first line is the recommended tier (A|B &lt;!-- C)" in card
