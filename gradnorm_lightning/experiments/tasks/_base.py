"""Shared plumbing for the example multi-task modules in :mod:`gradnorm_lightning.experiments.tasks`.

Each experiment module only has to say how to compute its per-task losses (and, if it
wants, per-task metrics); training/validation/test steps, logging and optimizer wiring
live here once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import lightning as L
import torch
from lightning.pytorch.utilities.types import OptimizerLRScheduler
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.wrappers import MultitaskWrapper

from gradnorm_lightning import GradNormMixin

OptimizerFactory = Callable[..., torch.optim.Optimizer]
"""A partially applied optimizer class (Hydra ``_partial_: true``): ``factory(params=...)``."""

SchedulerFactory = Callable[..., torch.optim.lr_scheduler.LRScheduler]
"""A partially applied LR scheduler class: ``factory(optimizer=...)``; stepped every training step."""

Batch = tuple[Tensor, ...]


def _check_positive_int(name: str, value: int) -> int:
    """Return ``value`` if it is a positive ``int``.

    Args:
        name: The argument name used in the error message.
        value: The value to check.

    Returns:
        ``value`` unchanged.

    Raises:
        TypeError: If ``value`` is not an ``int`` (``bool`` is rejected).
        ValueError: If ``value < 1``.
    """
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"`{name}` must be an int; got {value!r}.")
    if value < 1:
        raise ValueError(f"`{name}` must be >= 1; got {value!r}.")
    return value


def _check_fraction(name: str, value: float) -> float:
    """Return ``value`` if it lies strictly between 0 and 1.

    Args:
        name: The argument name used in the error message.
        value: The value to check.

    Returns:
        ``value`` as a float.

    Raises:
        ValueError: If ``value`` is not in the open interval (0, 1).
    """
    if not 0.0 < float(value) < 1.0:
        raise ValueError(f"`{name}` must be in (0, 1); got {value!r}.")
    return float(value)


class SplitDataModule(L.LightningDataModule):
    """A DataModule over fixed ``train``/``val``/``test`` TensorDatasets, built once.

    The loader settings (``batch_size``, ``num_workers``), the data ``seed`` and the
    idempotent :meth:`setup` live here; a subclass stores its own arguments after calling
    ``super().__init__(batch_size=..., seed=..., num_workers=...)`` and implements
    :meth:`build_splits`.

    Args:
        batch_size: Batch size of every loader.
        seed: Data seed, for the subclass's generator (independent of the training seed, so
            runs with different training seeds share their data).
        num_workers: DataLoader workers.

    Raises:
        TypeError: If ``batch_size`` or ``num_workers`` is not an int.
        ValueError: If ``batch_size < 1`` or ``num_workers < 0``.
    """

    #: The split names :meth:`build_splits` must return, in this order.
    SPLITS: tuple[str, ...] = ("train", "val", "test")

    def __init__(self, batch_size: int, seed: int = 0, num_workers: int = 0) -> None:
        super().__init__()
        self.batch_size = _check_positive_int("batch_size", batch_size)
        if isinstance(num_workers, bool) or not isinstance(num_workers, int):
            raise TypeError(f"`num_workers` must be an int; got {num_workers!r}.")
        if num_workers < 0:
            raise ValueError(f"`num_workers` must be >= 0; got {num_workers!r}.")
        self.seed = seed
        self.num_workers = num_workers
        self._splits: dict[str, TensorDataset] = {}

    def build_splits(self) -> Mapping[str, TensorDataset]:
        """Build the data sets (subclasses implement it; called once, by :meth:`setup`).

        Returns:
            ``split name -> TensorDataset`` for every name in :attr:`SPLITS`.

        Raises:
            NotImplementedError: Always, in the base class.
        """
        raise NotImplementedError

    def task_descriptions(self, task_names: Sequence[str]) -> dict[str, str]:
        """What the data knows about each task, for the figure's legend (e.g. ``"σ = 10"``).

        Args:
            task_names: The model's task names, in label order.

        Returns:
            Task name to a short description; the base class knows nothing (``{}``).
        """
        return {}

    def setup(self, stage: str | None = None) -> None:
        """Build the splits on the first call; later calls do nothing.

        Args:
            stage: Lightning stage (unused: all splits are built together).

        Raises:
            ValueError: If :meth:`build_splits` does not return exactly :attr:`SPLITS`.
        """
        if self._splits:
            return
        splits = dict(self.build_splits())
        if set(splits) != set(self.SPLITS):
            raise ValueError(
                f"`build_splits` must return the splits {list(self.SPLITS)}; "
                f"got {sorted(splits)}."
            )
        self._splits = {name: splits[name] for name in self.SPLITS}

    @classmethod
    def _datasets(cls, parts: Sequence[Sequence[Tensor]]) -> dict[str, TensorDataset]:
        """Name one ``TensorDataset`` per tensor tuple, in :attr:`SPLITS` order."""
        return {
            name: TensorDataset(*tensors) for name, tensors in zip(cls.SPLITS, parts, strict=True)
        }

    def _loader(self, split: str, shuffle: bool) -> DataLoader[tuple[Tensor, ...]]:
        self.setup()
        return DataLoader(
            self._splits[split],
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
        )

    def train_dataloader(self) -> DataLoader[tuple[Tensor, ...]]:
        """Shuffled training batches.

        Returns:
            The training DataLoader.
        """
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader[tuple[Tensor, ...]]:
        """Validation batches.

        Returns:
            The validation DataLoader.
        """
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader[tuple[Tensor, ...]]:
        """Test batches.

        Returns:
            The test DataLoader.
        """
        return self._loader("test", shuffle=False)


class TaskOutputs(NamedTuple):
    """What a task module computes on one batch.

    Attributes:
        losses: ``task name -> 0-dim loss`` for every task.
        preds: ``task name -> predictions`` for the tasks with a metric (may be empty).
        targets: ``task name -> targets`` matching ``preds``.
    """

    losses: dict[str, Tensor]
    preds: dict[str, Tensor]
    targets: dict[str, Tensor]


class MultiTaskModule(GradNormMixin, L.LightningModule):
    """Base class: a multi-task LightningModule whose loss is combined by the GradNorm mixin.

    Subclasses implement :meth:`task_outputs` and may set ``self.metrics`` to a
    :class:`~torchmetrics.wrappers.MultitaskWrapper` for per-task validation/test metrics.

    Logged keys: ``train/loss`` (the weighted sum), ``train/loss/<task>`` (raw task losses),
    ``val/loss/<task>``, ``test/loss/<task>``, ``val/loss`` and ``test/loss`` (unweighted
    sum), and ``<stage>/metric/<task>`` when the subclass defines metrics.

    Args:
        task_names: The task names, in the order the losses are returned.
        optimizer: Partially applied optimizer class, called as ``optimizer(params=...)``.
        scheduler: Optional partially applied LR scheduler, called as
            ``scheduler(optimizer=...)`` and stepped after every training step.

    Raises:
        ValueError: If fewer than two or duplicate task names are given.
        TypeError: If ``optimizer`` or ``scheduler`` is not callable.
    """

    #: The tasks, in loss order (always set: declared before the mixin initialises).
    task_names: tuple[str, ...]

    def __init__(
        self,
        task_names: Sequence[str],
        optimizer: OptimizerFactory,
        scheduler: SchedulerFactory | None = None,
    ) -> None:
        names = tuple(task_names)
        if len(names) < 2 or len(set(names)) != len(names):
            raise ValueError(f"`task_names` must be at least two distinct names; got {names!r}.")
        # Declared before the mixin's __init__ runs, so it can size its state from it.
        self.task_names = names
        super().__init__()
        if not callable(optimizer):
            raise TypeError(
                "`optimizer` must be a callable returning a torch optimizer (in Hydra: "
                f"`_partial_: true`); got {optimizer!r}."
            )
        if scheduler is not None and not callable(scheduler):
            raise TypeError(f"`scheduler` must be callable or None; got {scheduler!r}.")
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        # Per-task metrics; subclasses may replace this with a MultitaskWrapper.
        self.metrics: MultitaskWrapper | None = None

    # ----------------------------------------------------------------- to override
    def task_outputs(self, batch: Batch) -> TaskOutputs:
        """Run the model on one batch and compute every task's loss.

        Args:
            batch: One batch from the datamodule.

        Returns:
            The per-task losses (in ``self.task_names`` order) and, for the tasks that have
            a metric in ``self.metrics``, the metric's predictions and targets.

        Raises:
            NotImplementedError: Always, in the base class.
        """
        raise NotImplementedError

    def task_losses(self, batch: Batch) -> dict[str, Tensor]:
        """The un-weighted per-task losses for one batch.

        Args:
            batch: One batch from the datamodule.

        Returns:
            A dict ``task name -> 0-dim loss tensor``.
        """
        return self.task_outputs(batch).losses

    # ----------------------------------------------------------------- Lightning hooks
    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        """Combine the task losses with the current GradNorm weights and log them.

        Args:
            batch: One batch from the datamodule.
            batch_idx: Index of the batch (unused).

        Returns:
            The weighted loss ``sum_i w_i L_i``.
        """
        losses = self.task_losses(batch)
        loss: Tensor = self.combine_task_losses(losses)
        self.log_dict({f"train/loss/{k}": v.detach() for k, v in losses.items()})
        self.log("train/loss", loss.detach())
        return loss

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        """Log per-task validation losses (and update metrics).

        Args:
            batch: One batch from the datamodule.
            batch_idx: Index of the batch (unused).
        """
        self._eval_step(batch, "val")

    def test_step(self, batch: Batch, batch_idx: int) -> None:
        """Log per-task test losses (and update metrics).

        Args:
            batch: One batch from the datamodule.
            batch_idx: Index of the batch (unused).
        """
        self._eval_step(batch, "test")

    def on_validation_epoch_end(self) -> None:
        """Log and reset the per-task validation metrics."""
        self._log_metrics("val")

    def on_test_epoch_end(self) -> None:
        """Log and reset the per-task test metrics."""
        self._log_metrics("test")

    def configure_optimizers(self) -> OptimizerLRScheduler:
        """Build the model optimizer (and per-step scheduler) from the partial factories.

        Returns:
            The optimizer, or a Lightning optimizer/scheduler dict when a scheduler is set.
        """
        optimizer = self.optimizer_factory(params=self.parameters())
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer=optimizer)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1},
        }

    # ----------------------------------------------------------------- helpers
    def _eval_step(self, batch: Batch, stage: str) -> None:
        losses, preds, targets = self.task_outputs(batch)
        size = int(batch[0].shape[0])
        self.log_dict({f"{stage}/loss/{k}": v for k, v in losses.items()}, batch_size=size)
        self.log(f"{stage}/loss", torch.stack(list(losses.values())).sum(), batch_size=size)
        if self.metrics is not None:
            self.metrics.update(preds, targets)

    def _log_metrics(self, stage: str) -> None:
        if self.metrics is None:
            return
        values = self.metrics.compute()
        self.log_dict({f"{stage}/metric/{k}": v for k, v in _flat(values)})
        self.metrics.reset()


def _flat(values: Mapping[str, Any], prefix: str = "") -> Iterable[tuple[str, Tensor]]:
    """Flatten the (possibly nested) dict returned by ``MultitaskWrapper.compute``."""
    for key, value in values.items():
        if isinstance(value, Mapping):
            yield from _flat(value, f"{prefix}{key}/")
        else:
            yield f"{prefix}{key}", value
