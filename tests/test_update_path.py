"""The one update path: what it caches once per fit changes no number.

The balancers commit their state as stacked tensors whose views the next step reuses, and stop
measuring ``L(0)`` once every task's is known. A balancer that forgets both before every step
(it restacks its state and measures ``L(0)`` on every step) is the reference: fed the same
scripted statistics (scales from 1e-6 to 1e6, absent tasks, a step without any task,
non-finite norms, skipped GradScaler steps) and the same edits of its state between steps
(in place, and by replacing a tensor), both must hold the same state, bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from unittest import mock

import pytest
import torch
from torch import nn

from gradnorm_lightning import (
    Balancer,
    DynamicWeightAverage,
    EqualWeighting,
    GradNorm,
    UncertaintyWeighting,
    _arrays,
)
from gradnorm_lightning.capture.recorder import Statistics

T = 5


class ScriptedRecorder:
    """Hands the balancer a fixed sequence of statistics (no model, no backward)."""

    mode = "auto"

    def __init__(self, stats: list[Statistics]) -> None:
        self.stats = list(stats)

    def collect(self, grad_scale: Any = None) -> Statistics | None:
        return self.stats.pop(0) if self.stats else None

    def attach(self) -> None:
        pass

    def detach(self) -> None:
        pass

    def reset(self) -> None:
        pass


def _script(seed: int, dtype: torch.dtype, steps: int = 25) -> tuple[list[Statistics], list[torch.Tensor | None]]:
    gen = torch.Generator().manual_seed(seed)
    scales = 10.0 ** (torch.rand(T, generator=gen, dtype=torch.float64) * 12 - 6)
    stats, found = [], []
    for step in range(steps):
        present = torch.rand(T, generator=gen) > 0.25
        if step == 7:
            present[:] = False  # a batch without any task
        norms = (torch.rand(T, generator=gen, dtype=torch.float64) + 0.1) * scales
        if step == 11:
            norms[int(torch.randint(T, (1,), generator=gen))] = float("nan")
        norms = torch.where(present, norms, 0.0)
        losses = (torch.rand(T, generator=gen, dtype=torch.float64) + 0.05) * scales.sqrt()
        losses = torch.where(present, losses, 0.0)
        stats.append(Statistics(norms.to(dtype), losses.to(dtype), present, "heads"))
        found.append(torch.tensor(1.0 if step == 5 else 0.0) if step % 2 else None)
    return stats, found


Make = Callable[[nn.Module, ScriptedRecorder], Balancer]
STRATEGIES: list[tuple[str, Make]] = [
    ("gradnorm-sgd", lambda layer, rec: GradNorm(layer, num_tasks=T, optimizer="sgd", lr=0.05, recorder=rec)),
    ("gradnorm-adam", lambda layer, rec: GradNorm(layer, num_tasks=T, recorder=rec)),
    ("gradnorm-log-decay", lambda layer, rec: GradNorm(
        layer, num_tasks=T, weight_space="log", lr=0.1, lr_decay_rate=0.5, lr_decay_steps=4,
        lr_staircase=True, recorder=rec)),
    ("gradnorm-fixed-L0-k3", lambda layer, rec: GradNorm(
        layer, num_tasks=T, alpha=0.0, initial_losses={"task1": 0.7, "task3": 2.0}, initial_loss_steps=3,
        recorder=rec)),
    ("equal", lambda layer, rec: EqualWeighting(layer, num_tasks=T, recorder=rec)),
    ("uncertainty", lambda layer, rec: UncertaintyWeighting(layer, num_tasks=T, recorder=rec)),
    ("dwa", lambda layer, rec: DynamicWeightAverage(layer, num_tasks=T, window=3, recorder=rec)),
]


def _record(balancer: Balancer) -> dict[str, torch.Tensor]:
    record = {name: getattr(balancer, name).clone() for name in balancer._state_names}
    record.update({f"stats/{k}": v.clone() for k, v in balancer.last_stats.items() if k != "route"})
    record["skipped_updates"] = balancer.skipped_updates
    return record


def _edit(balancer: Balancer, step: int) -> None:
    if step == 3:
        balancer.weights.mul_(1.0)  # in place, a no-op value-wise...
        balancer.weights[0] += 0.25  # ...and a real one, through an index
        balancer.num_updates.add_(2)
    if step == 9:
        balancer.skipped = balancer.skipped * 2.0  # replaced
        balancer.weights = balancer.weights.flip(0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("name", [name for name, _ in STRATEGIES])
def test_cached_state_and_known_l0_change_no_number(name: str, seed: int, dtype: torch.dtype) -> None:
    make = dict(STRATEGIES)[name]
    stats, found = _script(seed, dtype)
    cached = make(nn.Linear(2, 2).to(dtype), ScriptedRecorder(stats))
    fresh = make(nn.Linear(2, 2).to(dtype), ScriptedRecorder(stats))
    assert cached.dtype == fresh.dtype == dtype
    applied = 0
    for step, f in enumerate(found):
        fresh._forget_derived()  # restack the state and measure L(0) on every step
        cached.step(found_inf=f)
        fresh.step(found_inf=f)
        a, b = _record(cached), _record(fresh)
        assert a.keys() == b.keys()
        for key in a:
            assert a[key].dtype == b[key].dtype, (step, key)
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, equal_nan=True,
                                       msg=lambda m, k=key, s=step: f"{name} step {s} {k}: {m}")
        applied += int(a["stats/applied"])
        _edit(cached, step)
        _edit(fresh, step)
    assert 10 <= applied < len(found)  # the script applies most updates and skips some
    if not name.startswith("gradnorm-fixed"):  # (L(0) of tasks 0, 2, 4 still averaging there)
        assert cached._known_initial is not None  # the cache was really used


def test_l0_is_measured_until_every_task_has_a_positive_one() -> None:
    layer = nn.Linear(3, 3).double()
    gn = GradNorm(layer, num_tasks=2, optimizer="sgd")
    x = torch.randn(4, 3, dtype=torch.float64)
    first = None
    for step in range(3):
        z = layer(x)
        b_loss = z[:, 1].pow(2).mean() * (0.0 if step == 0 else 1.0)  # L_b(0) = 0 at the first step
        gn.combine([z[:, 0].pow(2).mean(), b_loss]).backward()
        gn.step()
        if step == 0:
            first = float(gn.current_initial_losses[0])
            assert gn._known_initial is None  # task b's L(0) is 0: measured again
    assert first is not None and gn._known_initial is not None
    assert float(gn._known_initial[0]) == first
    assert float(gn._known_initial[1]) > 0


def test_the_flag_is_not_read_where_reading_would_synchronise() -> None:
    flag = torch.tensor(True)
    assert _arrays.HostFlag(flag).value() is True
    with mock.patch.object(_arrays, "host_reads_free", lambda device: False):
        assert _arrays.HostFlag(flag).value() is None  # (a CPU tensor under the no-sync guard)


def test_a_checkpoint_that_counted_skipped_updates_still_loads() -> None:
    """``skipped_updates`` is derived (``steps - num_updates``); checkpoints carry it, and older ones
    stored it: both load, and the count is the one they held."""
    stats, found = _script(0, torch.float32)
    gn = GradNorm(nn.Linear(2, 2), num_tasks=T, recorder=ScriptedRecorder(stats))
    for f in found:
        gn.step(found_inf=f)
    state = gn.state_dict()
    assert float(state["skipped_updates"]) == gn.steps - float(gn.num_updates) > 0
    old = {k: v for k, v in state.items() if k not in ("zero_initial_loss_steps", "floor_steps", "jump_steps")}
    restored = GradNorm(nn.Linear(2, 2), num_tasks=T)
    restored.load_state_dict(old)
    assert float(restored.skipped_updates) == float(state["skipped_updates"])
    assert torch.equal(restored.weights, gn.weights) and float(restored.floor_steps) == 0
