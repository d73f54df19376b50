"""Issue 4: GradNorm under DDP (2 CPU processes, gloo) equals one process on the global batch.

Rank ``r`` trains on rows ``[r*b, (r+1)*b)`` of every global batch (no DistributedSampler),
the single process on the whole batch; DDP averages the ranks' mean losses' gradients, so
the model trajectories agree, and with ``distributed="exact"`` the GradNorm weights must too.
``broadcast_buffers=False``: nothing hides a divergence between the ranks.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from lightning.pytorch.callbacks import ModelCheckpoint

sys.path.insert(0, str(Path(__file__).resolve().parent))
from helpers.dist_models import (
    GlooSpawnDDP,
    MultiTask,
    Recorder,
    fit_single,
    make_batches,
    make_trainer,
)
from helpers.dist_plain import plain_ddp_worker, plain_single

from gradnorm_lightning import GradNormCallback

pytestmark = pytest.mark.slow

STEPS = 4
GLOBAL_BATCH = 16
GN = {"alpha": 1.5, "lr": 0.01, "optimizer": "sgd"}


def _fit_ddp(out_dir: Path, batches, distributed: str, **trainer_kwargs) -> list[dict]:
    rec = Recorder(out_dir=str(out_dir))
    callbacks = [GradNormCallback(**GN, distributed=distributed), rec, *trainer_kwargs.pop("extra_callbacks", [])]
    trainer = make_trainer(callbacks, strategy=GlooSpawnDDP(), devices=2, **trainer_kwargs)
    trainer.fit(MultiTask(batches))
    return [torch.load(out_dir / f"rank{r}.pt") for r in range(2)]


def _half(batches, rank: int):
    b = GLOBAL_BATCH // 2
    return [(x[rank * b : (rank + 1) * b], y[rank * b : (rank + 1) * b]) for x, y in batches]


def _assert_ranks_identical(r0: dict, r1: dict) -> None:
    assert r0["world_size"] == r1["world_size"] == 2
    assert r0["steps"] == r1["steps"]
    assert torch.equal(r0["weights"], r1["weights"]), (r0["weights"] - r1["weights"]).abs().max()
    for key, value in r0["state"].items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, r1["state"][key]), key


def test_exact_ddp_matches_single_process_on_global_batch(tmp_path: Path) -> None:
    batches = make_batches(STEPS, GLOBAL_BATCH, seed=1)
    r0, r1 = _fit_ddp(tmp_path, batches, "exact")
    assert r0["steps"] == STEPS
    _assert_ranks_identical(r0, r1)

    single = fit_single(batches, GN)
    w_single = torch.stack(single.weights)
    n_single = torch.stack(single.norms)
    assert w_single.shape == r0["weights"].shape == (STEPS, 3)
    dev_w = (r0["weights"] - w_single).abs().max().item()
    dev_n = ((r0["norms"] - n_single).abs() / n_single).max().item()
    print(f"exact DDP vs single: max |dw| = {dev_w:.3e}, max rel |dn| = {dev_n:.3e}")
    assert dev_w < 1e-4
    assert dev_n < 1e-5

    # The comparison has power: one rank's data alone gives clearly different weights/norms.
    local = fit_single(_half(batches, 0), GN)
    assert (torch.stack(local.norms)[0] - n_single[0]).abs().max() > 1e-2
    assert (torch.stack(local.weights) - w_single).abs().max() > 1e-3


def test_approx_ddp_is_finite_identical_on_ranks_and_averages_local_norms(tmp_path: Path) -> None:
    batches = make_batches(STEPS, GLOBAL_BATCH, seed=2)
    r0, r1 = _fit_ddp(tmp_path, batches, "approx")
    assert r0["steps"] == STEPS
    _assert_ranks_identical(r0, r1)
    assert torch.isfinite(r0["weights"]).all() and torch.isfinite(r0["norms"]).all()
    assert torch.allclose(r0["weights"].sum(dim=1), torch.full((STEPS,), 3.0))

    # First step (same initial model on both ranks): approx norm = mean of the local norms.
    local = [torch.stack(fit_single(_half(batches[:1], r), GN).norms)[0] for r in range(2)]
    expected = (local[0] + local[1]) / 2
    dev = ((r0["norms"][0] - expected).abs() / expected).max().item()
    print(f"approx step-1 norm vs mean of local norms: max rel dev = {dev:.3e}")
    assert dev < 1e-5
    # ... which is not the global batch's norm (what "exact" gives): the modes differ.
    exact = torch.stack(fit_single(batches[:1], GN).norms)[0]
    gap = ((r0["norms"][0] - exact).abs() / exact).max().item()
    print(f"approx vs exact step-1 norm: max rel gap = {gap:.3e}")
    assert gap > 1e-3


def test_ddp_checkpoint_resumes_on_one_process(tmp_path: Path) -> None:
    """3 steps under DDP, checkpoint, 3 more on one process == 6 steps on one process."""
    batches = make_batches(3, GLOBAL_BATCH, seed=3)
    ckpt_cb = ModelCheckpoint(dirpath=str(tmp_path), filename="ddp", save_top_k=-1, every_n_epochs=1)
    r0, r1 = _fit_ddp(tmp_path, batches, "exact", extra_callbacks=[ckpt_cb], enable_checkpointing=True)
    _assert_ranks_identical(r0, r1)
    ckpt_path = tmp_path / "ddp.ckpt"
    assert ckpt_path.exists()
    saved = torch.load(ckpt_path, weights_only=False)["callbacks"]["GradNormCallback"]
    assert torch.equal(saved["weights"], r0["state"]["weights"])
    assert saved["steps"] == 3

    # Resume on one process: the callback's state is loaded and training goes on.
    rec = Recorder()
    cb = GradNormCallback(**GN)
    make_trainer([cb, rec], max_epochs=2).fit(MultiTask(batches), ckpt_path=str(ckpt_path))
    assert cb.balancer is not None and cb.balancer.steps == 6
    assert len(rec.weights) == 3  # the recorder counts from the restored step count
    resumed = torch.stack(rec.weights)

    full = torch.stack(fit_single(batches, GN, max_epochs=2).weights)
    dev_ckpt = (r0["weights"] - full[:3]).abs().max().item()
    dev_resume = (resumed - full[3:]).abs().max().item()
    print(f"DDP part vs single: {dev_ckpt:.3e}; resumed part vs uninterrupted single: {dev_resume:.3e}")
    assert dev_ckpt < 1e-4
    assert dev_resume < 1e-4
    assert (resumed[-1] - r0["weights"][-1]).abs().max() > 1e-4  # the weights kept moving


@pytest.mark.parametrize(
    ("distributed", "mode", "k"),
    [("exact", "auto", 2), ("exact", "representation", 2), ("approx", "auto", 2)],
)
def test_plain_ddp_float64(tmp_path: Path, distributed: str, mode: str, k: int) -> None:
    """Plain PyTorch DDP, float64: 2 ranks with ``k`` accumulated micro-batches each (no_sync)
    vs one process on the global batch. Exact: equal to 1e-12; approx: finite, ranks equal,
    and measurably different from the exact norms (the tests can tell them apart)."""
    batches = make_batches(STEPS, GLOBAL_BATCH, seed=14, dtype=torch.float64)
    gn_kwargs = {**GN, "optimizer": "adam", "mode": mode, "distributed": distributed}
    init = f"file://{tmp_path / 'rendezvous'}"
    mp.spawn(plain_ddp_worker, args=(2, init, str(tmp_path), batches, k, gn_kwargs), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"plain_rank{r}.pt") for r in range(2))
    assert torch.equal(r0["weights"], r1["weights"])
    for key, value in r0["state"].items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, r1["state"][key]), key
    single = plain_single(batches, {**GN, "optimizer": "adam", "mode": mode})
    dev_w = (r0["weights"] - single["weights"]).abs().max().item()
    dev_n = ((r0["norms"] - single["norms"]).abs() / single["norms"]).max().item()
    print(f"plain DDP {distributed} {mode} k={k} vs single (float64): |dw| {dev_w:.2e}, rel |dn| {dev_n:.2e}")
    if distributed == "exact":
        for p, q in zip(r0["params"], single["params"]):  # the model follows the global batch too
            assert torch.allclose(p, q, rtol=0, atol=1e-12)
        assert dev_w < 1e-12
        assert dev_n < 1e-12
    else:
        assert torch.isfinite(r0["weights"]).all() and torch.isfinite(r0["norms"]).all()
        assert dev_n > 1e-4  # mean of local norms != global norm
