"""The plain-PyTorch balancer against the textbook reference (float64)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from gradnorm_lightning import GradNorm
from tests.textbook import (
    TextbookGradNorm,
    make_batches,
    make_multitask,
    task_losses,
    textbook_trajectory,
)

STEPS = 30


def run_balancer(
    alpha: float,
    lr: float,
    steps: int = STEPS,
    num_tasks: int = 3,
    bias: bool = True,
    views: bool = False,
    losses_as: str = "list",
    model_lr: float = 0.05,
    **kw: object,
) -> torch.Tensor:
    trunk, heads = make_multitask(0, num_tasks, bias)
    kw.setdefault("optimizer", "sgd")
    gn = GradNorm(shared_layer=trunk[2], num_tasks=num_tasks, alpha=alpha, lr=lr, **kw)  # type: ignore[arg-type]
    opt = torch.optim.SGD([*trunk.parameters(), *heads.parameters()], lr=model_lr)
    out = []
    for x, y in make_batches(num_tasks, steps):
        z = trunk(x)
        losses = task_losses(heads, gn.task_views(z) if views else z, y)
        arg: object = losses
        if losses_as == "tensor":
            arg = torch.stack(losses)
        elif losses_as == "dict":
            arg = {f"task{i}": loss for i, loss in enumerate(losses)}
        opt.zero_grad()
        loss = gn.combine(arg)  # type: ignore[arg-type]
        loss.backward()
        gn.step()
        opt.step()
        out.append(gn.weights.clone())
    return torch.stack(out)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("alpha", [0.0, 0.12, 1.5])
@pytest.mark.parametrize(
    ("views", "losses_as", "mode"),
    [
        (False, "list", "auto"),
        (False, "tensor", "auto"),
        (False, "dict", "auto"),
        (True, "list", "auto"),
        (False, "list", "autograd"),
    ],
    ids=["default-list", "default-tensor", "default-dict", "task-views", "autograd"],
)
def test_trajectory_matches_textbook(alpha: float, bias: bool, views: bool, losses_as: str, mode: str) -> None:
    expected = textbook_trajectory(alpha, 0.025, STEPS, bias=bias)
    got = run_balancer(alpha, 0.025, bias=bias, views=views, losses_as=losses_as, mode=mode)
    assert got.dtype == torch.float64
    # the weights really move: the test is not comparing constants
    assert (expected[-1] - 1).abs().max() > 1e-2
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-10)


def test_trajectory_adam_with_exponential_decay_matches_torch_optim() -> None:
    decay = lambda k: 0.75 ** (k / 5)  # noqa: E731
    expected = textbook_trajectory(1.5, 0.05, STEPS, optimizer="adam", lr_lambda=decay)
    got = run_balancer(1.5, 0.05, optimizer="adam", lr_decay_rate=0.75, lr_decay_steps=5)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-10)


def test_staircase_decay_lr_values() -> None:
    trunk, _ = make_multitask(0)
    gn = GradNorm(trunk[2], num_tasks=2, lr=0.1, lr_decay_rate=0.5, lr_decay_steps=4, lr_staircase=True, optimizer="sgd")
    for updates, expected in [(0, 0.1), (3, 0.1), (4, 0.05), (9, 0.025)]:
        gn.num_updates.fill_(updates)
        assert math.isclose(float(gn.current_lr()), expected, rel_tol=1e-12)


def test_fixed_initial_losses_match_textbook() -> None:
    l0 = torch.tensor([0.7, 2.0, 30.0], dtype=torch.float64)
    expected = textbook_trajectory(1.5, 0.025, STEPS, initial_losses=l0)
    got = run_balancer(1.5, 0.025, initial_losses=l0.tolist())
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-10)
    by_name = run_balancer(1.5, 0.025, initial_losses={"task0": 0.7, "task1": 2.0, "task2": 30.0})
    torch.testing.assert_close(by_name, expected, rtol=0, atol=1e-10)


def test_initial_losses_mean_of_first_k_steps() -> None:
    trunk, heads = make_multitask(0)
    gn = GradNorm(trunk[2], num_tasks=3, alpha=1.0, lr=0.01, initial_loss_steps=3, optimizer="sgd")
    seen = []
    for x, y in make_batches(3, 5):
        losses = task_losses(heads, trunk(x), y)
        seen.append(torch.stack([loss.detach() for loss in losses]))
        gn.combine(losses).backward()
        gn.step()
    torch.testing.assert_close(gn.current_initial_losses, torch.stack(seen[:3]).mean(0), rtol=0, atol=1e-12)


def test_model_gradients_are_exactly_the_weighted_sum() -> None:
    """Nothing of the GradNorm loss reaches the model's gradients."""
    trunk, heads = make_multitask(0)
    gn = GradNorm(trunk[2], num_tasks=3, alpha=1.5, lr=0.5, optimizer="sgd")
    trunk_ref, heads_ref = copy.deepcopy(trunk), copy.deepcopy(heads)
    for x, y in make_batches(3, 6):
        w = gn.weights.clone()
        for module in (trunk, heads, trunk_ref, heads_ref):
            module.zero_grad()
        gn.combine(task_losses(heads, trunk(x), y)).backward()
        gn.step()
        (w * torch.stack(task_losses(heads_ref, trunk_ref(x), y))).sum().backward()
        for p, q in zip([*trunk.parameters(), *heads.parameters()], [*trunk_ref.parameters(), *heads_ref.parameters()]):
            assert p.grad is not None and q.grad is not None
            torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=1e-14)
        # the weights moved, so the check above was not about a trivial step
    assert not torch.allclose(gn.weights, torch.ones(3, dtype=torch.float64))


