"""Record successful demonstrations of a simulator task (`vlaflow.sim.tasks`) as HDF5 episodes,
following ACT's recipe: run the task's scripted plan under end-effector control, then replay its
joint trajectory under joint control while rendering the camera."""

import json
import multiprocessing
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gym_aloha.constants import normalize_puppet_gripper_position

from vlaflow.cpus import available_cpus
from vlaflow.data.hdf5_episodes import write_episode
from vlaflow.errors import VlaflowError
from vlaflow.fs import atomic_directory
from vlaflow.sim.aloha import MAX_REWARD, AlohaSim, EndEffectorAlohaSim
from vlaflow.sim.tasks import DEFAULT_TASK, sim_task

SUMMARY_FILE = "demos.json"


@dataclass
class DemoReport:
    paths: list[Path]  # the episodes written, in seed order
    successes: int
    failures: int
    failed_seeds: list[int]


def scripted_joint_trajectory(task: str, seed: int) -> np.ndarray:
    """(EPISODE_LENGTH, 14) joint targets: the joint positions the scripted plan passes through under
    mocap control, with each gripper replaced by its commanded opening: the measured one stops at the
    cube, and replaying it would not squeeze."""
    sim = EndEffectorAlohaSim(sim_task(task))
    observation = sim.reset(seed)
    plan = sim.task.plan(observation["mocap_pose_left"], observation["mocap_pose_right"], observation["object_poses"])
    trajectory = []
    for action in plan:
        joints = observation["qpos"].copy()
        joints[6] = normalize_puppet_gripper_position(observation["gripper_ctrl"][0])
        joints[13] = normalize_puppet_gripper_position(observation["gripper_ctrl"][2])
        trajectory.append(joints)
        observation = sim.step(action)
    return np.stack(trajectory)


def record_episode(
    task: str, seed: int, path: Path, *, height: int, width: int, camera: str, shadows: bool, compress: bool
) -> int:
    """Replay the task's scripted trajectory for `seed` under joint control; write the episode to
    `path` if it succeeds. Returns the replay's maximum reward."""
    actions = scripted_joint_trajectory(task, seed)
    sim = AlohaSim(sim_task(task), height, width, camera, shadows)
    state = sim.reset(seed)
    qpos, qvel, frames, max_reward = [], [], [], 0
    for action in actions:
        qpos.append(state.qpos)
        qvel.append(state.qvel)
        frames.append(sim.render())
        state, reward = sim.step(action)
        max_reward = max(max_reward, reward)
    if max_reward == MAX_REWARD:
        write_episode(
            path,
            actions=actions,
            qpos=np.stack(qpos),
            qvel=np.stack(qvel),
            images={camera: np.stack(frames)},
            language=sim.task.instruction,
            substep_reasonings=[sim.task.phase_reasoning(step) for step in range(len(actions))],
            sim=True,
            compress=compress,
        )
    return max_reward


def _staged_name(seed: int) -> str:
    return f"seed_{seed}.hdf5"


def _attempt_seeds(
    task: str, staging: Path, episodes: int, seed: int, max_attempts: int, workers: int, **options
) -> dict[int, int]:
    """Try seeds from `seed` on until `episodes` succeed or `max_attempts` are spent; each success is
    written to `staging`. Returns every tried seed's maximum reward."""
    rewards: dict[int, int] = {}
    running = {}
    next_seed = seed
    # EGL contexts do not survive fork, so workers start fresh.
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        while True:
            missing = episodes - sum(reward == MAX_REWARD for reward in rewards.values())
            # Never more attempts in flight than successes missing: the episodes written are then
            # the first successful seeds, whatever the number of workers.
            while len(running) < min(workers, missing) and next_seed - seed < max_attempts:
                path = staging / _staged_name(next_seed)
                running[pool.submit(record_episode, task, next_seed, path, **options)] = next_seed
                next_seed += 1
            if not running:
                return rewards
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                rewards[running.pop(future)] = future.result()


def record_demos(
    out_dir: Path,
    episodes: int,
    *,
    seed: int = 0,
    height: int = 240,
    width: int = 320,
    camera: str = "top",
    shadows: bool = True,
    workers: int | None = None,
    compress: bool = False,
    task: str | None = None,
) -> DemoReport:
    """Write `episodes` successful demonstrations of `task` to `out_dir` as episode_0000.hdf5, ...,
    trying seeds `seed`, `seed + 1`, ... in `workers` processes (at most one per available CPU).
    The folder appears only once complete; its demos.json records the task and how the frames
    were rendered."""
    if episodes < 1:
        raise VlaflowError(f"episodes must be at least 1, not {episodes}")
    task = sim_task(task or DEFAULT_TASK).name  # an unknown task fails here, before any process starts
    max_attempts = 2 * episodes + 5
    out_dir = Path(out_dir)
    with atomic_directory(out_dir) as staging:
        rewards = _attempt_seeds(
            task,
            staging,
            episodes,
            seed,
            max_attempts,
            min(workers or available_cpus(), available_cpus()),
            height=height,
            width=width,
            camera=camera,
            shadows=shadows,
            compress=compress,
        )
        successful = sorted(s for s, reward in rewards.items() if reward == MAX_REWARD)
        failed = sorted(s for s, reward in rewards.items() if reward != MAX_REWARD)
        summary = f"{task} demos: {len(successful)} succeeded, {len(failed)} failed (seeds {failed})"
        print(summary, flush=True)
        if len(successful) < episodes:
            raise VlaflowError(f"{summary}; gave up after {max_attempts} attempts for {episodes} episodes")
        names = [f"episode_{index:04d}.hdf5" for index in range(episodes)]
        for name, episode_seed in zip(names, successful):
            (staging / _staged_name(episode_seed)).rename(staging / name)
        summary_fields = {
            "task": task,
            "episodes": [{"file": name, "seed": s} for name, s in zip(names, successful)],
            "failures": [{"seed": s, "max_reward": rewards[s]} for s in failed],
            "seeds_tried": sorted(rewards),
            "camera": camera,
            "height": height,
            "width": width,
            "shadows": shadows,
        }
        (staging / SUMMARY_FILE).write_text(json.dumps(summary_fields, indent=2))
    return DemoReport([out_dir / name for name in names], len(successful), len(failed), failed)
