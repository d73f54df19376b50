"""The reduction of one step's per-task statistics over ``torch.distributed`` processes.

Per-task gradients are rank-local (each process sees its own batch), so without a reduction
every rank would compute its own weights. DDP averages the model's gradients over the ranks;
GradNorm's norms (and the task-gradient cosines) must be those of that average.

``"exact"`` gives exactly those. A small step (the dense per-task gradients of all the shared
layer's trainable parameters up to :data:`~gradnorm_lightning.capture._exchange.SMALL_BLOCK_BYTES`,
1 MiB) all-reduces that dense block with the loss sums in one collective, latency being what
costs there. Otherwise each task's squared norm (with ``task_cosines``, the whole ``T x T``
Gram) of the averaged gradient is summed from *shares* that each rank computes from what it was
sent, then one all-reduce of those ``T`` (or ``T^2``) numbers and the loss sums in float64.
Either way every rank ends with the same numbers, so the weights stay bitwise equal across
ranks. How a piece of per-task gradients (see :mod:`~gradnorm_lightning.capture.stats`) is
exchanged is chosen per piece, by the bytes each rank sends
(:mod:`~gradnorm_lightning.capture._exchange`), identically on every rank:

* a dense ``(T, P)`` block: *reduce-scattered* (each rank receives the sum of one ``1/W`` slice
  of the columns and takes its share of the Gram there): ``(W-1)/W * T * P`` values per rank,
  half of an all-reduce. On gloo, whose ``reduce_scatter`` sends as many bytes as an all-reduce
  (torch 2.13: 16.78 MB for a 16.78 MB block on 2 ranks, measured), as an ``all_to_all`` of the
  slices followed by a local sum: the same result and the reduce-scatter's bytes (8.39 MB);
* a Linear's factored gradients (:class:`~gradnorm_lightning.capture.stats.Factored`): the
  layer inputs ``(N, d_in)`` and per-task output gradients ``(T, N, d_out)`` all-gathered (each
  rank's padded to the largest ``N``), then each rank takes the Gram of its own rows against
  the union's by the ghost identity (or of its slice of the weight's rows by the direct product),
  when that sends fewer bytes than the dense block (``N (d_in + T d_out)`` against ``T d_in d_out``);
* an embedding's touched rows (:class:`~gradnorm_lightning.capture.stats.RowSparse`): row
  indices and values all-gathered; each rank takes the rows it owns (``index % W``), repeats
  summed over the whole union, when that is cheaper than the dense table.

Before that, the ranks exchange a few integers describing their pieces (over the CPU: on a
non-gloo default group, over a gloo group made once): shapes differ between ranks (uneven
batches), and a rank's pieces may cover other parameters than another's (a shared module not
called on one rank, a route that fell back to the generic rule on one); then everything is
reduced as one dense block over the union of their parameters, zeros where a rank has none.

``"approx"`` all-reduces ``3T`` floats (local norms, loss sums, loss weights) and uses the mean
of the local norms, which is not the norm of the mean; with cosines, the cosines of the sum of
the local Gram matrices (the products between different ranks' gradients left out).

``mode="representation"``: the ranks' rows are disjoint, so their Grams at the layer's output add.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist
from torch import Tensor

from gradnorm_lightning.capture import _exchange
from gradnorm_lightning.capture.gram import dense_gram
from gradnorm_lightning.capture.stats import Accumulator

__all__ = ["Reduced", "reduce_statistics", "world_size"]

F64 = torch.float64


@dataclasses.dataclass
class Reduced:
    """One step's statistics over all processes.

    Attributes:
        norms: the per-task norms (of the ``c w_i``-scaled gradients, as recorded).
        losses: each task's loss averaged over every process's passes it was present in (0
            where it was absent everywhere).
        present: whether each task was present anywhere.
        cosines: ``(T, T)`` task-gradient cosines, when asked for (NaN for a task with a zero or
            absent gradient).
    """

    norms: Tensor
    losses: Tensor
    present: Tensor
    cosines: Tensor | None = None

    @classmethod
    def summed(cls, norms: Tensor, loss_sum: Tensor, loss_weight: Tensor, cosines: Tensor | None = None) -> Reduced:
        """From the loss sums and weights summed over the processes."""
        # (absent tasks have loss_sum == 0: the clamp only guards the division)
        losses = loss_sum / loss_weight.clamp_min(torch.finfo(loss_weight.dtype).tiny)
        return cls(norms, losses, loss_weight > 0, cosines)


def world_size() -> int:
    """The number of processes of the default group (1 without ``torch.distributed``)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _nan(acc: Accumulator) -> Tensor:
    return torch.full((acc.num_tasks,), float("nan"), dtype=acc.dtype, device=acc.device)


def _nan_cosines(acc: Accumulator) -> Tensor | None:
    if not acc.cosines:
        return None
    return torch.full((acc.num_tasks, acc.num_tasks), float("nan"), dtype=acc.dtype, device=acc.device)


def _from_gram64(gram: Tensor, world: int, dtype: torch.dtype, cosines: bool) -> tuple[Tensor, Tensor | None]:
    """Norms (and cosines) of the average gradient from the float64 Gram of the rank sum."""
    if gram.dim() == 1:
        return (gram.clamp_min(0).sqrt() / world).to(dtype), None
    gram = (gram + gram.T) * 0.5  # (shares by the ghost identity are not symmetric one by one)
    d = gram.diagonal().clamp_min(0).sqrt()
    norms = (d / world).to(dtype)
    if not cosines:
        return norms, None
    return norms, (gram / d[:, None] / d[None, :]).clamp(-1.0, 1.0).to(dtype)


