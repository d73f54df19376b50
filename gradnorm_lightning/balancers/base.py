"""The base of every loss-weighting strategy: tasks, state, ``combine`` and ``step``.

A strategy is a :class:`Balancer` subclass that implements one method, :meth:`Balancer.propose`:
given one optimizer step's :class:`StepInputs` it returns a :class:`Proposal` (new weights,
whether the statistics were valid, its own objective, its own state), in plain torch. Everything
else is here once: task names (fixed once), the state tensors (declared once, for ``to``,
``state_dict`` and pickling), ``L(0)``, absent tasks, the combined loss, and the commit, which
applies a proposal only when it is valid. The update is the same torch code on every device, and
it reads no value on the host.
The per-task statistics come from a :class:`~gradnorm_lightning.capture.Recorder` handed in
(or built from ``mode``/``distributed``).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from gradnorm_lightning import _arrays
from gradnorm_lightning import functional as F
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


_HALF = (torch.float16, torch.bfloat16)


def _layer_dtype(layer: nn.Module | Sequence[nn.Module]) -> torch.dtype:
    """The balancer's dtype for the shared ``layer`` (or modules): float64 when a trainable parameter
    is float64, else float32 (also for bfloat16 and float16 layers, whose statistics would lose too much)."""
    trainable = [p for m in shared_modules(layer) for p in m.parameters() if p.requires_grad]
    return torch.float64 if any(p.dtype == torch.float64 for p in trainable) else torch.float32


def _optional_integer(name: str) -> Callable[[Any], int | None]:
    """A checker of a positive integer option that may be ``None``."""
    check = _integer(name)
    return lambda value: None if value is None else check(value)


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
        update_every: measure the statistics and update the weights on optimizer steps 0, k,
            2k, ... only; the other steps train with the current weights as plain steps (no
            statistics taken).
        freeze_after: after this many applied weight updates the weights stay fixed and nothing
            is measured any more (``None``: never); see :attr:`frozen`.
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
    #: whether the update needs the loss ratios ``L_i / L_i(0)``: then it applies only when
    #: some task is ``rated`` (present with a positive ``L(0)``), else when some task is present
    uses_initial_losses: ClassVar[bool] = False
    #: option name -> checker returning the normalised value (each class adds its own)
    _option_checks: ClassVar[dict[str, Callable[[Any], Any]]] = {
        "initial_losses": _check_initial_losses,
        "initial_loss_steps": _integer("initial_loss_steps"),
        "mode": _choice("mode", MODES),
        "distributed": _choice("distributed", DISTRIBUTED_MODES),
        "track_grad_norms": _flag,
        "update_every": _integer("update_every"),
        "freeze_after": _optional_integer("freeze_after"),
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
        update_every: int = 1,
        freeze_after: int | None = None,
        task_cosines: bool = False,
    ) -> None:
        self.shared_layer = _check_shared_layer(shared_layer)
        base = self.check_options(
            initial_losses=initial_losses, initial_loss_steps=initial_loss_steps, mode=mode,
            distributed=distributed, track_grad_norms=track_grad_norms, update_every=update_every,
            freeze_after=freeze_after, task_cosines=task_cosines,
        )
        self.update_every: int = base["update_every"]
        self.freeze_after: int | None = base["freeze_after"]
        self.task_cosines: bool = base["task_cosines"]
        self.initial_losses = base["initial_losses"]
        self.initial_loss_steps: int = base["initial_loss_steps"]
        self.mode: str = base["mode"]
        self.distributed: str = base["distributed"]
        self.track_grad_norms: bool = base["track_grad_norms"]
        params = [p for m in shared_modules(self.shared_layer) for p in m.parameters() if p.requires_grad]
        self.dtype = _layer_dtype(self.shared_layer)
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
        self._known_initial: Tensor | None = None
        self._initial_probe: _arrays.HostFlag | None = None
        self._warned_float16 = False
        self._frozen = False
        self._freeze_fired = False  # (freeze_after froze the weights once: it is done)
        self._freeze_probe: _arrays.HostFlag | None = None
        self._measuring = True
        self.steps = 0
        self.last_stats: dict[str, Any] = {}
        if names is not None:
            self._init_tasks(names)
        self._plan_next_step()

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

    def set_dtype(self, dtype: torch.dtype) -> None:
        """Keep the weights, the state and the statistics in ``dtype`` (float32 or float64).

        Raises:
            ValueError: for another dtype.
        """
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"`dtype` must be torch.float32 or torch.float64; got {dtype!r}.")
        if dtype != self.dtype:
            self._set_state_dtype(dtype)
        self.recorder.set_dtype(dtype)

    def follow_layer_dtype(self) -> None:
        """Take the dtype the shared layer's parameters have now (float64 for a float64 layer, else
        float32): call it after converting the model, e.g. ``model.double()``. The Lightning
        callbacks call it when a fit starts (Lightning converts the model after ``setup``).

        Example::

            >>> layer = nn.Linear(2, 2)
            >>> gn = Balancer(layer, num_tasks=2)
            >>> _ = layer.double()
            >>> gn.follow_layer_dtype()
            >>> gn.weights.dtype
            torch.float64
        """
        self.set_dtype(_layer_dtype(self.shared_layer))

    # ------------------------------------------------------------------ which steps measure
    @property
    def frozen(self) -> bool:
        """Whether the weights are frozen: they stay as they are and nothing is measured (each step
        is a plain step). ``freeze_after`` sets it once that many updates were applied; set it by
        hand at any time (``gn.frozen = True``: ablations, a warm-up schedule). Saved in checkpoints.

        Example::

            >>> gn = Balancer(nn.Linear(2, 2), num_tasks=2)
            >>> gn.frozen = True
            >>> gn.frozen, gn.recorder.measuring
            (True, False)
        """
        return self._frozen

    @frozen.setter
    def frozen(self, value: bool) -> None:
        if not isinstance(value, bool):
            raise TypeError(f"`frozen` must be True or False; got {value!r}.")
        self._frozen = value
        self._plan_next_step()

    @property
    def measures_next_step(self) -> bool:
        """Whether the next optimizer step measures statistics and updates the weights (not frozen,
        and a multiple of ``update_every``)."""
        return self._measuring

    def _plan_next_step(self) -> None:
        """Tell the recorder whether the coming step is measured (before its forward)."""
        self._measuring = not self._frozen and self.steps % self.update_every == 0
        self.recorder.measuring = self._measuring

    def _probe_freeze(self) -> None:
        """``freeze_after``: the device stops applying updates at the N-th (see ``_update``); the host
        freezes once it reads that the count is reached: on the CPU at once, on a GPU one step
        later (the flag then waited for, though it is there in practice), so that every process
        freezes on the same step (a frozen step takes part in no reduction of statistics)."""
        assert self.freeze_after is not None
        probe = self._freeze_probe
        if probe is None or not probe.value(wait=True):
            probe = self._freeze_probe = _arrays.HostFlag(self.num_updates >= self.freeze_after)
        if probe.value():
            self._freeze_probe = None
            self._freeze_fired = self._frozen = True

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue the weight trajectory exactly (with :attr:`frozen`)."""
        state = super().state_dict()
        state.update(frozen=self._frozen, freeze_fired=self._freeze_fired)
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output (a checkpoint without ``frozen`` is not frozen).

        Raises:
            ValueError: if the checkpoint's tasks or strategy differ from this balancer's.
        """
        super().load_state_dict(state)
        self._frozen = bool(state.get("frozen", False))
        self._freeze_fired = bool(state.get("freeze_fired", False))
        self._freeze_probe = None
        if self.freeze_after is not None and not self._freeze_fired and self.initialized \
                and float(self.num_updates) >= self.freeze_after:  # (read once, at load)
            self._freeze_fired = self._frozen = True
        self._plan_next_step()

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

        Half-precision losses (float16, bfloat16) are combined in float32 (a float16 sum
        overflows past 65504); float16 losses are warned about once, since a float16 loss that
        overflowed is already infinite, and its task absent from the step.

        Args:
            losses: a 1-D tensor of ``T`` losses, a sequence of ``T`` scalar tensors (``None``
                for a missing task) or a mapping from task name to scalar tensor.
            extra: a loss term outside the balancing (an auxiliary loss, a regulariser), added
                with the weight you gave it: ``combine(losses, extra=0.1 * aux)``. Added here
                rather than to the result, its gradient is kept out of the tasks' gradient norms
                even where it reads a head's own activations.

        Returns:
            The combined loss, a 0-dim tensor (float32 or float64).

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
        # half-precision losses are combined in float32 (a sum of float16 losses overflows past 65504)
        if any(loss is not None and loss.dtype in _HALF for loss in items):
            self._warn_float16(items)
            items = [loss.float() if loss is not None and loss.dtype in _HALF else loss for loss in items]
        live = [loss for loss in items if loss is not None]
        # The state is never written in place (every update makes new tensors) and never
        # requires grad, so the model loss can use the weights as they are: the graph keeps this
        # step's values.
        weights = self.weights
        if extra is not None and (not isinstance(extra, Tensor) or extra.numel() != 1
                                  or not extra.is_floating_point()):
            raise TypeError(f"`extra` must be a scalar floating-point tensor; got {extra!r}.")
        if not live:
            empty = self._empty_step(weights)
            return empty if extra is None else empty + extra.reshape(())
        ref = live[0]
        if weights.device != ref.device:
            self.to(ref.device)
            weights = self.weights
        # missing tasks enter as NaN, so one device-side isfinite decides presence
        values = torch.stack([
            (loss if loss.dim() == 0 else loss.reshape(())) if loss is not None else ref.new_full((), float("nan"))
            for loss in items
        ])
        present = torch.isfinite(values)
        host = values.tolist() if _arrays.host_reads_free(values.device) else None  # (read once, here)
        if len(live) == len(items) and host is not None and all(math.isfinite(v) for v in host):
            safe = values  # (where reading is free: no masking op, and none in the backward)
        else:
            safe = torch.where(present, values, 0.0)
        combined = torch.dot(weights if weights.dtype == safe.dtype else weights.to(safe.dtype), safe)
        self.recorder.record(items, values.detach(), present, weights, combined, self.task_names, extra=extra,
                             host_values=host)
        return combined if extra is None else combined + extra.reshape(())

    def _warn_float16(self, items: Sequence[Tensor | None]) -> None:
        if self._warned_float16 or not any(loss is not None and loss.dtype == torch.float16 for loss in items):
            return
        self._warned_float16 = True
        warnings.warn(
            "The task losses are float16: they are combined in float32, but a float16 loss above 65504 has "
            "already overflowed to inf, and its task is then absent from that step (counted in `skipped`). "
            "Compute the losses in float32 (`loss.float()` before the reduction, or autocast, which does).",
            stacklevel=3,
        )

    def _empty_step(self, weights: Tensor) -> Tensor:
        values = torch.full((self.num_tasks,), float("nan"), dtype=self.dtype, device=self.device)
        if torch.is_grad_enabled():
            self.recorder.record_empty(values, weights)
            return torch.zeros((), dtype=self.dtype, device=self.device, requires_grad=True)
        return torch.zeros((), dtype=self.dtype, device=self.device)

    # ------------------------------------------------------------------ the update
    @torch.no_grad()
    def step(self, grad_scale: Tensor | float | None = None, found_inf: Tensor | None = None) -> None:
        """Update the weights from what the backward passes since the last step recorded.

        Call it after the model's backward (after every backward pass of an accumulation
        window), before or after the model's optimizer step. Without a recorded ``combine``
        it does nothing. Runs on the weights' device as a few dozen torch operations, without
        reading any value on the host. On a step that measures nothing (``update_every``,
        :attr:`frozen`) it only counts the absent tasks.

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
        measured = self._measuring
        self.steps += 1
        if measured:
            self._update(stats, found_inf)
        else:
            self._plain_step(stats)
        if self.freeze_after is not None and not self._freeze_fired and self.initialized:
            self._probe_freeze()
        self._plan_next_step()

    def _initial_losses(self, present: Tensor, losses: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """``L(0)`` for this step and the new measurement state.

        A measured ``L(0)`` is the mean of the first ``initial_loss_steps`` losses of each task's
        present steps. A task whose measured sum is not positive (its first loss was exactly 0)
        is measured again from its next present step on, and sits out the updates until then
        (``StepInputs.rated``; counted in ``zero_initial_loss_steps``).
        """
        total, count = self.initial_loss_sum, self.initial_loss_count
        if self.initial_loss_steps == 1:
            collecting = present & (total <= 0)
            total = torch.where(collecting, losses, total)
            count = torch.where(collecting, 1.0, count)
            initial = total
        else:
            count = torch.where(total <= 0, 0.0, count)  # (a sum of 0 starts again)
            collecting = present & (count < self.initial_loss_steps)
            count = count + collecting
            total = total + losses * collecting  # (absent tasks' losses are 0)
            initial = total / count.clamp_min(1.0)
        if self._any_fixed:
            initial = torch.where(self._fixed_mask, self._fixed_initial, initial)
        return initial, {"initial_loss_sum": total, "initial_loss_count": count}

    def _probe_initial_losses(self) -> None:
        """Once every ``L(0)`` is known for good (fixed, or measured over its steps and positive),
        the update stops measuring it: the flag is read on the host as it arrives, never waited for."""
        probe = self._initial_probe
        if probe is None or probe.value() is False:  # (none in flight: ask again)
            done = (self.initial_loss_sum > 0) & (self.initial_loss_count >= self.initial_loss_steps)
            probe = self._initial_probe = _arrays.HostFlag((done | self._fixed_mask).all())
        if probe.value():
            self._known_initial = self.current_initial_losses
            self._initial_probe = None

    def _update(self, stats: Statistics, found_inf: Tensor | None) -> None:
        """The update: ``L(0)``, the loss ratios, the strategy's proposal, the commit."""
        present, losses = stats.present, stats.losses
        known = self._known_initial
        measuring = known is None
        if known is None:
            initial, new = self._initial_losses(present, losses)
            rated = present & (initial > 0)
        else:
            initial, new, rated = known, {}, present
        num_rated = rated.sum()
        if measuring:
            ratios, rates = F._inverse_training_rates(losses, initial, rated, num_rated)
        else:  # (every L(0) is positive and absent tasks' losses are 0: their ratios are 0)
            ratios = losses / initial
            rates = ratios / (ratios.sum() / num_rated)
        proposal = self.propose(StepInputs(
            self.weights, stats.grad_norms, losses, initial, present, ratios, rates, self.num_updates, rated, num_rated,
        ))
        any_present = present.any()
        # (once every L(0) is known, the rated tasks are the present ones)
        ok = num_rated > 0 if self.uses_initial_losses and measuring else any_present
        valid = proposal.valid
        if valid is not None:
            ok = ok & (valid if valid.dim() == 0 else (valid | ~present).all())
        if found_inf is not None:
            ok = ok & (found_inf.to(self.device) == 0).all()
        if self.freeze_after is not None and not self._freeze_fired:
            ok = ok & (self.num_updates < self.freeze_after)  # (exact, before the host knows)
        new.update(proposal.state)
        new["weights"] = proposal.weights
        # per-task counters, written whether or not the update applies
        if stats.absent is not None:  # (counted per backward pass; None: no task was absent)
            new["skipped"] = self.skipped + stats.absent
        if measuring:
            new["zero_initial_loss_steps"] = self.zero_initial_loss_steps + (present ^ rated)
        counts = {name: ok & flag for name, flag in proposal.counts.items()}
        counts.update(num_updates=ok, empty_steps=~any_present)
        self._commit(new, ok, counts)
        if measuring:
            self._probe_initial_losses()
        logged = {"loss_ratios": ratios, "inverse_rates": rates}
        if proposal.objective is not None:
            logged["loss"] = proposal.objective
        self._set_last_stats(stats, logged, ok)

    def _plain_step(self, stats: Statistics) -> None:
        """A step that measured nothing: absent tasks are counted; the statistics of the last
        measured step stay in ``last_stats`` (NaN before the first), with this step's weights,
        presence and route, and ``applied`` false."""
        if stats.absent is not None:
            self.skipped = self.skipped + stats.absent
        last = self.last_stats
        if "grad_norms" not in last:
            unmeasured = self.weights.new_full((self.num_tasks,), float("nan"))
            last = {"grad_norms": unmeasured, "loss_ratios": unmeasured, "inverse_rates": unmeasured}
        self.last_stats = {**last, "weights": self.weights, "skipped": self.skipped, "present": stats.present,
                           "applied": self._no_count, "route": stats.route}

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

    def health_warnings(self) -> list[str]:
        """Warnings about the run so far (reads counters on the host).

        Here: tasks whose measured ``L(0)`` was not positive (a first loss of exactly 0), so that
        their loss ratio was undefined: they sat out those updates and their ``L(0)`` was
        measured again at their next present step. The Lightning callback calls this on logging
        steps and warns once; in a plain loop, call it yourself now and then (it synchronises
        with the device).

        Returns:
            One message per problem found.
        """
        if not self.initialized or not self.uses_initial_losses:
            return []
        counts = self.zero_initial_loss_steps.tolist()
        tasks = {name: int(c) for name, c in zip(self.task_names, counts) if c > 0}
        if not tasks:
            return []
        return [
            f"The first loss of task(s) {sorted(tasks)} was 0 (or negative), so its L(0) could not scale the loss "
            f"ratio: the task sat out the weight updates on {tasks} step(s), until a positive L(0) was measured "
            "at its next present step (gradnorm/zero_initial_loss_steps). If such a loss can start at 0, fix its "
            "L(0) with `initial_losses={task: value}`."
        ]

    # ------------------------------------------------------------------ copies
    def __repr__(self) -> str:
        names = list(self._task_names) if self._task_names is not None else "?"
        settings = ", ".join(f"{k}={v!r}" for k, v in self.options().items())
        return f"{type(self).__name__}(tasks={names}, {settings})"
