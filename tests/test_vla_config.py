"""The config.json replacement step, on the tiny backbone and on the official Qwen2-VL-2B config."""

import hashlib
import json

import pytest
import torch
from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

from tests.conftest import ACTION_DIM, CHUNK_SIZE, FIXTURES, STATE_DIM
from vlaflow.backbone.vla_config import make_vla_folder, vla_config_dict
from vlaflow.cli import main
from vlaflow.errors import VlaflowError
from vlaflow.models.qwen2_vla import Qwen2VLAConfig, Qwen2VLAForConditionalGeneration, Qwen2VLAProcessor
from vlaflow.models.scale_dp import SCALE_DP_SIZES

OFFICIAL_2B_CONFIG = json.loads((FIXTURES / "qwen2_vl_2b_instruct" / "config.json").read_text())


def folder_fingerprint(folder):
    return {
        path.relative_to(folder).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    } | {"__mtimes__": [path.stat().st_mtime_ns for path in sorted(folder.rglob("*"))]}


def test_vla_folder_loads_as_the_vla_model_through_the_auto_classes(vla_folder, tiny_backbone):
    config = AutoConfig.from_pretrained(vla_folder)
    assert type(config) is Qwen2VLAConfig
    assert config.architectures == ["Qwen2VLAForConditionalGeneration"]
    head = config.policy_head_config
    assert (head.action_dim, head.state_dim, head.chunk_size) == (ACTION_DIM, STATE_DIM, CHUNK_SIZE)
    assert head.cond_dim == config.text_config.hidden_size
    assert config.using_moe and config.with_llm_head and config.llm_loss_weight == 1.0

    model = AutoModelForImageTextToText.from_pretrained(vla_folder)
    assert type(model) is Qwen2VLAForConditionalGeneration
    assert isinstance(Qwen2VLAProcessor.from_pretrained(vla_folder), Qwen2VLAProcessor)

    written = json.loads((vla_folder / "config.json").read_text())
    backbone = json.loads((tiny_backbone / "config.json").read_text())
    vla_keys = {
        "architectures",
        "model_type",
        "policy_head_type",
        "policy_head_config",
        "using_moe",
        "with_llm_head",
        "llm_loss_weight",
    }
    assert {key: value for key, value in written.items() if key not in vla_keys} == {
        key: value for key, value in backbone.items() if key not in vla_keys
    }
    for entry in vla_folder.iterdir():
        assert entry.name in ("config.json", "processor_config.json") or entry.is_symlink(), entry.name
        assert entry.resolve().exists(), entry.name
    # its own processor_config.json: the backbone's, naming the image-only processor for AutoProcessor
    processor_config = json.loads((tiny_backbone / "processor_config.json").read_text())
    assert json.loads((vla_folder / "processor_config.json").read_text()) == dict(
        processor_config, processor_class="Qwen2VLAProcessor"
    )
    assert isinstance(AutoProcessor.from_pretrained(vla_folder), Qwen2VLAProcessor)


def test_backbone_folder_is_byte_identical_after_the_whole_init(tiny_backbone, tmp_path):
    before = folder_fingerprint(tiny_backbone)
    vla = make_vla_folder(tiny_backbone, tmp_path / "vla")
    from vlaflow.backbone.mlp_weights import load_vla_with_mlp_init, save_mlp_weights

    model = load_vla_with_mlp_init(vla, save_mlp_weights(tiny_backbone, tmp_path / "mlp.safetensors"))
    model.save_pretrained(tmp_path / "saved")
    assert folder_fingerprint(tiny_backbone) == before


def test_every_vla_field_has_a_default():
    bare = dict(OFFICIAL_2B_CONFIG, model_type="qwen2_vla", architectures=["Qwen2VLAForConditionalGeneration"])
    config = Qwen2VLAConfig(**{key: value for key, value in bare.items() if key != "model_type"})
    assert config.policy_head_type == "scale_dp_policy"
    assert config.policy_head_config.cond_dim == 1536
    assert config.using_moe is True and config.llm_loss_weight == 1.0


def test_official_2b_config_builds_the_vla_model_on_the_meta_device(tmp_path):
    written = vla_config_dict(OFFICIAL_2B_CONFIG, policy_head=dict(size="L", action_dim=10, state_dim=7))
    (tmp_path / "config.json").write_text(json.dumps(written))
    config = AutoConfig.from_pretrained(tmp_path)
    assert type(config) is Qwen2VLAConfig
    text = config.text_config
    assert (text.hidden_size, text.num_hidden_layers, text.intermediate_size, text.vocab_size) == (
        1536,
        28,
        8960,
        151936,
    )
    assert text.rope_parameters["mrope_section"] == [16, 24, 24]
    assert (config.vision_config.depth, config.vision_config.embed_dim) == (32, 1280)

    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config)
    assert type(model) is Qwen2VLAForConditionalGeneration
    shapes = {name: tuple(parameter.shape) for name, parameter in model.named_parameters()}
    for layer in range(28):
        for expert in range(2):
            prefix = f"model.language_model.layers.{layer}.mlp.experts.{expert}"
            assert shapes[f"{prefix}.gate_proj.weight"] == (8960, 1536)
            assert shapes[f"{prefix}.up_proj.weight"] == (8960, 1536)
            assert shapes[f"{prefix}.down_proj.weight"] == (1536, 8960)
    assert not any(".mlp.gate_proj" in name for name in shapes if "language_model" in name)
    assert shapes["model.language_model.embed_tokens.weight"] == (151936, 1536)
    assert shapes["model.visual.patch_embed.proj.weight"] == (1280, 3, 2, 14, 14)
    assert sum(name.startswith("model.visual.blocks.") and name.endswith("attn.qkv.weight") for name in shapes) == 32
    depth, width, _ = SCALE_DP_SIZES["L"]
    assert sum(name.endswith("adaLN_modulation.1.weight") and ".blocks." in name for name in shapes) == depth
    assert shapes["policy_head.cond_proj.weight"] == (width, 1536 + 7)
    assert shapes["policy_head.final_layer.linear.weight"] == (10, width)
    assert shapes["policy_head.pos_embed"] == (1, 16, width)
    head_parameters = sum(p.numel() for name, p in model.named_parameters() if name.startswith("policy_head."))
    assert 400e6 < head_parameters < 500e6  # ScaleDP-L: about 0.45B with the adaLN modulations


def test_make_vla_config_rejects_a_non_qwen2_vl_backbone(tmp_path, tiny_backbone):
    with pytest.raises(VlaflowError, match="field 'model_type' is 'llama'"):
        vla_config_dict({"model_type": "llama"})
    with pytest.raises(VlaflowError, match="unknown VLA field 'use_moe'"):
        vla_config_dict(OFFICIAL_2B_CONFIG, use_moe=True)
    assert main(["make-vla-config", str(tiny_backbone), str(tmp_path / "vla"), "--policy-head-size", "L"]) == 0
    assert json.loads((tmp_path / "vla" / "config.json").read_text())["policy_head_config"]["size"] == "L"
