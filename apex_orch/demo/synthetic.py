"""Small deterministic GGUF models for tests and the demo, plus a header-only flagship replica.

Why: every apex-orch feature (inspection, planning, quantization, imatrix, evaluation) must be
exercised against real GGUF files and the real llama.cpp tools, without downloading a model.

What is written (with the `gguf` package):
- `write_model(path, spec)`: a complete model whose weights are seeded random data:
  F16 for 2-D/3-D weights, F32 for norms and the router (`ffn_gate_inp`). The tokenizer
  (32000 tokens, every `tokenizer.*` key with its original value type) is copied from the
  pinned tree's `models/ggml-vocab-llama-spm.gguf`. Architectures:
    * "mistral4": MLA attention (loaded by llama.cpp's deepseek2 code), routed experts
      (split gate/up or one fused `ffn_gate_up_exps`), shared expert, optional leading
      dense blocks. kv_lora_rank 128 / qk_nope 32 are deliberately not multiples of 256, so
      K-quants must fall back on attn_k_b / attn_v_b.
    * "qwen3moe": GQA attention with q/k norms, routed experts only.
    * "llama": a dense model (APEX must refuse it).
- `write_mistral_small_4_replica(path)`: the exact tensor layout and metadata of
  Mistral-Small-4-119B-2603 (615 tensors split / 579 fused, BF16 weights, F32 norms/router,
  YaRN keys) whose data is a sparse hole: ~238 GB apparent size, ~50 KB on disk. It has no
  tokenizer keys (llama-quantize does not need them). Good for `llama-quantize --dry-run`
  (Q4_K_M: 68808.38 MiB, 36 of 615 tensors fall back), planning and size predictions;
  not for running the model.
- `demo_text()`: deterministic English-like text for perplexity/imatrix runs.

Weights: norms 1.0; other tensors normal with std 1/sqrt(fan_in) (0.5/sqrt(fan_in) for
projections back into the residual stream), token_embd std 1, router 2/sqrt(n_embd) (every
expert gets tokens), output 2.5/sqrt(n_embd) (peaked, context-dependent next-token
distributions; PPL on demo_text() is ~5e5 with a 32000 vocab).

Running the mistral4 presets: on CPUs with AMX, llama.cpp places F16 (and Q8_0/Q4_0)
attn_k_b in the AMX buffer, which cannot run the MLA graph's matmul on a permuted q_nope,
and llama-perplexity / llama-imatrix abort with `GGML_ASSERT(*cur_backend_id != -1)`.
Pass `--no-repack` (or env LLAMA_ARG_REPACK=0) to those tools. It changes the numerics a
little (qwen3moe preset: PPL 577185 with AMX vs 580782 without), so base and quantized runs
that are compared must use the same setting.

Determinism: each tensor's data comes from its own RNG seeded by (spec.seed, tensor name), and
the writer adds no timestamps, so the same spec + seed gives a byte-identical file.
Shapes in this module are numpy order (the reverse of ggml's ne). What a model holds (its spec,
the presets, the tensor layout) is demo.spec's; this module writes it.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import random
from pathlib import Path
from typing import Mapping, NamedTuple, Sequence

import numpy as np

from apex_orch.core.errors import OutputExistsError
from apex_orch.demo.spec import (MISTRAL_SMALL_4_SPEC, MISTRAL_SMALL_4_VOCAB, MISTRAL_SMALL_4_YARN, PRESETS,
                                 SyntheticSpec, TensorPlan, tensor_layout)
from apex_orch.llama import pin
from apex_orch.model.gguf_header import read_header

# Bump when the generator's output changes for an unchanged spec (invalidates the demo cache).
GENERATOR_VERSION = 1

VOCAB_GGUF_NAME = "ggml-vocab-llama-spm.gguf"

RMS_EPS = 1e-6
ROPE_FREQ_BASE = 10000.0
GATING_SOFTMAX = 1          # llama_expert_gating_func_type: SOFTMAX
FILE_TYPE_F16 = 1           # llama_ftype: MOSTLY_F16
FILE_TYPE_BF16 = 32         # llama_ftype: MOSTLY_BF16
QUANTIZATION_VERSION = 2


def tensor_names(spec: SyntheticSpec) -> list[str]:
    """Every tensor the file will hold, in file order."""
    return [t.name for t in tensor_layout(spec, _vocab_size())]


def tensor_shapes(spec: SyntheticSpec, n_vocab: int | None = None) -> dict[str, tuple[int, ...]]:
    """Name -> numpy shape (reversed ggml ne), in file order."""
    return {t.name: t.shape for t in tensor_layout(spec, n_vocab or _vocab_size())}


# ----------------------------------------------------------------------------- metadata

def _arch_kv(spec: SyntheticSpec, n_vocab: int) -> list[tuple[str, object, str]]:
    """(key, value, gguf value type name) for the architecture keys, in write order."""
    a = spec.arch
    kv: list[tuple[str, object, str]] = [
        (f"{a}.context_length", spec.context, "UINT32"),
        (f"{a}.embedding_length", spec.n_embd, "UINT32"),
        (f"{a}.block_count", spec.n_layer, "UINT32"),
        (f"{a}.feed_forward_length", spec.dense_ff, "UINT32"),
        (f"{a}.attention.head_count", spec.n_head, "UINT32"),
    ]
    if a == "mistral4":
        # MLA is stored as MQA with one wide KV head (see convert_hf_to_gguf's DeepseekV2Model).
        kv += [
            (f"{a}.attention.head_count_kv", 1, "UINT32"),
            (f"{a}.rope.freq_base", ROPE_FREQ_BASE, "FLOAT32"),
            (f"{a}.attention.layer_norm_rms_epsilon", RMS_EPS, "FLOAT32"),
            (f"{a}.expert_count", spec.n_expert, "UINT32"),
            (f"{a}.expert_used_count", spec.n_expert_used, "UINT32"),
            (f"{a}.expert_gating_func", GATING_SOFTMAX, "UINT32"),
            (f"{a}.leading_dense_block_count", spec.leading_dense, "UINT32"),
            (f"{a}.vocab_size", n_vocab, "UINT32"),
            (f"{a}.attention.q_lora_rank", spec.q_lora_rank, "UINT32"),
            (f"{a}.attention.kv_lora_rank", spec.kv_lora_rank, "UINT32"),
            (f"{a}.attention.key_length", spec.kv_lora_rank + spec.qk_rope, "UINT32"),
            (f"{a}.attention.value_length", spec.kv_lora_rank, "UINT32"),
            (f"{a}.attention.key_length_mla", spec.qk_nope + spec.qk_rope, "UINT32"),
            (f"{a}.attention.value_length_mla", spec.v_head, "UINT32"),
            (f"{a}.expert_feed_forward_length", spec.expert_ff, "UINT32"),
            (f"{a}.expert_shared_count", spec.n_expert_shared, "UINT32"),
            (f"{a}.expert_weights_scale", 1.0, "FLOAT32"),
            (f"{a}.expert_weights_norm", True, "BOOL"),
            (f"{a}.rope.dimension_count", spec.qk_rope, "UINT32"),
        ]
        return kv
    hd = spec.n_embd // spec.n_head
    kv += [
        (f"{a}.attention.head_count_kv", spec.n_head_kv, "UINT32"),
        (f"{a}.rope.freq_base", ROPE_FREQ_BASE, "FLOAT32"),
        (f"{a}.attention.layer_norm_rms_epsilon", RMS_EPS, "FLOAT32"),
    ]
    if a == "qwen3moe":
        kv += [
            (f"{a}.expert_count", spec.n_expert, "UINT32"),
            (f"{a}.expert_used_count", spec.n_expert_used, "UINT32"),
            (f"{a}.attention.key_length", hd, "UINT32"),
            (f"{a}.attention.value_length", hd, "UINT32"),
            (f"{a}.expert_feed_forward_length", spec.expert_ff, "UINT32"),
        ]
    kv += [
        (f"{a}.vocab_size", n_vocab, "UINT32"),
        (f"{a}.rope.dimension_count", hd, "UINT32"),
    ]
    return kv


def vocab_gguf_path() -> Path:
    """The pinned tree's vocab-only llama-spm GGUF (32000 tokens)."""
    path = pin.llama_source() / "models" / VOCAB_GGUF_NAME
    if not path.is_file():
        from apex_orch.core.errors import ToolNotFoundError
        raise ToolNotFoundError(f"vocab GGUF not found: {path}",
                                hint=f"run `{pin.setup_command()}` to unpack the pinned llama.cpp tree")
    return path


