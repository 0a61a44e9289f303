"""Robot evaluation of a trained model folder.

Open loop: the action chunk predicted for every time step of held-out episodes (a registry split)
against the recorded one, in the robot's units. Closed loop: seeded episodes in the
simulator, the policy in control, on each task its training data shows (`vlaflow.sim.tasks`); an
episode succeeds when its maximum reward reaches 4.
Both write their results into `out_dir` beside each other, each file written atomically, and add
their headline figures to its `metrics.json` (vlaflow.evaluation.metrics).
"""

import json
import time
from collections import deque
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image
from torch.utils.data import ConcatDataset

from vlaflow.data.robot_dataset import RobotEpisodeDataset
from vlaflow.data.stage_data import robot_spec
from vlaflow.errors import VlaflowError
from vlaflow.evaluation.metrics import add_metrics
from vlaflow.evaluation.policy import Policy, robot_datasets
from vlaflow.fs import atomic_file, check_destination
from vlaflow.serving.client import RemotePolicy
from vlaflow.sim.aloha import DT, EPISODE_LENGTH, MAX_REWARD, AlohaSim
from vlaflow.sim.demos import SUMMARY_FILE
from vlaflow.sim.tasks import DEFAULT_TASK, SimTask, sim_task

OPEN_LOOP_FILE = "open_loop.json"
CLOSED_LOOP_FILE = "closed_loop_{task}.json"
ROLLOUT_FILE = "rollout_{task}.gif"
ALOHA_DIM = 14  # the simulator's joints: per arm 6 joints and a gripper, for actions and state alike
GIF_FRAME_STRIDE = 4
TEMPORAL_ENSEMBLE_DECAY = 0.01  # ACT's k in w_i = exp(-k i)


def _refuse_existing(paths: list[Path]) -> None:
    """Fail before any evaluation work if an output exists or cannot be written."""
    for path in paths:
        if path.exists():
            raise VlaflowError(f"{path}: already exists; remove it or choose another output folder")
        check_destination(path)


def _write_json(path: Path, content: dict) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(content, indent=2) + "\n")


class _ErrorSums:
    """Squared and absolute errors per action dimension over the unpadded chunk rows seen so far."""

    def __init__(self, action_dim: int):
        self.squared = np.zeros(action_dim)
        self.absolute = np.zeros(action_dim)
        self.rows = 0

    def add(self, predicted: np.ndarray, truth: np.ndarray, valid: np.ndarray) -> None:
        error = (predicted.astype(np.float64) - truth)[valid]  # (rows, action_dim)
        self.squared += np.square(error).sum(axis=0)
        self.absolute += np.abs(error).sum(axis=0)
        self.rows += len(error)

    def metrics(self) -> dict:
        mse_per_dim, l1_per_dim = self.squared / self.rows, self.absolute / self.rows
        return {
            "mse": float(mse_per_dim.mean()),
            "l1": float(l1_per_dim.mean()),
            "mse_per_dim": mse_per_dim.tolist(),
            "l1_per_dim": l1_per_dim.tolist(),
        }


