"""GradNorm (Chen et al., ICML 2018) for a plain PyTorch training loop."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from gradnorm_lightning import functional as F
from gradnorm_lightning._arrays import TORCH, ArrayOps, Vec, ieee_div
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
from gradnorm_lightning.capture.recorder import Statistics

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
        min_weight: floor applied to the weights before renormalisation (``> 0``; linear
            weight space only).
        mode: ``"auto"`` (the paper's norms over the shared layer's parameters, by the
            cheapest exact route the model allows; see the README's "Routes"), ``"autograd"``
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
    host_update: ClassVar[bool] = True
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
        task_cosines: bool = False,
    ) -> None:
        own = self.check_options(**own_arguments(
            locals(), "shared_layer", "num_tasks", "task_names", "initial_losses", "initial_loss_steps", "mode",
            "distributed", "recorder", "task_cosines",
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
            task_cosines=task_cosines,
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
        return state

    def current_lr(self) -> Tensor | float:
        """The weight optimizer's learning rate for the next update (a 0-dim tensor when it decays)."""
        return self._optim.current_lr(self.num_updates)

    def propose(self, inputs: StepInputs) -> Proposal:
        """The GradNorm rule: a step along ``dL_grad/dw_i = sign(G_i - target_i) n_i``, renormalised."""
        w, present, xp = inputs.weights, inputs.present, inputs.ops
        grad, objective = F.gradnorm_weight_grad_from_rates(w, inputs.grad_norms, inputs.inverse_rates, self.alpha, present)
        state = {name: xp.view(getattr(self, name)) for name in ("exp_avg", "exp_avg_sq", "adam_steps")}
        floor_steps = xp.view(self.floor_steps)
        if self.weight_space == "log":
            # w = exp(s): dL/ds = dL/dw * w; no floor is needed (exp > 0)
            delta, state = self._optim.step(grad * w, state, inputs.num_updates, present)
            raw = xp.exp(xp.log(w) - delta)
            new = F.renormalize_weights(raw, w, present, xp.tiny(w))
        else:
            delta, state = self._optim.step(grad, state, inputs.num_updates, present)
            raw = w - delta
            new = F.renormalize_weights(raw, w, present, self.min_weight)
            floor_steps = floor_steps + (present & (raw < self.min_weight)).any()
        valid = (
            xp.isfinite(inputs.grad_norms) & xp.isfinite(inputs.inverse_rates + new) & (inputs.initial_losses > 0)
        )
        state = {
            **state,
            "floor_steps": floor_steps,
            "jump_steps": xp.view(self.jump_steps) + (xp.amax(abs(new - w)) > _JUMP),
        }
        return Proposal(new, valid, objective, state)

    # ------------------------------------------------------------------ the host kernel
    def _update(self, stats: Statistics, found_inf: Tensor | None, xp: ArrayOps) -> None:
        # (a subclass with its own rule keeps it: the kernel is this class's propose, fused)
        if xp is TORCH or type(self).propose is not GradNorm.propose:
            super()._update(stats, found_inf, xp)
            return
        try:
            self._host_kernel(stats, found_inf, xp)
        except (ArithmeticError, ValueError):
            # Python raised where IEEE arithmetic gives inf or NaN: the generic path decides
            # (it falls back to the device path in turn)
            super()._update(stats, found_inf, xp)

    def _host_kernel(self, stats: Statistics, found_inf: Tensor | None, xp: ArrayOps) -> None:
        """The whole update of :meth:`Balancer._update` with :meth:`propose`, fused: one pass
        over the tasks in Python floats, the same operations in the same order as the generic
        host path (so the same numbers; ``tests/test_host_update.py`` holds them equal), and
        several times fewer interpreted operations. Writes nothing before it has finished."""
        get = xp.view
        present_vec, weights_vec = get(stats.present), get(self.weights)
        present, losses, norms, weights = present_vec.v, get(stats.losses).v, get(stats.grad_norms).v, weights_vec.v
        num_tasks = len(weights)
        tasks = range(num_tasks)
        init_sum: list[float] = []
        init_count: list[float] = []
        count: list[float] = []
        if self._all_fixed:
            initial = get(self._fixed_initial).v
        else:
            count, total, steps = get(self.initial_loss_count).v, get(self.initial_loss_sum).v, self.initial_loss_steps
            for i in tasks:
                collecting = present[i] and count[i] < steps
                init_count.append(count[i] + collecting)
                init_sum.append(total[i] + losses[i] * collecting)
            initial = [a / (c if c >= 1.0 or c != c else 1.0) for a, c in zip(init_sum, init_count)]
            if self._any_fixed:
                initial = [f if m else a for f, m, a in zip(get(self._fixed_initial).v, get(self._fixed_mask).v, initial)]
        ratios = [ieee_div(a, b) for a, b in zip(losses, initial)]
        live = float(sum(present))
        live = live if live >= 1.0 else 1.0
        safe = [r if m else 1.0 for r, m in zip(ratios, present)]
        mean = sum(r if m else 0.0 for r, m in zip(safe, present)) / live
        rates = [ieee_div(r, mean) for r in safe]
        # the GradNorm gradient (F.gradnorm_weight_grad_from_rates)
        safe_norms = [n if m else 0.0 for n, m in zip(norms, present)]
        weighted = [a * b for a, b in zip(weights, safe_norms)]
        mean_g = sum(g if m else 0.0 for g, m in zip(weighted, present)) / live
        alpha = self.alpha
        diff = [g - math.pow(r, alpha) * mean_g for g, r in zip(weighted, rates)]
        objective = sum(abs(d) if m else 0.0 for d, m in zip(diff, present))
        grad = [(1.0 if d > 0 else (-1.0 if d < 0 else 0.0)) * n for d, n in zip(diff, safe_norms)]
        log_space = self.weight_space == "log"
        if log_space:
            grad = [g * w for g, w in zip(grad, weights)]
        # the weight optimizer (WeightOptimizer.step)
        opt = self._optim
        lr: float = opt.current_lr(get(self.num_updates))
        state: dict[str, Any] = {}
        if opt.kind == "adam":
            beta1, beta2 = opt.betas
            eps = opt.eps
            exp_avg, exp_avg_sq, adam_steps = get(self.exp_avg).v, get(self.exp_avg_sq).v, get(self.adam_steps).v
            new_m, new_v, new_k, delta = [], [], [], []
            for i in tasks:
                g = grad[i]
                k = adam_steps[i] + 1
                m = exp_avg[i] * beta1 + g * (1 - beta1)
                v = exp_avg_sq[i] * beta2 + g * g * (1 - beta2)
                denom = math.sqrt(v) / math.sqrt(1 - math.pow(beta2, k)) + eps
                delta.append(ieee_div(ieee_div(m, 1 - math.pow(beta1, k)), denom) * lr)
                keep = present[i]
                new_m.append(m if keep else exp_avg[i])
                new_v.append(v if keep else exp_avg_sq[i])
                new_k.append(k if keep else adam_steps[i])
            state = {"exp_avg": Vec(new_m), "exp_avg_sq": Vec(new_v), "adam_steps": Vec(new_k)}
        else:
            delta = [g * lr for g in grad]
        floored = False
        if log_space:
            raw = [math.exp(math.log(w) - d) for w, d in zip(weights, delta)]
            low = xp.tiny(weights_vec)
        else:
            raw = [w - d for w, d in zip(weights, delta)]
            low = self.min_weight
            floored = any(m and r < low for m, r in zip(present, raw))
        # F.renormalize_weights
        clamped = [r if r >= low or r != r else low for r in raw]
        absent_sum = sum(0.0 if m else w for m, w in zip(present, weights))
        present_sum = sum(c if m else 0.0 for c, m in zip(clamped, present))
        factor = (num_tasks - absent_sum) / present_sum
        new = [c * factor if m else w for c, m, w in zip(clamped, present, weights)]
        change = [abs(a - w) for a, w in zip(new, weights)]
        jump = (math.nan if any(c != c for c in change) else max(change)) > _JUMP
        ok = any(present) and all(
            (math.isfinite(n) and math.isfinite(r + a) and i0 > 0) or not m
            for n, r, a, i0, m in zip(norms, rates, new, initial, present)
        )
        if found_inf is not None:
            ok = ok and xp.is_zero(found_inf.to(self.device))
        # only what changes is written (the counters and L(0)'s sums stay the same tensors otherwise)
        new_state: dict[str, Any] = {"weights": Vec(new), **state}
        if floored:
            new_state["floor_steps"] = get(self.floor_steps) + 1
        if jump:
            new_state["jump_steps"] = get(self.jump_steps) + 1
        if not self._all_fixed and init_count != count:
            new_state.update(initial_loss_sum=Vec(init_sum), initial_loss_count=Vec(init_count))
        logged = {"loss_ratios": Vec(ratios), "inverse_rates": Vec(rates), "loss": objective}
        self._commit_on_host(stats, new_state, logged, bool(ok), ~present_vec, xp)

    def health_warnings(self) -> list[str]:
        """Warnings about weights that park at the floor or jump (reads the counters on the host).

        The Lightning callback calls this on logging steps and warns once; in a plain loop,
        call it yourself now and then (it synchronises with the device).

        Returns:
            One message per problem found (empty when the weights are steady).
        """
        if not self.initialized:
            return []
        updates = float(self.num_updates)
        if updates < _MIN_UPDATES:
            return []
        out = []
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
