"""The exact DDP reduction on hand-made statistics: each rank fills an ``Accumulator`` with
seeded pieces (factored, dense, row-sparse; absent tasks; several backward passes; uneven and
rank-dependent shapes), reduces it over 2 gloo processes and saves what it got and which
collectives it called. The reference, :func:`reference`, materialises every rank's per-task
gradients from the same seeds in float64 (``einsum``, ``index_add``: none of the library's
kernels) and takes the norms and cosines of their average. No Lightning import (spawned
processes start fast)."""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

T = 3
F64 = torch.float64


@dataclasses.dataclass(frozen=True)
class Part:
    """One piece one rank records in one backward pass (shapes; the values come from the seed).

    ``kind``: ``"linear"`` (factored ``(N, d_in)`` rows and ``(T, N, d_out)`` output gradients,
    weight and bias: parameters ``(m, "weight")`` and ``(m, "bias")``), ``"dense"`` (a ``(T, P)``
    block over the parameters ``params``), ``"rows"`` (an embedding's touched rows, ``(m, "weight")``),
    ``"linear_dense"`` (a Linear's gradients materialised as one dense block, as the generic rule
    would deliver them), ``"linear_bias"`` (a Linear with its weight frozen: factored, the bias only).
    """

    kind: str
    module: int | tuple[int, ...]
    n: int = 0
    present: tuple[bool, ...] = (True,) * T
    key: object = None


# the shared modules' parameters: (module index, name, shape). Sizes: a Linear's inputs and
# output gradients are all-gathered for up to 14 rows per rank (fewer bytes than its dense
# block), an embedding's rows for up to 22 (indices drawn from 10 of its 50 rows: repeats
# within and across ranks)
LINEAR_IN, LINEAR_OUT = 40, 30
EMB_ROWS, EMB_DIM, EMB_TOUCHED = 50, 4, 10
CONV_SHAPE = (4, 2, 3)
LAYOUT_SHAPES: list[tuple[int, str, tuple[int, ...]]] = [
    (0, "weight", (LINEAR_OUT, LINEAR_IN)), (0, "bias", (LINEAR_OUT,)),
    (1, "weight", CONV_SHAPE), (1, "bias", (CONV_SHAPE[0],)),
    (2, "weight", (EMB_ROWS, EMB_DIM)),
    (3, "weight", (LINEAR_OUT, LINEAR_IN)), (3, "bias", (LINEAR_OUT,)),
]


def layout() -> list[tuple[int, str, int, bool]]:
    out = []
    for m, name, shape in LAYOUT_SHAPES:
        numel = 1
        for s in shape:
            numel *= s
        out.append((m, name, numel, True))
    return out


def _params_of(module: int | tuple[int, ...], kind: str = "") -> list[int]:
    modules = module if isinstance(module, tuple) else (module,)
    names = ("bias",) if kind == "linear_bias" else ("weight", "bias")  # (the weight frozen)
    return [j for j, (m, name, _) in enumerate(LAYOUT_SHAPES) if m in modules and name in names]


def _data(seed: int, part: Part, scale: float) -> dict[str, Tensor]:
    """The seeded float64 data of one part (the same in every process)."""
    g = torch.Generator().manual_seed(seed)
    if part.kind in ("linear", "linear_dense", "linear_bias"):
        rows = torch.randn(part.n, LINEAR_IN, generator=g, dtype=F64)
        grads = torch.randn(T, part.n, LINEAR_OUT, generator=g, dtype=F64) * scale
        return {"rows": rows, "grads": grads}
    if part.kind == "dense":
        numel = sum(layout()[j][2] for j in _params_of(part.module))
        return {"dense": torch.randn(T, numel, generator=g, dtype=F64) * scale}
    if part.kind == "rows":
        idx = torch.randint(0, EMB_TOUCHED, (part.n,), generator=g)
        return {"idx": idx, "values": torch.randn(T, part.n, EMB_DIM, generator=g, dtype=F64) * scale}
    raise ValueError(part.kind)


