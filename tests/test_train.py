"""`train(cfg)` and the `python -m gradnorm_lightning.experiments.train` entry point, end to end."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

from gradnorm_lightning.experiments import train as train_module
from gradnorm_lightning.experiments.train import train
from tests.conftest import DIST_ENV, EXPERIMENTS, ComposeFn


def _assert_finite_tasks(summary: dict[str, object], expected_tasks: int) -> None:
    tasks = summary["tasks"]
    assert isinstance(tasks, dict) and len(tasks) == expected_tasks
    for name, row in tasks.items():
        assert math.isfinite(row["final_weight"]) and row["final_weight"] > 0, name
        assert math.isfinite(row["test_loss"]), name
        if row["test_metric"] is not None:
            assert math.isfinite(row["test_metric"]), name


@pytest.mark.parametrize(("experiment", "num_tasks"), zip(EXPERIMENTS, (10, 3, 4, 3), strict=True))
def test_experiment_runs_and_writes_outputs(
    compose_cfg: ComposeFn, tmp_path: Path, experiment: str, num_tasks: int
) -> None:
    cfg = compose_cfg(f"experiment={experiment}", steps=3)
    summary = train(cfg)

    assert summary["total_steps"] == 3
    assert summary["timed_steps"] == 3 and summary["time_per_step_ms"] > 0
    assert summary["experiment"] == experiment and summary["weighting"] == "gradnorm"
    _assert_finite_tasks(summary, num_tasks)
    weights = [row["final_weight"] for row in summary["tasks"].values()]
    assert sum(weights) == pytest.approx(num_tasks, rel=1e-4)  # GradNorm keeps sum w = T

    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk["tasks"] == summary["tasks"]
    table = (tmp_path / "summary.txt").read_text()
    assert all(name in table for name in summary["tasks"])
    assert (tmp_path / "gradnorm.png").stat().st_size > 0
    first_task = next(iter(summary["tasks"]))
    for path in (tmp_path / "metrics.csv", tmp_path / "csv" / "metrics.csv"):
        header = path.read_text().splitlines()[0]
        for key in ("weight", "grad_norm", "inverse_rate", "loss_ratio"):
            assert f"gradnorm/{key}/{first_task}" in header
    assert summary["files"]["metrics_csv"] == str(tmp_path / "metrics.csv")
    assert summary["files"]["figure"] == str(tmp_path / "gradnorm.png")
    # the figure's legend names each task with what the experiment knows about it
    assert set(summary["task_descriptions"]) == set(summary["tasks"])
    if experiment == "paper_toy":
        assert summary["task_descriptions"]["task0"] == "σ = 1"
        assert summary["task_descriptions"]["task9"] == "σ = 100"


@pytest.mark.parametrize(
    ("logger", "csv_logger", "tensorboard"),
    [
        ("logger=tensorboard", False, True),
        ("logger=csv_tensorboard", True, True),
        ("logger=none", False, False),
        ("~logger", False, False),
    ],
    ids=["tensorboard", "csv_tensorboard", "none", "removed"],
)
def test_figure_and_summary_with_any_logger(
    compose_cfg: ComposeFn, tmp_path: Path, logger: str, csv_logger: bool, tensorboard: bool
) -> None:
    cfg = compose_cfg("experiment=mmoe_recsys", logger, steps=3)
    summary = train(cfg)

    assert (tmp_path / "gradnorm.png").stat().st_size > 0
    assert json.loads((tmp_path / "summary.json").read_text())["total_steps"] == 3
    assert (tmp_path / "summary.txt").is_file()
    _assert_finite_tasks(summary, 3)
    header = (tmp_path / "metrics.csv").read_text().splitlines()[0].split(",")
    assert header[:2] == ["epoch", "step"]
    assert {"gradnorm/weight/click", "train/loss/convert", "train/loss"} <= set(header)
    assert (tmp_path / "csv" / "metrics.csv").is_file() == csv_logger
    assert any((tmp_path / "tensorboard").rglob("events.out.tfevents.*")) == tensorboard


@pytest.mark.parametrize("weighting", ["~weighting", "weighting=equal"])
def test_run_without_gradnorm_keeps_equal_weights(
    compose_cfg: ComposeFn, tmp_path: Path, weighting: str
) -> None:
    cfg = compose_cfg("experiment=mmoe_recsys", weighting, steps=2)
    summary = train(cfg)
    assert [row["final_weight"] for row in summary["tasks"].values()] == [1.0, 1.0, 1.0]
    assert (tmp_path / "gradnorm.png").exists()  # training losses are still plotted


def test_too_few_steps_to_log_still_writes_the_summary(
    compose_cfg: ComposeFn, tmp_path: Path
) -> None:
    cfg = compose_cfg("experiment=digits_multitask", steps=2)
    cfg.trainer.log_every_n_steps = 50
    summary = train(cfg)
    assert "figure" not in summary["files"]
    assert not (tmp_path / "gradnorm.png").exists()
    assert json.loads((tmp_path / "summary.json").read_text())["total_steps"] == 2


_SMALL_TOY = (
    "experiment=paper_toy", "trainer.max_steps=5", "trainer.log_every_n_steps=1",
    "data.num_train=512", "data.num_val=64", "data.num_test=256",
)


def _run_module(overrides: tuple[str, ...] | list[str], cwd: Path) -> None:
    """``python -m gradnorm_lightning.experiments.train *overrides`` in ``cwd``; asserts it succeeded."""
    env = {k: v for k, v in os.environ.items() if k not in DIST_ENV}  # (a fresh launch: a port of its own)
    env["PYTHONWARNINGS"] = "ignore"
    env.pop("GRADNORM_LOG_DIR", None)
    proc = subprocess.run(
        [sys.executable, "-m", "gradnorm_lightning.experiments.train", *overrides],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_module_entry_point_runs_from_an_unrelated_folder(tmp_path: Path) -> None:
    _run_module(_SMALL_TOY, tmp_path)
    (run_dir,) = (tmp_path / "logs" / "paper_toy" / "runs").iterdir()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["total_steps"] == 5
    _assert_finite_tasks(summary, 10)
    assert (run_dir / "gradnorm.png").exists()
    assert (run_dir / "summary.txt").exists()
    assert (run_dir / "metrics.csv").exists()
    assert (run_dir / "csv" / "metrics.csv").exists()
    assert (run_dir / "checkpoints" / "last.ckpt").exists()


@pytest.mark.slow
def test_ddp_on_cpu_runs_end_to_end(tmp_path: Path) -> None:
    """``trainer=ddp`` on the CPU (two gloo processes, Lightning's subprocess launcher) trains,
    tests and writes its files; both processes then destroy the group and exit."""
    _run_module([*_SMALL_TOY, "trainer=ddp", "trainer.accelerator=cpu", f"paths.output_dir={tmp_path / 'run'}"], tmp_path)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["total_steps"] == 5
    _assert_finite_tasks(summary, 10)
    assert sum(row["final_weight"] for row in summary["tasks"].values()) == pytest.approx(10, rel=1e-4)
    assert (tmp_path / "run" / "gradnorm.png").exists()


def test_a_finished_run_destroys_its_process_group(tmp_path: Path) -> None:
    """What ``main`` does after a run: destroy the group (which joins gloo's worker threads while
    the interpreter is alive); without a group it does nothing."""
    train_module._destroy_process_group()  # no group: nothing to do
    assert not dist.is_initialized()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        assert dist.is_initialized()
        train_module._destroy_process_group()
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_fast_dev_run_debug_preset(compose_cfg: ComposeFn, tmp_path: Path) -> None:
    cfg = compose_cfg("experiment=digits_multitask", "debug=fdr")
    summary = train(cfg)
    assert summary["total_steps"] == 1
    _assert_finite_tasks(summary, 4)
    assert not (tmp_path / "gradnorm.png").exists()  # fast_dev_run disables the loggers


def test_console_script_finds_its_configs_from_an_unrelated_folder(tmp_path: Path) -> None:
    # `gradnorm-train` calls main() from an imported module (not __main__), so Hydra looks
    # the configs up as the package gradnorm_lightning.experiments.configs rather than by file path.
    code = (
        "import sys\n"
        "from gradnorm_lightning.experiments.train import main\n"
        "sys.argv = ['gradnorm-train', 'experiment=digits_multitask', '--cfg', 'job']\n"
        "main()\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "task_name: digits_multitask" in proc.stdout
    assert "_target_: gradnorm_lightning.GradNormCallback" in proc.stdout


def test_mmoe_with_separate_experts_balances_over_all_of_them(
    compose_cfg: ComposeFn, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """``model.separate_experts=true``: the shared layer is a list of the experts' last layers."""
    import logging

    cfg = compose_cfg("experiment=mmoe_recsys", "model.separate_experts=true", steps=3)
    with caplog.at_level(logging.INFO, logger="gradnorm_lightning"):
        summary = train(cfg)
    _assert_finite_tasks(summary, 3)
    assert any("4 shared modules (Linear, Linear, Linear, Linear)" in r.getMessage() for r in caplog.records)
