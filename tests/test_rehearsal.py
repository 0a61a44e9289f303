"""The rehearsal of the published recipe, `config/rehearsal.yaml`, through Snakemake: a backbone
laid out as the hub release, DeepSpeed's launcher with two ranks, ZeRO-2, bf16, gradient
checkpointing, stage 1 then stage 2 co-trained with vision-language data of varied native sizes."""

import json

import pytest
import torch
import yaml
from PIL import Image
from safetensors import safe_open

from tests.workflow_helpers import REPO, snakemake
from vlaflow.training.checkpoints import METRICS_FILE

REHEARSAL = REPO / "config" / "rehearsal.yaml"


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory):
    """The shipped rehearsal config, run in a folder of its own: only the paths that the README's
    command resolves from the repository are made absolute."""
    root = tmp_path_factory.mktemp("rehearsal")
    config = yaml.safe_load(REHEARSAL.read_text())
    config["data"]["registry"] = str(REPO / config["data"]["registry"])
    config["training"]["deepspeed"] = str(REPO / config["training"]["deepspeed"])
    path = root / "rehearsal.yaml"
    path.write_text(yaml.safe_dump(config))
    result = snakemake(root, "--cores", "2", "all", config=path)
    return root, config, result


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.slow
def test_the_rehearsal_runs_the_published_recipe_end_to_end(rehearsal):
    root, config, result = rehearsal
    assert result.returncode == 0, result.stderr[-6000:]
    results = root / config["results"]
    assert (results / "report" / "report.html").is_file()
    for stage in ("stage1", "stage2"):
        assert (results / "eval" / stage / "vqa").is_dir() and (results / "eval" / stage / "robot").is_dir()
        log = (results / "logs" / f"{stage}.log").read_text()
        spawned = [line for line in log.splitlines() if "spawned with command" in line]  # DeepSpeed's launcher
        assert len(spawned) == 2 and not any("--local_rank" in line for line in spawned)
        work = results / "work" / stage
        assert sorted(path.name for path in work.glob("samples-rank*.jsonl")) == [
            "samples-rank0.jsonl", "samples-rank1.jsonl",
        ]  # fmt: skip
        losses = [entry["loss"] for entry in read_jsonl(results / "models" / stage / METRICS_FILE) if "loss" in entry]
        assert len(losses) == config["training"]["max_steps"] and all(loss == loss for loss in losses)
        with safe_open(results / "models" / stage / "model.safetensors", "pt") as weights:
            assert weights.get_tensor("policy_head.final_layer.linear.weight").dtype == torch.bfloat16  # bf16 training


@pytest.mark.slow
def test_ranks_get_different_mixes_within_the_first_steps_of_stage2(rehearsal):
    root, config, result = rehearsal
    assert result.returncode == 0, result.stderr[-6000:]
    work = root / config["results"] / "work" / "stage2"
    ranks = [read_jsonl(work / f"samples-rank{rank}.jsonl") for rank in (0, 1)]

    def robot_only(entry):
        return all(".hdf5:" in source for source in entry["sources"])

    divergent = [first["step"] for first, second in zip(*ranks) if robot_only(first) != robot_only(second)]
    assert divergent and divergent[0] <= 3, divergent
    assert all(first["noise_seed"] != second["noise_seed"] for first, second in zip(*ranks))


@pytest.mark.slow
def test_the_rehearsals_vision_language_data_has_varied_native_sizes_and_text_only_samples(rehearsal):
    root, config, result = rehearsal
    assert result.returncode == 0, result.stderr[-6000:]
    folder = root / config["data"]["root"] / "easy_vqa"
    sizes = set()
    for image in (folder / "images").iterdir():
        with Image.open(image) as opened:
            sizes.add(opened.size)
    assert sizes == {(width, height) for height, width in config["embedded"]["easy_vqa"]["image_sizes"]}
    entries = json.loads((folder / "easy_vqa_train.json").read_text())
    assert any("image" not in entry for entry in entries)
    check = (root / config["results"] / "data_check.txt").read_text()
    assert "too long" in check and "0 of 48" in check
