"""ScaleDP: a diffusion transformer with adaLN-Zero over the action chunk.

Conditioning = Linear([LayerNorm(condition), state]) + timestep embedding; every block and the
final layer are modulated from it. The adaLN modulations and the output projection start at zero
(DiT's adaLN-Zero), so a fresh head predicts zero noise and training starts stable; upstream left
that initialisation commented out and its users met NaN losses.
"""

import math

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler
from torch import nn
from transformers import initialization as init

from vlaflow.models.scale_dp.configuration_scale_dp import ScaleDPConfig


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden_size: int, frequency_size: int = 256):
        super().__init__()
        self.frequency_size = frequency_size
        self.mlp = nn.Sequential(nn.Linear(frequency_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    def forward(self, timesteps: torch.Tensor) -> torch.Tensor:
        half = self.frequency_size // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, device=timesteps.device, dtype=torch.float32) / half)
        args = timesteps.float()[:, None] * freqs[None]
        embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        return self.mlp(embedding.to(self.mlp[0].weight.dtype))


class ScaleDPBlock(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.num_heads = num_heads
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size)
        self.proj = nn.Linear(hidden_size, hidden_size)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        mlp_hidden = int(hidden_size * mlp_ratio)
        self.mlp = nn.Sequential(
            nn.Linear(hidden_size, mlp_hidden), nn.GELU(approximate="tanh"), nn.Linear(mlp_hidden, hidden_size)
        )
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        q, k, v = self.qkv(x).view(batch, length, 3, self.num_heads, width // self.num_heads).unbind(2)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return self.proj(out.transpose(1, 2).reshape(batch, length, width))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=-1)
        x = x + gate_msa.unsqueeze(1) * self.attention(modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class ScaleDPFinalLayer(nn.Module):
    def __init__(self, hidden_size: int, out_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, out_dim)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm(x), shift, scale))


class ScaleDPPolicy(nn.Module):
    """Predicts the noise added to a normalised action chunk, given a condition vector and the state."""

    def __init__(self, config: ScaleDPConfig):
        super().__init__()
        self.config = config
        width = config.hidden_size
        self.cond_norm = nn.LayerNorm(config.cond_dim)
        self.cond_proj = nn.Linear(config.cond_dim + config.state_dim, width)
        self.timestep_embedder = TimestepEmbedder(width)
        self.action_embed = nn.Linear(config.action_dim, width)
        self.pos_embed = nn.Parameter(torch.zeros(1, config.chunk_size, width))
        self.blocks = nn.ModuleList(
            ScaleDPBlock(width, config.num_heads, config.mlp_ratio) for _ in range(config.depth)
        )
        self.final_layer = ScaleDPFinalLayer(width, config.action_dim)
        # from_pretrained builds modules on the meta device; the schedule's tables must be real.
        with torch.device("cpu"):
            self.noise_scheduler = DDIMScheduler(
                num_train_timesteps=config.num_train_timesteps,
                beta_schedule=config.beta_schedule,
                clip_sample=True,
                set_alpha_to_one=True,
                steps_offset=0,
                prediction_type="epsilon",
            )
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        # transformers' init functions leave weights loaded by from_pretrained untouched.
        for module in self.modules():
            if isinstance(module, nn.Linear):
                init.xavier_uniform_(module.weight)
                init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm) and module.elementwise_affine:
                init.ones_(module.weight)
                init.zeros_(module.bias)
        init.normal_(self.pos_embed, std=0.02)
        for layer in (self.timestep_embedder.mlp[0], self.timestep_embedder.mlp[2]):
            init.normal_(layer.weight, std=0.02)
        zero_init = [block.adaLN_modulation[-1] for block in self.blocks]
        zero_init += [self.final_layer.adaLN_modulation[-1], self.final_layer.linear]
        for layer in zero_init:
            init.zeros_(layer.weight)
            init.zeros_(layer.bias)

    def predict_noise(
        self, noisy_actions: torch.Tensor, timesteps: torch.Tensor, condition: torch.Tensor, states: torch.Tensor
    ) -> torch.Tensor:
        c = self.cond_proj(torch.cat([self.cond_norm(condition), states.to(condition.dtype)], dim=-1))
        c = c + self.timestep_embedder(timesteps)
        x = self.action_embed(noisy_actions) + self.pos_embed[:, : noisy_actions.shape[1]]
        for block in self.blocks:
            x = block(x, c)
        return self.final_layer(x, c)

    def loss(
        self,
        actions: torch.Tensor,
        is_pad: torch.Tensor,
        condition: torch.Tensor,
        states: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Masked MSE of the predicted noise, averaged over the unpadded action elements.

        The noise, the timesteps and the noising are fp32 whatever the model's dtype: in bf16,
        the schedule's alpha-bar at t = 0, 1 rounds to 1, so the noise would vanish there."""
        actions = actions.float()
        noise = torch.randn(actions.shape, generator=generator, device=actions.device, dtype=torch.float32)
        timesteps = torch.randint(
            0, self.config.num_train_timesteps, (actions.shape[0],), generator=generator, device=actions.device
        )
        noisy_actions = self.noise_scheduler.add_noise(actions, noise, timesteps)
        predicted = self.predict_noise(noisy_actions.to(condition.dtype), timesteps, condition, states)
        valid = (~is_pad.bool()).unsqueeze(-1).float()
        squared_error = (predicted.float() - noise) ** 2 * valid
        return squared_error.sum() / (valid.sum() * actions.shape[-1]).clamp(min=1)

    @torch.no_grad()
    def sample(
        self, condition: torch.Tensor, states: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """DDIM sampling of a normalised action chunk per row of `condition`; the chunk and the
        scheduler's steps stay fp32, only the network runs in the model's dtype."""
        shape = (condition.shape[0], self.config.chunk_size, self.config.action_dim)
        actions = torch.randn(shape, generator=generator, device=condition.device, dtype=torch.float32)
        self.noise_scheduler.set_timesteps(self.config.num_inference_timesteps)
        for t in self.noise_scheduler.timesteps:
            timesteps = torch.full((shape[0],), int(t), device=condition.device, dtype=torch.long)
            predicted = self.predict_noise(actions.to(condition.dtype), timesteps, condition, states)
            actions = self.noise_scheduler.step(predicted.float(), t, actions).prev_sample
        return actions
