"""`vlaflow data check`: validate every dataset a config uses before any training starts.

Every problem is reported as one line naming the file and the field; a summary table and one
decoded batch follow when the data is sound.
"""

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from vlaflow.config import load_config, stage_settings
from vlaflow.data.conversations import open_image, parse_entry, read_annotation
from vlaflow.data.mixing import MixSampler, epoch_order
from vlaflow.data.registry import ROBOT, VL, RobotEntry, VLEntry
from vlaflow.data.samples import VLSample
from vlaflow.data.stage_data import build_stage_data, load_registry, robot_spec, stage_selections
from vlaflow.data.stats import compute_stats
from vlaflow.errors import VlaflowError

MAX_PROBLEMS_SHOWN = 50


@dataclass
class DatasetSummary:
    name: str
    kind: str
    items: int = 0  # episodes or conversations
    frames: int = 0
    text_only: int = 0
    images_per_sample: set = field(default_factory=set)
    cameras: str = ""
    dims: str = ""
    checked: int = 0  # samples encoded with the model's processor
    too_long: int = 0  # of those, samples training would skip
    problems: list[str] = field(default_factory=list)

    def row(self) -> list[str]:
        per_sample = sorted(self.images_per_sample)
        images = (
            ""
            if not per_sample
            else f"{per_sample[0]}"
            if len(per_sample) == 1
            else f"{per_sample[0]}-{per_sample[-1]}"
        )
        if self.kind == ROBOT:
            return [
                self.name,
                self.kind,
                f"{self.items} episodes",
                f"{self.frames} frames",
                "",
                images,
                self.cameras,
                self.dims,
                "",
            ]
        too_long = f"{self.too_long} of {self.checked}" if self.checked else ""
        return [
            self.name,
            self.kind,
            f"{self.items} samples",
            "",
            f"{self.text_only} text-only",
            images,
            "",
            "",
            too_long,
        ]


HEADER = ["dataset", "kind", "size", "frames", "text-only", "images/sample", "cameras", "action/state dims", "too long"]


def _sampled(count: int, sample: int | None, seed: int) -> set[int]:
    if sample is None or sample >= count:
        return set(range(count))
    return set(np.random.default_rng(seed).choice(count, sample, replace=False).tolist())


def check_robot(entry: RobotEntry, config: dict, image_sample: int | None) -> DatasetSummary:
    summary = DatasetSummary(entry.name, ROBOT)
    try:
        spec = robot_spec(config, entry)
        episodes = entry.all_episodes()
        for split in {"train", *entry.splits}:
            entry.episodes(split)
    except VlaflowError as error:
        summary.problems.append(str(error))
        return summary
    summary.cameras = ", ".join(spec.cameras)
    summary.dims = f"{spec.action_dim} / {spec.state_dim}"
    summary.images_per_sample.add(len(spec.cameras))
    decode = _sampled(len(episodes), image_sample, config["data"]["seed"])
    for index, episode in enumerate(episodes):
        try:
            info = episode.inspect(spec)
            compute_stats([episode])  # finds NaN / inf in actions and states
            if index in decode:
                episode.check_decode(spec)
        except VlaflowError as error:
            summary.problems.append(str(error))
            continue
        summary.items += 1
        summary.frames += info.frames
    return summary


