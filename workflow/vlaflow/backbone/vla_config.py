"""The config.json replacement step: a VLA model folder beside the downloaded backbone.

Upstream asks users to overwrite the backbone's config.json by hand. Here the backbone folder is
never touched: the VLA folder holds a new config.json (the backbone's, with the VLA fields) and
relative links to every other file of the backbone.
"""

import json
import os
from pathlib import Path

from vlaflow.backbone.folder import CONFIG, verify_model_folder
from vlaflow.errors import VlaflowError
from vlaflow.fs import atomic_directory
from vlaflow.models.qwen2_vla import Qwen2VLAConfig, Qwen2VLAForConditionalGeneration
from vlaflow.models.scale_dp import ScaleDPConfig

VLA_FIELDS = ("policy_head_type", "using_moe", "with_llm_head", "llm_loss_weight")
POLICY_HEAD_FIELDS = ("size", "action_dim", "state_dim", "chunk_size")


def vla_config_dict(backbone_config: dict, policy_head: dict | None = None, **vla_fields) -> dict:
    """The backbone's config plus every VLA field, written out explicitly; a field given as None
    takes the configuration class's default. Every other field stays as the backbone wrote it."""
    if backbone_config.get("model_type") != "qwen2_vl":
        raise VlaflowError(
            f"backbone config: field 'model_type' is {backbone_config.get('model_type')!r}; "
            "make-vla-config starts from a Qwen2-VL backbone ('qwen2_vl')"
        )
    unknown = sorted(set(vla_fields) - set(VLA_FIELDS))
    if unknown:
        raise VlaflowError(f"unknown VLA field {unknown[0]!r}; known: {', '.join(VLA_FIELDS)}")
    defaults = Qwen2VLAConfig.__dataclass_fields__
    head = ScaleDPConfig(**{key: value for key, value in (policy_head or {}).items() if value is not None})
    config = dict(backbone_config)
    config.update(
        architectures=[Qwen2VLAForConditionalGeneration.__name__],
        model_type=Qwen2VLAConfig.model_type,
        policy_head_config={field: getattr(head, field) for field in POLICY_HEAD_FIELDS},
    )
    for field in VLA_FIELDS:
        value = vla_fields.get(field)
        config[field] = defaults[field].default if value is None else value
    return config


def make_vla_folder(backbone: Path, out: Path, policy_head: dict | None = None, **vla_fields) -> Path:
    backbone, out = Path(backbone), Path(out)
    config = vla_config_dict(verify_model_folder(backbone), policy_head, **vla_fields)
    with atomic_directory(out) as tmp:
        (tmp / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        Qwen2VLAConfig.from_pretrained(tmp)  # fails here, not in training, if a field is wrong
        for entry in sorted(backbone.iterdir()):
            if entry.name != CONFIG and not entry.name.startswith("."):
                os.symlink(os.path.relpath(entry.resolve(), out.resolve()), tmp / entry.name)
    return out
