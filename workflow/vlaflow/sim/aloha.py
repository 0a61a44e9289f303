"""ALOHA's simulated scenes (gym-aloha's tasks: transfer cube, insertion) in two forms: joint-position
control that renders one camera on demand (what a policy sees and drives), and end-effector (mocap)
control without cameras (what the scripted plan drives). Which task is a `vlaflow.sim.tasks` entry."""

import os

os.environ.setdefault("MUJOCO_GL", "egl")  # headless rendering; must be set before dm_control loads

from dataclasses import dataclass

import numpy as np
from dm_control import mujoco
from dm_control.mujoco.wrapper.mjbindings import enums
from dm_control.rl import control
from dm_control.suite import base
from gym_aloha.constants import ASSETS_DIR, DT
from gym_aloha.tasks import sim as joint_tasks
from gym_aloha.tasks.sim_end_effector import InsertionEndEffectorTask, TransferCubeEndEffectorTask

EPISODE_LENGTH = 400  # ACT's simulated episodes
MAX_REWARD = 4  # success: the left gripper holds the cube above the table; the peg touches the socket's pin
ROBOT_QPOS = 16  # the two arms' joints and finger joints come first in qpos; the objects' free joints follow
# MuJoCo 3 weld constraints carry a torque scale (equality data column 10). At the default 1 the
# mocap weld cannot hold the gripper's orientation against the arm's actuators and the grasp fails.
WELD_TORQUE_SCALE_COLUMN = 10
WELD_TORQUE_SCALE = 3.75
# The scene asks for a 4096² shadow map, most of a frame's cost in software rendering (Mesa llvmpipe);
# at 2048² the frames differ from it by 0.03 grey levels on average, at about two thirds of the cost.
SHADOW_MAP_SIZE = 2048


@dataclass(frozen=True)
class JointState:
    qpos: np.ndarray  # (14,) joint positions, grippers normalised to 0 (closed) .. 1 (open)
    qvel: np.ndarray  # (14,)


class _UnrenderedJointTask:
    """gym-aloha's joint tasks render every camera at 480x640 on every step; frames are rendered
    only when asked for (AlohaSim.render)."""

    def get_observation(self, physics):
        return JointState(qpos=self.get_qpos(physics), qvel=self.get_qvel(physics))


class TransferCubeJointTask(_UnrenderedJointTask, joint_tasks.TransferCubeTask):
    pass


class InsertionJointTask(_UnrenderedJointTask, joint_tasks.InsertionTask):
    pass


class _SeededCameralessEndEffectorTask:
    """gym-aloha's end-effector tasks place their objects at random, unseeded; these place them at
    `object_poses` and render no camera."""

    object_poses: np.ndarray

    def initialize_episode(self, physics):
        self.initialize_robots(physics)
        physics.data.qpos[ROBOT_QPOS:] = self.object_poses
        base.Task.initialize_episode(self, physics)  # skips the parent's unseeded placement

    def get_observation(self, physics):
        return {
            "qpos": self.get_qpos(physics),
            "object_poses": physics.data.qpos[ROBOT_QPOS:].copy(),
            "mocap_pose_left": np.concatenate([physics.data.mocap_pos[0], physics.data.mocap_quat[0]]),
            "mocap_pose_right": np.concatenate([physics.data.mocap_pos[1], physics.data.mocap_quat[1]]),
            "gripper_ctrl": physics.data.ctrl.copy(),
        }


class TransferCubeEndEffectorTaskSeeded(_SeededCameralessEndEffectorTask, TransferCubeEndEffectorTask):
    pass


class InsertionEndEffectorTaskSeeded(_SeededCameralessEndEffectorTask, InsertionEndEffectorTask):
    pass


def _environment(xml: str, task: base.Task) -> control.Environment:
    physics = mujoco.Physics.from_xml_path(str(ASSETS_DIR / xml))
    return control.Environment(physics, task, time_limit=float("inf"), control_timestep=DT, flat_observation=False)


def _without_shadows(physics, scene) -> None:
    scene.flags[enums.mjtRndFlag.mjRND_SHADOW] = 0


class AlohaSim:
    """Joint-position control of a task's scene: actions are 14 absolute joint targets with
    normalised grippers; the reward runs 0..4, and 4 (MAX_REWARD) is success. `render` gives the
    camera's frame of the current state; without `shadows` a frame costs less than half as much in
    software rendering."""

    def __init__(self, task, height: int = 240, width: int = 320, camera: str = "top", shadows: bool = True):
        self.task = task
        self._env = _environment(task.joint_xml, task.joint_task())
        self._env.physics.model.vis.quality.shadowsize = SHADOW_MAP_SIZE  # read when the first frame is rendered
        self.height, self.width, self.camera, self.shadows = height, width, camera, shadows

    def reset(self, seed: int) -> JointState:
        joint_tasks.BOX_POSE[0] = self.task.object_poses(seed)  # gym-aloha's joint tasks read their objects here
        return self._env.reset().observation

    def step(self, action: np.ndarray) -> tuple[JointState, int]:
        step = self._env.step(np.asarray(action, dtype=np.float64))
        return step.observation, int(step.reward)

    def render(self, size: tuple[int, int] | None = None) -> np.ndarray:
        """(height, width, 3) uint8, at the camera's size or at `size` (height, width)."""
        height, width = size or (self.height, self.width)
        return self._env.physics.render(
            height=height,
            width=width,
            camera_id=self.camera,
            scene_callback=None if self.shadows else _without_shadows,
        )


class EndEffectorAlohaSim:
    """Mocap control of a task's scene: actions are, per arm (left, then right), the gripper's xyz,
    quaternion (w, x, y, z) and normalised opening. Observations are dicts with `qpos`,
    `object_poses` (each object's xyz and quaternion), the two mocap poses and the gripper
    actuators' `gripper_ctrl`."""

    def __init__(self, task):
        self.task = task
        self._task = task.end_effector_task()
        self._env = _environment(task.end_effector_xml, self._task)
        self._env.physics.model.eq_data[:, WELD_TORQUE_SCALE_COLUMN] = WELD_TORQUE_SCALE

    def reset(self, seed: int) -> dict:
        self._task.object_poses = self.task.object_poses(seed)
        return self._env.reset().observation

    def step(self, action: np.ndarray) -> dict:
        return self._env.step(np.asarray(action, dtype=np.float64)).observation
