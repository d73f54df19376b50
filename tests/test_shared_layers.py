"""Shared layers of real training code (issue 22, items 2-6): tied weights, activation
checkpointing, sparse embeddings, several shared modules, task views that heads misuse, and a
loss term outside the balancing.

Every model here is trained for a few float64 SGD steps by each route; the norms and weights
must equal an independent reference (one ``autograd.grad`` per task over the shared parameters,
written out here) and ``mode="autograd"``. The generated-shape families of the same kinds are in
``tests/test_differential.py``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any
from unittest import mock

import pytest
import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from gradnorm_lightning import GradNorm
from gradnorm_lightning.capture.stats import RowSparse

F64 = torch.float64
STEPS = 5


class Model(nn.Module):
    """A model for these tests: ``shared()`` is the shared layer, ``losses(g, views)`` the forward."""

    num_tasks = 2

    def shared(self) -> Any:
        raise NotImplementedError

    def losses(self, g: torch.Generator, views: Callable[[Tensor], Sequence[Tensor]] | None) -> list[Tensor]:
        raise NotImplementedError


def _params(shared: Any) -> list[Tensor]:
    modules = [shared] if isinstance(shared, nn.Module) and not isinstance(shared, nn.ModuleList) else list(shared)
    return [p for m in modules for p in m.parameters() if p.requires_grad]


def _norm(grads: Sequence[Tensor | None]) -> Tensor:
    sq = [(g.coalesce().values() if g.is_sparse else g).pow(2).sum() for g in grads if g is not None]
    return torch.stack(sq).sum().sqrt()


def run(make: Callable[[], Model], mode: str | None, views: bool = False, extra: bool = False,
        **kwargs: Any) -> tuple[Tensor, Tensor, str]:
    """``STEPS`` SGD steps; ``mode=None`` is the independent reference (no balancer: norms by one
    ``autograd.grad`` per task, the SGD rule of DESIGN.md section 1 written out)."""
    torch.manual_seed(0)
    model = make().double()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(1)
    gn = None if mode is None else GradNorm(model.shared(), num_tasks=model.num_tasks, alpha=1.5, lr=0.05,
                                            optimizer="sgd", mode=mode, **kwargs)
    w = torch.ones(model.num_tasks, dtype=F64)
    l0 = None
    out_w, out_n = [], []
    route = "reference"
    for _ in range(STEPS):
        losses = model.losses(g, gn.task_views if (gn is not None and views) else None)
        aux = getattr(model, "aux", None)
        opt.zero_grad()
        if gn is None:
            params = _params(model.shared())
            norms = torch.stack([_norm(torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True))
                                 for loss in losses])
            values = torch.stack([loss.detach() for loss in losses])
            l0 = values if l0 is None else l0
            total = sum(wi * loss for wi, loss in zip(w, losses))
            (total + aux if aux is not None else total).backward()
            ratio = values / l0
            r = ratio / ratio.mean()
            gw = w * norms
            grad = torch.sign(gw - gw.mean() * r**1.5) * norms
            w = (w - 0.05 * grad).clamp_min(1e-4)
            w = w * model.num_tasks / w.sum()
            out_w.append(w)
            out_n.append(norms)
        else:
            if aux is not None and extra:
                gn.combine(losses, extra=aux).backward()
            else:
                (gn.combine(losses) + (aux if aux is not None else 0.0)).backward()
            gn.step()
            out_w.append(gn.weights.clone())
            out_n.append(gn.last_stats["grad_norms"].clone())
            route = gn.last_stats["route"]
        opt.step()
    return torch.stack(out_w), torch.stack(out_n), route


def assert_exact(make: Callable[[], Model], views: bool = False, reference: Callable[[], Model] | None = None,
                 **kwargs: Any) -> str:
    """The route under test equals the independent reference and ``mode="autograd"`` (both on
    ``reference``, the same model written without what ``autograd.grad`` cannot cross, if given)."""
    ref_w, ref_n, _ = run(reference or make, None, **kwargs)
    auto_w, auto_n, _ = run(reference or make, "autograd", **kwargs)
    got_w, got_n, route = run(make, "auto", views=views, **kwargs)
    assert (ref_w[-1] - 1).abs().max() > 1e-4  # the weights moved
    for w, n, label in ((auto_w, auto_n, "autograd"), (got_w, got_n, f"auto views={views} ({route})")):
        torch.testing.assert_close(w, ref_w, rtol=0, atol=1e-12, msg=label)
        torch.testing.assert_close(n, ref_n, rtol=1e-12, atol=0, msg=label)
    return route


def _announced(make: Callable[[], Model], caplog: pytest.LogCaptureFixture, views: bool = False) -> str:
    import logging

    with caplog.at_level(logging.INFO, logger="gradnorm_lightning"):
        run(make, "auto", views=views)
    return " ".join(r.getMessage() for r in caplog.records if r.name == "gradnorm_lightning")


# ---------------------------------------------------------------------------- tied weights
class TiedEmbedding(Model):
    """A shared ``nn.Embedding`` whose weight also projects the output (tied output logits)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb, self.body, self.head = nn.Embedding(20, 8), nn.Linear(8, 8), nn.Linear(8, 1)

    def shared(self) -> Any:
        return self.emb

    def losses(self, g, views):  # type: ignore[no-untyped-def]
        idx = torch.randint(0, 20, (6, 3), generator=g)
        h = torch.tanh(self.body(self.emb(idx).mean(1)))
        logits = h @ self.emb.weight.T
        y = torch.randint(0, 20, (6,), generator=g)
        return [nn.functional.cross_entropy(logits, y), self.head(h).pow(2).mean()]


