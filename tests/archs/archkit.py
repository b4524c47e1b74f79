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
GEMMA4_VOCAB = 262144
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
    nextn: int = 0                # MTP/NextN layers the (bundled) GGUF holds
    mtp: str = ""                 # the MTP head the checkpoint carries, as its release lays it out (MTP_LAYOUTS)
    mtp_layer: int = -1           # the trunk layer the head's decoder layer copies (-1: the last)
    mtp_files: tuple[str, ...] = ()   # also converted as "draft" (--mtp: only the head) and "no-mtp" (--no-mtp)
                                      # where the converter supports both (supports_mtp_export), or
                                      # "mtp-refused": its --mtp must fail (a class without MTP export)
    gguf_arch: str = ""           # general.architecture the converter writes
    special_tokens: tuple[str, ...] = ()
    tokenizer: str = "gpt-2"      # "gpt-2"/"qwen35" (BPE from that vocab GGUF), "spm" (tokenizer.model),
                                  # "spm+json" (tokenizer.model and its tokenizer.json), "gemma4" (its BPE)
    e2e: bool = False             # the family's end-to-end model (quantize + verify + eval)
    mmproj: bool = False          # a vision model: the converter's --mmproj also writes its projector
    config_class: str = ""        # when not <hf_class minus ForCausalLM>Config
    extra_args: tuple[str, ...] = ()
    notes: str = ""
    config_json: dict = field(default_factory=dict)   # keys written into config.json as the release checkpoints
                                                      # spell them (transformers 5 renames some on save)
    sub_configs: dict = field(default_factory=dict)   # nested configs (text_config, vision_config)


def _std_attn(**kw) -> dict:
    d = dict(hidden_size=H, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM,
             intermediate_size=FF, vocab_size=VOCAB_SIZE, max_position_embeddings=512,
             tie_word_embeddings=False, bos_token_id=50256, eos_token_id=50256, pad_token_id=None)
    d.update(kw)
    return d


GLM_SPECIALS = ("<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", "<|system|>", "<|user|>",
                "<|assistant|>", "<|observation|>", "<|begin_of_image|>", "<|end_of_image|>")

MISTRAL_VISION_SPECIALS = ("[IMG]", "[IMG_BREAK]", "[IMG_END]")   # ids 50257.. after GPT-2's vocab

_MLA = dict(kv_lora_rank=32, qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=16, head_dim=16,
            num_key_value_heads=HEADS, n_group=1, topk_group=1)
_MOE4 = dict(moe_intermediate_size=MOE_FF, num_experts_per_tok=2)
_HYBRID_LIN = dict(linear_conv_kernel_dim=4, linear_key_head_dim=16, linear_value_head_dim=16,
                   linear_num_key_heads=2, linear_num_value_heads=4)

