"""Issue 9: the recorder's routes and norm rules, against an independent reference.

The reference for every norm here is ``torch.autograd.grad(L_i, params)`` over the shared
layer's parameters that require grad, written out in the test (float64). The differential
tests over generated model shapes are in ``tests/test_differential.py``.
"""

from __future__ import annotations

import gc
import logging
import weakref

import pytest
import torch
from torch import Tensor, nn

from gradnorm_lightning import GradNorm, Recorder, register_norm_rule
from gradnorm_lightning.capture import find_norm_rule
from gradnorm_lightning.capture.norms import _FOUND, _RULES

F64 = torch.float64


def reference_norms(losses: list[Tensor], layer: nn.Module) -> Tensor:
    params = [p for p in layer.parameters() if p.requires_grad]
    rows = []
    for loss in losses:
        grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        rows.append(torch.cat([(g if g is not None else torch.zeros_like(p)).flatten() for g, p in zip(grads, params)]))
    return torch.stack(rows).norm(dim=1)


def one_step(layer: nn.Module, forward, num_tasks: int = 3, views: bool = False, **gn_kwargs) -> tuple[GradNorm, Tensor]:
    """One combine/backward/step; returns the balancer and the reference norms of that step."""
    gn = GradNorm(layer, num_tasks=num_tasks, optimizer="sgd", **gn_kwargs)
    losses = forward(gn.task_views if views else None)
    ref = reference_norms(losses, layer)
    gn.combine(losses).backward()
    gn.step()
    return gn, ref


def linear_heads(shared: nn.Module, between, num_tasks: int = 3, d: int = 6):
    torch.manual_seed(0)
    inp = nn.Linear(4, d).double()
    heads = [nn.Linear(d, 2).double() for _ in range(num_tasks)]
    x = torch.randn(7, 4, dtype=F64)

    def forward(views_fn):
        z = between(shared(torch.tanh(inp(x))))
        zs = views_fn(z) if views_fn is not None else [z] * num_tasks
        return [h(v).pow(2).mean() * (i + 1) for i, (h, v) in enumerate(zip(heads, zs))]

    return forward


def check(gn: GradNorm, ref: Tensor, route: str) -> None:
    assert gn.last_stats["route"] == route
    torch.testing.assert_close(gn.last_stats["grad_norms"], ref, rtol=1e-12, atol=0)


# ------------------------------------------------------------------------------ exactness
@pytest.mark.parametrize("views", [False, True], ids=["heads", "views"])
@pytest.mark.parametrize(
    "between",
    [lambda z: z, torch.relu, torch.relu_, nn.ReLU(inplace=True), lambda z: torch.softmax(z, -1),
     lambda z: nn.functional.layer_norm(z, z.shape[-1:]), lambda z: z.mul_(2.0).relu_()],
    ids=["direct", "relu", "relu_", "ReLU(inplace)", "softmax", "layer_norm", "two-in-place"],
)
def test_linear_shared_layer_is_exact_after_any_operation(between, views: bool) -> None:
    """The issue's first case: an in-place activation used to yield post-activation norms."""
    shared = nn.Linear(6, 6).double()
    gn, ref = one_step(shared, linear_heads(shared, between), views=views)
    check(gn, ref, "views" if views else "heads")


@pytest.mark.parametrize("frozen", ["weight", "bias"])
def test_frozen_parameters_are_left_out_of_the_norm(frozen: str) -> None:
    shared = nn.Linear(6, 6).double()
    getattr(shared, frozen).requires_grad_(False)
    gn, ref = one_step(shared, linear_heads(shared, torch.relu))
    check(gn, ref, "heads")
    full = reference_norms(linear_heads(shared.requires_grad_(True), torch.relu)(None), shared)
    assert not torch.allclose(full, ref)  # the frozen parameter would have counted


@pytest.mark.parametrize("mode", ["auto", "autograd"])
def test_freezing_after_construction_is_exact_in_every_mode(mode: str) -> None:
    shared = nn.Linear(6, 6).double()
    gn = GradNorm(shared, num_tasks=3, optimizer="sgd", mode=mode)
    forward = linear_heads(shared, torch.relu)
    gn.combine(forward(None)).backward()
    gn.step()
    shared.weight.requires_grad_(False)  # frozen after the balancer was built
    losses = forward(None)
    ref = reference_norms(losses, shared)
    gn.combine(losses).backward()
    gn.step()
    torch.testing.assert_close(gn.last_stats["grad_norms"], ref, rtol=1e-12, atol=0)