class TiedDecoder(Model):
    """A shared ``Linear`` encoder whose weight a tied decoder reuses (after the encoder's call)."""

    before = False

    def __init__(self) -> None:
        super().__init__()
        self.enc, self.head = nn.Linear(6, 4), nn.Linear(4, 1)

    def shared(self) -> Any:
        return self.enc

    def losses(self, g, views):  # type: ignore[no-untyped-def]
        x = torch.randn(5, 6, generator=g, dtype=F64)
        early = self.enc.weight * 1.0 if self.before else None  # a use made before the call
        z = torch.tanh(self.enc(x))
        zs = views(z) if views else [z, z]
        rec = zs[0] @ early if early is not None else nn.functional.linear(zs[0], self.enc.weight.T)
        return [(rec - x).pow(2).mean(), self.head(zs[1]).pow(2).mean()]


class TiedBefore(TiedDecoder):
    before = True


@pytest.mark.parametrize("views", [False, True], ids=["heads", "views"])
@pytest.mark.parametrize("make", [TiedEmbedding, TiedDecoder, TiedBefore], ids=["embedding", "decoder", "before"])
def test_tied_weights_are_exact(make: Callable[[], Model], views: bool) -> None:
    if views and make is TiedEmbedding:
        pytest.skip("the embedding model has no representation for views")
    route = assert_exact(make, views=views)
    assert route == ("losses" if make is TiedBefore else "heads")  # never the views: they miss the tied use


def test_tied_use_is_named_in_the_route(caplog: pytest.LogCaptureFixture) -> None:
    assert "a tied weight" in _announced(TiedDecoder, caplog)
    caplog.clear()
    assert "also used before the layer's call" in _announced(TiedBefore, caplog)


# ---------------------------------------------------------------------------- checkpointing
class Checkpointed(Model):
    """The shared ``Linear`` and its activation in a non-reentrant checkpointed block; heads
    optionally checkpointed too (reentrant or not)."""

    num_tasks = 3
    act: type[nn.Module] = nn.Tanh
    heads_reentrant: bool | None = None  # None: heads not checkpointed

    def __init__(self) -> None:
        super().__init__()
        self.pre = nn.Linear(5, 6)
        self.block = nn.Sequential(nn.Linear(6, 6), self.act())
        self.heads = nn.ModuleList([nn.Sequential(nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 1)) for _ in range(3)])

    def shared(self) -> Any:
        return self.block[0]

    def losses(self, g, views):  # type: ignore[no-untyped-def]
        x = torch.randn(7, 5, generator=g, dtype=F64)
        z = checkpoint(self.block, torch.tanh(self.pre(x)), use_reentrant=False)
        zs = views(z) if views else [z] * 3
        out = []
        for i, (h, v) in enumerate(zip(self.heads, zs)):
            y = h(v) if self.heads_reentrant is None else checkpoint(h, v, use_reentrant=self.heads_reentrant)
            out.append(y.pow(2).mean() * (i + 1))
        return out


