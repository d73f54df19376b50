"""Issue 10: what a new user meets first.

* default weights that do not flip-flop across loss scales, the paper's SGD one argument away,
  log-space weights, and a warning (once, on a logging step) when weights park or jump;
* a plain loop with a task without labels stays finite with ``zero_nonfinite_grads_``, and a
  real divergence is counted and warned about;
* a batch in which no task has a loss is skipped, not a crash: no model update, no weight
  update, counted and logged.
"""

from __future__ import annotations

import statistics
import sys
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from helpers.fault_models import TASKS, FaultModule, make_trainer

from gradnorm_lightning import GradNorm, GradNormCallback, GradNormMixin, zero_nonfinite_grads_

SCALES = (1.0, 10.0, 100.0)


def quickstart_weights(steps: int = 300, seed: int = 0, scales=SCALES, **gn_kwargs) -> torch.Tensor:
    """The README quickstart's plain loop: ``(steps + 1, T)`` weight trajectory."""
    torch.manual_seed(seed)
    trunk = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU())
    heads = nn.ModuleList([nn.Linear(32, 1) for _ in scales])
    opt = torch.optim.Adam([*trunk.parameters(), *heads.parameters()], lr=1e-3)
    gn = GradNorm(trunk[-2], num_tasks=len(scales), **gn_kwargs)
    gen = torch.Generator().manual_seed(seed)
    out = [gn.weights.clone()]
    for _ in range(steps):
        x = torch.randn(32, 8, generator=gen)
        y = torch.randn(32, len(scales), generator=gen) * torch.tensor(scales)
        z = trunk(x)
        losses = [nn.functional.mse_loss(h(z).squeeze(1), y[:, i]) for i, h in enumerate(heads)]
        opt.zero_grad()
        gn.combine(losses).backward()
        gn.step()
        opt.step()
        out.append(gn.weights.clone())
    return torch.stack(out)


def stability(traj: torch.Tensor, after: int = 50) -> tuple[float, float]:
    """(% of steps after ``after`` with a weight below 1e-3, median largest per-step change)."""
    low = (traj[after + 1 :] < 1e-3).any(dim=1).float().mean().item() * 100
    change = (traj[after + 1 :] - traj[after:-1]).abs().max(dim=1).values
    return low, statistics.median(change.tolist())


@pytest.mark.parametrize("alpha", [0.12, 1.5])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_default_weights_are_steady_across_loss_scales(alpha: float, seed: int) -> None:
    """The issue's criterion: <= 2 % of steps with a weight below 1e-3, median change <= 5 %."""
    traj = quickstart_weights(seed=seed, alpha=alpha)
    low, change = stability(traj)
    assert low <= 2.0 and change <= 0.05, (low, change)
    assert (traj[-1] - 1).abs().max() > 0.3  # the weights do move: large-scale tasks are pushed down
    torch.testing.assert_close(traj.sum(dim=1), torch.full((traj.shape[0],), 3.0), rtol=0, atol=1e-5)


def test_the_papers_sgd_update_is_one_argument_away_and_flip_flops_on_scaled_losses() -> None:
    """The documented scale behaviour of SGD, measured (what the default avoids)."""
    low, change = stability(quickstart_weights(alpha=1.5, optimizer="sgd", lr=0.025))
    assert low > 20 and change > 0.3, (low, change)
    low1, change1 = stability(quickstart_weights(alpha=1.5, optimizer="sgd", lr=0.025, scales=(1.0, 1.0, 1.0)))
    assert low1 == 0 and change1 < 0.05  # equal scales: SGD is steady too


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_log_space_weights_are_positive_sum_to_t_and_never_park(optimizer: str) -> None:
    traj = quickstart_weights(alpha=1.5, optimizer=optimizer, lr=0.025, weight_space="log")
    assert (traj > 0).all()
    torch.testing.assert_close(traj.sum(dim=1), torch.full((traj.shape[0],), 3.0), rtol=0, atol=1e-5)
    low, change = stability(traj)
    assert low == 0 and change <= 0.05, (low, change)


def test_log_space_step_is_the_linear_gradient_times_the_weight() -> None:
    """One SGD step in s = log w: s' = s - lr * w * dL/dw, then renormalised to sum T (hand-computed)."""
    layer = nn.Linear(1, 1, bias=False).double()
    gn = GradNorm(layer, num_tasks=2, alpha=0.0, lr=0.1, optimizer="sgd", weight_space="log")
    gn.weights = torch.tensor([0.5, 1.5], dtype=torch.float64)
    x = torch.tensor([[1.0]], dtype=torch.float64)
    z = layer(x)
    with torch.no_grad():
        layer.weight.fill_(1.0)
    z = layer(x)
    losses = [z.sum() * 1.0, z.sum() * 3.0]  # n = [1, 3]; G = w n = [0.5, 4.5]; G_bar = 2.5
    gn.combine(losses).backward()
    gn.step()
    grad_w = torch.tensor([-1.0, 3.0], dtype=torch.float64)  # sign(G - G_bar) * n
    s = torch.log(torch.tensor([0.5, 1.5], dtype=torch.float64)) - 0.1 * grad_w * torch.tensor([0.5, 1.5])
    expected = 2 * torch.exp(s) / torch.exp(s).sum()
    torch.testing.assert_close(gn.weights, expected, rtol=0, atol=1e-12)


