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
from typing import Any, cast

from apex_orch.model.gguf_tables import GGMLQuantizationType

from apex_orch.core.errors import ModelError
from apex_orch.core.text import file_name_part
from apex_orch.model.gguf_header import ArrayInfo, GGUFHeader, SizedTensor, read_header

# The most blocks (layers) apex-orch handles; the largest released models have under 200. Bounds
# every loop sized by a block count or number, from a model header or a profile.
MAX_BLOCKS = 4096

SPLIT_RE = re.compile(r"^(?P<stem>.*)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")
# A block tensor's name: `blk.<number>.<rest>`; the one place this pattern is written.
BLOCK_RE = re.compile(r"^blk\.(\d+)\.")
BLOCK_NAME_RE = re.compile(r"^blk\.(\d+)\.(.+)$")


def block_of(name: str) -> int | None:
    """The block (layer) number of a `blk.N.` tensor name; None for a name outside the blocks."""
    m = BLOCK_RE.match(name)
    return int(m.group(1)) if m else None


def split_block_name(name: str) -> tuple[int, str] | None:
    """(block number, the rest of the name) for `blk.N.<rest>`; None for a name outside the blocks."""
    m = BLOCK_NAME_RE.match(name)
    return (int(m.group(1)), m.group(2)) if m else None


@dataclass(frozen=True)
class TensorInfo(SizedTensor):
    name: str
    shape: tuple[int, ...]      # ggml order (ne0 first)
    ggml_type: GGMLQuantizationType
    shard: int
    block: int | None

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
    kv_types: dict[str, Any] = field(default_factory=dict, repr=False)
    kv_sizes: dict[str, Any] = field(default_factory=dict, repr=False)

    # ---- metadata helpers
    def arch_kv(self, key: str, default: Any = None) -> Any:
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
        return cast("int | None", self.arch_kv("embedding_length"))

    @property
    def context_length(self) -> int | None:
        return cast("int | None", self.arch_kv("context_length"))

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

    @cached_property
    def structure(self) -> dict[str, Any]:
        """Leading dense blocks, experts per block and NextN/MTP layers as the TENSORS show them
        (a converter can write keys that disagree: GLM-4.7-Flash through a newer transformers got
        leading_dense_block_count = 0 with a dense block 0). `structure_warnings` lists each
        disagreement with the keys; the tensors win."""
        experts: dict[int, int] = {}
        nextn: set[int] = set()
        for t in self.tensors:
            if t.block is None:
                continue
            if "_exps." in t.name and t.name.endswith(".weight") and len(t.shape) == 3:
                experts[t.block] = max(experts.get(t.block, 0), t.shape[2])
            if f"blk.{t.block}.nextn." in t.name or f"blk.{t.block}.mtp." in t.name:
                nextn.add(t.block)
        lead = 0
        if experts and not self.is_mtp_draft:   # a draft has no trunk blocks to count
            while lead < self.block_count and lead not in experts:
                lead += 1
        return {"experts_per_block": dict(sorted(experts.items())), "leading_dense_blocks": lead,
                "nextn_blocks": sorted(nextn)}

    @cached_property
    def structure_warnings(self) -> list[str]:
        s, out = self.structure, []
        key = self.arch_kv("leading_dense_block_count")
        if isinstance(key, int) and s["experts_per_block"] and key != s["leading_dense_blocks"] \
                and not self.is_mtp_draft:   # a draft holds no trunk block to count
            n = s["leading_dense_blocks"]
            out.append(f"{self.arch}.leading_dense_block_count is {key} but the tensors show {n} leading "
                       "block(s) without experts"
                       + (f" (blk.0{f'-{n - 1}' if n > 1 else ''} without ffn_*_exps)" if n else
                          " (blk.0 has ffn_*_exps)") + "; apex-orch uses the tensors")
        key_nextn = self.arch_kv("nextn_predict_layers")
        n_tensors = len(s["nextn_blocks"])
        if n_tensors and key_nextn != n_tensors:
            out.append(f"{self.arch}.nextn_predict_layers is {key_nextn if key_nextn is not None else 'missing'} "
                       f"but {n_tensors} block(s) hold nextn/mtp tensors "
                       f"(blk.{', blk.'.join(map(str, s['nextn_blocks']))}); apex-orch uses the tensors")
        elif isinstance(key_nextn, int) and key_nextn > 0 and not n_tensors:
            out.append(f"{self.arch}.nextn_predict_layers is {key_nextn} but no block holds nextn/mtp tensors; "
                       f"apex-orch treats the last {key_nextn} block(s) as MTP layers, as llama.cpp does")
        return out

    @property
    def is_mtp_draft(self) -> bool:
        """A draft file (the converter's --mtp): only the MTP/NextN block(s) — the last
        `nextn_predict_layers` of `block_count` — hold tensors, besides the shared embedding, output
        norm and head. llama.cpp loads it as a speculative draft beside the full model (`-md`)."""
        return _is_mtp_draft(self, {t.block for t in self.tensors if t.block is not None})

    @property
    def leading_dense_blocks(self) -> int:
        """Leading blocks without routed experts, from the tensors (see `structure`); the key only
        when the file has no expert tensors at all, or none of the trunk (an MTP draft)."""
        if self.structure["experts_per_block"] and not self.is_mtp_draft:
            return int(self.structure["leading_dense_blocks"])
        explicit = self.arch_kv("leading_dense_block_count")
        return explicit if isinstance(explicit, int) else 0

    @property
    def nextn_layers(self) -> int:
        n_tensors = len(self.structure["nextn_blocks"])
        if n_tensors:
            return n_tensors
        return int(self.arch_kv("nextn_predict_layers", 0) or 0)

    @property
    def q_lora_rank(self) -> int | None:
        return cast("int | None", self.arch_kv("attention.q_lora_rank"))

    @property
    def kv_lora_rank(self) -> int | None:
        return cast("int | None", self.arch_kv("attention.kv_lora_rank"))

    @property
    def head_count(self) -> Any:
        return self.arch_kv("attention.head_count")

    @property
    def head_count_kv(self) -> Any:
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

        def has(frag: str) -> bool:
            return any(frag in n for n in names)

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
    def rope_scaling(self) -> dict[str, Any]:
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
        return max(counts, key=lambda k: counts[k]) if counts else "?"


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