MTP_SPLIT = ("draft", "no-mtp")

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
             routed=4, used=2, shared=1, nextn=1, gguf_arch="qwen3next", e2e=True, mtp="qwen", mtp_files=MTP_SPLIT),
    ArchSpec("qwen35moe", "Qwen3.5-MoE", "Qwen3_5MoeForCausalLM",
             _std_attn(num_hidden_layers=4, num_experts=4, shared_expert_intermediate_size=MOE_FF,
                       layer_types=["linear_attention"] * 3 + ["full_attention"], **_MOE4, **_HYBRID_LIN,
                       vocab_size=151936,
                       rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25,
                                        "mrope_section": [1, 1, 0], "mrope_interleaved": True}),
             routed=4, used=2, shared=1, gguf_arch="qwen35moe", e2e=True, config_class="Qwen3_5MoeTextConfig",
             tokenizer="qwen35", nextn=1, mtp="qwen", mtp_files=MTP_SPLIT, config_json={"mtp_num_hidden_layers": 1}),
    ArchSpec("deepseek2-lite", "DeepSeek-V2 (Lite, no q LoRA)", "DeepseekV2ForCausalLM",
             _std_attn(num_hidden_layers=26, n_routed_experts=4, n_shared_experts=1, first_k_dense_replace=1,
                       q_lora_rank=None, topk_method="greedy", **_MLA, **_MOE4),
             routed=4, used=2, shared=1, leading_dense=1, gguf_arch="deepseek2", e2e=True,
             notes="26 blocks: the pinned llama.cpp reads q_lora_rank unless n_layer is 26/27 (its V2-Lite test)"),
    ArchSpec("deepseek3", "DeepSeek-V3 (MLA)", "DeepseekV3ForCausalLM",
             _std_attn(num_hidden_layers=3, n_routed_experts=4, n_shared_experts=1, first_k_dense_replace=1,
                       q_lora_rank=32, num_nextn_predict_layers=1, **_MLA, **_MOE4),
             routed=4, used=2, shared=1, leading_dense=1, gguf_arch="deepseek2", mtp="nextn+head",
             mtp_files=("mtp-refused",),
             notes="its checkpoint's MTP layer is dropped: the pinned converter skips DeepSeek-V3's NextN "
                   "block (DeepseekV2Model.skip_mtp)"),
    ArchSpec("glm4moe", "GLM-4.5 (NextN)", "Glm4MoeForCausalLM",
             _std_attn(num_hidden_layers=3, n_routed_experts=4, n_shared_experts=1, first_k_dense_replace=1,
                       num_nextn_predict_layers=1, use_qk_norm=True, partial_rotary_factor=0.5, n_group=1,
                       topk_group=1, **_MOE4),
             routed=4, used=2, shared=1, leading_dense=1, nextn=1, gguf_arch="glm4moe",
             special_tokens=GLM_SPECIALS, e2e=True, mtp="nextn+head", mtp_files=MTP_SPLIT),
    ArchSpec("glm47flash", "GLM-4.7-Flash", "Glm4MoeLiteForCausalLM",
             _std_attn(num_hidden_layers=3, n_routed_experts=4, n_shared_experts=1, q_lora_rank=32,
                       mlp_layer_types=["dense", "sparse", "sparse"], **_MLA, **_MOE4),
             routed=4, used=2, shared=1, leading_dense=1, nextn=1, gguf_arch="deepseek2",
             special_tokens=GLM_SPECIALS, mtp="nextn", mtp_files=MTP_SPLIT,
             config_json={"num_nextn_predict_layers": 1}),
    ArchSpec("glm-dsa", "GLM-DSA (indexer)", "GlmMoeDsaForCausalLM",
             _std_attn(num_hidden_layers=3, n_routed_experts=4, n_shared_experts=1, q_lora_rank=32,
                       first_k_dense_replace=1, mlp_layer_types=["dense", "sparse", "sparse"],
                       layer_types=["indexed_attention"] * 3, indexer_types=["full"] * 3, index_topk=8,
                       index_head_dim=16, index_n_heads=2, **_MLA, **_MOE4),
             routed=4, used=2, shared=1, leading_dense=1, nextn=1, special_tokens=GLM_SPECIALS, mtp="nextn",
             mtp_files=MTP_SPLIT, config_json={"num_nextn_predict_layers": 1}),
    ArchSpec("gpt-oss", "gpt-oss", "GptOssForCausalLM",
             _std_attn(num_hidden_layers=2, num_local_experts=4, num_experts_per_tok=2, intermediate_size=MOE_FF,
                       layer_types=["sliding_attention", "full_attention"], sliding_window=128),
             routed=4, used=2, gguf_arch="gpt-oss", e2e=True),
    ArchSpec("llama4", "Llama 4", "Llama4ForCausalLM",
             _std_attn(num_hidden_layers=4, num_local_experts=4, num_experts_per_tok=1, intermediate_size=MOE_FF,
                       intermediate_size_mlp=FF, interleave_moe_layer_step=1, moe_layers=[0, 1, 2, 3],
                       no_rope_layers=[1, 1, 1, 0], layer_types=["chunked_attention"] * 3 + ["full_attention"],
                       attention_chunk_size=128),
             routed=4, used=1, shared=1, gguf_arch="llama4", config_class="Llama4TextConfig", e2e=True,
             notes="4 blocks: llama.cpp makes every 4th block NoPE (with fewer its attention-temperature "
                   "input is unused and llama-imatrix aborts)"),
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
             routed=4, used=2, shared=1, gguf_arch="granitehybrid", e2e=True,
             config_json={"layer_types": ["mamba", "attention"]},
             notes="config.json's layer_types as Granite 4.0-H spells them (mamba/attention): transformers 5 "
                   "saves linear_attention/full_attention, which the converter reads as no attention layer"),
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
             _std_attn(num_hidden_layers=2, num_experts=4, num_experts_per_tok=2, intermediate_size=MOE_FF,
                       num_key_value_heads=HEADS),
             routed=4, used=2, gguf_arch="olmoe", e2e=True, notes="no GQA (llama.cpp's OLMoE k_norm spans n_embd)"),
    ArchSpec("dbrx", "DBRX", "DbrxForCausalLM",
             dict(d_model=H, n_heads=HEADS, n_layers=2, max_seq_len=512, vocab_size=VOCAB_SIZE,
                  attn_config={"kv_n_heads": KV_HEADS, "clip_qkv": 8.0, "rope_theta": 10000.0},
                  ffn_config={"ffn_hidden_size": MOE_FF, "moe_num_experts": 4, "moe_top_k": 2}),
             routed=4, used=2, gguf_arch="dbrx", e2e=True),
    ArchSpec("ernie45moe", "ERNIE 4.5 MoE", "Ernie4_5_MoeForCausalLM",
             _std_attn(num_hidden_layers=3, moe_num_experts=4, moe_k=2, moe_num_shared_experts=1,
                       intermediate_size=KV_HEADS * MOE_FF,   # the converter's shared width: this // kv heads
                       moe_intermediate_size=MOE_FF, moe_layer_start_index=1, moe_layer_end_index=2),
             routed=4, used=2, shared=1, leading_dense=1, gguf_arch="ernie4_5-moe", tokenizer="spm", e2e=True),
    ArchSpec("dots1", "dots.llm1", "Dots1ForCausalLM",
             _std_attn(num_hidden_layers=3, n_routed_experts=4, n_shared_experts=1, first_k_dense_replace=1,
                       num_key_value_heads=HEADS, scoring_func="sigmoid", **_MOE4),
             routed=4, used=2, shared=1, leading_dense=1, gguf_arch="dots1", e2e=True,
             notes="no GQA (llama.cpp's dots1 sizes k/v as n_head * head_dim, like the release)"),
    ArchSpec("minimax-m2", "MiniMax-M2", "MiniMaxM2ForCausalLM",
             _std_attn(num_hidden_layers=2, num_local_experts=4, num_experts_per_tok=2, intermediate_size=MOE_FF,
                       rotary_dim=HEAD_DIM, scoring_func="sigmoid"),
             routed=4, used=2, gguf_arch="minimax-m2", e2e=True),
    ArchSpec("hunyuan-moe", "Hunyuan MoE", "HunYuanMoEV1ForCausalLM",
             _std_attn(num_hidden_layers=2, num_experts=4, intermediate_size=MOE_FF,
                       moe_intermediate_size=[MOE_FF] * 2, moe_topk=[2] * 2, num_shared_expert=[1] * 2,
                       vocab_size=N_VOCAB),
             routed=4, used=2, shared=1, gguf_arch="hunyuan-moe", tokenizer="hunyuan", e2e=True,
             notes="tokenizer: the release's remote-code shape (mergeable_ranks) over GPT-2's vocab; "
                   "transformers' class always has the shared MLP (num_shared_expert = 1)"),
    ArchSpec("gemma4moe", "Gemma-4 MoE", "Gemma4ForCausalLM",
             _std_attn(num_hidden_layers=2, enable_moe_block=True, num_experts=4, top_k_experts=2,
                       moe_intermediate_size=MOE_FF, layer_types=["sliding_attention", "full_attention"],
                       sliding_window=128, hidden_size_per_layer_input=16, vocab_size_per_layer_input=GEMMA4_VOCAB,
                       tie_word_embeddings=True, vocab_size=GEMMA4_VOCAB, bos_token_id=2, eos_token_id=1,
                       pad_token_id=0),
             routed=4, used=2, gguf_arch="gemma4", config_class="Gemma4TextConfig", tokenizer="gemma4", e2e=True,
             notes="Gemma 4's own vocab (262144, from the tree's gemma-4 vocab GGUF): llama.cpp's gemma4 "
                   "tokenizer needs its BPE merges"),
    ArchSpec("afmoe", "AFMoE (Trinity)", "AfmoeForCausalLM",
             _std_attn(num_hidden_layers=3, num_experts=4, num_shared_experts=1, num_dense_layers=1,
                       layer_types=["sliding_attention", "sliding_attention", "full_attention"], sliding_window=128,
                       **_MOE4),
             routed=4, used=2, shared=1, leading_dense=1, gguf_arch="afmoe"),
    ArchSpec("cohere2moe", "Cohere2 MoE", "Cohere2MoeForCausalLM",
             _std_attn(num_hidden_layers=2, num_experts=4, num_experts_per_tok=2, intermediate_size=MOE_FF,
                       layer_types=["sliding_attention", "full_attention"], mlp_layer_types=["sparse", "sparse"],
                       sliding_window=128),
             routed=4, used=2, nextn=1, mtp="nextn", mtp_files=("mtp-refused",),
             config_json={"num_nextn_predict_layers": 1}),
    ArchSpec("exaone-moe", "EXAONE MoE", "ExaoneMoeForCausalLM",
             _std_attn(num_hidden_layers=3, num_experts=4, num_shared_experts=1, first_k_dense_replace=1,
                       mlp_layer_types=["dense", "sparse", "sparse"],
                       layer_types=["sliding_attention", "sliding_attention", "full_attention"], sliding_window=128,
                       scoring_func="sigmoid", **_MOE4),
             routed=4, used=2, shared=1, leading_dense=1, nextn=1, mtp="qwen", mtp_layer=0,
             mtp_files=("mtp-refused",), config_json={"num_nextn_predict_layers": 1},
             notes="its MTP layer is dense, as llama.cpp's EXAONE-MoE loader expects (the converter cannot "
                   "map per-expert weights past the trunk)"),
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
             routed=4, used=2, shared=1, leading_dense=1, nextn=1, mtp="hy", mtp_files=MTP_SPLIT,
             config_json={"num_nextn_predict_layers": 1}),
    ArchSpec("mistral-small-4", "Mistral-Small-4 (Mistral 3 path, Pixtral tower)", "Mistral3ForConditionalGeneration",
             dict(image_token_index=N_VOCAB, projector_hidden_act="gelu", spatial_merge_size=2,
                  multimodal_projector_bias=False, vision_feature_layer=-1),
             routed=4, used=2, shared=1, gguf_arch="mistral4", config_class="Mistral3Config",
             special_tokens=MISTRAL_VISION_SPECIALS, e2e=True, mmproj=True,
             sub_configs={"text_config": ("Mistral4Config", _std_attn(
                              num_hidden_layers=2, n_routed_experts=4, n_shared_experts=1, first_k_dense_replace=0,
                              q_lora_rank=32, bos_token_id=50256, eos_token_id=50256, pad_token_id=None,
                              **_MLA, **_MOE4)),
                          "vision_config": ("PixtralVisionConfig", dict(
                              hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                              head_dim=16, image_size=64, patch_size=16))},
             notes="Mistral3ForConditionalGeneration with a mistral4 text model (MLA + MoE) and a tiny Pixtral "
                   "tower (3 blocks: the converter maps multi_modal_projector.linear_N by block number); "
                   "the projector is written by the converter's --mmproj"),
    ArchSpec("nemotron-h-moe", "Nemotron-H MoE (hybrid)", "NemotronHForCausalLM",
             _std_attn(num_hidden_layers=4, layers_block_type=["mamba", "moe", "attention", "moe"],
                       n_routed_experts=4, n_shared_experts=1, moe_shared_expert_intermediate_size=MOE_FF,
                       ssm_state_size=16, mamba_num_heads=4, mamba_head_dim=32, n_groups=1, expand=2,
                       chunk_size=64, num_nextn_predict_layers=1, **_MOE4),
             routed=4, used=2, shared=1, leading_dense=1, nextn=1, mtp="nemotron", mtp_files=MTP_SPLIT),
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
    h.update(Path(__file__).with_name("convert_many.py").read_bytes())
    for fn in (build_checkpoint, _add_mtp_layers, write_tokenizer, write_spm_tokenizer, write_gemma4_tokenizer,
               write_tiktoken_style_tokenizer, _copy_tokenizer, _config):
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


