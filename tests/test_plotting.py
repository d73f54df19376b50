"""Figures from CSV metrics, and the ``gradnorm-plot`` command line."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from gradnorm_lightning.experiments.plotting import find_metrics_csv, main, plot_runs, read_metrics

TASKS = ("task0", "task1", "task2")


def _write_run(run_dir: Path, steps: int = 20, seed: int = 0) -> Path:
    """A metrics.csv laid out like Lightning's CSVLogger (sparse rows, empty cells)."""
    rng = np.random.default_rng(seed)
    keys = [
        f"gradnorm/{k}/{t}"
        for k in ("weight", "grad_norm", "inverse_rate", "loss_ratio")
        for t in TASKS
    ]
    keys += ["gradnorm/loss", *(f"train/loss/{t}" for t in TASKS), "test/loss/task0"]
    path = run_dir / "csv" / "metrics.csv"
    path.parent.mkdir(parents=True)
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["epoch", "step", *keys])
        writer.writeheader()
        for step in range(0, steps, 2):
            row = {k: float(rng.uniform(0.1, 2.0)) for k in keys if not k.startswith("test")}
            writer.writerow({"epoch": 0, "step": step, **row})
        writer.writerow({"epoch": 0, "step": steps, "test/loss/task0": 0.5})
    return path


def test_read_metrics_skips_empty_cells(tmp_path: Path) -> None:
    path = _write_run(tmp_path)
    metrics = read_metrics(path)
    steps, values = metrics["gradnorm/weight/task1"]
    assert steps.tolist() == list(range(0, 20, 2)) and values.shape == (10,)
    assert metrics["test/loss/task0"][0].tolist() == [20.0]
    assert "step" not in metrics and "epoch" not in metrics


def test_read_metrics_rejects_a_csv_without_steps(tmp_path: Path) -> None:
    path = tmp_path / "metrics.csv"
    path.write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="no `step` column"):
        read_metrics(path)


def test_find_metrics_csv(tmp_path: Path) -> None:
    path = _write_run(tmp_path / "run")
    assert find_metrics_csv(tmp_path / "run") == path
    assert find_metrics_csv(path) == path
    with pytest.raises(FileNotFoundError, match="does not exist"):
        find_metrics_csv(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"No metrics\.csv"):
        find_metrics_csv(tmp_path / "empty")
    _write_run(tmp_path / "run" / "again")
    with pytest.raises(ValueError, match=r"Several metrics\.csv"):
        find_metrics_csv(tmp_path / "run")
    # A gradnorm-train run folder: the recorder's own file wins over the loggers' below it.
    own = tmp_path / "run" / "metrics.csv"
    own.write_text(path.read_text())
    assert find_metrics_csv(tmp_path / "run") == own


def test_plot_single_and_overlaid_runs(tmp_path: Path) -> None:
    _write_run(tmp_path / "a", seed=1)
    _write_run(tmp_path / "b", seed=2)
    one = plot_runs([tmp_path / "a"], tmp_path / "one.png")
    two = plot_runs(
        [tmp_path / "a", tmp_path / "b"], tmp_path / "out" / "two.png", labels=["A", "B"]
    )
    for path in (one, two):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_errors(tmp_path: Path) -> None:
    _write_run(tmp_path / "a")
    with pytest.raises(ValueError, match="at least one run"):
        plot_runs([], tmp_path / "x.png")
    with pytest.raises(ValueError, match="one entry per run"):
        plot_runs([tmp_path / "a"], tmp_path / "x.png", labels=["A", "B"])
    bare = tmp_path / "bare" / "metrics.csv"
    bare.parent.mkdir()
    bare.write_text("epoch,step,val/acc\n0,1,0.5\n")
    with pytest.raises(ValueError, match="Nothing to plot"):
        plot_runs([bare], tmp_path / "x.png")


def test_cli_defaults_and_labels(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _write_run(tmp_path / "a")
    _write_run(tmp_path / "b")
    main([str(tmp_path / "a")])
    assert (tmp_path / "a" / "gradnorm.png").exists()
    out = tmp_path / "cmp.png"
    main([str(tmp_path / "a"), str(tmp_path / "b"), "-o", str(out), "--labels", "A", "B"])
    assert out.exists()
    assert capsys.readouterr().out.strip().endswith("cmp.png")


def test_cli_reports_errors_as_usage_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as excinfo:
        main([str(tmp_path / "nowhere")])
    assert excinfo.value.code == 2
    assert "does not exist" in capsys.readouterr().err
