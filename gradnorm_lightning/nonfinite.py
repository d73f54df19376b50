"""`zero_nonfinite_grads_`: keep a task without labels from writing NaN into the model."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

from gradnorm_lightning import _arrays
from gradnorm_lightning._compat import any_nonfinite

__all__ = ["zero_nonfinite_grads_"]


@torch.no_grad()
def zero_nonfinite_grads_(parameters: Tensor | Iterable[Tensor]) -> Tensor:
    """Replace the non-finite entries of the parameters' gradients by zero, in place.

    A task without labels in a batch usually has a masked mean over an empty mask as its loss:
    ``0 / 0 = NaN``, *with* a graph. GradNorm leaves such a task out of the model loss, but its
    backward still multiplies a zero by ``1 / 0`` and writes NaN into the gradients of the
    parameters it reads (its head and the shared trunk); one optimizer step then turns every
    one of those parameters into NaN. Call this after the backward and before the optimizer
    step whenever a task can be absent from a batch (the Lightning callback does it for you,
    ``sanitize_grads=True``). Like :func:`torch.nn.utils.clip_grad_norm_`, it works in place
    and returns a tensor, so it reads nothing on the host.

    Args:
        parameters: a tensor or an iterable of tensors whose ``.grad`` to clean. A sparse
            gradient (``nn.Embedding(sparse=True)``) is coalesced first (its repeated rows
            summed, as the optimizer would), then cleaned in its values.

    Returns:
        A 0-dim bool tensor on the gradients' device: ``True`` when some entry was NaN or
        infinite. On a step where every task was present that means a genuine divergence,
        which the zeroing would otherwise hide: check it (on your logging steps).

    Example::

        >>> w = torch.nn.Parameter(torch.ones(3))
        >>> w.grad = torch.tensor([1.0, float("nan"), float("inf")])
        >>> zero_nonfinite_grads_([w])
        tensor(True)
        >>> w.grad
        tensor([1., 0., 0.])
        >>> zero_nonfinite_grads_([w])
        tensor(False)
    """
    params = [parameters] if isinstance(parameters, Tensor) else list(parameters)
    for p in params:  # a sparse gradient (``nn.Embedding(sparse=True)``): its rows summed, then its values
        if p.grad is not None and p.grad.is_sparse and not p.grad.is_coalesced():
            p.grad = p.grad.coalesce()
    grads = [(p.grad.values() if p.grad.is_sparse else p.grad) for p in params if p.grad is not None]
    if not grads:
        return torch.zeros((), dtype=torch.bool)
    found = any_nonfinite(grads)
    # On the CPU the flag is read for free (the device is the host): a clean step writes nothing.
    if _arrays.host_reads_free(found.device) and all(g.device.type == "cpu" for g in grads) and not bool(found):
        return found
    for g in grads:
        g.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
    return found