def write_gemma4_tokenizer(folder: Path) -> None:
    """Gemma 4's byte-fallback BPE (`tokenizer.json` with its merges: llama.cpp's "gemma4" vocab
    needs them) rebuilt from the tree's gemma-4 vocab GGUF: 262144 tokens, its merges, specials."""
    import gguf
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers
    from transformers import PreTrainedTokenizerFast

    r = gguf.GGUFReader(LLAMA_TREE / "models" / "ggml-vocab-gemma-4.gguf")
    tokens = _gguf_strings(r.fields["tokenizer.ggml.tokens"])
    types = [int(r.fields["tokenizer.ggml.token_type"].parts[i][0]) for i in r.fields["tokenizer.ggml.token_type"].data]
    merges = [tuple(m.split(" ")) for m in _gguf_strings(r.fields["tokenizer.ggml.merges"]) if m.count(" ") == 1]
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, byte_fallback=True,
                               unk_token="<unk>", fuse_unk=True))
    tok.normalizer = normalizers.Replace(" ", "\u2581")
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types)
                            if ty == gguf.TokenType.CONTROL])
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", unk_token="<unk>",
                                 pad_token="<pad>")
    hf.save_pretrained(folder)


_TIKTOKEN_STYLE = '''"""Hunyuan's tokenizer shape (remote code, as the release ships it): a byte-level BPE that
exposes tiktoken-style `mergeable_ranks` (bytes -> rank) and `special_tokens` (name -> id). Here
GPT-2's vocab (its ids are tiktoken's gpt2 ranks), written by tests/archs/archkit.py."""
from transformers import PreTrainedTokenizerFast


def _byte_decoder():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\\xa1"), ord("\\xac") + 1)) \\
        + list(range(ord("\\xae"), ord("\\xff") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


class HYTokenizer(PreTrainedTokenizerFast):
    @property
    def special_tokens(self):
        return {"<|endoftext|>": 50256}

    @property
    def mergeable_ranks(self):
        dec = _byte_decoder()
        # the first 4096 ranks only: the converter rebuilds each token's merge in pure Python (two
        # minutes for all 50256); the rest are written as unused [PAD] tokens
        return {bytes(dec[ch] for ch in tok): i for tok, i in self.get_vocab().items() if i < 4096}
'''


