"""GradNorm (Chen et al., ICML 2018) for a plain PyTorch training loop."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from typing_extensions import Self

from gradnorm_lightning import functional as F
from gradnorm_lightning._checks import (
    OPTIMIZERS,
    WEIGHT_SPACES,
    _check_alpha,
    _check_betas,
    _choice,
    _flag,
    _integer,
    _number,
)
from gradnorm_lightning.balancers._optimizer import WeightOptimizer
from gradnorm_lightning.balancers.base import Balancer
from gradnorm_lightning.balancers.interface import Proposal, StepInputs, own_arguments
from gradnorm_lightning.capture import Recorder

__all__ = ["GradNorm"]

#: A weight that moves by more than this in one update (the weights average 1) is a jump.
_JUMP = 0.5
#: Share of updates at the floor, or jumping, above which :meth:`GradNorm.health_warnings` warns.
_UNHEALTHY = 0.05
_MIN_UPDATES = 20


class GradNorm(Balancer):
    """GradNorm loss balancing (Chen et al., ICML 2018) for a plain PyTorch training loop.

    Keeps one weight per task, starting at 1 and summing to ``T``. :meth:`combine` returns
    the model loss ``sum_i w_i L_i``; during its backward the balancer's recorder gathers the
    per-task gradients at the last shared layer; :meth:`step` then moves the weights along the
    analytic gradient of the GradNorm loss ``sum_i |w_i n_i - mean(w n) r_i ** alpha|`` and
    renormalises them. The model's gradients are exactly those of ``sum_i w_i L_i``.

    The default weight optimizer is Adam: the GradNorm gradient ``sign(G_i - target_i) n_i``
    scales with the losses (and so with their gradient norms), and plain SGD's step scales
    with it, so on tasks whose losses differ in scale SGD's weights jump between the floor and
    about ``T``; Adam's normalised step does not (as in the original Keras implementation).
    ``optimizer="sgd"`` is the paper's update. ``weight_space="log"`` takes the update in
    ``s = log w`` instead (``w_i = exp(s_i)``, renormalised to sum ``T``): a weight can then
    shrink geometrically but never sits on a floor.

    Args:
        shared_layer: the last layer shared by all tasks; the norms run over all its
            parameters that require grad at each step.
        num_tasks: number of tasks ``T`` (tasks are then named ``task0``, ``task1``, ...).
        task_names: the task names, in the order of the weights; alternative to
            ``num_tasks``. With neither, the names are taken from the first dict of losses.
        alpha: asymmetry: how strongly tasks that train slower are pushed (``>= 0``).
        lr: learning rate of the weight optimizer.
        optimizer: ``"adam"`` (default) or ``"sgd"`` (the paper's update; see above).
        weight_space: ``"linear"`` (the paper) or ``"log"`` (update in ``log w``).
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
        min_weight: the floor of every weight (``> 0``; linear weight space only): after each
            update every present weight is at least ``min_weight`` and the weights sum to ``T``
            (see :func:`~gradnorm_lightning.renormalize_weights`).
        mode: ``"auto"`` (the paper's norms over the shared layer's parameters, by the
            cheapest exact route the model allows; see docs/explanation/routes.md), ``"autograd"``
            (the same norms by one ``autograd.grad`` per task: the slow reference, and no
            forward hook) or ``"representation"`` (norms of the per-task gradients at the
            shared layer's output: an approximation of the paper's, cheapest).
        distributed: under ``torch.distributed`` with more than one process, ``"exact"``
            gives the norms of the global batch's gradient (the weights are those of one
            process on the global batch, bitwise equal on every rank): per-task gradients are
            reduce-scattered (at most ``(W-1)/W x T x |W|`` floats per rank), or, where cheaper,
            a Linear's inputs and output gradients or an embedding's touched rows are
            all-gathered (see :mod:`~gradnorm_lightning.capture.distributed`); ``"approx"``
            all-reduces only the local norms and losses (``3T`` floats) and uses the mean of the
            local norms.
        recorder: a :class:`~gradnorm_lightning.capture.Recorder` to use (default: one built
            from ``mode`` and ``distributed``).
        update_every: measure the statistics and update the weights on optimizer steps 0, k, 2k,
            ... only (Algorithm 1's update on those steps, ``L(0)`` from step 0); the other steps
            train with the current weights as plain steps, so a step costs about
            ``1 + (x - 1) / k`` plain steps where ``x`` is a measured step's cost.
        freeze_after: after this many applied weight updates the weights stay fixed and every
            step is a plain step (``None``: never); :attr:`frozen` can also be set by hand.
        task_cosines: also compute the cosines between the tasks' gradients over the shared
            layer's trainable parameters: ``last_stats["cosines"]``, a ``(T, T)`` matrix (NaN in
            the row and column of a task absent from the step or with a zero gradient; under
            ``mode="representation"``, the cosines of the gradients at the layer's output).
            The norms then come from the same ``T x T`` Gram (its diagonal), which costs a
            ``T x T`` product where the norms alone cost its diagonal. Exact under
            ``distributed="exact"`` (the Gram of the averaged gradient).

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
        >>> round(float(gn.weights.sum()), 5), gn.last_stats["route"]
        (3.0, 'heads')
    """

    objective_key: ClassVar[str | None] = "gradnorm/loss"
    uses_initial_losses: ClassVar[bool] = True
    counter_names = ("floor_steps", "jump_steps")
    exp_avg: Tensor
    exp_avg_sq: Tensor
    adam_steps: Tensor
    floor_steps: Tensor
    jump_steps: Tensor
    _option_checks: ClassVar[dict[str, Any]] = {
        "alpha": _check_alpha,
        "lr": _number("lr"),
        "optimizer": _choice("optimizer", OPTIMIZERS),
        "weight_space": _choice("weight_space", WEIGHT_SPACES),
        "betas": _check_betas,
        "eps": _number("eps"),
        "lr_decay_rate": _number("lr_decay_rate"),
        "lr_decay_steps": _integer("lr_decay_steps"),
        "lr_staircase": _flag,
        "min_weight": _number("min_weight"),
    }

    def __init__(
        self,
        shared_layer: nn.Module,
        num_tasks: int | None = None,
        *,
        task_names: Sequence[str] | None = None,
        alpha: float = 1.5,
        lr: float = 0.01,
        optimizer: str = "adam",
        weight_space: str = "linear",
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
        recorder: Recorder | None = None,
        update_every: int = 1,
        freeze_after: int | None = None,
        task_cosines: bool = False,
    ) -> None:
        own = self.check_options(**own_arguments(
            locals(), "shared_layer", "num_tasks", "task_names", "initial_losses", "initial_loss_steps", "mode",
            "distributed", "recorder", "update_every", "freeze_after", "task_cosines",
        ))
        self.alpha: float = own["alpha"]
        self.lr: float = own["lr"]
        self.optimizer: str = own["optimizer"]
        self.weight_space: str = own["weight_space"]
        self.betas: tuple[float, float] = own["betas"]
        self.eps: float = own["eps"]
        self.lr_decay_rate: float = own["lr_decay_rate"]
        self.lr_decay_steps: int = own["lr_decay_steps"]
        self.lr_staircase: bool = own["lr_staircase"]
        self.min_weight: float = own["min_weight"]
        self._optim = WeightOptimizer(
            self.optimizer, self.lr, self.betas, self.eps, self.lr_decay_rate, self.lr_decay_steps, self.lr_staircase
        )
        super().__init__(
            shared_layer, num_tasks, task_names=task_names, initial_losses=initial_losses,
            initial_loss_steps=initial_loss_steps, mode=mode, distributed=distributed, recorder=recorder,
            update_every=update_every, freeze_after=freeze_after, task_cosines=task_cosines,
        )

    def options(self) -> dict[str, Any]:
        """The settings shown by ``repr``."""
        return {"alpha": self.alpha, "lr": self.lr, "optimizer": self.optimizer,
                "weight_space": self.weight_space, "mode": self.mode}

    def initial_state(self, num_tasks: int) -> dict[str, Tensor]:
        """Adam's state and the health counters (updates at the floor, updates with a jump)."""
        state = self._optim.initial_state(num_tasks, self.dtype, self.device)
        scalar = torch.zeros((), dtype=self.dtype, device=self.device)
        state.update(floor_steps=scalar.clone(), jump_steps=scalar.clone())
        self._make_ramp(num_tasks)
        return state

    def _make_ramp(self, num_tasks: int) -> None:
        """Made once: the floor's ``T + m * [1, ..., T]`` (see ``functional.renormalize_weights``)."""
        floor = self.min_weight if self.weight_space == "linear" else float(torch.finfo(self.dtype).tiny)
        self._ramp = num_tasks + torch.arange(1, num_tasks + 1, dtype=self.dtype, device=self.device) * floor
        self._floor = floor

    def to(self, device: torch.device | str) -> Self:
        """Move the state to ``device``."""
        super().to(device)
        if self.initialized:
            self._ramp = self._ramp.to(self.device)
        return self

    def _set_state_dtype(self, dtype: torch.dtype) -> None:
        super()._set_state_dtype(dtype)
        if self.initialized:
            self._make_ramp(self.num_tasks)

    def current_lr(self) -> Tensor | float:
        """The weight optimizer's learning rate for the next update (a 0-dim tensor when it decays)."""
        return self._optim.current_lr(self.num_updates)

    def propose(self, inputs: StepInputs) -> Proposal:
        """The GradNorm rule: a step along ``dL_grad/dw_i = sign(G_i - target_i) n_i``, renormalised.

        The tasks that take part are the ``rated`` ones (present, with a positive ``L(0)``).
        """
        w, rated = inputs.weights, inputs.rated
        grad, objective = F._weight_grad(w, inputs.grad_norms, inputs.inverse_rates, self.alpha, rated, inputs.num_rated)
        state = {"exp_avg": self.exp_avg, "exp_avg_sq": self.exp_avg_sq, "adam_steps": self.adam_steps}
        if self.weight_space == "log":
            # w = exp(s): dL/ds = dL/dw * w; no floor is needed (exp > 0)
            raw, state = self._optim.step(w.log(), grad * w, state, inputs.num_updates, rated)
            raw = raw.exp()
        else:
            raw, state = self._optim.step(w, grad, state, inputs.num_updates, rated)
        new, scale = F._floored_renormalization(raw, w, rated, self._floor, self._ramp)
        # a non-finite norm or rate of a task taking part makes the objective non-finite; a
        # non-finite step makes the scale 0 or non-finite
        valid = torch.isfinite(objective + scale.reciprocal())
        counts = {"jump_steps": torch.linalg.vector_norm(new - w, float("inf")) > _JUMP}
        if self.weight_space == "linear":  # (the step took a weight below the floor)
            counts["floor_steps"] = ((raw < self.min_weight) & rated).any()
        return Proposal(new, valid, objective, state, counts)

    def health_warnings(self) -> list[str]:
        """Warnings about weights that park at the floor or jump, and :meth:`Balancer.health_warnings`'s
        (reads the counters on the host).

        The Lightning callback calls this on logging steps and warns once; in a plain loop,
        call it yourself now and then (it synchronises with the device).

        Returns:
            One message per problem found (empty when the weights are steady).
        """
        out = super().health_warnings()
        if not self.initialized:
            return out
        updates = float(self.num_updates)
        if updates < _MIN_UPDATES:
            return out
        floor, jumps = float(self.floor_steps) / updates, float(self.jump_steps) / updates
        fix = (
            "The paper's SGD update scales with the tasks' gradient norms, so with losses of different "
            "scales its step is too large for some weights: use optimizer='adam' (the default), "
            "weight_space='log', or a smaller lr."
        )
        if floor > _UNHEALTHY and self.weight_space == "linear":
            out.append(f"GradNorm weights hit the floor (min_weight={self.min_weight}) on {floor:.0%} of the "
                       f"{updates:.0f} updates. {fix}")
        if jumps > _UNHEALTHY:
            out.append(f"GradNorm weights jumped by more than {_JUMP} in one update on {jumps:.0%} of the "
                       f"{updates:.0f} updates (they oscillate). {fix}")
        return out
