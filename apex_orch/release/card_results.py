"""The card's measured sections, as Markdown values for the template (release/card.md.j2).

`results_context(facts)` gives what the Benchmarks section and the blocks after it show:

- the benchmark table: the source, then every tier and baseline sorted by file size (largest
  first), with mean KLD, KLD 99.9%, Same top p, PPL, one column per task set and llama-bench's
  pp512 / tg128; a tier that a baseline no larger than it beats on mean KLD beyond the error
  estimates (evaluation.baselines) is marked † and the sentence under the table says so plainly;
- the plot's reference (mean KLD against size), when the card phase wrote it;
- the task sets (scorer, count, data and its sha256, settings), the speed setup (llama-bench's
  repetitions, threads, the machine it reported), what each baseline is;
- the calibration files the release publishes (or that it does not).

Pure formatting of release.card_facts values: no file is read here.
"""

from __future__ import annotations

from typing import cast

from apex_orch.core.text import hub_size, md_inline, md_table
from apex_orch.evaluation.baselines import Point, closer_baselines, closer_sentence
from apex_orch.release.card_facts import BaselineFacts, CardFacts, EvalFacts, SpeedFacts, TaskCell, TierFacts

SCORER_FLAGS = {"hellaswag": "--hellaswag", "winogrande": "--winogrande", "multiple-choice": "--multiple-choice"}
CALIBRATION_WHAT = {
    "imatrix.gguf": "the importance matrix (llama-imatrix{chunks})",
    "calibration.txt": "the calibration text llama-imatrix read, byte for byte{tokens}",
    "calibration.json": "its manifest: the corpus, every source with the sha256 of the text it gave and its "
                        "tokens, the token and chunk counts",
}


# =========================================================================== cells

def fmt_ppl(v: float, err: float | None = None, *, large: bool | None = None) -> str:
    """4 decimals, or 1 with thousands separators when the column holds values >= 1000."""
    large = v >= 1000 if large is None else large
    text = f"{v:,.1f}" if large else f"{v:.4f}"
    if err is not None:
        text += f" ± {err:,.1f}" if large else f" ± {err:.4f}"
    return text


def fmt_kld(v: float | None) -> str:
    return "—" if v is None else f"{v:.6f}" if v < 10 else f"{v:.4f}"


def fmt_pct(v: float | None) -> str:
    return "—" if v is None else f"{v:.2f} %"


def fmt_task(c: TaskCell | None) -> str:
    if c is None:
        return "—"
    if c.error is not None:
        return f"{c.accuracy:.2f} ± {c.error:.2f}"
    if c.ci95 is not None:
        return f"{c.accuracy:.2f} [{c.ci95[0]:.2f}, {c.ci95[1]:.2f}]"
    return f"{c.accuracy:.2f}"


def fmt_rate(v: float, sd: float | None) -> str:
    return f"{v:.1f}" + (f" ± {sd:.1f}" if sd is not None else "")


def _speed_cells(sp: SpeedFacts | None) -> list[str]:
    return ["—", "—"] if sp is None else [fmt_rate(sp.pp, sp.pp_sd), fmt_rate(sp.tg, sp.tg_sd)]


# =========================================================================== the table

def _rows(f: CardFacts) -> list[tuple[int, int, str, object, EvalFacts | None]]:
    """(size, order, kind, facts, eval) of every tier and baseline, largest file first."""
    items: list[tuple[int, int, str, object, EvalFacts | None]] = [
        (t.file.size, i, "tier", t, t.eval) for i, t in enumerate(f.tiers)]
    items += [(b.file.size if b.file else 0, len(f.tiers) + i, "baseline", b, b.eval)
              for i, b in enumerate(f.baselines)]
    return sorted(items, key=lambda x: (-x[0], x[1]))


def closer(f: CardFacts) -> list[tuple[Point, Point]]:
    """(tier, baseline) pairs: the tier a baseline no larger than it beats (evaluation.baselines)."""
    points = [Point(t.tier, t.file.size, t.eval.kld_mean, t.eval.kld_mean_err, False)
              for t in f.tiers if t.eval is not None]
    points += [Point(b.label, b.file.size, b.eval.kld_mean, b.eval.kld_mean_err, True)
               for b in f.baselines if b.eval is not None and b.file is not None]
    return closer_baselines(points)


def _table(f: CardFacts, beaten: set[str]) -> str:
    task_names = [(s.task, s.title) for s in f.tasks.sets] if f.tasks else []
    speed = f.speed is not None
    headers = (["File", "Size", "Mean KLD", "KLD 99.9%", "Same top p", "PPL"] + [t for _, t in task_names]
               + ([f"pp{f.speed.n_prompt} t/s", f"tg{f.speed.n_gen} t/s"] if speed else []))
    evaluated = [e for *_, e in _rows(f) if e is not None]
    large = max([e.ppl for e in evaluated] + ([f.base_eval.ppl] if f.base_eval else [])) >= 1000

    def measured(e: EvalFacts | None, kld: bool = True) -> list[str]:
        if e is None:
            return ["pending"] * (4 + len(task_names) + (2 if speed else 0))
        tasks = dict(e.tasks)
        cells = ([fmt_kld(e.kld_mean), fmt_kld(e.kld_p999), fmt_pct(e.same_top_p)] if kld else ["—"] * 3)
        cells += [fmt_ppl(e.ppl, e.ppl_err, large=large)] + [fmt_task(tasks.get(n)) for n, _ in task_names]
        return cells + (_speed_cells(e.speed) if speed else [])

    rows = []
    if f.base_eval is not None:
        b = f.base_eval
        base = EvalFacts(b.ppl, b.ppl_err, speed=b.speed, tasks=b.tasks)
        rows.append([f"source ({b.file_type})", hub_size(b.size)] + measured(base, kld=False))
    for size, _i, kind, item, e in _rows(f):
        if kind == "tier":
            t = cast(TierFacts, item)
            name = t.file.name + (" †" if t.tier in beaten else "")
            rows.append([name, hub_size(size)] + measured(e))
        else:
            bl = cast(BaselineFacts, item)
            rows.append([f"baseline: {md_inline(bl.label)}", hub_size(size) if bl.file else "pending"] + measured(e))
    return "\n".join(md_table(headers, rows))