def _local(acc: Accumulator) -> Reduced:
    losses, present = acc.losses()  # (one pass: its losses as they are)
    if not acc.cosines:
        return Reduced(acc.norms(), losses, present)
    gram = acc.gram()
    if gram is None:
        return Reduced(_nan(acc), losses, present, _nan_cosines(acc))
    return Reduced(gram.norms(), losses, present, gram.cosines())


def _approx(acc: Accumulator, world: int) -> Reduced:
    n = acc.num_tasks
    if not acc.cosines:
        buf = torch.cat([acc.norms(), acc.loss_sum, acc.loss_weight])
        dist.all_reduce(buf)
        return Reduced.summed(buf[:n] / world, buf[n : 2 * n], buf[2 * n :])
    gram = acc.gram()
    local = gram.unscaled() if gram is not None else torch.full((n, n), float("nan"), dtype=F64, device=acc.device)
    norms = gram.norms() if gram is not None else _nan(acc)
    buf64 = torch.cat([norms.to(F64), acc.loss_sum.to(F64), acc.loss_weight.to(F64), local.flatten()])
    dist.all_reduce(buf64)
    summed = buf64[3 * n :].view(n, n)
    d = summed.diagonal().clamp_min(0).sqrt()
    cos = (summed / d[:, None] / d[None, :]).clamp(-1.0, 1.0)
    dtype = acc.dtype
    return Reduced.summed((buf64[:n] / world).to(dtype), buf64[n : 2 * n].to(dtype), buf64[2 * n : 3 * n].to(dtype),
                   cos.to(dtype))


def _with_losses(acc: Accumulator, shares: Tensor, world: int) -> Reduced:
    """All-reduce this rank's float64 share of the Gram with the loss sums; the result."""
    n = acc.num_tasks
    buf64 = torch.cat([shares.flatten(), acc.loss_sum.to(F64), acc.loss_weight.to(F64)])
    dist.all_reduce(buf64)
    dtype = acc.dtype
    gram = buf64[: shares.numel()].view(shares.shape)
    norms, cos = _from_gram64(gram, world, dtype, acc.cosines)
    return Reduced.summed(norms, buf64[-2 * n : -n].to(dtype), buf64[-n:].to(dtype), cos)


def _one_block(acc: Accumulator, layout: _exchange.Layout, world: int) -> Reduced:
    """A small step: the dense per-task gradients over every trainable parameter all-reduced
    with the loss sums (one collective); every rank then takes the same Gram of the same sum."""
    n = acc.num_tasks
    block = _exchange.trainable_block(acc, layout)
    measured = torch.ones(1, dtype=acc.dtype, device=acc.device) * float(acc.measured)
    buf = torch.cat([block.flatten(), acc.loss_sum, acc.loss_weight, measured])
    dist.all_reduce(buf)
    gram = dense_gram(buf[: block.numel()].view(block.shape), None, diagonal=not acc.cosines)
    anyone = buf[-1] > 0  # (a rank measured something: else NaN, decided on the device)
    norms = torch.where(anyone, gram.norms() / world, float("nan"))
    cos = torch.where(anyone, gram.cosines(), float("nan")) if acc.cosines else None
    return Reduced.summed(norms, buf[-2 * n - 1 : -n - 1], buf[-n - 1 : -1], cos)


def _representation(acc: Accumulator, world: int) -> Reduced:
    n = acc.num_tasks
    shape = (n, n) if acc.cosines else (n,)
    # the ranks' rows are disjoint: their Grams add (a rank that recorded nothing adds zeros)
    shares = acc.rep.unscaled() if acc.rep is not None else torch.zeros(shape, dtype=F64, device=acc.device)
    return _with_losses(acc, shares, world)


def reduce_statistics(
    acc: Accumulator,
    mode: str,
    *,
    representation: bool = False,
    measured: bool = True,
    layout: _exchange.Layout = (),
) -> Reduced:
    """One step's norms (and cosines, when ``acc.cosines``) and losses over all processes.

    Args:
        acc: this process's statistics.
        mode: ``"exact"`` or ``"approx"``.
        representation: ``mode="representation"`` statistics (the Grams at the layer's output).
        measured: whether this step measures per-task gradients on every rank (``False``: the
            losses only; the same on every rank).
        layout: every parameter of the shared modules, ``(module index, name, numel, requires
            grad)``, in a fixed order (the same on every rank): names the parameters across ranks.

    Returns:
        The per-task norms (of the ``c w_i``-scaled gradients, as recorded), the losses and
        presence over every process's passes, and the cosines.
    """
    world = world_size()
    if world == 1:
        return _local(acc)
    if not measured:
        n = acc.num_tasks
        buf = torch.cat([acc.loss_sum, acc.loss_weight])
        dist.all_reduce(buf)
        return Reduced.summed(_nan(acc), buf[:n], buf[n:], _nan_cosines(acc))
    if mode == "approx":
        return _approx(acc, world)
    if representation:
        return _representation(acc, world)
    if _exchange.one_block(acc, layout):
        return _one_block(acc, layout, world)
    shares = _exchange.exact_shares(acc, layout, world, dist.get_rank())
    if shares is None:  # (no rank measured anything)
        buf = torch.cat([acc.loss_sum, acc.loss_weight])
        dist.all_reduce(buf)
        n = acc.num_tasks
        return Reduced.summed(_nan(acc), buf[:n], buf[n:], _nan_cosines(acc))
    return _with_losses(acc, shares, world)
