"""Task views: one alias of the shared representation per task, read back in one node.

:func:`fan_out` returns ``T`` aliases of ``z`` produced by a single autograd node. When each
head reads its own alias, that node's backward receives every task's gradient at ``z``
separately, during the model's own backward, before they are summed: the per-task gradients
cost no extra pass. The node hands them to a callback (held weakly) and returns their sum, so
the model's gradients are unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from gradnorm_lightning.capture._refs import weak_callable

__all__ = ["fan_out"]

ViewsCallback = Callable[[tuple[Tensor | None, ...]], None]


class _Slot:
    """What the views' node calls back; weak, so the graph does not keep the recorder alive."""

    __slots__ = ("_ref",)

    def __init__(self, callback: ViewsCallback) -> None:
        self._ref = weak_callable(callback)

    def __call__(self, grads: tuple[Tensor | None, ...]) -> None:
        callback = self._ref()
        if callback is not None:
            callback(grads)


class _FanOut(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, z: Tensor, slot: _Slot, num_tasks: int) -> tuple[Tensor, ...]:
        ctx.slot = slot
        ctx.set_materialize_grads(False)
        return tuple(z.view_as(z) for _ in range(num_tasks))

    @staticmethod
    def backward(ctx: Any, *grads: Tensor | None) -> tuple[Tensor | None, None, None]:
        used = [g for g in grads if g is not None]
        if not used:
            return None, None, None
        ctx.slot(grads)
        total = used[0] if len(used) == 1 else torch.stack(used).sum(dim=0)
        return total, None, None


def fan_out(z: Tensor, num_tasks: int, callback: ViewsCallback) -> tuple[Tensor, ...]:
    """``num_tasks`` aliases of ``z`` whose backward calls ``callback(grads)`` with one gradient per view.

    Args:
        z: the shared representation.
        num_tasks: how many views.
        callback: receives the tuple of per-view gradients (``None`` for an unread view)
            during the backward, while the graph below ``z`` is still alive. A bound method
            is held weakly.

    Returns:
        The views, in task order.

    Example::

        >>> seen = []
        >>> z = torch.ones(2, requires_grad=True)
        >>> a, b = fan_out(z, 2, seen.append)
        >>> (2 * a + 3 * b).sum().backward()
        >>> [g.tolist() for g in seen[0]], z.grad.tolist()
        ([[2.0, 2.0], [3.0, 3.0]], [5.0, 5.0])
    """
    return _FanOut.apply(z, _Slot(callback), num_tasks)
