"""Issue 24, item 4: ``task_cosines=True``, the Gram kernels behind it, and its logging.

The reference for every cosine here is written out in the test: per-task gradients in float64
(``einsum``/``index_add`` for the kernels, one ``torch.autograd.grad`` per task for models),
``cos[a, b] = <g_a, g_b> / (|g_a| |g_b|)``. The generated-model comparison is
``tests/test_differential_cosines.py``; under DDP, ``tests/test_ddp_reduction.py`` and
``tests/test_plain_ddp_fsdp.py``.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from torch import Tensor, nn

from gradnorm_lightning import GradNorm, GradNormCallback
from gradnorm_lightning.capture.gram import Gram, dense_gram, factored_gram
from gradnorm_lightning.capture.stats import RowSparse
from tests.lightning_models import MultiTaskNet, loader, trainer

F64 = torch.float64
TINY32 = torch.finfo(torch.float32).tiny


def cos_of(g: Tensor) -> tuple[Tensor, Tensor]:
    """``(cosines, norms)`` of the rows of ``g`` (float64)."""
    g = g.reshape(g.shape[0], -1).to(F64)
    n = g.norm(dim=1)
    return (g @ g.T) / n[:, None] / n[None, :], n


def _as_device(monkeypatch: pytest.MonkeyPatch, host: bool) -> None:
    """``host=False``: behave as on a device (no free host reads: the scaled formulas always)."""
    from gradnorm_lightning import _arrays

    if not host:
        monkeypatch.setattr(_arrays, "host_reads_free", lambda device: False)


# ------------------------------------------------------------------------------ the kernels
@pytest.mark.parametrize("host", [True, False], ids=["host", "device"])
def test_dense_gram_is_overflow_safe_in_float32(host: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    _as_device(monkeypatch, host)
    gen = torch.Generator().manual_seed(0)
    g = torch.randn(4, 300, generator=gen, dtype=F64) * torch.tensor([1e-25, 1.0, 1e18, 3e36], dtype=F64)[:, None]
    g[3, :150] = g[2, :150] * 1e18  # (tasks 2 and 3 correlated)
    gram = dense_gram(g.float())
    want_cos, want_n = cos_of(g.float())
    torch.testing.assert_close(gram.norms().double(), want_n, rtol=1e-5, atol=TINY32)
    torch.testing.assert_close(gram.cosines().double(), want_cos, rtol=0, atol=1e-5)
    assert torch.isfinite(gram.cosines()).all()
    plain = (g.float() @ g.float().T)  # what the unscaled products give: overflow and underflow
    assert not torch.isfinite(plain).all() or (plain.diagonal()[0] == 0)


@pytest.mark.parametrize("host", [True, False], ids=["host", "device"])
@pytest.mark.parametrize(("n", "d_in", "d_out"), [(3, 50, 40), (200, 4, 3)], ids=["ghost", "direct"])
@pytest.mark.parametrize(("weight", "bias"), [(True, True), (True, False), (False, True)])
def test_factored_gram_matches_materialised_gradients(n: int, d_in: int, d_out: int, weight: bool, bias: bool,
                                                      host: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Both formulas (the ghost identity, then the direct product), float64 to 1e-12 and float32
    with task scales from 1e-25 to 1e18 (rows to 1e15) to 1e-5, absent tasks zeroed."""
    _as_device(monkeypatch, host)
    gen = torch.Generator().manual_seed(1)
    for row_scale in (1e-20, 1.0, 1e15):
        rows = torch.randn(n, d_in, generator=gen, dtype=F64) * row_scale
        scales = torch.tensor([1e-25, 1.0, 1e18, 1.0], dtype=F64)
        grads = torch.randn(4, n, d_out, generator=gen, dtype=F64) * scales[:, None, None]
        grads[3] = grads[1] * 0.5 + torch.randn(n, d_out, generator=gen, dtype=F64) * 0.1  # (a correlated pair)
        parts = []
        if weight:
            parts.append(torch.einsum("tno,ni->toi", grads, rows).flatten(1))
        if bias:
            parts.append(grads.sum(dim=1))
        dense = torch.cat(parts, dim=1)
        want_cos, want_n = cos_of(dense)
        f64 = factored_gram(rows, grads, weight, bias)
        torch.testing.assert_close(f64.norms(), want_n, rtol=1e-12, atol=0)
        torch.testing.assert_close(f64.cosines(), want_cos, rtol=0, atol=1e-12)
        f32 = factored_gram(rows.float(), grads.float(), weight, bias)
        torch.testing.assert_close(f32.norms().double(), want_n, rtol=1e-5, atol=TINY32)
        torch.testing.assert_close(f32.cosines().double(), want_cos, rtol=0, atol=1e-5)
        # the diagonal alone is the norms
        torch.testing.assert_close(factored_gram(rows, grads, weight, bias, diagonal=True).norms(), want_n,
                                   rtol=1e-12, atol=0)
        # an absent task (NaN output gradients) has zero norm and NaN cosines, the others unchanged
        nan = grads.clone()
        nan[0] = float("nan")
        present = torch.tensor([False, True, True, True])
        masked = factored_gram(rows, nan, weight, bias, present)
        assert masked.norms()[0] == 0 and masked.cosines()[0].isnan().all() and masked.cosines()[:, 0].isnan().all()
        torch.testing.assert_close(masked.cosines()[1:, 1:], want_cos[1:, 1:], rtol=0, atol=1e-12)