def write_tiktoken_style_tokenizer(folder: Path) -> None:
    """Hunyuan's converter reads `mergeable_ranks`/`special_tokens` from the release's remote-code
    tokenizer (AutoTokenizer, trust_remote_code): the same shape over GPT-2's vocab, whose ids are
    tiktoken's gpt2 ranks, so the pre-tokenizer hash is GPT-2's known entry."""
    (folder / "tokenization_hy.py").write_text(_TIKTOKEN_STYLE)
    cfg_path = folder / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["auto_map"] = {"AutoTokenizer": ["tokenization_hy.HYTokenizer", "tokenization_hy.HYTokenizer"]}
    cfg_path.write_text(json.dumps(cfg, indent=2))


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
    if spec.mtp:
        _add_mtp_layers(spec, config, folder)
    if spec.mmproj:   # the image processor's settings the projector GGUF records (Pixtral's release values)
        (folder / "preprocessor_config.json").write_text(json.dumps({
            "image_processor_type": "PixtralImageProcessor", "image_mean": [0.48145466, 0.4578275, 0.40821073],
            "image_std": [0.26862954, 0.26130258, 0.27577711], "patch_size": 16, "size": {"longest_edge": 64}}))
    if spec.config_json:
        cfg_path = folder / "config.json"
        cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()), **spec.config_json}, indent=2))
    _copy_tokenizer(spec, folder)
    if spec.tokenizer == "hunyuan":
        write_tiktoken_style_tokenizer(folder)


