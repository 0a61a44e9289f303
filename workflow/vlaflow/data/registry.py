"""The dataset registry (`config/datasets.yaml`): short names for robot and vision-language
datasets, and the `name%NN` selections a training stage makes from it.

    aloha_sim_transfer_cube:            # a robot dataset: a folder of HDF5 episodes
      kind: robot
      path: aloha_sim_transfer_cube     # relative paths start at the config's data.root
      cameras: [top]                    # optional: this dataset's camera for each model input
      splits: {val: [episode_000[01].hdf5]}  # optional: glob patterns over episode names; `train` is the rest
    libero_spatial:                     # a robot dataset in another storage format (episode_formats.py)
      kind: robot
      format: lerobot
      path: libero_spatial
    sharegpt4v_coco:                    # a vision-language dataset: LLaVA conversation JSON
      kind: vl
      annotation: LLaVA-OneVision-COCO/llava_jsons/sharegpt4v_coco.json
      images: LLaVA-OneVision-COCO/images
"""

import fnmatch
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from vlaflow.config import read_yaml
from vlaflow.data.episode_formats import DEFAULT_FORMAT, EPISODE_FORMATS
from vlaflow.data.episodes import Episode
from vlaflow.errors import VlaflowError

ROBOT, VL = "robot", "vl"
TRAIN_SPLIT = "train"
ALL = "all"
_ENTRY_KEYS = {ROBOT: {"kind", "format", "path", "cameras", "splits"}, VL: {"kind", "annotation", "images"}}
_REQUIRED_KEYS = {ROBOT: ("path",), VL: ("annotation",)}


@dataclass(frozen=True)
class RobotEntry:
    name: str
    path: Path
    cameras: tuple[str, ...] | None = None
    splits: dict[str, tuple[str, ...]] = field(default_factory=dict)
    format: str = DEFAULT_FORMAT
    options: dict = field(default_factory=dict)  # the format's own keys
    kind = ROBOT

    def all_episodes(self) -> list[Episode]:
        return EPISODE_FORMATS[self.format].episodes(self.path, self.options)

    def episodes(self, split: str = TRAIN_SPLIT) -> list[Episode]:
        """The episodes of a split, in the dataset's order; `train` is every episode no other split claims."""
        episodes = self.all_episodes()
        if split not in self.splits and split != TRAIN_SPLIT:
            known = ", ".join(sorted({TRAIN_SPLIT, *self.splits}))
            raise VlaflowError(f"dataset '{self.name}': unknown split '{split}' (splits: {known})")

        def in_split(episode: Episode, name: str) -> bool:
            return any(fnmatch.fnmatch(episode.name, pattern) for pattern in self.splits[name])

        if split in self.splits:
            chosen = [episode for episode in episodes if in_split(episode, split)]
        else:
            chosen = [episode for episode in episodes if not any(in_split(episode, other) for other in self.splits)]
        if not chosen:
            raise VlaflowError(f"{self.path}: dataset '{self.name}': split '{split}' holds no episode")
        return chosen


@dataclass(frozen=True)
class VLEntry:
    name: str
    annotation: Path
    images: Path
    kind = VL


Entry = RobotEntry | VLEntry


@dataclass(frozen=True)
class Selection:
    """A registry entry and the percentage of its samples a stage keeps (100 = all of them)."""

    entry: Entry
    percent: float = 100.0

    def indices(self, size: int, seed: int) -> np.ndarray:
        """Which of the entry's `size` samples to use: below 100 percent a seeded subset, above
        100 every sample repeated plus a seeded subset for the remainder. The same on every rank."""
        wanted = round(size * self.percent / 100)
        repeats, remainder = divmod(wanted, size) if size else (0, 0)
        rng = np.random.default_rng([seed, zlib.crc32(self.entry.name.encode())])
        subset = np.sort(rng.choice(size, remainder, replace=False)) if remainder else np.empty(0, dtype=np.int64)
        return np.concatenate([np.tile(np.arange(size), repeats), subset]).astype(np.int64)