def test_row_sparse_gram_sums_repeated_rows_first() -> None:
    gen = torch.Generator().manual_seed(2)
    idx = torch.tensor([3, 1, 3, 7, 1, 3])
    values = torch.randn(3, 6, 5, generator=gen, dtype=F64)
    table = torch.zeros(3, 10, 5, dtype=F64).index_add_(1, idx, values)
    want_cos, want_n = cos_of(table)
    gram = RowSparse(idx, values, 10).gram()
    torch.testing.assert_close(gram.norms(), want_n, rtol=1e-12, atol=0)
    torch.testing.assert_close(gram.cosines(), want_cos, rtol=0, atol=1e-12)
    # (without summing the repeats first, the norms would be different)
    assert (cos_of(values)[1] - want_n).abs().max() > 1e-3


def test_grams_of_disjoint_pieces_add_on_a_common_scale() -> None:
    """Two pieces in float32 whose tasks' gradients range over 1e-20 to 3e30, the larger piece a
    different one for different tasks: the total is the Gram of the concatenation, finite."""
    gen = torch.Generator().manual_seed(3)
    a = torch.randn(3, 40, generator=gen, dtype=F64) * torch.tensor([1e30, 1.0, 1e-20], dtype=F64)[:, None]
    b = torch.randn(3, 60, generator=gen, dtype=F64) * torch.tensor([3e30, 0.2, 5e-20], dtype=F64)[:, None]
    b[:, :40] += 0.5 * a  # (correlated tasks: cosines away from 0)
    pieces = [dense_gram(a.float()), dense_gram(b.float())]
    assert all(p.scale is not None for p in pieces)  # (the scaled form: plain squares overflow)
    total = Gram.total(pieces)
    want_cos, want_n = cos_of(torch.cat([a, b], dim=1))
    torch.testing.assert_close(total.norms().double(), want_n, rtol=1e-5, atol=0)
    torch.testing.assert_close(total.cosines().double(), want_cos, rtol=0, atol=1e-5)
    assert want_cos[~torch.eye(3, dtype=torch.bool)].abs().max() > 0.1


def test_a_diagonal_gram_has_no_cosines() -> None:
    with pytest.raises(ValueError, match="squared norms only"):
        dense_gram(torch.ones(2, 3), diagonal=True).cosines()


# ------------------------------------------------------------------------------ GradNorm
def _heads(width: int, num_tasks: int, dtype: torch.dtype) -> nn.ModuleList:
    return nn.ModuleList([nn.Sequential(nn.Linear(width, 4), nn.Tanh(), nn.Linear(4, 1)) for _ in range(num_tasks)]).to(dtype)


def _run(shared: nn.Module | Sequence[nn.Module], forward: Callable[[int], Tensor], heads: nn.ModuleList,
         steps: int = 3, absent: dict[int, int] | None = None, accumulate: int = 1, mode: str = "auto",
         views: bool = False, cosines: bool = True, dtype: torch.dtype = F64) -> tuple[list[Tensor], list[Tensor], GradNorm]:
    """Train ``steps`` steps; per step, the cosines GradNorm reports and the reference from
    ``autograd.grad`` per task (over the trainable parameters of the shared modules), summed over
    the ``accumulate`` micro-batches like the model's gradients. ``absent``: step -> task with a
    NaN loss (a masked mean over an empty mask) in the first micro-batch."""
    modules = list(shared) if isinstance(shared, (list, tuple, nn.ModuleList)) else [shared]
    gn = GradNorm(shared, num_tasks=len(heads), optimizer="sgd", lr=0.05, mode=mode, task_cosines=cosines)
    params = [p for m in modules for p in m.parameters() if p.requires_grad]
    everything = {id(p): p for m in [*modules, heads] for p in m.parameters()}
    opt = torch.optim.SGD(list(everything.values()), lr=0.05)
    got, want = [], []
    for step in range(steps):
        opt.zero_grad()
        total = None
        for micro in range(accumulate):
            z = forward(step * accumulate + micro)
            zs = gn.task_views(z) if views else [z] * len(heads)
            losses: list[Tensor] = []
            for t, (head, zz) in enumerate(zip(heads, zs)):
                err = head(zz).squeeze(-1).pow(2) * (t + 1)
                if absent is not None and absent.get(step) == t and micro == 0:
                    losses.append(err[torch.zeros_like(err, dtype=torch.bool)].mean())  # NaN, with a graph
                else:
                    losses.append(err.mean())
            grads = []
            for loss in losses:
                if not torch.isfinite(loss):
                    grads.append(None)
                    continue
                g = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
                grads.append(torch.cat([torch.zeros(p.numel(), dtype=F64) if x is None
                                        else (x.to_dense() if x.is_sparse else x).reshape(-1).to(F64)
                                        for x, p in zip(g, params)]))
            flat = torch.stack([g if g is not None else torch.zeros_like(next(x for x in grads if x is not None))
                                for g in grads])
            total = flat if total is None else total + flat
            (gn.combine(losses) / accumulate).backward()
        gn.step()
        opt.step()
        assert total is not None
        got.append(gn.last_stats["cosines"].to(F64) if cosines else gn.last_stats["grad_norms"].to(F64))
        want.append(cos_of(total)[0])
    return got, want, gn


