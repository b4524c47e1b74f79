"""Where apex-orch lives and what the environment tells it: the one module that reads it.

Standard library only: `python -m apex_orch.llama.build` imports it before any dependency
is installed.
"""

from __future__ import annotations

from pathlib import Path

# The installed package (apex_orch/); in a checkout its parent is the project root.
PACKAGE_DIR = Path(__file__).resolve().parents[1]