def check_vl(entry: VLEntry, config: dict, image_sample: int | None, collator=None) -> DatasetSummary:
    """With a collator, the decoded samples are also encoded, and those training would skip
    (longer than data.max_length with images past the cut) counted."""
    summary = DatasetSummary(entry.name, VL)
    image_size = tuple(config["data"]["vl_image_size"]) if config["data"]["vl_image_size"] else None
    try:
        entries = read_annotation(entry.annotation)
    except VlaflowError as error:
        summary.problems.append(str(error))
        return summary
    if not entries:
        summary.problems.append(f"{entry.annotation}: no conversation entries")
    decode = _sampled(len(entries), image_sample, config["data"]["seed"])
    for index, raw in enumerate(entries):
        identifier = raw.get("id") if isinstance(raw, dict) else None
        where = f"{entry.annotation}: entry {index}" + (f" (id {identifier})" if identifier is not None else "")
        try:
            conversation = parse_entry(raw, where)
            if index in decode:
                images = [open_image(entry.images / image, where, image_size) for image in conversation.images]
                if collator is not None:
                    summary.checked += 1
                    summary.too_long += not collator.fits(VLSample(images, list(conversation.turns), where))
        except VlaflowError as error:
            summary.problems.append(str(error))
            continue
        summary.items += 1
        summary.text_only += not conversation.images
        summary.images_per_sample.add(len(conversation.images))
    return summary


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    lines = [" | ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "-|-".join("-" * width for width in widths))
    return "\n".join(lines)


def _describe_batch(config: dict, stage: str, collator, batch_size: int, source: str) -> str:
    stage_data = build_stage_data(config, stage, source=source)
    dataset, seed = stage_data.dataset, config["data"]["seed"]
    # StarVLA's mix is defined per training batch; ChatVLA's vl_ratio per epoch, shown unpadded
    per_batch_mix = stage_data.mix is not None and stage_data.mix.vl_batch_fraction is not None
    one_epoch = epoch_order(
        stage_data.mix,
        dataset.n_robot,
        dataset.n_vl,
        batch_size=stage_settings(config, stage)["per_device_batch_size"] if per_batch_mix else 1,
        world_size=1,
        seed=seed,
        epoch=0,
    )
    robot_in_epoch = int((one_epoch < dataset.n_robot).sum())
    sampler = MixSampler(dataset, stage_data.mix, batch_size=batch_size, seed=seed)
    samples = [dataset[index] for index in list(sampler)[:batch_size]]
    lines = [
        (
            f"stage {stage}: {dataset.n_robot} robot timesteps (train split) and {dataset.n_vl} VL samples; "
            f"one epoch of its mix: {robot_in_epoch} robot + {len(one_epoch) - robot_in_epoch} VL"
        )
    ]
    if collator is None:
        for sample in samples:
            sizes = ", ".join(f"{image.width}x{image.height}" for image in sample.images) or "no image"
            text = getattr(sample, "instruction", None) or sample.turns[0][1]
            lines.append(f"  {sample.source}: {sizes}: {text!r}")
        return "\n".join(lines)

    processor = collator.processor
    batch = collator(samples)
    for key, value in batch.items():
        lines.append(f"  {key}: {tuple(value.shape)} {str(value.dtype).removeprefix('torch.')}")
    ids, labels = batch["input_ids"][0], batch["labels"][0]
    text = processor.tokenizer.decode(ids[batch["attention_mask"][0].bool()])
    image_run = re.compile(f"(?:{re.escape(processor.image_token)})+")
    text = image_run.sub(lambda run: f"{processor.image_token}x{run.group().count(processor.image_token)}", text)
    answer = processor.tokenizer.decode(labels[labels >= 0])
    lines.append(f"  first sample ({samples[0].source}):\n    text: {text!r}\n    labels: {answer!r}")
    return "\n".join(lines)


def check_data(
    config_path: Path, *, image_sample: int | None = None, model: Path | None = None, batch_size: int = 4, out=print
) -> list[str]:
    """Check every dataset the config's stages use; print the findings; return the problems."""
    source = str(config_path)
    config = load_config(config_path)
    registry = load_registry(config)
    used, problems = {}, []
    for stage in config["stages"]:
        try:
            for selections in stage_selections(config, registry, stage, source).values():
                used.update({selection.entry.name: selection.entry for selection in selections})
        except VlaflowError as error:
            problems.append(str(error))
    collator = None
    if model is not None:
        from vlaflow.data.collator import Collator
        from vlaflow.models.qwen2_vla.processing_qwen2_vla import load_processor

        collator = Collator.from_config(load_processor(model), config)
    summaries = [
        check_robot(entry, config, image_sample)
        if entry.kind == ROBOT
        else check_vl(entry, config, image_sample, collator)
        for entry in used.values()
    ]
    out(_table([HEADER] + [summary.row() for summary in summaries]))
    for summary in summaries:
        problems += summary.problems
        if summary.too_long:
            out(
                f"note: {summary.name}: {summary.too_long} of {summary.checked} checked samples are longer than "
                f"data.max_length={config['data']['max_length']} with images past the cut; training skips them "
                "(raise data.max_length, or bound the images with data.vl_image_size)"
            )
    for problem in problems[:MAX_PROBLEMS_SHOWN]:
        out(f"problem: {problem}")
    if len(problems) > MAX_PROBLEMS_SHOWN:
        out(f"... and {len(problems) - MAX_PROBLEMS_SHOWN} more problems")
    if not problems:
        for stage in config["stages"]:
            out(_describe_batch(config, stage, collator, batch_size, source))
    return problems
