"""The ChatVLA model: routed static MoE, freezing, losses, batched inference, save/load."""

import pytest
import torch
from transformers import AutoModelForImageTextToText

from tests.benchmarks.upstream_blend import use_blended_moe
from tests.conftest import ACTION_DIM, CHUNK_SIZE, STATE_DIM, random_image, robot_sample, text_sample, vl_sample
from vlaflow.data import language
from vlaflow.models.qwen2_vla import ROBOT_EXPERT, VL_EXPERT, Qwen2VLAForConditionalGeneration, modeling_qwen2_vla
from vlaflow.models.qwen2_vla.modeling_qwen2_vla import IGNORE_INDEX, ExpertRouting

MODEL_INPUTS = ("input_ids", "attention_mask", "pixel_values", "image_grid_thw", "mm_token_type_ids", "expert_route")


def inputs_of(batch):
    return {key: batch[key] for key in MODEL_INPUTS}


def perturb(module, seed=0):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.5)


def test_perturbing_the_robot_expert_changes_only_robot_samples(vla_model, mixed_batch):
    vla_model.eval()
    with torch.no_grad():
        before = vla_model(**inputs_of(mixed_batch)).logits
        for layer in range(len(vla_model.decoder_layers)):
            perturb(vla_model.expert(layer, ROBOT_EXPERT), seed=layer)
        after = vla_model(**inputs_of(mixed_batch)).logits
    robot = mixed_batch["expert_route"] == ROBOT_EXPERT
    assert torch.equal(before[~robot], after[~robot])
    valid = mixed_batch["attention_mask"][robot].bool()
    assert (before[robot] - after[robot]).abs()[valid].max() > 1e-2


def test_routed_moe_equals_the_blend_formula_on_the_same_weights(vla_model, mixed_batch):
    for layer in range(len(vla_model.decoder_layers)):
        perturb(vla_model.expert(layer, ROBOT_EXPERT), seed=layer)
    vla_model.eval()
    with torch.no_grad():
        routed = vla_model(**inputs_of(mixed_batch)).logits
        use_blended_moe(vla_model)
        blended = vla_model(**inputs_of(mixed_batch)).logits
    assert (routed - blended).abs().max() <= 1e-5


def test_routing_computes_each_row_with_exactly_one_expert():
    routing = ExpertRouting.from_route(torch.tensor([1, 0, 0, 1, 0]))
    assert routing.uniform_expert is None
    assert routing.rows[VL_EXPERT].tolist() == [1, 2, 4] and routing.rows[ROBOT_EXPERT].tolist() == [0, 3]
    assert ExpertRouting.from_route(torch.ones(3, dtype=torch.long)).uniform_expert == ROBOT_EXPERT
    every = ExpertRouting.from_route(torch.ones(3, dtype=torch.long), every_expert=True)
    assert every.uniform_expert is None
    assert every.rows[VL_EXPERT].tolist() == [] and every.rows[ROBOT_EXPERT].tolist() == [0, 1, 2]
    with pytest.raises(ValueError, match="expert_route must hold 0"):
        ExpertRouting.from_route(torch.tensor([0, 2]))


BATCHES = {
    "robot only": lambda: [robot_sample(1), robot_sample(2, "Close the left gripper.", ((64, 80),))],
    "VL only": lambda: [vl_sample(0), text_sample()],
    "text only": lambda: [text_sample(), text_sample()],
}


TRAINED_IN_EVERY_BATCH = {
    "model.language_model.layers.0.mlp.experts.0.down_proj.weight": "the VL expert",
    "model.language_model.layers.0.mlp.experts.1.down_proj.weight": "the robot expert",
    "policy_head.final_layer.linear.weight": "the policy head",
    "reasoning_conditioner.prompt_proj.0.weight": "the reasoning conditioner",
    "model.visual.blocks.0.attn.qkv.weight": "the vision tower",
    "lm_head.weight": "the LM head",
}


