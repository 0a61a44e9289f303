"""Training-step time of the dense model, the routed static MoE, and upstream's blend formula.

All three share the same weights and the same mixed batch (half vision-language, half robot
samples, one image each); a step is forward + backward of the full loss. Prints each time and
the ratios routed/dense (target <= 1.05) and blend/dense, measured side by side in one run.

    python -m tests.benchmarks.moe_step                       # tiny and MLP-dominated sizes, CPU
    python -m tests.benchmarks.moe_step --sizes 2b --device cuda --dtype bfloat16
"""

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from tests.benchmarks.upstream_blend import use_blended_moe
from tests.conftest import random_image
from vlaflow.backbone.download import BUILTIN_TINY, download
from vlaflow.backbone.vla_config import vla_config_dict
from vlaflow.data.collator import Collator
from vlaflow.data.samples import RobotSample, VLSample
from vlaflow.models.qwen2_vla import ROBOT_EXPERT, VL_EXPERT, Qwen2VLAConfig, Qwen2VLAForConditionalGeneration
from vlaflow.models.qwen2_vla.processing_qwen2_vla import Qwen2VLAProcessor

# Text-model shapes; the vision tower stays small (its width must equal the text width).
SIZES = {
    "tiny": dict(
        hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
    ),
    "mlp-heavy": dict(
        hidden_size=512, intermediate_size=4096, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2
    ),
    "2b": dict(
        hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2
    ),
}


def build_config(backbone: Path, size: str, using_moe: bool) -> Qwen2VLAConfig:
    backbone_config = json.loads((backbone / "config.json").read_text())
    config = Qwen2VLAConfig.from_dict(
        vla_config_dict(backbone_config, policy_head=dict(action_dim=14, state_dim=14), using_moe=using_moe)
    )
    text = SIZES[size]
    for key, value in text.items():
        setattr(config.text_config, key, value)
    head_dim = text["hidden_size"] // text["num_attention_heads"]
    quarter = head_dim // 2 // 4
    config.text_config.rope_parameters["mrope_section"] = [head_dim // 2 - 2 * quarter, quarter, quarter]
    config.text_config.layer_types = ["full_attention"] * text["num_hidden_layers"]
    config.vision_config.hidden_size = text["hidden_size"]
    config.policy_head_config.cond_dim = text["hidden_size"]
    return config


def dense_to_moe_state(dense_state: dict) -> dict:
    state = {}
    for key, tensor in dense_state.items():
        if ".mlp." in key and "language_model" in key:
            for expert in (VL_EXPERT, ROBOT_EXPERT):
                state[key.replace(".mlp.", f".mlp.experts.{expert}.")] = tensor
        else:
            state[key] = tensor
    return state


def time_interleaved(models: dict, batch: dict, steps: int, device: str) -> dict[str, float]:
    """Median step time per model in milliseconds; the models take turns, step by step, so drift
    of the machine (other load, clock) falls on all of them alike."""
    times = {name: [] for name in models}
    for step in range(steps + 2):
        for name, model in models.items():
            model.train()
            torch.manual_seed(step)
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            model(**batch).loss.backward()
            if device == "cuda":
                torch.cuda.synchronize()
            elapsed = time.perf_counter() - start
            model.zero_grad(set_to_none=True)
            if step >= 2:  # the first steps warm up allocators and kernels
                times[name].append(elapsed)
    return {name: statistics.median(values) * 1000 for name, values in times.items()}


def mixed_batch(processor, batch_size: int) -> dict:
    """Half vision-language, half robot samples, one 64x64 image each, through the collator."""
    rng = np.random.default_rng(0)
    samples = []
    for index in range(batch_size):
        question = "what color is the shape in the image?"
        if index % 2 == 0:
            turns = [("user", f"<image>\n{question}"), ("assistant", "red")]
            samples.append(VLSample([random_image(index)], turns, f"vl {index}"))
            continue
        robot = RobotSample(
            images=[random_image(index)],
            state=rng.normal(size=14).astype(np.float32),
            actions=rng.uniform(-1, 1, (16, 14)).astype(np.float32),
            is_pad=np.zeros(16, dtype=bool),
            instruction=question,
            reasoning="Lift the cube and move it to the middle.",
            source=f"robot {index}",
        )
        samples.append(robot)
    return Collator(processor, max_length=512, action_dim=14, state_dim=14, chunk_size=16)(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["tiny", "mlp-heavy"], choices=sorted(SIZES))
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)

    with tempfile.TemporaryDirectory() as tmp:
        backbone = download(BUILTIN_TINY, Path(tmp) / "backbone")
        processor = Qwen2VLAProcessor.from_pretrained(backbone)
        batch = mixed_batch(processor, args.batch_size)
        batch = {key: value.to(args.device) for key, value in batch.items()}
        tokens = int(batch["attention_mask"].sum())
        print(f"batch: {args.batch_size} samples (half robot), {tokens} tokens; device {args.device}, {args.dtype}")
        print(
            f"{'size':>10} {'params':>8} {'dense ms':>9} {'routed ms':>10} {'blend ms':>9} {'routed/dense':>13} {'blend/dense':>12}"
        )
        for size in args.sizes:
            torch.manual_seed(0)
            dense = Qwen2VLAForConditionalGeneration(build_config(backbone, size, using_moe=False))
            routed = Qwen2VLAForConditionalGeneration(build_config(backbone, size, using_moe=True))
            routed.load_state_dict(dense_to_moe_state(dense.state_dict()), strict=True)
            blend = Qwen2VLAForConditionalGeneration(build_config(backbone, size, using_moe=True))
            blend.load_state_dict(routed.state_dict(), strict=True)
            use_blended_moe(blend)
            models = {"dense": dense, "routed": routed, "blend": blend}
            for model in models.values():
                model.to(args.device, dtype)
            times = time_interleaved(models, batch, args.steps, args.device)
            dense_ms, routed_ms, blend_ms = times["dense"], times["routed"], times["blend"]
            params = sum(p.numel() for p in dense.parameters()) / 1e6
            print(
                f"{size:>10} {params:>7.1f}M {dense_ms:>9.1f} {routed_ms:>10.1f} {blend_ms:>9.1f} "
                f"{routed_ms / dense_ms:>13.3f} {blend_ms / dense_ms:>12.3f}"
            )
            del dense, routed, blend, models


if __name__ == "__main__":
    main()
