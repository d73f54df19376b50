"""What a strategy sees of a step (:class:`StepInputs`) and returns (:class:`Proposal`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

from torch import Tensor

__all__ = ["Proposal", "StepInputs", "own_arguments"]


class StepInputs(NamedTuple):
    """What a strategy sees of one optimizer step (all ``(T,)`` tensors on the weights' device).

    A strategy computes its proposal from these with plain torch operations: the same code runs
    on every device, and it should read no value on the host (no ``.item()``, no Python ``if`` on
    a tensor), so that a GPU never waits for it.

    Attributes:
        weights: the weights this step's model loss used.
        grad_norms: ``n_i = ||grad_W L_i||`` (NaN when not measured; 0 for absent tasks).
        losses: ``L_i(t)``, averaged over the step's backward passes (0 where absent).
        initial_losses: ``L_i(0)`` (measured or fixed; 0 until measured).
        present: the tasks whose loss took part in this step.
        loss_ratios: ``L_i / L_i(0)``.
        inverse_rates: ``r_i = (L_i / L_i(0)) / mean_j (L_j / L_j(0))`` over the ``rated`` tasks
            (0 for the others).
        num_updates: the updates applied so far (0-dim).
        rated: the present tasks whose ``L(0)`` is positive, so their loss ratio is defined (a
            task whose first loss was exactly 0 sits out until its ``L(0)`` is measured again).
        num_rated: how many tasks are ``rated`` (0-dim).
    """

    weights: Tensor
    grad_norms: Tensor
    losses: Tensor
    initial_losses: Tensor
    present: Tensor
    loss_ratios: Tensor
    inverse_rates: Tensor
    num_updates: Tensor
    rated: Tensor
    num_rated: Tensor


class Proposal(NamedTuple):
    """A strategy's proposed update: applied only if every present task's statistics are valid.

    Attributes:
        weights: the proposed weights ``(T,)`` (absent tasks keep theirs).
        valid: bool, per task ``(T,)`` (only present tasks count) or for the whole step (0-dim):
            the statistics and the proposal are usable (finite); ``None``: always.
        objective: the strategy's own loss (logged under its ``objective_key``), or ``None``.
        state: new values of the strategy's own state tensors (by name), committed with the weights.
        counts: 0-dim booleans (or numbers) by name of the strategy's ``counter_names``: what an
            applied update adds to each counter.
    """

    weights: Tensor
    valid: Tensor | None = None
    objective: Tensor | None = None
    state: Mapping[str, Tensor] = {}
    counts: Mapping[str, Tensor] = {}


def own_arguments(frame: Mapping[str, Any], *skip: str) -> dict[str, Any]:
    """A constructor's own keyword arguments, from its ``locals()``, without ``skip``."""
    return {k: v for k, v in frame.items() if k not in skip and k != "self" and not k.startswith("__")}