def _linear(dtype: torch.dtype = F64) -> tuple[nn.Module, Callable[[int], Tensor]]:
    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 6)).to(dtype)
    xs = torch.randn(12, 9, 5, dtype=dtype)
    return trunk[2], lambda k: torch.tanh(trunk(xs[k]))


@pytest.mark.parametrize("kind", ["linear", "conv", "layernorm", "embedding", "embedding-sparse", "two-modules"])
@pytest.mark.parametrize("views", [False, True])
def test_cosines_match_autograd_over_the_shared_parameters(kind: str, views: bool) -> None:
    torch.manual_seed(0)
    shared: nn.Module | list[nn.Module]
    if kind == "linear":
        shared, forward = _linear()
        width = 6
    elif kind == "conv":
        conv = nn.Conv1d(2, 3, 3, padding=1).double()
        xs = torch.randn(12, 9, 2, 5, dtype=F64)
        shared, forward, width = conv, (lambda k: torch.tanh(conv(xs[k])).flatten(1)), 15
    elif kind == "layernorm":
        pre, norm = nn.Linear(5, 6).double(), nn.LayerNorm(6).double()
        xs = torch.randn(12, 9, 5, dtype=F64)
        shared, forward, width = norm, (lambda k: torch.tanh(norm(pre(xs[k])))), 6
    elif kind.startswith("embedding"):
        emb = nn.Embedding(20, 6, sparse=kind.endswith("sparse")).double()
        idx = torch.randint(0, 8, (12, 9))  # (repeated rows)
        shared, forward, width = emb, (lambda k: emb(idx[k])), 6
    else:
        a, b = nn.Linear(5, 6).double(), nn.Linear(5, 6).double()
        xs = torch.randn(12, 9, 5, dtype=F64)
        shared, forward, width = [a, b], (lambda k: torch.tanh(a(xs[k]) + torch.relu(b(xs[k])))), 6
    got, want, gn = _run(shared, forward, _heads(width, 3, F64), views=views)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-12)
    off = ~torch.eye(3, dtype=torch.bool)
    assert want[0][off].abs().max() < 0.999 and want[0][off].abs().min() > 1e-3  # (not trivial)
    assert gn.last_stats["cosines"].shape == (3, 3)


def test_absent_task_gets_nan_cosines_and_accumulation_sums_the_passes() -> None:
    """Two micro-batches per step, task 1 absent from the first micro-batch of step 1 and from
    both of step 2: the cosines are those of the accumulated gradients; NaN only where absent
    from the whole step."""
    shared, forward = _linear()
    heads = _heads(6, 3, F64)
    got, want, _ = _run(shared, forward, heads, steps=3, accumulate=2, absent={1: 1})
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-12)
    assert not got[1].isnan().any()  # present in one of the step's micro-batches
    shared, forward = _linear()
    got, want, _ = _run(shared, forward, heads, steps=3, absent={2: 1})
    assert got[2][1].isnan().all() and got[2][:, 1].isnan().all()
    keep = torch.tensor([True, False, True])
    torch.testing.assert_close(got[2][keep][:, keep], want[2][keep][:, keep], rtol=0, atol=1e-12)


@pytest.mark.parametrize("mode", ["auto", "autograd"])
def test_norms_and_weights_are_the_same_with_cosines_on(mode: str) -> None:
    """Cosines on: the norms come from the Gram's diagonal, and the trajectory is unchanged."""
    runs = []
    for cosines in (False, True):
        shared, forward = _linear()
        heads = _heads(6, 3, F64)
        gn = GradNorm(shared, num_tasks=3, optimizer="sgd", lr=0.05, mode=mode, task_cosines=cosines)
        norms, weights = [], []
        for k in range(5):
            z = forward(k)
            gn.combine([h(z).pow(2).mean() * (t + 1) for t, h in enumerate(heads)]).backward()
            gn.step()
            norms.append(gn.last_stats["grad_norms"])
            weights.append(gn.weights.clone())
            assert ("cosines" in gn.last_stats) == cosines
        runs.append((torch.stack(norms), torch.stack(weights)))
    torch.testing.assert_close(runs[0][0], runs[1][0], rtol=1e-12, atol=0)
    torch.testing.assert_close(runs[0][1], runs[1][1], rtol=0, atol=1e-12)


