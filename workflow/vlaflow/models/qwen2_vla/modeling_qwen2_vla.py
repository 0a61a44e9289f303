"""ChatVLA on transformers' Qwen2-VL: a routed static MoE, the reasoning FiLM, and a ScaleDP head.

Static MoE: every decoder MLP becomes two experts of the same shape, expert 0 for vision-language
samples and expert 1 for robot samples. The route is fixed per sample (`expert_route`, 0 or 1)
and each row of the batch runs through its own expert only; upstream ran both experts on every
token and blended them with the mask, at twice the MLP cost.
"""

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import initialization as init
from transformers.modeling_outputs import ModelOutput
from transformers.modeling_utils import slice_logits_to_keep
from transformers.models.qwen2_vl.modeling_qwen2_vl import (
    Qwen2MLP,
    Qwen2VLDecoderLayer,
    Qwen2VLForConditionalGeneration,
)

from vlaflow.models.qwen2_vla.configuration_qwen2_vla import Qwen2VLAConfig
from vlaflow.models.scale_dp.modeling_scale_dp import ScaleDPPolicy

VL_EXPERT = 0
ROBOT_EXPERT = 1
IGNORE_INDEX = -100


@dataclass
class ExpertRouting:
    """Which batch rows each expert processes; computed once per forward, shared by all layers.

    In training every expert runs, on zero rows if its route is empty: DeepSpeed's ZeRO reduces
    gradients in buckets that every rank must fill with the same parameters, so an expert skipped
    on one rank and used on another breaks the collective. Inference keeps the single-expert path.
    """

    uniform_expert: int | None
    rows: tuple[torch.Tensor, ...]
    inverse_order: torch.Tensor | None

    @classmethod
    def from_route(cls, expert_route: torch.Tensor, every_expert: bool = False) -> "ExpertRouting":
        route = expert_route.long().view(-1)
        counts = torch.bincount(route, minlength=2).tolist()
        if len(counts) > 2:
            raise ValueError(f"expert_route must hold 0 (vision-language) or 1 (robot), got {route.tolist()}")
        if not every_expert:
            for expert, count in enumerate(counts):
                if count == route.numel():
                    return cls(uniform_expert=expert, rows=(), inverse_order=None)
        rows = tuple(torch.nonzero(route == expert).view(-1) for expert in (VL_EXPERT, ROBOT_EXPERT))
        return cls(uniform_expert=None, rows=rows, inverse_order=torch.argsort(torch.cat(rows)))


class StaticMoEMLP(nn.Module):
    """Two Qwen2 MLPs; each batch row goes through the expert its sample is routed to. The decoder
    layer sets `routing` for the duration of its forward."""

    def __init__(self, config):
        super().__init__()
        self.experts = nn.ModuleList([Qwen2MLP(config), Qwen2MLP(config)])
        self.routing: ExpertRouting | None = None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        routing = self.routing
        if routing.uniform_expert is not None:
            return self.experts[routing.uniform_expert](hidden_states)
        outputs = [expert(hidden_states.index_select(0, rows)) for expert, rows in zip(self.experts, routing.rows)]
        return torch.cat(outputs).index_select(0, routing.inverse_order)


class Qwen2VLAMoEDecoderLayer(Qwen2VLDecoderLayer):
    """Qwen2-VL's decoder layer with the static MoE. The routing arrives as a keyword argument
    (which gradient checkpointing re-binds when it recomputes the layer) and is handed to the MLP;
    everything else is transformers' own layer, whatever its signature in the installed version."""

    def __init__(self, config, layer_idx: int):
        super().__init__(config, layer_idx)
        self.mlp = StaticMoEMLP(config)

    def forward(self, *args, expert_routing: ExpertRouting | None = None, **kwargs):
        if expert_routing is None:
            raise ValueError("the MoE decoder layer needs expert_routing; call the VLA model, not its submodules")
        self.mlp.routing = expert_routing
        try:
            return super().forward(*args, **kwargs)
        finally:
            self.mlp.routing = None


