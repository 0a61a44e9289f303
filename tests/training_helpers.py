"""Small real training runs: a data world shaped for the tiny VLA folder, configs per test, and
`vlaflow train` in a subprocess where a test needs to kill or signal it."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

from tests.conftest import ACTION_DIM, CHUNK_SIZE, STATE_DIM
from tests.data_factory import data_stage, make_data_root, recipe_stages

REPO = Path(__file__).parents[1]


def training_world(root: Path, *, episodes: int = 2, length: int = 4, vl_count: int = 4) -> Path:
    """With the defaults: one training episode of 4 steps and 4 conversations, so a batch of 4
    sees the same samples at every step."""
    make_data_root(root, episodes=episodes, length=length, vl_count=vl_count)
    return root


def training_config(path: Path, root: Path, *, training: dict | None = None, stages: dict | None = None) -> Path:
    config = {
        "model": {"action_dim": ACTION_DIM, "state_dim": STATE_DIM, "chunk_size": CHUNK_SIZE},
        "data": {
            "root": str(root),
            "registry": str(root / "datasets.yaml"),
            "image_size": [32, 32],
            "max_length": 256,
            "augment": False,
        },
        "training": {
            "max_steps": 30,
            "per_device_batch_size": 4,
            "learning_rate": 3e-3,
            "lr_scheduler": "constant",
            "max_grad_norm": 1.0,  # clipped, as the embedded default at its high learning rate
            "save_steps": 10,
            "logging_steps": 1,
            "num_workers": 0,
            **(training or {}),
        },
        "stages": stages or recipe_stages(mix={"vl_batch_fraction": 0.5}),
    }
    path.write_text(yaml.safe_dump(config))
    return path


ALOHA_HEAD = dict(action_dim=14, state_dim=14, chunk_size=10)


def train_on_sim_demos(root: Path, datasets: list[str], backbone: Path, mlp_weights: Path, image_size=(32, 40)) -> Path:
    """Stage 1, 5 steps, of the tiny model with ALOHA's dimensions on recorded simulator demos in
    `root/data/<dataset>` for each of `datasets` (their second episode held out as `val`); the
    trained model folder."""
    from vlaflow.backbone.vla_config import make_vla_folder
    from vlaflow.training.run import train

    data = root / "data"
    split = {"val": ["episode_0001.hdf5"]}
    registry = {name: {"kind": "robot", "path": name, "cameras": ["top"], "splits": split} for name in datasets}
    (data / "datasets.yaml").write_text(yaml.safe_dump(registry))
    config_path = training_config(
        root / "config.yaml",
        data,
        training={"max_steps": 5, "save_steps": 5},
        stages={"stage1": data_stage(robot=list(datasets), freeze=["vl_expert"])},
    )
    config = yaml.safe_load(config_path.read_text())
    config["model"] = ALOHA_HEAD
    config["data"].update(cameras=["top"], image_size=list(image_size), relative_actions=True)
    config_path.write_text(yaml.safe_dump(config))
    vla = make_vla_folder(backbone, root / "vla", policy_head=ALOHA_HEAD)
    return train(config_path, "stage1", vla, root / "work", root / "model", mlp_weights=mlp_weights)


def losses(metrics: Path, key: str = "loss") -> dict[int, float]:
    entries = [json.loads(line) for line in Path(metrics).read_text().splitlines()]
    return {entry["step"]: entry[key] for entry in entries if key in entry}


def train_command(config: Path, stage: str, init: Path, workdir: Path, out: Path, mlp_weights: Path | None = None):
    command = ["train", "--config", str(config), "--stage", stage, "--init", str(init)]
    command += ["--workdir", str(workdir), "--out", str(out)]
    return command + (["--mlp-weights", str(mlp_weights)] if mlp_weights else [])


VLAFLOW = [sys.executable, "-m", "vlaflow.cli"]


def torchrun(processes: int, port: int) -> list[str]:
    run = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}", f"--master_port={port}"]
    return run + ["-m", "vlaflow.cli"]


def start_training(arguments: list[str], log: Path, program: list[str] = VLAFLOW) -> subprocess.Popen:
    """`vlaflow train` as a process of its own, started by `program` (torchrun, say)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(program + arguments, cwd=REPO, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)


def wait_for(condition, process: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            raise AssertionError(f"training exited with {process.returncode} before the condition held")
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError("timed out")
        time.sleep(0.02)