class CheckpointedRelu(Checkpointed):
    act = nn.ReLU


class CheckpointedHeads(Checkpointed):
    heads_reentrant = False


class CheckpointedHeadsReentrant(Checkpointed):
    heads_reentrant = True


@pytest.mark.parametrize("views", [False, True], ids=["heads", "views"])
@pytest.mark.parametrize("make", [Checkpointed, CheckpointedRelu, CheckpointedHeads, CheckpointedHeadsReentrant],
                         ids=["tanh", "relu", "heads", "heads-reentrant"])
def test_non_reentrant_checkpointing_is_exact(make: Callable[[], Model], views: bool) -> None:
    # (autograd.grad cannot cross reentrant checkpointing: the references run the same heads unwrapped)
    assert_exact(make, views=views, reference=Checkpointed if make is CheckpointedHeadsReentrant else None)


def test_the_recompute_is_not_a_new_call() -> None:
    """Checkpointing runs the layer's forward again during the backward: not recorded."""
    torch.manual_seed(0)
    model = Checkpointed().double()
    gn = GradNorm(model.shared(), num_tasks=3)
    gn.combine(model.losses(torch.Generator().manual_seed(0), None)).backward()
    assert gn.recorder.pending_calls == 0
    gn.step()
    assert torch.isfinite(gn.last_stats["grad_norms"]).all()


class ReentrantBlock(Checkpointed):
    def losses(self, g, views):  # type: ignore[no-untyped-def]
        x = torch.randn(7, 5, generator=g, dtype=F64)
        z = checkpoint(self.block, torch.tanh(self.pre(x)), use_reentrant=True)
        return [h(z).pow(2).mean() for h in self.heads]


@pytest.mark.parametrize("mode", ["auto", "autograd"])
def test_reentrant_checkpointing_around_the_shared_layer_names_the_fix(mode: str) -> None:
    with pytest.raises(ValueError, match=r"use_reentrant=True.*use_reentrant=False|use_reentrant=False.*outside"):
        run(ReentrantBlock, mode)


# ---------------------------------------------------------------------------- embeddings
class Embedded(Model):
    """A shared embedding table (``sparse`` or dense, with a padding row) read by two heads."""

    sparse = True

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 4, sparse=self.sparse, padding_idx=0)
        self.heads = nn.ModuleList([nn.Linear(4, 1) for _ in range(2)])

    def shared(self) -> Any:
        return self.emb

    def losses(self, g, views):  # type: ignore[no-untyped-def]
        idx = torch.randint(0, 50, (6, 3), generator=g)
        idx[0, 0] = idx[1, 1] = 0  # the padding row, and repeats
        idx[2] = idx[3]
        z = self.emb(idx).sum(1)
        zs = views(z) if views else [z, z]
        return [h(v).pow(2).mean() * (i + 1) for i, (h, v) in enumerate(zip(self.heads, zs))]


class DenseEmbedded(Embedded):
    sparse = False


@pytest.mark.parametrize("views", [False, True], ids=["heads", "views"])
@pytest.mark.parametrize("make", [Embedded, DenseEmbedded], ids=["sparse", "dense"])
def test_embeddings_are_exact_over_the_rows_the_batch_touched(make: Callable[[], Model], views: bool) -> None:
    with mock.patch.object(RowSparse, "dense", side_effect=AssertionError("the table was materialised")):
        assert_exact(make, views=views)


class BigTable(Embedded):
    """A million-row sparse table: the per-task gradients must stay the rows the batch touched."""

    def __init__(self) -> None:
        Model.__init__(self)
        self.emb = nn.Embedding(1_000_000, 8, sparse=True)
        self.heads = nn.ModuleList([nn.Linear(8, 1) for _ in range(2)])


@pytest.mark.parametrize("mode", ["auto", "autograd"])
def test_a_big_sparse_table_is_never_materialised(mode: str) -> None:
    torch.manual_seed(0)
    model = BigTable()
    gn = GradNorm(model.shared(), num_tasks=2, mode=mode)
    with mock.patch.object(RowSparse, "dense", side_effect=AssertionError("the table was materialised")):
        gn.combine(model.losses(torch.Generator().manual_seed(0), None)).backward()
        gn.step()
    assert torch.isfinite(gn.last_stats["grad_norms"]).all()