def _copy_tokenizer(spec: ArchSpec, folder: Path) -> None:
    """The tokenizer files, built once per (kind, specials) under the cache and copied: rebuilding
    a 50k-262k token BPE from its vocab GGUF costs seconds to a minute per checkpoint."""
    import shutil
    key = hashlib.sha256(json.dumps([spec.tokenizer, list(spec.special_tokens)]).encode()).hexdigest()[:16]
    done = cache_root() / "tokenizers" / f"{spec.tokenizer}-{key}"
    if not done.is_dir():
        tmp = done.with_name(done.name + f".part{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        if spec.tokenizer == "gemma4":
            write_gemma4_tokenizer(tmp)
        elif spec.tokenizer.startswith("spm"):
            write_spm_tokenizer(tmp)
            if spec.tokenizer == "spm+json":   # the fast tokenizer transformers converts from it
                from transformers import LlamaTokenizerFast
                LlamaTokenizerFast(vocab_file=str(tmp / "tokenizer.model")).save_pretrained(tmp)
        else:   # "gpt-2", "qwen35" and "hunyuan" (GPT-2's, with remote code added after the copy)
            write_tokenizer(tmp, spec.special_tokens, "gpt-2" if spec.tokenizer == "hunyuan" else spec.tokenizer)
        os.replace(tmp, done)
    for f in done.iterdir():
        shutil.copyfile(f, folder / f.name)


# The MTP/NextN heads as the release checkpoints lay them out (transformers' classes do not model
# them). Names and shapes are the ones the pinned converter maps (its `mtp.*` remaps and
# gguf-py's tensor_mapping `model.layers.{bid}.{eh_proj,enorm,hnorm,embed_tokens,shared_head.*}`);
# which optional pieces a family ships follows its release (DeepSeek-V3 and GLM-4.5 carry their own
# embed_tokens and shared_head.head, later GLMs and the others share the trunk's).
MTP_LAYOUTS = {
    "qwen": "mtp.{fc, pre_fc_norm_embedding, pre_fc_norm_hidden, norm} + mtp.layers.0.* (a full-attention "
            "decoder layer)",
    "nextn": "model.layers.<n>.{eh_proj, enorm, hnorm, shared_head.norm} + that block's decoder layer",
    "nextn+head": "model.layers.<n>.{eh_proj, enorm, hnorm, embed_tokens, shared_head.head, shared_head.norm} "
                  "+ that block's decoder layer",
    "hy": "model.layers.<n>.{eh_proj, enorm, hnorm, final_layernorm} + that block's decoder layer",
    "nemotron": "mtp.layers.0.{enorm, hnorm, eh_proj, norm, mixer.*} (attention) + mtp.layers.1.{norm, mixer.*, "
                "final_layernorm} (MoE)",
}


def _add_mtp_layers(spec: ArchSpec, config, folder: Path) -> None:
    """Add the MTP head of layout `spec.mtp` to the saved checkpoint (one more safetensors file):
    its decoder layer(s) are copies of the checkpoint's own last layer(s) of that kind, its norms
    copy the final norm's values (so each family's norm convention holds: Qwen's are offsets from 1),
    its projections are random like the rest, its embedding/head copies the trunk's."""
    import re
    import torch
    from safetensors.torch import load_file, save_file
    weights = {}
    for part in sorted(folder.glob("model*.safetensors")):
        weights.update(load_file(part))
    n = len(spec.config.get("layers_block_type") or []) or config.num_hidden_layers
    prefix = next(m.group(1) for k in weights if (m := re.match(r"^((?:model|backbone)\.layers\.)\d+\.", k)))
    final_norm = next(v for k, v in weights.items() if re.fullmatch(r"(model|backbone)\.(norm|norm_f)\.weight", k))
    g = torch.Generator().manual_seed(1)

    def layer(i: int, to: str) -> dict:
        src = f"{prefix}{i}."
        return {to + k[len(src):]: v.clone() for k, v in weights.items() if k.startswith(src)}

    def proj() -> torch.Tensor:
        return torch.randn(H, 2 * H, generator=g) * (0.5 / (2 * H) ** 0.5)

    extra: dict = {}
    n_mtp = 1       # every release mirrored here ships one MTP layer
    src = spec.mtp_layer % n
    if spec.mtp == "qwen":
        for i in range(n_mtp):
            extra.update(layer(src, f"mtp.layers.{i}."))
        extra["mtp.fc.weight"] = proj()
        for norm in ("pre_fc_norm_embedding", "pre_fc_norm_hidden", "norm"):
            extra[f"mtp.{norm}.weight"] = final_norm.clone()
    elif spec.mtp == "nemotron":
        kinds = spec.config["layers_block_type"]
        attn, moe = max(i for i, t in enumerate(kinds) if t == "attention"), max(i for i, t in enumerate(kinds) if t == "moe")
        extra.update(layer(attn, "mtp.layers.0."))
        extra.update(layer(moe, "mtp.layers.1."))
        extra["mtp.layers.0.eh_proj.weight"] = proj()
        for name in ("mtp.layers.0.enorm.weight", "mtp.layers.0.hnorm.weight", "mtp.layers.1.final_layernorm.weight"):
            extra[name] = final_norm.clone()
    else:   # "nextn", "nextn+head", "hy": blocks past num_hidden_layers
        for i in range(n_mtp):
            p = f"{prefix}{n + i}."
            extra.update(layer(src, p))
            extra[p + "eh_proj.weight"] = proj()
            head_norm = "final_layernorm" if spec.mtp == "hy" else "shared_head.norm"
            for norm in ("enorm", "hnorm", head_norm):
                extra[f"{p}{norm}.weight"] = final_norm.clone()
            if spec.mtp == "nextn+head":
                extra[p + "embed_tokens.weight"] = weights["model.embed_tokens.weight"].clone()
                extra[p + "shared_head.head.weight"] = weights["lm_head.weight"].clone()
    save_file(extra, str(folder / "model-mtp.safetensors"), metadata={"format": "pt"})


def converter_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
                "HF_MODULES_CACHE": str(cache_root() / "hf-modules")})   # remote-code tokenizers land here
    return env


