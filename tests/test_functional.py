"""The pure math against hand-computed values and torch.optim."""

from __future__ import annotations

import math

import pytest
import torch

from gradnorm_lightning.functional import (
    adam_update,
    gradnorm_weight_grad,
    inverse_training_rates,
    renormalize_weights,
)


def test_inverse_rates_hand_computed() -> None:
    losses = torch.tensor([2.0, 1.0, 3.0], dtype=torch.float64)
    initial = torch.tensor([4.0, 1.0, 2.0], dtype=torch.float64)
    ratios, rates = inverse_training_rates(losses, initial)
    # ratios 0.5, 1, 1.5; mean 1
    torch.testing.assert_close(ratios, torch.tensor([0.5, 1.0, 1.5], dtype=torch.float64))
    torch.testing.assert_close(rates, torch.tensor([0.5, 1.0, 1.5], dtype=torch.float64))


def test_inverse_rates_present_mask_excludes_nan() -> None:
    losses = torch.tensor([2.0, float("nan"), 6.0], dtype=torch.float64)
    initial = torch.tensor([1.0, 1.0, 2.0], dtype=torch.float64)
    present = torch.tensor([True, False, True])
    _, rates = inverse_training_rates(losses, initial, present)
    # present ratios 2 and 3, mean 2.5
    torch.testing.assert_close(rates[[0, 2]], torch.tensor([0.8, 1.2], dtype=torch.float64))


def test_weight_grad_hand_computed() -> None:
    w = torch.tensor([0.5, 1.5], dtype=torch.float64)
    n = torch.tensor([4.0, 1.0], dtype=torch.float64)  # G = [2, 1.5], mean 1.75
    losses = torch.tensor([1.0, 3.0], dtype=torch.float64)
    initial = torch.tensor([1.0, 1.0], dtype=torch.float64)  # ratios 1, 3 -> r = 0.5, 1.5
    grad, loss, _, rates = gradnorm_weight_grad(w, n, losses, initial, alpha=1.0)
    target = 1.75 * rates
    torch.testing.assert_close(target, torch.tensor([0.875, 2.625], dtype=torch.float64))
    # G - target = [1.125, -1.125] -> sign [+, -] times n
    torch.testing.assert_close(grad, torch.tensor([4.0, -1.0], dtype=torch.float64))
    torch.testing.assert_close(loss, torch.tensor(2.25, dtype=torch.float64))


@pytest.mark.parametrize("alpha", [0.0, 0.12, 1.5])
def test_weight_grad_equals_autograd_of_gradnorm_loss(alpha: float) -> None:
    g = torch.Generator().manual_seed(0)
    w = (torch.rand(5, generator=g, dtype=torch.float64) + 0.5).requires_grad_()
    n = torch.rand(5, generator=g, dtype=torch.float64) * 3
    losses = torch.rand(5, generator=g, dtype=torch.float64) + 0.1
    initial = torch.rand(5, generator=g, dtype=torch.float64) + 0.1
    G = w * n
    ratio = losses / initial
    r = ratio / ratio.mean()
    l_grad = (G - (G.mean() * r**alpha).detach()).abs().sum()
    (expected,) = torch.autograd.grad(l_grad, w)
    grad, loss, _, _ = gradnorm_weight_grad(w.detach(), n, losses, initial, alpha)
    torch.testing.assert_close(grad, expected, rtol=0, atol=1e-14)
    torch.testing.assert_close(loss, l_grad.detach(), rtol=0, atol=1e-14)


def test_weight_grad_absent_task_is_zero_and_excluded_from_means() -> None:
    w = torch.ones(3, dtype=torch.float64)
    n = torch.tensor([1.0, float("nan"), 3.0], dtype=torch.float64)
    losses = torch.tensor([1.0, float("inf"), 1.0], dtype=torch.float64)
    present = torch.tensor([True, False, True])
    grad, loss, _, _ = gradnorm_weight_grad(w, n, losses, torch.ones(3, dtype=torch.float64), 0.5, present)
    # present G = [1, 3], mean 2, r = 1: grad = [-1, 0, 3], loss = 2
    torch.testing.assert_close(grad, torch.tensor([-1.0, 0.0, 3.0], dtype=torch.float64))
    torch.testing.assert_close(loss, torch.tensor(2.0, dtype=torch.float64))


def test_renormalize_sums_to_t_and_floors() -> None:
    w = torch.tensor([-1.0, 2.0, 6.0], dtype=torch.float64)
    out = renormalize_weights(w, torch.ones(3, dtype=torch.float64), min_weight=0.01)
    assert out.min() > 0
    torch.testing.assert_close(out.sum(), torch.tensor(3.0, dtype=torch.float64))
    # rescaling [0.01, 2, 6] by 3 / 8.01 would put the first below the floor: it stays at 0.01 and
    # the others share 2.99 in proportion, 2 * 2.99 / 8 and 6 * 2.99 / 8
    torch.testing.assert_close(out, torch.tensor([0.01, 0.7475, 2.2425], dtype=torch.float64), rtol=1e-15, atol=0)


def test_renormalize_keeps_absent_weights() -> None:
    prev = torch.tensor([0.5, 2.0, 0.5], dtype=torch.float64)
    out = renormalize_weights(torch.tensor([1.0, 9.0, 3.0], dtype=torch.float64), prev,
                              torch.tensor([True, False, True]))
    assert out[1] == 2.0
    torch.testing.assert_close(out[[0, 2]], torch.tensor([0.25, 0.75], dtype=torch.float64))


def test_adam_update_matches_torch_optim_adam() -> None:
    g = torch.Generator().manual_seed(1)
    p = torch.randn(4, dtype=torch.float64, generator=g)
    ref = p.clone().requires_grad_()
    opt = torch.optim.Adam([ref], lr=0.01, betas=(0.8, 0.95), eps=1e-6)
    m = torch.zeros(4, dtype=torch.float64)
    v = torch.zeros(4, dtype=torch.float64)
    s = torch.zeros(4, dtype=torch.float64)
    for _ in range(20):
        grad = torch.randn(4, dtype=torch.float64, generator=g)
        ref.grad = grad.clone()
        opt.step()
        d, m, v, s = adam_update(grad, m, v, s, (0.8, 0.95), 1e-6)
        p = p - 0.01 * d
    torch.testing.assert_close(p, ref.detach(), rtol=0, atol=1e-14)
    assert math.isclose(float(s[0]), 20.0)
