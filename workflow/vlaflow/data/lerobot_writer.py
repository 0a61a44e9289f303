"""`vlaflow data convert`: robot episodes (any format behind the seam, HDF5 in practice) written as a
LeRobot v3.0 dataset, in the layout LeRobot 0.4's own writer produces (`lerobot_episodes.py` lists
it; `tests/fixtures/lerobot/` holds a dataset LeRobot wrote).

Each camera becomes an AV1 video as LeRobot encodes it (libsvtav1, yuv420p, CRF 30, a keyframe
every 2 frames, so a random frame costs at most two decodes), episodes one after another; the
state is `observation.state`, the instruction the episode's task. LeRobot pairs the action of
frame t with observation t: episodes recorded on a real robot (actions lagging the state by one
step, `sim` false) are shifted by that step, so that the chunks read back are the same as the
HDF5 episode's. Per-step reasoning has no LeRobot feature and is not written.
"""

import json
import os
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from vlaflow.data.episodes import Episode
from vlaflow.data.lerobot_episodes import CAMERA_PREFIX, EPISODES_FOLDER, INFO_FILE, TASKS_FILE
from vlaflow.data.samples import RobotSpec
from vlaflow.errors import VlaflowError
from vlaflow.fs import atomic_directory

CODEBASE_VERSION = "v3.0"
CHUNKS_SIZE = 1000  # files per chunk folder
DATA_PATH = "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
VIDEO_PATH = "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4"
VIDEO_CODEC, VIDEO_OPTIONS = "libsvtav1", {"crf": "30", "g": "2", "preset": "12"}
QUANTILES = (0.01, 0.10, 0.50, 0.90, 0.99)
IMAGE_STATS_FRAMES = 100  # frames per episode sampled for image statistics, as LeRobot samples
IMAGE_STATS_SIDE = 150  # pixels kept along the longest side, about, as LeRobot keeps
INDEX_FEATURES = ("frame_index", "episode_index", "index", "task_index")


