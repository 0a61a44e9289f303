"""Normalisation statistics of a robot dataset: one JSON file shared by training and evaluation.

Robot state is standardised by mean/std (population std, floored at 1e-2 so a joint that never
moves is not blown up); actions are mapped from [min, max] to [-1, 1], the range the diffusion
head samples in (a zero range is floored at 1e-4). The file holds the true statistics; the floors
apply when normalising.
"""

import json
import math
from dataclasses import dataclass, fields
from pathlib import Path

import h5py
import numpy as np

from vlaflow.data.episode_format import ACTION, QPOS
from vlaflow.errors import VlaflowError
from vlaflow.fs import atomic_file

STATE_STD_FLOOR = 1e-2
ACTION_RANGE_FLOOR = 1e-4


@dataclass
class NormStats:
    """Per-dimension statistics of the actions and states of `frames` frames in `episodes` episodes."""

    action_min: np.ndarray
    action_max: np.ndarray
    action_mean: np.ndarray
    action_std: np.ndarray
    state_mean: np.ndarray
    state_std: np.ndarray
    state_min: np.ndarray
    state_max: np.ndarray
    episodes: int
    frames: int

    @property
    def action_dim(self) -> int:
        return len(self.action_min)

    @property
    def state_dim(self) -> int:
        return len(self.state_mean)

    def _action_range(self) -> np.ndarray:
        return np.maximum(self.action_max - self.action_min, ACTION_RANGE_FLOOR)

    def normalize_state(self, state: np.ndarray) -> np.ndarray:
        return ((state - self.state_mean) / np.maximum(self.state_std, STATE_STD_FLOOR)).astype(np.float32)

    def unnormalize_state(self, state: np.ndarray) -> np.ndarray:
        return (
            np.asarray(state, dtype=np.float64) * np.maximum(self.state_std, STATE_STD_FLOOR) + self.state_mean
        ).astype(np.float32)

    def normalize_actions(self, actions: np.ndarray) -> np.ndarray:
        return ((actions - self.action_min) / self._action_range() * 2 - 1).astype(np.float32)

    def unnormalize_actions(self, actions: np.ndarray) -> np.ndarray:
        return ((np.asarray(actions, dtype=np.float64) + 1) / 2 * self._action_range() + self.action_min).astype(
            np.float32
        )

    def save(self, path: Path) -> Path:
        """Write the JSON file; like every vlaflow output it must not exist yet."""
        content = {
            name: value.tolist() if isinstance(value, np.ndarray) else value for name, value in vars(self).items()
        }
        with atomic_file(Path(path)) as tmp:
            tmp.write_text(json.dumps(content, indent=1) + "\n")
        return Path(path)

    @classmethod
    def load(cls, path: Path) -> "NormStats":
        try:
            content = json.loads(Path(path).read_text())
        except OSError as error:
            raise VlaflowError(f"{path}: cannot read the statistics file ({error.strerror or error})") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise VlaflowError(f"{path}: not a JSON statistics file ({error})") from None
        if not isinstance(content, dict):
            raise VlaflowError(f"{path}: not a statistics file (expected a JSON object)")
        values = {}
        for field in fields(cls):
            if field.name not in content:
                raise VlaflowError(f"{path}: {field.name}: missing")
            values[field.name] = _parse_field(path, field.name, content[field.name], counted=field.type is int)
        for prefix, names in (("action", ("min", "max", "mean", "std")), ("state", ("mean", "std", "min", "max"))):
            lengths = {name: len(values[f"{prefix}_{name}"]) for name in names}
            if len(set(lengths.values())) != 1:
                raise VlaflowError(
                    f"{path}: {prefix}_*: lengths differ ({', '.join(f'{k} {v}' for k, v in lengths.items())})"
                )
        return cls(**values)


def _parse_field(path: Path, name: str, value, counted: bool):
    if counted:
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise VlaflowError(f"{path}: {name}: expected a non-negative integer, got {value!r}")
        return value
    if (
        not isinstance(value, list)
        or not value
        or not all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in value)
    ):
        raise VlaflowError(f"{path}: {name}: expected a non-empty list of finite numbers")
    return np.asarray(value, dtype=np.float64)


class _RunningMoments:
    """Count, sum, sum of squares, min and max of rows seen so far, in float64."""

    def __init__(self, dim: int):
        self.count = 0
        self.sum = np.zeros(dim)
        self.sum_of_squares = np.zeros(dim)
        self.min = np.full(dim, np.inf)
        self.max = np.full(dim, -np.inf)

    def add(self, rows: np.ndarray) -> None:
        rows = rows.astype(np.float64, copy=False)
        self.count += len(rows)
        self.sum += rows.sum(axis=0)
        self.sum_of_squares += np.square(rows).sum(axis=0)
        np.minimum(self.min, rows.min(axis=0, initial=np.inf), out=self.min)
        np.maximum(self.max, rows.max(axis=0, initial=-np.inf), out=self.max)

    def mean(self) -> np.ndarray:
        return self.sum / self.count

    def std(self) -> np.ndarray:
        variance = self.sum_of_squares / self.count - np.square(self.mean())
        return np.sqrt(np.maximum(variance, 0.0))


def _read_rows(file: h5py.File, path: Path, key: str, expected_dim: int | None) -> np.ndarray:
    if key not in file:
        raise VlaflowError(f"{path}: /{key}: missing")
    rows = file[key][()]
    if rows.ndim != 2:
        raise VlaflowError(f"{path}: /{key}: shape {rows.shape}, expected (frames, dimension)")
    if expected_dim is not None and rows.shape[1] != expected_dim:
        raise VlaflowError(f"{path}: /{key}: dimension {rows.shape[1]}, earlier episodes have {expected_dim}")
    if not np.isfinite(rows).all():
        frame = int(np.flatnonzero(~np.isfinite(rows).all(axis=1))[0])
        raise VlaflowError(f"{path}: /{key}: NaN or infinite value at frame {frame}")
    return rows


def compute_stats(episode_paths: list[Path]) -> NormStats:
    """Statistics over every frame of every episode, streaming: one episode's actions and states in
    memory at a time, never its images."""
    if not episode_paths:
        raise VlaflowError("no episodes to compute normalisation statistics from")
    actions: _RunningMoments | None = None
    states: _RunningMoments | None = None
    for path in episode_paths:
        try:
            file = h5py.File(path, "r")
        except OSError as error:
            raise VlaflowError(f"{path}: not a readable HDF5 file ({error})") from None
        with file:
            action_rows = _read_rows(file, path, ACTION, None if actions is None else len(actions.sum))
            state_rows = _read_rows(file, path, QPOS, None if states is None else len(states.sum))
        if len(action_rows) != len(state_rows):
            raise VlaflowError(f"{path}: /{ACTION}: {len(action_rows)} frames, /{QPOS} has {len(state_rows)}")
        actions = actions or _RunningMoments(action_rows.shape[1])
        states = states or _RunningMoments(state_rows.shape[1])
        actions.add(action_rows)
        states.add(state_rows)
    if actions.count == 0:
        raise VlaflowError(f"none of the {len(episode_paths)} episodes has a frame (first: {episode_paths[0]})")
    return NormStats(
        action_min=actions.min,
        action_max=actions.max,
        action_mean=actions.mean(),
        action_std=actions.std(),
        state_mean=states.mean(),
        state_std=states.std(),
        state_min=states.min,
        state_max=states.max,
        episodes=len(episode_paths),
        frames=actions.count,
    )
