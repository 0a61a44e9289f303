"""vlaflow's LeRobot v3 reader against LeRobot's own `LeRobotDataset`, on a dataset vlaflow wrote.

One run builds each case's dataset (HDF5 episodes converted by `convert_to_lerobot`), then:

1. Interop: LeRobot reads every frame of it, and its action, state, timestamp, indices and task
   must equal the HDF5 source's exactly; its decoded camera frames are compared with vlaflow's
   reader's (expected identical: the same AV1 stream through the same FFmpeg conversion) and with
   the source frames (the encoding's loss).
2. Loader speed: samples per second of vlaflow's `RobotEpisodeDataset` and of `LeRobotDataset`
   over the same dataset, same random order, same DataLoader setup (batches of 8, fork workers),
   median of a few timed runs whose first batch (worker start-up) is not timed. Both load what a
   policy with action chunks trains on: one frame per camera, the state, and the next
   `chunk` actions (LeRobot's through `delta_timestamps`), padded past the episode's end and flagged.
   vlaflow also normalises and returns PIL images; LeRobot returns float tensors, normalised later
   by the policy. The images are either full size (both decode, neither resizes) or resized to
   vlaflow's default 64x80 (PIL's bilinear for vlaflow, torchvision's antialiased Resize for LeRobot).
   LeRobot's default video backend is torchcodec; where it does not load, LeRobot's PyAV backend
   (`video_backend="pyav"`) is measured, and torchcodec gets its own column where it does load.

LeRobot pins torch < 2.11 and huggingface-hub < 0.36, vlaflow needs huggingface-hub >= 1, so this
runs in a separate environment with LeRobot and h5py installed and vlaflow's sources on the path
(vlaflow's data modules need only numpy, torch, Pillow, h5py, PyAV, pyarrow and pandas):

    python -m venv /tmp/lerobot-env && /tmp/lerobot-env/bin/pip install lerobot==0.4.4 h5py
    PYTHONPATH=workflow:. /tmp/lerobot-env/bin/python tests/benchmarks/lerobot_loader.py
    PYTHONPATH=workflow:. /tmp/lerobot-env/bin/python tests/benchmarks/lerobot_loader.py \
        --cases A --episodes 4 --steps 200 --seconds 4 --rounds 5

With a torchcodec that matches the environment's torch and finds FFmpeg's libraries, e.g.

    PYTHONPATH=/tmp/torchcodec-0.9:workflow:. \
    LD_LIBRARY_PATH=/tmp/ffmpeg7-shim:/tmp/lerobot-env/lib/python3.11/site-packages/av.libs \
    /tmp/lerobot-env/bin/python tests/benchmarks/lerobot_loader.py
"""

import argparse
import os
import statistics
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the dataset is local; LeRobot must not ask the Hub about it

import datasets
import h5py
import numpy as np
import torch
from lerobot.datasets.lerobot_dataset import LeRobotDataset
from lerobot.datasets.video_utils import _default_decoder_cache
from torchvision.transforms import v2

from vlaflow.data.hdf5_episodes import ACTION, LANGUAGE, QPOS, Hdf5Format, write_episode
from vlaflow.data.lerobot_episodes import CAMERA_PREFIX, LeRobotFormat
from vlaflow.data.lerobot_writer import convert_to_lerobot
from vlaflow.data.robot_dataset import RobotEpisodeDataset
from vlaflow.data.samples import RobotSpec
from vlaflow.data.stats import compute_stats

# LeRobot's PyAV backend goes through torchvision's video reader, which warns on every call.
warnings.filterwarnings("ignore", message="The video decoding and encoding capabilities of torchvision")

ACTION_DIM = STATE_DIM = 14
FPS = 50
REPO_ID = "vlaflow/lerobot_loader_benchmark"  # LeRobot wants one; with `root` given it stays local
DEFAULT_RESIZE = (64, 80)  # config/config.yaml's data.image_size


@dataclass(frozen=True)
class Case:
    description: str
    cameras: tuple[str, ...]
    frame_size: tuple[int, int]  # (height, width)
    compress: bool  # the HDF5 source's frames as JPEG (only to keep large cases small on disk)
    episodes: int
    steps: int  # per episode