def evaluate_open_loop(
    model_dir: Path,
    out_dir: Path,
    *,
    split: str = "val",
    datasets: list[str] | None = None,
    batch_size: int = 8,
    limit: int | None = None,
    seed: int = 0,
) -> dict:
    """Predict the action chunk of every time step of the split's episodes (at most `limit`
    steps, evenly spread) and compare it with the recorded chunk over its unpadded rows: MSE and
    L1 in the robot's units, overall and per action dimension. Two trivial policies are scored on
    the same steps, for scale (`reference`): "mean_action", the training data's mean action at
    every step of the chunk, and, where actions are joint positions like the state (as many action
    as state values), "hold_state", the current state kept for the whole chunk. Writes
    `open_loop.json`."""
    if batch_size < 1:
        raise VlaflowError(f"the batch size must be at least 1, not {batch_size}")
    if limit is not None and limit < 1:
        raise VlaflowError(f"the limit must be at least 1 time step, not {limit}")
    out = Path(out_dir) / OPEN_LOOP_FILE
    _refuse_existing([out])
    policy = Policy(model_dir, seed)
    entries = robot_datasets(policy.config, datasets)
    parts = [
        RobotEpisodeDataset(entry.episodes(split), robot_spec(policy.config, entry), policy.stats) for entry in entries
    ]
    samples = ConcatDataset(parts)
    indices = np.arange(len(samples))
    if limit is not None and limit < len(samples):
        indices = np.linspace(0, len(samples) - 1, limit).round().astype(int)
    episodes = sum(len(part.episodes) for part in parts)
    print(f"open loop: {len(indices)} time steps of {episodes} '{split}' episodes", flush=True)

    started = time.perf_counter()
    errors = _ErrorSums(policy.action_dim)
    references = {"mean_action": _ErrorSums(policy.action_dim)}
    if policy.action_dim == policy.state_dim:
        references["hold_state"] = _ErrorSums(policy.action_dim)
    for start in range(0, len(indices), batch_size):
        batch = [samples[int(index)] for index in indices[start : start + batch_size]]
        states = np.stack([sample.state for sample in batch])
        predicted = policy.predict(
            [sample.images for sample in batch], states, [sample.instruction for sample in batch]
        ).actions
        raw_states = policy.stats.unnormalize_state(states)
        truth = policy.stats.unnormalize_actions(np.stack([sample.actions for sample in batch]), raw_states)
        valid = ~np.stack([sample.is_pad for sample in batch])
        errors.add(predicted, truth, valid)
        references["mean_action"].add(np.broadcast_to(policy.stats.action_mean, truth.shape), truth, valid)
        if "hold_state" in references:
            held = raw_states[:, None, :]
            references["hold_state"].add(np.broadcast_to(held, truth.shape), truth, valid)
    result = {
        "split": split,
        "datasets": [entry.name for entry in entries],
        "episodes": episodes,
        "samples": len(indices),
        **errors.metrics(),
        "reference": {name: sums.metrics() for name, sums in references.items()},
    }
    _write_json(out, result)
    references = {f"mse {name}": value["mse"] for name, value in result["reference"].items()}
    add_metrics(out.parent, f"open loop ({split})", {"mse": result["mse"], "l1": result["l1"], **references})
    seconds = time.perf_counter() - started
    reference = ", ".join(f"{name} {value['mse']:.5g}" for name, value in result["reference"].items())
    print(
        f"open loop: MSE {result['mse']:.5g} (trivial policies: {reference}), L1 {result['l1']:.5g} "
        f"({seconds:.1f} s) -> {out}",
        flush=True,
    )
    return result


class TemporalEnsemble:
    """ACT's temporal ensembling: the action for a step is the weighted mean of every chunk's
    prediction for it, the i-th oldest chunk weighted exp(-0.01 i)."""

    def __init__(self):
        self._chunks: deque[tuple[int, np.ndarray]] = deque()  # (step it was predicted at, chunk)

    def add(self, step: int, chunk: np.ndarray) -> None:
        self._chunks.append((step, chunk))

    def action(self, step: int) -> np.ndarray:
        while self._chunks and self._chunks[0][0] + len(self._chunks[0][1]) <= step:
            self._chunks.popleft()
        predictions = np.stack([chunk[step - start] for start, chunk in self._chunks])
        weights = np.exp(-TEMPORAL_ENSEMBLE_DECAY * np.arange(len(predictions)))
        return weights @ predictions / weights.sum()


@dataclass(frozen=True)
class SimulationSetup:
    task: SimTask
    camera: str
    render_size: tuple[int, int]  # (height, width)
    shadows: bool
    instruction: str


def simulation_setups(
    policy: Policy | RemotePolicy, render_size: tuple[int, int] | None = None, task: str | None = None
) -> list[SimulationSetup]:
    """The simulator tasks the model learnt, one setup each, in the order of its training
    datasets: a dataset's task and the size and shadows its recorder rendered with (`demos.json`;
    without one, transfer cube, the model's image size, shadows as the stock simulator), the camera
    the dataset maps to the model's input, the instruction of its first episode; the first dataset
    of a task sets it up. Without the training data at hand: `task` (else transfer cube) with the
    config's camera and the task's instruction. `task` keeps that task alone; a task no dataset
    shows is set up like the first dataset, with its own instruction."""
    cameras = policy.config["data"]["cameras"]
    if len(cameras) != 1:
        raise VlaflowError(f"the simulator renders one camera; the model takes {len(cameras)} (data.cameras)")
    try:
        recorded = [_recorded_setup(policy, entry, render_size) for entry in robot_datasets(policy.config)]
    except VlaflowError as error:
        chosen = sim_task(task or DEFAULT_TASK)
        print(f"closed loop: the training data is not at hand ({error}); using the {chosen.name} instruction")
        return [SimulationSetup(chosen, cameras[0], tuple(render_size or policy.image_size), True, chosen.instruction)]
    setups = {}
    for setup in recorded:
        setups.setdefault(setup.task.name, setup)
    if task is None:
        return list(setups.values())
    chosen = sim_task(task)
    return [setups.get(chosen.name) or replace(recorded[0], task=chosen, instruction=chosen.instruction)]


