"""A trained model folder as a robot policy, shared by open- and closed-loop evaluation.

Observations go in exactly as training prepared them, from what the folder records: its config's
cameras and image size, its normalisation statistics. Action chunks come back in robot units.
"""

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import vlaflow.models  # noqa: F401  (registers the model and processor classes)
from vlaflow.backbone.folder import load_vla
from vlaflow.config import read_yaml
from vlaflow.data.images import decode_frame
from vlaflow.data.registry import ROBOT, RobotEntry
from vlaflow.data.stage_data import load_registry
from vlaflow.data.stats import NormStats
from vlaflow.errors import VlaflowError
from vlaflow.models.qwen2_vla.processing_qwen2_vla import load_processor
from vlaflow.training.checkpoints import CONFIG_FILE, STATS_FILE


@dataclass
class PolicyOutput:
    actions: np.ndarray  # (batch, chunk_size, action_dim), in the robot's units
    reasoning: list[str]  # what the model said before acting, per sample


class Policy:
    """The model, processor, normalisation statistics and training config of a model folder.
    Action sampling draws from one seeded generator; `reseed` restarts it."""

    def __init__(self, model_dir: Path, seed: int = 0):
        model_dir = Path(model_dir)
        if not (model_dir / STATS_FILE).is_file():
            raise VlaflowError(f"{model_dir}: no normalisation statistics: the model was not trained on robot data")
        self.stats = NormStats.load(model_dir / STATS_FILE)
        self.config = read_yaml(model_dir / CONFIG_FILE)
        self.image_size = tuple(self.config["data"]["image_size"])
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model = load_vla(model_dir).to(self.device).eval()
        self.processor = load_processor(model_dir)
        head = self.model.config.policy_head_config
        self.chunk_size, self.action_dim, self.state_dim = head.chunk_size, head.action_dim, head.state_dim
        if (self.stats.action_dim, self.stats.state_dim) != (self.action_dim, self.state_dim):
            raise VlaflowError(
                f"{model_dir / STATS_FILE}: action/state dimensions {self.stats.action_dim}/{self.stats.state_dim}, "
                f"the model's policy head has {self.action_dim}/{self.state_dim}"
            )
        self.generator = torch.Generator(self.device)
        self.reseed(seed)

    def reseed(self, seed: int) -> None:
        self.generator.manual_seed(seed)

    def observe(self, frames: list[np.ndarray], qpos: np.ndarray) -> tuple[list[Image.Image], np.ndarray]:
        """Raw camera frames and joint positions as a training sample holds them: frames resized
        to the model's image size, the state normalised."""
        return [decode_frame(frame, self.image_size) for frame in frames], self.stats.normalize_state(qpos)

    def act(self, frames: list[np.ndarray], qpos: np.ndarray, instruction: str) -> PolicyOutput:
        """One action chunk from raw camera frames (in the config's camera order) and joint positions."""
        images, state = self.observe(frames, qpos)
        return self.predict([images], state[None], [instruction])

    def predict(self, images: list[list[Image.Image]], states: np.ndarray, instructions: list[str]) -> PolicyOutput:
        """One action chunk per sample from its images, normalised state and instruction."""
        inputs = self.processor.generation_inputs(images, instructions).to(self.device)
        states = torch.as_tensor(np.asarray(states), dtype=torch.float32, device=self.device)
        prediction = self.model.predict_action(**inputs, states=states, generator=self.generator)
        actions = self.stats.unnormalize_actions(
            prediction.actions.float().cpu().numpy(), self.stats.unnormalize_state(states.cpu().numpy())
        )
        reasoning = self.processor.batch_decode(prediction.reasoning_ids, skip_special_tokens=True)
        return PolicyOutput(actions, [text.strip() for text in reasoning])


def robot_datasets(config: dict, names: list[str] | None = None) -> list[RobotEntry]:
    """The registry's robot datasets of `names` (registry names, `all`; a `name%NN` selection
    counts as the whole dataset); by default those the model was trained on: its stage's, else
    those of the nearest stage it started from that lists any."""
    if names is None:
        # walked by hand, not through stages.lineage: a model's saved config may predate the
        # stage table (no `from`), and then its own stage's list is all there is
        stages, stage, visited = config["stages"], config.get("stage"), set()
        while stage in stages and stage not in visited and not stages[stage].get(ROBOT):
            visited.add(stage)
            stage = stages[stage].get("from")
        names = stages[stage].get(ROBOT) if stage in stages else None
        if not names:
            raise VlaflowError(f"the model's {CONFIG_FILE}: no training stage lists robot datasets")
    registry = load_registry(config)
    selections = registry.select(names, ROBOT, "datasets")
    return list({selection.entry.name: selection.entry for selection in selections}.values())