@pytest.mark.parametrize("kind", list(BATCHES))
def test_training_gives_every_trainable_module_a_gradient_whatever_the_batch_holds(vla_model, collator, kind):
    """Data-parallel ranks under DeepSpeed must reduce gradients of the same parameters: a rank
    whose batch holds only robot samples (or no robot sample, or no image) still runs every module."""
    perturb(vla_model.policy_head)  # past adaLN-Zero's start, where the condition gets no gradient
    vla_model.train()
    vla_model(**collator(BATCHES[kind]())).loss.backward()
    for name, parameter in vla_model.named_parameters():
        assert parameter.grad is not None, name
    parameters = dict(vla_model.named_parameters())
    unused = {
        "robot only": ["the VL expert"],
        "VL only": ["the robot expert", "the policy head", "the reasoning conditioner"],
    }
    unused["text only"] = unused["VL only"] + ["the vision tower"]
    for name, module in TRAINED_IN_EVERY_BATCH.items():
        gradient = parameters[name].grad
        if module in unused[kind]:
            assert torch.count_nonzero(gradient) == 0, module  # it took part with zero rows or zero weight
        else:
            assert torch.count_nonzero(gradient) > 0, module


def test_taking_part_changes_neither_the_loss_nor_the_gradients(vla_model, collator):
    batch = collator(BATCHES["robot only"]())
    results = []
    for every_module in (True, False):
        vla_model.zero_grad(set_to_none=True)
        vla_model.train(every_module)  # eval mode runs the single-expert path
        loss = vla_model(**batch, noise_generator=torch.Generator().manual_seed(0)).loss
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in vla_model.named_parameters() if p.grad is not None}))
    (loss_all, grads_all), (loss_used, grads_used) = results
    assert torch.equal(loss_all, loss_used)
    assert set(grads_used) < set(grads_all)
    for name, gradient in grads_used.items():
        assert torch.allclose(gradient, grads_all[name], atol=1e-6), name


def test_inference_runs_one_expert_per_uniform_batch(vla_model, collator):
    calls = {VL_EXPERT: 0, ROBOT_EXPERT: 0}
    for expert in calls:
        hook = lambda *_, expert=expert: calls.__setitem__(expert, calls[expert] + 1)  # noqa: E731
        vla_model.expert(0, expert).register_forward_hook(hook)
    vla_model.eval()
    with torch.no_grad():
        vla_model(**inputs_of(collator(BATCHES["robot only"]())))
    assert calls == {VL_EXPERT: 0, ROBOT_EXPERT: 1}


