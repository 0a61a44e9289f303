"""The collator: labels on assistant turns only, the tokenizer's padding, the length rule, and
batches the model trains on."""

import logging

import pytest
import torch

from tests.conftest import ACTION_DIM, CHUNK_SIZE, STATE_DIM, robot_sample, text_sample, vl_sample
from vlaflow.data.collator import Collator, robot_answer
from vlaflow.errors import VlaflowError
from vlaflow.models.qwen2_vla import ROBOT_EXPERT, VL_EXPERT
from vlaflow.models.qwen2_vla.modeling_qwen2_vla import IGNORE_INDEX


def labelled_text(processor, batch, row) -> str:
    labels = batch["labels"][row]
    return processor.tokenizer.decode(labels[labels != IGNORE_INDEX])


def test_labels_cover_exactly_the_assistant_turns(processor, collator):
    batch = collator([robot_sample(0), vl_sample(), text_sample()])
    assert labelled_text(processor, batch, 0) == "Lift the cube. Next action:<|im_end|>"
    assert labelled_text(processor, batch, 1) == "red<|im_end|>no<|im_end|>"
    assert labelled_text(processor, batch, 2) == "yes<|im_end|>"
    assert robot_answer("") == "Next action:"


def test_tokens_equal_the_processor_on_the_whole_rendered_conversation(processor, collator):
    sample = vl_sample()
    batch = collator([sample])
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "\nwhat color is the shape?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "red"}]},
        {"role": "user", "content": [{"type": "text", "text": "is there a circle?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "no"}]},
    ]
    reference = processor(text=[processor.apply_chat_template(messages)], images=sample.images, return_tensors="pt")
    assert batch["input_ids"][0].tolist() == reference["input_ids"][0].tolist()
    assert batch["mm_token_type_ids"][0].tolist() == reference["mm_token_type_ids"][0].tolist()
    assert torch.equal(batch["pixel_values"], reference["pixel_values"])
    assert torch.equal(batch["image_grid_thw"], reference["image_grid_thw"])


def test_routes_and_robot_targets(collator):
    robot = robot_sample(0)
    batch = collator([vl_sample(), robot])
    assert batch["expert_route"].tolist() == [VL_EXPERT, ROBOT_EXPERT]
    assert torch.equal(batch["actions"][1], torch.from_numpy(robot.actions))
    assert torch.equal(batch["states"][1], torch.from_numpy(robot.state))
    assert batch["is_pad"][1].tolist() == robot.is_pad.tolist()
    assert batch["is_pad"][0].all() and not batch["actions"][0].any()


@pytest.mark.parametrize("side", ["right", "left"])
def test_padding_uses_the_tokenizers_pad_id_and_side(processor, side):
    processor.tokenizer.padding_side = side
    try:
        collator = Collator(
            processor, max_length=512, action_dim=ACTION_DIM, state_dim=STATE_DIM, chunk_size=CHUNK_SIZE
        )
        batch = collator([vl_sample(), text_sample()])
    finally:
        processor.tokenizer.padding_side = "right"
    mask = batch["attention_mask"][1]
    padded = batch["input_ids"][1][mask == 0]
    assert len(padded) > 0 and (padded == processor.tokenizer.pad_token_id).all()
    assert (batch["labels"][1][mask == 0] == IGNORE_INDEX).all()
    assert (mask[-1] == 0) if side == "right" else (mask[0] == 0)


def test_over_long_sample_is_cut_after_its_images(processor):
    full = Collator(processor, max_length=512, action_dim=ACTION_DIM, state_dim=STATE_DIM, chunk_size=CHUNK_SIZE)
    length = int(full([vl_sample()])["attention_mask"].sum())
    image_end = (
        full([vl_sample()])["input_ids"][0].tolist().index(processor.tokenizer.convert_tokens_to_ids("<|vision_end|>"))
    )
    cut = Collator(processor, max_length=length - 3, action_dim=ACTION_DIM, state_dim=STATE_DIM, chunk_size=CHUNK_SIZE)
    batch = cut([vl_sample()])
    assert batch["input_ids"].shape[1] == length - 3 > image_end
    assert cut.skipped == 0


def test_sample_whose_images_reach_past_the_cut_is_skipped_and_logged(processor, caplog):
    collator = Collator(processor, max_length=20, action_dim=ACTION_DIM, state_dim=STATE_DIM, chunk_size=CHUNK_SIZE)
    with caplog.at_level(logging.WARNING, logger="vlaflow.data.collator"):
        batch = collator([vl_sample(), text_sample()])
    assert batch["input_ids"].shape[0] == 1 and batch["expert_route"].tolist() == [VL_EXPERT]
    assert "pixel_values" not in batch
    assert collator.skipped == 1
    assert "skipped vl.json: entry 0" in caplog.text and "(1 skipped so far)" in caplog.text
    with pytest.raises(VlaflowError, match="every sample of a batch is longer than data.max_length=20"):
        collator([vl_sample()])


def test_mismatched_robot_dimensions_are_an_error(processor):
    collator = Collator(
        processor, max_length=512, action_dim=ACTION_DIM + 1, state_dim=STATE_DIM, chunk_size=CHUNK_SIZE
    )
    with pytest.raises(VlaflowError, match="episode.hdf5:0: actions"):
        collator([robot_sample(0)])


def test_a_collated_mixed_batch_trains_the_model(collator, vla_model):
    batch = collator(
        [robot_sample(0), vl_sample(), text_sample(), robot_sample(3, reasoning="", image_sizes=((64, 64), (48, 64)))]
    )
    output = vla_model(**batch)
    assert torch.isfinite(output.loss)
    assert output.action_loss > 0 and output.reasoning_loss > 0 and output.vl_loss > 0 and output.text_only_loss > 0
    output.loss.backward()
    assert vla_model.policy_head.parameters().__next__().grad is not None
