"""The package on a CUDA device (issue 11). Marked ``cuda``; every test skips without a GPU, so
CI (which has none) skips them all. ``python benchmarks/gpu_check.py`` runs them on a GPU
machine (``pytest -m cuda``), together with the training, mixed-precision and timing checks.

* the fast routes on CUDA against ``mode="autograd"`` on the CPU, float64, over generated
  models (``tests/model_zoo.py``): on a device the norms always take the scaled formula and
  the update runs as torch operations, so these are other code paths than the CPU suite's;
* no host synchronisation on the update path, with CUDA's own detector
  (``torch.cuda.set_sync_debug_mode("error")``) on top of the patched tensor reads of
  ``tests/test_no_sync.py``;
* Lightning fits in ``32-true``, ``bf16-mixed`` and ``16-mixed`` (the GradScaler's scale is
  divided out of the norms), and a balancer saved on the GPU loaded on the CPU.
"""

from __future__ import annotations

import copy
import io
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from lightning.pytorch.plugins import MixedPrecision

sys.path.insert(0, str(Path(__file__).resolve().parent))
from helpers.dist_models import MultiTask, Recorder, fit_single, make_batches, make_trainer

from gradnorm_lightning import GradNorm, GradNormCallback
from tests.model_zoo import Spec, batches, build, pairwise_specs
from tests.test_differential import autograd_spec, gradnorm_run, known_limitation, mismatch, refusal
from tests.test_no_sync import CASES, FAULTS, Model, run_faults

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

SPECS = pairwise_specs(0)


@contextmanager
def cuda_sync_errors(device: str = "cuda") -> Iterator[None]:
    """CUDA's synchronisation detector raises inside the block (nothing on the CPU)."""
    if torch.device(device).type != "cuda":
        yield
        return
    old = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(old)


def plain_cuda_error(spec: Spec) -> str | None:
    """The error PyTorch itself raises when it trains ``spec``'s model on CUDA without GradNorm
    (summed loss, one backward), or ``None``.

    Some generated models are valid on the CPU only: cuDNN's GRU and LSTM save their output for
    the backward, so an in-place op on that output (``relu_`` right after the layer) makes any
    backward through them fail on CUDA, with or without this package.
    """
    model = copy.deepcopy(build(spec)[0]).to("cuda")
    batch = batches(spec)[0].to("cuda")
    model.before_step(batch.step)
    losses = [loss for loss in model.task_losses(batch, None) if loss is not None and bool(torch.isfinite(loss))]
    try:
        torch.stack(losses).sum().backward()
    except RuntimeError as exc:
        return str(exc)
    return None


@pytest.mark.parametrize("views", [False, True], ids=["heads-read-z", "task_views"])
@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.id)
def test_cuda_route_matches_cpu_autograd(spec: Spec, views: bool) -> None:
    if views and not spec.views_valid:
        pytest.skip("this model's heads do not read z through views")
    error = plain_cuda_error(spec)
    if error is not None:  # not this package's to fix; it must not hide one of ours either
        pytest.skip(f"PyTorch itself cannot train this model on CUDA: {error.splitlines()[0][:300]}")
    if refusal(spec) is not None:
        with pytest.raises(ValueError, match=refusal(spec)):
            gradnorm_run(spec, "auto", views, device="cuda")
        return
    if known_limitation(spec) is not None:
        pytest.xfail(known_limitation(spec))
    want, _ = gradnorm_run(autograd_spec(spec), "autograd")  # (a masked mean: its index form)
    got, _ = gradnorm_run(spec, "auto", views, device="cuda")
    problem = mismatch(got, want)
    assert problem is None, f"[{spec.id}] views={views} on CUDA (routes {got.routes}) vs CPU autograd: {problem}"
    # the reference moved: the comparison is not one of constants
    assert (want.weights[-1] - 1.0).abs().max() > 1e-5


def guarded_fault_run(case: str, device: str) -> GradNorm:
    """``tests/test_no_sync.py``'s faulty run (NaN, Inf and missing tasks, an empty step) on
    ``device``, every step under both guards; returns the balancer."""
    kwargs, views, shared = CASES[case]
    model = Model(shared).to(device)
    gn = GradNorm(model.shared, 3, alpha=1.0, lr=0.1, **kwargs)
    calls: list[str] = []
    run_faults(gn, model, views, calls, device, lambda: cuda_sync_errors(device))
    assert calls == []
    return gn


@pytest.mark.parametrize("case", list(CASES))
def test_cuda_update_path_has_no_host_sync(case: str) -> None:
    gn = guarded_fault_run(case, "cuda")
    assert gn.weights.device.type == "cuda"
    assert not torch.allclose(gn.weights.cpu(), torch.ones(3))
    assert float(gn.weights.sum()) == pytest.approx(3.0, abs=1e-5)
    assert gn.skipped.tolist() == [2.0, 2.0, 3.0]
    assert float(gn.num_updates) == len(FAULTS) - 1
    # the same numbers as on the CPU (float32: other kernels, other rounding)
    want = guarded_fault_run(case, "cpu")
    assert torch.allclose(gn.weights.cpu(), want.weights, rtol=1e-4, atol=1e-5)


