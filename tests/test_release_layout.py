"""`builtin:tiny-qwen2-vl-release`: the tiny Qwen2-VL in the official Qwen2-VL-2B-Instruct folder's
shape, and every vlaflow step on it, without torchvision.

The official folder has no `processor_config.json` and names the stock `Qwen2VLProcessor`; its
weights are bf16, sharded with an index, named `model.layers.*` / `visual.*`, `lm_head` tied."""

import hashlib
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from transformers import (
    AutoConfig,
    AutoModelForImageTextToText,
    AutoProcessor,
    AutoTokenizer,
    Qwen2VLForConditionalGeneration,
)

from tests.conftest import ACTION_DIM, CHUNK_SIZE, FIXTURES, STATE_DIM, random_image
from tests.data_factory import data_stage
from tests.training_helpers import REPO, VLAFLOW, losses, train_command, training_config, training_world
from vlaflow.backbone.download import BUILTIN_TINY_RELEASE
from vlaflow.backbone.tiny import CHAT_TEMPLATE, TEXT_CONFIG, VISION_CONFIG
from vlaflow.cli import main
from vlaflow.models.qwen2_vla import Qwen2VLAForConditionalGeneration, Qwen2VLAProcessor
from vlaflow.models.qwen2_vla.processing_qwen2_vla import load_processor
from vlaflow.training.checkpoints import METRICS_FILE

RELEASE = FIXTURES / "qwen2_vl_2b_instruct"
MANIFEST = json.loads((RELEASE / "manifest.json").read_text())
RELEASE_COPIES = ("config.json", "preprocessor_config.json", "generation_config.json")
SHARDS = [name for name in MANIFEST["files"] if name.endswith(".safetensors")]
# The precondition of the processor tests: with torchvision installed, the stock processor would load too.
NO_TORCHVISION = importlib.util.find_spec("torchvision") is None
needs_no_torchvision = pytest.mark.skipif(not NO_TORCHVISION, reason="torchvision is installed here")


def read_json(path):
    return json.loads(path.read_text(encoding="utf-8"))


def release_keys(name: str) -> set[str]:
    """The top-level keys of the release's JSON file `name`: from its copy, else from the manifest."""
    if name in RELEASE_COPIES:
        return set(read_json(RELEASE / name))
    return set(MANIFEST["json_keys"][name])


def test_the_folder_has_the_release_files_and_json_keys(release_backbone):
    assert sorted(path.name for path in release_backbone.iterdir()) == sorted(MANIFEST["files"])
    json_files = (*RELEASE_COPIES, *MANIFEST["json_keys"])  # every JSON file but vocab.json (keys: the tokens)
    assert sorted(json_files) == sorted(n for n in MANIFEST["files"] if n.endswith(".json") and n != "vocab.json")
    for name in json_files:
        assert set(read_json(release_backbone / name)) == release_keys(name), name
    config, official = read_json(release_backbone / "config.json"), read_json(RELEASE / "config.json")
    assert set(config["vision_config"]) == set(official["vision_config"])
    assert config["rope_scaling"]["type"] == "mrope" and set(config["rope_scaling"]) == set(official["rope_scaling"])
    assert (config["torch_dtype"], config["transformers_version"], config["tie_word_embeddings"]) == (
        "bfloat16",
        "4.41.2",
        True,
    )
    index = read_json(release_backbone / "model.safetensors.index.json")
    assert set(index["metadata"]) == set(MANIFEST["index_metadata_keys"])
    assert read_json(release_backbone / "chat_template.json") == {"chat_template": CHAT_TEMPLATE}
    assert read_json(release_backbone / "tokenizer_config.json")["chat_template"] == CHAT_TEMPLATE


def test_image_and_generation_settings_are_the_releases_at_the_tiny_patch_size(release_backbone):
    written, official = (
        read_json(release_backbone / "preprocessor_config.json"),
        read_json(RELEASE / "preprocessor_config.json"),
    )
    patch, official_patch = written["patch_size"], official["patch_size"]
    assert patch == VISION_CONFIG["patch_size"]
    for key in ("min_pixels", "max_pixels"):  # the same number of patches
        assert written[key] * official_patch**2 == official[key] * patch**2, key
    unchanged = set(official) - {"min_pixels", "max_pixels", "patch_size"}
    assert {key: written[key] for key in unchanged} == {key: official[key] for key in unchanged}

    tokenizer = AutoTokenizer.from_pretrained(release_backbone)
    endoftext, im_end = (tokenizer.convert_tokens_to_ids(token) for token in ("<|endoftext|>", "<|im_end|>"))
    generation, official = (
        read_json(release_backbone / "generation_config.json"),
        read_json(RELEASE / "generation_config.json"),
    )
    assert generation == dict(
        official, bos_token_id=endoftext, pad_token_id=endoftext, eos_token_id=[im_end, endoftext]
    )