def _dense_of(part: Part, data: dict[str, Tensor]) -> Tensor:
    """The reference: this part's per-task gradients ``(T, P)`` over its module's parameters."""
    if part.kind == "linear_bias":
        return data["grads"].sum(dim=1)
    if part.kind in ("linear", "linear_dense"):
        weight = torch.einsum("tno,ni->toi", data["grads"], data["rows"]).flatten(1)
        return torch.cat([weight, data["grads"].sum(dim=1)], dim=1)
    if part.kind == "dense":
        return data["dense"]
    out = torch.zeros(T, EMB_ROWS, EMB_DIM, dtype=F64)
    return out.index_add_(1, data["idx"], data["values"]).flatten(1)


@dataclasses.dataclass(frozen=True)
class Case:
    """What each rank records: ``passes[rank]`` is a list of backward passes, each a list of parts."""

    name: str
    passes: tuple[tuple[tuple[Part, ...], ...], ...]
    scale: float = 1.0
    #: whether the exchange (not forced) gathers some slot, reduce-scatters a dense block
    expect: tuple[bool, bool] | None = None

    def seed(self, rank: int, k: int, i: int) -> int:
        return 1000 * rank + 10 * k + i + 7 * len(self.name)


def reference(case: Case, world: int) -> tuple[Tensor, Tensor]:
    """Float64 norms and cosines of the average over ranks of every rank's per-task gradients."""
    total = torch.stack([local_reference(case, rank) for rank in range(world)]).sum(0) / world
    norms = total.norm(dim=1)
    gram = total @ total.T
    return norms, gram / norms[:, None] / norms[None, :]


def local_reference(case: Case, rank: int) -> Tensor:
    """Float64 ``(T, P)``: rank ``rank``'s own per-task gradients over the layout."""
    lay = layout()
    offsets, at = [], 0
    for _, _, numel, _ in lay:
        offsets.append(at)
        at += numel
    total = torch.zeros(T, at, dtype=F64)
    for k, parts in enumerate(case.passes[rank]):
        for i, part in enumerate(parts):
            dense = _dense_of(part, _data(case.seed(rank, k, i), part, case.scale))
            dense = dense * torch.tensor(part.present, dtype=F64)[:, None]
            start = offsets[_params_of(part.module, part.kind)[0]]
            total[:, start : start + dense.shape[1]] += dense
    return total


def fill(case: Case, rank: int, dtype: torch.dtype, cosines: bool) -> Any:
    """This rank's Accumulator, filled as the capture would fill it."""
    from gradnorm_lightning.capture.stats import Accumulator, Factored, RowSparse

    acc = Accumulator(T, dtype, torch.device("cpu"), cosines=cosines)
    params = [torch.zeros(shape) for _, _, shape in LAYOUT_SHAPES]
    acc.param_keys.update({id(p): (m, name) for p, (m, name, _) in zip(params, LAYOUT_SHAPES)})
    for k, parts in enumerate(case.passes[rank]):
        present = torch.ones(T, dtype=torch.bool)
        for part in parts:
            present &= torch.tensor(part.present)
        acc.add_losses(torch.ones(T, dtype=dtype), present, torch.ones((), dtype=dtype))
        for i, part in enumerate(parts):
            data = _data(case.seed(rank, k, i), part, case.scale)
            mask = torch.tensor(part.present)
            ids = tuple(id(params[j]) for j in _params_of(part.module, part.kind))
            key = part.key if part.key is not None else ("module", part.module)
            if part.kind in ("linear", "linear_bias"):
                grads = data["grads"].to(dtype)
                grads = torch.where(mask[:, None, None], grads, float("nan"))  # absent rows: NaN, masked lazily
                f = Factored(data["rows"].to(dtype), grads, weight=part.kind == "linear", bias=True, present=mask)
                acc.add(f, ids, key)
            elif part.kind == "rows":
                values = torch.where(mask[:, None, None], data["values"].to(dtype), 0.0)
                acc.add(RowSparse(data["idx"], values, EMB_ROWS), ids, key)
            else:
                dense = _dense_of(part, data) if part.kind == "linear_dense" else data["dense"]
                acc.add(torch.where(mask[:, None], dense.to(dtype), 0.0), ids, key)
    return acc