def _recorded_setup(policy: Policy | RemotePolicy, entry, render_size: tuple[int, int] | None) -> SimulationSetup:
    spec = robot_spec(policy.config, entry)
    instruction = entry.episodes()[0].inspect(spec).instruction
    summary = entry.path / SUMMARY_FILE
    recorded = json.loads(summary.read_text()) if summary.is_file() else {}
    if render_size is None and recorded:
        render_size = (recorded["height"], recorded["width"])
    shadows = recorded.get("shadows", True)
    task = sim_task(recorded.get("task", DEFAULT_TASK))
    return SimulationSetup(task, spec.cameras[0], tuple(render_size or policy.image_size), shadows, instruction)


@dataclass
class Rollout:
    seed: int
    max_reward: int
    steps: int
    seconds: float
    frames: list[np.ndarray]  # every GIF_FRAME_STRIDE-th camera frame at the video's size, when kept
    reasoning: list[dict]  # {"step", "text"} each time the model's reasoning changes


def run_episode(
    sim: AlohaSim,
    policy: Policy | RemotePolicy,
    setup: SimulationSetup,
    seed: int,
    *,
    max_steps: int,
    temporal_ensemble: bool,
    query_every: int,
    video_size: tuple[int, int] | None,
) -> Rollout:
    """One episode from `sim.reset(seed)` until success or `max_steps`. The policy is queried
    every `query_every` steps: without temporal ensembling the robot executes that many actions of
    each chunk (Diffusion Policy's receding horizon), with it each step's action averages every
    chunk that covers the step (ACT). With `video_size`, every GIF_FRAME_STRIDE-th frame is also
    rendered at that size for the video: the policy's own frames are too small to see the
    gripper and the cube."""
    policy.reseed(seed)  # an episode's actions do not depend on the episodes before it
    started = time.perf_counter()
    joints = sim.reset(seed)
    pending: deque[np.ndarray] = deque()
    ensemble = TemporalEnsemble() if temporal_ensemble else None
    frames, reasoning, max_reward = [], [], 0
    for step in range(max_steps):
        if video_size and step % GIF_FRAME_STRIDE == 0:
            frames.append(sim.render(video_size))
        # rendering is much of a step's cost on a CPU: only the frames someone looks at
        if step % query_every == 0:
            output = policy.act([sim.render()], joints.qpos, setup.instruction)
            if not reasoning or reasoning[-1]["text"] != output.reasoning[0]:
                reasoning.append({"step": step, "text": output.reasoning[0]})
            if ensemble is not None:
                ensemble.add(step, output.actions[0])
            else:
                pending = deque(output.actions[0][:query_every])
        joints, reward = sim.step(ensemble.action(step) if ensemble is not None else pending.popleft())
        max_reward = max(max_reward, reward)
        if max_reward == MAX_REWARD:
            break
    return Rollout(seed, max_reward, step + 1, time.perf_counter() - started, frames, reasoning)


def _write_gif(path: Path, frames: list[np.ndarray]) -> None:
    images = [Image.fromarray(frame) for frame in frames]
    with atomic_file(path) as tmp:
        images[0].save(
            tmp,
            format="GIF",
            save_all=True,
            append_images=images[1:],
            duration=round(GIF_FRAME_STRIDE * DT * 1000),  # real time
            loop=0,
        )


