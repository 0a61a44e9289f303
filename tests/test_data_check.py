"""`vlaflow data check` on sound data and on each kind of bad input."""

import json
import subprocess
import sys

import h5py
import numpy as np
import pytest
import yaml

from tests.conftest import random_image
from tests.data_factory import image_names, make_config, make_data_root, make_episode
from vlaflow.cli import main
from vlaflow.config import load_config
from vlaflow.data.check import check_vl
from vlaflow.data.stage_data import load_registry


@pytest.fixture
def world(tmp_path):
    root = tmp_path / "data"
    make_data_root(root)
    return root, make_config(tmp_path / "config.yaml", root)


def run_check(capsys, config, *extra) -> tuple[int, str]:
    code = main(["data", "check", "--config", str(config), *extra])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def test_sound_data_passes_with_a_summary_and_a_decoded_batch(world, capsys, vla_folder):
    root, config = world
    code, output = run_check(capsys, config, "--model", str(vla_folder))
    assert code == 0, output
    robot_row = next(line for line in output.splitlines() if line.startswith("robot_a"))
    assert "3 episodes" in robot_row and "30 frames" in robot_row and "top" in robot_row and "4 / 3" in robot_row
    vl_row = next(line for line in output.splitlines() if line.startswith("vl_a"))
    assert "8 samples" in vl_row and "2 text-only" in vl_row and "0-2" in vl_row
    # episode 0 is held out (val split): 20 robot timesteps, int(20 * 0.33) VL samples drawn for the mix
    assert (
        "stage stage2: 20 robot timesteps (train split) and 8 VL samples; one epoch of its mix: 20 robot + 6 VL"
        in output
    )
    assert "input_ids: (4, " in output and "expert_route: (4,)" in output and "pixel_values" in output
    assert "labels: '" in output


def test_exit_status_and_one_line_message_from_the_command(world):
    root, config = world
    (root / "robot_a" / "episode_0001.hdf5").write_bytes(b"not hdf5")
    result = subprocess.run(
        [sys.executable, "-m", "vlaflow.cli", "data", "check", "--config", str(config)], capture_output=True, text=True
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"vlaflow data check: error: 1 problem(s) in the data of {config}; see the lines above"
    ]
    assert f"problem: {root / 'robot_a' / 'episode_0001.hdf5'}: not a readable HDF5 file" in result.stdout


def set_json(root, change):
    path = root / "vl_a" / "train.json"
    entries = json.loads(path.read_text())
    change(entries)
    path.write_text(json.dumps(entries))


def edit_hdf5(root, change, episode=1):
    with h5py.File(root / "robot_a" / f"episode_{episode:04d}.hdf5", "a") as file:
        change(file)


def rewrite_episode(root, **kwargs):
    path = root / "robot_a" / "episode_0001.hdf5"
    path.unlink()
    make_episode(path, seed=1, **kwargs)


def set_config(config, change):
    settings = yaml.safe_load(config.read_text())
    change(settings)
    config.write_text(yaml.safe_dump(settings))


def empty_folder(root):
    for path in (root / "robot_a").iterdir():
        path.unlink()


def nan_action(file):
    actions = file["action"][:]
    actions[4, 2] = np.nan
    file["action"][:] = actions


