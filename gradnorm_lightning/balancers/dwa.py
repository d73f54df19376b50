"""Dynamic Weight Average (Liu, Johns & Davison, CVPR 2019)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from gradnorm_lightning._checks import _integer, _number
from gradnorm_lightning.balancers.base import Balancer
from gradnorm_lightning.balancers.interface import Proposal, StepInputs
from gradnorm_lightning.capture import Recorder

__all__ = ["DynamicWeightAverage"]


class DynamicWeightAverage(Balancer):
    """Dynamic Weight Average: weights from the tasks' loss descent rates.

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
        mode: how norms are measured (see :class:`~gradnorm_lightning.GradNorm`).
        distributed: ``"exact"`` or ``"approx"``.
        recorder: a recorder to use instead of building one.

    Example::

        >>> dwa = DynamicWeightAverage(nn.Linear(2, 2), num_tasks=3, window=10)
        >>> dwa.weights
        tensor([1., 1., 1.])
    """

    needs_norms = False
    window_sum: Tensor
    window_count: Tensor
    previous_mean: Tensor
    earlier_mean: Tensor
    windows: Tensor
    _option_checks: ClassVar[dict[str, Any]] = {"temperature": _number("temperature"), "window": _integer("window")}

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
        distributed: str = "exact",
        recorder: Recorder | None = None,
    ) -> None:
        own = self.check_options(temperature=temperature, window=window)
        self.temperature: float = own["temperature"]
        self.window: int = own["window"]
        super().__init__(
            shared_layer, num_tasks, task_names=task_names, mode=mode, distributed=distributed,
            track_grad_norms=track_grad_norms, recorder=recorder,
        )

    def options(self) -> dict[str, Any]:
        """The settings shown by ``repr``."""
        return {"temperature": self.temperature, "window": self.window, "mode": self.mode}

    def initial_state(self, num_tasks: int) -> dict[str, Tensor]:
        """The current window's loss sums and counts, the last two windows' means, the window count."""
        zeros = torch.zeros(num_tasks, dtype=self.dtype, device=self.device)
        return {"window_sum": zeros.clone(), "window_count": zeros.clone(), "previous_mean": zeros.clone(),
                "earlier_mean": zeros.clone(), "windows": torch.zeros((), dtype=self.dtype, device=self.device)}

    def propose(self, inputs: StepInputs) -> Proposal:
        """Close a window every ``window`` steps; softmax of the descent rates from the third on."""
        present = inputs.present
        losses = torch.where(present, inputs.losses, torch.zeros_like(inputs.losses))
        window_sum = self.window_sum + losses
        window_count = self.window_count + present.to(self.dtype)
        previous, earlier, windows = self.previous_mean, self.earlier_mean, self.windows
        if self.steps % self.window == 0:  # host-side step counter: no tensor read
            seen = window_count > 0
            mean = window_sum / window_count.clamp_min(1)
            earlier = torch.where(seen, previous, earlier)
            previous = torch.where(seen, mean, previous)
            windows = windows + 1
            window_sum = torch.zeros_like(window_sum)
            window_count = torch.zeros_like(window_count)
        descent = previous / torch.where(earlier > 0, earlier, torch.ones_like(earlier))
        dwa = self.num_tasks * torch.softmax(descent / self.temperature, dim=0)
        weights = torch.where(windows >= 2, dwa, torch.ones_like(dwa))
        valid = torch.isfinite(weights) & torch.isfinite(inputs.losses)
        state = {"window_sum": window_sum, "window_count": window_count, "previous_mean": previous,
                 "earlier_mean": earlier, "windows": windows}
        return Proposal(weights, valid, None, state)
