"""Samples per second of `RobotEpisodeDataset` against upstream's access pattern, and the memory
of a worker as it opens more episodes.

Upstream's EpisodicDataset (DexVLA, ChatVLA) opens the episode file for every sample, reads the
whole `/action` array, closes the file and runs `gc.collect()`. Here both loaders produce the same
samples (same decode, resize and normalisation, no augmentation) through the same DataLoader
setup, in a process that holds what a training process holds (the processor, a loaded model), so
that `gc.collect()` walks a training-sized heap; their timing runs alternate, and each run's first
batch (worker start-up) is not timed. The target is ours / upstream >= 20 at one worker. The
"collated" column runs our samples on through the collator and the tiny backbone's processor
(tokens, labels, pixel patches) and counts batches.

The memory table reads one sample from each of 1, 8, 32 and 64 episodes (the open-file limit) in
a fresh process and prints how much its resident memory grew: flat is the target.

    python -m tests.benchmarks.robot_loader
    python -m tests.benchmarks.robot_loader --cases C --episodes 8 --steps 200 --seconds 4 --rounds 5
"""

import argparse
import gc
import multiprocessing
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch

from vlaflow.backbone.download import BUILTIN_TINY, download
from vlaflow.backbone.folder import load_vla
from vlaflow.backbone.vla_config import make_vla_folder
from vlaflow.data.collator import Collator
from vlaflow.data.hdf5_episodes import (
    ACTION,
    IMAGES,
    LANGUAGE,
    QPOS,
    REASONING,
    SIM_ATTRIBUTE,
    SUBSTEP_REASONINGS,
    hdf5_episodes,
    write_episode,
)
from vlaflow.data.images import decode_frame
from vlaflow.data.robot_dataset import RobotEpisodeDataset
from vlaflow.data.samples import RobotSample, RobotSpec
from vlaflow.data.stats import compute_stats
from vlaflow.models.qwen2_vla import Qwen2VLAProcessor

IMAGE_SIZE = (240, 320)  # ChatVLA's image_size_stable, "(320, 240)" as width, height
ACTION_DIM = STATE_DIM = 14
CHUNK_SIZE = 50


@dataclass(frozen=True)
class Case:
    description: str
    cameras: tuple[str, ...]
    frame_size: tuple[int, int]
    compress: bool


CASES = {
    "A": Case("1 camera, 240x320 raw", ("top",), (240, 320), compress=False),
    "B": Case("3 cameras, 480x640 JPEG", ("top", "left_wrist", "right_wrist"), (480, 640), compress=True),
    "C": Case("3 cameras, 480x640 raw", ("top", "left_wrist", "right_wrist"), (480, 640), compress=False),
}
MEMORY_EPISODES = (1, 8, 32, 64, 128)  # past MAX_OPEN_EPISODES (64): bounded by it


