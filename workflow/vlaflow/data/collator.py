"""Turn robot and vision-language samples into one model batch.

Each sample becomes a chat conversation rendered with the processor's own chat template: a robot
sample is a user turn (its camera images, then the instruction) answered by its reasoning and
the next-action marker; a VL sample keeps its turns, each `<image>` replaced by the template's
image slot. Only assistant turns carry labels. The conversation is tokenised piece by piece at
turn boundaries, so labels line up with tokens exactly; at inference the prompt is tokenised the
same way, on its own.
"""

import logging
import re
from dataclasses import dataclass

import numpy as np
import torch

from vlaflow.data.conversations import IMAGE_PLACEHOLDER
from vlaflow.data.language import NEXT_ACTION_MARKER
from vlaflow.data.samples import RobotSample, VLSample
from vlaflow.errors import VlaflowError
from vlaflow.models.qwen2_vla.modeling_qwen2_vla import IGNORE_INDEX, ROBOT_EXPERT, VL_EXPERT
from vlaflow.models.qwen2_vla.processing_qwen2_vla import user_message

logger = logging.getLogger(__name__)
# The workflow config's `model` keys that fix the shape of a batch's robot targets.
ROBOT_DIMENSIONS = ("action_dim", "state_dim", "chunk_size")


def robot_answer(reasoning: str) -> str:
    """What the model says before it acts: the step's reasoning, then the marker."""
    return f"{reasoning} {NEXT_ACTION_MARKER}" if reasoning else NEXT_ACTION_MARKER


def _vl_message(role: str, text: str) -> dict:
    parts = re.split(f"({re.escape(IMAGE_PLACEHOLDER)})", text)
    content = [
        {"type": "image"} if part == IMAGE_PLACEHOLDER else {"type": "text", "text": part} for part in parts if part
    ]
    return {"role": role, "content": content}


def sample_messages(sample: RobotSample | VLSample) -> list[dict]:
    if isinstance(sample, RobotSample):
        answer = {"role": "assistant", "content": [{"type": "text", "text": robot_answer(sample.reasoning)}]}
        return [user_message(sample.instruction, len(sample.images)), answer]
    return [_vl_message(role, text) for role, text in sample.turns]


@dataclass
class _Encoded:
    input_ids: list[int]
    labels: list[int]
    image_grids: torch.Tensor  # (images, 3)
    pixel_values: torch.Tensor | None


