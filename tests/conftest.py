import os

os.environ["HF_HUB_OFFLINE"] = "1"  # tests never reach the network

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vlaflow.backbone.download import BUILTIN_TINY, download
from vlaflow.backbone.mlp_weights import load_vla_with_moe_init, save_mlp_weights
from vlaflow.backbone.vla_config import make_vla_folder
from vlaflow.models.qwen2_vla import ROBOT_EXPERT, VL_EXPERT, Qwen2VLAProcessor
from vlaflow.models.qwen2_vla.modeling_qwen2_vla import IGNORE_INDEX

FIXTURES = Path(__file__).parent / "fixtures"
ACTION_DIM, STATE_DIM, CHUNK_SIZE = 4, 3, 5


@pytest.fixture(scope="session")
def tiny_backbone(tmp_path_factory) -> Path:
    return download(BUILTIN_TINY, tmp_path_factory.mktemp("download") / "backbone")


@pytest.fixture(scope="session")
def vla_folder(tiny_backbone, tmp_path_factory) -> Path:
    head = dict(action_dim=ACTION_DIM, state_dim=STATE_DIM, chunk_size=CHUNK_SIZE)
    return make_vla_folder(tiny_backbone, tmp_path_factory.mktemp("vla") / "vla", policy_head=head)


@pytest.fixture(scope="session")
def mlp_weights(tiny_backbone, tmp_path_factory) -> Path:
    return save_mlp_weights(tiny_backbone, tmp_path_factory.mktemp("mlp") / "mlp.safetensors")


@pytest.fixture(scope="session")
def processor(vla_folder) -> Qwen2VLAProcessor:
    return Qwen2VLAProcessor.from_pretrained(vla_folder)


@pytest.fixture
def vla_model(vla_folder, mlp_weights):
    """The stage-1 starting point: both experts copied from the backbone's MLP."""
    torch.manual_seed(0)
    return load_vla_with_moe_init(vla_folder, mlp_weights)


def random_image(seed: int, size=(64, 64)) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


@dataclass
class Sample:
    images: list
    prompt: str
    answer: str
    route: int


def mixed_samples() -> list[Sample]:
    """A VL sample with an image, a robot sample, a text-only VL sample, and a second robot sample."""
    return [
        Sample([random_image(0)], "what color is the shape?", "red", VL_EXPERT),
        Sample([random_image(1)], "Pick up the red cube.", "Lift the cube. Next action:", ROBOT_EXPERT),
        Sample([], "is there a circle?", "no", VL_EXPERT),
        Sample([random_image(2, (64, 80))], "Hand it over.", "Close the left gripper. Next action:", ROBOT_EXPERT),
    ]


def make_batch(processor: Qwen2VLAProcessor, samples: list[Sample]) -> dict:
    """Right-padded training inputs; labels cover the assistant's answer only."""
    full_texts, prompt_lengths = [], []
    for sample in samples:
        user = {
            "role": "user",
            "content": [{"type": "image"}] * len(sample.images) + [{"type": "text", "text": sample.prompt}],
        }
        prompt = processor.apply_chat_template([user], add_generation_prompt=True)
        full_texts.append(prompt + sample.answer + "<|im_end|>")
        prompt_inputs = processor(text=[prompt], images=sample.images or None, return_tensors="pt")
        prompt_lengths.append(prompt_inputs["input_ids"].shape[1])
    images = [image for sample in samples for image in sample.images]
    batch = processor(text=full_texts, images=images or None, padding=True, return_tensors="pt")
    labels = batch["input_ids"].clone()
    labels[batch["attention_mask"] == 0] = IGNORE_INDEX
    for row, length in enumerate(prompt_lengths):
        labels[row, :length] = IGNORE_INDEX
    generator = torch.Generator().manual_seed(0)
    batch.update(
        labels=labels,
        expert_route=torch.tensor([sample.route for sample in samples]),
        actions=torch.rand(len(samples), CHUNK_SIZE, ACTION_DIM, generator=generator) * 2 - 1,
        states=torch.randn(len(samples), STATE_DIM, generator=generator),
        is_pad=torch.arange(CHUNK_SIZE).expand(len(samples), -1) >= CHUNK_SIZE - 1,
    )
    return dict(batch)


@pytest.fixture
def mixed_batch(processor) -> dict:
    return make_batch(processor, mixed_samples())
