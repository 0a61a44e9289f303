"""Milliseconds per closed-loop step of a simulator task (transfer cube by default), by what gets rendered.

The stock task renders on every step; the closed loop needs a frame only when the policy is
queried (every chunk_size-th step without temporal ensembling), and shadows are most of a frame's
cost in software rendering. All variants step the same seeded episode with the same actions,
alternating rounds, measured side by side in one run; ratios are against rendering every step
with shadows.

    python -m tests.benchmarks.sim_step
    python -m tests.benchmarks.sim_step --height 240 --width 320 --steps 200 --rounds 5 --task insertion
"""

import argparse
import statistics
import time

import numpy as np

from vlaflow.sim.aloha import AlohaSim
from vlaflow.sim.tasks import SIM_TASKS, sim_task

# (label, shadows, render every n-th step; 0: never)
VARIANTS = [
    ("every step, shadows", True, 1),
    ("every step, no shadows", False, 1),
    ("every 16th step, shadows", True, 16),
    ("every 16th step, no shadows", False, 16),
    ("physics only", True, 0),
]


def time_episode(sim: AlohaSim, actions: np.ndarray, render_every: int) -> float:
    sim.reset(seed=0)
    started = time.perf_counter()
    for step, action in enumerate(actions):
        if render_every and step % render_every == 0:
            sim.render()
        sim.step(action)
    return (time.perf_counter() - started) / len(actions)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--height", type=int, default=96)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--task", choices=sorted(SIM_TASKS), default="transfer_cube")
    args = parser.parse_args()

    task = sim_task(args.task)
    sims = {label: AlohaSim(task, args.height, args.width, shadows=shadows) for label, shadows, _ in VARIANTS}
    start = next(iter(sims.values())).reset(seed=0).qpos
    # a slow sweep of the joints, so the arms move in view
    actions = start + np.linspace(0, 0.3, args.steps)[:, None] * np.sign(np.arange(14) % 3 - 1)
    for label, _, every in VARIANTS:  # warm-up: the first frame allocates the GL buffers
        time_episode(sims[label], actions[:2], every)

    seconds = {label: [] for label, _, _ in VARIANTS}
    for _ in range(args.rounds):
        for label, _, every in VARIANTS:
            seconds[label].append(time_episode(sims[label], actions, every))
    reference = statistics.median(seconds[VARIANTS[0][0]])
    print(f"{args.height}x{args.width}, {args.steps} steps, median of {args.rounds} rounds")
    print(f"{'rendering':<30} {'ms/step':>8} {'ratio':>7}")
    for label, _, _ in VARIANTS:
        median = statistics.median(seconds[label])
        print(f"{label:<30} {1000 * median:8.2f} {median / reference:7.3f}")


if __name__ == "__main__":
    main()
