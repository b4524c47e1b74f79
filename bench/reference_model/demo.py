"""`make demo-model`: the demo model's committed inputs and record (apex_orch/demo/trained.py).

    .venv/bin/python -m bench.reference_model.demo            # vocabulary, build, record
    .venv/bin/python -m bench.reference_model.demo --check    # rebuild and compare with the record

The demo is the reference model's recipe at a small size, trained by the numpy port of its code
(apex_orch.demo.nptrain) so that the base install can build it on first use without torch. This
script makes what is committed beside that code:
  1. `demo-tokenizer.json`: a 1024-token byte-level BPE trained with `tokenizers` on the demo's
     training text, checked token for token against llama.cpp on the training and evaluation texts;
  2. `demo-model.json`: the record of one build (trained exactly as a first use trains it): the
     sha256 every machine's build must match, the loss curve, the time, and the F16 model's
     perplexity on the demo's evaluation text (the text `quantize --demo` evaluates on).
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path[0] = str(Path(__file__).resolve().parents[2])
    __package__ = "bench.reference_model"  # noqa: A001

from apex_orch.demo import synthetic, trained  # noqa: E402

N_VOCAB = 1024


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def make_tokenizer() -> dict:
    """Train the BPE and check it against llama.cpp; returns the committed form."""
    from . import bpe
    from .vocab import Vocab

    text = trained.training_text()
    tok = bpe.train([text], N_VOCAB)
    tokens, merges = bpe.tokens_and_merges(tok)
    with tempfile.TemporaryDirectory() as tmp:
        vocab = synthetic.write_vocab_only(Path(tmp) / "vocab.gguf", trained.DEMO_SPEC,
                                           bpe.gguf_tokenizer_kv(tok), overwrite=True)
        agreement = bpe.check_same_tokens(tok, Vocab(vocab).tokenize,
                                          {"train": text, "eval": synthetic.demo_text()})
    log(f"BPE: {len(tokens) + 2} tokens; llama.cpp and tokenizers encode identically: {agreement}")
    import tokenizers
    return {"format": "apex-orch-demo-tokenizer", "tokenizers": tokenizers.__version__,
            "identical_encoding_tokens": agreement, "tokens": tokens, "merges": merges}


def eval_source(path: Path) -> dict:
    """The F16 demo's perplexity on the evaluation text `quantize --demo` uses (same settings)."""
    from apex_orch.cli.quantize_eval import DEMO_CHUNKS, DEMO_CTX
    from apex_orch.evaluation.evaluate import evaluate
    from apex_orch.evaluation.inputs import EvalSettings

    with tempfile.TemporaryDirectory() as tmp:
        text = Path(tmp) / "demo-eval.txt"
        text.write_text(synthetic.demo_text(), encoding="utf-8")
        r = evaluate(path, text=text, settings=EvalSettings(n_ctx=DEMO_CTX, chunks=DEMO_CHUNKS))
    return {"ppl": round(r.ppl, 4), "ppl_err": round(r.ppl_err, 4), "ctx": DEMO_CTX, "chunks": DEMO_CHUNKS}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="rebuild with the committed vocabulary and compare")
    ap.add_argument("--keep-tokenizer", action="store_true", help="keep the committed vocabulary (no BPE training)")
    args = ap.parse_args(argv)
    if not (args.check or args.keep_tokenizer):
        tok = make_tokenizer()
        from apex_orch.core.safefiles import write_atomic
        write_atomic(trained.TOKENIZER_FILE, json.dumps(tok, indent=0, ensure_ascii=False) + "\n")
        log(f"wrote {trained.TOKENIZER_FILE.relative_to(trained.HERE.parents[1])}")
    inputs = trained.build_inputs()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "apex-demo-moe.gguf"
        rec = trained.build(path, inputs, log)
        ev = eval_source(path)
    log(f"F16 demo on its evaluation text: PPL {ev['ppl']} ± {ev['ppl_err']}")
    committed = trained.committed_record()
    if args.check:
        same = committed is not None and committed.get("sha256") == rec["sha256"]
        log(f"sha256 {rec['sha256']} {'equals' if same else 'DIFFERS FROM'} the committed record's "
            f"{(committed or {}).get('sha256')}")
        return 0 if same else 1
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    record = {"format": "apex-orch-demo-model", **rec, "source_eval": ev,
              "built": {"date_utc": dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat(),
                        "machine": platform.machine(), "nproc": os.cpu_count(), "loadavg_1min_end": load,
                        "python": platform.python_version()}}
    from apex_orch.core.safefiles import write_atomic
    write_atomic(trained.RECORD_FILE, json.dumps(record, indent=1) + "\n")
    log(f"wrote {trained.RECORD_FILE.name}: sha256 {rec['sha256'][:16]}, {rec['seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
