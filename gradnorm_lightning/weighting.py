"""Baseline loss-weighting strategies with GradNorm's interface and logging keys.

* :class:`EqualWeighting`: ``w_i = 1``.
* :class:`UncertaintyWeighting`: Kendall, Gal & Cipolla (CVPR 2018), learned log-variances
  ``s_i``: the model loss is ``sum_i exp(-s_i) L_i`` and ``s`` descends the gradient of
  ``sum_i exp(-s_i) L_i + s_i``, ``1 - exp(-s_i) L_i``, with its own optimizer.
* :class:`DynamicWeightAverage`: Liu, Johns & Davison (CVPR 2019):
  ``w_i = T softmax_i(r_i / temperature)`` with ``r_i = Lbar_i(k-1) / Lbar_i(k-2)`` the ratio
  of the task's mean loss over the last two windows (the paper's windows are epochs).

Each is a :class:`~gradnorm_lightning.GradNorm` subclass with another weight rule, so it
handles absent tasks, accumulation, AMP and checkpoints the same way, and (unless
``track_grad_norms=False``) measures the same per-task gradient norms, so runs are
comparable in one logger under the same ``gradnorm/...`` keys. Each has a Lightning
callback: :class:`EqualWeightingCallback`, :class:`UncertaintyWeightingCallback`,
:class:`DWACallback`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from gradnorm_lightning import functional as F
from gradnorm_lightning._checks import _check_positive
from gradnorm_lightning.balancer import _STATE_TENSORS, GradNorm
from gradnorm_lightning.callback import _WeightingCallback

__all__ = [
    "DWACallback",
    "DynamicWeightAverage",
    "EqualWeighting",
    "EqualWeightingCallback",
    "UncertaintyWeighting",
    "UncertaintyWeightingCallback",
]

_Proposal = tuple[Tensor, Tensor, Tensor, Tensor, Tensor, tuple[Tensor, Tensor, Tensor]]


def _rates(losses: Tensor, initial: Tensor, present: Tensor) -> tuple[Tensor, Tensor]:
    return F.inverse_training_rates(losses, initial, present)


class EqualWeighting(GradNorm):
    """Equal weights, ``sum_i L_i`` (with GradNorm's statistics for comparison).

    Args:
        shared_layer: the last shared layer (norms are measured there for the logs).
        num_tasks: number of tasks (or give ``task_names``).
        task_names: the task names.
        track_grad_norms: measure the per-task gradient norms (costs what GradNorm's do).
        mode: how norms are measured (see :class:`GradNorm`).

    Example::

        >>> from torch import nn
        >>> eq = EqualWeighting(nn.Linear(2, 2), num_tasks=2)
        >>> with torch.no_grad():  # evaluation: the plain sum
        ...     eq.combine([torch.tensor(1.0), torch.tensor(2.0)])
        tensor(3.)
    """

    def __init__(
        self,
        shared_layer: nn.Module,
        num_tasks: int | None = None,
        *,
        task_names: Sequence[str] | None = None,
        track_grad_norms: bool = True,
        mode: str = "auto",
    ) -> None:
        self._measure_norms = bool(track_grad_norms)
        super().__init__(shared_layer, num_tasks, task_names=task_names, mode=mode)

    def _propose(self, weights: Tensor, norms: Tensor, losses: Tensor, initial: Tensor, present: Tensor) -> _Proposal:
        ratios, rates = _rates(losses, initial, present)
        zero = torch.zeros((), dtype=weights.dtype, device=weights.device)
        valid = torch.isfinite(rates) & (initial > 0)
        return weights, zero, ratios, rates, valid, (self.exp_avg, self.exp_avg_sq, self.adam_steps)


class UncertaintyWeighting(GradNorm):
    """Homoscedastic-uncertainty weighting (Kendall et al., 2018): ``w_i = exp(-s_i)``.

    The weights do not sum to ``T``: they are ``1/sigma_i^2`` of the learned variances.

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
        mode: how norms are measured (see :class:`GradNorm`).

    Example::

        >>> from torch import nn
        >>> uw = UncertaintyWeighting(nn.Linear(2, 2), num_tasks=2)
        >>> uw.log_vars
        tensor([0., 0.])
    """

    _state_names = (*_STATE_TENSORS, "log_vars")

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
    ) -> None:
        if isinstance(init_log_var, bool) or not isinstance(init_log_var, (int, float)):
            raise TypeError(f"`init_log_var` must be a number; got {init_log_var!r}.")
        self.init_log_var = float(init_log_var)
        self._measure_norms = bool(track_grad_norms)
        super().__init__(
            shared_layer, num_tasks, task_names=task_names, lr=lr, optimizer=optimizer, betas=betas, eps=eps, mode=mode
        )

    def _init_extra_state(self, num_tasks: int) -> None:
        self.log_vars = torch.full((num_tasks,), self.init_log_var, dtype=self.dtype, device=self.device)
        self.weights = torch.exp(-self.log_vars)
        self._proposed_log_vars = self.log_vars

    def to(self, device: torch.device | str) -> UncertaintyWeighting:
        super().to(device)
        if self.initialized:
            self._proposed_log_vars = self._proposed_log_vars.to(device)
        return self

    def _propose(self, weights: Tensor, norms: Tensor, losses: Tensor, initial: Tensor, present: Tensor) -> _Proposal:
        ratios, rates = _rates(losses, initial, present)
        safe_losses = torch.where(present, losses, torch.zeros_like(losses))
        grad = torch.where(present, 1 - torch.exp(-self.log_vars) * safe_losses, torch.zeros_like(losses))
        direction, moments = self._optimizer_direction(grad)
        log_vars = self.log_vars - self.current_lr() * direction
        self._proposed_log_vars = log_vars
        new_weights = torch.where(present, torch.exp(-log_vars), weights)
        objective = torch.where(present, weights * safe_losses + self.log_vars, torch.zeros_like(losses)).sum()
        valid = torch.isfinite(log_vars) & torch.isfinite(losses)
        return new_weights, objective, ratios, rates, valid, moments

    def _commit_extra_state(self, ok: Tensor, present: Tensor, losses: Tensor) -> None:
        self.log_vars = torch.where(ok & present, self._proposed_log_vars, self.log_vars)


class DynamicWeightAverage(GradNorm):
    """Dynamic Weight Average (Liu et al., 2019): weights from the tasks' loss descent rates.

    Losses are averaged over windows of ``window`` steps (the paper uses epochs: set
    ``window`` to the steps per epoch); from the third window on,
    ``w_i = T exp(r_i / temperature) / sum_j exp(r_j / temperature)`` with
    ``r_i = Lbar_i(k-1) / Lbar_i(k-2)``; before that ``w_i = 1``.

    Args:
        shared_layer: the last shared layer (norms are measured there for the logs).
        num_tasks: number of tasks (or give ``task_names``).
        task_names: the task names.
        temperature: the softmax temperature (the paper's ``T = 2``).
        window: steps per averaging window.
        track_grad_norms: measure the per-task gradient norms for the logs.
        mode: how norms are measured (see :class:`GradNorm`).

    Example::

        >>> from torch import nn
        >>> dwa = DynamicWeightAverage(nn.Linear(2, 2), num_tasks=3, window=10)
        >>> dwa.weights
        tensor([1., 1., 1.])
    """

    _state_names = (*_STATE_TENSORS, "window_sum", "window_count", "previous_mean", "earlier_mean", "windows")

    def __init__(
        self,
        shared_layer: nn.Module,
        num_tasks: int | None = None,
        *,
        task_names: Sequence[str] | None = None,
        temperature: float = 2.0,
        window: int = 1,
        track_grad_norms: bool = True,
        mode: str = "auto",
    ) -> None:
        self.temperature = float(_check_positive("temperature", temperature))
        self.window = int(_check_positive("window", window, integer=True))
        self._measure_norms = bool(track_grad_norms)
        super().__init__(shared_layer, num_tasks, task_names=task_names, mode=mode)

    def _init_extra_state(self, num_tasks: int) -> None:
        zeros = torch.zeros(num_tasks, dtype=self.dtype, device=self.device)
        self.window_sum = zeros.clone()
        self.window_count = zeros.clone()
        self.previous_mean = zeros.clone()
        self.earlier_mean = zeros.clone()
        self.windows = torch.zeros((), dtype=self.dtype, device=self.device)

    def _propose(self, weights: Tensor, norms: Tensor, losses: Tensor, initial: Tensor, present: Tensor) -> _Proposal:
        ratios, rates = _rates(losses, initial, present)
        safe_losses = torch.where(present, losses, torch.zeros_like(losses))
        window_sum = self.window_sum + safe_losses
        window_count = self.window_count + present.to(self.dtype)
        closing = (self.steps % self.window) == 0  # host-side step counter: no tensor read
        previous, earlier, windows = self.previous_mean, self.earlier_mean, self.windows
        if closing:
            seen = window_count > 0
            mean = window_sum / window_count.clamp_min(1)
            earlier = torch.where(seen, previous, earlier)
            previous = torch.where(seen, mean, previous)
            windows = windows + 1
            window_sum = torch.zeros_like(window_sum)
            window_count = torch.zeros_like(window_count)
        descent = previous / torch.where(earlier > 0, earlier, torch.ones_like(earlier))
        dwa = self.num_tasks * torch.softmax(descent / self.temperature, dim=0)
        new_weights = torch.where(windows >= 2, dwa, torch.ones_like(dwa))
        self._proposed = (window_sum, window_count, previous, earlier, windows)
        zero = torch.zeros((), dtype=weights.dtype, device=weights.device)
        valid = torch.isfinite(new_weights) & torch.isfinite(losses)
        return new_weights, zero, ratios, rates, valid, (self.exp_avg, self.exp_avg_sq, self.adam_steps)

    def _commit_extra_state(self, ok: Tensor, present: Tensor, losses: Tensor) -> None:
        window_sum, window_count, previous, earlier, windows = self._proposed
        self.window_sum = torch.where(ok, window_sum, self.window_sum)
        self.window_count = torch.where(ok, window_count, self.window_count)
        self.previous_mean = torch.where(ok, previous, self.previous_mean)
        self.earlier_mean = torch.where(ok, earlier, self.earlier_mean)
        self.windows = torch.where(ok, windows, self.windows)


class _BaselineCallback(_WeightingCallback):
    _balancer_cls: type[GradNorm]

    def __init__(self, log: bool = True, sanitize_grads: bool = True, **kwargs: Any) -> None:
        self._kwargs = kwargs
        probe = self._balancer_cls(nn.Linear(1, 1), **kwargs)  # validates the arguments now
        probe.remove_hooks()
        for key, value in kwargs.items():
            setattr(self, key, value)
        self.log = bool(log)
        self.sanitize_grads = bool(sanitize_grads)
        self.balancer = None
        self._loaded_state = None

    def _make_balancer(self, layer: nn.Module, task_names: tuple[str, ...] | None) -> GradNorm:
        return self._balancer_cls(layer, task_names=task_names, **self._kwargs)


class EqualWeightingCallback(_BaselineCallback):
    """Equal weighting as a callback, logging the same ``gradnorm/...`` keys as GradNorm.

    Args:
        track_grad_norms: measure and log the per-task gradient norms.
        mode: how norms are measured (see :class:`~gradnorm_lightning.GradNorm`).
        log: log the statistics.
        sanitize_grads: see :class:`~gradnorm_lightning.GradNormCallback`.

    Example::

        >>> import lightning as L
        >>> trainer = L.Trainer(callbacks=[EqualWeightingCallback()])
    """

    _balancer_cls = EqualWeighting

    def __init__(self, track_grad_norms: bool = True, mode: str = "auto", log: bool = True, sanitize_grads: bool = True) -> None:
        super().__init__(log, sanitize_grads, track_grad_norms=track_grad_norms, mode=mode)


class UncertaintyWeightingCallback(_BaselineCallback):
    """Uncertainty weighting (Kendall et al., 2018) as a callback.

    Args:
        lr: learning rate of the log-variances.
        optimizer: ``"adam"`` or ``"sgd"``.
        init_log_var: initial log-variance.
        track_grad_norms: measure and log the per-task gradient norms.
        mode: how norms are measured.
        log: log the statistics.
        sanitize_grads: see :class:`~gradnorm_lightning.GradNormCallback`.

    Example::

        >>> import lightning as L
        >>> trainer = L.Trainer(callbacks=[UncertaintyWeightingCallback(lr=0.01)])
    """

    _balancer_cls = UncertaintyWeighting

    def __init__(
        self,
        lr: float = 0.01,
        optimizer: str = "adam",
        init_log_var: float = 0.0,
        track_grad_norms: bool = True,
        mode: str = "auto",
        log: bool = True,
        sanitize_grads: bool = True,
    ) -> None:
        super().__init__(
            log, sanitize_grads, lr=lr, optimizer=optimizer, init_log_var=init_log_var,
            track_grad_norms=track_grad_norms, mode=mode,
        )


class DWACallback(_BaselineCallback):
    """Dynamic Weight Average (Liu et al., 2019) as a callback.

    Args:
        temperature: softmax temperature.
        window: steps per averaging window (the steps of an epoch reproduce the paper).
        track_grad_norms: measure and log the per-task gradient norms.
        mode: how norms are measured.
        log: log the statistics.
        sanitize_grads: see :class:`~gradnorm_lightning.GradNormCallback`.

    Example::

        >>> import lightning as L
        >>> trainer = L.Trainer(callbacks=[DWACallback(temperature=2.0, window=50)])
    """

    _balancer_cls = DynamicWeightAverage

    def __init__(
        self,
        temperature: float = 2.0,
        window: int = 1,
        track_grad_norms: bool = True,
        mode: str = "auto",
        log: bool = True,
        sanitize_grads: bool = True,
    ) -> None:
        super().__init__(
            log, sanitize_grads, temperature=temperature, window=window, track_grad_norms=track_grad_norms, mode=mode
        )
