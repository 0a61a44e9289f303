"""Co-training mixes: ChatVLA's vl_ratio, StarVLA's per-batch composition, rank sharding."""

import numpy as np
import pytest
from torch.utils.data import ConcatDataset, Subset

from vlaflow.data.mixing import Mix, MixedDataset, MixSampler, epoch_order, vl_ratio_draw
from vlaflow.errors import VlaflowError


class Numbers:
    def __init__(self, size, tag):
        self.size, self.tag = size, tag

    def __len__(self):
        return self.size

    def __getitem__(self, index):
        return (self.tag, index)


@pytest.mark.parametrize(
    ("n_robot", "n_vl", "ratio", "expected"),
    [
        (100, 50, 0.33, 33),
        (100, 50, 0.5, 50),
        (100, 50, 1.0, 100),
        (300, 50, 0.33, 99),
        (7, 50, 0.33, 2),
        (100, 50, 0, 0),
    ],
)
def test_vl_ratio_draws_int_of_robot_timesteps_times_ratio(n_robot, n_vl, ratio, expected):
    drawn = vl_ratio_draw(n_robot, n_vl, ratio, seed=0)
    assert len(drawn) == expected == int(n_robot * ratio)
    if expected <= n_vl:
        assert len(set(drawn.tolist())) == expected  # without replacement
    else:
        # more than available: cycle through the list
        assert drawn.tolist() == (list(range(n_vl)) * 3)[:expected]


def test_vl_ratio_minus_one_takes_all_vl_data_and_the_draw_is_seeded():
    assert vl_ratio_draw(10, 25, -1, seed=0).tolist() == list(range(25))
    assert vl_ratio_draw(100, 50, 0.33, seed=1).tolist() == vl_ratio_draw(100, 50, 0.33, seed=1).tolist()
    assert vl_ratio_draw(100, 50, 0.33, seed=1).tolist() != vl_ratio_draw(100, 50, 0.33, seed=2).tolist()


def test_ratio_epoch_holds_every_robot_sample_and_the_drawn_vl_samples():
    mix = Mix(vl_ratio=0.33)
    order = epoch_order(mix, 100, 50, batch_size=1, world_size=1, seed=3, epoch=0)
    robot = sorted(i for i in order.tolist() if i < 100)
    vl = sorted(i - 100 for i in order.tolist() if i >= 100)
    assert robot == list(range(100))
    assert vl == vl_ratio_draw(100, 50, 0.33, seed=3).tolist()
    # shuffled together, and again differently in the next epoch with the same VL draw
    assert order.tolist() != sorted(order.tolist())
    next_epoch = epoch_order(mix, 100, 50, batch_size=1, world_size=1, seed=3, epoch=1)
    assert next_epoch.tolist() != order.tolist() and sorted(next_epoch.tolist()) == sorted(order.tolist())


@pytest.mark.parametrize(("batch_size", "fraction", "per_batch_vl"), [(8, 0.25, 2), (4, 0.5, 2), (16, 0.33, 5)])
def test_per_batch_fraction_puts_the_same_vl_count_in_every_batch(batch_size, fraction, per_batch_vl):
    order = epoch_order(Mix(vl_batch_fraction=fraction), 50, 13, batch_size=batch_size, world_size=1, seed=0, epoch=0)
    batches = order.reshape(-1, batch_size)
    assert [(batch >= 50).sum() for batch in batches] == [per_batch_vl] * len(batches)
    robot = batches[batches < 50]
    assert set(robot.tolist()) == set(range(50))  # one pass over the robot data
    assert len(batches) == -(-50 // (batch_size - per_batch_vl))


def test_per_batch_fraction_that_empties_one_side_is_an_error():
    with pytest.raises(VlaflowError, match="vl_batch_fraction 0.05 leaves 0 VL"):
        epoch_order(Mix(vl_batch_fraction=0.05), 50, 13, batch_size=4, world_size=1, seed=0, epoch=0)


@pytest.mark.parametrize("mix", [Mix(vl_ratio=0.33), Mix(vl_batch_fraction=0.25), None])
def test_two_ranks_see_disjoint_batches_that_together_are_the_global_order(mix):
    dataset = MixedDataset(Numbers(40, "robot"), Numbers(30, "vl") if mix is not None else None)
    samplers = [MixSampler(dataset, mix, batch_size=4, seed=5, rank=rank, world_size=2) for rank in (0, 1)]
    rank_orders = [list(sampler) for sampler in samplers]
    assert len(rank_orders[0]) == len(rank_orders[1]) == len(samplers[0])
    global_order = epoch_order(mix, dataset.n_robot, dataset.n_vl, batch_size=4, world_size=2, seed=5, epoch=0).reshape(
        -1, 4
    )
    assert (
        np.concatenate([global_order[0::2], global_order[1::2]]).reshape(-1).tolist() == rank_orders[0] + rank_orders[1]
    )
    if mix is None or mix.vl_batch_fraction is None:
        # no sample is shared except the wrap-around padding that evens out the ranks
        shared = set(rank_orders[0]) & set(rank_orders[1])
        padding = len(rank_orders[0]) * 2 - len(set(global_order.reshape(-1).tolist()))
        assert len(shared) <= padding


def test_a_rank_order_is_the_same_on_every_call_and_changes_with_the_epoch():
    dataset = MixedDataset(Numbers(40, "robot"), Numbers(30, "vl"))
    sampler = MixSampler(dataset, Mix(vl_ratio=0.5), batch_size=4, seed=0, rank=1, world_size=2)
    first = list(sampler)
    assert list(sampler) == first
    sampler.set_epoch(1)
    assert list(sampler) != first


def test_mixed_dataset_puts_robot_samples_first():
    dataset = MixedDataset(Numbers(3, "robot"), Numbers(2, "vl"))
    assert [dataset[i] for i in range(len(dataset))] == [("robot", 0), ("robot", 1), ("robot", 2), ("vl", 0), ("vl", 1)]


def test_streamed_indices_continue_epoch_after_epoch_and_carry_their_epoch():
    dataset = MixedDataset(Numbers(6, "robot"), Numbers(4, "vl"))
    plain = MixSampler(dataset, Mix(vl_ratio=0.5), batch_size=2, seed=0, rank=1, world_size=2)
    stream = list(MixSampler(dataset, Mix(vl_ratio=0.5), batch_size=2, seed=0, rank=1, world_size=2, num_samples=11))
    epochs = [plain.rank_order(epoch).tolist() for epoch in range(3)]
    assert stream == (epochs[0] + [i + 10 for i in epochs[1]] + [i + 20 for i in epochs[2]])[:11]
    assert dataset[13] == ("robot", 3) and dataset.epoch == 1


def test_a_new_epoch_reaches_the_datasets_inside_concatenations_and_subsets():
    class Augmented(Numbers):
        epoch = 0

        def set_epoch(self, epoch):
            self.epoch = epoch

    inner = Augmented(4, "robot")
    dataset = MixedDataset(ConcatDataset([Subset(inner, [0, 1, 2])]), None)
    dataset[2 * 3 + 1]
    assert inner.epoch == 2
