"""Trainer callbacks: per-step metrics as JSONL, and stopping cleanly when the scheduler says so."""

import json
import signal
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import TrainerCallback

# SLURM sends SIGTERM at preemption and, with --signal, SIGUSR1 before the time limit.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


def truncate_log(path: Path, step: int) -> None:
    """Drop the lines of a JSONL log that a killed run wrote after the checkpoint it resumes from,
    and a last line that a kill cut in the middle of its writing."""
    path = Path(path)
    if not path.exists():
        return
    kept = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        if entry["step"] <= step:
            kept.append(line)
    path.write_text("".join(line + "\n" for line in kept))


class MetricsLog(TrainerCallback):
    """One JSON object per logged step (loss, its components, learning rate, ...) for the report."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            with self.path.open("a") as file:
                file.write(json.dumps({"step": state.global_step, "epoch": state.epoch, **logs}) + "\n")


class StopOnSignal(TrainerCallback):
    """On SIGTERM or SIGUSR1, finish the current step, save a checkpoint and stop; all ranks agree
    on the step. Also makes sure the last step is saved, whatever `save_steps` is."""

    def __init__(self):
        self.received: int | None = None
        self.previous = {number: signal.signal(number, self._receive) for number in STOP_SIGNALS}

    def restore(self) -> None:
        """Give the signals back to whoever handled them before training."""
        for number, handler in self.previous.items():
            signal.signal(number, handler)

    def _receive(self, number, frame) -> None:
        self.received = number

    def _any_rank_received(self) -> bool:
        flag = torch.tensor([0 if self.received is None else self.received])
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            if dist.get_backend() == "nccl":
                flag = flag.cuda()
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() and self.received is None:
            self.received = int(flag.item())
        return bool(flag.item())

    def on_step_end(self, args, state, control, **kwargs):
        if self._any_rank_received():
            control.should_save = True
            control.should_training_stop = True
        elif state.global_step >= state.max_steps:
            control.should_save = True
        return control
