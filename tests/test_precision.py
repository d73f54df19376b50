"""Issue 4: mixed precision. bf16-mixed keeps the balancer in float32; under fp16 the
GradScaler's scale is divided out of the norms and a step whose gradients overflowed
(``found_inf``) moves none of the balancer's trajectory state."""

from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.plugins import MixedPrecision

sys.path.insert(0, str(Path(__file__).resolve().parent))
from helpers.dist_models import Net, Recorder, fit_single, make_batches

from gradnorm_lightning import GradNorm, GradNormCallback

STEPS = 4
GN = {"alpha": 1.5, "lr": 0.01}
# The balancer state that defines the trajectory; `steps` and `skipped_updates` count calls/skips.
TRAJECTORY_STATE = (
    "weights", "initial_loss_sum", "initial_loss_count", "exp_avg", "exp_avg_sq", "adam_steps",
    "num_updates", "skipped",
)


def _balancer(trainer: L.Trainer) -> GradNorm:
    cb = next(c for c in trainer.callbacks if isinstance(c, GradNormCallback))
    assert cb.balancer is not None
    return cb.balancer


def test_bf16_mixed_keeps_balancer_float32() -> None:
    batches = make_batches(STEPS, 16, seed=6)
    gn_kwargs = {**GN, "optimizer": "adam"}
    bf16 = fit_single(batches, gn_kwargs, precision="bf16-mixed")
    fp32 = fit_single(batches, gn_kwargs)
    w_bf16, n_bf16 = torch.stack(bf16.weights), torch.stack(bf16.norms)
    assert len(bf16.weights) == STEPS
    assert w_bf16.dtype == n_bf16.dtype == torch.float32
    assert torch.isfinite(w_bf16).all() and torch.isfinite(n_bf16).all()
    assert torch.allclose(w_bf16.sum(dim=1), torch.full((STEPS,), 3.0))
    dev = (w_bf16 - torch.stack(fp32.weights)).abs().max().item()
    rel_n = ((n_bf16 - torch.stack(fp32.norms)).abs() / torch.stack(fp32.norms)).max().item()
    print(f"bf16-mixed vs 32-true: |dw| {dev:.2e}, rel |dn| {rel_n:.2e}")
    assert dev < 2e-2 and rel_n < 5e-2  # bf16 has ~3 significant digits


def test_bf16_mixed_balancer_state_dtypes() -> None:
    batches = make_batches(2, 16, seed=6)
    cb = GradNormCallback(**GN, optimizer="adam")
    rec = Recorder()
    from helpers.dist_models import MultiTask, make_trainer

    make_trainer([cb, rec], precision="bf16-mixed").fit(MultiTask(batches))
    gn = cb.balancer
    assert gn is not None
    for name in TRAJECTORY_STATE:
        assert getattr(gn, name).dtype == torch.float32, name
    assert float(gn.adam_steps.min()) == 2  # Adam state actually used
    assert torch.isfinite(gn.last_stats["grad_norms"]).all()


def _fp16_plugin(init_scale: float) -> MixedPrecision:
    return MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=init_scale))


def test_fp16_mixed_lightning_unscales_norms() -> None:
    """fp16 autocast + GradScaler on CPU (explicit plugin: Lightning maps `precision='16-mixed'`
    on CPU to bf16). A small initial scale avoids overflow, so every step applies; the norms
    must be those of the unscaled loss (a forgotten unscale would be off by 2**8)."""
    batches = make_batches(STEPS, 16, seed=7)
    fp16 = fit_single(batches, GN, plugins=[_fp16_plugin(2.0**8)])
    fp32 = fit_single(batches, GN)
    n16, n32 = torch.stack(fp16.norms), torch.stack(fp32.norms)
    w16, w32 = torch.stack(fp16.weights), torch.stack(fp32.weights)
    rel = ((n16 - n32).abs() / n32).max().item()
    dev = (w16 - w32).abs().max().item()
    print(f"16-mixed (CPU, GradScaler) vs 32-true: rel |dn| {rel:.2e}, |dw| {dev:.2e}")
    assert torch.isfinite(n16).all()
    assert rel < 1e-2
    assert dev < 1e-3


