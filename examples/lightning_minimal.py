"""The smallest Lightning set-up: ``GradNormMixin`` on the module, ``GradNormCallback`` on the Trainer.

What you learn here:

* the three things a ``LightningModule`` needs for GradNorm: mix in
  :class:`gradnorm_lightning.GradNormMixin` (first, before ``L.LightningModule``), declare
  ``task_names``, implement ``shared_layer()`` (the last layer every task goes through), and
  return ``self.combine_task_losses(losses)`` from ``training_step``;
* that the callback does the rest: it builds the balancer, updates the task weights once per
  optimizer step and logs ``gradnorm/weight/<task>``, ``gradnorm/grad_norm/<task>``,
  ``gradnorm/loss_ratio/<task>``, ``gradnorm/inverse_rate/<task>``, ``gradnorm/skipped/<task>``
  and ``gradnorm/loss`` to whatever logger the Trainer has (a CSV logger here);
* where to read the weights afterwards: ``model.task_weights``.

Three regression tasks whose targets differ in scale by 100x, on synthetic data made here.

Run::

    python examples/lightning_minimal.py --steps 100 --out runs/minimal
    # then look at runs/minimal/lightning_minimal/version_0/metrics.csv
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Sequence
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import CSVLogger
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from gradnorm_lightning import GradNormCallback, GradNormMixin


class MultiTaskRegressor(GradNormMixin, L.LightningModule):
    """An MLP trunk and one linear head per task."""

    # Declares every task up front, in weight order (needed if a task can be missing from the
    # first batch; always a good idea).
    task_names = ("depth", "height", "mass")

    def __init__(self, in_features: int = 8, hidden: int = 32, lr: float = 1e-3) -> None:
        super().__init__()
        self.lr = lr
        self.trunk = nn.Sequential(
            nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU()
        )
        self.heads = nn.ModuleDict({name: nn.Linear(hidden, 1) for name in self.task_names})

    def shared_layer(self) -> nn.Module:
        # The last shared layer: GradNorm's gradient norms run over ALL of its parameters.
        return self.trunk[2]

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        z = self.trunk(x)
        losses = {
            name: nn.functional.mse_loss(head(z).squeeze(1), y[:, i])
            for i, (name, head) in enumerate(self.heads.items())
        }
        self.log_dict({f"loss/{name}": loss for name, loss in losses.items()})
        return self.combine_task_losses(losses)  # sum_i w_i L_i with the current weights

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def make_data(num_samples: int = 512, seed: int = 0) -> TensorDataset:
    """Inputs and three targets ``y_i = s_i * tanh(x @ a_i)`` with scales ``s = 1, 10, 100``."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(num_samples, 8, generator=generator)
    directions = torch.randn(8, 3, generator=generator) / 8**0.5
    scales = torch.tensor([1.0, 10.0, 100.0])
    y = scales * torch.tanh(x @ directions) + 0.05 * scales * torch.randn(num_samples, 3, generator=generator)
    return TensorDataset(x, y)


def main(argv: Sequence[str] | None = None) -> dict[str, object]:
    """Train for ``--steps`` optimizer steps; return the final weights and the metrics file.

    Args:
        argv: command-line arguments (``None``: ``sys.argv[1:]``).

    Returns:
        ``weights`` (task name to final weight) and ``metrics_csv`` (the CSV logger's file).
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=50, help="optimizer steps (default: 50)")
    parser.add_argument("--out", type=Path, default=None, help="log folder (default: a new temp folder)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    out = args.out if args.out is not None else Path(tempfile.mkdtemp(prefix="gradnorm_minimal_"))

    L.seed_everything(args.seed, verbose=False)
    torch.set_num_threads(1)  # a tiny model: one thread is fastest

    model = MultiTaskRegressor()
    gradnorm = GradNormCallback(
        alpha=1.5,         # asymmetry: how hard tasks that train slower are pushed (paper: 0.12 to 1.5)
        lr=0.025,          # learning rate of the task weights' own optimizer
        optimizer="adam",  # Adam on the weights: the norms differ by 100x, SGD steps would jump
    )
    logger = CSVLogger(save_dir=out, name="lightning_minimal")
    trainer = L.Trainer(
        max_steps=args.steps,
        callbacks=[gradnorm],
        logger=logger,
        log_every_n_steps=1,  # gradnorm/* is logged on the Trainer's logging steps
        accelerator="cpu",
        devices=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, DataLoader(make_data(seed=args.seed), batch_size=32, shuffle=True))

    weights = {name: float(w) for name, w in model.task_weights.items()}
    metrics_csv = Path(logger.log_dir) / "metrics.csv"
    print(f"final task weights (sum {sum(weights.values()):.4f} = T): {weights}")
    print(f"metrics written to {metrics_csv}")
    return {"weights": weights, "metrics_csv": metrics_csv}


if __name__ == "__main__":
    main()
