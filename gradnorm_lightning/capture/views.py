"""Task views: one alias of the shared representation per task, read back in one node.

:func:`fan_out` returns ``T`` aliases of ``z`` produced by a single autograd node. When each
head reads its own alias, that node's backward receives every task's gradient at ``z``
separately, during the model's own backward, before they are summed: the per-task gradients
cost no extra pass. The node hands them to a callback (held weakly) and returns their sum, so
the model's gradients are unchanged. When every view was read, the gradients are stacked once,
into the block the callback receives and the sum is taken from (no second copy), in the memory
layout the callback's ``layout`` asks for, or not at all where it wants the gradients alone.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from gradnorm_lightning.capture._refs import weak_callable

__all__ = ["fan_out"]

ViewsCallback = Callable[[tuple[Tensor | None, ...], Tensor | None], None]
#: ``layout(numel)``: how the per-task gradients of ``numel`` elements each are handed over when
#: every view was read: ``"batch"`` (one ``(T, ...)`` block stored batch-major, ``(N, T, ...)``
#: in memory), ``"task"`` (one block, each task's gradient contiguous) or ``None`` (no block).
ViewsLayout = Callable[[int], "str | None"]


class _Slot:
    """What the views' node calls back; weak, so the graph does not keep the recorder alive."""

    __slots__ = ("_layout", "_ref")

    def __init__(self, callback: ViewsCallback, layout: ViewsLayout | None) -> None:
        self._ref = weak_callable(callback)
        self._layout = None if layout is None else weak_callable(layout)

    def layout(self, numel: int) -> str | None:
        fn = None if self._layout is None else self._layout()
        return "batch" if fn is None else fn(numel)

    def __call__(self, grads: tuple[Tensor | None, ...], stacked: Tensor | None) -> None:
        callback = self._ref()
        if callback is not None:
            callback(grads, stacked)


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
        layout = ctx.slot.layout(used[0].numel()) if len(used) == len(grads) > 1 and used[0].dim() else None
        if layout is not None:
            # "batch": (N, T, ...) in memory, one GEMM operand of a Linear rule's product; "task": each task contiguous
            stacked = torch.stack(used, dim=1) if layout == "batch" else torch.stack(used)
            total = stacked.sum(dim=1 if layout == "batch" else 0)  # (before the callback may overwrite it)
            ctx.slot(grads, stacked.transpose(0, 1) if layout == "batch" else stacked)
            return total, None, None
        ctx.slot(grads, None)
        if len(used) == 1:
            return used[0], None, None
        total = used[0] + used[1]
        for g in used[2:]:
            total.add_(g)
        return total, None, None


def fan_out(z: Tensor, num_tasks: int, callback: ViewsCallback, layout: ViewsLayout | None = None) -> tuple[Tensor, ...]:
    """``num_tasks`` aliases of ``z`` whose backward calls ``callback(grads)`` with one gradient per view.

    Args:
        z: the shared representation.
        num_tasks: how many views.
        callback: receives ``(grads, stacked)`` during the backward, while the graph below
            ``z`` is still alive: the tuple of per-view gradients (``None`` for an unread
            view) and, when every view was read (and ``z`` is not 0-dim), the same gradients
            stacked as one ``(T, *z.shape)`` tensor (else ``None``), which is the callback's to
            overwrite. A bound method is held weakly.
        layout: how that block is laid out, or that none is made (see :data:`ViewsLayout`;
            held like ``callback``); by default one batch-major block.

    Returns:
        The views, in task order.

    Example::

        >>> seen = []
        >>> z = torch.ones(2, requires_grad=True)
        >>> a, b = fan_out(z, 2, lambda grads, stacked: seen.append(stacked))
        >>> (2 * a + 3 * b).sum().backward()
        >>> seen[0].tolist(), z.grad.tolist()
        ([[2.0, 2.0], [3.0, 3.0]], [5.0, 5.0])
    """
    return _FanOut.apply(z, _Slot(callback, layout), num_tasks)
