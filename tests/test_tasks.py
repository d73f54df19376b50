"""The example data modules and multi-task models in ``gradnorm_lightning.experiments.tasks``."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn

from gradnorm_lightning import GradNormMixin
from gradnorm_lightning.experiments.tasks import (
    BatchedLinear,
    DenseDataModule,
    DenseMultiTaskModel,
    DigitsDataModule,
    DigitsMultiTaskModel,
    MMoEModel,
    PaperToyDataModule,
    PaperToyModel,
    RecsysDataModule,
)
from gradnorm_lightning.experiments.tasks.dense import MeanAngularError, make_dense_data
from gradnorm_lightning.experiments.tasks.mmoe import make_recsys_data
from gradnorm_lightning.experiments.tasks.toy import default_sigmas, make_paper_toy_data


# ----------------------------------------------------------------------------- paper toy
def test_default_sigmas_span_one_to_hundred_geometrically() -> None:
    sigmas = default_sigmas(10)
    assert sigmas[0] == pytest.approx(1.0) and sigmas[-1] == pytest.approx(100.0)
    ratios = [b / a for a, b in itertools.pairwise(sigmas)]
    assert ratios == pytest.approx([ratios[0]] * 9)


def test_toy_data_is_seeded_and_scaled_by_sigma() -> None:
    sigmas = [1.0, 5.0, 50.0]
    ((x, y),) = make_paper_toy_data([64], num_tasks=3, sigmas=sigmas, seed=3)
    ((x2, y2),) = make_paper_toy_data([64], num_tasks=3, sigmas=sigmas, seed=3)
    ((x3, _),) = make_paper_toy_data([64], num_tasks=3, sigmas=sigmas, seed=4)
    assert torch.equal(x, x2) and torch.equal(y, y2) and not torch.equal(x, x3)
    assert y.shape == (64, 3, 100)
    for i, sigma in enumerate(sigmas):  # |sigma tanh(.)| <= sigma, and mostly saturated
        assert y[:, i].abs().max() <= sigma + 1e-4
        assert y[:, i].abs().mean() > 0.5 * sigma


def test_toy_tasks_share_structure_but_differ() -> None:
    ((_, y),) = make_paper_toy_data([256], num_tasks=2, sigmas=[1.0, 1.0], eps_var=3.5)
    agree = (torch.sign(y[:, 0]) == torch.sign(y[:, 1])).float().mean()
    assert 0.6 < agree < 1.0  # B is shared, eps_i is not


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(sigmas=[1.0, 2.0]), ValueError, "one entry per task"),
        (dict(b_var=-1.0), ValueError, "variances must be >= 0"),
        (dict(num_tasks=0), ValueError, "`num_tasks` must be >= 1"),
        (dict(num_tasks=2.5), TypeError, "`num_tasks` must be an int"),
    ],
    ids=["sigmas-length", "negative-variance", "zero-tasks", "float-tasks"],
)
def test_toy_data_rejects_bad_arguments(kwargs: dict[str, object], error: type, match: str) -> None:
    args: dict[str, object] = {"num_tasks": 3, **kwargs}
    with pytest.raises(error, match=match):
        make_paper_toy_data([8], **args)  # type: ignore[arg-type]


def test_toy_datamodule_splits() -> None:
    dm = PaperToyDataModule(num_tasks=2, num_train=40, num_val=8, num_test=16, batch_size=16)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (16, 250) and y.shape == (16, 2, 100)
    assert len(dm.test_dataloader().dataset) == 16  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="`batch_size` must be >= 1"):
        PaperToyDataModule(batch_size=0)


# ----------------------------------------------------------------------------- recsys
def test_recsys_label_rates_and_difficulty_order() -> None:
    ((_, y),) = make_recsys_data([20000], rates=(0.3, 0.12, 0.04), seed=0)
    rates = y.mean(dim=0)
    assert rates.tolist() == pytest.approx([0.3, 0.12, 0.04], abs=0.02)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(rates=(0.3, 1.2, 0.1)), r"`rates` must be in \(0, 1\)"),
        (dict(rates=(0.3, 0.1)), "need 3 entries"),
        (dict(noise=(0.1, -1.0, 0.1)), "`noise` must be >= 0"),
        (dict(num_features=4), "`num_features` must be >= 8"),
    ],
)
def test_recsys_data_rejects_bad_arguments(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make_recsys_data([8], **kwargs)  # type: ignore[arg-type]


def test_batched_linear_equals_one_linear_per_expert() -> None:
    layer = BatchedLinear(3, 5, 2)
    x = torch.randn(4, 5)
    out = layer(x)
    for e in range(3):
        ref = x @ layer.weight[e] + layer.bias[e]
        torch.testing.assert_close(out[:, e], ref)
    per_expert = torch.randn(4, 3, 5)
    torch.testing.assert_close(
        layer(per_expert)[:, 1], per_expert[:, 1] @ layer.weight[1] + layer.bias[1]
    )
    with pytest.raises(ValueError, match=r"must have shape \(batch, 5\)"):
        layer(torch.randn(4, 6))


# ----------------------------------------------------------------------------- digits
def test_digits_splits_are_disjoint_and_ink_is_standardised() -> None:
    dm = DigitsDataModule(val_fraction=0.1, test_fraction=0.2, seed=1)
    dm.setup()
    sizes = {k: len(v) for k, v in dm._splits.items()}
    assert sum(sizes.values()) == 1797
    images = {k: v.tensors[0].flatten(1) for k, v in dm._splits.items()}
    train_rows = {tuple(r.tolist()) for r in images["train"]}
    overlap = sum(tuple(r.tolist()) in train_rows for r in images["test"])
    assert overlap < 0.05 * sizes["test"]  # the data set has a few duplicate images
    ink = dm._splits["train"].tensors[2]
    assert float(ink.mean()) == pytest.approx(0.0, abs=1e-5)
    assert float(ink.std()) == pytest.approx(1.0, abs=1e-4)
    with pytest.raises(ValueError, match="must be < 1"):
        DigitsDataModule(val_fraction=0.5, test_fraction=0.5)


# ----------------------------------------------------------------------------- dense
def test_dense_data_is_seeded_and_its_targets_are_consistent() -> None:
    (image, seg, depth, normals), (image_b, *_) = make_dense_data([32, 8], image_size=16, seed=2)
    ((again, *_),) = make_dense_data([32], image_size=16, seed=2)
    ((other, *_),) = make_dense_data([32], image_size=16, seed=3)
    assert torch.equal(image, again) and not torch.equal(image, other)
    assert image.shape == (32, 3, 16, 16) and image_b.shape == (8, 3, 16, 16)
    assert seg.dtype == torch.long and set(seg.unique().tolist()) == {0, 1, 2, 3}
    torch.testing.assert_close(normals.norm(dim=1), torch.ones(32, 16, 16))
    assert float(depth.min()) > 1.0 and float(depth.max()) < 6.0
    # Shapes stand in front of the background plane.
    background = seg == 0
    assert float(depth[:, 0][~background].mean()) < float(depth[:, 0][background].mean())
    assert float(normals[:, 2][background].min()) > 0.8  # a gently tilted plane


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(image_size=15), ValueError, "even number >= 8"),
        (dict(num_classes=1), ValueError, "`num_classes` must be >= 2"),
        (dict(noise=-0.1), ValueError, "`noise` must be >= 0"),
        (dict(max_shapes=1.5), TypeError, "`max_shapes` must be an int"),
    ],
    ids=["odd-size", "one-class", "negative-noise", "float-shapes"],
)
def test_dense_data_rejects_bad_arguments(
    kwargs: dict[str, object], error: type, match: str
) -> None:
    with pytest.raises(error, match=match):
        make_dense_data([4], **kwargs)  # type: ignore[arg-type]
    with pytest.raises(error, match=match):
        DenseDataModule(**kwargs)  # type: ignore[arg-type]


def test_mean_angular_error_in_degrees() -> None:
    metric = MeanAngularError()
    target = torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, 1.0]]).view(2, 3, 1, 1)
    metric.update(torch.tensor([[0.0, 0.0, 2.0], [1.0, 0.0, 1.0]]).view(2, 3, 1, 1), target)
    assert float(metric.compute()) == pytest.approx((0.0 + 45.0) / 2, abs=1e-4)


def test_dense_model_outputs_and_metrics() -> None:
    model = DenseMultiTaskModel(num_classes=5, channels=8, decoder_channels=4)
    out = model(torch.zeros(2, 3, 12, 12))
    assert {k: tuple(v.shape) for k, v in out.items()} == {
        "seg": (2, 5, 12, 12),
        "depth": (2, 1, 12, 12),
        "normals": (2, 3, 12, 12),
    }
    assert type(model.shared_layer()) is nn.Conv2d
    with pytest.raises(ValueError, match="`channels` must be even"):
        DenseMultiTaskModel(channels=7)


# ----------------------------------------------------------------------------- models
def _toy() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    dm = PaperToyDataModule(num_tasks=3, num_train=16, num_val=8, num_test=8, batch_size=8)
    return PaperToyModel(num_tasks=3, optimizer=torch.optim.Adam), next(iter(dm.train_dataloader()))


def _mmoe() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    dm = RecsysDataModule(num_train=64, num_val=8, num_test=8, batch_size=32)
    return MMoEModel(optimizer=torch.optim.Adam), next(iter(dm.train_dataloader()))


def _mmoe_separate() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    dm = RecsysDataModule(num_train=64, num_val=8, num_test=8, batch_size=32)
    return MMoEModel(separate_experts=True, optimizer=torch.optim.Adam), next(iter(dm.train_dataloader()))


def _digits() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    dm = DigitsDataModule(batch_size=16)
    return DigitsMultiTaskModel(optimizer=torch.optim.Adam), next(iter(dm.train_dataloader()))


def _dense() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    dm = DenseDataModule(image_size=16, num_train=8, num_val=4, num_test=4, batch_size=4)
    model = DenseMultiTaskModel(channels=8, decoder_channels=4, optimizer=torch.optim.Adam)
    return model, next(iter(dm.train_dataloader()))


@pytest.mark.parametrize(
    "build", [_toy, _mmoe, _mmoe_separate, _digits, _dense], ids=["toy", "mmoe", "mmoe-separate", "digits", "dense"]
)
def test_every_task_loss_reaches_the_shared_layer(build) -> None:  # type: ignore[no-untyped-def]
    model, batch = build()
    assert isinstance(model, GradNormMixin)
    shared = model.shared_layer()
    params = [p for m in (shared if isinstance(shared, nn.ModuleList) else [shared]) for p in m.parameters()]
    losses = model.task_losses(batch)
    assert tuple(losses) == tuple(model.task_names)
    for name, loss in losses.items():
        assert loss.dim() == 0 and math.isfinite(float(loss.detach())), name
        grads = torch.autograd.grad(loss, params, retain_graph=True)
        assert sum(float(g.norm()) for g in grads) > 0, name


@pytest.mark.parametrize(
    "build", [_toy, _mmoe, _mmoe_separate, _digits, _dense], ids=["toy", "mmoe", "mmoe-separate", "digits", "dense"]
)
def test_task_views_do_not_change_the_model(build) -> None:  # type: ignore[no-untyped-def]
    model, batch = build()
    plain = model.task_losses(batch)
    model.use_task_views = True
    viewed = model.task_losses(batch)
    for name in plain:
        torch.testing.assert_close(plain[name], viewed[name])


def test_model_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match="at least two distinct names"):
        PaperToyModel(num_tasks=1, optimizer=torch.optim.Adam)
    with pytest.raises(ValueError, match="at least two distinct names"):
        MMoEModel(task_names=["a", "a"], optimizer=torch.optim.Adam)
    with pytest.raises(TypeError, match="`optimizer` must be a callable"):
        DigitsMultiTaskModel(optimizer="adam")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="`hidden_dim` must be >= 1"):
        PaperToyModel(hidden_dim=0, optimizer=torch.optim.Adam)


def test_configure_optimizers_with_a_step_scheduler() -> None:
    from functools import partial

    model = PaperToyModel(
        num_tasks=2,
        optimizer=partial(torch.optim.SGD, lr=0.1),
        scheduler=partial(torch.optim.lr_scheduler.StepLR, step_size=10),
    )
    config = model.configure_optimizers()
    assert isinstance(config, dict)
    assert config["lr_scheduler"]["interval"] == "step"
    assert isinstance(config["optimizer"], torch.optim.SGD)
