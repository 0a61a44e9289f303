"""The robot episode format of DexVLA and ACT, one HDF5 file per episode (registry `format: hdf5`,
the default): its layout, its writer, and its side of the episode seam (`episodes.py`).

| key                              | shape        |                                                  |
|----------------------------------|--------------|--------------------------------------------------|
| `/action`                        | (T, A) float | actions; aligned at t (sim) or t-1 (real data)   |
| `/observations/qpos`             | (T, S) float | robot state; its length is the episode length    |
| `/observations/qvel`             | (T, S) float | optional                                         |
| `/observations/images/<camera>`  | (T, H, W, 3) | uint8, or JPEG bytes when attribute `compress`   |
| `/language_raw`                  | (1,) bytes   | the instruction                                  |
| `/substep_reasonings`            | (T,) bytes   | per-step reasoning, preferred when present       |
| `/reasoning`                     | (1,) bytes   | episode-level reasoning, the fallback            |
| attribute `sim`                  | bool         |                                                  |

JPEG-compressed cameras follow ACT's layout: each frame's bytes zero-padded to the longest frame,
a (T, L) uint8 array, with the true lengths in `/compress_len` (one row per camera). Readers also
accept variable-length byte strings.

A dataset is a folder searched recursively for `*.hdf5` / `*.h5`; an episode's name (what split
patterns match) is its path relative to the folder.
"""

import io
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
from PIL import Image

from vlaflow.data.episodes import Episode, EpisodeFormat, EpisodeInfo, EpisodeReader, EpisodeRows
from vlaflow.data.images import decode_frame
from vlaflow.data.samples import RobotSpec
from vlaflow.errors import VlaflowError
from vlaflow.fs import atomic_file

ACTION = "action"
QPOS = "observations/qpos"
QVEL = "observations/qvel"
IMAGES = "observations/images"
LANGUAGE = "language_raw"
SUBSTEP_REASONINGS = "substep_reasonings"
REASONING = "reasoning"
COMPRESS_LEN = "compress_len"
SIM_ATTRIBUTE = "sim"
COMPRESS_ATTRIBUTE = "compress"
EPISODE_SUFFIXES = (".hdf5", ".h5")