def _intro(f: CardFacts) -> str:
    text = (f"Measured by apex-orch against the unquantized source on {f.eval_setup} (the second half of each "
            "chunk is scored). KLD is the Kullback-Leibler divergence from the source's next-token distribution: "
            "its mean over the scored tokens and its 99.9th percentile; Same top p is how often both pick the "
            "same most likely token; PPL is the perplexity of the text.")
    if f.tasks is not None:
        text += " Task columns are accuracies in percent by llama-perplexity's own scorers (below)."
    if f.speed is not None:
        text += (f" Speed is llama-bench's prompt processing (pp{f.speed.n_prompt}) and generation "
                 f"(tg{f.speed.n_gen}) in tokens per second.")
    if f.baselines:
        text += (" Baselines are other quantizations of the same model, measured in the same run with the same "
                 "settings; they are not part of this repository.")
    return text + " Rows are sorted by file size."


def _tasks(f: CardFacts) -> dict | None:
    if f.tasks is None:
        return None
    s = f.tasks
    rows = [[md_inline(t.title), f"`{SCORER_FLAGS.get(t.scorer, t.scorer)}`", f"{t.n_tasks:,} of {t.n_available:,}",
             md_inline(t.data), f"`{t.sha256}`"] for t in s.sets]
    note = ("± is the binomial standard error llama-perplexity prints (Winogrande from 100 tasks; multiple choice "
            "unless fewer than 100 are drawn from a larger file); HellaSwag's [low, high] is its 95% Wilson "
            "interval. A subset is drawn by the tool's own "
            f"seeded generator, the same for every file. Settings: `-c {s.ctx}` per sequence, batch {s.n_batch}, "
            f"ubatch {s.n_ubatch}, flash attention {'on' if s.flash_attn else 'off'}.")
    return {"table": "\n".join(md_table(["Task", "Scorer", "Tasks", "Data", "sha256"], rows)), "note": note}


def _speed(f: CardFacts) -> str | None:
    s = f.speed
    if s is None:
        return None
    reps = (f"mean ± standard deviation of {s.repetitions} repetitions" if s.repetitions > 1
            else "one repetition (no standard deviation)")
    return (f"Tokens per second by the pinned llama-bench: pp{s.n_prompt} decodes a {s.n_prompt}-token prompt as "
            f"one batch, tg{s.n_gen} generates {s.n_gen} tokens one at a time; {reps} after a warm-up run, "
            f"{s.threads} threads, batch "
            f"{s.n_batch}, ubatch {s.n_ubatch}, flash attention {'on' if s.flash_attn else 'off'}"
            + (f", on {md_inline(s.machine)}" if s.machine else "")
            + ". Speeds depend on the machine and its load: compare the rows of this table with each other.")


def _baselines(f: CardFacts) -> list[str]:
    out = []
    for b in f.baselines:
        line = f"- **{md_inline(b.label)}**: {md_inline(b.what)}"
        if b.kind == "hf" and b.origin:
            repo, _, rev = b.origin.partition("@")
            line += f" ([{md_inline(repo)}](https://huggingface.co/{repo}) at revision `{rev[:12]}`)"
        if b.file is not None:
            line += f"; {md_inline(b.file.name)}, {hub_size(b.file.size)}, sha256 `{b.file.sha256[0]}`"
        out.append(line + ".")
    return out


def _calibration_files(f: CardFacts) -> dict | None:
    c = f.calibration_files
    if c is None:
        return None
    if not c.published:
        return {"published": False, "table": None}
    cal = f.calibration
    rows = []
    for p in c.files:
        name = p.path.rsplit("/", 1)[-1]
        what = CALIBRATION_WHAT.get(name, "").format(
            chunks=f", {cal.chunks} chunks of {cal.ctx} tokens" if cal else "",
            tokens=f", {c.tokens:,} tokens" if c.tokens else "")
        rows.append([f"[{p.path}]({p.path})", what, hub_size(p.size), f"`{p.sha256}`"])
    return {"published": True, "table": "\n".join(md_table(["File", "What", "Size", "sha256"], rows))}


def results_context(f: CardFacts) -> dict:
    """The measured sections' values (None where a section has nothing to show)."""
    evaluated = any(t.eval is not None for t in f.tiers) or any(b.eval is not None for b in f.baselines)
    bench = None
    if evaluated:
        pairs = closer(f)
        notes = ["† " + md_inline(closer_sentence(t, b, hub_size)) for t, b in pairs]
        if f.baselines and not pairs:
            notes = ["No baseline that is no larger than a tier is closer to the source than that tier beyond the "
                     "error estimates (mean KLD ± its standard error)."]
        bench = {"intro": _intro(f), "table": _table(f, {t.name for t, _ in pairs}), "notes": notes,
                 "plot": f.plot}
    return {"benchmarks": bench, "task_sets": _tasks(f) if evaluated else None,
            "speed_note": _speed(f) if evaluated else None, "baselines": _baselines(f),
            "calibration_files": _calibration_files(f)}
