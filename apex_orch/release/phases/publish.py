"""Phase publish: upload the release folder to its Hub repo, only with --push.

`run_phase(state, run)` is a thin step over apex_orch.release.publish, which knows nothing of the
release: this phase hands it a PublishRequest of plain values (the repo, the commit's words, the
files the tiers' and projector's manifests record, the calibration files their record lists unless
the run opts out, the card, its plot and the LocalAI entries). Baselines are never uploaded. Publish plans
the upload (hashing every file it sends), talks to the Hub (its client is made there, from the
user's token) and records what was pushed in the work folder. Without `run` and `state.push` it
only says where --push would upload.
"""

from __future__ import annotations

from apex_orch.release import publish
from apex_orch.release.state import CALIBRATION_DIR, CARD_NAME, LOCALAI_DIR, PhaseReport, ReleaseState


def publish_request(state: ReleaseState) -> publish.PublishRequest:
    cfg, out = state.config, state.out_dir
    firsts = [state.files[job.profile.tier][0] for job in state.jobs] + state.mtp_files[:1]
    if state.mmproj is not None:
        firsts.append(state.mmproj)
    calibration = []
    if state.calibration_upload and state.calibration:
        folder = out / CALIBRATION_DIR
        calibration = [publish.RecordedFile(f"{CALIBRATION_DIR}/{r['name']}", folder / r["name"], int(r["size"]),
                                            r["sha256"]) for r in state.calibration["files"]]
    return publish.PublishRequest(
        repo_id=cfg.publish.repo, private=cfg.publish.private, model_name=cfg.name, tier_count=len(cfg.tiers),
        config_label=cfg.display_path(), release_dir=out, calibration=calibration,
        recorded=[rec for first in firsts for rec in publish.recorded_files(first)],
        card_files=[out / CARD_NAME] + ([state.plot] if state.plot is not None else [])
        + sorted((out / LOCALAI_DIR).glob("*.yaml")))


def run_phase(state: ReleaseState, run: bool) -> PhaseReport:
    if not (run and state.push):
        return PhaseReport("publish", "skipped", detail=f"local release only; not pushed to "
                                                        f"{state.config.publish.repo}")
    state.require_all_files("publish")
    plan = publish.plan_publish(publish_request(state))
    result = publish.execute_publish(plan, progress=state.progress)
    publish.write_record(state.work, plan, result)
    return PhaseReport("publish", "ran" if result.uploaded else "up to date", detail=result.message)
