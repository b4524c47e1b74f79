"""The llama-perplexity backend: run the pinned binary and read its records into an EvalResult.

Takes: model (and base) facts, the text, `EvalSettings`.
Gives: `tool_argv` (the command line equal to our settings), `parse_kld_block` (the tool's
statistics block into KLDStats fields), `ToolBase` (the tool's own base file, made once per
compare) and `run_with_tool` (one evaluation, the same EvalResult fields as the bindings).

Shaped so because the pinned tool can lose its last log lines at exit (see
`run_tool_logged`): every run is checked for its final records and retried a bounded number
of times, and the conditions it only logs are turned into errors here, in one place.
"""

from __future__ import annotations

import dataclasses
import re
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterable

from apex_orch.core.errors import EvalError
from apex_orch.core.settings import child_environment
from apex_orch.evaluation import base_cache
from apex_orch.evaluation.inputs import EvalSettings, ModelFacts, Progress, TextFacts, count_chunks, read_text_bytes
from apex_orch.evaluation.results import EvalResult
from apex_orch.evaluation.session import BindingsModel, check_same_vocab, vocab_signature
from apex_orch.evaluation.statistics import KLD_LINES, KLDStats
from apex_orch.llama.tools import build_label, find_tool, run_tool

TOOL_ATTEMPTS = 4

_NUM = r"([-+]?(?:\d+(?:\.\d*)?(?:[eE][-+]?\d+)?|nan|-?inf))"
_FINAL_RE = re.compile(r"Final estimate: PPL = " + _NUM + r" \+/- " + _NUM)
_CHUNKS_RE = re.compile(r"(?:calculating perplexity|computing) over (\d+) chunks, n_ctx=(\d+), "
                        r"batch_size=(\d+), n_seq=(\d+)")
_TOO_SHORT_RE = re.compile(r"tokenizes to only (\d+) tokens")
_NEED_RE = re.compile(r"you need at least (\d+) tokens")
_PROMPT_EVAL_RE = re.compile(r"prompt eval time =\s*" + _NUM + r" ms /\s*(\d+) tokens")
_VOCAB_RE = re.compile(r"inconsistent vocabulary \((\d+) vs (\d+)\)")


def parse_kld_block(lines: Iterable[str]) -> dict[str, float]:
    """Fields of KLDStats found in llama-perplexity's statistics block."""
    out: dict[str, float] = {}
    labels = sorted(KLD_LINES, key=lambda x: -len(x[0]))  # "Mean PPL(Q)/..." before "Mean PPL(Q)"
    for raw in lines:
        line = raw.rstrip()
        for label, name, err, _unit in labels:
            if not line.startswith(label):
                continue
            rest = line[len(label):].strip()
            if not rest.startswith(":"):
                continue
            nums = re.findall(_NUM, rest[1:])
            if not nums:
                continue
            out[name] = float(nums[0])
            if err and len(nums) > 1:
                out[err] = float(nums[1])
            break
    return out


def _tool_env() -> dict:
    # LLAMA_ARG_* variables silently change llama.cpp tools' defaults; ours are explicit.
    return {k: v for k, v in child_environment().items() if not k.startswith("LLAMA_ARG_")}


def tool_argv(model: str, settings: EvalSettings, *, text: str | None = None,
              base_file: str | None = None, kl: bool = False) -> list[str]:
    s = settings
    argv = [str(find_tool("llama-perplexity").path), "-m", model, "-c", str(s.n_ctx), "-b", str(s.batch),
            "-ub", str(s.ubatch), "-t", str(s.n_threads), "-fa", "on" if s.flash_attn else "off", "-fit", "off"]
    if s.tool_log_verbosity is not None:
        argv += ["-lv", str(s.tool_log_verbosity)]
    if not s.repack:
        argv.append("-nr")
    if text is not None:
        argv += ["-f", text]
    if s.chunks is not None:
        argv += ["--chunks", str(s.chunks)]
    if base_file is not None:
        argv += ["--kl-divergence-base", base_file]
    if kl:
        argv.append("--kl-divergence")
    return argv


