"""`apex-orch release --dry-run` as text: the ReleasePreview (apex_orch.release.dryrun) in the
layout the dry run has always printed. `--dry-run --json` prints `ReleasePreview.to_dict()`."""

from __future__ import annotations

import shlex

from apex_orch.core.text import disk_size, table
from apex_orch.release.dryrun import ReleasePreview


def _indented(text: str) -> str:
    return text.replace("\n", "\n          ")


def format_preview(p: ReleasePreview) -> str:
    lines = [f"release   {p.name}  ({p.config})",
             f"title     {p.title}",
             f"output    {p.output}",
             f"phases    {' -> '.join(x if x in p.selected else f'({x})' for x in p.phases)}"
             + ("" if p.push else "   [publish uploads only with --push]")]
    lines += [f"warning   {w}" for w in p.warnings]
    lines.append("")
    lines.append(f"fetch     {p.fetch.source if p.fetch.given is None else f'local GGUF {p.fetch.given} (--source)'}")
    if p.fetch.problem is not None:
        lines.append(f"          not fetched yet: {p.fetch.problem}")
    if p.mmproj is not None:
        mm = p.mmproj
        lines.append(f"mmproj    {mm.what} -> {mm.name} (never touched by profiles)")
        if mm.problem is not None:
            lines.append("          not available here: " + _indented(mm.problem))
        elif mm.path is not None:
            lines.append(f"          {mm.path} ({disk_size(mm.size or 0)})")
    lines += ["convert   $ " + shlex.join(c.argv) for c in p.converts]
    if p.mtp is not None:
        lines.append(f"mtp       {p.mtp.what}" + (f" -> {p.mtp.draft_file}" if p.mtp.draft_file else ""))
    if p.source_problem is not None:
        lines.append(f"          not converted yet: {p.source_problem}")
    if p.source is None:
        lines += ["", "the source GGUF does not exist yet, so tier sizes cannot be predicted; run the fetch and "
                      "convert phases first (or pass --source PATH)"]
        return "\n".join(lines)
    s = p.source
    lines += [f"source    {s.path} ({disk_size(s.size)}, {s.arch}, {s.blocks} blocks, {s.experts} experts, "
              f"{s.type})", ""]
    if p.imatrix is None:
        lines.append("imatrix   not needed (no I-tier)")
    else:
        im = p.imatrix
        users = f"{len(im.i_tiers)} I-tiers ({', '.join(im.i_tiers)})"
        if im.i_baselines:
            users += f" and {len(im.i_baselines)} baseline(s) ({', '.join(im.i_baselines)})"
        lines.append(f"imatrix   corpus {im.corpus}, ctx {im.ctx}, chunks {im.chunks or 'all'}; "
                     f"computed once for {users}")
        if im.problem is not None:
            lines.append(f"          cannot be planned here: {im.problem}")
        else:
            lines.append(f"          {'cached: ' + str(im.cache_path) if im.cached else 'not computed yet'}")
            lines.append("          $ " + shlex.join(im.argv or []))
    lines.append("")
    lines.append(f"quantize  {len(p.tiers)} tiers, {p.parallel} at a time"
                 + (f", split into parts of at most {p.split_max_size}" if p.split_max_size else ""))
    rows = [[t.tier, t.file, disk_size(t.size), f"{t.size / 2**30:.2f}", f"{t.bpw:.3f}", str(t.parts),
             "present" if t.present else "missing"] for t in p.tiers]
    lines.append(table(["tier", "file", "size", "GiB", "bpw", "parts", "state"], rows, align="llrrrrl"))
    lines += [f"  {t.tier}: $ " + shlex.join(t.argv) for t in p.tiers]
    m = p.mtp
    if m is not None:
        layers = "not known yet" if m.head_layers is None else f"{m.head_layers} layer(s)"
        if m.draft_file is None:
            costs = ", ".join(f"{tier} {disk_size(n)}" for tier, n in m.head_bytes.items())
            lines.append(f"  MTP head: {layers}; " + (f"in every tier, at its profile's types.nextn ({costs})"
                                                       if m.head_layers else "none in any file"))
        elif m.draft_argv is None:
            lines.append(f"  MTP draft {m.draft_file} ({m.draft_type}): planned once its head is converted")
        else:
            lines.append(f"  MTP draft {m.draft_file} ({m.draft_type}, {layers}): {disk_size(m.draft_size or 0)}, "
                         f"{'present' if m.draft_present else 'missing'}, from {m.draft_source}")
            lines.append("  MTP draft: $ " + shlex.join(m.draft_argv))
    lines.append("")
    if p.baselines:
        lines.append(f"baselines {len(p.baselines)}, measured like the tiers, never published")
        rows = [[b.name, b.kind, b.file or "?", disk_size(b.size) if b.size is not None else "?",
                 "present" if b.present else "missing"] for b in p.baselines]
        lines.append(table(["baseline", "kind", "file", "size", "state"], rows, align="lllrl"))
        for b in p.baselines:
            if b.argv:
                lines.append(f"  {b.name}: $ " + shlex.join(b.argv))
            else:
                lines.append(f"  {b.name}: {b.what}" + (f" ({b.path})" if b.path else ""))
            if b.problem:
                lines.append("          " + _indented(b.problem))
        lines.append("")
    e = p.eval
    if e is not None and e.enabled:
        gates = ", ".join(f"{k} {v:g}" for k, v in e.gates.items()) or "none"
        lines.append(f"eval      {e.files} files against {e.base} on {e.text}, ctx {e.ctx}, "
                     f"chunks {e.chunks or 'all'}, one base-logits cache; speed {'yes' if e.speed else 'no'}; "
                     f"gates: {gates}")
        if e.text_tokens is not None:
            lines.append(f"          the text holds {e.text_tokens:,} tokens: {e.text_chunks} chunk(s) of {e.ctx} "
                         "evaluated")
        elif e.text_note:
            lines.append(f"          {e.text_note}")
        if e.speed:
            lines.append(f"          speed: llama-bench pp{e.speed_tokens[0]} / tg{e.speed_tokens[1]}, "
                         f"{e.speed_repetitions} repetition(s) per file")
        if e.tasks:
            lines.append(f"          tasks: llama-perplexity's scorers on every file and the source, ctx {e.task_ctx} "
                         "per sequence")
        for t in e.tasks:
            what = (f"{t.n_tasks:,} of {t.n_available:,} tasks from {t.data} (sha256 {t.sha256[:12]})"
                    if t.n_tasks is not None else t.data)
            cost = f"; ~{t.tokens:,} tokens decoded per file" if t.tokens is not None else ""
            lines.append(f"            {t.title}: {what}{cost}")
            if t.problem:
                lines.append("              " + _indented(t.problem))
    else:
        lines.append("eval      disabled (the card says benchmarks pending)")
    lines.append(f"card      {p.card} + {len(p.tiers)} LocalAI entries in {p.localai}")
    if p.calibration_files:
        lines.append(f"          the calibration, published: {', '.join(p.calibration_files)}")
    elif not p.calibration_upload:
        lines.append("          the calibration is not published (the card says so)")
    lines.append(f"publish   {p.publish_repo} ({'private' if p.private else 'public'}); "
                 + ("runs with --push" if p.push else "not without --push"))
    d = p.disk
    if d is not None:
        lines.append("")
        lines.append(f"disk      the release needs {disk_size(d.need)} (tiers {disk_size(d.tiers)}"
                     + (f", baselines {disk_size(d.baselines)}" if d.baselines else "")
                     + (", split scratch for the largest tier" if d.split_scratch else "")
                     + (f", projector {disk_size(d.projector)}" if d.projector else "") + ")"
                     + (f", {disk_size(d.present)} already present" if d.present else "")
                     + f"; {disk_size(d.free)} free in {d.folder}"
                     + ("" if d.enough else "  -> NOT ENOUGH"))
    lines += [f"note      {n}" for n in p.notes]
    return "\n".join(lines)
