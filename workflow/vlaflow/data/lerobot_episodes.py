"""LeRobot's dataset format, v3.0 (registry `format: lerobot`): its side of the episode seam
(`episodes.py`).

    meta/info.json                         fps, features (dtype, shape), path templates
    meta/tasks.parquet                     task_index -> task string (the instruction)
    meta/episodes/chunk-*/file-*.parquet   per episode: length, data file, and per camera its
                                           video file and [from_timestamp, to_timestamp]
    data/chunk-*/file-*.parquet            per frame: action, observation.state, timestamp,
                                           frame_index, episode_index, index, task_index
    videos/<camera>/chunk-*/file-*.mp4     per camera, episodes one after another

Frame t of an episode is the camera's frame shown at `from_timestamp + timestamp[t]` in its video
file, as LeRobot's own reader takes it. The action of frame t is the one taken from observation t,
so an action chunk starts at t. Registry options name the features: `action` (default
`action`) and `state` (default `observation.state`); a camera `top` is the feature `top` or
`observation.images.top`.

Each process keeps its video decoders and the numeric columns of its data files open in
bounded caches, so a DataLoader worker seeks within open files instead of reopening them.
"""

import json
import os
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import av
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image

from vlaflow.data.episodes import Episode, EpisodeFormat, EpisodeInfo, EpisodeReader, EpisodeRows
from vlaflow.data.images import decode_frame
from vlaflow.data.samples import RobotSpec
from vlaflow.errors import VlaflowError

INFO_FILE = "meta/info.json"
TASKS_FILE = "meta/tasks.parquet"
EPISODES_FOLDER = "meta/episodes"
CAMERA_PREFIX = "observation.images."
DEFAULT_OPTIONS = {"action": "action", "state": "observation.state"}
FRAME_COLUMNS = ("timestamp", "episode_index", "task_index")
VIDEO_COLUMNS = ("chunk_index", "file_index", "from_timestamp", "to_timestamp")
# Open video files and data files per process; each decoder holds a few decoded frames.
MAX_OPEN_VIDEOS = 32
MAX_OPEN_DATA_FILES = 8


@dataclass(frozen=True)
class EpisodeMeta:
    """One row of meta/episodes."""

    index: int
    length: int
    data_file: Path
    videos: dict[str, tuple[Path, float, float]]  # camera feature -> (file, from_timestamp, to_timestamp)


@dataclass(frozen=True)
class LeRobotDatasetMeta:
    root: Path
    fps: float
    features: dict
    tasks: dict[int, str]
    episodes: tuple[EpisodeMeta, ...]
    options: dict = field(default_factory=dict)

    @property
    def info_file(self) -> Path:
        return self.root / INFO_FILE

    def feature_shape(self, key: str, what: str, expected: int) -> None:
        feature = self.features.get(key)
        if feature is None:
            known = ", ".join(sorted(self.features))
            raise VlaflowError(f"{self.info_file}: features.{key}: missing, the {what} (features: {known})")
        shape = list(feature.get("shape", []))
        if shape != [expected]:
            raise VlaflowError(f"{self.info_file}: features.{key}.shape: {shape}, the config says [{expected}]")

    def camera(self, name: str) -> str:
        """The video feature of a configured camera name."""
        for key in (name, CAMERA_PREFIX + name):
            if key in self.features:
                dtype = self.features[key].get("dtype")
                if dtype != "video":
                    raise VlaflowError(
                        f"{self.info_file}: features.{key}.dtype: {dtype!r}, only video cameras are read"
                    )
                return key
        cameras = ", ".join(key for key, value in self.features.items() if value.get("dtype") == "video") or "none"
        raise VlaflowError(f"{self.info_file}: features.{CAMERA_PREFIX}{name}: camera missing (dataset has: {cameras})")


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise VlaflowError(f"{path}: no such file (not a LeRobot dataset?)") from None
    except json.JSONDecodeError as error:
        raise VlaflowError(f"{path}: not valid JSON ({error.msg} at line {error.lineno})") from None


def _read_table(path: Path, columns: list[str] | None = None) -> dict[str, list]:
    return _parquet(path, columns).to_pydict()


def _parquet(path: Path, columns: list[str] | None = None) -> pa.Table:
    """The file's `columns` (all without them); a missing one is an error naming it."""
    try:
        present = pq.read_schema(path).names
        missing = [name for name in columns or () if name not in present]
        if missing:
            raise VlaflowError(f"{path}: {missing[0]}: column missing")
        return pq.read_table(path, columns=columns)
    except FileNotFoundError:
        raise VlaflowError(f"{path}: no such file") from None
    except (OSError, pa.ArrowException) as error:
        raise VlaflowError(f"{path}: not a readable parquet file ({str(error).splitlines()[0]})") from None


