"""Pins the private torch and Lightning APIs that ``gradnorm_lightning/_compat.py`` isolates.

When an upgrade breaks one of them, the test named after it fails here first.
"""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch import nn

from gradnorm_lightning import _compat


def test_tensor_version_counts_in_place_writes() -> None:
    t = torch.zeros(3)
    v = _compat.tensor_version(t)
    t.add_(1)
    assert _compat.tensor_version(t) == v + 1


def test_node_sequence_numbers_grow_with_creation() -> None:
    x = torch.randn(2, requires_grad=True)
    a = x * 2
    b = a.relu()
    seq_a, seq_b = _compat.node_sequence_nr(a.grad_fn), _compat.node_sequence_nr(b.grad_fn)
    assert seq_a is not None and seq_b is not None and seq_b > seq_a


def test_accumulate_grad_type_is_the_type_of_parameter_leaves() -> None:
    p = torch.nn.Parameter(torch.ones(2))
    node = (p * 2).sum().grad_fn.next_functions[0][0].next_functions[0][0]
    assert type(node) is _compat.accumulate_grad_type()
    assert type((p * 2).grad_fn) is not _compat.accumulate_grad_type()


def test_apply_node_is_the_nodes_vjp() -> None:
    x = torch.tensor([-1.0, 2.0], requires_grad=True)
    y = torch.relu(x)
    (grad,) = _compat.apply_node(y.grad_fn, torch.ones(2))
    assert grad.tolist() == [0.0, 1.0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_any_nonfinite_finds_nan_and_inf_in_any_tensor_and_changes_nothing(dtype: torch.dtype) -> None:
    clean = [torch.tensor([1.0, -3.0], dtype=dtype), torch.zeros(0, dtype=dtype), torch.full((3, 2), 7.0, dtype=dtype)]
    before = [t.clone() for t in clean]
    assert not bool(_compat.any_nonfinite(clean))
    assert all(torch.equal(a, b) for a, b in zip(clean, before))
    for bad in (float("nan"), float("inf"), -float("inf")):
        tensors = [t.clone() for t in clean]
        tensors[2][1, 0] = bad
        assert bool(_compat.any_nonfinite(tensors)), (dtype, bad)
        expected = clean[2].clone()
        expected[1, 0] = bad
        torch.testing.assert_close(tensors[2], expected, equal_nan=True)  # the check writes nothing
    mixed = [torch.ones(2), torch.tensor([float("nan")], dtype=torch.float64)]
    assert bool(_compat.any_nonfinite(mixed)) and not bool(_compat.any_nonfinite(mixed[:1]))
    assert not bool(_compat.any_nonfinite([]))


def test_should_update_logs_follows_log_every_n_steps() -> None:
    seen = []

    class Probe(L.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):  # type: ignore[no-untyped-def]
            seen.append(_compat.should_update_logs(trainer))

    class Net(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.layer = nn.Linear(2, 1)

        def training_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
            return self.layer(batch[0]).sum()

        def configure_optimizers(self):  # type: ignore[no-untyped-def]
            return torch.optim.SGD(self.parameters(), lr=0.1)

    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(8, 2)), batch_size=1)
    L.Trainer(max_steps=6, log_every_n_steps=3, callbacks=[Probe()], logger=L.pytorch.loggers.CSVLogger("/tmp/compat"),
              enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False).fit(Net(), data)
    assert seen == [False, False, True, False, False, True]


def test_scaler_state_reads_scale_and_found_inf_without_a_sync() -> None:
    scaler = torch.amp.GradScaler("cpu", init_scale=8.0)
    w = nn.Parameter(torch.ones(2))
    opt = torch.optim.SGD([w], lr=0.1)
    scaler.scale((w * float("inf")).sum()).backward()
    scaler.unscale_(opt)
    scale, found = _compat.scaler_state(scaler, opt)
    assert isinstance(scale, torch.Tensor) and scale.item() == 8.0
    assert found is not None and found.item() > 0
    assert _compat.scaler_state(None, opt) == (None, None)
