"""`apex-orch build`: build the pinned llama.cpp (and the bindings) without the Makefile.

The same code `make llama` / `make bindings` run (apex_orch.llama.build), for users who installed
apex-orch with pip/pipx and have no checkout.
"""

from __future__ import annotations

import click

from apex_orch.cli.errors import UsageError
from apex_orch.cli.options import quiet_option
from apex_orch.llama import build as build_lib
from apex_orch.llama import pin


@click.command("build")
@click.argument("what", type=click.Choice(["all", "llama", "bindings"]), default="all")
@click.option("--cmake-arg", "cmake_args", multiple=True, metavar="-DNAME=VALUE",
              help="Extra CMake flag for your own build (repeatable), e.g. -DGGML_CUDA=ON. "
                   "Default: $LLAMA_CMAKE_ARGS. Each set of flags gets its own build folder "
                   "and becomes the build apex-orch uses.")
@quiet_option
def build(what: str, cmake_args: tuple[str, ...], quiet: bool) -> None:
    """Download the pinned llama.cpp (llama-cpp-python sdist, sha256-checked), build
    llama-quantize/imatrix/perplexity/gguf-split once into the cache, and install the
    bindings against the same libllama. Reruns are no-ops when nothing changed."""
    try:
        extra = (pin.parse_extra_cmake_args(" ".join(cmake_args)) if cmake_args
                 else build_lib.extra_cmake_args_from_env())
    except ValueError as exc:
        raise UsageError(str(exc), hint="give flags as -DNAME=VALUE, e.g. --cmake-arg -DGGML_CUDA=ON") from exc
    build_lib.build(what, extra, quiet=quiet)   # a failure is a BuildError (exit 8), printed like every error
