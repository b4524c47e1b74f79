"""Stage 4, evaluate: how far a quantized file moved from its source.

Takes: a quantized GGUF, its base (the source) and an evaluation text.
Gives: llama-perplexity's statistics (PPL, KL divergence mean / percentiles / max, same top p)
computed through the bindings against one cached set of base log-probabilities
(`base_cache`), or by the tool itself; quality gates; tables and Pareto plots comparing files
(`compare`, `plot`), with baselines held against them (`baselines`).

Read in this order: `inputs` (settings, model and text facts), `evaluate` (plan and run),
`session` (the bindings), `statistics` (the tool's formulas), `tool_backend` (the binary),
`results`, `gates`, `base_cache`, `compare`, `baselines`, `plot`.
"""
