"""Issue 6: every documented misuse gets a clear ValueError/TypeError/NotImplementedError, raised
early (before the first training step where the misuse is visible earlier), naming the fix.

Each misuse is exercised through the plain balancer ``GradNorm(...)`` and, where it applies,
through ``GradNormCallback(...)`` / ``Trainer.fit``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from helpers.fault_models import FaultModule, make_data, make_trainer

from gradnorm_lightning import GradNorm, GradNormCallback, GradNormMixin


# ---------------------------------------------------------------------- tiny modules
class Tiny(GradNormMixin, L.LightningModule):
    """trunk (Linear) -> shared Linear -> heads; behaviour switches for each misuse."""

    task_names: tuple[str, ...] | None = ("a", "b")

    def __init__(self, tasks=("a", "b"), declare=True, bypass=None, extra_task_at=None, n_opt=1,
                 shared="linear", nonscalar=None):
        super().__init__()
        if declare:
            self.task_names = tuple(tasks)
        else:
            self.task_names = None
        self.tasks = tuple(tasks)
        self.inp = nn.Linear(3, 4)
        self.shared = nn.Linear(4, 4)
        self.heads = nn.ModuleDict({t: nn.Linear(4, 1) for t in ("a", "b", "c", "d")})
        self.bypass = bypass
        self.extra_task_at = extra_task_at
        self.n_opt = n_opt
        self.shared_kind = shared
        self.nonscalar = nonscalar
        self.steps_run = 0
        if n_opt > 1:
            self.automatic_optimization = False

    def shared_layer(self):
        if self.shared_kind == "relu":
            return nn.ReLU()
        if self.shared_kind == "unused":  # a layer the forward never calls
            if not hasattr(self, "_unused"):
                self._unused = nn.Linear(4, 4)
            return self._unused
        if self.shared_kind == "frozen":
            for p in self.shared.parameters():
                p.requires_grad_(False)
            return self.shared
        return self.shared

    def training_step(self, batch, batch_idx):
        self.steps_run += 1
        (x,) = batch
        h = torch.relu(self.inp(x))
        z = torch.relu(self.shared(h))
        tasks = list(self.tasks)
        if self.extra_task_at is not None and self.global_step >= self.extra_task_at:
            tasks.append("c")
        losses = {}
        for t in tasks:
            src = h if t == self.bypass else z
            out = self.heads[t](src)
            losses[t] = out.squeeze(1) if t == self.nonscalar else out.pow(2).mean()
        loss = self.combine_task_losses(losses)
        if not self.automatic_optimization:
            self.manual_backward(loss)
            for opt in self.optimizers():
                opt.step()
                opt.zero_grad()
            return None
        return loss

    def configure_optimizers(self):
        if self.n_opt > 1:
            return [torch.optim.SGD(self.parameters(), lr=0.01) for _ in range(self.n_opt)]
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def train_dataloader(self):
        return DataLoader(TensorDataset(torch.randn(8, 3)), batch_size=4)


class NoMixin(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 1)
        self.steps_run = 0

    def training_step(self, batch, batch_idx):
        self.steps_run += 1
        return self.lin(batch[0]).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def train_dataloader(self):
        return DataLoader(TensorDataset(torch.randn(8, 3)), batch_size=4)


class NoSharedLayer(Tiny):
    shared_layer = GradNormMixin.shared_layer


def _fit(model, cb=None, steps=3, **kw):
    cbs = kw.pop("callbacks", None) or [cb or GradNormCallback(optimizer="sgd")]
    trainer = make_trainer(steps, cbs, **kw)
    trainer.fit(model)
    return trainer


def _plain(num_tasks=2, **kw):
    torch.manual_seed(0)
    inp, shared = nn.Linear(3, 4), nn.Linear(4, 4)
    heads = nn.ModuleList([nn.Linear(4, 1) for _ in range(4)])
    gn = GradNorm(shared, num_tasks, **kw)
    x = torch.randn(5, 3)
    return gn, inp, shared, heads, x


# ---------------------------------------------------------------------- the module
def test_module_without_mixin():
    model = NoMixin()
    with pytest.raises(TypeError, match=r"GradNormMixin.*class NoMixin\(GradNormMixin, L\.LightningModule\)"):
        _fit(model)
    assert model.steps_run == 0


def test_shared_layer_not_implemented():
    model = NoSharedLayer()
    with pytest.raises(NotImplementedError, match=r"NoSharedLayer must implement `shared_layer\(\)`"):
        _fit(model)
    assert model.steps_run == 0


@pytest.mark.parametrize("kind", ["relu", "frozen"])
def test_shared_layer_without_trainable_parameters_callback(kind):
    model = Tiny(shared=kind)
    with pytest.raises(ValueError, match=r"`shared_layer\(\)`.*has no trainable parameters"):
        _fit(model)
    assert model.steps_run == 0


def test_shared_layer_without_trainable_parameters_balancer():
    with pytest.raises(ValueError, match="has no trainable parameters"):
        GradNorm(nn.ReLU(), 2, optimizer="sgd")
    frozen = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="has no trainable parameters"):
        GradNorm(frozen, 2, optimizer="sgd")
    with pytest.raises(TypeError, match=r"must be an `nn.Module`"):
        GradNorm(torch.zeros(3), 2, optimizer="sgd")  # type: ignore[arg-type]


# ---------------------------------------------------------------------- losses
@pytest.mark.parametrize("mode", ["auto", "autograd", "representation"])
@pytest.mark.parametrize("views", [False, True])
def test_task_not_reaching_shared_layer_balancer(mode, views):
    gn, inp, shared, heads, x = _plain(mode=mode)
    h = torch.relu(inp(x))
    z = torch.relu(shared(h))
    za, _zb = gn.task_views(z) if views else (z, z)
    losses = [heads[0](za).pow(2).mean(), heads[1](h).pow(2).mean()]  # task1 bypasses the shared layer
    with pytest.raises(ValueError, match=r"task1.*(does not depend on the shared layer|did not read its view)"):
        gn.combine(losses).backward()  # found at combine (the graph walk) or in the backward
    assert torch.equal(gn.weights, torch.ones(2))


def test_task_not_reaching_shared_layer_callback():
    model = Tiny(bypass="b")
    with pytest.raises(ValueError, match=r"'b' does not depend on the shared layer"):
        _fit(model)
    assert model.steps_run == 1  # detected at the very first backward


@pytest.mark.parametrize("mode", ["auto", "autograd"])
def test_constant_finite_loss_task_error(mode):
    """A finite loss with no graph (computed under no_grad, detached, ...) cannot depend on the
    shared layer: a misuse to report, not a task without labels to skip silently forever."""
    gn, inp, shared, heads, x = _plain(mode=mode)
    z = shared(inp(x))
    with pytest.raises(ValueError, match=r"task1.*(does not depend on the shared layer|does not require grad)"):
        gn.combine([heads[0](z).mean(), torch.tensor(1.0)]).backward()
        gn.step()


def test_unknown_task_appearing_later_balancer():
    gn, inp, shared, heads, x = _plain(num_tasks=None)
    z = shared(inp(x))
    gn.combine({"a": heads[0](z).mean(), "b": heads[1](z).mean()}).backward()
    gn.step()
    z = shared(inp(x))
    with pytest.raises(ValueError, match=r"Unknown task\(s\) \['c'\].*Declare every task up front"):
        gn.combine({"a": heads[0](z).mean(), "b": heads[1](z).mean(), "c": heads[2](z).mean()})
    # declared names: an undeclared one is refused at once
    gn2 = GradNorm(shared, task_names=["a", "b"], optimizer="sgd")
    z = shared(inp(x))
    with pytest.raises(ValueError, match=r"Unknown task\(s\) \['zz'\]"):
        gn2.combine({"a": heads[0](z).mean(), "zz": heads[1](z).mean()})


@pytest.mark.parametrize("declare", [False, True])
def test_unknown_task_appearing_later_callback(declare):
    model = Tiny(declare=declare, extra_task_at=2)
    with pytest.raises(ValueError, match=r"Unknown task\(s\) \['c'\]"):
        _fit(model, steps=4)
    assert model.steps_run == 3


def test_fewer_than_two_tasks_balancer():
    with pytest.raises(ValueError, match="two or more tasks"):
        GradNorm(nn.Linear(2, 2), 1, optimizer="sgd")
    with pytest.raises(ValueError, match="two or more tasks"):
        GradNorm(nn.Linear(2, 2), task_names=["only"], optimizer="sgd")
    gn = GradNorm(nn.Linear(2, 2), optimizer="sgd")
    with pytest.raises(ValueError, match="two or more tasks"):
        gn.combine({"only": torch.tensor(1.0, requires_grad=True)})
    with pytest.raises(ValueError, match="two or more tasks"):
        GradNorm(nn.Linear(2, 2), optimizer="sgd").combine([torch.tensor(1.0)])


@pytest.mark.parametrize("declare", [True, False])
def test_fewer_than_two_tasks_callback(declare):
    model = Tiny(tasks=("a",), declare=declare)
    with pytest.raises(ValueError, match="two or more tasks"):
        _fit(model)
    assert model.steps_run == (0 if declare else 1)


def test_non_scalar_loss_balancer():
    gn, inp, shared, heads, x = _plain()
    z = shared(inp(x))
    with pytest.raises(ValueError, match=r"task1.*must be a scalar.*got shape \(5,\)"):
        gn.combine([heads[0](z).mean(), heads[1](z).squeeze(1)])
    with pytest.raises(ValueError, match="1-D with one loss per task"):
        gn.combine(torch.ones(2, 2))


def test_non_scalar_loss_callback():
    model = Tiny(nonscalar="b")
    with pytest.raises(ValueError, match=r"'b' must be a scalar"):
        _fit(model)


# ---------------------------------------------------------------------- arguments
BAD_ARGS = [
    (dict(alpha=-0.5), ValueError, r"`alpha` must be >= 0"),
    (dict(alpha=float("nan")), TypeError, r"`alpha` must be a finite number"),
    (dict(lr=0.0), ValueError, r"`lr` must be > 0"),
    (dict(lr=-1e-3), ValueError, r"`lr` must be > 0"),
    (dict(optimizer="rmsprop"), ValueError, r"`optimizer` must be one of 'sgd', 'adam'"),
    (dict(initial_losses=0.0), ValueError, r"`initial_losses` must be > 0"),
    (dict(initial_losses=[1.0, -2.0]), ValueError, r"`initial_losses\[1\]` must be > 0"),
    (dict(initial_losses={"a": 0.0, "b": 1.0}), ValueError, r"`initial_losses\['a'\]` must be > 0"),
    (dict(mode="fast"), ValueError, r"`mode` must be one of"),
    (dict(min_weight=0.0), ValueError, r"`min_weight` must be > 0"),
    (dict(betas=(0.9, 1.0)), ValueError, r"`betas` must both lie in \[0, 1\)"),
]


@pytest.mark.parametrize(("kwargs", "exc", "match"), BAD_ARGS, ids=[str(a[0]) for a in BAD_ARGS])
def test_bad_arguments_balancer(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        GradNorm(nn.Linear(2, 2), task_names=["a", "b"], **kwargs)


@pytest.mark.parametrize(("kwargs", "exc", "match"), BAD_ARGS, ids=[str(a[0]) for a in BAD_ARGS])
def test_bad_arguments_callback(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        GradNormCallback(**kwargs)


def test_initial_losses_unknown_task_balancer():
    with pytest.raises(ValueError, match=r"does not have: \['z'\]; the tasks are \['a', 'b'\]"):
        GradNorm(nn.Linear(2, 2), task_names=["a", "b"], initial_losses={"a": 1.0, "z": 2.0}, optimizer="sgd")
    with pytest.raises(ValueError, match="3 values for 2 tasks"):
        GradNorm(nn.Linear(2, 2), task_names=["a", "b"], initial_losses=[1.0, 2.0, 3.0], optimizer="sgd")
    # undeclared names: checked as soon as the names are known (the first combine)
    gn = GradNorm(nn.Linear(2, 2), initial_losses={"a": 1.0, "z": 2.0}, optimizer="sgd")
    with pytest.raises(ValueError, match=r"does not have: \['z'\]"):
        gn.combine({"a": torch.tensor(1.0), "b": torch.tensor(1.0)})


def test_callback_initial_losses_by_name_accepted_and_unknown_names_refused_at_setup():
    cb = GradNormCallback(initial_losses={"a": 0.5, "b": 0.7}, optimizer="sgd")  # valid: the model's task names
    model = Tiny()
    _fit(model, cb=cb, steps=1)
    assert cb.balancer.current_initial_losses.tolist() == pytest.approx([0.5, 0.7])
    cb3 = GradNormCallback(initial_losses=[0.5, 0.6, 0.7], optimizer="sgd")  # valid for a 3-task model
    _fit(Tiny(tasks=("a", "b", "c")), cb=cb3, steps=1)
    bad = GradNormCallback(initial_losses={"a": 0.5, "z": 0.7}, optimizer="sgd")
    model = Tiny()
    with pytest.raises(ValueError, match=r"does not have: \['z'\]; the tasks are \['a', 'b'\]"):
        _fit(model, cb=bad)
    assert model.steps_run == 0


# ---------------------------------------------------------------------- trainer-level misuse
def test_two_gradnorm_callbacks():
    # two given to Trainer(...): the package's ValueError with the fix (not Lightning's RuntimeError)
    model = Tiny()
    trainer = make_trainer(3, [GradNormCallback(optimizer="sgd"), GradNormCallback(optimizer="sgd")])
    with pytest.raises(ValueError, match=r"more than one.*GradNormCallback.*keep exactly one"):
        trainer.fit(model)
    assert model.steps_run == 0
    # a second callback added after the Trainer was built meets it too
    model = Tiny()
    trainer = make_trainer(3, [GradNormCallback(optimizer="sgd")])
    trainer.callbacks.append(GradNormCallback(optimizer="sgd"))
    with pytest.raises(ValueError, match=r"more than one.*GradNormCallback.*keep exactly one"):
        trainer.fit(model)
    assert model.steps_run == 0


def test_more_than_one_optimizer():
    model = Tiny(n_opt=2)
    with pytest.raises(ValueError, match=r"exactly one optimizer; the module configured 2"):
        _fit(model)
    assert model.steps_run == 0


def test_checkpoint_with_other_tasks_balancer():
    gn = GradNorm(nn.Linear(2, 2), task_names=["a", "b", "c"], optimizer="sgd")
    other = GradNorm(nn.Linear(2, 2), task_names=["a", "b", "x"], optimizer="sgd")
    with pytest.raises(ValueError, match=r"tasks \['a', 'b', 'c'\] differ from this model's \['a', 'b', 'x'\]"):
        other.load_state_dict(gn.state_dict())
    reordered = GradNorm(nn.Linear(2, 2), task_names=["b", "a", "c"], optimizer="sgd")
    with pytest.raises(ValueError, match="same tasks in the same order"):
        reordered.load_state_dict(gn.state_dict())


def test_checkpoint_with_other_tasks_callback(tmp_path):
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    make_trainer(2, [GradNormCallback(optimizer="sgd"), ckpt], enable_checkpointing=True).fit(FaultModule({}))

    class Other(FaultModule):
        task_names = ("a", "b", "x")

    model = Other({})
    with pytest.raises(ValueError, match=r"differ from this model's \['a', 'b', 'x'\]"):
        make_trainer(4, [GradNormCallback(optimizer="sgd")]).fit(model, ckpt_path=str(tmp_path / "last.ckpt"))


def test_initial_losses_wrong_length_callback_refused_at_setup():
    model = Tiny()
    with pytest.raises(ValueError, match="3 values for 2 tasks"):
        _fit(model, cb=GradNormCallback(initial_losses=[0.5, 0.6, 0.7], optimizer="sgd"))
    assert model.steps_run == 0


def test_no_task_at_all_before_the_names_are_known_names_the_fix():
    """A batch with no labelled task before the task names are known: say how to declare them."""
    gn = GradNorm(nn.Linear(2, 2), optimizer="sgd")
    with pytest.raises(ValueError, match=r"No task loss given.*declare them"):
        gn.combine({})


@pytest.mark.parametrize("mode", ["auto", "representation", "autograd"])
def test_shared_layer_not_in_the_forward_balancer(mode):
    gn, inp, shared, heads, x = _plain(mode=mode)
    other = nn.Linear(4, 4)
    gn = GradNorm(other, 2, mode=mode, optimizer="sgd")  # not the layer the forward uses
    z = shared(inp(x))
    losses = [heads[0](z).mean(), heads[1](z).mean()]
    with pytest.raises(ValueError, match=r"(was not called in the forward pass|does not depend on the shared layer)"):
        gn.combine(losses).backward()
    assert torch.equal(gn.weights, torch.ones(2))


def test_shared_layer_not_in_the_forward_callback():
    model = Tiny(shared="unused")
    with pytest.raises(ValueError, match=r"shared layer \(Linear\) was not called in the forward pass"):
        _fit(model)
    assert model.steps_run == 1


class _Bypass(FaultModule):
    """Returns the plain sum of the task losses: combine_task_losses is never called."""

    def training_step(self, batch, batch_idx):
        self.steps_run = getattr(self, "steps_run", 0) + 1
        x, y = make_data(self.global_step)
        return sum(self.net.losses(x, y).values())


def test_training_step_not_using_combine_task_losses():
    """The optimizer steps on a loss that never went through combine_task_losses: GradNorm would
    silently do nothing (weights stay 1); it must say so at the first step."""
    model = _Bypass({})
    with pytest.raises(ValueError, match="combine_task_losses"):
        _fit(model, steps=3)
    assert model.steps_run == 1


@pytest.mark.parametrize("views", [False, True], ids=["heads", "views"])
def test_reentrant_checkpoint_where_tasks_meet_is_refused_in_combine(views: bool) -> None:
    """Head 1 reads head 0's output, and head 0 runs under ``checkpoint(..., use_reentrant=True)``:
    that node is in the part of the graph both tasks share, and its backward refuses
    ``autograd.grad``, so no per-task gradient can cross it. Refused by ``combine``, naming the fix,
    not by torch in the middle of the model's backward."""
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(0)
    shared, h0, h1 = nn.Linear(3, 4), nn.Linear(4, 2), nn.Linear(4, 2)
    gn = GradNorm(shared, num_tasks=2)
    z = torch.tanh(shared(torch.randn(5, 3)))
    v0, v1 = gn.task_views(z) if views else (z, z)
    y0 = checkpoint(h0, v0, use_reentrant=True)
    y1 = h1(v1) + y0
    with pytest.raises(ValueError, match=r"use_reentrant=True.*several tasks' gradients meet.*use_reentrant=False"):
        gn.combine([y0.pow(2).mean(), y1.pow(2).mean()])