#: the collectives the reduction may call, by the name the checks use (torch 2.13 renamed two)
COLLECTIVES = {
    "all_reduce": "all_reduce", "all_to_all_single": "all_to_all_single",
    "all_gather_into_tensor": "all_gather", "all_gather_single": "all_gather",
    "reduce_scatter_tensor": "reduce_scatter", "reduce_scatter_single": "reduce_scatter",
}


def counting(calls: list[tuple[str, int]]) -> Callable[[], None]:
    """Wrap ``torch.distributed``'s collectives to record ``(name, bytes of the input)``; returns
    the function that undoes it."""
    import torch.distributed as dist

    saved = {name: getattr(dist, name) for name in COLLECTIVES if hasattr(dist, name)}

    def wrap(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            source = args[1] if name != "all_reduce" else args[0]
            calls.append((COLLECTIVES[name], source.numel() * source.element_size()))
            return fn(*args, **kwargs)

        return wrapped

    for name, fn in saved.items():
        setattr(dist, name, wrap(name, fn))

    def undo() -> None:
        for name, fn in saved.items():
            setattr(dist, name, fn)

    return undo


def worker(rank: int, world: int, init_method: str, out_dir: str, cases: list[Case],
           settings: list[tuple[str | None, str | None, bool, str]]) -> None:
    """Reduce every case under every setting ``(force, dense collective, cosines, dtype)``; ``force``:
    ``None`` (as shipped), ``"bytes"`` (the exchange, each piece's form by bytes), ``"dense"``,
    ``"gather"`` or ``"allreduce"`` (see ``_exchange.FORCE``)."""
    import torch.distributed as dist

    from gradnorm_lightning.capture import _exchange
    from gradnorm_lightning.capture.distributed import reduce_statistics

    warnings.simplefilter("ignore", FutureWarning)  # (torch 2.13 renames two collectives)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world)
    results: dict[tuple[str, str | None, str | None, bool, str], Any] = {}
    small = _exchange.SMALL_BLOCK_BYTES
    try:
        for case in cases:
            for force, collective, cosines, dtype_name in settings:
                # "bytes": the exchange chosen by bytes even for these small blocks
                _exchange.FORCE = None if force == "bytes" else force
                _exchange.SMALL_BLOCK_BYTES = 0 if force == "bytes" else small
                # "as-nccl": the default group taken for a non-gloo one (the descriptions go over
                # a gloo group made for them, the dense block by reduce_scatter)
                _exchange.DENSE_COLLECTIVE = None if collective == "as-nccl" else collective
                _exchange.BACKEND = "nccl" if collective == "as-nccl" else None
                acc = fill(case, rank, getattr(torch, dtype_name), cosines)
                calls: list[tuple[str, int]] = []
                undo = counting(calls)
                try:
                    out = reduce_statistics(acc, "exact", layout=layout())
                finally:
                    undo()
                results[(case.name, force, collective, cosines, dtype_name)] = {
                    "norms": out.norms, "cosines": out.cosines, "present": out.present, "losses": out.losses, "calls": calls,
                }
            for cosines in (True, False):  # distributed="approx"
                acc = fill(case, rank, torch.float64, cosines)
                out = reduce_statistics(acc, "approx", layout=layout())
                results[(case.name, "approx", None, cosines, "float64")] = {
                    "norms": out.norms, "cosines": out.cosines, "present": out.present, "losses": out.losses, "calls": [],
                }
        torch.save(results, Path(out_dir) / f"reduce_rank{rank}.pt")
        _exchange.BACKEND = None
        dist.barrier()
    finally:
        dist.destroy_process_group()
