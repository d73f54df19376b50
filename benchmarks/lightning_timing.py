"""The Lightning section: the workload's model trained by a ``Trainer``, with and without GradNorm.

Short fits of a plain summed-loss ``LightningModule`` and of a ``GradNormMixin`` module
with ``GradNormCallback`` are alternated, interleaved with blocks of the plain-PyTorch
loops; each step is timed from ``on_train_batch_start`` (a callback placed first) to
``on_train_batch_end`` (a callback placed last).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from benchmarks.measure import Series, time_interleaved
from benchmarks.methods import Method, PlainSum, ProjectGradNorm, gradnorm_settings
from benchmarks.workloads import Batch, Workload, build_model


class StepTimer:
    """Shared record of per-step times, fed by a start and an end callback."""

    def __init__(self) -> None:
        self.t0 = 0.0
        self.c0 = 0.0
        self.times = Series()
        self.threads: set[int] = set()


def timer_callbacks(timer: StepTimer) -> tuple[Any, Any]:
    """A callback to put first (records the start) and one to put last (records the end)."""
    import lightning as L

    class Start(L.Callback):
        def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
            timer.threads.add(torch.get_num_threads())
            timer.t0, timer.c0 = time.perf_counter(), time.thread_time()

    class End(L.Callback):
        def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            c1, t1 = time.thread_time(), time.perf_counter()
            timer.times.add(t1 - timer.t0, c1 - timer.c0)

    return Start(), End()


def lightning_modules(wl: Workload) -> tuple[Any, Any]:
    """(plain summed-loss LightningModule, GradNormMixin LightningModule) on the workload's model."""
    import lightning as L

    from gradnorm_lightning import GradNormMixin

    names = tuple(f"task{i}" for i in range(wl.num_tasks))

    class LitPlain(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = build_model(wl)

        def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
            x, ys = batch
            return torch.stack(self.net.task_losses(self.net(x), ys)).sum()

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=wl.model_lr)

    class LitGradNorm(GradNormMixin, L.LightningModule):
        task_names = names

        def __init__(self) -> None:
            super().__init__()
            self.net = build_model(wl)

        def shared_layer(self) -> nn.Module:
            return self.net.shared_layer

        def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
            x, ys = batch
            losses = self.net.task_losses(self.net(x), ys)
            return self.combine_task_losses(dict(zip(names, losses, strict=True)))

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=wl.model_lr)

    return LitPlain(), LitGradNorm()


def fit(module: Any, batches: Sequence[Batch], steps: int, extra: Sequence[Any], timer: StepTimer | None,
        accelerator: str = "cpu", precision: Any = "32-true") -> Any:
    """``steps`` training steps of ``module`` on ``batches`` with the timer's callbacks (if any)
    around ``extra``; returns the ``Trainer``."""
    import lightning as L
    from torch.utils.data import DataLoader

    callbacks = list(extra)
    if timer is not None:
        start, end = timer_callbacks(timer)
        callbacks = [start, *callbacks, end]
    trainer = L.Trainer(
        accelerator=accelerator, devices=1, max_steps=steps, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks, precision=precision,
    )
    data: Any = list(batches)  # a list is a map-style dataset
    trainer.fit(module, DataLoader(data, batch_size=None, shuffle=False))
    return trainer


@dataclasses.dataclass
class LightningResult:
    """Step times of the Lightning section."""

    plain_loop: Series
    balancer_loop: Series
    balancer_loop_sanitize: Series
    lightning_plain: Series
    lightning_gradnorm: Series
    lightning_gradnorm_nosanitize: Series


def time_lightning(wl: Workload, batches: Sequence[Batch], steps: int, per_fit: int = 10,
                   drop: int = 2) -> LightningResult:
    """Alternate short fits with and without ``GradNormCallback`` with blocks of the plain loops.

    Every round: a fit of ``per_fit`` steps of the plain summed-loss module; the same for
    the GradNormMixin module with ``GradNormCallback`` (this benchmark's explicit settings,
    :func:`~benchmarks.methods.gradnorm_settings`) and with ``sanitize_grads=False`` on top;
    then ``per_fit`` interleaved steps of the plain PyTorch summed-loss loop and of the
    plain-PyTorch balancer (default path), without and with ``zero_nonfinite_grads_`` (what
    ``sanitize_grads=True`` does in the callback). The first ``drop`` steps of every fit are
    discarded (Trainer start-up). Rounds continue until every series has ``steps`` samples.
    """
    import logging

    from gradnorm_lightning import GradNormCallback

    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    lit_plain, lit_gn = lightning_modules(wl)
    _, lit_gn2 = lightning_modules(wl)
    kwargs = gradnorm_settings(wl)
    # One callback instance per module for all its fits: a fresh one per fit would leave the
    # previous balancer's forward hook on the shared layer.
    runs = [(lit_plain, []), (lit_gn, [GradNormCallback(**kwargs, log=True, sanitize_grads=True)]),
            (lit_gn2, [GradNormCallback(**kwargs, log=True, sanitize_grads=False)])]
    timers = [StepTimer() for _ in runs]
    loops: list[Method] = [PlainSum(wl, build_model(wl)),
                           ProjectGradNorm(wl, build_model(wl), name="balancer"),
                           ProjectGradNorm(wl, build_model(wl), name="balancer+sanitize", sanitize=True)]
    loop_times = [Series(), Series(), Series()]
    rounds = 0
    while min(*(len(t.times) for t in timers), len(loop_times[0])) < steps:
        for (module, callbacks), timer in zip(runs, timers, strict=True):
            n = len(timer.times)
            fit(module, batches, per_fit, callbacks, timer)
            timer.times.drop(n, drop)
        block = time_interleaved(loops, batches, per_fit - drop, warmup=0 if rounds else drop)
        for acc, series in zip(loop_times, block, strict=True):
            acc.extend(series)
        rounds += 1
    return LightningResult(loop_times[0], loop_times[1], loop_times[2], *(t.times for t in timers))
