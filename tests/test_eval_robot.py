"""Robot evaluation of a real model, trained for a few steps on two recorded simulator demos (one
of them held out): open loop on the held-out episode, closed loop in the simulator."""

import json
import math
import re
import shutil

import h5py
import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from tests.conftest import SIM_DEMO_SIZE, SIM_IMAGE_SIZE, random_image
from tests.training_helpers import ALOHA_HEAD
from vlaflow.data.hdf5_episodes import ACTION, QPOS
from vlaflow.data.language import INSERTION_INSTRUCTION, TRANSFER_CUBE_INSTRUCTION
from vlaflow.data.stats import NormStats
from vlaflow.errors import VlaflowError
from vlaflow.evaluation.metrics import METRICS_FILE, read_metrics
from vlaflow.evaluation.policy import Policy, robot_datasets
from vlaflow.evaluation.robot import (
    CLOSED_LOOP_FILE,
    GIF_FRAME_STRIDE,
    OPEN_LOOP_FILE,
    ROLLOUT_FILE,
    TemporalEnsemble,
    evaluate_closed_loop,
    evaluate_open_loop,
    simulation_setups,
)
from vlaflow.sim.aloha import EPISODE_LENGTH, MAX_REWARD
from vlaflow.training.checkpoints import CONFIG_FILE, STATS_FILE
from vlaflow.training.run import train

DEMO_SIZE, IMAGE_SIZE = SIM_DEMO_SIZE, SIM_IMAGE_SIZE  # the trained_model's demos and what it sees
ALOHA = ALOHA_HEAD
CUBE_RESULT, CUBE_ROLLOUT = (name.format(task="transfer_cube") for name in (CLOSED_LOOP_FILE, ROLLOUT_FILE))


def assert_errors_well_formed(result: dict) -> None:
    for key in ("mse_per_dim", "l1_per_dim"):
        assert len(result[key]) == ALOHA["action_dim"]
        assert all(math.isfinite(value) and value >= 0 for value in result[key])
    assert result["mse"] == pytest.approx(np.mean(result["mse_per_dim"]))
    assert result["l1"] == pytest.approx(np.mean(result["l1_per_dim"]))


def test_open_loop_scores_every_step_of_the_held_out_episode(trained_model, tmp_path):
    result = evaluate_open_loop(trained_model, tmp_path, batch_size=32)
    assert json.loads((tmp_path / OPEN_LOOP_FILE).read_text()) == result
    assert set(result) == {
        "split", "datasets", "episodes", "samples", "mse", "l1", "mse_per_dim", "l1_per_dim", "reference",
    }  # fmt: skip
    assert set(result["reference"]) == {"mean_action", "hold_state"}
    for reference in result["reference"].values():
        assert_errors_well_formed(reference)
    assert (result["split"], result["datasets"], result["episodes"]) == ("val", ["cube"], 1)
    assert result["samples"] == EPISODE_LENGTH
    assert_errors_well_formed(result)
    reference = result["reference"]
    assert read_metrics(tmp_path / METRICS_FILE) == {
        "open loop (val)": {
            "mse": result["mse"],
            "l1": result["l1"],
            "mse mean_action": reference["mean_action"]["mse"],
            "mse hold_state": reference["hold_state"]["mse"],
        }
    }


def test_trivial_policies_are_scored_on_the_same_held_out_steps(trained_model, tmp_path):
    """Holding the current joint positions, or the training data's mean action, for the chunk:
    scored against the episode file's own actions, whatever the model's action representation."""
    result = evaluate_open_loop(trained_model, tmp_path, batch_size=16, limit=12)
    stats = NormStats.load(trained_model / STATS_FILE)
    config = yaml.safe_load((trained_model / CONFIG_FILE).read_text())
    [episode] = robot_datasets(config)[0].episodes("val")
    with h5py.File(episode.path) as file:
        actions, qpos = file[ACTION][()].astype(np.float64), file[QPOS][()].astype(np.float64)
    hold, mean = [], []
    for t in np.linspace(0, len(actions) - 1, 12).round().astype(int):
        truth = actions[t : t + ALOHA["chunk_size"]]  # a simulated episode's chunk starts at t
        hold.append((truth - qpos[t]) ** 2)
        mean.append((truth - stats.action_mean) ** 2)
    assert result["reference"]["hold_state"]["mse"] == pytest.approx(np.concatenate(hold).mean(), rel=1e-4)
    assert result["reference"]["mean_action"]["mse"] == pytest.approx(np.concatenate(mean).mean(), rel=1e-4)
    assert result["reference"]["hold_state"]["mse"] != result["reference"]["mean_action"]["mse"]


