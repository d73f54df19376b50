"""Exact DDP: each rank's float64 share of the Gram of the rank-summed per-task gradients.

See :mod:`~gradnorm_lightning.capture.distributed` for what is sent and why. A step whose dense
block is small (:func:`one_block`) is all-reduced whole (:func:`trainable_block`); otherwise,
steps the same on every rank:

1. **describe**: every piece this rank recorded (sorted by its first parameter in the shared
   modules' fixed ``layout``) as a *slot*: which parameters, in which order, in which form,
   with which shapes; all ranks' descriptions are all-gathered (a few integers, on the CPU);
2. **plan**: from the gathered descriptions, each slot is *gathered* (factored or row-sparse
   form on every rank, with the same widths, and fewer bytes than the dense block) or goes into
   one dense block that is *reduce-scattered*; when the ranks' slots do not cover the same
   parameters in the same order, the whole step is one dense block over the union of their
   parameters in layout order;
3. **exchange**: one all-gather of a byte buffer holding every gathered slot (each rank's part
   padded to the largest), one reduce-scatter (gloo: all-to-all and a local sum) of the dense block;
4. **shares**: this rank's share of the Gram (diagonal only without cosines), in float64.

Every collective is called as ``torch.distributed.<name>`` at call time (a benchmark can count
its bytes by wrapping them).
"""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from gradnorm_lightning.capture.gram import Gram, cross_factored_gram, dense_gram
from gradnorm_lightning.capture.stats import Accumulator, Factored, RowSparse, _Piece

__all__ = ["exact_shares", "one_block", "plan_forms", "trainable_block"]

F64 = torch.float64
DENSE, FACTORED, SPARSE = 0, 1, 2
_DESC = 5  # integers describing one slot
#: ``"dense"`` or ``"gather"`` forces every slot's exchange, ``"allreduce"`` the one all-reduce of
#: the whole block (tests and benchmarks); ``None``: by size and bytes
FORCE: str | None = None
#: The size (bytes) of the dense ``T x (trainable parameters)`` block up to which it is simply
#: all-reduced with the loss sums, in one collective: below it, the latency of the three
#: collectives of the exchange (descriptions, data, shares) costs more than the bytes they save
#: (2 gloo processes on one machine: about 0.5 ms per collective, 1 GB/s).
SMALL_BLOCK_BYTES = 1 << 20
#: the dense block's exchange: ``"reduce_scatter"`` or ``"all_to_all"`` (``None``: all-to-all on gloo)
DENSE_COLLECTIVE: str | None = None
#: the default group's backend as the exchange takes it (``None``: ``dist.get_backend()``; tests)
BACKEND: str | None = None


def _backend() -> str:
    return BACKEND if BACKEND is not None else str(dist.get_backend())


@dataclasses.dataclass
class _Slot:
    """One piece of this rank: its parameters (layout indices, in its order), form and data."""

    params: list[int]
    piece: _Piece
    form: int
    desc: list[int]
    factored: Factored | None = None
    sparse: RowSparse | None = None


def _slots(acc: Accumulator, index: dict[tuple[int, str], int]) -> list[_Slot]:
    slots = []
    for ids, piece in acc.pieces():
        try:
            params = [index[acc.param_keys[i]] for i in ids]
        except KeyError:
            raise RuntimeError(
                "GradNorm's exact DDP reduction cannot name a parameter of the shared layer across processes "
                "(a parameter outside the shared modules' named_parameters()); use distributed='approx'."
            ) from None
        form = piece.form
        if form == "factored":
            f = Factored.cat(piece.factored)
            flags = int(f.weight) + 2 * int(f.bias)
            desc = [FACTORED, f.rows.shape[0], f.rows.shape[1], f.grads.shape[2], flags]
            slots.append(_Slot(params, piece, FACTORED, desc, factored=f))
        elif form == "sparse":
            s = RowSparse.cat(piece.sparse)
            desc = [SPARSE, s.rows.numel(), s.values.shape[2], s.num_rows, 0]
            slots.append(_Slot(params, piece, SPARSE, desc, sparse=s))
        else:
            slots.append(_Slot(params, piece, DENSE, [DENSE, 0, 0, 0, 0]))
    slots.sort(key=lambda s: min(s.params))
    return slots


_HOST_GROUPS: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()


