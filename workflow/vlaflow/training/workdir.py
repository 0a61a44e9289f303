"""A training stage's work folder: one trainer at a time, and checkpoints resumed only by the run
they belong to.

Every checkpoint carries a record of what it was trained from: the stage, its resolved settings
(the config's `model` and `data` sections, the stage's datasets and mix, its training settings
except those that only say how often to log and save), and the identity (path, size, modification
time) of the starting model's files, the MLP-weight file and the data files. A run resumes from
the newest checkpoint only if that record equals its own; otherwise the work folder is moved
aside, never deleted, and training starts afresh. A checkpoint without a record was not written
by this workflow and is not resumed either: resuming loads optimizer state, which DeepSpeed
unpickles.
"""

import fcntl
import json
import logging
import os
import shutil
import socket
import time
from pathlib import Path

from vlaflow.config import stage_settings
from vlaflow.errors import VlaflowError
from vlaflow.training.checkpoints import CHECKPOINT, COMPLETE_MARKER, RECORD_FILE, latest_checkpoint

logger = logging.getLogger(__name__)
# Training settings that change how often a run logs and saves, or how fast it loads data, but
# not what it trains: a rerun that changes them resumes.
OPERATIONAL_SETTINGS = ("logging_steps", "save_steps", "save_total_limit", "num_workers")


def file_identity(path: Path) -> dict:
    resolved = Path(path).resolve()
    stat = resolved.stat()
    return {"path": str(resolved), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def run_record(config: dict, stage: str, init: Path, mlp_weights: Path | None, data_files: list[Path]) -> dict:
    training = {key: value for key, value in stage_settings(config, stage).items() if key not in OPERATIONAL_SETTINGS}
    datasets = {key: value for key, value in config["stages"][stage].items() if key != "training"}
    return {
        "stage": stage,
        "settings": {
            "model": config["model"],
            "data": config["data"],
            "stages": {stage: datasets},
            "training": training,
        },
        "the starting model": [file_identity(path) for path in sorted(Path(init).iterdir()) if path.is_file()],
        "the MLP weights": file_identity(mlp_weights) if mlp_weights is not None else None,
        "the data": [file_identity(path) for path in data_files],
    }


def _first_difference(saved, current, key: str = "") -> str | None:
    if isinstance(saved, dict) and isinstance(current, dict):
        for name in sorted(set(saved) | set(current)):
            found = _first_difference(saved.get(name), current.get(name), f"{key}.{name}" if key else name)
            if found:
                return found
        return None
    return None if saved == current else f"{key}: {saved!r}, now {current!r}"


def why_not_resumable(saved: dict | None, current: dict) -> str | None:
    """Why checkpoints with the record `saved` cannot continue the run described by `current`."""
    if saved is None:
        return "its checkpoints have no record of what they were trained from (not written by this workflow)"
    if saved.get("stage") != current["stage"]:
        return f"its checkpoints are of stage {saved.get('stage')!r}, not {current['stage']!r}"
    difference = _first_difference(saved.get("settings"), current["settings"])
    if difference:
        return f"its checkpoints were trained from other settings ({difference})"
    for part in ("the starting model", "the MLP weights", "the data"):
        if saved.get(part) != current[part]:
            return f"its checkpoints were trained from other inputs ({part} changed)"
    return None


def read_record(folder: Path) -> dict | None:
    try:
        return json.loads((Path(folder) / RECORD_FILE).read_text())
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return None


def lock_work_folder(workdir: Path):
    """Hold the work folder for this process (until it exits): a second trainer fails naming the
    first. The lock file sits beside the folder, which may be moved aside."""
    workdir = Path(workdir)
    workdir.parent.mkdir(parents=True, exist_ok=True)
    handle = (workdir.parent / f".{workdir.name}.lock").open("a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "unknown"
        handle.close()
        raise VlaflowError(f"{workdir}: in use by another trainer ({holder}); wait for it to end, or stop it") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"process {os.getpid()} on {socket.gethostname()}")
    handle.flush()
    return handle


def prepare_work_folder(workdir: Path, record: dict) -> None:
    """Make `workdir` ready for the run `record` describes: drop checkpoints a kill cut short,
    move the folder aside if its newest checkpoint belongs to another run, and write the record."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    for folder in workdir.iterdir():
        if CHECKPOINT.match(folder.name) and not (folder / COMPLETE_MARKER).exists():
            logger.warning("removing %s: a checkpoint that was never completed", folder)
            shutil.rmtree(folder)
    newest = latest_checkpoint(workdir)
    reason = why_not_resumable(read_record(newest), record) if newest is not None else None
    if reason is not None:
        aside = _aside(workdir)
        workdir.rename(aside)
        logger.warning("%s: %s; moved it to %s; training starts afresh", workdir, reason, aside)
        workdir.mkdir()
    (workdir / RECORD_FILE).write_text(json.dumps(record, indent=1) + "\n")


def _aside(workdir: Path) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    candidate = workdir.with_name(f"{workdir.name}.superseded-{stamp}")
    number = 1
    while candidate.exists():
        number += 1
        candidate = workdir.with_name(f"{workdir.name}.superseded-{stamp}-{number}")
    return candidate
