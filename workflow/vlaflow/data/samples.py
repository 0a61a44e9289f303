"""The two kinds of training sample, as datasets hand them to the collator."""

from dataclasses import dataclass

import numpy as np
from PIL import Image


@dataclass(frozen=True)
class RobotSpec:
    """What a robot dataset must provide, fixed by the model it trains: which cameras (in this
    order), the image size fed to the model, and the action and state shapes."""

    cameras: tuple[str, ...]
    image_size: tuple[int, int]  # (height, width)
    action_dim: int
    state_dim: int
    chunk_size: int


@dataclass
class RobotSample:
    """One time step t of an episode: normalised state and action chunk, ready for the policy."""

    images: list[Image.Image]  # one per camera of the spec, resized to its image size
    state: np.ndarray  # (state_dim,) float32, normalised
    actions: np.ndarray  # (chunk_size, action_dim) float32, normalised to [-1, 1]
    is_pad: np.ndarray  # (chunk_size,) bool, True past the episode's end
    instruction: str
    reasoning: str  # the step's reasoning, the episode's, or "" when the episode has none
    source: str  # "<file>:<t>", for messages


@dataclass
class VLSample:
    """A vision-language conversation; `<image>` in a user turn marks where an image goes."""

    images: list[Image.Image]
    turns: list[tuple[str, str]]  # (role, text), role "user" or "assistant", alternating from "user"
    source: str  # "<file>#<entry index>", for messages
