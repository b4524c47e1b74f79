"""apex-orch: APEX quantization of Mixture-of-Experts GGUF models with llama.cpp.

Kept import-light on purpose: `python -m apex_orch.llama.build` runs before any
dependency is installed.
"""

__version__ = "0.1.0"
