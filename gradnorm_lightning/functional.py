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
(their loss was missing or non-finite on that step), so means run over the present tasks
only and their gradient is zero. All decisions are made with ``where``, so the functions never
read a tensor value on the host. They take torch tensors, or the host path's Python vectors
(the balancers' update on the CPU: :mod:`gradnorm_lightning._arrays`).
"""

from __future__ import annotations

from typing import Any

import torch  # noqa: F401 (the docstring examples use it)
from torch import Tensor

from gradnorm_lightning._arrays import array_ops

__all__ = [
    "adam_update",
    "gradnorm_weight_grad",
    "gradnorm_weight_grad_from_rates",
    "inverse_training_rates",
    "renormalize_weights",
]


def _present_or_all(x: Any, present: Any) -> Any:
    if present is None:
        return array_ops(x).true_like(x)
    return present


def _masked_mean(x: Any, present: Any) -> Any:
    xp = array_ops(x)
    return xp.where(present, x, 0.0).sum() / xp.clamp_min(xp.count(present, x), 1.0)


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
        ``(loss_ratios, inverse_rates)``, both shaped like ``losses``. Entries of absent
        tasks are computed but meaningless.

    Example::

        >>> ratios, rates = inverse_training_rates(torch.tensor([1.0, 3.0]), torch.tensor([2.0, 2.0]))
        >>> ratios
        tensor([0.5000, 1.5000])
        >>> rates
        tensor([0.5000, 1.5000])
    """
    present = _present_or_all(losses, present)
    ratios = losses / initial_losses
    # Absent tasks may hold NaN/Inf: keep them out of the mean and out of the division.
    safe_ratios = array_ops(ratios).where(present, ratios, 1.0)
    return ratios, safe_ratios / _masked_mean(safe_ratios, present)


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
    present = _present_or_all(weights, present)
    ratios, rates = inverse_training_rates(losses, initial_losses, present)
    weight_grad, gradnorm_loss = gradnorm_weight_grad_from_rates(weights, grad_norms, rates, alpha, present)
    return weight_grad, gradnorm_loss, ratios, rates


def gradnorm_weight_grad_from_rates(
    weights: Tensor, grad_norms: Tensor, inverse_rates: Tensor, alpha: float, present: Tensor
) -> tuple[Tensor, Tensor]:
    """:func:`gradnorm_weight_grad` from inverse training rates already computed.

    Args:
        weights: the task weights ``w_i``.
        grad_norms: ``n_i``.
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
    xp = array_ops(weights)
    safe_norms = xp.where(present, grad_norms, 0.0)
    weighted = weights * safe_norms
    diff = weighted - _masked_mean(weighted, present) * inverse_rates**alpha
    gradnorm_loss = xp.where(present, abs(diff), 0.0).sum()
    # absent tasks: sign(finite) * 0 = 0
    return xp.sign(diff) * safe_norms, gradnorm_loss


def renormalize_weights(
    weights: Tensor,
    previous: Tensor,
    present: Tensor | None = None,
    min_weight: float = 0.0,
) -> Tensor:
    """Clamp the updated weights to ``min_weight`` and rescale them to sum to ``T``.

    Absent tasks keep their previous weight; the present ones share what is left of ``T``
    in proportion to their updated values, so the sum stays exactly ``T``.

    Args:
        weights: 1-D tensor of the weights after the optimizer step.
        previous: 1-D tensor of the weights before it (kept for absent tasks).
        present: optional boolean mask of the tasks that took part.
        min_weight: floor applied before renormalisation (keeps weights positive).

    Returns:
        The renormalised weights.

    Example::

        >>> renormalize_weights(torch.tensor([2.0, 4.0, 0.0]), torch.ones(3), min_weight=0.0)
        tensor([1., 2., 0.])
        >>> renormalize_weights(torch.tensor([3.0, 1.0, 7.0]), torch.ones(3),
        ...                     present=torch.tensor([True, True, False]))
        tensor([1.5000, 0.5000, 1.0000])
    """
    xp = array_ops(weights)
    present = _present_or_all(weights, present)
    num_tasks = weights.shape[0]
    clamped = xp.clamp_min(weights, min_weight)
    absent_sum = xp.where(present, 0.0, previous).sum()
    present_sum = xp.where(present, clamped, 0.0).sum()
    return xp.where(present, clamped * ((num_tasks - absent_sum) / present_sum), previous)


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
    xp = array_ops(grad)
    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    denom = xp.sqrt(exp_avg_sq) / xp.sqrt(bias_correction2) + eps
    direction = exp_avg / bias_correction1 / denom
    return direction, exp_avg, exp_avg_sq, step