class _InjectInf(L.Callback):
    """Puts an inf into one model gradient after the backward of batch ``at``."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.batch_idx = batch_idx

    def on_after_backward(self, trainer, pl_module) -> None:
        if self.batch_idx == self.at:
            pl_module.net.heads[0].weight.grad[0, 0] = float("inf")


def test_fp16_mixed_lightning_found_inf_skips_update() -> None:
    batches = make_batches(STEPS, 16, seed=8)
    from helpers.dist_models import MultiTask, make_trainer

    cb, rec = GradNormCallback(**GN), Recorder()
    trainer = make_trainer([cb, rec, _InjectInf(at=2)], plugins=[_fp16_plugin(2.0**8)])
    trainer.fit(MultiTask(batches))
    w = torch.stack(rec.weights)
    gn = _balancer(trainer)
    assert torch.equal(w[2], w[1])  # the skipped step left the weights alone
    assert not torch.equal(w[3], w[2])  # and the next one updated them
    assert float(gn.num_updates) == STEPS - 1
    assert float(gn.skipped_updates) == 1


def _scaled_run(batches, scaler: torch.amp.GradScaler | None, inject_at: int | None = None,
                skip_batch: int | None = None, snapshot_at: int | None = None):
    net = Net(seed=0)
    gn = GradNorm(net.shared, num_tasks=3, **GN, optimizer="adam")
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    weights, snaps = [], {}
    for i, (x, y) in enumerate(batches):
        if i == skip_batch:
            continue
        opt.zero_grad()
        loss = gn.combine(net.task_losses(x, y))
        if scaler is None:
            loss.backward()
            gn.step()
            opt.step()
        else:
            scaler.scale(loss).backward()
            if i == inject_at:
                net.heads[1].bias.grad.fill_(float("nan"))
            scaler.unscale_(opt)
            found = sum(scaler._per_optimizer_states[id(opt)]["found_inf_per_device"].values())
            if i == snapshot_at:
                snaps["before"] = gn.state_dict()
            gn.step(grad_scale=scaler._scale, found_inf=found)
            if i == snapshot_at:
                snaps["after"] = gn.state_dict()
            scaler.step(opt)
            scaler.update()
        weights.append(gn.weights.clone())
    return torch.stack(weights), gn, snaps


def test_plain_gradscaler_matches_unscaled_run() -> None:
    batches = make_batches(5, 16, seed=9)
    w_ref, _, _ = _scaled_run(batches, None)
    w_scaled, gn, _ = _scaled_run(batches, torch.amp.GradScaler("cpu", init_scale=2.0**16))
    dev = (w_scaled - w_ref).abs().max().item()
    print(f"plain GradScaler (scale 2**16) vs unscaled: |dw| {dev:.2e}")
    assert dev < 1e-6
    assert float(gn.num_updates) == 5
    assert (w_ref[-1] - 1).abs().max() > 1e-3


@pytest.mark.parametrize("at", [0, 2], ids=["first-step", "later-step"])
def test_plain_gradscaler_found_inf_leaves_state_unchanged(at: int) -> None:
    batches = make_batches(5, 16, seed=10)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    w, _, snaps = _scaled_run(batches, scaler, inject_at=at, snapshot_at=at)
    before, after = snaps["before"], snaps["after"]
    for name in TRAJECTORY_STATE:
        assert torch.equal(before[name], after[name]), name
    assert float(after["skipped_updates"]) == float(before["skipped_updates"]) + 1
    assert after["steps"] == before["steps"] + 1
    # Nothing of the skipped step leaks into later ones (not L(0), not the pending statistics):
    # the run equals an unscaled run that never saw that batch.
    w_ref, _, _ = _scaled_run(batches, None, skip_batch=at)
    kept = [i for i in range(len(batches)) if i != at]
    dev = (w[kept] - w_ref).abs().max().item()
    print(f"found_inf at step {at}: run vs run without that batch: |dw| {dev:.2e}")
    assert dev < 1e-6


def test_64_true_balancer_follows_the_model_to_float64() -> None:
    """Lightning converts the model to float64 after the callback's ``setup``: the balancer follows,
    and the fit's weights and norms are those of the same float64 model in a plain loop."""
    from helpers.dist_models import MultiTask, make_trainer, plain_single

    batches = make_batches(STEPS, 16, seed=3, dtype=torch.float64)
    cb, rec = GradNormCallback(**GN), Recorder()
    make_trainer([cb, rec], precision="64-true").fit(MultiTask(batches))
    gn = cb.balancer
    assert gn is not None and gn.dtype == torch.float64
    for name in (*TRAJECTORY_STATE, "floor_steps", "jump_steps"):
        assert getattr(gn, name).dtype == torch.float64, name
    ref = plain_single(batches, GN)
    assert ref["weights"].dtype == torch.float64
    torch.testing.assert_close(torch.stack(rec.weights), ref["weights"], rtol=0, atol=1e-12)
    torch.testing.assert_close(torch.stack(rec.norms), ref["norms"], rtol=1e-12, atol=0)
    assert (ref["weights"][-1] - 1).abs().max() > 1e-3  # the weights moved


