"""How robot and vision-language samples are combined, one module for both recipes.

- ChatVLA's `vl_ratio`: the VL part of the mix holds int(robot timesteps x vl_ratio) samples
  (-1: all VL data); fewer than available are drawn without replacement with a fixed seed, more
  than available cycle through the list. Robot and VL samples are then shuffled together.
- StarVLA's per-batch composition: every batch holds round(batch size x vl_batch_fraction) VL
  samples and robot samples for the rest; an epoch is one pass over the robot data.

Every rank computes the same global order from the seed and the epoch and takes its own
batches from it (batch b goes to rank b mod world size), so ranks never share a sample.

For training, `MixSampler` streams epoch after epoch as one sequence of `num_samples` indices:
the position in it is then a step count, which is what a resumed run skips. Each streamed index
carries its epoch (epoch x len(dataset) + index), so robot augmentations differ between epochs.
"""

import math
from dataclasses import dataclass

import numpy as np
from torch.utils.data import ConcatDataset, Dataset, Sampler, Subset

from vlaflow.errors import VlaflowError


@dataclass(frozen=True)
class Mix:
    vl_ratio: float | None = None
    vl_batch_fraction: float | None = None
    vl_loss_weight: float = 1.0

    @classmethod
    def from_config(cls, settings: dict) -> "Mix":
        return cls(settings.get("vl_ratio"), settings.get("vl_batch_fraction"), settings.get("vl_loss_weight", 1.0))


def _set_epoch(dataset: Dataset, epoch: int) -> None:
    """Tell every dataset inside concatenations and subsets which epoch it serves."""
    if isinstance(dataset, ConcatDataset):
        for part in dataset.datasets:
            _set_epoch(part, epoch)
    elif isinstance(dataset, Subset):
        _set_epoch(dataset.dataset, epoch)
    elif hasattr(dataset, "set_epoch"):
        dataset.set_epoch(epoch)


class MixedDataset(Dataset):
    """Robot samples at indices [0, n_robot), vision-language samples after them; an index past
    the end is a streamed one, epoch x len(self) + index."""

    def __init__(self, robot: Dataset | None, vl: Dataset | None):
        self.robot, self.vl = robot, vl
        self.n_robot = len(robot) if robot is not None else 0
        self.n_vl = len(vl) if vl is not None else 0
        self.epoch = 0

    def __len__(self) -> int:
        return self.n_robot + self.n_vl

    def __getitem__(self, index: int):
        epoch, index = divmod(index, len(self))
        if epoch != self.epoch and self.robot is not None:
            _set_epoch(self.robot, epoch)
        self.epoch = epoch
        return self.robot[index] if index < self.n_robot else self.vl[index - self.n_robot]


def vl_ratio_draw(n_robot: int, n_vl: int, vl_ratio: float, seed: int) -> np.ndarray:
    """The VL samples (indices into the VL data) that ChatVLA's `vl_ratio` puts in the mix."""
    if vl_ratio == -1:
        return np.arange(n_vl)
    wanted = int(n_robot * vl_ratio)
    if wanted <= n_vl:
        return np.sort(np.random.default_rng(seed).choice(n_vl, wanted, replace=False))
    return np.resize(np.arange(n_vl), wanted)


def epoch_order(
    mix: Mix | None, n_robot: int, n_vl: int, *, batch_size: int, world_size: int, seed: int, epoch: int
) -> np.ndarray:
    """The global sample order of one epoch, a whole number of batches for every rank."""
    rng = np.random.default_rng([seed, epoch])
    if mix is not None and mix.vl_batch_fraction is not None:
        per_batch_vl = round(batch_size * mix.vl_batch_fraction)
        per_batch_robot = batch_size - per_batch_vl
        if per_batch_vl == 0 or per_batch_robot == 0:
            raise VlaflowError(
                f"mix.vl_batch_fraction {mix.vl_batch_fraction} leaves {per_batch_vl} VL and {per_batch_robot} robot "
                f"samples in a batch of {batch_size}; choose a fraction that keeps both"
            )
        batches = math.ceil(n_robot / per_batch_robot / world_size) * world_size
        robot = _cycled_permutations(rng, n_robot, batches * per_batch_robot).reshape(batches, per_batch_robot)
        vl = n_robot + _cycled_permutations(rng, n_vl, batches * per_batch_vl).reshape(batches, per_batch_vl)
        return np.concatenate([robot, vl], axis=1).reshape(-1)
    vl = (
        vl_ratio_draw(n_robot, n_vl, mix.vl_ratio, seed)
        if mix is not None and mix.vl_ratio is not None
        else np.arange(n_vl)
    )
    pool = rng.permutation(np.concatenate([np.arange(n_robot), n_robot + vl]))
    group = batch_size * world_size
    return np.resize(pool, math.ceil(len(pool) / group) * group)


def _cycled_permutations(rng: np.random.Generator, size: int, count: int) -> np.ndarray:
    """`count` indices from fresh permutations of range(size), one after another."""
    rounds = math.ceil(count / size)
    return np.concatenate([rng.permutation(size) for _ in range(rounds)])[:count]


class MixSampler(Sampler[int]):
    """This rank's sample indices, batch by batch: those of the current epoch, or with
    `num_samples` a stream of that many over consecutive epochs."""

    def __init__(
        self,
        dataset: MixedDataset,
        mix: Mix | None,
        *,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        num_samples: int | None = None,
    ):
        if len(dataset) == 0:
            raise VlaflowError("the stage has no samples: list robot or VL datasets")
        if mix is not None and mix.vl_batch_fraction is not None and (dataset.n_robot == 0 or dataset.n_vl == 0):
            raise VlaflowError("mix.vl_batch_fraction needs both robot and VL datasets")
        self.dataset, self.mix = dataset, mix
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.num_samples = num_samples
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def rank_order(self, epoch: int | None = None) -> np.ndarray:
        order = epoch_order(
            self.mix,
            self.dataset.n_robot,
            self.dataset.n_vl,
            batch_size=self.batch_size,
            world_size=self.world_size,
            seed=self.seed,
            epoch=self.epoch if epoch is None else epoch,
        )
        return order.reshape(-1, self.batch_size)[self.rank :: self.world_size].reshape(-1)

    def _stream(self):
        epoch, remaining = 0, self.num_samples
        while remaining > 0:
            order = self.rank_order(epoch)[:remaining] + epoch * len(self.dataset)
            yield from order.tolist()
            epoch, remaining = epoch + 1, remaining - len(order)

    def __iter__(self):
        return self._stream() if self.num_samples is not None else iter(self.rank_order().tolist())

    def __len__(self) -> int:
        return self.num_samples if self.num_samples is not None else len(self.rank_order())