class Collator:
    """Batches for `Qwen2VLAForConditionalGeneration`: token ids, labels, images, the per-sample
    expert route (0 VL, 1 robot) and normalised robot targets (zeros with `is_pad` set for VL rows).

    A sample longer than `max_length` is cut after its last image token; one whose images reach
    past the cut is skipped and logged, so an image's tokens are never split. With `sources`, the
    batch also lists where each kept sample came from (training logs it per step).
    """

    def __init__(
        self, processor, *, max_length: int, action_dim: int, state_dim: int, chunk_size: int, sources: bool = False
    ):
        self.processor = processor
        self.tokenizer = processor.tokenizer
        if self.tokenizer.pad_token_id is None:
            raise VlaflowError(f"the tokenizer ({type(self.tokenizer).__name__}) has no pad token")
        self.max_length = max_length
        self.action_dim, self.state_dim, self.chunk_size = action_dim, state_dim, chunk_size
        self.image_token = processor.image_token
        self.image_token_id = self.tokenizer.convert_tokens_to_ids(self.image_token)
        self.merge_length = processor.image_processor.merge_size**2
        self.sources = sources
        self.skipped = 0

    @classmethod
    def from_config(cls, processor, config: dict, sources: bool = False) -> "Collator":
        """The collator a workflow config asks for: its `data.max_length` and robot dimensions."""
        dimensions = {key: config["model"][key] for key in ROBOT_DIMENSIONS}
        return cls(processor, max_length=config["data"]["max_length"], sources=sources, **dimensions)

    def __call__(self, samples: list[RobotSample | VLSample]) -> dict[str, torch.Tensor]:
        kept, encoded = [], []
        for sample in samples:
            item = self._fit(self.encode(sample), sample)
            if item is not None:
                kept.append(sample)
                encoded.append(item)
        if not kept:
            raise VlaflowError(
                f"every sample of a batch is longer than data.max_length={self.max_length} with images past the cut "
                f"(first: {samples[0].source}); raise data.max_length or lower data.image_size"
            )
        batch = self._pad(encoded)
        batch.update(self._robot_targets(kept))
        if self.sources:
            batch["sources"] = [sample.source for sample in kept]
        return batch

    def encode(self, sample: RobotSample | VLSample) -> _Encoded:
        images = sample.images
        if images:
            processed = self.processor.image_processor(images=images, return_tensors="pt")
            grids, pixel_values = processed["image_grid_thw"], processed["pixel_values"]
        else:
            grids, pixel_values = torch.zeros((0, 3), dtype=torch.long), None
        token_counts = iter((grids.prod(dim=-1) // self.merge_length).tolist())
        input_ids, labels = [], []
        for text, is_label in self._pieces(sample_messages(sample)):
            if self.image_token in text:
                text = re.sub(re.escape(self.image_token), lambda _: self.image_token * next(token_counts), text)
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            input_ids += ids
            labels += ids if is_label else [IGNORE_INDEX] * len(ids)
        return _Encoded(input_ids, labels, grids, pixel_values)

    def _pieces(self, messages: list[dict]):
        """(text, is_label) pieces of the rendered conversation: each assistant answer up to and
        including its end-of-turn token is a label; everything else is context."""
        template = self.processor.apply_chat_template
        rendered = ""
        for index, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            prompt = template(messages[:index], add_generation_prompt=True)
            full = template(messages[: index + 1])
            if not (prompt.startswith(rendered) and full.startswith(prompt)):
                raise VlaflowError("the chat template does not render a conversation as a growing prefix")
            answer = full[len(prompt) :]
            answer_end = len(answer.rstrip("\n"))
            yield prompt[len(rendered) :], False
            yield answer[:answer_end], True
            if answer_end < len(answer):
                yield answer[answer_end:], False
            rendered = full

    def fits(self, sample: RobotSample | VLSample) -> bool:
        """Whether a batch keeps `sample` (whole, or cut after its images) rather than skipping it."""
        return self._cut(self.encode(sample)) is not None

    def _cut(self, encoded: _Encoded) -> int | None:
        """The length a sample keeps: all of it, or `max_length` if that cuts after its last image
        token and the token closing it; None if its images reach past the cut."""
        length = len(encoded.input_ids)
        if length <= self.max_length:
            return length
        image_positions = np.flatnonzero(np.asarray(encoded.input_ids) == self.image_token_id)
        if len(image_positions) and image_positions[-1] + 1 >= self.max_length:
            return None
        return self.max_length

    def _fit(self, encoded: _Encoded, sample) -> _Encoded | None:
        cut = self._cut(encoded)
        if cut is None:
            self.skipped += 1
            logger.warning(
                "skipped %s: %d tokens, over max_length %d with image tokens past the cut (%d skipped so far)",
                sample.source,
                len(encoded.input_ids),
                self.max_length,
                self.skipped,
            )
            return None
        encoded.input_ids = encoded.input_ids[:cut]
        encoded.labels = encoded.labels[:cut]
        return encoded

    def _pad(self, encoded: list[_Encoded]) -> dict[str, torch.Tensor]:
        longest = max(len(item.input_ids) for item in encoded)
        input_ids = torch.full((len(encoded), longest), self.tokenizer.pad_token_id, dtype=torch.long)
        labels = torch.full((len(encoded), longest), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(encoded), longest), dtype=torch.long)
        left = self.tokenizer.padding_side == "left"
        for row, item in enumerate(encoded):
            length = len(item.input_ids)
            span = slice(longest - length, longest) if left else slice(0, length)
            input_ids[row, span] = torch.tensor(item.input_ids)
            labels[row, span] = torch.tensor(item.labels)
            attention_mask[row, span] = 1
        # as the processor marks them: 1 for image tokens, which M-RoPE positions in 2D
        mm_token_type_ids = (input_ids == self.image_token_id).int()
        batch = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
            "mm_token_type_ids": mm_token_type_ids,
        }
        pixel_values = [item.pixel_values for item in encoded if item.pixel_values is not None]
        if pixel_values:
            batch["pixel_values"] = torch.cat(pixel_values)
            batch["image_grid_thw"] = torch.cat([item.image_grids for item in encoded])
        return batch

    def _robot_targets(self, samples: list) -> dict[str, torch.Tensor]:
        actions = torch.zeros((len(samples), self.chunk_size, self.action_dim))
        states = torch.zeros((len(samples), self.state_dim))
        is_pad = torch.ones((len(samples), self.chunk_size), dtype=torch.bool)
        route = torch.full((len(samples),), VL_EXPERT, dtype=torch.long)
        for row, sample in enumerate(samples):
            if not isinstance(sample, RobotSample):
                continue
            if sample.actions.shape != (self.chunk_size, self.action_dim) or sample.state.shape != (self.state_dim,):
                raise VlaflowError(
                    f"{sample.source}: actions {sample.actions.shape} / state {sample.state.shape} do not match the "
                    f"model's chunk {self.chunk_size} x action_dim {self.action_dim} / state_dim {self.state_dim}"
                )
            route[row] = ROBOT_EXPERT
            actions[row] = torch.from_numpy(sample.actions)
            states[row] = torch.from_numpy(sample.state)
            is_pad[row] = torch.from_numpy(sample.is_pad)
        return {"expert_route": route, "actions": actions, "states": states, "is_pad": is_pad}
