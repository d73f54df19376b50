"""Issue 24, item 4: task-gradient cosines on generated models (tests/model_zoo.py) against autograd.

For a seeded subset of the zoo's CI specs, ``GradNorm(task_cosines=True)`` trains the model
(``mode="auto"`` reading ``z``, with ``task_views`` where the spec allows it, and
``mode="autograd"``) while a second copy of the same model follows it in lockstep (same data,
the same weights in its summed loss, the same SGD steps) and gives the **independent
reference**: one ``torch.autograd.grad(L_i, [p for p in shared.parameters() if p.requires_grad])``
per task, flattened, and ``cos[a, b] = <g_a, g_b> / (|g_a| |g_b|)`` in float64. Agreement means
the cosines of every pair of present tasks to ``1e-10`` at every step, NaN in an absent task's
row and column, and the norms (which come from the same Gram when cosines are on) to a relative
``1e-10``. ``mode="representation"`` gives the cosines of the per-task gradients at the layer's
output (all its tensor outputs), checked on the zoo's representation specs against a copy of
the model whose shared layer hands a copy of its output downstream.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from gradnorm_lightning import GradNorm
from tests.model_zoo import (
    Spec,
    ZooModel,
    batches,
    build,
    ci_specs,
    output_tensors,
    representation_specs,
)

F64 = torch.float64
COS_ATOL = 1e-10
NORM_RTOL = 1e-10
SUBSET = ci_specs()[::3]  # every third CI spec (about 90): the cosines share the norms' machinery
AUTOGRAD_SUBSET = ci_specs()[1::9]
VIEW_SUBSET = tuple(s for s in SUBSET if s.views_valid)


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def reference_cosines(losses: list[Tensor | None], present: list[bool], params: list[Tensor]) -> tuple[Tensor, Tensor]:
    """``(cosines, norms)`` from one ``autograd.grad`` per present task (NaN for absent tasks)."""
    t = len(losses)
    rows = []
    for loss, ok in zip(losses, present):
        size = sum(p.numel() for p in params)
        if not ok or loss is None:
            rows.append(torch.full((size,), float("nan"), dtype=F64))
            continue
        grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        rows.append(torch.cat([
            torch.zeros(p.numel(), dtype=F64) if g is None else g.reshape(-1).to(F64) for g, p in zip(grads, params)
        ]))
    g = torch.stack(rows)
    norms = g.norm(dim=1)
    cos = (g @ g.T) / norms[:, None] / norms[None, :]
    assert cos.shape == (t, t)
    return cos, norms


def _compare(label: str, step: int, got_cos: Tensor, want_cos: Tensor, got_n: Tensor, want_n: Tensor,
             present: list[bool]) -> None:
    ok = torch.tensor(present)
    pairs = ok[:, None] & ok[None, :] & want_cos.isfinite()
    err = (got_cos.to(F64) - want_cos).abs()[pairs]
    assert err.numel() == 0 or float(err.max()) <= COS_ATOL, (
        f"{label} step {step}: cosines off by {float(err.max()):.3g}\ngot {got_cos}\nwant {want_cos}")
    assert got_cos[~(ok[:, None] & ok[None, :])].isnan().all(), f"{label} step {step}: absent task's cosine {got_cos}"
    assert torch.equal(got_cos.isnan(), want_cos.isnan()), f"{label} step {step}: NaN pattern {got_cos} vs {want_cos}"
    scale = want_n.where(ok, 0.0).abs().amax().clamp_min(1e-300)
    rel = ((got_n.to(F64) - want_n).abs() / torch.maximum(want_n.abs(), 1e-6 * scale))[ok]
    assert float(rel.max()) <= NORM_RTOL, f"{label} step {step}: norms {got_n} vs {want_n}"


def lockstep(spec: Spec, mode: str, views: bool) -> None:
    """Train with ``GradNorm(task_cosines=True)``; a copy in lockstep gives the reference each step."""
    model = build(spec)[0]
    twin = copy.deepcopy(model)
    gn = GradNorm(model.shared, num_tasks=spec.num_tasks, alpha=1.5, lr=0.05, optimizer="sgd", mode=mode,
                  task_cosines=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    opt_twin = torch.optim.SGD(twin.parameters(), lr=0.05)
    label = f"[{spec.id}] mode={mode!r} views={views}"
    for batch in batches(spec):
        present = spec.present(batch.step)
        for m in (model, twin):
            m.before_step(batch.step)
        # the reference, on the twin
        twin_losses = twin.task_losses(batch, None)
        params = [p for p in twin.shared.parameters() if p.requires_grad]
        want_cos, want_n = reference_cosines(twin_losses, present, params)
        weights = gn.weights.detach().clone()
        # the balancer, on the model
        losses = model.task_losses(batch, gn.task_views if views else None)
        opt.zero_grad()
        try:
            gn.combine(losses).backward()  # type: ignore[arg-type]
            gn.step()
        except Exception as exc:
            exc.add_note(f"{label} at step {batch.step}")
            raise
        opt.step()
        # the twin takes the same step
        opt_twin.zero_grad()
        total = sum(weights[i] * loss for i, loss in enumerate(twin_losses) if present[i] and loss is not None)
        assert isinstance(total, Tensor)
        total.backward()
        opt_twin.step()
        _compare(label, batch.step, gn.last_stats["cosines"], want_cos, gn.last_stats["grad_norms"], want_n, present)


@pytest.mark.parametrize("spec", SUBSET, ids=lambda s: s.id)
def test_auto_cosines_match_autograd(spec: Spec) -> None:
    lockstep(spec, "auto", views=False)


@pytest.mark.parametrize("spec", VIEW_SUBSET, ids=lambda s: s.id)
def test_views_cosines_match_autograd(spec: Spec) -> None:
    lockstep(spec, "auto", views=True)


@pytest.mark.parametrize("spec", AUTOGRAD_SUBSET, ids=lambda s: s.id)
def test_autograd_mode_cosines_match_autograd(spec: Spec) -> None:
    lockstep(spec, "autograd", views=False)


def _clone_output(out: Any) -> Any:
    if isinstance(out, Tensor):
        return out.clone()
    if isinstance(out, tuple):
        return tuple(_clone_output(o) for o in out)
    if isinstance(out, dict):
        return {k: _clone_output(v) for k, v in out.items()}
    if dataclasses.is_dataclass(out) and not isinstance(out, type):
        return dataclasses.replace(out, **{f.name: _clone_output(getattr(out, f.name)) for f in dataclasses.fields(out)})
    return out


def output_gradient_cosines(model: ZooModel, batch: Any, present: list[bool]) -> tuple[Tensor, Tensor]:
    """Cosines (and norms) of ``dL_i/d(output)`` over every tensor output of the shared layer."""
    probe = copy.deepcopy(model)
    captured: list[Any] = []

    def hook(module: nn.Module, inputs: Any, output: Any) -> Any:
        captured.append(output)
        return _clone_output(output)

    handle = probe.shared.register_forward_hook(hook)
    try:
        losses = probe.task_losses(batch, None)
    finally:
        handle.remove()
    outputs = [t for t in output_tensors(captured[0]) if t.requires_grad]
    return reference_cosines(losses, present, outputs)


@pytest.mark.parametrize("spec", [s for s in representation_specs() if s.reuse == 1], ids=lambda s: s.id)
def test_representation_cosines_are_those_of_the_output_gradients(spec: Spec) -> None:
    model = build(spec)[0]
    gn = GradNorm(model.shared, num_tasks=spec.num_tasks, optimizer="sgd", mode="representation", task_cosines=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for batch in batches(spec):
        present = spec.present(batch.step)
        model.before_step(batch.step)
        want_cos, want_n = output_gradient_cosines(model, batch, present)
        losses = model.task_losses(batch, None)
        opt.zero_grad()
        gn.combine(losses).backward()  # type: ignore[arg-type]
        gn.step()
        opt.step()
        _compare(f"[{spec.id}] representation", batch.step, gn.last_stats["cosines"], want_cos,
                 gn.last_stats["grad_norms"], want_n, present)
