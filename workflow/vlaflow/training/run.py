"""`vlaflow train`: one stage of the config's stage table, resumable from its work folder.

The stage's row (`vlaflow.stages`) says what the model starts from (`--init`: the VLA folder or
the model of the stage it continues), whether its MLPs are the static MoE or dense, whether they
start from saved MLP weights (`--mlp-weights`), which parts stay frozen, and which data it reads.
The embedded default's rows: `vlm` trains the VL expert on vision-language data (StarVLA's
VLM-only training); `stage1` splits the MLPs into two experts from the saved MLP weights and
trains on robot data with the VL expert frozen; `stage2` co-trains on both; `baseline` is plain
robot fine-tuning of one dense MLP, nothing frozen.

The work folder holds the resumable checkpoints and logs; OUT, the model, is written once, at
the end, atomically. Starting the same command again continues from the newest complete
checkpoint. SIGTERM or SIGUSR1 saves a checkpoint and exits with 128 + the signal number, so a
scheduler's retry continues where the run stopped.
"""

import logging
import os
import socket
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from accelerate.utils import DistributedType
from transformers import set_seed

import vlaflow.models  # noqa: F401  (registers the model and processor classes)
from vlaflow.backbone.folder import load_vla
from vlaflow.backbone.mlp_weights import load_vla_with_mlp_init
from vlaflow.config import load_config, stage_settings
from vlaflow.data.collator import ROBOT_DIMENSIONS, Collator
from vlaflow.data.stage_data import build_stage_data
from vlaflow.data.stats import NormStats
from vlaflow.errors import VlaflowError
from vlaflow.fs import check_destination
from vlaflow.models.qwen2_vla.processing_qwen2_vla import load_processor
from vlaflow.stages import Stage, stage_table
from vlaflow.training.callbacks import MetricsLog, StopOnSignal, truncate_log
from vlaflow.training.checkpoints import (
    METRICS_FILE,
    STATS_FILE,
    checkpoint_step,
    export_model,
    latest_checkpoint,
)
from vlaflow.training.settings import training_arguments
from vlaflow.training.trainer import VLATrainer
from vlaflow.training.workdir import lock_work_folder, prepare_work_folder, run_record

logger = logging.getLogger(__name__)
SAMPLES_LOG = "samples-rank{rank}.jsonl"


def master_dtype(settings: dict) -> torch.dtype:
    """The dtype the weights are loaded in. DeepSpeed with bf16 keeps fp32 master weights in its
    optimizer, so the model may load in bf16; otherwise the optimizer steps the model's own
    weights, which must be fp32 (autocast runs the bf16 arithmetic): AdamW's updates at lr 2e-5
    round away on most bf16 weights."""
    return torch.bfloat16 if settings["bf16"] and settings["deepspeed"] else torch.float32


def load_stage_model(stage: Stage, init: Path, mlp_weights: Path | None, settings: dict):
    kwargs = {"attn_implementation": settings["attn_implementation"], "dtype": master_dtype(settings)}
    if stage.mlp_init != (mlp_weights is not None):
        needs = "needs" if stage.mlp_init else "takes no"
        raise VlaflowError(f"stage {stage.name} {needs} --mlp-weights (its mlp_init is {str(stage.mlp_init).lower()})")
    if mlp_weights is not None:
        model = load_vla_with_mlp_init(init, mlp_weights, using_moe=stage.moe, **kwargs)
    else:
        model, info = load_vla(init, output_loading_info=True, **kwargs)
        if info["missing_keys"]:
            raise VlaflowError(
                f"{init}: no weights for {sorted(info['missing_keys'])[0]!r}: a fresh VLA folder needs --mlp-weights"
            )
        if model.config.using_moe != stage.moe:
            raise VlaflowError(
                f"{init}: the model's using_moe is {model.config.using_moe}, stage {stage.name}'s moe is {stage.moe}"
            )
    model.freeze(*stage.freeze)
    if settings["gradient_checkpointing"]:
        model.config.use_cache = False
    return model


