"""What an evaluation gives: `EvalResult` (and its `SpeedResult`), as JSON and as text.

Takes: the facts and settings the run used, the numbers a backend computed.
Gives: one record both backends fill the same way, its JSON round trip (cards and releases
store it), and `format_result`, the text `apex-orch eval` prints: our header, then
llama-perplexity's own lines and names, so a reader can put the two side by side.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Mapping

from apex_orch.evaluation.inputs import ModelFacts, TextFacts
from apex_orch.evaluation.statistics import KLD_LINES, KLDStats


@dataclass
class SpeedResult:
    """llama-bench-like throughput through the bindings (random tokens, empty cache)."""
    pp_tokens: int
    pp_tokens_per_s: float
    tg_tokens: int
    tg_tokens_per_s: float
    n_threads: int
    n_batch: int
    n_ubatch: int
    flash_attn: bool
    repetitions: int


@dataclass
class EvalResult:
    model: ModelFacts
    backend: str
    settings: dict
    text: TextFacts
    n_tokens: int | None        # tokens in the text (with BOS); None: llama-perplexity does not print it
    n_chunks: int
    n_scored: int               # tokens scored in total
    ppl: float
    ppl_err: float
    base: ModelFacts | None = None
    base_ppl: float | None = None        # exact base PPL (perplexity mode) when a base is given
    base_ppl_err: float | None = None
    kld: KLDStats | None = None
    speed: SpeedResult | None = None
    seconds: float = 0.0
    eval_tokens_per_s: float | None = None  # decode throughput during the evaluation
    llama_build: str = ""
    cache: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def ppl_ratio(self) -> float | None:
        return self.kld.mean_ppl_ratio if self.kld else None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, ensure_ascii=False, allow_nan=True)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "EvalResult":
        d = dict(data)
        d["model"] = ModelFacts(**d["model"])
        d["text"] = TextFacts(**d["text"])
        d["base"] = ModelFacts(**d["base"]) if d.get("base") else None
        d["kld"] = KLDStats(**d["kld"]) if d.get("kld") else None
        d["speed"] = SpeedResult(**d["speed"]) if d.get("speed") else None
        return cls(**d)


def format_result(result: EvalResult) -> str:
    """Human-readable result: our header, then llama-perplexity's own lines and names."""
    s = result.settings
    tokens = "?" if result.n_tokens is None else str(result.n_tokens)
    out = [f"model:    {result.model.path} [{result.model.tier}, {result.model.bpw:.2f} bpw, "
           f"{result.model.size_bytes / 2**20:.1f} MiB]",
           f"backend:  {result.backend} (ctx {s['n_ctx']}, batch {s['n_batch']}, ubatch {s['n_ubatch']}, "
           f"threads {s['n_threads']}, flash-attn {'on' if s['flash_attn'] else 'off'}, "
           f"repack {'on' if s.get('repack') else 'off'})",
           f"text:     {result.text.label} ({tokens} tokens, {result.n_chunks} chunks, {result.n_scored} scored)"]
    if result.base is not None and result.base_ppl is not None:
        out.append(f"base:     {result.base.path} (PPL {result.base_ppl:.4f} +/- {result.base_ppl_err:.5f})")
    out.append(f"Final estimate: PPL = {result.ppl:.4f} +/- {result.ppl_err:.5f}")
    if result.kld is not None:
        k = result.kld
        out += ["", "====== Perplexity statistics ======"]
        for label, name, err, unit in KLD_LINES:
            if name == "kld_mean":
                out += ["", "====== KL divergence statistics ======"]
            elif name == "dp_mean":
                out += ["", "====== Token probability statistics ======"]
            value = getattr(k, name)
            if unit == "%":
                text = f"{value:6.3f}" + (f" ± {getattr(k, err):5.3f} %" if err else "%")
            else:
                text = f"{value:10.6f}" + (f" ± {getattr(k, err):10.6f}" if err else "")
            pad = 30 if name.startswith(("mean_ppl", "cor", "mean_ln")) else 0
            out.append(f"{label:<{pad}}: {text}" if pad else f"{label}: {text}")
    if result.speed is not None:
        sp = result.speed
        out += ["", f"speed:    pp{sp.pp_tokens} {sp.pp_tokens_per_s:.1f} t/s, tg{sp.tg_tokens} "
                    f"{sp.tg_tokens_per_s:.1f} t/s (threads {sp.n_threads}, ubatch {sp.n_ubatch}, "
                    f"flash-attn {'on' if sp.flash_attn else 'off'}, {sp.repetitions} run(s))"]
    return "\n".join(out)
