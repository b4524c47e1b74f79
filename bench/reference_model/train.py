"""Build the trained reference MoE: text -> tokens -> training -> F16 GGUF -> validation -> cache.

    .venv/bin/python -m bench.reference_model.train              # full model, results to bench/results/
    .venv/bin/python -m bench.reference_model.train --force      # retrain even when cached
    .venv/bin/python -m bench.reference_model.train --config smoke --out-dir /tmp/x --no-results
    .venv/bin/python -m bench.reference_model.train --set steps=50   # experiment (own cache key)

The GGUF lands at <cache>/models/reference-moe-<key>.gguf (cache = apex_orch.core.settings.cache_root()),
next to reference-moe-<key>.json (the full record: config, data, training, validation) and the
held-out texts reference-moe-<key>.heldout-{code,prose}.txt. <key> hashes the config, the
selected text, the code that determines the weights, torch's version and the llama.cpp pin,
so a rerun with the cache present does nothing. Training leaves reference-moe-<key>.unvalidated.gguf;
the export check promotes it to the final name only when it passes (a failed check keeps the
trained file, and the next run re-checks it without training again).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import hashlib
import json
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Callable

if __package__ in (None, ""):  # run as a script (`python bench/reference_model/train.py`):
    # import this folder as the package `bench.reference_model`, and keep its modules (data.py,
    # model.py, ...) from shadowing top-level names by replacing the script folder on sys.path.
    sys.path[0] = str(Path(__file__).resolve().parents[2])
    __package__ = "bench.reference_model"  # noqa: A001

# Let idle OpenMP threads sleep instead of spinning: on a shared 2-core machine spinning threads
# fight the other processes and a training step takes 3-8x longer (measured: 24-36 s vs 7-14 s
# per step at load 5); on an idle machine it costs ~15%. Must be set before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402

from apex_orch.core import settings  # noqa: E402
from apex_orch.llama import pin  # noqa: E402
from apex_orch.demo import synthetic  # noqa: E402
from apex_orch.llama.tools import build_label  # noqa: E402

from . import data  # noqa: E402
from .config import CONFIGS, FULL, RefConfig  # noqa: E402
from .vocab import Vocab  # noqa: E402

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
RESULTS_DIR = REPO / "bench" / "results"
# The files whose content determines the trained weights (train.py/validate.py only orchestrate
# and check, so editing them does not retrain).
WEIGHT_CODE = ("config.py", "data.py", "bpe.py", "vocab.py", "model.py", "trainer.py")
FORMAT_VERSION = 2


def code_sha256() -> str:
    h = hashlib.sha256()
    for name in WEIGHT_CODE:
        h.update(name.encode() + b"\0" + (HERE / name).read_bytes() + b"\0")
    return h.hexdigest()


def cache_key(cfg: RefConfig, corpus_sha: str, device: str = "cpu") -> str:
    import torch

    material = {
        "format": FORMAT_VERSION, "config": cfg.asdict(), "data": corpus_sha, "code": code_sha256(),
        "torch": torch.__version__, "pin": pin.PIN_KEY, "writer": synthetic.GENERATOR_VERSION,
    }
    if cfg.vocab == "bpe":
        import tokenizers

        material["tokenizers"] = tokenizers.__version__
    if device != "cpu":   # GPU kernels round differently: another model of the same configuration
        material["device"] = device
    blob = json.dumps(material, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def default_out_dir() -> Path:
    return settings.cache_root() / "models"


def paths(out_dir: Path, key: str) -> dict[str, Path]:
    stem = f"reference-moe-{key}"
    return {
        "gguf": out_dir / f"{stem}.gguf",
        "record": out_dir / f"{stem}.json",
        "heldout_code": out_dir / f"{stem}.heldout-code.txt",
        "heldout_prose": out_dir / f"{stem}.heldout-prose.txt",
        "unvalidated": out_dir / f"{stem}.unvalidated.gguf",
        "training": out_dir / f"{stem}.training.json",
        "staging": out_dir / f".{stem}.staging-{os.getpid()}.gguf",
        "tokenizer": out_dir / f"{stem}.tokenizer.json",
        "vocab": out_dir / f"{stem}.vocab.gguf",
        "log_dir": out_dir / f"{stem}.logs",
    }


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _param_kind(name: str) -> str:
    if name.endswith("_exps.weight"):
        return "routed_experts"
    if name.endswith("_shexp.weight"):
        return "shared_expert"
    if name in ("token_embd.weight", "output.weight"):
        return "embedding_and_output"
    if "norm" in name or "ffn_gate_inp" in name:
        return "norms_and_router"
    return "attention"


def param_counts(cfg: RefConfig, n_vocab: int) -> dict:
    shapes = synthetic.tensor_shapes(cfg.spec(), n_vocab)
    total = sum(math.prod(s) for s in shapes.values())
    by_kind: dict[str, int] = {}
    for name, shape in shapes.items():
        by_kind[_param_kind(name)] = by_kind.get(_param_kind(name), 0) + math.prod(shape)
    routed = by_kind.get("routed_experts", 0)
    inactive = routed * (cfg.n_expert - cfg.n_expert_used) // cfg.n_expert
    embd = math.prod(shapes["token_embd.weight"])
    return {"total": total, "active": total - inactive, "active_without_token_embd": total - inactive - embd,
            "routed_experts": routed, "tensors": len(shapes), "by_kind": by_kind,
            "share": {k: round(v / total, 4) for k, v in by_kind.items()}}


def environment() -> dict:
    import torch

    from bench.common import cpu_model

    return {
        "date_utc": dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat(),
        "git_commit": git_commit(),
        "nproc": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "cpu_model": cpu_model(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "llama_cpp": build_label(),
    }


def _loadavg() -> float | None:
    """1-minute load average: other processes on the machine slow training down."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def git_commit() -> str | None:
    """HEAD of the repo, read from .git (no subprocess)."""
    git = REPO / ".git"
    try:
        head = (git / "HEAD").read_text().strip()
        if not head.startswith("ref: "):
            return head
        ref = head[5:]
        if (git / ref).is_file():
            return (git / ref).read_text().strip()
        for line in (git / "packed-refs").read_text().splitlines():
            if line.endswith(" " + ref):
                return line.split()[0]
    except OSError:
        return None
    return None


