"""Issue 24, item 4: task-gradient cosines on generated models (tests/model_zoo.py).

For a seeded subset of the differential tests' CI specs, ``GradNorm(task_cosines=True)`` trains
each model by the same harness as ``tests/test_differential.py`` (every family: tied weights,
checkpointing, sparse embeddings, several shared modules, masked partial labels under
accumulation), and its ``last_stats["cosines"]`` must equal at every step those of the
**independent reference** (:func:`tests.test_differential.reference_run`): the dense per-task
gradients over the shared parameters that require grad, summed over the step's micro-batches,
and ``cos[a, b] = <g_a, g_b> / (|g_a| |g_b|)`` in float64; NaN in the row and column of a task
absent from the step (or with a zero gradient). Agreement: every pair of present tasks to
``1e-10`` at every step, the same NaN pattern, and the weights and norms as the harness demands
(the norms come from the same Gram when cosines are on). ``mode="representation"`` gives the
cosines of the per-task gradients at the shared modules' outputs: their Grams over a step's
micro-batches add (disjoint rows).
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from tests.test_differential import (
    REP_SPECS,
    SPECS,
    STEPS,
    _cached,
    _params,
    gradnorm_run,
    gram_cosines,
    mismatch,
    output_gradient_gram,
    refusal,
)

F64 = torch.float64
COS_ATOL = 1e-10
SUBSET = SPECS[::3]  # every third CI spec: the cosines share the norms' machinery
VIEW_SUBSET = tuple(s for s in SUBSET if s.views_valid)
AUTOGRAD_SUBSET = SPECS[1::9]


def cosine_mismatch(label: str, got: Tensor, want: Tensor) -> str | None:
    """Where ``got`` (STEPS, T, T) departs from ``want``: a pair off by more than ``COS_ATOL``,
    or another NaN pattern (absent or zero-gradient tasks), or ``None``."""
    for step in range(STEPS):
        g, w = got[step], want[step]
        if not torch.equal(g.isnan(), w.isnan()):
            return f"{label} step {step}: NaN pattern\\ngot {g}\\nwant {w}"
        both = ~w.isnan()
        err = (g - w).abs()[both]
        if err.numel() and float(err.max()) > COS_ATOL:
            return f"{label} step {step}: cosines off by {float(err.max()):.3g}\\ngot {g}\\nwant {w}"
    return None


def _check(spec, mode: str, views: bool) -> None:  # type: ignore[no-untyped-def]
    refused = refusal(spec, mode)
    if refused is not None:  # (no exact route: the differential tests check the refusal)
        pytest.skip("no exact route on this spec")
    got, _ = gradnorm_run(spec, mode, views, task_cosines=True)
    want = _cached(spec, "reference")
    label = f"[{spec.id}] mode={mode!r} views={views}"
    assert got.cosines is not None and want.cosines is not None
    problem = mismatch(got, want) or cosine_mismatch(label, got.cosines, want.cosines)
    assert problem is None, problem
    # the cosines are not trivially 1: some pair of present tasks differs from 1
    present = ~want.cosines.isnan()
    assert bool(((want.cosines - 1).abs() > 1e-6)[present].any()), f"{label}: every cosine is 1"


@pytest.mark.parametrize("spec", _params(SUBSET))
def test_auto_cosines_match_the_reference(spec) -> None:  # type: ignore[no-untyped-def]
    _check(spec, "auto", views=False)


@pytest.mark.parametrize("spec", _params(VIEW_SUBSET))
def test_views_cosines_match_the_reference(spec) -> None:  # type: ignore[no-untyped-def]
    _check(spec, "auto", views=True)


@pytest.mark.parametrize("spec", _params([s for s in AUTOGRAD_SUBSET if s.absent != "masked"
                                          and s.checkpoint != "heads_reentrant"]))
def test_autograd_mode_cosines_match_the_reference(spec) -> None:  # type: ignore[no-untyped-def]
    _check(spec, "autograd", views=False)


@pytest.mark.parametrize("spec", REP_SPECS, ids=lambda s: s.id)
def test_representation_cosines_are_those_of_the_output_gradients(spec) -> None:  # type: ignore[no-untyped-def]
    if refusal(spec, "representation") is not None:
        pytest.skip("no exact route on this spec")
    got, probed = gradnorm_run(spec, "representation", probe=output_gradient_gram, task_cosines=True)
    assert probed is not None and got.cosines is not None
    want = torch.stack([gram_cosines(probed[step].sum(0)) for step in range(STEPS)])  # (the micro-batches' Grams add)
    problem = cosine_mismatch(f"[{spec.id}] representation", got.cosines, want)
    assert problem is None, problem


def test_the_reference_cosines_are_checked_against_a_hand_computed_case() -> None:
    """``gram_cosines``: two orthogonal tasks, one opposite, one zero."""
    g = torch.tensor([[1.0, 0.0], [0.0, 2.0], [-3.0, 0.0], [0.0, 0.0]], dtype=F64)
    cos = gram_cosines(g @ g.T)
    assert cos[0, 1] == 0 and cos[0, 2] == -1 and cos[1, 1] == 1
    assert cos[3].isnan().all() and cos[:, 3].isnan().all()
