"""Homoscedastic-uncertainty weighting (Kendall, Gal & Cipolla, CVPR 2018)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from gradnorm_lightning._checks import OPTIMIZERS, _check_betas, _choice, _number, _real
from gradnorm_lightning.balancers._optimizer import WeightOptimizer
from gradnorm_lightning.balancers.base import Balancer
from gradnorm_lightning.balancers.interface import Proposal, StepInputs, own_arguments
from gradnorm_lightning.capture import Recorder

__all__ = ["UncertaintyWeighting"]


class UncertaintyWeighting(Balancer):
    """Uncertainty weighting: ``w_i = exp(-s_i)`` with learned log-variances ``s_i``.

    The model loss is ``sum_i exp(-s_i) L_i``; ``s`` descends the gradient of Kendall et al.'s
    objective ``sum_i exp(-s_i) L_i + s_i`` (``1 - exp(-s_i) L_i``) with its own optimizer. The
    weights do not sum to ``T``: they are ``1 / sigma_i^2``. The objective is logged as
    ``uncertainty/loss`` (it is not a GradNorm loss).

    Args:
        shared_layer: the last shared layer (norms are measured there for the logs).
        num_tasks: number of tasks (or give ``task_names``).
        task_names: the task names.
        lr: learning rate of the log-variances' optimizer.
        optimizer: ``"adam"`` or ``"sgd"``.
        init_log_var: initial ``s_i`` (0 gives ``w_i = 1``).
        betas: Adam's coefficients.
        eps: Adam's epsilon.
        track_grad_norms: measure the per-task gradient norms for the logs.
        mode: how norms are measured (see :class:`~gradnorm_lightning.GradNorm`).
        distributed: ``"exact"`` or ``"approx"``.
        recorder: a recorder to use instead of building one.

    Example::

        >>> uw = UncertaintyWeighting(nn.Linear(2, 2), num_tasks=2)
        >>> uw.log_vars
        tensor([0., 0.])
    """

    needs_norms = False
    objective_key: ClassVar[str | None] = "uncertainty/loss"
    log_vars: Tensor
    exp_avg: Tensor
    exp_avg_sq: Tensor
    adam_steps: Tensor
    _option_checks: ClassVar[dict[str, Any]] = {
        "lr": _number("lr"),
        "optimizer": _choice("optimizer", OPTIMIZERS),
        "init_log_var": _real("init_log_var"),
        "betas": _check_betas,
        "eps": _number("eps"),
    }

    def __init__(
        self,
        shared_layer: nn.Module,
        num_tasks: int | None = None,
        *,
        task_names: Sequence[str] | None = None,
        lr: float = 0.01,
        optimizer: str = "adam",
        init_log_var: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        track_grad_norms: bool = True,
        mode: str = "auto",
        distributed: str = "exact",
        recorder: Recorder | None = None,
    ) -> None:
        own = self.check_options(**own_arguments(
            locals(), "shared_layer", "num_tasks", "task_names", "track_grad_norms", "mode", "distributed", "recorder",
        ))
        self.lr: float = own["lr"]
        self.optimizer: str = own["optimizer"]
        self.init_log_var: float = own["init_log_var"]
        self.betas: tuple[float, float] = own["betas"]
        self.eps: float = own["eps"]
        self._optim = WeightOptimizer(self.optimizer, self.lr, self.betas, self.eps, 1.0, 1, False)
        super().__init__(
            shared_layer, num_tasks, task_names=task_names, mode=mode, distributed=distributed,
            track_grad_norms=track_grad_norms, recorder=recorder,
        )

    def options(self) -> dict[str, Any]:
        """The settings shown by ``repr``."""
        return {"lr": self.lr, "optimizer": self.optimizer, "init_log_var": self.init_log_var, "mode": self.mode}

    def initial_state(self, num_tasks: int) -> dict[str, Tensor]:
        """The log-variances (and the weights they give) and their optimizer's state."""
        log_vars = torch.full((num_tasks,), self.init_log_var, dtype=self.dtype, device=self.device)
        return {"weights": torch.exp(-log_vars), "log_vars": log_vars,
                **self._optim.initial_state(num_tasks, self.dtype, self.device)}

    def propose(self, inputs: StepInputs) -> Proposal:
        """A step of the log-variances along ``1 - exp(-s_i) L_i`` (present tasks only)."""
        present, log_vars = inputs.present, self.log_vars
        losses = torch.where(present, inputs.losses, 0.0)
        grad = torch.where(present, 1 - inputs.weights * losses, 0.0)  # (the weights are exp(-s))
        state = {"exp_avg": self.exp_avg, "exp_avg_sq": self.exp_avg_sq, "adam_steps": self.adam_steps}
        stepped, state = self._optim.step(log_vars, grad, state, inputs.num_updates, present)
        new_log_vars = torch.where(present, stepped, log_vars)
        weights = torch.where(present, (-new_log_vars).exp(), inputs.weights)
        objective = torch.where(present, inputs.weights * losses + log_vars, 0.0).sum()
        valid = torch.isfinite(new_log_vars) & torch.isfinite(inputs.losses)
        return Proposal(weights, valid, objective, {**state, "log_vars": new_log_vars})
