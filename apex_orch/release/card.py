"""The model card (README.md of a release): facts gathered once, rendered deterministically.

`facts_from_release(state)` collects everything the card says from the release itself: the
source GGUF's header (architecture), each tier's plan and its quantize manifest (file names,
sizes, sha256, the tensor types really written), the eval records (PPL/KLD, task accuracies,
llama-bench speed, the source's own), the baselines (release.baselines: what each is, its file,
its record), the projector's header and manifest, the imatrix record and the published
calibration files' record, a fitted tier's `fitted:` record. The values are release.card_facts'
types. `render_card(facts)` is a pure function of those facts: no timestamps, no absolute paths,
stable ordering and number formats, so a rerun writes the same bytes and a golden file can pin the
text. `render_plot(facts)` is the card's plot (mean KLD against size, evaluation.plot), made when
some tier or baseline has a KL number and matplotlib is installed.

Rendering: `card_context` formats and escapes every value (the measured sections through
release.card_results); the body's layout is the jinja2 template card.md.j2 beside this module (one
block per section, empty blocks where later sections go); the YAML front matter is
huggingface_hub's ModelCardData, the whole a ModelCard.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable

from apex_orch.core.text import hub_size, human_count, md_code, md_inline, md_table
from apex_orch.evaluation.plot import PlotPoint, kld_size_plot, matplotlib_available
from apex_orch.model.roles import ROLE_ORDER
from apex_orch.plan.llama_rules import ftype_label
from apex_orch.release.card_mtp import mtp_context, mtp_facts
from apex_orch.release.card_facts import (ArchFacts, BaseEvalFacts, BaselineFacts, CalibrationFacts,  # noqa: F401
                                          CalibrationFiles, CardFacts, EvalFacts, FileFacts, MmprojFacts,
                                          PublishedFile, TierFacts, base_facts, eval_facts, speed_setup, task_setup)
from apex_orch.release.card_results import fmt_kld, fmt_pct, fmt_ppl, results_context  # noqa: F401
from apex_orch.release.fit_tiers import fitted_sentence

PLOT_NAME = "kld-vs-size.png"      # the plot's name in the release folder and the repo
CALIBRATION_DIR = "calibration"    # the published calibration files' folder

CARD_MARKER = "<!-- written by apex-orch release"
BASE_TAGS = ("gguf", "moe", "apex", "quantized")
ROLE_NAMES = {"routed_expert": "Routed experts", "shared_expert": "Shared expert", "dense_ffn": "Dense FFN",
              "attention": "Attention", "ssm": "SSM", "nextn": "MTP / NextN", "embedding": "Token embedding",
              "output": "Output head", "router": "Router", "norm": "Norms",
              "aux": "Small parameters (never quantized)", "unassigned": "Unassigned"}
BAND_ORDER = ("edge", "near", "middle", "rest")
ROPE_NAMES = {"yarn": "YaRN", "linear": "linear", "longrope": "LongRoPE"}


# =========================================================================== gathering

def _manifest_files(first: Path) -> FileFacts:
    from apex_orch.core.manifest import manifest_path, read_manifest
    doc = read_manifest(manifest_path(first))
    files = doc.get("files") or []
    return FileFacts(tuple(f["name"] for f in files), sum(int(f["size"]) for f in files),
                     tuple(f["sha256"] for f in files))


def _arch_facts(model, bands) -> ArchFacts:
    def first_int(v):
        if isinstance(v, list):
            v = v[0] if v else None
        return int(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None
    rope = model.rope_scaling
    rtype = rope.get("rope.scaling.type")
    return ArchFacts(
        model=model.name, arch=model.arch, blocks=model.block_count, leading_dense=model.leading_dense_blocks,
        nextn=model.nextn_layers, experts=model.expert_count, experts_used=model.expert_used_count,
        experts_shared=model.expert_shared_count, total_params=model.total_parameters,
        active_params=model.active_parameters, attention=model.attention_kind, heads=first_int(model.head_count),
        kv_heads=first_int(model.head_count_kv), q_lora_rank=first_int(model.q_lora_rank),
        kv_lora_rank=first_int(model.kv_lora_rank), context=first_int(model.context_length),
        rope_type=str(rtype) if rtype and rtype != "none" else None,
        rope_factor=float(rope["rope.scaling.factor"]) if rtype and "rope.scaling.factor" in rope else None,
        rope_original_context=first_int(rope.get("rope.scaling.original_context_length")) if rtype else None,
        vocab=model.vocab_size, edge=bands.edge, near=bands.near, attention_edge=bands.attention_edge,
        band_blocks=bands.n_blocks)


def written_files(job, files: list[Path]) -> tuple[FileFacts, dict]:
    """A tier's files and the tensor types really written, from its quantize manifest."""
    from apex_orch.core.manifest import manifest_path, read_manifest
    doc = read_manifest(manifest_path(files[0]))
    recs = doc.get("files") or []
    ff = FileFacts(tuple(f["name"] for f in recs), sum(int(f["size"]) for f in recs), tuple(f["sha256"] for f in recs))
    return ff, doc.get("roles") or {r: s["types"] for r, s in job.plan.role_summary().items()}