class HeaderTensor(NamedTuple):
    name: str
    ne: tuple[int, ...]      # ggml order
    ggml_type: int           # gguf.GGMLQuantizationType value
    offset: int              # absolute file offset of the data


def _read_gguf_header(path: Path) -> tuple[list[tuple[str, object, int, int | None]], list[HeaderTensor]]:
    """Metadata and tensor infos of a GGUF file, in the shape a copy into a new file needs.

    KV entries are (key, value, value type, array sub-type); strings stay raw bytes and numbers
    Python scalars (model.gguf_header's verbatim mode), so rewriting them is byte-exact.
    gguf.GGUFReader takes ~2 s on a file with a 32000-token vocab; the header walk ~50 ms.
    """
    hdr = read_header(path, verbatim=True)
    kv = [(key, value, int(hdr.kv_types[key]), int(hdr.array_types[key]) if key in hdr.array_types else None)
          for key, value in hdr.kv.items()]
    return kv, [HeaderTensor(t.name, t.shape, int(t.ggml_type), hdr.data_offset + t.offset) for t in hdr.tensors]


@functools.lru_cache(maxsize=1)
def _tokenizer_kv() -> tuple[tuple[str, object, int, int | None], ...]:
    """Every tokenizer.* key of the pinned vocab GGUF, with its original value types."""
    kv, _ = _read_gguf_header(vocab_gguf_path())
    return tuple(item for item in kv if item[0].startswith("tokenizer."))


