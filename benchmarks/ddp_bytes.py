"""Bytes sent and step time of GradNorm's reductions under DDP (issue 24, item 6): the command line.

Run from the repository root::

    python benchmarks/ddp_bytes.py [--batch 32 512] [--steps 20] [--warmup 3] [--world 2] [--out FILE.md]

The ``conv`` workload of :mod:`benchmarks.workloads` (T = 4, a conv trunk flattened to 4096
features, shared ``Linear(4096, 256)`` + ReLU, four heads) trained by plain PyTorch DDP on
``--world`` CPU processes (gloo, one thread each), ``--batch`` rows per rank. Every mode has its
own copy of the model, its own DDP wrapper and its own ``GradNorm``; the modes take turns step
by step (the same on every rank, the first mode rotating every round), so machine noise hits
them alike. Modes:

* ``before``: the reduction of commit 4734ae6, reproduced here: the per-task gradients of the
  shared layer materialised as one dense ``(T, |W|)`` block and all-reduced with the loss sums;
* ``exact``: this tree's ``distributed="exact"`` (a block above 1 MiB: each piece exchanged in
  the form that sends the fewest bytes; here the layer's inputs and output gradients
  all-gathered while that is fewer bytes than the dense block's reduce-scatter);
* ``exact, dense``: the same with the dense reduce-scatter forced (on gloo an all-to-all of the
  column slices plus a local sum; what a convolution or the generic rule always takes);
* ``exact + task_cosines``: the full ``T x T`` Gram instead of its diagonal;
* ``approx``: ``distributed="approx"`` (``3T`` floats);
* ``plain DDP``: the summed loss, no GradNorm: the step every other mode adds to.

Bytes: every ``torch.distributed`` collective the reduction calls (inside ``gn.step()``) is
wrapped; each call's payload is turned into the bytes one rank sends by the collective's usual
algorithm (all-reduce ``2 (W-1)/W n``, reduce-scatter and all-to-all ``(W-1)/W n``, all-gather
``(W-1) m`` for ``m`` bytes per rank). And the bytes the process wrote to its sockets during
``gn.step()`` are read from ``/proc/self/io`` (``wchar``: what gloo's threads really sent,
headers included). Time: wall-clock median over the timed rounds of the whole step (forward,
backward with DDP's own gradient all-reduce, ``gn.step()``, optimizer step) and of ``gn.step()``
alone, on rank 0; every step starts from a barrier, and a second barrier before ``gn.step()``
(in every mode) keeps the wait for the slower rank's backward out of the reduction's time.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from benchmarks.workloads import Workload, build_model, make_batches, workload

MODES: tuple[tuple[str, dict[str, Any]], ...] = (
    ("before: all-reduce of the dense T × numel(W) block (4734ae6)", {"legacy": True}),
    ("exact (as shipped)", {}),
    ("exact, dense reduce-scatter forced", {"force": "dense"}),
    ("exact + task_cosines", {"task_cosines": True}),
    ("approx (3T floats)", {"distributed": "approx"}),
    ("plain DDP, summed loss (no GradNorm)", {"plain": True}),
)


def legacy_reduce(acc: Any, mode: str, **_: Any) -> Any:
    """The exact reduction of commit 4734ae6: the dense block all-reduced (for ``before``)."""
    from gradnorm_lightning.capture.distributed import Reduced
    from gradnorm_lightning.capture.stats import safe_norms

    world = dist.get_world_size()
    n = acc.loss_sum.numel()
    dense = acc.dense_grads()
    buf = torch.cat([dense.flatten(), acc.loss_sum, acc.loss_weight])
    dist.all_reduce(buf)
    grads = buf[: dense.numel()].reshape(n, -1) / world
    return Reduced.summed(safe_norms(grads, buf[-n:] > 0), buf[-2 * n : -n], buf[-n:])


# ---------------------------------------------------------------------- counting
#: collective -> (bytes one rank sends for an input of ``n`` bytes, in a world of ``w``)
SENT: dict[str, Callable[[int, int], float]] = {
    "all_reduce": lambda n, w: 2 * (w - 1) / w * n,
    "reduce_scatter_tensor": lambda n, w: (w - 1) / w * n,
    "reduce_scatter_single": lambda n, w: (w - 1) / w * n,
    "all_to_all_single": lambda n, w: (w - 1) / w * n,
    "all_gather_into_tensor": lambda n, w: (w - 1) * n,
    "all_gather_single": lambda n, w: (w - 1) * n,
}


class Counter:
    """Wraps ``torch.distributed``'s collectives while :attr:`active`; sums what one rank sends."""

    def __init__(self, world: int) -> None:
        self.world = world
        self.active = False
        self.sent = 0.0
        self.calls: list[str] = []
        for name in SENT:
            fn = getattr(dist, name, None)
            if fn is not None:
                setattr(dist, name, self._wrap(name, fn))

    def _wrap(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            if self.active:
                source = args[0] if name == "all_reduce" else args[1]
                self.sent += SENT[name](source.numel() * source.element_size(), self.world)
                self.calls.append(name)
            return fn(*args, **kwargs)

        return wrapped


def socket_bytes() -> int:
    """Bytes this process has passed to write calls (``wchar`` of ``/proc/self/io``), -1 where unknown."""
    try:
        with open("/proc/self/io") as fh:
            for line in fh:
                if line.startswith("wchar:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return -1


# ---------------------------------------------------------------------- the runs
@dataclasses.dataclass
class Record:
    step: list[float] = dataclasses.field(default_factory=list)
    reduce: list[float] = dataclasses.field(default_factory=list)
    sent: list[float] = dataclasses.field(default_factory=list)
    wire: list[int] = dataclasses.field(default_factory=list)
    calls: list[str] = dataclasses.field(default_factory=list)


def _worker(rank: int, world: int, init: str, out: str, wl: Workload, steps: int, warmup: int) -> None:
    from torch.nn.parallel import DistributedDataParallel

    from gradnorm_lightning import GradNorm
    from gradnorm_lightning.capture import _exchange, recorder

    warnings.simplefilter("ignore", FutureWarning)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    counter = Counter(world)
    batches = make_batches(wl, 4, seed=100 + rank)
    exact_reduce = recorder.reduce_statistics
    runs = []
    for _, opts in MODES:
        model = build_model(wl)
        ddp = DistributedDataParallel(model, broadcast_buffers=False)
        gn = None if opts.get("plain") else GradNorm(
            model.shared_layer, num_tasks=wl.num_tasks, alpha=wl.alpha, lr=wl.weight_lr, optimizer="sgd",
            distributed=opts.get("distributed", "exact"), task_cosines=opts.get("task_cosines", False))
        runs.append((opts, model, ddp, gn, torch.optim.SGD(model.parameters(), lr=wl.model_lr), Record()))
    try:
        for r in range(warmup + steps):
            order = list(range(len(runs)))
            order = order[r % len(order):] + order[: r % len(order)]
            for m in order:
                opts, model, ddp, gn, opt, rec = runs[m]
                x, ys = batches[r % len(batches)]
                _exchange.FORCE = opts.get("force")
                recorder.reduce_statistics = legacy_reduce if opts.get("legacy") else exact_reduce  # type: ignore[assignment]
                dist.barrier()
                t0 = time.perf_counter()
                opt.zero_grad(set_to_none=True)
                losses = model.task_losses(ddp(x), ys)
                if gn is None:
                    torch.stack(losses).sum().backward()
                    dist.barrier()
                    t1 = t2 = time.perf_counter()
                    wire = 0
                else:
                    gn.combine(losses).backward()
                    dist.barrier()  # (gn.step() timed from here: without the wait for the slower rank)
                    counter.active, counter.sent, counter.calls = True, 0.0, []
                    w0 = socket_bytes()
                    t1 = time.perf_counter()
                    gn.step()
                    t2 = time.perf_counter()
                    wire = socket_bytes() - w0 if w0 >= 0 else -1
                    counter.active = False
                opt.step()
                t3 = time.perf_counter()
                if r >= warmup:
                    rec.step.append(t3 - t0)
                    rec.reduce.append(t2 - t1)
                    rec.sent.append(counter.sent if gn is not None else 0.0)
                    rec.wire.append(wire)
                    rec.calls = list(counter.calls) if gn is not None else []
        torch.save([dataclasses.asdict(run[-1]) for run in runs], Path(out) / f"rank{rank}.pt")
        dist.barrier()
        del runs
    finally:
        recorder.reduce_statistics = exact_reduce  # type: ignore[assignment]
        _exchange.FORCE = None
        dist.destroy_process_group()


def _size(x: float) -> str:
    if x >= 1e5:
        return f"{x / 1e6:.3f} MB"
    return f"{x / 1e3:.2f} kB"


def measure(wl: Workload, world: int, steps: int, warmup: int) -> list[str]:
    """Run every mode; the Markdown table."""
    with tempfile.TemporaryDirectory() as tmp:
        init = f"file://{Path(tmp) / 'rendezvous'}"
        mp.spawn(_worker, args=(world, init, tmp, wl, steps, warmup), nprocs=world, join=True)
        ranks = [torch.load(Path(tmp) / f"rank{r}.pt") for r in range(world)]
    t = wl.num_tasks
    dense_floats = t * wl.flat * wl.feat + t * wl.feat
    lines = [f"#### {world} processes, {wl.batch} rows per rank (T = {t}, shared Linear({wl.flat}, {wl.feat}): "
             f"the dense block is {dense_floats} floats = {_size(4 * dense_floats)})", "",
             "| mode | sent per rank per step (by algorithm) | written to sockets in gn.step() (measured) "
             "| collectives in gn.step() | step ms (median) | ÷ before | gn.step() ms (median) |",
             "|---|---:|---:|---|---:|---:|---:|"]
    before = statistics.median(ranks[0][0]["step"])
    for i, ((name, _), rec) in enumerate(zip(MODES, ranks[0])):
        sent = statistics.median(rec["sent"])
        wire = statistics.median(rec["wire"])
        others = [statistics.median(rank[i]["sent"]) for rank in ranks[1:]]
        note = "" if all(abs(o - sent) < 1 for o in others) else f" (other ranks: {[_size(o) for o in others]})"
        step = statistics.median(rec["step"])
        calls = ", ".join(rec["calls"]) or "—"
        lines.append(f"| {name} | {_size(sent)}{note} | {_size(wire) if wire >= 0 else '?'} | {calls} "
                     f"| {step * 1e3:.1f} | {step / before:.2f}× | {statistics.median(rec['reduce']) * 1e3:.1f} |")
    lines.append("")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--batch", type=int, nargs="+", default=[32, 512], help="rows per rank (one table each)")
    parser.add_argument("--steps", type=int, default=20, help="timed rounds (one step of every mode each)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--tiny", action="store_true", help="the workload's tiny sizes (a smoke run)")
    parser.add_argument("--out", default=None, help="also write the Markdown report here")
    args = parser.parse_args(argv)
    from benchmarks.bench_step import machine_info

    command = sys.argv if argv is None else ["benchmarks/ddp_bytes.py", *argv]
    lines = ["# GradNorm under DDP: bytes per step and step time", "", f"Command: `python {' '.join(command)}`", "",
             *machine_info(), f"- {args.world} gloo processes on this machine, one thread each", "",
             (__doc__ or "").split("\n\n", 3)[3].strip(), ""]
    for batch in args.batch:
        wl = dataclasses.replace(workload("conv", tiny=args.tiny), batch=batch)
        print(f"== batch {batch} per rank", flush=True)
        lines += measure(wl, args.world, args.steps, args.warmup)
        print("\n".join(lines[-len(MODES) - 4:]), flush=True)
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    raise SystemExit(main())
