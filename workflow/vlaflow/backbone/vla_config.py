"""The config.json replacement step: a VLA model folder beside the downloaded backbone.

Upstream asks users to overwrite the backbone's config.json by hand. Here the backbone folder is
never touched: the VLA folder holds a new config.json (the backbone's, with the VLA fields), its
own processor_config.json naming vlaflow's image-only processor, and relative links to every
other file of the backbone.

The official Qwen2-VL release has no processor_config.json, and its preprocessor_config.json names
the stock `Qwen2VLProcessor`: `AutoProcessor` would build that, with a video processor that needs
torchvision. transformers reads `processor_class` from processor_config.json first, and the image
processor's settings from its nested `image_processor` entry if there is one, else from
preprocessor_config.json, so the VLA folder's processor_config.json is the backbone's (or an empty
one) with only `processor_class` replaced.
"""

import json
import os
from pathlib import Path

from vlaflow.backbone.folder import CONFIG, read_json, verify_model_folder
from vlaflow.errors import VlaflowError
from vlaflow.fs import atomic_directory
from vlaflow.models.qwen2_vla import Qwen2VLAConfig, Qwen2VLAForConditionalGeneration, Qwen2VLAProcessor
from vlaflow.models.scale_dp import ScaleDPConfig

PROCESSOR_CONFIG = "processor_config.json"

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
    try:
        head = ScaleDPConfig(**{key: value for key, value in (policy_head or {}).items() if value is not None})
    except ValueError as error:
        raise VlaflowError(str(error)) from None
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


def vla_processor_config(backbone: Path) -> dict:
    """The backbone's processor_config.json (empty if it has none) naming the image-only processor."""
    path = Path(backbone) / PROCESSOR_CONFIG
    config = read_json(path) if path.exists() else {}
    return {**config, "processor_class": Qwen2VLAProcessor.__name__}


def make_vla_folder(backbone: Path, out: Path, policy_head: dict | None = None, **vla_fields) -> Path:
    from transformers import AutoProcessor

    backbone, out = Path(backbone), Path(out)
    config = vla_config_dict(verify_model_folder(backbone), policy_head, **vla_fields)
    written = {CONFIG: config, PROCESSOR_CONFIG: vla_processor_config(backbone)}
    with atomic_directory(out) as tmp:
        for name, content in written.items():
            (tmp / name).write_text(json.dumps(content, indent=2, sort_keys=True) + "\n")
        Qwen2VLAConfig.from_pretrained(tmp)  # fails here, not in training, if a field is wrong
        for entry in sorted(backbone.iterdir()):
            if entry.name not in written and not entry.name.startswith("."):
                os.symlink(os.path.relpath(entry.resolve(), out.resolve()), tmp / entry.name)
        processor = AutoProcessor.from_pretrained(tmp)
        if not isinstance(processor, Qwen2VLAProcessor):
            raise VlaflowError(f"{out}: AutoProcessor builds {type(processor).__name__}, not the image-only processor")
    return out
