"""Run every script in ``examples/`` for a few steps and check what it claims to show.

The plain-PyTorch, Lightning, Fabric and dense-prediction examples are imported and their
``main(argv)`` (the Fabric one's ``train``) is called in this process (fast); the Hydra project runs as a subprocess
(``@hydra.main`` parses the command line), and its config is also composed here. The
``slow`` tests run each script as a user would, from a foreign working directory.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
from hydra import compose, initialize_config_dir

import gradnorm_lightning
from gradnorm_lightning import GradNormCallback

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
HYDRA_PROJECT = EXAMPLES / "hydra_project"


def _load(path: Path) -> ModuleType:
    """Import an example script as a module (examples/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"_example_{path.stem}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


pytestmark = pytest.mark.usefixtures("restore_globals")  # (the examples set the thread count and seed variable)


def _check_weights(weights: dict[str, float], names: tuple[str, ...]) -> None:
    assert tuple(weights) == names
    assert all(math.isfinite(w) and w > 0 for w in weights.values()), weights
    assert sum(weights.values()) == pytest.approx(len(names), abs=1e-5)


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONWARNINGS": "ignore::DeprecationWarning"}
    proc = subprocess.run(
        [sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return proc


# ---------------------------------------------------------------------------- plain PyTorch
def test_plain_pytorch_absent_task_is_skipped_and_model_stays_finite() -> None:
    plain = _load(EXAMPLES / "plain_pytorch.py")
    result = plain.main(["--steps", "12"])
    _check_weights(result["weights"], plain.TASKS)
    assert result["absent_steps"] == 4  # steps 2, 5, 8, 11 have no class labels
    # GradNorm's own count agrees: the label task was left out exactly on those steps
    assert result["skipped"] == {"small": 0, "large": 0, "label": 4}
    assert result["params_finite"]
    assert not result["diverged"]
    assert result["weights"] != dict.fromkeys(plain.TASKS, 1.0)  # the weights did move


def test_plain_pytorch_masked_mean_loses_nothing() -> None:
    """The masked mean over an empty mask (NaN with a ``0 * inf`` backward) trains the same model
    as ``err[mask].mean()`` (NaN with finite gradients), with no clean-up in the loop; the
    divergence guard finds nothing."""
    plain = _load(EXAMPLES / "plain_pytorch.py")
    masked = plain.main(["--steps", "9", "--guard"])
    index = plain.main(["--steps", "9", "--loss-form", "index"])
    assert masked["absent_steps"] == index["absent_steps"] == 3
    assert not masked["diverged"]
    for p, q in zip(masked["params"], index["params"]):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6)
    for name in plain.TASKS:
        assert abs(masked["weights"][name] - index["weights"][name]) < 1e-6


# ---------------------------------------------------------------------------- Lightning
def test_lightning_minimal_logs_weights_to_csv(tmp_path: Path) -> None:
    minimal = _load(EXAMPLES / "lightning_minimal.py")
    result = minimal.main(["--steps", "5", "--out", str(tmp_path)])
    names = minimal.MultiTaskRegressor.task_names
    _check_weights(result["weights"], names)

    metrics_csv = Path(result["metrics_csv"])
    assert metrics_csv.is_file() and metrics_csv.is_relative_to(tmp_path)
    with metrics_csv.open() as f:
        rows = list(csv.DictReader(f))
    keys = [f"gradnorm/weight/{name}" for name in names]
    assert set(keys) <= set(rows[0])
    weight_rows = [row for row in rows if row[keys[0]]]
    assert len(weight_rows) == 5  # log_every_n_steps=1: one row per optimizer step
    last = {name: float(weight_rows[-1][key]) for name, key in zip(names, keys)}
    assert last == pytest.approx(result["weights"], rel=1e-6)


def test_dense_prediction_conv_shared_layer_with_and_without_task_views() -> None:
    dense = _load(EXAMPLES / "dense_prediction.py")
    names = dense.DenseMultiTaskNet.task_names
    with_views = dense.main(["--steps", "3"])
    _check_weights(with_views["weights"], names)
    assert all(abs(w - 1.0) > 1e-4 for w in with_views["weights"].values())  # updates happened
    assert all(math.isfinite(v) for v in with_views["last_losses"].values())
    # task_views is only a faster route to the same exact norms
    without = dense.main(["--steps", "3", "--no-task-views"])
    assert without["weights"] == pytest.approx(with_views["weights"], rel=1e-5)


# ---------------------------------------------------------------------------- Lightning Fabric
def test_fabric_loop_runs_the_plain_balancer_in_fabric_precisions() -> None:
    """``fabric.backward(gn.combine(losses))`` then ``gn.step()``: in 32-true exactly the loop without
    Fabric; in bf16-mixed and bf16-true the balancer stays float32, updates on every step and
    stays near the float32 weights."""
    fab = _load(EXAMPLES / "fabric_loop.py")
    plain = fab.train(8, None)
    f32 = fab.train(8, "32-true")
    assert f32["weights"] == plain["weights"]
    _check_weights(f32["weights"], fab.TASKS)
    assert max(abs(w - 1.0) for w in f32["weights"].values()) > 1e-3  # the weights moved
    for precision in ("bf16-mixed", "bf16-true"):
        result = fab.train(8, precision)
        assert result["dtype"] == torch.float32 and result["updates"] == 8, precision
        _check_weights(result["weights"], fab.TASKS)
        assert all(math.isfinite(v) for v in result["last_losses"].values())
        deviation = max(abs(result["weights"][k] - f32["weights"][k]) for k in fab.TASKS)
        assert deviation < 0.05, (precision, deviation)  # bfloat16 keeps ~3 significant digits


# ---------------------------------------------------------------------------- Hydra project
def test_hydra_project_config_builds_gradnorm_callback() -> None:
    train = _load(HYDRA_PROJECT / "train.py")
    with initialize_config_dir(config_dir=str(HYDRA_PROJECT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["callbacks.gradnorm.alpha=0.5"])
        none = compose("config", overrides=["callbacks=none"])
    assert cfg.callbacks.gradnorm._target_ == "gradnorm_lightning.GradNormCallback"
    (callback,) = train.instantiate_callbacks(cfg.callbacks)
    assert isinstance(callback, GradNormCallback)
    assert (callback.alpha, callback.lr, callback.optimizer) == (0.5, 0.025, "adam")
    assert train.instantiate_callbacks(none.callbacks) == []
    # the project stands alone: it does not reach into the package's shipped configs
    shipped = Path(gradnorm_lightning.__file__).resolve().parent / "configs"
    for path in HYDRA_PROJECT.rglob("*"):
        if path.is_file():
            text = path.read_text()
            assert str(shipped) not in text and "gradnorm_lightning.configs" not in text, path


def test_hydra_project_trains_from_its_own_config(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    proc = _run([str(HYDRA_PROJECT / "train.py"), "trainer.max_steps=3", f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    assert "callbacks: ['GradNormCallback']" in proc.stdout
    summary = json.loads((run_dir / "summary.json").read_text())
    (target,) = summary["callbacks"]
    assert target.startswith("gradnorm_lightning.") and target.endswith(".GradNormCallback")
    assert summary["steps"] == 3
    _check_weights(summary["weights"], ("depth", "height", "mass"))
    assert summary["weights"] != {"depth": 1.0, "height": 1.0, "mass": 1.0}
    with open(summary["metrics_csv"]) as f:
        header = next(csv.reader(f))
    assert {"gradnorm/weight/depth", "gradnorm/weight/height", "gradnorm/weight/mass"} <= set(header)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # nothing written elsewhere


# ---------------------------------------------------------------------------- as a user runs them
@pytest.mark.slow
@pytest.mark.parametrize(
    "script, expected",
    [
        ("plain_pytorch.py", "model parameters finite: True"),
        ("lightning_minimal.py", "metrics written to"),
        ("dense_prediction.py", "final task weights"),
        ("fabric_loop.py", "final task weights"),
    ],
)
def test_script_runs_from_any_directory(script: str, expected: str, tmp_path: Path) -> None:
    args = [str(EXAMPLES / script), "--steps", "3"]
    if script == "lightning_minimal.py":
        args += ["--out", str(tmp_path / "logs")]
    proc = _run(args, cwd=tmp_path)
    assert expected in proc.stdout
    assert "final task weights" in proc.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == (["logs"] if script == "lightning_minimal.py" else [])