def _file_path(template: str, number: int, **keys) -> str:
    return template.format(chunk_index=number // CHUNKS_SIZE, file_index=number % CHUNKS_SIZE, **keys)


def _stats(values: np.ndarray, axis) -> dict[str, np.ndarray]:
    """LeRobot's statistics of one feature over one episode: min, max, mean, std, count and quantiles."""
    stats = {"min": values.min(axis=axis), "max": values.max(axis=axis)}  # integers stay integers, as in LeRobot's
    values = values.astype(np.float64)
    stats |= {"mean": values.mean(axis=axis), "std": values.std(axis=axis), "count": np.array([len(values)])}
    quantiles = np.quantile(values, QUANTILES, axis=axis)
    stats |= {f"q{round(quantile * 100):02d}": value for quantile, value in zip(QUANTILES, quantiles)}
    return stats


def _image_stats(frames: np.ndarray) -> dict[str, np.ndarray]:
    """Per channel, in [0, 1], over up to IMAGE_STATS_FRAMES frames thinned as LeRobot thins them
    (every k-th pixel, k = longest side // 150 from 300 pixels up): a full-size 480x640 episode
    would otherwise take most of a conversion's time."""
    chosen = frames[np.linspace(0, len(frames) - 1, min(len(frames), IMAGE_STATS_FRAMES)).round().astype(int)]
    longest = max(frames.shape[1:3])
    step = longest // IMAGE_STATS_SIDE if longest >= 2 * IMAGE_STATS_SIDE else 1
    pixels = chosen[:, ::step, ::step].reshape(-1, 3) / 255.0
    stats = {key: value.reshape(3, 1, 1) if value.size == 3 else value for key, value in _stats(pixels, 0).items()}
    stats["count"] = np.array([len(frames)])
    return stats


def _aggregate(per_episode: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Episode statistics pooled as LeRobot pools them: exact min, max, mean and std, quantiles
    averaged weighted by frames."""
    counts = np.array([stats["count"][0] for stats in per_episode], dtype=np.float64)
    weights = counts.reshape(-1, *([1] * per_episode[0]["mean"].ndim)) / counts.sum()
    means = np.stack([stats["mean"] for stats in per_episode])
    mean = (weights * means).sum(axis=0)
    variances = np.stack([stats["std"] ** 2 for stats in per_episode]) + (means - mean) ** 2
    pooled = {
        "min": np.min([stats["min"] for stats in per_episode], axis=0),
        "max": np.max([stats["max"] for stats in per_episode], axis=0),
        "mean": mean,
        "std": np.sqrt((weights * variances).sum(axis=0)),
        "count": np.array([int(counts.sum())]),
    }
    for key in per_episode[0]:
        if key.startswith("q"):
            pooled[key] = (weights * np.stack([stats[key] for stats in per_episode])).sum(axis=0)
    return pooled


def _json_ready(stats: dict[str, np.ndarray]) -> dict[str, list]:
    return {key: np.asarray(value).tolist() for key, value in stats.items()}


def _encode_episode(frames: np.ndarray, path: Path, fps: int) -> None:
    """One episode's frames as an mp4 of its own, as LeRobot encodes it before appending it."""
    os.environ.setdefault("SVT_LOG", "1")  # SVT-AV1 prints its settings for every file otherwise
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(VIDEO_CODEC, rate=fps, options=VIDEO_OPTIONS)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        for number, frame in enumerate(frames):
            video_frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
            video_frame.pts, video_frame.time_base = number, Fraction(1, fps)
            container.mux(stream.encode(video_frame))
        container.mux(stream.encode())


class _VideoFile:
    """A camera's current mp4 file: episodes, each encoded on its own (so each starts on a
    keyframe and its size is known), are appended one after another without re-encoding."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path, self.seconds, self.bytes = path, 0.0, 0
        # faststart: the index at the front, so that a reader's first seek needs no second read
        self.container, self.stream = av.open(str(path), mode="w", options={"movflags": "faststart"}), None

    def append(self, episode_file: Path) -> tuple[float, float]:
        start = self.seconds
        with av.open(str(episode_file)) as source:
            source_stream = source.streams.video[0]
            if self.stream is None:
                self.stream = self.container.add_stream_from_template(source_stream, opaque=True)
                self.stream.time_base = source_stream.time_base
            offset = round(start / float(source_stream.time_base))
            end = start
            for packet in source.demux(source_stream):
                if packet.dts is None:  # the demuxer's final empty packet
                    continue
                packet.pts += offset
                packet.dts += offset
                end = max(end, float((packet.pts + packet.duration) * source_stream.time_base))
                packet.stream = self.stream
                self.bytes += packet.size
                self.container.mux(packet)
        self.seconds = end
        return start, end

    def close(self) -> None:
        self.container.close()


def convert_to_lerobot(
    episodes: list[Episode],
    out: Path,
    *,
    fps: int,
    robot_type: str | None = None,
    data_file_mb: float = 100,
    video_file_mb: float = 200,
) -> Path:
    """Write the episodes as a LeRobot v3.0 dataset in `out` (a new folder, complete or absent)."""
    if not episodes:
        raise VlaflowError("no episodes to convert")
    first = episodes[0].rows()
    probe = episodes[0].inspect(RobotSpec((), (1, 1), first.actions.shape[1], first.states.shape[1], 1))
    spec = RobotSpec(probe.cameras, (1, 1), probe.action_dim, probe.state_dim, 1)
    with atomic_directory(Path(out)) as tmp:
        _write(episodes, spec, tmp, fps, robot_type, data_file_mb, video_file_mb)
    return Path(out)


def _write(episodes, spec, root: Path, fps, robot_type, data_file_mb, video_file_mb) -> None:
    cameras = {camera: CAMERA_PREFIX + camera for camera in spec.cameras}
    tasks: dict[str, int] = {}
    rows: list[dict] = []  # the current data file's frames
    data_number, data_bytes = 0, 0
    videos: dict[str, _VideoFile] = {}
    video_numbers = dict.fromkeys(cameras.values(), 0)
    episode_rows, camera_shapes, index = [], {}, 0

    def flush_data() -> None:
        path = root / _file_path(DATA_PATH, data_number)
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(_data_table(rows, spec), path)

    for episode_index, episode in enumerate(episodes):
        info = episode.inspect(spec)
        source = episode.rows()
        reader = episode.open(spec)
        try:
            steps = [reader.images(t, None) for t in range(info.frames)]  # every camera's frame, decoded once
            frames = {
                camera: np.stack([np.asarray(step[i]) for step in steps]) for i, camera in enumerate(cameras.values())
            }
            instructions = [reader.instruction(t) for t in range(info.frames)]
        finally:
            reader.close()
        actions = source.actions if info.sim else source.actions[np.maximum(np.arange(info.frames) - 1, 0)]
        task_indices = [tasks.setdefault(text, len(tasks)) for text in instructions]
        if rows and data_bytes >= data_file_mb * 2**20:
            flush_data()
            rows, data_number, data_bytes = [], data_number + 1, 0
        record = {
            "episode_index": episode_index,
            "tasks": list(dict.fromkeys(instructions)),
            "length": info.frames,
            "data/chunk_index": data_number // CHUNKS_SIZE,
            "data/file_index": data_number % CHUNKS_SIZE,
            "dataset_from_index": index,
            "dataset_to_index": index + info.frames,
        }
        timestamps = (np.arange(info.frames) / fps).astype(np.float32)
        for t in range(info.frames):
            rows.append(
                {
                    "action": actions[t].astype(np.float32),
                    "observation.state": source.states[t].astype(np.float32),
                    "timestamp": timestamps[t],
                    "frame_index": t,
                    "episode_index": episode_index,
                    "index": index + t,
                    "task_index": task_indices[t],
                }
            )
        data_bytes += actions.nbytes + source.states.nbytes + 40 * info.frames
        for key, camera_frames in frames.items():
            shape = camera_frames.shape[1:]
            if camera_shapes.setdefault(key, shape) != shape:
                raise VlaflowError(
                    f"{episode.source}: {key}: frames of {shape}, earlier episodes' are {camera_shapes[key]}"
                )
            episode_file = root / f"{key}.episode.mp4"
            _encode_episode(camera_frames, episode_file, fps)
            writer = videos.get(key)
            if writer is not None and writer.bytes + episode_file.stat().st_size >= video_file_mb * 2**20:
                writer.close()
                video_numbers[key] += 1
                writer = None
            if writer is None:
                writer = videos[key] = _VideoFile(root / _file_path(VIDEO_PATH, video_numbers[key], video_key=key))
            start, end = writer.append(episode_file)
            episode_file.unlink()
            number = video_numbers[key]
            record |= {
                f"videos/{key}/chunk_index": number // CHUNKS_SIZE,
                f"videos/{key}/file_index": number % CHUNKS_SIZE,
                f"videos/{key}/from_timestamp": start,
                f"videos/{key}/to_timestamp": end,
            }
        values = {
            "action": actions,
            "observation.state": source.states,
            "timestamp": timestamps[:, None],
            "frame_index": np.arange(info.frames)[:, None],
            "episode_index": np.full((info.frames, 1), episode_index),
            "index": np.arange(index, index + info.frames)[:, None],
            "task_index": np.array(task_indices)[:, None],
        }
        stats = {key: _stats(value, 0) for key, value in values.items()}
        stats |= {key: _image_stats(camera_frames) for key, camera_frames in frames.items()}
        record |= {f"stats/{key}/{name}": value for key, feature in stats.items() for name, value in feature.items()}
        record |= {"meta/episodes/chunk_index": 0, "meta/episodes/file_index": 0}
        episode_rows.append((record, stats))
        index += info.frames
    flush_data()
    for writer in videos.values():
        writer.close()

    _write_episodes(root, [record for record, _ in episode_rows])
    tasks_path = root / TASKS_FILE
    pd.DataFrame({"task_index": list(tasks.values())}, index=list(tasks)).to_parquet(tasks_path)
    keys = episode_rows[0][1].keys()
    pooled = {key: _json_ready(_aggregate([stats[key] for _, stats in episode_rows])) for key in keys}
    (root / "meta/stats.json").write_text(json.dumps(pooled, indent=4))
    features = _features(spec, camera_shapes, cameras, fps)
    info = {
        "codebase_version": CODEBASE_VERSION,
        "robot_type": robot_type,
        "total_episodes": len(episodes),
        "total_frames": index,
        "total_tasks": len(tasks),
        "chunks_size": CHUNKS_SIZE,
        "data_files_size_in_mb": data_file_mb,
        "video_files_size_in_mb": video_file_mb,
        "fps": fps,
        "splits": {"train": f"0:{len(episodes)}"},
        "data_path": DATA_PATH,
        "video_path": VIDEO_PATH,
        "features": features,
    }
    (root / INFO_FILE).write_text(json.dumps(info, indent=4))


def _features(spec: RobotSpec, camera_shapes: dict, cameras: dict, fps: int) -> dict:
    features = {
        "action": {"dtype": "float32", "shape": [spec.action_dim], "names": None},
        "observation.state": {"dtype": "float32", "shape": [spec.state_dim], "names": None},
    }
    for key in cameras.values():
        height, width, channels = camera_shapes[key]
        features[key] = {
            "dtype": "video",
            "shape": [height, width, channels],
            "names": ["height", "width", "channel"],
            "info": {
                "video.height": height,
                "video.width": width,
                "video.codec": "av1",
                "video.pix_fmt": "yuv420p",
                "video.is_depth_map": False,
                "video.fps": fps,
                "video.channels": channels,
                "has_audio": False,
            },
        }
    features["timestamp"] = {"dtype": "float32", "shape": [1], "names": None}
    for key in INDEX_FEATURES:
        features[key] = {"dtype": "int64", "shape": [1], "names": None}
    return features


def _data_table(rows: list[dict], spec: RobotSpec) -> pa.Table:
    vectors = {"action": spec.action_dim, "observation.state": spec.state_dim}
    columns, fields = {}, []
    for key, dim in vectors.items():
        flat = pa.array(np.concatenate([row[key] for row in rows]), pa.float32())
        columns[key] = pa.FixedSizeListArray.from_arrays(flat, dim)
        fields.append(pa.field(key, pa.list_(pa.float32(), dim)))
    columns["timestamp"] = pa.array([row["timestamp"] for row in rows], pa.float32())
    fields.append(pa.field("timestamp", pa.float32()))
    for key in INDEX_FEATURES:
        columns[key] = pa.array([row[key] for row in rows], pa.int64())
        fields.append(pa.field(key, pa.int64()))
    # What Hugging Face `datasets` records of a LeRobot data file, so that it reads these columns
    # with the same types.
    value = {"dtype": "float32", "_type": "Value"}
    hf_features = {key: {"feature": value, "length": dim, "_type": "List"} for key, dim in vectors.items()}
    hf_features["timestamp"] = value
    hf_features |= {key: {"dtype": "int64", "_type": "Value"} for key in INDEX_FEATURES}
    metadata = {"huggingface": json.dumps({"info": {"features": hf_features}})}
    return pa.table(list(columns.values()), schema=pa.schema(fields, metadata=metadata))


def _write_episodes(root: Path, records: list[dict]) -> None:
    path = root / EPISODES_FOLDER / "chunk-000/file-000.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = {}
    for key in records[0]:
        values = [record[key] for record in records]
        if isinstance(values[0], np.ndarray):
            integer = values[0].dtype.kind in "iu"
            columns[key] = pa.array([value.tolist() for value in values])
            if integer:
                columns[key] = columns[key].cast(pa.list_(pa.int64()))
        else:
            columns[key] = pa.array(values)
    pq.write_table(pa.table(columns), path)
