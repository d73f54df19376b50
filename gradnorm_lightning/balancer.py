"""The stateful GradNorm balancer: weights, ``L(0)``, the weight optimizer and the update.

Plain PyTorch, no Lightning. The Lightning callback is a thin wrapper around this class and
the benchmarks use it directly.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from gradnorm_lightning import functional as F
from gradnorm_lightning._checks import (
    DISTRIBUTED_MODES,
    MODES,
    OPTIMIZERS,
    _check_alpha,
    _check_betas,
    _check_choice,
    _check_initial_losses,
    _check_positive,
    _check_shared_layer,
    _check_task_names,
)
from gradnorm_lightning._stats import (
    _Capture,
    _linear_rows,
    _Pending,
    _vjp_param_grads,
)

__all__ = ["GradNorm", "LossesLike"]

LossesLike = Tensor | Sequence[Tensor] | Mapping[str, Tensor]

# Captured forwards kept between two `combine` calls: more than one means layer reuse or
# forwards that never reached `combine` (then the exact autograd path is used); bounded so
# that such forwards cannot pile up.
_MAX_CAPTURES = 4
# Graph nodes walked above the shared layer when looking for the heads' own backward nodes.
_MAX_HEAD_NODES = 512

_STATE_TENSORS: tuple[str, ...] = (
    "weights",
    "initial_loss_sum",
    "initial_loss_count",
    "exp_avg",
    "exp_avg_sq",
    "adam_steps",
    "num_updates",
    "skipped",
    "skipped_updates",
)


# Backward nodes of elementwise functions y = f(x): their VJP is v * f'(x), so T of them cost
# one backward with v = 1 and a broadcast product instead of a vmap.
_ELEMENTWISE_NODES = frozenset({
    "ReluBackward0", "GeluBackward0", "SiluBackward0", "TanhBackward0", "SigmoidBackward0",
    "LeakyReluBackward0", "EluBackward0", "HardtanhBackward0", "MishBackward0", "SoftplusBackward0",
    "HardswishBackward0", "HardsigmoidBackward0",
})


def _vjp(output: Tensor, inp: Tensor, grads: Tensor) -> Tensor:
    """Per-task VJPs ``(T, *inp.shape)`` of ``output`` w.r.t. ``inp``: by the diagonal Jacobian
    when ``output`` is an elementwise activation of ``inp``, else batched, else a loop where
    vmap cannot batch the backward (e.g. through an inductor-compiled segment)."""
    node = output.grad_fn
    if (
        node is not None
        and type(node).__name__ in _ELEMENTWISE_NODES
        and output.shape == inp.shape
        and node.next_functions[0][0] is inp.grad_fn
    ):
        (diag,) = torch.autograd.grad(output, inp, grad_outputs=torch.ones_like(output), retain_graph=True)
        return grads * diag
    try:
        (out,) = torch.autograd.grad(output, inp, grad_outputs=grads, retain_graph=True, is_grads_batched=True)
    except RuntimeError:
        out = torch.stack([
            torch.autograd.grad(output, inp, grad_outputs=g, retain_graph=True)[0] for g in grads
        ])
    return out


def _no_task_message(names: Sequence[str]) -> str:
    return (
        f"No task loss given; the tasks are {list(names)}. To skip a batch in which no task has "
        "labels, return None from `training_step` (plain PyTorch: skip the backward and the steps)."
    )


def _as(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t`` in ``dtype``, without a call into torch when it already is."""
    return t if t.dtype == dtype else t.to(dtype)


class _ViewsSlot:
    """Links the views of one forward to the step record that `combine` creates later."""

    __slots__ = ("balancer", "record")

    def __init__(self, balancer: GradNorm) -> None:
        self.balancer = balancer
        self.record: _StepRecord | None = None

    def remove(self) -> None:
        """Unlink the record (it references the graph that references this slot)."""
        self.record = None


class _FanOut(torch.autograd.Function):
    """``T`` aliases of ``z`` whose backward sees every task's gradient at once (one node)."""

    @staticmethod
    def forward(ctx: Any, z: Tensor, slot: _ViewsSlot, num_tasks: int) -> tuple[Tensor, ...]:
        ctx.slot = slot
        ctx.set_materialize_grads(False)
        return tuple(z.view_as(z) for _ in range(num_tasks))

    @staticmethod
    def backward(ctx: Any, *grads: Tensor | None) -> tuple[Tensor | None, None, None]:
        # Break the reference cycle node -> ctx -> slot -> record -> views -> node, which
        # Python's collector cannot see through the C++ graph (the node may run again under
        # retain_graph, so ctx keeps the slot; the slot drops the record).
        slot: _ViewsSlot = ctx.slot
        record, slot.record = slot.record, None
        used = [g for g in grads if g is not None]
        if not used:
            return None, None, None
        if record is not None:
            for name, g, loss in zip(slot.balancer.task_names, grads, record.losses):
                if g is None and loss is not None:
                    raise ValueError(
                        f"Task {name!r} has a loss but did not read its view from `task_views`; "
                        "each head must read its own view."
                    )
        if len(used) == len(grads):
            stacked = torch.stack(used)
        else:
            stacked = torch.stack([g if g is not None else torch.zeros_like(used[0]) for g in grads])
        if record is not None:
            slot.balancer._on_views_backward(record, stacked)
        return stacked.sum(dim=0), None, None


