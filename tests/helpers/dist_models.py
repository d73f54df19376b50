"""Tiny multitask models, data and recorders for the DDP / accumulation / precision / manual /
compile tests (issue 4). Importable by spawned processes (no closures, no lambdas)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.trainer.states import TrainerStatus
from torch import Tensor, nn
from torch.utils.data import DataLoader

from gradnorm_lightning import GradNorm, GradNormCallback, GradNormMixin

from .dist_plain import (  # re-exported for the tests
    D_IN,
    HIDDEN,
    TASKS,
    CustomForwardTrunk,
    Net,
    _Listed,
    make_batches,
    plain_ddp_worker,
    plain_single,
    split_micro,
    textbook_weights,
)

__all__ = [
    "D_IN", "HIDDEN", "TASKS", "CustomForwardTrunk", "GlooSpawnDDP", "MultiTask", "Net", "Recorder", "fit_single", "make_batches",
    "make_trainer", "plain_ddp_worker", "plain_single", "split_micro", "textbook_weights",
]

class MultiTask(GradNormMixin, L.LightningModule):
    """The Lightning version of :class:`Net`.

    ``batches`` are the *global* batches; under ``world_size > 1`` rank ``r`` trains on rows
    ``[r*b, (r+1)*b)`` of each (``use_distributed_sampler=False``), so the single process fed
    the whole batch sees exactly the union of the ranks' batches.
    """

    task_names = TASKS

    def __init__(
        self,
        batches: Sequence[tuple[Tensor, Tensor]],
        lr: float = 0.05,
        seed: int = 0,
        dtype: torch.dtype = torch.float32,
        manual: bool = False,
        compile_trunk: bool = False,
        compile_backend: str = "inductor",
        views: bool = False,
    ) -> None:
        super().__init__()
        self.batches = list(batches)
        self.lr = lr
        self.net = Net(seed, dtype)
        self.automatic_optimization = not manual
        self.views = views
        # A custom-forward wrapper of the same layers: an nn.Sequential trunk would run
        # entirely eagerly under torch.compile once the balancer's hook breaks the graph.
        compiled = (
            torch.compile(CustomForwardTrunk(self.net.trunk), backend=compile_backend) if compile_trunk else None
        )
        object.__setattr__(self, "_compiled_trunk", compiled)  # not a second submodule

    def shared_layer(self) -> nn.Module:
        return self.net.shared

    def train_dataloader(self) -> DataLoader:
        world = self.trainer.world_size
        rank = self.trainer.global_rank
        items = []
        for x, y in self.batches:
            b = x.shape[0] // world
            items.append((x[rank * b : (rank + 1) * b], y[rank * b : (rank + 1) * b]))
        return DataLoader(_Listed(items), batch_size=None, shuffle=False)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor | None:
        x, y = batch
        if self.views:  # each head reads its own alias of z: per-task grads from the one backward
            trunk = self._compiled_trunk if self._compiled_trunk is not None else self.net.trunk
            z = self.task_views(trunk(x))
            losses = [
                nn.functional.mse_loss(h(z[t]).squeeze(1), y[:, i])
                for i, (t, h) in enumerate(zip(TASKS, self.net.heads))
            ]
        else:
            losses = self.net.task_losses(x, y, trunk=self._compiled_trunk)
        loss = self.combine_task_losses(dict(zip(TASKS, losses)))
        if self.automatic_optimization:
            return loss
        opt = self.optimizers()
        opt.zero_grad()
        self.manual_backward(loss)
        opt.step()
        return None

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class Recorder(L.Callback):
    """Records the balancer's weights (and norms) after every optimizer step.

    Must come after the GradNormCallback in ``callbacks``. With ``out_dir`` the records are
    saved to ``out_dir/rank<r>.pt`` at the end of fit (for spawned processes).
    """

    def __init__(self, out_dir: str | None = None) -> None:
        self.out_dir = out_dir
        self.weights: list[Tensor] = []
        self.norms: list[Tensor] = []
        self.optimizer_steps = 0

    @staticmethod
    def _gn(trainer: L.Trainer) -> GradNorm:
        cb = next(c for c in trainer.callbacks if isinstance(c, GradNormCallback))
        assert cb.balancer is not None
        return cb.balancer

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        self.optimizer_steps += 1

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        gn = self._gn(trainer)
        if len(self.weights) < gn.steps:  # one record per weight update (accumulation windows)
            self.weights.append(gn.weights.detach().clone().cpu())
            self.norms.append(gn.last_stats["grad_norms"].detach().clone().cpu())

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.out_dir is not None:
            gn = self._gn(trainer)
            torch.save(
                {
                    "weights": torch.stack(self.weights),
                    "norms": torch.stack(self.norms),
                    "steps": gn.steps,
                    "state": gn.state_dict(),
                    "world_size": trainer.world_size,
                },
                Path(self.out_dir) / f"rank{trainer.global_rank}.pt",
            )


class GlooSpawnDDP(DDPStrategy):
    """``ddp_spawn`` on gloo whose ranks destroy their process group when fit ends.

    Lightning destroys an NCCL group at exit but leaves a gloo group to the interpreter's
    shutdown, where a gloo worker thread still releasing the last all-reduce's tensor (the
    balancer's, in these fits) needs the GIL after finalization has begun: the rank aborts after
    fit has finished ("terminate called without an active exception", SIGABRT; once in CI, on
    ``test_approx_ddp_...``, and 3 of 240 such fits here, none of 360 with this strategy).
    Here each rank, once Lightning's own teardown has unwrapped (and so freed) the DDP module,
    waits for the other and destroys the group, as ``gradnorm-train`` does after a run. A fit
    that raised is left as Lightning leaves it: a rank waiting for one that failed would hang.
    """

    def __init__(self) -> None:
        super().__init__(start_method="spawn", broadcast_buffers=False, process_group_backend="gloo")

    def teardown(self) -> None:
        # In the spawned ranks (the parent never joins the group), where the module is attached.
        in_rank = dist.is_available() and dist.is_initialized()
        module = self.lightning_module
        fit_ended = in_rank and module is not None and module.trainer.state.status == TrainerStatus.RUNNING
        super().teardown()
        if fit_ended:
            dist.barrier()
            dist.destroy_process_group()


def make_trainer(callbacks: list[L.Callback], max_steps: int = -1, **kwargs: Any) -> L.Trainer:
    opts: dict[str, Any] = dict(
        accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, max_steps=max_steps,
        max_epochs=kwargs.pop("max_epochs", 1), use_distributed_sampler=False, num_sanity_val_steps=0,
    )
    opts.update(kwargs)
    return L.Trainer(callbacks=callbacks, **opts)


def fit_single(batches: Sequence[tuple[Tensor, Tensor]], gn_kwargs: dict[str, Any] | None = None,
               module_kwargs: dict[str, Any] | None = None, **trainer_kwargs: Any) -> Recorder:
    """Train :class:`MultiTask` in this process; returns the recorder."""
    rec = Recorder()
    cb = GradNormCallback(**(gn_kwargs or {"alpha": 1.5, "lr": 0.01}))
    model = MultiTask(batches, **(module_kwargs or {}))
    make_trainer([cb, rec], **trainer_kwargs).fit(model)
    return rec

