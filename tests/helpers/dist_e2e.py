"""Plain-PyTorch DDP and FSDP2 runs of GradNorm on small float64 models, and the one-process
run on the union batch they must equal. No Lightning import (spawned processes start fast).

A :class:`Config` names the shared layer (``linear``, ``conv``, ``layernorm`` (the generic rule),
``conv_first`` (a convolution on the data), ``embedding``, ``two`` (two shared Linears, each with its rule), ``big`` (a Linear whose factored
gradients are cheaper to all-gather than its dense block: the gather form by bytes)), whether
the heads read task views, ``task_cosines``, a task absent from the global batch at some steps (a
masked mean over an empty mask: NaN with a graph), micro-batches per optimizer step, a forced
exchange form, and whether these small blocks go through the exchange meant for large ones
(each piece's form by bytes) or, as shipped, one all-reduce. Rank ``r`` trains on rows ``[r b, (r + 1) b)`` of every global batch;
the one-process run trains on all of it. ``broadcast_buffers=False`` (nothing hides a divergence).
"""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

TASKS = 3
F64 = torch.float64
GLOBAL_BATCH = 16
STEPS = 4
ABSENT_STEPS = (1, 2)  # steps at which the last task has no labels in the whole global batch
D_IN, WIDTH, VOCAB = 6, 8, 12


@dataclasses.dataclass(frozen=True)
class Config:
    """One run (see the module docstring)."""

    layer: str = "linear"
    views: bool = False
    cosines: bool = True
    absent: bool = False
    k: int = 1
    force: str | None = None
    mode: str = "auto"
    #: the exchange for large blocks even on these small ones (``False``: as shipped, one all-reduce)
    exchange: bool = True

    @property
    def id(self) -> str:
        parts = [self.layer, "views" if self.views else "heads", "cos" if self.cosines else "norms"]
        parts += ["absent"] * self.absent + [f"k{self.k}"] * (self.k > 1) + [f"force-{self.force}"] * bool(self.force)
        parts += [self.mode] * (self.mode != "auto") + ["one-block"] * (not self.exchange)
        return "-".join(parts)


