"""The GradNorm math on tensors: no state, no Lightning, no host synchronisation.

Everything here follows Algorithm 1 of Chen et al., *GradNorm: Gradient Normalization for
Adaptive Loss Balancing in Deep Multitask Networks* (ICML 2018). With ``T`` tasks, losses
``L_i(t)``, initial losses ``L_i(0)``, weights ``w_i`` and ``n_i = ||grad_W L_i||_2``
(``W`` the parameters of the last shared layer):

* ``G_i = w_i * n_i`` and ``G_bar = mean_i G_i``;
* ``r_i = (L_i / L_i(0)) / mean_j (L_j / L_j(0))`` (the inverse training rate);
* ``target_i = G_bar * r_i ** alpha``, held constant;
* ``L_grad = sum_i |G_i - target_i|`` and ``dL_grad / dw_i = sign(G_i - target_i) * n_i``.

Every function accepts an optional boolean ``present`` mask: tasks outside it take no part
(their loss was missing or non-finite on that step, or their ``L(0)`` is not yet known), so means
run over the present tasks only and their gradient is zero. All decisions are made with
``torch.where``, so the functions never read a tensor value on the host; they are the torch code
the balancers run on every device.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "adam_update",
    "gradnorm_weight_grad",
    "gradnorm_weight_grad_from_rates",
    "inverse_training_rates",
    "renormalize_weights",
]


def inverse_training_rates(
    losses: Tensor, initial_losses: Tensor, present: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Loss ratios ``L_i / L_i(0)`` and inverse training rates ``r_i``.

    Args:
        losses: 1-D tensor of the current task losses ``L_i(t)``.
        initial_losses: 1-D tensor of ``L_i(0)``, same shape.
        present: optional boolean mask of the tasks that take part; the mean in the
            denominator of ``r_i`` runs over these only.

    Returns:
        ``(loss_ratios, inverse_rates)``, both shaped like ``losses``. The ratios of absent
        tasks are computed but meaningless; their rates are 0.

    Example::

        >>> ratios, rates = inverse_training_rates(torch.tensor([1.0, 3.0]), torch.tensor([2.0, 2.0]))
        >>> ratios
        tensor([0.5000, 1.5000])
        >>> rates
        tensor([0.5000, 1.5000])
        >>> inverse_training_rates(torch.tensor([1.0, 3.0, 9.0]), torch.tensor([2.0, 2.0, 0.0]),
        ...                        torch.tensor([True, True, False]))[1]
        tensor([0.5000, 1.5000, 0.0000])
    """
    if present is None:
        ratios = losses / initial_losses
        return ratios, ratios / ratios.mean()
    return _inverse_training_rates(losses, initial_losses, present, present.sum())


def _inverse_training_rates(losses: Tensor, initial_losses: Tensor, present: Tensor,
                            count: Tensor) -> tuple[Tensor, Tensor]:
    """:func:`inverse_training_rates` with ``count = present.sum()`` given."""
    ratios = losses / initial_losses
    # absent tasks may hold NaN/Inf: out of the mean, and 0 themselves
    safe = torch.where(present, ratios, 0.0)
    return ratios, safe / (safe.sum() / count)