class Registry:
    def __init__(self, entries: dict[str, Entry], source: Path):
        self.entries = entries
        self.source = source

    @classmethod
    def load(cls, path: Path, data_root: Path) -> "Registry":
        path, data_root = Path(path), Path(data_root)
        raw = read_yaml(path) or {}
        if not isinstance(raw, dict):
            raise VlaflowError(f"{path}: expected a mapping of dataset names")
        return cls({name: _parse_entry(path, name, fields, data_root) for name, fields in raw.items()}, path)

    def names(self, kind: str) -> list[str]:
        return sorted(name for name, entry in self.entries.items() if entry.kind == kind)

    def select(self, specs: list[str], kind: str, where: str) -> list[Selection]:
        """Resolve a stage's list (`name`, `name%NN`, `all`) to selections of one kind; `where`
        names the config key in messages."""
        selections = []
        for spec in specs:
            name, _, percent = spec.partition("%")
            if name == ALL:
                names = self.names(kind)
            elif name not in self.entries:
                known = ", ".join(self.names(kind)) or "none"
                raise VlaflowError(
                    f"{where}: unknown dataset '{name}' (known {kind} datasets in {self.source}: {known})"
                )
            elif self.entries[name].kind != kind:
                raise VlaflowError(f"{where}: '{name}' is a {self.entries[name].kind} dataset, not {kind}")
            else:
                names = [name]
            value = float(percent) if percent else 100.0
            if value <= 0:
                raise VlaflowError(f"{where}: '{spec}': the percentage must be positive")
            selections += [Selection(self.entries[n], value) for n in names]
        return selections


def _parse_entry(source: Path, name: str, fields: object, data_root: Path) -> Entry:
    where = f"{source}: {name}"
    if not isinstance(fields, dict):
        raise VlaflowError(f"{where}: expected a mapping with 'kind' and paths")
    kind = fields.get("kind")
    if kind not in _ENTRY_KEYS:
        raise VlaflowError(f"{where}.kind: must be '{ROBOT}' or '{VL}', got {kind!r}")
    allowed_keys = set(_ENTRY_KEYS[kind])
    episode_format = fields.get("format", DEFAULT_FORMAT) if kind == ROBOT else None
    if kind == ROBOT:
        if episode_format not in EPISODE_FORMATS:
            known = ", ".join(sorted(EPISODE_FORMATS))
            raise VlaflowError(f"{where}.format: unknown robot data format {episode_format!r} (formats: {known})")
        allowed_keys |= EPISODE_FORMATS[episode_format].option_keys
    unknown = set(fields) - allowed_keys
    if unknown:
        allowed = ", ".join(sorted(allowed_keys))
        described = f"a {kind} dataset" + (f" in format {episode_format}" if episode_format else "")
        raise VlaflowError(f"{where}.{min(unknown)}: unknown key for {described} (allowed: {allowed})")
    for key in _REQUIRED_KEYS[kind]:
        if not isinstance(fields.get(key), str):
            raise VlaflowError(f"{where}.{key}: missing (a path)")
    if kind == VL:
        annotation = data_root / fields["annotation"]
        images = data_root / fields["images"] if "images" in fields else annotation.parent
        return VLEntry(name, annotation, images)
    cameras = fields.get("cameras")
    if cameras is not None and not (isinstance(cameras, list) and all(isinstance(c, str) for c in cameras)):
        raise VlaflowError(f"{where}.cameras: expected a list of camera names")
    splits = fields.get("splits") or {}
    if not isinstance(splits, dict) or not all(
        isinstance(patterns, list) and all(isinstance(p, str) for p in patterns) for patterns in splits.values()
    ):
        raise VlaflowError(f"{where}.splits: expected a mapping of split name to a list of glob patterns")
    format_class = EPISODE_FORMATS[episode_format]
    options = {key: fields[key] for key in format_class.option_keys if key in fields}
    format_class.check_options(options, where)
    return RobotEntry(
        name,
        data_root / fields["path"],
        tuple(cameras) if cameras else None,
        {split: tuple(patterns) for split, patterns in splits.items()},
        episode_format,
        options,
    )
