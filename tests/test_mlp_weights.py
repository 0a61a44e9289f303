"""The MLP-weight save step and the MoE initialisation it feeds."""

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import Qwen2VLForConditionalGeneration

from vlaflow.backbone.mlp_weights import (
    PROJECTIONS,
    init_mlps_from_weights,
    load_vla_with_mlp_init,
    mlp_key,
    save_mlp_weights,
)
from vlaflow.backbone.vla_config import make_vla_folder
from vlaflow.errors import MLPWeightsError
from vlaflow.models.qwen2_vla import ROBOT_EXPERT, VL_EXPERT


def test_saved_file_holds_every_layers_mlp_under_transformers_5_names(tiny_backbone, mlp_weights):
    saved = load_file(mlp_weights)
    # transformers saves Qwen2-VL in the release layout: `model.layers.<i>...`
    backbone = load_file(tiny_backbone / "model.safetensors")
    layers = 2
    assert sorted(saved) == sorted(mlp_key(layer, projection) for layer in range(layers) for projection in PROJECTIONS)
    for layer in range(layers):
        for projection in PROJECTIONS:
            assert torch.equal(
                saved[mlp_key(layer, projection)], backbone[f"model.layers.{layer}.mlp.{projection}.weight"]
            )


def test_moe_initialised_from_the_saved_weights_gives_the_dense_logits(tiny_backbone, vla_model, mixed_batch):
    dense = Qwen2VLForConditionalGeneration.from_pretrained(tiny_backbone).eval()
    vla_model.eval()
    inputs = {
        key: mixed_batch[key]
        for key in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw", "mm_token_type_ids")
    }
    with torch.no_grad():
        expected = dense(**inputs).logits
        for route in (mixed_batch["expert_route"], torch.zeros(4, dtype=torch.long), torch.ones(4, dtype=torch.long)):
            logits = vla_model(**inputs, expert_route=route).logits
            assert (logits - expected).abs().max() <= 1e-5


def test_a_dense_model_from_the_saved_weights_gives_the_dense_logits(tiny_backbone, vla_folder, mlp_weights, mixed_batch):
    """The baseline arm from the backbone: one dense MLP per layer, the backbone's."""
    dense = Qwen2VLForConditionalGeneration.from_pretrained(tiny_backbone).eval()
    model = load_vla_with_mlp_init(vla_folder, mlp_weights, using_moe=False).eval()
    assert not model.config.using_moe and not any(".experts." in name for name, _ in model.named_parameters())
    inputs = {
        key: mixed_batch[key]
        for key in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw", "mm_token_type_ids")
    }
    with torch.no_grad():
        logits = model(**inputs, expert_route=mixed_batch["expert_route"]).logits
        assert (logits - dense(**inputs).logits).abs().max() <= 1e-5


def module_layout(tiny_backbone, tmp_path):
    """The backbone with its weights named after transformers 5's modules (`model.language_model.*`)."""
    folder = tmp_path / "module_layout"
    shutil.copytree(tiny_backbone, folder)
    renamed = {}
    for key, tensor in load_file(tiny_backbone / "model.safetensors").items():
        if key.startswith("visual."):
            key = "model." + key
        elif key.startswith("model."):
            key = key.replace("model.", "model.language_model.", 1)
        renamed[key] = tensor
    assert mlp_key(0, "up_proj") in renamed
    save_file(renamed, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def test_backbones_in_either_weight_layout_work_end_to_end(
    tiny_backbone, mlp_weights, vla_model, mixed_batch, tmp_path
):
    other_layout = module_layout(tiny_backbone, tmp_path)
    other_mlp = save_mlp_weights(other_layout, tmp_path / "other_mlp.safetensors")
    assert load_file(other_mlp).keys() == load_file(mlp_weights).keys()
    model = load_vla_with_mlp_init(make_vla_folder(other_layout, tmp_path / "vla"), other_mlp).eval()
    vla_model.eval()
    inputs = {
        key: mixed_batch[key]
        for key in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw", "expert_route")
    }
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, vla_model(**inputs).logits)

    # a file written by upstream-style tools with the old names initialises the experts too
    old_names = {key.replace("model.language_model.", "model."): t for key, t in load_file(mlp_weights).items()}
    save_file(old_names, tmp_path / "old_names.safetensors")
    init_mlps_from_weights(model, tmp_path / "old_names.safetensors")


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda t: t.pop(mlp_key(1, "up_proj")), "missing key 'model.language_model.layers.1.mlp.up_proj.weight'"),
        (
            lambda t: t.__setitem__(mlp_key(0, "gate_proj"), t[mlp_key(0, "gate_proj")][:, :10].contiguous()),
            r"key 'model.language_model.layers.0.mlp.gate_proj.weight' has shape \(256, 10\)",
        ),
        (
            lambda t: t.__setitem__(mlp_key(2, "down_proj"), t[mlp_key(1, "down_proj")].clone()),
            "unexpected key 'model.language_model.layers.2.mlp.down_proj.weight'",
        ),
        (lambda t: t.__setitem__("lm_head.weight", torch.zeros(1)), "unexpected key 'lm_head.weight'"),
    ],
    ids=["missing", "mismatched", "extra-layer", "foreign"],
)
def test_a_wrong_mlp_file_is_an_error_naming_the_key_and_changes_nothing(
    vla_model, mlp_weights, tmp_path, edit, message
):
    tensors = {key: tensor.clone() for key, tensor in load_file(mlp_weights).items()}
    edit(tensors)
    save_file(tensors, tmp_path / "edited.safetensors")
    before = {name: p.clone() for name, p in vla_model.named_parameters()}
    with pytest.raises(MLPWeightsError, match=message):
        init_mlps_from_weights(vla_model, tmp_path / "edited.safetensors")
    assert all(torch.equal(before[name], p) for name, p in vla_model.named_parameters())


def test_both_experts_start_as_copies_of_the_dense_mlp(vla_model, mlp_weights):
    saved = load_file(mlp_weights)
    for layer in range(2):
        for projection in PROJECTIONS:
            for expert in (VL_EXPERT, ROBOT_EXPERT):
                weight = getattr(vla_model.expert(layer, expert), projection).weight
                assert torch.equal(weight, saved[mlp_key(layer, projection)])