def _vocab_size() -> int:
    for key, value, _, _ in _tokenizer_kv():
        if key == "tokenizer.ggml.tokens":
            return len(value)  # type: ignore[arg-type]
    raise ValueError("vocab GGUF has no tokenizer.ggml.tokens")


# ----------------------------------------------------------------------------- data

def _std(plan: TensorPlan) -> float:
    """Per-role init scale: unit-RMS activations through the stack, token identity kept in the
    residual stream, router logits varied enough that every expert gets tokens, and output
    logits with std ~2.5 (peaked but context-dependent next-token distributions)."""
    fan_in = plan.shape[-1]
    if plan.role == "embd":
        return 1.0
    if plan.role == "output":
        return 2.5 / np.sqrt(fan_in)
    if plan.role == "router":
        return 2.0 / np.sqrt(fan_in)
    if plan.role == "out":
        return 0.5 / np.sqrt(fan_in)
    return 1.0 / np.sqrt(fan_in)


def _rng(seed: int, name: str) -> np.random.Generator:
    name_key = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little")
    return np.random.default_rng(np.random.SeedSequence([seed, name_key]))


@functools.lru_cache(maxsize=1)
def _normal_quantiles() -> np.ndarray:
    """65536 standard-normal quantiles: a uniform 16-bit index into this table is a normal draw
    (to within F16 resolution) at a fraction of the cost of standard_normal + F16 conversion."""
    from statistics import NormalDist

    unit = NormalDist()
    return np.array([unit.inv_cdf((i + 0.5) / 65536) for i in range(65536)], dtype=np.float64)


@functools.lru_cache(maxsize=64)
def _scaled_table(std: float, dtype: str) -> np.ndarray:
    return (_normal_quantiles() * std).astype(dtype)


