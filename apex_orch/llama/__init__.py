"""The pinned llama.cpp: how it is fetched and built, found, run and read back.

Takes: the pin (one llama-cpp-python sdist, whose vendored llama.cpp is the source of truth).
Gives: `build` (the tools and the bindings, standard library only), `tools` (tool discovery
and the one subprocess runner every stage uses), `bindings` (the llama_cpp module, loaded
against the same libllama) and `quantlog` (llama-quantize's per-tensor records parsed).
"""
