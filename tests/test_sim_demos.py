import json

import h5py
import numpy as np
import pytest

from vlaflow.data import hdf5_episodes
from vlaflow.data.language import TRANSFER_CUBE_INSTRUCTION, TRANSFER_CUBE_REASONING
from vlaflow.data.robot_dataset import RobotEpisodeDataset
from vlaflow.data.samples import RobotSpec
from vlaflow.data.stats import compute_stats
from vlaflow.sim.aloha import EPISODE_LENGTH, MAX_REWARD, AlohaSim
from vlaflow.sim.tasks import SIM_TASKS
from vlaflow.sim.demos import SUMMARY_FILE, record_demos
from vlaflow.sim.scripted import (
    TRANSFER_CUBE_PHASES,
    axis_angle_quaternion,
    phase,
    pick_and_transfer_actions,
    quaternion_multiply,
)

HEIGHT, WIDTH = 48, 64
LEFT_INIT = np.array([-0.31718881, 0.5, 0.29525084, 1, 0, 0, 0])
RIGHT_INIT = np.array([0.31718881, 0.49999888, 0.29525084, 1, 0, 0, 0])
BOX_XYZ = np.array([0.1, 0.5, 0.05])


def test_phases_are_the_reasoning_keys_in_order():
    assert [name for name, _ in TRANSFER_CUBE_PHASES] == list(TRANSFER_CUBE_REASONING)
    assert [phase(step) for step in (0, 89, 90, 129, 130, 169, 170, 219, 220, 259, 260, 309, 310, 399)] == [
        "approach", "approach", "descend", "descend", "grasp", "grasp", "lift",
        "lift", "meet", "meet", "handover", "handover", "retreat", "retreat",
    ]  # fmt: skip
    with pytest.raises(ValueError):
        phase(EPISODE_LENGTH)


def test_quaternion_math():
    quarter_turn_x = axis_angle_quaternion([2, 0, 0], 90)
    np.testing.assert_allclose(quarter_turn_x, [np.sqrt(0.5), np.sqrt(0.5), 0, 0])
    half_turn_x = quaternion_multiply(quarter_turn_x, quarter_turn_x)
    np.testing.assert_allclose(half_turn_x, [0, 1, 0, 0], atol=1e-12)
    pick = quaternion_multiply(axis_angle_quaternion([0, 0, 1], 30), axis_angle_quaternion([0, 1, 0], -60))
    assert np.linalg.norm(pick) == pytest.approx(1)


def test_plan_interpolates_between_waypoints():
    actions = pick_and_transfer_actions(LEFT_INIT, RIGHT_INIT, BOX_XYZ)
    assert actions.shape == (EPISODE_LENGTH, 16)
    np.testing.assert_allclose(actions[0, :7], LEFT_INIT)
    np.testing.assert_allclose(actions[0, 8:15], RIGHT_INIT)
    right_gripper = actions[:, 15]
    assert right_gripper[45] == pytest.approx(0.5)  # opening on the way to the box
    assert right_gripper[130] == 1 and right_gripper[150] == pytest.approx(0.5) and right_gripper[170] == 0
    np.testing.assert_allclose(actions[150, 8:11], BOX_XYZ + [0, 0, -0.015])  # held still while closing
    np.testing.assert_allclose(actions[220, 8:11], [0, 0.5, 0.25])  # at the meeting point
    assert actions[310, 7] == 0 and actions[310, 15] == 1  # handed over: left closed, right open


@pytest.fixture(scope="module")
def demos(tmp_path_factory):
    out = tmp_path_factory.mktemp("demos") / "transfer_cube"
    return out, record_demos(out, 2, height=HEIGHT, width=WIDTH, workers=2)