def test_the_tokenizer_files_agree_and_number_the_special_tokens_as_the_release(release_backbone):
    vocab = read_json(release_backbone / "vocab.json")
    merges = (release_backbone / "merges.txt").read_text(encoding="utf-8").splitlines()
    tokenizer_json = read_json(release_backbone / "tokenizer.json")
    assert tokenizer_json["model"]["vocab"] == vocab
    assert merges[0].startswith("#version") and [" ".join(m) for m in tokenizer_json["model"]["merges"]] == merges[1:]
    specials = MANIFEST["special_tokens"]
    expected_ids = {token: len(vocab) + number for number, token in enumerate(specials)}
    assert {entry["content"]: entry["id"] for entry in tokenizer_json["added_tokens"]} == expected_ids

    config = read_json(release_backbone / "tokenizer_config.json")
    assert {int(key): entry["content"] for key, entry in config["added_tokens_decoder"].items()} == {
        number: token for token, number in expected_ids.items()
    }
    assert all(entry["special"] for entry in config["added_tokens_decoder"].values())
    assert config["additional_special_tokens"] == specials[1:]
    assert (config["eos_token"], config["pad_token"], config["bos_token"], config["padding_side"]) == (
        "<|im_end|>",
        "<|endoftext|>",
        None,
        "left",
    )

    tokenizer = AutoTokenizer.from_pretrained(release_backbone)
    assert {token: tokenizer.convert_tokens_to_ids(token) for token in specials} == expected_ids
    text = "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>what color is the shape?<|im_end|>\n"
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text


def test_the_config_is_the_tiny_models_and_matches_the_tokenizer(release_backbone):
    config = AutoConfig.from_pretrained(release_backbone)
    text = config.text_config
    assert (text.hidden_size, text.num_hidden_layers, text.intermediate_size) == (
        TEXT_CONFIG["hidden_size"],
        TEXT_CONFIG["num_hidden_layers"],
        TEXT_CONFIG["intermediate_size"],
    )
    assert config.vision_config.hidden_size == text.hidden_size
    assert (config.vision_config.depth, config.vision_config.patch_size) == (
        VISION_CONFIG["depth"],
        VISION_CONFIG["patch_size"],
    )
    head_dim = text.hidden_size // text.num_attention_heads
    assert sum(text.rope_parameters["mrope_section"]) == head_dim // 2
    tokenizer = AutoTokenizer.from_pretrained(release_backbone)
    assert text.vocab_size >= len(tokenizer)
    ids = {
        "bos_token_id": "<|endoftext|>",
        "eos_token_id": "<|im_end|>",
        "vision_start_token_id": "<|vision_start|>",
        "vision_end_token_id": "<|vision_end|>",
        "vision_token_id": "<|vision_pad|>",
        "image_token_id": "<|image_pad|>",
        "video_token_id": "<|video_pad|>",
    }
    written = read_json(release_backbone / "config.json")
    assert {key: written[key] for key in ids} == {
        key: tokenizer.convert_tokens_to_ids(token) for key, token in ids.items()
    }