def test_relative_actions_come_back_as_the_observed_joints_plus_the_models_offsets(trained_model):
    policy = Policy(trained_model, seed=5)
    assert policy.stats.relative  # the fixture trains as the embedded default does
    frame = np.asarray(random_image(0, DEMO_SIZE))
    qpos = np.linspace(-0.5, 0.5, ALOHA["state_dim"])
    images, state = policy.observe([frame], qpos)
    acted = policy.predict([images], state[None], [TRANSFER_CUBE_INSTRUCTION]).actions
    policy.reseed(5)
    inputs = policy.processor.generation_inputs([images], [TRANSFER_CUBE_INSTRUCTION])
    states = torch.as_tensor(state[None], dtype=torch.float32)
    offsets = policy.model.predict_action(**inputs, states=states, generator=policy.generator).actions.float().numpy()
    low, high = policy.stats.delta_min, policy.stats.delta_max
    np.testing.assert_allclose(acted, qpos + (offsets + 1) / 2 * np.maximum(high - low, 1e-4) + low, atol=1e-4)


def test_open_loop_with_a_limit_spreads_its_samples_and_repeats_with_its_seed(trained_model, tmp_path):
    first = evaluate_open_loop(trained_model, tmp_path / "first", batch_size=3, limit=5, seed=7)
    again = evaluate_open_loop(trained_model, tmp_path / "again", batch_size=3, limit=5, seed=7)
    assert first["samples"] == 5 and first == again
    assert_errors_well_formed(first)


def test_closed_loop_runs_seeded_episodes_and_records_the_first(trained_model, tmp_path):
    results = evaluate_closed_loop(trained_model, tmp_path, episodes=1, seed=3, max_steps=40, video_size=(120, 176))
    result = results["transfer_cube"]
    assert list(results) == ["transfer_cube"] and result["task"] == "transfer_cube"
    assert json.loads((tmp_path / CUBE_RESULT).read_text()) == result
    assert result["episodes"] == 1 and result["seeds"] == [3] and not result["temporal_ensemble"]
    assert 0 <= result["success_rate"] <= 1 and 0 <= result["mean_max_reward"] <= MAX_REWARD
    assert result["max_rewards"] == [result["mean_max_reward"]]
    assert 1 <= result["steps"][0] <= 40
    # the demos' rendering, resized to the model's input as in training
    assert (result["camera"], result["render_size"], result["shadows"]) == ("top", list(DEMO_SIZE), False)
    assert result["instruction"] == TRANSFER_CUBE_INSTRUCTION
    assert result["first_rollout_reasoning"][0]["step"] == 0
    assert read_metrics(tmp_path / METRICS_FILE) == {
        "closed loop (transfer_cube)": {
            "success rate": result["success_rate"],
            "mean max reward": result["mean_max_reward"],
            "episodes": 1.0,
        }
    }
    with Image.open(tmp_path / CUBE_ROLLOUT) as gif:  # at its own size, not the policy's camera's
        assert gif.format == "GIF" and gif.size == (176, 120)
        assert 3 <= gif.n_frames <= math.ceil(result["steps"][0] / GIF_FRAME_STRIDE)
        gif.seek(gif.n_frames - 1)
        assert np.asarray(gif.convert("RGB")).std() > 0


@pytest.mark.parametrize(
    ("temporal_ensemble", "query_every", "queries"),
    [
        (False, None, 2),  # at steps 0 and 10: a 10-step chunk used up, then the next
        (False, 4, 3),  # 0, 4, 8: 4 actions of each chunk (receding horizon)
        (True, None, 12),  # ACT: every step
        (True, 3, 4),  # 0, 3, 6, 9
    ],
)
def test_the_policy_is_queried_every_query_every_steps(
    trained_model, tmp_path, monkeypatch, temporal_ensemble, query_every, queries
):
    calls = []
    predict = Policy.predict

    def counted(policy, images, states, instructions):  # the real prediction, with its step recorded
        calls.append(states[0].copy())
        return predict(policy, images, states, instructions)

    monkeypatch.setattr(Policy, "predict", counted)
    (result,) = evaluate_closed_loop(
        trained_model, tmp_path, episodes=1, max_steps=12, temporal_ensemble=temporal_ensemble,
        query_every=query_every,
    ).values()  # fmt: skip
    assert result["steps"] == [12] and len(calls) == queries
    assert result["query_every"] == (query_every or (1 if temporal_ensemble else ALOHA["chunk_size"]))
    assert not np.array_equal(calls[0], calls[-1])  # each query sees the robot where it is by then