# ---------------------------------------------------------------------------- several modules
class Experts(Model):
    """An MMoE whose experts are separate modules; the shared layer is their last layers."""

    container: Callable[[list[nn.Module]], Any] = nn.ModuleList

    def __init__(self) -> None:
        super().__init__()
        self.experts = nn.ModuleList([nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 4)) for _ in range(3)])
        self.gates = nn.ModuleList([nn.Linear(5, 3) for _ in range(2)])
        self.heads = nn.ModuleList([nn.Linear(4, 1) for _ in range(2)])

    def shared(self) -> Any:
        return type(self).container([e[-1] for e in self.experts])

    def losses(self, g, views):  # type: ignore[no-untyped-def]
        x = torch.randn(7, 5, generator=g, dtype=F64)
        e = torch.stack([ex(x) for ex in self.experts], 1)
        es = views(e) if views else [e, e]
        return [
            self.heads[i]((self.gates[i](x).softmax(-1)[:, :, None] * es[i]).sum(1)).pow(2).mean() * (i + 1)
            for i in range(2)
        ]


class ExpertsList(Experts):
    container = list


class ExpertsTuple(Experts):
    container = tuple


class StackedModules(Experts):
    """Two shared modules one after the other (a block given as its two layers)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(5, 6), nn.Linear(6, 4)

    def shared(self) -> Any:
        return [self.a, self.b]

    def losses(self, g, views):  # type: ignore[no-untyped-def]
        x = torch.randn(7, 5, generator=g, dtype=F64)
        z = torch.tanh(self.b(torch.relu(self.a(x))))
        zs = views(z) if views else [z, z]
        return [self.heads[i](v).pow(2).mean() * (i + 1) for i, v in enumerate(zs)]


@pytest.mark.parametrize("views", [False, True], ids=["heads", "views"])
@pytest.mark.parametrize("make", [Experts, ExpertsList, ExpertsTuple, StackedModules],
                         ids=["modulelist", "list", "tuple", "stacked"])
def test_several_shared_modules_are_exact(make: Callable[[], Model], views: bool) -> None:
    assert_exact(make, views=views)


def test_several_modules_are_named_and_each_gets_its_rule(caplog: pytest.LogCaptureFixture) -> None:
    text = _announced(Experts, caplog)
    assert "3 shared modules (Linear, Linear, Linear)" in text and "Linear ghost norm" in text


def test_a_bad_sequence_of_shared_modules_is_refused() -> None:
    with pytest.raises(ValueError, match="empty"):
        GradNorm([], num_tasks=2)
    with pytest.raises(TypeError, match=r"must hold `nn\.Module`s"):
        GradNorm([nn.Linear(2, 2), "layer"], num_tasks=2)  # type: ignore[list-item]
    frozen = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        GradNorm([frozen, nn.ReLU()], num_tasks=2)


# ---------------------------------------------------------------------------- task views misused
class Interacting(Model):
    """Head 1 reads head 0's hidden activation (a cross-task connection)."""

    def __init__(self) -> None:
        super().__init__()
        self.layer, self.h0 = nn.Linear(5, 6), nn.Linear(6, 6)
        self.o0, self.o1 = nn.Linear(6, 1), nn.Linear(6, 1)

    def shared(self) -> Any:
        return self.layer

    def losses(self, g, views):  # type: ignore[no-untyped-def]
        x = torch.randn(7, 5, generator=g, dtype=F64)
        z = torch.relu(self.layer(x))
        zs = views(z) if views else [z, z]
        a = torch.tanh(self.h0(zs[0]))
        return [self.o0(a).pow(2).mean(), self.o1(zs[1] + a).pow(2).mean() * 3]


class CrossStitch(Interacting):
    """Each head reads a learned mix of both views."""

    def losses(self, g, views):  # type: ignore[no-untyped-def]
        x = torch.randn(7, 5, generator=g, dtype=F64)
        z = torch.relu(self.layer(x))
        zs = views(z) if views else [z, z]
        mixed = [0.7 * zs[0] + 0.3 * zs[1], 0.4 * zs[0] + 0.6 * zs[1]]
        return [self.o0(mixed[0]).pow(2).mean(), self.o1(mixed[1]).pow(2).mean() * 3]


