"""The published recipe's full-size model, one training step on a CPU, and its memory per GPU.

The VLA model of `tests/fixtures/qwen2_vl_2b_instruct/config.json` (Qwen2-VL-2B with both
experts) with ScaleDP-L, random weights in bf16, one forward and backward pass of a batch of two
(one vision-language sample, one robot sample, each with a 320x240 image as the recipe feeds them)
through the real collator, with gradient checkpointing off and on, each in a process of its own so
that its peak memory is its own. Prints the parameter counts, the memory of each phase, the losses
(finite, and equal with and without checkpointing), then an estimate of the memory per GPU of the
published recipe (8 GPUs, ZeRO-2, bf16, batch 16) from the model's real sizes and the activation
memory per token measured here.

    python -m tests.benchmarks.full_size_step          # ~25 GB of RAM at most; several minutes on 2 cores
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from tests.conftest import FIXTURES, random_image
from vlaflow.backbone.download import BUILTIN_TINY_RELEASE, download
from vlaflow.backbone.vla_config import vla_config_dict
from vlaflow.data.collator import Collator
from vlaflow.data.language import TRANSFER_CUBE_INSTRUCTION
from vlaflow.data.samples import RobotSample, VLSample
from vlaflow.model_check import parameter_counts
from vlaflow.models.qwen2_vla import Qwen2VLAConfig, Qwen2VLAForConditionalGeneration
from vlaflow.models.qwen2_vla.modeling_qwen2_vla import CROSS_ENTROPY_CHUNK
from vlaflow.models.qwen2_vla.processing_qwen2_vla import load_processor

ACTION_DIM = STATE_DIM = 14
CHUNK = 16
IMAGE = (240, 320)  # the recipe's robot frames and, resized, its VL images (height, width)
GPUS, BATCH = 8, 16  # the published recipe: per-GPU batch 16 on one node of 8
SEQUENCES = {"robot (measured here)": None, "LLaVA-typical": 512, "data.max_length": 2048}
GIB = 2**30
TOKEN_IDS = {
    "image_token_id": "<|image_pad|>",
    "video_token_id": "<|video_pad|>",
    "vision_start_token_id": "<|vision_start|>",
    "vision_end_token_id": "<|vision_end|>",
    "vision_token_id": "<|vision_pad|>",
}


def rss(field: str = "VmRSS") -> int:
    """This process's resident memory (VmRSS) or its peak since the last reset (VmHWM), in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def processor_and_config(folder: Path):
    """The release tokenizer and chat template (its ids fit in the 2B vocabulary), the 2B's image
    processor settings, and the 2B VLA config with the tokenizer's special-token ids."""
    processor = load_processor(folder)
    processor.image_processor = Qwen2VLImageProcessorPil(
        patch_size=14, merge_size=2, temporal_patch_size=2, size={"shortest_edge": 3136, "longest_edge": 12845056}
    )
    backbone = json.loads((FIXTURES / "qwen2_vl_2b_instruct" / "config.json").read_text())
    tokenizer = processor.tokenizer
    backbone.update({key: tokenizer.convert_tokens_to_ids(token) for key, token in TOKEN_IDS.items()})
    head = dict(size="L", action_dim=ACTION_DIM, state_dim=STATE_DIM, chunk_size=CHUNK)
    return processor, Qwen2VLAConfig.from_dict(vla_config_dict(backbone, policy_head=head))


def batch(processor) -> dict:
    rng = np.random.default_rng(0)
    robot = RobotSample(
        images=[random_image(1, IMAGE)],
        state=rng.normal(size=STATE_DIM).astype(np.float32),
        actions=rng.uniform(-1, 1, (CHUNK, ACTION_DIM)).astype(np.float32),
        is_pad=np.zeros(CHUNK, dtype=bool),
        instruction=TRANSFER_CUBE_INSTRUCTION,
        reasoning="Move the right gripper to the cube and close it.",
        source="robot",
    )
    question = "<image>\nDescribe the objects on the table and where each of them is, in detail."
    answer = "There is a red cube near the right arm, and the left gripper is open above the middle. " * 4
    vl = VLSample([random_image(2, IMAGE)], [("user", question), ("assistant", answer)], "vl")
    collator = Collator(processor, max_length=2048, action_dim=ACTION_DIM, state_dim=STATE_DIM, chunk_size=CHUNK)
    return collator([vl, robot])