def test_logits_are_computed_at_label_positions_only(vla_model, mixed_batch, monkeypatch):
    rows = []
    vla_model.lm_head.register_forward_hook(lambda module, inputs, output: rows.append(inputs[0].shape[0]))
    vla_model.train()
    torch.manual_seed(0)
    reference = vla_model(**mixed_batch)
    (reference.loss).backward()
    reference_grad = vla_model.lm_head.weight.grad.clone()
    label_tokens = int((mixed_batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    assert rows == [label_tokens, label_tokens]  # forward, and again in the backward pass

    # chunked: a few label tokens at a time, the same losses and gradients
    monkeypatch.setattr(modeling_qwen2_vla, "CROSS_ENTROPY_CHUNK", 3)
    vla_model.zero_grad()
    rows.clear()
    torch.manual_seed(0)
    chunked = vla_model(**mixed_batch)
    chunked.loss.backward()
    assert max(rows) == 3 and sum(rows) == 2 * label_tokens
    for part in ("ce_loss", "reasoning_loss", "vl_loss", "text_only_loss"):
        assert torch.allclose(getattr(chunked, part), getattr(reference, part), atol=1e-6), part
    assert torch.allclose(vla_model.lm_head.weight.grad, reference_grad, atol=1e-6)


def test_action_loss_draws_its_noise_from_the_given_generator(vla_model, mixed_batch):
    def action_loss(seed):
        return vla_model(**mixed_batch, noise_generator=torch.Generator().manual_seed(seed)).action_loss

    torch.manual_seed(0)
    state = torch.get_rng_state()
    first = action_loss(1)
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is left alone
    assert torch.equal(action_loss(1), first)
    assert not torch.equal(action_loss(2), first)


def test_diffusion_noising_is_fp32_in_a_bf16_head(vla_model):
    """In bf16, alpha-bar at t = 0, 1 rounds to 1 and the noise would vanish from the head's input."""
    head = vla_model.policy_head.to(torch.bfloat16)
    rows = 400
    condition = torch.randn(rows, head.config.cond_dim, dtype=torch.bfloat16)
    states = torch.randn(rows, STATE_DIM)
    actions = torch.rand(rows, CHUNK_SIZE, ACTION_DIM) * 2 - 1
    seen = []
    head.action_embed.register_forward_pre_hook(lambda module, inputs: seen.append(inputs[0]))
    head.loss(
        actions, torch.zeros(rows, CHUNK_SIZE, dtype=torch.bool), condition, states, torch.Generator().manual_seed(0)
    )

    draws = torch.Generator().manual_seed(0)
    noise = torch.randn(actions.shape, generator=draws)
    timesteps = torch.randint(0, head.config.num_train_timesteps, (rows,), generator=draws)
    alpha_bar = head.noise_scheduler.alphas_cumprod.double()[timesteps].view(-1, 1, 1)
    expected = alpha_bar.sqrt() * actions.double() + (1 - alpha_bar).sqrt() * noise.double()
    assert (timesteps <= 1).any()
    assert seen[0].dtype == torch.bfloat16
    assert torch.equal(seen[0], expected.to(torch.bfloat16))
    chunk = head.sample(condition[:2], states[:2], generator=torch.Generator().manual_seed(0))
    assert chunk.dtype == torch.float32 and chunk.isfinite().all()


def test_freeze_vl_expert_leaves_expert_0_bit_identical_after_a_step(vla_model, mixed_batch):
    vla_model.freeze("vl_expert")
    vla_model.train()
    before = {name: p.detach().clone() for name, p in vla_model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in vla_model.parameters() if p.requires_grad], lr=1e-2)
    vla_model(**mixed_batch).loss.backward()
    optimizer.step()
    changed = {name for name, p in vla_model.named_parameters() if not torch.equal(before[name], p)}
    frozen = {name for name in before if ".mlp.experts.0." in name}
    assert frozen and not frozen & changed
    for expected in (
        "model.language_model.layers.0.mlp.experts.1.up_proj.weight",
        "model.language_model.layers.0.self_attn.q_proj.weight",
        "model.visual.blocks.0.attn.qkv.weight",
        "model.language_model.embed_tokens.weight",
        "lm_head.weight",
        "policy_head.final_layer.linear.weight",
        "reasoning_conditioner.prompt_proj.0.weight",
    ):
        assert expected in changed, expected


def test_loss_components_add_up_as_the_recipe_says(vla_model, mixed_batch):
    vla_model.config.llm_loss_weight = 2.0
    torch.manual_seed(0)
    output = vla_model(**mixed_batch)
    assert output.logits is None  # with labels, logits exist only inside the loss, at label positions
    labels = mixed_batch["labels"][:, 1:]
    logits = vla_model(**inputs_of(mixed_batch)).logits[:, :-1]
    mean_ce = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX
    )
    assert torch.allclose(output.reasoning_loss + output.vl_loss + output.text_only_loss, mean_ce, atol=1e-6)
    assert output.ce_loss == output.reasoning_loss + output.vl_loss + output.text_only_loss
    for part in (output.reasoning_loss, output.vl_loss, output.text_only_loss, output.action_loss):
        assert part > 0
    assert torch.allclose(output.loss, output.action_loss / 2.0 + output.ce_loss)

    # the parts are split by sample kind: the robot rows alone carry the whole reasoning loss
    tokens_per_row = (labels != IGNORE_INDEX).sum(1).float()
    robot = mixed_batch["expert_route"] == ROBOT_EXPERT
    rows = torch.nn.functional.cross_entropy(
        logits.transpose(1, 2), labels, ignore_index=IGNORE_INDEX, reduction="none"
    ).sum(1)
    assert torch.allclose(output.reasoning_loss, rows[robot].sum() / tokens_per_row.sum(), atol=1e-6)

    vl_only = {
        key: value[~robot] if value.shape[0] == 4 else value
        for key, value in mixed_batch.items()
        if key != "pixel_values"
    }
    vl_only.pop("image_grid_thw")
    vl_only["input_ids"] = mixed_batch["input_ids"][~robot]
    text_only = {key: value[1:] for key, value in vl_only.items()}  # the text-only VL sample
    output = vla_model(**text_only)
    assert output.action_loss == 0 and output.vl_loss == 0 and output.reasoning_loss == 0
    assert output.loss == output.text_only_loss > 0


