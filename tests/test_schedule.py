"""Issue 24, items 1-3: ``update_every``, ``freeze_after``/``frozen`` and ``gradnorm/lr``.

The references are the textbook GradNorm (``tests/textbook.py``) updated on exactly the steps
the option names, with the model trained on every step with the weights of the moment, and
hand-computed learning rates.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import lightning as L
import pytest
import torch
from torch import nn

from gradnorm_lightning import GradNorm, GradNormCallback, GradNormMixin
from tests.textbook import TextbookGradNorm, make_batches, make_multitask, task_losses

STEPS = 12


def _runs(updates_on: Any, steps: int = STEPS, **options: Any) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """(package weights, textbook weights, routes) after each step; the textbook updates its weights
    on the steps ``updates_on(step)`` names (with the package's settings: SGD, alpha 1.5)."""
    trunk, heads = make_multitask(0)
    trunk_ref, heads_ref = copy.deepcopy(trunk), copy.deepcopy(heads)
    gn = GradNorm(trunk[2], num_tasks=3, alpha=1.5, lr=0.025, optimizer="sgd", **options)
    ref = TextbookGradNorm(list(trunk_ref[2].parameters()), 3, 1.5, 0.025)
    opt = torch.optim.SGD([*trunk.parameters(), *heads.parameters()], lr=0.05)
    opt_ref = torch.optim.SGD([*trunk_ref.parameters(), *heads_ref.parameters()], lr=0.05)
    routes: list[str] = []
    collect = gn.recorder.collect

    def spy(*args: Any, **kwargs: Any) -> Any:
        stats = collect(*args, **kwargs)
        routes.append(stats.route)
        return stats

    gn.recorder.collect = spy  # type: ignore[method-assign]
    got, want = [], []
    for step, (x, y) in enumerate(make_batches(3, steps)):
        opt.zero_grad()
        gn.combine(task_losses(heads, trunk(x), y)).backward()
        gn.step()
        opt.step()
        losses = task_losses(heads_ref, trunk_ref(x), y)
        opt_ref.zero_grad()
        ref.model_loss(losses).backward(retain_graph=True)
        if updates_on(step):
            ref.update(losses)
        opt_ref.step()
        got.append(gn.weights.clone())
        want.append(ref.w.detach().clone())
    return torch.stack(got), torch.stack(want), routes


@pytest.mark.parametrize("k", [1, 3, 5])
def test_update_every_k_is_algorithm_1_on_steps_0_k_2k(k: int) -> None:
    got, want, routes = _runs(lambda step: step % k == 0, update_every=k)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    assert (want[-1] - 1).abs().max() > 1e-3  # the weights moved
    # the other steps measure nothing: no statistics route, the weights as they were
    assert routes == ["heads" if step % k == 0 else "none" for step in range(STEPS)]
    for step in range(1, STEPS):
        if step % k:
            assert torch.equal(got[step], got[step - 1])


def test_freeze_after_n_updates_keeps_the_weights_and_measures_nothing() -> None:
    got, want, routes = _runs(lambda step: step < 4, freeze_after=4)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    assert routes == ["heads"] * 4 + ["none"] * (STEPS - 4)
    assert all(torch.equal(got[step], got[3]) for step in range(4, STEPS))


def test_freeze_after_counts_applied_updates_with_update_every() -> None:
    got, want, routes = _runs(lambda step: step % 2 == 0 and step < 6, update_every=2, freeze_after=3)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    assert routes[:6] == ["heads", "none"] * 3 and set(routes[6:]) == {"none"}


def test_frozen_by_hand_and_unfrozen() -> None:
    """Frozen for steps 3-6: those steps measure nothing; updates resume at step 7."""
    trunk, heads = make_multitask(0)
    gn = GradNorm(trunk[2], num_tasks=3, alpha=1.5, lr=0.025, optimizer="sgd")
    opt = torch.optim.SGD([*trunk.parameters(), *heads.parameters()], lr=0.05)
    reference = _runs(lambda step: step < 3 or step > 6)[1]
    got = []
    for step, (x, y) in enumerate(make_batches(3, STEPS)):
        gn.frozen = 3 <= step <= 6
        assert gn.recorder.measuring == (not gn.frozen)
        opt.zero_grad()
        gn.combine(task_losses(heads, trunk(x), y)).backward()
        gn.step()
        opt.step()
        got.append(gn.weights.clone())
    torch.testing.assert_close(torch.stack(got), reference, rtol=0, atol=1e-12)
    assert float(gn.num_updates) == STEPS - 4
    with pytest.raises(TypeError, match="`frozen` must be True or False"):
        gn.frozen = 1  # type: ignore[assignment]


def test_frozen_and_the_schedule_are_in_checkpoints_and_old_ones_load() -> None:
    trunk, heads = make_multitask(0)
    gn = GradNorm(trunk[2], num_tasks=3, optimizer="sgd", update_every=2, freeze_after=2)
    for x, y in make_batches(3, 5):
        gn.combine(task_losses(heads, trunk(x), y)).backward()
        gn.step()
    assert gn.frozen and float(gn.num_updates) == 2
    state = gn.state_dict()
    assert state["frozen"] is True and state["freeze_fired"] is True
    restored = GradNorm(trunk[2], num_tasks=3, optimizer="sgd", update_every=2, freeze_after=2)
    restored.load_state_dict(state)
    assert restored.frozen and not restored.measures_next_step and restored.steps == 5
    restored.frozen = False  # by hand: freeze_after has done its job, the updates go on
    assert restored.measures_next_step is False  # (step 5 is not a multiple of 2)
    # a checkpoint from before `frozen` existed: frozen from the applied updates, at load
    old = {k: v for k, v in state.items() if k not in ("frozen", "freeze_fired")}
    again = GradNorm(trunk[2], num_tasks=3, optimizer="sgd", freeze_after=2)
    again.load_state_dict(old)
    assert again.frozen
    unlimited = GradNorm(trunk[2], num_tasks=3, optimizer="sgd")
    unlimited.load_state_dict(old)
    assert not unlimited.frozen and unlimited.measures_next_step


@pytest.mark.parametrize("value", [0, -1, 1.5, "2"])
def test_bad_schedule_arguments_are_refused(value: Any) -> None:
    with pytest.raises((TypeError, ValueError), match="update_every"):
        GradNorm(nn.Linear(2, 2), num_tasks=2, update_every=value)
    with pytest.raises((TypeError, ValueError), match="freeze_after"):
        GradNormCallback(freeze_after=value)


# ---------------------------------------------------------------------- Lightning
class _Module(GradNormMixin, L.LightningModule):
    task_names = ("task0", "task1", "task2")

    def __init__(self) -> None:
        super().__init__()
        self.trunk, self.heads = make_multitask(0)

    def shared_layer(self) -> nn.Module:
        return self.trunk[2]

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        losses = task_losses(self.heads, self.trunk(x), y)
        return self.combine_task_losses(dict(zip(self.task_names, losses)))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05)


