"""MLP initialisation: save a model's decoder MLP weights, then copy them into both experts of the
MoE (ChatVLA's stage-1 init) or into a dense MLP (the baseline arm, from a trained VLA model).

Backbones name the MLP weights `model.language_model.layers.<i>.mlp.*` (transformers 5) or
`model.layers.<i>.mlp.*` (checkpoints saved earlier, the official Qwen2-VL release among them).
Both are read; the file is written with the transformers 5 names, as safetensors (upstream
pickled a `mlp.bin` into the download folder). A trained VLA model (after VLM-only training, say)
has no dense MLP: its vision-language expert, expert 0, is the MLP that stage 1 starts from.
"""

import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from vlaflow.backbone.folder import load_vla, verify_model_folder, weight_files
from vlaflow.errors import MLPWeightsError
from vlaflow.fs import atomic_file

PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
MLP_KEY = re.compile(r"^model\.(?:language_model\.)?layers\.(\d+)\.mlp\.(gate_proj|up_proj|down_proj)\.weight$")
VL_EXPERT_KEY = re.compile(
    r"^model\.(?:language_model\.)?layers\.(\d+)\.mlp\.experts\.0\.(gate_proj|up_proj|down_proj)\.weight$"
)
ANY_MLP_KEY = re.compile(r"^model\.(?:language_model\.)?layers\.\d+\.mlp\.")


def mlp_key(layer: int, projection: str) -> str:
    return f"model.language_model.layers.{layer}.mlp.{projection}.weight"


def num_decoder_layers(config: dict) -> int:
    text_config = config.get("text_config") or config
    return text_config["num_hidden_layers"]


def _index_mlp_tensors(keys, source: Path, pattern: re.Pattern = MLP_KEY) -> dict[tuple[int, str], str]:
    """Map (layer, projection) to the key holding it; the same weight under two names is an error."""
    found: dict[tuple[int, str], str] = {}
    for key in keys:
        match = pattern.match(key)
        if match is None:
            continue
        slot = (int(match.group(1)), match.group(2))
        if slot in found:
            raise MLPWeightsError(f"{source}: {found[slot]!r} and {key!r} both hold the same MLP weight")
        found[slot] = key
    return found


def _check_complete(slots, num_layers: int, source: Path) -> None:
    """`slots`: the (layer, projection) pairs found; all of the model's and no others."""
    for layer in range(num_layers):
        for projection in PROJECTIONS:
            if (layer, projection) not in slots:
                raise MLPWeightsError(f"{source}: missing key {mlp_key(layer, projection)!r}")
    extra = sorted(slot for slot in slots if slot[0] >= num_layers)
    if extra:
        raise MLPWeightsError(
            f"{source}: unexpected key {mlp_key(*extra[0])!r}: the model has {num_layers} decoder layers"
        )


def save_mlp_weights(backbone: Path, out: Path) -> Path:
    """Write every decoder layer's MLP weights of `backbone` (a dense MLP, or the VL expert of a
    trained VLA model) to the safetensors file `out`."""
    backbone = Path(backbone)
    num_layers = num_decoder_layers(verify_model_folder(backbone))
    for pattern in (MLP_KEY, VL_EXPERT_KEY):
        found: dict[tuple[int, str], torch.Tensor] = {}
        for shard in weight_files(backbone):
            with safe_open(shard, framework="pt") as handle:
                for slot, key in _index_mlp_tensors(handle.keys(), shard, pattern).items():
                    if slot in found:
                        raise MLPWeightsError(f"{shard}: {key!r} repeats an MLP weight of another shard")
                    found[slot] = handle.get_tensor(key)
        if found:
            break
    _check_complete(found, num_layers, backbone)
    tensors = {mlp_key(*slot): tensor for slot, tensor in sorted(found.items())}
    with atomic_file(out) as tmp:
        save_file(tensors, tmp, metadata={"format": "pt", "num_layers": str(num_layers), "source": str(backbone)})
    return Path(out)


def _mlps(model, layer: int) -> list:
    """The MLPs of a decoder layer that the saved weights initialise: both experts, or the dense MLP."""
    if model.config.using_moe:
        return [model.expert(layer, expert_index) for expert_index in range(2)]
    return [model.decoder_layers[layer].mlp]


def init_mlps_from_weights(model, path: Path) -> None:
    """Copy the saved dense MLP into every decoder layer's MLPs (both experts of the MoE, or the
    dense MLP); any missing, extra or misshapen key is an error naming it."""
    path = Path(path)
    try:
        tensors = load_file(path)
    except Exception as error:  # safetensors raises its own error types for corrupt files
        raise MLPWeightsError(f"{path}: not a readable safetensors file ({error})") from None
    unexpected = [key for key in tensors if MLP_KEY.match(key) is None]
    if unexpected:
        raise MLPWeightsError(f"{path}: unexpected key {unexpected[0]!r}: not a decoder MLP weight")
    found = _index_mlp_tensors(tensors, path)
    num_layers = len(model.decoder_layers)
    _check_complete(found, num_layers, path)
    targets = []
    for (layer, projection), key in found.items():
        for mlp in _mlps(model, layer):
            weight = getattr(mlp, projection).weight
            if weight.shape != tensors[key].shape:
                raise MLPWeightsError(
                    f"{path}: key {key!r} has shape {tuple(tensors[key].shape)}, "
                    f"the model's MLP weight has {tuple(weight.shape)}"
                )
            targets.append((weight, tensors[key]))
    with torch.no_grad():
        for weight, tensor in targets:
            weight.copy_(tensor)


def load_vla_with_mlp_init(vla_folder: Path, mlp_weights: Path, **from_pretrained_kwargs):
    """A stage's starting point whose MLPs come from saved MLP weights: the VLA model on the
    folder's other weights, every decoder MLP (both experts, or the dense MLP with
    `using_moe=False`) copied from the file, heads the folder lacks freshly initialised."""
    from transformers.utils import logging

    # transformers would report the stage's MLPs as missing and the folder's as unexpected (and,
    # from a backbone, the heads as missing): exactly what this function expects, and checks itself below.
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        model, info = load_vla(vla_folder, output_loading_info=True, **from_pretrained_kwargs)
    finally:
        logging.set_verbosity(verbosity)
    new_modules = ("policy_head.", "reasoning_conditioner.")
    lacking = [key for key in info["missing_keys"] if ANY_MLP_KEY.match(key) is None and not key.startswith(new_modules)]
    if lacking:
        raise MLPWeightsError(f"{vla_folder}: the model's weights lack {sorted(lacking)[0]!r}")
    foreign = [key for key in info["unexpected_keys"] if ANY_MLP_KEY.match(key) is None]
    if foreign:
        raise MLPWeightsError(f"{vla_folder}: weight {sorted(foreign)[0]!r} matches no parameter of the VLA model")
    init_mlps_from_weights(model, mlp_weights)
    return model