def camera_frames(steps: int, size: tuple[int, int], seed: int) -> np.ndarray:
    """A scene-like video: smooth shading, sensor noise and a square that moves; it compresses to
    JPEGs of a realistic size, unlike pure noise."""
    rng = np.random.default_rng(seed)
    height, width = size
    rows, cols = np.mgrid[0:height, 0:width]
    background = np.stack(
        [rows * 160 // height + 40, cols * 160 // width + 40, (rows + cols) * 80 // (height + width) + 60], -1
    )
    frames = np.empty((steps, height, width, 3), dtype=np.uint8)
    side = height // 6
    for t in range(steps):
        frame = background + rng.integers(-6, 7, background.shape)
        top, left = (t * 3) % (height - side), (t * 5) % (width - side)
        frame[top : top + side, left : left + side] = (200, 30, 30)
        frames[t] = np.clip(frame, 0, 255)
    return frames


def write_episodes(folder: Path, case: Case, episodes: int, steps: int) -> list[Path]:
    paths = []
    for episode in range(episodes):
        rng = np.random.default_rng(episode)
        paths.append(
            write_episode(
                folder / f"episode_{episode}.hdf5",
                actions=rng.normal(size=(steps, ACTION_DIM)).cumsum(axis=0),
                qpos=rng.normal(size=(steps, STATE_DIM)).cumsum(axis=0),
                images={
                    name: camera_frames(steps, case.frame_size, 10 * episode + i) for i, name in enumerate(case.cameras)
                },
                language="Pick up the red cube with the right arm and hand it over to the left arm.",
                substep_reasonings=[f"step {t}" for t in range(steps)],
                sim=episode % 2 == 0,
                compress=case.compress,
            )
        )
    return paths


class UpstreamPatternDataset(torch.utils.data.Dataset):
    """The samples of `ours`, loaded the way upstream's EpisodicDataset loads them."""

    def __init__(self, ours: RobotEpisodeDataset):
        self.ours = ours

    def __len__(self) -> int:
        return len(self.ours)

    def __getitem__(self, index: int) -> RobotSample:
        episode, t = self.ours.locate(index)
        path, spec, stats = self.ours.episodes[episode].path, self.ours.spec, self.ours.stats
        with h5py.File(path, "r") as root:
            sim = bool(root.attrs.get(SIM_ATTRIBUTE, False))
            instruction = root[LANGUAGE][0].decode()
            if SUBSTEP_REASONINGS in root:
                reasoning = root[SUBSTEP_REASONINGS][t].decode()
            else:
                reasoning = root[REASONING][0].decode() if REASONING in root else ""
            actions = root[ACTION][()]
            qpos = root[QPOS][t]
            frames = [root[f"{IMAGES}/{camera}"][t] for camera in spec.cameras]
        start = t if sim else max(t - 1, 0)
        rows = actions[start : start + spec.chunk_size]
        chunk = np.zeros((spec.chunk_size, spec.action_dim), dtype=np.float32)
        chunk[: len(rows)] = stats.normalize_actions(rows)
        sample = RobotSample(
            images=[decode_frame(frame, spec.image_size) for frame in frames],
            state=stats.normalize_state(qpos),
            actions=chunk,
            is_pad=np.arange(spec.chunk_size) >= len(rows),
            instruction=instruction,
            reasoning=reasoning,
            source=f"{path}:{t}",
        )
        gc.collect()
        return sample


def check_same_samples(ours, upstream, indices) -> None:
    for index in indices:
        a, b = ours[index], upstream[index]
        assert (a.source, a.instruction, a.reasoning) == (b.source, b.instruction, b.reasoning), index
        for x, y in [(a.state, b.state), (a.actions, b.actions), (a.is_pad, b.is_pad)]:
            np.testing.assert_array_equal(x, y)
        for x, y in zip(a.images, b.images):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def keep_samples(batch: list) -> list:
    return batch


def throughput(
    dataset, order: list[int], num_workers: int, seconds: float, batch_size: int, collate_fn=keep_samples
) -> float:
    """Samples per second in steady state: the first batch (worker start-up) is not timed, then
    batches are drawn for about `seconds`."""
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, sampler=order, num_workers=num_workers, collate_fn=collate_fn
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


def resident_mib() -> float:
    return int(Path("/proc/self/statm").read_text().split()[1]) * 4096 / 2**20


def memory_growth(dataset: RobotEpisodeDataset, counts: tuple[int, ...]) -> list[float]:
    """In this (fresh) process: how much resident memory grew after reading a sample from each of
    the first n episodes, for each n in `counts`."""
    dataset[0]  # imports, decoders and allocator pools warm, as in a running worker
    base, growth = resident_mib(), []
    first_step = 0
    for episode in range(max(counts)):
        dataset[first_step]
        first_step += dataset.infos[episode].frames
        if episode + 1 in counts:
            growth.append(resident_mib() - base)
    return growth


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", default=sorted(CASES), choices=sorted(CASES))
    parser.add_argument("--episodes", type=int, default=4)
    parser.add_argument("--steps", type=int, default=120, help="time steps per episode")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 0])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=2.0, help="timed length of one run")
    parser.add_argument("--rounds", type=int, default=3, help="runs per loader; the median counts")
    args = parser.parse_args()

    print(
        f"{args.episodes} episodes x {args.steps} steps per case; images to {IMAGE_SIZE[0]}x{IMAGE_SIZE[1]}; ", end=""
    )
    print(f"chunk {CHUNK_SIZE}; batch size {args.batch_size}; median of {args.rounds} runs of ~{args.seconds:g} s\n")
    memory = {}
    with tempfile.TemporaryDirectory() as tmp:
        backbone = download(BUILTIN_TINY, Path(tmp) / "backbone")
        processor = Qwen2VLAProcessor.from_pretrained(backbone)
        model = load_vla(make_vla_folder(backbone, Path(tmp) / "vla"))  # noqa: F841  (held, as training holds it)
        started = time.perf_counter()
        gc.collect()
        print(
            f"the process holds {len(gc.get_objects()):,} objects; gc.collect() takes "
            f"{1000 * (time.perf_counter() - started):.0f} ms\n"
        )
        print("| case | workers | ours samples/s | upstream samples/s | ours / upstream | ours collated batches/s |")
        print("|---|---:|---:|---:|---:|---:|")
        for name in args.cases:
            case = CASES[name]
            collator = Collator(
                processor, max_length=4096, action_dim=ACTION_DIM, state_dim=STATE_DIM, chunk_size=CHUNK_SIZE
            )
            (Path(tmp) / name).mkdir()
            paths = write_episodes(Path(tmp) / name, case, args.episodes, args.steps)
            spec = RobotSpec(case.cameras, IMAGE_SIZE, ACTION_DIM, STATE_DIM, CHUNK_SIZE)
            episodes = hdf5_episodes(paths)
            ours = RobotEpisodeDataset(episodes, spec, compute_stats(episodes))
            upstream = UpstreamPatternDataset(ours)
            check_same_samples(ours, upstream, [0, 1, args.steps - 1, len(ours) - 1])
            # Random order, as in training; repeated so that no run runs out of indices.
            order = np.concatenate([np.random.default_rng(r).permutation(len(ours)) for r in range(20)]).tolist()
            for workers in args.workers:
                runs = {"ours": [], "upstream": [], "collated": []}
                for _ in range(args.rounds):
                    for label, dataset in (("ours", ours), ("upstream", upstream)):
                        runs[label].append(throughput(dataset, order, workers, args.seconds, args.batch_size))
                    samples_per_second = throughput(ours, order, workers, args.seconds, args.batch_size, collator)
                    runs["collated"].append(samples_per_second / args.batch_size)
                ours_rate, upstream_rate, batch_rate = (
                    statistics.median(runs[label]) for label in ("ours", "upstream", "collated")
                )
                print(
                    f"| {name}: {case.description} | {workers} | {ours_rate:.1f} | {upstream_rate:.1f} "
                    f"| {ours_rate / upstream_rate:.1f}x | {batch_rate:.1f} |"
                )
            (Path(tmp) / f"{name}_memory").mkdir()
            paths = write_episodes(Path(tmp) / f"{name}_memory", case, max(MEMORY_EPISODES), 2)
            episodes = hdf5_episodes(paths)
            dataset = RobotEpisodeDataset(episodes, spec, compute_stats(episodes))
            with multiprocessing.get_context("spawn").Pool(1) as fresh:
                memory[name] = fresh.apply(memory_growth, (dataset, MEMORY_EPISODES))
    print(f"\n| case | resident memory growth after 1 / {' / '.join(map(str, MEMORY_EPISODES[1:]))} episodes |")
    print("|---|---|")
    for name, growth in memory.items():
        print(f"| {name}: {CASES[name].description} | {' / '.join(f'{mib:.0f} MiB' for mib in growth)} |")


if __name__ == "__main__":
    main()
