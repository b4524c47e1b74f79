"""Stage 2, the plan: a YAML profile becomes one quantization type per tensor.

Takes: ModelInfo and a profile (built-in, user folder or file; `profiles`).
Gives: a Plan (every tensor's type and byte size, exactly what the pinned llama-quantize will
write: `llama_rules` ports its type rules, fallbacks and mixtures included; `planner`), the
`--tensor-type` rules that make the tool write it (`render`), the text `apex-orch plan` prints
(`report`) and profiles imported from other tools' rule lists (`profile_import`).
"""
