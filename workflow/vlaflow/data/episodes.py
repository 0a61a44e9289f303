"""The seam between robot data and its storage.

Everything that reads robot episodes (the registry's splits, normalisation statistics, a stage's
samples, `vlaflow data check`, open-loop evaluation) goes through an `Episode` and the
`EpisodeReader` it opens, never through a file format. A storage format is one `EpisodeFormat`
subclass registered in `episode_formats.EPISODE_FORMATS` and named by a registry entry's
`format:`; the HDF5 episodes of DexVLA/ACT (`hdf5_episodes`) and LeRobot's v3 datasets
(`lerobot_episodes`) are the two there are.

Every problem a format finds is a one-line VlaflowError that starts with the episode's `source`
(the file, and the episode within it where a file holds several) and names the field.
"""

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from vlaflow.data.samples import RobotSpec


@dataclass(frozen=True)
class EpisodeInfo:
    """What `Episode.inspect` learns from an episode's shapes and metadata, no image decoded."""

    source: str
    frames: int
    sim: bool  # the action chunk of step t starts at t; False: at t-1 (real ACT data lags a step)
    action_dim: int
    state_dim: int
    cameras: tuple[str, ...]  # every camera the episode has, configured or not
    image_shapes: dict[str, tuple[int, int, int] | None]  # per configured camera; None when unknown before decoding
    compressed: bool  # any configured camera stores compressed frames
    instruction: str  # the first step's
    reasoning: str | None  # the episode-level reasoning, when present
    has_substep_reasonings: bool


@dataclass(frozen=True)
class EpisodeRows:
    """An episode's actions and states, for statistics; the fields name them in messages."""

    actions: np.ndarray  # (frames, action_dim)
    states: np.ndarray  # (frames, state_dim)
    action_field: str
    state_field: str


class EpisodeReader(ABC):
    """An open episode: reads one step at a time. A process keeps a bounded number open."""

    @abstractmethod
    def images(self, t: int, size: tuple[int, int] | None) -> list[Image.Image]:
        """Step t's frame of each of the spec's cameras, in its order, resized to (height, width)."""

    @abstractmethod
    def state(self, t: int) -> np.ndarray: ...

    @abstractmethod
    def actions(self, start: int, stop: int) -> np.ndarray:
        """Rows start..stop of the actions, fewer past the episode's end."""

    @abstractmethod
    def instruction(self, t: int) -> str: ...

    @abstractmethod
    def reasoning(self, t: int) -> str | None:
        """Step t's own reasoning, or None where the episode has none per step."""

    def close(self) -> None:
        pass


class Episode(ABC):
    """One episode of a robot dataset. Picklable and small: DataLoader workers get copies."""

    name: str  # its name within the dataset, what a registry entry's split patterns match
    source: str  # where it is stored, the start of every message about it

    @abstractmethod
    def files(self) -> list[Path]:
        """The files it is stored in, for a training run's record of its inputs."""

    @abstractmethod
    def inspect(self, spec: RobotSpec) -> EpisodeInfo:
        """Check the episode against the spec from shapes and metadata alone."""

    @abstractmethod
    def rows(self) -> EpisodeRows: ...

    @abstractmethod
    def open(self, spec: RobotSpec) -> EpisodeReader: ...

    @abstractmethod
    def check_decode(self, spec: RobotSpec) -> dict[str, tuple[int, int]]:
        """Decode every frame of every configured camera (slow: for `data check`); return each
        camera's (height, width)."""


class EpisodeFormat(ABC):
    """A storage format: lists a dataset folder's episodes. `options` are the registry entry's
    format-specific keys (`option_keys`), checked by `check_options` when the registry loads."""

    name: str
    option_keys: frozenset[str] = frozenset()

    @classmethod
    def check_options(cls, options: dict, where: str) -> None:
        pass

    @classmethod
    @abstractmethod
    def episodes(cls, root: Path, options: dict) -> list[Episode]:
        """Every episode under `root`, in a stable order; none is an error."""