def _tail(lines: list[str], n: int = 15) -> str:
    return "\n".join(line for line in lines[-n:])


def run_tool_logged(argv: list[str], what: str, log_dir: Path,
                    complete: Callable[[list[str]], bool]) -> list[str]:
    """Run llama-perplexity and return its output lines once `complete(lines)` holds.

    The pinned llama.cpp logs through an asynchronous worker thread that is never flushed at
    exit (common/log.cpp, "logs may be lost if not flushed before the program exits",
    ggml-org/llama.cpp#22142): on a busy machine the tool exits 0 having lost its last lines —
    the final estimate or the whole KL block. Measured here: 5 of 45 runs under 3x CPU
    oversubscription. So a run whose records are missing is run again (the numbers are
    deterministic); conditions the tool only logs (text too short, foreign vocabulary) are
    turned into errors."""
    model = argv[argv.index("-m") + 1]
    for attempt in range(1, TOOL_ATTEMPTS + 1):
        lines: list[str] = []
        run_tool(argv, log_path=log_dir / f"{what}.{attempt}.log", on_line=lines.append, env=_tool_env(),
                 what="llama-perplexity")
        for line in lines:
            m = _TOO_SHORT_RE.search(line)
            if m:
                need = next((int(n.group(1)) for n in map(_NEED_RE.search, lines) if n), None)
                raise EvalError(f"the evaluation text is too short: {m.group(1)} tokens, but the context "
                                f"needs at least {need}", where=model,
                                hint="use a longer text or a smaller context", options=("text", "corpus", "n_ctx"))
            m = _VOCAB_RE.search(line)
            if m:
                raise EvalError(f"the base has a different vocabulary ({m.group(1)} vs {m.group(2)} tokens)",
                                where=model)
        if complete(lines):
            return lines
    raise EvalError(
        f"llama-perplexity exited without printing its final records, {TOOL_ATTEMPTS} times; its last lines:\n"
        + _tail(lines), where=model,
        hint="the pinned llama.cpp loses its last log lines at exit on a busy machine (llama.cpp#22142); "
             "rerun when the machine is less loaded, or use the bindings backend", options=("backend",))


def _has_final(lines: list[str]) -> bool:
    return any(_FINAL_RE.search(line) for line in lines)


def _missing_kld_fields(fields: dict[str, float]) -> list[str]:
    return [f.name for f in dataclasses.fields(KLDStats) if f.name != "count" and f.name not in fields]


def _has_kld_block(lines: list[str]) -> bool:
    return not _missing_kld_fields(parse_kld_block(lines))


def _decode_rate(lines: list[str]) -> float | None:
    for line in lines:
        m = _PROMPT_EVAL_RE.search(line)
        if m and float(m.group(1)) > 0:
            return int(m.group(2)) / (float(m.group(1)) / 1000.0)
    return None


def work_root() -> Path:
    """Scratch folder for the tool's base files and logs, under the eval cache."""
    root = base_cache.cache_dir() / "work"
    root.mkdir(parents=True, exist_ok=True)
    return root


class ToolBase:
    """llama-perplexity's own base file for one (base, text, settings), made once and shared by
    every file of a compare; removed on close."""

    def __init__(self, base: ModelFacts, text: TextFacts, settings: EvalSettings, work: Path):
        self.base, self.text, self.settings, self.work = base, text, settings, work
        self.path: Path | None = None
        self.ppl: float | None = None
        self.ppl_err: float | None = None
        self.n_chunks = 0

    def ensure(self) -> Path:
        if self.path is None:
            out = self.work / "base.kld"
            lines = run_tool_logged(tool_argv(self.base.path, self.settings, text=self.text.path,
                                              base_file=str(out)), "base", self.work, _has_final)
            m = next(filter(None, map(_FINAL_RE.search, lines)), None)
            if not m:
                raise EvalError("llama-perplexity printed no final estimate for the base:\n" + _tail(lines),
                                where=self.base.path)
            self.ppl, self.ppl_err = float(m.group(1)), float(m.group(2))
            c = next(filter(None, map(_CHUNKS_RE.search, lines)), None)
            self.n_chunks = int(c.group(1)) if c else 0
            self.path = out
        return self.path


