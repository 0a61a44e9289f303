"""Normalisation statistics of a robot dataset: one JSON file shared by training and evaluation.

Robot state is standardised by mean/std (population std, floored at 1e-2 so a joint that never
moves is not blown up); actions are mapped from [min, max] to [-1, 1], the range the diffusion
head samples in (a zero range is floored at 1e-4). The file holds the true statistics; the floors
apply when normalising.

With relative actions (`data.relative_actions`), the model predicts each action of a chunk as an
offset from the joint positions it observed, as pi0 and UMI do: the statistics then also hold
the [min, max] of `action[t + k] - state[t]` over the offsets `k` of a chunk (`delta_*`;
`delta_horizon` is the chunk size), and `normalize_actions` / `unnormalize_actions` take the
state. Holding still is then the middle of the range instead of something to learn, which is
what a policy trained for minutes lacks most. The absolute `action_*` statistics stay, for the
trivial reference policies.
"""

import json
import math
from dataclasses import MISSING, dataclass, fields
from pathlib import Path

import numpy as np

from vlaflow.data.episodes import Episode
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
    delta_min: np.ndarray | None = None
    delta_max: np.ndarray | None = None
    delta_horizon: int = 0  # 0: absolute actions

    @property
    def action_dim(self) -> int:
        return len(self.action_min)

    @property
    def relative(self) -> bool:
        return self.delta_horizon > 0

    @property
    def state_dim(self) -> int:
        return len(self.state_mean)

    def _action_bounds(self) -> tuple[np.ndarray, np.ndarray]:
        low, high = (self.delta_min, self.delta_max) if self.relative else (self.action_min, self.action_max)
        return low, np.maximum(high - low, ACTION_RANGE_FLOOR)

    def _origin(self, state: np.ndarray | None, shape: tuple[int, ...]) -> np.ndarray | float:
        """What the actions are relative to: the raw state under each chunk, over all its steps."""
        if not self.relative:
            return 0.0
        if state is None:
            raise ValueError("relative actions are normalised against the state they start from; none was given")
        return np.asarray(state, dtype=np.float64).reshape(*shape[:-2], 1, shape[-1])

    def normalize_state(self, state: np.ndarray) -> np.ndarray:
        return ((state - self.state_mean) / np.maximum(self.state_std, STATE_STD_FLOOR)).astype(np.float32)

    def unnormalize_state(self, state: np.ndarray) -> np.ndarray:
        return (
            np.asarray(state, dtype=np.float64) * np.maximum(self.state_std, STATE_STD_FLOOR) + self.state_mean
        ).astype(np.float32)

    def normalize_actions(self, actions: np.ndarray, state: np.ndarray | None = None) -> np.ndarray:
        """Action chunks (..., steps, action_dim) in robot units to [-1, 1]; `state` (..., state_dim),
        in robot units, is what each chunk starts from (needed with relative actions)."""
        actions = np.asarray(actions, dtype=np.float64)
        low, width = self._action_bounds()
        return ((actions - self._origin(state, actions.shape) - low) / width * 2 - 1).astype(np.float32)

    def unnormalize_actions(self, actions: np.ndarray, state: np.ndarray | None = None) -> np.ndarray:
        """The inverse of `normalize_actions`."""
        actions = np.asarray(actions, dtype=np.float64)
        low, width = self._action_bounds()
        return ((actions + 1) / 2 * width + low + self._origin(state, actions.shape)).astype(np.float32)

    def save(self, path: Path) -> Path:
        """Write the JSON file; like every vlaflow output it must not exist yet."""
        content = {
            name: value.tolist() if isinstance(value, np.ndarray) else value
            for name, value in vars(self).items()
            if value is not None
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
            if field.name in content:
                values[field.name] = _parse_field(path, field.name, content[field.name], counted=field.type is int)
            elif field.default is MISSING:
                raise VlaflowError(f"{path}: {field.name}: missing")
        groups = [("action", ("min", "max", "mean", "std")), ("state", ("mean", "std", "min", "max"))]
        if values.get("delta_horizon"):
            groups.append(("delta", ("min", "max")))
            for name in ("delta_min", "delta_max"):
                if name not in values:
                    raise VlaflowError(f"{path}: {name}: missing (delta_horizon says the actions are relative)")
        for prefix, names in groups:
            lengths = {name: len(values[f"{prefix}_{name}"]) for name in names}
            if len(set(lengths.values())) != 1:
                raise VlaflowError(
                    f"{path}: {prefix}_*: lengths differ ({', '.join(f'{k} {v}' for k, v in lengths.items())})"
                )
        if values.get("delta_horizon") and len(values["delta_min"]) != len(values["state_mean"]):
            raise VlaflowError(
                f"{path}: delta_min: {len(values['delta_min'])} dimensions, the state has {len(values['state_mean'])}"
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


def _checked_rows(rows: np.ndarray, where: str, expected_dim: int | None) -> np.ndarray:
    if rows.ndim != 2:
        raise VlaflowError(f"{where}: shape {rows.shape}, expected (frames, dimension)")
    if expected_dim is not None and rows.shape[1] != expected_dim:
        raise VlaflowError(f"{where}: dimension {rows.shape[1]}, earlier episodes have {expected_dim}")
    if not np.isfinite(rows).all():
        frame = int(np.flatnonzero(~np.isfinite(rows).all(axis=1))[0])
        raise VlaflowError(f"{where}: NaN or infinite value at frame {frame}")
    return rows


def compute_stats(episodes: list[Episode], delta_horizon: int = 0) -> NormStats:
    """Statistics over every frame of every episode, streaming: one episode's actions and states in
    memory at a time, never its images. With a `delta_horizon`, also those of every
    `action[t + k] - state[t]` within an episode for `-1 <= k < delta_horizon`: a real robot's
    chunk starts one action early (robot_dataset), a simulated one's at `t`."""
    if not episodes:
        raise VlaflowError("no episodes to compute normalisation statistics from")
    actions: _RunningMoments | None = None
    states: _RunningMoments | None = None
    deltas: _RunningMoments | None = None
    for episode in episodes:
        rows = episode.rows()
        action_where = f"{episode.source}: {rows.action_field}"
        action_rows = _checked_rows(rows.actions, action_where, None if actions is None else len(actions.sum))
        state_rows = _checked_rows(
            rows.states, f"{episode.source}: {rows.state_field}", None if states is None else len(states.sum)
        )
        if len(action_rows) != len(state_rows):
            raise VlaflowError(f"{action_where}: {len(action_rows)} frames, {rows.state_field} has {len(state_rows)}")
        actions = actions or _RunningMoments(action_rows.shape[1])
        states = states or _RunningMoments(state_rows.shape[1])
        actions.add(action_rows)
        states.add(state_rows)
        if delta_horizon:
            if action_rows.shape[1] != state_rows.shape[1]:
                raise VlaflowError(
                    f"{action_where}: dimension {action_rows.shape[1]}, {rows.state_field} has {state_rows.shape[1]}: "
                    "relative actions (data.relative_actions) need one action per state dimension"
                )
            deltas = deltas or _RunningMoments(action_rows.shape[1])
            deltas.add(action_rows[:-1] - state_rows[1:])
            for offset in range(min(delta_horizon, len(action_rows))):
                deltas.add(action_rows[offset:] - state_rows[: len(state_rows) - offset])
    if actions.count == 0:
        raise VlaflowError(f"none of the {len(episodes)} episodes has a frame (first: {episodes[0].source})")
    return NormStats(
        action_min=actions.min,
        action_max=actions.max,
        action_mean=actions.mean(),
        action_std=actions.std(),
        state_mean=states.mean(),
        state_std=states.std(),
        state_min=states.min,
        state_max=states.max,
        episodes=len(episodes),
        frames=actions.count,
        delta_min=deltas.min if deltas else None,
        delta_max=deltas.max if deltas else None,
        delta_horizon=delta_horizon if deltas else 0,
    )
