"""Calibration corpora: YAML schema (file:line errors), sources, sampling, chat templates, CLI.

Real components throughout: the shipped corpora and samples, the pinned tree's vocab-only
GGUFs (real tokenizers, some with real chat templates) and the bindings for token counts.
The only fake is the Hugging Face downloader (no test touches the network).
"""

from __future__ import annotations

import hashlib
import json
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner

from apex_orch.calibration import corpus as C
from apex_orch.calibration.chat_format import PLAIN, ChatFormat, ChatRenderer, chat_format_from_model, render_plain
from apex_orch.calibration.corpus_spec import available_corpora, corpora_dir, resolve_corpus
from apex_orch.calibration.sources import Document
from apex_orch.calibration.tokenizer import ModelTokenizer
from apex_orch.llama import pin
from apex_orch.cli import main
from apex_orch.core.errors import ConfigError, ModelError, OutputExistsError

DOMAINS = ("chat", "code", "reasoning", "tool-calling", "agentic", "wikipedia")
VOCAB_DIR = pin.llama_source() / "models"
SPM_VOCAB = VOCAB_DIR / "ggml-vocab-llama-spm.gguf"       # 32000 tokens, no chat template
PHI3_VOCAB = VOCAB_DIR / "ggml-vocab-phi-3.gguf"          # has a chat template (<|user|> ... <|end|>)


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text).lstrip("\n"), encoding="utf-8")
    return path


