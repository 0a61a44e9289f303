"""`vlaflow check-model`: load a VLA folder, print what it holds, and run batched inference once."""

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from vlaflow.backbone.folder import load_vla
from vlaflow.data import language
from vlaflow.models.qwen2_vla import ROBOT_EXPERT, VL_EXPERT, Qwen2VLAForConditionalGeneration
from vlaflow.models.qwen2_vla.processing_qwen2_vla import load_processor


def parameter_counts(model: Qwen2VLAForConditionalGeneration) -> dict[str, int]:
    counts = {"vision tower": 0, "language model": 0, "vl expert": 0, "robot expert": 0, "policy head": 0, "other": 0}
    for name, parameter in model.named_parameters():
        if f".mlp.experts.{VL_EXPERT}." in name:
            part = "vl expert"
        elif f".mlp.experts.{ROBOT_EXPERT}." in name:
            part = "robot expert"
        elif name.startswith("model.visual."):
            part = "vision tower"
        elif name.startswith(("model.language_model.", "lm_head.")):
            part = "language model"
        elif name.startswith("policy_head."):
            part = "policy head"
        else:
            part = "other"
        counts[part] += parameter.numel()
    return counts


def check_model(folder: Path, mlp_weights: Path | None = None, batch_size: int = 2, seed: int = 0) -> None:
    if mlp_weights is not None:
        from vlaflow.backbone.mlp_weights import load_vla_with_mlp_init

        model = load_vla_with_mlp_init(folder, mlp_weights)
    else:
        model = load_vla(folder)
    model.eval()
    processor = load_processor(folder)
    for part, count in parameter_counts(model).items():
        print(f"{part:>15}: {count:,} parameters")

    rng = np.random.default_rng(seed)
    images = [[Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))] for _ in range(batch_size)]
    questions = processor.generation_inputs(images, ["What color is the shape?"] * batch_size)
    answers = processor.batch_decode(model.answer(**questions, max_new_tokens=8), skip_special_tokens=True)
    print(f"answers (vision-language expert): {answers}")

    head = model.config.policy_head_config
    inputs = processor.generation_inputs(images, [language.TRANSFER_CUBE_INSTRUCTION] * batch_size)
    states = torch.zeros(batch_size, head.state_dim)
    prediction = model.predict_action(**inputs, states=states, generator=torch.Generator().manual_seed(seed))
    reasoning = processor.batch_decode(prediction.reasoning_ids, skip_special_tokens=True)
    print(
        f"action chunks (robot expert): {tuple(prediction.actions.shape)}, finite: {bool(prediction.actions.isfinite().all())}"
    )
    print(f"reasoning before acting: {reasoning}")
