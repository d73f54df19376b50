"""Issue 6: property tests of the GradNorm math (gradnorm_lightning.functional) and of the
balancer's step, in float64, against facts derived by hand from the paper's definitions:

* after a step and renormalisation the weights stay positive and sum to ``T``;
* with ``alpha = 0`` and a small enough step, the weighted norms ``w_i n_i`` get closer:
  ``max/min`` (scale-free, so renormalisation cannot hide it) strictly decreases;
* scaling: ``r_i`` only depends on the loss ratios' proportions. Scaling the losses alone by
  ``c`` scales the ratios by ``c`` and leaves ``r`` and the weight gradient unchanged. Scaling a
  task's loss *function* by ``c`` scales ``L``, ``L(0)`` and the norms ``n`` by ``c``: ratios and
  ``r`` unchanged, every sign unchanged, the weight gradient and the GradNorm loss scaled by
  ``c``. Scaling all weights by ``c`` leaves the weight gradient unchanged;
* permuting the tasks permutes every per-task output;
* present masks: absent tasks get a zero gradient and keep their weight, whatever (even
  non-finite) values they hold, and the present tasks get exactly what the present tasks alone
  would give.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st
from torch import nn

from gradnorm_lightning import GradNorm
from gradnorm_lightning.functional import (
    gradnorm_weight_grad,
    inverse_training_rates,
    renormalize_weights,
)

F64 = torch.float64
SETTINGS = settings(max_examples=40, deadline=None)

pos = st.floats(min_value=1e-3, max_value=1e3, allow_nan=False, allow_infinity=False)
alphas = st.floats(min_value=0.0, max_value=3.0)


@st.composite
def problems(draw, min_tasks=2, max_tasks=7):
    """Random weights (positive, summing to T), norms, losses and L(0)."""
    t = draw(st.integers(min_tasks, max_tasks))
    vec = st.lists(pos, min_size=t, max_size=t)
    w = torch.tensor(draw(vec), dtype=F64)
    w = w * t / w.sum()
    n = torch.tensor(draw(vec), dtype=F64)
    loss = torch.tensor(draw(vec), dtype=F64)
    l0 = torch.tensor(draw(vec), dtype=F64)
    return w, n, loss, l0


def floor_projection(x, budget, floor):
    """``max(floor, c x)`` summing to ``budget``, ``c`` found by bisection (an independent reference
    for ``renormalize_weights``: ``sum_i max(floor, c x_i)`` grows with ``c``)."""
    x, budget = x.double(), float(budget)
    lo, hi = 0.0, budget / float(x.min())
    for _ in range(200):
        mid = (lo + hi) / 2
        if float(torch.clamp_min(mid * x, floor).sum()) < budget:
            lo = mid
        else:
            hi = mid
    return torch.clamp_min(hi * x, floor)


def _masks(t):
    """Masks with at least one present task."""
    return st.lists(st.booleans(), min_size=t, max_size=t).filter(any).map(torch.tensor)


def _no_near_ties(w, n, loss, l0, alpha, present=None):
    """The sign of ``G_i - target_i`` is well defined (no task within rounding of its target)."""
    present = torch.ones_like(w, dtype=torch.bool) if present is None else present
    g = w * n
    _, r = inverse_training_rates(loss, l0, present)
    target = g[present].mean() * r.pow(alpha)
    diff = (g - target)[present]
    return bool((diff.abs() > 1e-7 * g[present].abs().max()).all())


# ---------------------------------------------------------------------- weights stay valid
@SETTINGS
@given(problems(), alphas, st.floats(1e-4, 10.0), st.floats(1e-6, 1e-2), st.data())
def test_updated_weights_positive_and_sum_to_t(prob, alpha, lr, min_weight, data):
    w, n, loss, l0 = prob
    t = w.numel()
    present = data.draw(_masks(t))
    grad, gloss, _, _ = gradnorm_weight_grad(w, n, loss, l0, alpha, present)
    new = renormalize_weights(w - lr * grad, w, present, min_weight=min_weight)
    assert torch.isfinite(new).all()
    assert (new > 0).all()
    assert float(new.sum()) == pytest.approx(t, rel=1e-12)
    assert torch.equal(new[~present], w[~present])
    assert gloss >= 0


# ---------------------------------------------------------------------- alpha = 0 equalises
@SETTINGS
@given(problems(), st.floats(0.01, 0.5))
def test_alpha_zero_small_step_shrinks_spread_of_weighted_norms(prob, frac):
    w, n, loss, l0 = prob
    g = w * n
    gbar = g.mean()
    gap = (g - gbar).abs()
    assume(float(g.max() / g.min()) > 1 + 1e-6)
    assume(bool((gap[gap > 0] > 1e-9 * gbar).all()))
    # small enough: nobody crosses the mean (lr n_i^2 < |G_i - mean|/2), weights stay > w/2
    moving = gap > 0
    lr_cross = (gap[moving] / (2 * n[moving] ** 2)).min()
    lr_pos = (w / (2 * n)).min()
    lr = float(frac * torch.minimum(lr_cross, lr_pos))
    grad, _, _, _ = gradnorm_weight_grad(w, n, loss, l0, 0.0)
    new = renormalize_weights(w - lr * grad, w, min_weight=1e-12)
    g_new = new * n
    spread_old = float(g.max() / g.min())
    spread_new = float(g_new.max() / g_new.min())
    assert spread_new < spread_old
    # and the variance of the (unnormalised) weighted norms shrinks too
    assert float(((w - lr * grad) * n).var()) < float(g.var())


# ---------------------------------------------------------------------- scaling
@SETTINGS
@given(problems(), alphas, st.floats(1e-2, 1e2))
def test_scaling_losses_only_scales_ratios_not_rates_or_grad(prob, alpha, c):
    w, n, loss, l0 = prob
    assume(_no_near_ties(w, n, loss, l0, alpha))
    ratios, rates = inverse_training_rates(loss, l0)
    ratios_c, rates_c = inverse_training_rates(c * loss, l0)
    torch.testing.assert_close(ratios_c, c * ratios, rtol=1e-12, atol=0)
    torch.testing.assert_close(rates_c, rates, rtol=1e-12, atol=0)
    grad, gloss, _, _ = gradnorm_weight_grad(w, n, loss, l0, alpha)
    grad_c, gloss_c, _, _ = gradnorm_weight_grad(w, n, c * loss, l0, alpha)
    torch.testing.assert_close(grad_c, grad, rtol=1e-12, atol=0)
    torch.testing.assert_close(gloss_c, gloss, rtol=1e-9, atol=1e-12)


@SETTINGS
@given(problems(), alphas, st.floats(1e-2, 1e2))
def test_scaling_the_loss_function_scales_weight_gradient(prob, alpha, c):
    """L -> cL everywhere: L(0) -> c L(0), n -> c n; ratios and rates unchanged, grad -> c grad."""
    w, n, loss, l0 = prob
    assume(_no_near_ties(w, n, loss, l0, alpha))
    grad, gloss, ratios, rates = gradnorm_weight_grad(w, n, loss, l0, alpha)
    grad_c, gloss_c, ratios_c, rates_c = gradnorm_weight_grad(w, c * n, c * loss, c * l0, alpha)
    torch.testing.assert_close(ratios_c, ratios, rtol=1e-12, atol=0)
    torch.testing.assert_close(rates_c, rates, rtol=1e-12, atol=0)
    assert torch.equal(torch.sign(grad_c), torch.sign(grad))
    torch.testing.assert_close(grad_c, c * grad, rtol=1e-12, atol=0)
    torch.testing.assert_close(gloss_c, c * gloss, rtol=1e-9, atol=1e-12)
    # the textbook definition, by hand: dL_grad/dw_i = sign(G_i - target_i) n_i
    g = w * n
    target = g.mean() * rates.pow(alpha)
    torch.testing.assert_close(grad, torch.sign(g - target) * n, rtol=1e-12, atol=0)


@SETTINGS
@given(problems(), alphas, st.floats(1e-2, 1e2))
def test_scaling_weights_leaves_gradient_unchanged(prob, alpha, c):
    w, n, loss, l0 = prob
    assume(_no_near_ties(w, n, loss, l0, alpha))
    grad, _, _, _ = gradnorm_weight_grad(w, n, loss, l0, alpha)
    grad_c, _, _, _ = gradnorm_weight_grad(c * w, n, loss, l0, alpha)
    torch.testing.assert_close(grad_c, grad, rtol=1e-12, atol=0)
    # and renormalisation removes a common scale entirely
    torch.testing.assert_close(
        renormalize_weights(c * w, w, min_weight=1e-12), w, rtol=1e-12, atol=1e-12
    )


# ---------------------------------------------------------------------- permutations
@SETTINGS
@given(problems(), alphas, st.randoms(use_true_random=False), st.data())
def test_permuting_tasks_permutes_results(prob, alpha, rnd, data):
    w, n, loss, l0 = prob
    t = w.numel()
    present = data.draw(_masks(t))
    perm = list(range(t))
    rnd.shuffle(perm)
    p = torch.tensor(perm)
    out = gradnorm_weight_grad(w, n, loss, l0, alpha, present)
    out_p = gradnorm_weight_grad(w[p], n[p], loss[p], l0[p], alpha, present[p])
    for a, b in zip((out[0], out[3]), (out_p[0], out_p[3])):
        torch.testing.assert_close(b, a[p], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out_p[2], out[2][p], rtol=0, atol=0)
    torch.testing.assert_close(out_p[1], out[1], rtol=1e-12, atol=1e-12)
    new = renormalize_weights(w - 0.01 * out[0], w, present, 1e-4)
    new_p = renormalize_weights(w[p] - 0.01 * out_p[0], w[p], present[p], 1e-4)
    torch.testing.assert_close(new_p, new[p], rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------- present masks
junk = st.sampled_from([float("nan"), float("inf"), -float("inf"), 0.0, -3.0, 1e300])


@SETTINGS
@given(problems(min_tasks=3), alphas, st.floats(1e-3, 1.0), st.data())
def test_absent_tasks_zero_grad_keep_weight_and_do_not_leak(prob, alpha, lr, data):
    w, n, loss, l0 = prob
    t = w.numel()
    present = data.draw(_masks(t))
    assume(not bool(present.all()))
    idx = present.nonzero().squeeze(1)
    # absent entries hold junk (what a task without labels produces)
    n_j, loss_j, l0_j = n.clone(), loss.clone(), l0.clone()
    for i in (~present).nonzero().squeeze(1).tolist():
        n_j[i], loss_j[i], l0_j[i] = data.draw(junk), data.draw(junk), data.draw(junk)
    grad, gloss, _, rates = gradnorm_weight_grad(w, n_j, loss_j, l0_j, alpha, present)
    assert torch.equal(grad[~present], torch.zeros_like(grad[~present]))
    assert torch.isfinite(grad).all() and torch.isfinite(gloss)
    # the present tasks get what the present tasks alone would give
    sub_grad, sub_loss, _, sub_rates = gradnorm_weight_grad(w[idx], n[idx], loss[idx], l0[idx], alpha)
    torch.testing.assert_close(grad[idx], sub_grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(rates[idx], sub_rates, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gloss, sub_loss, rtol=1e-12, atol=1e-12)
    new = renormalize_weights(w - lr * grad, w, present, 1e-4)
    assert torch.equal(new[~present], w[~present])
    # present weights: the sub-problem's stepped weights, floored, rescaled to T minus the absent
    # weights (with the floor kept after the rescaling: see floor_projection)
    budget = float(t - w[~present].sum())
    floor = min(1e-4, budget / len(idx))  # (the drawn weights may leave less than n * 1e-4)
    stepped = (w[idx] - lr * sub_grad).clamp_min(floor)
    expect = floor_projection(stepped, budget, floor)
    torch.testing.assert_close(new[idx], expect, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------- the balancer's step
def _textbook_norms(shared, losses):
    out = []
    for loss in losses:
        grads = torch.autograd.grad(loss, list(shared.parameters()), retain_graph=True)
        out.append(torch.sqrt(sum((g * g).sum() for g in grads)))
    return torch.stack(out)


@settings(max_examples=12, deadline=None)
@given(
    st.integers(0, 2**31 - 1),
    alphas,
    st.floats(1e-3, 0.5),
    st.lists(st.lists(st.sampled_from(["ok", "ok", "nan", "inf", "none"]), min_size=3, max_size=3), min_size=4, max_size=4),
    st.sampled_from(["sgd", "adam"]),
    st.sampled_from([1.0, 0.7]),
)
# (a weight the rescaling would take below the floor: it stays at it)
@example(2093, 1.0, 0.5, [["ok"] * 3, ["nan", "ok", "ok"], ["ok"] * 3, ["ok"] * 3], "sgd", 1.0)
def test_balancer_step_is_the_documented_math(seed, alpha, lr, pattern, optimizer, decay):
    """Four balancer steps with absent tasks == norms by autograd + the rules by hand: SGD or a
    per-task Adam (absent tasks' moments and step counts untouched), lr * decay ** updates."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    inp, shared = nn.Linear(3, 5).double(), nn.Linear(5, 4).double()
    heads = [nn.Linear(4, 1).double() for _ in range(3)]
    gn = GradNorm(shared, 3, alpha=alpha, lr=lr, optimizer=optimizer, lr_decay_rate=decay, lr_decay_steps=1)
    w = torch.ones(3, dtype=F64)
    l0 = [math.nan] * 3
    m, v, t_adam = np.zeros(3), np.zeros(3), np.zeros(3)
    updates = 0
    for kinds in pattern:
        x = torch.randn(6, 3, generator=gen, dtype=F64)
        z = torch.tanh(shared(torch.tanh(inp(x))))
        raw = [h(z).pow(2).mean() * (k + 1) for k, h in enumerate(heads)]
        items = []
        for loss, kind in zip(raw, kinds):
            items.append(None if kind == "none" else loss + {"ok": 0.0, "nan": math.nan, "inf": math.inf}[kind])
        present = np.array([k == "ok" for k in kinds])
        if not present.any():
            continue  # "no task" is an error (tested in test_errors.py); all-non-finite below
        norms = _textbook_norms(shared, [raw[i] for i in range(3) if present[i]])
        vals = np.array([float(r.detach()) for r in raw])
        for i in range(3):
            if present[i] and math.isnan(l0[i]):
                l0[i] = vals[i]
        gn.combine(items).backward()
        gn.step()
        idx = np.flatnonzero(present)
        ratio = vals[idx] / np.array(l0)[idx]
        r = ratio / ratio.mean()
        g = w.numpy()[idx] * norms.detach().numpy()
        target = g.mean() * r**alpha
        wgrad = np.sign(g - target) * norms.detach().numpy()
        if optimizer == "adam":
            b1, b2 = 0.9, 0.999
            t_adam[idx] += 1
            m[idx] = b1 * m[idx] + (1 - b1) * wgrad
            v[idx] = b2 * v[idx] + (1 - b2) * wgrad**2
            mhat = m[idx] / (1 - b1 ** t_adam[idx])
            vhat = v[idx] / (1 - b2 ** t_adam[idx])
            direction = mhat / (np.sqrt(vhat) + 1e-8)
        else:
            direction = wgrad
        step = w.numpy().copy()
        step[idx] = np.maximum(step[idx] - lr * decay**updates * direction, 1e-4)
        updates += 1
        new = w.numpy().copy()
        # rescaled to 3 minus the absent weights, the floor kept (the bisection reference)
        new[idx] = floor_projection(torch.tensor(step[idx]), 3 - w.numpy()[~present].sum(), 1e-4).numpy()
        w = torch.tensor(new)
        torch.testing.assert_close(gn.weights, w, rtol=0, atol=1e-12)
        for p in [*inp.parameters(), *shared.parameters(), *(q for h in heads for q in h.parameters())]:
            p.grad = None
    known = [i for i in range(3) if not math.isnan(l0[i])]
    torch.testing.assert_close(
        gn.current_initial_losses[known], torch.tensor([l0[i] for i in known], dtype=F64), rtol=1e-14, atol=0
    )


# ---------------------------------------------------------------------- the floor (issue 22, item 6)
@SETTINGS
@given(
    st.integers(2, 7),
    st.floats(1e-6, 0.2),
    st.data(),
)
def test_renormalised_weights_keep_the_floor_and_sum_to_t(t, min_weight, data):
    """Whatever the step did (negative, huge, tiny weights): every present weight ends at least
    ``min_weight``, the weights sum to ``T``, absent ones are kept, and the result is the
    projection ``max(m, c x)`` of the bisection reference; where the plain rescaling keeps the
    floor, it is the plain rescaling."""
    anything = st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False)
    raw = torch.tensor(data.draw(st.lists(anything, min_size=t, max_size=t)), dtype=F64)
    present = data.draw(_masks(t))
    # previous weights at or above the floor, summing to T (what an earlier update left)
    prev = torch.tensor(data.draw(st.lists(st.floats(1e-3, 1.0), min_size=t, max_size=t)), dtype=F64)
    prev = min_weight + prev * (t - t * min_weight) / prev.sum()
    new = renormalize_weights(raw, prev, present, min_weight)
    assert torch.equal(new[~present], prev[~present])
    # (the floor can hold while the absent weights leave the present ones at least n * min_weight;
    # by rounding, a previous step at the floor can leave a hair less: the floor is then B / n)
    budget = float(t - prev[~present].sum())
    floor = min(min_weight, budget / int(present.sum()))
    assert bool((new[present] >= floor * (1 - 1e-12)).all())  # (B / n on both sides: to rounding)
    assert float(new.sum()) == pytest.approx(t, rel=1e-12)
    stepped = raw[present].clamp_min(floor)
    torch.testing.assert_close(new[present], floor_projection(stepped, budget, floor), rtol=1e-9, atol=1e-12)
    plain = stepped * budget / stepped.sum()
    if bool((plain >= floor).all()):
        torch.testing.assert_close(new[present], plain, rtol=1e-12, atol=1e-15)


