"""The reduction of one step's per-task statistics over ``torch.distributed`` processes.

Per-task gradients are rank-local (each process sees its own batch), so without a reduction
every rank would compute its own weights. ``"exact"`` all-reduces the per-task gradients of
the shared layer (``T x |W|`` floats) plus the loss sums, so the norms are those of the
global-batch gradient (DDP averages gradients over ranks); ``"approx"`` all-reduces ``3T``
floats (local norms, loss sums, loss weights) and uses the mean of the local norms, which is
not the norm of the mean.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from gradnorm_lightning.capture.stats import Accumulator, safe_norms

__all__ = ["reduce_statistics", "world_size"]


def world_size() -> int:
    """The number of processes of the default group (1 without ``torch.distributed``)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def reduce_statistics(acc: Accumulator, mode: str) -> tuple[Tensor, Tensor, Tensor]:
    """``(norms, losses, present)`` of one step over all processes.

    Args:
        acc: this process's statistics.
        mode: ``"exact"`` or ``"approx"``.

    Returns:
        The per-task norms (of the ``c w_i``-scaled gradients, as recorded), each task's loss
        averaged over every process's passes it was present in (0 where absent everywhere),
        and whether it was present anywhere.
    """
    if world_size() == 1:
        return (acc.norms(), *acc.losses())
    norms, loss_sum, loss_weight = _reduce(acc, mode)
    losses = loss_sum / loss_weight.clamp_min(torch.finfo(loss_weight.dtype).tiny)
    return norms, losses, loss_weight > 0


def _reduce(acc: Accumulator, mode: str) -> tuple[Tensor, Tensor, Tensor]:
    """``(norms, loss sums, loss weights)`` summed over the processes."""
    world = world_size()
    n = acc.loss_sum.numel()
    if mode == "approx" or not acc.measured:
        buf = torch.cat([acc.norms(), acc.loss_sum, acc.loss_weight])
        dist.all_reduce(buf)
        return buf[:n] / world, buf[n : 2 * n], buf[2 * n :]
    if acc.rep_norms is not None:
        # representation: the ranks' rows are disjoint, so squared norms add (in float64: no overflow)
        buf64 = torch.cat([acc.rep_norms.double().square(), acc.loss_sum.double(), acc.loss_weight.double()])
        dist.all_reduce(buf64)
        dtype = acc.loss_sum.dtype
        return (buf64[:n].sqrt() / world).to(dtype), buf64[n : 2 * n].to(dtype), buf64[2 * n :].to(dtype)
    dense = acc.dense_grads()
    assert dense is not None
    buf = torch.cat([dense.flatten(), acc.loss_sum, acc.loss_weight])
    dist.all_reduce(buf)
    grads = buf[: dense.numel()].reshape(n, -1) / world
    return safe_norms(grads, buf[-n:] > 0), buf[-2 * n : -n], buf[-n:]
