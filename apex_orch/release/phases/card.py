"""Phase card: the model card (README.md), one LocalAI gallery entry per tier, and the plot.

`run_phase(state, run)` renders all from the same facts (release.card.facts_from_release) and
writes only what changed, so a rerun touches nothing; an entry for a tier the config no longer
lists is removed. The plot (`kld-vs-size.png`: mean KLD against file size, tiers and baselines)
is written when the files have KL numbers and matplotlib (the `plot` extra) is installed; the card
references it only then. It needs every tier's file, and the calibration files when the release
publishes them. With `run` false it writes nothing, but when the publish phase will upload
(`state.push`) the card and plot on disk must be exactly the current render: a stale card is never
published.
"""

from __future__ import annotations

from apex_orch.core.errors import ModelError, PublishError
from apex_orch.core.infiles import holds
from apex_orch.core.safefiles import safe_mkdir, write_atomic
from apex_orch.release import card, localai
from apex_orch.release.state import CALIBRATION_DIR, CARD_NAME, LOCALAI_DIR, PLOT_NAME, PhaseReport, ReleaseState


def run_phase(state: ReleaseState, run: bool) -> PhaseReport:
    state.require_all_files("card")
    if state.calibration_upload and state.config.imatrix is not None and state.calibration is None:
        raise ModelError("the calibration files to publish are not in the release folder "
                         f"({CALIBRATION_DIR}/: the imatrix, its calibration text and manifest)",
                         hint="run the imatrix phase (it writes them), or opt out of publishing them",
                         options=("only", "skip", "from_phase", "calibration_upload"))
    facts = card.facts_from_release(state)
    text = card.render_card(facts)
    entries = localai.render_entries(facts)
    plot = card.render_plot(facts) if facts.plot else None
    state.plot = state.out_dir / PLOT_NAME if plot is not None else None
    if not run:
        card_path = state.out_dir / CARD_NAME
        stale = [p for p, body in ((card_path, text), (state.out_dir / PLOT_NAME, plot))
                 if body is not None and not holds(p, body)]
        if state.push and stale:
            raise PublishError(f"{stale[0]} is missing or out of date, so it cannot be published",
                               hint="run the card phase first", options=("only", "skip", "from_phase"))
        return PhaseReport("card", "resolved")
    changed = 0
    targets: dict = {state.out_dir / CARD_NAME: text}
    if plot is not None:
        targets[state.out_dir / PLOT_NAME] = plot
    targets.update({state.out_dir / LOCALAI_DIR / name: body for name, body in entries.items()})
    safe_mkdir(state.out_dir / LOCALAI_DIR)   # never a link to a folder elsewhere
    for path, body in targets.items():
        if holds(path, body):
            continue
        write_atomic(path, body)   # text or the plot's bytes: a temporary, renamed whole
        changed += 1
    stale = [p for p in (state.out_dir / LOCALAI_DIR).glob("*.yaml") if p not in targets]
    for p in stale:   # an entry for a tier the config no longer lists
        p.unlink()
        changed += 1
    return PhaseReport("card", "ran" if changed else "up to date",
                       detail=f"{CARD_NAME} + {len(entries)} LocalAI entries" + (f" + {PLOT_NAME}" if plot else "")
                       + ("" if changed else " unchanged"))
