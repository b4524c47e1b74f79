"""A release that starts from a local Hugging Face checkpoint folder, offline.

The tiny Mistral-Small-4 + Pixtral checkpoint of the matrix (tests/archs/archkit.py) is the
source: the release's convert phase runs the pinned converter on the folder for the text model and
its --mmproj path for the projector; the tiers are planned from the converted GGUF only, so the
projector ships exactly as the converter wrote it, and the card lists it.
"""

from __future__ import annotations

import hashlib

import pytest
import yaml
from click.testing import CliRunner

from apex_orch.cli import main

pytestmark = [pytest.mark.slow, pytest.mark.requires_tools("llama-quantize", "llama-imatrix")]

NAME = "Tiny-Mistral-Small-4"


def sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_release_from_a_local_checkpoint_with_its_projector(converted, tmp_path, monkeypatch):
    b = converted["mistral-small-4"]
    if isinstance(b, str):
        pytest.fail(b)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    cfg = tmp_path / "release.yaml"
    cfg.write_text(yaml.safe_dump({
        "name": NAME, "license": "apache-2.0", "tags": ["mistral4", "vision"],
        "source": {"convert": {"path": str(b.checkpoint), "outtype": "f16"}},
        "tiers": ["compact", "i-compact"],
        "imatrix": {"corpus": "agentic", "ctx": 128, "chunks": 2},
        "eval": {"enabled": False},
        "mmproj": {"convert": {"outtype": "f16"}, "name": "mmproj.gguf"},
        "publish": {"repo": "apex-test/Tiny-Mistral-Small-4-APEX-GGUF"}}, sort_keys=False))
    out = tmp_path / "out"
    r = CliRunner().invoke(main, ["release", str(cfg), "--out-dir", str(out), "-j", "1"])
    assert r.exit_code == 0, r.output[-3000:]
    assert (out / f"{NAME}-APEX-Compact.gguf").is_file() and (out / f"{NAME}-APEX-I-Compact.gguf").is_file()
    # the projector: written by the converter's --mmproj from the folder, never touched by a profile
    assert sha(out / "mmproj.gguf") == sha(b.mmproj)
    card = (out / "README.md").read_text()
    assert "| mmproj.gguf | Vision projector |" in card
    # a rerun converts nothing (the manifests are keyed by the folder's content)
    again = CliRunner().invoke(main, ["release", str(cfg), "--out-dir", str(out), "-j", "1"])
    assert again.exit_code == 0, again.output[-3000:]
    assert any(line.split()[:2] == ["convert", "up"] for line in again.output.splitlines()), again.output
