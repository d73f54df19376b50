"""Issue 6 helpers: a tiny float64 multi-task LightningModule with scheduled faults, and an
independent float64 textbook GradNorm run of the same model on the same data.

The data of optimizer step ``t`` is a function of ``t`` alone (not of the dataloader's
position), so a run resumed mid-epoch sees exactly the batches an uninterrupted run sees.

A fault schedule maps a global step to ``{task: kind}``:

* ``"nan"`` / ``"inf"``: the loss becomes ``loss + nan`` / ``loss + inf`` (no NaN reaches the
  model's gradient: the absent branch of the combine gets a zero gradient, ``0 * 1``);
* ``"nan_mul"``: the loss becomes ``loss * nan``: its backward computes ``0 * nan = nan`` in
  the task's head and the trunk (only ``sanitize_grads`` keeps the model finite);
* ``"const_nan"``: the loss is a constant NaN tensor (no graph), a common "no labels" idiom;
* ``"drop"``: the task is missing from the dict passed to ``combine_task_losses``.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from gradnorm_lightning import GradNormMixin

from .floor import floored

TASKS = ("a", "b", "c")
DTYPE = torch.float64
BATCH = 16
D_IN = 4
HIDDEN = 8
# Targets of very different scales so that the weights move visibly.
SCALES = (1.0, 4.0, 0.3)

Faults = Mapping[int, Mapping[str, str]]


def make_data(step: int) -> tuple[Tensor, Tensor]:
    """The batch of optimizer step ``step`` (deterministic, float64)."""
    gen = torch.Generator().manual_seed(10_000 + step)
    x = torch.randn(BATCH, D_IN, generator=gen, dtype=DTYPE)
    cols = [
        SCALES[0] * torch.sin(x[:, 0] + x[:, 1]),
        SCALES[1] * (x[:, 2] * x[:, 3]),
        SCALES[2] * torch.tanh(x[:, 0] - x[:, 3]),
    ]
    noise = 0.05 * torch.randn(BATCH, len(TASKS), generator=gen, dtype=DTYPE)
    return x, torch.stack(cols, dim=1) + noise


def random_faults(
    seed: int, steps: int, kinds: Sequence[str], rate: float = 0.3, all_absent_step: int | None = None
) -> dict[int, dict[str, str]]:
    """Seeded random faults: each (step, task) is hit with probability ``rate``.

    At least one task stays present on every step (except ``all_absent_step``, where every
    task gets a non-finite loss).
    """
    rng = random.Random(seed)
    faults: dict[int, dict[str, str]] = {}
    for step in range(steps):
        hit = {t: rng.choice(list(kinds)) for t in TASKS if rng.random() < rate}
        if len(hit) == len(TASKS):
            hit.pop(rng.choice(TASKS))
        if hit:
            faults[step] = hit
    if all_absent_step is not None:
        faults[all_absent_step] = {t: ("nan" if i % 2 == 0 else "inf") for i, t in enumerate(TASKS)}
    return faults


class Net(nn.Module):
    """trunk -> shared Linear -> tanh -> one Linear head per task."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        gen_state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        self.inp = nn.Linear(D_IN, HIDDEN)
        self.shared = nn.Linear(HIDDEN, HIDDEN)
        self.heads = nn.ModuleDict({t: nn.Linear(HIDDEN, 1) for t in TASKS})
        torch.random.set_rng_state(gen_state)
        self.to(DTYPE)

    def losses(self, x: Tensor, y: Tensor, views: Mapping[str, Tensor] | None = None) -> dict[str, Tensor]:
        z = self.rep(x)
        reps = views if views is not None else dict.fromkeys(TASKS, z)
        return {
            t: nn.functional.mse_loss(self.heads[t](reps[t]).squeeze(1), y[:, i]) for i, t in enumerate(TASKS)
        }

    def rep(self, x: Tensor) -> Tensor:
        return torch.tanh(self.shared(torch.tanh(self.inp(x))))


def apply_faults(losses: dict[str, Tensor], faults: Mapping[str, str]) -> dict[str, Tensor]:
    out = {}
    for t, loss in losses.items():
        kind = faults.get(t)
        if kind == "drop":
            continue
        if kind == "nan":
            loss = loss + float("nan")
        elif kind == "inf":
            loss = loss + float("inf")
        elif kind == "nan_mul":
            loss = loss * float("nan")
        elif kind == "const_nan":  # a placeholder for "no labels": no graph at all
            loss = torch.full_like(loss.detach(), float("nan"))
        elif kind is not None:
            raise ValueError(kind)
        out[t] = loss
    return out


def present_mask(faults: Mapping[str, str]) -> list[bool]:
    return [t not in faults for t in TASKS]


