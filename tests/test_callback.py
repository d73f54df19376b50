"""GradNormCallback in real Lightning fits: trajectory, logging, checkpoints, errors."""

from __future__ import annotations

import csv
import math
import pickle
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch import nn

from gradnorm_lightning import EqualWeightingCallback, GradNorm, GradNormCallback, GradNormMixin
from tests.lightning_models import MultiTaskNet, loader, trainer
from tests.textbook import textbook_trajectory

STEPS = 30


class Recorder(L.Callback):
    """Records the weights after every optimizer step."""

    def __init__(self) -> None:
        self.weights: list[torch.Tensor] = []

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: object) -> None:
        assert isinstance(pl_module, GradNormMixin)
        self.weights.append(torch.stack(list(pl_module.task_weights.values())).clone())


@pytest.mark.parametrize("views", [False, True], ids=["default", "task-views"])
@pytest.mark.parametrize("alpha", [0.12, 1.5])
def test_fit_follows_textbook_trajectory(alpha: float, views: bool) -> None:
    expected = textbook_trajectory(alpha, 0.025, STEPS)
    rec = Recorder()
    model = MultiTaskNet(views=views)
    trainer(STEPS, callbacks=[GradNormCallback(alpha=alpha, lr=0.025, optimizer="sgd"), rec]).fit(model, loader(3, STEPS))
    torch.testing.assert_close(torch.stack(rec.weights), expected, rtol=0, atol=1e-10)
    assert list(model.task_weights) == ["t0", "t1", "t2"]


def test_float32_fit_of_paper_sized_toy_matches_float64_reference() -> None:
    """T = 10 tasks, 30 steps, float32 model: within 1e-4 of the float64 textbook."""
    dims = dict(d_in=25, hidden=20, d_rep=20, d_out=4)
    expected = textbook_trajectory(0.12, 0.025, STEPS, num_tasks=10, dims=dims)
    rec = Recorder()
    model = MultiTaskNet(num_tasks=10, dtype=torch.float32, **dims)
    trainer(STEPS, callbacks=[GradNormCallback(alpha=0.12, lr=0.025, optimizer="sgd"), rec]).fit(
        model, loader(10, STEPS, dtype=torch.float32, d_in=25, d_out=4)
    )
    got = torch.stack(rec.weights)
    assert got.dtype == torch.float32
    assert (expected[-1] - 1).abs().max() > 1e-3
    torch.testing.assert_close(got.double(), expected, rtol=0, atol=1e-4)


