"""Issue 6: bad values, partial labels and interruptions never corrupt a run.

Real Lightning runs (CPU, float64) of a tiny 3-task model with faults injected at seeded
random steps: NaN and Inf losses, tasks missing from the dict, a crash mid-epoch followed by
a resume from the last checkpoint. The expected weight trajectory is computed independently
by a textbook create_graph GradNorm (tests/helpers/fault_models.py) on the same data with the
same absent pattern.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

sys.path.insert(0, str(Path(__file__).resolve().parent))
from helpers.fault_models import (
    TASKS,
    FaultModule,
    WeightRecorder,
    make_trainer,
    present_mask,
    random_faults,
    textbook_run,
)

from gradnorm_lightning import GradNormCallback

STEPS = 14
ALPHA = 1.2
LR = 0.05
T = len(TASKS)


def _fit(faults, steps=STEPS, model_kw=None, **cb_kwargs):
    model = FaultModule(faults, **(model_kw or {}))
    cb = GradNormCallback(alpha=ALPHA, lr=LR, **{"optimizer": "sgd", **cb_kwargs})
    rec = WeightRecorder()
    trainer = make_trainer(steps, [cb, rec])
    trainer.fit(model)
    return model, cb, rec, trainer


def _check_invariants(faults, rec, steps=STEPS):
    """Finite positive weights summing to T; absent tasks keep their weight exactly."""
    assert len(rec.weights) == steps
    prev = torch.ones(T, dtype=torch.float64)
    for step, w in enumerate(rec.weights):
        assert torch.isfinite(w).all(), (step, w)
        assert (w > 0).all(), (step, w)
        assert float(w.sum()) == pytest.approx(T, abs=1e-12), (step, w)
        for i, ok in enumerate(present_mask(faults.get(step, {}))):
            if not ok:
                assert torch.equal(w[i], prev[i]), (step, TASKS[i], w, prev)
        prev = w
    assert all(rec.params_finite)


@pytest.mark.parametrize(
    ("seed", "kinds", "all_absent_step", "views"),
    [
        (1, ("nan", "inf"), None, False),
        (2, ("drop",), None, False),
        (3, ("nan", "inf", "drop"), 5, False),
        (8, ("nan", "inf", "drop"), 9, True),
        (9, ("const_nan", "nan"), None, False),
    ],
    ids=["nan-inf", "dropped", "mixed+all-absent", "mixed+task_views", "constant-nan"],
)
def test_faulty_run_matches_textbook(seed, kinds, all_absent_step, views):
    faults = random_faults(seed, STEPS, kinds, rate=0.3, all_absent_step=all_absent_step)
    # the first step has an absent task: its L(0) is taken at its first present step
    faults.setdefault(0, {})[TASKS[1]] = kinds[0]
    model, cb, rec, trainer = _fit(faults, model_kw=dict(views=views))
    assert trainer.global_step == STEPS
    _check_invariants(faults, rec)

    expected, net = textbook_run(faults, STEPS, alpha=ALPHA, lr=LR)
    got = torch.stack(rec.weights)
    torch.testing.assert_close(got, torch.stack(expected), rtol=0, atol=1e-10)
    for (name, p), q in zip(model.net.named_parameters(), net.parameters()):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=0, atol=1e-10, msg=name)
    # the weights did move: the test would not pass with a balancer that does nothing
    assert (got[-1] - 1).abs().max() > 1e-3

    gn = cb.balancer
    absent_counts = [sum(not present_mask(faults.get(s, {}))[i] for s in range(STEPS)) for i in range(T)]
    assert gn.skipped.tolist() == absent_counts
    n_all_absent = sum(not any(present_mask(faults.get(s, {}))) for s in range(STEPS))
    assert float(gn.skipped_updates) == n_all_absent
    assert float(gn.num_updates) == STEPS - n_all_absent
    assert gn.steps == STEPS
    # logged under gradnorm/skipped/<task> (log_every_n_steps=1: the last step's values)
    for i, t in enumerate(TASKS):
        assert float(trainer.callback_metrics[f"gradnorm/skipped/{t}"]) == absent_counts[i]
        assert float(trainer.callback_metrics[f"gradnorm/weight/{t}"]) == pytest.approx(float(got[-1, i]))


def test_all_absent_step_changes_no_state():
    faults = random_faults(4, 6, ("nan",), rate=0.0, all_absent_step=3)
    model = FaultModule(faults)
    cb = GradNormCallback(alpha=ALPHA, lr=LR, optimizer="adam")
    states = []

    class Snap(WeightRecorder):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            states.append(cb.balancer.state_dict())

    trainer = make_trainer(6, [cb, Snap()])
    trainer.fit(model)
    before, after = states[2], states[3]
    for key in ("weights", "initial_loss_sum", "initial_loss_count", "exp_avg", "exp_avg_sq", "adam_steps", "num_updates"):
        assert torch.equal(before[key], after[key]), key
    assert torch.equal(after["skipped"], before["skipped"] + 1)
    assert float(after["skipped_updates"]) == float(before["skipped_updates"]) + 1
    assert after["steps"] == before["steps"] + 1
    # and the run goes on updating afterwards
    assert not torch.equal(states[4]["weights"], after["weights"])


@pytest.mark.parametrize("sanitize", [True, False])
def test_nan_times_loss_loses_nothing(sanitize):
    """``loss * nan`` writes NaN (``0 * nan``) into every gradient below the loss. The task is cut
    off where its gradient leaves its private region, so the run equals the textbook run with the
    task left out, whether or not ``sanitize_grads`` runs: nothing is left to sanitise."""
    faults = random_faults(5, 8, ("nan_mul",), rate=0.3)
    faults.setdefault(2, {})["c"] = "nan_mul"
    model, cb, rec, trainer = _fit(faults, steps=8, sanitize_grads=sanitize)
    assert trainer.global_step == 8
    _check_invariants(faults, rec, steps=8)
    expected, net = textbook_run(faults, 8, alpha=ALPHA, lr=LR)
    torch.testing.assert_close(torch.stack(rec.weights), torch.stack(expected), rtol=0, atol=1e-10)
    for (name, p), q in zip(model.net.named_parameters(), net.parameters()):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=0, atol=1e-10, msg=name)
    if sanitize:  # no step had non-finite gradients, so none is counted as a divergence
        assert float(cb._nonfinite_steps) == 0


@pytest.mark.parametrize(
    ("variant", "crash_where"),
    [
        ("fresh", "start"),
        ("fresh-undeclared-names", "start"),
        ("same-objects", "start"),
        ("fresh-accumulate-2", "after_backward"),
        ("same-objects", "after_forward"),
        ("same-objects", "after_backward"),
    ],
)
def test_resume_after_crash_equals_uninterrupted(tmp_path, variant, crash_where):
    steps, crash_at = 11, 6  # 4 batches per epoch: the crash is mid-epoch (epoch 1, batch 2)
    faults = random_faults(6, steps, ("nan", "inf", "drop"), rate=0.3)
    faults.pop(0, None)  # undeclared names are taken from the first dict: keep it complete
    kw = dict(alpha=ALPHA, lr=LR, optimizer="adam", lr_decay_rate=0.9, lr_decay_steps=2)
    declare = variant != "fresh-undeclared-names"

    ref_model = FaultModule(faults, declare=declare)
    tkw = dict(accumulate_grad_batches=2) if "accumulate" in variant else {}
    ref_cb = GradNormCallback(**kw)
    make_trainer(steps, [ref_cb], **tkw).fit(ref_model)

    ckpt = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=1, save_last=True, save_top_k=-1)
    crash_model = FaultModule(faults, crash_at=crash_at, declare=declare, crash_where=crash_where)
    crash_cb = GradNormCallback(**kw)
    trainer = make_trainer(steps, [crash_cb, ckpt], enable_checkpointing=True, **tkw)
    with pytest.raises(RuntimeError, match="injected crash"):
        trainer.fit(crash_model)
    assert trainer.global_step == crash_at
    last = tmp_path / "last.ckpt"
    assert last.exists()

    if variant == "same-objects":  # retry in-process with the crashed model and callback
        resumed_model, resumed_cb = crash_model, crash_cb
        resumed_model.crash_at = None
    else:  # different init: everything must come from the checkpoint
        resumed_model = FaultModule(faults, seed=123, declare=declare)
        resumed_cb = GradNormCallback(**kw)
    trainer2 = make_trainer(steps, [resumed_cb], **tkw)
    trainer2.fit(resumed_model, ckpt_path=str(last))
    assert trainer2.global_step == steps

    a, b = ref_cb.balancer.state_dict(), resumed_cb.balancer.state_dict()
    assert a["steps"] == b["steps"] == steps
    for key, value in a.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, b[key]), key
    for (name, p), q in zip(ref_model.named_parameters(), resumed_model.parameters()):
        assert torch.equal(p, q), name
    assert torch.isfinite(b["weights"]).all()
    assert float(b["weights"].sum()) == pytest.approx(T, abs=1e-12)


def test_first_step_absent_task_takes_l0_at_first_present_step():
    faults = {0: {"a": "drop"}, 1: {"a": "nan"}, 2: {"b": "inf"}}
    _model, cb, _rec, _trainer = _fit(faults, steps=4)
    from helpers.fault_models import make_data

    gn = cb.balancer
    l0 = gn.current_initial_losses
    # L(0) of "a" is its loss at step 2 (its first present step), on the model of step 2:
    # rebuild it independently by replaying the textbook model to step 2
    _, net2 = textbook_run(faults, 2, alpha=ALPHA, lr=LR)
    x, y = make_data(2)
    expected_a = float(net2.losses(x, y)["a"])
    _, net0 = textbook_run(faults, 0, alpha=ALPHA, lr=LR)
    x0, y0 = make_data(0)
    expected_b = float(net0.losses(x0, y0)["b"])
    assert float(l0[0]) == pytest.approx(expected_a, rel=1e-12)
    assert float(l0[1]) == pytest.approx(expected_b, rel=1e-12)
    assert gn.initial_loss_count.tolist() == [1.0, 1.0, 1.0]


class _InfGrad(torch.autograd.Function):
    """Identity forward, non-finite backward: a finite loss whose gradient norm is not finite."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g * float("inf")


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_non_finite_norm_skips_update_and_keeps_state(optimizer):
    """Plain balancer: a step whose gradient norm is not finite changes no state but counters."""
    from helpers.fault_models import Net, make_data

    from gradnorm_lightning import GradNorm

    net = Net()
    gn = GradNorm(net.shared, task_names=TASKS, alpha=ALPHA, lr=LR, optimizer=optimizer)
    states = [gn.state_dict()]
    bad_steps = (0, 3)  # the very first step too: L(0) must not be taken from a skipped step
    for step in range(6):
        x, y = make_data(step)
        losses = net.losses(x, y)
        if step in bad_steps:
            z = net.rep(x)
            out = _InfGrad.apply(net.heads["b"](z).squeeze(1))
            losses["b"] = torch.nn.functional.mse_loss(out, y[:, 1])
            assert torch.isfinite(losses["b"])
        net.zero_grad()
        gn.combine(losses).backward()
        gn.step()
        states.append(gn.state_dict())
        assert bool(gn.last_stats["applied"]) == (step not in bad_steps)
        if step not in bad_steps:
            with torch.no_grad():
                for p in net.parameters():
                    p -= 0.05 * p.grad
    for step in bad_steps:
        before, after = states[step], states[step + 1]
        for key in ("weights", "initial_loss_sum", "initial_loss_count", "exp_avg", "exp_avg_sq",
                    "adam_steps", "num_updates", "skipped"):
            assert torch.equal(before[key], after[key]), (step, key)
        assert float(after["skipped_updates"]) == float(before["skipped_updates"]) + 1
        assert after["steps"] == before["steps"] + 1
    # L(0) was measured at step 1, the first applied step
    x, y = make_data(1)
    assert float(states[1]["initial_loss_count"].sum()) == 0
    assert gn.initial_loss_count.tolist() == [1.0, 1.0, 1.0]
    assert torch.isfinite(gn.weights).all()
    assert float(gn.weights.sum()) == pytest.approx(3.0, abs=1e-12)
    assert float(gn.num_updates) == 4


