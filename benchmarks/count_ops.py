"""How many top-level aten operations a GradNorm step adds to a plain step (issue 25).

Run from the repository root::

    python benchmarks/count_ops.py [--workload toy] [--optimizer adam|sgd] [--device-path] [--update-every K]

On a GPU every operation is a kernel launch plus Python dispatch, so the count is what a
launch-bound step pays; on the CPU it is dispatch. The plain summed-loss step and the GradNorm
step (``gn.combine`` -> ``backward`` -> ``gn.step`` -> ``opt.step``, the public API, as
``benchmarks/methods.py``'s rows) run the same model and batch; after a few warm-up steps (so
``L(0)`` is known) one step of each runs under ``torch.profiler`` on the CPU, and the table
counts the *top-level* aten operations (those not called from inside another aten operation)
per phase of the step. ``--device-path`` counts the step as a GPU runs it: the capture's reads
of values on the host (free on the CPU) are switched off, as in ``tests/test_no_sync.py``.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from unittest import mock

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from benchmarks.methods import gradnorm_settings
from benchmarks.workloads import WORKLOADS, Batch, MultiTaskNet, build_model, make_batches, workload

PHASES = ("forward", "combine", "backward", "gn.step: statistics", "gn.step: update", "opt.step")
_MARK = "count_ops:"


def top_level_ops(prof: Any) -> dict[str, list[str]]:
    """The top-level aten operations of a profile, by the innermost phase marker around them."""
    out: dict[str, list[str]] = collections.defaultdict(list)
    for event in prof.events():
        if not event.name.startswith("aten::"):
            continue
        parent, nested, phase = event.cpu_parent, False, None
        while parent is not None:
            nested = nested or parent.name.startswith("aten::")
            if phase is None and parent.name.startswith(_MARK):
                phase = parent.name[len(_MARK):]
            parent = parent.cpu_parent
        if not nested:
            out[phase or "other"].append(event.name)
    return out


def _marked(phase: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with record_function(_MARK + phase):
            return fn(*args, **kwargs)

    return wrapper


class _Step:
    """One training step of the plain sum or of GradNorm, with its phases marked."""

    def __init__(self, wl: Any, model: MultiTaskNet, gradnorm: dict[str, Any] | None, views: bool) -> None:
        from gradnorm_lightning import GradNorm

        self.model = model
        self.opt = torch.optim.SGD(model.parameters(), lr=wl.model_lr)
        self.gn = None if gradnorm is None else GradNorm(model.shared_layer, num_tasks=wl.num_tasks, **gradnorm)
        if self.gn is not None:
            if views:
                model.view_fn = self.gn.task_views
            # inside gn.step: the recorder's statistics, then the update
            self.gn.recorder.collect = _marked("gn.step: statistics", self.gn.recorder.collect)  # type: ignore[method-assign]

    def __call__(self, batch: Batch) -> None:
        x, ys = batch
        self.opt.zero_grad(set_to_none=True)
        with record_function(_MARK + "forward"):
            losses = self.model.task_losses(self.model(x), ys)
        with record_function(_MARK + "combine"):
            loss = torch.stack(losses).sum() if self.gn is None else self.gn.combine(losses)
        with record_function(_MARK + "backward"):
            loss.backward()
        if self.gn is not None:
            with record_function(_MARK + "gn.step: update"):
                self.gn.step()
        with record_function(_MARK + "opt.step"):
            self.opt.step()


@contextlib.contextmanager
def _device_path() -> Iterator[None]:
    from gradnorm_lightning import _arrays

    with mock.patch.object(_arrays, "host_reads_free", lambda device: False):
        yield


def count(name: str = "toy", optimizer: str = "adam", views: bool = False, device_path: bool = False,
          warmup: int = 3, tiny: bool = False, update_every: int = 1) -> dict[str, tuple[int, int]]:
    """``{phase: (plain ops, GradNorm ops)}`` of one step, and ``"total"``.

    Args:
        name: the workload (:data:`~benchmarks.workloads.WORKLOADS`).
        optimizer: GradNorm's weight optimizer (the other settings: :func:`~benchmarks.methods.gradnorm_settings`).
        views: the heads read ``gn.task_views``.
        device_path: count the step as a GPU runs it (no reads of values on the host in the
            capture; the warm-up steps run as on the CPU, so that ``L(0)`` is known, as a GPU
            learns it from its first step).
        warmup: steps before the counted one.
        tiny: the workload's test-sized variant.
        update_every: GradNorm's ``update_every`` (with ``warmup`` not a multiple of it, the
            counted step is one that measures nothing).
    """
    torch.set_num_threads(1)
    wl = workload(name, tiny=tiny)
    batches = make_batches(wl, warmup + 1)
    settings = {**gradnorm_settings(wl), "optimizer": optimizer, "update_every": update_every}
    counts: dict[str, tuple[int, int]] = {}
    per_method = []
    for gradnorm in (None, settings):
        step = _Step(wl, build_model(wl), gradnorm, views)
        for batch in batches[:warmup]:
            step(batch)
        with _device_path() if device_path else contextlib.nullcontext(), \
                profile(activities=[ProfilerActivity.CPU]) as prof:
            step(batches[warmup])
        per_method.append(top_level_ops(prof))
    plain, balanced = per_method
    for phase in (*PHASES, "other"):
        counts[phase] = (len(plain.get(phase, [])), len(balanced.get(phase, [])))
    counts["total"] = (sum(a for a, _ in counts.values()), sum(b for _, b in counts.values()))
    return counts


def table(name: str, optimizer: str, device_path: bool, tiny: bool = False, update_every: int = 1) -> list[str]:
    """The Markdown table of the default path and ``task_views`` (``update_every > 1``: of a step
    that measures nothing)."""
    warmup = 3 if update_every == 1 else update_every + 1
    runs = {views: count(name, optimizer, views, device_path, warmup, tiny, update_every) for views in (False, True)}
    schedule = "" if update_every == 1 else f", update_every={update_every} (a step that measures nothing)"
    lines = [f"workload {name}, optimizer={optimizer}{schedule}, "
             f"{'as a GPU runs it (no host reads)' if device_path else 'on the CPU'}: top-level aten operations",
             "", "| phase | plain | default | added | task_views | added |", "|---|---:|---:|---:|---:|---:|"]
    for phase in (*PHASES, "other", "total"):
        (p, d), (_, v) = runs[False][phase], runs[True][phase]
        if phase == "other" and p == d == v == 0:
            continue
        label = f"**{phase}**" if phase == "total" else phase
        lines.append(f"| {label} | {p} | {d} | {d - p:+d} | {v} | {v - p:+d} |")
    return lines


def main(argv: list[str] | None = None) -> None:
    """Command line: print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workload", choices=WORKLOADS, default="toy")
    parser.add_argument("--optimizer", choices=("adam", "sgd"), default="adam")
    parser.add_argument("--device-path", action="store_true", help="count the step as a GPU runs it")
    parser.add_argument("--update-every", type=int, default=1,
                        help="count a step that measures nothing under this update_every")
    args = parser.parse_args(argv)
    if args.update_every < 1:
        parser.error("--update-every must be at least 1")
    print("\n".join(table(args.workload, args.optimizer, args.device_path, update_every=args.update_every)))


if __name__ == "__main__":
    main()