def test_the_floor_holds_in_a_diverging_run():
    """SGD at a learning rate far too large for the norms (the weights slam into the floor every
    step): after every update every weight is at least min_weight and the sum is T."""
    torch.manual_seed(0)
    inp, shared = nn.Linear(3, 5).double(), nn.Linear(5, 4).double()
    heads = [nn.Linear(4, 1).double() for _ in range(3)]
    gn = GradNorm(shared, 3, alpha=1.5, lr=50.0, optimizer="sgd", min_weight=1e-4)
    gen = torch.Generator().manual_seed(1)
    at_floor = 0
    for _ in range(30):
        x = torch.randn(8, 3, generator=gen, dtype=F64)
        z = torch.tanh(shared(torch.tanh(inp(x))))
        losses = [h(z).pow(2).mean() * 10.0**k for k, h in enumerate(heads)]  # norms 1 : 10 : 100
        gn.combine(losses).backward()
        gn.step()
        assert float(gn.weights.min()) >= 1e-4
        assert float(gn.weights.sum()) == pytest.approx(3.0, abs=1e-12)
        at_floor += int(float(gn.weights.min()) == 1e-4)
        for p in [*inp.parameters(), *shared.parameters(), *(q for h in heads for q in h.parameters())]:
            p.grad = None
    assert at_floor >= 10  # the floor was really binding (the plain rescaling would go below it)
    assert float(gn.floor_steps) >= 10