def _as_tool_reads(texts: dict[str, str]) -> dict[str, str]:
    """Each text as llama-perplexity -f tokenizes its file: one trailing newline dropped."""
    return {d: t[:-1] if t.endswith("\n") else t for d, t in texts.items()}


def _vocabulary(cfg: RefConfig, corpus: data.Corpus, p: dict[str, Path], force: bool,
                log: Callable[[str], None]) -> tuple[Vocab, list | None, dict]:
    """The model's tokenizer: the pinned llama-spm vocabulary, or a BPE trained on the training
    text (kept beside the model as <stem>.tokenizer.json and <stem>.vocab.gguf). A BPE must encode
    the held-out and training text exactly as llama.cpp does with the GGUF form, token for token."""
    if cfg.vocab == "llama-spm":
        voc = Vocab(None)
        return voc, None, {"kind": "llama-spm", "n_vocab": voc.n_vocab(), "source": synthetic.VOCAB_GGUF_NAME}
    if cfg.vocab != "bpe":
        raise ValueError(f"vocab must be 'llama-spm' or 'bpe', got {cfg.vocab!r}")
    import tokenizers

    from . import bpe

    t0 = time.monotonic()
    if not force and p["tokenizer"].is_file() and p["vocab"].is_file():
        tok = bpe.from_json(p["tokenizer"].read_text(encoding="utf-8"))
        log(f"BPE vocabulary: reusing {p['tokenizer'].name}")
    else:
        tok = bpe.train([corpus.train[d] for d in sorted(corpus.train)], cfg.bpe_vocab_size)
        _atomic_write(p["tokenizer"], tok.to_str())
        synthetic.write_vocab_only(p["vocab"], cfg.spec(), bpe.gguf_tokenizer_kv(tok), overwrite=True)
    train_s = time.monotonic() - t0
    kv = bpe.gguf_tokenizer_kv(tok)
    voc = Vocab(p["vocab"])
    t0 = time.monotonic()
    texts = {f"heldout/{d}": t for d, t in _as_tool_reads(corpus.heldout).items()}
    texts.update({f"train/{d}": t for d, t in corpus.train.items()})
    agreement = bpe.check_same_tokens(tok, voc.tokenize, texts)
    log(f"BPE vocabulary: {voc.n_vocab()} tokens; llama.cpp and tokenizers {tokenizers.__version__} encode "
        f"identically: {agreement} ({time.monotonic() - t0:.1f}s)")
    record = {"kind": "bpe", "n_vocab": voc.n_vocab(), "tokenizers": tokenizers.__version__,
              "gguf_model": "gpt2", "gguf_pre": "gpt-2", "train_seconds": round(train_s, 1),
              "sha256": hashlib.sha256(p["tokenizer"].read_bytes()).hexdigest(),
              "identical_encoding_tokens": agreement}
    return voc, kv, record