def gradnorm_weight_grad(
    weights: Tensor,
    grad_norms: Tensor,
    losses: Tensor,
    initial_losses: Tensor,
    alpha: float,
    present: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The analytic gradient of the GradNorm loss with respect to the task weights.

    ``G_i = w_i n_i``; ``target_i = mean(G) * r_i ** alpha`` (a constant);
    ``L_grad = sum_i |G_i - target_i|``; ``dL_grad/dw_i = sign(G_i - target_i) * n_i``.
    This is what ``create_graph=True`` double backward through ``n_i`` would give, without
    the double backward (``n_i`` does not depend on ``w``).

    Args:
        weights: 1-D tensor of the task weights ``w_i`` used in this step's model loss.
        grad_norms: 1-D tensor of ``n_i = ||grad_W L_i||`` (unweighted losses).
        losses: 1-D tensor of ``L_i(t)``.
        initial_losses: 1-D tensor of ``L_i(0)``.
        alpha: the asymmetry hyper-parameter (``>= 0``).
        present: optional boolean mask of the tasks that take part.

    Returns:
        ``(weight_grad, gradnorm_loss, loss_ratios, inverse_rates)``. ``weight_grad`` is zero
        for absent tasks and ``gradnorm_loss`` sums over present tasks only.

    Example::

        >>> w = torch.tensor([1.0, 1.0])
        >>> grad, loss, _, _ = gradnorm_weight_grad(
        ...     w, torch.tensor([1.0, 3.0]), torch.tensor([1.0, 1.0]), torch.tensor([1.0, 1.0]), 0.0)
        >>> grad  # G = [1, 3], target = 2: push w_0 up and w_1 down
        tensor([-1.,  3.])
        >>> loss
        tensor(2.)
    """
    if present is None:
        present = torch.ones_like(weights, dtype=torch.bool)
    ratios, rates = inverse_training_rates(losses, initial_losses, present)
    weight_grad, gradnorm_loss = gradnorm_weight_grad_from_rates(weights, grad_norms, rates, alpha, present)
    return weight_grad, gradnorm_loss, ratios, rates


def gradnorm_weight_grad_from_rates(
    weights: Tensor, grad_norms: Tensor, inverse_rates: Tensor, alpha: float, present: Tensor
) -> tuple[Tensor, Tensor]:
    """:func:`gradnorm_weight_grad` from inverse training rates already computed.

    Args:
        weights: the task weights ``w_i``.
        grad_norms: ``n_i`` (anything, even non-finite, for absent tasks).
        inverse_rates: ``r_i`` (finite for absent tasks, as :func:`inverse_training_rates` gives).
        alpha: the asymmetry.
        present: boolean mask of the tasks that take part.

    Returns:
        ``(weight_grad, gradnorm_loss)``; the gradient is zero for absent tasks.

    Example::

        >>> gradnorm_weight_grad_from_rates(torch.ones(2), torch.tensor([1.0, 3.0]), torch.ones(2), 0.0,
        ...                                 torch.tensor([True, True]))
        (tensor([-1.,  3.]), tensor(2.))
    """
    return _weight_grad(weights, grad_norms, inverse_rates, alpha, present, present.sum())


def _weight_grad(weights: Tensor, grad_norms: Tensor, inverse_rates: Tensor, alpha: float, present: Tensor,
                 count: Tensor) -> tuple[Tensor, Tensor]:
    """:func:`gradnorm_weight_grad_from_rates` with ``count = present.sum()`` given."""
    safe_norms = torch.where(present, grad_norms, 0.0)
    weighted = weights * safe_norms
    mean = weighted.sum() / count
    if alpha > 0:
        # G_i - mean(G) r_i ** alpha: 0 for absent tasks (G_i = r_i = 0)
        diff = torch.addcmul(weighted, inverse_rates**alpha, mean, value=-1)
    else:
        diff = torch.where(present, weighted - mean, 0.0)
    return diff.sign() * safe_norms, torch.linalg.vector_norm(diff, 1)


def renormalize_weights(
    weights: Tensor,
    previous: Tensor,
    present: Tensor | None = None,
    min_weight: float = 0.0,
) -> Tensor:
    """The updated weights, floored at ``min_weight`` and rescaled to sum to ``T``, both exactly.

    Absent tasks keep their previous weight; the ``n`` present ones share what is left of ``T``,
    ``B = T - sum(absent weights)``, in proportion to their updated values ``x_i`` (floored at
    ``min_weight`` first): ``w_i = max(min_weight, c x_i)`` with the one scale ``c`` for which
    they sum to ``B``. When no scaled weight falls below the floor, ``c = B / sum(x)``: the
    plain renormalisation. Otherwise the weights at the floor stay there and the others share
    the rest: with the ``x`` sorted in decreasing order and ``S_j`` the sum of the ``j``
    largest, ``c = min_j (B - (n - j) min_weight) / S_j`` (each candidate bounds ``c`` from
    above, and the one whose ``j`` weights are the unfloored ones is it). Found without reading
    a value on the host. Where the floor cannot hold (``n * min_weight > B``: absent tasks hold
    more than ``T - n * min_weight``), the floor used is ``B / n`` and the sum still ``T``.

    Args:
        weights: 1-D tensor of the weights after the optimizer step.
        previous: 1-D tensor of the weights before it (kept for absent tasks).
        present: optional boolean mask of the tasks that took part.
        min_weight: the floor every present weight keeps after renormalisation (``>= 0``).

    Returns:
        The renormalised weights.

    Example::

        >>> renormalize_weights(torch.tensor([2.0, 4.0, 0.0]), torch.ones(3), min_weight=0.0)
        tensor([1., 2., 0.])
        >>> renormalize_weights(torch.tensor([3.0, 1.0, 7.0]), torch.ones(3),
        ...                     present=torch.tensor([True, True, False]))
        tensor([1.5000, 0.5000, 1.0000])
        >>> renormalize_weights(torch.tensor([1000.0, 1.0, 0.001]), torch.ones(3), min_weight=0.1)
        tensor([2.8000, 0.1000, 0.1000])
    """
    if present is None:
        present = torch.ones_like(weights, dtype=torch.bool)
    budget = weights.shape[0] - torch.where(present, 0.0, previous).sum()
    floor = torch.clamp_max(budget / present.sum(), min_weight)
    ramp = weights.shape[0] + torch.arange(1, weights.shape[0] + 1, dtype=weights.dtype, device=weights.device) * floor
    return _floored_renormalization(weights, previous, present, floor, ramp)[0]


def _floored_renormalization(
    weights: Tensor, previous: Tensor, present: Tensor, floor: float | Tensor, ramp: Tensor
) -> tuple[Tensor, Tensor]:
    """:func:`renormalize_weights` for a floor that can hold, with ``ramp = T + floor * [1, 2, ..., T]``
    given (a balancer makes it once), also returning the scale ``c`` (non-finite or 0 when an
    input was)."""
    floored = torch.where(present, weights.clamp_min(floor), 0.0)  # absent: 0, sorted last
    # the j-th candidate (B - (n - j) m) / S_j, with B - n m = T - sum_i (m if present else previous_i)
    # (for j beyond the present tasks, S_j stops growing and the candidate only grows)
    partial = floored.sort(descending=True).values.cumsum(0)
    scale = ((ramp - torch.where(present, floor, previous).sum()) / partial).amin()
    return torch.where(present, (floored * scale).clamp_min(floor), previous), scale


def adam_update(
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    step: Tensor,
    betas: tuple[float, float],
    eps: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One Adam step direction, elementwise with a per-element step count.

    Matches :class:`torch.optim.Adam` (no weight decay, no amsgrad): the returned
    ``direction`` is what is multiplied by the learning rate and subtracted from the
    parameters.

    Args:
        grad: the gradient.
        exp_avg: first-moment estimate before the step.
        exp_avg_sq: second-moment estimate before the step.
        step: per-element step counts before the step (floating point).
        betas: ``(beta1, beta2)``.
        eps: the denominator's epsilon.

    Returns:
        ``(direction, exp_avg, exp_avg_sq, step)`` after the step.

    Example::

        >>> d, m, v, s = adam_update(torch.tensor([2.0]), torch.zeros(1), torch.zeros(1),
        ...                          torch.zeros(1), (0.9, 0.999), 1e-8)
        >>> d  # the first Adam step has magnitude 1 (sign of the gradient)
        tensor([1.0000])
    """
    beta1, beta2 = betas
    step = step + 1
    exp_avg = exp_avg * beta1 + grad * (1 - beta1)
    exp_avg_sq = exp_avg_sq * beta2 + grad * grad * (1 - beta2)
    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    denom = exp_avg_sq.sqrt() / bias_correction2.sqrt() + eps
    direction = exp_avg / bias_correction1 / denom
    return direction, exp_avg, exp_avg_sq, step
