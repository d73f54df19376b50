"""Lightning callbacks: GradNorm and the baselines on any ``GradNormMixin`` LightningModule.

:class:`WeightingCallback` is the wiring every strategy shares: checks in ``setup`` and
``on_fit_start``, the balancer built for the module's shared layer, the update once per
optimizer step (after the accumulated backward passes, with the GradScaler's scale and skip
flag), the non-finite gradients of absent tasks zeroed, the statistics logged on the
Trainer's logging steps (no host synchronisation on the others), warnings, and the state in
checkpoints. Each strategy's callback only names its balancer class and its arguments.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins.precision import DoublePrecision
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from typing_extensions import override

from gradnorm_lightning import _arrays
from gradnorm_lightning._checks import _check_shared_layer
from gradnorm_lightning._compat import scaler_state, should_update_logs
from gradnorm_lightning.balancers import (
    Balancer,
    DynamicWeightAverage,
    EqualWeighting,
    GradNorm,
    UncertaintyWeighting,
)
from gradnorm_lightning.balancers.interface import own_arguments
from gradnorm_lightning.lightning.mixin import GradNormMixin
from gradnorm_lightning.nonfinite import zero_nonfinite_grads_

__all__ = [
    "DWACallback",
    "EqualWeightingCallback",
    "GradNormCallback",
    "UncertaintyWeightingCallback",
    "WeightingCallback",
]

#: per-task log keys (``gradnorm/<key>/<task>``) and the statistics they show
_TASK_KEYS = (
    ("weight", "weights"),
    ("grad_norm", "grad_norms"),
    ("loss_ratio", "loss_ratios"),
    ("inverse_rate", "inverse_rates"),
    ("skipped", "skipped"),
)


class WeightingCallback(Callback):
    """The Lightning wiring of a loss-weighting strategy (subclass it and set ``balancer_cls``).

    Args:
        log: log the statistics to the Trainer's logger on its logging steps.
        sanitize_grads: zero the model's non-finite gradient entries before its optimizer
            step (:func:`~gradnorm_lightning.zero_nonfinite_grads_`). An absent task (a NaN
            loss from an empty mask, whose backward writes ``0 * inf``) is cut off by the
            balancer before its gradient meets another task's, so on the exact routes nothing
            non-finite is left from it; what remains is a real divergence, counted
            (``gradnorm/nonfinite_grad_steps``) and warned about on the next logging step. On a
            route that cannot cut an absent task off (``mode="autograd"``, or a loss node that
            several tasks share) the entries it made non-finite are zeroed, which loses what the
            present tasks contributed to them: such steps are counted
            (``gradnorm/lost_grad_steps``) and warned about, naming the tasks.
        options: the strategy's own arguments, validated now by ``balancer_cls.check_options``
            (their normalised values become attributes: ``callback.alpha``) and passed to the
            balancer built in ``setup``.

    Raises:
        TypeError: for unknown options or options of the wrong type.
        ValueError: for out-of-range options.
    """

    balancer_cls: ClassVar[type[Balancer]]

    def __init__(self, *, log: bool = True, sanitize_grads: bool = True, **options: Any) -> None:
        if isinstance(options.get("initial_losses"), Mapping):
            options["initial_losses"] = dict(options["initial_losses"])
        elif isinstance(options.get("initial_losses"), Sequence):
            options["initial_losses"] = list(options["initial_losses"])
        for name, value in self.balancer_cls.check_options(**options).items():
            setattr(self, name, value)  # the normalised settings, readable as attributes
        self.options = options
        self.log = bool(log)
        self.sanitize_grads = bool(sanitize_grads)
        self.balancer: Balancer | None = None
        self._loaded_state: dict[str, Any] | None = None
        self._nonfinite_steps: Tensor | None = None
        self._lost_steps: Tensor | None = None
        self._uncut_tasks: Tensor | None = None
        self._seen_nonfinite = 0.0
        self._seen_lost = 0.0
        self._warned: set[str] = set()
        self._set_up = False  # (see state_key)
        self._frozen = False  # (set before the balancer exists)
        self._checked_terms = False

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.options.items())})"

    @property
    def frozen(self) -> bool:
        """Whether the task weights are frozen (see :attr:`Balancer.frozen`); settable at any time,
        also before the fit (then applied when the balancer is built)."""
        return self.balancer.frozen if self.balancer is not None else self._frozen

    @frozen.setter
    def frozen(self, value: bool) -> None:
        if not isinstance(value, bool):
            raise TypeError(f"`frozen` must be True or False; got {value!r}.")
        self._frozen = value
        if self.balancer is not None:
            self.balancer.frozen = value

    @property
    @override
    def state_key(self) -> str:
        """The key of the callback's state in checkpoints: its class name, Lightning's default (so
        checkpoints of every version load). Until the callback's first ``setup`` the key is the
        instance's own (the class name and the instance's id): ``Trainer(callbacks=...)`` refuses two
        stateful callbacks with one key, and so lets two weighting callbacks through to ``setup``,
        which refuses them with the fix (one callback balances the weights of one model)."""
        name = type(self).__qualname__
        return name if self._set_up else f"{name}@{id(self):x}"

    # ------------------------------------------------------------------ checks
    def _check_module(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> GradNormMixin:
        if not isinstance(pl_module, GradNormMixin):
            raise TypeError(
                f"{type(self).__name__} needs a LightningModule that mixes in `GradNormMixin`; "
                f"{type(pl_module).__name__} does not. Declare it as "
                f"`class {type(pl_module).__name__}(GradNormMixin, L.LightningModule)`."
            )
        others = [cb for cb in trainer.callbacks if isinstance(cb, WeightingCallback) and cb is not self]  # type: ignore[attr-defined]
        if others:
            names = sorted({type(cb).__name__ for cb in [self, *others]})
            raise ValueError(
                f"The Trainer has more than one loss-weighting callback ({', '.join(names)}); keep exactly "
                "one (the weights of one model are balanced by one callback)."
            )
        return pl_module

    # ------------------------------------------------------------------ hooks
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._set_up = True
        module = self._check_module(trainer, pl_module)
        layer = _check_shared_layer(module.shared_layer(), "`shared_layer()`")
        if self.balancer is None or self.balancer.shared_layer is not layer:
            if self.balancer is not None:
                self.balancer.remove_hooks()
            self.balancer = self.balancer_cls(layer, task_names=module.declared_task_names, **self.options)
            self.balancer.frozen = self._frozen
        # Lightning converts the model to its precision after `setup`: "64-true" makes it float64,
        # and the balancer follows (before a checkpoint's state is loaded into it)
        self.balancer.set_dtype(torch.float64 if isinstance(trainer.precision_plugin, DoublePrecision)
                                else self.balancer.dtype)
        self.balancer.attach_hooks()
        if self._loaded_state is not None:
            self._load(self._loaded_state)
            self._loaded_state = None
        module.attach_task_balancer(self.balancer)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if len(trainer.optimizers) != 1:
            raise ValueError(
                f"{type(self).__name__} supports exactly one optimizer; the module configured "
                f"{len(trainer.optimizers)}. Put all parameters in one optimizer (parameter groups are fine)."
            )
        if not pl_module.automatic_optimization and trainer.accumulate_grad_batches > 1:
            raise ValueError(
                f"{type(self).__name__} does not support `accumulate_grad_batches` with manual optimization: "
                "remove `accumulate_grad_batches` from the Trainer, or accumulate by calling "
                "`optimizer.step()` every k batches yourself."
            )
        if self.balancer is not None:
            self.balancer.reset_pending()
            self.balancer.to(pl_module.device)
            self.balancer.follow_layer_dtype()  # (the model has its precision now)
        self._checked_terms = False

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        # Lightning does not call `teardown` when `fit` raises: drop the failed step's records
        # so that a retry with the same callback does not add them to its first step.
        if self.balancer is not None:
            self.balancer.reset_pending()

    @override
    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor) -> None:
        # Once per fit: a term added to `combine_task_losses(...)`'s result that reads a head's
        # activations would count into that task's norm (`extra=` keeps it out).
        if self._checked_terms or self.balancer is None:
            return
        self._checked_terms = True
        tasks = self.balancer.recorder.outside_terms(loss)
        if tasks:
            names = [self.balancer.task_names[t] for t in tasks]
            rank_zero_warn(
                f"The loss returned from `training_step` adds a term to `combine_task_losses(...)`'s result that "
                f"reads the heads of task(s) {names}: its gradient would count into their gradient norms. Pass it "
                "as `self.combine_task_losses(losses, extra=term)` instead (same model loss, exact norms)."
            )

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        balancer = self.balancer
        if balancer is None:
            return
        if not balancer.has_pending:
            raise ValueError(
                "The optimizer is stepping on a loss that did not go through `combine_task_losses`; "
                f"{type(self).__name__} has nothing to balance. Return `self.combine_task_losses(losses)` from "
                "`training_step` (manual optimization: `self.manual_backward(self.combine_task_losses(losses))`)."
            )
        grad_scale, found_inf = scaler_state(getattr(trainer.precision_plugin, "scaler", None), optimizer)
        balancer.step(grad_scale=grad_scale, found_inf=found_inf)
        if self.sanitize_grads:
            self._sanitize(pl_module, balancer, found_inf)
        if self.log and should_update_logs(trainer):
            pl_module.log_dict(self.metrics(balancer), on_step=True, on_epoch=False)
            self._warn(trainer, balancer)

    def _sanitize(self, pl_module: pl.LightningModule, balancer: Balancer, found_inf: Tensor | None) -> None:
        """Zero the model's non-finite gradients; count a divergence, or a step an absent task's
        uncut backward made lossy (no host read of a device value)."""
        found = zero_nonfinite_grads_(pl_module.parameters())
        if self._nonfinite_steps is None:
            self._nonfinite_steps = torch.zeros((), device=balancer.device)
        # on the CPU the flag is read for free: a clean step (the usual one) counts nothing
        if _arrays.host_reads_free(found.device) and not bool(found):
            return
        found = found.to(balancer.device)
        if found_inf is not None:  # (the GradScaler skips this step: an fp16 overflow, not a divergence)
            found = found & (found_inf.to(found.device) == 0)
        uncut = balancer.last_stats.get("uncut")
        if uncut is None:
            self._nonfinite_steps = self._nonfinite_steps + found
            return
        lossy = found & uncut.any()
        self._nonfinite_steps = self._nonfinite_steps + (found & ~lossy)
        self._lost_steps = lossy.to(self._nonfinite_steps.dtype) + (0 if self._lost_steps is None else self._lost_steps)
        tasks = uncut & lossy
        self._uncut_tasks = tasks if self._uncut_tasks is None else self._uncut_tasks | tasks

    def metrics(self, balancer: Balancer) -> dict[str, Tensor]:
        """The logged statistics of the last update, by log key (0-dim tensors, on the device)."""
        stats = balancer.last_stats
        metrics: dict[str, Tensor] = {}
        if balancer.objective_key is not None and "loss" in stats:
            metrics[balancer.objective_key] = stats["loss"]
        for key, stat in _TASK_KEYS:
            for name, value in zip(balancer.task_names, stats[stat].unbind()):
                metrics[f"gradnorm/{key}/{name}"] = value
        cosines = stats.get("cosines")
        if cosines is not None:  # (task_cosines=True) each pair once, a before b in task order
            names = balancer.task_names
            for a in range(len(names)):
                for b in range(a + 1, len(names)):
                    metrics[f"gradnorm/cosine/{names[a]}/{names[b]}"] = cosines[a, b]
        metrics["gradnorm/empty_steps"] = balancer.empty_steps
        metrics["gradnorm/updates"] = balancer.num_updates
        metrics["gradnorm/frozen"] = balancer.num_updates.new_tensor(float(balancer.frozen))
        if getattr(balancer, "lr_decay_rate", 1.0) != 1.0:  # (the weight optimizer's decayed learning rate)
            metrics["gradnorm/lr"] = balancer.current_lr()  # type: ignore[attr-defined]
        if balancer.uses_initial_losses:
            metrics["gradnorm/zero_initial_loss_steps"] = balancer.zero_initial_loss_steps.sum()
        if self._nonfinite_steps is not None:
            metrics["gradnorm/nonfinite_grad_steps"] = self._nonfinite_steps
            metrics["gradnorm/lost_grad_steps"] = (
                self._lost_steps if self._lost_steps is not None else torch.zeros_like(self._nonfinite_steps)
            )
        return metrics

    def _warn(self, trainer: pl.Trainer, balancer: Balancer) -> None:
        """Warnings that read counters on the host: on logging steps only, each once."""
        messages = balancer.health_warnings()
        if self._nonfinite_steps is not None:
            count = float(self._nonfinite_steps)
            if count > self._seen_nonfinite:
                self._seen_nonfinite = count
                messages.append(
                    f"The model's gradients were non-finite on {count:.0f} step(s) where no absent task can have "
                    "caused it (a divergence); `sanitize_grads` zeroed them. Lower the model's learning rate or "
                    "clip its gradients."
                )
        if self._lost_steps is not None and self._uncut_tasks is not None:
            lost = float(self._lost_steps)
            if lost > self._seen_lost:
                self._seen_lost = lost
                names = [n for n, u in zip(balancer.task_names, self._uncut_tasks.tolist()) if u]
                messages.append(
                    f"Task(s) {names} were absent from a batch with a non-finite loss whose backward wrote non-finite "
                    f"values into gradients the tasks share, on a route that cannot cut an absent task off "
                    f"(see the route in `last_stats['route']`: mode='autograd', or one loss node for several tasks); "
                    f"`sanitize_grads` zeroed those entries on {lost:.0f} step(s), and what the present tasks "
                    "contributed to them was lost. Use mode='auto', compute each task's loss as its own tensor, or "
                    "write a task without labels as `err[mask].mean()`."
                )
        for message in messages:
            key = message.split(" on ")[0]
            if key not in self._warned:
                self._warned.add(key)
                rank_zero_warn(message)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # Off the layer between fits: a balancer that is not training records nothing.
        if self.balancer is not None:
            self.balancer.remove_hooks()

    # ------------------------------------------------------------------ state
    @override
    def state_dict(self) -> dict[str, Any]:
        if self.balancer is None:
            return dict(self._loaded_state or {})
        state = self.balancer.state_dict()
        if self._nonfinite_steps is not None:
            state["nonfinite_grad_steps"] = self._nonfinite_steps.detach().clone()
        if self._lost_steps is not None:
            state["lost_grad_steps"] = self._lost_steps.detach().clone()
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self.balancer is not None:
            self._load(state_dict)
        else:
            self._loaded_state = dict(state_dict)

    def _load(self, state: dict[str, Any]) -> None:
        assert self.balancer is not None
        state = dict(state)
        nonfinite = state.pop("nonfinite_grad_steps", None)
        lost = state.pop("lost_grad_steps", None)
        self.balancer.load_state_dict(state)
        if nonfinite is not None:
            self._nonfinite_steps = nonfinite.to(self.balancer.device).clone()
            self._seen_nonfinite = float(nonfinite)
        if lost is not None:
            self._lost_steps = lost.to(self.balancer.device).clone()
            self._seen_lost = float(lost)


class GradNormCallback(WeightingCallback):
    """Balance the task losses of a :class:`~gradnorm_lightning.GradNormMixin` module with GradNorm.

    The callback builds a :class:`~gradnorm_lightning.GradNorm` balancer for the module's
    ``shared_layer()``, attaches it so that ``combine_task_losses`` uses its weights, runs the
    weight update once per optimizer step (after the accumulated backward passes, on the
    model's device, without host synchronisation) and logs, on the Trainer's logging steps:
    ``gradnorm/weight/<task>``, ``gradnorm/grad_norm/<task>``, ``gradnorm/loss_ratio/<task>``,
    ``gradnorm/inverse_rate/<task>``, ``gradnorm/skipped/<task>``, ``gradnorm/loss``,
    ``gradnorm/empty_steps``, ``gradnorm/zero_initial_loss_steps``, ``gradnorm/nonfinite_grad_steps``,
    ``gradnorm/lost_grad_steps``, ``gradnorm/updates`` (weight updates applied), ``gradnorm/frozen``
    and, when ``lr_decay_rate != 1``, ``gradnorm/lr`` (the weight optimizer's learning rate); with
    ``task_cosines=True`` also ``gradnorm/cosine/<a>/<b>`` for each pair of tasks (``a`` before ``b``
    in task order; NaN on a step where either task is absent). Its state (weights, ``L(0)``,
    weight-optimizer state, counters) is saved in checkpoints. On a logging step it warns once if
    the weights keep hitting the floor or jumping, or if a task's first loss was 0. The balancer
    follows the model's precision: float64 under ``precision="64-true"``, float32 otherwise.

    Args:
        alpha: asymmetry: how strongly slower tasks are pushed (``>= 0``; the paper uses
            0.12 for its toy and 1.5 for NYUv2).
        lr: learning rate of the weights' optimizer (``> 0``).
        optimizer: ``"adam"`` (default: steady weights whatever the losses' scales) or
            ``"sgd"`` (the paper's update, whose step scales with the gradient norms).
        weight_space: ``"linear"`` (the paper) or ``"log"`` (the update taken in ``log w``).
        initial_losses: ``L(0)``: ``None`` for the first step's losses (averaged over
            ``initial_loss_steps`` steps); a number, a list in task order or a dict by task
            name fixes them (``0.6931`` = ``ln 2`` for binary cross-entropy).
        initial_loss_steps: number of steps whose losses average into a measured ``L(0)``.
        betas: Adam's coefficients.
        eps: Adam's epsilon.
        lr_decay_rate: exponential decay of ``lr``: ``lr * rate ** (updates / lr_decay_steps)``.
        lr_decay_steps: the decay's period in weight updates.
        lr_staircase: decay in whole periods only.
        min_weight: floor of the weights before renormalisation (``> 0``).
        mode: ``"auto"``, ``"autograd"`` or ``"representation"`` (see :class:`~gradnorm_lightning.GradNorm`).
        distributed: ``"exact"`` or ``"approx"`` (see :class:`~gradnorm_lightning.GradNorm`).
        update_every: measure and update the weights on optimizer steps 0, k, 2k, ... only; the
            other steps are plain steps with the current weights.
        freeze_after: after this many applied weight updates the weights stay fixed and every
            step is a plain step (``None``: never); :attr:`WeightingCallback.frozen` can also be
            set by hand.
        task_cosines: compute and log the cosines between the tasks' gradients over the shared
            layer's parameters (see :class:`~gradnorm_lightning.GradNorm`).
        log: log the statistics to the Trainer's logger.
        sanitize_grads: see :class:`WeightingCallback`.

    Raises:
        TypeError: for arguments of the wrong type; in ``setup``, for a module without the mixin.
        ValueError: for out-of-range arguments; in ``setup``/``on_fit_start``, for a shared
            layer without trainable parameters, a second weighting callback, more than one
            optimizer, or accumulation under manual optimization.

    Example::

        >>> import lightning as L
        >>> trainer = L.Trainer(callbacks=[GradNormCallback(alpha=1.5, lr=0.025, optimizer="adam")])
    """

    balancer_cls = GradNorm

    def __init__(
        self,
        alpha: float = 1.5,
        lr: float = 0.01,
        optimizer: str = "adam",
        weight_space: str = "linear",
        initial_losses: float | Sequence[float] | Mapping[str, float] | None = None,
        initial_loss_steps: int = 1,
        betas: tuple[float, float] | Sequence[float] = (0.9, 0.999),
        eps: float = 1e-8,
        lr_decay_rate: float = 1.0,
        lr_decay_steps: int = 1,
        lr_staircase: bool = False,
        min_weight: float = 1e-4,
        mode: str = "auto",
        distributed: str = "exact",
        update_every: int = 1,
        freeze_after: int | None = None,
        task_cosines: bool = False,
        log: bool = True,
        sanitize_grads: bool = True,
    ) -> None:
        super().__init__(log=log, sanitize_grads=sanitize_grads, **own_arguments(locals(), "log", "sanitize_grads"))


class EqualWeightingCallback(WeightingCallback):
    """Equal weighting as a callback, logging the same per-task ``gradnorm/...`` keys as GradNorm.

    Args:
        track_grad_norms: measure and log the per-task gradient norms.
        mode: how norms are measured (see :class:`~gradnorm_lightning.GradNorm`).
        distributed: ``"exact"`` or ``"approx"``.
        log: log the statistics.
        sanitize_grads: see :class:`WeightingCallback`.

    Example::

        >>> import lightning as L
        >>> trainer = L.Trainer(callbacks=[EqualWeightingCallback()])
    """

    balancer_cls = EqualWeighting

    def __init__(self, track_grad_norms: bool = True, mode: str = "auto", distributed: str = "exact",
                 log: bool = True, sanitize_grads: bool = True) -> None:
        super().__init__(log=log, sanitize_grads=sanitize_grads, **own_arguments(locals(), "log", "sanitize_grads"))


class UncertaintyWeightingCallback(WeightingCallback):
    """Uncertainty weighting (Kendall et al., 2018) as a callback; its objective is logged as ``uncertainty/loss``.

    Args:
        lr: learning rate of the log-variances.
        optimizer: ``"adam"`` or ``"sgd"``.
        init_log_var: initial log-variance.
        betas: Adam's coefficients.
        eps: Adam's epsilon.
        track_grad_norms: measure and log the per-task gradient norms.
        mode: how norms are measured.
        distributed: ``"exact"`` or ``"approx"``.
        log: log the statistics.
        sanitize_grads: see :class:`WeightingCallback`.

    Example::

        >>> import lightning as L
        >>> trainer = L.Trainer(callbacks=[UncertaintyWeightingCallback(lr=0.01)])
    """

    balancer_cls = UncertaintyWeighting

    def __init__(
        self,
        lr: float = 0.01,
        optimizer: str = "adam",
        init_log_var: float = 0.0,
        betas: tuple[float, float] | Sequence[float] = (0.9, 0.999),
        eps: float = 1e-8,
        track_grad_norms: bool = True,
        mode: str = "auto",
        distributed: str = "exact",
        log: bool = True,
        sanitize_grads: bool = True,
    ) -> None:
        super().__init__(log=log, sanitize_grads=sanitize_grads, **own_arguments(locals(), "log", "sanitize_grads"))


class DWACallback(WeightingCallback):
    """Dynamic Weight Average (Liu et al., 2019) as a callback.

    Args:
        temperature: softmax temperature.
        window: steps per averaging window (the steps of an epoch reproduce the paper).
        track_grad_norms: measure and log the per-task gradient norms.
        mode: how norms are measured.
        distributed: ``"exact"`` or ``"approx"``.
        log: log the statistics.
        sanitize_grads: see :class:`WeightingCallback`.

    Example::

        >>> import lightning as L
        >>> trainer = L.Trainer(callbacks=[DWACallback(temperature=2.0, window=50)])
    """

    balancer_cls = DynamicWeightAverage

    def __init__(self, temperature: float = 2.0, window: int = 1, track_grad_norms: bool = True, mode: str = "auto",
                 distributed: str = "exact", log: bool = True, sanitize_grads: bool = True) -> None:
        super().__init__(log=log, sanitize_grads=sanitize_grads, **own_arguments(locals(), "log", "sanitize_grads"))
