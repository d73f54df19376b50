"""``MetricsRecorder``: the training curves without a logger, laid out like the CSV logger's."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, Logger

from gradnorm_lightning import GradNormCallback
from gradnorm_lightning.experiments.plotting import plot_runs, read_metrics
from gradnorm_lightning.experiments.recorder import MetricsRecorder
from gradnorm_lightning.experiments.tasks import PaperToyDataModule, PaperToyModel

TASKS = ("task0", "task1", "task2")


def _fit(
    tmp_path: Path, logger: Logger | bool, steps: int = 7, every: int = 2, accumulate: int = 1
) -> MetricsRecorder:
    L.seed_everything(0)
    data = PaperToyDataModule(
        num_tasks=3, input_dim=12, output_dim=4, num_train=64, num_val=8, num_test=8, batch_size=8
    )
    model = PaperToyModel(
        num_tasks=3, input_dim=12, hidden_dim=8, output_dim=4, num_layers=2,
        optimizer=torch.optim.Adam,
    )
    recorder = MetricsRecorder(tmp_path / "metrics.csv")
    gradnorm = GradNormCallback(alpha=1.5, lr=0.025, optimizer="sgd")
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_steps=steps, logger=logger, log_every_n_steps=every,
        accumulate_grad_batches=accumulate, limit_val_batches=0, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[gradnorm, recorder],
    )
    trainer.fit(model, datamodule=data)
    return recorder


def _curves(path: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    return {
        k: v for k, v in read_metrics(path).items() if k.startswith(("train/", "gradnorm/"))
    }


def test_without_a_logger_the_logging_steps_are_recorded(tmp_path: Path) -> None:
    recorder = _fit(tmp_path, logger=False)
    assert [row["step"] for row in recorder.rows] == [1.0, 3.0, 5.0]  # (step + 1) % 2 == 0
    curves = _curves(tmp_path / "metrics.csv")
    for task in TASKS:
        for key in (f"train/loss/{task}", f"gradnorm/weight/{task}", f"gradnorm/grad_norm/{task}"):
            steps, values = curves[key]
            assert steps.tolist() == [1.0, 3.0, 5.0] and np.isfinite(values).all(), key
    weights = sum(curves[f"gradnorm/weight/{t}"][1] for t in TASKS)
    np.testing.assert_allclose(weights, 3.0, rtol=1e-5)
    assert plot_runs([tmp_path], tmp_path / "fig.png").stat().st_size > 0


@pytest.mark.parametrize("accumulate", [1, 2], ids=["plain", "accumulate-2"])
def test_same_rows_as_the_csv_logger(tmp_path: Path, accumulate: int) -> None:
    logger = CSVLogger(save_dir=tmp_path, name="csv", version="")
    _fit(tmp_path, logger=logger, steps=4, every=1, accumulate=accumulate)
    ours, theirs = _curves(tmp_path / "metrics.csv"), _curves(tmp_path / "csv" / "metrics.csv")
    assert set(ours) == set(theirs) and f"gradnorm/inverse_rate/{TASKS[0]}" in ours
    for key, (steps, values) in theirs.items():
        np.testing.assert_array_equal(ours[key][0], steps, err_msg=key)
        np.testing.assert_allclose(ours[key][1], values, rtol=1e-6, err_msg=key)
    assert theirs["train/loss"][0].tolist() == [0.0, 1.0, 2.0, 3.0]


def test_rows_stay_in_memory_without_a_path(tmp_path: Path) -> None:
    recorder = MetricsRecorder()
    recorder.rows.append({"epoch": 0.0, "step": 2.0, "train/loss": 0.5})
    recorder.rows.append({"epoch": 0.0, "step": 4.0, "gradnorm/loss": 0.25})
    path = recorder.write(tmp_path / "sub" / "m.csv")
    assert path.read_text().splitlines() == [
        "epoch,step,gradnorm/loss,train/loss",
        "0,2,,0.5",
        "0,4,0.25,",
    ]
    with pytest.raises(ValueError, match="at least one key prefix"):
        MetricsRecorder(prefixes=())