def one_step(checkpointing: bool) -> dict:
    """Runs in a process of its own: build, one forward and backward; returns the figures."""
    with tempfile.TemporaryDirectory() as tmp:
        processor, config = processor_and_config(download(BUILTIN_TINY_RELEASE, Path(tmp) / "release"))
    inputs = batch(processor)
    baseline = rss()
    torch.manual_seed(0)
    model = Qwen2VLAForConditionalGeneration._from_config(config, dtype=torch.bfloat16)
    model.train()
    if checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    weights = rss() - baseline
    reset_peak()
    start = time.perf_counter()
    output = model(**inputs, noise_generator=torch.Generator().manual_seed(0))
    forward_peak = rss("VmHWM") - baseline
    output.loss.backward()
    elapsed = time.perf_counter() - start
    return {
        "checkpointing": checkpointing,
        "counts": parameter_counts(model),
        "tokens": int(inputs["attention_mask"].sum()),
        "robot_tokens": int(inputs["attention_mask"][1].sum()),
        "label_tokens": int((inputs["labels"][:, 1:] != -100).sum()),
        "weights_bytes": weights,
        "forward_peak_bytes": forward_peak,
        "step_peak_bytes": rss("VmHWM") - baseline,
        "seconds": elapsed,
        "losses": {name: float(getattr(output, name)) for name in ("loss", "action_loss", "reasoning_loss", "vl_loss")},
        "hidden": config.text_config.hidden_size,
        "layers": config.text_config.num_hidden_layers,
        "vocab": config.text_config.vocab_size,
    }


def estimate(result: dict) -> list[tuple[str, float]]:
    """Memory per GPU of the published recipe, in GiB, at the given tokens per sample."""
    parameters = sum(result["counts"].values())
    # activations per token: what the forward pass kept beyond the weights, over the batch's tokens
    per_token = (result["forward_peak_bytes"] - result["weights_bytes"]) / result["tokens"]
    rows = [
        ("bf16 weights (every GPU holds them all)", 2 * parameters / GIB),
        ("bf16 gradients, ZeRO-2 partition (1/8)", 2 * parameters / GPUS / GIB),
        ("reduction buckets: 2 x 2e8 bf16 + one fp32 copy", (2 * 2e8 * 2 + 2e8 * 4) / GIB),
        ("fp32 master weights + Adam moments (1/8)", 12 * parameters / GPUS / GIB),
        (
            f"cross-entropy chunk: {CROSS_ENTROPY_CHUNK} tokens x {result['vocab']} fp32 logits, twice",
            2 * CROSS_ENTROPY_CHUNK * result["vocab"] * 4 / GIB,
        ),
    ]
    # what token losses cost before they were computed at label positions only, in chunks:
    # bf16 logits, their fp32 copy and the log-softmax, at every position of the batch
    full_logits = BATCH * SEQUENCES["data.max_length"] * result["vocab"] * (2 + 4 + 4) / GIB
    rows.append((f"(for comparison: full-vocabulary logits at every position, {BATCH} x 2048)", full_logits))
    for name, length in SEQUENCES.items():
        tokens = BATCH * (length or result["robot_tokens"])
        rows.append(
            (f"activations at {BATCH} x {length or result['robot_tokens']} tokens ({name})", per_token * tokens / GIB)
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--one", choices=["plain", "checkpointing"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one_step(args.one == "checkpointing")))
        return

    results = []
    for variant in ("plain", "checkpointing"):
        command = [sys.executable, "-m", "tests.benchmarks.full_size_step", "--one", variant]
        finished = subprocess.run(command, capture_output=True, text=True, check=True)
        results.append(json.loads(finished.stdout.strip().splitlines()[-1]))
    plain, checkpointed = results

    counts = plain["counts"]
    print(f"parameters: {sum(counts.values()) / 1e9:.3f}B")
    for part, count in counts.items():
        print(f"  {part:>15}: {count / 1e6:9.1f}M")
    print(
        f"batch: 1 VL + 1 robot sample, {plain['tokens']} tokens ({plain['robot_tokens']} robot), {plain['label_tokens']} label tokens"
    )
    print(
        f"{'gradient checkpointing':>24} {'weights GiB':>12} {'forward peak GiB':>17} {'step peak GiB':>14} {'seconds':>8}  losses"
    )
    for result in results:
        losses = ", ".join(f"{name} {value:.4f}" for name, value in result["losses"].items())
        print(
            f"{'on' if result['checkpointing'] else 'off':>24} {result['weights_bytes'] / GIB:>12.2f} "
            f"{result['forward_peak_bytes'] / GIB:>17.2f} {result['step_peak_bytes'] / GIB:>14.2f} "
            f"{result['seconds']:>8.1f}  {losses}"
        )
    finite = all(np.isfinite(value) for result in results for value in result["losses"].values())
    equal = all(abs(plain["losses"][name] - checkpointed["losses"][name]) <= 1e-6 for name in plain["losses"])
    print(f"losses finite: {finite}; equal with and without checkpointing: {equal}")
    print(f"step peak with checkpointing / without: {checkpointed['step_peak_bytes'] / plain['step_peak_bytes']:.2f}")

    print(f"\nmemory per GPU, published recipe ({GPUS} GPUs, ZeRO-2, bf16, batch {BATCH}, gradient checkpointing):")
    rows = estimate(checkpointed)
    for name, gib in rows:
        print(f"  {name:<70} {gib:6.1f} GiB")
    fixed = sum(gib for name, gib in rows if not name.startswith(("activations", "(")))
    for name, gib in rows:
        if name.startswith("activations"):
            print(f"  total with {name.removeprefix('activations at ')}: {fixed + gib:.1f} GiB")


if __name__ == "__main__":
    main()