def test_logged_keys_reach_csv_logger(tmp_path: Path) -> None:
    model = MultiTaskNet()
    logger = CSVLogger(tmp_path)
    trainer(12, logger=logger, log_every_n_steps=4, callbacks=[GradNormCallback(optimizer="sgd")]).fit(model, loader(3, 12))
    with open(Path(logger.log_dir) / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    keys = set(rows[0])
    for task in ("t0", "t1", "t2"):
        for family in ("weight", "grad_norm", "loss_ratio", "inverse_rate", "skipped"):
            assert f"gradnorm/{family}/{task}" in keys
    assert "gradnorm/loss" in keys
    logged = [r for r in rows if r["gradnorm/weight/t0"]]
    # log_every_n_steps=4 over 12 steps: steps 3, 7, 11 (0-based)
    assert [int(r["step"]) for r in logged] == [3, 7, 11]
    last = logged[-1]
    weights = [float(last[f"gradnorm/weight/t{i}"]) for i in range(3)]
    assert math.isclose(sum(weights), 3.0, rel_tol=1e-6)
    torch.testing.assert_close(torch.tensor(weights, dtype=torch.float64), torch.stack(list(model.task_weights.values())))


def test_checkpoint_round_trip_equals_uninterrupted_run(tmp_path: Path) -> None:
    """Stop after epoch 2 (step k = 12), resume from its checkpoint: the same weights as one run."""
    steps_per_epoch, epochs = 6, 4
    data = loader(3, steps_per_epoch)

    def cb() -> GradNormCallback:
        return GradNormCallback(optimizer="adam", lr=0.05, initial_loss_steps=2)

    rec_full = Recorder()
    full = MultiTaskNet()
    trainer(-1, max_epochs=epochs, callbacks=[cb(), rec_full]).fit(full, data)

    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    first = MultiTaskNet()
    trainer(-1, max_epochs=2, enable_checkpointing=True, callbacks=[cb(), ckpt]).fit(first, data)
    state = torch.load(tmp_path / "last.ckpt", weights_only=False)["callbacks"]["GradNormCallback"]
    assert state["steps"] == steps_per_epoch * 2
    assert state["exp_avg"].abs().sum() > 0  # the weight optimizer's state is in the checkpoint

    rec_resumed = Recorder()
    resumed = MultiTaskNet()
    trainer(-1, max_epochs=epochs, callbacks=[cb(), rec_resumed]).fit(resumed, data, ckpt_path=str(tmp_path / "last.ckpt"))
    assert len(rec_resumed.weights) == steps_per_epoch * (epochs - 2)
    assert torch.equal(torch.stack(rec_resumed.weights), torch.stack(rec_full.weights[steps_per_epoch * 2 :]))


def test_checkpoint_with_other_tasks_is_refused(tmp_path: Path) -> None:
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer(3, enable_checkpointing=True, callbacks=[GradNormCallback(optimizer="sgd"), ckpt]).fit(MultiTaskNet(), loader(3, 3))
    other = MultiTaskNet(declare=True)
    other.names = other.task_names = ("a", "b", "c")  # same architecture, other tasks
    with pytest.raises(ValueError, match=r"checkpoint's GradNorm tasks \['t0', 't1', 't2'\] differ from this model's \['a', 'b', 'c'\]"):
        trainer(6, callbacks=[GradNormCallback(optimizer="sgd")]).fit(other, loader(3, 6), ckpt_path=str(tmp_path / "last.ckpt"))


def test_callback_pickles_and_keeps_state() -> None:
    cb = GradNormCallback(alpha=0.5, optimizer="sgd")
    model = MultiTaskNet()
    trainer(3, callbacks=[cb]).fit(model, loader(3, 3))
    clone = pickle.loads(pickle.dumps(cb))
    assert clone.alpha == 0.5 and clone.options["alpha"] == 0.5
    assert clone.balancer is not None
    assert torch.equal(clone.balancer.weights, cb.balancer.weights)  # type: ignore[union-attr]


# ---------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(alpha=-0.1), ValueError, r"`alpha` must be >= 0"),
        (dict(alpha="big"), TypeError, r"`alpha` must be a finite number"),
        (dict(lr=0.0), ValueError, r"`lr` must be > 0; got 0.0"),
        (dict(optimizer="rmsprop"), ValueError, r"`optimizer` must be one of 'sgd', 'adam'; got 'rmsprop'"),
        (dict(mode="fast"), ValueError, r"`mode` must be one of"),
        (dict(distributed="maybe"), ValueError, r"`distributed` must be one of"),
        (dict(initial_losses=-1.0), ValueError, r"`initial_losses` must be > 0"),
        (dict(initial_losses={"a": 0.0}), ValueError, r"`initial_losses\['a'\]` must be > 0"),
        (dict(initial_loss_steps=0), ValueError, r"`initial_loss_steps` must be > 0"),
        (dict(betas=(0.9, 1.0)), ValueError, r"`betas` must both lie in \[0, 1\)"),
        (dict(min_weight=0.0), ValueError, r"`min_weight` must be > 0"),
        (dict(lr_decay_steps=1.5), TypeError, r"`lr_decay_steps` must be an integer"),
    ],
)
def test_bad_arguments_fail_in_init(kwargs: dict[str, object], error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        GradNormCallback(**kwargs)  # type: ignore[arg-type]


class NoMixin(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(2, 2)

    def training_step(self, batch: object, batch_idx: int) -> torch.Tensor:
        return self.layer(torch.ones(2)).sum()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_module_without_mixin_is_refused() -> None:
    with pytest.raises(TypeError, match=r"needs a LightningModule that mixes in `GradNormMixin`.*class NoMixin\(GradNormMixin"):
        trainer(1, callbacks=[GradNormCallback(optimizer="sgd")]).fit(NoMixin(), loader(3, 1))


def test_missing_shared_layer_is_refused() -> None:
    class NoLayer(MultiTaskNet):
        shared_layer = GradNormMixin.shared_layer

    with pytest.raises(NotImplementedError, match=r"must implement `shared_layer\(\)`"):
        trainer(1, callbacks=[GradNormCallback(optimizer="sgd")]).fit(NoLayer(), loader(3, 1))


def test_shared_layer_without_parameters_is_refused() -> None:
    class Frozen(MultiTaskNet):
        def shared_layer(self) -> nn.Module:
            return self.trunk[1]  # a ReLU

    with pytest.raises(ValueError, match=r"`shared_layer\(\)` \(ReLU\) has no trainable parameters"):
        trainer(1, callbacks=[GradNormCallback(optimizer="sgd")]).fit(Frozen(), loader(3, 1))


def test_two_callbacks_are_refused_with_the_librarys_message() -> None:
    # Lightning's own check of Trainer(callbacks=...) lets them through (their state keys differ
    # until setup), and setup refuses them with the fix
    t = trainer(1, callbacks=[GradNormCallback(optimizer="sgd"), GradNormCallback(optimizer="sgd")])
    with pytest.raises(ValueError, match=r"more than one loss-weighting callback \(GradNormCallback\); keep exactly one"):
        t.fit(MultiTaskNet(), loader(3, 1))
    # ... and callbacks added after the Trainer was built too
    t = trainer(1, callbacks=[GradNormCallback(optimizer="sgd")])
    t.callbacks.append(EqualWeightingCallback())
    with pytest.raises(ValueError, match=r"\(EqualWeightingCallback, GradNormCallback\); keep exactly one"):
        t.fit(MultiTaskNet(), loader(3, 1))


def test_the_state_is_stored_under_the_class_name_and_old_checkpoints_load(tmp_path: Path) -> None:
    """The state key is Lightning's default, the class name, once the callback is set up: a checkpoint
    written by an earlier version (state under "GradNormCallback") resumes the same trajectory."""
    cb = GradNormCallback(optimizer="sgd")
    t = trainer(2, callbacks=[cb])
    t.fit(MultiTaskNet(), loader(3, 2))
    assert cb.state_key == "GradNormCallback" and cb.balancer is not None
    t.save_checkpoint(tmp_path / "a.ckpt")
    checkpoint = torch.load(tmp_path / "a.ckpt", weights_only=False)
    stored = checkpoint["callbacks"]["GradNormCallback"]
    assert torch.equal(stored["weights"], cb.balancer.weights)
    # the earlier layout: the same key, without the state added since
    for key in ("zero_initial_loss_steps", "floor_steps", "jump_steps", "skipped_updates"):
        stored.pop(key, None)
    torch.save(checkpoint, tmp_path / "old.ckpt")
    resumed = GradNormCallback(optimizer="sgd")
    assert resumed.state_key != "GradNormCallback"  # (its own until setup)
    trainer(2, callbacks=[resumed]).fit(MultiTaskNet(), loader(3, 2), ckpt_path=tmp_path / "old.ckpt")
    assert resumed.balancer is not None and resumed.balancer.steps == 2
    assert torch.equal(resumed.balancer.weights, cb.balancer.weights)


def test_two_optimizers_are_refused() -> None:
    class TwoOpt(MultiTaskNet):  # Lightning allows several optimizers under manual optimization
        def __init__(self) -> None:
            super().__init__()
            self.automatic_optimization = False

        def configure_optimizers(self):  # type: ignore[no-untyped-def]
            return [torch.optim.SGD(self.trunk.parameters(), lr=0.1), torch.optim.SGD(self.heads.parameters(), lr=0.1)]

    with pytest.raises(ValueError, match=r"exactly one optimizer; the module configured 2"):
        trainer(1, callbacks=[GradNormCallback(optimizer="sgd")]).fit(TwoOpt(), loader(3, 1))


def test_balancer_is_reachable_and_plain() -> None:
    cb = GradNormCallback(optimizer="sgd")
    model = MultiTaskNet()
    trainer(2, callbacks=[cb]).fit(model, loader(3, 2))
    assert isinstance(cb.balancer, GradNorm)
    assert model.task_balancer is cb.balancer