def test_a_query_interval_longer_than_the_chunk_is_an_error(trained_model, tmp_path):
    with pytest.raises(VlaflowError, match="query every 11 steps: the model predicts 10-step chunks"):
        evaluate_closed_loop(trained_model, tmp_path, episodes=1, query_every=11)
    assert not (tmp_path / CUBE_RESULT).exists()


def test_closed_loop_with_temporal_ensembling_beside_an_open_loop_result(trained_model, tmp_path):
    (tmp_path / OPEN_LOOP_FILE).write_text("{}")  # the two evaluations share an output folder
    (result,) = evaluate_closed_loop(
        trained_model, tmp_path, episodes=2, max_steps=4, temporal_ensemble=True, video_size=None
    ).values()
    assert result["temporal_ensemble"] and result["seeds"] == [1000, 1001] and result["steps"] == [4, 4]
    assert not (tmp_path / CUBE_ROLLOUT).exists()
    assert json.loads((tmp_path / OPEN_LOOP_FILE).read_text()) == {}


def test_temporal_ensemble_weights_the_oldest_prediction_most():
    ensemble = TemporalEnsemble()
    chunks = [np.full((3, 2), float(value)) for value in (1, 2, 4, 8)]
    for step, chunk in enumerate(chunks[:3]):
        ensemble.add(step, chunk)
    weights = np.exp(-0.01 * np.arange(3))
    np.testing.assert_allclose(ensemble.action(2), [weights @ [1, 2, 4] / weights.sum()] * 2)
    ensemble.add(3, chunks[3])  # the chunk from step 0 covers steps 0-2 only
    np.testing.assert_allclose(ensemble.action(3), [weights @ [2, 4, 8] / weights.sum()] * 2)


def test_simulation_follows_the_training_demos_or_falls_back_without_them(trained_model, tmp_path):
    policy = Policy(trained_model)
    (setup,) = simulation_setups(policy)
    assert (setup.task.name, setup.render_size, setup.shadows) == ("transfer_cube", DEMO_SIZE, False)
    assert [setup.render_size for setup in simulation_setups(policy, (60, 80))] == [(60, 80)]
    (other,) = simulation_setups(policy, task="insertion")  # a task the demos do not show: its own instruction
    assert (other.task.name, other.instruction, other.render_size) == ("insertion", INSERTION_INSTRUCTION, DEMO_SIZE)

    moved = tmp_path / "model"
    shutil.copytree(trained_model, moved)
    config = yaml.safe_load((moved / CONFIG_FILE).read_text())
    config["data"]["registry"] = str(tmp_path / "gone.yaml")
    (moved / CONFIG_FILE).write_text(yaml.safe_dump(config))
    (setup,) = simulation_setups(Policy(moved))
    assert (setup.camera, setup.render_size, setup.instruction) == ("top", tuple(IMAGE_SIZE), TRANSFER_CUBE_INSTRUCTION)
    assert setup.shadows  # as the stock simulator renders


def test_a_model_without_normalisation_statistics_is_refused(vla_folder, tmp_path):
    message = "no normalisation statistics: the model was not trained on robot data"
    with pytest.raises(VlaflowError, match=message):
        evaluate_open_loop(vla_folder, tmp_path)
    with pytest.raises(VlaflowError, match=message):
        evaluate_closed_loop(vla_folder, tmp_path)


def test_an_existing_result_is_never_overwritten(trained_model, tmp_path):
    (tmp_path / CUBE_RESULT).write_text("{}")
    with pytest.raises(VlaflowError, match="closed_loop_transfer_cube.json: already exists"):
        evaluate_closed_loop(trained_model, tmp_path)


def test_a_stage_cannot_continue_a_model_in_the_other_action_representation(trained_model, mlp_weights, tmp_path):
    config = yaml.safe_load((trained_model / CONFIG_FILE).read_text())
    del config["stage"]  # the model's record of its own stage, not a config key
    config["data"]["relative_actions"] = False
    config_path = tmp_path / "absolute.yaml"
    config_path.write_text(yaml.safe_dump(config))
    message = (
        f"{config_path}: data.relative_actions: False, but the model this stage starts from was trained on "
        f"relative actions over {ALOHA['chunk_size']}-step chunks"
    )
    with pytest.raises(VlaflowError, match=f"^{re.escape(message)}$"):
        train(config_path, "stage1", trained_model, tmp_path / "work", tmp_path / "out", mlp_weights=mlp_weights)
    assert not (tmp_path / "out").exists() and not (tmp_path / "work").exists()
