"""The numpy MoE (apex_orch.demo.npmodel) and its training (apex_orch.demo.nptrain): the same
model as the PyTorch reference (bench/reference_model/model.py), gradients included, training
that is seeded to the byte, and an export llama.cpp evaluates as numpy does.

- gradients: every tensor's hand-written gradient against central finite differences in
  float64 (no torch needed);
- torch: forward loss, logits and every gradient against RefMoE on the same weights (exact and
  numpy numerics), and the optimizer (AdamW + clipping + schedule) against torch.optim.AdamW;
  these SKIP only when torch cannot be imported (the optional `bench` extra);
- exact numerics (npmath): accurate, and a matrix product that does not depend on the order of
  its sums; a training run gives the same bits under other OpenBLAS kernels, thread counts and
  numpy SIMD targets (emulating other machines), where numpy's own numerics do not;
- determinism: two trainings from the same seed give identical arrays (another seed does not);
- export: 30 steps on ~5 KB of prose tokenized by llama.cpp lower the loss, and the GGUF written
  by synthetic.write_model has, in llama.cpp (the bindings, llama-perplexity's chunking), the
  perplexity the numpy forward gives on the same F16 weights.
"""

from __future__ import annotations

import math
import os
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from apex_orch.demo import npmath, npmodel, nptrain, synthetic
from apex_orch.demo.spec import SyntheticSpec

REPO = Path(__file__).resolve().parents[1]

# Small enough for finite differences, big enough for every path: 2 blocks, 2 heads, a latent
# narrower than the embedding, 4 experts with 2 used (so some tokens route past every expert).
TINY = SyntheticSpec(n_layer=2, n_embd=32, n_head=2, q_lora_rank=24, kv_lora_rank=20, qk_nope=8, qk_rope=8,
                     v_head=12, n_expert=4, n_expert_used=2, expert_ff=16, context=16, name="np-tiny")
TINY_VOCAB = 50
AUX = 0.5               # large, so a wrong aux gradient would show


def _tiny_case(dtype: str = "float64"):
    """Weights with a large init (every path carries gradient) and norms away from 1."""
    params = nptrain.init_params(TINY, TINY_VOCAB, init_std=0.3, seed=1, dtype=dtype)
    r = np.random.default_rng(5)
    for name in params:
        if name.endswith("norm.weight"):
            params[name] = (params[name] + 0.1 * r.standard_normal(params[name].shape)).astype(dtype)
    inputs = r.integers(0, TINY_VOCAB, (2, 16))
    targets = r.integers(0, TINY_VOCAB, (2, 16))
    return params, inputs, targets


def test_params_have_the_gguf_names_and_shapes() -> None:
    params = nptrain.init_params(TINY, TINY_VOCAB)
    assert {n: p.shape for n, p in params.items()} == synthetic.tensor_shapes(TINY, TINY_VOCAB)
    assert list(params) == list(synthetic.tensor_shapes(TINY, TINY_VOCAB))
    assert all(p.dtype == np.float64 for p in params.values())
    assert np.all(params["blk.1.attn_kv_a_norm.weight"] == 1.0)
    # residual-writing projections start 1/sqrt(2 n_layer) = 1/2 narrower than the others
    assert params["blk.0.ffn_down_exps.weight"].std() == pytest.approx(0.01, rel=0.05)
    assert params["blk.0.ffn_up_exps.weight"].std() == pytest.approx(0.02, rel=0.05)
    with pytest.raises(ValueError, match="mistral4"):
        npmodel.dims(SyntheticSpec(arch="qwen3moe"))