def jsonl(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


# =========================================================================== shipped corpora

def test_every_domain_corpus_is_shipped_and_listed():
    assert available_corpora() == sorted([*DOMAINS, "diverse"])
    runner = CliRunner()
    res = runner.invoke(main, ["corpus", "list", "--json"])
    assert res.exit_code == 0, res.output
    rows = {r["name"]: r for r in json.loads(res.output)}
    assert set(rows) == {*DOMAINS, "diverse"}
    assert rows["agentic"]["sources"] == ["builtin:agentic"]
    assert rows["diverse"]["sources"] == [f"corpus:{d}" for d in DOMAINS]


def test_builtin_corpora_are_deterministic_and_big_enough():
    """Each domain alone feeds llama-imatrix at -c 512 for several chunks (>= 20k real tokens)."""
    tok = ModelTokenizer(SPM_VOCAB)
    try:
        for name in DOMAINS:
            first, second = C.build_corpus(name), C.build_corpus(name)
            assert first.sha256 == second.sha256, name
            tokens = tok.count(first.text, special=False)
            assert tokens >= 20000, f"{name}: {tokens} tokens"
            assert first.template_fallbacks == 0
            assert all(s.duplicates_dropped < s.documents_available for s in first.sources)
    finally:
        tok.close()


def test_diverse_mixes_all_six_by_weight():
    built = C.build_corpus("diverse")
    spec = built.spec
    assert spec.budget_tokens == 100000
    weights = {s.value: s.weight for s in spec.sources}
    assert weights == {"chat": 1.0, "code": 1.0, "reasoning": 1.0, "tool-calling": 1.0, "agentic": 1.25,
                       "wikipedia": 0.75}
    total_w = sum(weights.values())
    for stats in built.sources:
        target = round(100000 * stats.weight / total_w)
        assert stats.target_tokens == target
        # a source stops at the first document that reaches its share
        assert target <= stats.approx_tokens < target + 6000, stats
    assert {d.source for d in built.documents} == {f"corpus:{d}" for d in DOMAINS}
    assert built.approx_tokens > max(C.build_corpus(d).approx_tokens for d in DOMAINS)


def test_show_lists_sources_and_sizes():
    res = CliRunner().invoke(main, ["corpus", "show", "agentic", "--json"])
    assert res.exit_code == 0, res.output
    info = json.loads(res.output)
    built = C.build_corpus("agentic")
    assert info["bytes"] == len(built.data)
    assert info["documents"] == len(built.documents)
    assert info["sources"][0]["id"] == "builtin:agentic"
    assert info["sources"][0]["tokens_method"] == C.APPROX_METHOD
    text = CliRunner().invoke(main, ["corpus", "show", "agentic"]).output
    assert "builtin:agentic" in text and "approximate" in text


# =========================================================================== build + manifest

def test_build_writes_text_and_manifest(tmp_path):
    out = tmp_path / "agentic.txt"
    res = CliRunner().invoke(main, ["corpus", "build", "agentic", "-o", str(out)])
    assert res.exit_code == 0, res.output
    data = out.read_bytes()
    manifest = json.loads((tmp_path / "agentic.txt.manifest.json").read_text())
    assert manifest["sha256"] == hashlib.sha256(data).hexdigest()
    assert manifest["bytes"] == len(data)
    assert manifest["tokens_method"] == C.APPROX_METHOD
    assert manifest["tokens"] == -(-len(data) // 4)
    assert manifest["chat_format"] == "plain" and manifest["parse_special"] is False
    (src,) = manifest["sources"]
    # one source: its bytes are the text minus separators and the final newline
    assert src["bytes"] == len(data) - 2 * (manifest["documents"] - 1) - 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["agentic.txt", "agentic.txt.manifest.json"]

    # same bytes again: fine; different content without --force: refused
    assert CliRunner().invoke(main, ["corpus", "build", "agentic", "-o", str(out)]).exit_code == 0
    res = CliRunner().invoke(main, ["corpus", "build", "chat", "-o", str(out)])
    assert res.exit_code == OutputExistsError.exit_code and "--force" in res.output
    assert out.read_bytes() == data
    assert CliRunner().invoke(main, ["corpus", "build", "chat", "-o", str(out), "--force"]).exit_code == 0
    assert out.read_bytes() == C.build_corpus("chat").data


def test_build_counts_tokens_with_the_model_tokenizer(tmp_path):
    out = tmp_path / "reasoning.txt"
    res = CliRunner().invoke(main, ["corpus", "build", "reasoning", "-o", str(out), "--model", str(SPM_VOCAB)])
    assert res.exit_code == 0, res.output
    manifest = json.loads((tmp_path / "reasoning.txt.manifest.json").read_text())
    tok = ModelTokenizer(SPM_VOCAB)
    try:
        expected_total = tok.count(out.read_text(encoding="utf-8"), special=False)
        per_doc = sum(tok.count(d.rendered, special=False) for d in C.build_corpus("reasoning").documents)
    finally:
        tok.close()
    assert manifest["tokens"] == expected_total
    assert manifest["tokens_method"] == C.MODEL_METHOD
    assert manifest["sources"][0]["tokens"] == per_doc
    assert manifest["sources"][0]["tokens_method"] == C.MODEL_METHOD
    assert manifest["tokenizer_model"] == str(SPM_VOCAB)


def test_model_chat_template_is_used_and_special_tokens_parsed(tmp_path):
    fmt = chat_format_from_model(PHI3_VOCAB)
    assert fmt.is_template and fmt.bos_token == "<s>" and fmt.eos_token == "<|endoftext|>"
    built = C.build_corpus("chat", model=PHI3_VOCAB)
    assert built.parse_special and built.chat_format.origin == f"model:{PHI3_VOCAB}"
    assert "<|user|>" in built.text and "<|assistant|>" in built.text and "\nUser: " not in built.text
    plain = C.build_corpus("chat")
    assert "<|user|>" not in plain.text and "User: " in plain.text
    assert built.sha256 != plain.sha256

    out = tmp_path / "chat.txt"
    res = CliRunner().invoke(main, ["corpus", "build", "chat", "-o", str(out), "--model", str(PHI3_VOCAB)])
    assert res.exit_code == 0, res.output
    manifest = json.loads((tmp_path / "chat.txt.manifest.json").read_text())
    tok = ModelTokenizer(PHI3_VOCAB)
    try:
        assert manifest["tokens"] == tok.count(out.read_text(encoding="utf-8"), special=True)
        # parsed as special tokens, the markers are single tokens
        assert tok.count("<|user|>", special=True) == 1
    finally:
        tok.close()
    assert manifest["parse_special"] is True


def test_template_refusals_fall_back_loudly(tmp_path):
    # a real template that refuses system messages (Gemma 2's)
    template = (pin.llama_source() / "models" / "templates" / "google-gemma-2-2b-it.jinja").read_text()
    fmt = ChatFormat(template=template, bos_token="<bos>", eos_token="<eos>", origin="model:gemma-2")
    folder = tmp_path / "c"
    jsonl(folder / "talk.jsonl", [
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                      {"role": "assistant", "content": "Hello!"}]},
        {"messages": [{"role": "user", "content": "Hi again"}, {"role": "assistant", "content": "Hello again!"}]},
    ])
    write(folder / "talk.yaml", """
        description: two chats
        shuffle: false
        sources:
          - path: talk.jsonl
        """)
    built = C.build_corpus(folder / "talk.yaml", chat_format=fmt)
    assert built.template_fallbacks == 1
    assert built.documents[0].rendered == "System: Be brief.\n\nUser: Hi\n\nAssistant: Hello!"
    assert built.documents[1].rendered.startswith("<bos><start_of_turn>user\nHi again<end_of_turn>")
    (warning,) = built.warnings()
    assert "refused 1 conversation" in warning and "System role not supported" in warning