def build(cfg: RefConfig = FULL, *, out_dir: Path | None = None, force: bool = False,
          run_perplexity_tool: bool = True, log: Callable[[str], None] = print,
          corpus: data.Corpus | None = None, checkpoints: int = 0, expert_share: bool = False,
          device: str = "cpu") -> dict:
    """Build (or find in the cache) the reference model; returns its record (see module doc).

    Two phases, each leaving a file behind: training writes `<stem>.unvalidated.gguf` (+ the
    training record), the export check then promotes it to `<stem>.gguf`. A failed check keeps
    the unvalidated file, so the next run re-checks it without training again.
    """
    t_start = time.monotonic()
    out_dir = Path(out_dir) if out_dir else default_out_dir()
    corpus = corpus or data.collect(cfg.code_bytes, cfg.prose_bytes, heldout_bytes=cfg.heldout_bytes)
    corpus_sha = corpus.sha256()
    key = cache_key(cfg, corpus_sha, device)
    p = paths(out_dir, key)
    if not force and p["gguf"].is_file() and p["record"].is_file():
        log(f"reference model is cached: {p['gguf']}")
        record = json.loads(p["record"].read_text())
        if expert_share and "expert_share" not in record:
            _add_expert_evidence(cfg, p, record, log)
        return record
    out_dir.mkdir(parents=True, exist_ok=True)
    p["log_dir"].mkdir(exist_ok=True)
    log(f"data: {corpus.manifest['bytes']} (sha256 {corpus_sha[:16]})")
    voc, tokenizer_kv, vocab_record = _vocabulary(cfg, corpus, p, force, log)
    bos, n_vocab = voc.bos_id(), voc.n_vocab()

    if force or not (p["unvalidated"].is_file() and p["training"].is_file()):
        training = _train_and_export(cfg, corpus, p, voc, tokenizer_kv, log, checkpoints, device)
    else:
        training = json.loads(p["training"].read_text())
        log(f"reusing the trained, not yet validated {p['unvalidated']}")

    t0 = time.monotonic()
    heldout = {d: np.concatenate(([bos], voc.tokenize(t))) for d, t in _as_tool_reads(corpus.heldout).items()}
    for domain in ("code", "prose"):
        _atomic_write(p[f"heldout_{domain}"], corpus.heldout[domain])
    reports = _validate(cfg, p, heldout, bos, n_vocab, run_perplexity_tool, log)
    validate_s = time.monotonic() - t0
    failures = [f for r in reports.values() for f in r.failures()]
    if failures:
        raise RuntimeError("export check failed (the trained model stays at "
                           f"{p['unvalidated']}; rerun to re-check it):\n  " + "\n  ".join(failures))
    os.replace(p["unvalidated"], p["gguf"])

    from . import validate
    record = {
        "format": FORMAT_VERSION,
        "cache_key": key,
        "model": {"path": str(p["gguf"]), "size_bytes": p["gguf"].stat().st_size, "arch": "mistral4",
                  "file_type": "F16 (norms and router F32)", "n_vocab": n_vocab,
                  "params": param_counts(cfg, n_vocab)},
        "vocabulary": vocab_record,
        "config": cfg.asdict(),
        "data": {**corpus.manifest, "sha256": corpus_sha, "train_tokens": training["train_tokens"],
                 "heldout_tokens": {d: int(len(s)) for d, s in heldout.items()},
                 "heldout_text": {"code": str(p["heldout_code"]), "prose": str(p["heldout_prose"])}},
        "training": training["training"],
        "validation": {
            "uniform_ppl": float(n_vocab),
            "tolerances": {"mean_kld": validate.TOL_MEAN_KLD, "top1_agreement_min": validate.TOL_TOP1,
                           "p999_abs_target_logp": validate.TOL_P999_TARGET_LOGP,
                           "max_abs_target_logp": validate.TOL_MAX_TARGET_LOGP,
                           "routing_margin_reported": validate.ROUTING_MARGIN,
                           "ppl_rel": validate.TOL_PPL_REL,
                           "llama_perplexity_vs_bindings_rel": validate.TOL_TOOL_REL},
            "domains": {d: dataclasses.asdict(r) for d, r in reports.items()},
            "passed": True,
        },
        "timing_seconds": {**training["timing_seconds"], "validate": round(validate_s, 1),
                           "this_run_total": round(time.monotonic() - t_start, 1)},
        "environment": {**environment(), "loadavg_1min_start_end": [training["loadavg_1min_start"], _loadavg()]},
    }
    record["checkpoints"] = training.get("checkpoints", {})
    _atomic_write(p["record"], json.dumps(record, indent=2) + "\n")
    p["training"].unlink(missing_ok=True)
    log(f"reference model: {p['gguf']}")
    if expert_share:   # after the record is written: a failure here never costs the training
        _add_expert_evidence(cfg, p, record, log)
    return record


