"""Models users write (issue 22), measured against ``mode="autograd"`` or the index-form run.

Each scenario trains a small float64 model the way a user would and prints one line: the
difference between the default route and an exact reference (``mode="autograd"``, or the same
run with a masked loss written as ``err[mask].mean()``), or the error the library raises. Run it
against another version of the package to compare (the package first on ``sys.path`` is the one
measured)::

    python benchmarks/user_models.py --out /tmp/after.md
    mkdir -p /tmp/old && git archive a57d761 gradnorm_lightning | tar -x -C /tmp/old
    PYTHONPATH=/tmp/old python benchmarks/user_models.py --out /tmp/before.md

``benchmarks/USER_MODELS.md`` puts the two tables side by side.

Scenarios: partial labels as a masked mean (plain loop, gradient accumulation 1-3; a bf16
Lightning fit of a small conv net with BatchNorm, accumulation 4, depth labels missing in every
third micro-batch); tied weights (an embedding's tied output projection, a tied decoder);
activation checkpointing (non-reentrant and reentrant, a block ending in its activation); a
sparse embedding; several experts as the shared layer; interacting heads under ``task_views``;
the floor after renormalisation.
"""

from __future__ import annotations

import argparse
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

F64 = torch.float64


def _attempt(fn: Callable[[], str]) -> str:
    try:
        return fn()
    except Exception as exc:  # (a scenario's error is its result)
        return f"raises {type(exc).__name__}: {str(exc).splitlines()[0][:150]}"


# ---------------------------------------------------------------------- partial labels
def _partial_plain(form: str, k: int, steps: int = 12) -> tuple[list[Tensor], Any]:
    import gradnorm_lightning as gl

    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU()).double()
    heads = nn.ModuleList([nn.Linear(16, 1) for _ in range(3)]).double()
    params = [*trunk.parameters(), *heads.parameters()]
    opt = torch.optim.Adam(params, lr=0.01)
    gn = gl.GradNorm(trunk[2], num_tasks=3, alpha=1.5)
    g = torch.Generator().manual_seed(1)
    for step in range(steps):
        opt.zero_grad()
        for j in range(k):
            x, y = torch.randn(8, 6, generator=g, dtype=F64), torch.randn(8, 3, generator=g, dtype=F64)
            m = torch.ones(8, 3, dtype=torch.bool)
            if (step * k + j) % 3 == 1:
                m[:, 2] = False
            z = trunk(x)
            losses = []
            for i, h in enumerate(heads):
                err = (h(z).squeeze(1) - y[:, i]) ** 2
                losses.append((err * m[:, i]).sum() / m[:, i].sum() if form == "masked" else err[m[:, i]].mean())
            (gn.combine(losses) / k).backward()
        gn.step()
        gl.zero_nonfinite_grads_(params)  # (what the package's README asked for before it cut absent tasks off)
        opt.step()
    return [p.detach().clone() for p in params], gn


def partial_labels_plain(k: int) -> str:
    masked, gm = _partial_plain("masked", k)
    index, gi = _partial_plain("index", k)
    dp = max(float((p - q).abs().max()) for p, q in zip(masked, index))
    return (f"max |parameter masked − index| {dp:.3g}, |weights| {float((gm.weights - gi.weights).abs().max()):.3g}; "
            f"skipped (masked) {gm.skipped.tolist()}")


