"""Issue 24, item 6: the exact DDP reduction, piece by piece, against an independent float64 reference.

Two gloo processes each fill an ``Accumulator`` with seeded per-task gradients in the forms the
capture records (a Linear's factored inputs and output gradients, dense blocks, an embedding's
touched rows), including absent tasks (NaN rows masked lazily), several backward passes (an
accumulation window), shapes that differ between the ranks, and ranks whose pieces cover
different parameters. ``reduce_statistics(..., "exact")`` must give, on both ranks and to the
last bit the same, the norms and cosines of the ranks' *average* gradient, which
:func:`helpers.dist_reduce.reference` materialises from the same seeds in float64 with
``einsum``/``index_add`` (float64: 1e-12; float32: 1e-5). Every case runs as shipped (these
blocks are small: one all-reduce of the dense block and the loss sums), with the exchange used
for large blocks and each piece's form chosen by bytes, forced to the dense reduce-scatter,
forced to the all-gathers, and with the dense block sent by ``reduce_scatter_tensor`` (what
non-gloo backends use) instead of gloo's all-to-all; the collectives each one called are
checked too.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from helpers.dist_reduce import Case, Part, local_reference, reference, worker

pytestmark = pytest.mark.slow

WORLD = 2
ALL = (True, True, True)
NO_C = (True, True, False)
NO_A = (False, True, True)


def _both(*passes: tuple[Part, ...]) -> tuple[tuple[tuple[Part, ...], ...], ...]:
    return (tuple(passes), tuple(passes))


CASES = [
    Case("factored", _both((Part("linear", 0, n=4),)), expect=(True, False)),
    Case("factored-uneven", (((Part("linear", 0, n=3),),), ((Part("linear", 0, n=6),),)), expect=(True, False)),
    Case("factored-large-n", _both((Part("linear", 0, n=40),)), expect=(False, True)),
    Case("factored-bias-only", _both((Part("linear_bias", 0, n=4),)), expect=(False, True)),
    Case("dense", _both((Part("dense", 1),)), expect=(False, True)),
    Case("rows", _both((Part("rows", 2, n=6),)), expect=(True, False)),
    Case("rows-uneven", (((Part("rows", 2, n=2),),), ((Part("rows", 2, n=9),),)), expect=(True, False)),
    Case("rows-large-n", _both((Part("rows", 2, n=40),)), expect=(False, True)),
    Case("mixed", _both((Part("linear", 0, n=4), Part("dense", 1), Part("rows", 2, n=6), Part("linear", 3, n=40))),
         expect=(True, True)),
    Case("absent-on-one-rank", (((Part("linear", 0, n=4, present=NO_C), Part("rows", 2, n=5, present=NO_C)),),
                                ((Part("linear", 0, n=4), Part("rows", 2, n=5, present=NO_A)),)), expect=(True, False)),
    Case("absent-everywhere", _both((Part("linear", 0, n=4, present=NO_C), Part("dense", 1, present=NO_C))),
         expect=(True, True)),
    Case("accumulation", _both((Part("linear", 0, n=3, present=NO_C), Part("dense", 1)),
                               (Part("linear", 0, n=2), Part("dense", 1, present=NO_A))), expect=(True, True)),
    Case("accumulation-two-forms", _both((Part("linear", 0, n=3),), (Part("linear_dense", 0),)), expect=(False, True)),
    Case("form-differs-between-ranks", (((Part("linear", 0, n=4),),), ((Part("linear_dense", 0),),)),
         expect=(False, True)),
    Case("pieces-differ-between-ranks", (((Part("linear", 0, n=4), Part("dense", 1)),),
                                         ((Part("dense", (0, 1), key="params"),),)), expect=(False, True)),
    Case("module-missing-on-a-rank", (((Part("linear", 0, n=4), Part("dense", 1)),), ((Part("linear", 0, n=4),),)),
         expect=(False, True)),
    Case("rank-without-statistics", (((Part("linear", 0, n=4), Part("rows", 2, n=3)),), ((),)), expect=(False, True)),
    Case("nothing-measured", ((((),)), (((),)))),
    Case("huge", _both((Part("linear", 0, n=4), Part("dense", 1), Part("rows", 2, n=6))), scale=1e30),
    Case("tiny", _both((Part("linear", 0, n=4), Part("dense", 1), Part("rows", 2, n=6))), scale=1e-30),
]
# (force, dense collective, cosines, dtype); force None: as shipped (these blocks are small: one
# all-reduce), "bytes": the exchange with each piece's form chosen by bytes
SETTINGS: list[tuple[str | None, str | None, bool, str]] = [
    (None, None, True, "float64"),
    (None, None, False, "float32"),
    ("bytes", None, True, "float64"),
    ("bytes", None, False, "float64"),
    ("bytes", None, True, "float32"),
    ("bytes", None, False, "float32"),
    ("dense", None, True, "float64"),
    ("gather", None, True, "float64"),
    ("gather", None, False, "float32"),
    ("bytes", "reduce_scatter", True, "float64"),
    ("dense", "reduce_scatter", False, "float64"),
    ("bytes", "as-nccl", True, "float64"),
]


@pytest.fixture(scope="module")
def reduced(tmp_path_factory: pytest.TempPathFactory) -> list[dict[Any, Any]]:
    out = tmp_path_factory.mktemp("reduce")
    init = f"file://{out / 'rendezvous'}"
    mp.spawn(worker, args=(WORLD, init, str(out), CASES, SETTINGS), nprocs=WORLD, join=True)
    return [torch.load(out / f"reduce_rank{r}.pt") for r in range(WORLD)]


def _setting_id(setting: tuple[str | None, str | None, bool, str]) -> str:
    force, collective, cosines, dtype = setting
    return f"{force or 'shipped'}-{collective or 'default'}-{'cos' if cosines else 'norms'}-{dtype}"


@pytest.mark.parametrize("setting", SETTINGS, ids=_setting_id)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_exact_reduction_equals_the_average_gradient(reduced: list[dict[Any, Any]], case: Case,
                                                     setting: tuple[str | None, str | None, bool, str]) -> None:
    force, collective, cosines, dtype = setting
    r0, r1 = (r[(case.name, *setting)] for r in reduced)
    # bitwise the same on both ranks (NaN where a cosine is undefined)
    torch.testing.assert_close(r0["norms"], r1["norms"], rtol=0, atol=0, equal_nan=True)
    if cosines:
        torch.testing.assert_close(r0["cosines"], r1["cosines"], rtol=0, atol=0, equal_nan=True)
    else:
        assert r0["cosines"] is None
    if case.name == "nothing-measured":  # (no rank recorded per-task gradients: NaN, not zeros)
        assert r0["norms"].isnan().all() and (not cosines or r0["cosines"].isnan().all())
        return
    want_norms, want_cos = reference(case, WORLD)
    tol = 1e-12 if dtype == "float64" else 1e-5
    got = r0["norms"].double()
    assert got.dtype == torch.float64 and r0["norms"].dtype == getattr(torch, dtype)
    present = want_norms > 0
    torch.testing.assert_close(got[present], want_norms[present], rtol=tol, atol=0)
    assert (got[~present] == 0).all()
    if cosines:
        cos = r0["cosines"].double()
        both = present[:, None] & present[None, :]
        torch.testing.assert_close(cos[both], want_cos[both], rtol=0, atol=tol)
        assert cos[~both].isnan().all()  # an absent task's cosines are undefined
        assert not want_cos[both].isnan().any()
    names = [name for name, _ in r0["calls"]]
    if force is None:  # (small blocks: the dense block and the loss sums in one all-reduce)
        assert names == ["all_reduce"]
        return
    assert names[0] == "all_gather" and names[-1] == "all_reduce"  # descriptions ... shares + losses
    gathered = names.count("all_gather") > 1
    dense = "all_to_all_single" in names or "reduce_scatter" in names
    if collective in ("reduce_scatter", "as-nccl"):
        assert "all_to_all_single" not in names
    elif dense:
        assert "reduce_scatter" not in names  # gloo: the all-to-all, with the reduce-scatter's bytes
    if force == "dense":
        assert not gathered
    if force == "bytes" and case.expect is not None:
        assert (gathered, dense) == case.expect, names


@pytest.mark.parametrize("case", [c for c in CASES if c.name in ("factored", "mixed", "absent-on-one-rank")],
                         ids=lambda c: c.name)
def test_approx_gives_mean_local_norms_and_cosines_of_the_summed_local_grams(
        reduced: list[dict[Any, Any]], case: Case) -> None:
    """``distributed="approx"``: the mean of the ranks' local norms, and with cosines those of the sum
    of the ranks' local Gram matrices (the products between ranks' gradients left out)."""
    local = [local_reference(case, r) for r in range(WORLD)]
    norms = torch.stack([g.norm(dim=1) for g in local]).mean(dim=0)
    gram = sum(g @ g.T for g in local)
    d = gram.diagonal().sqrt()
    cos = gram / d[:, None] / d[None, :]
    for cosines in (True, False):
        r0, r1 = (r[(case.name, "approx", None, cosines, "float64")] for r in reduced)
        torch.testing.assert_close(r0["norms"], r1["norms"], rtol=0, atol=0)
        torch.testing.assert_close(r0["norms"], norms, rtol=1e-12, atol=0)
        if cosines:
            torch.testing.assert_close(r0["cosines"], cos, rtol=0, atol=1e-12)
    _, exact_cos = reference(case, WORLD)
    assert (exact_cos - cos).abs().max() > 1e-3  # (not the exact cosines)


def test_the_cases_have_power() -> None:
    """The reference's cosines are far from 1 and differ between the cases' average gradient and
    one rank's own: a reduction that kept a rank's local statistics would fail."""
    case = CASES[0]
    _, cos = reference(case, WORLD)
    alone = Case(case.name, (case.passes[0], ((),)))
    _, cos_alone = reference(alone, WORLD)
    off = ~torch.eye(3, dtype=torch.bool)
    assert cos[off].abs().max() < 0.9
    assert (cos - cos_alone)[off].abs().max() > 1e-2


def test_ddp_bytes_benchmark_runs(tmp_path: Path) -> None:
    """``benchmarks/ddp_bytes.py`` on the tiny workload (no timing checked): every mode reports,
    and the byte counts follow the collectives (the 'before' mode all-reduces the dense block)."""
    from benchmarks import ddp_bytes

    out = tmp_path / "ddp.md"
    assert ddp_bytes.main(["--tiny", "--batch", "4", "--steps", "2", "--warmup", "1", "--out", str(out)]) == 0
    rows = [line for line in out.read_text().splitlines() if line.startswith("| ") and "ms" not in line]
    assert len(rows) == len(ddp_bytes.MODES)
    before, shipped, dense, cosines, approx, plain = rows
    assert "| all_reduce |" in before and "| all_reduce |" in shipped  # (tiny: one all-reduce)
    assert "all_to_all_single" in dense and "| — |" in plain
    assert "| all_reduce |" in cosines and "| all_reduce |" in approx
