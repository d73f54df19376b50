"""Tiny Lightning modules shared by the callback tests."""

from __future__ import annotations

from collections.abc import Sequence

import lightning as L
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from gradnorm_lightning import GradNormMixin
from tests.textbook import make_batches, make_multitask


class MultiTaskNet(GradNormMixin, L.LightningModule):
    """The :func:`tests.textbook.make_multitask` network as a LightningModule."""

    def __init__(self, num_tasks: int = 3, bias: bool = True, dtype: torch.dtype = torch.float64,
                 lr: float = 0.05, views: bool = False, declare: bool = False, **dims: int) -> None:
        super().__init__()
        self.trunk, self.heads = make_multitask(0, num_tasks, bias, dtype, **dims)
        self.names = [f"t{i}" for i in range(num_tasks)]
        if declare or views:
            self.task_names = tuple(self.names)
        self.lr = lr
        self.views = views

    def shared_layer(self) -> nn.Module:
        return self.trunk[2]

    def task_loss_dict(self, batch: Sequence[Tensor]) -> dict[str, Tensor]:
        x, y = batch
        z = self.trunk(x)
        zs = list(self.task_views(z).values()) if self.views else [z] * len(self.heads)
        return {n: nn.functional.mse_loss(h(zz), y[:, i]) for i, (n, h, zz) in enumerate(zip(self.names, self.heads, zs))}

    def training_step(self, batch: Sequence[Tensor], batch_idx: int) -> Tensor:
        return self.combine_task_losses(self.task_loss_dict(batch))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def loader(num_tasks: int, steps: int, batch: int = 10, dtype: torch.dtype = torch.float64, **dims: int) -> DataLoader:
    """The :func:`tests.textbook.make_batches` data, in order, one batch per step."""
    batches = make_batches(num_tasks, steps, batch=batch, dtype=dtype, **dims)
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    return DataLoader(TensorDataset(x, y), batch_size=batch, shuffle=False)


def trainer(max_steps: int, **kw: object) -> L.Trainer:
    """A quiet CPU trainer."""
    defaults: dict[str, object] = dict(
        accelerator="cpu", devices=1, max_steps=max_steps, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
    )
    defaults.update(kw)
    return L.Trainer(**defaults)  # type: ignore[arg-type]
