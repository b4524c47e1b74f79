"""Phase convert: the GGUF the tiers are made from, and the projector in the release folder.

`run_phase(state, run)` sets `state.model_path` and `state.model` (a GGUF source as fetched, or a
safetensors source converted by the pinned `convert_hf_to_gguf.py` into the work folder) and
`state.mmproj` (the projector converted with `--mmproj`, or included as is). The config's `mtp:` mode
decides the converter's MTP flag (release.mtp: checked against the checkpoint before it runs and
against the GGUF after); with `mtp: draft` the head is converted a second time on its own (`--mtp`)
into `state.mtp_source`, or taken from `mtp.file`. Each output carries a
manifest keyed by its inputs (the repo and revision, or a local checkpoint's content; the outtype;
the converter's build), so a rerun converts nothing. With `run` false it only finds those outputs.
Once the source is known, every baseline file is checked to be a quantization of it
(release.baselines.check_baselines: the same architecture, tensor names and shapes).
The converter writes into a temporary name that is checked as a GGUF before the rename, so a torn
output is never mistaken for a finished one.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path
from typing import Callable

from apex_orch.core.errors import ConfigError, ModelError, ToolNotFoundError
from apex_orch.core.fingerprint import file_record, sha256_bytes, source_sha256
from apex_orch.core.manifest import inputs_key, manifest_path, up_to_date, write_manifest
from apex_orch.core.outputs import OutputGuard
from apex_orch.llama import pin
from apex_orch.llama.tools import build_label, run_tool
from apex_orch.model.gguf_header import read_header
from apex_orch.core.infiles import check_input
from apex_orch.model.info import read_model
from apex_orch.release import mtp
from apex_orch.release.baselines import check_baselines
from apex_orch.release.state import PhaseReport, Progress, ReleaseState


def converter_script() -> Path:
    return pin.llama_source() / "convert_hf_to_gguf.py"


def convert_argv(snapshot: Path | str, outfile: Path | str, outtype: str, *, mmproj: bool = False,
                 mistral_format: bool = False, name: str | None = None, mtp_flag: str | None = None) -> list[str]:
    """The pinned converter, run by this virtualenv's Python (it has gguf/numpy/torch); `mtp_flag`:
    --mtp (only the MTP head) or --no-mtp (without it)."""
    argv = [sys.executable, str(converter_script()), str(snapshot), "--outfile", str(outfile),
            "--outtype", outtype]
    if mmproj:
        argv.append("--mmproj")
    if mtp_flag:
        argv.append(mtp_flag)
    if mistral_format:
        argv.append("--mistral-format")
    if name and not mmproj:
        argv += ["--model-name", name]
    return argv


def converted_path(state: ReleaseState) -> Path:
    """Where a safetensors source is converted to (the work folder: never published)."""
    src = state.config.source
    return state.work / "source" / f"{state.config.name}-{src.outtype.upper()}.gguf"


def converted_draft_path(state: ReleaseState) -> Path:
    """Where `mtp: draft` converts the head alone to (--mtp; the work folder: it is quantized first)."""
    return converted_path(state).with_name("mtp-" + converted_path(state).name)


def checkpoint_fingerprint(folder: Path) -> str:
    """The content of a local checkpoint folder (every regular file's name and sha256; the
    converter reads config, weights and tokenizer files from it): a changed file reconverts."""
    rows = [f"{f.relative_to(folder).as_posix()} {source_sha256(f)}" for f in sorted(folder.rglob("*"))
            if f.is_file() and not f.is_symlink() and not any(part.startswith(".") for part in
                                                                  f.relative_to(folder).parts)]
    return sha256_bytes("\n".join(rows).encode())


def _run_converter(argv_for: Callable[[Path], list[str]], final: Path, inputs: dict, what: str,
                   progress: Progress) -> bool:
    """Run the converter into a temporary name beside `final`; manifest, then rename. False when up to date."""
    key = inputs_key(inputs)
    if final.exists() and up_to_date([final], key)[0]:
        return False
    with OutputGuard(final, force=True) as guard:
        tmp = guard.temp_for(final)
        tmp = tmp.with_name(tmp.name + ".gguf")  # the converter wants a .gguf name
        guard.adopt(tmp, final)
        argv = argv_for(tmp)
        progress(f"convert: {what} -> {final.name}")
        t0 = time.monotonic()
        if not converter_script().is_file():
            raise ToolNotFoundError(f"converter not found: {converter_script()}",
                                    hint=f"run `{pin.setup_command()}` to unpack the pinned llama.cpp source")
        run_tool(argv, log_path=final.with_name(final.name + ".log"), what=f"convert_hf_to_gguf ({what})")
        if not tmp.is_file():
            raise ModelError(f"the converter exited 0 but wrote no {tmp.name}",
                             hint=f"see {final.name}.log beside it")
        read_header(tmp)   # a torn or non-GGUF output is an error now, not at quantize time
        guard.commit()
        write_manifest(manifest_path(final), {
            "kind": f"apex-orch convert ({what})", "inputs": inputs, "inputs_key": key, "command": argv,
            "llama_cpp": build_label(),
            "files": [file_record(final)],
            "timings": {"seconds": round(time.monotonic() - t0, 3)}})
    return True


def _include_as_is(src: Path, final: Path, progress: Progress) -> bool:
    """Copy (hard-link when possible) the projector into the release folder, with a manifest."""
    inputs = {"mmproj_source_sha256": source_sha256(src), "mode": "as is"}
    key = inputs_key(inputs)
    if final.exists() and up_to_date([final], key)[0]:
        return False
    with OutputGuard(final, force=True) as guard:
        tmp = guard.temp_for(final)
        try:
            os.link(os.path.realpath(src), tmp)
        except OSError:
            shutil.copyfile(src, tmp)
        guard.commit()
    write_manifest(manifest_path(final), {
        "kind": "apex-orch mmproj (included as is)", "inputs": inputs, "inputs_key": key,
        "source_name": src.name,
        "files": [file_record(final)]})
    progress(f"convert: projector {src.name} included as is -> {final.name}")
    return True


def check_projector(path: Path) -> dict:
    """An mmproj must be a GGUF vision projector (general.architecture clip)."""
    hdr = read_header(path)
    arch = hdr.kv.get("general.architecture")
    if arch != "clip":
        raise ModelError(f"{path.name} is not a vision projector (general.architecture = {arch!r}, expected 'clip')",
                         where=str(path), hint="point mmproj at the projector GGUF (mmproj-*.gguf)")
    return hdr.kv


def _convert_one(state: ReleaseState, run: bool, final: Path, flag: str | None, what: str,
                 required: bool = True) -> str:
    cfg = state.config
    origin = {"checkpoint_sha256": checkpoint_fingerprint(state.snapshot_dir)} \
        if cfg.source.checkpoint is not None else {"repo": cfg.source.hf.repo, "revision": cfg.source.hf.revision}
    inputs = {**origin, "outtype": cfg.source.outtype, "mistral_format": cfg.source.mistral_format,
              "converter": build_label(), **({"mtp": flag} if flag else {})}
    if run:
        final.parent.mkdir(parents=True, exist_ok=True)
        wrote = _run_converter(lambda tmp: convert_argv(state.snapshot_dir, tmp, cfg.source.outtype,
                                                        mistral_format=cfg.source.mistral_format, name=cfg.name,
                                                        mtp_flag=flag),
                               final, inputs, what, state.progress)
        state.converted_now = state.converted_now or wrote
        return ("converted " if wrote else "up to date: ") + final.name
    if required and not final.is_file():
        raise ModelError(f"the converted source {final} does not exist yet",
                         hint="run the convert phase first", options=("only", "skip", "from_phase"))
    return ""


def convert_source(state: ReleaseState, run: bool) -> str:
    cfg = state.config
    did = []
    state.mtp_source = None
    if state.snapshot_dir is not None:
        head = mtp.checkpoint_head(state.snapshot_dir)
        mtp.check_checkpoint(cfg.mtp, head)   # before the converter runs
        did.append(_convert_one(state, run, converted_path(state), mtp.converter_flag(cfg.mtp, head), "model"))
        state.model_path = converted_path(state)
        if cfg.mtp is not None and cfg.mtp.mode == "draft" and cfg.mtp.file is None:
            # converted right after the model; when only resolving, a missing draft is the quantize
            # and card phases' to report (state.require_all_files)
            did.append(_convert_one(state, run, converted_draft_path(state), "--mtp", "MTP head", required=False))
            state.mtp_source = converted_draft_path(state) if converted_draft_path(state).is_file() else None
    else:
        state.model_path = state.source_paths[0]
    state.model = read_model(state.model_path)
    mtp.check_model(cfg.mtp, state.model)
    if cfg.mtp is not None and cfg.mtp.mode == "draft":
        if cfg.mtp.file is not None:
            state.mtp_source = cfg.mtp.file.resolve()
            check_input(state.mtp_source, "model")   # a FIFO or device: refused, never read
        if state.mtp_source is None and state.snapshot_dir is None:   # a GGUF given in place of the source
            raise ConfigError("mtp: draft, but the source given in place of the config's is a GGUF: the head "
                                  "cannot be converted from it", where=cfg.mtp.where,
                                  hint="give the draft as `mtp.file`, or run without a source of your own",
                                  options=("source",))
        if state.mtp_source is not None:
            mtp.check_draft(state.model, state.mtp_source)
    if len(state.source_paths) > 1 and [Path(os.path.abspath(p)) for p in state.model.paths] != \
            [Path(os.path.abspath(p)) for p in state.source_paths]:
        raise ModelError(f"the source lists {len(state.source_paths)} files but they are not the shards of one "
                         f"split model in order (its shards: {', '.join(p.name for p in state.model.paths)})",
                         where=state.config.source.where, hint="list every shard, first to last, or only the first")
    return "; ".join(d for d in did if d)


def convert_mmproj(state: ReleaseState, run: bool) -> str:
    mm = state.config.mmproj
    if mm is None:
        return ""
    final = state.out_dir / mm.name
    did = ""
    if run:
        state.out_dir.mkdir(parents=True, exist_ok=True)
        if mm.kind == "convert":
            origin = {"checkpoint_sha256": checkpoint_fingerprint(state.mmproj_snapshot)} if mm.checkpoint is not None \
                else {"repo": mm.hf.repo, "revision": mm.hf.revision}
            inputs = {**origin, "outtype": mm.outtype, "mmproj": True,
                      "mistral_format": mm.mistral_format, "converter": build_label()}
            wrote = _run_converter(lambda tmp: convert_argv(state.mmproj_snapshot, tmp, mm.outtype, mmproj=True,
                                                            mistral_format=mm.mistral_format),
                                   final, inputs, f"projector {mm.outtype.upper()}", state.progress)
        else:
            wrote = _include_as_is(state.mmproj_src, final, state.progress)
        did = ("projector " if wrote else "projector up to date: ") + final.name
        state.converted_now = state.converted_now or wrote
    elif not (final.is_file() and manifest_path(final).is_file()):
        raise ModelError(f"the projector {final} is not in the release folder yet",
                         hint="run the convert phase first", options=("only", "skip", "from_phase"))
    check_projector(final)
    state.mmproj = final
    return did


def run_phase(state: ReleaseState, run: bool) -> PhaseReport:
    did = [d for d in (convert_source(state, run), convert_mmproj(state, run)) if d]
    check_baselines(state)   # the source is known: a baseline of another model stops here, before any tool
    if not did:
        return PhaseReport("convert", "not needed" if run else "resolved", detail="source is already GGUF")
    if not run:
        return PhaseReport("convert", "resolved", detail="; ".join(did))
    return PhaseReport("convert", "ran" if state.converted_now else "up to date", detail="; ".join(did))
