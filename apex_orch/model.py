"""ModelInfo: everything planning needs, read from the GGUF header only.

Split models (`NAME-00001-of-00003.gguf`) are read across all shards; a missing or
mismatched shard is an error. Tensor data is never read.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from gguf.constants import GGMLQuantizationType

from apex_orch.errors import ModelError
from apex_orch.gguf_header import ArrayInfo, GGUFHeader, read_header, shape_elements, tensor_nbytes

SPLIT_RE = re.compile(r"^(?P<stem>.*)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")
BLOCK_RE = re.compile(r"^blk\.(\d+)\.")


def block_of(name: str) -> int | None:
    m = BLOCK_RE.match(name)
    return int(m.group(1)) if m else None


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]      # ggml order (ne0 first)
    ggml_type: GGMLQuantizationType
    shard: int
    block: int | None

    @property
    def n_elements(self) -> int:
        return shape_elements(self.shape)

    @property
    def n_bytes(self) -> int:
        return tensor_nbytes(self.ggml_type, self.shape)

    @property
    def n_dims(self) -> int:
        return len(self.shape)


@dataclass
class ModelInfo:
    paths: list[Path]
    arch: str
    name: str
    kv: dict[str, object]
    tensors: list[TensorInfo]
    file_size: int                 # all shards together
    header_bytes: int              # first shard's metadata + tensor infos
    alignment: int
    kv_types: dict = field(default_factory=dict, repr=False)
    kv_sizes: dict = field(default_factory=dict, repr=False)

    # ---- metadata helpers
    def arch_kv(self, key: str, default=None):
        return self.kv.get(f"{self.arch}.{key}", default)

    @property
    def path(self) -> Path:
        return self.paths[0]

    @property
    def is_split(self) -> bool:
        return len(self.paths) > 1

    @property
    def block_count(self) -> int:
        value = self.arch_kv("block_count")
        if isinstance(value, int):
            return value
        blocks = [t.block for t in self.tensors if t.block is not None]
        return max(blocks) + 1 if blocks else 0

    @property
    def embedding_length(self) -> int | None:
        return self.arch_kv("embedding_length")

    @property
    def context_length(self) -> int | None:
        return self.arch_kv("context_length")

    @property
    def expert_count(self) -> int:
        return int(self.arch_kv("expert_count", 0) or 0)

    @property
    def expert_used_count(self) -> int:
        return int(self.arch_kv("expert_used_count", 0) or 0)

    @property
    def expert_shared_count(self) -> int:
        explicit = self.arch_kv("expert_shared_count")
        if isinstance(explicit, int):
            return explicit
        return 1 if any("_shexp" in t.name for t in self.tensors) else 0

    @property
    def leading_dense_blocks(self) -> int:
        explicit = self.arch_kv("leading_dense_block_count")
        if isinstance(explicit, int):
            return explicit
        n = 0
        for b in range(self.block_count):
            if any(t.block == b and "_exps" in t.name for t in self.tensors):
                break
            n += 1
        return n if n < self.block_count else 0

    @property
    def nextn_layers(self) -> int:
        return int(self.arch_kv("nextn_predict_layers", 0) or 0)

    @property
    def q_lora_rank(self) -> int | None:
        return self.arch_kv("attention.q_lora_rank")

    @property
    def kv_lora_rank(self) -> int | None:
        return self.arch_kv("attention.kv_lora_rank")

    @property
    def head_count(self):
        return self.arch_kv("attention.head_count")

    @property
    def head_count_kv(self):
        return self.arch_kv("attention.head_count_kv")

    @cached_property
    def tensor_names(self) -> set[str]:
        return {t.name for t in self.tensors}

    @cached_property
    def by_name(self) -> dict[str, TensorInfo]:
        return {t.name: t for t in self.tensors}

    @property
    def attention_kind(self) -> str:
        names = self.tensor_names
        has = lambda frag: any(frag in n for n in names)  # noqa: E731
        kinds = []
        if has(".attn_kv_a_mqa.") or has(".attn_q_a.") or has(".attn_k_b.") or has(".attn_kv_b."):
            kinds.append("MLA")
        elif has(".attn_q.") or has(".attn_qkv."):
            hc, hkv = self.head_count, self.head_count_kv
            if isinstance(hc, int) and isinstance(hkv, int) and hkv < hc:
                kinds.append("GQA")
            else:
                kinds.append("MHA")
        if has(".ssm_"):
            kinds.append("SSM")
        if len(kinds) > 1:
            return "hybrid " + "+".join(kinds)
        return kinds[0] if kinds else "none"

    @property
    def vocab_size(self) -> int | None:
        tokens = self.kv.get("tokenizer.ggml.tokens")
        if isinstance(tokens, ArrayInfo):
            return tokens.length
        if isinstance(tokens, list):
            return len(tokens)
        emb = self.by_name.get("token_embd.weight")
        return emb.shape[1] if emb and len(emb.shape) > 1 else None

    @property
    def rope_scaling(self) -> dict:
        out = {}
        for key in ("rope.scaling.type", "rope.scaling.factor", "rope.scaling.original_context_length",
                    "rope.freq_base", "rope.dimension_count"):
            value = self.arch_kv(key)
            if value is not None:
                out[key] = value
        return out

    @property
    def total_parameters(self) -> int:
        return sum(t.n_elements for t in self.tensors)

    @property
    def active_parameters(self) -> int:
        """Parameters touched per token: everything except the routed experts not chosen.

        Counted: every tensor, with each routed-expert tensor scaled by used/total
        experts; token_embd counts as one row (a lookup, not a matmul) only if an
        untied output exists — we count it fully when it doubles as the output.
        """
        n_exp, n_used = self.expert_count, self.expert_used_count
        total = 0
        has_output = "output.weight" in self.tensor_names
        for t in self.tensors:
            if "_exps" in t.name and n_exp > 0 and len(t.shape) == 3:
                total += t.n_elements * n_used // n_exp
            elif t.name == "token_embd.weight" and has_output:
                total += t.shape[0]
            else:
                total += t.n_elements
        return total

    @property
    def source_ftype_label(self) -> str:
        counts: dict[str, int] = {}
        for t in self.tensors:
            if t.n_dims >= 2:
                counts[t.ggml_type.name] = counts.get(t.ggml_type.name, 0) + t.n_elements
        return max(counts, key=counts.get) if counts else "?"


def shard_paths(path: Path) -> list[Path]:
    """All shards of a split model given any shard (or the single file itself)."""
    m = SPLIT_RE.match(path.name)
    if not m:
        return [path]
    count = int(m.group("count"))
    stem = m.group("stem")
    paths = [path.with_name(f"{stem}-{i:05d}-of-{count:05d}.gguf") for i in range(1, count + 1)]
    missing = [p.name for p in paths if not p.exists()]
    if missing:
        raise ModelError(f"split model is missing {len(missing)} of {count} shard(s): {', '.join(missing)}",
                         where=str(path.parent), hint="download every shard into the same folder")
    return paths


def read_model(path: str | os.PathLike) -> ModelInfo:
    """Read a GGUF (or every shard of a split GGUF) into a ModelInfo, header only."""
    p = Path(path)
    paths = shard_paths(p)
    headers: list[GGUFHeader] = [read_header(sp, shard=i) for i, sp in enumerate(paths)]
    first = headers[0]
    if len(paths) > 1:
        _check_split(headers)
    tensors: list[TensorInfo] = []
    seen: set[str] = set()
    for h in headers:
        for t in h.tensors:
            if t.name in seen:
                raise ModelError(f"tensor {t.name!r} appears twice", where=str(h.path))
            seen.add(t.name)
            tensors.append(TensorInfo(t.name, t.shape, t.ggml_type, t.shard, block_of(t.name)))
    arch = first.kv.get("general.architecture")
    if not isinstance(arch, str):
        raise ModelError("GGUF has no general.architecture key; it is not a llama.cpp model file",
                         where=str(p), hint="pass a model GGUF (not an imatrix, LoRA or vocab-only file)")
    if not tensors:
        raise ModelError("GGUF holds no tensors (vocab-only file?)", where=str(p),
                         hint="pass the full model file")
    name = first.kv.get("general.name")
    if not isinstance(name, str) or not name.strip():
        stem = SPLIT_RE.match(p.name).group("stem") if SPLIT_RE.match(p.name) else p.stem
        name = stem
    return ModelInfo(paths=paths, arch=arch, name=name, kv=first.kv, tensors=tensors,
                     file_size=sum(h.file_size for h in headers), header_bytes=first.header_bytes,
                     alignment=first.alignment, kv_types=first.kv_types, kv_sizes=first.kv_sizes)


def _check_split(headers: list[GGUFHeader]) -> None:
    count = len(headers)
    total = None
    for i, h in enumerate(headers):
        no = h.kv.get("split.no")
        cnt = h.kv.get("split.count")
        if no != i or cnt != count:
            raise ModelError(
                f"shard metadata says split.no={no}, split.count={cnt}; expected {i} of {count}",
                where=str(h.path), hint="the shards come from different splits; download them again together")
        tc = h.kv.get("split.tensors.count")
        total = tc if total is None else total
        if tc != total:
            raise ModelError(f"shard disagrees on split.tensors.count ({tc} vs {total})", where=str(h.path),
                             hint="the shards come from different splits")
    found = sum(len(h.tensors) for h in headers)
    if total is not None and found != total:
        raise ModelError(f"shards hold {found} tensors but split.tensors.count is {total}",
                         where=str(headers[0].path), hint="a shard is missing or from another split")


def model_display_name(info: ModelInfo) -> str:
    """general.name or the file stem, made safe for a file name."""
    raw = info.name
    safe = re.sub(r"[^A-Za-z0-9._-]+", "-", raw).strip("-.")
    return safe or "model"
