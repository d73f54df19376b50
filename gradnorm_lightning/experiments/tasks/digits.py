"""Four heterogeneous tasks on scikit-learn's 8×8 handwritten digits (no download needed).

``sklearn.datasets.load_digits`` ships 1797 images with scikit-learn. From each image a
small conv net predicts:

* ``digit``: the 10-way class (cross-entropy; metric: accuracy);
* ``parity``: whether the digit is odd (binary cross-entropy on a logit; metric: accuracy);
* ``ink``: the image's standardised ink mass, i.e. mean pixel intensity (MSE; metric: MSE);
* ``recon``: the 64 pixels themselves, scaled to [0, 1] (MSE; metric: MSE).

The losses have different kinds and scales, which is what GradNorm balances.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import TensorDataset
from torchmetrics.classification import BinaryAccuracy, MulticlassAccuracy
from torchmetrics.regression import MeanSquaredError
from torchmetrics.wrappers import MultitaskWrapper

from gradnorm_lightning.experiments._extras import require
from gradnorm_lightning.experiments.tasks._base import (
    Batch,
    MultiTaskModule,
    OptimizerFactory,
    SchedulerFactory,
    SplitDataModule,
    TaskOutputs,
    _check_fraction,
    _check_positive_int,
)

__all__ = ["DIGITS_TASKS", "DigitsDataModule", "DigitsMultiTaskModel"]

DIGITS_TASKS: tuple[str, ...] = ("digit", "parity", "ink", "recon")


class DigitsDataModule(SplitDataModule):
    """scikit-learn digits split into train/val/test by a seeded permutation.

    Batches are ``(image, label, ink)``: ``image`` of shape ``(batch, 1, 8, 8)`` in [0, 1],
    ``label`` the digit (int64), ``ink`` the standardised ink mass (float, standardised with
    the training split's mean and std).

    Args:
        val_fraction: Fraction of the 1797 images held out for validation.
        test_fraction: Fraction held out for testing.
        batch_size: Batch size.
        seed: Seed of the split permutation.
        num_workers: DataLoader workers.

    Raises:
        TypeError: If ``batch_size`` is not an int.
        ValueError: If ``batch_size < 1``, a fraction is not in (0, 1) or they sum to >= 1.
    """

    def __init__(
        self,
        val_fraction: float = 0.1,
        test_fraction: float = 0.2,
        batch_size: int = 64,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__(batch_size=batch_size, seed=seed, num_workers=num_workers)
        self.val_fraction = _check_fraction("val_fraction", val_fraction)
        self.test_fraction = _check_fraction("test_fraction", test_fraction)
        if val_fraction + test_fraction >= 1.0:
            raise ValueError(
                "`val_fraction + test_fraction` must be < 1; "
                f"got {val_fraction!r} + {test_fraction!r}."
            )

    def task_descriptions(self, task_names: Sequence[str]) -> dict[str, str]:
        """Each task's loss (four kinds and scales of loss on one image).

        Args:
            task_names: The model's task names.

        Returns:
            Task name to its loss, for the tasks of :data:`DIGITS_TASKS`.
        """
        known = {"digit": "10-way CE", "parity": "BCE", "ink": "MSE", "recon": "64-pixel MSE"}
        return {n: known[n] for n in task_names if n in known}

    def build_splits(self) -> dict[str, TensorDataset]:
        """Load the digits and split them (called once, by ``setup``).

        Returns:
            ``train``/``val``/``test`` datasets of ``(image, label, ink)`` triples.

        Raises:
            ModuleNotFoundError: If scikit-learn (the ``[experiments]`` extra) is missing.
        """
        datasets = require("sklearn.datasets", "The digits experiment", "scikit-learn")
        bunch = datasets.load_digits()
        images = torch.as_tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
        labels = torch.as_tensor(bunch.target, dtype=torch.long)
        n = images.shape[0]
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed))
        n_test = round(n * self.test_fraction)
        n_val = round(n * self.val_fraction)
        index = {
            "test": perm[:n_test],
            "val": perm[n_test : n_test + n_val],
            "train": perm[n_test + n_val :],
        }
        ink = images.mean(dim=(1, 2, 3))
        train_ink = ink[index["train"]]
        ink = (ink - train_ink.mean()) / train_ink.std()
        return {
            name: TensorDataset(images[idx], labels[idx], ink[idx]) for name, idx in index.items()
        }


class DigitsMultiTaskModel(MultiTaskModule):
    """Small conv net with a shared ``Linear`` bottleneck and four task heads.

    Trunk: ``Conv(1→c, 3) → ReLU → Conv(c→2c, 3) → ReLU → MaxPool(2) → Flatten →
    Linear(2c·16 → hidden)`` (the shared layer), then ReLU in each head's path. Heads:
    ``digit`` ``Linear(hidden, 10)``, ``parity`` and ``ink`` ``Linear(hidden, 1)``,
    ``recon`` ``Linear(hidden, 64)`` followed by a sigmoid. Per-task validation/test metrics
    are collected with :class:`~torchmetrics.wrappers.MultitaskWrapper`.

    Args:
        channels: Channels of the first conv layer ``c``.
        hidden_dim: Width of the shared layer.
        use_task_views: If true, each head reads its own alias of the shared layer's output.
        optimizer: Partially applied optimizer class.
        scheduler: Optional partially applied per-step LR scheduler.

    Raises:
        TypeError: If a size is not an int or ``optimizer`` is not callable.
        ValueError: If a size is not positive.

    Example::

        >>> model = DigitsMultiTaskModel(optimizer=torch.optim.Adam)
        >>> {k: tuple(v.shape) for k, v in model(torch.zeros(2, 1, 8, 8)).items()}
        {'digit': (2, 10), 'parity': (2,), 'ink': (2,), 'recon': (2, 64)}
    """

    def __init__(
        self,
        channels: int = 16,
        hidden_dim: int = 128,
        use_task_views: bool = False,
        optimizer: OptimizerFactory = torch.optim.Adam,
        scheduler: SchedulerFactory | None = None,
    ) -> None:
        super().__init__(DIGITS_TASKS, optimizer, scheduler)
        _check_positive_int("channels", channels)
        _check_positive_int("hidden_dim", hidden_dim)
        self.use_task_views = bool(use_task_views)
        self.trunk = nn.Sequential(
            nn.Conv2d(1, channels, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(channels, 2 * channels, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(2 * channels * 16, hidden_dim),
        )
        self.heads = nn.ModuleDict(
            {
                "digit": nn.Linear(hidden_dim, 10),
                "parity": nn.Linear(hidden_dim, 1),
                "ink": nn.Linear(hidden_dim, 1),
                "recon": nn.Linear(hidden_dim, 64),
            }
        )
        self.metrics = MultitaskWrapper(
            {
                "digit": MulticlassAccuracy(num_classes=10, average="micro"),
                "parity": BinaryAccuracy(),
                "ink": MeanSquaredError(),
                "recon": MeanSquaredError(),
            }
        )

    def shared_layer(self) -> nn.Module:
        """The trunk's final ``Linear`` (the bottleneck every head reads).

        Returns:
            The shared ``nn.Linear``.
        """
        layer: nn.Module = self.trunk[-1]
        return layer

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        """Per-task outputs.

        Args:
            images: ``(batch, 1, 8, 8)`` images in [0, 1].

        Returns:
            ``digit`` logits ``(batch, 10)``, ``parity`` logit and ``ink`` value ``(batch,)``,
            ``recon`` pixels ``(batch, 64)`` in (0, 1).
        """
        z = self.trunk(images)
        if self.use_task_views:
            views: dict[str, Tensor] = self.task_views(z)
            h = {n: F.relu(views[n]) for n in self.task_names}
        else:
            h = dict.fromkeys(self.task_names, F.relu(z))
        return {
            "digit": self.heads["digit"](h["digit"]),
            "parity": self.heads["parity"](h["parity"]).squeeze(-1),
            "ink": self.heads["ink"](h["ink"]).squeeze(-1),
            "recon": torch.sigmoid(self.heads["recon"](h["recon"])),
        }

    def task_outputs(self, batch: Batch) -> TaskOutputs:
        """Per-task losses and metric inputs.

        Args:
            batch: ``(images, labels, ink)``.

        Returns:
            CE / BCE / MSE / MSE losses, and the predictions and targets of each metric.
        """
        images, labels, ink = batch
        out = self(images)
        parity = (labels % 2).float()
        pixels = images.flatten(1)
        losses = {
            "digit": F.cross_entropy(out["digit"], labels),
            "parity": F.binary_cross_entropy_with_logits(out["parity"], parity),
            "ink": F.mse_loss(out["ink"], ink),
            "recon": F.mse_loss(out["recon"], pixels),
        }
        preds = {
            "digit": out["digit"].detach().argmax(dim=-1),
            "parity": torch.sigmoid(out["parity"].detach()),
            "ink": out["ink"].detach(),
            "recon": out["recon"].detach(),
        }
        targets = {"digit": labels, "parity": parity.long(), "ink": ink, "recon": pixels}
        return TaskOutputs(losses, preds, targets)
