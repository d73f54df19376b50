"""`GradNormMixin`: what a LightningModule exposes to a loss-weighting callback."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from gradnorm_lightning._compat import trainer_scaler

__all__ = ["GradNormMixin", "TaskBalancer"]


class TaskBalancer(Protocol):
    """What the mixin needs from a loss-weighting strategy (GradNorm or a baseline)."""

    @property
    def initialized(self) -> bool: ...

    @property
    def task_names(self) -> tuple[str, ...]: ...

    weights: Tensor

    def combine(self, losses: Any, extra: Tensor | None = None) -> Tensor: ...

    def task_views(self, z: Tensor) -> tuple[Tensor, ...]: ...


def _empty_loss(module: Any, like: Tensor | None) -> Tensor:
    """The loss of a batch without any task: a zero that requires grad.

    In one process it reaches no parameter (every gradient stays ``None`` and the optimizer
    skips every parameter). Under DDP, and under fp16 AMP (whose GradScaler refuses a step
    without any gradient), every trainable parameter gets a zero gradient instead, so that the
    process takes part in the gradient reduction and the scaler sees finite gradients.
    """
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized() \
        and torch.distributed.get_world_size() > 1
    scaler = trainer_scaler(module)
    if (distributed or (scaler is not None and scaler.is_enabled())) and isinstance(module, nn.Module):
        params = [p for p in module.parameters() if p.requires_grad]
        if params:
            return torch.stack([p.sum() for p in params]).sum() * 0.0
    if like is not None:
        return like
    return torch.zeros((), requires_grad=torch.is_grad_enabled())


class GradNormMixin:
    """Mix into a ``LightningModule`` to let :class:`~gradnorm_lightning.GradNormCallback` balance its task losses.

    Implement :meth:`shared_layer` and return :meth:`combine_task_losses` from
    ``training_step``. Optionally declare ``task_names`` (needed when some task may be absent
    from the first batch, and for :meth:`task_views`).

    Without a weighting callback attached, :meth:`combine_task_losses` is the plain sum of the
    finite task losses (equal weighting).

    Example::

        >>> import lightning as L
        >>> class Net(GradNormMixin, L.LightningModule):
        ...     task_names = ("a", "b")
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.trunk = nn.Sequential(nn.Linear(3, 4), nn.ReLU())
        ...         self.heads = nn.ModuleDict({t: nn.Linear(4, 1) for t in self.task_names})
        ...     def shared_layer(self):
        ...         return self.trunk[0]
        >>> net = Net()
        >>> net.combine_task_losses({"a": torch.tensor(1.0), "b": torch.tensor(2.0)})
        tensor(3.)
        >>> net.task_weights
        {'a': tensor(1.), 'b': tensor(1.)}
    """

    #: Optional declaration of every task, in weight order.
    task_names: Sequence[str] | None = None

    def shared_layer(self) -> nn.Module:
        """The last layer shared by all tasks; GradNorm's norms run over all its parameters.

        Raises:
            NotImplementedError: unless overridden.
        """
        raise NotImplementedError(
            f"{type(self).__name__} must implement `shared_layer()` returning the last shared layer "
            "(e.g. `return self.trunk[-2]`)."
        )

    def attach_task_balancer(self, balancer: TaskBalancer | None) -> None:
        """Use ``balancer``'s weights in :meth:`combine_task_losses` (the callback calls this).

        The balancer is not a submodule: it holds no parameters of the model, and its state is
        saved by the callback.
        """
        object.__setattr__(self, "_task_balancer", balancer)

    @property
    def task_balancer(self) -> TaskBalancer | None:
        """The weighting strategy attached by the callback, if any."""
        return getattr(self, "_task_balancer", None)

    @property
    def declared_task_names(self) -> tuple[str, ...] | None:
        """The declared ``task_names`` as a tuple, or ``None``."""
        names = self.task_names
        return None if names is None else tuple(names)

    def combine_task_losses(self, losses: Mapping[str, Tensor | None], extra: Tensor | None = None) -> Tensor:
        """The model loss ``sum_i w_i L_i`` for this step (plus ``extra``).

        Args:
            losses: task name to scalar loss. A task may be missing (no labels in the batch);
                ``None``, a non-finite loss, or a NaN placeholder without a graph count as missing.
            extra: a loss term outside the balancing (an auxiliary loss with the weight you gave
                it, a regulariser), added to the result. Passed here rather than added to the
                result, it stays out of the tasks' gradient norms even where it reads a head's
                own activations.

        Returns:
            The weighted sum, a 0-dim tensor to return from ``training_step``. For a batch in
            which no task has a loss it is a zero whose backward changes no parameter (the
            step is counted as empty and the weights are not updated).

        Raises:
            TypeError: if ``losses`` is not a mapping.
            ValueError: for unknown task names, or an empty batch before the tasks are known.
        """
        if not isinstance(losses, Mapping):
            raise TypeError(f"`combine_task_losses` takes a dict of task name to loss; got {type(losses).__name__}.")
        balancer = self.task_balancer
        if balancer is not None:
            combined = balancer.combine(losses, extra=extra)
            return _empty_loss(self, combined) if combined.grad_fn is None and combined.requires_grad else combined
        declared = self.declared_task_names
        if declared is not None:
            unknown = sorted(set(losses) - set(declared))
            if unknown:
                raise ValueError(f"Unknown task(s) {unknown}: the declared tasks are {list(declared)}.")
        values = [v.reshape(()) for v in losses.values() if v is not None]
        if not values:
            empty = _empty_loss(self, None)
            return empty if extra is None else empty + extra.reshape(())
        stacked = torch.stack(values)
        total = torch.where(torch.isfinite(stacked), stacked, torch.zeros_like(stacked)).sum()
        return total if extra is None else total + extra.reshape(())

    @property
    def task_weights(self) -> dict[str, Tensor]:
        """The current task weights, task name to 0-dim tensor (ones before any update)."""
        balancer = self.task_balancer
        if balancer is not None and balancer.initialized:
            return dict(zip(balancer.task_names, balancer.weights.detach().unbind()))
        return {name: torch.ones(()) for name in self.declared_task_names or ()}

    def task_views(self, z: Tensor) -> dict[str, Tensor]:
        """One alias of the shared representation per task, keyed by task name.

        When each head reads only its own view, the per-task gradients GradNorm needs are
        handed over during the model's own backward, with no extra pass through the heads.

        Args:
            z: the shared representation (the shared layer's output, or an activation of it).

        Returns:
            Task name to view of ``z``.

        Raises:
            ValueError: if the task names are not known yet (declare ``task_names``).
        """
        balancer = self.task_balancer
        if balancer is not None and balancer.initialized:
            return dict(zip(balancer.task_names, balancer.task_views(z)))
        declared = self.declared_task_names
        if declared is None:
            raise ValueError(
                "`task_views` needs the task names before the first loss is seen: declare them as "
                "`task_names = (...)` on the module."
            )
        return {name: z.view_as(z) for name in declared}
