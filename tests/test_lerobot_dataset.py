"""LeRobot v3.0 datasets behind the episode seam: read against what LeRobot itself wrote and read
(tests/fixtures/lerobot, made by its make_fixture.py with lerobot 0.4.4), written by `vlaflow data
convert` in the same layout, checked by `vlaflow data check`, and trained on."""

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from tests.conftest import ACTION_DIM, STATE_DIM
from tests.data_factory import data_stage, make_config, make_data_root, make_episode
from tests.training_helpers import ALOHA_HEAD, training_config
from vlaflow.cli import main
from vlaflow.data.hdf5_episodes import Hdf5Format, hdf5_episodes
from vlaflow.data.images import decode_frame
from vlaflow.data.lerobot_episodes import LeRobotFormat
from vlaflow.data.registry import Registry
from vlaflow.data.robot_dataset import RobotEpisodeDataset
from vlaflow.data.samples import RobotSpec
from vlaflow.data.stats import compute_stats
from vlaflow.errors import VlaflowError

FIXTURES = Path(__file__).parent / "fixtures" / "lerobot"
WRITTEN_BY_LEROBOT = FIXTURES / "tiny_aloha"
CAMERAS = ("top", "left_wrist")
FULL_SIZE = RobotSpec(CAMERAS, (96, 128), 14, 14, 10)


@pytest.fixture(scope="module")
def expected():
    """What LeRobotDataset returned for every frame of the fixture (pyav backend)."""
    arrays = np.load(FIXTURES / "tiny_aloha_expected.npz")
    return {key: arrays[key] for key in arrays.files}, json.loads((FIXTURES / "tiny_aloha_expected.json").read_text())


def test_every_frame_reads_as_lerobot_read_it(expected):
    arrays, meta = expected
    episodes = LeRobotFormat.episodes(WRITTEN_BY_LEROBOT, {})
    assert [episode.name for episode in episodes] == [f"episode_{i:06d}" for i in range(4)]
    row = 0
    for episode in episodes:
        info = episode.inspect(FULL_SIZE)
        reader = episode.open(FULL_SIZE)
        for t in range(info.frames):
            assert arrays["episode_index"][row] == episode.info.index and arrays["frame_index"][row] == t
            np.testing.assert_array_equal(reader.state(t), arrays["observation.state"][row])
            np.testing.assert_array_equal(reader.actions(t, t + 1)[0], arrays["action"][row])
            assert reader.instruction(t) == meta["tasks"][arrays["task_index"][row]]
            for camera, image in zip(CAMERAS, reader.images(t, None)):
                difference = np.abs(np.asarray(image, dtype=int) - arrays[f"observation.images.{camera}"][row])
                assert difference.max() <= 2, (episode.name, t, camera)
            row += 1
    assert row == len(arrays["index"]) == 52


def test_a_random_order_decodes_the_same_frames_as_reading_in_order(expected):
    """Decoders stay open and seek backwards and forwards across episodes and video files."""
    arrays, _ = expected
    episodes = LeRobotFormat.episodes(WRITTEN_BY_LEROBOT, {})
    spec = RobotSpec(CAMERAS, (96, 128), 14, 14, 10)
    dataset = RobotEpisodeDataset(episodes, spec, compute_stats(episodes))
    for index in np.random.default_rng(0).permutation(len(dataset))[:30]:
        image = np.asarray(dataset[int(index)].images[0], dtype=int)
        assert np.abs(image - arrays["observation.images.top"][index]).max() <= 2, index


def lerobot_registry(tmp_path: Path, **fields) -> Registry:
    entry = {"kind": "robot", "format": "lerobot", "path": str(WRITTEN_BY_LEROBOT), **fields}
    (tmp_path / "datasets.yaml").write_text(yaml.safe_dump({"tiny_aloha": entry}))
    return Registry.load(tmp_path / "datasets.yaml", tmp_path)


