"""Phase card: the model card (README.md) and one LocalAI gallery entry per tier.

`run_phase(state, run)` renders both from the same facts (release.card.facts_from_release) and
writes only what changed, so a rerun touches nothing; an entry for a tier the config no longer
lists is removed. It needs every tier's file. With `run` false it writes nothing, but when the
publish phase will upload (`state.push`) the card on disk must be exactly the current render:
a stale card is never published.
"""

from __future__ import annotations

from apex_orch.core.errors import PublishError
from apex_orch.core.infiles import holds
from apex_orch.core.outputs import atomic_write_text
from apex_orch.core.safefiles import safe_mkdir
from apex_orch.release import card, localai
from apex_orch.release.state import CARD_NAME, LOCALAI_DIR, PhaseReport, ReleaseState


def run_phase(state: ReleaseState, run: bool) -> PhaseReport:
    state.require_all_files("card")
    facts = card.facts_from_release(state)
    text = card.render_card(facts)
    entries = localai.render_entries(facts)
    if not run:
        card_path = state.out_dir / CARD_NAME
        if state.push and not holds(card_path, text):
            raise PublishError(f"{card_path} is missing or out of date, so it cannot be published",
                               hint="run the card phase first", options=("only", "skip", "from_phase"))
        return PhaseReport("card", "resolved")
    changed = 0
    targets = {state.out_dir / CARD_NAME: text}
    targets.update({state.out_dir / LOCALAI_DIR / name: body for name, body in entries.items()})
    safe_mkdir(state.out_dir / LOCALAI_DIR)   # never a link to a folder elsewhere
    for path, body in targets.items():
        if holds(path, body):
            continue
        atomic_write_text(path, body)
        changed += 1
    stale = [p for p in (state.out_dir / LOCALAI_DIR).glob("*.yaml") if p not in targets]
    for p in stale:   # an entry for a tier the config no longer lists
        p.unlink()
        changed += 1
    return PhaseReport("card", "ran" if changed else "up to date",
                       detail=f"{CARD_NAME} + {len(entries)} LocalAI entries" + ("" if changed else " unchanged"))
