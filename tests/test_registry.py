"""The dataset registry: names, `name%NN`, `all`, splits, and the shipped entries."""

from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.data_factory import make_episode
from vlaflow.data.registry import Registry, RobotEntry, Selection, VLEntry
from vlaflow.errors import VlaflowError

SHIPPED = Path(__file__).parents[1] / "config" / "datasets.yaml"


def registry_of(tmp_path, entries: dict) -> Registry:
    path = tmp_path / "datasets.yaml"
    path.write_text(yaml.safe_dump(entries))
    return Registry.load(path, tmp_path / "root")


@pytest.fixture
def registry(tmp_path):
    return registry_of(
        tmp_path,
        {
            "robot_a": {"kind": "robot", "path": "a"},
            "robot_b": {"kind": "robot", "path": "/abs/b", "cameras": ["cam_high"]},
            "vl_a": {"kind": "vl", "annotation": "vl/a.json", "images": "vl/images"},
            "vl_b": {"kind": "vl", "annotation": "vl/b.jsonl"},
        },
    )


def test_names_resolve_against_the_data_root(registry, tmp_path):
    robot_a, robot_b = (registry.entries[name] for name in ("robot_a", "robot_b"))
    assert robot_a == RobotEntry("robot_a", tmp_path / "root" / "a")
    assert robot_b.path == Path("/abs/b") and robot_b.cameras == ("cam_high",)
    assert registry.entries["vl_a"] == VLEntry("vl_a", tmp_path / "root/vl/a.json", tmp_path / "root/vl/images")
    assert registry.entries["vl_b"].images == tmp_path / "root/vl"  # the annotation's folder by default


def test_all_means_every_name_of_the_list_kind(registry):
    assert [s.entry.name for s in registry.select(["all"], "robot", "stages.stage1.robot")] == ["robot_a", "robot_b"]
    assert [s.entry.name for s in registry.select(["all%50"], "vl", "w")] == ["vl_a", "vl_b"]
    assert {s.percent for s in registry.select(["all%50"], "vl", "w")} == {50.0}


def test_unknown_name_lists_the_known_ones(registry):
    with pytest.raises(VlaflowError) as error:
        registry.select(["robot_a", "robot_c%20"], "robot", "config.yaml: stages.stage1.robot")
    assert str(error.value) == (
        f"config.yaml: stages.stage1.robot: unknown dataset 'robot_c' (known robot datasets in {registry.source}: "
        "robot_a, robot_b)"
    )


def test_a_name_of_the_other_kind_is_an_error(registry):
    with pytest.raises(VlaflowError, match="stages.stage2.vl: 'robot_a' is a robot dataset, not vl"):
        registry.select(["robot_a"], "vl", "stages.stage2.vl")


@pytest.mark.parametrize(("percent", "size", "expected"), [(50, 10, 5), (100, 10, 10), (250, 10, 25), (33, 7, 2)])
def test_percent_keeps_that_share_of_samples(percent, size, expected):
    indices = Selection(VLEntry("vl_a", Path("a"), Path("i")), percent).indices(size, seed=0)
    assert len(indices) == expected
    counts = np.bincount(indices, minlength=size)
    if percent <= 100:
        assert counts.max() == 1  # down-sampling never repeats
    else:
        assert counts.min() == 2 and counts.max() == 3  # every sample twice, a seeded half a third time


def test_percent_selection_is_seeded_and_the_same_for_every_rank():
    entry = RobotEntry("robot_a", Path("a"))
    first = Selection(entry, 40).indices(100, seed=7)
    assert first.tolist() == Selection(entry, 40).indices(100, seed=7).tolist()  # what another rank computes
    assert first.tolist() != Selection(entry, 40).indices(100, seed=8).tolist()
    other_name = Selection(RobotEntry("robot_b", Path("a")), 40).indices(100, seed=7)
    assert first.tolist() != other_name.tolist()  # each dataset draws its own subset


def test_splits_hold_their_patterns_and_train_is_the_rest(tmp_path):
    for number in range(4):
        make_episode(tmp_path / "root/a" / f"episode_{number:04d}.hdf5", seed=number)
    registry = registry_of(
        tmp_path, {"robot_a": {"kind": "robot", "path": "a", "splits": {"val": ["episode_000[01].hdf5"]}}}
    )
    entry = registry.entries["robot_a"]
    assert [p.name for p in entry.episodes("val")] == ["episode_0000.hdf5", "episode_0001.hdf5"]
    assert [p.name for p in entry.episodes()] == ["episode_0002.hdf5", "episode_0003.hdf5"]
    with pytest.raises(VlaflowError, match="unknown split 'test' \\(splits: train, val\\)"):
        entry.episodes("test")


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"path": "a"}, "robot_x.kind: must be 'robot' or 'vl', got None"),
        ({"kind": "robot", "path": "a", "annotation": "x"}, "robot_x.annotation: unknown key for a robot dataset"),
        ({"kind": "vl"}, "robot_x.annotation: missing"),
        ({"kind": "robot", "path": "a", "splits": {"val": "x*"}}, "robot_x.splits: expected a mapping"),
    ],
)
def test_malformed_entries_are_named(tmp_path, entry, message):
    with pytest.raises(VlaflowError, match=message.replace(".", "\\.")):
        registry_of(tmp_path, {"robot_x": entry})


def test_shipped_registry_has_the_source_documents_datasets_in_their_conventional_layout(tmp_path):
    registry = Registry.load(SHIPPED, tmp_path)
    coco = registry.entries["sharegpt4v_coco"]
    assert coco.annotation == tmp_path / "LLaVA-OneVision-COCO/llava_jsons/sharegpt4v_coco.json"
    assert coco.images == tmp_path / "LLaVA-OneVision-COCO/images"
    llava = registry.entries["llava_v1_5_mix665k"]
    assert llava.annotation == tmp_path / "llava_v1_5_mix665k/llava_v1_5_mix665k.json"
    assert registry.names("robot") == ["aloha_sim_insertion", "aloha_sim_transfer_cube"]
    assert set(registry.names("vl")) == {"easy_vqa", "sharegpt4v_coco", "llava_v1_5_mix665k"}
