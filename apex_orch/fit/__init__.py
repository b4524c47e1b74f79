"""Fit: APEX tiers at any size from measured sensitivity.

groups (what a profile line can type, exact bytes per type) -> sensitivity (each group alone at
each type, KLD against the source; spliced files, cached) -> solver (types per group and block
under a byte budget, APEX structure as constraints) -> fitter (an ordinary profile YAML, planned
again and checked). Sits above evaluation (it measures) and below release (`fit:` tiers).
"""
