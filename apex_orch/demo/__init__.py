"""Demo and test models the project writes itself (no download): tiny GGUFs of real MoE layouts.

Gives: synthetic checkpoints (the demo model, a Mistral-Small-4 replica with the flagship's real
shapes and empty data) that the CLI's `--demo`, the tests and the benchmarks run on; and the
mistral4 MoE in numpy (`npmodel`, forward and backward; `nptrain`, its seeded training; `npmath`,
the exact numerics that make a training run the same bits on every machine), so a small model can
be trained without torch.
"""
