"""Tests of the model generator (tests/model_zoo.py) and of the differential tests' references.

The differential tests are only as good as their models and references: the samples must
cover the axes, every generated model must be meaningful (finite where present, moving
weights, non-zero norms), the model must really exhibit what its spec says (tuple outputs,
an in-place op on the layer's output, frozen parameters), and the references must agree with
the create_graph textbook (tests/textbook.py) and with a hand computation.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
from collections.abc import Iterable, Iterator
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from tests import model_zoo as zoo
from tests.model_zoo import FREEZE_STEP, STEPS, Spec, batches, build, index_twin
from tests.test_differential import (
    F64,
    MODEL_LR,
    MOVED,
    Run,
    mismatch,
    output_gradient_norms,
    reference_run,
)
from tests.textbook import TextbookGradNorm

CI = zoo.ci_specs()


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------- the samples
def test_ids_are_unique_and_readable() -> None:
    for specs in (CI, zoo.full_specs(), zoo.representation_specs()):
        ids = [s.id for s in specs]
        assert len(set(ids)) == len(ids)
    assert Spec("gru", "relu_inplace", "weight", "parts", 1, "nan", 3, seed=4).id == (
        "gru-relu_inplace-frz_weight-parts-x1-abs_nan-T3-s4"
    )
    # the later axes appear only where they differ from their default
    assert Spec("embedding", absent="masked", tie="head", checkpoint="heads", accumulate=2, seed=7).id == (
        "embedding-none-frz_none-direct-x1-abs_masked-T3-tie_head-ck_heads-acc2-s7"
    )


def test_samples_hold_valid_specs_only() -> None:
    for specs in (CI, zoo.full_specs(), zoo.representation_specs()):
        assert all(zoo.is_valid(s) for s in specs)
    assert zoo.invalid_reason(Spec("linear", read="parts")) is not None
    for bad in (Spec("embedding", frozen="weight"), Spec("sparse_embedding", frozen="bias"),
                Spec("embedding", read="residual"), Spec("embedding", reuse=2), Spec("sparse_embedding", tie="input")):
        assert zoo.invalid_reason(bad) is not None, bad.id
    assert zoo.is_valid(Spec("embedding", tie="before")) and zoo.is_valid(Spec("experts_list", tie="input"))
    with pytest.raises(ValueError, match="invalid spec"):
        build(Spec("conv1d", read="parts"))


def test_ci_sample_covers_every_feasible_pair_and_value() -> None:
    covered = set().union(*(zoo.axis_pairs(s) for s in CI))
    assert zoo.feasible_pairs() <= covered
    for name, values in zoo.AXES.items():
        assert {getattr(s, name) for s in CI} == set(values), name
    # both routes under test see every layer and every between-op
    views = [s for s in CI if s.views_valid]
    assert {s.layer for s in views} == set(zoo.LAYERS)
    assert {s.between for s in views} == set(zoo.BETWEEN)


def test_samples_are_deterministic() -> None:
    zoo.pairwise_specs.cache_clear()
    zoo.ci_specs.cache_clear()
    assert zoo.ci_specs() == CI


def test_full_sample_is_the_product_of_the_model_axes() -> None:
    full = zoo.full_specs()
    combos = {tuple(getattr(s, a) for a in zoo.PRODUCT_AXES) for s in full}
    assert len(combos) == len(full)
    every = {c for c in itertools.product(*(zoo.AXES[a] for a in zoo.PRODUCT_AXES))
             if zoo.is_valid(Spec(**dict(zip(zoo.PRODUCT_AXES, c))))}  # type: ignore[arg-type]
    assert combos == every
    for name in set(zoo.AXES) - set(zoo.PRODUCT_AXES):  # the others vary along it
        assert {getattr(s, name) for s in full} == set(zoo.AXES[name]), name


# ---------------------------------------------------------------------- the models
def _params(model: torch.nn.Module) -> list[Tensor]:
    return [p.detach() for p in model.parameters()]


@pytest.mark.parametrize("layer", zoo.LAYERS)
def test_build_is_deterministic_and_deepcopies_identically(layer: str) -> None:
    spec = Spec(layer)
    a, b = build(spec)[0], build(spec)[0]
    c = copy.deepcopy(a)
    for p, q, r in zip(_params(a), _params(b), _params(c)):
        assert p.dtype == F64
        assert torch.equal(p, q) and torch.equal(p, r)
    batch = batches(spec)[0]
    la, lb = a.task_losses(batch), b.task_losses(batch)
    assert all(torch.equal(x, y) for x, y in zip(la, lb) if x is not None and y is not None)


def _shared_outputs(spec: Spec) -> list[Any]:
    """Every call's output of the shared modules in one forward (of the model's first module:
    the first expert of ``experts_list``)."""
    model, _, forward = build(spec)
    first = zoo.shared_modules(spec.layer, model.shared)[0]
    seen: list[Any] = []
    handle = first.register_forward_hook(lambda m, i, o: seen.append(o))
    forward(batches(spec)[0], None)
    handle.remove()
    return seen


def _shared_output(spec: Spec) -> Any:
    seen = _shared_outputs(spec)
    assert len(seen) == spec.reuse
    return seen[-1]


@pytest.mark.parametrize(
    ("layer", "kind"),
    [("gru", tuple), ("lstm", tuple), ("mha", tuple), ("dict", dict), ("dataclass", zoo.BlockOutput),
     ("experts", Tensor), ("block", Tensor), ("embedding", Tensor), ("sparse_embedding", Tensor)],
)
def test_shared_layers_return_the_structures_named(layer: str, kind: type) -> None:
    out = _shared_output(Spec(layer))
    assert isinstance(out, kind)
    if isinstance(out, Tensor) and layer == "experts":
        assert out.shape == (zoo.BATCH, zoo.EXPERTS, zoo.FEATURES)
    if layer in zoo.EMBEDDINGS:
        assert out.shape == (zoo.BATCH, zoo.SEQ_LEN, zoo.FEATURES)


def test_several_shared_modules_are_handed_over_as_a_list_and_each_called_once() -> None:
    model, shared, forward = build(Spec("experts_list"))
    assert isinstance(shared, list) and len(shared) == zoo.EXPERTS
    assert all(type(m) is nn.Linear for m in shared) and all(a is b for a, b in zip(shared, model.shared))
    calls = [0] * zoo.EXPERTS
    handles = [m.register_forward_hook(lambda m, i, o, k=k: calls.__setitem__(k, calls[k] + 1))
               for k, m in enumerate(shared)]
    forward(batches(Spec("experts_list"))[0], None)
    for h in handles:
        h.remove()
    assert calls == [1] * zoo.EXPERTS


@pytest.mark.parametrize("between", ["relu_inplace", "relu_"])
@pytest.mark.parametrize("layer", sorted(set(zoo.LAYERS) - {"experts_list"}))
def test_inplace_ops_modify_the_shared_layers_own_output(layer: str, between: str) -> None:
    """(``experts_list``: the between-op acts on the stack of the experts' outputs, made after
    their calls, not on any module's own output.)"""
    out = _shared_output(Spec(layer, between=between))
    primary = zoo.output_tensors(out)[0]
    assert primary._version > 0  # autograd's version counter saw the in-place op


@pytest.mark.parametrize("layer", zoo.LAYERS)
def test_freezing(layer: str) -> None:
    if layer in zoo.EMBEDDINGS:  # the table is the only parameter: nothing to freeze meaningfully
        assert all(zoo.invalid_reason(Spec(layer, frozen=f)) for f in zoo.FROZEN if f != "none")
        return
    for which in ("weight", "bias"):
        model = build(Spec(layer, frozen=which))[0]
        frozen = {n for n, p in model.shared.named_parameters() if not p.requires_grad}
        assert frozen and all(which in n.rsplit(".", 1)[-1] for n in frozen)
        assert any(p.requires_grad for p in model.shared.parameters())
    model = build(Spec(layer, frozen="weight_late"))[0]
    assert all(p.requires_grad for p in model.shared.parameters())
    model.before_step(FREEZE_STEP)
    assert any(not p.requires_grad for p in model.shared.parameters())


@pytest.mark.parametrize("accumulate", zoo.ACCUMULATE)
@pytest.mark.parametrize("absent", ["missing", "nan", "masked"])
def test_absent_tasks_follow_the_schedule(absent: str, accumulate: int) -> None:
    """Per micro-batch: the last task absent in the last micro-batch of step 1 and all of step 2
    on rank 0, in the first micro-batch of step 1 (with several) and all of step 2 on rank 1;
    ``missing`` gives ``None``, ``nan`` and ``masked`` NaN with a graph."""
    spec = Spec(absent=absent, accumulate=accumulate)
    model = build(spec)[0]
    last = spec.num_tasks - 1
    for rank in (0, 1):
        flat = batches(spec, rank=rank)
        assert len(flat) == zoo.STEPS * accumulate
        where = {(b.step, b.micro) for b in flat if b.absent[last]}
        k = accumulate
        step1 = {(1, k - 1)} if rank == 0 else ({(1, 0)} if k > 1 else set())
        assert where == step1 | {(2, m) for m in range(k)}, rank
        for batch in flat:
            assert not any(batch.absent[:last])
            for i, loss in enumerate(model.task_losses(batch)):
                if not batch.absent[i]:
                    assert loss is not None and torch.isfinite(loss)
                elif absent == "missing":
                    assert loss is None
                else:  # NaN with a graph
                    assert loss is not None and loss.isnan() and loss.requires_grad
    assert spec.present(1) == [True, True, accumulate > 1] and spec.present(2) == [True, True, False]
    assert spec.present(1, rank=1) == [True, True, True]


def _nan_grad_count(loss: Tensor, model: nn.Module) -> int:
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return sum(int((~torch.isfinite(g)).sum()) for g in grads if g is not None)


def test_masked_mean_backward_is_nan_and_the_index_form_is_finite() -> None:
    """The two forms of a task without labels: both NaN; the masked mean's backward writes NaN
    (0 * inf) into its head and the shared layer, the index form's is finite."""
    got = {}
    for absent in ("masked", "nan"):
        spec = Spec(absent=absent)
        model = build(spec)[0]
        batch = next(b for b in batches(spec) if b.absent[-1])
        loss = model.task_losses(batch)[-1]
        assert loss is not None and loss.isnan()
        got[absent] = _nan_grad_count(loss, model)
    assert got["nan"] == 0 and got["masked"] > 0
    # present, the two forms give the same loss
    spec = Spec(absent="masked")
    batch = batches(spec)[0]
    a, b = build(spec)[0].task_losses(batch)[-1], build(index_twin(spec))[0].task_losses(batch)[-1]
    assert a is not None and b is not None
    torch.testing.assert_close(a, b, rtol=1e-15, atol=0)


def _uses_of(param: Tensor, losses: list[Tensor | None]) -> int:
    """How many nodes of the losses' graph read ``param`` directly (edges into its accumulator)."""
    leaf = torch.autograd.graph.get_gradient_edge(param).node
    seen: set[Any] = set()
    stack = [loss.grad_fn for loss in losses if loss is not None]
    users = 0
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        users += any(nxt is leaf for nxt, _ in node.next_functions)
        stack.extend(nxt for nxt, _ in node.next_functions)
    return users


@pytest.mark.parametrize("tie", zoo.TIE)
@pytest.mark.parametrize("layer", ["linear", "conv1d", "block", "gru", "mha", "experts", "experts_list", "dict",
                                   "embedding", "sparse_embedding"])
def test_a_tie_uses_the_shared_weight_outside_the_layers_call(layer: str, tie: str) -> None:
    spec = Spec(layer, tie=tie)
    if not zoo.is_valid(spec):
        pytest.skip(zoo.invalid_reason(spec) or "")
    model = build(spec)[0]
    weight = zoo.tied_weight(layer, model.shared)
    losses = model.task_losses(batches(spec)[0])
    extra = {"none": 0, "head": len(spec.tied_tasks), "input": 1, "before": 1}[tie]  # (head: one use per tied task)
    assert _uses_of(weight, losses) == 1 + extra
    # and who reads it: every task through the input, tasks 0 and T-1 at their heads / before the call
    for i, loss in enumerate(losses):
        assert loss is not None
        tied = tie == "input" or i in spec.tied_tasks
        assert _uses_of(weight, [loss]) == 1 + tied


@pytest.mark.parametrize("checkpoint", zoo.CHECKPOINT)
def test_checkpointing_recomputes_the_regions_named(checkpoint: str) -> None:
    """``block``: the shared layer runs again during the backward (non-reentrant recompute);
    ``heads``/``heads_reentrant``: head 0 does, the shared layer does not; the reentrant form
    leaves one ``CheckpointFunctionBackward`` node per head in the graph. (A non-reentrant region
    recomputes only where it saved a tensor of its own: here the tanh after the layer, and
    head 0's hidden activation.)"""
    spec = Spec(between="tanh", read="interact", checkpoint=checkpoint)
    model = build(spec)[0]
    counts = {"shared": 0, "head": 0}
    hooks = [model.shared.register_forward_hook(lambda *_: counts.__setitem__("shared", counts["shared"] + 1)),
             model.heads[0].register_forward_hook(lambda *_: counts.__setitem__("head", counts["head"] + 1))]
    losses = model.task_losses(batches(spec)[0])
    assert counts == {"shared": 1, "head": 1}
    torch.stack([loss for loss in losses if loss is not None]).sum().backward()
    for h in hooks:
        h.remove()
    assert counts == {"shared": 1 + (checkpoint == "block"), "head": 1 + checkpoint.startswith("heads")}
    names = {n.name() for n in _graph_nodes(losses)}
    assert ("CheckpointFunctionBackward" in names) == (checkpoint == "heads_reentrant")


def _graph_nodes(losses: list[Tensor | None]) -> set[Any]:
    seen: set[Any] = set()
    stack = [loss.grad_fn for loss in losses if loss is not None]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        stack.extend(nxt for nxt, _ in node.next_functions)
    return seen


def test_sparse_embedding_gets_a_sparse_gradient_without_its_padding_row() -> None:
    spec = Spec("sparse_embedding")
    model = build(spec)[0]
    batch = batches(spec)[0]
    assert bool((batch.x == zoo.PADDING_IDX).any())  # the padding row is among the indices
    torch.stack([loss for loss in model.task_losses(batch) if loss is not None]).sum().backward()
    grad = model.shared.weight.grad
    assert grad is not None and grad.is_sparse
    dense = grad.to_dense()
    assert bool((dense[zoo.PADDING_IDX] == 0).all())
    touched = set(batch.x.flatten().tolist()) - {zoo.PADDING_IDX}
    assert all(bool(dense[r].abs().sum() > 0) for r in touched)
    assert len(touched) < zoo.VOCAB - 1 or batch.x.numel() > zoo.VOCAB  # (rows repeat)


def test_interacting_heads_read_head_zeros_hidden_activation() -> None:
    spec = Spec(read="interact")
    assert spec.views_valid
    model = build(spec)[0]
    assert model.mix is not None
    losses = model.task_losses(batches(spec)[0], lambda z: [z.view_as(z) for _ in range(spec.num_tasks)])
    reads = [torch.autograd.grad(loss, model.mix.weight, retain_graph=True, allow_unused=True)[0] for loss in losses
             if loss is not None]
    assert [g is not None and bool(g.abs().sum() > 0) for g in reads] == [True, True, False]


@pytest.mark.parametrize("spec", [s for s in CI if s.views_valid][:40], ids=lambda s: s.id)
def test_alias_views_leave_the_losses_unchanged(spec: Spec) -> None:
    model = build(spec)[0]
    batch = batches(spec)[0]
    calls: list[Tensor] = []

    def views(z: Tensor) -> tuple[Tensor, ...]:
        calls.append(z)
        return tuple(z.view_as(z) for _ in range(spec.num_tasks))

    plain, viewed = model.task_losses(batch), model.task_losses(batch, views)
    assert len(calls) == 1
    for a, b in zip(plain, viewed):
        assert (a is None and b is None) or (a is not None and b is not None and torch.equal(a, b))


@pytest.mark.parametrize("read", ["parts", "hierarchical"])
def test_views_are_not_taken_where_they_are_not_meaningful(read: str) -> None:
    spec = Spec("gru", read=read)
    assert not spec.views_valid
    model = build(spec)[0]
    model.task_losses(batches(spec)[0], lambda z: pytest.fail("views_fn called"))


# ---------------------------------------------------------------------- the references
@pytest.mark.parametrize("spec", CI, ids=lambda s: s.id)
def test_reference_runs_are_meaningful(spec: Spec) -> None:
    """Finite, non-zero norms for every present task, and weights that move."""
    run = reference_run(spec)
    norms = run.norms.where(run.present, 1.0)
    assert torch.isfinite(run.weights).all() and torch.isfinite(norms).all()
    assert (norms > 1e-8).all(), norms
    assert (run.weights - 1).abs().max() > MOVED  # (at some step: they may come back by the last)
    torch.testing.assert_close(run.weights.sum(1), torch.full((STEPS,), float(spec.num_tasks), dtype=F64))


def _textbook_weights(model: Any, ref: TextbookGradNorm, steps: Iterable[tuple[Any, list[bool]]]) -> Tensor:
    """The textbook's weights after each step, training ``model`` by SGD on ``(batch, present)`` pairs."""
    opt = torch.optim.SGD(model.parameters(), lr=MODEL_LR)
    weights = []
    for batch, present in steps:
        losses = model.task_losses(batch)
        opt.zero_grad()
        ref.model_loss(losses, present).backward(retain_graph=True)
        ref.update(losses, present)
        opt.step()
        weights.append(ref.w.detach().clone())
    return torch.stack(weights)


@pytest.mark.parametrize(
    "spec",
    [Spec(), Spec("gru"), Spec("lstm", read="parts"), Spec("conv2d", absent="nan"), Spec("experts", read="slice"),
     Spec("layernorm", between="relu_inplace"), Spec("block", read="twice", absent="nan", num_tasks=2),
     Spec("embedding", tie="head", absent="nan"), Spec("experts_list", read="interact", tie="input", num_tasks=2),
     Spec("linear", tie="before", absent="masked"), Spec("conv1d", checkpoint="heads", tie="input")],
    ids=lambda s: s.id,
)
def test_reference_matches_the_create_graph_textbook(spec: Spec) -> None:
    """The reference's norms and update equal tests/textbook.py's double backward."""
    want = reference_run(spec)
    model = build(spec)[0]
    ref = TextbookGradNorm(list(model.shared.parameters()), spec.num_tasks, alpha=1.5, lr=0.05)
    weights = _textbook_weights(model, ref, ((b, spec.present(b.step)) for b in batches(spec)))
    torch.testing.assert_close(weights, want.weights, rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    "spec",
    [Spec(accumulate=2), Spec("embedding", tie="head", accumulate=2),
     Spec("experts_list", read="interact", tie="input", accumulate=2, num_tasks=2)],
    ids=lambda s: s.id,
)
def test_accumulated_reference_equals_the_textbook_on_the_joined_micro_batches(spec: Spec) -> None:
    """Two equal micro-batches per step, every task present: the mean of their losses and the
    norm of the mean of their gradients are those of one batch of both (the model's gradients
    too), so the reference's accumulation equals the textbook on the joined batches."""
    want = reference_run(spec)
    model = build(spec)[0]
    ref = TextbookGradNorm(list(model.shared.parameters()), spec.num_tasks, alpha=1.5, lr=0.05)
    joined = (zoo.Batch(step, torch.cat([b.x for b in micro]), torch.cat([b.y for b in micro]),
                        torch.cat([b.mask for b in micro])) for step, micro in enumerate(zoo.step_batches(spec)))
    weights = _textbook_weights(model, ref, ((b, [True] * spec.num_tasks) for b in joined))
    torch.testing.assert_close(weights, want.weights, rtol=0, atol=1e-12)
    assert (want.weights[-1] - 1).abs().max() > MOVED


def test_output_gradient_reference_is_the_pre_activation_gradient() -> None:
    """Behind an in-place ReLU the probe gives dL/dz at the layer's output, which is what the
    out-of-place ReLU model (same parameters) gives directly."""
    inplace, plain = Spec("linear", between="relu_inplace"), Spec("linear", between="relu")
    model_a, model_b = build(inplace)[0], build(plain)[0]
    batch = batches(inplace)[0]
    got = output_gradient_norms(model_a, batch)
    seen: list[Tensor] = []
    handle = model_b.shared.register_forward_hook(lambda m, i, o: seen.append(o))
    losses = model_b.task_losses(batch)
    handle.remove()
    want = torch.stack([torch.autograd.grad(loss, seen[0], retain_graph=True)[0].norm() for loss in losses if loss is not None])
    torch.testing.assert_close(got, want, rtol=1e-13, atol=0)
    # and it differs from the gradient after the activation (the check has teeth): the
    # in-place model's output tensor, read after the ReLU overwrote it
    seen_a: list[Tensor] = []
    handle = model_a.shared.register_forward_hook(lambda m, i, o: seen_a.append(o))
    losses_a = model_a.task_losses(batch)
    handle.remove()
    post = torch.stack([
        torch.autograd.grad(loss, seen_a[0], retain_graph=True)[0].norm() for loss in losses_a if loss is not None
    ])
    assert (post - want).abs().max() > 1e-3


def test_mismatch_reports_weights_and_norms() -> None:
    t = torch.ones(STEPS, 2, dtype=F64)
    present = torch.ones(STEPS, 2, dtype=torch.bool)
    a = Run(t, t, present, [None] * STEPS, [])
    assert mismatch(a, a) is None
    b = dataclasses.replace(a, norms=t * (1 + 1e-9))
    assert mismatch(b, a) is not None and "step 0" in str(mismatch(b, a))
    c = dataclasses.replace(a, weights=t + 1e-9)
    assert mismatch(c, a) is not None
    assert mismatch(dataclasses.replace(a, norms=t * (1 + 1e-12)), a) is None
    nan = dataclasses.replace(a, norms=t.clone().fill_(float("nan")))
    assert mismatch(nan, a) is not None