def _host_group() -> Any:
    """A process group for integers on the CPU: the default one on gloo, else a gloo group over
    the same ranks, made once (so the descriptions never wait on a device)."""
    default = dist.group.WORLD
    if _backend() == "gloo":
        return None
    if default not in _HOST_GROUPS:
        _HOST_GROUPS[default] = dist.new_group(backend="gloo")
    return _HOST_GROUPS[default]


def _gather_descriptions(slots: list[_Slot], num_params: int, world: int) -> list[list[int]]:
    """Every rank's ``[measured, count, slot of each parameter, position of each parameter,
    5 integers per slot]``, all-gathered on the CPU."""
    length = 2 + 2 * num_params + _DESC * num_params
    mine = [0] * length
    mine[0], mine[1] = int(bool(slots)), len(slots)
    for j in range(num_params):
        mine[2 + j] = mine[2 + num_params + j] = -1
    for s, slot in enumerate(slots):
        for pos, p in enumerate(slot.params):
            mine[2 + p], mine[2 + num_params + p] = s, pos
        base = 2 + 2 * num_params + _DESC * s
        mine[base : base + _DESC] = slot.desc
    out = torch.zeros(world * length, dtype=torch.int64)
    _all_gather(out, torch.tensor(mine, dtype=torch.int64), _host_group())
    return [out[r * length : (r + 1) * length].tolist() for r in range(world)]


@dataclasses.dataclass
class _Plan:
    """What every rank does with each slot (the same on every rank)."""

    merged: bool  # one dense block over the union of the ranks' parameters, in layout order
    union: list[int]  # (merged) the layout indices in that block
    gather: list[bool]  # per slot (not merged): gathered, else dense
    counts: list[list[int]]  # per slot: every rank's N (gathered slots)


def plan_forms(descs: list[list[int]], num_params: int, num_tasks: int, itemsize: int,
               numels: Sequence[int], force: str | None = None) -> _Plan:
    """Decide, from every rank's description, how each slot is exchanged (by bytes per rank).

    A slot is gathered when every rank holds it in the same gatherable form with the same
    widths and the all-gather sends fewer bytes per rank, ``(W-1) * max N * width``, than its
    columns of the reduce-scatter, ``(W-1)/W * T * P``.
    """
    world = len(descs)
    maps = [d[2 : 2 + 2 * num_params] for d in descs]
    if any(m != maps[0] for m in maps[1:]):
        union = [j for j in range(num_params) if any(d[2 + j] >= 0 for d in descs)]
        return _Plan(True, union, [], [])
    count = descs[0][1]
    gather, counts = [], []
    for s in range(count):
        base = 2 + 2 * num_params + _DESC * s
        rows = [d[base : base + _DESC] for d in descs]
        form = rows[0][0]
        same = all(r[0] == form and r[2:] == rows[0][2:] for r in rows)
        numel = sum(numels[j] for j in range(num_params) if descs[0][2 + j] == s)
        dense_bytes = (world - 1) * num_tasks * numel * itemsize / world
        most = max(r[1] for r in rows)
        if form == FACTORED:
            width = (rows[0][2] + num_tasks * rows[0][3]) * itemsize
        elif form == SPARSE:
            width = 8 + num_tasks * rows[0][2] * itemsize
        else:
            width = None
        gathered = same and width is not None and (
            force == "gather" or (force != "dense" and (world - 1) * most * width < dense_bytes)
        )
        gather.append(gathered)
        counts.append([r[1] for r in rows])
    return _Plan(False, [], gather, counts)


def _all_gather(out: Tensor, mine: Tensor, group: Any = None) -> None:
    """``all_gather_single`` (torch >= 2.13's name) or ``all_gather_into_tensor``."""
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, mine, group=group)


def _reduce_scatter(out: Tensor, block: Tensor) -> None:
    """``reduce_scatter_single`` (torch >= 2.13's name) or ``reduce_scatter_tensor``."""
    scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    scatter(out, block)


