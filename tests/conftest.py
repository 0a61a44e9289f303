import os

os.environ["HF_HUB_OFFLINE"] = "1"  # tests never reach the network

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.slurm_cluster import SlurmUnavailable, alive, slurm_cluster
from vlaflow.backbone.download import BUILTIN_TINY, BUILTIN_TINY_RELEASE, download
from vlaflow.backbone.mlp_weights import load_vla_with_mlp_init, save_mlp_weights
from vlaflow.backbone.vla_config import make_vla_folder
from vlaflow.data.collator import Collator
from vlaflow.data.samples import RobotSample, VLSample
from vlaflow.models.qwen2_vla import Qwen2VLAProcessor

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


SIM_DEMO_SIZE = (48, 64)  # (height, width) the trained_model's demos are rendered at
SIM_IMAGE_SIZE = [32, 40]  # what it sees


@pytest.fixture(scope="session")
def trained_model(tiny_backbone, mlp_weights, tmp_path_factory) -> Path:
    """The tiny model with ALOHA's dimensions, trained for a few steps on two scripted transfer-cube
    demonstrations from the simulator."""
    from tests.training_helpers import train_on_sim_demos
    from vlaflow.sim.demos import record_demos

    root = tmp_path_factory.mktemp("sim_model")
    record_demos(root / "data" / "cube", 2, height=SIM_DEMO_SIZE[0], width=SIM_DEMO_SIZE[1], shadows=False, workers=2)
    return train_on_sim_demos(root, ["cube"], tiny_backbone, mlp_weights, image_size=SIM_IMAGE_SIZE)


@pytest.fixture(scope="session")
def release_backbone(tmp_path_factory) -> Path:
    """The tiny model in the official Qwen2-VL-2B-Instruct release's file layout (bf16, sharded)."""
    return download(BUILTIN_TINY_RELEASE, tmp_path_factory.mktemp("release") / "backbone")


@pytest.fixture(scope="session")
def release_vla(release_backbone, tmp_path_factory) -> Path:
    head = dict(action_dim=ACTION_DIM, state_dim=STATE_DIM, chunk_size=CHUNK_SIZE)
    return make_vla_folder(release_backbone, tmp_path_factory.mktemp("release_vla") / "vla", policy_head=head)


@pytest.fixture(scope="session")
def processor(vla_folder) -> Qwen2VLAProcessor:
    return Qwen2VLAProcessor.from_pretrained(vla_folder)


@pytest.fixture
def vla_model(vla_folder, mlp_weights):
    """The stage-1 starting point: both experts copied from the backbone's MLP."""
    torch.manual_seed(0)
    return load_vla_with_mlp_init(vla_folder, mlp_weights)


def random_image(seed: int, size=(64, 64)) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def robot_sample(seed: int, reasoning: str = "Lift the cube.", image_sizes=((64, 64),)) -> RobotSample:
    rng = np.random.default_rng(seed)
    return RobotSample(
        images=[random_image(seed + number, size) for number, size in enumerate(image_sizes)],
        state=rng.normal(size=STATE_DIM).astype(np.float32),
        actions=rng.uniform(-1, 1, (CHUNK_SIZE, ACTION_DIM)).astype(np.float32),
        is_pad=np.arange(CHUNK_SIZE) >= CHUNK_SIZE - 1,
        instruction="Pick up the red cube.",
        reasoning=reasoning,
        source=f"episode.hdf5:{seed}",
    )


def vl_sample(seed: int = 5) -> VLSample:
    turns = [
        ("user", "<image>\nwhat color is the shape?"),
        ("assistant", "red"),
        ("user", "is there a circle?"),
        ("assistant", "no"),
    ]
    return VLSample([random_image(seed)], turns, "vl.json: entry 0")


def text_sample() -> VLSample:
    return VLSample([], [("user", "is there a circle?"), ("assistant", "yes")], "vl.json: entry 1")


def mixed_samples() -> list:
    """A VL sample with an image, a robot sample, a text-only VL sample, and a second robot sample."""
    return [vl_sample(0), robot_sample(1), text_sample(), robot_sample(2, "Close the left gripper.", ((64, 80),))]


@pytest.fixture
def collator(processor) -> Collator:
    return Collator(processor, max_length=512, action_dim=ACTION_DIM, state_dim=STATE_DIM, chunk_size=CHUNK_SIZE)


@pytest.fixture
def mixed_batch(collator) -> dict:
    return collator(mixed_samples())


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A one-node SLURM cluster (two fake GPUs) for the module; its exit must leave no process of
    it behind. Skips where SLURM cannot be installed (not root, no apt)."""
    try:
        context = slurm_cluster(tmp_path_factory.mktemp("slurm"), gpus=2)
        running = context.__enter__()
    except SlurmUnavailable as reason:
        pytest.skip(f"no SLURM cluster here: {reason}")
    pids = running.pids
    try:
        yield running
    finally:
        context.__exit__(None, None, None)
    assert {"slurmctld", "slurmd"} <= set(pids)
    assert [name for name, pid in pids.items() if alive(pid)] == []
    assert running.processes_left() == []