def _tier_facts(tier_cfg, job, ff: FileFacts, written: dict, record: dict | None) -> TierFacts:
    roles = []
    for role in ROLE_ORDER:
        if role in written:
            types = tuple(sorted(written[role].items(), key=lambda kv: (-kv[1], kv[0])))
            roles.append((role, sum(n for _, n in types), types))
    band_table = job.plan.band_table()
    bands = []
    for role in ROLE_ORDER:
        if role in band_table:
            cells = tuple((b, ", ".join(sorted(band_table[role][b]))) for b in BAND_ORDER if b in band_table[role])
            bands.append((role, cells))
    ev = eval_facts(record["summary"]) if record is not None else None
    p = job.profile
    fitted = p.raw.get("fitted")
    return TierFacts(tier=p.tier, profile=p.name, best_for=tier_cfg.best_for, imatrix=job.imatrix is not None,
                     base_ftype=p.base_ftype, bpw=round(job.plan.bpw, 4), file=ff, roles=tuple(roles),
                     bands=tuple(bands), eval=ev,
                     fitted=fitted_sentence(p.tier, fitted) if isinstance(fitted, dict) else "")


def _mmproj_facts(path: Path) -> MmprojFacts:
    from apex_orch.model.gguf_header import read_header
    kv = read_header(path).kv
    proj = kv.get("clip.projector_type") or kv.get("clip.vision.projector_type")
    return MmprojFacts(_manifest_files(path), str(proj) if proj else None, ftype_label(kv.get("general.file_type")))


def facts_from_release(state, *, file_facts: Callable | None = None) -> CardFacts:
    """Everything the card says, read from the release (release.ReleaseState after its phases).

    `file_facts(job, files) -> (FileFacts, {role: {type: count}})` defaults to reading each tier's
    quantize manifest (`written_files`)."""
    file_facts = file_facts or written_files
    from apex_orch.llama.tools import build_label
    cfg = state.config
    model = state.model
    jobs = state.jobs
    if not jobs:
        raise ValueError("no tiers planned")
    tier_cfg = {t.tier: t for t in cfg.tiers}
    tiers = tuple(_tier_facts(tier_cfg[j.profile.tier], j,   # type: ignore[call-arg]   # file_facts: 2 values
                              *file_facts(j, state.files.get(j.profile.tier)), state.evals.get(j.profile.tier))
                  for j in jobs)
    cal = None
    if state.imatrix_record:
        r = state.imatrix_record
        cal = CalibrationFacts(r["corpus"], r.get("description", ""), int(r["ctx"]), int(r["chunks"]), r["sha256"])
    base = base_facts(state.base_eval) if state.base_eval else None
    records = [*state.evals.values(), *state.baseline_evals.values()]
    setup = None
    if records:
        s = records[0]["summary"]
        setup = f"{records[0]['text']}, {s['n_chunks']} chunks of {s['n_ctx']} tokens"
    measured = records + ([state.base_eval] if state.base_eval else [])
    tags = []
    for t in (*BASE_TAGS, model.arch, *cfg.tags):
        if t not in tags:
            tags.append(t)
    facts = CardFacts(
        name=cfg.name, title=cfg.title, repo=cfg.publish.repo, base_model=cfg.base_model, license=cfg.license,
        description=cfg.description, tags=tuple(tags), arch=_arch_facts(model, jobs[0].plan.bands), tiers=tiers,
        mmproj=_mmproj_facts(state.mmproj) if state.mmproj is not None else None, calibration=cal,
        base_eval=base, eval_setup=setup, config_path=cfg.display_path(), llama_build=build_label(),
        baselines=_baseline_facts(state, file_facts), tasks=task_setup(measured), speed=speed_setup(measured),
        calibration_files=_calibration_files(state), mtp=mtp_facts(state, tiers, _manifest_files))
    return dataclasses.replace(facts, plot=PLOT_NAME if plot_points(facts) and matplotlib_available() else None)


