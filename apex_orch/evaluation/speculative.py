"""Speculative decoding with a model's MTP head: does llama.cpp draft with it, how often is the
draft right, and how fast is generation with and without it.

The pinned `llama-speculative-simple` runs the same greedy generation twice:

- with the head: `--spec-type draft-mtp`, the head read from the model file itself (bundled), or
  from a separate draft file (`-md`, the converter's `--mtp` output) beside a model without one;
- without speculation: the tool refuses to start without a speculative type, so this run uses the
  same binary and decode loop with an n-gram drafter that can never fire (`ngram-map-k` needing
  65535 earlier hits of its key); its log must show 0 drafted tokens.

Greedy speculative decoding keeps a draft token only when the target picks the same token, so the
two runs must print the same tokens. The tool is run with `--log-jsonl`: every log entry is one
JSON line and every generated token is one entry of level `none` (`LOG("%s", piece)`), so the two
runs are compared token piece by token piece. A difference is an EvalError: the head, the file or
llama.cpp is broken. Draft counts come from the tool's own summary (`n_drafted`, `n_accept`),
speeds from its `decoded N tokens in S seconds` line (the decode loop, prompt excluded).

`plan_speculative` checks the inputs and builds both command lines without running anything;
`run_speculative` runs them (through `apex_orch.llama.tools.run_tool`) and returns a
`SpeculativeResult`; `check_result` raises when the head drafted nothing or the two generations
differ.
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

from apex_orch.core.errors import EvalError
from apex_orch.core.settings import child_environment
from apex_orch.evaluation.inputs import default_threads
from apex_orch.llama.tools import build_label, find_tool, run_tool
from apex_orch.model.info import draft_mismatch, read_model

TOOL = "llama-speculative-simple"
DEFAULT_PROMPT = ("The committee met on Tuesday to review the budget for the new library. After a long "
                  "discussion about the roof, the windows and the reading room, they agreed that")
# The pinned llama.cpp's log worker may lose its last lines at exit on a busy machine
# (llama.cpp#22142, see tool_backend): a run whose summary is missing is run again.
ATTEMPTS = 3
NEVER_FIRING_DRAFTER = ("--spec-type", "ngram-map-k", "--spec-ngram-map-k-min-hits", "65535")

# The pinned llama.cpp's MTP drafting flags (common/arg.cpp): the same for llama-speculative-simple,
# llama-cli and llama-server. With the head bundled in the model file no draft file is given.
SPEC_TYPE_MTP = ("--spec-type", "draft-mtp")
SPEC_DRAFT_MAX = "--spec-draft-n-max"
SPEC_DRAFT_FILE = "-md"
DEFAULT_DRAFT_MAX = 3
DEFAULT_N_PREDICT = 32           # tokens each run generates
DEFAULT_CTX = 1024


def mtp_flags(draft_max: int = DEFAULT_DRAFT_MAX, draft: str | Path | None = None) -> list[str]:
    """The flags that make a llama.cpp tool draft with the MTP head (bundled, or `draft` beside it)."""
    argv = [*SPEC_TYPE_MTP, SPEC_DRAFT_MAX, str(draft_max)]
    return argv + ([SPEC_DRAFT_FILE, str(draft)] if draft is not None else [])


_SUMMARY_RE = {
    "n_predict": re.compile(r"^n_predict\s*=\s*(\d+)"),
    "n_drafted": re.compile(r"^n_drafted\s*=\s*(\d+)"),
    "n_accept": re.compile(r"^n_accept\s*=\s*(\d+)"),
}
_DECODED_RE = re.compile(r"^decoded\s+(\d+) tokens in\s+([0-9.]+) seconds")
_ENCODED_RE = re.compile(r"^encoded\s+(\d+) tokens in")


@dataclass(frozen=True)
class SpeculativePlan:
    """Both runs, resolved: the files (checked), the settings, the two command lines."""
    model: Path
    draft: Path | None           # a separate MTP draft file; None: the head bundled in `model`
    prompt: str
    n_predict: int
    draft_max: int
    ctx: int
    threads: int
    repack: bool
    tool: Path
    head: str                    # where the head comes from, in words

    def _common(self) -> list[str]:
        argv = [str(self.tool), "-m", str(self.model), "-p", self.prompt, "-n", str(self.n_predict),
                "--temp", "0", "-c", str(self.ctx), "-t", str(self.threads), "-fit", "off", "--color", "off",
                "--log-jsonl"]
        if not self.repack:
            argv.append("-nr")
        return argv

    def baseline_argv(self) -> list[str]:
        return [*self._common(), *NEVER_FIRING_DRAFTER]

    def mtp_argv(self) -> list[str]:
        return [*self._common(), *mtp_flags(self.draft_max, self.draft)]

    def describe(self) -> str:
        return "\n".join([
            f"model     {self.model}",
            f"head      {self.head}",
            f"settings  {self.n_predict} tokens greedy, up to {self.draft_max} drafted per step, ctx {self.ctx}, "
            f"threads {self.threads}, repack {'on' if self.repack else 'off'}",
            f"prompt    {self.prompt!r}",
            "with head " + shlex.join(self.mtp_argv()),
            "without   " + shlex.join(self.baseline_argv()),
        ])


@dataclass(frozen=True)
class DecodeRun:
    """One run of the tool, as its log says it went."""
    pieces: tuple[str, ...]      # every generated token's text, in order (the prompt excluded)
    n_predict: int
    n_drafted: int
    n_accept: int
    decoded: int                 # tokens the decode loop produced
    decode_seconds: float

    @property
    def tokens_per_s(self) -> float:
        return self.decoded / self.decode_seconds if self.decode_seconds > 0 else float("inf")

    @property
    def text(self) -> str:
        return "".join(self.pieces)


@dataclass(frozen=True)
class SpeculativeResult:
    plan: SpeculativePlan
    with_head: DecodeRun
    without: DecodeRun
    build: str = ""
    log_dir: Path | None = None

    @property
    def acceptance(self) -> float | None:
        """Accepted / drafted tokens (None when nothing was drafted)."""
        d = self.with_head
        return d.n_accept / d.n_drafted if d.n_drafted else None

    @property
    def speed_ratio(self) -> float:
        """Decode tokens/s with the head over tokens/s without it (> 1: the head speeds generation up)."""
        return self.with_head.tokens_per_s / self.without.tokens_per_s

    @property
    def same_output(self) -> bool:
        """The same tokens, over the shorter run (the run with the head may overshoot the requested
        count by up to draft_max tokens: it accepts drafts in groups)."""
        a, b = self.with_head.pieces, self.without.pieces
        n = min(len(a), len(b))
        return a[:n] == b[:n] and (len(a) == len(b) or n >= self.plan.n_predict)

    def to_dict(self) -> dict:
        def run(r: DecodeRun) -> dict:
            return {"n_predict": r.n_predict, "n_drafted": r.n_drafted, "n_accept": r.n_accept,
                    "decoded_tokens": r.decoded, "decode_seconds": r.decode_seconds,
                    "tokens_per_s": round(r.tokens_per_s, 3), "text": r.text}
        p = self.plan
        return {"model": str(p.model), "draft": str(p.draft) if p.draft else None, "head": p.head,
                "settings": {"n_predict": p.n_predict, "draft_max": p.draft_max, "ctx": p.ctx,
                             "threads": p.threads, "repack": p.repack, "prompt": p.prompt},
                "with_head": run(self.with_head), "without_head": run(self.without),
                "acceptance": self.acceptance, "speed_ratio": round(self.speed_ratio, 4),
                "same_output": self.same_output, "llama_cpp": self.build}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


# --------------------------------------------------------------------------- plan

def plan_speculative(model: str | Path, *, draft: str | Path | None = None, prompt: str = DEFAULT_PROMPT,
                     n_predict: int = DEFAULT_N_PREDICT, draft_max: int = DEFAULT_DRAFT_MAX, ctx: int = DEFAULT_CTX,
                     threads: int | None = None,
                     repack: bool = False) -> SpeculativePlan:
    """Check MODEL (and DRAFT) and resolve both runs. The head is MODEL's own MTP block, or DRAFT:
    an MTP draft file of the same model (same architecture, width, vocabulary and trunk depth)."""
    if n_predict < 2 or draft_max < 1 or ctx < 1:   # with one token to generate there is nothing to draft
        raise EvalError(f"speculative settings out of range: {n_predict} tokens (at least 2), {draft_max} "
                        f"drafted per step, ctx {ctx}")
    if not prompt.strip():   # the tool starts decoding from the prompt's last token: it needs one
        raise EvalError("the prompt is empty", hint="give some text (or leave the default)", options=("prompt",))
    info = read_model(model)
    where = str(info.path)
    if info.is_mtp_draft:
        raise EvalError("this is an MTP draft file (only the MTP head): it drafts for a full model, it cannot "
                        "generate alone", where=where,
                        hint="give the full model, and this file as its draft", options=("draft",))
    if draft is None:
        if not info.structure["nextn_blocks"]:
            raise EvalError(f"{info.name} ({info.arch}) has no MTP head: no blk.N.nextn.* tensors", where=where,
                            hint="give the head as a separate draft file (what convert_hf_to_gguf.py --mtp "
                                 "writes), or convert the model with its head", options=("draft",))
        head = f"bundled: blk.{', blk.'.join(map(str, info.structure['nextn_blocks']))} of the model file"
        draft_path = None
    else:
        d = read_model(draft)
        problem = draft_mismatch(info, d)
        if problem is not None:
            raise EvalError(problem, where=str(d.path), options=("draft",),
                            hint=None if not d.is_mtp_draft else
                            "use the draft converted (convert_hf_to_gguf.py --mtp) from the same checkpoint as the "
                            "model")
        head = f"draft file {d.path.name}: blk.{', blk.'.join(map(str, d.structure['nextn_blocks']))}"
        draft_path = d.path
    return SpeculativePlan(model=info.path, draft=draft_path, prompt=prompt, n_predict=n_predict,
                           draft_max=draft_max, ctx=ctx, threads=threads or default_threads(), repack=repack,
                           tool=find_tool(TOOL).path, head=head)


# --------------------------------------------------------------------------- run

def parse_jsonl_log(lines: list[str]) -> DecodeRun | None:
    """A run from the tool's --log-jsonl output; None when its summary is missing (lost at exit).

    The tool's entries of level `none` are, in order: a blank line, one entry per prompt token
    (the echo), one entry per generated token, blank lines. Its summary says how many prompt tokens
    it encoded and how many it generated (`n_predict`, the end-of-generation token included when
    one stopped it), so the generated pieces are cut out by count, never guessed from the text."""
    entries = []
    for line in lines:
        try:
            obj = json.loads(line)
        except ValueError:
            continue          # a line not from the logger (ggml's own stderr)
        if isinstance(obj, dict) and obj.get("type") == "log" and isinstance(obj.get("msg"), str):
            entries.append((obj.get("level"), obj["msg"]))
    summary: dict[str, int] = {}
    decoded = seconds = n_input = None
    for level, msg in entries:
        if level != "info":
            continue
        text = msg.strip()
        for key, rx in _SUMMARY_RE.items():
            m = rx.match(text)
            if m:
                summary[key] = int(m.group(1))
        if (m := _DECODED_RE.match(text)):
            decoded, seconds = int(m.group(1)), float(m.group(2))
        if (m := _ENCODED_RE.match(text)):
            n_input = int(m.group(1))
    if decoded is None or n_input is None or set(summary) != set(_SUMMARY_RE):
        return None
    shown = [msg for level, msg in entries if level == "none"]
    pieces = shown[1 + n_input:1 + n_input + summary["n_predict"]]
    return DecodeRun(pieces=tuple(pieces), n_predict=summary["n_predict"], n_drafted=summary["n_drafted"],
                     n_accept=summary["n_accept"], decoded=decoded, decode_seconds=seconds)


def _tool_env() -> dict:
    # LLAMA_ARG_* variables silently change llama.cpp tools' defaults (LLAMA_ARG_SPEC_TYPE would
    # turn speculation on in the run without it); ours are explicit.
    return {k: v for k, v in child_environment().items() if not k.startswith("LLAMA_ARG_")}


def _run(argv: list[str], label: str, log_dir: Path) -> DecodeRun:
    for attempt in range(1, ATTEMPTS + 1):
        lines: list[str] = []
        run_tool(argv, log_path=log_dir / f"{label}.{attempt}.log", on_line=lines.append, env=_tool_env(),
                 what=TOOL)
        run = parse_jsonl_log(lines)
        if run is not None:
            return run
    raise EvalError(f"{TOOL} exited without printing its summary, {ATTEMPTS} times", where=str(log_dir),
                    hint="the pinned llama.cpp loses its last log lines at exit on a busy machine "
                         "(llama.cpp#22142); rerun when the machine is less loaded")


def run_speculative(plan: SpeculativePlan, log_dir: Path, *, without_first: bool = False) -> SpeculativeResult:
    """Generate with the head and without speculation (in that order, or the other: a benchmark
    alternates it so drifting load does not favour one side); the tools' logs go to `log_dir`."""
    log_dir.mkdir(parents=True, exist_ok=True)
    if without_first:
        without = _run(plan.baseline_argv(), "without-head", log_dir)
        with_head = _run(plan.mtp_argv(), "with-head", log_dir)
    else:
        with_head = _run(plan.mtp_argv(), "with-head", log_dir)
        without = _run(plan.baseline_argv(), "without-head", log_dir)
    if without.n_drafted:
        raise EvalError(f"the run without the head drafted {without.n_drafted} tokens; it must draft none",
                        where=str(log_dir))
    return SpeculativeResult(plan, with_head, without, build_label(), log_dir)


