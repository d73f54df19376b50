"""Partial labels: a model whose tasks lack labels in some micro-batches, written two ways.

* ``form="masked"``: ``(err * m).sum() / m.sum()``, the README's masked mean: over an empty
  mask it is NaN *with a graph*, and its backward writes ``0 * inf = NaN`` below the head;
* ``form="index"``: ``err[m].mean()``: NaN over an empty mask as well, but its backward is
  finite (zeros): the reference in which nothing is lost by construction.

The two must train identically (float64, every model parameter and the weights): whatever the
absent task's backward wrote is dropped, and everything the present tasks contribute is kept.
Torch only (importable by spawned DDP processes).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

TASKS = ("a", "b", "c")
D_IN = 6
MICRO = 8  # rows per micro-batch (per process)


class PartialNet(nn.Module):
    """Linear -> BatchNorm1d -> ReLU -> Linear (the shared layer) -> ReLU; heads of different
    depths: ``a`` one Linear, ``b`` Linear-Tanh-Linear with two outputs, ``c`` one Linear."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.trunk = nn.Sequential(nn.Linear(D_IN, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 12), nn.ReLU())
        self.heads = nn.ModuleDict({
            "a": nn.Linear(12, 1),
            "b": nn.Sequential(nn.Linear(12, 8), nn.Tanh(), nn.Linear(8, 2)),
            "c": nn.Linear(12, 1),
        })
        self.double()

    @property
    def shared(self) -> nn.Module:
        return self.trunk[3]

    def task_losses(self, x: Tensor, y: Tensor, m: Tensor, form: str,
                    views: Callable[[Tensor], Sequence[Tensor]] | None = None) -> dict[str, Tensor]:
        """Each task's loss over its labelled rows (``m[:, i]``), in the given form."""
        z = self.trunk(x)
        zs = list(views(z)) if views is not None else [z] * len(TASKS)
        errs = [
            (self.heads["a"](zs[0]).squeeze(1) - y[:, 0]) ** 2,
            ((self.heads["b"](zs[1]) - y[:, 1:3]) ** 2).mean(1),
            (self.heads["c"](zs[2]).squeeze(1) - y[:, 3]) ** 2,
        ]
        out: dict[str, Tensor] = {}
        for i, (task, err) in enumerate(zip(TASKS, errs)):
            mask = m[:, i]
            if form == "masked":
                weights = mask.to(err.dtype)
                out[task] = (err * weights).sum() / weights.sum()
            else:
                out[task] = err[mask].mean()
        return out

    forward = task_losses  # (so that a DDP wrapper's forward runs it)


def make_micro_batches(count: int, rows: int = MICRO, seed: int = 0) -> list[tuple[Tensor, Tensor, Tensor]]:
    """``count`` micro-batches ``(x, y, mask)``; labels missing at random, and whole tasks
    unlabelled in some micro-batches (every task in one of them)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for j in range(count):
        x = torch.randn(rows, D_IN, generator=g, dtype=torch.float64)
        y = torch.randn(rows, 4, generator=g, dtype=torch.float64) * torch.tensor([1.0, 3.0, 3.0, 10.0],
                                                                                  dtype=torch.float64)
        m = torch.rand(rows, len(TASKS), generator=g) < 0.7
        m[0] = True  # at least one label per task, unless emptied below
        if j % 4 == 1:
            m[:, 2] = False
        if j % 5 == 2:
            m[:, 1] = False
        if j % 7 == 3:
            m[:, 0] = False
        if j == 9:
            m[:] = False
        out.append((x, y, m))
    return out


def plain_run(form: str, micro: Sequence[tuple[Tensor, Tensor, Tensor]], k: int, balancer: str = "gradnorm",
              gn_kwargs: dict[str, Any] | None = None, views: bool = False, sanitize: bool = False) -> dict[str, Any]:
    """The README's plain loop, accumulating ``k`` micro-batches per optimizer step (Adam on
    the model, so that a zero gradient and a missing one differ); ``sanitize``: call
    ``zero_nonfinite_grads_`` before the optimizer step (needed on the routes that cannot cut)."""
    from gradnorm_lightning import EqualWeighting, GradNorm, zero_nonfinite_grads_

    net = PartialNet()
    opt = torch.optim.Adam(net.parameters(), lr=0.01)
    if balancer == "equal":
        gn: Any = EqualWeighting(net.shared, task_names=TASKS, **(gn_kwargs or {}))
    else:
        gn = GradNorm(net.shared, task_names=TASKS, **{"alpha": 1.5, "lr": 0.02, **(gn_kwargs or {})})
    weights, uncut = [], []
    finite = True
    for start in range(0, len(micro) - len(micro) % k, k):
        opt.zero_grad()
        for x, y, m in micro[start : start + k]:
            losses = net.task_losses(x, y, m, form, gn.task_views if views else None)
            (gn.combine(losses) / k).backward()
        gn.step()
        finite = finite and all(p.grad is None or bool(torch.isfinite(p.grad).all()) for p in net.parameters())
        if sanitize:
            zero_nonfinite_grads_(net.parameters())
        opt.step()
        weights.append(gn.weights.detach().clone())
        uncut.append(gn.last_stats.get("uncut"))
    return {
        "weights": torch.stack(weights), "params": [p.detach().clone() for p in net.parameters()],
        "skipped": gn.skipped.clone(), "route": gn.last_stats.get("route"), "uncut": uncut,
        "grads_finite": finite,
    }


def ddp_worker(rank: int, world: int, init_method: str, out_dir: str, form: str,
               micro: list[tuple[Tensor, Tensor, Tensor]], k: int) -> None:
    """Plain PyTorch DDP (gloo): rank ``r`` takes every ``world``-th micro-batch; ``k`` per step."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from gradnorm_lightning import GradNorm

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world)
    try:
        net = PartialNet()
        ddp = DistributedDataParallel(net, broadcast_buffers=False)
        gn = GradNorm(net.shared, task_names=TASKS, alpha=1.5, lr=0.02)
        opt = torch.optim.Adam(net.parameters(), lr=0.01)
        mine = micro[rank::world]
        weights = []
        for start in range(0, len(mine) - len(mine) % k, k):
            opt.zero_grad()
            for j, (x, y, m) in enumerate(mine[start : start + k]):
                if j < k - 1:
                    with ddp.no_sync():
                        (gn.combine(ddp(x, y, m, form)) / k).backward()
                else:
                    (gn.combine(ddp(x, y, m, form)) / k).backward()
            gn.step()
            opt.step()
            weights.append(gn.weights.detach().clone())
        torch.save({"weights": torch.stack(weights), "params": [p.detach().clone() for p in net.parameters()]},
                   Path(out_dir) / f"{form}_rank{rank}.pt")
        dist.barrier()
        del ddp
    finally:
        dist.destroy_process_group()