def test_alpha_zero_equalises_weighted_norms() -> None:
    """alpha = 0: the weights converge to w_i proportional to 1 / n_i (fixed data, frozen model)."""
    trunk, heads = make_multitask(0)
    gn = GradNorm(trunk[2], num_tasks=3, alpha=0.0, lr=0.01, optimizer="sgd")
    x, y = make_batches(3, 1)[0]
    spreads = []
    for _ in range(300):
        gn.combine(task_losses(heads, trunk(x), y)).backward()
        gn.step()
        G = gn.last_stats["grad_norms"] * gn.last_stats["weights"]
        spreads.append(float((G.max() - G.min()) / G.mean()))
        assert gn.weights.min() > 0
        torch.testing.assert_close(gn.weights.sum(), torch.tensor(3.0, dtype=torch.float64))
    assert spreads[0] > 0.5
    assert spreads[-1] < 0.02


def test_representation_mode_uses_norms_at_the_representation() -> None:
    trunk, heads = make_multitask(0)
    gn = GradNorm(trunk[2], num_tasks=3, alpha=1.5, lr=0.025, mode="representation", optimizer="sgd")
    x, y = make_batches(3, 1)[0]
    z = trunk(x)
    losses = task_losses(heads, z, y)
    with torch.no_grad():  # the shared layer's output, recomputed (not seen by the balancer)
        pre = trunk[2](trunk[1](trunk[0](x)))
    expected = torch.stack([
        torch.autograd.grad(loss, z, retain_graph=True)[0].mul(pre.gt(0)).norm() for loss in losses
    ])
    gn.combine(losses).backward()
    gn.step()
    torch.testing.assert_close(gn.last_stats["grad_norms"], expected, rtol=0, atol=1e-12)


def test_non_linear_shared_layer_uses_batched_vjp() -> None:
    """A Conv1d shared layer: norms over its parameters equal the textbook ones."""
    torch.manual_seed(0)
    conv = nn.Conv1d(2, 3, kernel_size=3).double()
    heads = nn.ModuleList([nn.Linear(3 * 6, 1).double() for _ in range(3)])
    x = torch.randn(4, 2, 8, dtype=torch.float64)
    y = torch.randn(4, 3, dtype=torch.float64)
    gn = GradNorm(conv, num_tasks=3, alpha=1.0, lr=0.1, optimizer="sgd")
    ref = TextbookGradNorm(list(conv.parameters()), 3, 1.0, 0.1)
    z = torch.relu(conv(x)).flatten(1)
    losses = [nn.functional.mse_loss(h(z).squeeze(1), y[:, i]) for i, h in enumerate(heads)]
    norms = ref.update(losses)
    gn.combine(losses).backward()
    gn.step()
    torch.testing.assert_close(gn.last_stats["grad_norms"], norms, rtol=0, atol=1e-12)
    torch.testing.assert_close(gn.weights, ref.w.detach(), rtol=0, atol=1e-12)


def test_layer_called_twice_falls_back_to_exact_autograd() -> None:
    trunk, heads = make_multitask(0)
    gn = GradNorm(trunk[2], num_tasks=3, alpha=1.5, lr=0.025, optimizer="sgd")
    ref = TextbookGradNorm(list(trunk[2].parameters()), 3, 1.5, 0.025)
    x, y = make_batches(3, 1)[0]
    h = trunk[1](trunk[0](x))
    z = torch.relu(trunk[2](h)) + torch.relu(trunk[2](h * 0.5))  # weight sharing within one forward
    losses = task_losses(heads, z, y)
    norms = ref.update(losses)
    gn.combine(losses).backward()
    gn.step()
    torch.testing.assert_close(gn.last_stats["grad_norms"], norms, rtol=0, atol=1e-12)


