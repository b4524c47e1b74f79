"""The card's MTP section and the LocalAI entries' MTP settings: facts and their wording.

`mtp_facts(state, tiers)` reads what the release's `mtp:` mode put where (release.mtp): the head's
types and bytes in every tier (their verified plans) and, with `mtp: draft`, the draft file (its
manifest). `mtp_context(facts)` formats them for the template's `mtp_usage` block: which mode, the
head's type in every file, and the pinned llama.cpp's command that drafts with it (the flags
apex-orch's own `speculate` passes, evaluation.speculative.mtp_flags). With the eval phase's
speculative records (release.speculative), the section also shows each tier's drafting: drafted and
accepted tokens, the acceptance rate, tokens/s with and without the head and their ratio, saying
whose machine and build the speeds are. `localai_options(facts)` is the same for a LocalAI entry
(its llama-cpp backend's `spec_type` option and `draft_model`).

Kept apart from release.card (which builds CardFacts and renders the card) so the card module
stays one concern; nothing here imports it back.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from typing import Any

from apex_orch.core.text import hub_size, md_code, md_table
from apex_orch.evaluation.speculative import DEFAULT_DRAFT_MAX, mtp_flags

NOT_CALIBRATED = ("The head is not imatrix-calibrated: llama-imatrix never runs the MTP layers, so it keeps a type "
                  "that needs no importance data.")


@dataclass(frozen=True)
class DraftingFacts:
    """One tier's MTP drafting as the eval phase measured it (release.speculative's record)."""
    file: str
    drafted: int
    accepted: int
    tokens_per_s_with: float | None      # decode tokens/s with the head drafting (None: too short to time)
    tokens_per_s_without: float | None   # ... without speculation
    speed_ratio: float | None            # with / without
    n_predict: int
    draft_max: int
    threads: int
    build: str                           # the llama.cpp build that measured it

    @property
    def acceptance(self) -> float:
        return self.accepted / self.drafted


@dataclass(frozen=True)
class MtpFacts:
    mode: str                                        # bundled | draft | none
    layers: int                                      # MTP layers of the model (0: none known)
    heads: tuple[tuple[str, str, int], ...]          # per tier file: (name, "Q8_0 ×14" or "", head bytes)
    draft: Any = None                                # card.FileFacts of the draft file (mtp: draft)
    draft_types: str = ""                            # "Q8_0 ×16": every quantized tensor of the draft
    draft_max: int = DEFAULT_DRAFT_MAX
    drafting: tuple[DraftingFacts, ...] = ()         # per tier measured (eval.speculative), in tier order


def _types(counts: dict[str, int]) -> str:
    return ", ".join(f"{t} ×{n}" for t, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def _head(plan, whole: bool = False) -> tuple[str, int]:
    """The MTP head's types and bytes in a plan (`whole`: every quantized tensor: a draft file)."""
    counts: dict[str, int] = {}
    size = 0
    for t in plan.tensors:
        if t.role.value == "nextn" or (whole and t.quantizable):
            counts[t.final_type.name] = counts.get(t.final_type.name, 0) + 1
            size += t.n_bytes
    return _types(counts), size


def mtp_facts(state, tiers, draft_facts) -> MtpFacts | None:
    """From a release.state.ReleaseState after its phases and its card.TierFacts; `draft_facts`
    reads a file's manifest (card._manifest_files). None when the config says nothing of MTP and
    the files carry no head (the card then has no MTP section)."""
    cfg = state.config.mtp
    heads = tuple((t.file.name, *_head(job.plan)) for t, job in zip(tiers, state.jobs))
    bundled = any(types for _, types, _ in heads)
    if cfg is None and not bundled:
        return None
    mode = cfg.mode if cfg is not None else "bundled"
    draft = draft_types = None
    layers = state.model.nextn_layers
    if state.mtp_job is not None and state.mtp_files:
        draft = draft_facts(state.mtp_files[0])
        draft_types = _head(state.mtp_job.plan, whole=True)[0]
        layers = state.mtp_job.model.nextn_layers
    return MtpFacts(mode, layers, heads, draft, draft_types or "", drafting=drafting_facts(state))


def drafting_facts(state) -> tuple[DraftingFacts, ...]:
    """The eval phase's speculative records (state.speculative), in tier order."""
    out = []
    for job in state.jobs:
        r = state.speculative.get(job.profile.tier)
        if r is None:
            continue
        s = r["summary"]
        out.append(DraftingFacts(r["file"], s["drafted"], s["accepted"], s["tokens_per_s_with"],
                                 s["tokens_per_s_without"], s["speed_ratio"], s["n_predict"], s["draft_max"],
                                 s["threads"], r["llama_cpp"]))
    return tuple(out)


