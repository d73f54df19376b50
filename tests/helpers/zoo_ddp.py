"""The generated models of ``tests/model_zoo.py`` under plain PyTorch DDP (gloo, CPU processes).

Every rank builds the same seeded model and trains on its own micro-batches, with its own
absences (``model_zoo.batches(spec, rank=r)``: a task can be absent on one rank and present on
the other in the same micro-batch), ``k = spec.accumulate`` per optimizer step, the first
``k - 1`` under ``no_sync``. Torch only (importable by spawned processes).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from tests.model_zoo import Spec, build, index_twin, step_batches

ALPHA = 1.5
LR = 0.05
MODEL_LR = 0.05


def zoo_ddp_worker(rank: int, world: int, init_method: str, out_dir: str, form: str,
                   cases: list[tuple[Spec, bool]]) -> None:
    """Train every ``(spec, views)`` case, in the masked form (``form="masked"``: the spec as it is)
    or the index form (``"index"``: :func:`~tests.model_zoo.index_twin`); save per case and rank
    the weights after every step and the model's parameters at the end."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from gradnorm_lightning import GradNorm

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world)
    try:
        for n, (case, views) in enumerate(cases):
            spec = case if form == "masked" else index_twin(case)
            model = build(spec)[0]
            ddp = DistributedDataParallel(model, broadcast_buffers=False)
            gn = GradNorm(model.shared_layer, num_tasks=spec.num_tasks, alpha=ALPHA, lr=LR, optimizer="sgd")
            opt = torch.optim.SGD(model.parameters(), lr=MODEL_LR)
            k = spec.accumulate
            weights, routes, uncut = [], [], []
            for step, micro in enumerate(step_batches(spec, rank=rank)):
                model.before_step(step)
                opt.zero_grad()
                for j, batch in enumerate(micro):
                    with ddp.no_sync() if j < k - 1 else contextlib.nullcontext():
                        loss = gn.combine(ddp(batch, gn.task_views if views else None))
                        (loss / k if k > 1 else loss).backward()
                gn.step()
                opt.step()
                weights.append(gn.weights.detach().clone())
                routes.append(gn.last_stats.get("route"))
                uncut.append(gn.last_stats.get("uncut"))
            torch.save(
                {"weights": torch.stack(weights), "params": [p.detach().clone() for p in model.parameters()],
                 "routes": routes, "uncut": uncut},
                Path(out_dir) / f"{form}_{n}_rank{rank}.pt",
            )
            del ddp
        dist.barrier()
    finally:
        dist.destroy_process_group()
