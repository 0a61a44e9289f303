"""DeepSpeed ZeRO over two ranks started by DeepSpeed's own launcher (gloo on a CPU), with ranks
whose batches hold different kinds of samples: one step must equal the exact data-parallel update
of one process on the whole global batch, for every parameter (both experts, the policy head, the
reasoning conditioner, the vision tower), and each rank must draw its own diffusion noise."""

import json
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.data_factory import data_stage
from tests.training_helpers import REPO, losses, start_training, train_command, training_config, training_world
from vlaflow.data.mixing import Mix, epoch_order
from vlaflow.training.checkpoints import METRICS_FILE
from vlaflow.training.run import train

PER_RANK_BATCH = 2
ROBOT_TIMESTEPS = 12  # two training episodes of 6 steps; episode 0 is the val split
TEXT_ONLY_CONVERSATIONS = 2  # of the data factory's 8
# Touched by one rank only in the first step of the chosen order, and so by one expert each.
MODULES = {
    "vision-language expert": "model.layers.{layer}.mlp.experts.0.down_proj.weight",
    "robot expert": "model.layers.{layer}.mlp.experts.1.down_proj.weight",
    "policy head": "policy_head.final_layer.linear.weight",
    "reasoning conditioner": "reasoning_conditioner.prompt_proj.0.weight",
    "vision tower": "visual.blocks.0.attn.qkv.weight",
}


def divergent_seed(mix: Mix, n_vl: int) -> int:
    """A data seed whose first global batch gives rank 0 robot samples only and rank 1
    vision-language samples only (text-only ones here, so rank 1 sees no image either)."""
    for seed in range(1000):
        order = epoch_order(mix, ROBOT_TIMESTEPS, n_vl, batch_size=PER_RANK_BATCH, world_size=2, seed=seed, epoch=0)
        rank0, rank1 = order[:PER_RANK_BATCH], order[PER_RANK_BATCH : 2 * PER_RANK_BATCH]
        if (rank0 < ROBOT_TIMESTEPS).all() and (rank1 >= ROBOT_TIMESTEPS).all():
            return seed
    raise AssertionError("no seed gives the ranks divergent routes")


@pytest.fixture(scope="module")
def world(tmp_path_factory, vla_folder, mlp_weights):
    """Robot episodes, text-only conversations, and a stage-1 model past its initialisation (a
    fresh policy head passes no gradient to the conditioner)."""
    root = tmp_path_factory.mktemp("distributed")
    data = training_world(root / "data", episodes=3, length=6, vl_count=8)
    entries = json.loads((data / "vl_a" / "train.json").read_text())
    (data / "vl_a" / "text_only.json").write_text(json.dumps([entry for entry in entries if "image" not in entry]))
    registry = yaml.safe_load((data / "datasets.yaml").read_text())
    registry["vl_text"] = {"kind": "vl", "annotation": "vl_a/text_only.json", "images": "vl_a/images"}
    (data / "datasets.yaml").write_text(yaml.safe_dump(registry))
    config = training_config(root / "stage1.yaml", data, training={"max_steps": 6, "save_steps": 6})
    stage1 = train(config, "stage1", vla_folder, root / "work" / "stage1", root / "stage1", mlp_weights=mlp_weights)
    return {"root": root, "data": data, "stage1": stage1}


def stage2_config(world, name: str, *, batch_size: int, deepspeed: str | None):
    mix = Mix(vl_ratio=1.0)
    seed = divergent_seed(mix, TEXT_ONLY_CONVERSATIONS)
    config = training_config(
        world["root"] / f"{name}.yaml",
        world["data"],
        training={
            "max_steps": 1,
            "save_steps": 1,
            "per_device_batch_size": batch_size,
            "optimizer": "sgd",  # one step of SGD is the gradient itself, times the learning rate
            "learning_rate": 0.5,
            "lr_scheduler": "constant",
            "max_grad_norm": 0.0,
            "deepspeed": deepspeed,
        },
        stages={
            "stage1": data_stage(robot=["robot_a"]),
            "stage2": {"from": "stage1", "robot": ["robot_a"], "vl": ["vl_text"], "mix": {"vl_ratio": mix.vl_ratio}},
        },
    )
    settings = yaml.safe_load(config.read_text())
    settings["data"]["seed"] = seed
    config.write_text(yaml.safe_dump(settings))
    return config


@pytest.fixture(scope="module")
def exact_update(world):
    """One process on the whole global batch, without DeepSpeed."""
    config = stage2_config(world, "exact", batch_size=2 * PER_RANK_BATCH, deepspeed=None)
    root = world["root"]
    return train(config, "stage2", world["stage1"], root / "work" / "exact", root / "exact")


def deepspeed_launcher(port: int) -> list[str]:
    """The launch line the workflow writes for `launcher: {kind: deepspeed}`."""
    launcher = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(port)]
    return launcher + ["--no_local_rank", "--module", "vlaflow.cli"]


@pytest.mark.slow
@pytest.mark.parametrize(("zero", "port"), [("zero2", 29661), ("zero3", 29662)])
def test_a_zero_step_with_divergent_routes_equals_the_exact_data_parallel_update(
    world, exact_update, tmp_path, zero, port
):
    config = stage2_config(
        world, f"{zero}-run", batch_size=PER_RANK_BATCH, deepspeed=str(REPO / "config" / "deepspeed" / f"{zero}.json")
    )
    arguments = train_command(config, "stage2", world["stage1"], tmp_path / "work", tmp_path / "out")
    process = start_training(arguments, tmp_path / "train.log", program=deepspeed_launcher(port))
    try:
        returncode = process.wait(timeout=900)
    except subprocess.TimeoutExpired:
        process.kill()
        raise
    assert returncode == 0, (tmp_path / "train.log").read_text()[-4000:]

    logs = [
        [json.loads(line) for line in (tmp_path / "work" / f"samples-rank{rank}.jsonl").read_text().splitlines()]
        for rank in (0, 1)
    ]
    first = [log[0] for log in logs]
    assert all(".hdf5:" in source for source in first[0]["sources"])  # rank 0: robot samples only
    assert all("text_only.json" in source for source in first[1]["sources"])  # rank 1: no robot sample, no image
    assert first[0]["noise_seed"] != first[1]["noise_seed"]
    assert sorted(losses(tmp_path / "out" / METRICS_FILE)) == [1]

    initial = load_file(world["stage1"] / "model.safetensors")
    expected, trained = load_file(exact_update / "model.safetensors"), load_file(tmp_path / "out" / "model.safetensors")
    assert expected.keys() == trained.keys()
    for name in expected:
        update, exact = trained[name].float() - initial[name].float(), expected[name].float() - initial[name].float()
        assert torch.allclose(update, exact, atol=1e-5, rtol=1e-3), name
    for module, pattern in MODULES.items():
        name = pattern.format(layer=1)
        assert (expected[name] != initial[name]).any(), f"the {module} was not updated: the test would prove nothing"