def test_a_fully_frozen_layer_is_a_clear_error() -> None:
    shared = nn.Linear(6, 6).double()
    gn = GradNorm(shared, num_tasks=3)
    shared.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters in this step"):
        gn.combine(linear_heads(shared, torch.relu)(None))


@pytest.mark.parametrize(
    ("make", "read"),
    [
        (lambda: nn.GRU(5, 6, batch_first=True), lambda o, i: o[0][:, -1] if i else o[1][0]),
        (lambda: nn.LSTM(5, 6, batch_first=True), lambda o, i: o[0].mean(1) if i else o[1][1][0]),
        (lambda: nn.MultiheadAttention(5, 1, batch_first=True), lambda o, i: o[0].flatten(1) if i else o[1].flatten(1)),
    ],
    ids=["GRU", "LSTM", "MultiheadAttention"],
)
def test_tuple_output_layers(make, read) -> None:
    """The issue's third case: refused before with a false 'was not called'."""
    torch.manual_seed(0)
    layer = make().double()
    x = torch.randn(4, 3, 5, dtype=F64)
    heads = [nn.LazyLinear(2).double() for _ in range(2)]

    def forward(_views):
        out = layer(x, x, x) if isinstance(layer, nn.MultiheadAttention) else layer(x)
        return [h(read(out, i)).pow(2).mean() for i, h in enumerate(heads)]

    forward(None)  # materialise the lazy heads
    gn, ref = one_step(layer, forward, num_tasks=2)
    check(gn, ref, "heads")


def test_conv_shared_layer_with_conv_heads_needs_no_extra_pass() -> None:
    """The issue's fourth case: the heads' capture works for a Conv2d (rule: convolution backward)."""
    torch.manual_seed(0)
    shared = nn.Conv2d(3, 4, 3, padding=1).double()
    heads = [nn.Conv2d(4, 2, 3, padding=1).double() for _ in range(3)]
    x = torch.randn(2, 3, 6, 6, dtype=F64)
    calls = []

    def forward(_views):
        z = torch.relu(shared(x))
        return [h(z).pow(2).mean() * (i + 1) for i, h in enumerate(heads)]

    gn = GradNorm(shared, num_tasks=3)
    losses = forward(None)
    ref = reference_norms(losses, shared)
    grad = torch.autograd.grad
    try:
        torch.autograd.grad = lambda *a, **k: calls.append(1) or grad(*a, **k)  # type: ignore[assignment]
        gn.combine(losses).backward()
    finally:
        torch.autograd.grad = grad  # type: ignore[assignment]
    gn.step()
    check(gn, ref, "heads")
    assert calls == []  # no autograd.grad at all: the elementwise ReLU is crossed by one product
    assert find_norm_rule(shared) is not None


def test_layer_reuse_takes_the_generic_rule_and_is_exact() -> None:
    torch.manual_seed(0)
    shared = nn.Linear(5, 5).double()
    heads = [nn.Linear(5, 1).double() for _ in range(3)]
    x = torch.randn(6, 5, dtype=F64)

    def forward(_views):
        z1 = shared(x)
        z2 = shared(torch.tanh(z1))
        return [heads[0](z1).pow(2).mean(), heads[1](z2).pow(2).mean(), heads[2](z1 + z2).pow(2).mean()]

    gn, ref = one_step(shared, forward)
    check(gn, ref, "heads")


