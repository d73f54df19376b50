"""The task weights' own optimizer: SGD or Adam on a ``(T,)`` tensor, state as tensors."""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["WeightOptimizer"]

STATE = ("exp_avg", "exp_avg_sq", "adam_steps")


class WeightOptimizer:
    """SGD or Adam with Keras-style exponential learning-rate decay, without host reads.

    Adam keeps one step count per task and moves the moments and step counts of the tasks
    that take part only (an absent task's state is untouched); its numbers are those of
    :class:`torch.optim.Adam` (no weight decay, no amsgrad) to rounding. The update is a dozen
    torch operations: both moments are updated by one ``lerp`` of a ``(2, T)`` stack and
    bias-corrected by one ``pow`` of a ``(2, 1)`` column of betas made once.

    Args:
        kind: ``"sgd"`` or ``"adam"``.
        lr: the learning rate.
        betas: Adam's coefficients.
        eps: Adam's epsilon.
        decay_rate: ``lr * decay_rate ** (updates / decay_steps)``; 1 means constant.
        decay_steps: the decay's period in updates.
        staircase: decay in whole periods only.

    Example::

        >>> opt = WeightOptimizer("adam", 0.1, (0.9, 0.999), 1e-8, 1.0, 1, False)
        >>> state = opt.initial_state(2, torch.float64, torch.device("cpu"))
        >>> new, state = opt.step(torch.ones(2, dtype=torch.float64), torch.tensor([2.0, -3.0], dtype=torch.float64),
        ...                       state, torch.zeros((), dtype=torch.float64), torch.tensor([True, False]))
        >>> new  # the first Adam step moves a present weight by lr; the absent one keeps its state
        tensor([0.9000,    nan], dtype=torch.float64)
        >>> state["adam_steps"]
        tensor([1., 0.], dtype=torch.float64)
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
        self._columns: tuple[Tensor, Tensor] | None = None  # (betas, 1 - betas) as (2, 1) columns

    @staticmethod
    def initial_state(num_tasks: int, dtype: torch.dtype, device: torch.device) -> dict[str, Tensor]:
        """Adam's moments and per-task step counts (kept for SGD too: one checkpoint layout)."""
        return {name: torch.zeros(num_tasks, dtype=dtype, device=device) for name in STATE}

    def current_lr(self, num_updates: Tensor) -> Tensor | float:
        """The learning rate after ``num_updates`` updates (a 0-dim tensor when it decays)."""
        if self.decay_rate == 1.0:
            return self.lr
        exponent = num_updates / self.decay_steps
        if self.staircase:
            exponent = exponent.floor()
        return (exponent * math.log(self.decay_rate)).exp() * self.lr

    def _betas(self, like: Tensor) -> tuple[Tensor, Tensor]:
        cols = self._columns
        if cols is None or cols[0].device != like.device or cols[0].dtype != like.dtype:
            betas = torch.tensor([[self.betas[0]], [self.betas[1]]], dtype=like.dtype, device=like.device)
            cols = self._columns = (betas, 1 - betas)
        return cols

    def step(self, param: Tensor, grad: Tensor, state: dict[str, Tensor], num_updates: Tensor,
             present: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """``param`` after one step along ``-grad``, and the changed state (present tasks only).

        Args:
            param: the ``(T,)`` values stepped (the weights, or their logarithms).
            grad: the gradient; it must be finite (0) for the tasks outside ``present``.
            state: the current ``exp_avg``, ``exp_avg_sq`` and ``adam_steps``.
            num_updates: the updates applied so far (0-dim), for the decay.
            present: the tasks that take part.

        Returns:
            The stepped values (meaningless for absent tasks, NaN for one Adam never moved) and
            the new Adam state (empty for SGD).
        """
        lr = self.current_lr(num_updates)
        if self.kind != "adam":
            return (torch.add(param, grad, alpha=-lr) if isinstance(lr, float) else param - lr * grad), {}
        betas, rates = self._betas(param)
        steps = state["adam_steps"] + present
        # exp_avg.lerp(grad, 1 - beta1) and exp_avg_sq.lerp(grad**2, 1 - beta2), as torch.optim.Adam,
        # with a zero rate (no change) for absent tasks
        moments = torch.stack([state["exp_avg"], state["exp_avg_sq"]]).lerp(
            torch.stack([grad, grad * grad]), torch.where(present, rates, 0.0)
        )
        m_hat, v_hat = (moments / (1 - betas**steps)).unbind()
        denom = v_hat.sqrt() + self.eps
        if isinstance(lr, float):
            new = torch.addcdiv(param, m_hat, denom, value=-lr)
        else:
            new = param - lr * (m_hat / denom)
        exp_avg, exp_avg_sq = moments.unbind()
        return new, {"exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq, "adam_steps": steps}
