"""The simulator tasks, by name: a task is one entry here plus its gym-aloha task classes
(`vlaflow.sim.aloha`) and its scripted plan (`vlaflow.sim.scripted`). Demonstrations record a task
(`vlaflow data aloha-demos --task`, `embedded.aloha_demos.datasets`), their `demos.json` names it, and
closed-loop evaluation runs the task its model's training data shows."""

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from gym_aloha.utils import sample_box_pose, sample_insertion_pose

from vlaflow.data import language
from vlaflow.errors import VlaflowError
from vlaflow.sim import aloha, scripted


@dataclass(frozen=True)
class SimTask:
    name: str
    joint_xml: str
    end_effector_xml: str
    joint_task: type  # gym-aloha's joint-control task, rendering on demand
    end_effector_task: type  # gym-aloha's end-effector task, its objects placed by seed
    object_poses: Callable[[int], np.ndarray]  # seed -> every object's xyz and quaternion, in qpos order
    plan: Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]  # (left, right mocap pose, objects) -> actions
    phases: tuple[tuple[str, int], ...]  # (name, first step) of the plan's phases
    instruction: str
    reasoning: dict[str, str]  # phase name -> what the model says before acting in it

    def phase_reasoning(self, step: int) -> str:
        return self.reasoning[scripted.phase(step, self.phases)]


SIM_TASKS = {
    "transfer_cube": SimTask(
        "transfer_cube",
        "bimanual_viperx_transfer_cube.xml",
        "bimanual_viperx_end_effector_transfer_cube.xml",
        aloha.TransferCubeJointTask,
        aloha.TransferCubeEndEffectorTaskSeeded,
        sample_box_pose,
        scripted.pick_and_transfer_actions,
        scripted.TRANSFER_CUBE_PHASES,
        language.TRANSFER_CUBE_INSTRUCTION,
        language.TRANSFER_CUBE_REASONING,
    ),
    "insertion": SimTask(
        "insertion",
        "bimanual_viperx_insertion.xml",
        "bimanual_viperx_end_effector_insertion.xml",
        aloha.InsertionJointTask,
        aloha.InsertionEndEffectorTaskSeeded,
        lambda seed: np.concatenate(sample_insertion_pose(seed)),
        scripted.insertion_actions,
        scripted.INSERTION_PHASES,
        language.INSERTION_INSTRUCTION,
        language.INSERTION_REASONING,
    ),
}
DEFAULT_TASK = "transfer_cube"  # what demonstrations without a recorded task show


def sim_task(name: str) -> SimTask:
    if name not in SIM_TASKS:
        raise VlaflowError(f"simulator task {name!r}: unknown; the tasks are {', '.join(SIM_TASKS)}")
    return SIM_TASKS[name]
