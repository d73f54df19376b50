"""Nothing lost with partial labels (issue 22, item 1).

A task without labels in a micro-batch, written as the masked mean ``(err * m).sum() / m.sum()``,
is NaN with a graph; its backward writes ``0 * inf`` into every gradient below its head. The
balancer cuts that task off where its gradient leaves its private region, so the run must equal
the same run written with ``err[m].mean()`` (a NaN loss whose gradients are finite: nothing is
lost there by construction), in float64, weights and every model parameter, with gradient
accumulation over 1, 2 and 3 micro-batches, in the plain loop, in Lightning, and under DDP.
Adam trains the model, so that a zero gradient and a missing one would differ. The routes that
cannot cut (``mode="autograd"``) must say so and count it.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path
from unittest import mock

import lightning as L
import pytest
import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from helpers.partial_labels import TASKS, ddp_worker, make_micro_batches, plain_run
from helpers.partial_lightning import PartialModule, WeightLog

from gradnorm_lightning import GradNormCallback, _arrays
from gradnorm_lightning.capture.routes import Plan

TOL = 1e-9
MICRO = make_micro_batches(12)


def _max_diff(a: dict, b: dict) -> float:
    dw = float((a["weights"] - b["weights"]).abs().max())
    dp = max(float((p - q).abs().max()) for p, q in zip(a["params"], b["params"]))
    return max(dw, dp)


def _assert_moved(run: dict) -> None:
    assert float((run["weights"][-1] - 1).abs().max()) > 1e-3  # the weights did move


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize(
    ("balancer", "kwargs", "views"),
    [("gradnorm", {}, False), ("gradnorm", {}, True), ("gradnorm", {"mode": "representation"}, False),
     ("equal", {}, False)],
    ids=["heads", "views", "representation", "equal"],
)
def test_plain_loop_masked_mean_equals_index_form(k: int, balancer: str, kwargs: dict, views: bool) -> None:
    masked = plain_run("masked", MICRO, k, balancer, kwargs, views)
    index = plain_run("index", MICRO, k, balancer, kwargs, views)
    assert _max_diff(masked, index) <= TOL, f"masked vs index: {_max_diff(masked, index):.3g} ({masked['route']})"
    assert masked["grads_finite"]
    assert all(u is None for u in masked["uncut"])
    if balancer == "gradnorm":
        _assert_moved(masked)
    # absence is counted per micro-batch, in both forms
    absent = [sum(not bool(m[:, i].any()) for _, _, m in MICRO[: len(MICRO) - len(MICRO) % k]) for i in range(3)]
    assert masked["skipped"].tolist() == index["skipped"].tolist() == absent


@pytest.mark.parametrize("k", [1, 3])
def test_device_path_cuts_by_where_without_host_reads(k: int) -> None:
    """Where reading a value would synchronise (a GPU), every task's edges go through
    ``where(present_i, g, 0)``: the same run, with the host reads switched off."""
    with mock.patch.object(_arrays, "host_reads_free", lambda device: False):
        for views in (False, True):
            masked = plain_run("masked", MICRO, k, views=views)
            index = plain_run("index", MICRO, k, views=views)
            assert _max_diff(masked, index) <= TOL, views
            assert masked["grads_finite"]


def test_without_the_cut_the_same_run_loses_the_present_tasks_updates() -> None:
    """The control: with the cut disabled, the masked run's NaN reaches the shared trunk."""
    with mock.patch.object(Plan, "can_cut", lambda self, task: False):
        masked = plain_run("masked", MICRO, 2)
    assert not masked["grads_finite"] or any(u is not None for u in masked["uncut"])
    uncut = [u for u in masked["uncut"] if u is not None]
    assert uncut and any(bool(u.any()) for u in uncut)


def test_autograd_route_reports_what_it_cannot_cut() -> None:
    """``mode="autograd"`` walks no graph: an absent task's backward is reported, not hidden."""
    run = plain_run("masked", MICRO, 1, gn_kwargs={"mode": "autograd"}, sanitize=True)
    assert "cannot be cut off" in (run["route"] or "") or run["route"] == "autograd"
    flagged = [u for u in run["uncut"] if u is not None]
    assert flagged and all(u.dtype == torch.bool for u in flagged)
    expected = [[not bool(m[:, i].any()) for i in range(3)] for _, _, m in MICRO]
    assert [u.tolist() for u in run["uncut"] if u is not None] == [e for e in expected if any(e)]