BAD_INPUTS = {
    "malformed JSON": (
        lambda root, config: (root / "vl_a" / "train.json").write_text('[{"id": 1,'),
        ["vl_a/train.json: not valid JSON"],
    ),
    "missing conversations": (
        lambda root, config: set_json(root, lambda e: e[0].pop("conversations")),
        ["vl_a/train.json: entry 0 (id 0): conversations: missing"],
    ),
    "placeholder count differs from images": (
        lambda root, config: set_json(root, lambda e: e[1]["conversations"][0].update(value="<image> only one")),
        ["vl_a/train.json: entry 1 (id 1): conversations: 1 <image> placeholder(s) for 2 image(s)"],
    ),
    "turns out of order": (
        lambda root, config: set_json(root, lambda e: e[2]["conversations"][1].update({"from": "human"})),
        ["vl_a/train.json: entry 2 (id 2): conversations[1].from: expected a gpt turn"],
    ),
    "missing image file": (
        lambda root, config: (root / "vl_a" / "images" / "img" / "4.png").unlink(),
        ["vl_a/images/img/4.png: image of", "train.json: entry 4 (id 4): file missing"],
    ),
    "undecodable image": (
        lambda root, config: (root / "vl_a" / "images" / "img" / "5a.png").write_bytes(b"\x89PNG broken"),
        ["vl_a/images/img/5a.png: image of", "entry 5 (id 5): cannot decode"],
    ),
    "HDF5 without /action": (
        lambda root, config: edit_hdf5(root, lambda f: f.__delitem__("action")),
        ["robot_a/episode_0001.hdf5: /action: missing"],
    ),
    "action dimension differs from the config": (
        lambda root, config: rewrite_episode(root, action_dim=6),
        ["robot_a/episode_0001.hdf5: /action: dimension 6", "4"],
    ),
    "state dimension differs from the config": (
        lambda root, config: rewrite_episode(root, state_dim=7),
        ["robot_a/episode_0001.hdf5: /observations/qpos: dimension 7"],
    ),
    "NaN in actions": (
        lambda root, config: edit_hdf5(root, nan_action, episode=2),
        ["robot_a/episode_0002.hdf5: /action: NaN or infinite value at frame 4"],
    ),
    "camera missing in an episode": (
        lambda root, config: rewrite_episode(root, cameras=("left",)),
        ["robot_a/episode_0001.hdf5: /observations/images/top: camera missing (episode has: left)"],
    ),
    "not an HDF5 file": (
        lambda root, config: (root / "robot_a" / "episode_0001.hdf5").write_bytes(b"garbage"),
        ["robot_a/episode_0001.hdf5: not a readable HDF5 file"],
    ),
    "empty dataset folder": (
        lambda root, config: empty_folder(root),
        ["robot_a: no episode files"],
    ),
    "unknown dataset name": (
        lambda root, config: set_config(config, lambda c: c["stages"]["stage2"]["robot"].append("robot_b")),
        ["config.yaml: stages.stage2.robot: unknown dataset 'robot_b'", "known robot datasets", "robot_a"],
    ),
    "typo in a config key": (
        lambda root, config: set_config(config, lambda c: c["data"].update(image_sizes=[8, 8])),
        ["config.yaml: data: Additional properties are not allowed ('image_sizes' was unexpected)"],
    ),
    "wrong type of a config value": (
        lambda root, config: set_config(config, lambda c: c["model"].update(action_dim="14")),
        ["config.yaml: model.action_dim: '14' is not of type 'integer'"],
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_named_by_file_and_field(case, world, capsys):
    root, config = world
    damage, expected = BAD_INPUTS[case]
    damage(root, config)
    code, output = run_check(capsys, config)
    assert code == 2
    problem_lines = [line for line in output.splitlines() if "problem:" in line or ": error:" in line]
    assert any(all(part in line for part in expected) for line in problem_lines), output


def test_image_sampling_limits_which_entries_are_decoded(world):
    root, config_path = world
    for image in (root / "vl_a" / "images" / "img").iterdir():
        image.unlink()
    config = load_config(config_path)
    entry = load_registry(config).entries["vl_a"]
    assert len(check_vl(entry, config, image_sample=None).problems) == 6  # every entry with an image
    assert check_vl(entry, config, image_sample=0).problems == []
    sampled = check_vl(entry, config, image_sample=3)
    assert 1 <= len(sampled.problems) <= 3 and sampled.items == 8 - len(sampled.problems)


def test_samples_training_would_skip_are_counted_and_vl_image_size_bounds_them(world, capsys, vla_folder, tmp_path):
    """Images enter at native size unless data.vl_image_size bounds them; a sample whose image
    tokens reach past data.max_length is skipped in training, which the check counts beforehand."""
    root, config = world
    entries = json.loads((root / "vl_a" / "train.json").read_text())
    for name in image_names(entries):
        random_image(0, (128, 128)).save(root / "vl_a" / "images" / name)  # 64 image tokens each
    settings = yaml.safe_load(config.read_text())
    settings["data"]["max_length"] = 60
    config.write_text(yaml.safe_dump(settings))
    code, output = run_check(capsys, config, "--model", str(vla_folder))
    assert code == 0, output
    vl_row = next(line for line in output.splitlines() if line.startswith("vl_a"))
    assert vl_row.rstrip().endswith("6 of 8")  # every sample with an image
    assert "note: vl_a: 6 of 8 checked samples are longer than data.max_length=60" in output

    settings["data"]["vl_image_size"] = [32, 32]  # 4 image tokens
    config.write_text(yaml.safe_dump(settings))
    code, output = run_check(capsys, config, "--model", str(vla_folder))
    vl_row = next(line for line in output.splitlines() if line.startswith("vl_a"))
    assert code == 0 and vl_row.rstrip().endswith("0 of 8") and "note:" not in output


def test_a_per_batch_mix_is_checked_like_a_per_epoch_one(world, capsys):
    root, config = world
    settings = yaml.safe_load(config.read_text())
    settings["stages"]["stage2"]["mix"] = {"vl_batch_fraction": 0.5}
    config.write_text(yaml.safe_dump(settings))
    code, output = run_check(capsys, config)
    assert code == 0, output
    assert "one epoch of its mix: 24 robot + 24 VL" in output  # 20 robot timesteps in batches of 16, half VL
