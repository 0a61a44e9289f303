"""A stage's training settings from the workflow config, as transformers' TrainingArguments."""

from pathlib import Path

import torch
from transformers import TrainingArguments


def training_arguments(settings: dict, workdir: Path) -> TrainingArguments:
    return TrainingArguments(
        output_dir=str(workdir),
        max_steps=settings["max_steps"],
        per_device_train_batch_size=settings["per_device_batch_size"],
        gradient_accumulation_steps=settings["gradient_accumulation_steps"],
        learning_rate=settings["learning_rate"],
        lr_scheduler_type=settings["lr_scheduler"],
        warmup_steps=settings["warmup_steps"],
        weight_decay=settings["weight_decay"],
        adam_beta1=settings["adam_beta1"],
        adam_beta2=settings["adam_beta2"],
        adam_epsilon=settings["adam_epsilon"],
        max_grad_norm=settings["max_grad_norm"],
        optim=settings["optimizer"],
        save_strategy="steps",
        save_steps=settings["save_steps"],
        save_total_limit=settings["save_total_limit"],
        logging_steps=settings["logging_steps"],
        logging_first_step=True,
        seed=settings["seed"],
        dataloader_num_workers=settings["num_workers"],
        bf16=settings["bf16"],
        activation_checkpointing=settings["gradient_checkpointing"],
        activation_checkpointing_kwargs={"use_reentrant": False},
        deepspeed=settings["deepspeed"],
        # the collator's keys are the model's inputs; Trainer must not filter them
        remove_unused_columns=False,
        # every trainable module takes part in every training batch (the model sees to it), so
        # DDP need not search the graph for unused parameters
        ddp_find_unused_parameters=False,
        # without it accelerate leaves CPU processes unconnected, each training alone
        use_cpu=not torch.cuda.is_available(),
        report_to=["tensorboard"],
    )