def test_a_registry_entry_in_lerobot_format_gives_splits_and_model_sized_samples(tmp_path, expected):
    arrays, meta = expected
    entry = lerobot_registry(
        tmp_path, cameras=["observation.images.top"], splits={"val": ["episode_00000[1]"]}
    ).entries["tiny_aloha"]
    assert [episode.name for episode in entry.episodes("val")] == ["episode_000001"]
    assert [episode.name for episode in entry.episodes()] == ["episode_000000", "episode_000002", "episode_000003"]
    spec = RobotSpec(entry.cameras, (32, 40), 14, 14, 10)
    train = entry.episodes()
    dataset = RobotEpisodeDataset(train, spec, compute_stats(train))
    sample = dataset[12]  # episode 2's first frame: row 29 of the whole dataset
    assert sample.instruction == meta["tasks"][arrays["task_index"][29]]
    np.testing.assert_array_equal(
        np.asarray(sample.images[0]), np.asarray(decode_frame(arrays["observation.images.top"][29], (32, 40)))
    )
    actions = dataset.stats.unnormalize_actions(sample.actions, dataset.stats.unnormalize_state(sample.state))
    # a LeRobot chunk starts at t; episode 2 has 9 frames, so the chunk's last row is padding
    np.testing.assert_allclose(actions[:9], arrays["action"][29:38], atol=1e-5)
    assert sample.is_pad.tolist() == [False] * 9 + [True]


def test_registry_refuses_an_unknown_format_and_options_of_another_format(tmp_path):
    (tmp_path / "datasets.yaml").write_text(yaml.safe_dump({"d": {"kind": "robot", "format": "zarr", "path": "d"}}))
    with pytest.raises(VlaflowError, match=r"datasets.yaml: d.format: unknown robot data format 'zarr' \(formats: "):
        Registry.load(tmp_path / "datasets.yaml", tmp_path)
    (tmp_path / "datasets.yaml").write_text(yaml.safe_dump({"d": {"kind": "robot", "path": "d", "state": "qpos"}}))
    with pytest.raises(VlaflowError, match=r"d.state: unknown key for a robot dataset in format hdf5"):
        Registry.load(tmp_path / "datasets.yaml", tmp_path)


def test_features_are_mapped_by_the_entrys_options(tmp_path):
    """The state slot can read any feature of the right shape; here the action itself."""
    entry = lerobot_registry(tmp_path, state="action").entries["tiny_aloha"]
    [episode, *_] = entry.episodes()
    rows = episode.rows()
    np.testing.assert_array_equal(rows.states, rows.actions)
    assert rows.state_field == "action"


# Converting HDF5 episodes, and the layout of what the converter writes


def convert(episodes_root: Path, out: Path, *extra) -> Path:
    assert main(["data", "convert", str(episodes_root), str(out), *extra]) == 0
    return out


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """Four HDF5 episodes shaped like the fixture's (14-dim, cameras top 96x128 and left_wrist 48x64),
    one recorded on a real robot (actions lag a step), converted."""
    root = tmp_path_factory.mktemp("convert")
    for number, length in enumerate((12, 17, 9, 14)):
        make_episode(
            root / "hdf5" / f"episode_{number}.hdf5",
            length=length,
            sim=number != 1,
            seed=number,
            cameras={"top": (96, 128), "left_wrist": (48, 64)},
            action_dim=14,
            state_dim=14,
        )
    return root / "hdf5", convert(root / "hdf5", root / "lerobot", "--robot-type", "aloha")


def test_converted_episodes_read_back_as_the_hdf5_episodes(converted):
    hdf5_root, lerobot_root = converted
    spec = RobotSpec(CAMERAS, (48, 64), 14, 14, 5)
    source, written = Hdf5Format.episodes(hdf5_root, {}), LeRobotFormat.episodes(lerobot_root, {})
    stats = compute_stats(source)
    original, copy = RobotEpisodeDataset(source, spec, stats), RobotEpisodeDataset(written, spec, stats)
    assert len(original) == len(copy) == 52
    for index in range(len(original)):
        before, after = original[index], copy[index]
        episode, t = original.locate(index)
        np.testing.assert_array_equal(before.state, after.state)
        assert before.instruction == after.instruction
        # A real robot's first chunk repeats its first action (upstream's clamp at t-1) and its last
        # action has no frame to pair with in LeRobot's layout; every other chunk is the same.
        if original.infos[episode].sim or 0 < t < original.infos[episode].frames - 5:
            np.testing.assert_array_equal(before.actions, after.actions)
            np.testing.assert_array_equal(before.is_pad, after.is_pad)
        for image_before, image_after in zip(before.images, after.images):
            assert np.abs(np.asarray(image_before, dtype=int) - np.asarray(image_after)).mean() < 4


