"""`vlaflow train` when things go wrong: a failure ends the process (data workers and all) in
bounded time, a work folder holds one trainer at a time, a log cut by a kill does not stop the
resume, and checkpoints trained from other settings, models or data are never resumed."""

import json
import os
import signal
import subprocess
import sys
import time

import h5py
import pytest
import yaml

from tests.training_helpers import (
    REPO,
    losses,
    start_training,
    train_command,
    training_config,
    training_world,
    wait_for,
)
from vlaflow.training.checkpoints import COMPLETE_MARKER, METRICS_FILE, latest_checkpoint

FAILURE_DEADLINE = 120  # seconds; a hung exit would wait forever


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("safety")
    training_world(root / "data", episodes=3, length=6)
    return root


def config_with(world, path, **training):
    return training_config(path, world / "data", training={"max_steps": 6, "save_steps": 2, **training})


def finish(process: subprocess.Popen, log) -> int:
    try:
        return process.wait(timeout=FAILURE_DEADLINE)
    except subprocess.TimeoutExpired:
        process.kill()
        raise AssertionError(f"still running {FAILURE_DEADLINE} s after the failure:\n{log.read_text()[-3000:]}")


def killed_after_a_checkpoint(arguments: list[str], workdir, log) -> None:
    """Train, and SIGKILL the trainer once its first checkpoint is complete."""
    process = start_training(arguments, log)
    wait_for(lambda: (workdir / "checkpoint-2" / COMPLETE_MARKER).exists(), process)
    process.send_signal(signal.SIGKILL)
    process.wait()


def children_of(pid: int) -> list[int]:
    result = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True)
    return [int(line) for line in result.stdout.split()]


@pytest.fixture
def broken_episode_world(world, tmp_path):
    """The module's data with one training episode whose reasoning text is not UTF-8."""
    data = tmp_path / "data"
    subprocess.run(["cp", "-r", str(world / "data"), str(data)], check=True)
    with h5py.File(data / "robot_a" / "episode_0002.hdf5", "a") as episode:
        length = episode["action"].shape[0]
        episode.create_dataset("substep_reasonings", data=[b"\xff\xfe not utf-8"] * length)
    return data


def test_an_error_in_a_data_worker_ends_training_in_bounded_time(
    broken_episode_world, vla_folder, mlp_weights, tmp_path
):
    config = training_config(
        tmp_path / "config.yaml",
        broken_episode_world,
        training={"max_steps": 40, "save_steps": 20, "num_workers": 1, "per_device_batch_size": 2},
    )
    arguments = train_command(config, "stage1", vla_folder, tmp_path / "work", tmp_path / "out", mlp_weights)
    log = tmp_path / "train.log"
    process = start_training(arguments, log)
    assert finish(process, log) != 0
    assert "UnicodeDecodeError" in log.read_text() or "not UTF-8" in log.read_text()
    assert not (tmp_path / "out").exists()