class _StepRecord:
    """What :meth:`GradNorm.combine` leaves for the backward hooks of the same step."""

    __slots__ = ("auto", "capture", "losses", "present", "scale", "values", "views", "weights")

    def __init__(
        self,
        losses: list[Tensor | None],
        values: Tensor,
        present: Tensor,
        weights: Tensor,
        capture: _Capture | None,
        views: tuple[Tensor, tuple[Tensor, ...], _ViewsSlot] | None,
    ) -> None:
        self.losses = losses
        self.values = values
        self.present = present
        self.weights = weights
        self.capture = capture
        self.views = views
        self.scale: Tensor | None = None
        self.auto = False  # per-task gradients captured from the heads' own backward nodes


class _ForwardHook:
    """The shared layer's forward hook; a copy of the model (deepcopy, pickle) gets a no-op one.

    Holds the balancer weakly so that the layer does not keep a discarded balancer alive.
    """

    def __init__(self, balancer: GradNorm | None) -> None:
        self._ref = weakref.ref(balancer) if balancer is not None else None

    # Never traced by torch.compile: the captured tensors must be real tensors on the loss's
    # autograd path (a traced hook records a side output of the compiled graph that the loss
    # does not depend on). Costs one graph break at the shared layer.
    @torch.compiler.disable
    def __call__(self, module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
        balancer = self._ref() if self._ref is not None else None
        if balancer is not None:
            balancer._capture_forward(module, inputs, output)

    def __deepcopy__(self, memo: dict[int, Any]) -> _ForwardHook:
        return _ForwardHook(None)

    def __reduce__(self) -> tuple[type[_ForwardHook], tuple[None]]:
        return (_ForwardHook, (None,))


class GradNorm:
    """GradNorm loss balancing (Chen et al., ICML 2018) for a plain PyTorch training loop.

    Keeps one weight per task, starting at 1 and summing to ``T``. :meth:`combine` returns
    the model loss ``sum_i w_i L_i``; during its backward the balancer records what the
    update needs (the per-task gradients at the last shared layer); :meth:`step` then moves
    the weights along the analytic gradient of the GradNorm loss
    ``sum_i |w_i n_i - mean(w n) r_i ** alpha|`` and renormalises them. The model's own
    gradients are exactly those of ``sum_i w_i L_i``: nothing of the GradNorm loss reaches
    them.

    Args:
        shared_layer: the last layer shared by all tasks; the norms run over the
            concatenation of all its trainable parameters.
        num_tasks: number of tasks ``T`` (tasks are then named ``task0``, ``task1``, ...).
        task_names: the task names, in the order of the weights; alternative to
            ``num_tasks``. With neither, the names are taken from the first dict of losses.
        alpha: asymmetry: how strongly tasks that train slower are pushed (``>= 0``).
        lr: learning rate of the weight optimizer.
        optimizer: ``"sgd"`` (the paper) or ``"adam"``.
        initial_losses: ``L(0)``. ``None`` uses the mean of the losses of the first
            ``initial_loss_steps`` steps in which each task is present; a number, a sequence
            in task order or a mapping by task name fixes them (e.g. ``ln 2`` for binary
            cross-entropy). Tasks a mapping leaves out use the measured rule.
        initial_loss_steps: how many steps ``L(0)`` averages when measured.
        betas: Adam's coefficients.
        eps: Adam's epsilon.
        lr_decay_rate: exponential learning-rate decay, ``lr * rate ** (updates / steps)``
            (Keras' ``ExponentialDecay``); ``1.0`` means constant.
        lr_decay_steps: the ``steps`` of the decay.
        lr_staircase: decay in whole ``steps`` only (``floor(updates / steps)``).
        min_weight: floor applied to the weights before renormalisation (``> 0``).
        mode: ``"auto"`` (the paper's norms over the shared layer's parameters, by the
            fastest exact method), ``"autograd"`` (the same norms by one ``autograd.grad``
            per task over the parameters: slower, for layers the fast path cannot handle),
            or ``"representation"`` (norms of the per-task gradients at the shared
            representation: an approximation of the paper's, cheapest).
        distributed: under ``torch.distributed`` with more than one process, ``"exact"``
            all-reduces the per-task gradients of the shared layer (``T x |W|`` floats),
            so the weights are those of the global batch; ``"approx"`` all-reduces only the
            local norms and losses (``3T`` floats) and uses the mean of the local norms.

    Raises:
        TypeError: for arguments of the wrong type.
        ValueError: for out-of-range arguments, fewer than two tasks, or a shared layer
            with no trainable parameters.

    Example::

        >>> import torch
        >>> from torch import nn
        >>> from gradnorm_lightning import GradNorm
        >>> _ = torch.manual_seed(0)
        >>> trunk = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU())
        >>> heads = nn.ModuleList([nn.Linear(8, 1) for _ in range(3)])
        >>> gn = GradNorm(shared_layer=trunk[2], num_tasks=3, alpha=1.5, lr=0.025)
        >>> opt = torch.optim.SGD([*trunk.parameters(), *heads.parameters()], lr=0.1)
        >>> x, y = torch.randn(16, 4), torch.randn(16, 3)
        >>> for _ in range(5):
        ...     z = trunk(x)
        ...     losses = [nn.functional.mse_loss(h(z).squeeze(1), y[:, i]) for i, h in enumerate(heads)]
        ...     opt.zero_grad()
        ...     loss = gn.combine(losses)
        ...     loss.backward()
        ...     gn.step()
        ...     opt.step()
        >>> round(float(gn.weights.sum()), 5)
        3.0
    """

    #: the state tensors saved by :meth:`state_dict` (subclasses extend it)
    _state_names: tuple[str, ...] = _STATE_TENSORS
    #: whether the per-task gradient norms are measured (baselines may not need them)
    _measure_norms: bool = True

    def __init__(
        self,
        shared_layer: nn.Module,
        num_tasks: int | None = None,
        *,
        task_names: Sequence[str] | None = None,
        alpha: float = 1.5,
        lr: float = 0.025,
        optimizer: str = "sgd",
        initial_losses: float | Sequence[float] | Mapping[str, float] | None = None,
        initial_loss_steps: int = 1,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        lr_decay_rate: float = 1.0,
        lr_decay_steps: int = 1,
        lr_staircase: bool = False,
        min_weight: float = 1e-4,
        mode: str = "auto",
        distributed: str = "exact",
    ) -> None:
        self.shared_layer = _check_shared_layer(shared_layer)
        self.alpha = _check_alpha(alpha)
        self.lr = float(_check_positive("lr", lr))
        self.optimizer = _check_choice("optimizer", optimizer, OPTIMIZERS)
        self.initial_losses = _check_initial_losses(initial_losses)
        self.initial_loss_steps = int(_check_positive("initial_loss_steps", initial_loss_steps, integer=True))
        self.betas = _check_betas(betas)
        self.eps = float(_check_positive("eps", eps))
        self.lr_decay_rate = float(_check_positive("lr_decay_rate", lr_decay_rate))
        self.lr_decay_steps = int(_check_positive("lr_decay_steps", lr_decay_steps, integer=True))
        self.lr_staircase = bool(lr_staircase)
        self.min_weight = float(_check_positive("min_weight", min_weight))
        self.mode = _check_choice("mode", mode, MODES)
        self.distributed = _check_choice("distributed", distributed, DISTRIBUTED_MODES)

        params = [p for p in shared_layer.parameters() if p.requires_grad]
        self._params = params
        self.dtype = torch.float64 if params[0].dtype == torch.float64 else torch.float32
        self.device = params[0].device

        names: tuple[str, ...] | None = None
        if task_names is not None:
            names = _check_task_names(task_names)
            if num_tasks is not None and num_tasks != len(names):
                raise ValueError(
                    f"`num_tasks` ({num_tasks}) does not match `task_names` ({len(names)} names)."
                )
        elif num_tasks is not None:
            _check_positive("num_tasks", num_tasks, integer=True)
            names = _check_task_names([f"task{i}" for i in range(num_tasks)])
        if isinstance(self.initial_losses, tuple) and names is not None and len(self.initial_losses) != len(names):
            raise ValueError(
                f"`initial_losses` has {len(self.initial_losses)} values for {len(names)} tasks."
            )

        self._task_names: tuple[str, ...] | None = None
        self._captures: list[_Capture] = []
        self._views: tuple[Tensor, tuple[Tensor, ...], _ViewsSlot] | None = None
        self._record: _StepRecord | None = None
        self._pending: _Pending | None = None
        # Hooks placed on this step's autograd nodes: removed once they ran (or at the next
        # combine/step), since a hook that references the graph keeps it alive in a cycle
        # through C++ that Python's collector cannot break.
        self._graph_hooks: list[Any] = []
        self.steps = 0
        self.last_stats: dict[str, Tensor] = {}
        self._hook: Any = None
        self.attach_hooks()
        if names is not None:
            self._init_tasks(names)

    # ------------------------------------------------------------------ tasks and state
    @property
    def task_names(self) -> tuple[str, ...]:
        """The task names, in the order of :attr:`weights`."""
        if self._task_names is None:
            raise RuntimeError(
                "The task names are not known yet: pass `task_names=`/`num_tasks=` or call `combine` first."
            )
        return self._task_names

    @property
    def num_tasks(self) -> int:
        """The number of tasks ``T``."""
        return len(self.task_names)

    @property
    def initialized(self) -> bool:
        """Whether the task names (and so the state tensors) are known."""
        return self._task_names is not None

    def _init_tasks(self, names: tuple[str, ...]) -> None:
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
        self.weights = torch.ones(num_tasks, dtype=self.dtype, device=dev)
        self.initial_loss_sum = zeros.clone()
        self.initial_loss_count = zeros.clone()
        self.exp_avg = zeros.clone()
        self.exp_avg_sq = zeros.clone()
        self.adam_steps = zeros.clone()
        self.num_updates = torch.zeros((), dtype=self.dtype, device=dev)
        self.skipped = zeros.clone()
        self.skipped_updates = torch.zeros((), dtype=self.dtype, device=dev)
        self._fixed_initial = fixed.to(dev)
        self._fixed_mask = fixed_mask.to(dev)
        self._all_fixed = bool(fixed_mask.all())  # host-side: built from Python values
        self._init_extra_state(num_tasks)

    def _init_extra_state(self, num_tasks: int) -> None:
        """Subclasses create their additional state tensors here."""

    def to(self, device: torch.device | str) -> GradNorm:
        """Move the state to ``device`` (the balancer also follows the losses by itself)."""
        device = torch.device(device)
        self.device = device
        if self._task_names is not None:
            for name in (*self._state_names, "_fixed_initial", "_fixed_mask"):
                setattr(self, name, getattr(self, name).to(device))
        return self

    @property
    def current_initial_losses(self) -> Tensor:
        """``L(0)`` as used by the update (0 for a task not yet measured)."""
        measured = self.initial_loss_sum / self.initial_loss_count.clamp_min(1)
        return torch.where(self._fixed_mask, self._fixed_initial, measured)

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue the weight trajectory exactly."""
        state: dict[str, Any] = {"task_names": list(self.task_names) if self.initialized else None, "steps": self.steps}
        if self.initialized:
            for name in self._state_names:
                state[name] = getattr(self, name).detach().clone()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output.

        Raises:
            ValueError: if the checkpoint's tasks differ from this balancer's.
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
                f"The checkpoint's GradNorm tasks {list(names)} differ from this model's "
                f"{list(self._task_names)}; resume with the same tasks in the same order."
            )
        missing = [name for name in self._state_names if name not in state]
        if missing:
            raise ValueError(
                f"The checkpoint's {type(self).__name__} state lacks {missing}: it was written by another "
                "weighting strategy; resume with the same one."
            )
        for name in self._state_names:
            cur = getattr(self, name)
            setattr(self, name, state[name].to(device=cur.device, dtype=cur.dtype).clone())
        self.steps = int(state["steps"])

    def remove_hooks(self) -> None:
        """Detach the balancer from the shared layer (its forward hook) and drop its records."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        self.reset_pending()

    def attach_hooks(self) -> None:
        """Re-attach the forward hook to the shared layer (after :meth:`remove_hooks`)."""
        # mode="autograd" differentiates w.r.t. the parameters and needs no capture: no hook,
        # so nothing breaks a torch.compile graph at the shared layer.
        if self._hook is None and self.mode != "autograd" and self._measure_norms:
            self._hook = self.shared_layer.register_forward_hook(_ForwardHook(self))

    def reset_pending(self) -> None:
        """Forget what forward and backward passes recorded since the last :meth:`step`.

        Call it after an exception between a forward and :meth:`step`, or to discard an
        accumulation window; the callback does so when a fit starts or fails.
        """
        self._pending, self._record, self._views, self._captures = None, None, None, []
        self._remove_graph_hooks()

    def _remove_graph_hooks(self) -> None:
        for handle in self._graph_hooks:
            handle.remove()
        self._graph_hooks.clear()

    # ------------------------------------------------------------------ forward side
    def _capture_forward(self, module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
        if torch.is_grad_enabled() and isinstance(output, Tensor) and output.requires_grad:
            if len(self._captures) >= _MAX_CAPTURES:  # forwards that never reached `combine`
                del self._captures[0]
            self._captures.append(_Capture(tuple(i for i in inputs if isinstance(i, Tensor)), output))

    @torch.compiler.disable
    def task_views(self, z: Tensor) -> tuple[Tensor, ...]:
        """One alias of the shared representation ``z`` per task, in task order.

        When head ``i`` reads only the ``i``-th view, the per-task gradients at ``z`` are
        captured during the model's own backward: no extra pass through the heads. ``z`` is
        the shared layer's output or anything computed from it by shared, parameter-free
        operations (an activation, a reshape).

        Args:
            z: the shared representation.

        Returns:
            ``T`` views of ``z`` (plain views when gradients are off, e.g. in validation).
        """
        if not (torch.is_grad_enabled() and z.requires_grad):
            return tuple(z.view_as(z) for _ in range(self.num_tasks))
        slot = _ViewsSlot(self)
        views = _FanOut.apply(z, slot, self.num_tasks)
        self._views = (z, views, slot)
        return views

    def _normalize_losses(self, losses: LossesLike) -> list[Tensor | None]:
        if isinstance(losses, Mapping):
            if self._task_names is None:
                self._init_tasks(_check_task_names(list(losses)))
            unknown = [k for k in losses if k not in self.task_names]
            if unknown:
                raise ValueError(
                    f"Unknown task(s) {unknown}: the tasks are {list(self.task_names)}. Declare every "
                    "task up front (`task_names=`; the mixin's `task_names`) if some are absent at the first step."
                )
            items: list[Tensor | None] = [losses.get(n) for n in self.task_names]
        elif isinstance(losses, Tensor):
            if losses.dim() != 1:
                raise ValueError(
                    f"`losses` as a tensor must be 1-D with one loss per task; got shape {tuple(losses.shape)}."
                )
            if self._task_names is None:
                self._init_tasks(_check_task_names([f"task{i}" for i in range(losses.numel())]))
            items = list(losses.unbind())
        elif isinstance(losses, Sequence) and not isinstance(losses, str):
            if self._task_names is None:
                self._init_tasks(_check_task_names([f"task{i}" for i in range(len(losses))]))
            items = list(losses)
        else:
            raise TypeError(
                f"`losses` must be a 1-D tensor, a sequence of 0-dim tensors or a dict; got {type(losses).__name__}."
            )
        if len(items) != self.num_tasks:
            raise ValueError(f"Expected {self.num_tasks} losses (tasks {list(self.task_names)}); got {len(items)}.")
        for name, loss in zip(self.task_names, items):
            if loss is None:
                continue
            if not isinstance(loss, Tensor):
                raise TypeError(f"The loss of task {name!r} must be a tensor; got {type(loss).__name__}.")
            if loss.numel() != 1:
                raise ValueError(
                    f"The loss of task {name!r} must be a scalar (reduce it, e.g. `.mean()`); "
                    f"got shape {tuple(loss.shape)}."
                )
            if not loss.is_floating_point():
                raise TypeError(f"The loss of task {name!r} must be floating point; got {loss.dtype}.")
        if all(loss is None for loss in items):
            raise ValueError(_no_task_message(self.task_names))
        return items

    def combine(self, losses: LossesLike) -> Tensor:
        """The model loss ``sum_i w_i L_i`` with the current weights.

        A task that is missing (absent from the dict, or ``None``) or whose loss is not
        finite is left out of the sum and out of this step's update; its weight is kept.
        When gradients are enabled, the returned tensor carries a hook that records, during
        its backward, what :meth:`step` needs.

        Args:
            losses: a 1-D tensor of ``T`` losses, a sequence of ``T`` scalar tensors (``None``
                for a missing task) or a mapping from task name to scalar tensor.

        Returns:
            The combined loss, a 0-dim tensor.

        Raises:
            TypeError: losses that are not floating-point tensors.
            ValueError: non-scalar losses, a wrong number of losses, unknown task names.
        """
        items = self._normalize_losses(losses)
        ref = next(loss for loss in items if loss is not None)
        if self.weights.device != ref.device:
            self.to(ref.device)
        # A loss that does not require grad while gradients are on (e.g. `torch.tensor(nan)` for
        # a task without labels) cannot be balanced: it counts as absent, like a missing one.
        grad_on = torch.is_grad_enabled()
        known = [loss is not None and (loss.requires_grad or not grad_on) for loss in items]
        for name, loss, k in zip(self.task_names, items, known):
            # A constant loss (metadata check first: healthy steps never read a value) is
            # absent when non-finite (the usual "no labels" placeholder) and a misuse when finite.
            if loss is not None and not k and bool(torch.isfinite(loss).all()):
                raise ValueError(
                    f"The loss of task {name!r} does not require grad, so it does not depend on the shared "
                    "layer (computed under no_grad, or detached?). For a task without labels in this batch, "
                    "leave it out of the dict or pass None or NaN."
                )
        items = [loss if k else None for loss, k in zip(items, known)]
        # missing tasks enter as NaN, so one device-side isfinite decides presence
        values = torch.stack([
            loss.reshape(()) if loss is not None else ref.new_full((), float("nan")) for loss in items
        ])
        present = torch.isfinite(values)
        safe = torch.where(present, values, torch.zeros_like(values))
        weights = self.weights.detach().clone()
        combined = (_as(weights, safe.dtype) * safe).sum()

        captures, self._captures = self._captures, []
        views, self._views = self._views, None
        if not (torch.is_grad_enabled() and combined.requires_grad):
            return combined
        capture = captures[0] if len(captures) == 1 else None
        if self._measure_norms and self.mode != "autograd" and not captures:
            raise ValueError(
                f"The shared layer ({type(self.shared_layer).__name__}) was not called in the forward pass "
                "that produced these losses; `shared_layer` must be the last layer shared by all tasks."
            )
        if views is not None and (capture is None or self.mode == "autograd" or not self._measure_norms):
            views = None  # per-task backward passes below; the views act as plain aliases
        record = _StepRecord(items, values.detach(), present, weights, capture, views)
        self._record = record
        combined.register_hook(lambda grad: self._on_backward(record, grad))
        if views is not None:
            views[2].record = record
            self._graph_hooks.append(views[2])
        elif (
            capture is not None
            and self._measure_norms
            and self.mode != "autograd"
            and isinstance(self.shared_layer, nn.Linear)
        ):
            record.auto = self._hook_heads(record)
        return combined

    def _hook_heads(self, record: _StepRecord) -> bool:
        """Capture each task's gradient from its own head's backward node (automatic views).

        Walks each task's graph down to the shared layer's output. When every task reaches
        the shared part through exactly one edge, and all tasks through the same edge into the
        same shared node (the shared layer's output itself or an elementwise activation of
        it), a hook on each task's node records that task's gradient during the model's own
        backward and a pre-hook on the shared node turns them into the statistics: no extra
        backward pass. Returns False (the per-task ``autograd.grad`` path is used) otherwise.
        """
        assert record.capture is not None  # checked by the caller
        z = record.capture.output
        z_node = z.grad_fn
        if z_node is None:
            return False
        graphs: list[tuple[int, set[Any]]] = []
        counts: dict[Any, int] = {}
        budget = _MAX_HEAD_NODES
        for i, loss in enumerate(record.losses):
            if loss is None:
                continue
            seen: set[Any] = set()
            stack = [loss.grad_fn]
            while stack:
                node = stack.pop()
                if node is None or node in seen:
                    continue
                seen.add(node)
                budget -= 1
                if budget < 0:
                    return False  # a big graph above the shared layer: not a plain multi-head model
                if node is not z_node:
                    stack.extend(nxt for nxt, _ in node.next_functions)
            if z_node not in seen:
                return False  # the autograd path raises the clear error
            graphs.append((i, seen))
            for node in seen:
                counts[node] = counts.get(node, 0) + 1
        if len(graphs) < 2:
            return False
        edges: list[tuple[int, Any, int]] = []
        shared_edge: tuple[Any, int] | None = None
        for i, seen in graphs:
            found = [
                (node, k, nxt, nr)
                for node in seen
                if counts[node] == 1 and node is not z_node
                for k, (nxt, nr) in enumerate(node.next_functions)
                if nxt is not None and (counts.get(nxt, 0) > 1 or nxt is z_node)
            ]
            if len(found) != 1:
                return False
            node, k, nxt, nr = found[0]
            if shared_edge is None:
                shared_edge = (nxt, nr)
            elif shared_edge != (nxt, nr):
                return False
            edges.append((i, node, k))
        assert shared_edge is not None
        shared = shared_edge[0]
        if shared is not z_node and not (
            type(shared).__name__ in _ELEMENTWISE_NODES and shared.next_functions[0][0] is z_node
        ):
            return False
        grads: list[Tensor | None] = [None] * self.num_tasks

        def keep(i: int, k: int) -> Callable[[Any, Any], None]:
            def hook(grad_inputs: Any, grad_outputs: Any) -> None:
                grads[i] = grad_inputs[k]
            return hook

        handles = self._graph_hooks
        for i, node, k in edges:
            handles.append(node.register_hook(keep(i, k)))

        def on_shared(grad_outputs: Any) -> None:
            try:
                self._on_heads_backward(record, grads, shared, z)
            finally:
                self._remove_graph_hooks()  # drops this closure: no cycle through the node

        handles.append(shared.register_prehook(on_shared))
        return True

    def _on_heads_backward(self, record: _StepRecord, grads: list[Tensor | None], shared: Any, z: Tensor) -> None:
        """Pre-hook of the shared node: every head's gradient has arrived (``c w_i dL_i/d.``)."""
        if self._pending is None or record.scale is None:
            return
        ref = next(g for g in grads if g is not None)
        stacked = torch.stack([g if g is not None else torch.zeros_like(ref) for g in grads])
        if shared is not z.grad_fn:  # an elementwise activation: its derivative, once
            stacked = stacked * shared(torch.ones_like(ref))
        weights = _as(record.weights, self.dtype)
        self._add_output_grads(
            self._pending, record, _as(stacked, self.dtype) / weights.reshape(-1, *([1] * ref.dim())), z
        )

    # ------------------------------------------------------------------ backward side
    def _pending_for(self, record: _StepRecord) -> _Pending:
        if self._pending is None:
            n = self.num_tasks
            zeros = torch.zeros(n, dtype=self.dtype, device=record.values.device)
            self._pending = _Pending(zeros, zeros.clone(), torch.zeros(n, dtype=torch.bool, device=zeros.device))
        return self._pending

    def _on_backward(self, record: _StepRecord, scale: Tensor) -> None:
        """Hook on the combined loss: runs first in its backward, while the graph is alive."""
        scale = _as(scale.detach().reshape(()), self.dtype)
        record.scale = scale
        pending = self._pending_for(record)
        present = record.present
        weight = present * scale
        pending.loss_sum += torch.where(present, _as(record.values, self.dtype), 0.0) * weight
        pending.loss_weight += weight
        pending.present |= present
        if not self._measure_norms:
            return
        if record.views is not None or record.auto:
            return  # the views' or the heads' hooks deliver the per-task gradients  # the views' hook delivers the per-task gradients
        if self.mode == "autograd" or record.capture is None:
            pending.add_param_grads(self._autograd_param_grads(record, scale))
            return
        z = record.capture.output
        grads = []
        for name, loss in zip(self.task_names, record.losses):
            if loss is None:
                grads.append(torch.zeros(z.shape, dtype=self.dtype, device=z.device))
                continue
            (g,) = torch.autograd.grad(
                loss, z, grad_outputs=_as(scale, loss.dtype), retain_graph=True, allow_unused=True
            )
            if g is None:
                raise ValueError(self._unreached_message(name))
            grads.append(_as(g, self.dtype))
        self._add_output_grads(pending, record, torch.stack(grads), z)

    def _on_views_backward(self, record: _StepRecord, grads: Tensor) -> None:
        """Backward of the task views: ``grads`` ``(T, *z.shape)`` are ``c w_i dL_i/dz``."""
        if self._pending is None or record.scale is None or record.capture is None or record.views is None:
            return
        base = record.views[0]
        weights = _as(record.weights, self.dtype)
        rep_grads = _as(grads, self.dtype) / weights.reshape(-1, *([1] * base.dim()))
        # Both modes work at the shared layer's output z: the W-norms need it, and
        # "representation" means the same tensor whether or not the heads read views.
        z = record.capture.output
        if base is not z:
            rep_grads = _as(_vjp(base, z, _as(rep_grads, base.dtype)), self.dtype)
        self._add_output_grads(self._pending, record, rep_grads, z)

    def _add_output_grads(self, pending: _Pending, record: _StepRecord, grads: Tensor, z: Tensor) -> None:
        """Accumulate the statistics of per-task gradients ``(T, *z.shape)`` at ``z``."""
        mask = record.present.reshape(-1, *([1] * (grads.dim() - 1)))
        grads = torch.where(mask, grads, torch.zeros((), dtype=grads.dtype, device=grads.device))
        if self.mode == "representation":
            pending.add_rep_sq_norms(grads.flatten(1).pow(2).sum(dim=1))
        elif isinstance(self.shared_layer, nn.Linear) and record.capture is not None and record.capture.inputs:
            rows = _linear_rows(self.shared_layer, record.capture.inputs[0], self.dtype)
            pending.linear.append((rows, grads.reshape(grads.shape[0], -1, grads.shape[-1])))
        else:
            pending.add_param_grads(_vjp_param_grads(z, self._params, grads))

    def _autograd_param_grads(self, record: _StepRecord, scale: Tensor) -> Tensor:
        rows = []
        size = sum(p.numel() for p in self._params)
        for name, loss, ok in zip(self.task_names, record.losses, record.present.unbind()):
            if loss is None:
                rows.append(torch.zeros(size, dtype=self.dtype, device=scale.device))
                continue
            outs = torch.autograd.grad(
                loss, self._params, grad_outputs=_as(scale, loss.dtype), retain_graph=True, allow_unused=True
            )
            if all(g is None for g in outs):
                raise ValueError(self._unreached_message(name))
            flat = torch.cat([
                torch.zeros(p.numel(), dtype=self.dtype, device=scale.device) if g is None
                else g.reshape(-1).to(self.dtype)
                for g, p in zip(outs, self._params)
            ])
            rows.append(torch.where(ok, flat, 0.0))
        return torch.stack(rows)

    def _unreached_message(self, name: str) -> str:
        return (
            f"The loss of task {name!r} does not depend on the shared layer "
            f"({type(self.shared_layer).__name__}); every task must be computed from the last shared layer."
        )

    # ------------------------------------------------------------------ the update
    def _reduced_statistics(self, pending: _Pending) -> tuple[Tensor, Tensor, Tensor]:
        """``(squared norms, loss sums, loss weights, present)`` over all processes."""
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        if world == 1:
            return pending.local_sq_norms(), pending.loss_sum, pending.loss_weight
        n = self.num_tasks
        if self.distributed == "exact":
            grads = pending.local_param_grads()
            # representation mode: the rows of different ranks are disjoint, add squared norms
            stat = pending.local_sq_norms() if grads is None else grads.flatten()
            buf = torch.cat([stat, pending.loss_sum, pending.loss_weight])
            dist.all_reduce(buf)
            if grads is None:
                sq = buf[:n] / world**2
            else:
                sq = (buf[: grads.numel()].reshape(n, -1) / world).pow(2).sum(dim=1)
            return sq, buf[-2 * n : -n], buf[-n:]
        buf = torch.cat([pending.local_sq_norms().sqrt(), pending.loss_sum, pending.loss_weight])
        dist.all_reduce(buf)
        return (buf[:n] / world).pow(2), buf[n : 2 * n], buf[2 * n :]

    def current_lr(self) -> Tensor | float:
        """The weight optimizer's learning rate for the next update (a 0-dim tensor when it decays)."""
        if self.lr_decay_rate == 1.0:
            return self.lr
        exponent = self.num_updates / self.lr_decay_steps
        if self.lr_staircase:
            exponent = torch.floor(exponent)
        return self.lr * torch.exp(exponent * math.log(self.lr_decay_rate))

    @torch.no_grad()
    def step(self, grad_scale: Tensor | float | None = None, found_inf: Tensor | None = None) -> None:
        """Update the weights from what the backward passes since the last step recorded.

        Call it after the model's backward (after all backward passes of an accumulation
        window), before or after the model's optimizer step. Without a recorded backward it
        does nothing. Runs on the weights' device without reading any value on the host.

        Args:
            grad_scale: the factor the recorded backward passes were scaled by beyond the
                combined loss (the GradScaler's scale under fp16 AMP); ``None`` means 1.
            found_inf: a tensor that is non-zero when the model's step is skipped (e.g. the
                GradScaler found inf/NaN gradients); the weight update is then skipped too.
        """
        pending, self._pending = self._pending, None
        self._record = None
        self._remove_graph_hooks()
        if pending is None:
            return
        self.steps += 1
        sq_norms, loss_sum, loss_weight = self._reduced_statistics(pending)
        present = loss_weight > 0
        # absent tasks have loss_sum == 0, so the clamp only guards the division
        losses = loss_sum / loss_weight.clamp_min(torch.finfo(self.dtype).tiny)
        if grad_scale is not None:
            if isinstance(grad_scale, Tensor):
                grad_scale = grad_scale.to(device=sq_norms.device, dtype=self.dtype)
            sq_norms = sq_norms / (grad_scale * grad_scale)
        norms = sq_norms.sqrt()

        # L(0): measured over the first `initial_loss_steps` present steps, or fixed.
        if self._all_fixed:
            init_sum, init_count, initial = self.initial_loss_sum, self.initial_loss_count, self._fixed_initial
        else:
            collecting = present & (self.initial_loss_count < self.initial_loss_steps)
            init_count = self.initial_loss_count + collecting
            init_sum = self.initial_loss_sum + torch.where(collecting, losses, 0.0)
            initial = torch.where(self._fixed_mask, self._fixed_initial, init_sum / init_count.clamp_min(1))

        weights = self.weights
        new_weights, objective, ratios, rates, valid, moments = self._propose(weights, norms, losses, initial, present)
        ok = present.any() & (valid | ~present).all()
        if found_inf is not None:
            ok = ok & (found_inf.to(ok.device) == 0).reshape(())
        upd = ok & present  # per task: the tasks whose optimizer state moves this step

        self.weights = torch.where(ok, new_weights, weights)
        if moments[0] is not self.exp_avg:  # Adam: its moments move for the updated tasks only
            self.exp_avg = torch.where(upd, moments[0], self.exp_avg)
            self.exp_avg_sq = torch.where(upd, moments[1], self.exp_avg_sq)
            self.adam_steps = torch.where(upd, moments[2], self.adam_steps)
        if not self._all_fixed:
            self.initial_loss_sum = torch.where(ok, init_sum, self.initial_loss_sum)
            self.initial_loss_count = torch.where(ok, init_count, self.initial_loss_count)
        self._commit_extra_state(ok, present, losses)
        self.num_updates = self.num_updates + ok
        self.skipped = self.skipped + ~present
        self.skipped_updates = self.skipped_updates + ~ok
        self.last_stats = {
            "weights": self.weights,
            "grad_norms": norms,
            "loss_ratios": ratios,
            "inverse_rates": rates,
            "loss": objective,
            "skipped": self.skipped,
            "present": present,
            "applied": ok,
        }

    def _optimizer_direction(self, grad: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor]]:
        """The weight optimizer's step direction and its new (Adam) state."""
        if self.optimizer == "adam":
            direction, exp_avg, exp_avg_sq, adam_steps = F.adam_update(
                grad, self.exp_avg, self.exp_avg_sq, self.adam_steps, self.betas, self.eps
            )
            return direction, (exp_avg, exp_avg_sq, adam_steps)
        return grad, (self.exp_avg, self.exp_avg_sq, self.adam_steps)

    def _propose(
        self, weights: Tensor, norms: Tensor, losses: Tensor, initial: Tensor, present: Tensor
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, tuple[Tensor, Tensor, Tensor]]:
        """The GradNorm rule: the proposed weights, the GradNorm loss, ratios, inverse rates,
        which tasks have valid (finite) statistics, and the optimizer's new state."""
        grad, gradnorm_loss, ratios, rates = F.gradnorm_weight_grad(
            weights, norms, losses, initial, self.alpha, present
        )
        direction, moments = self._optimizer_direction(grad)
        new_weights = F.renormalize_weights(weights - self.current_lr() * direction, weights, present, self.min_weight)
        valid = torch.isfinite(norms) & torch.isfinite(rates) & torch.isfinite(new_weights) & (initial > 0)
        return new_weights, gradnorm_loss, ratios, rates, valid, moments

    def _commit_extra_state(self, ok: Tensor, present: Tensor, losses: Tensor) -> None:
        """Subclasses with more state commit it here (only where ``ok``)."""

    def __repr__(self) -> str:
        names = list(self._task_names) if self._task_names is not None else "?"
        return (
            f"GradNorm(tasks={names}, alpha={self.alpha}, lr={self.lr}, optimizer={self.optimizer!r}, "
            f"mode={self.mode!r})"
        )

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        for key in ("_hook", "_captures", "_views", "_record", "_pending", "_graph_hooks"):
            state.pop(key, None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._captures, self._views, self._record, self._pending = [], None, None, None
        self._graph_hooks = []
        self._hook = None
        self.attach_hooks()