@pytest.mark.parametrize("views", [False, True], ids=["heads", "views"])
@pytest.mark.parametrize("make", [lambda: nn.Linear(5, 5), lambda: nn.Conv1d(5, 5, 1)], ids=["Linear", "Conv1d"])
def test_a_weight_tied_below_the_call_takes_the_generic_rule_and_is_exact(make, views: bool, caplog) -> None:
    """The layer's input is computed with its own weight (a tied encoder, ``h + tanh(f(h, W))``):
    every task's gradient of ``W`` also flows through that input, which a rule reading the call
    alone (ghost norm, convolution backward) misses. Found by tests/test_differential.py (``tie_input``)."""
    torch.manual_seed(0)
    shared = make().double()
    heads = [nn.Linear(5 * 3, 1).double() for _ in range(3)]
    x = torch.randn(6, 3, 5, dtype=F64)  # 6 samples, 3 positions, 5 features (channels first for the Conv1d)

    def apply(h: Tensor, w: Tensor) -> Tensor:
        if isinstance(shared, nn.Conv1d):
            return nn.functional.conv1d(h.transpose(1, 2), w).transpose(1, 2)
        return nn.functional.linear(h, w)

    def call(h: Tensor) -> Tensor:
        return shared(h.transpose(1, 2)).transpose(1, 2) if isinstance(shared, nn.Conv1d) else shared(h)

    def forward(views_fn):
        h = torch.tanh(x)
        z = torch.tanh(call(h + torch.tanh(apply(h, shared.weight))))
        zs = views_fn(z) if views_fn is not None else [z] * 3
        return [hd(v.flatten(1)).pow(2).mean() * (i + 1) for i, (hd, v) in enumerate(zip(heads, zs))]

    with caplog.at_level(logging.INFO, logger="gradnorm_lightning"):
        gn, ref = one_step(shared, forward, views=views)
    check(gn, ref, "views" if views else "heads")
    assert "tied weight below the call" in caplog.text and "generic rule" in caplog.text


def test_losses_unbound_from_one_tensor_enter_at_their_loss() -> None:
    """No private head node at all: every task's gradient enters the shared part at its loss."""
    torch.manual_seed(0)
    shared = nn.Linear(4, 6).double()
    head = nn.Linear(6, 3).double()
    x, y = torch.randn(8, 4, dtype=F64), torch.randn(8, 3, dtype=F64)

    def forward(_views):
        return list(((head(torch.relu(shared(x))) - y) ** 2).mean(0).unbind())

    gn, ref = one_step(shared, forward)
    check(gn, ref, "heads")


def test_walk_budget_exceeded_falls_back_to_a_batched_pass_from_the_losses(caplog) -> None:
    shared = nn.Linear(6, 6).double()
    forward = linear_heads(shared, torch.relu)
    recorder = Recorder(shared, walk_budget=2)
    with caplog.at_level(logging.INFO, logger="gradnorm_lightning"):
        gn, ref = one_step(shared, forward, recorder=recorder)
    check(gn, ref, "losses")
    assert "fallback" in caplog.text and "more than 2 nodes" in caplog.text


def test_the_route_is_logged_once_with_its_reason(caplog) -> None:
    shared = nn.Linear(6, 6).double()
    forward = linear_heads(shared, torch.relu_)
    gn = GradNorm(shared, num_tasks=3)
    with caplog.at_level(logging.INFO, logger="gradnorm_lightning"):
        for _ in range(3):
            gn.combine(forward(None)).backward()
            gn.step()
    lines = [r.getMessage() for r in caplog.records if r.name == "gradnorm_lightning"]
    assert len(lines) == 1
    assert "heads' backward nodes, no extra pass" in lines[0] and "Linear ghost norm" in lines[0]
    assert "written in place" in lines[0] and "version counter" in lines[0]


# ------------------------------------------------------------------------------ float32 overflow
def test_float32_norms_do_not_overflow_for_finite_gradients() -> None:
    """A squared norm overflows above ~1.8e19 in float32: the norms are scaled before squaring."""
    torch.manual_seed(0)
    for mode, views in [("auto", False), ("auto", True), ("autograd", False), ("representation", False)]:
        shared = nn.Linear(6, 6)
        heads = [nn.Linear(6, 2) for _ in range(2)]
        x = torch.randn(5, 6)
        gn = GradNorm(shared, num_tasks=2, mode=mode)
        z = torch.relu(shared(x))
        zs = gn.task_views(z) if views else [z, z]
        losses = [h(v).pow(2).mean() * s for h, v, s in zip(heads, zs, (1e24, 1e26))]
        gn.combine(losses).backward()
        gn.step()
        norms = gn.last_stats["grad_norms"]
        assert torch.isfinite(norms).all() and (norms > 1e20).all(), (mode, views, norms)
        assert bool(gn.last_stats["applied"]), (mode, views)


