"""What a strategy sees of a step (:class:`StepInputs`) and returns (:class:`Proposal`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

from torch import Tensor

from gradnorm_lightning._arrays import TORCH, ArrayOps

__all__ = ["Proposal", "StepInputs", "own_arguments"]


class StepInputs(NamedTuple):
    """What a strategy sees of one optimizer step (all ``(T,)``, on the weights' device).

    Attributes:
        weights: the weights this step's model loss used.
        grad_norms: ``n_i = ||grad_W L_i||`` (NaN when not measured).
        losses: ``L_i(t)``, averaged over the step's backward passes (0 where absent).
        initial_losses: ``L_i(0)`` (measured or fixed; 0 until measured).
        present: the tasks that took part.
        loss_ratios: ``L_i / L_i(0)``.
        inverse_rates: ``r_i = (L_i / L_i(0)) / mean_j (L_j / L_j(0))`` over the present tasks.
        num_updates: the updates applied so far (0-dim).
        ops: the operations for these inputs' kind of array: torch tensors, or Python vectors
            when the strategy declares ``host_update`` and the weights are on the CPU. A
            strategy reads its own state tensors through ``ops.view(self.<name>)`` and returns
            arrays of the same kind.
    """

    weights: Tensor
    grad_norms: Tensor
    losses: Tensor
    initial_losses: Tensor
    present: Tensor
    loss_ratios: Tensor
    inverse_rates: Tensor
    num_updates: Tensor
    ops: ArrayOps = TORCH


class Proposal(NamedTuple):
    """A strategy's proposed update: applied only if every present task's statistics are valid.

    Attributes:
        weights: the proposed weights ``(T,)`` (absent tasks keep theirs).
        valid: ``(T,)`` bool, per task: its statistics and proposal are usable (finite).
        objective: the strategy's own loss (logged under its ``objective_key``), or ``None``.
        state: new values of the strategy's own state tensors (by name), committed with the weights.
    """

    weights: Tensor
    valid: Tensor
    objective: Tensor | None = None
    state: Mapping[str, Tensor] = {}


def own_arguments(frame: Mapping[str, Any], *skip: str) -> dict[str, Any]:
    """A constructor's own keyword arguments, from its ``locals()``, without ``skip``."""
    return {k: v for k, v in frame.items() if k not in skip and k != "self" and not k.startswith("__")}
