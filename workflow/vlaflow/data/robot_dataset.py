"""Robot time steps from episodes in any storage format (`episodes.py`), as `RobotSample`s for the
policy.

Every time step of every episode is one sample. A sample reads only what it needs (one frame per
camera, one state row, one action chunk) through a reader opened once per process, so loading
stays cheap however long the episodes are.
"""

import os
from collections import OrderedDict

import numpy as np
import torch

from vlaflow.data.episodes import Episode, EpisodeReader
from vlaflow.data.images import draw_augmentation
from vlaflow.data.samples import RobotSample, RobotSpec
from vlaflow.data.stats import NormStats
from vlaflow.errors import VlaflowError

# Each open episode holds its storage's state (HDF5's per-file structures, a video decoder);
# bounding the episodes open per process bounds that memory, and the file descriptors, on
# datasets of thousands of episodes.
MAX_OPEN_EPISODES = 64


class RobotEpisodeDataset(torch.utils.data.Dataset):
    """Every time step of the given episodes, as `RobotSample`s.

    The action chunk of step t starts at t in simulated episodes and at t-1 (clamped at 0) in real
    ones, whose actions lag the state by one step; rows past the episode's end are 0 (the middle of
    the normalised range) and marked by `is_pad`. With `augment`, the cameras of a sample get one
    random crop/rotation/colour jitter, drawn from (seed, epoch, index) so a run can be repeated;
    call `set_epoch` before each epoch's DataLoader iterator is created (workers copy the dataset).
    """

    def __init__(
        self, episodes: list[Episode], spec: RobotSpec, stats: NormStats, augment: bool = False, seed: int = 0
    ):
        if not episodes:
            raise VlaflowError("no robot episodes given")
        if (stats.action_dim, stats.state_dim) != (spec.action_dim, spec.state_dim):
            raise VlaflowError(
                f"normalisation statistics: action/state dimensions {stats.action_dim}/{stats.state_dim}, "
                f"the config says {spec.action_dim}/{spec.state_dim}"
            )
        self.spec = spec
        self.stats = stats
        self.augment = augment
        self.seed = seed
        self.epoch = 0
        self.episodes = list(episodes)
        self.infos = [episode.inspect(spec) for episode in self.episodes]
        self._ends = np.cumsum([info.frames for info in self.infos])
        self._open_episodes: OrderedDict[int, EpisodeReader] = OrderedDict()
        self._pid = os.getpid()

    def __len__(self) -> int:
        return int(self._ends[-1])

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def locate(self, index: int) -> tuple[int, int]:
        """(episode number, time step) of a sample index."""
        if not 0 <= index < len(self):
            raise IndexError(f"sample {index} of a dataset of {len(self)}")
        episode = int(np.searchsorted(self._ends, index, side="right"))
        return episode, index - (int(self._ends[episode - 1]) if episode else 0)

    def _open(self, episode: int) -> EpisodeReader:
        # A forked DataLoader worker inherits the parent's readers; file handles and decoders must
        # not be shared across processes, so each process opens its own.
        if self._pid != os.getpid():
            self._open_episodes = OrderedDict()
            self._pid = os.getpid()
        handle = self._open_episodes.get(episode)
        if handle is not None:
            self._open_episodes.move_to_end(episode)
            return handle
        if len(self._open_episodes) >= MAX_OPEN_EPISODES:
            self._open_episodes.popitem(last=False)[1].close()
        handle = self._open_episodes[episode] = self.episodes[episode].open(self.spec)
        return handle

    def __getitem__(self, index: int) -> RobotSample:
        episode, t = self.locate(index)
        info = self.infos[episode]
        reader = self._open(episode)
        images = reader.images(t, self.spec.image_size)
        if self.augment:
            augmentation = draw_augmentation(np.random.default_rng((self.seed, self.epoch, index)))
            images = [augmentation.apply(image) for image in images]
        start = t if info.sim else max(t - 1, 0)
        rows = reader.actions(start, start + self.spec.chunk_size)
        actions = np.zeros((self.spec.chunk_size, self.spec.action_dim), dtype=np.float32)
        state = reader.state(t)
        actions[: len(rows)] = self.stats.normalize_actions(rows, state)
        reasoning = reader.reasoning(t)
        if reasoning is None:
            reasoning = info.reasoning or ""
        return RobotSample(
            images=images,
            state=self.stats.normalize_state(state),
            actions=actions,
            is_pad=np.arange(self.spec.chunk_size) >= len(rows),
            instruction=reader.instruction(t),
            reasoning=reasoning,
            source=f"{info.source}:{t}",
        )

    def __getstate__(self) -> dict:
        # Open readers cannot be pickled (spawned workers); the receiver opens its own.
        state = self.__dict__.copy()
        state["_open_episodes"] = OrderedDict()
        return state