def _check_model_matches_config(model, config: dict, init: Path) -> None:
    head = model.config.policy_head_config
    for key in ROBOT_DIMENSIONS:
        if getattr(head, key) != config["model"][key]:
            raise VlaflowError(
                f"{init}: the model's policy head has {key} {getattr(head, key)}, the config's model.{key} is "
                f"{config['model'][key]}"
            )


def _prepare_distributed(settings: dict) -> None:
    """DeepSpeed under Trainer needs the process group before TrainingArguments exist, or each
    process silently trains alone; a single process still needs the rendezvous variables."""
    if not settings["deepspeed"]:
        return
    if "WORLD_SIZE" not in os.environ:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if not dist.is_initialized():
        import deepspeed

        deepspeed.init_distributed(dist_backend=None if torch.cuda.is_available() else "gloo")


def check_world_size(launched: int, trained: int) -> None:
    if launched != trained:
        raise VlaflowError(
            f"the launcher started {launched} processes (WORLD_SIZE={launched}) but training runs with world size "
            f"{trained}: each process would train alone; launch with torchrun, deepspeed or srun so that "
            "the processes form one group"
        )


def train(config_path: Path, stage: str, init: Path, workdir: Path, out: Path, mlp_weights: Path | None = None):
    out, workdir, init = Path(out), Path(workdir), Path(init)
    if out.exists():
        raise VlaflowError(f"{out}: already exists; the stage is done (remove it to train again)")
    check_destination(out)  # fail now, not after training
    check_destination(workdir)
    config = load_config(config_path)
    table = stage_table(config, str(config_path))
    if stage not in table:
        raise VlaflowError(f"{config_path}: stages.{stage}: not configured (stages: {', '.join(table)})")
    settings = stage_settings(config, stage)
    set_seed(settings["seed"])

    processor = load_processor(init)
    stats = NormStats.load(init / STATS_FILE) if (init / STATS_FILE).exists() else None
    stage_data = build_stage_data(config, stage, stats=stats, source=str(config_path))
    model = load_stage_model(table[stage], init, mlp_weights, settings)
    _check_model_matches_config(model, config, init)

    _prepare_distributed(settings)
    args = training_arguments(settings, workdir)
    check_world_size(int(os.environ.get("WORLD_SIZE", 1)), args.world_size)
    record = run_record(config, stage, init, mlp_weights, stage_data.files)
    if args.should_save:
        held = lock_work_folder(workdir)  # noqa: F841  (held while this function trains)
        prepare_work_folder(workdir, record)
    if dist.is_initialized():
        dist.barrier()

    resume = latest_checkpoint(workdir)
    metrics = workdir / METRICS_FILE
    samples_log = workdir / SAMPLES_LOG.format(rank=args.process_index)
    if args.should_save:
        truncate_log(metrics, checkpoint_step(resume) if resume else 0)
    truncate_log(samples_log, checkpoint_step(resume) if resume else 0)

    collator = Collator.from_config(processor, config, sources=True)
    stop = StopOnSignal()
    try:
        trainer = VLATrainer(
            model=model,
            args=args,
            train_dataset=stage_data.dataset,
            data_collator=collator,
            processing_class=processor,
            callbacks=[MetricsLog(metrics), stop],
            mix=stage_data.mix,
            data_seed=config["data"]["seed"],
            run_files={
                "processor": processor,
                "stats": stage_data.stats or stats,
                "config": config,
                "stage": stage,
                "record": record,
            },
            samples_log=samples_log,
        )
        # the processes that really form one data-parallel group: none unless accelerate wraps the model
        parallel = trainer.accelerator.distributed_type != DistributedType.NO
        check_world_size(int(os.environ.get("WORLD_SIZE", 1)), trainer.accelerator.num_processes if parallel else 1)
        if resume is not None:
            logger.warning("resuming from %s (step %d)", resume, checkpoint_step(resume))
        trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    finally:
        stop.restore()

    if stop.received is not None:
        logger.warning(
            "stopped by signal %d at step %d; run the command again to continue",
            stop.received,
            trainer.state.global_step,
        )
        sys.exit(128 + stop.received)
    if args.should_save:
        export_model(latest_checkpoint(workdir), out, metrics)
    if dist.is_initialized():
        dist.barrier()
    return out
