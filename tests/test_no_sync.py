"""Issue 6: the balancer's update path reads no tensor value on the host.

``Tensor.item``, ``Tensor.__bool__``, ``Tensor.tolist`` and ``Tensor.__float__`` are patched to
record and raise while ``combine`` + backward + ``step`` run (the first steps included, where
``L(0)`` is measured), on every path: the default one (Linear shared layer), ``task_views``,
``mode="representation"``, ``mode="autograd"``, a non-Linear shared layer, absent tasks (NaN,
Inf, missing), all tasks non-finite, Adam with learning-rate decay; and through the Lightning
callback on steps where nothing is logged. On CPU a host read costs nothing, so the only way to
see one is to forbid it. (On the CPU the capture reads some values on the host on purpose: the
device is the host there. The guard switches that off, so that the path a GPU runs is the one
checked. The weight update is the same torch code on every device.)
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from contextlib import AbstractContextManager, ExitStack, contextmanager, nullcontext
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from helpers.fault_models import FaultModule, make_trainer, random_faults

from gradnorm_lightning import GradNorm, GradNormCallback, _arrays

SYNCS = ("item", "__bool__", "tolist", "__float__")


class HostSync(AssertionError):
    pass


@contextmanager
def no_host_sync(calls: list[str]):
    """Forbid host reads of tensor values; every attempt is recorded in ``calls`` and raises."""

    def forbid(name):
        def method(self, *args, **kwargs):
            calls.append(name)
            raise HostSync(f"host synchronisation: Tensor.{name} called on {tuple(self.shape)}")

        return method

    with ExitStack() as stack:
        stack.enter_context(mock.patch.object(_arrays, "host_reads_free", lambda device: False))
        for name in SYNCS:
            stack.enter_context(mock.patch.object(torch.Tensor, name, forbid(name)))
        yield


def test_the_guard_catches_host_reads():
    calls: list[str] = []
    t = torch.ones(2)
    with no_host_sync(calls):
        for read in (lambda: t[0].item(), lambda: bool(t[0]), lambda: t.tolist(), lambda: float(t[0])):
            with pytest.raises(HostSync):
                read()
        assert not _arrays.host_reads_free(t.device)  # the device path is the one checked
    assert calls == list(SYNCS)
    assert t.tolist() == [1.0, 1.0]  # restored
    assert _arrays.host_reads_free(t.device)


class Model(nn.Module):
    def __init__(self, shared: str = "linear") -> None:
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Linear(4, 6)
        if shared == "conv":
            self.shared = nn.Conv1d(1, 2, kernel_size=3, padding=1)  # the convolution rule
        else:
            self.shared = nn.Linear(6, 6)
        self.norm = nn.LayerNorm(6)  # ("linear-ln": a shared part that is not elementwise)
        self.kind = shared
        self.heads = nn.ModuleList([nn.Linear(12 if shared == "conv" else 6, 1) for _ in range(3)])

    def rep(self, x):
        h = torch.tanh(self.inp(x))
        if self.kind == "conv":
            return torch.tanh(self.shared(h.unsqueeze(1))).flatten(1)
        if self.kind == "linear-ln":
            return torch.tanh(self.norm(self.shared(h)))
        return torch.tanh(self.shared(h))


FAULTS = [
    {},
    {1: "nan"},
    {0: "missing", 2: "inf"},
    {0: "nan", 1: "inf", 2: "nan"},  # all tasks non-finite: the update is skipped
    {2: "missing"},
    {},
]


def run_faults(gn: GradNorm, model: Model, views: bool, calls: list[str], device: str = "cpu",
         guard: Callable[[], AbstractContextManager[Any]] = nullcontext):
    """The faulty training run, every step inside :func:`no_host_sync` and ``guard()``."""
    steps = len(FAULTS)
    gen = torch.Generator().manual_seed(1)
    batches = [(torch.randn(8, 4, generator=gen).to(device), torch.randn(8, 3, generator=gen).to(device))
               for _ in range(steps)]
    params = list(model.parameters())
    with no_host_sync(calls), guard():
        for (x, y), faults in zip(batches, FAULTS):
            z = model.rep(x)
            reps = gn.task_views(z) if views else (z,) * 3
            losses: list[torch.Tensor | None] = []
            for i, head in enumerate(model.heads):
                loss = nn.functional.mse_loss(head(reps[i]).squeeze(1), y[:, i])
                kind = faults.get(i)
                if kind == "missing":
                    losses.append(None)
                    continue
                if kind == "nan":
                    loss = loss + math.nan
                elif kind == "inf":
                    loss = loss + math.inf
                losses.append(loss)
            for p in params:
                p.grad = None
            gn.combine(losses).backward()
            gn.step()
            with torch.no_grad():  # the model's SGD step, without torch.optim's bookkeeping
                for p in params:
                    if p.grad is not None:  # a missing task's head has none
                        p -= 0.05 * p.grad


CASES = {
    "default": (dict(), False, "linear"),
    "task_views": (dict(), True, "linear"),
    "representation": (dict(mode="representation"), False, "linear"),
    "representation+views": (dict(mode="representation"), True, "linear"),
    "autograd": (dict(mode="autograd"), False, "linear"),
    "autograd+views": (dict(mode="autograd"), True, "linear"),
    "conv-vjp": (dict(), False, "conv"),
    "conv-vjp+views": (dict(), True, "conv"),
    "adam-lr-decay": (dict(optimizer="adam", lr_decay_rate=0.5, lr_decay_steps=2), False, "linear"),
    "adam-staircase+views": (
        dict(optimizer="adam", lr_decay_rate=0.5, lr_decay_steps=2, lr_staircase=True, initial_loss_steps=2),
        True,
        "linear",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_update_path_has_no_host_sync(case):
    kwargs, views, shared = CASES[case]
    model = Model(shared)
    gn = GradNorm(model.shared, 3, alpha=1.0, lr=0.1, **kwargs)
    calls: list[str] = []
    run_faults(gn, model, views, calls)
    assert calls == []
    # the path really ran: the weights moved, stayed valid; absent tasks were counted
    assert not torch.allclose(gn.weights, torch.ones(3))
    assert torch.isfinite(gn.weights).all()
    assert float(gn.weights.sum()) == pytest.approx(3.0, abs=1e-5)
    assert gn.skipped.tolist() == [2.0, 2.0, 3.0]
    assert float(gn.skipped_updates) == 1.0
    assert float(gn.num_updates) == len(FAULTS) - 1


PER_TASK_CASES = {
    "shared-part": (False, "linear-ln"),
    "shared-part+views": (True, "linear-ln"),
    "conv": (False, "conv"),
    "conv+views": (True, "conv"),
}


@pytest.mark.parametrize("case", list(PER_TASK_CASES))
def test_per_task_paths_have_no_host_sync(case, monkeypatch):
    """The paths taken for large tensors (one ``autograd.grad`` per task across a shared part
    that is not elementwise, one ``convolution_backward`` per task), forced on small ones."""
    from gradnorm_lightning.capture import norms

    views, shared = PER_TASK_CASES[case]
    monkeypatch.setattr(norms, "LOOP_NUMEL", 0)
    monkeypatch.setattr(norms, "_LOOP_MACS", 0)
    monkeypatch.setattr(torch.func, "vmap", lambda *a, **k: pytest.fail("vmap with the per-task paths forced"))
    per_task: list[int] = []
    grad = torch.autograd.grad

    def counting_grad(*args, **kwargs):
        assert not kwargs.get("is_grads_batched"), "a batched VJP with the per-task paths forced"
        per_task.append(1)
        return grad(*args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", counting_grad)
    model = Model(shared)
    gn = GradNorm(model.shared, 3, alpha=1.0, lr=0.1)
    calls: list[str] = []
    run_faults(gn, model, views, calls)
    assert calls == []
    assert per_task  # (both shared parts cross by VJPs: a LayerNorm, a flatten after the tanh)
    assert not torch.allclose(gn.weights, torch.ones(3))
    assert gn.skipped.tolist() == [2.0, 2.0, 3.0]


class NoSyncWindow(Callback):
    """Forbids host reads from the start to the end of every training batch that does not log."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.guarded = 0
        self._stack: ExitStack | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer._logger_connector.should_update_logs:
            return
        self.guarded += 1
        self._stack = ExitStack()
        self._stack.enter_context(no_host_sync(self.calls))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self._stack is not None:
            self._stack.close()
            self._stack = None


@pytest.mark.parametrize(
    "kwargs",
    [dict(), dict(mode="representation"), dict(optimizer="adam", lr_decay_rate=0.9, lr_decay_steps=3)],
    ids=["default", "representation", "adam-lr-decay"],
)
def test_callback_step_has_no_host_sync_when_not_logging(kwargs):
    faults = random_faults(7, 8, ("nan", "inf", "drop", "nan_mul"), rate=0.4)
    guard = NoSyncWindow()
    cb = GradNormCallback(alpha=1.0, lr=0.05, **kwargs)
    trainer = make_trainer(8, [cb, guard], log_every_n_steps=5)
    trainer.fit(FaultModule(faults))
    assert guard.calls == []
    assert guard.guarded >= 6  # steps 0-3 and 5-7 (step 4 logs)
    assert torch.isfinite(cb.balancer.weights).all()
    assert not torch.allclose(cb.balancer.weights, torch.ones(3, dtype=torch.float64))