def _baseline_facts(state, file_facts: Callable) -> tuple[BaselineFacts, ...]:
    """Each baseline: what it is, its file (a preset's from its quantize manifest, a fetched one's
    own bytes) and its numbers."""
    from apex_orch.core.fingerprint import source_sha256
    jobs = {j.profile.tier: j for j in state.baseline_jobs}
    out = []
    for b in state.config.baselines:
        files = state.baseline_files.get(b.label)
        record = state.baseline_evals.get(b.label)
        ff = origin = None
        if b.kind == "preset" and b.label in jobs and files:
            ff = file_facts(jobs[b.label], files)[0]
        elif b.kind != "preset" and files:
            ff = FileFacts((files[0].name,), files[0].stat().st_size, (source_sha256(files[0]),))
        if b.kind == "hf":
            origin = f"{b.hf.repo}@{b.hf.revision}"
        out.append(BaselineFacts(b.label, b.kind, b.describe() if b.kind != "file" else "a GGUF of the same model",
                                 ff, origin, eval_facts(record["summary"]) if record else None))
    return tuple(out)


def _calibration_files(state) -> CalibrationFiles | None:
    """The calibration files the release publishes; None when it has no imatrix (nothing to publish)."""
    if state.config.imatrix is None:
        return None
    if not state.calibration_upload or not state.calibration:
        return CalibrationFiles(False)
    c = state.calibration
    return CalibrationFiles(True, tuple(PublishedFile(f"{CALIBRATION_DIR}/{r['name']}", int(r["size"]), r["sha256"])
                                        for r in c["files"]), c.get("tokens"))


def plot_points(f: CardFacts) -> list[PlotPoint]:
    """The tiers and baselines with a positive mean KLD (a log scale has no 0)."""
    pts = [PlotPoint(t.tier, t.file.size, t.eval.kld_mean) for t in f.tiers
           if t.eval is not None and (t.eval.kld_mean or 0) > 0]
    pts += [PlotPoint(b.label, b.file.size, b.eval.kld_mean, True) for b in f.baselines
            if b.eval is not None and b.file is not None and (b.eval.kld_mean or 0) > 0]
    return pts


def render_plot(f: CardFacts) -> bytes:
    """The card's plot (PNG): mean KLD against file size, tiers and baselines (evaluation.plot)."""
    base = f.base_eval
    return kld_size_plot(plot_points(f), base_size=base.size if base else max(p.size for p in plot_points(f)),
                         base_label=base.file_type if base else "source", title=f"{f.name}: mean KLD vs file size"
                         + (f"\n{f.eval_setup}" if f.eval_setup else ""))


# =========================================================================== formatting

def file_cell(f: FileFacts) -> str:
    if len(f.names) == 1:
        return f.name
    return f"{f.name} (+{len(f.names) - 1} more part{'s' if len(f.names) > 2 else ''})"