def test_health_warnings_name_the_fix_and_stay_quiet_for_steady_weights() -> None:
    layer = nn.Linear(32, 32)
    bad = GradNorm(layer, num_tasks=3, optimizer="sgd", lr=0.025)
    bad.num_updates.fill_(100)
    bad.floor_steps.fill_(40)
    bad.jump_steps.fill_(30)
    messages = bad.health_warnings()
    assert len(messages) == 2
    assert all("optimizer='adam'" in m and "weight_space='log'" in m for m in messages)
    good = GradNorm(layer, num_tasks=3)
    good.num_updates.fill_(100)
    assert good.health_warnings() == []


class ScaledLosses(GradNormMixin, L.LightningModule):
    """The quickstart as a LightningModule."""

    task_names = ("depth", "seg", "normals")

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.trunk = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU())
        self.heads = nn.ModuleDict({t: nn.Linear(32, 1) for t in self.task_names})

    def shared_layer(self) -> nn.Module:
        return self.trunk[-2]

    def training_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
        x, y = batch
        z = self.trunk(x)
        losses = {t: nn.functional.mse_loss(h(z).squeeze(1), y[:, i]) for i, (t, h) in enumerate(self.heads.items())}
        return self.combine_task_losses(losses)

    def configure_optimizers(self):  # type: ignore[no-untyped-def]
        return torch.optim.Adam(self.parameters(), lr=1e-3)


def _scaled_loader(n: int = 2048) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(n, 8, generator=g), torch.randn(n, 3, generator=g) * torch.tensor(SCALES))
    return DataLoader(data, batch_size=32)


def _fit_scaled(callback: GradNormCallback, steps: int = 64) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        L.Trainer(
            max_steps=steps, callbacks=[callback], logger=False, log_every_n_steps=16, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False,
        ).fit(ScaledLosses(), _scaled_loader())
    return [str(w.message) for w in caught if "GradNorm weights" in str(w.message)]


def test_callback_warns_once_when_sgd_weights_park_at_the_floor() -> None:
    messages = _fit_scaled(GradNormCallback(alpha=1.5, optimizer="sgd", lr=0.025))
    assert len([m for m in messages if "hit the floor" in m]) == 1  # once, though logged 4 times
    assert any("optimizer='adam'" in m for m in messages)


def test_callback_defaults_do_not_warn() -> None:
    assert _fit_scaled(GradNormCallback()) == []


# --------------------------------------------------------------------------- NaN in a plain loop
def _masked_loop(form: str, sanitize: bool = False, steps: int = 6) -> tuple[list[bool], GradNorm, list[Tensor]]:
    """Task 1 has no labels on odd steps, its loss written as a masked mean (``form="masked"``:
    ``(err * mask).sum() / mask.sum()``, NaN with a ``0 * inf`` backward) or by indexing
    (``form="index"``: ``err[mask].mean()``, a NaN loss with finite gradients)."""
    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU())
    heads = nn.ModuleList([nn.Linear(8, 1) for _ in range(2)])
    params = [*trunk.parameters(), *heads.parameters()]
    opt = torch.optim.Adam(params, lr=0.01)
    gn = GradNorm(trunk[-2], num_tasks=2)
    flags = []
    for step in range(steps):
        x, y = torch.randn(16, 4), torch.randn(16, 2)
        mask = torch.ones(16) if step % 2 == 0 else torch.zeros(16)
        z = trunk(x)
        per_sample = (heads[1](z).squeeze(1) - y[:, 1]) ** 2
        second = (per_sample * mask).sum() / mask.sum() if form == "masked" else per_sample[mask.bool()].mean()
        losses = [nn.functional.mse_loss(heads[0](z).squeeze(1), y[:, 0]), second]
        opt.zero_grad()
        gn.combine(losses).backward()
        gn.step()
        if sanitize:
            flags.append(bool(zero_nonfinite_grads_(params)))
        opt.step()
    return flags, gn, [p.detach().clone() for p in params]


def test_plain_loop_with_an_empty_mask_loses_nothing() -> None:
    """The README's loop with a masked mean over an empty mask: the absent task's ``0 * inf``
    backward is cut off before it meets the other task's gradient, so the run equals the same
    run written with ``err[mask].mean()``, with nothing for ``zero_nonfinite_grads_`` to zero."""
    flags, gn, masked = _masked_loop("masked", sanitize=True)
    assert flags == [False] * 6
    _, gn_index, index = _masked_loop("index")
    for p, q in zip(masked, index):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6)
    assert all(torch.isfinite(p).all() for p in masked)
    assert gn.skipped.tolist() == gn_index.skipped.tolist() == [0.0, 3.0]
    torch.testing.assert_close(gn.weights, gn_index.weights, rtol=0, atol=1e-6)


