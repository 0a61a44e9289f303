"""A second simulator task through the registry (vlaflow.sim.tasks): gym-aloha's insertion, from
scripted demonstrations through training, beside transfer cube, to one closed-loop evaluation per
task, with nothing task-specific outside its registry entry, its task classes and its plan."""

import json

import h5py
import numpy as np
import pytest

from tests.training_helpers import train_on_sim_demos
from vlaflow.config import ConfigError, validate_config
from vlaflow.data import hdf5_episodes
from vlaflow.data.language import INSERTION_INSTRUCTION, INSERTION_REASONING, TRANSFER_CUBE_INSTRUCTION
from vlaflow.errors import VlaflowError
from vlaflow.evaluation.metrics import METRICS_FILE, read_metrics
from vlaflow.evaluation.policy import Policy
from vlaflow.evaluation.robot import CLOSED_LOOP_FILE, evaluate_closed_loop, simulation_setups
from vlaflow.sim.aloha import EPISODE_LENGTH, MAX_REWARD, AlohaSim
from vlaflow.sim.demos import SUMMARY_FILE, record_demos
from vlaflow.sim.scripted import INSERTION_DEPTH, INSERTION_MEET_XYZ, insertion_actions
from vlaflow.sim.tasks import SIM_TASKS, sim_task

HEIGHT, WIDTH = 48, 64
LEFT_INIT = np.array([-0.31718881, 0.5, 0.29525084, 1, 0, 0, 0])
RIGHT_INIT = np.array([0.31718881, 0.49999888, 0.29525084, 1, 0, 0, 0])
PEG_AND_SOCKET = np.array([0.15, 0.5, 0.05, 1, 0, 0, 0, -0.15, 0.45, 0.05, 1, 0, 0, 0])


def test_every_task_names_its_phases_reasoning_and_scenes():
    for name, task in SIM_TASKS.items():
        assert task.name == name
        assert [phase for phase, _ in task.phases] == list(task.reasoning)
        assert task.phases[0][1] == 0 and all(
            a[1] < b[1] < EPISODE_LENGTH for a, b in zip(task.phases, task.phases[1:])
        )
    with pytest.raises(
        VlaflowError, match="simulator task 'insertoin': unknown; the tasks are transfer_cube, insertion"
    ):
        sim_task("insertoin")


def test_insertion_plan_grasps_peg_and_socket_and_meets_in_the_middle():
    actions = insertion_actions(LEFT_INIT, RIGHT_INIT, PEG_AND_SOCKET)
    assert actions.shape == (EPISODE_LENGTH, 16)
    np.testing.assert_allclose(actions[0, :7], LEFT_INIT)
    np.testing.assert_allclose(actions[0, 8:15], RIGHT_INIT)
    np.testing.assert_allclose(actions[195, 0:3], PEG_AND_SOCKET[7:10] + [0, 0, -0.03])  # left at the socket
    np.testing.assert_allclose(actions[195, 8:11], PEG_AND_SOCKET[0:3] + [0, 0, -0.03])  # right at the peg
    assert actions[170, 7] == 1 and actions[220, 7] == 0 and actions[220, 15] == 0  # both grippers closed
    np.testing.assert_allclose(actions[399, 0:3], INSERTION_MEET_XYZ - [INSERTION_DEPTH, 0, 0])
    np.testing.assert_allclose(actions[399, 8:11], INSERTION_MEET_XYZ + [INSERTION_DEPTH, 0, 0.00715])


def test_the_insertion_scene_places_peg_and_socket_by_seed():
    sim = AlohaSim(sim_task("insertion"), HEIGHT, WIDTH, shadows=False)
    sim.reset(seed=3)
    objects = sim._env.physics.data.qpos[16:].copy()
    np.testing.assert_allclose(objects, sim_task("insertion").object_poses(3))
    cube = AlohaSim(sim_task("transfer_cube"), HEIGHT, WIDTH, shadows=False)
    cube.reset(seed=3)
    differing = (np.abs(sim.render().astype(int) - cube.render()) > 30).any(axis=-1)
    assert differing.sum() >= 10  # another scene in view: a peg and a socket, no cube


