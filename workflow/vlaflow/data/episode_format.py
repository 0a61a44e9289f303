"""The robot episode format of DexVLA and ACT: one HDF5 file per episode.

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
"""

import io
from pathlib import Path

import h5py
import numpy as np
from PIL import Image

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