def schema_of(path: Path) -> dict[str, str]:
    return {field.name: str(field.type) for field in pq.read_schema(path)}


def test_the_converters_layout_is_lerobots_field_by_field(converted):
    _, ours = converted
    theirs = WRITTEN_BY_LEROBOT
    our_info, their_info = (json.loads((root / "meta/info.json").read_text()) for root in (ours, theirs))
    assert list(our_info) == list(their_info)
    for key in ("codebase_version", "robot_type", "total_episodes", "total_frames", "chunks_size", "fps"):
        assert our_info[key] == their_info[key], key
    assert our_info["data_path"] == their_info["data_path"] and our_info["video_path"] == their_info["video_path"]
    assert sorted(our_info["features"]) == sorted(their_info["features"])
    for name, feature in their_info["features"].items():
        ours_feature = our_info["features"][name]
        assert (ours_feature["dtype"], ours_feature["shape"]) == (feature["dtype"], feature["shape"]), name
        assert ours_feature.get("info") == feature.get("info"), name
    for relative in ("meta/tasks.parquet", "meta/episodes/chunk-000/file-000.parquet"):
        assert schema_of(ours / relative) == schema_of(theirs / relative), relative
    assert schema_of(ours / "data/chunk-000/file-000.parquet") == schema_of(theirs / "data/chunk-000/file-000.parquet")
    assert json.loads(pq.read_schema(ours / "data/chunk-000/file-000.parquet").metadata[b"huggingface"])["info"] == (
        json.loads(pq.read_schema(theirs / "data/chunk-000/file-000.parquet").metadata[b"huggingface"])["info"]
    )
    our_stats, their_stats = (json.loads((root / "meta/stats.json").read_text()) for root in (ours, theirs))
    assert sorted(our_stats) == sorted(their_stats)
    for feature, stats in their_stats.items():
        assert list(our_stats[feature]) == list(stats), feature
        for name, value in stats.items():
            assert np.shape(our_stats[feature][name]) == np.shape(value), (feature, name)
    # the values: the pooled statistics are those of every frame
    actions = pq.read_table(ours / "data/chunk-000/file-000.parquet")["action"].to_numpy(zero_copy_only=False)
    np.testing.assert_allclose(our_stats["action"]["mean"], np.stack(actions).mean(axis=0), rtol=1e-5)
    tasks = pq.read_table(ours / "meta/tasks.parquet").to_pydict()
    assert tasks["__index_level_0__"] == ["task 0", "task 1", "task 2", "task 3"] and tasks["task_index"] == [
        0,
        1,
        2,
        3,
    ]


def test_episodes_are_spread_over_several_files_past_the_size_limits(tmp_path):
    for number in range(3):
        make_episode(tmp_path / "hdf5" / f"e{number}.hdf5", length=20, seed=number, cameras={"top": (48, 64)})
    from vlaflow.data.lerobot_writer import convert_to_lerobot

    out = convert_to_lerobot(
        Hdf5Format.episodes(tmp_path / "hdf5", {}), tmp_path / "out", fps=30, data_file_mb=1e-4, video_file_mb=1e-4
    )
    assert len(list((out / "data").rglob("*.parquet"))) == 3
    assert len(list((out / "videos/observation.images.top").rglob("*.mp4"))) == 3
    episodes = LeRobotFormat.episodes(out, {})
    assert [episode.info.videos["observation.images.top"][1] for episode in episodes] == [0.0, 0.0, 0.0]
    spec = RobotSpec(("top",), (48, 64), ACTION_DIM, STATE_DIM, 4)
    source = hdf5_episodes(sorted((tmp_path / "hdf5").iterdir()))
    for ours, theirs in zip(episodes, source):
        assert ours.check_decode(spec) == theirs.check_decode(spec) == {"top": (48, 64)}