def test_a_config_naming_an_unknown_task_is_refused_naming_the_key():
    config = {"embedded": {"aloha_demos": {"datasets": {"cube": "transfer_cube", "peg": "insertoin"}}}}
    with pytest.raises(
        ConfigError, match=r"cfg: embedded\.aloha_demos\.datasets\.peg: 'insertoin' is not a simulator task"
    ):
        validate_config(config, "cfg")


@pytest.fixture(scope="module")
def insertion_run(tiny_backbone, mlp_weights, tmp_path_factory):
    """Demonstrations of both tasks, a model trained on both, and its closed loops."""
    root = tmp_path_factory.mktemp("insertion")
    folder = root / "data" / "peg"
    report = record_demos(folder, 2, height=HEIGHT, width=WIDTH, shadows=False, workers=2, task="insertion")
    record_demos(root / "data" / "cube", 2, height=HEIGHT, width=WIDTH, shadows=False, workers=2)
    model = train_on_sim_demos(root, ["peg", "cube"], tiny_backbone, mlp_weights)
    out = root / "eval"
    out.mkdir()
    results = evaluate_closed_loop(model, out, episodes=1, max_steps=12, video_size=None)
    return folder, report, results, out, model


@pytest.mark.slow
def test_insertion_demos_record_their_task_instruction_and_phases(insertion_run):
    folder, report, _, _, _ = insertion_run
    assert report.successes == 2
    assert json.loads((folder / SUMMARY_FILE).read_text())["task"] == "insertion"
    with h5py.File(report.paths[0]) as file:
        assert file[hdf5_episodes.LANGUAGE][0].decode() == INSERTION_INSTRUCTION
        reasonings = [text.decode() for text in file[hdf5_episodes.SUBSTEP_REASONINGS]]
        actions = file[hdf5_episodes.ACTION][()]
    assert list(dict.fromkeys(reasonings)) == list(INSERTION_REASONING.values())
    sim = AlohaSim(sim_task("insertion"), HEIGHT, WIDTH, shadows=False)
    sim.reset(seed=json.loads((folder / SUMMARY_FILE).read_text())["episodes"][0]["seed"])
    assert max(sim.step(action)[1] for action in actions) == MAX_REWARD  # the replay inserts the peg


@pytest.mark.slow
def test_closed_loop_runs_each_task_the_model_was_trained_on(insertion_run):
    _, _, results, out, _ = insertion_run
    assert list(results) == ["insertion", "transfer_cube"]  # in the order of the training datasets
    for task, instruction in (("insertion", INSERTION_INSTRUCTION), ("transfer_cube", TRANSFER_CUBE_INSTRUCTION)):
        result = results[task]
        assert json.loads((out / CLOSED_LOOP_FILE.format(task=task)).read_text()) == result
        assert (result["task"], result["instruction"]) == (task, instruction)
        assert result["episodes"] == 1 and result["steps"] == [12] and 0 <= result["max_rewards"][0] <= MAX_REWARD
        assert read_metrics(out / METRICS_FILE)[f"closed loop ({task})"]["success rate"] == result["success_rate"]


@pytest.mark.slow
def test_a_task_named_at_evaluation_is_the_only_one_run(insertion_run, tmp_path):
    *_, model = insertion_run
    policy = Policy(model, seed=0)
    assert [setup.task.name for setup in simulation_setups(policy)] == ["insertion", "transfer_cube"]
    (setup,) = simulation_setups(policy, task="transfer_cube")
    assert (setup.task, setup.instruction) == (sim_task("transfer_cube"), TRANSFER_CUBE_INSTRUCTION)
    with pytest.raises(VlaflowError, match="simulator task 'cube': unknown"):
        simulation_setups(policy, task="cube")
    results = evaluate_closed_loop(model, tmp_path, episodes=1, max_steps=2, video_size=(48, 64), task="insertion")
    assert list(results) == ["insertion"]
    assert sorted(path.name for path in tmp_path.iterdir()) == [
        CLOSED_LOOP_FILE.format(task="insertion"), METRICS_FILE, "rollout_insertion.gif"
    ]  # fmt: skip