def test_an_error_in_the_training_process_ends_it_and_its_workers_in_bounded_time(
    world, vla_folder, mlp_weights, tmp_path
):
    """A failure of the trainer itself (an out-of-memory error, say) while workers are running."""
    script = (
        "import sys\n"
        "from vlaflow.training.trainer import VLATrainer\n"
        "compute_loss = VLATrainer.compute_loss\n"
        "def failing(self, *args, **kwargs):\n"
        "    if self.state.global_step == 2:\n"
        "        raise MemoryError('out of memory on purpose')\n"
        "    return compute_loss(self, *args, **kwargs)\n"
        "VLATrainer.compute_loss = failing\n"
        "from vlaflow.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    config = config_with(world, tmp_path / "config.yaml", num_workers=2, per_device_batch_size=2)
    arguments = train_command(config, "stage1", vla_folder, tmp_path / "work", tmp_path / "out", mlp_weights)
    log = tmp_path / "train.log"
    process = start_training(arguments, log, program=[sys.executable, "-c", script])
    wait_for(lambda: len(children_of(process.pid)) >= 2 or process.poll() is not None, process, timeout=300)
    workers = children_of(process.pid)
    assert finish(process, log) != 0
    assert "out of memory on purpose" in log.read_text()
    time.sleep(1)
    assert [pid for pid in workers if os.path.exists(f"/proc/{pid}")] == []


def test_a_log_line_cut_by_a_kill_does_not_stop_the_resume(world, vla_folder, mlp_weights, tmp_path):
    config = config_with(world, tmp_path / "config.yaml")
    workdir = tmp_path / "work"
    arguments = train_command(config, "stage1", vla_folder, workdir, tmp_path / "out", mlp_weights)
    killed_after_a_checkpoint(arguments, workdir, tmp_path / "first.log")
    with (workdir / METRICS_FILE).open("a") as metrics:
        metrics.write('{"step": 3, "loss": 1.2')  # the kill came in the middle of a line
    resumed = start_training(arguments, tmp_path / "second.log")
    assert finish(resumed, tmp_path / "second.log") == 0, (tmp_path / "second.log").read_text()[-3000:]
    assert sorted(losses(tmp_path / "out" / METRICS_FILE)) == list(range(1, 7))


def test_a_second_trainer_in_the_same_work_folder_is_refused(world, vla_folder, mlp_weights, tmp_path):
    config = config_with(world, tmp_path / "config.yaml", max_steps=400, save_steps=400)
    workdir = tmp_path / "work"
    arguments = train_command(config, "stage1", vla_folder, workdir, tmp_path / "out", mlp_weights)
    first = start_training(arguments, tmp_path / "first.log")
    try:
        wait_for(lambda: (workdir / METRICS_FILE).exists(), first)
        second = subprocess.run(
            [sys.executable, "-m", "vlaflow.cli", *arguments], cwd=REPO, capture_output=True, text=True, timeout=300
        )
        assert second.returncode == 2
        assert second.stderr.strip().splitlines()[-1] == (
            f"vlaflow train: error: {workdir}: in use by another trainer (process {first.pid} on "
            f"{os.uname().nodename}); wait for it to end, or stop it"
        )
        assert first.poll() is None  # the first one trains on
    finally:
        first.kill()
        first.wait()


def stage_config(world, path, **stage1_training):
    config = config_with(world, path)
    settings = yaml.safe_load(config.read_text())
    settings["stages"]["stage1"]["training"] = stage1_training
    config.write_text(yaml.safe_dump(settings))
    return config


def test_checkpoints_of_other_settings_are_set_aside_and_training_starts_afresh(
    world, vla_folder, mlp_weights, tmp_path
):
    workdir = tmp_path / "work"
    first = train_command(
        stage_config(world, tmp_path / "a.yaml"), "stage1", vla_folder, workdir, tmp_path / "a", mlp_weights
    )
    assert start_training(first, tmp_path / "a.log").wait(timeout=300) == 0
    before = (tmp_path / "a" / "model.safetensors").read_bytes()

    changed = stage_config(world, tmp_path / "b.yaml", learning_rate=1e-3)
    second = train_command(changed, "stage1", vla_folder, workdir, tmp_path / "b", mlp_weights)
    assert start_training(second, tmp_path / "b.log").wait(timeout=300) == 0
    log = (tmp_path / "b.log").read_text()
    aside = [path for path in tmp_path.iterdir() if path.name.startswith("work.superseded-")]
    assert len(aside) == 1 and latest_checkpoint(aside[0]).name == "checkpoint-6"
    assert f"{workdir}: its checkpoints were trained from other settings" in log and str(aside[0]) in log
    assert "training.learning_rate" in log and "resuming from" not in log
    assert (tmp_path / "b" / "model.safetensors").read_bytes() != before
    assert sorted(losses(tmp_path / "b" / METRICS_FILE)) == list(range(1, 7))


def test_a_changed_init_model_or_mlp_file_is_never_resumed(world, vla_folder, mlp_weights, tmp_path):
    config = stage_config(world, tmp_path / "c.yaml")
    workdir = tmp_path / "work"
    arguments = train_command(config, "stage1", vla_folder, workdir, tmp_path / "out", mlp_weights)
    killed_after_a_checkpoint(arguments, workdir, tmp_path / "first.log")

    other_mlp = tmp_path / "other_mlp.safetensors"
    other_mlp.write_bytes(mlp_weights.read_bytes())
    os.utime(other_mlp, ns=(0, 0))  # same bytes, another file: its identity is what the record holds
    again = train_command(config, "stage1", vla_folder, workdir, tmp_path / "out", other_mlp)
    assert start_training(again, tmp_path / "second.log").wait(timeout=300) == 0
    log = (tmp_path / "second.log").read_text()
    assert "resuming from" not in log and "the MLP weights" in log


def test_an_interrupted_run_with_the_same_settings_still_resumes(world, vla_folder, mlp_weights, tmp_path):
    config = stage_config(world, tmp_path / "d.yaml")
    workdir = tmp_path / "work"
    arguments = train_command(config, "stage1", vla_folder, workdir, tmp_path / "out", mlp_weights)
    killed_after_a_checkpoint(arguments, workdir, tmp_path / "first.log")
    step = int(latest_checkpoint(workdir).name.split("-")[1])
    assert start_training(arguments, tmp_path / "second.log").wait(timeout=300) == 0
    assert f"resuming from {workdir / f'checkpoint-{step}'} (step {step})" in (tmp_path / "second.log").read_text()
    assert not any(path.name.startswith("work.superseded-") for path in tmp_path.iterdir())


def test_a_work_folder_vlaflow_did_not_write_is_never_resumed(world, vla_folder, mlp_weights, tmp_path):
    """Resuming loads optimizer state, which DeepSpeed unpickles: a checkpoint without vlaflow's
    record of what it was trained from is never loaded."""
    config = stage_config(world, tmp_path / "e.yaml")
    workdir = tmp_path / "work"
    arguments = train_command(config, "stage1", vla_folder, workdir, tmp_path / "out", mlp_weights)
    killed_after_a_checkpoint(arguments, workdir, tmp_path / "first.log")
    for record in workdir.rglob("vlaflow_run.json"):
        record.unlink()
    assert start_training(arguments, tmp_path / "second.log").wait(timeout=300) == 0
    log = (tmp_path / "second.log").read_text()
    assert "resuming from" not in log and "no record of what they were trained from" in log
    assert json.loads((tmp_path / "out" / "vlaflow_run.json").read_text())["stage"] == "stage1"