def _add_expert_evidence(cfg: RefConfig, p: dict[str, Path], record: dict, log: Callable[[str], None]) -> None:
    t0 = time.monotonic()
    record["expert_share"] = _expert_evidence(cfg, p, record, log)
    record["timing_seconds"]["expert_share"] = round(time.monotonic() - t0, 1)
    _atomic_write(p["record"], json.dumps(record, indent=2) + "\n")


def _expert_evidence(cfg: RefConfig, p: dict[str, Path], training: dict, log: Callable[[str], None]) -> dict:
    """The expert share of the IQ2_S damage (expert_share.py) on the final model, both held-out
    domains, and on each training checkpoint (the curve against training tokens). Each file gets
    its own imatrix from the `diverse` corpus, as the quality benchmarks do."""
    from apex_orch.calibration import imatrix as im

    from . import expert_share

    texts = {d: p[f"heldout_{d}"] for d in ("code", "prose")}

    def one(model: Path, domains: dict[str, Path]) -> dict:
        plan = im.plan_imatrix(model, "diverse", ctx=cfg.seq_len, threads=cfg.threads)
        imatrix = im.run_imatrix(plan)
        return expert_share.measure(model, domains, imatrix=Path(imatrix), chunks=cfg.eval_chunks // 2,
                                    ctx=cfg.seq_len, threads=cfg.threads, log=log)

    final = one(p["gguf"], texts)
    tokens_per_step = cfg.batch_seqs * cfg.seq_len
    curve = []
    for step, path in sorted((int(k), Path(v)) for k, v in training.get("checkpoints", {}).items()):
        if path.is_file():
            r = one(path, {"code": texts["code"]})
            curve.append({"step": step, "tokens": step * tokens_per_step, "share": r["domains"]["code"]["share"],
                          "all": r["domains"]["code"]["all"], "routed_only": r["domains"]["code"]["routed_only"]})
    curve.append({"step": cfg.steps, "tokens": cfg.steps * tokens_per_step,
                  "share": final["domains"]["code"]["share"], "all": final["domains"]["code"]["all"],
                  "routed_only": final["domains"]["code"]["routed_only"]})
    return {"final": final, "curve": curve}


def _export(cfg: RefConfig, model, dest: Path, staging: Path, tokenizer_kv: list | None) -> None:
    from .model import gguf_weights

    weights = gguf_weights(model)
    missing = set(synthetic.tensor_names(cfg.spec())) - set(weights)
    if missing:  # write_model would fill these with random data
        raise RuntimeError(f"export is missing tensors: {sorted(missing)[:5]}")
    try:
        synthetic.write_model(staging, cfg.spec(), weights=weights, overwrite=True, tokenizer=tokenizer_kv)
        os.replace(staging, dest)
    finally:
        staging.unlink(missing_ok=True)


def checkpoint_paths(p: dict[str, Path], steps: int, n: int) -> dict[int, Path]:
    """Step -> GGUF of the model after that many steps, for n evenly spaced checkpoints before
    the end (the expert-share curve measures them)."""
    return {steps * (i + 1) // (n + 1): p["gguf"].with_name(p["gguf"].stem + f".step{steps * (i + 1) // (n + 1)}.gguf")
            for i in range(n)}