def test_nan_leak_in_one_micro_batch_is_sanitized_under_accumulation():
    """Accumulation: task "a" is ``loss * nan`` in the first micro-batch of the window, present in
    the second. Its NaN reached the model's gradient all the same; sanitize_grads must remove it."""
    model = FaultModule({0: {"a": "nan_mul"}}, per_call=True)
    cb = GradNormCallback(alpha=ALPHA, lr=LR, optimizer="sgd")
    make_trainer(2, [cb], accumulate_grad_batches=2).fit(model)
    assert model.calls == 4
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
    assert torch.isfinite(cb.balancer.weights).all()


def test_zero_nonfinite_grads_cleans_a_sparse_embedding_gradient():
    """``nn.Embedding(sparse=True)``: the gradient is a sparse tensor with repeated rows; it is
    coalesced (rows summed, as the optimizer would) and its non-finite values zeroed, the rest kept."""
    from torch import nn

    from gradnorm_lightning import zero_nonfinite_grads_

    emb = nn.Embedding(5, 2, sparse=True)
    dense = nn.Linear(2, 1)
    idx = torch.tensor([1, 1, 2, 4])
    out = dense(emb(idx)).squeeze(1)
    (out * torch.tensor([1.0, 1.0, float("nan"), 1.0])).sum().backward()
    assert emb.weight.grad is not None and emb.weight.grad.is_sparse
    want = emb.weight.grad.to_dense()
    assert bool(want[2].isnan().all())  # the NaN reached row 2 only
    assert bool(zero_nonfinite_grads_([emb.weight, dense.weight]))
    got = emb.weight.grad
    assert got.is_sparse
    torch.testing.assert_close(got.to_dense(), want.nan_to_num(nan=0.0))
    assert not bool(zero_nonfinite_grads_(emb.parameters()))  # clean now: reported clean, unchanged
    torch.testing.assert_close(emb.weight.grad.to_dense(), want.nan_to_num(nan=0.0))
