"""Robot time steps from HDF5 episode files, as `RobotSample`s for the policy.

Every time step of every episode is one sample. A sample reads only what it needs from its file
(one frame per camera, one state row, one action chunk) through a handle opened once per process,
so loading stays cheap however long the episodes are.
"""

import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch
from PIL import Image

from vlaflow.data.episode_format import ACTION, IMAGES, LANGUAGE, QPOS, REASONING, SIM_ATTRIBUTE, SUBSTEP_REASONINGS
from vlaflow.data.images import decode_frame, draw_augmentation
from vlaflow.data.samples import RobotSample, RobotSpec
from vlaflow.data.stats import NormStats
from vlaflow.errors import VlaflowError

EPISODE_SUFFIXES = (".hdf5", ".h5")
# Each open file holds HDF5's chunk caches; bounding the handles per process bounds that memory
# (and the file descriptors) on datasets of thousands of episodes.
MAX_OPEN_EPISODES = 64


def list_episode_files(folder: Path) -> list[Path]:
    """The episode files under `folder`, recursively, sorted by path."""
    folder = Path(folder)
    if not folder.is_dir():
        raise VlaflowError(f"{folder}: no such folder")
    paths = sorted(path for path in folder.rglob("*") if path.suffix in EPISODE_SUFFIXES and path.is_file())
    if not paths:
        raise VlaflowError(
            f"{folder}: no episode files ({', '.join('*' + s for s in EPISODE_SUFFIXES)}) in this folder"
        )
    return paths


@dataclass(frozen=True)
class EpisodeInfo:
    """What `inspect_episode` learns from an episode's shapes and attributes."""

    path: Path
    frames: int
    sim: bool  # actions aligned with the state at t (simulation) rather than at t-1 (real robot)
    action_dim: int
    state_dim: int
    cameras: tuple[str, ...]  # every camera in the file, configured or not
    image_shapes: dict[str, tuple[int, int, int] | None]  # per configured camera; None when JPEG
    compressed: bool  # any configured camera stores JPEG bytes
    instruction: str
    reasoning: str | None  # the episode-level reasoning, when present
    has_substep_reasonings: bool


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _utf8(value, path: Path, field: str) -> str:
    try:
        return _text(value)
    except UnicodeDecodeError as error:
        raise VlaflowError(f"{path}: /{field}: not UTF-8 text ({error.reason} at byte {error.start})") from None


def _open_file(path: Path) -> h5py.File:
    try:
        # No chunk cache: training reads single frames in random order, so a cached chunk is never
        # read again, and each open camera would otherwise keep up to a chunk (a raw frame, ~1 MiB)
        # for as long as its episode stays open.
        return h5py.File(path, "r", rdcc_nbytes=0)
    except FileNotFoundError:
        raise VlaflowError(f"{path}: no such file") from None
    except OSError as error:
        raise VlaflowError(f"{path}: not a readable HDF5 file ({error})") from None


def _dataset(file: h5py.File, path: Path, key: str) -> h5py.Dataset:
    item = file.get(key)
    if item is None:
        raise VlaflowError(f"{path}: /{key}: missing")
    if not isinstance(item, h5py.Dataset):
        raise VlaflowError(f"{path}: /{key}: a group, expected a dataset")
    return item


def _rows(file: h5py.File, path: Path, key: str, expected_dim: int, what: str) -> h5py.Dataset:
    dataset = _dataset(file, path, key)
    if dataset.ndim != 2:
        raise VlaflowError(f"{path}: /{key}: shape {dataset.shape}, expected (frames, {what} dimension)")
    if dataset.shape[1] != expected_dim:
        raise VlaflowError(f"{path}: /{key}: dimension {dataset.shape[1]}, the config says {expected_dim}")
    return dataset


