"""Issue 24, items 5 and 6: GradNorm under plain DDP and under FSDP2 equals one process on the union batch.

Two gloo processes (rank ``r`` on rows ``[8r, 8r + 8)`` of every 16-row global batch) against
one process on all 16 rows, float64 (:mod:`helpers.dist_e2e`): the task weights, the norms and
the task-gradient cosines at every step and the model's parameters at the end to ``1e-12``, and
the two ranks' weights, cosines and balancer state bitwise equal. Shared layers: a Linear (its
dense block reduce-scattered), a wider Linear (its inputs and output gradients all-gathered:
fewer bytes), a convolution (also on the data, its output read by the views: under FSDP2 the
gradients reach its rule before FSDP gathers the weight again), a LayerNorm (the generic rule), an embedding, two shared Linears;
heads reading ``z`` or task views; a task without labels in the global batch at steps 1 and 2;
two micro-batches per step; ``mode="representation"``. These blocks are small, so as shipped
they are all-reduced in one collective (two configurations check that); the others take the
exchange meant for large blocks (``SMALL_BLOCK_BYTES = 0``).

FSDP2: ``torch.distributed.fsdp.fully_shard`` on each shared module, then on the model (its
parameters are DTensor shards; each forward gathers them). ``mode="autograd"`` is refused there
with a message naming the sharding. FSDP1: ``FullyShardedDataParallel(model,
use_orig_params=True)`` (what Lightning's ``FSDPStrategy`` does by default): one flat parameter,
the shared layer's parameters views into this rank's part of it outside the forward. Lightning's FSDP strategies need a GPU ("The strategy fsdp
requires a GPU accelerator"): ``benchmarks/gpu_check.py`` fits one where a GPU is available.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from helpers.dist_e2e import Config, single, worker

pytestmark = pytest.mark.slow

WORLD = 2
TOL = 1e-12

DDP = [
    Config("linear"), Config("linear", views=True), Config("linear", cosines=False), Config("linear", absent=True),
    Config("linear", k=2), Config("linear", force="gather"), Config("big"), Config("big", k=2, absent=True),
    Config("big", force="dense"), Config("conv"), Config("layernorm"), Config("layernorm", views=True),
    Config("conv_first", views=True), Config("embedding"), Config("two"), Config("two", views=True),
    Config("linear", mode="representation"), Config("big", exchange=False), Config("two", absent=True, exchange=False),
]
FSDP = [
    Config("linear"), Config("linear", views=True), Config("conv"), Config("conv", views=True),
    Config("conv_first", views=True), Config("layernorm"),
    Config("layernorm", views=True), Config("embedding"), Config("two"), Config("big"), Config("linear", absent=True),
    Config("conv", absent=True, views=True), Config("layernorm", k=2), Config("linear", mode="representation"),
    Config("conv", exchange=False), Config("linear", mode="autograd"),
]

FSDP1 = [
    Config("linear"), Config("linear", views=True), Config("conv_first", views=True), Config("layernorm"),
    Config("layernorm", views=True), Config("embedding"), Config("two"), Config("big"), Config("linear", absent=True),
    Config("layernorm", k=2), Config("conv", exchange=False),
]


def _spawn(tmp: Path, wrapper: str, configs: list[Config]) -> list[dict[str, Any]]:
    init = f"file://{tmp / 'rendezvous'}"
    mp.spawn(worker, args=(WORLD, init, str(tmp), wrapper, configs), nprocs=WORLD, join=True)
    return [torch.load(tmp / f"{wrapper}_rank{r}.pt") for r in range(WORLD)]


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return _spawn(tmp_path_factory.mktemp("ddp"), "ddp", DDP)


@pytest.fixture(scope="module")
def fsdp1_runs(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return _spawn(tmp_path_factory.mktemp("fsdp1"), "fsdp1", FSDP1)


@pytest.fixture(scope="module")
def fsdp_runs(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return _spawn(tmp_path_factory.mktemp("fsdp"), "fsdp", FSDP)


def _check(runs: list[dict[str, Any]], cfg: Config, label: str) -> None:
    r0, r1 = runs[0][cfg.id], runs[1][cfg.id]
    assert not isinstance(r0, str), f"{label} {cfg.id} raised on rank 0: {r0}"
    assert not isinstance(r1, str), f"{label} {cfg.id} raised on rank 1: {r1}"
    # the ranks agree to the last bit
    assert torch.equal(r0["weights"], r1["weights"]), (r0["weights"] - r1["weights"]).abs().max()
    for key, value in r0["state"].items():
        assert torch.equal(value, r1["state"][key]), key
    if cfg.cosines:
        torch.testing.assert_close(r0["cosines"], r1["cosines"], rtol=0, atol=0, equal_nan=True)
    # ... and equal one process on the union batch
    want = single(cfg)
    assert r0["route"] == want["route"], (r0["route"], want["route"])
    dev_w = float((r0["weights"] - want["weights"]).abs().max())
    present = want["norms"] > 0
    dev_n = float(((r0["norms"] - want["norms"]).abs() / want["norms"].clamp_min(1e-300))[present].max())
    print(f"{label} {cfg.id} vs one process: |dw| {dev_w:.2e}, rel |dn| {dev_n:.2e}")
    assert dev_w < TOL and dev_n < TOL
    assert (r0["norms"][~present] == 0).all()
    if cfg.cosines:
        torch.testing.assert_close(r0["cosines"], want["cosines"], rtol=0, atol=TOL, equal_nan=True)
        if cfg.absent:
            assert r0["cosines"][1, -1].isnan().all() and not r0["cosines"][0].isnan().any()
    for p, q in zip(r0["params"], want["params"]):
        torch.testing.assert_close(p, q, rtol=0, atol=TOL)
    assert (want["weights"][-1] - 1).abs().max() > 1e-3  # the weights moved


@pytest.mark.parametrize("cfg", DDP, ids=lambda c: c.id)
def test_plain_ddp_equals_one_process(ddp_runs: list[dict[str, Any]], cfg: Config) -> None:
    _check(ddp_runs, cfg, "DDP")


@pytest.mark.parametrize("cfg", [c for c in FSDP if c.mode != "autograd"], ids=lambda c: c.id)
def test_fsdp2_equals_one_process(fsdp_runs: list[dict[str, Any]], cfg: Config) -> None:
    _check(fsdp_runs, cfg, "FSDP2")


@pytest.mark.parametrize("cfg", FSDP1, ids=lambda c: c.id)
def test_fsdp1_equals_one_process(fsdp1_runs: list[dict[str, Any]], cfg: Config) -> None:
    _check(fsdp1_runs, cfg, "FSDP1")


def test_fsdp2_refuses_mode_autograd_naming_the_sharding(fsdp_runs: list[dict[str, Any]]) -> None:
    for rank in range(WORLD):
        message = fsdp_runs[rank][Config("linear", mode="autograd").id]
        assert isinstance(message, str) and message.startswith("ValueError: mode='autograd'"), message
        assert "FSDP has sharded them (DTensor)" in message and "Use mode='auto'" in message


def test_one_rank_alone_differs() -> None:
    """The comparison has power: one rank's half of the batches gives other weights and cosines."""
    from helpers import dist_e2e

    cfg = Config("big")
    full = single(cfg)
    halves = [(x, y, torch.ones_like(m)) for x, y, m in dist_e2e.make_batches(cfg.layer)]
    net = dist_e2e.Net(cfg.layer)
    alone = dist_e2e._train(net, net, cfg, halves, slice(0, 8))
    assert (alone["weights"] - full["weights"]).abs().max() > 1e-4
    assert (alone["cosines"] - full["cosines"]).abs().max() > 1e-3