def load_dataset_meta(root: Path, options: dict) -> LeRobotDatasetMeta:
    root = Path(root)
    if not root.is_dir():
        raise VlaflowError(f"{root}: no such folder")
    info_file = root / INFO_FILE
    info = _read_json(info_file)
    version = str(info.get("codebase_version", ""))
    if not version.startswith("v3."):
        raise VlaflowError(
            f"{info_file}: codebase_version: {version or 'missing'}, vlaflow reads LeRobot's v3 format "
            "(convert older datasets with LeRobot's convert_dataset_v21_to_v30)"
        )
    cameras = [key for key, feature in info.get("features", {}).items() if feature.get("dtype") == "video"]
    for key in ("fps", "features", "data_path", *(["video_path"] if cameras else [])):
        if key not in info:
            raise VlaflowError(f"{info_file}: {key}: missing")
    tasks_table = _read_table(root / TASKS_FILE)
    # LeRobot writes the task strings as the pandas index of the table
    task_names = tasks_table.get("task") or tasks_table.get("__index_level_0__")
    for name, column in (("task", task_names), ("task_index", tasks_table.get("task_index"))):
        if column is None:
            raise VlaflowError(f"{root / TASKS_FILE}: {name}: column missing")
    tasks = dict(zip(tasks_table["task_index"], task_names))
    episode_files = sorted((root / EPISODES_FOLDER).glob("chunk-*/file-*.parquet"))
    if not episode_files:
        raise VlaflowError(f"{root / EPISODES_FOLDER}: no chunk-*/file-*.parquet episode metadata")
    columns = ["episode_index", "length", "data/chunk_index", "data/file_index"]
    columns += [f"videos/{camera}/{name}" for camera in cameras for name in VIDEO_COLUMNS]
    episodes = []
    for path in episode_files:
        table = _read_table(path, columns)  # not the statistics beside them
        for row in range(len(table["episode_index"])):

            def value(name: str):
                return table[name][row]

            data_file = root / info["data_path"].format(
                chunk_index=value("data/chunk_index"), file_index=value("data/file_index")
            )
            videos = {
                camera: (
                    root
                    / info["video_path"].format(
                        video_key=camera,
                        chunk_index=value(f"videos/{camera}/chunk_index"),
                        file_index=value(f"videos/{camera}/file_index"),
                    ),
                    float(value(f"videos/{camera}/from_timestamp")),
                    float(value(f"videos/{camera}/to_timestamp")),
                )
                for camera in cameras
            }
            episodes.append(EpisodeMeta(int(value("episode_index")), int(value("length")), data_file, videos))
    episodes.sort(key=lambda episode: episode.index)
    return LeRobotDatasetMeta(
        root, float(info["fps"]), info["features"], tasks, tuple(episodes), {**DEFAULT_OPTIONS, **options}
    )


class _ProcessCache:
    """Open things of this process, the least recently used closed past `limit`; a forked worker
    starts with none of its parent's."""

    def __init__(self, limit: int, opener, closer=None):
        self.limit, self.opener, self.closer = limit, opener, closer
        self.items: OrderedDict = OrderedDict()
        self.pid = os.getpid()

    def get(self, key):
        if self.pid != os.getpid():
            self.items, self.pid = OrderedDict(), os.getpid()
        if key in self.items:
            self.items.move_to_end(key)
            return self.items[key]
        if len(self.items) >= self.limit:
            evicted = self.items.popitem(last=False)[1]
            if self.closer:
                self.closer(evicted)
        item = self.items[key] = self.opener(key)
        return item


@dataclass
class _DataFile:
    """The numeric columns of a data file, and where each episode's rows start and end."""

    columns: dict[str, np.ndarray]
    starts: dict[int, tuple[int, int]]


def _numpy(column: pa.ChunkedArray, path: Path, name: str) -> np.ndarray:
    """A numeric column, a list column as (rows, width)."""
    array = column.combine_chunks()
    if not pa.types.is_list(array.type) and not pa.types.is_fixed_size_list(array.type):
        return array.to_numpy(zero_copy_only=False)
    widths = pc.unique(pc.list_value_length(array)).to_pylist()
    if len(widths) > 1:
        raise VlaflowError(f"{path}: {name}: rows of different lengths ({', '.join(map(str, sorted(widths)))})")
    flat = array.flatten().to_numpy(zero_copy_only=False)
    return flat.reshape(len(array), widths[0] if widths else 0)


