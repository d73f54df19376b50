"""The task losses a balancer is given: one list in task order, checked."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from torch import Tensor

__all__ = ["LossesLike", "normalize_losses"]

LossesLike = Tensor | Sequence[Tensor | None] | Mapping[str, Tensor | None]
"""A 1-D tensor of ``T`` losses, a sequence of ``T`` scalar tensors (``None`` for a missing
task), or a mapping from task name to scalar tensor (missing keys are missing tasks)."""


def normalize_losses(
    losses: LossesLike, names: tuple[str, ...] | None, init: Callable[[tuple[str, ...]], tuple[str, ...]]
) -> list[Tensor | None]:
    """The losses as a list in task order, the task names fixed by ``init`` on first sight.

    Args:
        losses: the losses as given to ``combine``.
        names: the task names, or ``None`` while they are unknown.
        init: called with the names the losses imply when ``names`` is ``None``; returns them.

    Returns:
        One entry per task: a tensor, or ``None`` for a missing task.

    Raises:
        TypeError: for losses that are not (floating-point) tensors.
        ValueError: for non-scalar losses, a wrong number of losses, unknown task names.
    """
    if isinstance(losses, Mapping):
        if names is None:
            names = init(tuple(losses))
        unknown = [k for k in losses if k not in names]
        if unknown:
            raise ValueError(
                f"Unknown task(s) {unknown}: the tasks are {list(names)}. Declare every task up front "
                "(`task_names=`; the mixin's `task_names`) if some are absent at the first step."
            )
        items: list[Tensor | None] = [losses.get(n) for n in names]
    elif isinstance(losses, Tensor):
        if losses.dim() != 1:
            raise ValueError(f"`losses` as a tensor must be 1-D with one loss per task; got shape {tuple(losses.shape)}.")
        if names is None:
            names = init(tuple(f"task{i}" for i in range(losses.numel())))
        items = list(losses.unbind())
    elif isinstance(losses, Sequence) and not isinstance(losses, str):
        if names is None:
            names = init(tuple(f"task{i}" for i in range(len(losses))))
        items = list(losses)
    else:
        raise TypeError(
            f"`losses` must be a 1-D tensor, a sequence of 0-dim tensors or a dict; got {type(losses).__name__}."
        )
    if len(items) != len(names):
        raise ValueError(f"Expected {len(names)} losses (tasks {list(names)}); got {len(items)}.")
    for name, loss in zip(names, items):
        if loss is None:
            continue
        if not isinstance(loss, Tensor):
            raise TypeError(f"The loss of task {name!r} must be a tensor; got {type(loss).__name__}.")
        if loss.numel() != 1:
            raise ValueError(
                f"The loss of task {name!r} must be a scalar (reduce it, e.g. `.mean()`); got shape {tuple(loss.shape)}."
            )
        if not loss.is_floating_point():
            raise TypeError(f"The loss of task {name!r} must be floating point; got {loss.dtype}.")
    return items
