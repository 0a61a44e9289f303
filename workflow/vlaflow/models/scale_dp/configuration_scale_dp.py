"""Configuration of the ScaleDP diffusion policy head."""

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig

# depth, width, attention heads. L and H are the published ScaleDP sizes; the smaller ones are
# ours, for CPUs and quick experiments.
SCALE_DP_SIZES = {
    "tiny": (2, 64, 4),
    "S": (6, 384, 6),
    "B": (12, 768, 12),
    "L": (24, 1024, 16),
    "H": (32, 1280, 16),
}


@strict
class ScaleDPConfig(PreTrainedConfig):
    r"""
    size (`str`): one of `SCALE_DP_SIZES`; sets `depth`, `hidden_size` and `num_heads` unless given.
    cond_dim (`int`): width of the condition vector (the VLM's hidden size).
    action_dim, state_dim (`int`): robot action and proprioceptive state sizes.
    chunk_size (`int`): actions predicted per query (the prediction horizon).
    num_train_timesteps, num_inference_timesteps (`int`): DDIM schedule lengths.
    """

    model_type = "scale_dp_policy"
    base_config_key = "policy_head_config"

    size: str = "tiny"
    depth: int | None = None
    hidden_size: int | None = None
    num_heads: int | None = None
    mlp_ratio: float = 4.0
    cond_dim: int | None = None
    action_dim: int = 14
    state_dim: int = 14
    chunk_size: int = 16
    num_train_timesteps: int = 100
    num_inference_timesteps: int = 10
    beta_schedule: str = "squaredcos_cap_v2"

    def __post_init__(self, **kwargs):
        if self.size not in SCALE_DP_SIZES:
            raise ValueError(f"policy head size {self.size!r} is not one of {sorted(SCALE_DP_SIZES)}")
        depth, hidden_size, num_heads = SCALE_DP_SIZES[self.size]
        self.depth = self.depth or depth
        self.hidden_size = self.hidden_size or hidden_size
        self.num_heads = self.num_heads or num_heads
        for field in ("action_dim", "state_dim", "chunk_size", "num_train_timesteps", "num_inference_timesteps"):
            if getattr(self, field) < 1:
                raise ValueError(f"policy head {field} must be at least 1, got {getattr(self, field)}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"policy head width {self.hidden_size} is not divisible by {self.num_heads} heads")
        super().__post_init__(**kwargs)