def apex_line(a: ArchFacts) -> str:
    mapping = {"MLA": "MLA-aware", "GQA": "GQA-aware", "MHA": "attention-aware"}
    kind = a.attention.removeprefix("hybrid ")
    aware = mapping.get(kind.split("+")[0], "role-aware")
    return f"{a.edge}+{a.edge} symmetric edge gradient across {a.band_blocks} layers, {aware} tensor mapping"


# =========================================================================== rendering

TEMPLATE = "card.md.j2"          # beside this module; shipped in the wheel as package data
# The front matter's keys in the order the card has always had (ModelCardData would append
# base_model_relation last).
FRONT_MATTER_ORDER = ["base_model", "base_model_relation", "license", "tags"]


def front_matter(f: CardFacts):
    """The card's metadata as huggingface_hub's ModelCardData (its YAML quotes what needs quoting)."""
    from huggingface_hub import ModelCardData
    return ModelCardData(base_model=f.base_model, base_model_relation="quantized" if f.base_model else None,
                         license=f.license, tags=list(f.tags))


def _arch_context(f: CardFacts) -> dict[str, str]:
    a = f.arch
    layers = f"{a.blocks}"
    if a.leading_dense:
        layers += f" ({a.leading_dense} dense, {a.blocks - a.nextn - a.leading_dense} MoE)"
    else:
        layers += " (all MoE)" if not a.nextn else f" ({a.blocks - a.nextn} MoE)"
    if a.nextn:
        layers += f" + {a.nextn} MTP"
    experts = f"{a.experts} routed + {a.experts_shared} shared, {a.experts_used} routed active per token" \
        if a.experts_shared else f"{a.experts} routed, {a.experts_used} active per token"
    att = a.attention
    details = []
    if a.heads:
        details.append(f"{a.heads} heads")
    if a.q_lora_rank or a.kv_lora_rank:
        if a.q_lora_rank:
            details.append(f"q_lora_rank {a.q_lora_rank}")
        if a.kv_lora_rank:
            details.append(f"kv_lora_rank {a.kv_lora_rank}")
    elif a.kv_heads and a.kv_heads != a.heads:
        details.append(f"{a.kv_heads} KV heads")
    if att.startswith("MLA"):
        att = "MLA (multi-head latent attention)"
    if details:
        att += ", " + ", ".join(details)
    if f.mmproj is not None:
        proj = f"{f.mmproj.projector.capitalize()} encoder" if f.mmproj.projector else "vision encoder"
        vision = f"{proj}, shipped as a separate projector ({f.mmproj.file.name}" + (
            f", {f.mmproj.ftype})" if f.mmproj.ftype else ")")
    else:
        vision = "none (text only)"
    if a.context:
        ctx = f"{a.context:,} tokens"
        if a.rope_type:
            ctx += f" ({ROPE_NAMES.get(a.rope_type, a.rope_type)} RoPE scaling"
            if a.rope_factor:
                ctx += f", factor {a.rope_factor:g}"
            if a.rope_original_context:
                ctx += f" over {a.rope_original_context:,}"
            ctx += ")"
    else:
        ctx = "not stated in the GGUF"
    middle = a.band_blocks - 2 * (a.edge + a.near)
    return {"model": md_inline(a.model), "arch": md_code(a.arch), "layers": layers, "experts": experts,
            "parameters": f"{human_count(a.total_params)} total, {human_count(a.active_params)} active per token",
            "attention": att, "vision": vision, "context": ctx, "apex_config": apex_line(a),
            "bands": f"edge = the first and last {a.edge} layers, near = the next {a.near} inward on each side, "
                     f"middle = the other {middle}; attention keeps its edge types on the first and last "
                     f"{a.attention_edge}"}


