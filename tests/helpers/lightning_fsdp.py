"""Lightning's FSDP2 strategy (``ModelParallelStrategy``: ``fully_shard`` in ``configure_model``)
with ``GradNormCallback(task_cosines=True)``, float64, on the CPU.

Run as a script (``python tests/helpers/lightning_fsdp.py OUT_DIR DEVICES``) for several
processes: Lightning's subprocess launcher starts the other ranks by running this file again.
Rank ``r`` of ``W`` trains on rows ``[r b, (r + 1) b)`` of every global batch
(``use_distributed_sampler=False``); :func:`fit` with ``strategy="auto"`` on the whole batches
is the one-process reference. ``data_parallel_size=W, tensor_parallel_size=1``: the strategy's
default (``"auto"``) puts the devices of a node in the *tensor*-parallel dimension, where FSDP
does not average the gradients.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from gradnorm_lightning import GradNormCallback, GradNormMixin

TASKS = ("a", "b", "c")
STEPS = 6
F64 = torch.float64


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.trunk = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh())
        self.heads = nn.ModuleList([nn.Linear(8, 1) for _ in TASKS])
        self.double()

    def forward(self, x: Tensor, y: Tensor) -> list[Tensor]:
        z = self.trunk(x)
        return [nn.functional.mse_loss(h(z).squeeze(1), y[:, k]) for k, h in enumerate(self.heads)]


class Module(GradNormMixin, L.LightningModule):
    """FSDP2 on the shared layer and the net when ``shard`` (the net's forward is the FSDP root's)."""

    task_names = TASKS

    def __init__(self, shard: bool) -> None:
        super().__init__()
        self.net = Net()
        self.shard = shard

    def configure_model(self) -> None:
        if self.shard:
            from torch.distributed.fsdp import fully_shard

            mesh = self.device_mesh["data_parallel"]
            fully_shard(self.net.trunk[2], mesh=mesh)
            fully_shard(self.net, mesh=mesh)

    def shared_layer(self) -> nn.Module:
        return self.net.trunk[2]

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        b = x.shape[0] // self.trainer.world_size
        rows = slice(self.global_rank * b, (self.global_rank + 1) * b)
        return self.combine_task_losses(dict(zip(TASKS, self.net(x[rows], y[rows]))))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05)


class Recorder(L.Callback):
    def __init__(self, gn: GradNormCallback) -> None:
        self.gn = gn
        self.weights: list[Tensor] = []
        self.cosines: list[Tensor] = []

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        assert self.gn.balancer is not None
        self.weights.append(self.gn.balancer.weights.detach().clone())
        self.cosines.append(self.gn.balancer.last_stats["cosines"].detach().clone())


def batches() -> list[tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(16, 5, generator=g, dtype=F64), torch.randn(16, 3, generator=g, dtype=F64) * torch.tensor(
        [1.0, 3.0, 0.3], dtype=F64)) for _ in range(STEPS)]


def fit(devices: int, shard: bool) -> dict[str, Any]:
    """One fit; the weights and cosines after each step, the route, the shared layer's parameter type."""
    from lightning.pytorch.strategies import ModelParallelStrategy

    gn = GradNormCallback(optimizer="sgd", lr=0.05, task_cosines=True, log=False)
    rec = Recorder(gn)
    strategy: Any = ModelParallelStrategy(data_parallel_size=devices, tensor_parallel_size=1) if shard else "auto"
    trainer = L.Trainer(accelerator="cpu", devices=devices, strategy=strategy, max_steps=STEPS, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[gn, rec], use_distributed_sampler=False)
    module = Module(shard)
    trainer.fit(module, DataLoader(batches(), batch_size=None))
    assert gn.balancer is not None
    params = [p.full_tensor() if hasattr(p, "full_tensor") else p.detach() for p in module.net.parameters()]
    return {"weights": torch.stack(rec.weights), "cosines": torch.stack(rec.cosines),
            "route": gn.balancer.last_stats["route"], "rank": trainer.global_rank,
            "param_type": type(module.net.trunk[2].weight).__name__, "params": [p.detach().clone() for p in params]}


def main(out_dir: str, devices: int) -> None:
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    result = fit(devices, shard=True)
    torch.save(result, Path(out_dir) / f"lightning_fsdp_rank{result['rank']}.pt")
    if torch.distributed.is_initialized():  # (Lightning leaves the gloo group to interpreter exit)
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