# ---------------------------------------------------------------------- Lightning
def _fit(form: str, k: int, views: bool = False, **cb_kwargs) -> tuple[dict, GradNormCallback, list[str]]:
    cb = GradNormCallback(alpha=1.5, lr=0.02, **cb_kwargs)
    log = WeightLog()
    model = PartialModule(MICRO, form, views)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        L.Trainer(
            max_epochs=1, accumulate_grad_batches=k, callbacks=[cb, log], logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1, num_sanity_val_steps=0,
        ).fit(model)
    run = {"weights": torch.stack(log.weights), "params": [p.detach().clone() for p in model.parameters()]}
    return run, cb, [str(w.message) for w in caught]


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("views", [False, True], ids=["heads", "views"])
def test_lightning_masked_mean_equals_index_form(k: int, views: bool) -> None:
    masked, cb, messages = _fit("masked", k, views)
    index, _, _ = _fit("index", k, views)
    assert _max_diff(masked, index) <= TOL
    _assert_moved(masked)
    assert float(cb._nonfinite_steps) == 0  # no divergence counted
    assert not [m for m in messages if "non-finite" in m]
    # absence per micro-batch
    absent = [sum(not bool(m[:, i].any()) for _, _, m in MICRO) for i in range(3)]
    assert cb.balancer is not None and cb.balancer.skipped.tolist() == absent


def test_lightning_autograd_route_counts_and_names_what_was_lost() -> None:
    _, cb, messages = _fit("masked", 2, mode="autograd")
    assert float(cb._lost_steps) > 0
    assert float(cb._nonfinite_steps) == 0  # not a divergence
    lost = [m for m in messages if "cannot cut an absent task off" in m]
    assert len(lost) >= 1 and all(t in lost[0] for t in TASKS)
    assert "gradnorm/lost_grad_steps" in cb.metrics(cb.balancer)


# ---------------------------------------------------------------------- DDP (2 processes, gloo)
@pytest.mark.slow
@pytest.mark.parametrize("k", [1, 2])
def test_plain_ddp_masked_mean_equals_index_form(tmp_path: Path, k: int) -> None:
    for form in ("masked", "index"):
        mp.spawn(ddp_worker, args=(2, f"file://{tmp_path}/init_{form}", str(tmp_path), form, MICRO, k), nprocs=2,
                 join=True)
    runs = {(f, r): torch.load(tmp_path / f"{f}_rank{r}.pt") for f in ("masked", "index") for r in (0, 1)}
    assert torch.equal(runs[("masked", 0)]["weights"], runs[("masked", 1)]["weights"])
    assert _max_diff(runs[("masked", 0)], runs[("index", 0)]) <= TOL
    _assert_moved(runs[("masked", 0)])


@pytest.mark.slow
def test_lightning_ddp_masked_mean_equals_index_form(tmp_path: Path) -> None:
    from helpers.dist_models import GlooSpawnDDP

    runs = {}
    for form in ("masked", "index"):
        out = tmp_path / form
        out.mkdir()
        cb = GradNormCallback(alpha=1.5, lr=0.02)
        L.Trainer(
            max_epochs=1, accumulate_grad_batches=2, callbacks=[cb, WeightLog(str(out))], logger=False,
            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
            num_sanity_val_steps=0, use_distributed_sampler=False, strategy=GlooSpawnDDP(), devices=2,
            accelerator="cpu",
        ).fit(PartialModule(MICRO, form))
        runs[form] = [torch.load(out / f"rank{r}.pt") for r in (0, 1)]
    assert torch.equal(runs["masked"][0]["weights"], runs["masked"][1]["weights"])
    assert _max_diff(runs["masked"][0], runs["index"][0]) <= TOL
    _assert_moved(runs["masked"][0])