def _is_jpeg_layout(frames: h5py.Dataset, path: Path) -> bool:
    """True for JPEG bytes (ACT's zero-padded uint8 rows, or variable-length strings), False for
    raw (H, W, 3) uint8 frames; anything else is an error."""
    if frames.ndim == 4 and frames.shape[-1] == 3 and frames.dtype == np.uint8:
        return False
    if (frames.ndim == 2 and frames.dtype == np.uint8) or (frames.ndim == 1 and frames.dtype.kind in "SOV"):
        return True
    raise VlaflowError(
        f"{path}: {frames.name}: frames of shape {frames.shape[1:]} {frames.dtype}; "
        "expected (height, width, 3) uint8 or JPEG bytes"
    )


def inspect_episode(path: Path, spec: RobotSpec) -> EpisodeInfo:
    """Check an episode against the spec from its shapes and attributes alone (no image is
    decoded); any problem is a one-line VlaflowError naming the file and the field."""
    path = Path(path)
    with _open_file(path) as file:
        actions = _rows(file, path, ACTION, spec.action_dim, "action")
        qpos = _rows(file, path, QPOS, spec.state_dim, "state")
        frames = len(qpos)
        if frames == 0:
            raise VlaflowError(f"{path}: /{QPOS}: no frames")
        if len(actions) != frames:
            raise VlaflowError(f"{path}: /{ACTION}: {len(actions)} frames, /{QPOS} has {frames}")
        images = file.get(IMAGES)
        present = tuple(images) if isinstance(images, h5py.Group) else ()
        image_shapes = {}
        for camera in spec.cameras:
            if camera not in present:
                listing = ", ".join(present) or "no cameras"
                raise VlaflowError(f"{path}: /{IMAGES}/{camera}: camera missing (episode has: {listing})")
            camera_frames = _dataset(file, path, f"{IMAGES}/{camera}")
            if len(camera_frames) != frames:
                raise VlaflowError(f"{path}: /{IMAGES}/{camera}: {len(camera_frames)} frames, /{QPOS} has {frames}")
            image_shapes[camera] = None if _is_jpeg_layout(camera_frames, path) else tuple(camera_frames.shape[1:])
        language = _dataset(file, path, LANGUAGE)
        if language.size == 0:
            raise VlaflowError(f"{path}: /{LANGUAGE}: empty")
        substeps = file.get(SUBSTEP_REASONINGS)
        if substeps is not None and len(substeps) != frames:
            raise VlaflowError(f"{path}: /{SUBSTEP_REASONINGS}: {len(substeps)} entries, /{QPOS} has {frames}")
        if substeps is not None:
            for index, text in enumerate(substeps[()]):
                _utf8(text, path, f"{SUBSTEP_REASONINGS}: entry {index}")
        reasoning = file.get(REASONING)
        instruction = _utf8(language[0], path, LANGUAGE)
        episode_reasoning = _utf8(reasoning[0], path, REASONING) if reasoning is not None and reasoning.size else None
        return EpisodeInfo(
            path=path,
            frames=frames,
            sim=bool(file.attrs.get(SIM_ATTRIBUTE, False)),  # upstream's default for files without it
            action_dim=actions.shape[1],
            state_dim=qpos.shape[1],
            cameras=present,
            image_shapes=image_shapes,
            compressed=any(shape is None for shape in image_shapes.values()),
            instruction=instruction,
            reasoning=episode_reasoning,
            has_substep_reasonings=substeps is not None,
        )


def _decoded_frame(frames: h5py.Dataset, t: int, path: Path, size: tuple[int, int] | None = None) -> Image.Image:
    try:
        return decode_frame(frames[t], size)
    except (OSError, ValueError) as error:
        raise VlaflowError(f"{path}: {frames.name}: frame {t} does not decode ({error})") from None


def check_frames_decode(path: Path, spec: RobotSpec) -> dict[str, tuple[int, int]]:
    """Decode every frame of every configured camera (slow: for `data check`, not for training);
    return each camera's (height, width). A frame that does not decode, or whose size differs from
    the camera's first frame, is a VlaflowError."""
    inspect_episode(path, spec)
    sizes = {}
    with _open_file(Path(path)) as file:
        for camera in spec.cameras:
            frames = file[f"{IMAGES}/{camera}"]
            for t in range(len(frames)):
                width, height = _decoded_frame(frames, t, path).size
                first = sizes.setdefault(camera, (height, width))
                if first != (height, width):
                    raise VlaflowError(
                        f"{path}: /{IMAGES}/{camera}: frame {t} is {height}x{width}, frame 0 is {first[0]}x{first[1]}"
                    )
    return sizes