def check_result(result: SpeculativeResult) -> None:
    """The proof the run must give: the head drafted tokens, and greedy speculative decoding printed
    what plain greedy decoding printed. EvalError (with where the logs are) when not."""
    logs = f"the tools' logs: {result.log_dir}" if result.log_dir else None
    if result.with_head.n_drafted == 0:
        raise EvalError(f"llama.cpp drafted no token with the MTP head ({result.plan.head})",
                        where=str(result.plan.model), hint=logs)
    if result.same_output:
        return
    a, b = result.with_head.pieces, result.without.pieces
    at = next((i for i in range(min(len(a), len(b))) if a[i] != b[i]), min(len(a), len(b)))
    raise EvalError(
        f"greedy generation with the MTP head differs from generation without it at token {at + 1} "
        f"({len(a)} and {len(b)} tokens generated): {''.join(a[max(0, at - 3):at + 3])!r} vs "
        f"{''.join(b[max(0, at - 3):at + 3])!r}", where=str(result.plan.model),
        hint="speculative decoding must not change greedy output: the head, the file or llama.cpp is broken"
             + (f"; {logs}" if logs else ""))


def format_result(result: SpeculativeResult) -> str:
    """A short table: both runs' draft counts and speeds, then acceptance, speed ratio, output."""
    rows = [("", "drafted", "accepted", "generated", "decode t/s")]
    for label, r in (("with MTP head", result.with_head), ("without", result.without)):
        rows.append((label, str(r.n_drafted), str(r.n_accept), str(r.n_predict), f"{r.tokens_per_s:.2f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in rows]
    acc = result.acceptance
    lines += ["",
              f"head          {result.plan.head}",
              f"acceptance    {'-' if acc is None else f'{100 * acc:.1f}%'} of drafted tokens",
              f"speed ratio   {result.speed_ratio:.3f} (decode tokens/s with the head / without)",
              f"same output   {'yes' if result.same_output else 'NO'} "
              f"({min(len(result.with_head.pieces), len(result.without.pieces))} tokens compared)",
              f"llama.cpp     {result.build}"]
    return "\n".join(lines)