@pytest.mark.parametrize("host", [True, False], ids=["cpu-checked", "device-scaled"])
@pytest.mark.parametrize("shape", [(3, 40, 5, 4), (3, 4, 30, 20)], ids=["ghost", "direct"])
@pytest.mark.parametrize("bias", [True, False])
def test_factored_norms_match_float64_at_extreme_scales(
    shape: tuple[int, int, int, int], bias: bool, host: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The Linear rule's norms (both formulas) against float64 dense norms, tasks ranging from
    subnormal-adjacent to near the float32 maximum: on the CPU (plain formula, checked on the
    host, scaled where needed) and as on a device (scaled, no host read)."""
    from gradnorm_lightning import _arrays
    from gradnorm_lightning.capture.stats import Factored, safe_norms

    if not host:
        monkeypatch.setattr(_arrays, "host_reads_free", lambda device: False)

    num_tasks, n, d_in, d_out = shape
    gen = torch.Generator().manual_seed(1)
    for row_scale in (1e-20, 1.0, 1e15):
        rows = torch.randn(n, d_in, generator=gen) * row_scale
        task_scales = torch.tensor([1e-25, 1.0, 1e18])[:num_tasks]
        grads = torch.randn(n, num_tasks, d_out, generator=gen).transpose(0, 1) * task_scales[:, None, None]
        got = Factored(rows, grads, weight=True, bias=bias).norms()
        g64, h64 = grads.double(), rows.double()
        dense = torch.einsum("tno,ni->toi", g64, h64).flatten(1)
        if bias:
            dense = torch.cat([dense, g64.sum(dim=1)], dim=1)
        want = torch.linalg.vector_norm(dense, dim=1)
        assert torch.isfinite(got).all(), (row_scale, got)
        # (atol: a norm below float32's smallest normal number cannot be represented exactly)
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=torch.finfo(torch.float32).tiny)
        dense_got = safe_norms(dense.float())
        torch.testing.assert_close(dense_got.double(), want, rtol=1e-5, atol=torch.finfo(torch.float32).tiny)


# ------------------------------------------------------------------------------ norm rules
def test_a_registered_rule_is_used_and_a_declining_rule_falls_back(caplog) -> None:
    class Scaled(nn.Linear):
        """A Linear subclass: the most derived registered rule wins."""

    used = []

    @register_norm_rule(Scaled, name="test rule")
    def rule(layer, call, grads, dtype):  # type: ignore[no-untyped-def]
        used.append(grads.shape)
        return None  # decline: the generic rule runs

    try:
        shared = Scaled(6, 6).double()
        with caplog.at_level(logging.INFO, logger="gradnorm_lightning"):
            gn, ref = one_step(shared, linear_heads(shared, torch.relu))
        check(gn, ref, "heads")
        assert used == [torch.Size([3, 7, 6])]
        assert "test rule" in caplog.text
    finally:
        del _RULES[Scaled]
        _FOUND.clear()


def test_linear_rule_ghost_and_direct_agree_with_dense() -> None:
    from gradnorm_lightning.capture.stats import Factored

    torch.manual_seed(0)
    for n, d_in, d_out in [(3, 50, 40), (200, 4, 3)]:  # ghost is cheaper, then direct
        rows, grads = torch.randn(n, d_in, dtype=F64), torch.randn(5, n, d_out, dtype=F64)
        for weight, bias in [(True, True), (True, False), (False, True)]:
            f = Factored(rows, grads, weight, bias)
            torch.testing.assert_close(f.norms(), f.dense().norm(dim=1), rtol=1e-12, atol=0)


# ------------------------------------------------------------------------------ lifecycle
@pytest.mark.parametrize("between", [torch.relu, lambda z: torch.softmax(z, -1)], ids=["elementwise", "region"])
@pytest.mark.parametrize("views", [False, True])
def test_no_graph_stays_alive_after_a_step(between, views: bool) -> None:
    shared = nn.Linear(6, 6).double()
    forward = linear_heads(shared, between)
    gn = GradNorm(shared, num_tasks=3)
    refs = []
    for _ in range(3):
        losses = forward(gn.task_views if views else None)
        refs.append(weakref.ref(losses[0]))
        gn.combine(losses).backward()
        gn.step()
        del losses
    gc.collect()
    assert all(r() is None for r in refs)


def test_a_backward_that_skips_the_shared_layer_is_a_clear_error() -> None:
    torch.manual_seed(0)
    shared, heads = nn.Linear(4, 4).double(), [nn.Linear(4, 1).double() for _ in range(3)]
    gn = GradNorm(shared, num_tasks=3)
    z = torch.relu(shared(torch.randn(5, 4, dtype=F64)))
    loss = gn.combine([h(z).pow(2).mean() for h in heads])
    loss.backward(inputs=list(heads[0].parameters()))  # the heads' parameters only
    with pytest.raises(ValueError, match="did not reach the shared layer"):
        gn.step()


def _random_conv(seed: int) -> tuple[nn.Module, tuple[int, ...], bool]:
    """A seeded convolution with random dimensions, stride, padding, dilation, groups and bias;
    returns it, its input shape, and whether the conv rule should apply (numeric zero padding)."""
    import random

    rng = random.Random(seed)
    dims, groups = rng.choice([1, 2, 3]), rng.choice([1, 1, 2, 3])
    c_in, c_out = groups * rng.randint(1, 3), groups * rng.randint(1, 3)
    kernel, stride, dilation = rng.randint(1, 3), rng.randint(1, 2), rng.randint(1, 2)
    padding: int | str = rng.choice([0, 1, 2, 1, "same"])
    padding_mode = rng.choice(["zeros"] * 4 + ["reflect"])
    if padding == "same":
        stride = 1
    reach = dilation * (kernel - 1) + 1
    pad = padding if isinstance(padding, int) else reach // 2
    low = max(reach - 2 * pad, pad + 1, 1)
    size = tuple(rng.randint(low, low + 3) for _ in range(dims))
    conv_cls = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[dims - 1]
    conv = conv_cls(c_in, c_out, kernel, stride=stride, padding=padding, dilation=dilation, groups=groups,
                    bias=rng.random() < 0.7, padding_mode=padding_mode).double()
    if conv.bias is not None and rng.random() < 0.2:
        conv.bias.requires_grad_(False)
    batch = rng.choice([None, 1, 3])  # None: an unbatched input
    shape = (c_in, *size) if batch is None else (batch, c_in, *size)
    return conv, shape, isinstance(padding, int) and padding_mode == "zeros"


@pytest.mark.parametrize("seed", range(40))
@pytest.mark.parametrize("views", [False, True], ids=["heads", "views"])
@pytest.mark.parametrize("per_task", [False, True], ids=["vmap", "per-task-calls"])
def test_conv_rule_is_exact_over_generated_convolutions(
    seed: int, views: bool, per_task: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Generated convolutions (1-3 spatial dims, stride, padding, dilation, groups, bias frozen
    or not, unbatched input, string padding and reflect padding, which the rule declines) give
    the per-task norms of ``autograd.grad``; where the rule applies, with no autograd call.
    Both ways the rule calls ``convolution_backward`` (batched by vmap, or once per task for
    large products) are forced in turn, and the one forced is checked to have run."""
    from gradnorm_lightning.capture import norms

    monkeypatch.setattr(norms, "_LOOP_MACS", 0 if per_task else 10**18)
    vmaps: list[int] = []
    vmap = torch.func.vmap
    monkeypatch.setattr(torch.func, "vmap", lambda *a, **k: vmaps.append(1) or vmap(*a, **k))
    conv, shape, rule_applies = _random_conv(seed)
    torch.manual_seed(seed)
    x = torch.randn(*shape, dtype=F64)
    with torch.no_grad():
        features = conv(x).numel()
    num_tasks = 2 + seed % 3
    heads = [nn.Linear(features, 2).double() for _ in range(num_tasks)]

    def forward(views_fn):
        z = torch.tanh(conv(x))
        zs = views_fn(z) if views_fn is not None else [z] * num_tasks
        return [h(v.reshape(-1)).pow(2).sum() * (i + 1) for i, (h, v) in enumerate(zip(heads, zs))]

    gn = GradNorm(conv, num_tasks=num_tasks, optimizer="sgd")
    losses = forward(gn.task_views if views else None)
    ref = reference_norms(losses, conv)
    calls: list[int] = []
    grad = torch.autograd.grad
    try:
        torch.autograd.grad = lambda *a, **k: calls.append(1) or grad(*a, **k)  # type: ignore[assignment]
        gn.combine(losses).backward()
    finally:
        torch.autograd.grad = grad  # type: ignore[assignment]
    gn.step()
    check(gn, ref, "views" if views else "heads")
    assert (calls == []) == rule_applies
    assert bool(vmaps) == (rule_applies and not per_task)


def test_per_task_vjps_only_for_large_gradients_on_the_cpu() -> None:
    """The per-task calls were measured on the CPU only: on a device the batched call stays."""
    from gradnorm_lightning.capture import norms

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert not norms.per_task_vjps(norms.LOOP_NUMEL - 1, cpu)
    assert norms.per_task_vjps(norms.LOOP_NUMEL, cpu)
    assert not norms.per_task_vjps(10**9, cuda)
