"""LocalAI gallery entries: one YAML per released file, ready to append to a gallery index.

Each entry is a one-item list in the shape of LocalAI's `gallery/index.yaml` entries: a
name, the repo URLs, license, tags, `overrides` (the model file, the projector for a vision
model, and for a model with an MTP head the llama-cpp backend's `spec_type:draft-mtp` option, with
`draft_model` naming the draft file when the head is published as one) and `files` (file name,
sha256, `huggingface://` URI) so LocalAI downloads and verifies exactly the published bytes. A split
file lists every part. Written from the same facts as the card (card.CardFacts), so both always agree.
"""

from __future__ import annotations

import re

import yaml

from apex_orch.release.card import CardFacts, FileFacts, TierFacts
from apex_orch.release.card_mtp import localai_mtp

BASE_CONFIG_URL = "github:mudler/LocalAI/gallery/virtual.yaml@master"


def entry_name(file_name: str) -> str:
    stem = file_name[:-5] if file_name.endswith(".gguf") else file_name
    stem = re.sub(r"-\d{5}-of-\d{5}$", "", stem)
    return re.sub(r"[^a-z0-9.-]+", "-", stem.lower()).strip("-")


def _files(repo: str, f: FileFacts) -> list[dict]:
    return [{"filename": name, "sha256": sha, "uri": f"huggingface://{repo}/{name}"}
            for name, sha in zip(f.names, f.sha256)]


def entry(facts: CardFacts, tier: TierFacts) -> dict:
    urls = [f"https://huggingface.co/{facts.repo}"]
    if facts.base_model:
        urls.append(f"https://huggingface.co/{facts.base_model}")
    description = (f"{facts.name} quantized with APEX, tier {tier.tier} ({tier.best_for}); "
                   f"{tier.bpw:.2f} bits per weight{', imatrix-calibrated' if tier.imatrix else ''}.")
    if facts.description:
        description += " " + facts.description
    overrides: dict = {"parameters": {"model": tier.file.name}}
    files = _files(facts.repo, tier.file)
    tags = ["llm", "gguf", "moe", "apex", "cpu", "gpu"]
    if facts.mmproj is not None:
        overrides["mmproj"] = facts.mmproj.file.name
        files += _files(facts.repo, facts.mmproj.file)
        tags.append("multimodal")
    mtp_overrides, mtp_tags = localai_mtp(facts.mtp)   # speculative decoding with the MTP head
    overrides.update(mtp_overrides)
    tags += mtp_tags
    if facts.mtp is not None and facts.mtp.draft is not None:
        files += _files(facts.repo, facts.mtp.draft)
    return {"name": entry_name(tier.file.name), "url": BASE_CONFIG_URL, "urls": urls, "license": facts.license,
            "tags": tags, "description": description, "overrides": overrides, "files": files}


def render_entries(facts: CardFacts) -> dict[str, str]:
    """{file name under localai/: YAML text}, one per tier."""
    out = {}
    for t in facts.tiers:
        body = yaml.safe_dump([entry(facts, t)], sort_keys=False, allow_unicode=True, width=100)
        out[f"{entry_name(t.file.name)}.yaml"] = body
    return out