def partial_labels_lightning_bf16() -> str:
    import lightning as L
    from torch.utils.data import DataLoader

    from gradnorm_lightning import GradNormCallback, GradNormMixin

    class UNet(GradNormMixin, L.LightningModule):
        task_names = ("seg", "depth")

        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.down = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2))
            self.mid = nn.Conv2d(8, 8, 3, padding=1)
            self.up = nn.Sequential(nn.Upsample(scale_factor=2), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
            self.seg, self.depth = nn.Conv2d(11, 3, 1), nn.Conv2d(11, 1, 1)

        def shared_layer(self) -> nn.Module:
            return self.mid

        def training_step(self, batch: Any, i: int) -> Tensor:
            x, seg, depth, m = batch
            u = torch.cat([self.up(torch.relu(self.mid(self.down(x)))), x], 1)
            err = (self.depth(u).squeeze(1) - depth).abs().float()
            w = m.float()[:, None, None].expand_as(err)
            return self.combine_task_losses({"seg": nn.functional.cross_entropy(self.seg(u), seg),
                                             "depth": (err * w).sum() / w.sum()})

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.Adam(self.parameters(), lr=1e-2)

    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(4, 3, 16, 16, generator=g), torch.randint(0, 3, (4, 16, 16), generator=g),
             torch.randn(4, 16, 16, generator=g), torch.full((4,), j % 3 != 2)) for j in range(48)]
    model = UNet()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    cb = GradNormCallback(alpha=1.5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        L.Trainer(max_steps=12, accumulate_grad_batches=4, precision="bf16-mixed", callbacks=[cb], logger=False,
                  enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                  log_every_n_steps=1).fit(model, DataLoader(data, batch_size=None))
    moved = {n: float((p.detach() - before[n]).abs().max()) for n, p in model.named_parameters()}
    trunk = max(v for n, v in moved.items() if n.split(".")[0] in ("down", "mid", "up"))
    head = max(v for n, v in moved.items() if n.startswith("depth"))
    warned = [str(w.message)[:60] for w in caught if "non-finite" in str(w.message)]
    assert cb.balancer is not None
    return (f"max |Δ| trunk {trunk:.3g}, depth head {head:.3g}; skipped/depth {float(cb.balancer.skipped[1]):.0f}; "
            f"non-finite warnings {warned or 'none'}")


# ---------------------------------------------------------------------- tied weights
class _TiedEmbedding(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.shared, self.body, self.head = nn.Embedding(20, 8), nn.Linear(8, 8), nn.Linear(8, 1)

    def losses(self, g: torch.Generator) -> list[Tensor]:
        idx = torch.randint(0, 20, (6, 3), generator=g)
        h = torch.tanh(self.body(self.shared(idx).mean(1)))
        y = torch.randint(0, 20, (6,), generator=g)
        return [nn.functional.cross_entropy(h @ self.shared.weight.T, y), self.head(h).pow(2).mean()]


class _TiedDecoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.shared, self.head = nn.Linear(6, 4), nn.Linear(4, 1)

    def losses(self, g: torch.Generator) -> list[Tensor]:
        x = torch.randn(5, 6, generator=g, dtype=F64)
        z = torch.tanh(self.shared(x))
        return [(nn.functional.linear(z, self.shared.weight.T) - x).pow(2).mean(), self.head(z).pow(2).mean()]


def _run(make: Callable[[], nn.Module], mode: str, steps: int = 8) -> tuple[Tensor, Tensor]:
    from gradnorm_lightning import GradNorm

    torch.manual_seed(0)
    model = make().double()
    gn = GradNorm(model.shared, num_tasks=2, alpha=1.5, lr=0.05, optimizer="sgd", mode=mode)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(1)
    first = None
    for _ in range(steps):
        opt.zero_grad()
        gn.combine(model.losses(g)).backward()  # type: ignore[operator]
        gn.step()
        opt.step()
        first = first if first is not None else gn.last_stats["grad_norms"].clone()
    assert first is not None
    return gn.weights.clone(), first


def tied(make: Callable[[], nn.Module]) -> str:
    (w, n), (w_ref, n_ref) = _run(make, "auto"), _run(make, "autograd")
    return f"n_0 {float(n[0]):.4f} (autograd {float(n_ref[0]):.4f}); weights off by {float((w - w_ref).abs().max()):.3g} after 8 steps"


# ---------------------------------------------------------------------- checkpointing
def _checkpointed_steps(mode: str, reentrant: bool, act: type[nn.Module]) -> str:
    from gradnorm_lightning import GradNorm

    torch.manual_seed(0)
    pre, block = nn.Linear(5, 6).double(), nn.Sequential(nn.Linear(6, 6), act()).double()
    heads = nn.ModuleList([nn.Linear(6, 1) for _ in range(3)]).double()
    gn = GradNorm(block[0], num_tasks=3, mode=mode)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        z = checkpoint(block, torch.tanh(pre(torch.randn(7, 5, generator=g, dtype=F64))), use_reentrant=reentrant)
        gn.combine([h(z).pow(2).mean() for h in heads]).backward()
        gn.step()
    return "weights " + ", ".join(f"{float(v):.6f}" for v in gn.weights)


def checkpointed(reentrant: bool, act: type[nn.Module]) -> str:
    return "; ".join(
        f"{mode}: {_attempt(lambda mode=mode: _checkpointed_steps(mode, reentrant, act))}"
        for mode in ("auto", "autograd")
    )


# ---------------------------------------------------------------------- embeddings, experts, views, floor
def sparse_embedding() -> str:
    from gradnorm_lightning import GradNorm

    norms = {}
    for mode in ("auto", "autograd"):
        torch.manual_seed(0)
        emb, heads = nn.Embedding(50, 4, sparse=True).double(), nn.ModuleList([nn.Linear(4, 1) for _ in range(2)]).double()
        gn = GradNorm(emb, num_tasks=2, mode=mode)
        z = emb(torch.randint(0, 50, (6, 3), generator=torch.Generator().manual_seed(1))).sum(1)
        gn.combine([h(z).pow(2).mean() * (i + 1) for i, h in enumerate(heads)]).backward()
        gn.step()
        norms[mode] = gn.last_stats["grad_norms"]
    return f"norms {norms['auto'].tolist()}, off autograd's by {float((norms['auto'] - norms['autograd']).abs().max()):.3g}"


def several_experts() -> str:
    from gradnorm_lightning import GradNorm

    norms, route = {}, ""
    for mode in ("auto", "autograd"):
        torch.manual_seed(0)
        experts = nn.ModuleList([nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 4)) for _ in range(3)]).double()
        heads = nn.ModuleList([nn.Linear(4, 1) for _ in range(2)]).double()
        gn = GradNorm(nn.ModuleList([e[-1] for e in experts]), num_tasks=2, mode=mode)
        x = torch.randn(7, 5, dtype=F64)
        z = torch.stack([e(x) for e in experts], 1).mean(1)
        gn.combine([h(z).pow(2).mean() * (i + 1) for i, h in enumerate(heads)]).backward()
        gn.step()
        norms[mode] = gn.last_stats["grad_norms"]
        route = route or str(gn.last_stats["route"])
    return (f"route {route}, norms {[round(v, 4) for v in norms['auto'].tolist()]}, "
            f"off autograd's by {float((norms['auto'] - norms['autograd']).abs().max()):.3g}")


