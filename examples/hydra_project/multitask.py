"""The project's own model and data: a ``GradNormMixin`` LightningModule and a DataLoader.

Nothing here knows about Hydra or about GradNorm's settings: ``conf/`` wires them together,
and ``GradNormCallback`` is added purely by configuration (``conf/callbacks/gradnorm.yaml``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import lightning as L
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from gradnorm_lightning import GradNormMixin


class MultiTaskNet(GradNormMixin, L.LightningModule):
    """An MLP trunk and one linear head per task; one MSE loss per task.

    Args:
        tasks: the task names, in weight order (declared so GradNorm knows them up front).
        in_features: input width.
        hidden: trunk width.
        optimizer: a partial optimizer (Hydra ``_partial_: true``) called with the parameters.
    """

    def __init__(
        self,
        tasks: Sequence[str],
        in_features: int,
        hidden: int,
        optimizer: Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer],
    ) -> None:
        super().__init__()
        self.task_names = tuple(tasks)
        self.optimizer_factory = optimizer
        self.trunk = nn.Sequential(
            nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU()
        )
        self.heads = nn.ModuleDict({name: nn.Linear(hidden, 1) for name in self.task_names})

    def shared_layer(self) -> nn.Module:
        return self.trunk[2]  # the last shared layer

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        z = self.trunk(x)
        losses = {
            name: nn.functional.mse_loss(head(z).squeeze(1), y[:, i])
            for i, (name, head) in enumerate(self.heads.items())
        }
        self.log_dict({f"loss/{name}": loss.detach() for name, loss in losses.items()})
        return self.combine_task_losses(losses)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return self.optimizer_factory(self.parameters())


def make_dataloader(
    scales: Sequence[float], in_features: int, num_samples: int, batch_size: int, seed: int
) -> DataLoader:
    """Synthetic regression data: target ``i`` is ``scales[i] * tanh(x @ a_i)`` plus noise."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(num_samples, in_features, generator=generator)
    directions = torch.randn(in_features, len(scales), generator=generator) / in_features**0.5
    s = torch.tensor(list(scales), dtype=torch.float32)
    y = s * torch.tanh(x @ directions) + 0.05 * s * torch.randn(num_samples, len(scales), generator=generator)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=True)
