"""The demo model: a small MoE trained by the project's own numpy trainer, built on first use.

Why trained: a random-weight model gives a perplexity far above its vocabulary size, a quantized
file can come out "better" than its source, and a KLD that says nothing about APEX. This one is a
real (if tiny) language model: mistral4 with MLA attention, 8 routed experts (2 used) and a shared
expert in each of 2 blocks, every row 256 wide so the K-quants apply as in a real MoE, the routed
experts the larger share of its weights, a 1024-token byte-level BPE vocabulary.

Why built, not committed: at 256-wide rows even this model is ~9 MB of F16, above what the
repository should carry; the base install has no torch. So the first use trains it with
`apex_orch.demo.nptrain` (numpy only, the reference model's architecture and recipe, checked
against the torch code in tests) in float64 with exact numerics: the same bytes on every machine.
What is committed is small: the vocabulary (`demo-tokenizer.json`, made by `make demo-model` with
the `tokenizers` library) and the training record of the committed build (`demo-model.json`: the
settings, the loss curve and the sha256 of the F16 file every machine must produce). A build
whose bytes differ from that sha256 says so.

Training text: generated prose (`synthetic.demo_text`, seed 1) and the built-in calibration
samples (chat, code, agent traces, encyclopedic prose) as raw text. The demo's evaluation text is
generated prose of seed 0: held out, and part of no calibration corpus.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np

from apex_orch.core import settings
from apex_orch.core.locks import FileLock
from apex_orch.demo import nptrain, synthetic
from apex_orch.demo.vocab import bpe_tokenizer_kv
from apex_orch.demo.spec import SyntheticSpec

DEMO_NAME = "APEX-Demo-MoE"
DEMO_SPEC = SyntheticSpec(
    arch="mistral4", n_layer=2, n_embd=256, n_expert=8, n_expert_used=2, n_expert_shared=1, expert_ff=256,
    n_head=2, q_lora_rank=256, kv_lora_rank=256, qk_nope=32, qk_rope=32, v_head=64, context=256,
    name=DEMO_NAME, seed=0)
DEMO_STEPS = 120
DEMO_TRAINING = nptrain.TrainSettings(seq_len=256, batch_seqs=4, lr=3e-3, min_lr=3e-4, warmup=10, seed=1234,
                                      dtype="float64")
TRAIN_PROSE_WORDS = 40_000
HERE = Path(__file__).resolve().parent
TOKENIZER_FILE = HERE / "demo-tokenizer.json"
RECORD_FILE = HERE / "demo-model.json"
# Bump when the build's output changes for unchanged inputs (names a new cache file).
BUILD_VERSION = 1

Progress = Callable[[str], None]


# ----------------------------------------------------------------------------- inputs

def samples_text() -> str:
    """The built-in calibration samples, raw, in path order (a sample is a file in one of the samples'
    folders)."""
    root = settings.PACKAGE_DIR / "calibration" / "samples"
    parts = []
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.parent != root):
        parts.append(path.read_bytes().decode("utf-8", errors="replace").replace("\r\n", "\n"))
    return "\n\n".join(parts)


def training_text() -> str:
    return synthetic.demo_text(TRAIN_PROSE_WORDS, seed=1) + "\n\n" + samples_text()


def load_tokenizer() -> dict:
    """The committed vocabulary: {"tokens": [...], "merges": [...]} of a byte-level BPE."""
    data = json.loads(TOKENIZER_FILE.read_text(encoding="utf-8"))
    if not (isinstance(data, dict) and isinstance(data.get("tokens"), list) and isinstance(data.get("merges"), list)):
        raise ValueError(f"{TOKENIZER_FILE.name}: not a demo tokenizer (tokens and merges lists)")
    return data


def committed_record() -> dict | None:
    try:
        return json.loads(RECORD_FILE.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None


def build_inputs() -> dict:
    """What determines the demo's bytes (hashed into its cache key and recorded)."""
    tok = TOKENIZER_FILE.read_bytes()
    return {"version": BUILD_VERSION, "spec": dataclasses.asdict(DEMO_SPEC), "steps": DEMO_STEPS,
            "training": DEMO_TRAINING.asdict(), "tokenizer_sha256": hashlib.sha256(tok).hexdigest(),
            "text_sha256": hashlib.sha256(training_text().encode("utf-8")).hexdigest(),
            "writer": synthetic.GENERATOR_VERSION, "numpy": np.__version__}


