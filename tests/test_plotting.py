"""Figures from CSV metrics, and the ``gradnorm-plot`` command line."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pytest

from gradnorm_lightning.experiments.plotting import (
    PANELS,
    TRAINING_LOSS,
    draw_runs,
    find_metrics_csv,
    main,
    plot_runs,
    read_metrics,
    read_task_descriptions,
)

TASKS = ("task0", "task1", "task2")


def _write_run(
    run_dir: Path, steps: int = 20, seed: int = 0, ratio: tuple[float, float] = (0.1, 2.0)
) -> Path:
    """A metrics.csv laid out like Lightning's CSVLogger (sparse rows, empty cells).

    The loss ratios are drawn from ``ratio``, every other value from [0.1, 2].
    """
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
            row = {
                k: float(rng.uniform(*(ratio if "loss_ratio" in k else (0.1, 2.0))))
                for k in keys
                if not k.startswith("test")
            }
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
    bare.write_text("epoch,step,val/acc,train/loss\n0,1,0.5,0.2\n")
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


def _figure(runs: list[Path], labels: list[str], descriptions: dict[str, str] | None = None):  # type: ignore[no-untyped-def]
    fig = draw_runs([read_metrics(find_metrics_csv(r)) for r in runs], labels, descriptions)
    titles = [ax.get_title().strip() for ax in fig.axes if ax.get_title()]
    axes = {ax.get_title().strip(): ax for ax in fig.axes if ax.get_title()}
    legend = next(ax.get_legend() for ax in fig.axes if ax.get_legend() is not None)
    texts = [t.get_text() for t in legend.get_texts()]
    suptitle = fig.get_suptitle()
    plt.close(fig)
    return titles, axes, texts, suptitle


def test_the_figure_shows_the_five_panels_and_names_the_tasks(tmp_path: Path) -> None:
    _write_run(tmp_path / "a")
    titles, _, texts, suptitle = _figure(
        [tmp_path / "a"], ["toy"], {"task0": "σ = 1", "task1": "σ = 10", "task2": "σ = 100"}
    )
    # what GradNorm does, in reading order; no flat training-loss panel, no GradNorm-loss panel
    # (and no cosine panel: the run logged no cosines)
    assert titles == [p.title for p in PANELS if not p.pairs]
    assert [p.prefix for p in PANELS] == [
        "gradnorm/weight/",
        "weighted_grad_norm/",
        "gradnorm/grad_norm/",
        "gradnorm/loss_ratio/",
        "gradnorm/inverse_rate/",
        "gradnorm/cosine/",
    ]
    assert texts == ["task0  (σ = 1)", "task1  (σ = 10)", "task2  (σ = 100)"]
    assert suptitle == "toy"


def test_the_axes_are_logarithmic_only_over_a_wide_span(tmp_path: Path) -> None:
    _write_run(tmp_path / "narrow", ratio=(0.75, 1.05))  # a toy run's loss ratios
    _, axes, _, _ = _figure([tmp_path / "narrow"], ["narrow"])
    ratio = axes["loss ratio $L_i(t)/L_i(0)$"]
    assert ratio.get_yscale() == "linear"
    low, high = ratio.get_ylim()
    assert sum(low <= t <= high for t in ratio.get_yticks()) >= 4  # readable ticks, not three
    assert axes["gradient norm $\\|\\nabla_W L_i\\|$"].get_yscale() == "linear"  # 0.1-2: 20x

    _write_run(tmp_path / "wide", ratio=(1e-3, 1.0))
    _, axes, _, _ = _figure([tmp_path / "wide"], ["wide"])
    assert axes["loss ratio $L_i(t)/L_i(0)$"].get_yscale() == "log"
    assert axes["task weight $w_i$"].get_yscale() == "linear"


def test_a_baseline_run_is_told_apart_by_line_style(tmp_path: Path) -> None:
    _write_run(tmp_path / "gn", seed=1)
    _write_run(tmp_path / "eq", seed=2)
    _, _, texts, suptitle = _figure([tmp_path / "gn", tmp_path / "eq"], ["gradnorm", "equal"])
    assert texts[-2:] == ["gradnorm (solid)", "equal (dashed)"]
    assert suptitle == "gradnorm (solid) vs equal (dashed)"


def test_the_task_descriptions_come_from_the_run_summary(tmp_path: Path) -> None:
    _write_run(tmp_path / "run")
    assert read_task_descriptions(tmp_path / "run") == {}
    (tmp_path / "run" / "summary.json").write_text(
        json.dumps({"task_descriptions": {"task0": "σ = 1", "task2": "σ = 100"}})
    )
    (tmp_path / "run" / "metrics.csv").write_text(
        (tmp_path / "run" / "csv" / "metrics.csv").read_text()
    )
    assert read_task_descriptions(tmp_path / "run") == {"task0": "σ = 1", "task2": "σ = 100"}
    assert read_task_descriptions(tmp_path / "run" / "metrics.csv") == {
        "task0": "σ = 1",
        "task2": "σ = 100",
    }
    (tmp_path / "run" / "summary.json").write_text("not json")
    assert read_task_descriptions(tmp_path / "run") == {}


def test_a_run_without_weighting_shows_its_training_losses(tmp_path: Path) -> None:
    path = tmp_path / "plain" / "metrics.csv"
    path.parent.mkdir()
    path.write_text("epoch,step,train/loss,train/loss/a,train/loss/b\n0,1,3.0,1.0,2.0\n0,2,2.5,0.9,1.6\n")
    titles, _, texts, _ = _figure([path.parent], ["plain"])
    assert titles == [TRAINING_LOSS.title]
    assert texts == ["a", "b"]  # the total train/loss is not a task