class Net(nn.Module):
    """``pre -> shared (-> tanh) -> heads``; ``forward`` returns the task losses (so that a DDP or
    FSDP root's forward runs around the whole step)."""

    def __init__(self, layer: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layer = layer
        width = WIDTH
        if layer == "embedding":
            self.pre: nn.Module = nn.Identity()
            self.shared: nn.Module = nn.Embedding(VOCAB, WIDTH)
        elif layer == "conv":
            self.pre = nn.Sequential(nn.Linear(D_IN, 2 * WIDTH), nn.Tanh(), nn.Unflatten(1, (2, WIDTH)))
            self.shared = nn.Conv1d(2, 3, 3, padding=1)
            width = 3 * WIDTH
        elif layer == "conv_first":  # (on the data itself: no gradient flows below it)
            self.pre = nn.Unflatten(1, (2, D_IN // 2))
            self.shared = nn.Conv1d(2, 3, 3, padding=1)
            width = 3 * (D_IN // 2)
        elif layer == "layernorm":
            self.pre = nn.Sequential(nn.Linear(D_IN, WIDTH), nn.Tanh())
            self.shared = nn.LayerNorm(WIDTH)
        elif layer == "two":
            self.pre = nn.Sequential(nn.Linear(D_IN, WIDTH), nn.Tanh())
            self.shared = nn.ModuleList([nn.Linear(WIDTH, WIDTH), nn.Linear(WIDTH, WIDTH)])
        elif layer == "big":
            self.pre = nn.Sequential(nn.Linear(D_IN, 64), nn.Tanh())
            self.shared = nn.Linear(64, WIDTH)
        else:
            self.pre = nn.Sequential(nn.Linear(D_IN, WIDTH), nn.Tanh())
            self.shared = nn.Linear(WIDTH, WIDTH)
        self.heads = nn.ModuleList([nn.Sequential(nn.Linear(width, 4), nn.Tanh(), nn.Linear(4, 1))
                                    for _ in range(TASKS)])
        self.double()

    def shared_modules(self) -> list[nn.Module]:
        return list(self.shared) if isinstance(self.shared, nn.ModuleList) else [self.shared]

    def represent(self, x: Tensor) -> Tensor:
        h = self.pre(x)
        if self.layer == "two":
            a, b = self.shared  # type: ignore[misc]
            return torch.tanh(a(h)) + torch.relu(b(h))
        if self.layer == "embedding":
            return torch.tanh(self.shared(h)).mean(1)
        if self.layer == "conv_first":  # (the views read the convolution's output itself: under FSDP2
            return self.shared(h)  # the gradients reach its rule before FSDP gathers the weight for the backward)
        return torch.tanh(self.shared(h)).flatten(1)

    def forward(self, x: Tensor, y: Tensor, mask: Tensor, views: Any = None) -> list[Tensor]:
        z = self.represent(x)
        zs = views(z) if views is not None else [z] * TASKS
        losses = []
        for t, (head, zz) in enumerate(zip(self.heads, zs)):
            err = (head(zz.flatten(1)).squeeze(1) - y[:, t]).pow(2)
            losses.append(err[mask[:, t]].mean())  # NaN (with a graph) when the task has no labels here
        return losses


def make_batches(layer: str, seed: int = 5) -> list[tuple[Tensor, Tensor, Tensor]]:
    """``STEPS`` global batches ``(x, y, mask)``; the last task unlabelled at :data:`ABSENT_STEPS`."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for step in range(STEPS):
        if layer == "embedding":
            x = torch.randint(0, VOCAB, (GLOBAL_BATCH, 4), generator=g)
        else:
            x = torch.randn(GLOBAL_BATCH, D_IN, generator=g, dtype=F64)
        y = torch.randn(GLOBAL_BATCH, TASKS, generator=g, dtype=F64) * torch.tensor([1.0, 3.0, 0.3], dtype=F64)
        mask = torch.ones(GLOBAL_BATCH, TASKS, dtype=torch.bool)
        if step in ABSENT_STEPS:
            mask[:, -1] = False
        out.append((x, y, mask))
    return out


def _gradnorm(net: Net, cfg: Config) -> Any:
    from gradnorm_lightning import GradNorm

    shared = net.shared_modules()
    return GradNorm(shared if len(shared) > 1 else shared[0], num_tasks=TASKS, alpha=1.5, lr=0.02,
                    optimizer="adam", task_cosines=cfg.cosines, mode=cfg.mode)


def _train(net: Net, model: Any, cfg: Config, batches: list[tuple[Tensor, Tensor, Tensor]], rows: slice,
           sync: Any = None) -> dict[str, Any]:
    """The plain loop; ``model`` is what the forward runs through (the net, its DDP wrapper or
    the FSDP root); ``sync(micro, k)``: a context for micro-batch ``micro`` of ``k`` (no_sync)."""
    import contextlib

    gn = _gradnorm(net, cfg)
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    weights, norms, cosines = [], [], []
    for x, y, mask in batches:
        x, y, mask = x[rows], y[rows], mask[rows]
        opt.zero_grad()
        for j, (xm, ym, mm) in enumerate(zip(x.chunk(cfg.k), y.chunk(cfg.k), mask.chunk(cfg.k))):
            context = sync(j, cfg.k) if sync is not None else contextlib.nullcontext()
            with context:
                losses = model(xm, ym, mm, gn.task_views if cfg.views else None)
                if not cfg.absent:
                    assert all(torch.isfinite(loss) for loss in losses)
                (gn.combine(losses) / cfg.k).backward()
        gn.step()
        opt.step()
        weights.append(gn.weights.detach().clone())
        norms.append(gn.last_stats["grad_norms"].detach().clone())
        if cfg.cosines:
            cosines.append(gn.last_stats["cosines"].detach().clone())
    return {"weights": torch.stack(weights), "norms": torch.stack(norms),
            "cosines": torch.stack(cosines) if cosines else None, "route": gn.last_stats["route"],
            "state": {k: v for k, v in gn.state_dict().items() if isinstance(v, Tensor)}}


def _full(p: Tensor) -> Tensor:
    full = getattr(p, "full_tensor", None)
    return (full() if full is not None else p).detach().clone()


def _fsdp1_params(model: Any) -> list[Tensor]:
    """The full parameters of an FSDP1-wrapped model (gathered on every rank), in order."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    with FullyShardedDataParallel.summon_full_params(model):
        return [p.detach().clone() for p in model.module.parameters()]


def single(cfg: Config) -> dict[str, Any]:
    """The one-process run on the whole global batches."""
    net = Net(cfg.layer)
    batches = make_batches(cfg.layer)
    if not cfg.absent:
        batches = [(x, y, torch.ones_like(m)) for x, y, m in batches]
    out = _train(net, net, cfg, batches, slice(None))
    out["params"] = [_full(p) for p in net.parameters()]
    return out


def worker(rank: int, world: int, init_method: str, out_dir: str, wrapper: str, configs: list[Config]) -> None:
    """Every config under DDP (``wrapper="ddp"``), FSDP2 (``"fsdp"``: ``fully_shard`` on each
    shared module, resharded after its forward, then on the model) or FSDP1 (``"fsdp1"``:
    ``FullyShardedDataParallel(model, use_orig_params=True)``); saves ``{config id: result}``; an error is saved as its text."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from gradnorm_lightning.capture import _exchange

    warnings.simplefilter("ignore", FutureWarning)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world)
    results: dict[str, Any] = {}
    b = GLOBAL_BATCH // world
    small = _exchange.SMALL_BLOCK_BYTES
    try:
        for cfg in configs:
            _exchange.FORCE = cfg.force
            _exchange.SMALL_BLOCK_BYTES = 0 if cfg.exchange else small
            net = Net(cfg.layer)
            batches = make_batches(cfg.layer)
            if not cfg.absent:
                batches = [(x, y, torch.ones_like(m)) for x, y, m in batches]
            try:
                if wrapper == "ddp":
                    ddp = DistributedDataParallel(net, broadcast_buffers=False)

                    def no_sync(j: int, k: int, ddp: Any = ddp) -> Any:
                        import contextlib

                        return ddp.no_sync() if j < k - 1 else contextlib.nullcontext()

                    out = _train(net, ddp, cfg, batches, slice(rank * b, (rank + 1) * b), no_sync)
                    del ddp
                elif wrapper == "fsdp1":
                    from torch.distributed.fsdp import FullyShardedDataParallel

                    # one flat parameter over the whole model; the shared layer's parameters are
                    # views into it (use_orig_params=True, Lightning's FSDPStrategy's default)
                    fsdp1 = FullyShardedDataParallel(net, use_orig_params=True, device_id=torch.device("cpu"))
                    out = _train(net, fsdp1, cfg, batches, slice(rank * b, (rank + 1) * b))
                    out["params"] = _fsdp1_params(fsdp1)
                    results[cfg.id] = out
                    dist.barrier()
                    continue
                else:
                    from torch.distributed.fsdp import fully_shard

                    for module in net.shared_modules():  # (gathered for its forward, freed after it)
                        fully_shard(module, reshard_after_forward=True)
                    fully_shard(net)
                    out = _train(net, net, cfg, batches, slice(rank * b, (rank + 1) * b))
                out["params"] = [_full(p) for p in net.parameters()]
                results[cfg.id] = out
            except Exception as exc:  # (saved, and re-raised by the test as an assertion)
                results[cfg.id] = f"{type(exc).__name__}: {exc}"
            dist.barrier()
        torch.save(results, Path(out_dir) / f"{wrapper}_rank{rank}.pt")
        dist.barrier()
    finally:
        _exchange.FORCE, _exchange.SMALL_BLOCK_BYTES = None, small
        dist.destroy_process_group()
