"""A small trained Mixture-of-Experts reference model (mistral4 architecture) for benchmarks.

Entry point: `python -m bench.reference_model.train` (see README.md in this folder).
Needs the optional `bench` extra (torch); nothing in `apex_orch` imports this package.
"""
