"""Where the default path's extra time goes, phase by phase, measured in place.

Run from the repository root::

    python benchmarks/profile_phases.py [--workload toy|conv|dense|convbn] [--views] [--steps N]

The plain summed-loss step and the GradNorm step (``gn.combine`` → ``backward`` →
``gn.step`` → ``opt.step``) of the same workload are interleaved step by step (one thread,
the order alternating), and every phase is timed with ``perf_counter`` inside the real
training step, so that each phase pays the cache state the step really leaves it (a small
torch call right after a large product costs several times what it costs warm). Inside
``gn.step`` the recorder's statistics (the norms) are timed; the rest of it is the update.
Medians after the first 50 steps. A profile, not a benchmark: the ratio to quote is ``bench_step.py``'s.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from benchmarks.methods import gradnorm_settings
from benchmarks.workloads import WORKLOADS, build_model, make_batches, workload

PHASES = ("forward", "losses + combine", "backward", "gn.step", "opt.step")
WARMUP = 50


def _timed(record: list[float], fn: Callable[..., Any]) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            record.append(time.perf_counter() - start)

    return wrapper


def profile(name: str, views: bool, steps: int, warmup: int = WARMUP, tiny: bool = False) -> list[str]:
    """The phase table of one workload (``tiny``: its test-sized variant), as lines of text."""
    from gradnorm_lightning import GradNorm

    torch.set_num_threads(1)
    wl = workload(name, tiny=tiny)
    batches = make_batches(wl, 8)
    plain_model, gn_model = build_model(wl), build_model(wl)
    plain_opt = torch.optim.SGD(plain_model.parameters(), lr=wl.model_lr)
    gn_opt = torch.optim.SGD(gn_model.parameters(), lr=wl.model_lr)
    gn = GradNorm(gn_model.shared_layer, num_tasks=wl.num_tasks, **gradnorm_settings(wl))
    if views:
        gn_model.view_fn = gn.task_views
    # inside gn.step: the recorder's statistics (the norms), wrapped on the instance; the
    # rest of gn.step is the weight update
    collect_times: list[float] = []
    gn.recorder.collect = _timed(collect_times, gn.recorder.collect)  # type: ignore[method-assign]
    clock = time.perf_counter

    def step(model: Any, opt: Any, batch: Any, weighted: bool) -> tuple[float, ...]:
        x, ys = batch
        t0 = clock()
        opt.zero_grad(set_to_none=True)
        out = model(x)
        t1 = clock()
        losses = model.task_losses(out, ys)
        loss = gn.combine(losses) if weighted else torch.stack(losses).sum()
        t2 = clock()
        loss.backward()
        t3 = clock()
        if weighted:
            gn.step()
        t4 = clock()
        opt.step()
        t5 = clock()
        return t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4

    plain: list[tuple[float, ...]] = []
    balanced: list[tuple[float, ...]] = []
    for i in range(steps + warmup):
        batch = batches[i % len(batches)]
        order = [(plain, plain_model, plain_opt, False), (balanced, gn_model, gn_opt, True)]
        for record, model, opt, flag in order if i % 2 else order[::-1]:
            record.append(step(model, opt, batch, flag))
    plain, balanced = plain[warmup:], balanced[warmup:]

    def med(rows: list[tuple[float, ...]], k: int | None = None) -> float:
        return statistics.median(sum(r) if k is None else r[k] for r in rows) * 1e3

    total_p, total_g = med(plain), med(balanced)
    lines = [
        f"workload {name}{' (task_views)' if views else ''}: {steps} interleaved steps, medians in ms",
        f"{'phase':32s} {'plain':>8s} {'GradNorm':>9s} {'extra':>8s}",
    ]
    for k, phase in enumerate(PHASES):
        a, b = med(plain, k), med(balanced, k)
        lines.append(f"{phase:32s} {a:8.3f} {b:9.3f} {b - a:+8.3f}")
    collect = statistics.median(collect_times[warmup:]) * 1e3
    update = statistics.median(r[3] - c for r, c in zip(balanced, collect_times[warmup:])) * 1e3
    lines.append(f"{'  gn.step: statistics (norms)':32s} {'':8s} {collect:9.3f}")
    lines.append(f"{'  gn.step: the weight update':32s} {'':8s} {update:9.3f}")
    lines.append(f"{'whole step':32s} {total_p:8.3f} {total_g:9.3f} {total_g - total_p:+8.3f}"
                 f"   ratio {total_g / total_p:.3f}")
    return lines


def main(argv: list[str] | None = None) -> None:
    """Command line: print the phase table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workload", choices=WORKLOADS, default="toy")
    parser.add_argument("--views", action="store_true", help="heads read gn.task_views")
    parser.add_argument("--steps", type=int, default=600)
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error("--steps must be at least 1")
    print("\n".join(profile(args.workload, args.views, args.steps)))


if __name__ == "__main__":
    main()