def masked_mean(hidden_states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mask = mask.to(hidden_states.dtype).unsqueeze(-1)
    return (hidden_states * mask).sum(1) / mask.sum(1).clamp(min=1)


class ReasoningConditioner(nn.Module):
    """One condition vector per robot sample from its prompt and its reasoning span.

    Both spans are mean-pooled and projected; the reasoning modulates the prompt with FiLM
    (zero-initialised, so training starts from the prompt alone), plus the pooled prompt.
    """

    def __init__(self, hidden_size: int):
        super().__init__()

        def projection():
            return nn.Sequential(nn.Linear(hidden_size, hidden_size), nn.GELU(), nn.Linear(hidden_size, hidden_size))

        self.prompt_proj = projection()
        self.reasoning_proj = projection()
        self.film_scale = nn.Linear(hidden_size, hidden_size)
        self.film_shift = nn.Linear(hidden_size, hidden_size)

    def forward(self, hidden_states: torch.Tensor, prompt_mask: torch.Tensor, reasoning_mask: torch.Tensor):
        prompt = masked_mean(hidden_states, prompt_mask)
        reasoning = self.reasoning_proj(masked_mean(hidden_states, reasoning_mask))
        film = self.prompt_proj(prompt) * (1 + self.film_scale(reasoning)) + self.film_shift(reasoning)
        return film + prompt


@dataclass
class Qwen2VLAOutput(ModelOutput):
    """`loss` = action_loss / llm_loss_weight + ce_loss; ce_loss = reasoning + vl + text-only.

    With `labels`, logits are computed only where labels exist, for the loss, and not returned.
    The language model's cache is `past_key_values` up to transformers 5.23 and `cache` from 5.24
    on: the output fills the field of the installed version, the one its generation reads.
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    past_key_values: object | None = None
    cache: object | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None
    action_loss: torch.FloatTensor | None = None
    ce_loss: torch.FloatTensor | None = None
    reasoning_loss: torch.FloatTensor | None = None
    vl_loss: torch.FloatTensor | None = None
    text_only_loss: torch.FloatTensor | None = None


# Label tokens whose logits exist at once: one chunk of (tokens x vocabulary) in fp32, recomputed
# in the backward pass, instead of logits for every position of the batch.
CROSS_ENTROPY_CHUNK = 1024


@dataclass
class ActionPrediction(ModelOutput):
    """Normalised action chunks (batch, chunk, action_dim) and the reasoning generated before them."""

    actions: torch.FloatTensor | None = None
    reasoning_ids: torch.LongTensor | None = None


class Qwen2VLAForConditionalGeneration(Qwen2VLForConditionalGeneration):
    config_class = Qwen2VLAConfig
    config: Qwen2VLAConfig
    _no_split_modules = ["Qwen2VLDecoderLayer", "Qwen2VLAMoEDecoderLayer", "Qwen2VLVisionBlock"]

    def __init__(self, config: Qwen2VLAConfig):
        super().__init__(config)
        text_config = config.text_config
        if config.using_moe:
            self.model.language_model.layers = nn.ModuleList(
                Qwen2VLAMoEDecoderLayer(text_config, index) for index in range(text_config.num_hidden_layers)
            )
        self.reasoning_conditioner = ReasoningConditioner(text_config.hidden_size)
        self.policy_head = ScaleDPPolicy(config.policy_head_config)
        self.post_init()

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, ScaleDPPolicy):
            module.reset_parameters()
        elif isinstance(module, ReasoningConditioner):
            for film in (module.film_scale, module.film_shift):
                init.zeros_(film.weight)
                init.zeros_(film.bias)

    @property
    def decoder_layers(self) -> nn.ModuleList:
        return self.model.language_model.layers

    def expert(self, layer_index: int, expert_index: int) -> Qwen2MLP:
        if not self.config.using_moe:
            raise ValueError("this model has no experts: its config sets using_moe=False")
        return self.decoder_layers[layer_index].mlp.experts[expert_index]

    def part_modules(self, part: str) -> list[nn.Module]:
        """The modules a stage may freeze by name: `vl_expert` and `robot_expert` (every layer's
        expert), `policy_head`, `reasoning_conditioner`, `vision_tower`."""
        if part in ("vl_expert", "robot_expert"):
            index = VL_EXPERT if part == "vl_expert" else ROBOT_EXPERT
            return [self.expert(layer, index) for layer in range(len(self.decoder_layers))]
        parts = {
            "policy_head": self.policy_head,
            "reasoning_conditioner": self.reasoning_conditioner,
            "vision_tower": self.model.visual,
        }
        if part not in parts:
            raise ValueError(f"no part {part!r} to freeze (parts: vl_expert, robot_expert, {', '.join(parts)})")
        return [parts[part]]

    def freeze(self, *parts: str) -> None:
        """Leave the named parts' weights as they are (stage 1 freezes the VL expert)."""
        for part in parts:
            for module in self.part_modules(part):
                module.requires_grad_(False)

    @property
    def _every_module_takes_part(self) -> bool:
        """Training runs every trainable module on every batch (on zero rows, or zero-weighted,
        where the batch has nothing for it): data-parallel ranks must produce gradients for the
        same parameters, or DeepSpeed's bucketed reduction fails or hangs."""
        return self.training and torch.is_grad_enabled()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values=None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.LongTensor | None = None,
        mm_token_type_ids: torch.IntTensor | None = None,
        expert_route: torch.LongTensor | None = None,
        actions: torch.FloatTensor | None = None,
        states: torch.FloatTensor | None = None,
        is_pad: torch.BoolTensor | None = None,
        noise_generator: torch.Generator | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> Qwen2VLAOutput:
        r"""
        expert_route (`torch.LongTensor` of shape `(batch_size,)`): 0 for vision-language samples,
            1 for robot samples; defaults to all vision-language.
        actions (`(batch_size, chunk_size, action_dim)`), states (`(batch_size, state_dim)`),
        is_pad (`(batch_size, chunk_size)`): normalised robot targets; rows of vision-language
            samples are ignored.
        noise_generator (`torch.Generator`): the diffusion noise and timesteps of the action loss
            are drawn from it (training seeds one per rank and step); default: the global RNG.
        """
        reference = input_ids if input_ids is not None else inputs_embeds
        if expert_route is None:
            expert_route = torch.full((reference.shape[0],), VL_EXPERT, dtype=torch.long, device=reference.device)
        if past_key_values is not None:
            kwargs["past_key_values"] = past_key_values
        outputs = self._backbone(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            pixel_values=pixel_values,
            image_grid_thw=image_grid_thw,
            mm_token_type_ids=mm_token_type_ids,
            expert_route=expert_route,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        # transformers 5.24 renamed the language model's `past_key_values` to `cache`
        cache_field = "cache" if hasattr(outputs, "cache") else "past_key_values"
        result = Qwen2VLAOutput(
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            **{cache_field: getattr(outputs, cache_field)},
        )
        if labels is not None:
            self._add_token_losses(result, hidden_states, labels, input_ids, expert_route)
        else:
            result.logits = self.lm_head(slice_logits_to_keep(hidden_states, logits_to_keep))
        if actions is not None:
            result.action_loss = self._action_loss(
                hidden_states, labels, attention_mask, expert_route, actions, states, is_pad, noise_generator
            )
        if result.ce_loss is not None or result.action_loss is not None:
            result.loss = self.total_loss(result)
        return result

    def _backbone(self, input_ids, pixel_values, image_grid_thw, mm_token_type_ids, expert_route, **kwargs):
        """Qwen2-VL's vision tower and language model, with the MoE routing passed to every layer."""
        if mm_token_type_ids is None and input_ids is not None and image_grid_thw is not None:
            mm_token_type_ids = (input_ids == self.config.image_token_id).int()
        if self.config.using_moe:
            kwargs["expert_routing"] = ExpertRouting.from_route(
                expert_route, every_expert=self._every_module_takes_part
            )
        if pixel_values is None and self._every_module_takes_part:
            embeddings = kwargs.get("inputs_embeds")
            if embeddings is None:
                embeddings = self.model.get_input_embeddings()(input_ids)
            kwargs["inputs_embeds"] = embeddings + 0 * self._blank_image_features()
        return self.model(
            input_ids=input_ids,
            pixel_values=pixel_values,
            image_grid_thw=image_grid_thw,
            mm_token_type_ids=mm_token_type_ids,
            **kwargs,
        )

    def _blank_image_features(self) -> torch.Tensor:
        """The vision tower on the smallest blank image, summed: added times zero to the token
        embeddings of an image-free batch, it gives the tower gradients (of zero) like any batch
        with images. It runs where real images do, after the embeddings and before the language
        model, so the backward pass reaches the parameters in the same order on every rank:
        ZeRO-2 packs gradients into its reduction buckets in the order they arrive, and ranks
        that filled them in different orders would sum different parameters' gradients."""
        vision = self.config.vision_config
        merge = vision.spatial_merge_size
        grid = torch.tensor([[1, merge, merge]], device=self.device)
        patch = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
        pixels = torch.zeros((merge * merge, patch), device=self.device, dtype=self.model.visual.dtype)
        return self.model.visual(pixels, grid_thw=grid).pooler_output.sum()

    def _add_token_losses(self, result, hidden_states, labels, input_ids, expert_route) -> None:
        """Token cross-entropy split by sample kind, each part summed and divided by the batch's
        label-token count, so the parts add up to the mean cross-entropy.

        Logits are computed only at label positions, a chunk at a time and again in the backward
        pass: full-vocabulary fp32 logits for every position (16 x 2048 tokens x 151936 words for
        the published recipe) would take tens of GB per GPU."""
        shift_labels = labels[:, 1:].to(hidden_states.device)
        positions = torch.nonzero(shift_labels != IGNORE_INDEX, as_tuple=True)
        label_hidden = hidden_states[:, :-1][positions]
        targets = shift_labels[positions]
        chunk_losses = self._label_cross_entropy(label_hidden, targets)
        token_losses = torch.zeros(shift_labels.shape, dtype=torch.float32, device=hidden_states.device)
        token_losses = token_losses.index_put(positions, chunk_losses)
        per_sample = token_losses.sum(dim=1)
        label_tokens = len(targets) or 1
        robot = expert_route == ROBOT_EXPERT
        has_image = (input_ids == self.config.image_token_id).any(dim=1) if input_ids is not None else ~robot
        result.reasoning_loss = per_sample[robot].sum() / label_tokens
        result.vl_loss = per_sample[~robot & has_image].sum() / label_tokens
        result.text_only_loss = per_sample[~robot & ~has_image].sum() / label_tokens
        result.ce_loss = result.reasoning_loss + result.vl_loss + result.text_only_loss

    def _label_cross_entropy(self, label_hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The cross-entropy of each label token. There is at least one chunk, empty if the batch
        has no label, so the LM head takes part in every training batch."""
        losses = []
        for start in range(0, max(len(targets), 1), CROSS_ENTROPY_CHUNK):
            chunk = (label_hidden[start : start + CROSS_ENTROPY_CHUNK], targets[start : start + CROSS_ENTROPY_CHUNK])
            if torch.is_grad_enabled():
                losses.append(checkpoint(self._chunk_cross_entropy, *chunk, use_reentrant=False))
            else:
                losses.append(self._chunk_cross_entropy(*chunk))
        return torch.cat(losses)

    def _chunk_cross_entropy(self, hidden_states: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(hidden_states).float()
        return nn.functional.cross_entropy(logits, targets, reduction="none")

    def _action_loss(
        self, hidden_states, labels, attention_mask, expert_route, actions, states, is_pad, noise_generator=None
    ):
        robot = expert_route == ROBOT_EXPERT
        if not robot.any() and not self._every_module_takes_part:
            return hidden_states.new_zeros((), dtype=torch.float32)
        if states is None or is_pad is None:
            raise ValueError("robot samples need states and is_pad along with actions")
        # with no robot row, the conditioner and the head run on zero rows: their loss is 0
        robot_hidden = hidden_states[robot]
        valid = (
            attention_mask[robot].bool()
            if attention_mask is not None
            else torch.ones(robot_hidden.shape[:2], dtype=torch.bool, device=robot_hidden.device)
        )
        if labels is not None:
            reasoning_mask = labels[robot] != IGNORE_INDEX
        else:
            reasoning_mask = torch.zeros_like(valid)
        condition = self.reasoning_conditioner(robot_hidden, valid & ~reasoning_mask, reasoning_mask)
        return self.policy_head.loss(actions[robot], is_pad[robot], condition, states[robot], generator=noise_generator)

    def total_loss(
        self, result: Qwen2VLAOutput, action_scale: float = 1.0, token_scale: float = 1.0, vl_weight: float = 1.0
    ) -> torch.Tensor:
        """action_loss / llm_loss_weight + the token losses (the reasoning part only with the LLM
        head on, the VL parts times `vl_weight`). Training rescales each part with `action_scale`
        and `token_scale` so that it is normalised over the whole global batch, not this batch."""
        total = 0
        if result.action_loss is not None:
            total = total + action_scale * result.action_loss / self.config.llm_loss_weight
        if result.ce_loss is not None:
            reasoning = result.reasoning_loss if self.config.with_llm_head else 0
            total = total + token_scale * (reasoning + vl_weight * (result.vl_loss + result.text_only_loss))
        return total

    @torch.no_grad()
    def answer(self, input_ids, attention_mask, pixel_values=None, image_grid_thw=None, max_new_tokens=32, **kwargs):
        """Greedy answers with the vision-language expert; returns only the new token ids."""
        route = torch.full((input_ids.shape[0],), VL_EXPERT, dtype=torch.long, device=input_ids.device)
        sequences = self.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            pixel_values=pixel_values,
            image_grid_thw=image_grid_thw,
            expert_route=route,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            suppress_tokens=self._vision_token_ids(),
            **kwargs,
        )
        return sequences[:, input_ids.shape[1] :]

    @torch.no_grad()
    def predict_action(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor,
        states: torch.FloatTensor,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.LongTensor | None = None,
        max_reasoning_tokens: int = 48,
        generator: torch.Generator | None = None,
        **kwargs,
    ) -> ActionPrediction:
        """Robot control for a left-padded batch of prompts: generate each sample's reasoning
        greedily with the robot expert, then condition the policy head on prompt and reasoning."""
        batch_size, prompt_length = input_ids.shape
        route = torch.full((batch_size,), ROBOT_EXPERT, dtype=torch.long, device=input_ids.device)
        sequences = input_ids
        if self.config.with_llm_head and max_reasoning_tokens > 0:
            sequences = self.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                pixel_values=pixel_values,
                image_grid_thw=image_grid_thw,
                expert_route=route,
                max_new_tokens=max_reasoning_tokens,
                do_sample=False,
                suppress_tokens=self._vision_token_ids(),
                **kwargs,
            )
        reasoning_ids = sequences[:, prompt_length:]
        eos_ids = torch.tensor(self._eos_token_ids(), device=reasoning_ids.device)
        eos = torch.isin(reasoning_ids, eos_ids)
        reasoning_mask = (eos.cumsum(dim=1) - eos.long()) == 0  # up to and including the first end token
        full_mask = torch.cat([attention_mask.bool(), reasoning_mask], dim=1)
        hidden_states = self._backbone(
            input_ids=sequences,
            attention_mask=full_mask.long(),
            pixel_values=pixel_values,
            image_grid_thw=image_grid_thw,
            mm_token_type_ids=None,
            expert_route=route,
        ).last_hidden_state
        prompt_mask = torch.cat([attention_mask.bool(), torch.zeros_like(reasoning_mask)], dim=1)
        reasoning_span = torch.cat([torch.zeros_like(attention_mask, dtype=torch.bool), reasoning_mask], dim=1)
        condition = self.reasoning_conditioner(hidden_states, prompt_mask, reasoning_span)
        actions = self.policy_head.sample(condition, states.to(condition.dtype), generator=generator)
        pad_id = self.generation_config.pad_token_id
        if pad_id is None:
            pad_id = self._eos_token_ids()[0]
        return ActionPrediction(actions=actions, reasoning_ids=reasoning_ids.masked_fill(~reasoning_mask, pad_id))

    def _vision_token_ids(self) -> list[int]:
        """Placeholders that only the processor may write: generated ones would claim image
        features that do not exist when the reasoning is fed back in."""
        config = self.config
        return [config.image_token_id, config.video_token_id, config.vision_start_token_id, config.vision_end_token_id]

    def _eos_token_ids(self) -> list[int]:
        """The generation config's end tokens; official Qwen2-VL folders list two."""
        eos = self.generation_config.eos_token_id
        if eos is None:
            eos = self.config.text_config.eos_token_id
        return list(eos) if isinstance(eos, (list, tuple)) else [eos]