@pytest.mark.parametrize(("make", "why"), [(Interacting, "the heads interact"), (CrossStitch, "head 0 reads view 1")],
                         ids=["interacting", "cross-stitch"])
def test_interacting_heads_under_views_fall_back_exactly(make: Callable[[], Model], why: str,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    assert assert_exact(make, views=True) == "heads"
    assert f"not the task views, because {why}" in _announced(make, caplog, views=True)


class Detached(Interacting):
    def losses(self, g, views):  # type: ignore[no-untyped-def]
        x = torch.randn(7, 5, generator=g, dtype=F64)
        z = torch.relu(self.layer(x))
        zs = views(z) if views else [z, z]
        return [self.o0(zs[0]).pow(2).mean(), self.o1(zs[1].detach()).pow(2).mean()]


@pytest.mark.parametrize("views", [False, True], ids=["heads", "views"])
def test_a_head_reading_a_detached_view_gets_the_combine_message(views: bool) -> None:
    with pytest.raises(ValueError, match="'task1' does not depend on the shared layer"):
        run(Detached, "auto", views=views)


# ---------------------------------------------------------------------------- a term outside the balancing
class WithAux(Interacting):
    """An auxiliary loss (fixed weight) that reads head 0's own hidden activation."""

    def losses(self, g, views):  # type: ignore[no-untyped-def]
        x = torch.randn(7, 5, generator=g, dtype=F64)
        z = torch.relu(self.layer(x))
        zs = views(z) if views else [z, z]
        a = torch.tanh(self.h0(zs[0]))
        self.aux = 0.5 * a.pow(2).mean()
        return [self.o0(a).pow(2).mean(), self.o1(zs[1]).pow(2).mean() * 3]


@pytest.mark.parametrize("views", [False, True], ids=["heads", "views"])
def test_an_extra_term_stays_out_of_the_norms(views: bool) -> None:
    assert_exact(WithAux, views=views, extra=True)


def test_an_extra_term_added_outside_combine_is_counted_into_a_task() -> None:
    """The documented reason for ``extra=``: added to ``combine``'s result instead, the term's
    gradient enters head 0's private region and so that task's norm."""
    _, ref_n, _ = run(WithAux, None)
    _, got_n, _ = run(WithAux, "auto", extra=False)
    assert (got_n[:, 0] - ref_n[:, 0]).abs().max() > 1e-3


def test_lightning_warns_about_a_term_added_outside_combine() -> None:
    import warnings

    import lightning as L
    from torch.utils.data import DataLoader, TensorDataset

    from gradnorm_lightning import GradNormCallback, GradNormMixin

    class Net(GradNormMixin, L.LightningModule):
        task_names = ("a", "b")

        def __init__(self, use_extra: bool) -> None:
            super().__init__()
            self.use_extra = use_extra
            self.layer, self.h0, self.o0, self.o1 = nn.Linear(4, 6), nn.Linear(6, 6), nn.Linear(6, 1), nn.Linear(6, 1)

        def shared_layer(self) -> nn.Module:
            return self.layer

        def training_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
            (x,) = batch
            z = torch.relu(self.layer(x))
            a = torch.tanh(self.h0(z))
            losses = {"a": self.o0(a).pow(2).mean(), "b": self.o1(z).pow(2).mean()}
            aux = 0.1 * a.pow(2).mean()  # reads head a's own activation
            if self.use_extra:
                return self.combine_task_losses(losses, extra=aux)
            return self.combine_task_losses(losses) + aux

        def configure_optimizers(self):  # type: ignore[no-untyped-def]
            return torch.optim.SGD(self.parameters(), lr=0.01)

    messages = {}
    for use_extra in (False, True):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            L.Trainer(max_steps=3, callbacks=[GradNormCallback()], logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False).fit(
                Net(use_extra), DataLoader(TensorDataset(torch.randn(24, 4)), batch_size=8))
        messages[use_extra] = [str(w.message) for w in caught if "extra=" in str(w.message)]
    assert len(messages[False]) == 1 and "['a']" in messages[False][0]
    assert messages[True] == []