class FaultModule(GradNormMixin, L.LightningModule):
    """The Lightning version of :class:`Net`, faults applied from ``self.global_step``."""

    task_names = TASKS

    def __init__(
        self,
        faults: Faults,
        model_lr: float = 0.05,
        crash_at: int | None = None,
        seed: int = 0,
        views: bool = False,
        declare: bool = True,
        per_call: bool = False,
        crash_where: str = "start",
    ):
        super().__init__()
        self.crash_where = crash_where  # "start", "after_forward" or "after_backward" of training_step
        # per_call: data and faults keyed by the training_step call (micro-batch) count instead
        # of the optimizer step (gradient accumulation runs several calls per step)
        self.per_call = per_call
        self.calls = 0
        if not declare:
            self.task_names = None
        self.views = views
        self.net = Net(seed)
        self.faults = {int(k): dict(v) for k, v in faults.items()}
        self.model_lr = model_lr
        self.crash_at = crash_at

    def shared_layer(self) -> nn.Module:
        return self.net.shared

    def training_step(self, batch: object, batch_idx: int) -> Tensor:
        step = self.calls if self.per_call else self.global_step
        self.calls += 1
        if self._crash_now("start"):
            raise RuntimeError(f"injected crash at step {step}")
        x, y = make_data(step)
        if self.views:  # each head reads its own alias of the representation
            raw = self.net.losses(x, y, self.task_views(self.net.rep(x)))
        else:
            raw = self.net.losses(x, y)
        if self._crash_now("after_forward"):
            raise RuntimeError(f"injected crash at step {step}")
        losses = apply_faults(raw, self.faults.get(step, {}))
        return self.combine_task_losses(losses)

    def _crash_now(self, where: str) -> bool:
        return self.crash_at is not None and self.global_step == self.crash_at and self.crash_where == where

    def on_after_backward(self) -> None:
        if self._crash_now("after_backward"):
            raise RuntimeError(f"injected crash at step {self.global_step}")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.model_lr)

    def train_dataloader(self) -> DataLoader:
        # 4 batches per epoch; the content is ignored (see make_data).
        return DataLoader(TensorDataset(torch.zeros(4, 1)), batch_size=1)


class WeightRecorder(Callback):
    """Records the GradNorm weights after every optimizer step (``weights[t]`` = w(t+1))."""

    def __init__(self) -> None:
        self.weights: list[Tensor] = []
        self.params_finite: list[bool] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # type: ignore[no-untyped-def]
        gn = next(cb for cb in trainer.callbacks if hasattr(cb, "balancer"))
        self.weights.append(gn.balancer.weights.detach().clone())
        self.params_finite.append(all(bool(torch.isfinite(p).all()) for p in pl_module.parameters()))


def make_trainer(max_steps: int, callbacks: list[Callback], **kwargs: object) -> L.Trainer:
    defaults: dict[str, object] = dict(
        max_steps=max_steps,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
    )
    defaults.update(kwargs)
    return L.Trainer(callbacks=callbacks, **defaults)  # type: ignore[arg-type]


# ---------------------------------------------------------------------- the reference
def textbook_run(
    faults: Faults,
    steps: int,
    *,
    alpha: float,
    lr: float,
    model_lr: float = 0.05,
    min_weight: float = 1e-4,
    seed: int = 0,
) -> tuple[list[Tensor], Net]:
    """The textbook GradNorm (create_graph double backward into ``w``) with absent tasks.

    Per step: the model loss is ``sum_{i present} w_i L_i``; the norms ``G_i`` are those of
    ``autograd.grad(w_i L_i, W, create_graph=True)`` over the shared layer's parameters for the
    present tasks; ``r_i`` and ``mean(G)`` run over the present tasks; ``L_grad`` is
    back-propagated into ``w``; plain SGD on the present weights, clamp at ``min_weight``,
    renormalise the present weights to ``T - sum(absent weights)``. ``L_i(0)`` is the loss at the
    task's first present step. A step with no present task changes nothing.

    Returns the weights after every step and the trained model.
    """
    net = Net(seed)
    opt = torch.optim.SGD(net.parameters(), lr=model_lr)
    shared = list(net.shared.parameters())
    num = len(TASKS)
    w_now = torch.ones(num, dtype=DTYPE)
    l0: list[float | None] = [None] * num
    history = []
    for step in range(steps):
        x, y = make_data(step)
        raw = net.losses(x, y)
        pres = present_mask(faults.get(step, {}))
        # "nan"/"inf" faults make the loss non-finite; the textbook simply leaves them out.
        idx = [i for i in range(num) if pres[i]]
        opt.zero_grad()
        if not idx:
            history.append(w_now.clone())
            continue
        w = w_now.clone().requires_grad_(True)
        for i in idx:
            if l0[i] is None:
                l0[i] = float(raw[TASKS[i]].detach())
        norms = []
        for i in idx:
            grads = torch.autograd.grad(w[i] * raw[TASKS[i]], shared, retain_graph=True, create_graph=True)
            norms.append(torch.sqrt(sum((g * g).sum() for g in grads)))
        big_g = torch.stack(norms)
        ratios = torch.tensor([float(raw[TASKS[i]].detach()) / l0[i] for i in idx], dtype=DTYPE)  # type: ignore[operator]
        rates = ratios / ratios.mean()
        target = (big_g.mean() * rates**alpha).detach()
        l_grad = (big_g - target).abs().sum()
        (w_grad,) = torch.autograd.grad(l_grad, w, retain_graph=True)
        # the model's own step on the weighted loss (weights as constants)
        model_loss = sum(w_now[i] * raw[TASKS[i]] for i in idx)
        model_loss.backward()  # type: ignore[union-attr]
        opt.step()
        stepped = w.detach() - lr * w_grad
        new = w_now.clone()
        absent_sum = sum(float(w_now[i]) for i in range(num) if not pres[i])
        new[idx] = floored(stepped[idx], num - absent_sum, min_weight)
        w_now = new
        history.append(w_now.clone())
    return history, net