def test_64_true_resume_loads_the_balancer_state_in_float64(tmp_path: Path) -> None:
    """A 64-true checkpoint's balancer state is loaded in float64: the balancer is made float64 in
    ``setup``, before the state is loaded into it (loaded into float32, it would be rounded). (The
    model itself is restored by Lightning before its conversion, so its float64 parameters come
    back rounded to float32: the resumed fit cannot equal the uninterrupted one bit for bit.)"""
    from helpers.dist_models import MultiTask, make_trainer

    class AtStart(L.Callback):
        def __init__(self) -> None:
            self.state: dict[str, torch.Tensor] = {}

        def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            self.state = _balancer(trainer).state_dict()

    batches = make_batches(2, 16, seed=4, dtype=torch.float64)  # two steps an epoch
    first = GradNormCallback(**GN)
    trainer = make_trainer([first], precision="64-true", max_epochs=1)
    trainer.fit(MultiTask(batches))
    trainer.save_checkpoint(tmp_path / "half.ckpt")
    saved = first.state_dict()
    assert saved["weights"].dtype == torch.float64 and not torch.equal(saved["weights"].float().double(),
                                                                       saved["weights"])
    resumed, at_start = GradNormCallback(**GN), AtStart()
    make_trainer([resumed, at_start], precision="64-true", max_epochs=2).fit(
        MultiTask(batches), ckpt_path=tmp_path / "half.ckpt")
    for name, value in saved.items():
        if isinstance(value, torch.Tensor) and name != "nonfinite_grad_steps":  # (the callback's own)
            assert torch.equal(at_start.state[name], value), name
    assert resumed.balancer is not None and resumed.balancer.steps == 4


def test_plain_balancer_follows_a_model_converted_after_it_was_made() -> None:
    layer = torch.nn.Linear(3, 3)
    gn = GradNorm(layer, num_tasks=2)
    assert gn.weights.dtype == torch.float32
    layer.double()
    gn.follow_layer_dtype()
    assert gn.weights.dtype == gn.exp_avg.dtype == gn._ramp.dtype == torch.float64
    z = layer(torch.randn(4, 3, dtype=torch.float64))
    gn.combine([z[:, 0].pow(2).mean(), z[:, 1].pow(2).mean()]).backward()
    gn.step()
    assert gn.last_stats["grad_norms"].dtype == gn.weights.dtype == torch.float64
    layer.to(torch.bfloat16)
    gn.follow_layer_dtype()  # half precision keeps float32 statistics
    assert gn.weights.dtype == torch.float32
    with pytest.raises(ValueError, match=r"float32 or torch\.float64"):
        gn.set_dtype(torch.float16)


def test_float16_losses_are_combined_in_float32_and_warned_about_once() -> None:
    """Two float16 losses of 40000 sum past float16's 65504: combined in float32 the model loss stays
    finite; the warning names the overflow, once; a loss that overflowed in float16 (inf) is absent."""
    import warnings

    torch.manual_seed(0)
    layer = torch.nn.Linear(3, 4).half()
    gn = GradNorm(layer, num_tasks=2, optimizer="sgd", lr=1e-6)
    caught: list[str] = []
    for step in range(3):
        z = layer(torch.randn(5, 3).half())
        big = torch.tensor(70000.0 if step == 2 else 40000.0, dtype=torch.float16)  # inf at step 2
        losses = [z[:, 0].pow(2).mean() + big, z[:, 1].pow(2).mean() + 40000.0]
        assert losses[1].dtype == torch.float16 and torch.isfinite(losses[1])
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            combined = gn.combine(losses)
        caught += [str(m.message) for m in w]
        assert combined.dtype == torch.float32
        assert torch.isfinite(combined)
        assert float(combined) > 65504 if step < 2 else float(combined) < 65504  # (a float16 sum would be inf)
        combined.backward()
        gn.step()
        assert all(torch.isfinite(p.grad).all() for p in layer.parameters())
    assert len(caught) == 1 and "65504" in caught[0] and "float32" in caught[0]
    assert gn.skipped.tolist() == [1.0, 0.0]  # step 2's overflowed loss: absent
    assert float(gn.num_updates) == 3 and torch.isfinite(gn.weights).all()
    assert float(gn.weights.sum()) == pytest.approx(2.0, abs=1e-6)


def test_bfloat16_losses_are_combined_in_float32_without_a_warning() -> None:
    import warnings

    layer = torch.nn.Linear(3, 4).to(torch.bfloat16)
    gn = GradNorm(layer, num_tasks=2)
    z = layer(torch.randn(5, 3, dtype=torch.bfloat16))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        combined = gn.combine([z[:, 0].pow(2).mean(), z[:, 1].pow(2).mean()])
    assert combined.dtype == torch.float32
    combined.backward()
    gn.step()
    assert gn.weights.dtype == torch.float32 and torch.isfinite(gn.last_stats["grad_norms"]).all()