def run_with_tool(model: ModelFacts, text: TextFacts, settings: EvalSettings, *, base: ModelFacts | None = None,
                  progress: Progress | None = None, tool_base: ToolBase | None = None) -> EvalResult:
    """One evaluation by llama-perplexity (PPL; with `base`, the KL statistics). `tool_base`:
    a base file shared by several calls (compare); without it one is made in a scratch folder."""
    say = progress or (lambda _m: None)
    s = settings
    t0 = time.monotonic()
    own_dir = None
    if tool_base is None:
        own_dir = tempfile.TemporaryDirectory(prefix="apex-eval-", dir=work_root())
        work = Path(own_dir.name)
        if base is not None:
            tool_base = ToolBase(base, text, s, work)
    else:
        work = tool_base.work
    try:
        kld = None
        base_ppl = base_err = None
        # Checked here, not only parsed from the tool's log: its last lines can be lost (see
        # run_tool_logged), and this error deserves to be deterministic.
        with BindingsModel(base.path if base else model.path, vocab_only=True) as vm:
            count_chunks(len(vm.tokenize(read_text_bytes(text))), s, text.label)
        if base is None:
            say(f"llama-perplexity: {Path(model.path).name}")
            lines = run_tool_logged(tool_argv(model.path, s, text=text.path), "model", work, _has_final)
            m = next(filter(None, map(_FINAL_RE.search, lines)), None)
            if not m:
                raise EvalError("llama-perplexity printed no final estimate:\n" + _tail(lines), where=model.path)
            ppl, ppl_err = float(m.group(1)), float(m.group(2))
        else:
            check_same_vocab(vocab_signature(model.path), vocab_signature(base.path), model.path, base.path)
            say(f"llama-perplexity: base log-probs of {Path(base.path).name}")
            base_file = tool_base.ensure()
            base_ppl, base_err = tool_base.ppl, tool_base.ppl_err
            say(f"llama-perplexity: KL divergence of {Path(model.path).name}")
            lines = run_tool_logged(tool_argv(model.path, s, base_file=str(base_file), kl=True),
                                    Path(model.path).stem, work, _has_kld_block)
            fields: dict[str, Any] = parse_kld_block(lines)   # n_tokens among them is an int
            missing = _missing_kld_fields(fields)
            if missing:
                raise EvalError(f"llama-perplexity printed no KL statistics (missing {', '.join(missing[:3])}); "
                                "its last lines:\n" + _tail(lines), where=model.path,
                                hint="it prints none when fewer than 100 tokens are scored")
            kld = KLDStats(**fields)
            ppl, ppl_err = kld.mean_ppl_q, kld.mean_ppl_q_err
        c = next(filter(None, map(_CHUNKS_RE.search, lines)), None)
        n_chunks = int(c.group(1)) if c else 0
        n_scored = n_chunks * s.scored_per_chunk
        if kld is not None:
            kld.count = n_scored
        return EvalResult(
            model=model, backend="llama-perplexity", settings={**s.to_dict(), "chunks": n_chunks},
            text=text, n_tokens=None, n_chunks=n_chunks,
            n_scored=n_scored, ppl=ppl, ppl_err=ppl_err, base=base, base_ppl=base_ppl,
            base_ppl_err=base_err, kld=kld, seconds=time.monotonic() - t0,
            eval_tokens_per_s=_decode_rate(lines), llama_build=build_label())
    finally:
        if own_dir is not None:
            own_dir.cleanup()