def _fit(cb: GradNormCallback, steps: int = STEPS) -> L.Trainer:
    data = make_batches(3, steps)
    trainer = L.Trainer(max_steps=steps, callbacks=[cb], logger=False, log_every_n_steps=1,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(_Module(), torch.utils.data.DataLoader(data, batch_size=None))
    return trainer


def test_the_callback_runs_the_schedule_and_logs_lr_frozen_and_updates() -> None:
    cb = GradNormCallback(alpha=1.5, lr=0.025, optimizer="sgd", update_every=3, freeze_after=3,
                          lr_decay_rate=0.5, lr_decay_steps=2)
    trainer = _fit(cb)
    got = _runs(lambda step: step % 3 == 0 and step < 9, update_every=3, freeze_after=3,
                lr_decay_rate=0.5, lr_decay_steps=2)[0]
    assert cb.balancer is not None
    torch.testing.assert_close(cb.balancer.weights, got[-1], rtol=0, atol=1e-12)
    metrics = trainer.callback_metrics
    assert float(metrics["gradnorm/updates"]) == 3 and float(metrics["gradnorm/frozen"]) == 1.0
    # the learning rate of the next update: 0.025 * 0.5 ** (3 / 2)
    assert float(metrics["gradnorm/lr"]) == pytest.approx(0.025 * 0.5 ** 1.5, rel=1e-12)
    assert cb.frozen


def test_gradnorm_lr_is_logged_only_when_it_decays_and_frozen_can_be_set_before_the_fit() -> None:
    cb = GradNormCallback(optimizer="sgd")
    cb.frozen = True
    trainer = _fit(cb, steps=3)
    assert "gradnorm/lr" not in trainer.callback_metrics
    assert cb.balancer is not None and cb.balancer.frozen and float(cb.balancer.num_updates) == 0
    assert torch.equal(cb.balancer.weights, torch.ones(3, dtype=torch.float64))
    assert math.isclose(float(trainer.callback_metrics["gradnorm/frozen"]), 1.0)