@dataclass
class _OpenEpisode:
    file: h5py.File
    actions: h5py.Dataset
    qpos: h5py.Dataset
    cameras: list[h5py.Dataset]  # in the spec's order
    substep_reasonings: h5py.Dataset | None


class RobotEpisodeDataset(torch.utils.data.Dataset):
    """Every time step of the given episodes, as `RobotSample`s.

    The action chunk of step t starts at t in simulated episodes and at t-1 (clamped at 0) in real
    ones, whose actions lag the state by one step; rows past the episode's end are 0 (the middle of
    the normalised range) and marked by `is_pad`. With `augment`, the cameras of a sample get one
    random crop/rotation/colour jitter, drawn from (seed, epoch, index) so a run can be repeated;
    call `set_epoch` before each epoch's DataLoader iterator is created (workers copy the dataset).
    """

    def __init__(
        self, episode_paths: list[Path], spec: RobotSpec, stats: NormStats, augment: bool = False, seed: int = 0
    ):
        if not episode_paths:
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
        self.episodes = [inspect_episode(path, spec) for path in episode_paths]
        self._ends = np.cumsum([episode.frames for episode in self.episodes])
        self._open_episodes: OrderedDict[int, _OpenEpisode] = OrderedDict()
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

    def _open(self, episode: int) -> _OpenEpisode:
        # A forked DataLoader worker inherits the parent's handles; HDF5 handles must not be shared
        # across processes, so each process opens its own.
        if self._pid != os.getpid():
            self._open_episodes = OrderedDict()
            self._pid = os.getpid()
        handle = self._open_episodes.get(episode)
        if handle is not None:
            self._open_episodes.move_to_end(episode)
            return handle
        if len(self._open_episodes) >= MAX_OPEN_EPISODES:
            self._open_episodes.popitem(last=False)[1].file.close()
        file = _open_file(self.episodes[episode].path)
        handle = _OpenEpisode(
            file=file,
            actions=file[ACTION],
            qpos=file[QPOS],
            cameras=[file[f"{IMAGES}/{camera}"] for camera in self.spec.cameras],
            substep_reasonings=file.get(SUBSTEP_REASONINGS),
        )
        self._open_episodes[episode] = handle
        return handle

    def __getitem__(self, index: int) -> RobotSample:
        episode, t = self.locate(index)
        info = self.episodes[episode]
        handle = self._open(episode)
        images = [_decoded_frame(camera, t, info.path, self.spec.image_size) for camera in handle.cameras]
        if self.augment:
            augmentation = draw_augmentation(np.random.default_rng((self.seed, self.epoch, index)))
            images = [augmentation.apply(image) for image in images]
        start = t if info.sim else max(t - 1, 0)
        rows = handle.actions[start : start + self.spec.chunk_size]
        actions = np.zeros((self.spec.chunk_size, self.spec.action_dim), dtype=np.float32)
        state = handle.qpos[t]
        actions[: len(rows)] = self.stats.normalize_actions(rows, state)
        if handle.substep_reasonings is not None:
            reasoning = _text(handle.substep_reasonings[t])
        else:
            reasoning = info.reasoning or ""
        return RobotSample(
            images=images,
            state=self.stats.normalize_state(state),
            actions=actions,
            is_pad=np.arange(self.spec.chunk_size) >= len(rows),
            instruction=info.instruction,
            reasoning=reasoning,
            source=f"{info.path}:{t}",
        )

    def __getstate__(self) -> dict:
        # Open HDF5 handles cannot be pickled (spawned workers); the receiver opens its own.
        state = self.__dict__.copy()
        state["_open_episodes"] = OrderedDict()
        return state