def encode_jpeg(frame: np.ndarray, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(frame).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def write_episode(
    path: Path,
    *,
    actions: np.ndarray,
    qpos: np.ndarray,
    images: dict[str, np.ndarray],
    language: str,
    sim: bool,
    qvel: np.ndarray | None = None,
    substep_reasonings: list[str] | None = None,
    reasoning: str | None = None,
    compress: bool = False,
    jpeg_quality: int = 90,
) -> Path:
    """Write one episode; `images` maps a camera name to its (T, H, W, 3) uint8 frames. The file
    appears under `path` only once it is complete."""
    length = len(qpos)
    if len(actions) != length or any(len(frames) != length for frames in images.values()):
        raise ValueError("actions, qpos and every camera need one entry per time step")
    with atomic_file(Path(path)) as tmp, h5py.File(tmp, "w") as file:
        file.attrs[SIM_ATTRIBUTE] = bool(sim)
        file.attrs[COMPRESS_ATTRIBUTE] = bool(compress)
        file.create_dataset(ACTION, data=np.asarray(actions, dtype=np.float32))
        file.create_dataset(QPOS, data=np.asarray(qpos, dtype=np.float32))
        if qvel is not None:
            file.create_dataset(QVEL, data=np.asarray(qvel, dtype=np.float32))
        file.create_dataset(LANGUAGE, data=[language.encode()])
        if substep_reasonings is not None:
            if len(substep_reasonings) != length:
                raise ValueError("substep_reasonings needs one entry per time step")
            file.create_dataset(SUBSTEP_REASONINGS, data=[text.encode() for text in substep_reasonings])
        if reasoning is not None:
            file.create_dataset(REASONING, data=[reasoning.encode()])
        lengths = []
        for camera, frames in images.items():
            if not compress:
                file.create_dataset(
                    f"{IMAGES}/{camera}", data=np.asarray(frames, dtype=np.uint8), chunks=(1, *frames.shape[1:])
                )
                continue
            encoded = [encode_jpeg(frame, jpeg_quality) for frame in frames]
            padded = np.zeros((length, max(map(len, encoded))), dtype=np.uint8)
            for row, data in enumerate(encoded):
                padded[row, : len(data)] = np.frombuffer(data, dtype=np.uint8)
            file.create_dataset(f"{IMAGES}/{camera}", data=padded, chunks=(1, padded.shape[1]))
            lengths.append([len(data) for data in encoded])
        if compress:
            file.create_dataset(COMPRESS_LEN, data=np.asarray(lengths, dtype=np.int64))
    return Path(path)


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


def _decoded_frame(frames: h5py.Dataset, t: int, path: Path, size: tuple[int, int] | None = None) -> Image.Image:
    try:
        return decode_frame(frames[t], size)
    except (OSError, ValueError) as error:
        raise VlaflowError(f"{path}: {frames.name}: frame {t} does not decode ({error})") from None


class Hdf5Reader(EpisodeReader):
    def __init__(self, path: Path, spec: RobotSpec):
        self.path = path
        self.file = _open_file(path)
        self._actions = self.file[ACTION]
        self._qpos = self.file[QPOS]
        self._cameras = [self.file[f"{IMAGES}/{camera}"] for camera in spec.cameras]
        self._substep_reasonings = self.file.get(SUBSTEP_REASONINGS)
        self._instruction = _text(self.file[LANGUAGE][0])

    def images(self, t: int, size: tuple[int, int] | None) -> list[Image.Image]:
        return [_decoded_frame(camera, t, self.path, size) for camera in self._cameras]

    def state(self, t: int) -> np.ndarray:
        return self._qpos[t]

    def actions(self, start: int, stop: int) -> np.ndarray:
        return self._actions[start:stop]

    def instruction(self, t: int) -> str:
        return self._instruction

    def reasoning(self, t: int) -> str | None:
        return None if self._substep_reasonings is None else _text(self._substep_reasonings[t])

    def close(self) -> None:
        self.file.close()


@dataclass(frozen=True)
class Hdf5Episode(Episode):
    path: Path
    name: str

    @property
    def source(self) -> str:
        return str(self.path)

    def files(self) -> list[Path]:
        return [self.path]

    def inspect(self, spec: RobotSpec) -> EpisodeInfo:
        path = self.path
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
            episode_reasoning = (
                _utf8(reasoning[0], path, REASONING) if reasoning is not None and reasoning.size else None
            )
            return EpisodeInfo(
                source=self.source,
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

    def rows(self) -> EpisodeRows:
        with _open_file(self.path) as file:
            actions = _dataset(file, self.path, ACTION)[()]
            states = _dataset(file, self.path, QPOS)[()]
        return EpisodeRows(actions, states, f"/{ACTION}", f"/{QPOS}")

    def open(self, spec: RobotSpec) -> Hdf5Reader:
        return Hdf5Reader(self.path, spec)

    def check_decode(self, spec: RobotSpec) -> dict[str, tuple[int, int]]:
        self.inspect(spec)
        sizes = {}
        with _open_file(self.path) as file:
            for camera in spec.cameras:
                frames = file[f"{IMAGES}/{camera}"]
                for t in range(len(frames)):
                    width, height = _decoded_frame(frames, t, self.path).size
                    first = sizes.setdefault(camera, (height, width))
                    if first != (height, width):
                        raise VlaflowError(
                            f"{self.path}: /{IMAGES}/{camera}: frame {t} is {height}x{width}, "
                            f"frame 0 is {first[0]}x{first[1]}"
                        )
        return sizes


def hdf5_episodes(paths: list[Path], root: Path | None = None) -> list[Hdf5Episode]:
    """Episodes of the given files; their names are relative to `root` where given."""
    return [
        Hdf5Episode(Path(path), Path(path).relative_to(root).as_posix() if root else Path(path).name) for path in paths
    ]


class Hdf5Format(EpisodeFormat):
    name = "hdf5"

    @classmethod
    def episodes(cls, root: Path, options: dict) -> list[Episode]:
        return hdf5_episodes(list_episode_files(root), root)