def test_gradients_match_finite_differences() -> None:
    """d(loss)/d(theta) along a random direction, per tensor, against central differences.
    float64 with numpy's numerics (exact mode rounds matmul operands to ~21 bits, a step function
    at this scale), step 1e-5: the difference quotient's own error (h^2 * third derivative,
    <4e-7 relative here) is well below the tolerance; a missing term or a transposed weight in
    the backward pass is an O(1) error."""
    params, inputs, targets = _tiny_case()
    lm, aux, grads, fw = npmodel.loss_and_grads(params, TINY, inputs, targets, AUX, exact=False)
    # No routing decision may flip under the perturbation (the loss is not smooth there).
    assert fw.margin.min() > 1e-4

    def loss(p) -> float:
        lm_, aux_, _, _ = npmodel.loss_and_grads(p, TINY, inputs, targets, AUX, exact=False)
        return lm_ + AUX * aux_

    h = 1e-5
    for name, value in params.items():
        direction = np.random.default_rng(7).standard_normal(value.shape)
        plus, minus = dict(params), dict(params)
        plus[name], minus[name] = value + h * direction, value - h * direction
        numeric = (loss(plus) - loss(minus)) / (2 * h)
        analytic = float(np.sum(grads[name] * direction))
        assert analytic == pytest.approx(numeric, rel=1e-5), name


@pytest.mark.parametrize("exact", [True, False], ids=["exact", "numpy"])
def test_forward_and_gradients_match_the_torch_reference(exact: bool) -> None:
    """RefMoE computes in float32 wherever it calls .float() (its norms, RoPE, attention and
    router), whatever the parameters' dtype, so it runs as written (float32) on weights that
    are exactly representable in float32, and numpy in float64 on the same values. Measured
    differences (exact / numpy numerics): loss 9e-8 / 6e-8 relative, logits 1.5e-5 / 8e-6
    absolute (|logits| <= 7), every gradient tensor within 5e-6 / 4e-6 of its largest entry:
    float32 rounding (6e-8 per operation) through two blocks, and exact mode's ~21-bit matmul
    operands. Tolerances: 1e-6 on the losses, 1e-4 (about 7x and 20x the measured worst) on
    logits and gradients; a backward bug is an O(1) error."""
    torch = pytest.importorskip("torch", reason="torch is not installed (optional `bench` extra)")
    import torch.nn.functional as F

    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from bench.reference_model.config import RefConfig
    from bench.reference_model.model import RefMoE, _name_map

    cfg = RefConfig(n_layer=TINY.n_layer, n_embd=TINY.n_embd, n_head=TINY.n_head, q_lora_rank=TINY.q_lora_rank,
                    kv_lora_rank=TINY.kv_lora_rank, qk_nope=TINY.qk_nope, qk_rope=TINY.qk_rope, v_head=TINY.v_head,
                    n_expert=TINY.n_expert, n_expert_used=TINY.n_expert_used, expert_ff=TINY.expert_ff,
                    seq_len=TINY.context, aux_loss_coef=AUX)
    params, inputs, targets = _tiny_case()
    params = {n: p.astype(np.float32).astype(np.float64) for n, p in params.items()}
    lm, aux, grads, fw = npmodel.loss_and_grads(params, TINY, inputs, targets, AUX, exact=exact)
    logits = npmodel.logits(params, TINY, inputs, exact=exact)

    model = RefMoE(cfg, TINY_VOCAB)
    names = _name_map(cfg)
    state = model.state_dict()
    with torch.no_grad():
        for gguf_name, key in names.items():
            state[key].copy_(torch.from_numpy(params[gguf_name]))
    hidden, t_aux, stats = model(torch.from_numpy(inputs))
    t_logits = model.output(hidden)
    t_lm = F.cross_entropy(t_logits.float().view(-1, TINY_VOCAB), torch.from_numpy(targets).view(-1))
    (t_lm + AUX * t_aux).backward()

    assert lm == pytest.approx(t_lm.item(), rel=1e-6)
    assert aux == pytest.approx(t_aux.item(), rel=1e-6)
    assert [c.tolist() for c in fw.counts] == [c.tolist() for c in stats["counts"]]
    assert np.abs(logits - t_logits.detach().numpy()).max() <= 1e-4 * np.abs(logits).max()
    torch_params = dict(model.named_parameters())
    for gguf_name, key in names.items():
        ours, theirs = grads[gguf_name], torch_params[key].grad.double().numpy()
        assert ours.shape == theirs.shape, gguf_name
        assert np.abs(ours - theirs).max() <= 1e-4 * np.abs(ours).max(), gguf_name


