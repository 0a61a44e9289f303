"""Real Snakemake runs of the workflow on a tiny configuration: HDF5 episodes and LLaVA
conversations from the data factory, an EasyVQA TSV, steps counted in single digits."""

import os
import subprocess
import sys
from pathlib import Path

import yaml

from tests.conftest import ACTION_DIM, CHUNK_SIZE, STATE_DIM
from tests.data_factory import make_data_root
from vlaflow.data.easy_vqa import build_easy_vqa_benchmark

REPO = Path(__file__).parents[1]
SNAKEMAKE = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile")]


def tiny_workflow(root: Path, **overrides) -> Path:
    """A working directory with data, an LMUData folder and `config.yaml`; returns the config."""
    data = root / "data"
    if not data.exists():
        make_data_root(data, episodes=3, length=8, vl_count=8)
        build_easy_vqa_benchmark(root / "LMUData" / "EasyVQA.tsv", limit=8)
    config = {
        "results": str(root / "results"),
        "model": {"action_dim": ACTION_DIM, "state_dim": STATE_DIM, "chunk_size": CHUNK_SIZE},
        "data": {"root": str(data), "registry": str(data / "datasets.yaml"), "image_size": [32, 32], "max_length": 256},
        "training": {"max_steps": 4, "per_device_batch_size": 4, "save_steps": 2, "logging_steps": 1, "num_workers": 0},
        "evaluation": {
            "vqa": {"benchmarks": ["EasyVQA"], "lmudata": str(root / "LMUData"), "max_new_tokens": 2},
            "robot": {"episodes": 0},
        },
        "stages": {
            "vlm": {"vl": ["vl_a"]},
            "stage1": {"robot": ["robot_a"]},
            "stage2": {"robot": ["robot_a"], "vl": ["vl_a"], "mix": {"vl_ratio": 0.5}},
        },
    }
    for key, value in overrides.items():
        section, _, name = key.partition("__")
        target = config.setdefault(section, {})
        for part in name.split("__")[:-1]:
            target = target.setdefault(part, {})
        target[name.split("__")[-1]] = value
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _command(root: Path, arguments, config: Path | None) -> tuple[list[str], dict]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"  # the `vlaflow` command
    command = SNAKEMAKE + ["--directory", str(root), "--configfile", str(config or root / "config.yaml")]
    return command + list(arguments), env


def snakemake(root: Path, *arguments: str, config: Path | None = None) -> subprocess.CompletedProcess:
    command, env = _command(root, arguments, config)
    return subprocess.run(command, env=env, capture_output=True, text=True)


def start_snakemake(root: Path, *arguments: str) -> subprocess.Popen:
    command, env = _command(root, arguments, None)
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def planned_jobs(result: subprocess.CompletedProcess) -> dict[str, int]:
    """The job counts of a dry run's summary table."""
    lines = result.stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("job ")) + 2
    jobs = {}
    for line in lines[start:]:
        name, _, count = line.partition(" ")
        if name == "total" or not count.strip():
            break
        jobs[name] = int(count)
    return jobs