def _tensor_data(plan: TensorPlan, spec: SyntheticSpec, supplied: np.ndarray | None) -> np.ndarray:
    dtype = np.float32 if plan.role in ("norm", "router") else np.float16
    if supplied is not None:
        arr = np.asarray(supplied)
        if tuple(arr.shape) != plan.shape:
            raise ValueError(f"weights[{plan.name!r}] has shape {tuple(arr.shape)}, expected {plan.shape}")
        out = np.ascontiguousarray(arr, dtype=dtype)
        if not np.all(np.isfinite(out)):
            raise ValueError(f"weights[{plan.name!r}] has non-finite values (after conversion to {out.dtype})")
        return out
    if plan.role == "norm":
        return np.ones(plan.shape, dtype=np.float32)
    index = _rng(spec.seed, plan.name).integers(0, 1 << 16, size=plan.shape, dtype=np.uint16)
    return _scaled_table(float(_std(plan)), np.dtype(dtype).name)[index]


# ----------------------------------------------------------------------------- writing

def _temp_path(dest: Path) -> Path:
    return dest.with_name(f".{dest.name}.{os.getpid()}.tmp")


def _check_dest(path: str | os.PathLike, overwrite: bool) -> Path:
    dest = Path(path)
    if dest.exists() and not overwrite:
        raise OutputExistsError(f"{dest} already exists", hint="pass overwrite=True or choose another path")
    dest.parent.mkdir(parents=True, exist_ok=True)
    return dest


# A tokenizer as GGUF keys: (key, value, gguf.GGUFValueType, array sub-type or None), all
# starting with "tokenizer.". Default: the pinned tree's llama-spm vocabulary.
TokenizerKV = Sequence[tuple[str, object, int, "int | None"]]


def tokenizer_vocab_size(tokenizer: TokenizerKV | None) -> int:
    """Number of tokens of `tokenizer` (None: the default llama-spm vocabulary)."""
    if tokenizer is None:
        return _vocab_size()
    for key, value, _, _ in tokenizer:
        if key == "tokenizer.ggml.tokens":
            return len(value)  # type: ignore[arg-type]
    raise ValueError("the tokenizer has no tokenizer.ggml.tokens")


def _new_writer(tmp: Path, spec: SyntheticSpec, n_vocab: int, file_type: int, with_tokenizer: bool,
                tokenizer: TokenizerKV | None = None):
    import gguf

    writer = gguf.GGUFWriter(tmp, spec.arch)
    writer.add_name(spec.name)
    writer.add_uint32("general.file_type", file_type)
    writer.add_uint32("general.quantization_version", QUANTIZATION_VERSION)
    for key, value, vtype in _arch_kv(spec, n_vocab):
        writer.add_key_value(key, value, gguf.GGUFValueType[vtype])
    if with_tokenizer:
        for key, value, type_id, sub in (_tokenizer_kv() if tokenizer is None else tokenizer):
            if not key.startswith("tokenizer."):
                raise ValueError(f"tokenizer key {key!r} does not start with 'tokenizer.'")
            writer.add_key_value(key, value, gguf.GGUFValueType(type_id),
                                 sub_type=None if sub is None else gguf.GGUFValueType(sub))
    return writer


def write_vocab_only(path: str | os.PathLike, spec: SyntheticSpec, tokenizer: TokenizerKV | None = None, *,
                     overwrite: bool = False) -> Path:
    """A GGUF with `spec`'s metadata and the tokenizer but no tensors: llama.cpp loads it with
    vocab_only to tokenize text before the model exists (training)."""
    dest = _check_dest(path, overwrite)
    tmp = _temp_path(dest)
    try:
        writer = _new_writer(tmp, spec, tokenizer_vocab_size(tokenizer), FILE_TYPE_F16, True, tokenizer)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        writer.close()
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return dest


