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
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from torch import Tensor

from tests import model_zoo as zoo
from tests.model_zoo import FREEZE_STEP, STEPS, Spec, batches, build
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
    assert Spec("gru", "relu_inplace", "weight", "parts", 1, "nan", 3, 4).id == (
        "gru-relu_inplace-frz_weight-parts-x1-abs_nan-T3-s4"
    )


def test_samples_hold_valid_specs_only() -> None:
    for specs in (CI, zoo.full_specs(), zoo.representation_specs()):
        assert all(zoo.is_valid(s) for s in specs)
    assert zoo.invalid_reason(Spec("linear", read="parts")) is not None
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
    combos = {(s.layer, s.between, s.frozen, s.read, s.reuse) for s in full}
    assert len(combos) == len(full)
    assert {s.absent for s in full} == set(zoo.ABSENT)
    assert {s.num_tasks for s in full} == set(zoo.NUM_TASKS)


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


def _shared_output(spec: Spec) -> Any:
    _, shared, forward = build(spec)
    seen: list[Any] = []
    handle = shared.register_forward_hook(lambda m, i, o: seen.append(o))
    forward(batches(spec)[0], None)
    handle.remove()
    assert len(seen) == spec.reuse
    return seen[-1]


@pytest.mark.parametrize(
    ("layer", "kind"),
    [("gru", tuple), ("lstm", tuple), ("mha", tuple), ("dict", dict), ("dataclass", zoo.BlockOutput),
     ("experts", Tensor), ("block", Tensor)],
)
def test_shared_layers_return_the_structures_named(layer: str, kind: type) -> None:
    out = _shared_output(Spec(layer))
    assert isinstance(out, kind)
    if isinstance(out, Tensor) and layer == "experts":
        assert out.shape == (zoo.BATCH, zoo.EXPERTS, zoo.FEATURES)


@pytest.mark.parametrize("between", ["relu_inplace", "relu_"])
@pytest.mark.parametrize("layer", zoo.LAYERS)
def test_inplace_ops_modify_the_shared_layers_own_output(layer: str, between: str) -> None:
    out = _shared_output(Spec(layer, between=between))
    primary = zoo.output_tensors(out)[0]
    assert primary._version > 0  # autograd's version counter saw the in-place op


@pytest.mark.parametrize("layer", zoo.LAYERS)
def test_freezing(layer: str) -> None:
    for which in ("weight", "bias"):
        shared = build(Spec(layer, frozen=which))[1]
        frozen = {n for n, p in shared.named_parameters() if not p.requires_grad}
        assert frozen and all(which in n.rsplit(".", 1)[-1] for n in frozen)
        assert any(p.requires_grad for p in shared.parameters())
    model, shared, _ = build(Spec(layer, frozen="weight_late"))
    assert all(p.requires_grad for p in shared.parameters())
    model.before_step(FREEZE_STEP)
    assert any(not p.requires_grad for p in shared.parameters())


def test_absent_tasks_follow_the_schedule() -> None:
    for absent in ("missing", "nan"):
        spec = Spec(absent=absent)
        model = build(spec)[0]
        for batch in batches(spec):
            losses = model.task_losses(batch)
            for loss, present in zip(losses, spec.present(batch.step)):
                if present:
                    assert loss is not None and torch.isfinite(loss)
                elif absent == "missing":
                    assert loss is None
                else:  # NaN with a graph: a masked mean over an empty mask
                    assert loss is not None and loss.isnan() and loss.requires_grad
        assert not all(spec.present(min(zoo.ABSENT_STEPS)))


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
    assert (run.weights[-1] - 1).abs().max() > MOVED
    torch.testing.assert_close(run.weights.sum(1), torch.full((STEPS,), float(spec.num_tasks), dtype=F64))


@pytest.mark.parametrize(
    "spec",
    [Spec(), Spec("gru"), Spec("lstm", read="parts"), Spec("conv2d", absent="nan"), Spec("experts", read="slice"),
     Spec("layernorm", between="relu_inplace"), Spec("block", read="twice", absent="nan", num_tasks=2)],
    ids=lambda s: s.id,
)
def test_reference_matches_the_create_graph_textbook(spec: Spec) -> None:
    """The reference's norms and update equal tests/textbook.py's double backward."""
    want = reference_run(spec)
    model = build(spec)[0]
    ref = TextbookGradNorm(list(model.shared.parameters()), spec.num_tasks, alpha=1.5, lr=0.05)
    opt = torch.optim.SGD(model.parameters(), lr=MODEL_LR)
    weights = []
    for batch in batches(spec):
        losses = model.task_losses(batch)
        present = spec.present(batch.step)
        opt.zero_grad()
        ref.model_loss(losses, present).backward(retain_graph=True)  # type: ignore[arg-type]
        ref.update(losses, present)  # type: ignore[arg-type]
        opt.step()
        weights.append(ref.w.detach().clone())
    torch.testing.assert_close(torch.stack(weights), want.weights, rtol=0, atol=1e-12)


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