def _train_and_export(cfg: RefConfig, corpus: data.Corpus, p: dict[str, Path], voc: Vocab,
                      tokenizer_kv: list | None, log: Callable[[str], None], checkpoints: int = 0,
                      device: str = "cpu") -> dict:
    """Tokenize, train, write <stem>.unvalidated.gguf (+ checkpoints) and <stem>.training.json."""
    from . import trainer  # torch is imported only when a build is really needed

    load_start = _loadavg()
    t_start = t0 = time.monotonic()
    streams = {d: voc.tokenize(t) for d, t in corpus.train.items()}
    tokenize_s = time.monotonic() - t0
    log(f"training tokens: {({d: len(s) for d, s in streams.items()})} ({tokenize_s:.1f}s)")
    ckpt = checkpoint_paths(p, cfg.steps, checkpoints)

    def on_step(step: int, model) -> None:
        if step in ckpt:
            _export(cfg, model, ckpt[step], p["staging"], tokenizer_kv)
            log(f"checkpoint after {step} steps: {ckpt[step].name}")

    result = trainer.train(cfg, streams, voc.bos_id(), voc.n_vocab(), log=log, on_step=on_step, device=device)
    log(f"trained {cfg.steps} steps in {result.seconds:.1f}s (CPU {result.cpu_seconds:.1f}s); "
        f"loss {result.loss_first:.3f} -> {result.loss_last:.3f}")

    t0 = time.monotonic()
    _export(cfg, result.model, p["unvalidated"], p["staging"], tokenizer_kv)
    export_s = time.monotonic() - t0
    training = {
        "train_tokens": {d: int(len(s)) for d, s in streams.items()},
        "checkpoints": {str(step): str(path) for step, path in ckpt.items()},
        "training": {"seconds": round(result.seconds, 1), "cpu_seconds": round(result.cpu_seconds, 1),
                     "tokens_seen": result.tokens_seen, "steps": cfg.steps,
                     "loss_first10": round(result.loss_first, 4), "loss_last10": round(result.loss_last, 4),
                     "history": result.history},
        "timing_seconds": {"tokenize": round(tokenize_s, 1), "train": round(result.seconds, 1),
                           "export": round(export_s, 1),
                           "tokenize_train_export": round(time.monotonic() - t_start, 1)},
        "loadavg_1min_start": load_start,
    }
    _atomic_write(p["training"], json.dumps(training, indent=2) + "\n")
    return training


def _validate(cfg: RefConfig, p: dict[str, Path], heldout: dict[str, np.ndarray], bos: int, n_vocab: int,
              run_perplexity_tool: bool, log: Callable[[str], None]) -> dict:
    """The export check on <stem>.unvalidated.gguf: torch (weights read back from the file)
    against llama.cpp on the held-out chunks, plus llama-perplexity."""
    import torch

    from . import validate
    from .model import RefMoE, load_gguf

    torch.set_num_threads(cfg.threads)
    model = RefMoE(cfg, n_vocab)
    load_gguf(model, p["unvalidated"])
    model.eval()
    runner = validate.LlamaRunner(p["unvalidated"], cfg.seq_len, cfg.threads)
    try:
        reports = {d: validate.compare(model, runner, d, heldout[d], cfg.seq_len, cfg.eval_chunks, bos)
                   for d in ("code", "prose")}
    finally:
        runner.close()
    if run_perplexity_tool:
        for domain in ("code", "prose"):
            reports[domain].ppl_llama_perplexity_tool = validate.llama_perplexity_tool(
                p["unvalidated"], p[f"heldout_{domain}"], cfg.seq_len, cfg.eval_chunks, cfg.threads,
                log_path=p["log_dir"] / f"llama-perplexity-{domain}.log")
            if reports[domain].ppl_llama_perplexity_tool is None:
                log(f"warning: llama-perplexity lost its final output lines on every attempt ({domain})")
    for r in reports.values():
        log(f"{r.domain}: PPL torch {r.ppl_torch:.3f} llama.cpp {r.ppl_llama:.3f} "
            f"(llama-perplexity {r.ppl_llama_perplexity_tool}); mean KLD {r.mean_kld:.2e}, "
            f"top-1 {r.top1_agreement:.4f}, |dlogp| mean {r.mean_abs_target_logp:.2e} "
            f"p99.9 {r.p999_abs_target_logp:.4f} max {r.max_abs_target_logp:.4f} "
            f"(clear routing {r.max_abs_target_logp_clear:.4f}; {r.ambiguous_routing_positions} ambiguous), "
            f"max |dlogit| {r.max_abs_logit:.4f}")
    return reports


# ----------------------------------------------------------------------------- results

