"""What a complete Qwen2-VL model folder holds, and a check that names what is missing or broken."""

import json
from pathlib import Path

from safetensors import safe_open

from vlaflow.errors import ModelFolderError

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
TOKENIZER_FILES = (("tokenizer.json",), ("vocab.json", "merges.txt"))
IMAGE_PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")
CHAT_TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")
QWEN2_VL_MODEL_TYPES = ("qwen2_vl", "qwen2_vla")


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelFolderError(f"{path}: missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ModelFolderError(f"{path}: not valid JSON ({error})") from None


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a folder: one file, or the shards its index lists (all must exist)."""
    folder = Path(folder)
    if (folder / WEIGHTS_INDEX).exists():
        index = read_json(folder / WEIGHTS_INDEX)
        if not isinstance(index.get("weight_map"), dict) or not index["weight_map"]:
            raise ModelFolderError(f"{folder / WEIGHTS_INDEX}: field 'weight_map' is missing or empty")
        shards = [folder / name for name in sorted(set(index["weight_map"].values()))]
    elif (folder / WEIGHTS).exists():
        shards = [folder / WEIGHTS]
    else:
        raise ModelFolderError(f"{folder}: no weights ({WEIGHTS} or {WEIGHTS_INDEX}) in this folder")
    for shard in shards:
        if not shard.exists():
            raise ModelFolderError(f"{shard}: missing (listed in {WEIGHTS_INDEX})")
        try:
            with safe_open(shard, framework="pt") as handle:
                handle.keys()
        except Exception as error:  # safetensors raises its own error types for corrupt headers
            raise ModelFolderError(f"{shard}: not a readable safetensors file ({error})") from None
    return shards


def has_chat_template(folder: Path) -> bool:
    if any((folder / name).exists() for name in CHAT_TEMPLATE_FILES):
        return True
    tokenizer_config = folder / "tokenizer_config.json"
    return tokenizer_config.exists() and "chat_template" in read_json(tokenizer_config)


def verify_model_folder(folder: Path) -> dict:
    """Check that `folder` is a complete Qwen2-VL (or VLA) model folder; return its config."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelFolderError(f"{folder}: not a folder")
    config = read_json(folder / CONFIG)
    if config.get("model_type") not in QWEN2_VL_MODEL_TYPES:
        raise ModelFolderError(
            f"{folder / CONFIG}: field 'model_type' is {config.get('model_type')!r}, expected one of {QWEN2_VL_MODEL_TYPES}"
        )
    weight_files(folder)
    if not any(all((folder / name).exists() for name in names) for names in TOKENIZER_FILES):
        raise ModelFolderError(f"{folder}: no tokenizer (tokenizer.json, or vocab.json and merges.txt)")
    if not (folder / "tokenizer_config.json").exists():
        raise ModelFolderError(f"{folder / 'tokenizer_config.json'}: missing")
    if not any((folder / name).exists() for name in IMAGE_PROCESSOR_FILES):
        raise ModelFolderError(f"{folder}: no image processor settings ({' or '.join(IMAGE_PROCESSOR_FILES)})")
    if not has_chat_template(folder):
        raise ModelFolderError(f"{folder}: no chat template ({' or '.join(CHAT_TEMPLATE_FILES)})")
    return config


def load_vla(folder: Path, **from_pretrained_kwargs):
    """`Qwen2VLAForConditionalGeneration.from_pretrained(folder)`, after a check that names a
    missing, truncated or unreadable weights file in one line (transformers would raise a
    traceback from the middle of loading)."""
    from vlaflow.models.qwen2_vla import Qwen2VLAForConditionalGeneration

    weight_files(folder)
    return Qwen2VLAForConditionalGeneration.from_pretrained(folder, **from_pretrained_kwargs)