def test_weights_are_bf16_in_two_shards_under_the_release_names_with_lm_head_tied(release_backbone):
    index = read_json(release_backbone / "model.safetensors.index.json")
    assert sorted(set(index["weight_map"].values())) == SHARDS
    stored, total = {}, 0
    for shard in SHARDS:
        with safe_open(release_backbone / shard, framework="pt") as handle:
            assert handle.metadata() == {"format": "pt"}
            for name in handle.keys():
                tensor = handle.get_tensor(name)
                assert tensor.dtype == torch.bfloat16, name
                stored[name] = shard
                total += tensor.nbytes
    assert stored == index["weight_map"] and total == index["metadata"]["total_size"]
    assert "lm_head.weight" not in stored
    assert {"model.embed_tokens.weight", "model.norm.weight", "visual.patch_embed.proj.weight"} <= set(stored)
    assert all(name.startswith(("model.layers.", "model.embed_tokens.", "model.norm.", "visual.")) for name in stored)
    assert any(name.startswith("model.layers.1.mlp.") for name in stored)

    model, info = Qwen2VLForConditionalGeneration.from_pretrained(release_backbone, output_loading_info=True)
    assert all(not info[key] for key in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert model.dtype == torch.bfloat16  # dtype="auto" follows the config's torch_dtype
    assert model.lm_head.weight.data_ptr() == model.model.language_model.embed_tokens.weight.data_ptr()


@needs_no_torchvision
def test_auto_processor_on_the_vla_folder_is_the_image_only_processor(release_backbone, release_vla):
    with pytest.raises(ImportError):  # what the release folder itself gives AutoProcessor: the stock processor
        AutoProcessor.from_pretrained(release_backbone)
    processor = AutoProcessor.from_pretrained(release_vla)
    assert isinstance(processor, Qwen2VLAProcessor)
    assert getattr(processor, "video_processor", None) is None
    assert "torchvision" not in sys.modules
    # the image settings are the release's preprocessor_config.json, the chat template its chat_template.json
    settings = read_json(release_backbone / "preprocessor_config.json")
    image_processor = processor.image_processor
    assert (image_processor.size.shortest_edge, image_processor.size.longest_edge) == (
        settings["min_pixels"],
        settings["max_pixels"],
    )
    assert (image_processor.patch_size, image_processor.merge_size) == (settings["patch_size"], settings["merge_size"])
    assert processor.chat_template == CHAT_TEMPLATE
    inputs = processor.generation_inputs([[random_image(0)], []], ["what color is the shape?", "is there a circle?"])
    image_tokens = (inputs["input_ids"] == processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")).sum()
    assert image_tokens == inputs["image_grid_thw"].prod() // image_processor.merge_size**2
    assert inputs["attention_mask"][1, 0] == 0  # left-padded
    # vlaflow's own loading path takes the backbone folder as it is
    assert isinstance(load_processor(release_backbone), Qwen2VLAProcessor)


def run_vlaflow(*arguments) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([*VLAFLOW, *map(str, arguments)], cwd=REPO, env=env, capture_output=True, text=True)
    assert result.returncode == 0, (arguments, result.stdout[-2000:], result.stderr[-3000:])
    return result


@pytest.mark.slow
def test_the_recipe_runs_from_the_release_layout_through_the_command_line(release_backbone, tmp_path):
    data = training_world(tmp_path / "data")
    config = training_config(
        tmp_path / "config.yaml",
        data,
        training={"max_steps": 2, "save_steps": 2},
        stages={
            "stage1": data_stage(robot=["robot_a"], freeze=["vl_expert"]),
            "stage2": {"from": "stage1", "robot": ["robot_a"], "vl": ["vl_a"], "mix": {"vl_ratio": 0.33}},  # ChatVLA's mix
        },
    )
    vla, mlp = tmp_path / "vla", tmp_path / "mlp.safetensors"
    dimensions = ["--action-dim", ACTION_DIM, "--state-dim", STATE_DIM, "--chunk-size", CHUNK_SIZE]
    run_vlaflow("make-vla-config", release_backbone, vla, *dimensions)
    run_vlaflow("save-mlp-weights", release_backbone, mlp)
    check = run_vlaflow("data", "check", "--config", config, "--model", vla)
    assert "labels" in check.stdout
    stage1, stage2 = tmp_path / "models/stage1", tmp_path / "models/stage2"
    run_vlaflow(*train_command(config, "stage1", vla, tmp_path / "work/stage1", stage1, mlp_weights=mlp))
    run_vlaflow(*train_command(config, "stage2", stage1, tmp_path / "work/stage2", stage2))
    for model_dir in (stage1, stage2):
        assert sorted(losses(model_dir / METRICS_FILE)) == [1, 2]

    model = AutoModelForImageTextToText.from_pretrained(stage2).eval()
    assert type(model) is Qwen2VLAForConditionalGeneration
    assert model.dtype == torch.float32  # trained in fp32 (training.bf16 is off), not in the release's bf16
    processor = AutoProcessor.from_pretrained(stage2)
    assert isinstance(processor, Qwen2VLAProcessor)
    inputs = processor.generation_inputs([[random_image(0, (32, 32))]], ["task 1"])
    chunk = model.predict_action(**inputs, states=torch.zeros(1, STATE_DIM), max_reasoning_tokens=2).actions
    assert chunk.shape == (1, CHUNK_SIZE, ACTION_DIM) and chunk.isfinite().all()


def digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_the_release_layout_is_deterministic_from_its_seed(release_backbone, tmp_path):
    assert main(["download", BUILTIN_TINY_RELEASE, str(tmp_path / "again"), "--seed", "0"]) == 0
    again = tmp_path / "again"
    assert {path.name: digest(path) for path in again.iterdir()} == {
        path.name: digest(path) for path in release_backbone.iterdir()
    }