def test_optimizer_matches_torch_adamw_clipping_and_schedule() -> None:
    """Three steps of clipping + AdamW in float64 against torch's own (elementwise math both,
    so they agree to rounding: 1e-12), and the learning-rate schedule against trainer.lr_at."""
    torch = pytest.importorskip("torch", reason="torch is not installed (optional `bench` extra)")
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from bench.reference_model import trainer
    from bench.reference_model.config import RefConfig

    settings = nptrain.TrainSettings(lr=1e-2, min_lr=1e-3, warmup=2, weight_decay=0.1)
    cfg = RefConfig(lr=settings.lr, min_lr=settings.min_lr, warmup=settings.warmup, steps=7)
    assert [nptrain.lr_at(settings, 7, s) for s in range(7)] == [trainer.lr_at(cfg, s) for s in range(7)]

    r = np.random.default_rng(3)
    params = {"blk.0.attn_norm.weight": r.standard_normal(5), "blk.0.ffn_up_exps.weight": r.standard_normal((2, 3, 4))}
    t_params = {n: torch.nn.Parameter(torch.from_numpy(p.copy())) for n, p in params.items()}
    opt = nptrain.AdamW(params, settings.weight_decay)
    t_opt = torch.optim.AdamW([{"params": [t_params["blk.0.ffn_up_exps.weight"]], "weight_decay": 0.1},
                               {"params": [t_params["blk.0.attn_norm.weight"]], "weight_decay": 0.0}],
                              lr=settings.lr, betas=(0.9, 0.95), eps=1e-8)
    for step, scale in enumerate((3.0, 0.1, 5.0)):      # clipped, not clipped, clipped
        grads = {n: scale * r.standard_normal(p.shape) for n, p in params.items()}
        for n, p in t_params.items():
            p.grad = torch.from_numpy(grads[n].copy())
        norm = nptrain.clip_grads(grads, 1.0)
        t_norm = torch.nn.utils.clip_grad_norm_(list(t_params.values()), 1.0)
        assert norm == pytest.approx(t_norm.item(), rel=1e-12)
        lr = nptrain.lr_at(settings, 7, step)
        opt.step(grads, lr)
        for group in t_opt.param_groups:
            group["lr"] = lr
        t_opt.step()
        for n, p in params.items():
            np.testing.assert_allclose(p, t_params[n].detach().numpy(), rtol=1e-12, atol=1e-15)


def test_exact_math_is_accurate() -> None:
    r = np.random.default_rng(0)
    x = r.uniform(-700, 700, 100_000)
    np.testing.assert_allclose(npmath.exp(x), np.exp(x), rtol=2e-14)
    assert npmath.exp(np.array([-np.inf, -750.0, 0.0]))[:3].tolist() == [0.0, 0.0, 1.0]
    y = np.concatenate((r.uniform(1e-300, 1e300, 10_000), r.uniform(0.25, 4, 100_000)))
    np.testing.assert_allclose(npmath.log(y), np.log(y), rtol=1e-15, atol=1e-15)
    z = r.uniform(-1000, 1000, 100_000)
    sin, cos = npmath.sincos(z)
    np.testing.assert_allclose(sin, np.sin(z), rtol=0, atol=1e-14)
    np.testing.assert_allclose(cos, np.cos(z), rtol=0, atol=1e-14)


