"""The partial-labels model (:mod:`partial_labels`) as a Lightning module, for single-process and
``ddp_spawn`` fits. Importable by spawned processes."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from gradnorm_lightning import GradNormCallback, GradNormMixin

from .dist_plain import _Listed
from .partial_labels import TASKS, PartialNet


class PartialModule(GradNormMixin, L.LightningModule):
    """Rank ``r`` of ``world`` trains on every ``world``-th micro-batch of ``micro``."""

    task_names = TASKS

    def __init__(self, micro: Sequence[tuple[Tensor, Tensor, Tensor]], form: str, views: bool = False) -> None:
        super().__init__()
        self.micro = list(micro)
        self.form = form
        self.views = views
        self.net = PartialNet()

    def shared_layer(self) -> nn.Module:
        return self.net.shared

    def train_dataloader(self) -> DataLoader:
        world, rank = self.trainer.world_size, self.trainer.global_rank
        return DataLoader(_Listed(self.micro[rank::world]), batch_size=None, shuffle=False)

    def training_step(self, batch: tuple[Tensor, Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y, m = batch
        losses = self.net.task_losses(x, y, m, self.form, self._views if self.views else None)
        return self.combine_task_losses(losses)

    def _views(self, z: Tensor) -> list[Tensor]:
        views = self.task_views(z)
        return [views[t] for t in TASKS]

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=0.01)


class WeightLog(L.Callback):
    """The weights after every update; with ``out`` the run is saved there at the end of fit."""

    def __init__(self, out: str | None = None) -> None:
        self.out = out
        self.weights: list[Tensor] = []

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        cb = next(c for c in trainer.callbacks if isinstance(c, GradNormCallback))
        if cb.balancer is not None and len(self.weights) < cb.balancer.steps:  # one per update
            self.weights.append(cb.balancer.weights.detach().clone())

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.out is not None:
            torch.save({"weights": torch.stack(self.weights),
                        "params": [p.detach().clone() for p in pl_module.parameters()]},
                       Path(self.out) / f"rank{trainer.global_rank}.pt")