def write_model(path: str | os.PathLike, spec: SyntheticSpec,
                weights: Mapping[str, np.ndarray] | None = None, *, overwrite: bool = False,
                tokenizer: TokenizerKV | None = None) -> Path:
    """Write a complete, loadable GGUF for `spec` and return its path.

    `weights` optionally supplies arrays by tensor name (numpy shapes, see tensor_shapes());
    they are cast to the file's type (F32 for norms/router, F16 otherwise). Missing names get
    seeded random data. `tokenizer` replaces the default llama-spm vocabulary (the token
    embedding and output rows follow its size). The file appears under its final name only
    when complete.
    """
    dest = _check_dest(path, overwrite)
    n_vocab = tokenizer_vocab_size(tokenizer)
    plans = tensor_layout(spec, n_vocab)
    supplied = dict(weights or {})
    unknown = sorted(set(supplied) - {p.name for p in plans})
    if unknown:
        raise ValueError(f"weights names not in the {spec.arch} layout: {unknown[:5]}")
    for plan in plans:
        if plan.name in supplied and tuple(np.shape(supplied[plan.name])) != plan.shape:
            raise ValueError(f"weights[{plan.name!r}] has shape {tuple(np.shape(supplied[plan.name]))}, "
                             f"expected {plan.shape}")

    tmp = _temp_path(dest)
    try:
        writer = _new_writer(tmp, spec, n_vocab, FILE_TYPE_F16, with_tokenizer=True, tokenizer=tokenizer)
        for plan in plans:
            dtype = np.dtype(np.float32 if plan.role in ("norm", "router") else np.float16)
            writer.add_tensor_info(plan.name, plan.shape, dtype, math.prod(plan.shape) * dtype.itemsize)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for plan in plans:  # one tensor in memory at a time
            writer.write_tensor_data(_tensor_data(plan, spec, supplied.get(plan.name)))
        writer.close()
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return dest