def _read_data_file(key: tuple[Path, str, str]) -> _DataFile:
    path, action_key, state_key = key
    names = list(dict.fromkeys((*FRAME_COLUMNS, action_key, state_key)))
    table = _parquet(path, names)  # only these: a data file may also hold images
    columns = {name: _numpy(table[name], path, name) for name in names}
    for name in (action_key, state_key):
        columns[name] = columns[name].astype(np.float32)
    episode_index = columns["episode_index"].astype(np.int64)
    boundaries = np.flatnonzero(np.diff(episode_index)) + 1
    starts = {}
    for start, stop in zip(np.r_[0, boundaries], np.r_[boundaries, len(episode_index)]):
        starts[int(episode_index[start])] = (int(start), int(stop))
    return _DataFile(columns, starts)


_DATA_FILES = _ProcessCache(MAX_OPEN_DATA_FILES, _read_data_file)


class VideoDecoder:
    """One video file, decoded with PyAV at given timestamps. Reading forward continues from the
    last decoded frame; reading backwards or far ahead seeks to the keyframe before."""

    def __init__(self, path: Path):
        try:
            self.container = av.open(str(path))
        except FileNotFoundError:
            raise VlaflowError(f"{path}: no such file") from None
        except av.error.FFmpegError as error:
            raise VlaflowError(f"{path}: not a readable video ({error})") from None
        self.path = path
        self.stream = self.container.streams.video[0]
        # One decoding thread: a DataLoader worker is one process per core already, and dav1d's
        # own threads cost more than they give on a frame or two per request.
        self.stream.codec_context.thread_count = 1
        self.time_base = float(self.stream.time_base)
        rate = self.stream.average_rate or self.stream.guessed_rate
        self.frame_period = 1 / float(rate) if rate else 0.02
        self._frames = None
        self._last: tuple[float, av.VideoFrame] | None = None

    def _seek(self, seconds: float) -> None:
        self.container.seek(max(int(seconds / self.time_base), 0), stream=self.stream, backward=True)
        self._frames = self.container.decode(self.stream)
        self._last = None

    def frame_at(self, seconds: float) -> np.ndarray:
        """The frame shown at `seconds`, as (height, width, 3) uint8."""
        tolerance = self.frame_period / 2
        last = self._last
        if last is None or seconds < last[0] - tolerance or seconds > last[0] + 4 * self.frame_period:
            self._seek(seconds)
        elif abs(last[0] - seconds) <= tolerance:
            return last[1].to_ndarray(format="rgb24")
        for frame in self._frames:
            if frame.pts is None:
                continue
            self._last = (frame.pts * self.time_base, frame)
            if self._last[0] >= seconds - tolerance:
                break
        if self._last is None or abs(self._last[0] - seconds) > tolerance:
            if self._last is None:
                found = "the video has no frames there"
            elif self._last[0] < seconds:
                found = f"the last frame is at {self._last[0]:.3f} s"
            else:
                found = f"the nearest frame is at {self._last[0]:.3f} s"
            self._last = None
            raise VlaflowError(f"{self.path}: no frame at {seconds:.3f} s ({found})")
        return self._last[1].to_ndarray(format="rgb24")

    def close(self) -> None:
        self.container.close()


_VIDEOS = _ProcessCache(MAX_OPEN_VIDEOS, VideoDecoder, VideoDecoder.close)


class LeRobotReader(EpisodeReader):
    def __init__(self, episode: "LeRobotEpisode", spec: RobotSpec, rows: dict[str, np.ndarray]):
        self.episode = episode
        self.rows = rows
        self.cameras = [episode.meta.camera(camera) for camera in spec.cameras]

    def images(self, t: int, size: tuple[int, int] | None) -> list[Image.Image]:
        images = []
        for camera in self.cameras:
            path, start, _ = self.episode.info.videos[camera]
            try:
                frame = _VIDEOS.get(path).frame_at(start + float(self.rows["timestamp"][t]))
            except VlaflowError as error:
                raise VlaflowError(f"{error} ({camera}, episode {self.episode.info.index}, frame {t})") from None
            images.append(decode_frame(frame, size))
        return images

    def state(self, t: int) -> np.ndarray:
        return self.rows["state"][t]

    def actions(self, start: int, stop: int) -> np.ndarray:
        return self.rows["action"][start:stop]

    def instruction(self, t: int) -> str:
        return self.episode.meta.tasks.get(int(self.rows["task_index"][t]), "")

    def reasoning(self, t: int) -> str | None:
        return None