# What each spec converts, besides the default GGUF: kind -> (output file, converter arguments).
# "mtp-refused" is a conversion expected to FAIL (the converter refuses --mtp for that class); its
# log is kept instead of a file.
def conversions(spec: ArchSpec) -> dict[str, tuple[str, tuple[str, ...]]]:
    out = {"main": (f"{spec.id}.gguf", spec.extra_args)}
    if spec.mmproj:
        out["mmproj"] = ("mmproj.gguf", ("--mmproj",))
    for kind in spec.mtp_files:
        out[kind] = (f"{spec.id}.{kind}.gguf", {"draft": ("--mtp",), "no-mtp": ("--no-mtp",),
                                                 "mtp-refused": ("--mtp",)}[kind])
    return out


def _log_ok(log: Path) -> bool:
    return log.exists() and log.read_text().rstrip().endswith("exit status 0")


def _run_conversions(jobs: list[dict]) -> float:
    """Run converter jobs in ONE process (convert_many.py); the seconds it took."""
    (cache_root() / "jobs.json").write_text(json.dumps(jobs))
    t0 = time.monotonic()
    subprocess.run([sys.executable, str(Path(__file__).with_name("convert_many.py")),
                    str(cache_root() / "jobs.json")], env=converter_env(), timeout=1800)
    return time.monotonic() - t0


