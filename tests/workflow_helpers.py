"""Real Snakemake runs of the workflow on tiny configurations: HDF5 episodes and LLaVA
conversations from the data factory, an EasyVQA TSV, steps counted in single digits; or the
embedded default itself (simulator demos, easy-vqa) scaled down."""

import os
import subprocess
import sys
from pathlib import Path

import yaml

from tests.conftest import ACTION_DIM, CHUNK_SIZE, STATE_DIM
from tests.data_factory import make_data_root, recipe_stages
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
        "stages": recipe_stages(mix={"vl_ratio": 0.5}),
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


def embedded_workflow(root: Path) -> Path:
    """The embedded default (config/config.yaml: the workflow builds its demos and easy-vqa data)
    with its paths under `root` and its sizes cut to seconds: 3 demos (the registry's val split
    holds 2), a few training steps, one short simulator episode. Returns the config."""
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    config["results"] = str(root / "results")
    config["data"].update(root=str(root / "resources" / "data"), registry=str(REPO / "config" / "datasets.yaml"))
    config["embedded"]["aloha_demos"].update(episodes=3, height=48, width=64)
    config["embedded"]["easy_vqa"].update(train_images=16, benchmark_questions=8)
    config["evaluation"]["vqa"]["lmudata"] = str(root / "resources" / "LMUData")
    config["evaluation"]["robot"].update(limit=8, episodes=1, max_steps=16)
    config["training"].update(max_steps=2, per_device_batch_size=2, save_steps=2, num_workers=0)
    for stage in config["stages"].values():
        stage.pop("training", None)  # the default's longer stages, cut to the steps above
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _command(root: Path, arguments, config: Path | None, base_env: dict | None = None) -> tuple[list[str], dict]:
    env = {**(base_env or os.environ), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"  # the `vlaflow` command
    command = SNAKEMAKE + ["--directory", str(root), "--configfile", str(config or root / "config.yaml")]
    return command + list(arguments), env


def snakemake(
    root: Path, *arguments: str, config: Path | None = None, env: dict | None = None
) -> subprocess.CompletedProcess:
    """`snakemake` in `root` with its config; `env` is the base environment (default: this process's)."""
    command, run_env = _command(root, arguments, config, env)
    return subprocess.run(command, env=run_env, capture_output=True, text=True)


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
