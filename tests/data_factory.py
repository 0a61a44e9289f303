"""Real data on disk for the data tests: HDF5 episodes, LLaVA JSON with PNG images, a
registry and a workflow config that ties them together."""

import json
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from tests.conftest import ACTION_DIM, CHUNK_SIZE, STATE_DIM, random_image
from vlaflow.data.hdf5_episodes import write_episode


def smooth_frames(length: int, height: int = 24, width: int = 32, seed: int = 0) -> np.ndarray:
    """Gradients that change from frame to frame: they survive JPEG nearly unchanged."""
    rows, cols = np.mgrid[0:height, 0:width]
    frames = [
        np.stack([rows * 200 // height + t, cols * 200 // width + seed, (rows + cols + 3 * t) % 200], axis=-1)
        for t in range(length)
    ]
    return np.asarray(frames, dtype=np.uint8)


def episode_arrays(length: int, seed: int = 0, action_dim: int = ACTION_DIM, state_dim: int = STATE_DIM):
    """Actions whose first column is the time step, so a chunk shows where it starts."""
    rng = np.random.default_rng(seed)
    actions = rng.normal(size=(length, action_dim)).astype(np.float32)
    actions[:, 0] = np.arange(length)
    qpos = rng.normal(2.0, 3.0, size=(length, state_dim)).astype(np.float32)
    return actions, qpos


def make_episode(
    path, length=10, sim=True, seed=0, cameras=("top",), action_dim=ACTION_DIM, state_dim=STATE_DIM, **kwargs
):
    """`cameras`: names (frames of 24x32), or a mapping of name to (height, width)."""
    actions, qpos = episode_arrays(length, seed, action_dim, state_dim)
    sizes = cameras if isinstance(cameras, dict) else dict.fromkeys(cameras, (24, 32))
    images = {camera: smooth_frames(length, *size, seed=seed) for camera, size in sizes.items()}
    kwargs.setdefault("language", f"task {seed}")
    return write_episode(path, actions=actions, qpos=qpos, images=images, sim=sim, **kwargs)


def write_images(folder: Path, names: list[str]) -> None:
    for number, name in enumerate(names):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        random_image(number, (32, 32)).save(folder / name)


def vl_entries(count: int) -> list[dict]:
    """Conversations in LLaVA's format: with one image, with two, multi-turn and text-only."""
    entries = []
    for number in range(count):
        kind = number % 4
        if kind == 0:
            image, text = f"img/{number}.png", "<image>\nwhat color is the shape?"
        elif kind == 1:
            image, text = [f"img/{number}a.png", f"img/{number}b.png"], "<image>\n<image>\nis there a circle?"
        elif kind == 2:
            image, text = f"img/{number}.png", "what shape is in the image?\n<image>"
        else:
            image, text = None, "is there a circle?"
        conversation = [{"from": "human", "value": text}, {"from": "gpt", "value": "red"}]
        if kind == 2:
            conversation += [{"from": "human", "value": "is there a triangle?"}, {"from": "gpt", "value": "no"}]
        entry = {"id": str(number), "conversations": conversation}
        if image is not None:
            entry["image"] = image
        entries.append(entry)
    return entries


def image_names(entries: list[dict]) -> list[str]:
    names = []
    for entry in entries:
        image = entry.get("image") or entry.get("images") or []
        names += [image] if isinstance(image, str) else image
    return names


def make_data_root(root: Path, *, episodes: int = 3, length: int = 10, vl_count: int = 8) -> Path:
    """A data root with one robot dataset (`robot_a`) and one VL dataset (`vl_a`), plus the
    registry naming them; returns the registry path."""
    for number in range(episodes):
        make_episode(root / "robot_a" / f"episode_{number:04d}.hdf5", length=length, seed=number)
    entries = vl_entries(vl_count)
    (root / "vl_a").mkdir(parents=True)
    (root / "vl_a" / "train.json").write_text(json.dumps(entries))
    write_images(root / "vl_a" / "images", image_names(entries))
    registry = {
        "robot_a": {"kind": "robot", "path": "robot_a", "splits": {"val": ["episode_0000.hdf5"]}},
        "vl_a": {"kind": "vl", "annotation": "vl_a/train.json", "images": "vl_a/images"},
    }
    (root / "datasets.yaml").write_text(yaml.safe_dump(registry))
    return root / "datasets.yaml"


def recipe_stages(robot: str = "robot_a", vl: str = "vl_a", mix: dict | None = None) -> dict:
    """The stage table of the embedded default's recipe (vlm, stage1, stage2) over these datasets."""
    return {
        "vlm": {"from": "backbone", "mlp_init": True, "freeze": ["robot_expert", "policy_head", "reasoning_conditioner"], "vl": [vl]},
        "stage1": {"from": "vlm", "mlp_init": True, "freeze": ["vl_expert"], "robot": [robot]},
        "stage2": {"from": "stage1", "robot": [robot], "vl": [vl], "mix": mix or {"vl_ratio": 0.33}},
    }


def data_stage(**settings) -> dict:
    """A stage row for tests of the data alone: it starts from the backbone."""
    return {"from": "backbone", "mlp_init": True, **settings}


def make_config(path: Path, root: Path, **stages) -> Path:
    """A workflow config over `make_data_root`'s data, with the given stages (default: one stage
    mixing both datasets at vl_ratio 0.33)."""
    config = {
        "model": {"action_dim": ACTION_DIM, "state_dim": STATE_DIM, "chunk_size": CHUNK_SIZE},
        "data": {"root": str(root), "registry": str(root / "datasets.yaml"), "image_size": [32, 32], "max_length": 256},
        "stages": stages or {"stage2": data_stage(robot=["robot_a"], vl=["vl_a"], mix={"vl_ratio": 0.33})},
    }
    path.write_text(yaml.safe_dump(config))
    return path


def read_image(path: Path) -> Image.Image:
    with Image.open(path) as image:
        return image.convert("RGB")
