"""Torch-only pieces of the issue-4 test models: the tiny multitask net, its data, the textbook
GradNorm reference and the plain-PyTorch DDP worker. No Lightning import, so that spawned
processes start fast."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from gradnorm_lightning import GradNorm

from .floor import floored

TASKS = ("a", "b", "c")
D_IN = 5
HIDDEN = 8


class CustomForwardTrunk(nn.Module):
    """:class:`Net`'s trunk layers behind a user-written ``forward`` (not ``nn.Sequential``):
    under torch.compile, Dynamo can resume after the graph break at the shared layer's hook."""

    def __init__(self, seq: nn.Sequential) -> None:
        super().__init__()
        self.l1, self.l2 = seq[0], seq[2]

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(self.l2(torch.tanh(self.l1(x))))


def make_batches(
    num_steps: int, batch_size: int, seed: int = 0, dtype: torch.dtype = torch.float32
) -> list[tuple[Tensor, Tensor]]:
    """``num_steps`` global batches ``(x, y)``; the tasks have very different scales/speeds."""
    gen = torch.Generator().manual_seed(seed)
    proj = torch.randn(D_IN, 3, generator=gen, dtype=torch.float64)
    out = []
    for _ in range(num_steps):
        x = torch.randn(batch_size, D_IN, generator=gen, dtype=torch.float64)
        z = x @ proj
        y = torch.stack([torch.sin(z[:, 0]), 3.0 * z[:, 1], 0.1 * torch.tanh(z[:, 2]) ** 2], dim=1)
        out.append((x.to(dtype), y.to(dtype)))
    return out


def split_micro(batches: Sequence[tuple[Tensor, Tensor]], k: int) -> list[tuple[Tensor, Tensor]]:
    """Each batch cut into ``k`` consecutive micro-batches of equal size."""
    out = []
    for x, y in batches:
        out.extend(zip(x.chunk(k), y.chunk(k)))
    return out


class _Listed(Dataset):
    def __init__(self, items: Sequence[Any]) -> None:
        self.items = list(items)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Any:
        return self.items[i]


class Net(nn.Module):
    """trunk: Linear -> tanh -> Linear (shared layer) -> tanh; one Linear head per task."""

    def __init__(self, seed: int = 0, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.trunk = nn.Sequential(nn.Linear(D_IN, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, HIDDEN), nn.Tanh())
        self.heads = nn.ModuleList([nn.Linear(HIDDEN, 1) for _ in TASKS])
        self.to(dtype)

    @property
    def shared(self) -> nn.Module:
        return self.trunk[2]

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        """The stacked task losses (so that a DDP wrapper's forward does the gradient sync)."""
        return torch.stack(self.task_losses(x, y))

    def task_losses(self, x: Tensor, y: Tensor, trunk: nn.Module | None = None) -> list[Tensor]:
        z = (trunk if trunk is not None else self.trunk)(x)
        return [nn.functional.mse_loss(h(z).squeeze(1), y[:, i]) for i, h in enumerate(self.heads)]


def textbook_weights(
    net: Net, batches: Sequence[tuple[Tensor, Tensor]], alpha: float, lr: float, model_lr: float,
    min_weight: float = 1e-4,
) -> Tensor:
    """The textbook GradNorm (create_graph double backward into ``w``; SGD on ``w``; L(0) = first
    step's losses), as the reference of DESIGN.md section 1. Returns the weights after each step."""
    params = [p for p in net.shared.parameters()]
    opt = torch.optim.SGD(net.parameters(), lr=model_lr)
    w = torch.ones(len(TASKS), dtype=params[0].dtype)
    initial = None
    out = []
    for x, y in batches:
        losses = torch.stack(net.task_losses(x, y))
        if initial is None:
            initial = losses.detach().clone()
        wl = w.clone().requires_grad_(True)
        norms = []
        for i in range(len(TASKS)):
            grads = torch.autograd.grad(wl[i] * losses[i], params, retain_graph=True, create_graph=True)
            norms.append(torch.cat([g.reshape(-1) for g in grads]).norm())
        gnorm = torch.stack(norms)
        ratio = losses.detach() / initial
        rate = ratio / ratio.mean()
        target = (gnorm.mean() * rate**alpha).detach()
        lgrad = (gnorm - target).abs().sum()
        (wgrad,) = torch.autograd.grad(lgrad, wl, retain_graph=True)
        opt.zero_grad()
        (w * losses).sum().backward()
        opt.step()
        w = floored(w - lr * wgrad, len(TASKS), min_weight)
        out.append(w.detach().clone())
    return torch.stack(out)


def plain_ddp_worker(rank: int, world: int, init_method: str, out_dir: str,
                     batches: list[tuple[Tensor, Tensor]], k: int, gn_kwargs: dict[str, Any]) -> None:
    """Plain PyTorch DDP (gloo) worker: rank ``r`` trains on rows ``[r*b, (r+1)*b)`` of every
    global batch, cut into ``k`` accumulated micro-batches; saves the weights after each step."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world)
    try:
        net = Net(seed=0, dtype=batches[0][0].dtype)
        ddp = DistributedDataParallel(net, broadcast_buffers=False)
        gn = GradNorm(net.shared, num_tasks=len(TASKS), **gn_kwargs)
        opt = torch.optim.SGD(net.parameters(), lr=0.05)
        weights, norms = [], []
        for x, y in batches:
            b = x.shape[0] // world
            local = (x[rank * b : (rank + 1) * b], y[rank * b : (rank + 1) * b])
            opt.zero_grad()
            micro = list(zip(local[0].chunk(k), local[1].chunk(k)))
            for j, (xm, ym) in enumerate(micro):
                if j < k - 1:
                    with ddp.no_sync():
                        (gn.combine(ddp(xm, ym)) / k).backward()
                else:
                    (gn.combine(ddp(xm, ym)) / k).backward()
            gn.step()
            opt.step()
            weights.append(gn.weights.clone())
            norms.append(gn.last_stats["grad_norms"].clone())
        torch.save({"weights": torch.stack(weights), "norms": torch.stack(norms), "state": gn.state_dict(),
                    "params": [p.detach().clone() for p in net.parameters()]},
                   Path(out_dir) / f"plain_rank{rank}.pt")
        # Release the DDP reducer while the process group is alive and idle: freed after
        # destroy_process_group, it tears the group down itself, joining gloo's worker thread
        # while holding the GIL that thread may need to free its last work (a deadlock seen here).
        dist.barrier()
        del ddp
    finally:
        dist.destroy_process_group()


def plain_single(batches: list[tuple[Tensor, Tensor]], gn_kwargs: dict[str, Any]) -> dict[str, Any]:
    """The same loop as :func:`plain_ddp_worker` in one process on the whole global batches."""
    net = Net(seed=0, dtype=batches[0][0].dtype)
    gn = GradNorm(net.shared, num_tasks=len(TASKS), **gn_kwargs)
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    weights, norms = [], []
    for x, y in batches:
        opt.zero_grad()
        gn.combine(net(x, y)).backward()
        gn.step()
        opt.step()
        weights.append(gn.weights.clone())
        norms.append(gn.last_stats["grad_norms"].clone())
    return {"weights": torch.stack(weights), "norms": torch.stack(norms),
            "params": [p.detach().clone() for p in net.parameters()]}