# Case B is small because converting it is slow: vlaflow's writer takes its image statistics over
# every pixel of 100 frames per episode and camera (about 15 s per 480x640 camera and episode here).
CASES = {
    "A": Case("1 camera, 96x128", ("top",), (96, 128), compress=False, episodes=8, steps=100),
    "B": Case("3 cameras, 480x640", ("top", "left_wrist", "right_wrist"), (480, 640), True, episodes=2, steps=50),
}


def scene_frames(steps: int, size: tuple[int, int], seed: int) -> np.ndarray:
    """Moving gradients as in tests/data_factory.py's smooth_frames, plus sensor noise and a moving
    square, so that the video costs what a camera's does to decode instead of next to nothing.
    (tests/data_factory.py itself imports tests/conftest.py and with it vlaflow's model stack, which
    LeRobot's environment cannot hold.)"""
    rng = np.random.default_rng(seed)
    height, width = size
    rows, cols = np.mgrid[0:height, 0:width]
    side = max(height // 6, 2)
    frames = np.empty((steps, height, width, 3), dtype=np.uint8)
    for t in range(steps):
        frame = np.stack(
            [rows * 200 // height + t % 50, cols * 200 // width + seed % 50, (rows + cols + 3 * t) % 200], axis=-1
        )
        frame = frame + rng.integers(-6, 7, frame.shape)
        top, left = (t * 3) % (height - side), (t * 5) % (width - side)
        frame[top : top + side, left : left + side] = (200, 30, 30)
        frames[t] = np.clip(frame, 0, 255)
    return frames


def write_source_episodes(folder: Path, case: Case, episodes: int, steps: int) -> list[Path]:
    """HDF5 episodes; the first action column is the time step (so a chunk shows where it starts),
    and the episodes alternate between two instructions (so the task index varies)."""
    paths = []
    for episode in range(episodes):
        rng = np.random.default_rng(episode)
        actions = rng.normal(size=(steps, ACTION_DIM)).astype(np.float32)
        actions[:, 0] = np.arange(steps)
        paths.append(
            write_episode(
                folder / f"episode_{episode:04d}.hdf5",
                actions=actions,
                qpos=rng.normal(2.0, 3.0, size=(steps, STATE_DIM)).astype(np.float32),
                images={
                    camera: scene_frames(steps, case.frame_size, 10 * episode + number)
                    for number, camera in enumerate(case.cameras)
                },
                language=f"pick up cube {episode % 2} and hand it over",
                sim=True,
                compress=case.compress,
            )
        )
    return paths


def as_uint8_frame(image: torch.Tensor) -> np.ndarray:
    """LeRobot's float (3, H, W) image in [0, 1] as the (H, W, 3) uint8 frame it was decoded from."""
    return (image * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()


def check_interop(lerobot_root: Path, source_paths: list[Path], case: Case, backend: str) -> str:
    """Assert that LeRobot reads back, frame by frame, what vlaflow wrote; returns the verdict line."""
    dataset = LeRobotDataset(REPO_ID, root=lerobot_root, video_backend=backend)
    spec = RobotSpec(case.cameras, case.frame_size, ACTION_DIM, STATE_DIM, 1)
    written = [episode.open(spec) for episode in LeRobotFormat.episodes(lerobot_root, {})]
    sources = [episode.open(spec) for episode in Hdf5Format.episodes(source_paths[0].parent, {})]
    max_vs_reader, max_vs_source, source_diff_sum, pixels = 0, 0, 0.0, 0
    index = 0
    for episode_index, (path, ours, source) in enumerate(zip(source_paths, written, sources, strict=True)):
        with h5py.File(path, "r") as file:
            actions, states, instruction = file[ACTION][()], file[QPOS][()], file[LANGUAGE][0].decode()
        for t in range(len(states)):
            item = dataset[index]
            where = f"{path.name} frame {t} (LeRobot index {index})"
            np.testing.assert_array_equal(item["action"].numpy(), actions[t], err_msg=where)
            np.testing.assert_array_equal(item["observation.state"].numpy(), states[t], err_msg=where)
            # vlaflow's writer and LeRobot's both store frame_index / fps as float32
            assert item["timestamp"].item() == np.float32(t / FPS), where
            indices = tuple(item[key].item() for key in ("episode_index", "frame_index", "index"))
            assert indices == (episode_index, t, index), where
            assert item["task"] == instruction, where
            for camera, our_image, source_image in zip(
                case.cameras, ours.images(t, None), source.images(t, None), strict=True
            ):
                theirs = as_uint8_frame(item[CAMERA_PREFIX + camera]).astype(np.int16)
                max_vs_reader = max(max_vs_reader, int(np.abs(theirs - np.asarray(our_image)).max()))
                source_diff = np.abs(theirs - np.asarray(source_image))
                max_vs_source = max(max_vs_source, int(source_diff.max()))
                source_diff_sum += float(source_diff.sum())
                pixels += source_diff.size
            index += 1
    for reader in written + sources:
        reader.close()
    assert index == len(dataset), f"LeRobot has {len(dataset)} frames, the source {index}"
    # A decoder may round its YUV to RGB conversion differently by a level; more is a different picture.
    verdict = "OK" if max_vs_reader <= 1 else "DIFFERENT FRAMES"
    return (
        f"interop ({backend}): {verdict}: LeRobot read all {index} frames of the {len(source_paths)} episodes "
        f"vlaflow wrote; action, observation.state, timestamp, episode_index, frame_index, index and task equal "
        f"the HDF5 source's; "
        f"its camera frames differ from vlaflow's reader's by at most {max_vs_reader} (of 255) and from the "
        f"source frames by {source_diff_sum / pixels:.2f} on average (at most {max_vs_source})"
    )


def torchcodec_loads() -> bool:
    """Whether LeRobot's default video backend can decode here (it needs FFmpeg's shared libraries
    and a build matching this torch)."""
    try:
        from torchcodec.decoders import VideoDecoder  # noqa: F401
    except Exception:  # a missing library surfaces as OSError or RuntimeError, a mismatched build as either
        return False
    return True


def keep_samples(batch: list) -> list:
    return batch


def throughput(dataset, order: list[int], num_workers: int, seconds: float, batch_size: int, collate_fn) -> float:
    """Samples per second in steady state: the first batch (worker start-up, opening the videos) is
    not timed, then batches are drawn for about `seconds`."""
    # LeRobot keeps torchcodec decoders in a module-level cache and warns that a worker forked from
    # a process holding them crashes; start every run without them (its first batch reopens them).
    _default_decoder_cache.clear()
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=order,
        num_workers=num_workers,
        collate_fn=collate_fn,
        multiprocessing_context="fork" if num_workers else None,
    )
    batches = iter(loader)
    next(batches)
    start = time.perf_counter()
    timed = 0
    for _ in batches:
        timed += 1
        if time.perf_counter() - start >= seconds:
            break
    elapsed = time.perf_counter() - start
    del batches  # stops the workers before the next run starts its own
    return timed * batch_size / elapsed


def folder_mib(folder: Path) -> float:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file()) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", default=sorted(CASES), choices=sorted(CASES))
    parser.add_argument("--episodes", type=int, help="episodes per case (default: the case's)")
    parser.add_argument("--steps", type=int, help="time steps per episode (default: the case's)")
    parser.add_argument("--chunk", type=int, default=50, help="actions per sample")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=2.0, help="timed length of one run")
    parser.add_argument("--rounds", type=int, default=3, help="runs per loader; the median counts")
    parser.add_argument("--no-resize", action="store_true", help="only full-size images")
    args = parser.parse_args()

    backends = ["pyav"] + (["torchcodec"] if torchcodec_loads() else [])
    missing = "" if "torchcodec" in backends else " (torchcodec does not load here)"
    print(
        f"{FPS} fps; chunk {args.chunk}; batch size {args.batch_size}; fork workers; median of {args.rounds} runs "
        f"of ~{args.seconds:g} s; LeRobot video backends: {', '.join(backends)}{missing}; {os.cpu_count()} CPUs, "
        f"{torch.get_num_threads()} torch threads in the main process; load average {os.getloadavg()[0]:.1f}\n"
    )
    header = "| case | images | workers | vlaflow samples/s |"
    rule = "|---|---|---:|---:|"
    for backend in backends:
        header += f" LeRobot ({backend}) samples/s | vlaflow / LeRobot ({backend}) |"
        rule += "---:|---:|"
    rows, verdicts = [], []
    with tempfile.TemporaryDirectory() as tmp:
        # LeRobot memory-maps its data files through a `datasets` cache; keep it out of ~/.cache.
        datasets.config.HF_DATASETS_CACHE = Path(tmp) / "hf_datasets"
        for name in args.cases:
            case = CASES[name]
            episode_count, steps = args.episodes or case.episodes, args.steps or case.steps
            started = time.perf_counter()
            (Path(tmp) / name / "hdf5").mkdir(parents=True)
            source_paths = write_source_episodes(Path(tmp) / name / "hdf5", case, episode_count, steps)
            written = time.perf_counter()
            lerobot_root = convert_to_lerobot(
                Hdf5Format.episodes(Path(tmp) / name / "hdf5", {}), Path(tmp) / name / "lerobot", fps=FPS
            )
            converted = time.perf_counter()
            print(
                f"case {name} ({case.description}): {episode_count} HDF5 episodes x {steps} steps written in "
                f"{written - started:.0f} s, converted by vlaflow in {converted - written:.0f} s "
                f"({folder_mib(lerobot_root / 'videos'):.1f} MiB of AV1 video)"
            )
            for backend in backends:
                checked = time.perf_counter()
                verdicts.append(f"case {name}: " + check_interop(lerobot_root, source_paths, case, backend))
                print(f"{verdicts[-1]} ({time.perf_counter() - checked:.0f} s)")
            print()

            episodes = LeRobotFormat.episodes(lerobot_root, {})
            stats = compute_stats(episodes)
            # Random order, as in training; repeated so that no run runs out of indices.
            count = sum(episode.info.length for episode in episodes)
            order = np.concatenate([np.random.default_rng(r).permutation(count) for r in range(50)]).tolist()
            chunk_offsets = [k / FPS for k in range(args.chunk)]
            resized = [] if args.no_resize or case.frame_size == DEFAULT_RESIZE else [DEFAULT_RESIZE]
            for size in [case.frame_size, *resized]:
                spec = RobotSpec(case.cameras, size, ACTION_DIM, STATE_DIM, args.chunk)
                loaders = {"vlaflow": (RobotEpisodeDataset(episodes, spec, stats), keep_samples)}
                resize = None if size == case.frame_size else v2.Resize(size, antialias=True)
                for backend in backends:
                    lerobot = LeRobotDataset(
                        REPO_ID,
                        root=lerobot_root,
                        video_backend=backend,
                        delta_timestamps={"action": chunk_offsets},
                        image_transforms=resize,
                    )
                    loaders[backend] = (lerobot, torch.utils.data.default_collate)
                images = f"{size[0]}x{size[1]}" + (" (full size)" if size == case.frame_size else " (resized)")
                for workers in args.workers:
                    runs = {label: [] for label in loaders}
                    for _ in range(args.rounds):  # the loaders take turns, so that other load hits them alike
                        for label, (dataset, collate_fn) in loaders.items():
                            runs[label].append(
                                throughput(dataset, order, workers, args.seconds, args.batch_size, collate_fn)
                            )
                    rates = {label: statistics.median(values) for label, values in runs.items()}
                    row = f"| {name}: {case.description} | {images} | {workers} | {rates['vlaflow']:.1f} |"
                    for backend in backends:
                        row += f" {rates[backend]:.1f} | {rates['vlaflow'] / rates[backend]:.2f}x |"
                    rows.append(row)
                    print(row, flush=True)
            print()
    print(header)
    print(rule)
    print("\n".join(rows))
    print()
    print("\n".join(verdicts))
    print(f"\nload average {os.getloadavg()[0]:.1f} at the end (other work on the machine skews the figures)")


if __name__ == "__main__":
    main()
