"""The CPU update on NumPy views equals the device (torch) update, state for state.

On the CPU the built-in strategies run their ``(T,)`` update on NumPy views of the state (the
device is the host there, and NumPy's small-array calls cost a fraction of torch's). The math
is written once, against :mod:`gradnorm_lightning._arrays`; these tests drive both paths with
the same generated statistics (scales from 1e-6 to 1e6, absent tasks, a step without any task,
non-finite norms, skipped GradScaler steps) and compare every state tensor and every logged
statistic after every step.
"""

from __future__ import annotations

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
        losses = (torch.rand(T, generator=gen, dtype=torch.float64) + 0.05) * scales.sqrt()
        losses = torch.where(present, losses, 0.0)
        stats.append(Statistics(norms.to(dtype), losses.to(dtype), present, "heads"))
        found.append(torch.tensor(1.0 if step == 5 else 0.0) if step % 2 else None)
    return stats, found


STRATEGIES = [
    ("gradnorm-sgd", lambda layer, rec: GradNorm(layer, num_tasks=T, optimizer="sgd", lr=0.05, recorder=rec)),
    ("gradnorm-adam", lambda layer, rec: GradNorm(layer, num_tasks=T, recorder=rec)),
    ("gradnorm-log-decay", lambda layer, rec: GradNorm(
        layer, num_tasks=T, weight_space="log", lr=0.1, lr_decay_rate=0.5, lr_decay_steps=4,
        lr_staircase=True, recorder=rec)),
    ("gradnorm-fixed-L0", lambda layer, rec: GradNorm(
        layer, num_tasks=T, alpha=0.0, initial_losses={"task1": 0.7, "task3": 2.0}, initial_loss_steps=3,
        recorder=rec)),
    ("equal", lambda layer, rec: EqualWeighting(layer, num_tasks=T, recorder=rec)),
    ("uncertainty", lambda layer, rec: UncertaintyWeighting(layer, num_tasks=T, recorder=rec)),
]


def _record(balancer: Balancer) -> dict[str, Any]:
    record = {name: getattr(balancer, name).clone() for name in balancer._state_names}
    record.update({f"stats/{k}": v for k, v in balancer.last_stats.items() if k != "route"})
    return record


def _lockstep(make: Any, dtype: torch.dtype, seed: int) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """Every step from the same state on both paths: (host record, device record) per step.

    (In float32 the host path computes in Python doubles: over many steps the two trajectories
    may part where a ``sign(G_i - target_i)`` is a tie to rounding, so each step starts from
    the device path's state.)
    """
    stats, found = _script(seed, dtype)
    host = make(nn.Linear(2, 2).to(dtype), ScriptedRecorder(stats))  # its dtype is the layer's
    device = make(nn.Linear(2, 2).to(dtype), ScriptedRecorder(stats))
    assert host.dtype == device.dtype == dtype
    trace = []
    for f in found:
        host.load_state_dict(device.state_dict())
        with mock.patch.object(Balancer, "updates_on_host", lambda self: True):
            host.step(found_inf=f)
        with mock.patch.object(Balancer, "updates_on_host", lambda self: False):
            device.step(found_inf=f)
        trace.append((_record(host), _record(device)))
    return trace


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("name", [name for name, _ in STRATEGIES])
def test_host_update_equals_the_device_update(name: str, seed: int, dtype: torch.dtype) -> None:
    make = dict(STRATEGIES)[name]
    # float32: the device rounds every operation to float32, the host only its results
    rtol, atol = (1e-5, 1e-6) if dtype == torch.float32 else (1e-12, 1e-15)
    applied = 0
    trace = _lockstep(make, dtype, seed)
    for step, (h, d) in enumerate(trace):
        assert h.keys() == d.keys()
        applied += int(d["stats/applied"])
        for key in h:
            assert h[key].dtype == d[key].dtype and h[key].shape == d[key].shape, (name, step, key)
            torch.testing.assert_close(h[key], d[key], rtol=rtol, atol=atol, equal_nan=True,
                                       msg=lambda m, k=key, s=step: f"{name} step {s} {k}: {m}")
    assert 10 <= applied < len(trace)  # the script applies most updates and skips some


def test_cpu_balancers_update_on_the_host_and_others_on_the_device() -> None:
    assert GradNorm(nn.Linear(2, 2), num_tasks=2).updates_on_host()
    assert EqualWeighting(nn.Linear(2, 2), num_tasks=2).updates_on_host()
    # a strategy that does not declare it (as a user's own) keeps the torch path
    assert not DynamicWeightAverage(nn.Linear(2, 2), num_tasks=2).updates_on_host()

    class Custom(Balancer):
        def propose(self, inputs):  # type: ignore[no-untyped-def]
            raise NotImplementedError

    assert not Custom(nn.Linear(2, 2), num_tasks=2).updates_on_host()


