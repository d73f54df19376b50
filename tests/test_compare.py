"""``gradnorm-compare`` (``python -m gradnorm_lightning.experiments.compare``): the normalisation on
hand-made runs, and the command end to end on a tiny setting."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from gradnorm_lightning.experiments.compare import (
    REPORT_MD,
    RESULTS_JSON,
    RunRecord,
    aggregate,
    format_report,
    main,
    normalise,
    run_overrides,
)

SIGMAS = [1.0, 10.0]


def _runs() -> list[RunRecord]:
    """Two seeds of equal weighting and of one other method, with round numbers."""
    return [
        RunRecord(2, "equal", 0, {"a": 2.0, "b": 100.0}, SIGMAS),
        RunRecord(2, "gradnorm", 0, {"a": 1.0, "b": 150.0}, SIGMAS),  # ratios 0.5, 1.5
        RunRecord(2, "equal", 1, {"a": 4.0, "b": 200.0}, SIGMAS),
        RunRecord(2, "gradnorm", 1, {"a": 1.0, "b": 100.0}, SIGMAS),  # ratios 0.25, 0.5
    ]


def test_normalise_hand_made_runs() -> None:
    rows = {(r["method"], r["seed"]): r for r in normalise(_runs())}

    assert rows["equal", 0]["rel_equal"] == 1.0
    assert rows["equal", 1]["rel_equal"] == 1.0
    assert rows["gradnorm", 0]["rel_equal"] == pytest.approx((0.5 + 1.5) / 2)
    assert rows["gradnorm", 1]["rel_equal"] == pytest.approx((0.25 + 0.5) / 2)
    assert rows["gradnorm", 0]["per_task_rel_equal"] == pytest.approx({"a": 0.5, "b": 1.5})
    # L_i / sigma_i^2, averaged over tasks.
    assert rows["equal", 0]["scaled"] == pytest.approx((2.0 / 1 + 100.0 / 100) / 2)
    assert rows["gradnorm", 1]["scaled"] == pytest.approx((1.0 / 1 + 100.0 / 100) / 2)
    assert rows["gradnorm", 0]["raw_sum"] == pytest.approx(151.0)


def test_aggregate_mean_std_and_wins() -> None:
    table = {a.method: a for a in aggregate(_runs())}
    gn, eq = table["gradnorm"], table["equal"]

    assert gn.seeds == [0, 1] and gn.num_tasks == 2
    assert gn.mean["rel_equal"] == pytest.approx((1.0 + 0.375) / 2)
    assert gn.std["rel_equal"] == pytest.approx(math.sqrt(2) * (1.0 - 0.375) / 2)  # sample std
    assert gn.wins == 1  # seed 1 only (seed 0 ties at exactly 1.0, which is not a win)
    assert gn.per_task_rel_equal == pytest.approx({"a": 0.375, "b": 1.0})
    assert eq.mean["rel_equal"] == 1.0 and eq.std["rel_equal"] == 0.0 and eq.wins == 0


def test_without_equal_runs_rel_is_undefined() -> None:
    runs = [r for r in _runs() if r.method != "equal"]
    assert all(row["rel_equal"] is None for row in normalise(runs))
    (gn,) = aggregate(runs)
    assert gn.mean["rel_equal"] is None and gn.wins is None
    assert gn.mean["scaled"] == pytest.approx(((1.0 + 1.5) / 2 + (1.0 + 1.0) / 2) / 2)


def test_normalise_rejects_mismatched_runs() -> None:
    bad = [
        RunRecord(2, "equal", 0, {"a": 1.0, "b": 1.0}, SIGMAS),
        RunRecord(2, "dwa", 0, {"a": 1.0, "c": 1.0}, SIGMAS),
    ]
    with pytest.raises(ValueError, match="tasks"):
        normalise(bad)
    with pytest.raises(ValueError, match="sigmas"):
        normalise([RunRecord(2, "equal", 0, {"a": 1.0, "b": 1.0}, [1.0])])


def test_gradnorm_override_only_for_gradnorm(tmp_path: Path) -> None:
    gn = run_overrides("gradnorm", 4, 2, tmp_path, steps=7, alpha=0.12)
    eq = run_overrides("equal", 4, 2, tmp_path, steps=7, alpha=0.12)
    assert "callbacks.gradnorm.alpha=0.12" in gn
    assert not any(o.startswith("callbacks.gradnorm") for o in eq)
    for overrides in (gn, eq):
        assert {"seed=4", "data.seed=4", "data.num_tasks=2", "trainer.max_steps=7"} <= set(
            overrides
        )
    assert "trainer.max_steps=7" not in run_overrides("dwa", 4, 2, tmp_path)


_TINY = [
    "data.num_train=256",
    "data.num_val=64",
    "data.num_test=128",
    "data.batch_size=32",
    "trainer.limit_val_batches=1",
    "trainer.log_every_n_steps=1",
]


def test_command_on_a_tiny_setting(tmp_path: Path) -> None:
    out = tmp_path / "cmp"
    args = [
        "--methods",
        "equal,gradnorm",
        "--seeds",
        "2",
        "--steps",
        "5",
        "--num-tasks",
        "3",
        "--out",
        str(out),
        "--threads",
        "0",
        *_TINY,
    ]
    assert main(args) == 0

    results = json.loads((out / RESULTS_JSON).read_text())
    runs = results["runs"]
    assert sorted((r["method"], r["seed"]) for r in runs) == [
        ("equal", 0),
        ("equal", 1),
        ("gradnorm", 0),
        ("gradnorm", 1),
    ]
    for r in runs:
        assert r["total_steps"] == 5 and r["num_tasks"] == 3
        assert len(r["test_losses"]) == 3 and len(r["sigmas"]) == 3
        assert all(math.isfinite(v) and v > 0 for v in r["test_losses"].values())
        assert (Path(r["run_dir"]) / "summary.json").is_file()
        assert Path(r["run_dir"]).parent.name == r["method"]
        weights = list(r["final_weights"].values())
        if r["method"] == "gradnorm":
            assert sum(weights) == pytest.approx(3, rel=1e-4)
            assert "callbacks.gradnorm.alpha=0.12" in r["overrides"]
        else:
            assert weights == [1.0, 1.0, 1.0]
    # Seed S sets the data and the init: the two equal-weighting seeds differ from each other.
    assert runs[0]["test_losses"] != runs[2]["test_losses"]

    # The stored normalisation is the definition applied to the stored test losses.
    by_key = {(r["method"], r["seed"]): r for r in runs}
    for row in results["normalised"]:
        losses = by_key[row["method"], row["seed"]]["test_losses"]
        ref = by_key["equal", row["seed"]]["test_losses"]
        assert row["rel_equal"] == pytest.approx(sum(losses[n] / ref[n] for n in losses) / 3)
        assert math.isfinite(row["scaled"]) and math.isfinite(row["raw_sum"])
    for agg in results["aggregates"]:
        for metric in ("rel_equal", "scaled", "raw_sum"):
            assert math.isfinite(agg["mean"][metric]) and math.isfinite(agg["std"][metric])

    report = (out / REPORT_MD).read_text()
    assert "## T = 3" in report and "| gradnorm |" in report and "| equal | 1 ± 0 |" in report

    # --reuse loads the finished runs instead of training them again.
    assert main([*args, "--reuse"]) == 0
    again = json.loads((out / RESULTS_JSON).read_text())["runs"]
    assert [r["wall_s"] for r in again] == [r["wall_s"] for r in runs]


# ----------------------------------------------------------------------------- dense_synthetic
def test_dense_overrides_have_no_task_count(tmp_path: Path) -> None:
    overrides = run_overrides(
        "gradnorm", 2, None, tmp_path, steps=9, alpha=1.5, experiment="dense_synthetic"
    )
    assert overrides[:4] == ["experiment=dense_synthetic", "weighting=gradnorm", "seed=2", "data.seed=2"]
    assert "callbacks.gradnorm.alpha=1.5" in overrides and "trainer.max_steps=9" in overrides
    assert not any(o.startswith("data.num_tasks") for o in overrides)
    assert "task_name=compare_dense_synthetic_gradnorm_seed2" in overrides
    with pytest.raises(ValueError, match="`num_tasks` must be None"):
        run_overrides("equal", 0, 3, tmp_path, experiment="dense_synthetic")
    with pytest.raises(ValueError, match="`num_tasks` must be an int"):
        run_overrides("equal", 0, None, tmp_path)
    with pytest.raises(ValueError, match="`experiment` must be one of"):
        run_overrides("equal", 0, None, tmp_path, experiment="nyuv2")


def test_report_without_scales_shows_the_task_metrics() -> None:
    def run(method: str, seed: int, losses: list[float], metrics: list[float]) -> RunRecord:
        names = ("seg", "depth", "normals")
        return RunRecord(
            3, method, seed, dict(zip(names, losses)), [], experiment="dense_synthetic",
            test_metrics=dict(zip(names, metrics)),
        )

    runs = [
        run("equal", 0, [1.0, 2.0, 4.0], [0.5, 2.0, 30.0]),
        run("gradnorm", 0, [0.5, 2.0, 4.0], [0.7, 2.0, 20.0]),
        run("equal", 1, [1.0, 1.0, 1.0], [0.3, 1.0, 40.0]),
        run("gradnorm", 1, [2.0, 1.0, 1.0], [0.5, 1.0, 30.0]),
    ]
    rows = normalise(runs)
    assert all(row["scaled"] is None for row in rows)
    table = {a.method: a for a in aggregate(runs)}
    assert table["gradnorm"].mean["rel_equal"] == pytest.approx((2.5 / 3 + 4.0 / 3) / 2)
    assert table["gradnorm"].metric_mean == pytest.approx({"seg": 0.6, "depth": 1.5, "normals": 25.0})
    assert table["equal"].metric_std["normals"] == pytest.approx(math.sqrt(50.0))
    report = format_report(runs, list(table.values()), metric_labels={"seg": "seg mIoU ↑"})
    assert "L/σ²" not in report and "σ_i" not in report
    assert "| method | seg mIoU ↑ | depth | normals |" in report
    assert "| gradnorm | 0.6 ± 0.14 | 1.5 ± 0.71 | 25 ± 7.1 |" in report


_TINY_DENSE = [
    "data.image_size=16",
    "data.num_train=32",
    "data.num_val=8",
    "data.num_test=16",
    "data.batch_size=8",
    "model.channels=8",
    "model.decoder_channels=4",
    "trainer.limit_val_batches=1",
    "trainer.log_every_n_steps=1",
]


def test_command_on_dense_with_tiny_sizes(tmp_path: Path) -> None:
    out = tmp_path / "dense"
    args = ["--experiment", "dense_synthetic", "--seeds", "1", "--steps", "3", "--out", str(out)]
    assert main([*args, "--threads", "0", *_TINY_DENSE]) == 0

    results = json.loads((out / RESULTS_JSON).read_text())
    assert [r["method"] for r in results["runs"]] == ["equal", "gradnorm", "uncertainty", "dwa"]
    for r in results["runs"]:
        assert r["experiment"] == "dense_synthetic" and r["num_tasks"] == 3 and r["sigmas"] == []
        assert r["total_steps"] == 3
        assert Path(r["run_dir"]) == (out / "dense_synthetic" / r["method"] / "seed0").resolve()
        assert set(r["test_metrics"]) == {"seg", "depth", "normals"}
        assert all(math.isfinite(v) for v in [*r["test_losses"].values(), *r["test_metrics"].values()])
    (gradnorm,) = [r for r in results["runs"] if r["method"] == "gradnorm"]
    assert "callbacks.gradnorm.alpha=1.5" in gradnorm["overrides"]
    assert sum(gradnorm["final_weights"].values()) == pytest.approx(3, rel=1e-4)
    report = (out / REPORT_MD).read_text()
    assert report.startswith("# Synthetic dense prediction")
    assert "| equal | 1 |" in report and "normals mean angle (°) ↓" in report
    assert "alpha=1.5; other settings from experiment=dense_synthetic" in report


def test_task_count_is_refused_for_dense(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as excinfo:
        main(["--experiment", "dense_synthetic", "--num-tasks", "3"])
    assert excinfo.value.code == 2
    assert "--num-tasks applies to paper_toy only" in capsys.readouterr().err
