"""A release's MTP head: bundled in every tier, published as one draft file, or left out.

`mtp:` in a release config (`bundled | draft | none`, or `{mode: draft, type: Q8_0, file: PATH}`):

- bundled: every tier carries the model's MTP/NextN head at its profile's `types.nextn` (Q8_0 by
  default). A `convert` source is converted as the converter does by default (the head bundled).
- draft: the tiers are made from the converter's `--no-mtp` output (no head) and the head is
  published once, beside them, as `mtp-<Model>.gguf`: the converter's `--mtp` output (or `file:`,
  such a file converted elsewhere) quantized to `type` (default Q8_0), verified like a tier.
- none: no file carries a head (a `convert` source with one is converted with `--no-mtp`).
- the key absent: the files hold what the source holds (the converter's default).

Which mode a model allows is decided as early as its inputs show it: a `convert` source's
config.json (before the converter runs: `check_checkpoint`), then the GGUF itself (`check_model`,
`check_draft`), the dry run included. A mode the model cannot give is one ConfigError at the
config's `mtp:` line; a draft file of another model a ModelError naming it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from apex_orch.core.errors import ConfigError, ModelError
from apex_orch.core.infiles import read_json
from apex_orch.core.schema import read_section
from apex_orch.core.text import file_name_part
from apex_orch.model.info import ModelInfo, draft_mismatch, read_model
from apex_orch.plan.profiles import Profile, load_profile
from apex_orch.release.config import DRAFT_TYPES, MTP_MODES, MtpConfig, SourceConfig

# Hugging Face architectures whose pinned converter can split the head off (its class has
# `supports_mtp_export`: --mtp writes only the head, --no-mtp leaves it out), and those whose
# converter drops a checkpoint's head whatever it is told (`skip_mtp`). tests/archs checks both
# tables against the converter's own classes.
MTP_EXPORT = frozenset({
    "BailingMoeV3ForCausalLM", "BailingMoeV3VLForConditionalGeneration", "DeepseekV32ForCausalLM",
    "DeepseekV4DSparkModel", "DeepseekV4ForCausalLM", "Dots3NoteForCausalLM", "Dots3NoteForConditionalGeneration",
    "Dots3NoteTextForCausalLM", "Glm4MoeForCausalLM", "Glm4MoeLiteForCausalLM", "Glm4vMoeForConditionalGeneration",
    "Glm5NextForConditionalGeneration", "GlmMoeDsaForCausalLM", "HYV3ForCausalLM", "MiMoV2FlashForCausalLM",
    "MiMoV2ForCausalLM", "MiniCPMV4_6ForConditionalGeneration", "NemotronHForCausalLM", "Qwen3NextForCausalLM",
    "Qwen3_5ForCausalLM", "Qwen3_5ForConditionalGeneration", "Qwen3_5MoeForCausalLM",
    "Qwen3_5MoeForConditionalGeneration", "Step3p5ForCausalLM", "Step3p7ForConditionalGeneration"})
HEAD_DROPPED = frozenset({
    "DeepseekOCRForCausalLM", "DeepseekV2ForCausalLM", "DeepseekV3ForCausalLM", "HYV4ForCausalLM",
    "KimiK25ForConditionalGeneration", "KimiVLForConditionalGeneration", "UnlimitedOCRForCausalLM",
    "YoutuForCausalLM", "YoutuVLForConditionalGeneration"})
# config.json keys that count a checkpoint's MTP layers (the converters' own reads)
LAYER_KEYS = ("num_nextn_predict_layers", "mtp_num_hidden_layers")


def parse_mtp(r, value, source: SourceConfig) -> MtpConfig:
    """`mtp:` (config_reader's _Reader `r`): a mode, or a mapping read through MtpConfig's fields."""
    kp = ("mtp",)
    if isinstance(value, str):
        value = {"mode": value}
    m = dict(r.mapping(kp, value, {"mode", "type", "file"}))
    if "mode" not in m:
        raise r.fail(kp, f"missing key 'mode' ({', '.join(MTP_MODES)})")
    if isinstance(m.get("type"), str):
        m["type"] = m["type"].strip().upper()
    file = r.path(kp + ("file",), m["file"]) if "file" in m else None
    cfg = dataclasses.replace(read_section(MtpConfig, m, r.where, kp, ConfigError, file=file), where=r.where(kp))
    for key in ("type", "file"):
        if key in m and cfg.mode != "draft":
            raise r.fail(kp + (key,), f"only a draft has its own {'type' if key == 'type' else 'file'} (mode is "
                                      f"{cfg.mode})",
                         hint="with mode bundled each tier's profile types the head (types.nextn)"
                         if key == "type" else "give the draft file with mode: draft")
    if cfg.mode == "draft" and file is None and source.kind != "convert":
        raise r.fail(kp, f"a draft needs the MTP head as its own GGUF, but a {source.kind} source is not "
                         "converted here",
                     hint="give `file:` (what convert_hf_to_gguf.py --mtp writes), or a `convert` source")
    return cfg


def describe_mode(cfg: MtpConfig | None) -> str:
    if cfg is None:
        return "as the source holds it (no `mtp:` in the config)"
    return {"bundled": "bundled: every tier carries the MTP head",
            "draft": f"draft: the MTP head as one {cfg.type} draft file beside head-less tiers",
            "none": "none: no file carries an MTP head"}[cfg.mode]


# =========================================================================== the checkpoint

@dataclass(frozen=True)
class CheckpointHead:
    architecture: str
    layers: int | None              # MTP layers its config.json counts (None: no key says)


def checkpoint_head(folder: Path) -> CheckpointHead:
    """What a checkpoint folder's config.json says of its MTP head (the keys its converter reads)."""
    data = read_json(folder / "config.json", "checkpoint-config")
    if not isinstance(data, dict):
        raise ModelError("config.json is not a JSON object", where=str(folder / "config.json"))
    archs = data.get("architectures")
    arch = archs[0] if isinstance(archs, list) and archs and isinstance(archs[0], str) else "?"
    layers = None
    for part in (data, data.get("text_config")):
        if isinstance(part, dict):
            for key in LAYER_KEYS:
                if isinstance(part.get(key), int) and not isinstance(part.get(key), bool):
                    layers = max(layers or 0, part[key])
    return CheckpointHead(arch, layers)


def converter_flag(cfg: MtpConfig | None, head: CheckpointHead) -> str | None:
    """The converter's MTP flag for the tiers' source (`--no-mtp` or none: its default)."""
    if cfg is None or cfg.mode == "bundled":
        return None
    if cfg.mode == "draft":
        return "--no-mtp"
    return "--no-mtp" if head.architecture in MTP_EXPORT else None   # none: a class without export has no head


def check_checkpoint(cfg: MtpConfig | None, head: CheckpointHead) -> None:
    """A mode the checkpoint cannot give, refused before the converter runs. What config.json
    does not settle (a family that counts its head from its weights) the GGUF check settles."""
    if cfg is None:
        return
    arch = head.architecture
    if cfg.mode in ("bundled", "draft"):
        if head.layers == 0 or (head.layers is None and arch not in MTP_EXPORT):
            raise ConfigError(f"mtp: {cfg.mode}, but the checkpoint ({arch}) has no MTP head: its config.json "
                              f"counts no MTP layers ({' / '.join(LAYER_KEYS)})", where=cfg.where,
                              hint="remove `mtp:` (or say `mtp: none`) for a model without an MTP head")
        if arch in HEAD_DROPPED:
            raise ConfigError(f"mtp: {cfg.mode}, but the pinned convert_hf_to_gguf.py drops the MTP head of "
                              f"{arch} checkpoints", where=cfg.where,
                              hint="release it with `mtp: none` (the files will hold no head)")
    if cfg.mode == "draft" and arch not in MTP_EXPORT:   # the tiers' source is its --no-mtp output
        raise ConfigError(f"mtp: draft, but the pinned convert_hf_to_gguf.py cannot split the MTP head of {arch} "
                          "off (--mtp / --no-mtp)", where=cfg.where,
                          hint="use `mtp: bundled` (every tier carries the head)")
    if cfg.mode == "none" and (head.layers or 0) > 0 and arch not in MTP_EXPORT and arch not in HEAD_DROPPED:
        raise ConfigError(f"mtp: none, but the pinned convert_hf_to_gguf.py cannot leave the MTP head of {arch} "
                          "out (--no-mtp)", where=cfg.where,
                          hint="use `mtp: bundled` (every tier carries the head)")


# =========================================================================== the GGUFs

def head_blocks(model: ModelInfo) -> list[int]:
    return list(model.structure["nextn_blocks"])


def check_model(cfg: MtpConfig | None, model: ModelInfo) -> None:
    """The tiers' source against the mode: bundled needs the head in it, draft and none need it gone."""
    if cfg is None:
        return
    blocks = head_blocks(model)
    if cfg.mode == "bundled" and not blocks:
        raise ConfigError(f"mtp: bundled, but the source {model.path.name} ({model.arch}) has no MTP head "
                          "(no blk.N.nextn.* tensors)", where=cfg.where,
                          hint="remove `mtp:` (or say `mtp: none`) for a model without an MTP head, or give "
                               "the source converted with its head")
    if cfg.mode in ("draft", "none") and blocks:
        raise ConfigError(f"mtp: {cfg.mode}, but the source {model.path.name} carries an MTP head "
                          f"(blk.{', blk.'.join(map(str, blocks))}) and llama-quantize keeps every tensor",
                          where=cfg.where,
                          hint="give the source converted without it (convert_hf_to_gguf.py --no-mtp), or a "
                               "`convert` source")


def check_draft(model: ModelInfo, draft_path: Path) -> ModelInfo:
    """The unquantized draft (converted here, or `file:`): an MTP draft of the tiers' model."""
    draft = read_model(draft_path)
    problem = draft_mismatch(model, draft)
    if problem is not None:
        raise ModelError(problem, where=str(draft_path),
                         hint="give as mtp.file the head converted (convert_hf_to_gguf.py --mtp) from the same "
                              "checkpoint as the source")
    return draft


# =========================================================================== the draft file

def draft_profile_text(t: str) -> str:
    """Every tensor of the draft at one type (the head, its layer and the shared embedding and output)."""
    lines = [f"# The MTP draft file: every tensor at {t} (apex-orch release, mtp: draft).",
             f"tier: MTP-{t}", f"description: The MTP head as a separate draft file, every tensor at {t}.",
             "base_ftype: Q8_0", "types:"]   # every role is typed: the base types nothing
    lines += [f"  {role}: {t}" for role in ("routed_expert", "shared_expert", "attention", "dense_ffn", "ssm",
                                            "embedding", "output", "nextn")]
    return "\n".join(lines) + "\n"


def draft_profile(t: str, folder: Path) -> Profile:
    """The draft's profile, written into `folder` (the release's work folder, or a temporary one)."""
    from apex_orch.core.infiles import holds
    from apex_orch.core.outputs import atomic_write_text
    from apex_orch.core.safefiles import safe_mkdir
    if t not in DRAFT_TYPES:
        raise ConfigError(f"mtp.type {t} cannot be a draft's type", hint="e.g. Q8_0 (the default) or Q6_K")
    safe_mkdir(folder)
    path = folder / f"mtp-draft-{file_name_part(t, 'type').lower()}.yaml"
    text = draft_profile_text(t)
    if not holds(path, text):
        atomic_write_text(path, text)
    return load_profile(path)
