"""Equal weighting, ``sum_i L_i``: the baseline every strategy is compared with."""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch  # noqa: F401 (the docstring example uses it)
from torch import nn

from gradnorm_lightning.balancers.base import Balancer
from gradnorm_lightning.balancers.interface import Proposal, StepInputs
from gradnorm_lightning.capture import Recorder

__all__ = ["EqualWeighting"]


class EqualWeighting(Balancer):
    """Equal weights ``w_i = 1``, with GradNorm's statistics measured for comparison.

    Args:
        shared_layer: the last shared layer (norms are measured there for the logs).
        num_tasks: number of tasks (or give ``task_names``).
        task_names: the task names.
        track_grad_norms: measure the per-task gradient norms (costs what GradNorm's do).
        mode: how norms are measured (see :class:`~gradnorm_lightning.GradNorm`).
        distributed: ``"exact"`` or ``"approx"`` (see :class:`~gradnorm_lightning.GradNorm`).
        recorder: a recorder to use instead of building one.

    Example::

        >>> eq = EqualWeighting(nn.Linear(2, 2), num_tasks=2)
        >>> with torch.no_grad():  # evaluation: the plain sum
        ...     eq.combine([torch.tensor(1.0), torch.tensor(2.0)])
        tensor(3.)
    """

    needs_norms = False
    uses_initial_losses: ClassVar[bool] = True

    def __init__(
        self,
        shared_layer: nn.Module,
        num_tasks: int | None = None,
        *,
        task_names: Sequence[str] | None = None,
        track_grad_norms: bool = True,
        mode: str = "auto",
        distributed: str = "exact",
        recorder: Recorder | None = None,
    ) -> None:
        super().__init__(
            shared_layer, num_tasks, task_names=task_names, mode=mode, distributed=distributed,
            track_grad_norms=track_grad_norms, recorder=recorder,
        )

    def propose(self, inputs: StepInputs) -> Proposal:
        """Keep the weights (an update counts when some task is present with a positive ``L(0)``)."""
        return Proposal(inputs.weights)
