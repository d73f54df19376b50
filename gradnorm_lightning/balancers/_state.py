"""A balancer's tasks and state tensors, declared once for creation, ``to``, checkpoints and copies.

:class:`TaskState` fixes the task names once, creates every state tensor from
:meth:`TaskState.initial_state` (which each strategy extends), moves them with :meth:`TaskState.to`
and saves and restores them with :meth:`TaskState.state_dict` / :meth:`TaskState.load_state_dict`.
It also owns ``L(0)``'s fixed values, and :meth:`TaskState._commit`, which writes a step's new
state with a few stacked operations instead of one per tensor.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor
from typing_extensions import Self

from gradnorm_lightning._checks import _check_task_names

__all__ = ["TaskState"]

# State added after the first release: a checkpoint without it starts it at zero.
_OPTIONAL_STATE = frozenset({"empty_steps", "floor_steps", "jump_steps", "zero_initial_loss_steps"})
# State a checkpoint carries that is derived from other state (``steps - num_updates``).
_DERIVED_STATE = frozenset({"skipped_updates"})
# Per-task counters written on every step, whether or not the update is applied.
_ALWAYS = frozenset({"skipped", "zero_initial_loss_steps"})
# The base's 0-dim counters (a strategy adds its own in `counter_names`).
_COUNTERS = ("num_updates", "empty_steps")


class TaskState:
    """Task names and state tensors (the base of :class:`~gradnorm_lightning.balancers.Balancer`).

    Subclasses set ``dtype``, ``device`` and ``initial_losses`` before the names are known.
    """

    # state tensors every strategy has (created by `_init_tasks` once the tasks are known)
    weights: Tensor
    initial_loss_sum: Tensor
    initial_loss_count: Tensor
    num_updates: Tensor
    skipped: Tensor
    zero_initial_loss_steps: Tensor
    empty_steps: Tensor
    dtype: torch.dtype
    device: torch.device
    initial_losses: Any
    _task_names: tuple[str, ...] | None
    _state_names: tuple[str, ...]
    _row_names: tuple[str, ...]
    _scalar_names: tuple[str, ...]
    _stacked: list[tuple[Tensor, tuple[Tensor, ...]] | None]
    _no_count: Tensor
    _known_initial: Tensor | None
    _initial_probe: Any
    _all_fixed: bool
    _counter_names: tuple[str, ...]
    #: the strategy's own 0-dim counters (state tensors it declares in `initial_state`), which
    #: an applied update increments by the `Proposal.counts` of their names
    counter_names: tuple[str, ...] = ()
    steps: int

    def initial_state(self, num_tasks: int) -> dict[str, Tensor]:
        """The strategy's own state tensors, created when the task names are known.

        Subclasses extend the dict (call ``super()``); every tensor in it moves with
        :meth:`to`, is saved by :meth:`state_dict` and may be replaced through
        :attr:`Proposal.state`. ``"weights"`` may be overridden (the default is ones).
        """
        return {}

    @property
    def task_names(self) -> tuple[str, ...]:
        """The task names, in the order of :attr:`weights`."""
        if self._task_names is None:
            raise RuntimeError("The task names are not known yet: pass `task_names=`/`num_tasks=` or call `combine` first.")
        return self._task_names

    @property
    def num_tasks(self) -> int:
        """The number of tasks ``T``."""
        return len(self.task_names)

    @property
    def initialized(self) -> bool:
        """Whether the task names (and so the state tensors) are known."""
        return self._task_names is not None

    def _init_tasks(self, names: tuple[str, ...]) -> tuple[str, ...]:
        num_tasks = len(names)
        fixed = torch.zeros(num_tasks, dtype=self.dtype)
        fixed_mask = torch.zeros(num_tasks, dtype=torch.bool)
        init = self.initial_losses
        if isinstance(init, float):
            fixed.fill_(init)
            fixed_mask.fill_(True)
        elif isinstance(init, tuple):
            if len(init) != num_tasks:
                raise ValueError(f"`initial_losses` has {len(init)} values for {num_tasks} tasks {names!r}.")
            fixed = torch.tensor(init, dtype=self.dtype)
            fixed_mask.fill_(True)
        elif isinstance(init, dict):
            unknown = sorted(set(init) - set(names))
            if unknown:
                raise ValueError(
                    f"`initial_losses` names tasks the model does not have: {unknown}; the tasks are {list(names)}."
                )
            for i, name in enumerate(names):
                if name in init:
                    fixed[i] = init[name]
                    fixed_mask[i] = True
        self._task_names = names
        dev = self.device
        zeros = torch.zeros(num_tasks, dtype=self.dtype, device=dev)
        scalar = torch.zeros((), dtype=self.dtype, device=dev)
        state = {
            "weights": torch.ones(num_tasks, dtype=self.dtype, device=dev),
            "initial_loss_sum": zeros.clone(), "initial_loss_count": zeros.clone(),
            "num_updates": scalar.clone(), "skipped": zeros.clone(), "zero_initial_loss_steps": zeros.clone(),
            "empty_steps": scalar.clone(),
        }
        state.update(self.initial_state(num_tasks))
        for name, value in state.items():
            setattr(self, name, value)
        self._state_names = tuple(state)
        # committed together: the (T,) tensors as one stack, the 0-dim ones as another
        # (the per-task counters written on every step are replaced by themselves; 0-dim counters
        # are added to)
        self._counter_names = (*_COUNTERS, *self.counter_names)
        self._row_names = tuple(
            n for n, v in state.items() if v.shape == (num_tasks,) and v.dtype == self.dtype and n not in _ALWAYS
        )
        self._scalar_names = tuple(
            n for n, v in state.items() if v.dim() == 0 and v.dtype == self.dtype and n not in self._counter_names
        )
        self._stacked: list[tuple[Tensor, tuple[Tensor, ...]] | None] = [None, None, None]
        self._no_count = torch.zeros((), dtype=torch.bool, device=dev)  # (a counter a step leaves alone)
        self._fixed_initial = fixed.to(dev)
        self._fixed_mask = fixed_mask.to(dev)
        self._all_fixed = bool(fixed_mask.all())  # host-side: built from Python values
        self._any_fixed = bool(fixed_mask.any())
        # L(0) once known for good (see Balancer._probe_initial_losses); fixed ones are from the start
        self._known_initial = self._fixed_initial if self._all_fixed else None
        self._initial_probe = None
        return names

    def to(self, device: torch.device | str) -> Self:
        """Move the state to ``device`` (the balancer also follows the losses by itself)."""
        device = torch.device(device)
        self.device = device
        if self._task_names is not None:
            for name in (*self._state_names, "_fixed_initial", "_fixed_mask", "_no_count"):
                setattr(self, name, getattr(self, name).to(device))
            self._forget_derived()
        return self

    def _set_state_dtype(self, dtype: torch.dtype) -> None:
        """Convert the floating-point state to ``dtype`` (``self.dtype`` follows)."""
        self.dtype = dtype
        if self._task_names is not None:
            for name in (*self._state_names, "_fixed_initial"):
                value = getattr(self, name)
                if value.is_floating_point():
                    setattr(self, name, value.to(dtype))
            self._forget_derived()

    def _forget_derived(self) -> None:
        """Drop what is derived from the state (after it was replaced or moved)."""
        self._stacked = [None, None, None]
        self._known_initial = self._fixed_initial if self._all_fixed else None
        self._initial_probe = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        if "_stacked" in state:  # (rebuilt by the next commit)
            state.update(_stacked=[None, None, None], _initial_probe=None)
        if "_freeze_probe" in state:  # (a flag in flight: asked again)
            state["_freeze_probe"] = None
        return state

    @property
    def skipped_updates(self) -> Tensor:
        """How many steps recorded statistics but applied no update (``steps - num_updates``)."""
        return self.steps - self.num_updates

    def _commit(self, new: dict[str, Tensor], ok: Tensor, counts: dict[str, Tensor]) -> None:
        """Write a step's new state.

        Where ``ok``, every value in ``new`` replaces the state of its name, except the per-task
        counters of ``_ALWAYS``, which ``new`` replaces either way; every 0-dim counter is
        incremented by ``counts[name]`` (given already masked by ``ok`` where it should be; a
        missing one by 0).
        The ``(T,)`` state is written as one stack, the counters as another and other 0-dim
        state as a third, each by one operation; the state tensors become views of the result,
        which the next commit reuses as long as they are (no state tensor is written in place: a
        graph that saved the weights keeps its values).
        """
        for group, names in enumerate((self._row_names, self._scalar_names, self._counter_names)):
            counters = group == 2
            if not names or not (counters or any(n in new for n in names)):
                continue
            kept = self._stacked[group]
            if kept is not None and all(getattr(self, n) is v for n, v in zip(names, kept[1])):
                old = kept[0]
            else:
                old = torch.stack([getattr(self, n) for n in names])
            if counters:
                result = old + torch.stack([counts.get(n, self._no_count) for n in names])
            else:
                result = torch.where(ok, torch.stack([new[n] if n in new else getattr(self, n) for n in names]), old)
            views = result.unbind()
            self._stacked[group] = (result, views)
            for name, value in zip(names, views):
                object.__setattr__(self, name, value)
        for name in new.keys() - {*self._row_names, *self._scalar_names}:
            setattr(self, name, new[name] if name in _ALWAYS else torch.where(ok, new[name], getattr(self, name)))

    @property
    def current_initial_losses(self) -> Tensor:
        """``L(0)`` as used by the update (0 for a task not yet measured)."""
        measured = self.initial_loss_sum / self.initial_loss_count.clamp_min(1)
        return torch.where(self._fixed_mask, self._fixed_initial, measured)

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue the weight trajectory exactly."""
        state: dict[str, Any] = {"task_names": list(self.task_names) if self.initialized else None, "steps": self.steps}
        if self.initialized:
            for name in (*self._state_names, *_DERIVED_STATE):
                state[name] = getattr(self, name).detach().clone()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output.

        Raises:
            ValueError: if the checkpoint's tasks or strategy differ from this balancer's.
        """
        names = state.get("task_names")
        if names is None:
            self.steps = int(state.get("steps", 0))
            return
        names = tuple(names)
        if self._task_names is None:
            self._init_tasks(_check_task_names(names))
        elif names != self._task_names:
            raise ValueError(
                f"The checkpoint's {type(self).__name__} tasks {list(names)} differ from this model's "
                f"{list(self._task_names)}; "
                "resume with the same tasks in the same order."
            )
        missing = [n for n in self._state_names if n not in state and n not in _OPTIONAL_STATE]
        if missing:
            raise ValueError(
                f"The checkpoint's {type(self).__name__} state lacks {missing}: it was written by another "
                "weighting strategy; resume with the same one."
            )
        for name in self._state_names:
            if name in state:
                cur = getattr(self, name)
                setattr(self, name, state[name].to(device=cur.device, dtype=cur.dtype).clone())
        self.steps = int(state["steps"])
        self._forget_derived()