def _vocab_label(rec: dict) -> str:
    v = rec.get("vocabulary", {"kind": "llama-spm"})
    if v["kind"] == "bpe":
        agree = sum(n for k, n in v["identical_encoding_tokens"].items() if k.startswith("heldout/"))
        return (f"byte-level BPE trained on the training text, {rec['model']['n_vocab']} tokens (llama.cpp "
                f"`gpt2`/`gpt-2`); "
                f"llama.cpp and tokenizers {v['tokenizers']} encode all {agree:,} held-out tokens identically")
    return f"llama-spm, {rec['model']['n_vocab']} tokens"


def results_markdown(rec: dict) -> str:
    env, cfg, par = rec["environment"], rec["config"], rec["model"]["params"]
    val, tr, tm = rec["validation"], rec["training"], rec["timing_seconds"]
    tol = val["tolerances"]
    lines = [
        "# Reference model (trained mistral4 MoE)",
        "",
        f"Built {env['date_utc']} at commit `{(env['git_commit'] or 'unknown')[:12]}` on {env['nproc']} CPU(s) "
        f"({env['cpu_model']}), torch {env['torch']}, {env['llama_cpp']}.",
        "Rebuild: `make reference-model` (`python -m bench.reference_model.train`); see "
        "`bench/reference_model/README.md`.",
        "",
        "| | |",
        "|---|---|",
        f"| architecture | mistral4 (MLA + {cfg['n_expert']} routed experts, top-{cfg['n_expert_used']}, "
        f"{cfg['n_expert_shared']} shared) |",
        f"| blocks / n_embd / heads | {cfg['n_layer']} / {cfg['n_embd']} / {cfg['n_head']} |",
        f"| MLA q_lora / kv_lora / nope / rope / v | {cfg['q_lora_rank']} / {cfg['kv_lora_rank']} / "
        f"{cfg['qk_nope']} / {cfg['qk_rope']} / {cfg['v_head']} |",
        f"| expert FFN | {cfg['expert_ff']} |",
        f"| vocabulary | {_vocab_label(rec)} |",
        f"| parameters in the GGUF, total / active per token | {par['total'] / 1e6:.2f} M / {par['active'] / 1e6:.2f} "
        f"M ({par['active_without_token_embd'] / 1e6:.2f} M without token_embd) |",
        f"| GGUF | {rec['model']['size_bytes'] / 2**20:.1f} MiB, {rec['model']['file_type']} |",
        f"| training text | {rec['data']['train_tokens']['code']:,} code + {rec['data']['train_tokens']['prose']:,} "
        f"prose tokens (Python {rec['data']['python']} stdlib sources + pydoc topics) |",
        f"| training | {tr['steps']} steps x {cfg['batch_seqs']} x {cfg['seq_len']} tokens = {tr['tokens_seen']:,} "
        f"tokens, {cfg['threads']} threads, loss {tr['loss_first10']:.3f} -> {tr['loss_last10']:.3f} |",
        f"| time (s) | tokenize {tm['tokenize']}, train {tm['train']} (process CPU {tr['cpu_seconds']}), "
        f"export {tm['export']}, validate {tm['validate']} |",
        f"| machine load (1-min load average at start / end) | "
        f"{' / '.join(str(x) for x in env.get('loadavg_1min_start_end', ['n/a']))} on {env['nproc']} CPU(s) |",
        "",
        f"## Held-out perplexity (uniform over the vocabulary: {val['uniform_ppl']:.0f})",
        "",
        "| domain | chunks x n_ctx | scored tokens | PPL torch | PPL llama.cpp (bindings) | PPL llama-perplexity |",
        "|---|---|---|---|---|---|",
    ]
    for d, r in val["domains"].items():
        tool = r["ppl_llama_perplexity_tool"]
        lines.append(f"| {d} | {r['n_chunks']} x {r['n_ctx']} | {r['scored_tokens']:,} | {r['ppl_torch']:.3f} | "
                     f"{r['ppl_llama']:.3f} | {'n/a' if tool is None else f'{tool:.3f}'} |")
    lines += [
        "",
        "## Export check: PyTorch vs llama.cpp on the same tokens (every position of every chunk)",
        "",
        "The torch side evaluates the weights read back from the GGUF, in F32; llama.cpp rounds activations "
        "to F16 inside its F16 matmuls and keeps the KV cache in F16, which is the whole difference. "
        f"A token is *ambiguous* when, in some block, its last chosen expert and the best unchosen one "
        f"differ by less than {tol['routing_margin_reported']} in router probability: that noise can swap them. "
        "The tolerances sit between measured controls: see `reference-model-controls.md`.",
        "",
        "| domain | positions | mean KLD | max KLD | top-1 agreement | mean abs dlog p(next) | p99.9 | max | "
        "ambiguous tokens | max, unambiguous | max abs logit diff |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for d, r in val["domains"].items():
        lines.append(f"| {d} | {r['positions_compared']:,} | {r['mean_kld']:.2e} | {r['max_kld']:.2e} | "
                     f"{r['top1_agreement']:.4f} | {r['mean_abs_target_logp']:.2e} | {r['p999_abs_target_logp']:.4f} | "
                     f"{r['max_abs_target_logp']:.4f} | {r['ambiguous_routing_positions']} | "
                     f"{r['max_abs_target_logp_clear']:.4f} | {r['max_abs_logit']:.4f} |")
    lines += [
        f"| tolerance | | <= {tol['mean_kld']} | | >= {tol['top1_agreement_min']} | | <= "
        f"{tol['p999_abs_target_logp']} | <= {tol['max_abs_target_logp']} | | | |",
        "",
        f"Held-out PPL from llama.cpp must be within {tol['ppl_rel']:.1%} of torch's, and llama-perplexity's within "
        f"{tol['llama_perplexity_vs_bindings_rel']:.2%} of the bindings'. dlog p(next) is the difference of the "
        "log-probability given to the actual next token, in nats.",
        "",
        "Expert routing on held-out text (share of routed assignments, any block): "
        + ", ".join(f"{d} min {r['expert_share_min']:.3f} / max {r['expert_share_max']:.3f}"
                    for d, r in val["domains"].items())
        + f" (uniform would be {1 / cfg['n_expert']:.4f}).",
        "",
    ]
    return "\n".join(lines + _shape_markdown(rec))


def _shape_markdown(rec: dict) -> list[str]:
    """Is this model shaped like a real MoE? Weights by kind, routing spread, expert share of the damage."""
    cfg, par = rec["config"], rec["model"]["params"]
    if "by_kind" not in par:
        return []
    names = {"routed_experts": "routed experts", "shared_expert": "shared expert", "attention": "attention (MLA)",
             "embedding_and_output": "token_embd + output", "norms_and_router": "norms + router"}
    lines = ["## Shape: where the weights are", "",
             "| kind | parameters | share |", "|---|---|---|"]
    lines += [f"| {names.get(k, k)} | {v:,} | {par['share'][k]:.1%} |"
              for k, v in sorted(par["by_kind"].items(), key=lambda kv: -kv[1])]
    lines += [f"| total | {par['total']:,} | |", ""]
    val = rec["validation"]["domains"]
    if all("expert_token_fraction_min" in r for r in val.values()):
        lines += ["Routing spread on held-out text: the least-used expert of any block is chosen for "
                  + ", ".join(f"{r['expert_token_fraction_min']:.2%} of the {d} positions" for d, r in val.items())
                  + f" (uniform: {cfg['n_expert_used'] / cfg['n_expert']:.1%}; required: at least 0.5%).", ""]
    share = rec.get("expert_share")
    if share:
        f = share["final"]
        lines += [f"## Do the routed experts carry weight? ({f['type']}, imatrix from `diverse`)", "",
                  f"Mean KLD against the F16 model with only the {f['routed_tensors']} routed-expert tensors at "
                  f"{f['type']} (everything else F16), against every typed tensor at {f['type']}; "
                  f"{f['chunks']} chunks x {f['ctx']} per held-out domain. Required: share >= {f['target']:.0%}.", "",
                  "| domain | routed experts only | all tensors | share |", "|---|---|---|---|"]
        lines += [f"| {d} | {r['routed_only']:.5f} ± {r['routed_only_err']:.5f} | {r['all']:.5f} ± {r['all_err']:.5f} "
                  f"| {r['share']:.1%} |" for d, r in f["domains"].items()]
        lines += ["", "The share against training (code domain; one checkpoint per row):", "",
                  "| step | training tokens | routed experts only | all tensors | share |", "|---|---|---|---|---|"]
        lines += [f"| {c['step']} | {c['tokens']:,} | {c['routed_only']:.5f} | {c['all']:.5f} | {c['share']:.1%} |"
                  for c in share["curve"]]
        lines.append("")
    return lines


def _no_machine_paths(obj, *, key: str | None = None):
    """The committed results name no path of the machine that built them: the cache as <cache>,
    the standard library as <python stdlib>."""
    cache = str(settings.cache_root())
    if isinstance(obj, dict):
        return {k: _no_machine_paths(v, key=k) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_no_machine_paths(v) for v in obj]
    if isinstance(obj, str):
        if key == "stdlib":
            return "<python stdlib>"
        if obj.startswith(cache + os.sep):
            return "<cache>" + obj[len(cache):]
    return obj


def write_results(rec: dict, results_dir: Path = RESULTS_DIR) -> tuple[Path, Path]:
    results_dir.mkdir(parents=True, exist_ok=True)
    public = {k: v for k, v in rec.items() if k != "training"}
    public["training"] = {k: v for k, v in rec["training"].items() if k != "history"}
    public["training"]["loss_curve"] = [(h["step"], h["loss"]) for h in rec["training"]["history"]]
    public["model"] = {**rec["model"], "path": "<cache>/models/" + Path(rec["model"]["path"]).name}
    public = _no_machine_paths(public)
    jpath, mpath = results_dir / "reference-model.json", results_dir / "reference-model.md"
    _atomic_write(jpath, json.dumps(public, indent=2) + "\n")
    _atomic_write(mpath, results_markdown(rec))
    return jpath, mpath


def _parse_overrides(items: list[str], base: RefConfig) -> RefConfig:
    fields = {f.name: f for f in dataclasses.fields(RefConfig)}
    changes = {}
    for item in items:
        name, _, raw = item.partition("=")
        if name not in fields:
            raise SystemExit(f"--set: unknown config field {name!r}")
        current = getattr(base, name)
        if raw.lower() == "none":
            changes[name] = None
        elif isinstance(current, bool):
            changes[name] = raw.lower() in ("1", "true", "yes")
        elif isinstance(current, int) or name.endswith("_bytes"):
            changes[name] = int(raw)
        elif isinstance(current, float):
            changes[name] = float(raw)
        else:
            changes[name] = raw
    return dataclasses.replace(base, **changes)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", choices=tuple(CONFIGS), default="full")
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="cpu",
                    help="where to train (auto: a CUDA GPU when torch sees one); a GPU-trained model has its own "
                         "cache key")
    ap.add_argument("--checkpoints", type=int, default=None, metavar="N",
                    help="export N evenly spaced checkpoints for the expert-share curve (default 3 for full, else 0)")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                    help="override a RefConfig field (changes the cache key)")
    ap.add_argument("--out-dir", type=Path, help="where the model goes (default <cache>/models)")
    ap.add_argument("--force", action="store_true", help="retrain even when the cache has the model")
    ap.add_argument("--no-results", action="store_true", help="do not write bench/results/reference-model.*")
    ap.add_argument("--no-perplexity-tool", action="store_true", help="skip the llama-perplexity cross-check")
    ap.add_argument("--no-expert-share", action="store_true",
                    help="skip the expert-share measurement (IQ2_S experts only vs all tensors, and its curve)")
    args = ap.parse_args(argv)
    cfg = _parse_overrides(args.set, CONFIGS[args.config])
    checkpoints = args.checkpoints if args.checkpoints is not None else (3 if args.config == "full" else 0)

    def log(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)

    out_dir = args.out_dir or default_out_dir()
    pre = data.collect(cfg.code_bytes, cfg.prose_bytes, heldout_bytes=cfg.heldout_bytes)
    from .trainer import pick_device
    device = pick_device(args.device).type
    key = cache_key(cfg, pre.sha256(), device)
    cached = paths(out_dir, key)
    if not args.force and cached["gguf"].is_file() and cached["record"].is_file():
        rec = json.loads(cached["record"].read_text())
        if args.no_expert_share or "expert_share" in rec:
            log(f"up to date: {cached['gguf']} (nothing to train)")
            if not args.no_results:
                for path in write_results(rec):
                    log(f"wrote {path}")
            return 0
    rec = build(cfg, out_dir=out_dir, force=args.force,
                run_perplexity_tool=not args.no_perplexity_tool, log=log, corpus=pre, checkpoints=checkpoints,
                expert_share=not args.no_expert_share, device=device)
    if not args.no_results:
        for path in write_results(rec):
            log(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
