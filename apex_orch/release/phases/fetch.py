"""Phase fetch: find or download the source model, the vision projector and the baselines' files.

`run_phase(state, run)` fills `state.source_paths` (GGUF sources: local files, the demo model, or
files from the Hub at a pinned commit) or `state.snapshot_dir` (a safetensors source to convert:
a Hub snapshot or a local checkpoint folder), and the projector's `state.mmproj_src` or
`state.mmproj_snapshot`, and `state.baseline_files` for the baselines that are files (a local path,
or one file of a Hub repo at a pinned commit; release.baselines). With `run` false nothing is
downloaded: the Hugging Face cache must already hold the files, which is how later phases and the
dry run find them. Downloads live in the Hugging Face cache, so a rerun is free and works offline.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Iterable

from apex_orch.core.errors import ConfigError, ModelError, ToolNotFoundError
from apex_orch.core.infiles import check_input
from apex_orch.core.settings import hub_endpoint
from apex_orch.core.translate import translate_hub_download_error
from apex_orch.demo.trained import demo_model_path
from apex_orch.release.config import ConfigPath, HFRef
from apex_orch.release.state import PhaseReport, ReleaseState

# HF snapshot files the converter reads (weights, configs, tokenizer, chat template, params.json).
CONVERT_PATTERNS = ("*.safetensors", "*.json", "tokenizer.model", "*.tiktoken", "*.txt", "*.jinja", "*.py")


def _hf_hub():
    # Imported on first use: huggingface_hub is slow to import and only Hub sources need it.
    try:
        import huggingface_hub
        import huggingface_hub.errors  # noqa: F401  (core.translate reads the Hub's error types from it)
    except ImportError as exc:  # pragma: no cover - declared dependency
        raise ToolNotFoundError(f"huggingface_hub is not installed: {exc}") from exc
    return huggingface_hub


def hf_download(ref: HFRef, *, local_only: bool) -> list[Path]:
    """Each file at the pinned commit (the HF cache makes a rerun free and offline). HF_ENDPOINT is
    passed as a value when set (huggingface_hub reads it only when first imported)."""
    hub = _hf_hub()
    endpoint = {"endpoint": e} if (e := hub_endpoint()) else {}
    return [Path(_from_hub(lambda: hub.hf_hub_download(repo_id=ref.repo, filename=filename, revision=ref.revision,
                                                       local_files_only=local_only, **endpoint),
                           ref, f"{ref.repo}@{ref.revision[:12]}/{filename}",
                           failed_hint="check repo, revision and file name; gated repos need `hf auth login`"))
            for filename in ref.files]


def hf_snapshot(ref: HFRef, *, local_only: bool) -> Path:
    hub = _hf_hub()
    return Path(_from_hub(lambda: hub.snapshot_download(repo_id=ref.repo, revision=ref.revision,
                                                        allow_patterns=list(CONVERT_PATTERNS),
                                                        local_files_only=local_only),
                          ref, f"{ref.repo}@{ref.revision[:12]}",
                          failed_hint="check repo and revision; gated repos need `hf auth login`"))


def _from_hub(download: Callable[[], str], ref: HFRef, label: str, *, failed_hint: str) -> str:
    """Run one huggingface_hub download; its failures become ConfigErrors (core.translate)."""
    try:
        return download()
    except Exception as exc:
        error = translate_hub_download_error(
            exc, label=label, where=ref.where, not_cached=f"{label} is not in the Hugging Face cache",
            not_cached_hint="run the fetch phase with network access", failed_hint=failed_hint)
        if error is None:
            raise
        raise error from exc


def local_ggufs(paths: Iterable[ConfigPath]) -> list[Path]:
    out = []
    for cp in paths:
        p = cp.resolve()
        if not os.path.lexists(p) or p.is_dir():
            raise ConfigError(f"source file not found: {p}", where=cp.where,
                              hint="fix the path, or give a local GGUF in place of the config's source",
                              options=("source",))
        check_input(p, "model")   # a FIFO or device: refused (exit 4), never read
        out.append(p)
    return out


def local_checkpoint(ref: ConfigPath) -> Path:
    p = ref.resolve()
    if not (p / "config.json").is_file():
        raise ConfigError(f"not a Hugging Face checkpoint folder (no config.json): {p}", where=ref.where,
                          hint="point source.convert.path at the folder with config.json and the safetensors")
    return p


def fetch_source(state: ReleaseState, run: bool) -> str:
    src = state.config.source
    if state.source_override is not None:
        p = state.source_override
        if not os.path.lexists(p) or p.is_dir():
            raise ModelError("source file not found", where=str(p), options=("source",),
                             hint="check the path of the GGUF given in place of the config's source")
        check_input(p, "model")
        state.source_paths = [p]
        return f"source {p.name} (given in place of the config's)"
    if src.kind == "demo":
        state.source_paths = [demo_model_path()]
        return "demo model"
    if src.kind == "gguf":
        state.source_paths = local_ggufs(src.paths)
        return "local source"
    if src.kind == "hf":
        state.source_paths = hf_download(src.hf, local_only=not run)
        return f"{len(state.source_paths)} file(s) from {src.hf.repo}"
    if src.checkpoint is not None:
        state.snapshot_dir = local_checkpoint(src.checkpoint)
        return f"local checkpoint {state.snapshot_dir.name}"
    state.snapshot_dir = hf_snapshot(src.hf, local_only=not run)
    return f"snapshot of {src.hf.repo}"


def fetch_mmproj(state: ReleaseState, run: bool) -> str:
    mm, src = state.config.mmproj, state.config.source
    if mm is None:
        return ""
    if mm.kind == "file":
        p = mm.path.resolve()
        if not os.path.lexists(p):
            raise ConfigError(f"mmproj file not found: {p}", where=mm.where)
        check_input(p, "model")   # a FIFO or device refused (exit 4) before it is linked or copied
        state.mmproj_src = p
        return ""
    if mm.kind == "hf":
        state.mmproj_src = hf_download(mm.hf, local_only=not run)[0]
        return f"projector from {mm.hf.repo}"
    if mm.checkpoint is not None:
        state.mmproj_snapshot = local_checkpoint(mm.checkpoint)
        return ""
    if state.source_override is None and src.kind == "convert" and mm.hf == src.hf:
        state.mmproj_snapshot = state.snapshot_dir
        return ""
    state.mmproj_snapshot = hf_snapshot(mm.hf, local_only=not run)
    return f"projector snapshot of {mm.hf.repo}"


def fetch_baselines_local(state: ReleaseState) -> None:
    """The local baseline files, checked as inputs (missing: a ConfigError at their line; a FIFO or
    device: refused, exit 4)."""
    for b in state.config.baselines:
        if b.kind == "file":
            p = b.path.resolve()
            if not os.path.lexists(p) or p.is_dir():
                raise ConfigError(f"baseline {b.label!r}: file not found: {p}", where=b.where,
                                  hint="fix the path in `baselines`, or remove the entry")
            check_input(p, "model")
            state.baseline_files[b.label] = [p]


def fetch_baselines(state: ReleaseState, run: bool) -> str:
    """Local baseline files checked, Hub ones downloaded at their pinned revision (without `run`:
    found in the Hugging Face cache, else a ConfigError)."""
    fetch_baselines_local(state)
    fetched = 0
    for b in state.config.baselines:
        if b.kind == "hf":
            state.baseline_files[b.label] = hf_download(b.hf, local_only=not run)
            fetched += 1
    return f"{fetched} baseline(s) from the Hub" if fetched and run else ""


def run_phase(state: ReleaseState, run: bool) -> PhaseReport:
    did = [d for d in (fetch_source(state, run), fetch_mmproj(state, run), fetch_baselines(state, run)) if d]
    src, mm = state.config.source, state.config.mmproj
    remote = state.source_override is None and src.kind in ("hf", "convert") and src.checkpoint is None or (
        mm is not None and mm.kind != "file" and mm.checkpoint is None) or any(
        b.kind == "hf" for b in state.config.baselines)
    status = ("ran" if remote else "not needed") if run else "resolved"
    return PhaseReport("fetch", status, detail=", ".join(did) + ("" if remote else " (local, nothing to download)"))
