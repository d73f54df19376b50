"""A logger-independent record of the training curves: ``<run dir>/metrics.csv``.

:func:`~gradnorm_lightning.experiments.train.train` always adds a :class:`MetricsRecorder`,
so the figure and the summary's curves exist whatever logger is configured (CSV,
TensorBoard, both, or none). On every training batch that ends on one of the Trainer's
logging steps (``log_every_n_steps``, the steps the loggers write), it reads the scalars of
``trainer.callback_metrics`` whose keys start with ``train/`` or ``gradnorm/``. Lightning
fills ``callback_metrics`` from ``self.log`` calls whether or not a logger is attached
(``trainer/connectors/logger_connector/logger_connector.py`` in lightning 2.6.6). At the end
of ``fit`` the rows are written in the layout of Lightning's ``CSVLogger`` (``epoch``,
``step``, then one column per key, empty where a row lacks it), with the same ``step``
numbers, so :mod:`~gradnorm_lightning.experiments.plotting` reads either file.
"""

from __future__ import annotations

import csv
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from torch import Tensor
from typing_extensions import override

__all__ = ["DEFAULT_PREFIXES", "METRICS_CSV", "MetricsRecorder"]

METRICS_CSV = "metrics.csv"
"""File name of the recorder's output in the run folder."""

DEFAULT_PREFIXES: tuple[str, ...] = ("train/", "gradnorm/")
"""The key prefixes recorded by default: the task losses and the weighting statistics."""


def _logging_step(trainer: pl.Trainer) -> int | None:
    """The step the loggers write this batch under, or ``None`` if it is not a logging step.

    Mirrors Lightning 2.6's ``update_train_step_metrics``: a logging step is one where
    ``(batches_that_stepped + 1) % log_every_n_steps == 0``, not inside an accumulation
    window (automatic optimization), or any step under ``fast_dev_run``; its ``step`` is the
    number of batches that stepped before this one. These counters are private to
    Lightning's fit loop, so they are read here and nowhere else.
    """
    loop = trainer.fit_loop.epoch_loop
    stepped = int(getattr(loop, "_batches_that_stepped", trainer.global_step))
    accumulate = getattr(loop, "_should_accumulate", None)
    if accumulate is not None and accumulate() and trainer.lightning_module.automatic_optimization:
        return None
    # Both are set on the Trainer at run time (not declared on the class).
    if getattr(trainer, "fast_dev_run", False):
        return stepped
    every = int(getattr(trainer, "log_every_n_steps", 50))
    if every == 0:
        return None
    return stepped if ((stepped + 1) % every == 0 or trainer.should_stop) else None


def _scalar(value: Any) -> float | None:
    """``value`` as a float if it is a number or a one-element tensor, else ``None``."""
    if isinstance(value, Tensor):
        return float(value.detach().float().cpu().item()) if value.numel() == 1 else None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return None


class MetricsRecorder(Callback):
    """Record the training scalars on the Trainer's logging steps; write them as CSV.

    Only the global-zero process records and writes.

    Args:
        path: Where to write the CSV at the end of ``fit`` (its folder is created);
            ``None`` keeps the rows in memory only (:attr:`rows`, :meth:`write`).
        prefixes: Record the ``callback_metrics`` keys that start with one of these.

    Raises:
        ValueError: If ``prefixes`` is empty.

    Example::

        >>> recorder = MetricsRecorder()
        >>> recorder.rows
        []
    """

    def __init__(
        self, path: str | Path | None = None, prefixes: Sequence[str] = DEFAULT_PREFIXES
    ) -> None:
        if not prefixes:
            raise ValueError("`prefixes` must name at least one key prefix; got none.")
        self.path = None if path is None else Path(path)
        self.prefixes = tuple(prefixes)
        #: One dict per recorded step: ``epoch``, ``step`` and the recorded keys.
        self.rows: list[dict[str, float]] = []

    @override
    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if not trainer.is_global_zero:
            return
        step = _logging_step(trainer)
        if step is None:
            return
        row = self._select(trainer.callback_metrics)
        if row:
            self.rows.append({"epoch": float(trainer.current_epoch), "step": float(step), **row})

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.path is not None and trainer.is_global_zero:
            self.write(self.path)

    def _select(self, metrics: Mapping[str, Any]) -> dict[str, float]:
        row = {}
        for key, value in metrics.items():
            if key.startswith(self.prefixes):
                number = _scalar(value)
                if number is not None:
                    row[key] = number
        return row

    def write(self, path: str | Path) -> Path:
        """Write the recorded rows as a Lightning-``CSVLogger``-style ``metrics.csv``.

        Args:
            path: The CSV file (its folder is created; an existing file is replaced).

        Returns:
            The path written.
        """
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        keys = sorted({k for row in self.rows for k in row} - {"epoch", "step"})
        with open(out, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=["epoch", "step", *keys])
            writer.writeheader()
            for row in self.rows:
                writer.writerow(
                    {k: (int(v) if k in ("epoch", "step") else repr(v)) for k, v in row.items()}
                )
        return out
