"""Run summaries: per-step timing and the ``summary.json`` / ``summary.txt`` of a run.

:class:`StepTimer` measures wall-clock time per training step with
:func:`time.perf_counter` (from ``on_train_batch_start`` to ``on_train_batch_end``, so it
includes the forward, backward, GradNorm's weight update and the optimizer step).
:func:`build_summary` gathers the final task weights, the per-task test results and the
timing; :func:`write_summary` writes them as JSON and as a readable table.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor
from typing_extensions import override

__all__ = ["StepTimer", "build_summary", "format_summary", "write_summary"]

SUMMARY_JSON = "summary.json"
SUMMARY_TXT = "summary.txt"


class StepTimer(Callback):
    """Record the wall-clock duration of every training step.

    On CUDA the device is synchronised at both ends of a step so the time covers the
    queued kernels, not just their launch.

    Example::

        >>> timer = StepTimer()
        >>> timer.stats()
        {'steps': 0, 'mean_ms': nan, 'median_ms': nan, 'total_s': 0.0}
    """

    def __init__(self) -> None:
        self.durations: list[float] = []
        self._start: float | None = None

    @staticmethod
    def _sync(pl_module: pl.LightningModule) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._sync(pl_module)
        self._start = time.perf_counter()

    @override
    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if self._start is None:
            return
        self._sync(pl_module)
        self.durations.append(time.perf_counter() - self._start)
        self._start = None

    def stats(self) -> dict[str, float | int]:
        """Summary statistics of the recorded steps.

        Returns:
            ``steps`` (count), ``mean_ms`` and ``median_ms`` per step (NaN when no step ran)
            and ``total_s`` (the sum).
        """
        if not self.durations:
            return {"steps": 0, "mean_ms": math.nan, "median_ms": math.nan, "total_s": 0.0}
        return {
            "steps": len(self.durations),
            "mean_ms": 1e3 * statistics.fmean(self.durations),
            "median_ms": 1e3 * statistics.median(self.durations),
            "total_s": math.fsum(self.durations),
        }


def _float(value: Any) -> float:
    """A Python float from a number or a 0-dim tensor."""
    if isinstance(value, Tensor):
        return float(value.detach().cpu().item())
    return float(value)


def build_summary(
    task_weights: Mapping[str, Any],
    test_results: Mapping[str, Any],
    timing: Mapping[str, float | int],
    total_steps: int,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Gather a run's results into a JSON-serialisable dict.

    Per task, ``test_loss`` is ``test/loss/<task>`` and ``test_metric`` is
    ``test/metric/<task>`` from ``test_results`` (``None`` when absent).

    Args:
        task_weights: Final task weights, task name to number or 0-dim tensor.
        test_results: The metrics dict returned by ``trainer.test`` (may be empty).
        timing: :meth:`StepTimer.stats`.
        total_steps: Optimizer steps taken (``trainer.global_step``).
        extra: More top-level entries (run name, tags, file paths, ...).

    Returns:
        ``{"tasks": {task: {"final_weight", "test_loss", "test_metric"}}, "total_steps",
        "time_per_step_ms", "median_time_per_step_ms", "train_time_s", "timed_steps",
        "test": {...}}`` plus ``extra``.

    Raises:
        ValueError: If ``total_steps`` is negative.

    Example::

        >>> s = build_summary({"a": 1.5, "b": 0.5}, {"test/loss/a": 0.25}, StepTimer().stats(), 0)
        >>> s["tasks"]["a"]
        {'final_weight': 1.5, 'test_loss': 0.25, 'test_metric': None}
    """
    if total_steps < 0:
        raise ValueError(f"`total_steps` must be >= 0; got {total_steps!r}.")
    test = {str(k): _float(v) for k, v in test_results.items()}
    tasks = {
        name: {
            "final_weight": _float(weight),
            "test_loss": test.get(f"test/loss/{name}"),
            "test_metric": test.get(f"test/metric/{name}"),
        }
        for name, weight in task_weights.items()
    }
    summary: dict[str, Any] = dict(extra or {})
    summary.update(
        tasks=tasks,
        total_steps=int(total_steps),
        time_per_step_ms=float(timing["mean_ms"]),
        median_time_per_step_ms=float(timing["median_ms"]),
        train_time_s=float(timing["total_s"]),
        timed_steps=int(timing["steps"]),
        test=test,
    )
    return summary


def _cell(value: float | None, width: int) -> str:
    if value is None:
        return "-".rjust(width)
    return f"{value:>{width}.6g}"


def format_summary(summary: Mapping[str, Any]) -> str:
    """Render a summary from :func:`build_summary` as a plain-text table.

    Args:
        summary: The summary dict.

    Returns:
        A few header lines and one row per task (weight, test loss, test metric).

    Example::

        >>> s = build_summary({"a": 1.0, "b": 1.0}, {}, StepTimer().stats(), 0)
        >>> print(format_summary(s).splitlines()[-1])
        b              1           -           -
    """
    tasks: Mapping[str, Mapping[str, float | None]] = summary["tasks"]
    name_w = max([4, *(len(n) for n in tasks)])
    lines = []
    if "task_name" in summary:
        lines.append(f"run:            {summary['task_name']}")
    if "weighting" in summary:
        lines.append(f"weighting:      {summary['weighting']}")
    lines += [
        f"total steps:    {summary['total_steps']}",
        f"time per step:  {summary['time_per_step_ms']:.3f} ms mean, "
        f"{summary['median_time_per_step_ms']:.3f} ms median over {summary['timed_steps']} steps",
        f"training time:  {summary['train_time_s']:.2f} s (sum of timed steps)",
        "",
        f"{'task':<{name_w}}  {'weight':>10}  {'test loss':>10}  {'test metric':>10}",
    ]
    for name, row in tasks.items():
        lines.append(
            f"{name:<{name_w}}  {_cell(row['final_weight'], 10)}  "
            f"{_cell(row['test_loss'], 10)}  {_cell(row['test_metric'], 10)}"
        )
    return "\n".join(lines)


def write_summary(summary: Mapping[str, Any], out_dir: str | Path) -> tuple[Path, Path]:
    """Write ``summary.json`` and ``summary.txt`` into ``out_dir``.

    Args:
        summary: The summary dict (from :func:`build_summary`).
        out_dir: The run folder (created if missing).

    Returns:
        The paths of the JSON and the text file.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path, txt_path = out / SUMMARY_JSON, out / SUMMARY_TXT
    json_path.write_text(json.dumps(_jsonable(summary), indent=2, allow_nan=True) + "\n")
    txt_path.write_text(format_summary(summary) + "\n")
    return json_path, txt_path


def _jsonable(value: Any) -> Any:
    """Convert tensors, paths and tuples inside ``value`` to JSON types."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, str):
        return [_jsonable(v) for v in value]
    if isinstance(value, Tensor):
        return _float(value) if value.numel() == 1 else value.tolist()
    if isinstance(value, Path):
        return str(value)
    return value
