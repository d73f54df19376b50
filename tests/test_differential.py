"""Differential tests of the GradNorm routes over generated models (tests/model_zoo.py).

Every route must give the paper's numbers on every model (DESIGN.md, sections 1-3). For each
generated spec, the same seeded training (``STEPS`` optimizer steps of ``spec.accumulate``
micro-batches each; the model's SGD steps too, so the model and the weights change) is run

* with no GradNorm at all: the **independent reference** (:func:`reference_run`): per
  micro-batch and present task, ``torch.autograd.grad(L_i, [p for p in shared.parameters() if
  p.requires_grad])`` made dense, scaled by ``1/k`` and summed over the step; ``n_i`` is the norm
  of that sum, the step's loss the mean over the micro-batches the task was present in, the
  weights by the update of DESIGN.md section 1 written out below. It runs on
  :func:`reference_spec`: a masked mean in its index form (``err[m].mean()``: nothing to cut),
  and without activation checkpointing (which changes no number);
* with ``mode="autograd"`` on :func:`autograd_spec` (the index form; no reentrant checkpointing,
  which refuses ``autograd.grad``), which must match the reference; on a masked mean itself it
  must report the absent tasks it could not cut off (``last_stats["uncut"]``), step by step;
* with ``mode="auto"`` (heads read ``z``) and ``mode="auto"`` with ``task_views`` (where every
  head reads ``z`` through its own view; a tied use or interacting heads must be detected and
  the views left), which must match ``mode="autograd"``, and the reference as well where their
  spec differs (a masked mean must lose nothing: weights and every model parameter); the same
  with every per-task code path for large tensors forced;
* with ``mode="representation"`` on a few specs, against the norms of the per-task gradients at
  the shared modules' outputs (all their tensor outputs concatenated, taken before anything
  downstream, in-place or not, touched them; over micro-batches the root of the sum of squares).

Where no exact route exists (:func:`refusal`: a reentrant checkpoint that per-task gradients
would have to cross) the routes must raise a ValueError naming it; reentrant checkpointing
around the shared layer itself is an error case of its own. Known library limitations
(:func:`known_limitation`) are strict expected failures. A multi-process test (slow) trains a
few generated specs under DDP with masked partial labels and accumulation.

Agreement means float64 weights to ``atol=1e-10`` (``rtol=0``) at every step and the norms of
the present tasks to a relative ``1e-10`` (relative to each norm, floored at ``1e-6`` of the
step's largest), plus the model's parameters at the end. Absent tasks' norms are not compared.

The CI sample is fixed (``model_zoo.ci_specs``, 256 specs; 1284 tests, of which 57 skip, 30 are
expected failures and one is the slow DDP test: about 50 s, and 20 s for the DDP test, on a
shared 2-core machine). ``GRADNORM_DIFF_FULL=1`` runs the product of the model axes
(``model_zoo.full_specs``, 4334 specs, 22910 tests, about 16 minutes of CPU; use ``--tb=line``
while many fail).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from gradnorm_lightning import GradNorm, zero_nonfinite_grads_
from tests.helpers.floor import floored
from tests.model_zoo import (
    BLOCK_REENTRANT,
    STEPS,
    Spec,
    ZooModel,
    build,
    ci_specs,
    full_specs,
    index_twin,
    output_tensors,
    representation_specs,
    shared_modules,
    step_batches,
)

F64 = torch.float64
ALPHA = 1.5
LR = 0.05
MODEL_LR = 0.05
MIN_WEIGHT = 1e-4  # GradNorm's default floor
WEIGHT_ATOL = 1e-10
NORM_RTOL = 1e-10
MOVED = 1e-5  # the reference weights must move at least this much at some step (not comparing constants)

FULL = os.environ.get("GRADNORM_DIFF_FULL", "") not in ("", "0")
SPECS = full_specs() if FULL else ci_specs()
VIEW_SPECS = tuple(s for s in SPECS if s.views_valid)
REP_SPECS = tuple(s for s in SPECS if s.reuse == 1) if FULL else representation_specs()


def _ids(spec: Spec) -> str:
    return spec.id


def refusal(spec: Spec, mode: str = "auto") -> str | None:
    """The error (a regular expression) every route of ``mode`` must raise on ``spec``, where no
    exact route exists, or ``None``: a reentrant checkpoint (``use_reentrant=True``) refuses
    ``autograd.grad``, so per-task gradients cannot cross one that several tasks' gradients reach
    (head 0's checkpointed output read by head 1), nor one between the losses and a weight tied
    before the layer's call (whose route is a backward from every loss; not in
    ``mode="representation"``, which reads the outputs' gradients only)."""
    if spec.checkpoint != "heads_reentrant":
        return None
    tied_before = spec.tie == "before" and spec.frozen != "weight" and mode != "representation"
    if spec.read in ("hierarchical", "interact") or tied_before:
        return r"use_reentrant=True.*Use `use_reentrant=False`"
    return None


def known_limitation(spec: Spec) -> str | None:
    """Why the routes under test are known to be wrong on ``spec`` (an expected failure, strict),
    or ``None``. Each is a library limitation reported to the lead, not a property of the model."""
    if spec.checkpoint == "heads_reentrant" and spec.tie == "head" and spec.frozen != "weight" and refusal(spec) is None:
        return (
            "a shared weight used inside a head under checkpoint(..., use_reentrant=True) (tie=head) is invisible: "
            "the head is one CheckpointFunctionBackward node whose nested backward writes the tied gradient into "
            "W.grad itself, so no route's per-task gradients include it and the norms are silently too small "
            "(no detection; mode='autograd' refuses reentrant checkpoints)"
        )
    return None


def _params(specs: Sequence[Spec], suffix: str = "") -> list[Any]:
    """``specs`` as parameters of a route test, the known limitations marked ``xfail(strict=True)``."""
    out = []
    for spec in specs:
        reason = known_limitation(spec)
        marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason is not None else []
        out.append(pytest.param(spec, marks=marks, id=spec.id + suffix))
    return out


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
    present: Tensor  # (STEPS, T) bool: present in at least one micro-batch of the step
    routes: list[Any]  # last_stats.get("route") per step (None when absent or no GradNorm)
    params: list[Tensor]  # the model's parameters after the run
    uncut: list[Tensor | None] = dataclasses.field(default_factory=list)  # last_stats.get("uncut") per step
    cosines: Tensor | None = None  # (STEPS, T, T) task-gradient cosines (NaN rows/columns: absent or zero)


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
    new[idx] = floored(stepped, budget, MIN_WEIGHT)
    return new


def gram_cosines(gram: Tensor) -> Tensor:
    """Cosines from a ``(T, T)`` Gram: NaN in the rows and columns of zero-norm tasks."""
    d = gram.diagonal().sqrt()
    cos = gram / d[:, None] / d[None, :]
    zero = d == 0
    return cos.masked_fill(zero[:, None] | zero[None, :], float("nan"))


def _dense_grads(loss: Tensor, params: Sequence[Tensor]) -> list[Tensor]:
    """``dL/dp`` for every parameter, dense (a sparse embedding gradient as its whole table:
    repeated rows summed by ``to_dense``), zeros where ``loss`` does not reach ``p``."""
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return [
        torch.zeros_like(p) if g is None else (g.to_dense() if g.is_sparse else g) for g, p in zip(grads, params)
    ]


_PRISTINE: dict[Spec, ZooModel] = {}


def _fresh_model(spec: Spec) -> ZooModel:
    """A deepcopy of the spec's model as built (every run starts from identical parameters)."""
    if spec not in _PRISTINE:
        _PRISTINE[spec] = build(spec)[0]
    return copy.deepcopy(_PRISTINE[spec])


def reference_spec(spec: Spec) -> Spec:
    """The spec the independent reference trains: the index form of a masked mean
    (:func:`~tests.model_zoo.index_twin`), and no activation checkpointing (it changes no number)."""
    return index_twin(spec).with_(checkpoint="none")


def autograd_spec(spec: Spec) -> Spec:
    """The spec ``mode="autograd"`` is run on as the baseline of ``spec``'s routes: the index form
    of a masked mean (``autograd`` cannot cut an absent task off: it reports it), and without
    reentrant checkpointing around the heads (torch refuses ``autograd.grad`` through it)."""
    twin = index_twin(spec)
    return twin.with_(checkpoint="none") if twin.checkpoint == "heads_reentrant" else twin


def reference_run(spec: Spec, given_norms: Tensor | None = None) -> Run:
    """The run without GradNorm, on :func:`reference_spec`: per micro-batch and present task,
    the dense gradient of its loss over the shared parameters that require grad, scaled by
    ``1/k`` and summed over the step's micro-batches (``k = spec.accumulate``); ``n_i`` is the
    norm of that sum, the loss of a step the mean over the micro-batches the task was present
    in, and the weights follow the update of DESIGN.md section 1 written out above. The model
    is trained by ``(sum_i w_i L_i) / k`` per micro-batch over the present tasks, one SGD step.
    ``given_norms`` ``(STEPS, T)``: use these norms in the update instead (same trajectory)."""
    spec = reference_spec(spec)
    model = _fresh_model(spec)
    opt = torch.optim.SGD(model.parameters(), lr=MODEL_LR)
    t, k = spec.num_tasks, spec.accumulate
    w = torch.ones(t, dtype=F64)
    l0 = torch.full((t,), float("nan"), dtype=F64)
    out_w, out_n, out_p, out_c = [], [], [], []
    for step, micro in enumerate(step_batches(spec)):
        model.before_step(step)
        params = [p for p in model.shared.parameters() if p.requires_grad]
        summed = [[torch.zeros_like(p) for p in params] for _ in range(t)]
        loss_sum = torch.zeros(t, dtype=F64)
        count = torch.zeros(t, dtype=F64)
        opt.zero_grad()
        for batch in micro:
            losses = model.task_losses(batch, None)
            here = [not a for a in batch.absent]
            for i, loss in enumerate(losses):
                finite = loss is not None and bool(torch.isfinite(loss))
                assert finite == here[i], f"{spec.id}: task {i} at step {step}.{batch.micro}: {loss}"
                if here[i]:
                    assert loss is not None
                    for acc, g in zip(summed[i], _dense_grads(loss, params)):
                        acc.add_(g / k)
                    loss_sum[i] += loss.detach()
                    count[i] += 1
            model_loss = sum(w[i] * loss for i, loss in enumerate(losses) if here[i] and loss is not None)
            assert isinstance(model_loss, Tensor)
            (model_loss / k if k > 1 else model_loss).backward()
        present = count > 0
        assert present.tolist() == spec.present(step)
        flat = torch.stack([torch.cat([g.reshape(-1) for g in summed[i]]) for i in range(t)])
        norms = flat.norm(dim=1)
        out_c.append(gram_cosines(flat @ flat.T))
        if given_norms is not None:
            norms = given_norms[step]
        values = torch.where(present, loss_sum / count.clamp_min(1), 0.0)
        l0 = torch.where(present & l0.isnan(), values, l0)
        w = reference_update(w, norms, values, l0, present)
        opt.step()
        out_w.append(w.clone())
        out_n.append(norms)
        out_p.append(present)
    return Run(torch.stack(out_w), torch.stack(out_n), torch.stack(out_p), [None] * STEPS,
               [p.detach().clone() for p in model.parameters()], cosines=torch.stack(out_c))


# ---------------------------------------------------------------------- runs with GradNorm
ProbeFn = Callable[[ZooModel, Any], Tensor]


def gradnorm_run(spec: Spec, mode: str, views: bool = False, probe: ProbeFn | None = None,
                 device: str = "cpu", sanitize: bool = False, task_cosines: bool = False) -> tuple[Run, Tensor | None]:
    """The run with ``GradNorm(mode=mode)`` on ``device``: per micro-batch
    ``(gn.combine(losses) / k).backward()`` (no division for ``k = 1``), then one ``gn.step()``
    and one SGD step of the model. ``probe(model, batch)`` (optional) computes reference norms
    per micro-batch from the model as it is at the start of the step (``(STEPS, k, T)``);
    ``sanitize``: zero the non-finite gradients before the model's step (a route that cannot cut
    an absent task off); ``task_cosines``: record ``last_stats["cosines"]`` as well. The run's
    records are float64 on the CPU."""
    model = _fresh_model(spec).to(device)
    t, k = spec.num_tasks, spec.accumulate
    gn = GradNorm(model.shared_layer, num_tasks=t, alpha=ALPHA, lr=LR, optimizer="sgd", mode=mode,
                  task_cosines=task_cosines)
    opt = torch.optim.SGD(model.parameters(), lr=MODEL_LR)
    out_w, out_n, routes, uncut, probed, cosines = [], [], [], [], [], []
    for step, micro in enumerate(step_batches(spec)):
        model.before_step(step)
        opt.zero_grad()
        try:
            for batch in (b.to(device) for b in micro):
                if probe is not None:
                    probed.append(probe(model, batch))
                losses = model.task_losses(batch, gn.task_views if views else None)
                loss = gn.combine(losses)  # type: ignore[arg-type]  # None marks a missing task
                (loss / k if k > 1 else loss).backward()
            gn.step()
        except Exception as exc:
            exc.add_note(f"[{spec.id}] mode={mode!r} views={views} at step {step}")
            raise
        if sanitize:
            zero_nonfinite_grads_(model.parameters())
        opt.step()
        out_w.append(gn.weights.detach().to("cpu", F64).clone())
        out_n.append(gn.last_stats["grad_norms"].detach().to("cpu", F64).clone())
        routes.append(gn.last_stats.get("route"))
        flagged = gn.last_stats.get("uncut")
        uncut.append(None if flagged is None else flagged.detach().to("cpu").clone())
        if task_cosines:
            cosines.append(gn.last_stats["cosines"].detach().to("cpu", F64).clone())
    present = torch.tensor([spec.present(s) for s in range(STEPS)])
    run = Run(torch.stack(out_w), torch.stack(out_n), present, routes,
              [p.detach().to("cpu").clone() for p in model.parameters()], uncut,
              torch.stack(cosines) if task_cosines else None)
    return run, (torch.stack(probed).view(STEPS, k, *probed[0].shape) if probe is not None else None)


_CACHE: dict[tuple[Spec, str], Run | BaseException] = {}


def _cached(spec: Spec, kind: str) -> Run:
    """The reference (on :func:`reference_spec`) or the ``mode="autograd"`` baseline (on
    :func:`autograd_spec`) of ``spec``, computed once (errors too)."""
    key = (reference_spec(spec), kind) if kind == "reference" else (autograd_spec(spec), kind)
    if key not in _CACHE:
        try:
            _CACHE[key] = reference_run(key[0]) if kind == "reference" else gradnorm_run(key[0], "autograd")[0]
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
    # (NaN counts as the largest difference: Python's max would drop it after a number)
    err = max(float((p - q).abs().max().nan_to_num(nan=float("inf"))) for p, q in zip(got.params, want.params))
    return None if err <= WEIGHT_ATOL else f"the model's parameters differ by {err:.3g} after {STEPS} steps"


def _route_note(run: Run) -> str:
    return f"routes {run.routes}" if any(r is not None for r in run.routes) else "route not reported"


def expected_uncut(spec: Spec) -> list[list[bool]]:
    """Per step, the tasks absent with a graph in some micro-batch (what a route without a
    graph walk must report as not cut off)."""
    out = []
    for micro in step_batches(spec):
        flags = [False] * spec.num_tasks
        if spec.absent in ("nan", "masked"):
            for batch in micro:
                flags = [f or a for f, a in zip(flags, batch.absent)]
        out.append(flags)
    return out


def _check_route(spec: Spec, mode: str, views: bool) -> None:
    refused = refusal(spec, mode)
    if refused is not None:  # no exact route: a clear error, raised by the forward's combine
        with pytest.raises(ValueError, match=refused):
            gradnorm_run(spec, mode, views)
        return
    got, _ = gradnorm_run(spec, mode, views)
    label = f"[{spec.id}] mode={mode!r} views={views} ({_route_note(got)})"
    if spec.absent == "masked":  # every absent task was cut off: none reported as lost
        flagged = [u.tolist() if u is not None else None for u in got.uncut]
        assert all(u is None or not any(u) for u in flagged), f"{label}: reported uncut {flagged}"
    try:
        want = _cached(spec, "autograd")
    except Exception as exc:
        versus = mismatch(got, _cached(spec, "reference"))
        raise AssertionError(
            f"{label}: the baseline mode='autograd' raised {type(exc).__name__}: {exc}. "
            f"The route against the independent reference: {versus or 'agrees'}"
        ) from exc
    problem = mismatch(got, want) or _params_mismatch(got, want)
    assert problem is None, f"{label} vs mode='autograd' on {autograd_spec(spec).id}: {problem}"
    if autograd_spec(spec) != spec:  # (a masked mean, reentrant checkpointing: the reference too)
        ref = _cached(spec, "reference")
        problem = mismatch(got, ref) or _params_mismatch(got, ref)
        assert problem is None, f"{label} vs the reference on {reference_spec(spec).id}: {problem}"


# ---------------------------------------------------------------------- the tests
@pytest.mark.parametrize("spec", SPECS, ids=_ids)
def test_autograd_matches_independent_reference(spec: Spec) -> None:
    """``mode="autograd"``: norms over the parameters that require grad, weights by the rule.

    On a masked mean it is run on the index form (its baseline, :func:`autograd_spec`), and on
    the masked form itself it must report every absent task it could not cut off
    (``last_stats["uncut"]``), step by step. Around reentrant checkpointed heads it must not
    return numbers silently: it matches the reference or names the checkpointing."""
    want = _cached(spec, "reference")
    assert (want.weights - 1).abs().max() > MOVED, f"[{spec.id}] the reference weights move at no step"
    got = _cached(spec, "autograd")
    problem = mismatch(got, want) or _params_mismatch(got, want)
    assert problem is None, f"[{spec.id}] mode='autograd' ({_route_note(got)}) vs the reference: {problem}"
    if spec.checkpoint == "heads_reentrant":
        try:
            own, _ = gradnorm_run(spec.with_(absent=autograd_spec(spec).absent), "autograd")
        except Exception as exc:
            assert "checkpoint" in str(exc), f"[{spec.id}] mode='autograd' raised without naming checkpointing: {exc}"
        else:
            problem = mismatch(own, want) or _params_mismatch(own, want)
            assert problem is None, f"[{spec.id}] mode='autograd' under reentrant checkpointing: {problem}"
    if spec.absent == "masked":
        lossy, _ = gradnorm_run(spec.with_(checkpoint=autograd_spec(spec).checkpoint), "autograd", sanitize=True)
        flagged = [u.tolist() if u is not None else [False] * spec.num_tasks for u in lossy.uncut]
        assert flagged == expected_uncut(spec), f"[{spec.id}] mode='autograd' reported uncut {lossy.uncut}"


@pytest.mark.parametrize("spec", _params(SPECS))
def test_auto_matches_autograd(spec: Spec) -> None:
    """``mode="auto"``, heads reading the representation itself."""
    _check_route(spec, "auto", views=False)


@pytest.mark.parametrize("spec", _params(VIEW_SPECS))
def test_task_views_match_autograd(spec: Spec) -> None:
    """``mode="auto"`` with ``task_views``: each head reads its own view."""
    _check_route(spec, "auto", views=True)


@pytest.mark.parametrize("views", [False, True], ids=["heads", "views"])
@pytest.mark.parametrize("spec", _params(SPECS))
def test_per_task_calls_match_autograd(spec: Spec, views: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """The code paths taken for large tensors, forced on the (small) generated models: every
    vector-Jacobian product as one ``autograd.grad`` per task (the shared part crossed task by
    task, its results kept as rows), and a convolution's per-task weight gradients by one
    ``convolution_backward`` per task. Checked to have run: no batched ``autograd.grad`` at all."""
    from gradnorm_lightning.capture import norms

    if views and not spec.views_valid:
        pytest.skip("this model's heads do not read z through views")
    monkeypatch.setattr(norms, "LOOP_NUMEL", 0)
    monkeypatch.setattr(norms, "_LOOP_MACS", 0)
    batched: list[int] = []
    grad = torch.autograd.grad

    def counting_grad(*args: Any, **kwargs: Any) -> Any:
        batched.extend([1] if kwargs.get("is_grads_batched") else [])
        return grad(*args, **kwargs)

    with contextlib.suppress(Exception):  # (the baseline, before the spy; its error is reported below)
        _cached(spec, "autograd")
    with contextlib.suppress(Exception):
        _cached(spec, "reference")
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


def output_gradients(model: ZooModel, batch: Any) -> Tensor:
    """``(T, D)``: per task, ``dL_i/d(output)`` over all tensor outputs of the shared modules,
    flattened, on a copy of the model whose shared modules hand a copy of their output downstream
    (and that checkpoints nothing: a recompute would call them again); zeros for an absent task."""
    probe = copy.deepcopy(model)  # the balancer's hook is not copied
    probe.spec = probe.spec.with_(checkpoint="none")
    captured: list[Any] = []

    def hook(module: nn.Module, inputs: Any, output: Any) -> Any:
        captured.append(output)
        return _clone_output(output)

    modules = shared_modules(probe.spec.layer, probe.shared)
    handles = [m.register_forward_hook(hook) for m in modules]
    try:
        losses = probe.task_losses(batch, None)
    finally:
        for handle in handles:
            handle.remove()
    assert len(captured) == len(modules), "one call of each shared module per forward"
    outputs = [t for out in captured for t in output_tensors(out) if t.requires_grad]
    rows = torch.zeros(len(losses), sum(o.numel() for o in outputs), dtype=F64)
    for i, loss in enumerate(losses):
        if loss is None or not torch.isfinite(loss):
            continue
        grads = torch.autograd.grad(loss, outputs, retain_graph=True, allow_unused=True)
        rows[i] = torch.cat([
            (torch.zeros(o.numel(), dtype=F64) if g is None else g.reshape(-1)) for g, o in zip(grads, outputs)
        ])
    return rows


def output_gradient_norms(model: ZooModel, batch: Any) -> Tensor:
    """Per task: the norm of :func:`output_gradients` (0 for an absent task)."""
    return output_gradients(model, batch).norm(dim=1)


def output_gradient_gram(model: ZooModel, batch: Any) -> Tensor:
    """The ``(T, T)`` Gram of :func:`output_gradients` (the representation's cosines come from it)."""
    rows = output_gradients(model, batch)
    return rows @ rows.T


@pytest.mark.parametrize("spec", REP_SPECS, ids=_ids)
def test_representation_matches_output_gradients(spec: Spec) -> None:
    """``mode="representation"``: norms of the per-task gradients at the layer's output (over
    the micro-batches of a step: the root of the sum of their squares, each scaled by ``1/k``:
    the rows of different micro-batches are disjoint), and the weights the rule gives from them
    along the reference's trajectory."""
    refused = refusal(spec, "representation")
    if refused is not None:
        with pytest.raises(ValueError, match=refused):
            gradnorm_run(spec, "representation")
        return
    got, probed = gradnorm_run(spec, "representation", probe=output_gradient_norms)
    assert probed is not None
    want_norms = (probed / spec.accumulate).pow(2).sum(1).sqrt()
    ref = reference_run(spec, given_norms=want_norms)
    want = Run(ref.weights, want_norms, got.present, [None] * STEPS, [])
    assert (want.weights - 1).abs().max() > MOVED, f"[{spec.id}] the reference weights move at no step"
    problem = mismatch(got, want)
    assert problem is None, f"[{spec.id}] mode='representation' ({_route_note(got)}) vs output gradients: {problem}"


# ---------------------------------------------------------------------- error cases
@pytest.mark.parametrize("mode", ["auto", "views", "autograd", "representation"])
@pytest.mark.parametrize("layer", ["linear", "embedding", "experts_list", "gru"])
def test_reentrant_checkpoint_around_the_shared_layer_is_refused(layer: str, mode: str) -> None:
    """``checkpoint(..., use_reentrant=True)`` around the shared layer runs its forward under
    no_grad: no per-task gradient exists there, in any mode. The error names checkpointing and
    the fix, in the forward's ``combine`` (``autograd``: in the first backward). One exception:
    ``mode="autograd"`` hooks no forward, and a region whose inputs need no gradient (integer
    indices into an embedding) leaves no trace in the graph: there it is the plain error."""
    spec = Spec(layer, checkpoint=BLOCK_REENTRANT)
    expected = r"use_reentrant=True.*use_reentrant=False"
    if layer == "embedding" and mode == "autograd":
        expected = r"does not depend on the shared layer \(Embedding\)"
    warns = pytest.warns(UserWarning, match="None of the inputs") if layer == "embedding" else contextlib.nullcontext()
    with warns, pytest.raises(ValueError, match=expected):
        gradnorm_run(spec, "auto" if mode == "views" else mode, views=mode == "views")


@pytest.mark.parametrize("container", [list, tuple, nn.ModuleList], ids=["list", "tuple", "ModuleList"])
def test_several_shared_modules_in_any_container_give_the_same_run(container: Callable[[Any], Any]) -> None:
    """``experts_list`` hands the balancer a plain list of the three experts; a tuple and an
    ``nn.ModuleList`` of the same modules give the same run, bit for bit."""
    spec = Spec("experts_list", read="slice", absent="masked", accumulate=2)
    want, _ = gradnorm_run(spec, "auto")
    original = ZooModel.shared_layer

    def wrapped(self: ZooModel) -> Any:
        return container(self.shared)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ZooModel, "shared_layer", property(wrapped))
        got, _ = gradnorm_run(spec, "auto")
    assert isinstance(original.fget(_fresh_model(spec)), list)  # type: ignore[attr-defined]
    assert torch.equal(got.weights, want.weights) and torch.equal(got.norms, want.norms)
    assert all(torch.equal(p, q) for p, q in zip(got.params, want.params))
    assert (want.weights[-1] - 1).abs().max() > MOVED


# ---------------------------------------------------------------------- DDP (2 processes, gloo)
#: generated models with masked partial labels, several under accumulation, covering the routes:
#: ``(spec, views)``
DDP_CASES: list[tuple[Spec, bool]] = [
    (Spec("linear", between="relu", absent="masked", accumulate=2, seed=1), True),
    (Spec("embedding", absent="masked", tie="head", accumulate=2, seed=2), False),
    (Spec("experts_list", read="interact", absent="masked", checkpoint="heads", seed=3), True),
    (Spec("sparse_embedding", between="tanh", absent="masked", tie="before", accumulate=2, seed=4), False),
    (Spec("conv1d", read="residual", absent="masked", checkpoint="block", tie="input", accumulate=2, seed=5), True),
]


@pytest.mark.slow
def test_ddp_masked_partial_labels_equal_the_index_form(tmp_path: Path) -> None:
    """Each rank trains on its own micro-batches with its own absences (the last task absent on
    one rank only in some micro-batches, on both in others). The masked run's ranks agree bit for
    bit, and equal the index-form run (float64, weights and every parameter, 1e-9); nothing was
    left uncut."""
    import torch.multiprocessing as mp

    from tests.helpers.zoo_ddp import zoo_ddp_worker

    for form in ("masked", "index"):
        mp.spawn(zoo_ddp_worker, args=(2, f"file://{tmp_path}/init_{form}", str(tmp_path), form, DDP_CASES),
                 nprocs=2, join=True)
    for n, (spec, views) in enumerate(DDP_CASES):
        runs = {(f, r): torch.load(tmp_path / f"{f}_{n}_rank{r}.pt") for f in ("masked", "index") for r in (0, 1)}
        label = f"[{spec.id}] views={views} (routes {runs[('masked', 0)]['routes']})"
        m0, m1, i0 = runs[("masked", 0)], runs[("masked", 1)], runs[("index", 0)]
        assert torch.equal(m0["weights"], m1["weights"]), label
        assert all(torch.equal(p, q) for p, q in zip(m0["params"], m1["params"])), label
        assert all(u is None or not bool(u.any()) for u in m0["uncut"]), f"{label}: uncut {m0['uncut']}"
        dw = float((m0["weights"] - i0["weights"]).abs().max())
        dp = max(float((p - q).abs().max().nan_to_num(nan=float("inf"))) for p, q in zip(m0["params"], i0["params"]))
        assert max(dw, dp) <= 1e-9, f"{label}: masked vs index form: weights {dw:.3g}, parameters {dp:.3g}"
        assert float((m0["weights"][-1] - 1).abs().max()) > MOVED, label