def read_model(path: str | os.PathLike[str]) -> ModelInfo:
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
        split = SPLIT_RE.match(p.name)
        name = split.group("stem") if split else p.stem
    info = ModelInfo(paths=paths, arch=arch, name=name, kv=first.kv, tensors=tensors,
                     file_size=sum(h.file_size for h in headers), header_bytes=first.header_bytes,
                     alignment=first.alignment, kv_types=first.kv_types, kv_sizes=first.kv_sizes)
    check_consistency(info)
    return info


def draft_mismatch(model: ModelInfo, draft: ModelInfo) -> str | None:
    """Why `draft` cannot draft for `model` (None: it can): it must be an MTP draft file (only the
    MTP block(s)) of the same model: architecture, width, vocabulary and trunk depth."""
    if not draft.is_mtp_draft:
        return ("the draft is not an MTP draft file: it must hold only the MTP block(s) (what "
                "convert_hf_to_gguf.py --mtp writes)")
    mine = (model.arch, model.embedding_length, model.vocab_size, model.block_count - model.nextn_layers)
    theirs = (draft.arch, draft.embedding_length, draft.vocab_size, draft.block_count - draft.nextn_layers)
    if mine != theirs:
        return (f"the draft is the MTP head of another model: architecture, width, vocabulary and trunk blocks "
                f"are {'/'.join(map(str, theirs))}, the model's {'/'.join(map(str, mine))}")
    return None


def _is_mtp_draft(info: ModelInfo, blocks: set[int]) -> bool:
    """Only the last `nextn_predict_layers` blocks hold tensors (the converter's --mtp output)."""
    n_mtp, block_count = info.arch_kv("nextn_predict_layers"), info.arch_kv("block_count")
    if not (isinstance(n_mtp, int) and isinstance(block_count, int)) or not 0 < n_mtp < block_count:
        return False
    return blocks == set(range(block_count - n_mtp, block_count))