def build_key(inputs: dict) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------- build

def _busy(holder: str):
    from apex_orch.core.errors import LockedError
    return LockedError(f"the demo model is being built by another process ({holder})")


def demo_model_path(progress: Progress | None = None) -> Path:
    """The trained demo model under <cache>/models/, built (trained) on first use."""
    inputs = build_inputs()
    path = settings.cache_root() / "models" / f"apex-demo-moe-{build_key(inputs)}.gguf"
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(path.with_name(path.name + ".lock"), record=f"pid {os.getpid()}\n", busy=_busy,
                    on_wait=lambda holder: (progress or (lambda _m: None))(
                        f"demo model: waiting for another process that is training it ({holder})"))
    with lock:   # concurrent first uses train it once
        if not path.is_file():
            build(path, inputs, progress or (lambda _m: None))
    return path


def build(path: Path, inputs: dict, progress: Progress, steps: int = DEMO_STEPS) -> dict:
    """Tokenize, train, write `path` (atomically) and `<path>.json` (the build's record)."""
    from apex_orch.llama.bindings import load_llama_cpp, stderr_to

    tok = load_tokenizer()
    kv = bpe_tokenizer_kv(tok["tokens"], tok["merges"])
    vocab = path.with_name(f".{path.stem}.vocab.gguf")
    synthetic.write_vocab_only(vocab, DEMO_SPEC, kv, overwrite=True)
    try:
        llama_cpp = load_llama_cpp()
        # libllama logs to descriptor 2 whatever `verbose` says: kept off the terminal
        with tempfile.TemporaryFile(mode="w+b") as log, stderr_to(log):
            lm = llama_cpp.Llama(str(vocab), vocab_only=True, verbose=False)
        try:
            stream = np.asarray(lm.tokenize(training_text().encode("utf-8"), add_bos=False, special=False),
                                dtype=np.int64)
            bos, n_vocab = int(lm.token_bos()), int(lm.n_vocab())
        finally:
            lm.close()
    finally:
        vocab.unlink(missing_ok=True)
    progress(f"demo model: training it once ({steps} steps of {DEMO_TRAINING.batch_seqs} x "
             f"{DEMO_TRAINING.seq_len} tokens on {len(stream):,} tokens of text; about two minutes on 2 cores)")
    t0 = time.monotonic()
    params, rec = nptrain.train(DEMO_SPEC, stream, bos, n_vocab, steps, DEMO_TRAINING,
                                log=lambda m: progress(f"demo model: {m.strip()}"), log_every=20)
    synthetic.write_model(path, DEMO_SPEC, weights=params, overwrite=True, tokenizer=kv)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    record = {"inputs": inputs, "sha256": digest, "size_bytes": path.stat().st_size,
              "train_tokens_available": int(len(stream)), "tokens_trained": rec["tokens"],
              "loss_first": rec["loss_first"], "loss_last": rec["loss_last"],
              "loss_curve": [round(float(x), 4) for x in rec["loss"]],
              "seconds": round(time.monotonic() - t0, 1), "cpu_seconds": round(rec["cpu_seconds"], 1)}
    from apex_orch.core.safefiles import write_atomic
    write_atomic(path.with_name(path.name + ".json"), json.dumps(record, indent=1) + "\n")
    expected = (committed_record() or {}).get("sha256")
    if steps == DEMO_STEPS and expected and expected != digest:
        progress(f"note: this machine built a demo model whose bytes differ from the committed build's "
                 f"(sha256 {digest[:12]} vs {expected[:12]}; numpy {np.__version__} vs "
                 f"{(committed_record() or {}).get('inputs', {}).get('numpy')}): its numbers will differ slightly "
                 "from the README's")
    progress(f"demo model: {path.name} ({record['size_bytes'] / 2**20:.1f} MiB, loss {rec['loss_first']:.2f} -> "
             f"{rec['loss_last']:.2f}, {record['seconds']:.0f} s)")
    return record
