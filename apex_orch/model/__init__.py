"""Stage 1, the model: what a GGUF holds, read from its header only.

Takes: a GGUF file (or its split parts).
Gives: ModelInfo (architecture, blocks, experts, every tensor's shape and type; `info`), each
tensor's APEX role (routed/shared expert, attention, SSM, dense FFN, ...; `roles`), the bounded
header walker they rest on (`gguf_header`) and the human summary `apex-orch inspect` prints
(`describe`).
"""