def test_state_dict_round_trip_continues_trajectory_exactly() -> None:
    full = run_balancer(1.5, 0.05, steps=20, optimizer="adam")
    trunk, heads = make_multitask(0)
    opt = torch.optim.SGD([*trunk.parameters(), *heads.parameters()], lr=0.05)
    gn = GradNorm(trunk[2], num_tasks=3, alpha=1.5, lr=0.05, optimizer="adam")
    got = []
    for step, (x, y) in enumerate(make_batches(3, 20)):
        if step == 8:  # "restart": a new balancer restored from the state dict
            state = copy.deepcopy(gn.state_dict())
            gn.remove_hooks()
            gn = GradNorm(trunk[2], num_tasks=3, alpha=1.5, lr=0.05, optimizer="adam")
            gn.load_state_dict(state)
        opt.zero_grad()
        gn.combine(task_losses(heads, trunk(x), y)).backward()
        gn.step()
        opt.step()
        got.append(gn.weights.clone())
    assert torch.equal(torch.stack(got), full)


def test_float32_model_keeps_float32_weights_close_to_float64() -> None:
    expected = textbook_trajectory(1.5, 0.025, STEPS)
    trunk, heads = make_multitask(0, dtype=torch.float32)
    gn = GradNorm(trunk[2], num_tasks=3, alpha=1.5, lr=0.025, optimizer="sgd")
    opt = torch.optim.SGD([*trunk.parameters(), *heads.parameters()], lr=0.05)
    out = []
    for x, y in make_batches(3, STEPS, dtype=torch.float32):
        opt.zero_grad()
        gn.combine(task_losses(heads, trunk(x), y)).backward()
        gn.step()
        opt.step()
        out.append(gn.weights.clone())
    assert gn.weights.dtype == torch.float32
    torch.testing.assert_close(torch.stack(out).double(), expected, rtol=0, atol=1e-4)


def test_step_without_backward_does_nothing() -> None:
    trunk, _ = make_multitask(0)
    gn = GradNorm(trunk[2], num_tasks=3, optimizer="sgd")
    gn.step()
    assert gn.steps == 0
    assert torch.equal(gn.weights, torch.ones(3, dtype=torch.float64))


def test_eval_combine_records_nothing() -> None:
    trunk, heads = make_multitask(0)
    gn = GradNorm(trunk[2], num_tasks=3, optimizer="sgd")
    x, y = make_batches(3, 1)[0]
    with torch.no_grad():
        loss = gn.combine(task_losses(heads, trunk(x), y))
    assert loss.ndim == 0
    gn.step()
    assert gn.steps == 0


def test_representation_mode_is_the_same_with_and_without_views() -> None:
    """Both read the per-task gradients at the shared layer's output."""
    plain = run_balancer(1.5, 0.025, mode="representation")
    views = run_balancer(1.5, 0.025, mode="representation", views=True)
    torch.testing.assert_close(views, plain, rtol=0, atol=1e-12)


def test_forwards_that_never_reach_combine_do_not_pile_up() -> None:
    trunk, heads = make_multitask(0)
    gn = GradNorm(trunk[2], num_tasks=3, optimizer="sgd")
    x, y = make_batches(3, 1)[0]
    for _ in range(100):
        trunk(x)  # e.g. an auxiliary forward with grad enabled whose output is dropped
    assert 0 < gn.recorder.pending_calls <= 64
    gn.reset_pending()
    gn.combine(task_losses(heads, trunk(x), y)).backward()
    gn.step()
    assert gn.steps == 1


def test_removed_hooks_record_nothing_and_reattach() -> None:
    trunk, heads = make_multitask(0)
    gn = GradNorm(trunk[2], num_tasks=3, optimizer="sgd")
    gn.remove_hooks()
    x, y = make_batches(3, 1)[0]
    trunk(x)
    assert gn.recorder.pending_calls == 0
    gn.attach_hooks()
    gn.combine(task_losses(heads, trunk(x), y)).backward()
    gn.step()
    assert gn.steps == 1


def test_default_path_captures_from_the_heads_when_the_graph_allows() -> None:
    """Plain multi-head model: per-task gradients come from the heads' own backward nodes."""
    trunk, heads = make_multitask(0)
    gn = GradNorm(trunk[2], num_tasks=3, optimizer="sgd")
    x, y = make_batches(3, 1)[0]
    gn.combine(task_losses(heads, trunk(x), y)).backward()
    gn.step()
    assert gn.last_stats["route"] == "heads"