def test_templates_see_a_fixed_date_and_cannot_change_the_messages():
    template = ("{{ strftime_now('%Y-%m-%d') }}|{% set _ = messages.append({'role': 'user', 'content': 'x'}) %}"
                "{{ messages | length }}|{{ messages | map(attribute='role') | tojson }}")
    renderer = ChatRenderer(ChatFormat(template=template, origin="model:t"))
    doc = Document(source="s", origin="o", messages=[{"role": "user", "content": "hi"}])
    assert renderer.render(doc) == '2025-01-01|2|["user", "user"]'
    assert renderer.render(doc) == '2025-01-01|2|["user", "user"]'
    assert doc.messages == [{"role": "user", "content": "hi"}]


def test_plain_format_renders_tool_calls_and_results():
    msgs = [{"role": "user", "content": "Weather in Oslo?"},
            {"role": "assistant", "content": "", "tool_calls": [
                {"id": "abcdefghi", "type": "function",
                 "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}]},
            {"role": "tool", "tool_call_id": "abcdefghi", "name": "get_weather", "content": "{\"temp\": 3}"},
            {"role": "assistant", "content": "3 °C."}]
    tools = [{"type": "function", "function": {"name": "get_weather"}}]
    assert render_plain(msgs, tools) == (
        'Tools available: [{"type": "function", "function": {"name": "get_weather"}}]\n\n'
        "User: Weather in Oslo?\n\n"
        'Assistant calls get_weather: {"city": "Oslo"}\n\n'
        'Tool result (get_weather): {"temp": 3}\n\n'
        "Assistant: 3 °C.")


# =========================================================================== sources and sampling

def test_local_sources_folders_globs_and_formats(tmp_path):
    root = tmp_path / "defs"
    write(root / "data" / "notes" / "a.txt", "First paragraph\nstill first.\n\nSecond paragraph.\n")
    write(root / "data" / "notes" / ".hidden.txt", "never read")
    write(root / "data" / "notes" / "sub" / "b.md", "Markdown file.\n")
    jsonl(root / "data" / "rows.jsonl", [{"body": "row one"}, {"body": "row two"}])
    jsonl(root / "data" / "share.jsonl",
          [{"conversations": [{"from": "human", "value": "Q?"}, {"from": "gpt", "value": "A."}]}])
    write(root / "local.yaml", """
        description: local files
        shuffle: false
        sources:
          - path: data/notes            # a folder: every file below it
            split: paragraph
          - path: data/*.jsonl
            field: body
        """)
    with pytest.raises(ConfigError) as err:
        C.build_corpus(root / "local.yaml")
    # share.jsonl has no 'body' field: the error names the data file and line
    assert err.value.where == f"{root / 'data' / 'share.jsonl'}:1" and "'body'" in err.value.message

    write(root / "local.yaml", """
        description: local files
        shuffle: false
        sources:
          - path: data/notes
            split: paragraph
          - path: data/rows.jsonl
            field: body
          - path: data/share.jsonl
            field: conversations
        """)
    built = C.build_corpus(root / "local.yaml")
    assert [d.rendered for d in built.documents] == [
        "First paragraph\nstill first.", "Second paragraph.", "Markdown file.", "row one", "row two",
        "User: Q?\n\nAssistant: A."]
    assert built.documents[1].origin == f"{root / 'data' / 'notes' / 'a.txt'}:4"
    assert built.text == "\n\n".join(d.rendered for d in built.documents) + "\n"


def test_budget_weights_dedupe_and_seeded_shuffle(tmp_path):
    folder = tmp_path / "mix"
    # 400 bytes: 100 tokens each
    jsonl(folder / "a.jsonl", [{"text": f"alpha document number {i:03d} " + "a" * 374} for i in range(40)])
    jsonl(folder / "b.jsonl", [{"text": f"beta document number {i:03d} " + "b" * 375} for i in range(40)]
          # a duplicate (whitespace differs)
          + [{"text": "alpha   document number 000 " + "a" * 374}])
    spec = """
        description: weighted mix
        seed: {seed}
        budget_tokens: 2000
        sources:
          - path: a.jsonl
            weight: 3
          - path: b.jsonl
        """
    write(folder / "mix.yaml", spec.format(seed=1))
    built = C.build_corpus(folder / "mix.yaml")
    a, b = built.sources
    assert (a.target_tokens, b.target_tokens) == (1500, 500)
    assert (a.documents_used, b.documents_used) == (15, 5)
    assert (a.approx_tokens, b.approx_tokens) == (1500, 500)
    assert (a.duplicates_dropped, b.duplicates_dropped) == (0, 1)
    assert b.documents_available == 41
    again = C.build_corpus(folder / "mix.yaml")
    assert [d.rendered for d in again.documents] == [d.rendered for d in built.documents]
    write(folder / "mix.yaml", spec.format(seed=2))
    other = C.build_corpus(folder / "mix.yaml")
    assert [d.rendered for d in other.documents] != [d.rendered for d in built.documents]


def test_short_source_is_reported(tmp_path):
    folder = tmp_path / "short"
    jsonl(folder / "a.jsonl", [{"text": "x" * 400}])
    write(folder / "short.yaml", """
        description: too little text
        budget_tokens: 1000
        sources:
          - path: a.jsonl
        """)
    built = C.build_corpus(folder / "short.yaml")
    assert built.warnings() == ["source path:a.jsonl supplied ~100 of its ~1000-token share"]


def test_corpus_sources_nest_and_cycles_are_refused(tmp_path):
    folder = tmp_path / "nest"
    jsonl(folder / "t.jsonl", [{"text": "hello"}])
    write(folder / "inner.yaml", "description: inner\nsources:\n  - path: t.jsonl\n")
    write(folder / "outer.yaml", "description: outer\nsources:\n  - corpus: inner\n")
    built = C.build_corpus(folder / "outer.yaml")
    assert [d.rendered for d in built.documents] == ["hello"]
    assert built.sources[0].id == "corpus:inner"
    write(folder / "inner.yaml", "description: inner\nsources:\n  - corpus: outer\n")
    with pytest.raises(ConfigError, match="cycle: outer -> inner -> outer"):
        C.build_corpus(folder / "outer.yaml")


def test_hf_source_uses_the_pinned_revision_and_the_cache(tmp_path, monkeypatch):
    """FAKE downloader: huggingface_hub.hf_hub_download is replaced, no network is touched."""
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    revision = "0123456789abcdef0123456789abcdef01234567"
    cached = jsonl(tmp_path / "hf-cache" / "train.jsonl", [{"content": "from the hub, line one"},
                                                           {"content": "from the hub, line two"}])
    calls = []

    def fake_download(**kwargs):
        calls.append(kwargs)
        if kwargs["filename"] != "data/train.jsonl":
            raise LocalEntryNotFoundError("not cached")
        return str(cached)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    folder = tmp_path / "defs"
    write(folder / "hub.yaml", f"""
        description: one hub file
        shuffle: false
        sources:
          - hf:
              repo: someone/dataset
              revision: {revision}
              files: [data/train.jsonl]
            field: content
        """)
    built = C.build_corpus(folder / "hub.yaml")
    assert [d.rendered for d in built.documents] == ["from the hub, line one", "from the hub, line two"]
    assert calls == [{"repo_id": "someone/dataset", "filename": "data/train.jsonl", "revision": revision,
                      "repo_type": "dataset"}]
    assert built.sources[0].id == "hf:someone/dataset@0123456789ab:data/train.jsonl"

    write(folder / "hub.yaml", (folder / "hub.yaml").read_text().replace("data/train.jsonl", "data/other.jsonl"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError) as err:
        C.build_corpus(folder / "hub.yaml")
    assert "HF_HUB_OFFLINE=1 and the file is not in the cache" in err.value.message
    assert err.value.where == f"{folder / 'hub.yaml'}:4"
    assert "unset HF_HUB_OFFLINE" in err.value.hint


# =========================================================================== schema errors

@pytest.mark.parametrize("body, line, needle", [
    ("description: d\nsourcse: []\n", 2, "unknown key 'sourcse'"),
    ("description: d\nsources:\n  - builtin: chat\n    wieght: 2\n", 4, "unknown key 'sources[0].wieght'"),
    ("description: d\nsources:\n  - hf:\n      repo: a/b\n      revision: main\n      files: [x.jsonl]\n", 5,
     "full 40-hex commit"),
    ("description: d\nsources:\n  - hf:\n      repo: a/b\n      revison: x\n", 5,
     "unknown key 'sources[0].hf.revison'"),
    ("description: d\nsources:\n  - builtin: chat\n    weight: -1\n", 4, "'weight' must be a positive number"),
    ("description: d\nsources:\n  - builtin: chat\n    weight: 2\n", 3, "has no effect without budget_tokens"),
    ("description: d\nsources:\n  - builtin: chat\n    path: x.txt\n", 3, "exactly one of"),
    ("description: d\nsources:\n  - builtin: chat\n    format: jsonl\n", 4, "'format' has no effect on a builtin"),
    ("description: d\nseed: 1\nseed: 2\nsources: []\n", 3, "duplicate key 'seed'"),
    ("sources:\n  - builtin: chat\n", 1, "missing key 'description'"),
    ("description: d\nsources: []\n", 2, "non-empty list"),
    ("description: d\nsources:\n  - corpus: ../chat\n", 3, "path separators"),
    ("description: d\nsources:\n  - path: nothing/*.txt\n", 3, "matches no files"),
    ("description: d\nbudget_tokens: many\nsources:\n  - builtin: chat\n", 2, "'budget_tokens' must be a positive "
                                                                              "integer"),
    ("description: d\nsources:\n  - builtin: [chat\n", 4, "invalid YAML"),
    ("description: d\nsources:\n  - hf:\n      repo: a/b\n      revision: " + "a" * 40
     + "\n      files: [t.parquet]\n", 6,
     "parquet files are not supported"),
])
def test_schema_errors_name_file_line_and_key(tmp_path, body, line, needle):
    path = write(tmp_path / "bad.yaml", body)
    with pytest.raises(ConfigError) as err:
        C.build_corpus(path)
    assert err.value.where == f"{path}:{line}", err.value
    assert needle in err.value.message


def test_unknown_key_error_through_the_cli(tmp_path):
    path = write(tmp_path / "typo.yaml", "description: d\nsources:\n  - builtin: chat\n    wieght: 2\n")
    res = CliRunner().invoke(main, ["corpus", "show", str(path)])
    assert res.exit_code == ConfigError.exit_code
    assert f"error: {path}:4: unknown key 'sources[0].wieght'" in res.output
    assert "did you mean 'weight'?" in res.output


@pytest.mark.parametrize("name", ["../chat", "a/b", "..", ".hidden", "x\\y"])
def test_corpus_names_cannot_escape(name):
    with pytest.raises(ConfigError):
        resolve_corpus(name)


def test_unknown_corpus_suggests_a_name():
    with pytest.raises(ConfigError) as err:
        resolve_corpus("agentik")
    assert "unknown corpus 'agentik'" in err.value.message and "'agentic'" in err.value.hint


def test_by_path_and_by_name_are_the_same_corpus():
    assert resolve_corpus("chat") == corpora_dir() / "chat.yaml"
    assert resolve_corpus(str(corpora_dir() / "chat.yaml")) == corpora_dir() / "chat.yaml"


def test_chat_format_of_a_model_without_template_and_of_a_broken_file(tmp_path):
    assert chat_format_from_model(SPM_VOCAB) == PLAIN
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\x00" * 8 + b"\x05" + b"\x00" * 7)
    with pytest.raises(ModelError, match="truncated or corrupt"):
        chat_format_from_model(bad)
    with pytest.raises(ModelError, match="not a GGUF"):
        chat_format_from_model(write(tmp_path / "x.gguf", "hello"))