@pytest.mark.parametrize("host", [True, False], ids=["host", "device"])
def test_float32_cosines_of_a_large_layer(host: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """float32 with outputs up to 1e20 (squares overflow float32): finite, right to 1e-5."""
    _as_device(monkeypatch, host)
    torch.manual_seed(0)
    shared = nn.Linear(30, 20)
    heads = nn.ModuleList([nn.Linear(20, 1) for _ in range(3)])
    x = torch.randn(16, 30)
    gn = GradNorm(shared, num_tasks=3, task_cosines=True)
    z = shared(x)
    losses = [heads[t](z).pow(2).mean() * s for t, s in enumerate((1e-20, 1.0, 1e20))]
    grads = [torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(shared.parameters()), retain_graph=True)])
             for loss in losses]
    want = cos_of(torch.stack([g.double() for g in grads]))[0]
    gn.combine(losses).backward()
    gn.step()
    got = gn.last_stats["cosines"]
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------ the callback
def test_callback_logs_each_pair_once_in_task_order(tmp_path: Path) -> None:
    model = MultiTaskNet()
    logger = CSVLogger(tmp_path)
    cb = GradNormCallback(optimizer="sgd", task_cosines=True)
    trainer(8, logger=logger, log_every_n_steps=4, callbacks=[cb]).fit(model, loader(3, 8))
    with open(Path(logger.log_dir) / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    keys = {k for k in rows[0] if k.startswith("gradnorm/cosine/")}
    assert keys == {"gradnorm/cosine/t0/t1", "gradnorm/cosine/t0/t2", "gradnorm/cosine/t1/t2"}
    last = [r for r in rows if r["gradnorm/cosine/t0/t1"]][-1]
    assert cb.balancer is not None
    cos = cb.balancer.last_stats["cosines"]
    for a, b in ((0, 1), (0, 2), (1, 2)):
        assert math.isclose(float(last[f"gradnorm/cosine/t{a}/t{b}"]), float(cos[a, b]), rel_tol=1e-6)
    # off by default: no cosine keys
    off = CSVLogger(tmp_path / "off")
    trainer(4, logger=off, log_every_n_steps=2, callbacks=[GradNormCallback(optimizer="sgd")]).fit(
        MultiTaskNet(), loader(3, 4))
    with open(Path(off.log_dir) / "metrics.csv") as f:
        assert not any(k.startswith("gradnorm/cosine/") for k in next(csv.DictReader(f)))


def test_figure_draws_one_cosine_line_per_pair(tmp_path: Path) -> None:
    """``gradnorm-plot`` on a fit with ``task_cosines=True``: the cosine panel has the three
    pairs (not counted as tasks), the other panels the three tasks."""
    from gradnorm_lightning.experiments import plotting

    logger = CSVLogger(tmp_path)
    trainer(8, logger=logger, log_every_n_steps=2,
            callbacks=[GradNormCallback(optimizer="sgd", task_cosines=True)]).fit(MultiTaskNet(), loader(3, 8))
    metrics = plotting.read_metrics(plotting.find_metrics_csv(tmp_path))
    panel = next(p for p in plotting.PANELS if p.prefix == "gradnorm/cosine/")
    assert sorted(plotting._panel_series(metrics, panel)) == ["t0/t1", "t0/t2", "t1/t2"]
    weights = next(p for p in plotting.PANELS if p.prefix == "gradnorm/weight/")
    assert sorted(plotting._panel_series(metrics, weights)) == ["t0", "t1", "t2"]
    fig = plotting.draw_runs([metrics], ["run"])
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert any(t.startswith("task-gradient cosine") for t in titles) and len(titles) == 6
    cosine_ax = next(ax for ax in fig.axes if ax.get_title().startswith("task-gradient cosine"))
    assert len(cosine_ax.get_lines()) == 3 + 1  # three pairs and the line at 0
    assert cosine_ax.get_ylim() == (-1.05, 1.05)
    legend = [t.get_text() for ax in fig.axes if ax.get_legend() for t in ax.get_legend().get_texts()]
    assert legend == ["t0", "t1", "t2", "cosine t0/t1", "cosine t0/t2", "cosine t1/t2"]
    out = plotting.plot_runs([tmp_path], tmp_path / "fig.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