def test_default_path_is_exact_when_a_head_reads_the_representation_twice() -> None:
    trunk, heads = make_multitask(0)
    gn = GradNorm(trunk[2], num_tasks=3, alpha=1.5, lr=0.025, optimizer="sgd")
    ref = TextbookGradNorm(list(trunk[2].parameters()), 3, 1.5, 0.025)
    x, y = make_batches(3, 1)[0]
    z = trunk(x)
    losses = task_losses(heads, z, y)
    losses[0] = losses[0] + z.pow(2).mean()  # task 0 reaches z through two edges
    norms = ref.update(losses)
    gn.combine(losses).backward()
    gn.step()
    assert gn.last_stats["route"] == "heads"  # both edges of task 0 are read during the backward
    torch.testing.assert_close(gn.last_stats["grad_norms"], norms, rtol=0, atol=1e-12)
    torch.testing.assert_close(gn.weights, ref.w.detach(), rtol=0, atol=1e-12)


@pytest.mark.parametrize(("views", "mode"), [(False, "auto"), (True, "auto"), (False, "autograd"), (False, "representation")])
def test_a_step_leaves_no_graph_alive(views: bool, mode: str) -> None:
    """Hooks on the step's graph must not keep it alive (a cycle through C++ never collected)."""
    import gc
    import weakref

    trunk, heads = make_multitask(0)
    gn = GradNorm(trunk[2], num_tasks=3, mode=mode, optimizer="sgd")
    refs = []
    for x, y in make_batches(3, 3):
        z = trunk(x)
        refs.append(weakref.ref(z))
        losses = task_losses(heads, gn.task_views(z) if views else z, y)
        refs.append(weakref.ref(losses[0]))
        gn.combine(losses).backward()
        gn.step()
        del z, losses
    gc.collect()
    assert all(r() is None for r in refs)


def test_a_first_loss_of_exactly_zero_sits_only_that_task_out_until_measured_again() -> None:
    """L_b(0) = 0 at the first step: task b sits out that update (its weight kept, the others
    updated) and its L(0) is measured at its next present step: the textbook with b absent at the
    first step (b's zero loss gives the model no gradient either)."""
    trunk, heads = make_multitask(0)
    trunk_ref, heads_ref = copy.deepcopy(trunk), copy.deepcopy(heads)
    gn = GradNorm(trunk[2], num_tasks=3, alpha=1.5, lr=0.025, optimizer="sgd")
    ref = TextbookGradNorm(list(trunk_ref[2].parameters()), 3, 1.5, 0.025)
    opt = torch.optim.SGD([*trunk.parameters(), *heads.parameters()], lr=0.05)
    opt_ref = torch.optim.SGD([*trunk_ref.parameters(), *heads_ref.parameters()], lr=0.05)
    second_b = None
    for step, (x, y) in enumerate(make_batches(3, 8)):
        losses = task_losses(heads, trunk(x), y)
        if step == 0:
            losses[1] = losses[1] * 0.0  # finite, with a graph: present, L(0) = 0
        elif step == 1:
            second_b = float(losses[1])
        opt.zero_grad()
        gn.combine(losses).backward()
        gn.step()
        opt.step()
        present = [True, step > 0, True]
        ref_losses = task_losses(heads_ref, trunk_ref(x), y)
        opt_ref.zero_grad()
        ref.model_loss(ref_losses, present).backward(retain_graph=True)
        ref.update(ref_losses, present)
        opt_ref.step()
        torch.testing.assert_close(gn.weights, ref.w.detach(), rtol=0, atol=1e-12)
        if step == 0:
            assert gn.weights[1] == 1.0 and (gn.weights - 1).abs().max() > 1e-3  # b kept, a and c moved
            assert bool(gn.last_stats["applied"])
    assert gn.zero_initial_loss_steps.tolist() == [0.0, 1.0, 0.0]
    assert gn.skipped.tolist() == [0.0, 0.0, 0.0]  # (b was present, not absent)
    assert float(gn.current_initial_losses[1]) == second_b
    (message,) = gn.health_warnings()
    assert "['task1']" in message and "initial_losses" in message


def test_a_first_loss_of_zero_under_a_k_step_l0_starts_the_average_again() -> None:
    """``initial_loss_steps=2``: a task whose first losses sum to 0 starts its average again."""
    layer = nn.Linear(3, 3).double()
    gn = GradNorm(layer, num_tasks=2, initial_loss_steps=2, optimizer="sgd")
    x = torch.randn(4, 3, dtype=torch.float64)
    seen = []
    for step in range(4):
        z = layer(x)
        b = z[:, 1].pow(2).mean() * (0.0 if step == 0 else 1.0)
        seen.append(float(b))
        gn.combine([z[:, 0].pow(2).mean(), b]).backward()
        gn.step()
    assert gn.zero_initial_loss_steps.tolist() == [0.0, 1.0]
    # b's L(0): the mean of its first two positive losses (steps 1 and 2), not of steps 0 and 1
    assert float(gn.current_initial_losses[1]) == pytest.approx((seen[1] + seen[2]) / 2, rel=1e-14)