def test_exact_matmul_does_not_depend_on_the_order_of_its_sums() -> None:
    """The operands are rounded to integers whose products and partial sums stay below 2^53, so
    the sums are exact: any order (here: the summed axis permuted, and split in two partial
    products added afterwards) gives the same bits. numpy's matmul does not (the control)."""
    r = np.random.default_rng(1)
    a, b = r.standard_normal((64, 1000)) * 3.0, r.standard_normal((1000, 48)) * 1e-3
    perm = r.permutation(1000)
    exact = npmath.matmul(a, b)
    assert exact.tobytes() == npmath.matmul(a[:, perm], b[perm]).tobytes()
    # ~21-bit operands: within 2^-19 of the largest |entry| of the float64 product
    bound = 2.0 ** -19 * np.abs(a).max(axis=1, keepdims=True).max() * np.abs(b).max() * 1000
    assert np.abs(exact - a @ b).max() <= bound
    assert (a @ b).tobytes() != (a[:, perm] @ b[perm]).tobytes()
    batched = r.standard_normal((2, 3, 16, 8)), r.standard_normal((2, 3, 8, 5))
    np.testing.assert_allclose(npmath.matmul(*batched), batched[0] @ batched[1], rtol=0, atol=1e-5)


_TRAIN_AND_HASH = """
import hashlib, sys
import numpy as np
from apex_orch.demo import nptrain
from apex_orch.demo.spec import SyntheticSpec
spec = SyntheticSpec(n_layer=2, n_embd=64, n_head=2, q_lora_rank=64, kv_lora_rank=64, qk_nope=16, qk_rope=16,
                     v_head=32, n_expert=4, n_expert_used=2, expert_ff=64, context=64)
stream = np.random.default_rng(0).integers(0, 99, 3000)
for exact in (True, False):
    params, rec = nptrain.train(spec, stream, 99, 100, 3, nptrain.TrainSettings(batch_seqs=4, warmup=1, exact=exact))
    h = hashlib.sha256()
    for name, p in params.items():
        h.update(name.encode() + p.tobytes())
    print(h.hexdigest())
"""


def test_exact_training_gives_the_same_bits_on_other_kernels_and_threads() -> None:
    """Another machine, emulated: OpenBLAS's kernel for another CPU (OPENBLAS_CORETYPE), another
    thread count, numpy's SIMD code for a CPU without AVX2/AVX-512 (NPY_DISABLE_CPU_FEATURES).
    Three steps of exact training give the same weights, bit for bit, in all of them; numpy's own
    numerics give different weights in each (the control: the emulation does change the bits)."""
    try:
        from numpy._core._multiarray_umath import __cpu_dispatch__
        blas = np.show_config(mode="dicts")["Build Dependencies"]["blas"]["name"]
    except (ImportError, TypeError, KeyError):            # numpy 1.x: other names, no mode="dicts"
        pytest.skip(f"numpy {np.__version__} does not say which BLAS and SIMD targets it uses")
    if platform.machine().lower() not in ("x86_64", "amd64") or "openblas" not in blas.lower():
        pytest.skip(f"needs x86-64 and numpy on OpenBLAS to emulate other CPUs (here {platform.machine()}, {blas})")
    variants = [{}, {"OPENBLAS_CORETYPE": "Sandybridge", "OPENBLAS_NUM_THREADS": "2"},
                {"OPENBLAS_CORETYPE": "Prescott", "OPENBLAS_NUM_THREADS": "1",
                 "NPY_DISABLE_CPU_FEATURES": " ".join(__cpu_dispatch__)}]
    hashes = []
    for extra in variants:
        env = {k: v for k, v in os.environ.items()
               if k not in ("OPENBLAS_CORETYPE", "OPENBLAS_NUM_THREADS", "NPY_DISABLE_CPU_FEATURES")}
        env.update(extra, PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]))
        out = subprocess.run([sys.executable, "-c", _TRAIN_AND_HASH], env=env, capture_output=True, text=True,
                             timeout=300, check=True)
        hashes.append(out.stdout.split())
    exact, plain = zip(*hashes)
    assert len(set(exact)) == 1, exact
    assert len(set(plain)) == len(variants), plain


