"""A textbook GradNorm written independently of the package: the reference for numbers.

Per step: per-task ``autograd.grad(w_i L_i, W, create_graph=True)``, the norms ``G_i``, the
constant target ``mean(G) * r_i ** alpha``, ``L_grad = sum |G_i - target_i|`` back-propagated
into ``w`` only, SGD (or Adam) on ``w`` with ``torch.optim``, clamp, renormalise to ``T``.
Absent tasks (``present[i]`` False) are left out as the package documents: out of the
model loss, out of the means, their weight kept, the present weights renormalised to ``T``
minus the absent weights.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from tests.helpers.floor import floored


class TextbookGradNorm:
    """The reference implementation (create_graph double backward, torch.optim on ``w``)."""

    def __init__(
        self,
        shared_params: Sequence[Tensor],
        num_tasks: int,
        alpha: float,
        lr: float,
        optimizer: str = "sgd",
        initial_losses: Tensor | None = None,
        min_weight: float = 1e-4,
        dtype: torch.dtype = torch.float64,
        lr_lambda: Callable[[int], float] | None = None,
    ) -> None:
        self.params = list(shared_params)
        self.num_tasks = num_tasks
        self.alpha = alpha
        self.min_weight = min_weight
        self.w = torch.ones(num_tasks, dtype=dtype, requires_grad=True)
        opt_cls = torch.optim.SGD if optimizer == "sgd" else torch.optim.Adam
        self.opt = opt_cls([self.w], lr=lr)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lr_lambda) if lr_lambda else None
        self.l0 = initial_losses
        self.seen = torch.zeros(num_tasks, dtype=torch.bool)
        self.l0_values = torch.zeros(num_tasks, dtype=dtype)

    def model_loss(self, losses: Sequence[Tensor], present: Sequence[bool] | None = None) -> Tensor:
        present = present or [True] * self.num_tasks
        return sum((self.w[i].detach() * losses[i] for i in range(self.num_tasks) if present[i]), torch.zeros(()))

    def update(self, losses: Sequence[Tensor], present: Sequence[bool] | None = None) -> Tensor:
        """Compute the GradNorm step from the live graph of ``losses``; returns ``G`` (norms)."""
        present = list(present or [True] * self.num_tasks)
        idx = [i for i in range(self.num_tasks) if present[i]]
        values = torch.stack([losses[i].detach() for i in range(self.num_tasks)])
        if self.l0 is None:
            for i in idx:
                if not self.seen[i]:
                    self.l0_values[i] = values[i]
                    self.seen[i] = True
            l0 = self.l0_values
        else:
            l0 = self.l0
        norms = []
        for i in idx:
            grads = torch.autograd.grad(self.w[i] * losses[i], self.params, retain_graph=True, create_graph=True)
            norms.append(torch.cat([g.reshape(-1) for g in grads]).norm())
        G = torch.stack(norms)
        ratio = values[idx] / l0[idx]
        r = ratio / ratio.mean()
        target = (G.mean() * r**self.alpha).detach()
        l_grad = (G - target).abs().sum()
        self.opt.zero_grad()
        (wgrad,) = torch.autograd.grad(l_grad, self.w, retain_graph=True)
        self.w.grad = wgrad
        before = self.w.detach().clone()
        self.opt.step()
        if self.sched is not None:
            self.sched.step()
        with torch.no_grad():
            mask = torch.tensor(present)
            budget = self.num_tasks - before[~mask].sum()
            w = before.clone()
            w[mask] = floored(self.w.detach()[mask], budget, self.min_weight)
            self.w.copy_(w)
        return G.detach()


def make_multitask(
    seed: int,
    num_tasks: int = 3,
    bias: bool = True,
    dtype: torch.dtype = torch.float64,
    d_in: int = 5,
    hidden: int = 8,
    d_rep: int = 6,
    d_out: int = 2,
) -> tuple[nn.Sequential, nn.ModuleList]:
    """A trunk (``trunk[2]`` is the last shared Linear) and one Linear head per task."""
    torch.manual_seed(seed)
    trunk = nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, d_rep, bias=bias), nn.ReLU())
    heads = nn.ModuleList([nn.Linear(d_rep, d_out) for _ in range(num_tasks)])
    return trunk.to(dtype), heads.to(dtype)


def make_batches(num_tasks: int, steps: int, batch: int = 10, seed: int = 123, dtype: torch.dtype = torch.float64,
                 d_in: int = 5, d_out: int = 2) -> list[tuple[Tensor, Tensor]]:
    """Regression batches whose targets have very different scales per task."""
    g = torch.Generator().manual_seed(seed)
    scales = torch.logspace(0, 1, num_tasks, dtype=torch.float64).view(1, num_tasks, 1)
    return [
        (
            torch.randn(batch, d_in, generator=g, dtype=torch.float64).to(dtype),
            (torch.randn(batch, num_tasks, d_out, generator=g, dtype=torch.float64) * scales).to(dtype),
        )
        for _ in range(steps)
    ]


def task_losses(heads: nn.ModuleList, z: Tensor | Sequence[Tensor], y: Tensor) -> list[Tensor]:
    """MSE per task; ``z`` is one representation or one view per head."""
    zs = [z] * len(heads) if isinstance(z, Tensor) else list(z)
    return [nn.functional.mse_loss(h(zz), y[:, i]) for i, (h, zz) in enumerate(zip(heads, zs))]


def textbook_trajectory(
    alpha: float, lr: float, steps: int, num_tasks: int = 3, bias: bool = True, optimizer: str = "sgd",
    model_lr: float = 0.05, seed: int = 0, dims: dict[str, int] | None = None, **kw: object,
) -> Tensor:
    """The reference weight trajectory ``(steps, T)`` on :func:`make_multitask` data."""
    dims = dims or {}
    trunk, heads = make_multitask(seed, num_tasks, bias, **dims)
    ref = TextbookGradNorm(list(trunk[2].parameters()), num_tasks, alpha, lr, optimizer, **kw)  # type: ignore[arg-type]
    opt = torch.optim.SGD([*trunk.parameters(), *heads.parameters()], lr=model_lr)
    out = []
    data_dims = {k: v for k, v in dims.items() if k in ("d_in", "d_out")}
    for x, y in make_batches(num_tasks, steps, **data_dims):
        losses = task_losses(heads, trunk(x), y)
        opt.zero_grad()
        ref.model_loss(losses).backward(retain_graph=True)
        ref.update(losses)
        opt.step()
        out.append(ref.w.detach().clone())
    return torch.stack(out)
