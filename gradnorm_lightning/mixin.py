"""`GradNormMixin`: what a LightningModule exposes to a loss-weighting callback."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import torch
from torch import Tensor, nn

__all__ = ["GradNormMixin", "TaskBalancer"]


class TaskBalancer(Protocol):
    """What the mixin needs from a loss-weighting strategy (GradNorm or a baseline)."""

    @property
    def initialized(self) -> bool: ...

    @property
    def task_names(self) -> tuple[str, ...]: ...

    weights: Tensor

    def combine(self, losses: Any) -> Tensor: ...

    def task_views(self, z: Tensor) -> tuple[Tensor, ...]: ...


class GradNormMixin:
    """Mix into a ``LightningModule`` to let :class:`~gradnorm_lightning.GradNormCallback` balance its task losses.

    Implement :meth:`shared_layer` and return :meth:`combine_task_losses` from
    ``training_step``. Optionally declare ``task_names`` (needed when some task may be absent
    from the first batch, and for :meth:`task_views`).

    Without a weighting callback attached, :meth:`combine_task_losses` is the plain sum of the
    finite task losses (equal weighting).

    Example::

        >>> import lightning as L
        >>> from torch import nn
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

    # The balancer is attached by the callback; it is not a submodule (it holds no parameters
    # of the model and its state is saved by the callback).
    def _attach_balancer(self, balancer: TaskBalancer | None) -> None:
        object.__setattr__(self, "_task_balancer", balancer)

    @property
    def task_balancer(self) -> TaskBalancer | None:
        """The weighting strategy attached by the callback, if any."""
        return getattr(self, "_task_balancer", None)

    def _declared_task_names(self) -> tuple[str, ...] | None:
        names = self.task_names
        return None if names is None else tuple(names)

    def combine_task_losses(self, losses: Mapping[str, Tensor]) -> Tensor:
        """The model loss ``sum_i w_i L_i`` for this step.

        Args:
            losses: task name to scalar loss. A task may be missing (no labels in the batch);
                a non-finite loss counts as missing.

        Returns:
            The weighted sum, a 0-dim tensor to return from ``training_step``.

        Raises:
            TypeError: if ``losses`` is not a mapping.
        """
        if not isinstance(losses, Mapping):
            raise TypeError(
                f"`combine_task_losses` takes a dict of task name to loss; got {type(losses).__name__}."
            )
        balancer = self.task_balancer
        if balancer is not None:
            return balancer.combine(losses)
        declared = self._declared_task_names()
        if declared is not None:
            unknown = sorted(set(losses) - set(declared))
            if unknown:
                raise ValueError(f"Unknown task(s) {unknown}: the declared tasks are {list(declared)}.")
        if not losses:
            from gradnorm_lightning.balancer import _no_task_message

            raise ValueError(_no_task_message(list(declared or ())))
        values = [v.reshape(()) for v in losses.values()]
        stacked = torch.stack(values)
        return torch.where(torch.isfinite(stacked), stacked, torch.zeros_like(stacked)).sum()

    @property
    def task_weights(self) -> dict[str, Tensor]:
        """The current task weights, task name to 0-dim tensor (ones before any update)."""
        balancer = self.task_balancer
        if balancer is not None and balancer.initialized:
            return dict(zip(balancer.task_names, balancer.weights.detach().unbind()))
        declared = self._declared_task_names() or ()
        return {name: torch.ones(()) for name in declared}

    def task_views(self, z: Tensor) -> dict[str, Tensor]:
        """One alias of the shared representation per task, keyed by task name.

        When each head reads only its own view, the per-task gradients GradNorm needs are
        captured during the model's own backward, with no extra pass through the heads.

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
        declared = self._declared_task_names()
        if declared is None:
            raise ValueError(
                "`task_views` needs the task names before the first loss is seen: declare them as "
                "`task_names = (...)` on the module."
            )
        return {name: z.view_as(z) for name in declared}