GN = {"alpha": 1.5, "lr": 0.01}


def test_cuda_lightning_32_true_matches_cpu() -> None:
    data = make_batches(6, 16, seed=7)
    gpu = fit_single(data, GN, accelerator="gpu")
    cpu = fit_single(data, GN)
    dw = (torch.stack(gpu.weights) - torch.stack(cpu.weights)).abs().max().item()
    assert len(gpu.weights) == 6
    assert dw < 1e-5, dw


def test_cuda_lightning_bf16_mixed() -> None:
    data = make_batches(6, 16, seed=6)
    bf16 = fit_single(data, {**GN, "optimizer": "adam"}, accelerator="gpu", precision="bf16-mixed")
    fp32 = fit_single(data, {**GN, "optimizer": "adam"}, accelerator="gpu")
    w, n = torch.stack(bf16.weights), torch.stack(bf16.norms)
    assert w.dtype == n.dtype == torch.float32
    assert torch.isfinite(w).all() and torch.isfinite(n).all()
    assert torch.allclose(w.sum(dim=1), torch.full((6,), 3.0))
    rel = ((n - torch.stack(fp32.norms)).abs() / torch.stack(fp32.norms)).max().item()
    assert rel < 5e-2, rel  # bf16 keeps about three significant digits


def test_cuda_lightning_16_mixed_unscales_norms() -> None:
    """A scale small enough that no step overflows: every step applies, and the norms are those
    of the unscaled loss (a forgotten unscale would be off by the scale, 2**8)."""
    data = make_batches(6, 16, seed=7)
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0**8)
    fp16 = fit_single(data, GN, accelerator="gpu", plugins=[MixedPrecision("16-mixed", "cuda", scaler=scaler)])
    fp32 = fit_single(data, GN, accelerator="gpu")
    n16, n32 = torch.stack(fp16.norms), torch.stack(fp32.norms)
    w16 = torch.stack(fp16.weights)
    assert len(n16) == 6
    assert torch.isfinite(w16).all() and torch.isfinite(n16).all()
    assert torch.allclose(w16.sum(dim=1), torch.full((6,), 3.0), atol=1e-5)
    rel = ((n16 - n32).abs() / n32).max().item()
    assert rel < 1e-2, rel


def test_cuda_lightning_16_mixed_default_scaler_skips_overflowed_steps() -> None:
    """Lightning's own GradScaler (scale 2**16): on this model the first steps overflow in fp16
    (seen on an H200: three of six, two of them with an infinite norm for one task). A step the
    scaler skips moves no weight and counts as skipped; every applied step moves the weights."""
    data = make_batches(6, 16, seed=7)
    cb, rec = GradNormCallback(**GN), Recorder()
    make_trainer([cb, rec], accelerator="gpu", precision="16-mixed").fit(MultiTask(data))
    gn = cb.balancer
    assert gn is not None
    w, n = torch.stack(rec.weights), torch.stack(rec.norms)
    assert len(w) == 6 and torch.isfinite(w).all()
    assert torch.allclose(w.sum(dim=1), torch.full((6,), 3.0), atol=1e-5)
    moved = (w != torch.cat([torch.ones(1, 3), w[:-1]])).any(dim=1)
    assert int(moved.sum()) == int(gn.num_updates) >= 3
    assert int(gn.skipped_updates) == 6 - int(gn.num_updates)
    assert not moved[~torch.isfinite(n).all(dim=1)].any()  # an overflowed norm never moved a weight


def test_balancer_saved_on_cuda_loads_on_cpu() -> None:
    gen = torch.Generator().manual_seed(3)
    model = Model("linear").cuda()
    gn = GradNorm(model.shared, 3, alpha=1.0, lr=0.1, optimizer="adam")
    for _ in range(3):
        x, y = torch.randn(8, 4, generator=gen).cuda(), torch.randn(8, 3, generator=gen).cuda()
        z = model.rep(x)
        losses = [torch.nn.functional.mse_loss(h(z).squeeze(1), y[:, i]) for i, h in enumerate(model.heads)]
        model.zero_grad()
        gn.combine(losses).backward()
        gn.step()
    buf = io.BytesIO()
    torch.save(gn.state_dict(), buf)
    buf.seek(0)
    cpu_model = Model("linear")
    restored = GradNorm(cpu_model.shared, 3, alpha=1.0, lr=0.1, optimizer="adam")
    restored.load_state_dict(torch.load(buf, map_location="cpu"))
    assert restored.weights.device.type == "cpu"
    assert torch.equal(restored.weights, gn.weights.cpu())
    assert torch.equal(restored.exp_avg, gn.exp_avg.cpu())
    assert restored.steps == gn.steps == 3