def check_consistency(info: ModelInfo) -> None:
    """The header checked against itself before anything plans or runs on it: block count,
    expert counts and the embedding width against the tensors (llama.cpp would refuse such a
    file only when it loads it — after quantizing, or with a GGML_ASSERT)."""
    where = str(info.path)
    hint = ("the file's metadata does not describe its tensors (a broken conversion or an edited "
            "header); convert the model again")

    def int_key(key: str) -> int | None:
        value = info.arch_kv(key)
        if value is None:
            return None
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ModelError(f"GGUF header is inconsistent: {info.arch}.{key} is {value!r}, not a count",
                             where=where, hint=hint)
        return value

    blocks = {t.block for t in info.tensors if t.block is not None}
    block_count = int_key("block_count")
    if block_count is not None:
        if block_count > MAX_BLOCKS:
            raise ModelError(f"GGUF header is inconsistent: {info.arch}.block_count is {block_count:,}; "
                             f"apex-orch handles at most {MAX_BLOCKS} blocks", where=where, hint=hint)
        beyond = sorted(b for b in blocks if b >= block_count)
        if beyond:
            raise ModelError(f"GGUF header is inconsistent: {info.arch}.block_count is {block_count} but "
                             f"the file has tensors of block {beyond[-1]} (blk.{beyond[-1]}.*)",
                             where=where, hint=hint)
        if blocks and not _is_mtp_draft(info, blocks):
            empty = [b for b in range(block_count) if b not in blocks]
            if empty:
                shown = ", ".join(map(str, empty[:5])) + (", ..." if len(empty) > 5 else "")
                raise ModelError(f"GGUF header is inconsistent: {info.arch}.block_count is {block_count} but "
                                 f"{len(empty)} of those blocks have no tensors (block {shown})",
                                 where=where, hint=hint)
    elif blocks and max(blocks) >= MAX_BLOCKS:
        raise ModelError(f"GGUF header is inconsistent: a tensor of block {max(blocks)}; apex-orch handles "
                         f"at most {MAX_BLOCKS} blocks", where=where, hint=hint)

    n_expert = int_key("expert_count") or 0
    n_used = int_key("expert_used_count") or 0
    for t in info.tensors:
        if "_exps" in t.name and len(t.shape) == 3 and t.shape[2] != n_expert:
            if not n_expert:
                raise ModelError(f"GGUF header is inconsistent: tensor {t.name!r} holds {t.shape[2]} experts "
                                 f"but the header has no {info.arch}.expert_count", where=where, hint=hint)
            raise ModelError(f"GGUF header is inconsistent: {info.arch}.expert_count is {n_expert} but tensor "
                             f"{t.name!r} holds {t.shape[2]} experts", where=where, hint=hint)
        if t.name.endswith(".ffn_gate_inp.weight") and len(t.shape) == 2 and n_expert and t.shape[1] != n_expert:
            raise ModelError(f"GGUF header is inconsistent: {info.arch}.expert_count is {n_expert} but the "
                             f"router {t.name!r} scores {t.shape[1]} experts", where=where, hint=hint)
    if n_expert and not 1 <= n_used <= n_expert:
        raise ModelError(f"GGUF header is inconsistent: {info.arch}.expert_used_count is {n_used} but "
                         f"{info.arch}.expert_count is {n_expert} (each token uses 1 to {n_expert} experts)",
                         where=where, hint=hint)
    if not n_expert and n_used:
        raise ModelError(f"GGUF header is inconsistent: {info.arch}.expert_used_count is {n_used} but the "
                         f"model has no {info.arch}.expert_count", where=where, hint=hint)
    width = int_key("embedding_length")
    embd = info.by_name.get("token_embd.weight")
    if width and embd is not None and embd.shape[0] != width:
        raise ModelError(f"GGUF header is inconsistent: {info.arch}.embedding_length is {width} but "
                         f"token_embd.weight rows hold {embd.shape[0]} values", where=where, hint=hint)


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
    return file_name_part(info.name, "model")