# ---------------------------------------------------------------------- the byte buffer
def _aligned(nbytes: int) -> int:
    return -(-nbytes // 8) * 8


class _Bytes:
    """Offsets of typed arrays in one byte buffer (8-byte aligned)."""

    def __init__(self) -> None:
        self.size = 0

    def reserve(self, dtype: torch.dtype, shape: tuple[int, ...]) -> tuple[int, torch.dtype, tuple[int, ...]]:
        numel = 1
        for s in shape:
            numel *= s
        at = self.size
        self.size += _aligned(numel * torch.empty((), dtype=dtype).element_size())
        return at, dtype, shape


def _view(buffer: Tensor, where: tuple[int, torch.dtype, tuple[int, ...]]) -> Tensor:
    at, dtype, shape = where
    numel = 1
    for s in shape:
        numel *= s
    size = numel * torch.empty((), dtype=dtype).element_size()
    return buffer[at : at + size].view(dtype).view(shape)


def _gathered_shares(slots: list[_Slot], plan: _Plan, acc: Accumulator, world: int, rank: int,
                     diagonal: bool) -> list[Gram]:
    """All-gather the gathered slots (one byte buffer), then this rank's share of each one's Gram."""
    packing = _Bytes()
    spots: list[tuple[int, Any, Any]] = []
    for s, slot in enumerate(slots):
        if not plan.gather[s]:
            continue
        most = max(plan.counts[s])
        if slot.factored is not None:
            f = slot.factored
            spots.append((s, packing.reserve(acc.dtype, (most, f.rows.shape[1])),
                          packing.reserve(acc.dtype, (most, acc.num_tasks, f.grads.shape[2]))))
        else:
            assert slot.sparse is not None
            spots.append((s, packing.reserve(torch.int64, (most,)),
                          packing.reserve(acc.dtype, (most, acc.num_tasks, slot.sparse.values.shape[2]))))
    if not spots:
        return []
    mine = torch.zeros(packing.size, dtype=torch.uint8, device=acc.device)
    for s, first, second in spots:
        slot = slots[s]
        n = plan.counts[s][rank]
        if slot.factored is not None:
            f = slot.factored
            _view(mine, first)[:n] = f.rows.to(acc.dtype)
            _view(mine, second)[:n] = f._masked_grads().transpose(0, 1).to(acc.dtype)
        else:
            assert slot.sparse is not None
            _view(mine, first)[:n] = slot.sparse.rows
            _view(mine, second)[:n] = slot.sparse.values.transpose(0, 1).to(acc.dtype)
    every = torch.empty(world * packing.size, dtype=torch.uint8, device=acc.device)
    _all_gather(every, mine)
    parts = [every[r * packing.size : (r + 1) * packing.size] for r in range(world)]
    shares = []
    for s, first, second in spots:
        slot = slots[s]
        counts = plan.counts[s]
        a = torch.cat([_view(p, first)[:n] for p, n in zip(parts, counts)])
        b = torch.cat([_view(p, second)[:n] for p, n in zip(parts, counts)]).transpose(0, 1)  # (T, N, ...)
        if slot.factored is not None:
            start = sum(counts[:rank])
            shares.append(cross_factored_gram(a, b, slice(start, start + counts[rank]), slot.factored.weight,
                                              slot.factored.bias, rank, world, diagonal))
        else:
            assert slot.sparse is not None
            own = (a % world == rank)[None, :, None]  # (each rank takes the rows it owns)
            values = torch.where(own, b, 0.0)
            shares.append(RowSparse(a, values, slot.sparse.num_rows).gram(None, diagonal))
    return shares


# ---------------------------------------------------------------------- the dense block
def _place(block: Tensor, columns: Tensor, start: int) -> None:
    """Write ``columns`` ``(T, m)`` at columns ``[start, start + m)`` of the concatenation that
    ``block`` ``(W, T, c)`` holds in ``W`` consecutive slices of ``c`` columns."""
    width = block.shape[2]
    done, total = 0, columns.shape[1]
    while done < total:
        r, j = divmod(start + done, width)
        take = min(width - j, total - done)
        block[r, :, j : j + take] = columns[:, done : done + take]
        done += take


def _dense_columns(slots: list[_Slot], plan: _Plan, numels: Sequence[int]) -> list[tuple[Tensor, int]]:
    """This rank's dense columns and where they go in the block (``(T, m)``, first column)."""
    out: list[tuple[Tensor, int]] = []
    if plan.merged:
        offsets, at = {}, 0
        for j in plan.union:
            offsets[j] = at
            at += numels[j]
        for slot in slots:
            dense = slot.piece.to_dense()
            col = 0
            for j in slot.params:
                out.append((dense[:, col : col + numels[j]], offsets[j]))
                col += numels[j]
        return out
    at = 0
    for s, slot in enumerate(slots):
        if plan.gather[s]:
            continue
        out.append((slot.piece.to_dense(), at))
        at += sum(numels[j] for j in slot.params)
    return out


def _dense_total(slots: list[_Slot], plan: _Plan, numels: Sequence[int]) -> int:
    if plan.merged:
        return sum(numels[j] for j in plan.union)
    return sum(sum(numels[j] for j in slot.params) for s, slot in enumerate(slots) if not plan.gather[s])


def _dense_share(slots: list[_Slot], plan: _Plan, acc: Accumulator, numels: Sequence[int], world: int,
                 diagonal: bool) -> Gram | None:
    """Reduce-scatter the dense block; this rank's share of its Gram (from its slice of columns)."""
    total = _dense_total(slots, plan, numels)
    if total == 0:
        return None
    width = -(-total // world)
    block = torch.zeros(world, acc.num_tasks, width, dtype=acc.dtype, device=acc.device)
    for columns, start in _dense_columns(slots, plan, numels):
        _place(block, columns.to(acc.dtype), start)
    how = DENSE_COLLECTIVE or ("all_to_all" if _backend() == "gloo" else "reduce_scatter")
    if how == "all_to_all":
        # gloo's reduce_scatter sends as many bytes as an all-reduce: send each rank its slice
        # instead (the reduce-scatter's bytes) and sum the received slices here, in rank order
        received = torch.empty_like(block)
        dist.all_to_all_single(received.view(-1), block.view(-1))
        mine = received.sum(dim=0)
    else:
        mine = torch.empty(acc.num_tasks, width, dtype=acc.dtype, device=acc.device)
        _reduce_scatter(mine.view(-1), block.view(-1))
    return dense_gram(mine, None, diagonal)


Layout = Sequence[tuple[int, str, int, bool]]
"""Every parameter of the shared modules, ``(module index, name, numel, requires grad)``."""


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def one_block(acc: Accumulator, layout: Layout) -> bool:
    """Whether the whole step is all-reduced as one dense block (small enough: :data:`SMALL_BLOCK_BYTES`).
    Decided from the layout alone, the same on every rank."""
    if FORCE is not None:
        return FORCE == "allreduce"
    numel = sum(n for _, _, n, trainable in layout if trainable)
    return acc.num_tasks * numel * _itemsize(acc.dtype) <= SMALL_BLOCK_BYTES


def trainable_block(acc: Accumulator, layout: Layout) -> Tensor:
    """This rank's per-task gradients over every trainable parameter of the layout, in its order,
    ``(T, P)``: zeros where this rank recorded none (the same size on every rank)."""
    offsets, at = {}, 0
    for m, name, numel, trainable in layout:
        if trainable:
            offsets[(m, name)] = at
            at += numel
    numels = {(m, name): numel for m, name, numel, _ in layout}
    block = torch.zeros(acc.num_tasks, at, dtype=acc.dtype, device=acc.device)
    for ids, piece in acc.pieces():
        dense = piece.to_dense()
        col = 0
        for i in ids:
            key = acc.param_keys.get(i)
            if key not in offsets:
                raise ValueError(
                    "A shared parameter's requires_grad changed between the forward pass and the update (or the "
                    "parameter is not one of the shared modules' named_parameters()): freeze or unfreeze parameters "
                    "between optimizer steps."
                )
            width = numels[key]
            block[:, offsets[key] : offsets[key] + width] = dense[:, col : col + width]
            col += width
    return block


def exact_shares(acc: Accumulator, layout: Layout, world: int, rank: int) -> Tensor | None:
    """This rank's float64 share of the Gram of the rank-summed per-task gradients (``(T, T)``
    with cosines, else the diagonal ``(T,)``); ``None`` when no rank measured anything.

    Args:
        acc: this rank's statistics.
        layout: every parameter of the shared modules (:data:`Layout`).
        world: the number of ranks.
        rank: this rank.
    """
    index = {(m, name): j for j, (m, name, _, _) in enumerate(layout)}
    numels = [numel for _, _, numel, _ in layout]
    slots = _slots(acc, index)
    descs = _gather_descriptions(slots, len(layout), world)
    if not any(d[0] for d in descs):
        return None
    plan = plan_forms(descs, len(layout), acc.num_tasks, _itemsize(acc.dtype), numels, FORCE)
    diagonal = not acc.cosines
    grams = [] if plan.merged else _gathered_shares(slots, plan, acc, world, rank, diagonal)
    dense = _dense_share(slots, plan, acc, numels, world, diagonal)
    if dense is not None:
        grams.append(dense)
    shape = (acc.num_tasks,) if diagonal else (acc.num_tasks, acc.num_tasks)
    total = torch.zeros(shape, dtype=F64, device=acc.device)
    for gram in grams:
        total = total + gram.unscaled()
    return total