@dataclass(frozen=True)
class LeRobotEpisode(Episode):
    meta: LeRobotDatasetMeta
    info: EpisodeMeta

    @property
    def name(self) -> str:
        return f"episode_{self.info.index:06d}"

    @property
    def source(self) -> str:
        return f"{self.info.data_file}: episode {self.info.index}"

    def files(self) -> list[Path]:
        return [self.meta.info_file, self.info.data_file, *(video for video, _, _ in self.info.videos.values())]

    def _rows(self) -> dict[str, np.ndarray]:
        """This episode's frames from its data file, checked against meta/info.json and meta/episodes."""
        action_key, state_key = self.meta.options["action"], self.meta.options["state"]
        data = _DATA_FILES.get((self.info.data_file, action_key, state_key))
        if self.info.index not in data.starts:
            raise VlaflowError(f"{self.source}: episode_index: no frame of this episode in the file")
        start, stop = data.starts[self.info.index]
        if stop - start != self.info.length:
            raise VlaflowError(f"{self.source}: {stop - start} frames, meta/episodes says length {self.info.length}")
        rows = {name: data.columns[name][start:stop] for name in FRAME_COLUMNS}
        for name, key in (("action", action_key), ("state", state_key)):
            values = data.columns[key][start:stop]
            shape = list(self.meta.features.get(key, {}).get("shape", []))
            if values.ndim == 1 and shape == [1]:  # a one-value feature stored as a plain column
                values = values[:, None]
            if values.ndim != 2 or [values.shape[1]] != shape:
                raise VlaflowError(
                    f"{self.source}: {key}: {values.shape[1:] or 'one value'} per frame, {INFO_FILE} says {shape}"
                )
            rows[name] = values
        return rows

    def inspect(self, spec: RobotSpec) -> EpisodeInfo:
        self.meta.feature_shape(self.meta.options["action"], "action", spec.action_dim)
        self.meta.feature_shape(self.meta.options["state"], "state", spec.state_dim)
        cameras = [self.meta.camera(camera) for camera in spec.cameras]
        rows = self._rows()
        if self.info.length == 0:
            raise VlaflowError(f"{self.source}: no frames")
        image_shapes = {}
        for name, camera in zip(spec.cameras, cameras):
            path, start, end = self.info.videos[camera]
            if not path.is_file():
                raise VlaflowError(f"{path}: no such file ({camera} of episode {self.info.index})")
            times = start + rows["timestamp"].astype(np.float64)
            outside = np.flatnonzero((times < start - 1e-4) | (times > end + 1e-4))
            if len(outside):
                t = int(outside[0])
                raise VlaflowError(
                    f"{self.source}: timestamp: frame {t} at {rows['timestamp'][t]:.3f} s is outside the "
                    f"episode's {camera} video ({start:.3f} s to {end:.3f} s of {path.name})"
                )
            image_shapes[name] = tuple(self.meta.features[camera].get("shape", ())) or None
        task = int(rows["task_index"][0])
        if task not in self.meta.tasks:
            raise VlaflowError(f"{self.source}: task_index: {task} is not in {TASKS_FILE}")
        return EpisodeInfo(
            source=self.source,
            frames=self.info.length,
            sim=True,
            action_dim=spec.action_dim,
            state_dim=spec.state_dim,
            cameras=tuple(key for key, value in self.meta.features.items() if value.get("dtype") == "video"),
            image_shapes=image_shapes,
            compressed=True,
            instruction=self.meta.tasks[task],
            reasoning=None,
            has_substep_reasonings=False,
        )

    def rows(self) -> EpisodeRows:
        rows = self._rows()
        return EpisodeRows(rows["action"], rows["state"], self.meta.options["action"], self.meta.options["state"])

    def open(self, spec: RobotSpec) -> LeRobotReader:
        rows = self._rows()
        return LeRobotReader(self, spec, rows)

    def check_decode(self, spec: RobotSpec) -> dict[str, tuple[int, int]]:
        info = self.inspect(spec)
        reader = self.open(spec)
        sizes = {}
        for name, camera in zip(spec.cameras, reader.cameras):
            path, start, _ = self.info.videos[camera]
            expected = info.image_shapes[name]
            decoder = VideoDecoder(path)
            try:
                for t, timestamp in enumerate(reader.rows["timestamp"]):
                    frame = decoder.frame_at(start + float(timestamp))
                    if expected and frame.shape != expected:
                        raise VlaflowError(
                            f"{path}: {camera}: frame {t} of episode {self.info.index} is "
                            f"{frame.shape[0]}x{frame.shape[1]}, {INFO_FILE} says {expected[0]}x{expected[1]}"
                        )
                    sizes[name] = frame.shape[:2]
            finally:
                decoder.close()
        return sizes


class LeRobotFormat(EpisodeFormat):
    name = "lerobot"
    option_keys = frozenset(DEFAULT_OPTIONS)

    @classmethod
    def check_options(cls, options: dict, where: str) -> None:
        for key, value in options.items():
            if not isinstance(value, str):
                raise VlaflowError(f"{where}.{key}: expected the name of a LeRobot feature")

    @classmethod
    def episodes(cls, root: Path, options: dict) -> list[Episode]:
        meta = load_dataset_meta(root, options)
        if not meta.episodes:
            raise VlaflowError(f"{root / EPISODES_FOLDER}: no episodes")
        return [LeRobotEpisode(meta, info) for info in meta.episodes]
