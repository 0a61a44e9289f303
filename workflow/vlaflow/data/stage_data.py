"""The data of one training stage, assembled from the config: the registry's datasets as the
stage lists them (with `name%NN` selections), the normalisation statistics, and the mix."""

from dataclasses import dataclass
from pathlib import Path

from torch.utils.data import ConcatDataset, Dataset, Subset

from vlaflow.data.conversations import VLConversationDataset
from vlaflow.data.mixing import Mix, MixedDataset
from vlaflow.data.registry import ROBOT, VL, Registry, RobotEntry, Selection
from vlaflow.data.robot_dataset import RobotEpisodeDataset
from vlaflow.data.samples import RobotSpec
from vlaflow.data.stats import NormStats, compute_stats
from vlaflow.errors import VlaflowError


@dataclass
class StageData:
    dataset: MixedDataset
    mix: Mix | None
    stats: NormStats | None  # None for a stage without robot data
    files: list[Path]  # the files the samples come from: the episodes', the annotations


def robot_spec(config: dict, entry: RobotEntry | None = None) -> RobotSpec:
    """The robot inputs the config's model expects; a registry entry may name its own cameras."""
    cameras = tuple(config["data"]["cameras"])
    if entry is not None and entry.cameras is not None:
        if len(entry.cameras) != len(cameras):
            raise VlaflowError(
                f"dataset '{entry.name}': cameras: {len(entry.cameras)} listed, the config's data.cameras has {len(cameras)}"
            )
        cameras = entry.cameras
    model = config["model"]
    return RobotSpec(
        cameras=cameras,
        image_size=tuple(config["data"]["image_size"]),
        action_dim=model["action_dim"],
        state_dim=model["state_dim"],
        chunk_size=model["chunk_size"],
    )


def load_registry(config: dict) -> Registry:
    return Registry.load(Path(config["data"]["registry"]), Path(config["data"]["root"]))


def stage_selections(
    config: dict, registry: Registry, stage: str, source: str = "config"
) -> dict[str, list[Selection]]:
    settings = config["stages"].get(stage)
    if settings is None:
        raise VlaflowError(f"{source}: stages.{stage}: not configured")
    where = f"{source}: stages.{stage}"
    selections = {kind: registry.select(settings.get(kind, []), kind, f"{where}.{kind}") for kind in (ROBOT, VL)}
    mix = settings.get("mix")
    if not selections[ROBOT] and not selections[VL]:
        raise VlaflowError(f"{where}: lists no robot and no vl datasets")
    if selections[ROBOT] and selections[VL] and mix is None:
        raise VlaflowError(f"{where}.mix: robot and VL data together need a mix (vl_ratio or vl_batch_fraction)")
    if mix is not None and (not selections[ROBOT] or not selections[VL]):
        raise VlaflowError(f"{where}.mix: a mix needs both robot and vl datasets")
    return selections


def _selected(dataset: Dataset, selection: Selection, seed: int) -> Dataset:
    return dataset if selection.percent == 100 else Subset(dataset, selection.indices(len(dataset), seed).tolist())


def build_stage_data(
    config: dict, stage: str, *, stats: NormStats | None = None, split: str = "train", source: str = "config"
) -> StageData:
    """The stage's samples; normalisation statistics are computed from its robot episodes unless
    given (stage 2 and evaluation reuse the ones saved with the previous model)."""
    data = config["data"]
    registry = load_registry(config)
    selections = stage_selections(config, registry, stage, source)
    robot_parts = []
    episodes = {selection.entry.name: selection.entry.episodes(split) for selection in selections[ROBOT]}
    delta_horizon = config["model"]["chunk_size"] if data["relative_actions"] else 0
    if episodes and stats is None:
        stats = compute_stats([episode for chosen in episodes.values() for episode in chosen], delta_horizon)
    elif episodes and stats.delta_horizon != delta_horizon:
        raise VlaflowError(
            f"{source}: data.relative_actions: {data['relative_actions']}, but the model this stage starts from "
            f"was trained on {'relative' if stats.relative else 'absolute'} actions"
            + (f" over {stats.delta_horizon}-step chunks" if stats.relative else "")
        )
    for selection in selections[ROBOT]:
        spec = robot_spec(config, selection.entry)
        dataset = RobotEpisodeDataset(
            episodes[selection.entry.name], spec, stats, augment=data["augment"], seed=data["seed"]
        )
        robot_parts.append(_selected(dataset, selection, data["seed"]))
    vl_image_size = tuple(data["vl_image_size"]) if data["vl_image_size"] else None
    vl_parts = [
        _selected(
            VLConversationDataset(selection.entry.annotation, selection.entry.images, vl_image_size),
            selection,
            data["seed"],
        )
        for selection in selections[VL]
    ]
    mixed = MixedDataset(
        ConcatDataset(robot_parts) if robot_parts else None, ConcatDataset(vl_parts) if vl_parts else None
    )
    mix_settings = config["stages"][stage].get("mix")
    files = [file for chosen in episodes.values() for episode in chosen for file in episode.files()]
    files += [Path(selection.entry.annotation) for selection in selections[VL]]
    files = list(dict.fromkeys(files))  # a LeRobot dataset's episodes share their files
    mix = Mix.from_config(mix_settings) if mix_settings else None
    return StageData(mixed, mix, stats if robot_parts else None, files)
