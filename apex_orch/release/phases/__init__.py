"""The release's seven phases, one module each, all with one signature:
`run_phase(state: ReleaseState, run: bool) -> PhaseReport` (release.runner maps names to them)."""