def _calibration_context(f: CardFacts) -> tuple[str | None, str | None]:
    """(the imatrix paragraph, the without-imatrix sentence)."""
    i_tiers = [md_inline(t.tier) for t in f.tiers if t.imatrix]
    plain = [md_inline(t.tier) for t in f.tiers if not t.imatrix]
    text = None
    if f.calibration is not None and i_tiers:
        c = f.calibration
        text = (f"{', '.join(i_tiers)} use an importance matrix computed with llama-imatrix on {c.chunks} chunks "
                f"of {c.ctx} tokens from the `{md_code(c.corpus)}` calibration corpus")
        desc = md_inline(c.description).rstrip(".")
        if desc:
            desc = desc[0].lower() + desc[1:] if len(desc) > 1 and desc[1].islower() else desc
            text += f": {desc}"
        text += f". The imatrix file's sha256 is `{c.sha256}`."
    return text, (f"{', '.join(plain)} are quantized without an importance matrix." if plain else None)


def _tier_detail(t: TierFacts) -> dict:
    bands = dict(t.bands)
    rows = []
    for role, n, types in t.roles:
        by_band = "; ".join(f"{b}: {v}" for b, v in bands.get(role, ())) or "—"
        rows.append([ROLE_NAMES.get(role, role), str(n), ", ".join(f"{ty} ×{c}" for ty, c in types), by_band])
    return {"name": t.file.name, "fitted": t.fitted,
            "summary": f"Profile `{md_code(t.profile)}` ({md_inline(t.tier)}), llama-quantize base {t.base_ftype}, "
                       f"{t.bpw:.3f} bits per weight, {'with' if t.imatrix else 'without'} imatrix.",
            "sha256": [f"- sha256 `{sha}`" + (f" ({name})" if len(t.file.names) > 1 else "")
                       for name, sha in zip(t.file.names, t.file.sha256)],
            "table": "\n".join(md_table(["Role", "Tensors", "Types", "By band"], rows))}


def card_context(f: CardFacts) -> dict:
    """What the template is given: every value formatted and escaped for Markdown here."""
    calibration, without_imatrix = _calibration_context(f)
    files = [[file_cell(t.file), t.tier, hub_size(t.file.size), t.best_for] for t in f.tiers]
    if f.mtp is not None and f.mtp.draft is not None:
        files.append([file_cell(f.mtp.draft), "MTP draft", hub_size(f.mtp.draft.size),
                      "Speculative decoding beside any tier"])
    if f.mmproj is not None:
        files.append([file_cell(f.mmproj.file), "Vision projector", hub_size(f.mmproj.file.size),
                      "Required for image understanding"])
    return {
        "marker": CARD_MARKER, "config_path": f.config_path, "title": md_inline(f.title),
        "source": (f"[{f.base_model}](https://huggingface.co/{f.base_model})" if f.base_model
                   else f"`{md_code(f.arch.model)}`"),
        "description": f.description, "tiers": f.tiers, "mmproj": f.mmproj, "repo": f.repo,
        "recommended": md_inline(f.tiers[0].tier), **results_context(f),
        "files_table": "\n".join(md_table(["File", "Profile", "Size", "Best For"], files)),
        "split": any(len(t.file.names) > 1 for t in f.tiers), "arch": _arch_context(f),
        "calibration": calibration, "without_imatrix": without_imatrix,
        "details": [_tier_detail(t) for t in f.tiers],
        "apex_orch_version": f.apex_orch_version, "llama_build": f.llama_build,
        "mtp": mtp_context(f.mtp, f.tiers[0].file.name),
    }


def _environment():
    import jinja2
    return jinja2.Environment(loader=jinja2.FileSystemLoader(str(Path(__file__).parent)), autoescape=False,
                              trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True,
                              undefined=jinja2.StrictUndefined)


def render_card(f: CardFacts) -> str:
    """The card: front matter (ModelCardData) + the template's body, as one ModelCard."""
    from huggingface_hub import ModelCard
    body = _environment().get_template(TEMPLATE).render(**card_context(f))
    yaml = front_matter(f).to_yaml(original_order=FRONT_MATTER_ORDER)
    return str(ModelCard(f"---\n{yaml}\n---\n{body}"))