def test_action_loss_ignores_padded_steps(vla_model, mixed_batch):
    torch.manual_seed(0)
    reference = vla_model(**mixed_batch).action_loss
    changed = dict(mixed_batch, actions=mixed_batch["actions"].clone())
    changed["actions"][:, -1] += 100.0  # the last step is padding in every sample
    torch.manual_seed(0)
    assert torch.equal(vla_model(**changed).action_loss, reference)


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(vla_model, mixed_batch):
    vla_model.train()
    results = []
    for checkpointing in (False, True):
        if checkpointing:
            vla_model.activation_checkpointing_enable()
            assert all(layer.gradient_checkpointing for layer in vla_model.decoder_layers)
        vla_model.zero_grad()
        torch.manual_seed(0)
        loss = vla_model(**mixed_batch).loss
        loss.backward()
        results.append(
            (loss.detach(), {n: p.grad.clone() for n, p in vla_model.named_parameters() if p.grad is not None})
        )
    (loss_plain, grads_plain), (loss_checkpointed, grads_checkpointed) = results
    assert torch.allclose(loss_plain, loss_checkpointed, atol=1e-6)
    assert grads_plain.keys() == grads_checkpointed.keys()
    expert_grad = "model.language_model.layers.1.mlp.experts.1.down_proj.weight"
    assert grads_plain[expert_grad].abs().sum() > 0
    for name in grads_plain:
        assert torch.allclose(grads_plain[name], grads_checkpointed[name], atol=1e-5), name


def test_batched_predict_action_returns_one_chunk_per_sample(vla_model, processor):
    vla_model.eval()
    images = [[random_image(seed, size)] for seed, size in ((0, (64, 64)), (1, (48, 64)), (2, (64, 96)))]
    inputs = processor.generation_inputs(
        images, [language.TRANSFER_CUBE_INSTRUCTION, "Lift the cube.", "Hand it over."]
    )
    prediction = vla_model.predict_action(
        **inputs, states=torch.randn(3, STATE_DIM), max_reasoning_tokens=6, generator=torch.Generator().manual_seed(0)
    )
    assert prediction.actions.shape == (3, CHUNK_SIZE, ACTION_DIM)
    assert prediction.actions.isfinite().all() and prediction.actions.abs().max() <= 1.0  # clipped samples
    assert prediction.reasoning_ids.shape[0] == 3

    # official Qwen2-VL folders list two end tokens in their generation config
    end_tokens = [vla_model.config.text_config.eos_token_id, vla_model.config.text_config.pad_token_id]
    vla_model.generation_config.eos_token_id = end_tokens
    prediction = vla_model.predict_action(**inputs, states=torch.randn(3, STATE_DIM), max_reasoning_tokens=6)
    assert prediction.actions.shape == (3, CHUNK_SIZE, ACTION_DIM)


