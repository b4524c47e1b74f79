"""Calibration: the text corpora and the importance matrices the I-tiers quantize with.

Takes: corpus definitions (YAML: built-in samples, local files, pinned Hub files) and a model.
Gives: one deterministic calibration text per corpus (`corpus`, rendered with the model's own
chat template in a sandbox: `chat_template`) and a cached, checked importance matrix computed
by llama-imatrix (`imatrix`).
"""
