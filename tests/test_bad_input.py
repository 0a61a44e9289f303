"""Bad input, through the real command line: each case ends with a non-zero exit and one line
naming the file (or the option) and the field, before any training or evaluation work, with no
traceback and nothing partial left behind."""

import json
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import h5py
import pytest

from tests.data_factory import make_config, make_data_root
from tests.training_helpers import REPO, train_command, training_config
from vlaflow.data.easy_vqa import build_easy_vqa_benchmark
from vlaflow.training.run import train


def vlaflow(*arguments) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "vlaflow.cli", *map(str, arguments)], cwd=REPO, capture_output=True, text=True
    )


def bomb_png() -> bytes:
    """A PNG whose header claims 30000 x 30000 pixels: Pillow refuses it as a decompression bomb
    before decoding anything."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 30000, 30000, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, vla_folder, mlp_weights):
    """A stage-1 model trained for two steps, and the data it came from."""
    root = tmp_path_factory.mktemp("bad-input")
    make_data_root(root / "data", episodes=3, length=6)
    config = training_config(root / "config.yaml", root / "data", training={"max_steps": 2, "save_steps": 2})
    model = train(config, "stage1", vla_folder, root / "work", root / "model", mlp_weights=mlp_weights)
    build_easy_vqa_benchmark(root / "LMUData" / "EasyVQA.tsv", limit=4)
    return {"root": root, "config": config, "model": model}


def case_world(trained, tmp_path) -> dict:
    """A private copy of the data, benchmark and model, for a case to break."""
    shutil.copytree(trained["root"] / "data", tmp_path / "data")
    shutil.copytree(trained["root"] / "LMUData", tmp_path / "LMUData")
    shutil.copytree(trained["model"], tmp_path / "model")
    return {
        "data": tmp_path / "data",
        "lmudata": tmp_path / "LMUData",
        "model": tmp_path / "model",
        "config": make_config(tmp_path / "config.yaml", tmp_path / "data"),
    }


def set_text(world, field: str, value: bytes):
    episode = world["data"] / "robot_a" / "episode_0001.hdf5"
    with h5py.File(episode, "a") as file:
        length = file["action"].shape[0]
        if field in file:
            del file[field]
        file.create_dataset(field, data=[value] * (length if field == "substep_reasonings" else 1))
    return episode, f"/{field}"


def set_conversation(world, change):
    annotation = world["data"] / "vl_a" / "train.json"
    entries = json.loads(annotation.read_text())
    change(entries)
    annotation.write_text(json.dumps(entries))
    return annotation


def data_check(world, tmp_path):
    return ["data", "check", "--config", world["config"]], None


def non_utf8_substeps(world, tmp_path):
    file, field = set_text(world, "substep_reasonings", b"\xff\xfe")
    return ["data", "check", "--config", world["config"]], f"{file}: {field}: entry 0: not UTF-8 text"


def non_utf8_instruction(world, tmp_path):
    file, field = set_text(world, "language_raw", b"pick \xff up")
    return ["data", "check", "--config", world["config"]], f"{file}: {field}: not UTF-8 text"


def non_utf8_substeps_in_training(world, tmp_path):
    file, field = set_text(world, "substep_reasonings", b"\xff\xfe")
    config = training_config(tmp_path / "train.yaml", world["data"])
    arguments = train_command(config, "stage2", world["model"], tmp_path / "work", tmp_path / "out")
    return arguments, f"{file}: {field}: entry 0: not UTF-8 text"


def bomb_in_conversations(world, tmp_path):
    image = world["data"] / "vl_a" / "images" / "img" / "0.png"
    image.write_bytes(bomb_png())
    return ["data", "check", "--config", world["config"]], f"{image}: image of "


def image_outside_the_image_folder(world, tmp_path):
    def change(entries):
        entries[0]["image"] = "../../../etc/passwd"

    annotation = set_conversation(world, change)
    return ["data", "check", "--config", world["config"]], f"{annotation}: entry 0 (id 0): image: '../../../etc/passwd'"


def absolute_image_path(world, tmp_path):
    def change(entries):
        entries[0]["image"] = "/etc/passwd"

    annotation = set_conversation(world, change)
    return ["data", "check", "--config", world["config"]], f"{annotation}: entry 0 (id 0): image: '/etc/passwd'"


def empty_answer(world, tmp_path):
    def change(entries):
        entries[0]["conversations"][1]["value"] = "  "

    annotation = set_conversation(world, change)
    expected = f"{annotation}: entry 0 (id 0): conversations[1].value: an empty gpt answer"
    return ["data", "check", "--config", world["config"]], expected


def negative_image_sample(world, tmp_path):
    return ["data", "check", "--config", world["config"], "--sample-images", "-1"], "argument --sample-images: -1"


def non_utf8_benchmark(world, tmp_path):
    tsv = world["lmudata"] / "EasyVQA.tsv"
    tsv.write_bytes(tsv.read_bytes() + b"99\t\xff\xfe\n")
    arguments = ["eval", "vqa", "--model", world["model"], "--benchmarks", "EasyVQA", "--lmudata", world["lmudata"]]
    return arguments + ["--out", tmp_path / "out"], f"{tsv}: not UTF-8 text"


def bomb_in_benchmark(world, tmp_path):
    import base64

    tsv = world["lmudata"] / "EasyVQA.tsv"
    lines = tsv.read_text().splitlines()
    header, first = lines[0].split("\t"), lines[1].split("\t")
    first[header.index("image")] = base64.b64encode(bomb_png()).decode()
    tsv.write_text("\n".join([lines[0], "\t".join(first), *lines[2:]]) + "\n")
    arguments = ["eval", "vqa", "--model", world["model"], "--benchmarks", "EasyVQA", "--lmudata", world["lmudata"]]
    return arguments + ["--out", tmp_path / "out"], f"{tsv}: row index 0: image: the image is not a decodable"


def truncate_weights(world):
    weights = world["model"] / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return weights


def truncated_weights_check_model(world, tmp_path):
    weights = truncate_weights(world)
    return ["check-model", world["model"]], f"{weights}: not a readable safetensors file"


def truncated_weights_eval_robot(world, tmp_path):
    weights = truncate_weights(world)
    return ["eval", "robot", "--model", world["model"], "--out", tmp_path / "out", "--episodes", "0"], (
        f"{weights}: not a readable safetensors file"
    )


def zero_chunk_size(world, tmp_path):
    return ["make-vla-config", world["model"], tmp_path / "out", "--chunk-size", "0"], "argument --chunk-size: 0"


def unwritable_training_output(world, tmp_path):
    (tmp_path / "a_file").write_text("")
    config = training_config(tmp_path / "train.yaml", world["data"])
    arguments = train_command(config, "stage2", world["model"], tmp_path / "work", tmp_path / "a_file" / "out")
    return arguments, f"{tmp_path / 'a_file' / 'out'}: cannot be written there"


def download_into_an_invalid_path(world, tmp_path):
    (tmp_path / "a_file").write_text("")
    out = tmp_path / "a_file" / "backbone"
    return ["download", "builtin:tiny-qwen2-vl", out], f"{out}: cannot be written there"


CASES = [
    non_utf8_substeps,
    non_utf8_instruction,
    non_utf8_substeps_in_training,
    bomb_in_conversations,
    image_outside_the_image_folder,
    absolute_image_path,
    empty_answer,
    negative_image_sample,
    non_utf8_benchmark,
    bomb_in_benchmark,
    truncated_weights_check_model,
    truncated_weights_eval_robot,
    zero_chunk_size,
    unwritable_training_output,
    download_into_an_invalid_path,
]


@pytest.mark.parametrize("case", CASES, ids=[case.__name__ for case in CASES])
def test_bad_input_is_one_line_naming_file_and_field_before_any_work(case, trained, tmp_path):
    world = case_world(trained, tmp_path)
    arguments, expected = case(world, tmp_path)
    before = {path: path.stat().st_mtime_ns for path in tmp_path.rglob("*")}
    result = vlaflow(*arguments)
    output = result.stdout + result.stderr
    assert result.returncode == 2, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith("vlaflow ") and ": error: " in error, error
    named = [line for line in output.splitlines() if expected in line]
    assert named and all(line.startswith(("problem: ", "vlaflow ")) for line in named), output[-3000:]
    # nothing written: no output, no work folder, no staging leftovers, no input changed
    assert {path: path.stat().st_mtime_ns for path in tmp_path.rglob("*")} == before


def test_the_cases_break_nothing_else(trained, tmp_path):
    """Each case's world, unbroken, passes: the errors above come from the breakage alone."""
    world = case_world(trained, tmp_path)
    result = vlaflow(*data_check(world, tmp_path)[0])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert Path(world["model"] / "model.safetensors").stat().st_size > 0