class Diverging(FaultModule):
    """Every task present; on step 3 the model's gradients become infinite (a real divergence)."""

    def on_after_backward(self) -> None:
        if self.global_step == 3:
            next(self.parameters()).grad.fill_(float("inf"))


def test_a_divergence_is_counted_logged_and_warned_not_hidden() -> None:
    from lightning.pytorch.loggers import CSVLogger

    class Keys(Callback):
        def __init__(self) -> None:
            self.seen: list[float] = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):  # type: ignore[no-untyped-def]
            value = trainer.callback_metrics.get("gradnorm/nonfinite_grad_steps")
            if value is not None:
                self.seen.append(float(value))

    keys = Keys()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_trainer(8, [GradNormCallback(optimizer="sgd"), keys], log_every_n_steps=2,
                     logger=CSVLogger("/tmp/gradnorm-diverge")).fit(Diverging({}))
    assert keys.seen[-1] == 1.0
    assert sum("non-finite on 1 step" in str(w.message) for w in caught) == 1


# --------------------------------------------------------------------------- empty batches
class Sometimes(FaultModule):
    """Step 2 has no task at all, in the given form."""

    def __init__(self, form: str) -> None:
        super().__init__({})
        self.form = form

    def training_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
        if self.global_step != 2:
            return super().training_step(batch, batch_idx)
        x = torch.zeros(1, 4, dtype=torch.float64)
        if self.form == "missing":
            return self.combine_task_losses({})
        if self.form == "placeholders":
            return self.combine_task_losses({t: torch.tensor(float("nan"), dtype=torch.float64) for t in TASKS})
        z = self.net.rep(x)  # empty masks: NaN with a graph
        mask = torch.zeros(1, dtype=torch.float64)
        return self.combine_task_losses({
            t: (self.net.heads[t](z).squeeze(1) * mask).sum() / mask.sum() for t in TASKS
        })


class Snapshots(Callback):
    def __init__(self) -> None:
        self.params: list[torch.Tensor] = []
        self.weights: list[torch.Tensor] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):  # type: ignore[no-untyped-def]
        self.params.append(torch.cat([p.detach().flatten() for p in pl_module.parameters()]).clone())
        cb = next(c for c in trainer.callbacks if isinstance(c, GradNormCallback))
        self.weights.append(cb.balancer.weights.clone())


@pytest.mark.parametrize("form", ["missing", "placeholders", "empty-masks"])
def test_a_batch_without_any_task_is_skipped_not_a_crash(form: str) -> None:
    snaps = Snapshots()
    cb = GradNormCallback(optimizer="sgd")
    make_trainer(5, [cb, snaps]).fit(Sometimes(form))
    assert len(snaps.params) == 5  # trained on past the empty batch
    assert torch.equal(snaps.params[2], snaps.params[1])  # no model update from it
    assert torch.equal(snaps.weights[2], snaps.weights[1])  # no weight update
    assert not torch.equal(snaps.params[3], snaps.params[2])  # training resumed
    assert float(cb.balancer.empty_steps) == 1
    assert cb.balancer.skipped.tolist() == [1.0, 1.0, 1.0]
    assert "gradnorm/empty_steps" in cb.metrics(cb.balancer)
    assert all(torch.isfinite(p).all() for p in snaps.params)


def test_a_batch_without_any_task_in_a_plain_loop() -> None:
    torch.manual_seed(0)
    layer, head = nn.Linear(3, 3), nn.Linear(3, 2)
    opt = torch.optim.Adam([*layer.parameters(), *head.parameters()], lr=0.1)
    gn = GradNorm(layer, task_names=["a", "b"])
    before = [p.detach().clone() for p in (*layer.parameters(), *head.parameters())]
    opt.zero_grad()
    loss = gn.combine({"a": None, "b": torch.tensor(float("nan"))})
    loss.backward()  # no crash: a zero that reaches no parameter
    gn.step()
    opt.step()
    assert all(torch.equal(a, p) for a, p in zip(before, (*layer.parameters(), *head.parameters())))
    assert float(gn.empty_steps) == 1 and float(gn.num_updates) == 0


def test_a_batch_without_any_task_under_fp16_amp_trains_on() -> None:
    """The GradScaler refuses a step without any gradient: the empty loss then gives zero ones."""
    from lightning.pytorch.plugins.precision import MixedPrecision

    snaps = Snapshots()
    cb = GradNormCallback(optimizer="sgd")
    plugin = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=2.0**8))
    make_trainer(5, [cb, snaps], plugins=[plugin]).fit(Sometimes("placeholders"))
    assert len(snaps.params) == 5
    assert torch.equal(snaps.params[2], snaps.params[1])  # zero gradients, plain SGD: unchanged
    assert torch.equal(snaps.weights[2], snaps.weights[1])
    assert float(cb.balancer.empty_steps) == 1
