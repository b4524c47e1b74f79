"""Tiny random Hugging Face checkpoints of real MoE architectures, converted by the pinned
llama.cpp converter (`vendor/llama.cpp/convert_hf_to_gguf.py`, unpatched).

- The checkpoint is made by transformers' own model class from a config with tiny sizes
  (hidden 64, 2-4 blocks, 4-8 experts), seeded, saved with `save_pretrained` (safetensors).
- The tokenizer is built offline from a vocab GGUF the llama.cpp tree ships
  (`models/ggml-vocab-gpt-2.gguf`: its 50257 tokens and merges, GPT-2's byte-level
  pre-tokenizer), so the converter's own tokenizer-hash table recognises it ("gpt-2"). Extra
  special tokens an architecture's converter looks up (GLM's `[gMASK]`, ...) are added after it.
- Each converted GGUF is cached by a content key (the spec, the versions of transformers and
  torch, the converter's sources, this file) under the session cache, or under
  $APEX_ORCH_ARCHS_CACHE when set (a developer's folder kept between runs).
Nothing is downloaded: the converter runs with HF_HUB_OFFLINE=1.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
LLAMA_TREE = REPO / "vendor" / "llama.cpp"
CONVERTER = LLAMA_TREE / "convert_hf_to_gguf.py"
VOCAB = LLAMA_TREE / "models" / "ggml-vocab-gpt-2.gguf"
N_VOCAB = 50257
VOCAB_SIZE = 50304                 # config.vocab_size: the tokenizer's 50257 + room for added tokens

# Tiny sizes shared by every architecture (each spec may override)
H, HEADS, KV_HEADS, HEAD_DIM, FF, MOE_FF = 64, 4, 2, 16, 128, 256


@dataclass(frozen=True)
class ArchSpec:
    id: str                       # matrix id (also the cache name)
    family: str                   # what the issue calls it
    hf_class: str                 # transformers model class
    config: dict                  # config kwargs (tiny sizes)
    routed: int                   # routed experts per MoE block
    used: int                     # experts used per token
    shared: int = 0               # shared experts (0: none)
    leading_dense: int = 0        # leading blocks without routed experts
    nextn: int = 0                # MTP/NextN layers the GGUF holds
    gguf_arch: str = ""           # general.architecture the converter writes
    special_tokens: tuple[str, ...] = ()
    tokenizer: str = "gpt-2"      # "gpt-2"/"qwen35" (BPE from that vocab GGUF), "spm" (tokenizer.model),
                                  # "spm+json" (tokenizer.model and its tokenizer.json)
    e2e: bool = False             # the family's end-to-end model (quantize + verify + eval)
    config_class: str = ""        # when not <hf_class minus ForCausalLM>Config
    extra_args: tuple[str, ...] = ()
    notes: str = ""
    sub_configs: dict = field(default_factory=dict)   # nested configs (text_config, vision_config)


def _std_attn(**kw) -> dict:
    d = dict(hidden_size=H, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM,
             intermediate_size=FF, vocab_size=VOCAB_SIZE, max_position_embeddings=512,
             tie_word_embeddings=False, bos_token_id=50256, eos_token_id=50256, pad_token_id=None)
    d.update(kw)
    return d


GLM_SPECIALS = ("<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", "<|system|>", "<|user|>",
                "<|assistant|>", "<|observation|>", "<|begin_of_image|>", "<|end_of_image|>")

_MLA = dict(kv_lora_rank=32, qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=16, head_dim=16,
            num_key_value_heads=HEADS, n_group=1, topk_group=1)
_MOE4 = dict(moe_intermediate_size=MOE_FF, num_experts_per_tok=2)
_HYBRID_LIN = dict(linear_conv_kernel_dim=4, linear_key_head_dim=16, linear_value_head_dim=16,
                   linear_num_key_heads=2, linear_num_value_heads=4)

ARCHS: list[ArchSpec] = [
    ArchSpec("mixtral", "Mixtral", "MixtralForCausalLM",
             _std_attn(num_hidden_layers=2, num_local_experts=4, num_experts_per_tok=2, intermediate_size=MOE_FF),
             routed=4, used=2, gguf_arch="llama", e2e=True),
    ArchSpec("qwen2moe", "Qwen2-MoE", "Qwen2MoeForCausalLM",
             _std_attn(num_hidden_layers=2, num_experts=4, shared_expert_intermediate_size=MOE_FF,
                       decoder_sparse_step=1, mlp_only_layers=[], **_MOE4),
             routed=4, used=2, shared=1, gguf_arch="qwen2moe", e2e=True),
    ArchSpec("qwen3moe", "Qwen3-MoE", "Qwen3MoeForCausalLM",
             _std_attn(num_hidden_layers=2, num_experts=4, decoder_sparse_step=1, mlp_only_layers=[], **_MOE4),
             routed=4, used=2, gguf_arch="qwen3moe", e2e=True),
    ArchSpec("qwen3next", "Qwen3-Next", "Qwen3NextForCausalLM",
             _std_attn(num_hidden_layers=4, num_experts=4, shared_expert_intermediate_size=MOE_FF,
                       layer_types=["linear_attention"] * 3 + ["full_attention"], decoder_sparse_step=1,
                       mlp_only_layers=[], **_MOE4, **_HYBRID_LIN),
             routed=4, used=2, shared=1, gguf_arch="qwen3next", e2e=True, extra_args=("--no-mtp",),
             notes="transformers' class has no MTP weights: converted with --no-mtp"),
    ArchSpec("qwen35moe", "Qwen3.5-MoE", "Qwen3_5MoeForCausalLM",
             _std_attn(num_hidden_layers=4, num_experts=4, shared_expert_intermediate_size=MOE_FF,
                       layer_types=["linear_attention"] * 3 + ["full_attention"], **_MOE4, **_HYBRID_LIN,
                       vocab_size=151936),
             routed=4, used=2, shared=1, gguf_arch="qwen35moe", e2e=True, config_class="Qwen3_5MoeTextConfig",
             tokenizer="qwen35",
             extra_args=("--no-mtp",), notes="transformers' class has no MTP weights: converted with --no-mtp"),
    ArchSpec("deepseek2-lite", "DeepSeek-V2 (Lite, no q LoRA)", "DeepseekV2ForCausalLM",
             _std_attn(num_hidden_layers=3, n_routed_experts=4, n_shared_experts=1, first_k_dense_replace=1,
                       q_lora_rank=None, topk_method="greedy", **_MLA, **_MOE4),
             routed=4, used=2, shared=1, leading_dense=1, gguf_arch="deepseek2", e2e=True),
    ArchSpec("deepseek3", "DeepSeek-V3 (MLA)", "DeepseekV3ForCausalLM",
             _std_attn(num_hidden_layers=3, n_routed_experts=4, n_shared_experts=1, first_k_dense_replace=1,
                       q_lora_rank=32, num_nextn_predict_layers=0, **_MLA, **_MOE4),
             routed=4, used=2, shared=1, leading_dense=1, gguf_arch="deepseek2"),
    ArchSpec("glm4moe", "GLM-4.5 (NextN)", "Glm4MoeForCausalLM",
             _std_attn(num_hidden_layers=3, n_routed_experts=4, n_shared_experts=1, first_k_dense_replace=1,
                       num_nextn_predict_layers=1, use_qk_norm=True, partial_rotary_factor=0.5, n_group=1,
                       topk_group=1, **_MOE4),
             routed=4, used=2, shared=1, leading_dense=1, nextn=1, gguf_arch="glm4moe",
             special_tokens=GLM_SPECIALS, e2e=True),
    ArchSpec("glm47flash", "GLM-4.7-Flash", "Glm4MoeLiteForCausalLM",
             _std_attn(num_hidden_layers=3, n_routed_experts=4, n_shared_experts=1, q_lora_rank=32,
                       mlp_layer_types=["dense", "sparse", "sparse"], **_MLA, **_MOE4),
             routed=4, used=2, shared=1, leading_dense=1, gguf_arch="deepseek2", special_tokens=GLM_SPECIALS),
    ArchSpec("glm-dsa", "GLM-DSA (indexer)", "GlmMoeDsaForCausalLM",
             _std_attn(num_hidden_layers=3, n_routed_experts=4, n_shared_experts=1, q_lora_rank=32,
                       first_k_dense_replace=1, mlp_layer_types=["dense", "sparse", "sparse"],
                       layer_types=["indexed_attention"] * 3, indexer_types=["full"] * 3, index_topk=8,
                       index_head_dim=16, index_n_heads=2, **_MLA, **_MOE4),
             routed=4, used=2, shared=1, leading_dense=1, special_tokens=GLM_SPECIALS),
    ArchSpec("gpt-oss", "gpt-oss", "GptOssForCausalLM",
             _std_attn(num_hidden_layers=2, num_local_experts=4, num_experts_per_tok=2, intermediate_size=MOE_FF,
                       layer_types=["sliding_attention", "full_attention"], sliding_window=128),
             routed=4, used=2, gguf_arch="gpt-oss", e2e=True),
    ArchSpec("llama4", "Llama 4", "Llama4ForCausalLM",
             _std_attn(num_hidden_layers=2, num_local_experts=4, num_experts_per_tok=1, intermediate_size=MOE_FF,
                       intermediate_size_mlp=FF, interleave_moe_layer_step=1, moe_layers=[0, 1],
                       no_rope_layers=[1, 0], layer_types=["chunked_attention", "full_attention"],
                       attention_chunk_size=128),
             routed=4, used=1, shared=1, gguf_arch="llama4", config_class="Llama4TextConfig", e2e=True),
    ArchSpec("granitemoe", "Granite MoE", "GraniteMoeForCausalLM",
             _std_attn(num_hidden_layers=2, num_local_experts=4, num_experts_per_tok=2, intermediate_size=MOE_FF),
             routed=4, used=2, gguf_arch="granitemoe", e2e=True),
    ArchSpec("granitemoeshared", "Granite MoE (shared)", "GraniteMoeSharedForCausalLM",
             _std_attn(num_hidden_layers=2, num_local_experts=4, num_experts_per_tok=2, intermediate_size=MOE_FF,
                       shared_intermediate_size=MOE_FF),
             routed=4, used=2, shared=1, gguf_arch="granitemoe"),
    ArchSpec("granitehybrid", "Granite MoE hybrid", "GraniteMoeHybridForCausalLM",
             _std_attn(num_hidden_layers=2, num_local_experts=4, num_experts_per_tok=2, intermediate_size=MOE_FF,
                       shared_intermediate_size=MOE_FF, layer_types=["mamba", "attention"], mamba_n_heads=4,
                       mamba_d_head=32, mamba_d_state=16, mamba_n_groups=1, mamba_expand=2, mamba_chunk_size=64),
             routed=4, used=2, shared=1, gguf_arch="granitehybrid", e2e=True),
    ArchSpec("jamba", "Jamba", "JambaForCausalLM",
             _std_attn(num_hidden_layers=4, num_experts=4, num_experts_per_tok=2, intermediate_size=MOE_FF,
                       expert_layer_period=2, expert_layer_offset=1, attn_layer_period=2, attn_layer_offset=1,
                       mamba_d_state=16, mamba_dt_rank=8, mamba_expand=2, use_mamba_kernels=False),
             routed=4, used=2, leading_dense=1, gguf_arch="jamba", tokenizer="spm", e2e=True),
    ArchSpec("lfm2moe", "LFM2-MoE", "Lfm2MoeForCausalLM",
             _std_attn(num_hidden_layers=3, num_experts=4, num_dense_layers=1,
                       layer_types=["conv", "full_attention", "conv"], tie_word_embeddings=True, **_MOE4),
             routed=4, used=2, leading_dense=1, gguf_arch="lfm2moe", e2e=True),
    ArchSpec("olmoe", "OLMoE", "OlmoeForCausalLM",
             _std_attn(num_hidden_layers=2, num_experts=4, num_experts_per_tok=2, intermediate_size=MOE_FF),
             routed=4, used=2, gguf_arch="olmoe", e2e=True),
    ArchSpec("dbrx", "DBRX", "DbrxForCausalLM",
             dict(d_model=H, n_heads=HEADS, n_layers=2, max_seq_len=512, vocab_size=VOCAB_SIZE,
                  attn_config={"kv_n_heads": KV_HEADS, "clip_qkv": 8.0, "rope_theta": 10000.0},
                  ffn_config={"ffn_hidden_size": MOE_FF, "moe_num_experts": 4, "moe_top_k": 2}),
             routed=4, used=2, gguf_arch="dbrx", e2e=True),
    ArchSpec("ernie45moe", "ERNIE 4.5 MoE", "Ernie4_5_MoeForCausalLM",
             _std_attn(num_hidden_layers=3, moe_num_experts=4, moe_k=2, moe_num_shared_experts=1,
                       moe_intermediate_size=MOE_FF, moe_layer_start_index=1, moe_layer_end_index=2),
             routed=4, used=2, shared=1, leading_dense=1, gguf_arch="ernie4_5-moe", tokenizer="spm", e2e=True),
    ArchSpec("dots1", "dots.llm1", "Dots1ForCausalLM",
             _std_attn(num_hidden_layers=3, n_routed_experts=4, n_shared_experts=1, first_k_dense_replace=1,
                       **_MOE4),
             routed=4, used=2, shared=1, leading_dense=1, gguf_arch="dots1", e2e=True),
    ArchSpec("minimax-m2", "MiniMax-M2", "MiniMaxM2ForCausalLM",
             _std_attn(num_hidden_layers=2, num_local_experts=4, num_experts_per_tok=2, intermediate_size=MOE_FF,
                       rotary_dim=HEAD_DIM),
             routed=4, used=2, gguf_arch="minimax-m2", e2e=True),
    ArchSpec("hunyuan-moe", "Hunyuan MoE", "HunYuanMoEV1ForCausalLM",
             _std_attn(num_hidden_layers=2, num_experts=4, intermediate_size=MOE_FF,
                       moe_intermediate_size=[MOE_FF] * 2, moe_topk=[2] * 2),
             routed=4, used=2, gguf_arch="hunyuan-moe", e2e=True),
    ArchSpec("gemma4moe", "Gemma-4 MoE", "Gemma4ForCausalLM",
             _std_attn(num_hidden_layers=2, enable_moe_block=True, num_experts=4, top_k_experts=2,
                       moe_intermediate_size=MOE_FF, layer_types=["sliding_attention", "full_attention"],
                       sliding_window=128, hidden_size_per_layer_input=16, vocab_size_per_layer_input=VOCAB_SIZE,
                       tie_word_embeddings=True),
             routed=4, used=2, gguf_arch="gemma4", config_class="Gemma4TextConfig", tokenizer="spm+json", e2e=True),
    ArchSpec("afmoe", "AFMoE (Trinity)", "AfmoeForCausalLM",
             _std_attn(num_hidden_layers=3, num_experts=4, num_shared_experts=1, num_dense_layers=1,
                       layer_types=["sliding_attention", "sliding_attention", "full_attention"], sliding_window=128,
                       **_MOE4),
             routed=4, used=2, shared=1, leading_dense=1, gguf_arch="afmoe"),
    ArchSpec("cohere2moe", "Cohere2 MoE", "Cohere2MoeForCausalLM",
             _std_attn(num_hidden_layers=2, num_experts=4, num_experts_per_tok=2, intermediate_size=MOE_FF,
                       layer_types=["sliding_attention", "full_attention"], mlp_layer_types=["sparse", "sparse"],
                       sliding_window=128),
             routed=4, used=2),
    ArchSpec("exaone-moe", "EXAONE MoE", "ExaoneMoeForCausalLM",
             _std_attn(num_hidden_layers=3, num_experts=4, num_shared_experts=1, first_k_dense_replace=1,
                       mlp_layer_types=["dense", "sparse", "sparse"],
                       layer_types=["sliding_attention", "sliding_attention", "full_attention"], sliding_window=128,
                       **_MOE4),
             routed=4, used=2, shared=1, leading_dense=1),
    ArchSpec("laguna", "Laguna", "LagunaForCausalLM",
             _std_attn(num_hidden_layers=3, num_experts=4, shared_expert_intermediate_size=MOE_FF,
                       layer_types=["full_attention"] * 3, mlp_layer_types=["dense", "sparse", "sparse"],
                       num_attention_heads_per_layer=[HEADS] * 3, **_MOE4),
             routed=4, used=2, shared=1, leading_dense=1),
    ArchSpec("mellum", "Mellum", "MellumForCausalLM",
             _std_attn(num_hidden_layers=2, num_local_experts=4, layer_types=["full_attention"] * 2,
                       mlp_layer_types=["sparse", "sparse"], **_MOE4),
             routed=4, used=2),
    ArchSpec("solar-open", "Solar Open", "SolarOpenForCausalLM",
             _std_attn(num_hidden_layers=2, n_routed_experts=4, n_shared_experts=1, **_MOE4),
             routed=4, used=2, shared=1, special_tokens=GLM_SPECIALS + ("<unk>", "<|startoftext|>")),
    ArchSpec("hy-v3", "Hunyuan V3", "HYV3ForCausalLM",
             _std_attn(num_hidden_layers=3, num_experts=4, num_shared_experts=1,
                       mlp_layer_types=["dense", "sparse", "sparse"], **_MOE4),
             routed=4, used=2, shared=1, leading_dense=1),
    ArchSpec("nemotron-h-moe", "Nemotron-H MoE (hybrid)", "NemotronHForCausalLM",
             _std_attn(num_hidden_layers=4, layers_block_type=["mamba", "moe", "attention", "moe"],
                       n_routed_experts=4, n_shared_experts=1, moe_shared_expert_intermediate_size=MOE_FF,
                       ssm_state_size=16, mamba_num_heads=4, mamba_head_dim=32, n_groups=1, expand=2,
                       chunk_size=64, **_MOE4),
             routed=4, used=2, shared=1, leading_dense=1),
]


# Registered by the pinned converter and present in transformers 5.22.2, but not converting yet
# from transformers' own classes (kept out of the matrix, with the reason; issue 14 follow-up):
NOT_YET: list[tuple[ArchSpec, str]] = [
    (ArchSpec("kimi-linear", "Kimi-Linear", "KimiLinearForCausalLM",
             _std_attn(num_hidden_layers=3, num_experts=4, num_experts_per_token=2, num_shared_experts=1,
                       moe_intermediate_size=MOE_FF, q_lora_rank=None, kv_lora_rank=32, qk_rope_head_dim=16,
                       qk_nope_head_dim=16, v_head_dim=16, num_key_value_heads=HEADS,
                       mlp_layer_types=["dense", "sparse", "sparse"],
                       layer_types=["linear_attention", "full_attention", "linear_attention"],
                       linear_head_dim=16, linear_num_heads=4, linear_conv_kernel_dim=4),
             routed=4, used=2, shared=1, leading_dense=1, gguf_arch="kimi-linear", e2e=True),
     "transformers' KimiLinear class names its dense MLP block_sparse_moe.*, which the converter cannot map"),
    (ArchSpec("mimo-v2-flash", "MiMo-V2-Flash", "MiMoV2FlashForCausalLM",
             _std_attn(num_hidden_layers=3, n_routed_experts=4, mlp_layer_types=["dense", "sparse", "sparse"],
                       layer_types=["full_attention", "sliding_attention", "sliding_attention"], sliding_window=128,
                       v_head_dim=16, **_MOE4),
             routed=4, used=2, leading_dense=1),
     "the converter needs swa_head_dim/swa_* keys the transformers config does not write"),
]


# ---------------------------------------------------------------- content keys and caching

def _tree_digest(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        files = sorted(p.rglob("*.py")) if p.is_dir() else [p]
        for f in files:
            h.update(str(f.relative_to(LLAMA_TREE) if f.is_relative_to(LLAMA_TREE) else f.name).encode())
            h.update(f.read_bytes())
    return h.hexdigest()


def content_key(spec: ArchSpec) -> str:
    import torch
    import transformers
    h = hashlib.sha256()
    h.update(json.dumps(spec.__dict__, sort_keys=True, default=str).encode())
    h.update(f"transformers={transformers.__version__} torch={torch.__version__}".encode())
    h.update(_tree_digest([CONVERTER, LLAMA_TREE / "conversion", LLAMA_TREE / "gguf-py" / "gguf", VOCAB]).encode())
    for fn in (build_checkpoint, _add_mtp_layers, write_tokenizer, write_spm_tokenizer, _config):
        h.update(inspect.getsource(fn).encode())
    return h.hexdigest()[:16]


def cache_root() -> Path:
    explicit = os.environ.get("APEX_ORCH_ARCHS_CACHE")
    if explicit:
        return Path(explicit)
    base = os.environ.get("APEX_ORCH_CACHE")
    if not base:
        raise RuntimeError("APEX_ORCH_CACHE is unset: tests/conftest.py isolates the caches first")
    return Path(base) / "archs"


# ---------------------------------------------------------------- tokenizer

def _gguf_strings(field) -> list[str]:
    return [bytes(field.parts[i]).decode("utf-8") for i in field.data]


SPM_VOCAB = LLAMA_TREE / "models" / "ggml-vocab-llama-spm.gguf"


def write_spm_tokenizer(folder: Path) -> None:
    """A SentencePiece `tokenizer.model` rebuilt from the tree's llama-spm vocab GGUF (32000
    pieces with their scores and types, byte fallback) for converters that read only that file."""
    import gguf
    from sentencepiece import sentencepiece_model_pb2 as pb

    r = gguf.GGUFReader(SPM_VOCAB)
    tokens = _gguf_strings(r.fields["tokenizer.ggml.tokens"])
    scores = [float(r.fields["tokenizer.ggml.scores"].parts[i][0]) for i in r.fields["tokenizer.ggml.scores"].data]
    types = [int(r.fields["tokenizer.ggml.token_type"].parts[i][0]) for i in r.fields["tokenizer.ggml.token_type"].data]
    m = pb.ModelProto()
    for tok, score, ttype in zip(tokens, scores, types):
        piece = m.pieces.add()
        piece.piece, piece.score, piece.type = tok, score, ttype   # GGUF token types use SPM's numbering
    m.trainer_spec.model_type = pb.TrainerSpec.BPE
    m.trainer_spec.vocab_size = len(tokens)
    m.trainer_spec.byte_fallback = True
    m.trainer_spec.unk_id, m.trainer_spec.bos_id, m.trainer_spec.eos_id, m.trainer_spec.pad_id = 0, 1, 2, -1
    m.normalizer_spec.name = "identity"
    m.normalizer_spec.add_dummy_prefix = True
    m.normalizer_spec.remove_extra_whitespaces = False
    m.normalizer_spec.escape_whitespaces = True
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.model").write_bytes(m.SerializeToString())


def write_tokenizer(folder: Path, specials: tuple[str, ...] = (), vocab: str = "gpt-2") -> None:
    """A byte-level BPE rebuilt from the tree's vocab GGUF (no download), plus specials. GPT-2's
    by default; "qwen35" for Qwen3.5, whose tokenizer class (transformers maps the model type to
    it) applies Qwen3.5's own pre-tokenizer, so only Qwen3.5's vocab gives a known hash."""
    import gguf
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    r = gguf.GGUFReader(LLAMA_TREE / "models" / f"ggml-vocab-{vocab}.gguf")
    tokens = _gguf_strings(r.fields["tokenizer.ggml.tokens"])
    merges = _gguf_strings(r.fields["tokenizer.ggml.merges"])
    bpe = models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=[tuple(m.split(" ", 1)) for m in merges])
    tok = Tokenizer(bpe)
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>")
    extra = [s for s in specials if s not in hf.get_vocab()]
    if extra:
        hf.add_special_tokens({"additional_special_tokens": extra})
    hf.save_pretrained(folder)


# ---------------------------------------------------------------- checkpoint and conversion

def _config(spec: ArchSpec):
    import transformers
    name = spec.config_class or (spec.hf_class.replace("ForCausalLM", "").replace("ForConditionalGeneration", "")
                                 + "Config")
    cls = getattr(transformers, name)
    kwargs = dict(spec.config)
    for key, (sub_name, sub_kwargs) in spec.sub_configs.items():
        kwargs[key] = getattr(transformers, sub_name)(**sub_kwargs)
    return cls(**kwargs)


def build_checkpoint(spec: ArchSpec, folder: Path) -> None:
    import torch
    import transformers
    torch.manual_seed(0)
    config = _config(spec)
    model = getattr(transformers, spec.hf_class)(config)
    model.eval()
    with torch.no_grad():        # random init is far from trained scales; keep logits finite and varied
        for name, p in model.named_parameters():
            if p.dim() >= 2 and "norm" not in name:
                p.normal_(0.0, 0.5 / max(1.0, p.shape[-1] ** 0.5))
    model.save_pretrained(folder, safe_serialization=True)
    if spec.nextn:
        _add_mtp_layers(spec, config, folder)
    if spec.tokenizer.startswith("spm"):
        write_spm_tokenizer(folder)
        if spec.tokenizer == "spm+json":   # the fast tokenizer transformers converts from it
            from transformers import LlamaTokenizerFast
            LlamaTokenizerFast(vocab_file=str(folder / "tokenizer.model")).save_pretrained(folder)
    else:
        write_tokenizer(folder, spec.special_tokens, spec.tokenizer)


def _add_mtp_layers(spec: ArchSpec, config, folder: Path) -> None:
    """transformers' classes do not model the MTP/NextN layer(s) the real checkpoints ship
    (`model.layers.N.*` past num_hidden_layers, with eh_proj/enorm/hnorm/shared_head): add them
    as the release checkpoints lay them out, a copy of the last block plus the MTP pieces."""
    import torch
    from safetensors.torch import load_file, save_file
    n = config.num_hidden_layers
    weights = {}
    for part in sorted(folder.glob("model*.safetensors")):
        weights.update(load_file(part))
    last = f"model.layers.{n - 1}."
    g = torch.Generator().manual_seed(1)
    extra = {}
    for i in range(spec.nextn):
        p = f"model.layers.{n + i}."
        extra.update({p + k[len(last):]: v.clone() for k, v in weights.items() if k.startswith(last)})
        extra[p + "eh_proj.weight"] = torch.randn(H, 2 * H, generator=g) * 0.05
        for norm in ("enorm.weight", "hnorm.weight", "shared_head.norm.weight"):
            extra[p + norm] = torch.ones(H)
    save_file(extra, str(folder / "model-mtp.safetensors"), metadata={"format": "pt"})


def converter_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"})
    return env


def convert(folder: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    args = [sys.executable, str(CONVERTER), str(folder), "--outfile", str(out), "--outtype", "f16", *extra]
    return subprocess.run(args, capture_output=True, text=True, env=converter_env(), timeout=600)


def get_all(specs: list[ArchSpec]) -> dict[str, "Built | str"]:
    """Every spec's converted GGUF (or the reason it failed): missing checkpoints are built in this
    process, then ONE converter process (convert_many.py: the converter's own main() per job)
    converts every missing one."""
    out: dict[str, Built | str] = {}
    jobs, pending = [], []
    for spec in specs:
        root = cache_root() / f"{spec.id}-{content_key(spec)}"
        if (root / f"{spec.id}.gguf").exists():
            out[spec.id] = get(spec)
            continue
        root.mkdir(parents=True, exist_ok=True)
        t0 = time.monotonic()
        try:
            if not (root / "hf" / "config.json").exists():
                build_checkpoint(spec, root / "hf")
        except Exception as e:  # noqa: BLE001 - reported per architecture
            out[spec.id] = f"building the checkpoint failed: {type(e).__name__}: {e}"
            continue
        pending.append((spec, root, time.monotonic() - t0))
        jobs.append({"converter": str(CONVERTER), "log": str(root / "convert.log"),
                     "argv": [str(root / "hf"), "--outfile", str(root / f".{spec.id}.gguf.part"),
                              "--outtype", "f16", *spec.extra_args]})
    if jobs:
        (cache_root() / "jobs.json").write_text(json.dumps(jobs))
        t0 = time.monotonic()
        subprocess.run([sys.executable, str(Path(__file__).with_name("convert_many.py")),
                        str(cache_root() / "jobs.json")], env=converter_env(), timeout=1800)
        per_job = (time.monotonic() - t0) / len(jobs)
        for spec, root, build_s in pending:
            part, log = root / f".{spec.id}.gguf.part", (root / "convert.log")
            text = log.read_text() if log.exists() else "(no log)"
            if part.exists() and text.rstrip().endswith("exit status 0"):
                os.replace(part, root / f"{spec.id}.gguf")
                (root / "built.json").write_text(json.dumps({"seconds": build_s + per_job}))
                out[spec.id] = get(spec)
            else:
                part.unlink(missing_ok=True)
                out[spec.id] = "convert_hf_to_gguf.py failed:\n" + text[-2500:]
    return out


@dataclass
class Built:
    spec: ArchSpec
    checkpoint: Path
    gguf: Path
    seconds: float
    log: str


def get(spec: ArchSpec) -> Built:
    """The converted GGUF for `spec`, built once per content key."""
    root = cache_root() / f"{spec.id}-{content_key(spec)}"
    ckpt, out, log = root / "hf", root / f"{spec.id}.gguf", root / "convert.log"
    if out.exists():
        meta = json.loads((root / "built.json").read_text())
        return Built(spec, ckpt, out, meta["seconds"], log.read_text())
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    if not (ckpt / "config.json").exists():
        build_checkpoint(spec, ckpt)
    tmp = root / f".{spec.id}.gguf.part"
    r = convert(ckpt, tmp, *spec.extra_args)
    log.write_text(r.stdout + r.stderr)
    if r.returncode != 0:
        raise AssertionError(f"convert_hf_to_gguf.py failed for {spec.id} (exit {r.returncode}):\n"
                             + (r.stdout + r.stderr)[-3000:])
    os.replace(tmp, out)
    seconds = time.monotonic() - t0
    (root / "built.json").write_text(json.dumps({"seconds": seconds}))
    return Built(spec, ckpt, out, seconds, log.read_text())