def test_batched_generation_matches_one_sample_at_a_time(vla_model, processor):
    """Left padding, per-sample routes and image positions must not leak between rows."""
    for layer in range(len(vla_model.decoder_layers)):
        perturb(vla_model.expert(layer, ROBOT_EXPERT), seed=layer)
    vla_model.eval()
    images = [[random_image(3)], [random_image(4, (48, 80))], []]
    questions = ["what color is the shape?", "is there a circle in the image?", "what shape is it?"]
    batched = vla_model.answer(**processor.generation_inputs(images, questions), max_new_tokens=5)
    for row, (sample_images, question) in enumerate(zip(images, questions)):
        alone = vla_model.answer(**processor.generation_inputs([sample_images], [question]), max_new_tokens=5)
        assert torch.equal(batched[row, : alone.shape[1]], alone[0]), row


def test_save_and_load_round_trip_is_exact(vla_model, mixed_batch, tmp_path):
    perturb(vla_model.policy_head, seed=3)
    perturb(vla_model.expert(0, ROBOT_EXPERT), seed=4)
    vla_model.save_pretrained(tmp_path / "saved")
    assert not list((tmp_path / "saved").glob("*.bin"))
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path / "saved")
    assert type(loaded) is Qwen2VLAForConditionalGeneration
    saved_config, original_config = loaded.config.to_dict(), vla_model.config.to_dict()
    saved_config.pop("_name_or_path"), original_config.pop("_name_or_path")
    assert saved_config == original_config
    original, reloaded = vla_model.state_dict(), loaded.state_dict()
    assert original.keys() == reloaded.keys()
    for name in original:
        assert torch.equal(original[name], reloaded[name]), name
    vla_model.eval(), loaded.eval()
    with torch.no_grad():
        assert torch.equal(vla_model(**inputs_of(mixed_batch)).logits, loaded(**inputs_of(mixed_batch)).logits)


def test_policy_head_starts_at_zero_noise_and_learns(vla_model):
    head = vla_model.policy_head
    condition = torch.randn(8, head.config.cond_dim)
    states = torch.randn(8, STATE_DIM)
    noisy = torch.randn(8, CHUNK_SIZE, ACTION_DIM)
    with torch.no_grad():
        assert torch.equal(
            head.predict_noise(noisy, torch.zeros(8, dtype=torch.long), condition, states), torch.zeros_like(noisy)
        )
    actions = torch.rand(8, CHUNK_SIZE, ACTION_DIM) * 2 - 1
    is_pad = torch.zeros(8, CHUNK_SIZE, dtype=torch.bool)
    optimizer = torch.optim.AdamW(head.parameters(), lr=1e-3)
    torch.manual_seed(0)
    losses = []
    for _ in range(150):
        loss = head.loss(actions, is_pad, condition, states)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-20:]) / 20 < 0.5 * sum(losses[:20]) / 20


def test_total_loss_weights_the_vl_parts_and_rescales_each_kind(vla_model, mixed_batch):
    output = vla_model(**mixed_batch)
    llw = vla_model.config.llm_loss_weight
    weighted = vla_model.total_loss(output, action_scale=0.5, token_scale=2.0, vl_weight=0.1)
    expected = 0.5 * output.action_loss / llw + 2.0 * (
        output.reasoning_loss + 0.1 * (output.vl_loss + output.text_only_loss)
    )
    assert torch.allclose(weighted, expected)
    assert torch.equal(vla_model.total_loss(output), output.loss)


def test_generation_never_writes_vision_placeholders(vla_model, processor):
    """An untrained model may prefer any token; a generated image placeholder would break the
    second pass of predict_action, which feeds the reasoning back in."""
    vla_model.eval()
    with torch.no_grad():
        vla_model.lm_head.weight[vla_model.config.image_token_id] += 50.0  # make it the favourite
    inputs = processor.generation_inputs([[random_image(0)]], ["Pick up the red cube."])
    answer = vla_model.answer(**inputs, max_new_tokens=4)
    assert vla_model.config.image_token_id not in answer.tolist()[0]
    prediction = vla_model.predict_action(**inputs, states=torch.zeros(1, STATE_DIM), max_reasoning_tokens=4)
    assert prediction.actions.shape == (1, CHUNK_SIZE, ACTION_DIM)