def write_preset(name: str, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
    return write_model(path, PRESETS[name], overwrite=overwrite)


def write_mistral_small_4_replica(path: str | os.PathLike, *, layout: str = "split",
                                  overwrite: bool = False) -> Path:
    """Header-only replica of Mistral-Small-4-119B-2603: real metadata, shapes and types
    (BF16 weights, F32 norms/router), tensor data a sparse hole (~240 GB apparent size)."""
    import gguf

    if layout not in ("split", "fused"):
        raise ValueError(f"layout must be 'split' or 'fused', got {layout!r}")
    spec = dataclasses.replace(MISTRAL_SMALL_4_SPEC, fused_gate_up=(layout == "fused"))
    dest = _check_dest(path, overwrite)
    plans = tensor_layout(spec, MISTRAL_SMALL_4_VOCAB)

    tmp = _temp_path(dest)
    try:
        writer = _new_writer(tmp, spec, MISTRAL_SMALL_4_VOCAB, FILE_TYPE_BF16, with_tokenizer=False)
        yarn = MISTRAL_SMALL_4_YARN
        writer.add_string(f"{spec.arch}.rope.scaling.type", yarn["type"])
        writer.add_float32(f"{spec.arch}.rope.scaling.factor", yarn["factor"])
        writer.add_uint32(f"{spec.arch}.rope.scaling.original_context_length", yarn["original_context_length"])
        data_bytes = 0
        for plan in plans:
            n = math.prod(plan.shape)
            if plan.role in ("norm", "router"):
                writer.add_tensor_info(plan.name, plan.shape, np.dtype(np.float32), n * 4)
                nbytes = n * 4
            else:
                writer.add_tensor_info(plan.name, plan.shape, np.dtype(np.uint16), n * 2,
                                       raw_dtype=gguf.GGMLQuantizationType.BF16)
                nbytes = n * 2
            data_bytes += gguf.GGUFWriter.ggml_pad(nbytes, writer.data_alignment)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        assert writer.fout is not None
        fout = writer.fout[0]
        writer.write_padding(fout, fout.tell())
        data_start = fout.tell()
        writer.close()
        with open(tmp, "r+b") as fh:
            fh.truncate(data_start + data_bytes)  # a hole: no blocks allocated
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return dest


# ----------------------------------------------------------------------------- demo model

def spec_key(spec: SyntheticSpec) -> str:
    """Short stable hash of a spec and the generator version (names cached files)."""
    blob = json.dumps({"v": GENERATOR_VERSION, "spec": dataclasses.asdict(spec)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------- text

_SUBJECTS = ["the engineer", "a young doctor", "the old fisherman", "my neighbour", "the committee",
             "a curious student", "the small company", "our team", "the river guide", "the baker",
             "a travelling musician", "the city council", "the night nurse", "her brother",
             "the research group", "a quiet librarian", "the farmer", "the pilot", "the teacher",
             "an elderly painter"]
_VERBS = ["repaired", "described", "carried", "studied", "painted", "measured", "explained",
          "discovered", "ignored", "borrowed", "designed", "cleaned", "sold", "visited", "counted",
          "questioned", "remembered", "photographed", "planted", "returned"]
_OBJECTS = ["the wooden bridge", "a broken radio", "the harvest", "an ancient map", "the new library",
            "a heavy parcel", "the mountain road", "three letters", "the village clock", "a red bicycle",
            "the quarterly report", "an unusual stone", "the garden wall", "a jar of honey",
            "the train schedule", "the ship's engine", "a forgotten song", "the school roof",
            "a basket of apples", "the weather station"]
_PLACES = ["near the harbour", "in the north valley", "behind the market", "at the edge of town",
           "on the second floor", "by the old mill", "in the capital", "across the river",
           "under the railway bridge", "inside the museum", "on a windy hill", "at the university"]
_TIMES = ["Yesterday", "Last winter", "Early in the morning", "After the storm", "On Sunday",
          "During the festival", "In 1987", "Before dawn", "Later that week", "Every spring",
          "At noon", "Some years ago"]
_ADJ = ["careful", "remarkable", "slow", "expensive", "simple", "difficult", "quiet", "bright",
        "strange", "useful", "patient", "unexpected"]
_CONNECT = ["Because of this,", "However,", "Later,", "Meanwhile,", "As a result,", "Still,",
            "In the end,", "For a while,"]
_REASONS = ["the rain had not stopped", "nobody else knew how", "the budget was small",
            "the instructions were unclear", "it had been promised long ago", "the road was closed",
            "the prices kept rising", "the children were waiting"]


def _sentence(r: random.Random) -> str:
    kind = r.randrange(6)
    s, v, o = r.choice(_SUBJECTS), r.choice(_VERBS), r.choice(_OBJECTS)
    if kind == 0:
        text = f"{r.choice(_TIMES)}, {s} {v} {o} {r.choice(_PLACES)}."
    elif kind == 1:
        text = f"{s} {v} {o} because {r.choice(_REASONS)}."
    elif kind == 2:
        text = f"{r.choice(_CONNECT)} {s} said that the work was {r.choice(_ADJ)} and {r.choice(_ADJ)}."
    elif kind == 3:
        n = r.randint(2, 950)
        text = f"It took {n} days, and {s} {v} {o} only once."
    elif kind == 4:
        text = f"Why had {s} {v} {o} {r.choice(_PLACES)}? Nobody could say."
    else:
        text = f"{s} and {r.choice(_SUBJECTS)} {v} {o}, then {r.choice(_VERBS)} {r.choice(_OBJECTS)}."
    return text[0].upper() + text[1:]


def demo_text(n_words: int = 20000, seed: int = 0) -> str:
    """Deterministic, varied English-like prose of at least `n_words` words, in paragraphs."""
    r = random.Random(seed)
    paragraphs: list[str] = []
    words = 0
    while words < n_words:
        sentences = [_sentence(r) for _ in range(r.randint(3, 8))]
        para = " ".join(sentences)
        paragraphs.append(para)
        words += len(para.split())
    return "\n\n".join(paragraphs) + "\n"
