"""Checkpoints that can be trusted and models that stand alone.

A checkpoint folder in the work folder counts only once it holds the completion marker, written
last; a folder cut short by a kill is never resumed from. Every checkpoint, and the final model
exported from the last one, carries what inference needs besides the weights: the processor and
chat template, the normalisation statistics, the resolved workflow config and the versions.
"""

import json
import platform
import re
import shutil
import subprocess
from importlib import metadata
from pathlib import Path

import yaml

from vlaflow.fs import atomic_directory, link_or_copy

COMPLETE_MARKER = "vlaflow_checkpoint_complete.json"
STATS_FILE = "norm_stats.json"
CONFIG_FILE = "vlaflow_config.yaml"
VERSIONS_FILE = "versions.json"
METRICS_FILE = "metrics.jsonl"
RECORD_FILE = "vlaflow_run.json"  # what the run was trained from; see training/workdir.py
CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
# Trainer's resumable state: the work folder needs it, an exported model does not.
TRAINING_STATE = re.compile(
    r"^(optimizer\.pt|scheduler\.pt|scaler\.pt|rng_state.*\.pth|trainer_state\.json|training_args\.bin|latest"
    r"|zero_to_(?:fp32|torch)\.py|global_step\d+)$"
)
VERSIONED_PACKAGES = ("vlaflow", "torch", "transformers", "accelerate", "deepspeed", "flash-attn", "numpy")


def complete_checkpoints(workdir: Path) -> list[Path]:
    """The complete checkpoints of a work folder, oldest step first."""
    workdir = Path(workdir)
    if not workdir.is_dir():
        return []
    found = []
    for folder in workdir.iterdir():
        match = CHECKPOINT.match(folder.name)
        if match and (folder / COMPLETE_MARKER).is_file():
            found.append((int(match.group(1)), folder))
    return [folder for _, folder in sorted(found)]


def latest_checkpoint(workdir: Path) -> Path | None:
    checkpoints = complete_checkpoints(workdir)
    return checkpoints[-1] if checkpoints else None


def checkpoint_step(folder: Path) -> int:
    return int(CHECKPOINT.match(Path(folder).name).group(1))


def versions() -> dict:
    found = {"python": platform.python_version()}
    for package in VERSIONED_PACKAGES:
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    source = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "-C", str(source), "rev-parse", "HEAD"], capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(source), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
        found["git_commit"] = commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass  # an installed package, not a checkout
    return found


PREPROCESSOR_FILE = "preprocessor_config.json"


def write_run_files(folder: Path, *, processor, stats, config: dict, stage: str, record: dict) -> None:
    """Everything a model folder needs besides weights, to run and to be traced. The processor
    itself is saved with the weights; its image settings also go to `preprocessor_config.json`,
    the file transformers-4-era tools look for (upstream checkpoints lacked it)."""
    folder = Path(folder)
    processor.image_processor.to_json_file(folder / PREPROCESSOR_FILE)
    if stats is not None:
        (folder / STATS_FILE).unlink(missing_ok=True)
        stats.save(folder / STATS_FILE)
    (folder / CONFIG_FILE).write_text(yaml.safe_dump({"stage": stage, **config}, sort_keys=False))
    (folder / VERSIONS_FILE).write_text(json.dumps(versions(), indent=2) + "\n")
    (folder / RECORD_FILE).write_text(json.dumps(record, indent=1) + "\n")


def mark_complete(folder: Path, step: int) -> None:
    (Path(folder) / COMPLETE_MARKER).write_text(json.dumps({"step": step}) + "\n")


def export_model(checkpoint: Path, out: Path, metrics: Path | None = None) -> Path:
    """Write the model of a checkpoint to `out` without the training state, atomically."""
    with atomic_directory(Path(out)) as staging:
        for item in Path(checkpoint).iterdir():
            if TRAINING_STATE.match(item.name) or item.name == COMPLETE_MARKER:
                continue
            if item.is_dir():
                shutil.copytree(item, staging / item.name, copy_function=link_or_copy)
            else:
                link_or_copy(str(item), str(staging / item.name))
        if metrics is not None and metrics.exists():
            shutil.copy2(metrics, staging / METRICS_FILE)
    return Path(out)
