"""Differential tests of the GradNorm routes over generated models (tests/model_zoo.py).

Every route must give the paper's numbers on every model (DESIGN.md, sections 1-3). For each
generated spec, the same seeded training (``STEPS`` steps; the model's SGD steps too, so the
model and the weights change) is run

* with no GradNorm at all: the **independent reference**: ``n_i`` by one
  ``torch.autograd.grad(L_i, [p for p in shared.parameters() if p.requires_grad])`` per task
  and step, the weights by the update of DESIGN.md section 1 written out below;
* with ``mode="autograd"``, which must match the reference;
* with ``mode="auto"`` (heads read ``z``) and ``mode="auto"`` with ``task_views`` (where every
  head reads ``z`` only through its own view), which must match ``mode="autograd"``;
* with ``mode="representation"`` on a few specs, against the norms of the per-task gradients at
  the shared layer's output (all its tensor outputs concatenated, taken before anything
  downstream, in-place or not, touched them).

Agreement means float64 weights to ``atol=1e-10`` (``rtol=0``) at every step and the norms of
the present tasks to a relative ``1e-10`` (relative to each norm, floored at ``1e-6`` of the
step's largest), plus the model's parameters at the end. Absent tasks' norms are not compared.

The CI sample is fixed (``model_zoo.ci_specs``, 269 specs, about 770 tests, ~20 s when they
pass). ``GRADNORM_DIFF_FULL=1`` runs the product of the model axes (``model_zoo.full_specs``,
3320 specs, about 10700 tests, a few minutes when they pass; use ``--tb=line`` while many fail).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from gradnorm_lightning import GradNorm
from tests.model_zoo import (
    STEPS,
    Spec,
    ZooModel,
    batches,
    build,
    ci_specs,
    full_specs,
    output_tensors,
    representation_specs,
)

F64 = torch.float64
ALPHA = 1.5
LR = 0.05
MODEL_LR = 0.05
MIN_WEIGHT = 1e-4  # GradNorm's default floor
WEIGHT_ATOL = 1e-10
NORM_RTOL = 1e-10
MOVED = 1e-5  # the reference weights must move at least this much (not comparing constants)

FULL = os.environ.get("GRADNORM_DIFF_FULL", "") not in ("", "0")
SPECS = full_specs() if FULL else ci_specs()
VIEW_SPECS = tuple(s for s in SPECS if s.views_valid)
REP_SPECS = tuple(s for s in SPECS if s.reuse == 1) if FULL else representation_specs()


def _ids(spec: Spec) -> str:
    return spec.id


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """Tiny models: intra-op threads only add contention (about 15x slower on 2 shared cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@dataclass
class Run:
    """What one training run produced, step by step."""

    weights: Tensor  # (STEPS, T) the weights after each step's update
    norms: Tensor  # (STEPS, T) the norms the update used (meaningful for present tasks)
    present: Tensor  # (STEPS, T) bool
    routes: list[Any]  # last_stats.get("route") per step (None when absent or no GradNorm)
    params: list[Tensor]  # the model's parameters after the run


# ---------------------------------------------------------------------- the reference
def reference_update(
    w: Tensor, norms: Tensor, losses: Tensor, l0: Tensor, present: Tensor
) -> Tensor:
    """DESIGN.md section 1, steps 2-6, for SGD: the new weights (absent tasks keep theirs)."""
    idx = present.nonzero().flatten()
    g = w[idx] * norms[idx]
    ratio = losses[idx] / l0[idx]
    r = ratio / ratio.mean()
    target = g.mean() * r**ALPHA
    grad = torch.sign(g - target) * norms[idx]  # d/dw_i sum_j |w_j n_j - target_j|, target constant
    stepped = (w[idx] - LR * grad).clamp_min(MIN_WEIGHT)
    budget = w.numel() - w[~present].sum()
    new = w.clone()
    new[idx] = stepped * budget / stepped.sum()
    return new


def _param_grad_norm(loss: Tensor, params: Sequence[Tensor]) -> Tensor:
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    sq = [g.pow(2).sum() for g in grads if g is not None]
    return torch.stack(sq).sum().sqrt() if sq else torch.zeros((), dtype=F64)


_PRISTINE: dict[Spec, ZooModel] = {}


def _fresh_model(spec: Spec) -> ZooModel:
    """A deepcopy of the spec's model as built (every run starts from identical parameters)."""
    if spec not in _PRISTINE:
        _PRISTINE[spec] = build(spec)[0]
    return copy.deepcopy(_PRISTINE[spec])


def reference_run(spec: Spec) -> Run:
    """The run without GradNorm: norms over the parameters that require grad at each step."""
    model = _fresh_model(spec)
    opt = torch.optim.SGD(model.parameters(), lr=MODEL_LR)
    t = spec.num_tasks
    w = torch.ones(t, dtype=F64)
    l0 = torch.full((t,), float("nan"), dtype=F64)
    out_w, out_n, out_p = [], [], []
    for batch in batches(spec):
        model.before_step(batch.step)
        losses = model.task_losses(batch, None)
        present = torch.tensor(spec.present(batch.step))
        for i, loss in enumerate(losses):
            finite = loss is not None and bool(torch.isfinite(loss))
            assert finite == bool(present[i]), f"{spec.id}: task {i} at step {batch.step}: {loss}"
        params = [p for p in model.shared.parameters() if p.requires_grad]
        norms = torch.zeros(t, dtype=F64)
        values = torch.zeros(t, dtype=F64)
        for i, loss in enumerate(losses):
            if present[i]:
                assert loss is not None
                norms[i] = _param_grad_norm(loss, params)
                values[i] = loss.detach()
        l0 = torch.where(present & l0.isnan(), values, l0)
        opt.zero_grad()
        model_loss = sum(w[i] * loss for i, loss in enumerate(losses) if present[i] and loss is not None)
        assert isinstance(model_loss, Tensor)
        model_loss.backward()
        w = reference_update(w, norms, values, l0, present)
        opt.step()
        out_w.append(w.clone())
        out_n.append(norms)
        out_p.append(present)
    return Run(torch.stack(out_w), torch.stack(out_n), torch.stack(out_p), [None] * STEPS,
               [p.detach().clone() for p in model.parameters()])


# ---------------------------------------------------------------------- runs with GradNorm
ProbeFn = Callable[[ZooModel, Any], Tensor]


def gradnorm_run(spec: Spec, mode: str, views: bool = False, probe: ProbeFn | None = None,
                 device: str = "cpu") -> tuple[Run, Tensor | None]:
    """The run with ``GradNorm(mode=mode)`` on ``device``; ``probe(model, batch)`` (optional)
    computes reference norms from the model as it is at the start of each step. The run's
    records are float64 on the CPU."""
    model = _fresh_model(spec).to(device)
    t = spec.num_tasks
    gn = GradNorm(model.shared, num_tasks=t, alpha=ALPHA, lr=LR, optimizer="sgd", mode=mode)
    opt = torch.optim.SGD(model.parameters(), lr=MODEL_LR)
    out_w, out_n, routes, probed = [], [], [], []
    for batch in (b.to(device) for b in batches(spec)):
        model.before_step(batch.step)
        try:
            if probe is not None:
                probed.append(probe(model, batch))
            losses = model.task_losses(batch, gn.task_views if views else None)
            opt.zero_grad()
            loss = gn.combine(losses)  # type: ignore[arg-type]  # None marks a missing task
            loss.backward()
            gn.step()
        except Exception as exc:
            exc.add_note(f"[{spec.id}] mode={mode!r} views={views} at step {batch.step}")
            raise
        opt.step()
        out_w.append(gn.weights.detach().to("cpu", F64).clone())
        out_n.append(gn.last_stats["grad_norms"].detach().to("cpu", F64).clone())
        routes.append(gn.last_stats.get("route"))
    present = torch.tensor([spec.present(s) for s in range(STEPS)])
    run = Run(torch.stack(out_w), torch.stack(out_n), present, routes,
              [p.detach().to("cpu").clone() for p in model.parameters()])
    return run, (torch.stack(probed) if probe is not None else None)


_CACHE: dict[tuple[Spec, str], Run | BaseException] = {}


def _cached(spec: Spec, kind: str) -> Run:
    """The reference or the ``mode="autograd"`` run of ``spec``, computed once (errors too)."""
    key = (spec, kind)
    if key not in _CACHE:
        try:
            _CACHE[key] = reference_run(spec) if kind == "reference" else gradnorm_run(spec, "autograd")[0]
        except Exception as exc:  # kept, re-raised by every test that needs this run
            _CACHE[key] = exc
    result = _CACHE[key]
    if isinstance(result, BaseException):
        raise result
    return result


# ---------------------------------------------------------------------- comparison
def mismatch(got: Run, want: Run, want_norms: Tensor | None = None) -> str | None:
    """A description of where ``got`` departs from ``want`` (weights, norms of present tasks), or None."""
    norms = want.norms if want_norms is None else want_norms
    dw = (got.weights - want.weights).abs().max(dim=1).values
    # relative to each norm, with a floor at 1e-6 of the step's largest (a norm that is exactly
    # 0 in the reference must not demand an exact 0 from a route)
    scale = torch.maximum(norms.abs(), 1e-6 * norms.where(want.present, 0.0).abs().amax(1, keepdim=True))
    rel = ((got.norms - norms).abs() / scale.clamp_min(1e-300)).where(want.present, 0.0)
    rel = rel.nan_to_num(nan=float("inf")).max(dim=1).values
    bad = ~(dw <= WEIGHT_ATOL) | ~(rel <= NORM_RTOL)
    if not bad.any():
        return None
    step = int(bad.nonzero()[0])
    return (
        f"first mismatch at step {step}: max|dw| per step {[f'{v:.3g}' for v in dw.tolist()]}, "
        f"max rel. norm error per step {[f'{v:.3g}' for v in rel.tolist()]}; "
        f"norms got {got.norms[step].tolist()} want {norms[step].tolist()}; "
        f"weights got {got.weights[step].tolist()} want {want.weights[step].tolist()}"
    )


def _params_mismatch(got: Run, want: Run) -> str | None:
    err = max(float((p - q).abs().max()) for p, q in zip(got.params, want.params))
    return None if err <= WEIGHT_ATOL else f"the model's parameters differ by {err:.3g} after {STEPS} steps"


def _route_note(run: Run) -> str:
    return f"routes {run.routes}" if any(r is not None for r in run.routes) else "route not reported"


def _check_route(spec: Spec, mode: str, views: bool) -> None:
    got, _ = gradnorm_run(spec, mode, views)
    label = f"[{spec.id}] mode={mode!r} views={views} ({_route_note(got)})"
    try:
        want = _cached(spec, "autograd")
    except Exception as exc:
        versus = mismatch(got, _cached(spec, "reference"))
        raise AssertionError(
            f"{label}: the baseline mode='autograd' raised {type(exc).__name__}: {exc}. "
            f"The route against the independent reference: {versus or 'agrees'}"
        ) from exc
    problem = mismatch(got, want) or _params_mismatch(got, want)
    assert problem is None, f"{label} vs mode='autograd': {problem}"


# ---------------------------------------------------------------------- the tests
@pytest.mark.parametrize("spec", SPECS, ids=_ids)
def test_autograd_matches_independent_reference(spec: Spec) -> None:
    """``mode="autograd"``: norms over the parameters that require grad, weights by the rule."""
    want = _cached(spec, "reference")
    assert (want.weights[-1] - 1).abs().max() > MOVED, f"[{spec.id}] the reference weights do not move"
    got = _cached(spec, "autograd")
    problem = mismatch(got, want) or _params_mismatch(got, want)
    assert problem is None, f"[{spec.id}] mode='autograd' ({_route_note(got)}) vs the reference: {problem}"


@pytest.mark.parametrize("spec", SPECS, ids=_ids)
def test_auto_matches_autograd(spec: Spec) -> None:
    """``mode="auto"``, heads reading the representation itself."""
    _check_route(spec, "auto", views=False)


@pytest.mark.parametrize("spec", VIEW_SPECS, ids=_ids)
def test_task_views_match_autograd(spec: Spec) -> None:
    """``mode="auto"`` with ``task_views``: each head reads its own view."""
    _check_route(spec, "auto", views=True)


@pytest.mark.parametrize(
    ("spec", "views"),
    [(s, False) for s in SPECS] + [(s, True) for s in VIEW_SPECS],
    ids=[f"{s.id}-heads" for s in SPECS] + [f"{s.id}-views" for s in VIEW_SPECS],
)
def test_per_task_calls_match_autograd(spec: Spec, views: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """The code paths taken for large tensors, forced on the (small) generated models: every
    vector-Jacobian product as one ``autograd.grad`` per task (the shared part crossed task by
    task, its results kept as rows), and a convolution's per-task weight gradients by one
    ``convolution_backward`` per task. Checked to have run: no batched ``autograd.grad`` at all."""
    from gradnorm_lightning.capture import norms

    monkeypatch.setattr(norms, "LOOP_NUMEL", 0)
    monkeypatch.setattr(norms, "_LOOP_MACS", 0)
    batched: list[int] = []
    grad = torch.autograd.grad

    def counting_grad(*args: Any, **kwargs: Any) -> Any:
        batched.extend([1] if kwargs.get("is_grads_batched") else [])
        return grad(*args, **kwargs)

    with contextlib.suppress(Exception):  # (the baseline, before the spy; its error is reported below)
        _cached(spec, "autograd")
    monkeypatch.setattr(torch.autograd, "grad", counting_grad)
    _check_route(spec, "auto", views=views)
    assert not batched, f"[{spec.id}] {len(batched)} batched autograd.grad call(s) with the per-task paths forced"


def _clone_output(out: Any) -> Any:
    """``out`` with every tensor replaced by a differentiable copy (downstream ops touch the copy)."""
    if isinstance(out, Tensor):
        return out.clone()
    if isinstance(out, tuple):
        return tuple(_clone_output(o) for o in out)
    if isinstance(out, dict):
        return {k: _clone_output(v) for k, v in out.items()}
    if dataclasses.is_dataclass(out) and not isinstance(out, type):
        return dataclasses.replace(out, **{f.name: _clone_output(getattr(out, f.name)) for f in dataclasses.fields(out)})
    return out


def output_gradient_norms(model: ZooModel, batch: Any) -> Tensor:
    """Per task: the norm of ``dL_i/d(output)`` over all tensor outputs of the shared layer,
    on a copy of the model whose shared layer hands a copy of its output downstream."""
    probe = copy.deepcopy(model)  # the balancer's hook is not copied
    captured: list[Any] = []

    def hook(module: nn.Module, inputs: Any, output: Any) -> Any:
        captured.append(output)
        return _clone_output(output)

    handle = probe.shared.register_forward_hook(hook)
    try:
        losses = probe.task_losses(batch, None)
    finally:
        handle.remove()
    assert len(captured) == 1, "one call of the shared layer per forward"
    outputs = [t for t in output_tensors(captured[0]) if t.requires_grad]
    norms = torch.zeros(len(losses), dtype=F64)
    for i, loss in enumerate(losses):
        if loss is None or not torch.isfinite(loss):
            continue
        grads = torch.autograd.grad(loss, outputs, retain_graph=True, allow_unused=True)
        norms[i] = torch.cat([
            (torch.zeros(o.numel(), dtype=F64) if g is None else g.reshape(-1)) for g, o in zip(grads, outputs)
        ]).norm()
    return norms


@pytest.mark.parametrize("spec", REP_SPECS, ids=_ids)
def test_representation_matches_output_gradients(spec: Spec) -> None:
    """``mode="representation"``: norms of the per-task gradients at the layer's output, and
    the weights the rule gives from them."""
    got, want_norms = gradnorm_run(spec, "representation", probe=output_gradient_norms)
    assert want_norms is not None
    # the weights the rule gives from the representation norms, along the same model trajectory
    t = spec.num_tasks
    w = torch.ones(t, dtype=F64)
    l0 = torch.full((t,), float("nan"), dtype=F64)
    model = _fresh_model(spec)
    opt = torch.optim.SGD(model.parameters(), lr=MODEL_LR)
    want_w = []
    for batch, norms in zip(batches(spec), want_norms):
        model.before_step(batch.step)
        losses = model.task_losses(batch, None)
        present = torch.tensor(spec.present(batch.step))
        values = torch.stack([
            loss.detach() if ok and loss is not None else torch.zeros((), dtype=F64)
            for loss, ok in zip(losses, present)
        ])
        l0 = torch.where(present & l0.isnan(), values, l0)
        opt.zero_grad()
        model_loss = sum(w[i] * loss for i, loss in enumerate(losses) if present[i] and loss is not None)
        assert isinstance(model_loss, Tensor)
        model_loss.backward()
        w = reference_update(w, norms, values, l0, present)
        opt.step()
        want_w.append(w.clone())
    want = Run(torch.stack(want_w), want_norms, got.present, [None] * STEPS, [])
    assert (want.weights[-1] - 1).abs().max() > MOVED, f"[{spec.id}] the reference weights do not move"
    problem = mismatch(got, want)
    assert problem is None, f"[{spec.id}] mode='representation' ({_route_note(got)}) vs output gradients: {problem}"
