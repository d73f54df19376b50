"""The base of every loss-weighting strategy: tasks, state, ``combine`` and ``step``.

A strategy is a :class:`Balancer` subclass that implements one method, :meth:`Balancer.propose`:
given one optimizer step's :class:`StepInputs` it returns a :class:`Proposal` (new weights,
which tasks' statistics were valid, its own objective, its own state). Everything else is
here once: task names (fixed once), the state tensors (declared once, for ``to``,
``state_dict`` and pickling), ``L(0)``, absent tasks, the combined loss, and the commit, which
applies a proposal only when it is valid, on the device, without reading a value on the host.
The per-task statistics come from a :class:`~gradnorm_lightning.capture.Recorder` handed in
(or built from ``mode``/``distributed``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from gradnorm_lightning import _arrays
from gradnorm_lightning import functional as F
from gradnorm_lightning._arrays import TORCH, ArrayOps
from gradnorm_lightning._checks import (
    DISTRIBUTED_MODES,
    MODES,
    _check_initial_losses,
    _check_positive,
    _check_shared_layer,
    _check_task_names,
    _choice,
    _flag,
    _integer,
)
from gradnorm_lightning.balancers._losses import LossesLike, normalize_losses
from gradnorm_lightning.balancers._state import TaskState
from gradnorm_lightning.balancers.interface import Proposal, StepInputs
from gradnorm_lightning.capture import Recorder
from gradnorm_lightning.capture.recorder import Statistics, shared_modules

__all__ = ["Balancer", "Proposal", "StepInputs"]


def _no_task_message(names: Sequence[str]) -> str:
    return (
        f"No task loss given and the task names are not known yet ({list(names)}): declare them "
        "(`task_names=`, or the mixin's `task_names`) so that a batch without any label can be skipped."
    )


class Balancer(TaskState):
    """The base of the loss-weighting strategies (see the module docstring).

    Args:
        shared_layer: the last layer shared by all tasks, or several modules (a list, a tuple or
            an ``nn.ModuleList``): the norms run over all their trainable parameters.
        num_tasks: number of tasks ``T`` (named ``task0``, ``task1``, ...).
        task_names: the task names in weight order; alternative to ``num_tasks``. With
            neither, the names come from the first dict of losses.
        initial_losses: ``L(0)``: ``None`` to measure it (the mean over the first
            ``initial_loss_steps`` steps each task is present in); a number, a sequence in task
            order or a mapping by name fixes it (tasks a mapping leaves out are measured).
        initial_loss_steps: how many steps a measured ``L(0)`` averages.
        mode: how the per-task norms are measured: ``"auto"``, ``"autograd"`` or ``"representation"``.
        distributed: ``"exact"`` or ``"approx"`` reduction over processes.
        track_grad_norms: measure the per-task gradient norms (strategies that do not need
            them may turn this off; then ``grad_norms`` are NaN).
        recorder: a recorder to use instead of building one from ``mode``/``distributed``.
        task_cosines: also compute the cosines between the tasks' gradients over the shared
            layer's trainable parameters (``last_stats["cosines"]``, ``(T, T)``; see
            :class:`~gradnorm_lightning.capture.Statistics`).

    Raises:
        TypeError: for arguments of the wrong type.
        ValueError: for out-of-range arguments, fewer than two tasks, or a shared layer
            without trainable parameters.
    """

    #: whether the strategy's update uses the gradient norms
    needs_norms: ClassVar[bool] = True
    #: the log key of the strategy's objective (``None``: it has none)
    objective_key: ClassVar[str | None] = None
    #: whether :meth:`propose` also takes the host path's Python vectors (``inputs.ops`` names
    #: the kind): then, on the CPU, the update runs in Python numbers, several times cheaper
    #: than torch's small-tensor calls
    host_update: ClassVar[bool] = False
    #: option name -> checker returning the normalised value (each class adds its own)
    _option_checks: ClassVar[dict[str, Callable[[Any], Any]]] = {
        "initial_losses": _check_initial_losses,
        "initial_loss_steps": _integer("initial_loss_steps"),
        "mode": _choice("mode", MODES),
        "distributed": _choice("distributed", DISTRIBUTED_MODES),
        "track_grad_norms": _flag,
        "task_cosines": _flag,
    }

    @classmethod
    def check_options(cls, **options: Any) -> dict[str, Any]:
        """Validate a strategy's options without building it (the callbacks use this).

        Args:
            options: keyword arguments of the strategy's constructor (without the layer,
                the task names and the recorder).

        Returns:
            The options, normalised (e.g. ``optimizer="Adam"`` -> ``"adam"``).

        Raises:
            TypeError: for an unknown option or a value of the wrong type.
            ValueError: for an out-of-range value.
        """
        checks: dict[str, Callable[[Any], Any]] = {}
        for klass in reversed(cls.__mro__):
            checks.update(vars(klass).get("_option_checks", {}))
        unknown = sorted(set(options) - set(checks))
        if unknown:
            raise TypeError(f"{cls.__name__} got unexpected argument(s) {unknown}; its options are {sorted(checks)}.")
        return {name: checks[name](value) for name, value in options.items()}

    def __init__(
        self,
        shared_layer: nn.Module,
        num_tasks: int | None = None,
        *,
        task_names: Sequence[str] | None = None,
        initial_losses: float | Sequence[float] | Mapping[str, float] | None = None,
        initial_loss_steps: int = 1,
        mode: str = "auto",
        distributed: str = "exact",
        track_grad_norms: bool = True,
        recorder: Recorder | None = None,
        task_cosines: bool = False,
    ) -> None:
        self.shared_layer = _check_shared_layer(shared_layer)
        base = self.check_options(
            initial_losses=initial_losses, initial_loss_steps=initial_loss_steps, mode=mode,
            distributed=distributed, track_grad_norms=track_grad_norms, task_cosines=task_cosines,
        )
        self.task_cosines: bool = base["task_cosines"]
        self.initial_losses = base["initial_losses"]
        self.initial_loss_steps: int = base["initial_loss_steps"]
        self.mode: str = base["mode"]
        self.distributed: str = base["distributed"]
        self.track_grad_norms: bool = base["track_grad_norms"]
        params = [p for m in shared_modules(self.shared_layer) for p in m.parameters() if p.requires_grad]
        self.dtype = torch.float64 if params[0].dtype == torch.float64 else torch.float32
        self.device = params[0].device
        self.recorder = recorder if recorder is not None else Recorder(
            shared_layer, mode=self.mode, distributed=self.distributed,
            measure_norms=self.needs_norms or self.track_grad_norms or self.task_cosines,
            task_cosines=self.task_cosines,
        )
        names: tuple[str, ...] | None = None
        if task_names is not None:
            names = _check_task_names(task_names)
            if num_tasks is not None and num_tasks != len(names):
                raise ValueError(f"`num_tasks` ({num_tasks}) does not match `task_names` ({len(names)} names).")
        elif num_tasks is not None:
            _check_positive("num_tasks", num_tasks, integer=True)
            names = _check_task_names([f"task{i}" for i in range(num_tasks)])
        if isinstance(self.initial_losses, tuple) and names is not None and len(self.initial_losses) != len(names):
            raise ValueError(f"`initial_losses` has {len(self.initial_losses)} values for {len(names)} tasks.")
        self._task_names: tuple[str, ...] | None = None
        self._state_names: tuple[str, ...] = ()
        self.steps = 0
        self.last_stats: dict[str, Any] = {}
        if names is not None:
            self._init_tasks(names)

    # ------------------------------------------------------------------ what a strategy adds
    def propose(self, inputs: StepInputs) -> Proposal:
        """The strategy's update rule: the one method a strategy implements.

        Args:
            inputs: the step's statistics.

        Returns:
            The proposed weights, validity, objective and new state.
        """
        raise NotImplementedError

    def options(self) -> dict[str, Any]:
        """The strategy's settings (for ``repr`` and logs)."""
        return {"mode": self.mode}

    # ------------------------------------------------------------------ hooks
    def attach_hooks(self) -> None:
        """Put the recorder's forward hook on the shared layer (after :meth:`remove_hooks`)."""
        self.recorder.attach()

    def remove_hooks(self) -> None:
        """Take the recorder off the shared layer and drop what it recorded."""
        self.recorder.detach()

    def reset_pending(self) -> None:
        """Forget what forward and backward passes recorded since the last :meth:`step`.

        Call it after an exception between a forward and :meth:`step`, or to discard an
        accumulation window; the callback does so when a fit starts or fails.
        """
        self.recorder.reset()

    @property
    def has_pending(self) -> bool:
        """Whether a combined loss was recorded since the last :meth:`step`."""
        return self.recorder.pending

    # ------------------------------------------------------------------ forward side
    def task_views(self, z: Tensor) -> tuple[Tensor, ...]:
        """One alias of the shared representation ``z`` per task, in task order.

        When head ``i`` reads only the ``i``-th view, the per-task gradients are handed over
        during the model's own backward, with no walk of the graph and no extra pass. ``z`` is
        the shared layer's output or anything computed from it by shared, parameter-free
        operations (an activation, a reshape).

        Args:
            z: the shared representation.

        Returns:
            ``T`` views of ``z`` (plain views when gradients are off, e.g. in validation).
        """
        return self.recorder.views(z, self.num_tasks)

    def combine(self, losses: LossesLike, extra: Tensor | None = None) -> Tensor:
        """The model loss ``sum_i w_i L_i`` with the current weights (plus ``extra``).

        A task that is missing (absent from the dict, or ``None``), whose loss is not finite,
        or whose loss does not require grad while gradients are on (a ``NaN`` placeholder) is
        left out of the sum and of this step's update; its weight is kept. When no task has a
        loss at all, the result is a zero that requires grad but reaches no parameter: its
        backward leaves every gradient ``None``, so the optimizers skip every parameter, and
        :meth:`step` counts the step as empty.

        Args:
            losses: a 1-D tensor of ``T`` losses, a sequence of ``T`` scalar tensors (``None``
                for a missing task) or a mapping from task name to scalar tensor.
            extra: a loss term outside the balancing (an auxiliary loss, a regulariser), added
                with the weight you gave it: ``combine(losses, extra=0.1 * aux)``. Added here
                rather than to the result, its gradient is kept out of the tasks' gradient norms
                even where it reads a head's own activations.

        Returns:
            The combined loss, a 0-dim tensor.

        Raises:
            TypeError: losses that are not floating-point tensors.
            ValueError: non-scalar losses, a wrong number of losses, unknown task names, a
                finite loss that does not require grad, or a loss that does not depend on the
                shared layer.
        """
        if isinstance(losses, Mapping) and not losses and self._task_names is None:
            raise ValueError(_no_task_message(()))
        items = normalize_losses(losses, self._task_names, lambda names: self._init_tasks(_check_task_names(names)))
        grad_on = torch.is_grad_enabled()
        for name, loss in zip(self.task_names, items):
            # A constant loss (metadata check first: healthy steps never read a value) is
            # absent when non-finite (the usual "no labels" placeholder), a misuse when finite.
            if loss is not None and grad_on and not loss.requires_grad and bool(torch.isfinite(loss).all()):
                raise ValueError(
                    f"The loss of task {name!r} does not require grad, so it does not depend on the shared "
                    "layer (computed under no_grad, or detached?). For a task without labels in this batch, "
                    "leave it out of the dict or pass None or NaN."
                )
        items = [loss if loss is not None and (loss.requires_grad or not grad_on) else None for loss in items]
        live = [loss for loss in items if loss is not None]
        # The state is never written in place (every update makes new tensors), so the model
        # loss can use the weights as they are: the graph keeps this step's values.
        weights = self.weights.detach()
        if extra is not None and (not isinstance(extra, Tensor) or extra.numel() != 1
                                  or not extra.is_floating_point()):
            raise TypeError(f"`extra` must be a scalar floating-point tensor; got {extra!r}.")
        if not live:
            empty = self._empty_step(weights)
            return empty if extra is None else empty + extra.reshape(())
        ref = live[0]
        if self.weights.device != ref.device:
            self.to(ref.device)
            weights = self.weights.detach()
        # missing tasks enter as NaN, so one device-side isfinite decides presence
        values = torch.stack([
            (loss if loss.dim() == 0 else loss.reshape(())) if loss is not None else ref.new_full((), float("nan"))
            for loss in items
        ])
        present = torch.isfinite(values)
        if len(live) == len(items) and _arrays.host_reads_free(values.device) \
                and all(math.isfinite(v) for v in values.tolist()):
            safe = values  # (where reading is free: no masking op, and none in the backward)
        else:
            safe = torch.where(present, values, 0.0)
        combined = torch.dot(weights if weights.dtype == safe.dtype else weights.to(safe.dtype), safe)
        self.recorder.record(items, values.detach(), present, weights, combined, self.task_names, extra=extra)
        return combined if extra is None else combined + extra.reshape(())

    def _empty_step(self, weights: Tensor) -> Tensor:
        values = torch.full((self.num_tasks,), float("nan"), dtype=self.dtype, device=self.device)
        if torch.is_grad_enabled():
            self.recorder.record_empty(values, weights)
            return torch.zeros((), dtype=self.dtype, device=self.device, requires_grad=True)
        return torch.zeros((), dtype=self.dtype, device=self.device)

    # ------------------------------------------------------------------ the update
    def updates_on_host(self) -> bool:
        """Whether :meth:`step` runs its ``(T,)`` math on the host in Python numbers (the weights
        are on the CPU, the strategy supports it, and nothing is being compiled)."""
        return self.host_update and _arrays.host_reads_free(self.device)

    @torch.no_grad()
    def step(self, grad_scale: Tensor | float | None = None, found_inf: Tensor | None = None) -> None:
        """Update the weights from what the backward passes since the last step recorded.

        Call it after the model's backward (after every backward pass of an accumulation
        window), before or after the model's optimizer step. Without a recorded ``combine``
        it does nothing. Runs on the weights' device without reading any value on the host
        (on the CPU, where the device is the host, in Python numbers: see :mod:`gradnorm_lightning._arrays`).

        Args:
            grad_scale: the factor the recorded backward passes were scaled by beyond the
                combined loss (the GradScaler's scale under fp16 AMP); ``None`` means 1.
            found_inf: a tensor that is non-zero when the model's step is skipped (e.g. the
                GradScaler found inf/NaN gradients); the weight update is then skipped too.

        Raises:
            ValueError: when a recorded backward did not reach the shared layer.
        """
        stats = self.recorder.collect(grad_scale)
        if stats is None:
            return
        self.steps += 1
        if self.updates_on_host():
            try:
                self._update(stats, found_inf, _arrays.python_ops(self.dtype))
                return
            except (ArithmeticError, ValueError):
                pass  # Python raised where IEEE arithmetic gives inf or NaN: the device path decides
        self._update(stats, found_inf, TORCH)

    def _update(self, stats: Statistics, found_inf: Tensor | None, xp: ArrayOps) -> None:
        """The update on ``xp``'s arrays (torch tensors, or Python vectors on the host).

        Everything is computed before any state is written, so a host step that raises leaves
        the state untouched.
        """
        get = xp.view
        present, losses, norms = get(stats.present), get(stats.losses), get(stats.grad_norms)
        count, total = get(self.initial_loss_count), get(self.initial_loss_sum)
        # L(0): measured over the first `initial_loss_steps` present steps, or fixed.
        if self._all_fixed:
            initial = get(self._fixed_initial)
        else:
            collecting = present & (count < self.initial_loss_steps)
            init_count = count + collecting
            init_sum = total + losses * collecting  # absent tasks' losses are 0
            initial = init_sum / xp.clamp_min(init_count, 1.0)
            if self._any_fixed:
                initial = xp.where(get(self._fixed_mask), get(self._fixed_initial), initial)
        ratios, rates = F.inverse_training_rates(losses, initial, present)
        weights = get(self.weights)
        proposal = self.propose(
            StepInputs(weights, norms, losses, initial, present, ratios, rates, get(self.num_updates), xp)
        )
        absent = ~present
        ok = present.any() & (proposal.valid | absent).all()
        if found_inf is not None:
            ok = ok & xp.is_zero(found_inf.to(self.device))
        new_state: dict[str, Any] = {"weights": proposal.weights, **proposal.state}
        if not self._all_fixed:
            new_state.update(initial_loss_sum=init_sum, initial_loss_count=init_count)
        logged = {"loss_ratios": ratios, "inverse_rates": rates}
        if proposal.objective is not None:
            logged["loss"] = proposal.objective
        if xp is not TORCH:
            self._commit_on_host(stats, new_state, logged, ok, absent, xp)
            return
        for name, value in new_state.items():
            setattr(self, name, torch.where(ok, value, getattr(self, name)))
        self.num_updates = self.num_updates + ok
        if stats.absent is not None:  # (counted per backward pass)
            self.skipped = self.skipped + stats.absent.to(self.skipped.dtype)
        self.skipped_updates = self.skipped_updates + ~ok
        self.empty_steps = self.empty_steps + absent.all()
        self._set_last_stats(stats, logged, ok)

    def _commit_on_host(self, stats: Statistics, new_state: dict[str, Any], logged: dict[str, Any], ok: bool,
                        absent: Any, xp: ArrayOps) -> None:
        """Write a host step's results: on the host the decision is a plain branch, and only what
        changes is written, all of it as views of one new tensor.

        Args:
            stats: the step's statistics.
            new_state: the state a valid step writes (Python vectors and numbers, by name).
            logged: the logged vectors (``"loss"``: the objective), by name.
            ok: whether the step is applied.
            absent: the absent tasks (a Python vector of bools).
            xp: the host path's operations.
        """
        get = xp.view
        changes = new_state if ok else {}
        if ok:
            changes["num_updates"] = get(self.num_updates) + 1
        else:
            changes["skipped_updates"] = get(self.skipped_updates) + 1
        if stats.absent is not None:
            changes["skipped"] = get(self.skipped) + get(stats.absent.to(self.dtype))
        if absent.all():
            changes["empty_steps"] = get(self.empty_steps) + 1
        # (the logged values are not read back: only the state is remembered)
        made = xp.tensors({**changes, **{f"/{k}": v for k, v in logged.items()}}, remember=changes)
        for name in changes:
            setattr(self, name, made[name])
        self._set_last_stats(stats, {k: made[f"/{k}"] for k in logged}, torch.tensor(bool(ok)))

    def _set_last_stats(self, stats: Statistics, logged: dict[str, Tensor], applied: Tensor) -> None:
        self.last_stats = {
            "weights": self.weights,
            "grad_norms": stats.grad_norms,
            **{k: v for k, v in logged.items() if k != "loss"},
            "skipped": self.skipped,
            "present": stats.present,
            "applied": applied,
            "route": stats.route,
        }
        if stats.cosines is not None:  # (task_cosines=True)
            self.last_stats["cosines"] = stats.cosines
        if stats.uncut is not None:  # tasks absent with a graph that the route could not cut off
            self.last_stats["uncut"] = stats.uncut
        if "loss" in logged:
            self.last_stats["loss"] = logged["loss"]

    # ------------------------------------------------------------------ copies
    def __repr__(self) -> str:
        names = list(self._task_names) if self._task_names is not None else "?"
        settings = ", ".join(f"{k}={v!r}" for k, v in self.options().items())
        return f"{type(self).__name__}(tasks={names}, {settings})"
