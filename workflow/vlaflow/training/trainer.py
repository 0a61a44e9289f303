"""transformers' Trainer for the ChatVLA model: the stage's mix decides the sample order, every
loss component is logged, and checkpoints are complete, self-contained folders."""

import json
import os
import signal
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader
from transformers import Trainer

from vlaflow.data.mixing import Mix, MixSampler
from vlaflow.models.qwen2_vla import ROBOT_EXPERT
from vlaflow.models.qwen2_vla.modeling_qwen2_vla import IGNORE_INDEX
from vlaflow.training.checkpoints import mark_complete, write_run_files

LOSS_COMPONENTS = ("action_loss", "reasoning_loss", "vl_loss", "text_only_loss")


def noise_seed(seed: int, rank: int, step: int, draw: int) -> int:
    """The seed of the diffusion noise and timesteps of one forward pass: distinct per rank (every
    rank seeds its global RNG alike, so with it 8 ranks would draw the same noise 8 times), per
    optimizer step and per micro-batch within it, and the same again when a run resumes."""
    return int(np.random.SeedSequence([seed, rank, step, draw]).generate_state(1)[0])


def _ignore_stop_signals(worker_id: int) -> None:
    """Data workers leave SIGTERM to the training process, which saves before it exits."""
    for number in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(number, signal.SIG_IGN)


class VLATrainer(Trainer):
    def __init__(self, *args, mix: Mix | None, data_seed: int, run_files: dict, samples_log: Path, **kwargs):
        super().__init__(*args, **kwargs)
        self.mix = mix
        self.data_seed = data_seed
        self.run_files = run_files
        self.samples_log = Path(samples_log)
        self.components = defaultdict(list)
        self._draw = (-1, 0)  # (optimizer step, index of the forward pass within it)
        # compute_loss normalises over the global batch itself; Trainer must neither count label
        # tokens for the model nor rescale the loss, except for gradient accumulation.
        self.model_accepts_loss_kwargs = False
        self.loss_is_scaled_for_ga = False

    def get_train_dataloader(self) -> DataLoader:
        """This rank's batches, already composed by the mix and ordered by the config's data seed
        (as `vlaflow data check` shows them): no further sharding or shuffling."""
        args = self.args
        batches = args.max_steps * args.gradient_accumulation_steps
        sampler = MixSampler(
            self.train_dataset,
            self.mix,
            batch_size=args.per_device_train_batch_size,
            seed=self.data_seed,
            rank=args.process_index,
            world_size=args.world_size,
            num_samples=batches * args.per_device_train_batch_size,
        )
        return DataLoader(
            self.train_dataset,
            batch_size=args.per_device_train_batch_size,
            sampler=sampler,
            collate_fn=self.data_collator,
            num_workers=args.dataloader_num_workers,
            worker_init_fn=_ignore_stop_signals,
            pin_memory=torch.cuda.is_available(),
        )

    def _global_scales(self, inputs: dict) -> tuple[float, float]:
        """Factors that turn this batch's normalised action and token losses into its share of
        losses normalised over the global batch (DDP and DeepSpeed average gradients over ranks)."""
        world_size = self.args.world_size
        if world_size == 1:
            return 1.0, 1.0
        tokens = (inputs["labels"][:, 1:] != IGNORE_INDEX).sum()
        robot = inputs["expert_route"] == ROBOT_EXPERT
        action_values = (~inputs["is_pad"][robot]).sum() * inputs["actions"].shape[-1]
        local = torch.stack([action_values, tokens]).float()
        total = local.clone()
        dist.all_reduce(total)
        scales = torch.where(total > 0, local * world_size / total.clamp(min=1), torch.zeros_like(local))
        return float(scales[0]), float(scales[1])

    def _noise_generator(self, device: torch.device) -> tuple[torch.Generator, int]:
        step = self.state.global_step
        draw = self._draw[1] + 1 if self._draw[0] == step else 0
        self._draw = (step, draw)
        seed = noise_seed(self.args.seed, self.args.process_index, step, draw)
        return torch.Generator(device=device).manual_seed(seed), seed

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        sources = inputs.pop("sources", None)
        if model.training:
            inputs["noise_generator"], seed = self._noise_generator(inputs["input_ids"].device)
            if sources is not None:
                self._log_sources(sources, seed)
        outputs = model(**inputs)
        action_scale, token_scale = self._global_scales(inputs)
        vl_weight = self.mix.vl_loss_weight if self.mix is not None else 1.0
        loss = self.accelerator.unwrap_model(model).total_loss(outputs, action_scale, token_scale, vl_weight)
        # scaled like the loss, so that their mean over ranks is the global batch's value
        self.components["loss"].append(loss.detach())
        for name, scale in zip(LOSS_COMPONENTS, (action_scale, token_scale, token_scale, token_scale)):
            value = getattr(outputs, name)
            if value is not None:
                self.components[name].append(value.detach() * scale)
        return (loss, outputs) if return_outputs else loss

    def _log_sources(self, sources: list[str], noise_seed: int) -> None:
        entry = {"step": self.state.global_step + 1, "sources": sources, "noise_seed": noise_seed}
        with self.samples_log.open("a") as file:
            file.write(json.dumps(entry) + "\n")

    def log(self, logs: dict, start_time: float | None = None) -> None:
        """Training logs carry the loss and its components over the global batch (Trainer's own
        loss is this rank's on CPU), averaged over the steps since the last log."""
        if "loss" in logs and self.components:
            names = list(self.components)
            means = torch.stack([torch.stack(self.components[name]).float().mean() for name in names])
            if self.args.world_size > 1:
                means = means.to(self.args.device)
                dist.all_reduce(means)
                means = means / self.args.world_size
            logs.update({name: round(value, 6) for name, value in zip(names, means.tolist())})
            self.components.clear()
        super().log(logs, start_time)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        """Trainer reloads weights by module name, but checkpoints are saved in Qwen2-VL's release
        layout (`model.layers.*`, `visual.*`), which only from_pretrained maps back: without this,
        a resumed run would silently continue from its initial weights."""
        target = self.accelerator.unwrap_model(model if model is not None else self.model)
        dtype = next(target.parameters()).dtype
        saved = type(target).from_pretrained(resume_from_checkpoint, dtype=dtype)
        target.load_state_dict(saved.state_dict(), strict=True)

    def _save_checkpoint(self, model, trial) -> None:
        super()._save_checkpoint(model, trial)
        folder = Path(self.args.output_dir) / f"checkpoint-{self.state.global_step}"
        if self.args.should_save:
            write_run_files(folder, **self.run_files)
        # every rank has written its part (DeepSpeed shards) before the folder is declared complete
        if dist.is_available() and dist.is_initialized():
            dist.barrier()
        if self.args.should_save:
            os.sync()
            mark_complete(folder, self.state.global_step)
