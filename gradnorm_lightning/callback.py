"""`GradNormCallback`: GradNorm task weighting for any `GradNormMixin` LightningModule."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor
from typing_extensions import override

from gradnorm_lightning._checks import _check_shared_layer
from gradnorm_lightning.balancer import GradNorm
from gradnorm_lightning.mixin import GradNormMixin

__all__ = ["GradNormCallback"]

_STAT_KEYS = (
    ("weight", "weights"),
    ("grad_norm", "grad_norms"),
    ("loss_ratio", "loss_ratios"),
    ("inverse_rate", "inverse_rates"),
    ("skipped", "skipped"),
)


class _WeightingCallback(Callback):
    """Shared Lightning wiring of every loss-weighting strategy: checks, hooks, logging, state."""

    balancer: GradNorm | None
    log: bool
    sanitize_grads: bool
    _loaded_state: dict[str, Any] | None

    def _make_balancer(self, layer: torch.nn.Module, task_names: tuple[str, ...] | None) -> GradNorm:
        raise NotImplementedError

    # ------------------------------------------------------------------ checks
    def _check_module(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not isinstance(pl_module, GradNormMixin):
            raise TypeError(
                f"{type(self).__name__} needs a LightningModule that mixes in `GradNormMixin`; "
                f"{type(pl_module).__name__} does not. Declare it as "
                f"`class {type(pl_module).__name__}(GradNormMixin, L.LightningModule)`."
            )
        others = [cb for cb in trainer.callbacks if isinstance(cb, _WeightingCallback) and cb is not self]  # type: ignore[attr-defined]
        if others:
            names = sorted({type(cb).__name__ for cb in [self, *others]})
            raise ValueError(
                f"The Trainer has more than one loss-weighting callback ({', '.join(names)}); keep exactly "
                "one (the weights of one model are balanced by one callback)."
            )

    # ------------------------------------------------------------------ hooks
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._check_module(trainer, pl_module)
        assert isinstance(pl_module, GradNormMixin)  # narrowed by _check_module
        layer = _check_shared_layer(pl_module.shared_layer(), "`shared_layer()`")
        if self.balancer is None or self.balancer.shared_layer is not layer:
            if self.balancer is not None:
                self.balancer.remove_hooks()
            self.balancer = self._make_balancer(layer, pl_module._declared_task_names())
        self.balancer.attach_hooks()
        if self._loaded_state is not None:
            self.balancer.load_state_dict(self._loaded_state)
            self._loaded_state = None
        pl_module._attach_balancer(self.balancer)

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

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        # Lightning does not call `teardown` when `fit` raises: drop the failed step's records
        # so that a retry with the same callback does not add them to its first step.
        if self.balancer is not None:
            self.balancer.reset_pending()

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        balancer = self.balancer
        if balancer is None:
            return
        grad_scale, found_inf = _scaler_state(trainer, optimizer)
        if balancer._pending is None:
            raise ValueError(
                "The optimizer is stepping on a loss that did not go through `combine_task_losses`; "
                f"{type(self).__name__} has nothing to balance. Return `self.combine_task_losses(losses)` from "
                "`training_step` (manual optimization: `self.manual_backward(self.combine_task_losses(losses))`)."
            )
        balancer.step(grad_scale=grad_scale, found_inf=found_inf)
        if self.sanitize_grads:
            _zero_nonfinite_grads(pl_module)
        if self.log and (trainer._logger_connector.should_update_logs or bool(getattr(trainer, "fast_dev_run", False))):
            pl_module.log_dict(self._metrics(balancer), on_step=True, on_epoch=False)

    @staticmethod
    def _metrics(balancer: GradNorm) -> dict[str, Tensor]:
        stats = balancer.last_stats
        metrics: dict[str, Tensor] = {"gradnorm/loss": stats["loss"]}
        for key, stat in _STAT_KEYS:
            for name, value in zip(balancer.task_names, stats[stat].unbind()):
                metrics[f"gradnorm/{key}/{name}"] = value
        return metrics

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # Off the layer between fits: a balancer that is not training records nothing.
        if self.balancer is not None:
            self.balancer.remove_hooks()

    # ------------------------------------------------------------------ state
    @override
    def state_dict(self) -> dict[str, Any]:
        if self.balancer is not None:
            return self.balancer.state_dict()
        return dict(self._loaded_state or {})

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self.balancer is not None:
            self.balancer.load_state_dict(state_dict)
        else:
            self._loaded_state = dict(state_dict)


class GradNormCallback(_WeightingCallback):
    """Balance the task losses of a :class:`~gradnorm_lightning.GradNormMixin` module with GradNorm.

    The callback builds a :class:`~gradnorm_lightning.GradNorm` balancer for the module's
    ``shared_layer()``, attaches it so that ``combine_task_losses`` uses its weights, runs the
    weight update once per optimizer step (after the accumulated backward passes, on the
    model's device, without host synchronisation) and logs, on the Trainer's logging steps:
    ``gradnorm/weight/<task>``, ``gradnorm/grad_norm/<task>``, ``gradnorm/loss_ratio/<task>``,
    ``gradnorm/inverse_rate/<task>``, ``gradnorm/skipped/<task>`` and ``gradnorm/loss``.
    Its state (weights, ``L(0)``, weight-optimizer state, counters) is saved in checkpoints.

    Args:
        alpha: asymmetry: how strongly slower tasks are pushed (``>= 0``; the paper uses
            0.12 for its toy and 1.5 for NYUv2).
        lr: learning rate of the weights' optimizer (``> 0``).
        optimizer: ``"sgd"`` (the paper) or ``"adam"``.
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
        mode: ``"auto"``, ``"autograd"`` or ``"representation"`` (see :class:`GradNorm`).
        distributed: ``"exact"`` or ``"approx"`` (see :class:`GradNorm`).
        log: log the statistics to the Trainer's logger.
        sanitize_grads: zero the model's non-finite gradient entries before its optimizer step.
            An absent task (non-finite loss) can leave them through ``0 * inf`` in its own
            backward; without this they would reach the parameters. Costs one in-place
            elementwise pass over the gradients per step. Under fp16 AMP the GradScaler has
            already recorded the overflow by then, so its skip logic is unaffected.

    Raises:
        TypeError: for arguments of the wrong type; in ``setup``, for a module without the mixin.
        ValueError: for out-of-range arguments; in ``setup``/``on_fit_start``, for a shared
            layer without trainable parameters, a second GradNormCallback, more than one
            optimizer, or accumulation under manual optimization. (A second callback given to
            ``Trainer(callbacks=...)`` is already refused by Lightning with a ``RuntimeError``.)

    Example::

        >>> import lightning as L
        >>> trainer = L.Trainer(callbacks=[GradNormCallback(alpha=1.5, lr=0.025, optimizer="sgd")])
    """

    def __init__(
        self,
        alpha: float = 1.5,
        lr: float = 0.025,
        optimizer: str = "sgd",
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
        log: bool = True,
        sanitize_grads: bool = True,
    ) -> None:
        if isinstance(initial_losses, Mapping):
            initial_losses = dict(initial_losses)
        elif isinstance(initial_losses, Sequence) and not isinstance(initial_losses, str):
            initial_losses = list(initial_losses)
        self._kwargs: dict[str, Any] = dict(
            alpha=alpha, lr=lr, optimizer=optimizer, initial_losses=initial_losses,
            initial_loss_steps=initial_loss_steps, betas=tuple(betas), eps=eps,
            lr_decay_rate=lr_decay_rate, lr_decay_steps=lr_decay_steps, lr_staircase=lr_staircase,
            min_weight=min_weight, mode=mode, distributed=distributed,
        )
        # Validate every argument now, with the balancer's own checks; the task names and the
        # number of fixed initial losses are checked against the model's tasks in `setup`.
        probe = GradNorm(torch.nn.Linear(1, 1), **self._kwargs)
        probe.remove_hooks()
        self.alpha = probe.alpha
        self.lr = probe.lr
        self.optimizer = probe.optimizer
        self.initial_losses = initial_losses
        self.initial_loss_steps = probe.initial_loss_steps
        self.betas = probe.betas
        self.eps = probe.eps
        self.lr_decay_rate = probe.lr_decay_rate
        self.lr_decay_steps = probe.lr_decay_steps
        self.lr_staircase = probe.lr_staircase
        self.min_weight = probe.min_weight
        self.mode = probe.mode
        self.distributed = probe.distributed
        self.log = bool(log)
        self.sanitize_grads = bool(sanitize_grads)
        self.balancer: GradNorm | None = None
        self._loaded_state: dict[str, Any] | None = None

    def _make_balancer(self, layer: torch.nn.Module, task_names: tuple[str, ...] | None) -> GradNorm:
        return GradNorm(layer, task_names=task_names, **self._kwargs)


def _scaler_state(trainer: pl.Trainer, optimizer: torch.optim.Optimizer) -> tuple[Tensor | None, Tensor | None]:
    """The GradScaler's scale and found-inf flag as device tensors (no host sync), if fp16 AMP."""
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    if scaler is None or not scaler.is_enabled():
        return None, None
    scale = scaler._get_scale_async() if hasattr(scaler, "_get_scale_async") else None
    if scale is None:
        scale = torch.tensor(scaler.get_scale())
    found = None
    states = getattr(scaler, "_per_optimizer_states", {})
    per_device = states.get(id(optimizer), {}).get("found_inf_per_device", {}) if id(optimizer) in states else {}
    if per_device:
        found = sum(v.to(scale.device) for v in per_device.values())
    return scale, found


def _zero_nonfinite_grads(module: torch.nn.Module) -> None:
    """Replace non-finite gradient entries by zero, in place (one kernel per gradient).

    Unconditional rather than gated on "some task was absent" because a gated version costs
    several kernels per gradient every step; the gradients it changes were non-finite, so
    the optimizer step would have written NaN/Inf into the parameters.
    """
    for p in module.parameters():
        if p.grad is not None:
            p.grad.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