def test_batches_are_bos_then_consecutive_tokens() -> None:
    stream = np.arange(1000, 1100)
    inputs, targets = nptrain.BatchSampler(stream, bos=7, seq_len=8, seed=0).next(3)
    assert inputs.shape == targets.shape == (3, 8)
    for inp, tgt in zip(inputs, targets):
        assert inp[0] == 7
        assert np.array_equal(inp[1:], tgt[:-1])
        assert np.array_equal(tgt, np.arange(tgt[0], tgt[0] + 8))
    again = nptrain.BatchSampler(stream, bos=7, seq_len=8, seed=0).next(3)[1]
    assert np.array_equal(again, targets)
    with pytest.raises(ValueError, match="fewer than one sequence"):
        nptrain.BatchSampler(stream[:8], bos=7, seq_len=8, seed=0)


def test_training_is_deterministic() -> None:
    stream = np.random.default_rng(0).integers(0, TINY_VOCAB - 1, 500)
    settings = nptrain.TrainSettings(seq_len=16, batch_seqs=2, warmup=1, seed=11)
    a, rec_a = nptrain.train(TINY, stream, TINY_VOCAB - 1, TINY_VOCAB, 3, settings)
    b, rec_b = nptrain.train(TINY, stream, TINY_VOCAB - 1, TINY_VOCAB, 3, settings)
    assert list(a) == list(b)
    for name in a:
        assert a[name].tobytes() == b[name].tobytes(), name
    assert rec_a["loss"] == rec_b["loss"] and rec_a["grad_norm"] == rec_b["grad_norm"]
    assert rec_a["tokens"] == 3 * 2 * 16 and len(rec_a["loss"]) == 3
    other, _ = nptrain.train(TINY, stream, TINY_VOCAB - 1, TINY_VOCAB, 3,
                             nptrain.TrainSettings(seq_len=16, batch_seqs=2, warmup=1, seed=12))
    assert not np.array_equal(other["output.weight"], a["output.weight"])


# ----------------------------------------------------------------------------- export

def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map (the form byte-level BPE tokens take in a GGUF)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def _byte_tokenizer() -> list:
    """A byte-level gpt2 tokenizer as GGUF keys: the 256 bytes, a few merges (llama.cpp refuses
    an empty merge list), BOS and EOS: 264 tokens, so the test model's output layer stays small."""
    from gguf import GGUFValueType as V

    merges = ["Ġ t", "h e", "i n", "e r", "Ġ a", "o n"]
    m = _bytes_to_unicode()
    tokens = [m[b] for b in range(256)] + [x.replace(" ", "") for x in merges] + ["<|bos|>", "<|endoftext|>"]
    bos = len(tokens) - 2
    return [
        ("tokenizer.ggml.model", "gpt2", int(V.STRING), None),
        ("tokenizer.ggml.pre", "gpt-2", int(V.STRING), None),
        ("tokenizer.ggml.tokens", tokens, int(V.ARRAY), int(V.STRING)),
        ("tokenizer.ggml.token_type", [1] * bos + [3, 3], int(V.ARRAY), int(V.INT32)),
        ("tokenizer.ggml.merges", merges, int(V.ARRAY), int(V.STRING)),
        ("tokenizer.ggml.bos_token_id", bos, int(V.UINT32), None),
        ("tokenizer.ggml.eos_token_id", bos + 1, int(V.UINT32), None),
        ("tokenizer.ggml.add_bos_token", True, int(V.BOOL), None),
        ("tokenizer.ggml.add_eos_token", False, int(V.BOOL), None),
    ]


SMALL = SyntheticSpec(n_layer=2, n_embd=64, n_head=2, q_lora_rank=64, kv_lora_rank=64, qk_nope=16, qk_rope=16,
                      v_head=32, n_expert=4, n_expert_used=2, expert_ff=64, context=64, name="np-small")
