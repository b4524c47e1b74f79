"""Stage 3, quantize: run llama-quantize for a plan and prove the file is what was planned.

Takes: a Plan, the source GGUF and (for I-tiers) an importance matrix.
Gives: a verified GGUF (every tensor's type and size read back and compared with the plan) with
its manifest, or nothing under the final name. `job` describes one output, `toolcheck`
compares the plan with the tool's own `--dry-run` before anything is written, `run` drives the
tool, `verify` reads the result back.
"""