@pytest.mark.slow
def test_record_demos_writes_successful_episodes(demos):
    out, report = demos
    assert (report.successes, report.failures, report.failed_seeds) == (2, 0, [])
    assert report.paths == [out / "episode_0000.hdf5", out / "episode_0001.hdf5"]
    assert sorted(path.name for path in out.iterdir()) == ["demos.json", "episode_0000.hdf5", "episode_0001.hdf5"]
    summary = json.loads((out / SUMMARY_FILE).read_text())
    assert summary["episodes"] == [{"file": "episode_0000.hdf5", "seed": 0}, {"file": "episode_0001.hdf5", "seed": 1}]
    assert summary["failures"] == [] and (summary["height"], summary["width"], summary["camera"]) == (48, 64, "top")
    assert summary["shadows"] is True
    with h5py.File(report.paths[0]) as file:
        assert file.attrs[hdf5_episodes.SIM_ATTRIBUTE]
        assert file[hdf5_episodes.ACTION].shape == (EPISODE_LENGTH, 14)
        assert file[hdf5_episodes.QPOS].shape == (EPISODE_LENGTH, 14)
        assert file[hdf5_episodes.QVEL].shape == (EPISODE_LENGTH, 14)
        frames = file[f"{hdf5_episodes.IMAGES}/top"][()]
        assert frames.shape == (EPISODE_LENGTH, HEIGHT, WIDTH, 3) and frames.dtype == np.uint8
        assert not np.array_equal(frames[0], frames[-1])  # the arms moved in view
        assert file[hdf5_episodes.LANGUAGE][0].decode() == TRANSFER_CUBE_INSTRUCTION
        reasonings = [text.decode() for text in file[hdf5_episodes.SUBSTEP_REASONINGS]]
    assert len(reasonings) == EPISODE_LENGTH
    assert list(dict.fromkeys(reasonings)) == list(TRANSFER_CUBE_REASONING.values())


@pytest.mark.slow
def test_recorded_actions_succeed_again_in_a_fresh_simulator(demos):
    _, report = demos
    with h5py.File(report.paths[1]) as file:
        actions = file[hdf5_episodes.ACTION][()]
        qpos = file[hdf5_episodes.QPOS][()]
    sim = AlohaSim(SIM_TASKS["transfer_cube"], HEIGHT, WIDTH)
    state = sim.reset(seed=1)
    np.testing.assert_allclose(state.qpos, qpos[0], atol=1e-6)
    assert max(sim.step(action)[1] for action in actions) == MAX_REWARD


@pytest.mark.slow
def test_frames_are_rendered_on_demand_with_or_without_shadows():
    shaded, flat = AlohaSim(SIM_TASKS["transfer_cube"], HEIGHT, WIDTH), AlohaSim(
        SIM_TASKS["transfer_cube"], HEIGHT, WIDTH, shadows=False
    )
    for sim in (shaded, flat):
        sim.reset(seed=0)
    first = shaded.render()
    assert first.shape == (HEIGHT, WIDTH, 3) and first.dtype == np.uint8
    np.testing.assert_array_equal(shaded.render(), first)  # rendering leaves the state alone
    without = flat.render()
    assert without.sum() > first.sum()  # shadows darken the table
    assert np.abs(without.astype(int) - first).mean() < 5  # the same scene


@pytest.mark.slow
def test_demos_load_through_the_robot_dataset(demos):
    _, report = demos
    spec = RobotSpec(cameras=("top",), image_size=(32, 40), action_dim=14, state_dim=14, chunk_size=16)
    episodes = hdf5_episodes.hdf5_episodes(report.paths)
    dataset = RobotEpisodeDataset(episodes, spec, compute_stats(episodes))
    assert len(dataset) == 2 * EPISODE_LENGTH
    sample = dataset[EPISODE_LENGTH + 150]
    assert sample.source.endswith("episode_0001.hdf5:150")
    assert sample.instruction == TRANSFER_CUBE_INSTRUCTION
    assert sample.reasoning == TRANSFER_CUBE_REASONING["grasp"]
    assert sample.images[0].size == (40, 32)
    assert sample.actions.shape == (16, 14) and np.abs(sample.actions).max() <= 1 + 1e-6
    assert not sample.is_pad.any() and dataset[EPISODE_LENGTH - 1].is_pad.sum() == 15