def test_host_update_keeps_tensors_dtypes_and_the_model_loss_graph() -> None:
    """After host steps the state is still tensors of the balancer's dtype, and ``combine`` works."""
    for dtype in (torch.float32, torch.float64):
        layer = nn.Linear(3, 3).to(dtype)
        gn = GradNorm(layer, num_tasks=2)
        for _ in range(3):
            z = layer(torch.randn(4, 3, dtype=dtype))
            gn.combine([z[:, 0].pow(2).mean(), z[:, 1].pow(2).mean()]).backward()
            gn.step()
        for name in gn._state_names:
            value = getattr(gn, name)
            assert isinstance(value, torch.Tensor) and value.dtype == dtype, (name, value)
        assert gn.last_stats["applied"].dtype == torch.bool
        assert gn.last_stats["present"].dtype == torch.bool
        assert torch.isclose(gn.weights.sum(), torch.tensor(2.0, dtype=dtype))


@pytest.mark.parametrize("name", [name for name, _ in STRATEGIES])
def test_the_host_path_runs_on_ordinary_steps(name: str) -> None:
    """Only a step where Python arithmetic would raise (here: the step without any task, whose
    renormalisation divides by zero) is redone on the device path."""
    from gradnorm_lightning._arrays import TORCH

    kinds: list[bool] = []
    stats, found = _script(0, torch.float32)
    balancer = dict(STRATEGIES)[name](nn.Linear(2, 2), ScriptedRecorder(stats))
    original = type(balancer)._update  # (GradNorm's own: its fused host kernel, else the generic one)

    def spy(self: Balancer, stats: Statistics, found: Any, xp: Any) -> None:
        kinds.append(xp is TORCH)
        original(self, stats, found, xp)

    with mock.patch.object(type(balancer), "_update", spy):
        for f in found:
            balancer.step(found_inf=f)
    fallbacks = sum(kinds)
    assert len(kinds) - fallbacks == len(found)  # one host attempt per step
    assert fallbacks <= 1, kinds


def test_host_update_sees_state_written_in_place_or_replaced() -> None:
    """The host path remembers the values it wrote; an in-place write or a replaced tensor between
    steps must be read anyway (against the device path fed the same edits)."""
    stats, found = _script(3, torch.float32)
    runs = []
    for host in (True, False):
        gn = GradNorm(nn.Linear(2, 2), num_tasks=T, recorder=ScriptedRecorder(stats))
        with mock.patch.object(Balancer, "updates_on_host", (lambda self: True) if host else (lambda self: False)):
            for step, f in enumerate(found):
                gn.step(found_inf=f)
                if step == 3:
                    gn.exp_avg.mul_(0.5)  # in place
                    gn.weights[0] += 0.25  # in place, through an index
                if step == 6:
                    gn.exp_avg_sq = gn.exp_avg_sq * 2.0  # replaced
        runs.append({name: getattr(gn, name) for name in gn._state_names})
    for name in runs[0]:
        torch.testing.assert_close(runs[0][name], runs[1][name], rtol=1e-4, atol=1e-6, msg=name)


GRADNORM_STRATEGIES = [name for name, _ in STRATEGIES if name.startswith("gradnorm")]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("name", GRADNORM_STRATEGIES)
def test_gradnorm_host_kernel_equals_the_generic_host_path_exactly(name: str, seed: int, dtype: torch.dtype) -> None:
    """GradNorm's fused host kernel does the generic host path's operations in its order: the same
    numbers to the last bit, state for state and statistic for statistic, step after step."""
    make = dict(STRATEGIES)[name]
    stats, found = _script(seed, dtype)
    fused = make(nn.Linear(2, 2).to(dtype), ScriptedRecorder(stats))
    generic = make(nn.Linear(2, 2).to(dtype), ScriptedRecorder(stats))
    ran = 0
    kernel = GradNorm._host_kernel

    def counted(self: GradNorm, *args: Any) -> None:
        nonlocal ran
        kernel(self, *args)
        ran += 1

    for step, f in enumerate(found):
        with mock.patch.object(Balancer, "updates_on_host", lambda self: True):
            with mock.patch.object(GradNorm, "_host_kernel", counted):
                fused.step(found_inf=f)
            with mock.patch.object(GradNorm, "_host_kernel", side_effect=ArithmeticError):
                generic.step(found_inf=f)
        a, b = _record(fused), _record(generic)
        assert a.keys() == b.keys()
        for key in a:
            assert a[key].dtype == b[key].dtype, (step, key)
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, equal_nan=True,
                                       msg=lambda m, k=key, s=step: f"{name} step {s} {k}: {m}")
    assert ran >= len(found) - 1  # the kernel ran on every step but the one Python cannot do


def test_a_gradnorm_subclass_with_its_own_rule_keeps_it_on_the_host() -> None:
    """The fused kernel is GradNorm's own rule: a subclass that overrides ``propose`` is not bypassed."""
    seen: list[str] = []

    class Halved(GradNorm):
        def propose(self, inputs: Any) -> Any:
            seen.append(inputs.ops.name)
            proposal = super().propose(inputs)
            return proposal._replace(weights=proposal.weights * 0.5 + inputs.weights * 0.5)

    stats, found = _script(1, torch.float64, steps=4)
    halved = Halved(nn.Linear(2, 2).double(), num_tasks=T, recorder=ScriptedRecorder(list(stats)))
    plain = GradNorm(nn.Linear(2, 2).double(), num_tasks=T, recorder=ScriptedRecorder(list(stats)))
    for f in found:
        halved.step(found_inf=f)
        plain.step(found_inf=f)
    assert seen and set(seen) == {"python"}  # its rule ran, on the host path
    assert not torch.equal(halved.weights, plain.weights)