N_CTX = 64
TOL_PPL_REL = 1e-3       # bench/reference_model/validate.py's |PPL_llama / PPL_reference - 1|
TOL_MEAN_KLD = 5e-6      # validate.py's mean KL(reference || llama.cpp) per position


def test_trained_model_exports_and_llama_cpp_agrees(tmp_path: Path) -> None:
    import gguf

    from apex_orch.evaluation.evaluate import evaluate
    from apex_orch.evaluation.inputs import EvalSettings
    from apex_orch.evaluation.session import BindingsModel, chunk_logits

    kv = _byte_tokenizer()
    vocab = synthetic.write_vocab_only(tmp_path / "vocab.gguf", SMALL, kv)
    train_text, heldout_text = synthetic.demo_text(800, seed=0), synthetic.demo_text(150, seed=1)
    heldout = tmp_path / "heldout.txt"
    heldout.write_text(heldout_text, encoding="utf-8")
    with BindingsModel(vocab, vocab_only=True) as bm:
        bos, n_vocab = bm.bos, bm.n_vocab
        stream = bm.tokenize(train_text.encode())[1:]              # without the BOS it adds
        held = bm.tokenize(heldout_text.encode()[:-1])             # as llama-perplexity -f reads it
    assert n_vocab == 264 and held[0] == bos and len(stream) > 4000

    settings = nptrain.TrainSettings(seq_len=N_CTX, batch_seqs=4, lr=1e-2, min_lr=1e-3, warmup=5, seed=3)
    params, rec = nptrain.train(SMALL, stream, bos, n_vocab, 30, settings)
    assert len(rec["loss"]) == 30 and rec["tokens"] == 30 * 4 * N_CTX
    assert rec["loss"][0] == pytest.approx(math.log(n_vocab), abs=0.05)   # starts near uniform
    assert rec["loss_last"] < rec["loss_first"] - 0.5

    path = synthetic.write_model(tmp_path / "np-small.gguf", SMALL, weights=params, tokenizer=kv)
    # numpy side: the weights as the file holds them (F16, norms and router F32)
    reader = gguf.GGUFReader(path)
    stored = {t.name: np.array(t.data, dtype=np.float64) for t in reader.tensors}
    assert {n: a.shape for n, a in stored.items()} == {n: p.shape for n, p in params.items()}

    n_chunks = len(held) // N_CTX
    chunks = held[:n_chunks * N_CTX].reshape(n_chunks, N_CTX).copy()
    chunks[:, 0] = bos
    first = N_CTX // 2
    logp_np = npmodel.log_softmax(npmodel.logits(stored, SMALL, chunks))[:, first:N_CTX - 1]
    nxt = chunks[:, first + 1:]
    ppl_np = math.exp(-float(np.take_along_axis(logp_np, nxt[..., None], -1).mean()))

    ev = EvalSettings(n_ctx=N_CTX, n_threads=2)
    result = evaluate(path, text=heldout, settings=ev)
    assert result.n_chunks == n_chunks >= 8
    assert abs(result.ppl / ppl_np - 1) <= TOL_PPL_REL, (result.ppl, ppl_np)
    assert result.ppl < n_vocab / 4                         # far below uniform

    # position by position, the scored half: mean KL(numpy || llama.cpp) and the same argmax
    klds, same = [], 0
    with BindingsModel(path) as bm, bm.context(n_ctx=N_CTX, n_batch=N_CTX, n_ubatch=N_CTX, n_threads=2,
                                               flash_attn=True) as cx:
        for i in range(n_chunks):
            ll = npmodel.log_softmax(chunk_logits(cx, held, i * N_CTX, ev, True, bos).astype(np.float64))
            ours = logp_np[i]
            klds.append((np.exp(ours) * (ours - ll[:len(ours)])).sum(-1))
            same += int((ours.argmax(-1) == ll[:len(ours)].argmax(-1)).sum())
    assert float(np.concatenate(klds).mean()) <= TOL_MEAN_KLD
    assert same >= 0.99 * n_chunks * (N_CTX - 1 - first)