def _rate(x: float | None, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def drafting_row(d: DraftingFacts) -> list[str]:
    """A tier's row: drafted, accepted, acceptance (as `apex-orch speculate` prints it), tokens/s
    with and without the head, and their ratio."""
    ratio = "-" if d.speed_ratio is None else f"{d.speed_ratio:.3f}×"
    return [d.file, str(d.drafted), str(d.accepted), f"{100 * d.acceptance:.1f}%", _rate(d.tokens_per_s_with, ".2f"),
            _rate(d.tokens_per_s_without, ".2f"), ratio]


def _drafting_context(f: MtpFacts) -> dict | None:
    if not f.drafting:
        return None
    def distinct(values) -> str:
        return " / ".join(dict.fromkeys(str(v) for v in values))
    d = f.drafting
    intro = (f"Measured when these files were made: greedy generation of {distinct(x.n_predict for x in d)} tokens "
             f"from a fixed prompt with the head drafting up to {distinct(x.draft_max for x in d)} tokens a step, "
             "then the same generation without speculation; both printed the same tokens. Acceptance is the share "
             "of drafted tokens the model kept. The speeds are the release machine's (llama.cpp build "
             f"`{md_code(distinct(x.build for x in d))}`, {distinct(x.threads for x in d)} threads), not yours: "
             "`apex-orch speculate FILE` measures them on your hardware.")
    table = md_table(["File", "Drafted", "Accepted", "Acceptance", "Tokens/s with head", "Tokens/s without",
                      "Ratio"], [drafting_row(x) for x in d])
    return {"intro": intro, "table": "\n".join(table)}


def _command(tier: str, f: MtpFacts) -> str:
    draft = f.draft.name if f.mode == "draft" and f.draft is not None else None
    return shlex.join(["llama-server", "-m", tier, *mtp_flags(f.draft_max, draft)])


def mtp_context(f: MtpFacts | None, recommended: str) -> dict | None:
    """What the template's mtp_usage block shows (None: no section)."""
    if f is None:
        return None
    layers = f"{f.layers} layer{'s' if f.layers != 1 else ''}"
    rows = [[name, f"{types} ({hub_size(size)})" if types else "none"] for name, types, size in f.heads]
    if f.mode == "draft" and f.draft is not None:
        rows.insert(0, [f.draft.name, f"{f.draft_types} ({hub_size(f.draft.size)}, the draft file)"])
    if f.mode == "bundled":
        lead = (f"Every file carries the model's multi-token-prediction (MTP) head ({layers}): llama.cpp drafts "
                "tokens with it for speculative decoding (`--spec-type draft-mtp`), no separate draft model needed.")
    elif f.mode == "draft":
        lead = (f"The tiers carry no MTP head; the model's multi-token-prediction head ({layers}) is published once "
                f"as a separate draft file, `{md_code(f.draft.name if f.draft else '')}`, which llama.cpp loads beside "
                "any tier for speculative decoding (`-md`, `--spec-type draft-mtp`).")
    else:
        lead = ("These files carry no multi-token-prediction (MTP) head (`mtp: none`): llama.cpp cannot draft with "
                "one, and they are as small as the model allows.")
    out = {"mode": f.mode, "lead": lead, "table": "\n".join(md_table(["File", "MTP head"], rows)),
           "calibration": NOT_CALIBRATED if f.mode != "none" else None, "command": None, "after": None,
           "drafting": _drafting_context(f)}
    if f.mode != "none":
        out["command"] = _command(recommended, f)
        out["after"] = (f"Greedy output is the same with and without the head; drafting {f.draft_max} tokens a step "
                        "(`--spec-draft-n-max`), generation is faster when the model accepts enough of them. "
                        "`llama-cli` takes the same flags.")
    return out


def localai_mtp(f: MtpFacts | None) -> tuple[dict, list[str]]:
    """(overrides to add, tags to add) for a LocalAI entry: the llama-cpp backend's `spec_type`
    option, and with a draft file its `draft_model`."""
    if f is None or f.mode == "none":
        return {}, []
    overrides: dict = {"options": ["spec_type:draft-mtp"]}
    if f.mode == "draft" and f.draft is not None:
        overrides["draft_model"] = f.draft.name
    return overrides, ["mtp"]