def interacting_views() -> str:
    from gradnorm_lightning import GradNorm

    torch.manual_seed(0)
    layer, h0, o0, o1 = (nn.Linear(5, 6).double(), nn.Linear(6, 6).double(), nn.Linear(6, 1).double(),
                         nn.Linear(6, 1).double())
    x = torch.randn(7, 5, dtype=F64)
    norms = {}
    for mode, views in (("autograd", False), ("auto", True)):
        gn = GradNorm(layer, num_tasks=2, mode=mode)
        z = torch.relu(layer(x))
        zs = gn.task_views(z) if views else [z, z]
        a = torch.tanh(h0(zs[0]))
        gn.combine([o0(a).pow(2).mean(), o1(zs[1] + a).pow(2).mean() * 3]).backward()
        gn.step()
        norms[mode] = gn.last_stats["grad_norms"]
        gn.remove_hooks()
    ratio = (norms["auto"] / norms["autograd"]).tolist()
    return f"views norms ÷ autograd norms {[round(r, 6) for r in ratio]}"


def floor() -> str:
    from gradnorm_lightning.functional import renormalize_weights

    w = renormalize_weights(torch.tensor([1e-9, 1e3, 1e3]), torch.ones(3), min_weight=1e-4)
    return f"smallest weight {float(w.min()):.3g} with min_weight 1e-4, sum {float(w.sum()):.6f}"


SCENARIOS: tuple[tuple[str, Callable[[], str]], ...] = (
    ("partial labels, masked mean, plain loop, accumulation 1", lambda: partial_labels_plain(1)),
    ("partial labels, masked mean, plain loop, accumulation 2", lambda: partial_labels_plain(2)),
    ("partial labels, masked mean, plain loop, accumulation 3", lambda: partial_labels_plain(3)),
    ("partial labels, conv net + BatchNorm, bf16-mixed, accumulation 4 (Lightning)", partial_labels_lightning_bf16),
    ("tied output projection of a shared Embedding", lambda: tied(_TiedEmbedding)),
    ("tied decoder of a shared Linear", lambda: tied(_TiedDecoder)),
    ("checkpoint(use_reentrant=False), [Linear, Tanh]", lambda: checkpointed(False, nn.Tanh)),
    ("checkpoint(use_reentrant=False), [Linear, ReLU]", lambda: checkpointed(False, nn.ReLU)),
    ("checkpoint(use_reentrant=True), [Linear, Tanh]", lambda: checkpointed(True, nn.Tanh)),
    ("nn.Embedding(sparse=True) as the shared layer", sparse_embedding),
    ("three experts (ModuleList) as the shared layer", several_experts),
    ("interacting heads under task_views", interacting_views),
    ("the floor after renormalisation", floor),
)


def main(argv: Sequence[str] | None = None) -> dict[str, str]:
    """Run every scenario; print (and with ``--out`` write) a Markdown table; return the results."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--out", help="also write the Markdown table here")
    args = parser.parse_args(argv)
    import gradnorm_lightning

    torch.set_num_threads(1)
    results = {name: _attempt(fn) for name, fn in SCENARIOS}
    lines = [f"Package: `{gradnorm_lightning.__file__}`", "", "| scenario | result |", "|---|---|",
             *[f"| {name} | {result} |" for name, result in results.items()]]
    print("\n".join(lines))
    if args.out:
        with open(args.out, "w") as fh:
            fh.write("\n".join(["# Models users write (issue 22)", "", __doc__ or "", *lines, ""]))
    return results


if __name__ == "__main__":
    main()