def _predictable_weights(folder: Path) -> None:
    """Scale every matrix that writes into the residual stream (attention and linear-attention
    outputs, expert and shared-expert down projections) by 0.02, trunk and head alike, and make
    the head's fc pass the next token's embedding through ([I | 0]: the first half of its input
    is the normed embedding, llama.cpp's concat order)."""
    import re
    import torch
    from safetensors.torch import load_file, save_file
    for part in sorted(folder.glob("model*.safetensors")):
        weights = load_file(part)
        for k in weights:
            if re.search(r"\.(o_proj|down_proj|out_proj)\.weight$", k):
                weights[k] = weights[k] * 0.02
        if "mtp.fc.weight" in weights:
            fc = torch.zeros(H, 2 * H)
            fc[:, :H] = torch.eye(H)
            weights["mtp.fc.weight"] = fc
        save_file(weights, str(part), metadata={"format": "pt"})


def predictable_head(built: "Built") -> dict[str, Path]:
    """The speculative-decoding proof's model, from a Qwen-layout MTP checkpoint of the matrix:
    with every residual write scaled down, each position's next token is decided by its own
    token's embedding (a near-bigram model) and the head, fed the next token's embedding, predicts
    what the trunk will, so its drafts can be accepted (a random head's never are). Converted
    bundled ("bundled"), as a draft ("draft", --mtp) and without the head ("no-mtp"); cached."""
    import shutil
    spec = built.spec
    if spec.mtp != "qwen" or "draft" not in spec.mtp_files:
        raise ValueError(f"{spec.id}: the predictable head is made for Qwen-layout MTP checkpoints")
    key = hashlib.sha256((content_key(spec) + inspect.getsource(_predictable_weights)).encode()).hexdigest()[:16]
    root = cache_root() / f"{spec.id}-predictable-{key}"
    files = {kind: root / f"{kind}.gguf" for kind in ("bundled", "draft", "no-mtp")}
    if (root / "built.json").exists():
        return files
    shutil.rmtree(root, ignore_errors=True)
    shutil.copytree(built.checkpoint, root / "hf")
    _predictable_weights(root / "hf")
    args = {"bundled": (), "draft": ("--mtp",), "no-mtp": ("--no-mtp",)}
    _run_conversions([{"converter": str(CONVERTER), "log": str(root / f"convert-{kind}.log"),
                       "argv": [str(root / "hf"), "--outfile", str(root / f".{kind}.gguf.part"), "--outtype", "f16",
                                *args[kind]]} for kind in files])
    for kind, path in files.items():
        if not _log_ok(root / f"convert-{kind}.log"):
            raise AssertionError(f"convert_hf_to_gguf.py {' '.join(args[kind])} failed:\n"
                                 + (root / f"convert-{kind}.log").read_text()[-2500:])
        os.replace(root / f".{kind}.gguf.part", path)
    (root / "built.json").write_text("{}")
    return files


