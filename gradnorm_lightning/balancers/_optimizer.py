"""The task weights' own optimizer: SGD or Adam on a ``(T,)`` tensor, state as tensors."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from gradnorm_lightning import functional as F
from gradnorm_lightning._arrays import array_ops

__all__ = ["WeightOptimizer"]

STATE = ("exp_avg", "exp_avg_sq", "adam_steps")


class WeightOptimizer:
    """SGD or Adam with Keras-style exponential learning-rate decay, without host reads.

    Args:
        kind: ``"sgd"`` or ``"adam"``.
        lr: the learning rate.
        betas: Adam's coefficients.
        eps: Adam's epsilon.
        decay_rate: ``lr * decay_rate ** (updates / decay_steps)``; 1 means constant.
        decay_steps: the decay's period in updates.
        staircase: decay in whole periods only.
    """

    def __init__(self, kind: str, lr: float, betas: tuple[float, float], eps: float,
                 decay_rate: float, decay_steps: int, staircase: bool) -> None:
        self.kind = kind
        self.lr = lr
        self.betas = betas
        self.eps = eps
        self.decay_rate = decay_rate
        self.decay_steps = decay_steps
        self.staircase = staircase

    @staticmethod
    def initial_state(num_tasks: int, dtype: torch.dtype, device: torch.device) -> dict[str, Tensor]:
        """Adam's moments and per-task step counts (kept for SGD too: one checkpoint layout)."""
        return {name: torch.zeros(num_tasks, dtype=dtype, device=device) for name in STATE}

    def current_lr(self, num_updates: Any) -> Any:
        """The learning rate after ``num_updates`` updates (0-dim, like ``num_updates``, when it decays)."""
        if self.decay_rate == 1.0:
            return self.lr
        xp = array_ops(num_updates)
        exponent = num_updates / self.decay_steps
        if self.staircase:
            exponent = xp.floor(exponent)
        return self.lr * xp.exp(exponent * math.log(self.decay_rate))

    def step(self, grad: Any, state: dict[str, Any], num_updates: Any, present: Any) -> tuple[Any, dict[str, Any]]:
        """The step ``lr * direction`` to subtract, and the changed state (for present tasks only).

        Takes torch tensors or the host path's Python vectors (all of one kind) and returns the same kind.
        """
        lr = self.current_lr(num_updates)
        if self.kind != "adam":
            return lr * grad, {}
        xp = array_ops(grad)
        direction, exp_avg, exp_avg_sq, steps = F.adam_update(
            grad, state["exp_avg"], state["exp_avg_sq"], state["adam_steps"], self.betas, self.eps
        )
        new = {
            "exp_avg": xp.where(present, exp_avg, state["exp_avg"]),
            "exp_avg_sq": xp.where(present, exp_avg_sq, state["exp_avg_sq"]),
            "adam_steps": xp.where(present, steps, state["adam_steps"]),
        }
        return lr * direction, new