def evaluate_closed_loop(
    model_dir: Path,
    out_dir: Path,
    *,
    episodes: int = 10,
    seed: int = 1000,
    max_steps: int = EPISODE_LENGTH,
    temporal_ensemble: bool = False,
    query_every: int | None = None,
    render_size: tuple[int, int] | None = None,
    video_size: tuple[int, int] | None = None,
    task: str | None = None,
    server: str | None = None,
) -> dict[str, dict]:
    """For each simulator task the model learnt (`simulation_setups`; `task` alone when given), run
    `episodes` episodes with seeds `seed`, `seed + 1`, ... under the policy, querying it every
    `query_every` steps (by default every step with temporal ensembling, else once per chunk);
    write `closed_loop_<task>.json` and, with `video_size` (height, width), the first rollout as
    `rollout_<task>.gif` at that size. With `server` (ws://host:port), the policy is the model that
    `vlaflow serve` serves there, reseeded per episode as in process. Returns the results by task."""
    if episodes < 1 or max_steps < 1:
        raise VlaflowError(f"episodes and max_steps must be at least 1, not {episodes} and {max_steps}")
    out_dir = Path(out_dir)
    policy = RemotePolicy(server) if server else Policy(model_dir, seed)
    try:
        if (policy.action_dim, policy.state_dim) != (ALOHA_DIM, ALOHA_DIM):
            raise VlaflowError(
                f"{model_dir}: action/state dimensions {policy.action_dim}/{policy.state_dim}; "
                f"the ALOHA simulator needs {ALOHA_DIM}/{ALOHA_DIM}"
            )
        query_every = query_every or (1 if temporal_ensemble else policy.chunk_size)
        if not 1 <= query_every <= policy.chunk_size:
            raise VlaflowError(
                f"query every {query_every} steps: the model predicts {policy.chunk_size}-step chunks "
                f"(evaluation.robot.query_every from 1 to {policy.chunk_size})"
            )
        setups = simulation_setups(policy, render_size, task)
        outputs = [CLOSED_LOOP_FILE] + ([ROLLOUT_FILE] if video_size else [])
        _refuse_existing([out_dir / name.format(task=setup.task.name) for setup in setups for name in outputs])
        return {
            setup.task.name: _closed_loop(
                policy,
                setup,
                out_dir,
                episodes=episodes,
                seed=seed,
                max_steps=max_steps,
                temporal_ensemble=temporal_ensemble,
                query_every=query_every,
                video_size=video_size,
            )
            for setup in setups
        }
    finally:
        if server:  # the connection closes whatever went wrong
            policy.client.close()


def _closed_loop(
    policy: Policy | RemotePolicy,
    setup: SimulationSetup,
    out_dir: Path,
    *,
    episodes: int,
    seed: int,
    max_steps: int,
    temporal_ensemble: bool,
    query_every: int,
    video_size: tuple[int, int] | None,
) -> dict:
    task = setup.task.name
    sim = AlohaSim(setup.task, *setup.render_size, camera=setup.camera, shadows=setup.shadows)
    rollouts = []
    for number in range(episodes):
        rollout = run_episode(
            sim,
            policy,
            setup,
            seed + number,
            max_steps=max_steps,
            temporal_ensemble=temporal_ensemble,
            query_every=query_every,
            video_size=video_size if number == 0 else None,
        )
        rollouts.append(rollout)
        print(
            f"closed loop ({task}): episode {number + 1}/{episodes} (seed {rollout.seed}): max reward "
            f"{rollout.max_reward}, {rollout.steps} steps in {rollout.seconds:.1f} s "
            f"({1000 * rollout.seconds / rollout.steps:.0f} ms/step)",
            flush=True,
        )
    max_rewards = [rollout.max_reward for rollout in rollouts]
    result = {
        "task": task,
        "episodes": episodes,
        "seeds": [rollout.seed for rollout in rollouts],
        "max_rewards": max_rewards,
        "success_reward": MAX_REWARD,
        "success_rate": sum(reward == MAX_REWARD for reward in max_rewards) / episodes,
        "mean_max_reward": float(np.mean(max_rewards)),
        "temporal_ensemble": temporal_ensemble,
        "query_every": query_every,
        "steps": [rollout.steps for rollout in rollouts],
        "max_steps": max_steps,
        "seconds": [round(rollout.seconds, 3) for rollout in rollouts],
        "camera": setup.camera,
        "render_size": list(setup.render_size),
        "shadows": setup.shadows,
        "instruction": setup.instruction,
        "first_rollout_reasoning": rollouts[0].reasoning,
    }
    if video_size:
        _write_gif(out_dir / ROLLOUT_FILE.format(task=task), rollouts[0].frames)
    _write_json(out_dir / CLOSED_LOOP_FILE.format(task=task), result)
    add_metrics(
        out_dir,
        f"closed loop ({task})",
        {"success rate": result["success_rate"], "mean max reward": result["mean_max_reward"], "episodes": episodes},
    )
    print(
        f"closed loop ({task}): success rate {result['success_rate']:.2f}, mean max reward "
        f"{result['mean_max_reward']:.2f} -> {out_dir / CLOSED_LOOP_FILE.format(task=task)}",
        flush=True,
    )
    return result