def get_all(specs: list[ArchSpec]) -> dict[str, "Built | str"]:
    """Every spec's converted GGUFs (or the reason they failed): missing checkpoints are built in
    this process, then ONE converter process (convert_many.py: the converter's own main() per job)
    runs every missing conversion. A spec's files are published (renamed from .part) only when all
    of its conversions did what they should."""
    out: dict[str, Built | str] = {}
    pending = []
    jobs = []
    for spec in specs:
        root = cache_root() / f"{spec.id}-{content_key(spec)}"
        if (root / "built.json").exists():
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
        for kind, (name, args) in conversions(spec).items():
            jobs.append({"converter": str(CONVERTER), "log": str(root / f"convert-{kind}.log"),
                         "argv": [str(root / "hf"), "--outfile", str(root / f".{name}.part"), "--outtype", "f16",
                                  *args]})
    if jobs:
        per_job = _run_conversions(jobs) / len(jobs)
        for spec, root, build_s in pending:
            problems = []
            for kind, (name, _args) in conversions(spec).items():
                part, log = root / f".{name}.part", root / f"convert-{kind}.log"
                text = log.read_text() if log.exists() else "(no log)"
                if kind == "mtp-refused":
                    if _log_ok(log) or part.exists():
                        problems.append(f"convert_hf_to_gguf.py --mtp was expected to refuse, but ran:\n{text[-1500:]}")
                elif not (part.exists() and _log_ok(log)):
                    problems.append(f"convert_hf_to_gguf.py {' '.join(_args) or '(default)'} failed:\n{text[-2500:]}")
            if problems:
                for name, _args in conversions(spec).values():
                    (root / f".{name}.part").unlink(missing_ok=True)
                out[spec.id] = "\n".join(problems)
                continue
            for kind, (name, _args) in conversions(spec).items():
                if kind != "mtp-refused":
                    os.replace(root / f".{name}.part", root / name)
            n_jobs = len(conversions(spec))
            (root / "built.json").write_text(json.dumps({"seconds": round(build_s + per_job * n_jobs, 1)}))
            out[spec.id] = get(spec)
    return out


@dataclass
class Built:
    spec: ArchSpec
    checkpoint: Path
    gguf: Path                    # the default conversion (MTP head bundled where the checkpoint has one)
    seconds: float
    log: str
    mmproj: Path | None = None    # the projector GGUF (vision models: the converter's --mmproj)
    variants: dict = field(default_factory=dict)   # "draft" / "no-mtp" -> Path; "mtp-refused" -> its log

    def file(self, kind: str) -> Path:
        return self.gguf if kind == "bundled" else self.variants[kind]


def get(spec: ArchSpec) -> Built:
    """The converted GGUFs of `spec` from the cache (get_all builds them)."""
    root = cache_root() / f"{spec.id}-{content_key(spec)}"
    meta = json.loads((root / "built.json").read_text())
    variants: dict = {}
    for kind, (name, _args) in conversions(spec).items():
        if kind in ("draft", "no-mtp"):
            variants[kind] = root / name
        elif kind == "mtp-refused":
            variants[kind] = (root / f"convert-{kind}.log").read_text()
    return Built(spec, root / "hf", root / f"{spec.id}.gguf", meta["seconds"], (root / "convert-main.log").read_text(),
                 root / "mmproj.gguf" if spec.mmproj else None, variants)