def test_convert_refuses_an_existing_output_and_leaves_no_partial_folder(converted, tmp_path):
    hdf5_root, _ = converted
    (tmp_path / "taken").mkdir()
    assert main(["data", "convert", str(hdf5_root), str(tmp_path / "taken")]) == 2
    (tmp_path / "bad").mkdir()
    make_episode(tmp_path / "bad" / "a.hdf5", cameras={"top": (24, 32)})
    make_episode(tmp_path / "bad" / "b.hdf5", cameras={"top": (24, 40)})
    assert main(["data", "convert", str(tmp_path / "bad"), str(tmp_path / "out")]) == 2
    assert not (tmp_path / "out").exists() and [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


# `vlaflow data check` on LeRobot datasets


@pytest.fixture
def lerobot_world(tmp_path):
    """make_data_root's world with its robot dataset converted to LeRobot's format and the stage
    reading that instead."""
    root = tmp_path / "data"
    make_data_root(root)
    convert(root / "robot_a", root / "robot_lr")
    registry = yaml.safe_load((root / "datasets.yaml").read_text())
    registry["robot_lr"] = {"kind": "robot", "format": "lerobot", "path": "robot_lr"}
    (root / "datasets.yaml").write_text(yaml.safe_dump(registry))
    config = make_config(
        tmp_path / "config.yaml", root, stage2=data_stage(robot=["robot_lr"], vl=["vl_a"], mix={"vl_ratio": 0.33})
    )
    return root / "robot_lr", config


def run_check(capsys, config) -> tuple[int, list[str]]:
    code = main(["data", "check", "--config", str(config)])
    captured = capsys.readouterr()
    return code, (captured.out + captured.err).splitlines()


def edit_json(path: Path, change) -> None:
    content = json.loads(path.read_text())
    change(content)
    path.write_text(json.dumps(content))


def edit_yaml(path: Path, change) -> None:
    content = yaml.safe_load(path.read_text())
    change(content)
    path.write_text(yaml.safe_dump(content))


def edit_parquet(path: Path, change) -> None:
    """Rewrite a parquet file with changed columns; types are inferred again where a change
    breaks the written ones."""
    table = pq.read_table(path)
    columns = table.to_pydict()
    change(columns)
    try:
        changed = pa.table(columns, schema=table.schema)
    except pa.ArrowInvalid:
        changed = pa.table(columns)
    pq.write_table(changed, path)


def shift_episode_video(columns, episode: int, seconds: float) -> None:
    for key in list(columns):
        if key.endswith("_timestamp"):
            columns[key][episode] += seconds


def set_shape(features, key, shape):
    features["features"][key]["shape"] = shape


EPISODES_META = "meta/episodes/chunk-000/file-000.parquet"
DATA_FILE = "data/chunk-000/file-000.parquet"
VIDEO_FILE = "videos/observation.images.top/chunk-000/file-000.mp4"
LEROBOT_BAD_INPUTS = {
    "missing video file": (
        lambda root: (root / VIDEO_FILE).unlink(),
        [f"robot_lr/{VIDEO_FILE}: no such file (observation.images.top of episode 0)"],
    ),
    "action shape differs from the config": (
        lambda root: edit_json(root / "meta/info.json", lambda info: set_shape(info, "action", [6])),
        ["robot_lr/meta/info.json: features.action.shape: [6], the config says [4]"],
    ),
    "data rows differ from the feature's shape": (
        lambda root: edit_parquet(
            root / DATA_FILE, lambda c: c.update({"observation.state": [row[:2] for row in c["observation.state"]]})
        ),
        [f"robot_lr/{DATA_FILE}: episode 0: observation.state: (2,) per frame, meta/info.json says [3]"],
    ),
    "timestamps past the episode's video": (
        lambda root: edit_parquet(
            root / EPISODES_META,
            lambda c: c["videos/observation.images.top/to_timestamp"].__setitem__(
                1, c["videos/observation.images.top/from_timestamp"][1] + 0.1
            ),
        ),
        [
            f"robot_lr/{DATA_FILE}: episode 1: timestamp: frame 6 at 0.120 s is outside the episode's observation.images.top video"
        ],
    ),
    "an episode placed past the end of its video file": (
        lambda root: edit_parquet(root / EPISODES_META, lambda c: shift_episode_video(c, 2, 5.0)),
        [f"robot_lr/{VIDEO_FILE}: no frame at 5.400 s (the last frame is at 0.580 s)"],
    ),
    "camera missing": (
        lambda root: edit_yaml(root.parent / "datasets.yaml", lambda r: r["robot_lr"].update(cameras=["front"])),
        [
            "robot_lr/meta/info.json: features.observation.images.front: camera missing (dataset has: observation.images.top)"
        ],
    ),
    "frames of another size than meta/info.json says": (
        lambda root: edit_json(
            root / "meta/info.json", lambda info: set_shape(info, "observation.images.top", [16, 16, 3])
        ),
        [f"robot_lr/{VIDEO_FILE}: observation.images.top: frame 0 of episode 0 is 24x32, meta/info.json says 16x16"],
    ),
    "an older LeRobot format": (
        lambda root: edit_json(root / "meta/info.json", lambda info: info.update(codebase_version="v2.1")),
        ["robot_lr/meta/info.json: codebase_version: v2.1, vlaflow reads LeRobot's v3 format"],
    ),
    "tasks table missing": (
        lambda root: (root / "meta/tasks.parquet").unlink(),
        ["robot_lr/meta/tasks.parquet: no such file"],
    ),
}


def test_sound_lerobot_data_passes_the_check(lerobot_world, capsys):
    _, config = lerobot_world
    code, lines = run_check(capsys, config)
    assert code == 0, lines
    row = next(line for line in lines if line.startswith("robot_lr"))
    assert "3 episodes" in row and "30 frames" in row and "top" in row


@pytest.mark.parametrize("case", sorted(LEROBOT_BAD_INPUTS))
def test_lerobot_problems_are_one_line_naming_file_and_field(case, lerobot_world, capsys):
    root, config = lerobot_world
    damage, expected = LEROBOT_BAD_INPUTS[case]
    damage(root)
    code, lines = run_check(capsys, config)
    assert code == 2
    problems = [line for line in lines if "problem:" in line]
    assert any(all(part in line for part in expected) for line in problems), "\n".join(lines)


# Training on a LeRobot dataset


@pytest.mark.slow
def test_a_lerobot_dataset_trains_stage_1_and_stage_2_and_is_evaluated_open_loop(tmp_path, tiny_backbone, mlp_weights):
    from vlaflow.backbone.vla_config import make_vla_folder
    from vlaflow.evaluation.robot import evaluate_open_loop
    from vlaflow.training.run import train

    data = tmp_path / "data"
    make_data_root(data, episodes=1, vl_count=4)
    registry = yaml.safe_load((data / "datasets.yaml").read_text())
    registry["tiny_aloha"] = {
        "kind": "robot",
        "format": "lerobot",
        "path": str(WRITTEN_BY_LEROBOT),
        "splits": {"val": ["episode_000001"]},
    }
    (data / "datasets.yaml").write_text(yaml.safe_dump(registry))
    stages = {
        "stage1": data_stage(robot=["tiny_aloha"], freeze=["vl_expert"]),
        "stage2": {"from": "stage1", "robot": ["tiny_aloha"], "vl": ["vl_a"], "mix": {"vl_batch_fraction": 0.5}},
    }
    config_path = training_config(
        tmp_path / "config.yaml", data, training={"max_steps": 3, "save_steps": 3}, stages=stages
    )
    config = yaml.safe_load(config_path.read_text())
    config["model"] = ALOHA_HEAD
    config["data"].update(cameras=list(CAMERAS), image_size=[32, 40])
    config_path.write_text(yaml.safe_dump(config))
    vla = make_vla_folder(tiny_backbone, tmp_path / "vla", policy_head=ALOHA_HEAD)
    stage1 = train(config_path, "stage1", vla, tmp_path / "work1", tmp_path / "stage1", mlp_weights=mlp_weights)
    stage2 = train(config_path, "stage2", stage1, tmp_path / "work2", tmp_path / "stage2")
    for model in (stage1, stage2):
        result = evaluate_open_loop(model, tmp_path / f"eval_{model.name}", batch_size=4)
        assert (result["datasets"], result["episodes"], result["samples"]) == (["tiny_aloha"], 1, 17)
        assert np.isfinite(result["mse"]) and result["reference"]["hold_state"]["mse"] > 0
