"""Configuration of the ChatVLA model: Qwen2-VL's configuration plus the VLA fields.

Every VLA field has a default, so the official Qwen2-VL `config.json` with only `model_type`
and `architectures` replaced already loads (upstream's loader read the fields unconditionally).
"""

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig, Qwen2VLConfig

from vlaflow.models.scale_dp.configuration_scale_dp import ScaleDPConfig

POLICY_HEAD_TYPES = ("scale_dp_policy",)


@strict
class Qwen2VLAConfig(Qwen2VLConfig):
    r"""
    policy_head_type (`str`): the action head; `scale_dp_policy` (ScaleDP diffusion transformer).
    policy_head_config (`ScaleDPConfig` or `dict`): the head's sizes and robot dimensions; its
        `cond_dim` defaults to the language model's hidden size.
    using_moe (`bool`): replace every decoder MLP with the static two-expert MoE (expert 0
        vision-language, expert 1 robot control), routed per sample.
    with_llm_head (`bool`): train the language head on robot samples' reasoning text.
    llm_loss_weight (`float`): total loss = action loss / llm_loss_weight + token cross-entropy.
    """

    model_type = "qwen2_vla"
    sub_configs_defaults = {
        **Qwen2VLConfig.sub_configs_defaults,
        "policy_head_config": ScaleDPConfig,
    }

    policy_head_type: str = "scale_dp_policy"
    policy_head_config: dict | PreTrainedConfig | None = None
    using_moe: bool = True
    with_llm_head: bool = True
    llm_loss_weight: float = 1.0

    def __post_init__(self, **kwargs):
        if self.policy_head_type not in POLICY_HEAD_TYPES:
            raise ValueError(f"policy_head_type {self.policy_head_type!r} is not one of {POLICY_HEAD_TYPES}")
        if self.llm_loss_weight <= 0:
            raise ValueError(f"llm_loss_weight must be positive, got {self.llm_loss_weight}")
        super().__post_init__(**kwargs)
        if self.policy_head_config.cond_dim is None:
            self.policy_head_config.cond_dim = self.text_config.hidden_size
