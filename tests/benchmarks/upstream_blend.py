"""Upstream ChatVLA's MoE formula, for comparison only: both experts run on every token and their
outputs are blended with the per-sample route, so the MLP costs twice as much."""

import torch

from vlaflow.models.qwen2_vla.modeling_qwen2_vla import ROBOT_EXPERT, StaticMoEMLP


class BlendedMoEMLP(StaticMoEMLP):
    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        routing = self.routing
        robot = torch.zeros(hidden_states.shape[0], 1, 1, dtype=hidden_states.dtype, device=hidden_states.device)
        if routing.uniform_expert is not None:
            robot.fill_(float(routing.uniform_expert == ROBOT_EXPERT))
        else:
            robot[routing.rows[ROBOT_EXPERT]] = 1
        return self.experts[0](hidden_states) * (1 - robot) + self.experts[1](hidden_states) * robot


def use_blended_moe(model) -> None:
    """Switch every MoE layer of `model` to the blend formula, keeping its weights."""
    for layer in model.decoder_layers:
        layer.mlp.__class__ = BlendedMoEMLP
