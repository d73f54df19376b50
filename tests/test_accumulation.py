"""Issue 4: gradient accumulation. ``k`` micro-batches of size ``b`` accumulated into one
optimizer step give the same GradNorm trajectory as one batch of ``k*b`` (float64, 1e-10),
through Lightning (``accumulate_grad_batches=k``) and through the plain balancer
(``(loss / k).backward()`` per micro-batch, one ``step()``), with one weight update per
optimizer step; the big-batch run itself matches the textbook create_graph GradNorm."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from helpers.dist_models import (
    Net,
    fit_single,
    make_batches,
    split_micro,
    textbook_weights,
)

from gradnorm_lightning import GradNorm

STEPS = 4
K = 3
MICRO = 4
F64 = torch.float64
TOL = 1e-10


@pytest.mark.parametrize(
    ("gn_kwargs", "views"),
    [
        ({"alpha": 1.5, "lr": 0.01}, False),
        ({"alpha": 1.5, "lr": 0.01, "mode": "autograd"}, False),
        ({"alpha": 0.5, "lr": 0.01, "mode": "representation"}, False),
        ({"alpha": 1.5, "lr": 0.01, "optimizer": "adam"}, True),
        ({"alpha": 0.5, "lr": 0.01, "mode": "representation"}, True),
    ],
    ids=["auto", "autograd", "representation", "adam-views", "representation-views"],
)
def test_lightning_accumulation_equals_big_batch(gn_kwargs: dict, views: bool) -> None:
    batches = make_batches(STEPS, K * MICRO, seed=4, dtype=F64)
    module_kwargs = {"dtype": F64, "views": views}
    big = fit_single(batches, gn_kwargs, module_kwargs)
    acc = fit_single(split_micro(batches, K), gn_kwargs, module_kwargs, accumulate_grad_batches=K)

    assert big.optimizer_steps == acc.optimizer_steps == STEPS
    assert len(big.weights) == len(acc.weights) == STEPS  # one weight update per optimizer step
    w_big, w_acc = torch.stack(big.weights), torch.stack(acc.weights)
    n_big, n_acc = torch.stack(big.norms), torch.stack(acc.norms)
    assert w_big.dtype == F64
    dev_w = (w_big - w_acc).abs().max().item()
    dev_n = ((n_big - n_acc).abs() / n_big).max().item()
    print(f"lightning accumulation vs big batch: |dw| {dev_w:.2e}, rel |dn| {dev_n:.2e}")
    assert dev_w < TOL
    assert dev_n < TOL
    assert (w_big[-1] - 1).abs().max() > 1e-3  # the weights did move


def _plain_run(batches, k: int, **gn_kwargs) -> tuple[torch.Tensor, GradNorm]:
    net = Net(seed=0, dtype=F64)
    gn_kwargs.setdefault("optimizer", "sgd")
    gn = GradNorm(net.shared, num_tasks=3, **gn_kwargs)
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    out = []
    micro = split_micro(batches, k)
    for step in range(len(batches)):
        opt.zero_grad()
        for x, y in micro[step * k : (step + 1) * k]:
            (gn.combine(net.task_losses(x, y)) / k).backward()
        gn.step()
        opt.step()
        out.append(gn.weights.clone())
    return torch.stack(out), gn


@pytest.mark.parametrize("mode", ["auto", "autograd", "representation"])
def test_plain_balancer_accumulation_equals_big_batch(mode: str) -> None:
    batches = make_batches(STEPS, K * MICRO, seed=5, dtype=F64)
    w_big, gn_big = _plain_run(batches, 1, alpha=1.5, lr=0.01, mode=mode)
    w_acc, gn_acc = _plain_run(batches, K, alpha=1.5, lr=0.01, mode=mode)
    dev = (w_big - w_acc).abs().max().item()
    print(f"plain accumulation ({mode}) vs big batch: {dev:.2e}")
    assert dev < TOL
    assert gn_acc.steps == STEPS and float(gn_acc.num_updates) == STEPS
    assert torch.allclose(gn_acc.current_initial_losses, gn_big.current_initial_losses, rtol=0, atol=TOL)
    if mode != "representation":  # the paper's norms: the textbook method is the reference
        ref = textbook_weights(Net(seed=0, dtype=F64), batches, alpha=1.5, lr=0.01, model_lr=0.05)
        dev_ref = (w_big - ref).abs().max().item()
        print(f"plain big batch ({mode}) vs textbook: {dev_ref:.2e}")
        assert dev_ref < 1e-12
