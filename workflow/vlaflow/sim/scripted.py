"""ACT's scripted plans (pick-and-transfer, insertion): waypoints for both grippers, linearly
interpolated each step, and the named phases of each plan that give each step its reasoning."""

import bisect

import numpy as np

from vlaflow.sim.aloha import EPISODE_LENGTH

# (name, first step); the names are the keys of vlaflow.data.language.TRANSFER_CUBE_REASONING.
TRANSFER_CUBE_PHASES = (
    ("approach", 0),
    ("descend", 90),
    ("grasp", 130),
    ("lift", 170),
    ("meet", 220),
    ("handover", 260),
    ("retreat", 310),
)
# The keys of vlaflow.data.language.INSERTION_REASONING.
INSERTION_PHASES = (
    ("approach", 0),
    ("descend", 120),
    ("grasp", 170),
    ("lift", 220),
    ("align", 285),
    ("insert", 340),
)

MEET_XYZ = np.array([0.0, 0.5, 0.25])
INSERTION_MEET_XYZ = np.array([0.0, 0.5, 0.15])
INSERTION_RIGHT_LIFT = 0.00715  # ACT's: the peg meets the socket's opening
# How far from the middle each gripper ends. ACT's 0.05 touches the pin under mocap control, but
# the joint-control replay (MuJoCo 3) lags about a millimetre behind and stops short of it.
INSERTION_DEPTH = 0.04
IDENTITY_QUAT = np.array([1.0, 0.0, 0.0, 0.0])


def quaternion_multiply(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Hamilton product of two (w, x, y, z) quaternions."""
    aw, ax, ay, az = a
    bw, bx, by, bz = b
    return np.array(
        [
            aw * bw - ax * bx - ay * by - az * bz,
            aw * bx + ax * bw + ay * bz - az * by,
            aw * by - ax * bz + ay * bw + az * bx,
            aw * bz + ax * by - ay * bx + az * bw,
        ]
    )


def axis_angle_quaternion(axis, degrees: float) -> np.ndarray:
    """The (w, x, y, z) rotation by `degrees` about `axis`."""
    half = np.radians(degrees) / 2
    axis = np.asarray(axis, dtype=np.float64)
    return np.concatenate([[np.cos(half)], np.sin(half) * axis / np.linalg.norm(axis)])


def phase(step: int, phases=TRANSFER_CUBE_PHASES) -> str:
    """The name of the plan's phase that `step` belongs to."""
    if not 0 <= step < EPISODE_LENGTH:
        raise ValueError(f"step {step} is outside the episode's {EPISODE_LENGTH} steps")
    return phases[bisect.bisect_right([start for _, start in phases], step) - 1][0]


def _waypoint(step: int, xyz, quat, gripper: float) -> tuple[int, np.ndarray]:
    return step, np.concatenate([xyz, quat, [gripper]])


def _interpolate(waypoints: list[tuple[int, np.ndarray]]) -> np.ndarray:
    """(EPISODE_LENGTH, 8) poses: each channel linear between waypoints, as ACT does (quaternions
    included, unnormalised)."""
    steps = [step for step, _ in waypoints]
    poses = np.stack([pose for _, pose in waypoints])
    return np.stack([np.interp(np.arange(EPISODE_LENGTH), steps, channel) for channel in poses.T], axis=1)


def pick_and_transfer_actions(
    left_init_pose: np.ndarray, right_init_pose: np.ndarray, object_poses: np.ndarray
) -> np.ndarray:
    """(EPISODE_LENGTH, 16) end-effector actions: the right gripper picks the box up and hands it to
    the left. Init poses are the mocap (xyz, quat) at reset; `object_poses` starts with the box's xyz."""
    box_xyz = np.asarray(object_poses[:3])
    pick_quat = quaternion_multiply(right_init_pose[3:], axis_angle_quaternion([0, 1, 0], -60))
    meet_left_quat = axis_angle_quaternion([1, 0, 0], 90)
    left_meet = MEET_XYZ + [-0.1, 0, -0.02]
    left_hold = MEET_XYZ + [0.02, 0, -0.02]
    left = [
        _waypoint(0, left_init_pose[:3], left_init_pose[3:], 0),
        _waypoint(100, left_meet, meet_left_quat, 1),
        _waypoint(260, left_hold, meet_left_quat, 1),
        _waypoint(310, left_hold, meet_left_quat, 0),
        _waypoint(360, left_meet, IDENTITY_QUAT, 0),
        _waypoint(400, left_meet, IDENTITY_QUAT, 0),
    ]
    right = [
        _waypoint(0, right_init_pose[:3], right_init_pose[3:], 0),
        _waypoint(90, box_xyz + [0, 0, 0.08], pick_quat, 1),
        _waypoint(130, box_xyz + [0, 0, -0.015], pick_quat, 1),
        _waypoint(170, box_xyz + [0, 0, -0.015], pick_quat, 0),
        _waypoint(200, MEET_XYZ + [0.05, 0, 0], pick_quat, 0),
        _waypoint(220, MEET_XYZ, pick_quat, 0),
        _waypoint(310, MEET_XYZ, pick_quat, 1),
        _waypoint(360, MEET_XYZ + [0.1, 0, 0], pick_quat, 1),
        _waypoint(400, MEET_XYZ + [0.1, 0, 0], pick_quat, 1),
    ]
    return np.concatenate([_interpolate(left), _interpolate(right)], axis=1)


def insertion_actions(left_init_pose: np.ndarray, right_init_pose: np.ndarray, object_poses: np.ndarray) -> np.ndarray:
    """(EPISODE_LENGTH, 16) end-effector actions: the right gripper picks up the peg, the left the
    socket, and they meet so that the peg goes into the socket. `object_poses` is the peg's pose
    (xyz, quat), then the socket's."""
    peg_xyz, socket_xyz = np.asarray(object_poses[:3]), np.asarray(object_poses[7:10])
    right_quat = quaternion_multiply(right_init_pose[3:], axis_angle_quaternion([0, 1, 0], -60))
    left_quat = quaternion_multiply(
        right_init_pose[3:], axis_angle_quaternion([0, 1, 0], 60)
    )  # as ACT, from the right's
    lift = [0, 0, INSERTION_RIGHT_LIFT]

    def arm(init_pose, object_xyz, quat, side: int, offset) -> list:
        return [
            _waypoint(0, init_pose[:3], init_pose[3:], 0),
            _waypoint(120, object_xyz + [0, 0, 0.08], quat, 1),
            _waypoint(170, object_xyz + [0, 0, -0.03], quat, 1),
            _waypoint(220, object_xyz + [0, 0, -0.03], quat, 0),
            _waypoint(285, INSERTION_MEET_XYZ + [side * 0.1, 0, 0] + offset, quat, 0),
            _waypoint(340, INSERTION_MEET_XYZ + [side * INSERTION_DEPTH, 0, 0] + offset, quat, 0),
            _waypoint(400, INSERTION_MEET_XYZ + [side * INSERTION_DEPTH, 0, 0] + offset, quat, 0),
        ]

    left = arm(left_init_pose, socket_xyz, left_quat, -1, np.zeros(3))
    right = arm(right_init_pose, peg_xyz, right_quat, 1, np.array(lift))
    return np.concatenate([_interpolate(left), _interpolate(right)], axis=1)
