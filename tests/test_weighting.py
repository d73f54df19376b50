"""The baseline strategies against hand-written references."""

from __future__ import annotations

import pytest
import torch

from gradnorm_lightning import (
    DWACallback,
    DynamicWeightAverage,
    EqualWeighting,
    EqualWeightingCallback,
    GradNorm,
    UncertaintyWeighting,
    UncertaintyWeightingCallback,
)
from tests.lightning_models import MultiTaskNet, loader, trainer
from tests.textbook import make_batches, make_multitask, task_losses

STEPS = 12


def _run(balancer_factory, steps: int = STEPS):  # type: ignore[no-untyped-def]
    trunk, heads = make_multitask(0)
    bal = balancer_factory(trunk[2])
    opt = torch.optim.SGD([*trunk.parameters(), *heads.parameters()], lr=0.05)
    losses_seen, weights_used, norms = [], [], []
    for x, y in make_batches(3, steps):
        losses = task_losses(heads, trunk(x), y)
        losses_seen.append(torch.stack([loss.detach() for loss in losses]))
        weights_used.append(bal.weights.clone())
        opt.zero_grad()
        bal.combine(losses).backward()
        bal.step()
        opt.step()
        norms.append(bal.last_stats["grad_norms"].clone())
    return bal, torch.stack(losses_seen), torch.stack(weights_used), torch.stack(norms)


def test_equal_weighting_keeps_ones_and_measures_the_same_norms_as_gradnorm() -> None:
    eq, _, weights, norms = _run(lambda layer: EqualWeighting(layer, num_tasks=3))
    assert torch.equal(weights, torch.ones_like(weights))
    # On its first step GradNorm also uses w = 1 on the same model: the same norms.
    _, _, _, gn_norms = _run(lambda layer: GradNorm(layer, num_tasks=3, optimizer="sgd"), steps=1)
    torch.testing.assert_close(norms[0], gn_norms[0], rtol=0, atol=1e-12)
    assert "loss" not in eq.last_stats  # it has no objective: nothing to log as gradnorm/loss


def test_equal_weighting_without_norms_logs_nan_norms() -> None:
    _, _, _, norms = _run(lambda layer: EqualWeighting(layer, num_tasks=3, track_grad_norms=False), steps=2)
    assert torch.isnan(norms).all()


def test_uncertainty_weighting_matches_autograd_and_torch_adam() -> None:
    bal, losses, weights, _ = _run(lambda layer: UncertaintyWeighting(layer, num_tasks=3, lr=0.05))
    s = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([s], lr=0.05)
    for step in range(STEPS):
        torch.testing.assert_close(weights[step], torch.exp(-s.detach()), rtol=0, atol=1e-12)
        opt.zero_grad()
        (torch.exp(-s) * losses[step] + s).sum().backward()
        opt.step()
    torch.testing.assert_close(bal.log_vars, s.detach(), rtol=0, atol=1e-12)


def test_dwa_matches_hand_computation() -> None:
    _, losses, weights, _ = _run(lambda layer: DynamicWeightAverage(layer, num_tasks=3, temperature=2.0, window=2))
    means = losses.reshape(STEPS // 2, 2, 3).mean(1)  # window means
    for step in range(STEPS):
        done = step // 2  # windows closed before this step
        if done < 2:
            expected = torch.ones(3, dtype=torch.float64)
        else:
            r = means[done - 1] / means[done - 2]
            expected = 3 * torch.softmax(r / 2.0, dim=0)
        torch.testing.assert_close(weights[step], expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    ("callback", "family"),
    [(EqualWeightingCallback(), "equal"), (UncertaintyWeightingCallback(lr=0.05), "uncertainty"), (DWACallback(window=2), "dwa")],
    ids=["equal", "uncertainty", "dwa"],
)
def test_baseline_callbacks_train_and_log_the_same_keys(callback, family) -> None:  # type: ignore[no-untyped-def]
    model = MultiTaskNet()
    metrics = {}

    class Grab(DWACallback.__mro__[-2]):  # lightning Callback
        def on_train_end(self, trainer, pl_module):  # type: ignore[no-untyped-def]
            metrics.update(trainer.logged_metrics)

    trainer(6, log_every_n_steps=1, callbacks=[callback, Grab()]).fit(model, loader(3, 6))
    for key in ("weight", "grad_norm", "loss_ratio", "inverse_rate"):
        assert f"gradnorm/{key}/t0" in metrics
    assert torch.isfinite(torch.stack(list(model.task_weights.values()))).all()


def test_bad_baseline_arguments() -> None:
    with pytest.raises(ValueError, match=r"`temperature` must be > 0"):
        DWACallback(temperature=0)
    with pytest.raises(ValueError, match=r"`window` must be > 0"):
        DWACallback(window=0)
    with pytest.raises(ValueError, match=r"`lr` must be > 0"):
        UncertaintyWeightingCallback(lr=-1)
