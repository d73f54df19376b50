"""The GPU checks of issue 11, as one command for a machine with a CUDA device.

Run from the repository root::

    python benchmarks/gpu_check.py [--out FILE.md] [--steps N] [--quick]

It needs the project importable (``pip install -e ".[dev]"``, or the repository on
``PYTHONPATH`` with the dependencies installed); ``gradnorm-pytorch`` is optional (without it
its row is left out). Without a CUDA device it says so and exits with status 2. The last
recorded run, with what it found, is ``benchmarks/RESULTS_GPU.md``.

Four parts, each reported even when another fails (the exit status is 1 if any failed):

a. **Tests**: ``pytest -m cuda tests/test_cuda.py`` (the suite's CUDA-marked tests; they skip
   on a machine without a GPU, so CI never needs one).
b. **No host synchronisation**: the toy and the dense workload (:mod:`benchmarks.workloads`)
   trained on the GPU through the public API (default path, ``task_views``,
   ``zero_nonfinite_grads_``, ``mode="representation"``, ``mode="autograd"``) with
   ``torch.cuda.set_sync_debug_mode("error")`` around every step, the first steps (where
   ``L(0)`` is measured) included. On a failure the run is repeated in ``"warn"`` mode to list
   every line that synchronised.
c. **Mixed precision in a Lightning fit**: the toy and the dense model trained by a
   ``Trainer(accelerator="gpu")`` with ``GradNormCallback`` in ``32-true``, ``bf16-mixed`` and
   ``16-mixed`` (Lightning's GradScaler); the weights must stay finite, sum to ``T`` and stay
   near the ``32-true`` run's.
d. **The benchmark rows on the GPU**: every row's float64 trajectory check, run on the GPU,
   then the interleaved timing of :mod:`benchmarks.bench_step` with a
   ``torch.cuda.synchronize()`` at the end of every timed step, and the extra peak GPU memory
   of a step (``torch.cuda.max_memory_allocated``) over the plain step's. The workloads at
   their own sizes are launch-bound on a large GPU, so each is also timed at 16 times its batch.
e. **GPU-bound workloads** (:mod:`benchmarks.throughput`): a ResNet-18-style network and a
   pre-LN transformer encoder at realistic sizes, timed as throughput: blocks of steps run back
   to back with one ``torch.cuda.synchronize()`` at the end of each block (as real training
   runs: the host's work overlaps the device's), the blocks of the plain step and of GradNorm's
   alternating.
"""

from __future__ import annotations

import argparse
import dataclasses
import subprocess
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from benchmarks.bench_step import package_version
from benchmarks.measure import check_trajectories, time_interleaved
from benchmarks.methods import Method, ProjectGradNorm, method_factories
from benchmarks.throughput import THROUGHPUT_WORKLOADS, table
from benchmarks.workloads import Batch, Workload, build_model, make_batches, workload

ROOT = Path(__file__).resolve().parents[1]
SYNC_PATHS: dict[str, dict[str, Any]] = {
    "default": {},
    "task_views": {"views": True},
    "default + zero_nonfinite_grads_": {"sanitize": True},
    "mode=representation + task_views": {"views": True, "mode": "representation", "reference": "rep"},
    "mode=autograd": {"mode": "autograd"},
}


def _has(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return False
    return True


# ---------------------------------------------------------------------- (a)
def run_tests(quick: bool, log: Path | None = None) -> tuple[bool, list[str]]:
    """``pytest -m cuda tests/test_cuda.py``; returns (passed, report lines). The whole pytest
    output goes to ``log`` (when given); the report keeps the failures' ``E`` lines."""
    cmd = [sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-rfEs", "--tb=short", "-p", "no:cacheprovider",
           "tests/test_cuda.py"]
    if quick:
        cmd += ["-k", "not route_matches"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
    output = proc.stdout + proc.stderr
    if log is not None:
        log.write_text(output)
    tail = output.strip().splitlines()
    summary = tail[-1] if tail else "(no output)"
    print("\n".join(tail[-40:]), flush=True)
    lines = [f"Command: `{' '.join(cmd[1:])}` ({time.perf_counter() - t0:.0f} s): **{summary}**", ""]
    if proc.returncode != 0:
        kept = [ln for ln in tail if ln.startswith(("E ", "FAILED", "ERROR", "SKIPPED", "____"))]
        lines += ["```", *kept[:200], "```", ""]
    return proc.returncode == 0, lines


# ---------------------------------------------------------------------- (b)
def _on_cuda(device: str) -> bool:
    return torch.device(device).type == "cuda"


def _guarded_steps(method: Method, batches: Sequence[Batch], steps: int, mode: str, device: str) -> list[str]:
    """``steps`` steps with CUDA's sync debug mode set (on a CUDA ``device``); the problems found."""
    found: list[str] = []
    cuda = _on_cuda(device)
    if cuda:
        torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if cuda:
            torch.cuda.set_sync_debug_mode(mode)
        try:
            for i in range(steps):
                method.step(batches[i % len(batches)])
        except RuntimeError:
            found.append(traceback.format_exc(limit=-8))
        finally:
            if cuda:
                torch.cuda.set_sync_debug_mode(0)
    for w in caught:  # (the detector's own "prototype feature" notice is not a synchronisation)
        if "called a synchronizing CUDA operation" in str(w.message):
            found.append(f"{w.filename}:{w.lineno}: {w.message}")
    return found


def sync_checks(names: Sequence[str], steps: int, device: str = "cuda", tiny: bool = False) -> tuple[bool, list[str]]:
    """Part (b); returns (passed, report lines). (``device="cpu"``, ``tiny``: the CPU smoke test.)"""
    lines = ["| workload | path | steps | synchronisations | weights after (min–max, sum) |", "|---|---|---:|---|---|"]
    ok = True
    details: list[str] = []
    for name in names:
        wl = workload(name, tiny=tiny)
        batches = make_batches(wl, 8, device=device)
        for label, kwargs in SYNC_PATHS.items():
            method = ProjectGradNorm(wl, build_model(wl, device=device), name=label, **kwargs)
            problems = _guarded_steps(method, batches, steps, "error", device)
            if problems:
                ok = False
                again = ProjectGradNorm(wl, build_model(wl, device=device), name=label, **kwargs)
                listed = sorted(set(_guarded_steps(again, batches, steps, "warn", device)))
                details += [f"- {name} / {label}:", "```", *problems, *listed, "```"]
            w = method.weights().cpu()
            lines.append(f"| {name} | {label} | {steps} | {'none' if not problems else 'FOUND (below)'} "
                         f"| {float(w.min()):.4f}–{float(w.max()):.4f}, {float(w.sum()):.4f} |")
            print(lines[-1], flush=True)
    return ok, [*lines, "", *details]


# ---------------------------------------------------------------------- (c)
def _fit(wl: Workload, batches: Sequence[Batch], precision: str, steps: int, device: str) -> dict[str, Any]:
    from benchmarks.lightning_timing import fit, lightning_modules
    from benchmarks.methods import gradnorm_settings
    from gradnorm_lightning import GradNormCallback

    _, module = lightning_modules(wl)
    cb = GradNormCallback(**gradnorm_settings(wl), log=False)
    t0 = time.perf_counter()
    trainer = fit(module, batches, steps, [cb], None, accelerator="gpu" if _on_cuda(device) else "cpu",
                  precision=precision)
    elapsed = time.perf_counter() - t0
    gn = cb.balancer
    assert gn is not None
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    return {
        "weights": gn.weights.detach().float().cpu(),
        "norms": gn.last_stats["grad_norms"].detach().float().cpu(),
        "updates": int(gn.num_updates), "skipped": int(gn.skipped_updates),
        "dtype": str(gn.weights.dtype).replace("torch.", ""), "device": gn.weights.device.type,
        "scale": None if scaler is None else float(scaler.get_scale()),
        "seconds": elapsed,
    }


def precision_fits(names: Sequence[str], steps: int, device: str = "cuda",
                   tiny: bool = False) -> tuple[bool, list[str]]:
    """Part (c); returns (passed, report lines)."""
    import logging

    for logger in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(logger).setLevel(logging.ERROR)
    lines = ["| workload | precision | updates (skipped) | balancer dtype, device | final scale "
             "| weights (min–max, sum) | max abs(w − w_32-true) | fit s |", "|---|---|---:|---|---:|---|---:|---:|"]
    ok = True
    for name in names:
        wl = workload(name, tiny=tiny)
        batches = make_batches(wl, 8)
        ref: dict[str, Any] | None = None
        for precision in ("32-true", "bf16-mixed", "16-mixed"):
            try:
                r = _fit(wl, batches, precision, steps, device)
            except Exception:  # reported, then the next fit
                ok = False
                lines.append(f"| {name} | {precision} | FAILED | | | | | |")
                lines += ["", "```", traceback.format_exc(limit=-10), "```", ""]
                continue
            w = r["weights"]
            good = bool(torch.isfinite(w).all()) and abs(float(w.sum()) - wl.num_tasks) < 1e-3 \
                and r["dtype"] == "float32" and r["device"] == torch.device(device).type and r["updates"] > steps // 2
            ref = r if precision == "32-true" else ref
            dev = "—" if ref is None or ref is r else f"{float((w - ref['weights']).abs().max()):.2e}"
            ok = ok and good
            scale = "—" if r["scale"] is None else f"{r['scale']:g}"
            lines.append(f"| {name} | {precision} | {r['updates']} ({r['skipped']}) | {r['dtype']}, {r['device']} "
                         f"| {scale} | {float(w.min()):.4f}–{float(w.max()):.4f}, {float(w.sum()):.4f} | {dev} "
                         f"| {r['seconds']:.1f} |" + ("" if good else " **not as expected**"))
            print(lines[-1], flush=True)
    return ok, [*lines, ""]


# ---------------------------------------------------------------------- (d)
def _peak_extra(method: Method, batches: Sequence[Batch], device: str, repeats: int = 3) -> int | None:
    """The most GPU memory one step allocated above the level at its start (``None`` off CUDA)."""
    if not _on_cuda(device):
        return None
    peak = 0
    for r in range(repeats):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        method.step(batches[r % len(batches)])
        torch.cuda.synchronize()
        peak = max(peak, torch.cuda.max_memory_allocated() - base)
    return peak


def _rows(wl: Workload) -> list[tuple[str, Callable[..., Method]]]:
    gnp = _has("gradnorm_pytorch")
    return [(k, f) for k, f in method_factories(wl=wl) if gnp or k != "gradnorm-pytorch"]


def benchmark_rows(names: Sequence[str], steps: int, warmup: int, check_steps: int, batch_scale: int,
                   device: str = "cuda", tiny: bool = False) -> tuple[bool, list[str]]:
    """Part (d); returns (passed, report lines)."""
    ok = True
    lines: list[str] = []
    for name in names:
        base = workload(name, tiny=tiny)
        rows = _rows(base)
        keys = [k for k, _ in rows]
        horizon = min(check_steps, base.check_horizon or check_steps)
        try:
            checks = {c.key: c for c in check_trajectories(base, steps=horizon, keys=keys, device=device)}
        except AssertionError as exc:
            ok = False
            checks = {}
            lines += [f"**{name}: trajectory check FAILED on the GPU**: {exc}", ""]
        for scale in (1, batch_scale):
            wl = dataclasses.replace(base, batch=base.batch * scale)
            print(f"== {name} (batch {wl.batch}): timing on the GPU", flush=True)
            batches = make_batches(wl, 4, device=device)
            methods = [f(wl, build_model(wl, device=device)) for _, f in rows]
            times = time_interleaved(methods, batches, steps, warmup,
                                     sync=torch.cuda.synchronize if _on_cuda(device) else None)
            peaks = [_peak_extra(m, batches, device) for m in methods]
            plain = times[0]
            lines += [f"#### `{name}`, batch {wl.batch}" + (" (the benchmark's size)" if scale == 1 else ""), "",
                      "| method | median ms/step | p25–p75 ms | ratio to plain | CPU ms/step | extra peak GPU MiB "
                      "| float64 check on the GPU: max abs(w − w_textbook) |", "|---|---:|---:|---:|---:|---:|---|"]
            for (key, _), m, ts, pk in zip(rows, methods, times, peaks, strict=True):
                q25, q75 = ts.quartiles_wall()
                chk = checks.get(key) if scale == 1 else None
                dev = "—" if chk is None else f"{chk.max_abs_dev:.1e} [{chk.reference}]" + ("" if chk.ok else " (deviates)")
                lines.append(f"| {m.name} | {ts.med_wall * 1e3:.3f} | {q25 * 1e3:.3f}–{q75 * 1e3:.3f} "
                             f"| {ts.med_wall / plain.med_wall:.2f}× | {ts.med_cpu * 1e3:.3f} "
                             f"| {'—' if pk is None or peaks[0] is None else f'{(pk - peaks[0]) / 2**20:+.2f}'} "
                             f"| {dev} |")
            lines.append("")
            print("\n".join(lines[-len(rows) - 2:]), flush=True)
            del methods, batches
            if _on_cuda(device):
                torch.cuda.empty_cache()
    return ok, lines


# ---------------------------------------------------------------------- (e)
def throughput_rows(names: Sequence[str], steps: int, rounds: int, device: str = "cuda",
                    tiny: bool = False) -> tuple[bool, list[str]]:
    """Part (e); returns (passed, report lines)."""
    lines = [f"{rounds} rounds of {steps} steps per method, the methods' blocks alternating; one "
             "synchronisation at the end of each block.", "", *table(names, steps, rounds, device, tiny), ""]
    print("\n".join(lines), flush=True)
    return True, lines
# ---------------------------------------------------------------------- (f) Lightning's FSDP
def lightning_fsdp_fits(steps: int = 20, device: str = "cuda") -> tuple[bool, list[str]]:
    """Lightning's FSDP strategies with ``GradNormCallback(task_cosines=True)`` on one device:
    ``strategy="fsdp"`` (``FSDPStrategy``: FSDP1, one flat parameter, ``use_orig_params=True``;
    it refuses the CPU) and ``ModelParallelStrategy`` (FSDP2: ``fully_shard`` in
    ``configure_model``), each against ``strategy="auto"`` on the same data and initialisation:
    float32 weights and task-gradient cosines within 1e-5, finite, summing to T. Returns
    (passed, report lines)."""
    import os

    import lightning as L
    import torch.distributed as dist
    from lightning.pytorch.strategies import ModelParallelStrategy
    from torch import nn
    from torch.utils.data import DataLoader

    from gradnorm_lightning import GradNormCallback, GradNormMixin

    names = ("a", "b", "c")

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.trunk = nn.Sequential(nn.Linear(32, 64), nn.Tanh(), nn.Linear(64, 64), nn.ReLU())
            self.heads = nn.ModuleList([nn.Linear(64, 1) for _ in names])

        def forward(self, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
            z = self.trunk(x)
            return [nn.functional.mse_loss(h(z).squeeze(1), y[:, k]) for k, h in enumerate(self.heads)]

    class Module(GradNormMixin, L.LightningModule):
        task_names = names

        def __init__(self, fsdp2: bool) -> None:
            super().__init__()
            self.net = Net()
            self.fsdp2 = fsdp2

        def configure_model(self) -> None:
            if self.fsdp2:  # (the net's forward is the FSDP root's: training_step calls it)
                from torch.distributed.fsdp import fully_shard

                fully_shard(self.net.trunk[2], mesh=self.device_mesh["data_parallel"])
                fully_shard(self.net, mesh=self.device_mesh["data_parallel"])

        def shared_layer(self) -> nn.Module:
            return self.net.trunk[2]

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            return self.combine_task_losses(dict(zip(names, self.net(*batch))))

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.05)

    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(64, 32, generator=g), torch.randn(64, 3, generator=g) * torch.tensor([1.0, 3.0, 0.3]))
            for _ in range(steps)]

    def fit(strategy: Any, fsdp2: bool) -> dict[str, Any]:
        cb = GradNormCallback(optimizer="sgd", lr=0.05, task_cosines=True, log=False)
        module = Module(fsdp2)
        saved = dict(os.environ)
        try:
            trainer = L.Trainer(accelerator="gpu" if _on_cuda(device) else "cpu", devices=1, strategy=strategy,
                                max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                                enable_model_summary=False, callbacks=[cb], use_distributed_sampler=False)
            trainer.fit(module, DataLoader(data, batch_size=None))
        finally:  # (Lightning leaves its process group and MASTER_PORT behind)
            if dist.is_available() and dist.is_initialized():
                dist.destroy_process_group()
            os.environ.clear()
            os.environ.update(saved)
        gn = cb.balancer
        assert gn is not None
        return {"weights": gn.weights.detach().float().cpu(), "cosines": gn.last_stats["cosines"].float().cpu(),
                "route": gn.last_stats["route"], "params": type(module.net.trunk[2].weight).__name__}

    lines = ["| strategy | route | shared layer's parameters | weights (min–max, sum) | max abs(w − w_auto) "
             "| max abs(cos − cos_auto) |", "|---|---|---|---|---:|---:|"]
    ok = True
    ref = fit("auto", False)
    runs = [("fsdp (FSDPStrategy, FSDP1)", lambda: fit("fsdp", False)),
            ("ModelParallelStrategy (FSDP2)",
             lambda: fit(ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=1), True))]
    for label, run in runs:
        try:
            r = run()
        except Exception as exc:  # reported, then the next strategy
            refused = not _on_cuda(device) and "requires a GPU accelerator" in str(exc)
            ok = ok and refused
            lines.append(f"| {label} | {'refused on the CPU (expected)' if refused else 'FAILED'} | | | | |")
            if not refused:
                lines += ["", "```", traceback.format_exc(limit=-8), "```", ""]
            continue
        w = r["weights"]
        dw = float((w - ref["weights"]).abs().max())
        dcos = float((r["cosines"] - ref["cosines"]).abs().max())
        good = bool(torch.isfinite(w).all()) and abs(float(w.sum()) - 3) < 1e-4 and dw < 1e-5 and dcos < 1e-5
        ok = ok and good
        lines.append(f"| {label} | {r['route']} | {r['params']} | {float(w.min()):.4f}–{float(w.max()):.4f}, "
                     f"{float(w.sum()):.4f} | {dw:.1e} | {dcos:.1e} |" + ("" if good else " **not as expected**"))
        print(lines[-1], flush=True)
    return ok, [*lines, ""]


def machine_lines() -> list[str]:
    """The GPU, the versions, the commit."""
    props = torch.cuda.get_device_properties(0)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT,
                            check=False).stdout.strip()

    return [f"- GPU: {props.name} ({props.total_memory / 2**30:.0f} GiB, {props.multi_processor_count} SMs), "
            f"CUDA {torch.version.cuda}",
            f"- torch {torch.__version__}, lightning {package_version('lightning')}, gradnorm-pytorch "
            f"{package_version('gradnorm-pytorch')}, python {sys.version.split()[0]}",
            f"- project commit {commit or '? (no git here)'}, {time.strftime('%Y-%m-%d %H:%M:%S %Z')}", ""]


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--out", default=None,
                        help="also write the Markdown report here (and pytest's whole output beside it, .pytest.txt)")
    parser.add_argument("--steps", type=int, default=100, help="timed interleaved rounds per table in (d)")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--quick", action="store_true", help="fewer steps and tests (a smoke run)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check here (the CPU suite is README's test command)")
        return 2
    steps = 10 if args.quick else args.steps
    command = sys.argv if argv is None else ["benchmarks/gpu_check.py", *argv]
    report = ["# GPU checks (issue 11)", "", f"Command: `python {' '.join(command)}`", "", *machine_lines()]
    parts: list[tuple[str, Callable[[], tuple[bool, list[str]]]]] = [
        ("(a) CUDA-marked tests",
         lambda: run_tests(args.quick, Path(args.out).with_suffix(".pytest.txt") if args.out else None)),
        ("(b) training with torch.cuda.set_sync_debug_mode('error') around every step",
         lambda: sync_checks(("toy", "dense"), 6 if args.quick else 30)),
        ("(c) Lightning fits in 32-true, bf16-mixed and 16-mixed (GradScaler)",
         lambda: precision_fits(("toy", "dense"), 10 if args.quick else 40)),
        ("(d) benchmark rows on the GPU (step ÷ plain summed-loss step, interleaved, synchronised per step)",
         lambda: benchmark_rows(("toy", "conv", "dense", "convbn"), steps, args.warmup, 10 if args.quick else 50, 16)),
        ("(e) GPU-bound workloads: throughput (blocks of steps, one synchronisation per block)",
         lambda: throughput_rows(THROUGHPUT_WORKLOADS, 5 if args.quick else 20, 2 if args.quick else 5)),
        ("(f) Lightning FSDP fits with GradNormCallback(task_cosines=True) against strategy='auto'",
         lambda: lightning_fsdp_fits(10 if args.quick else 20)),
    ]
    failed = []
    for title, part in parts:
        print(f"=== {title}", flush=True)
        t0 = time.perf_counter()
        try:
            ok, lines = part()
        except Exception:  # reported; the other parts still run
            ok, lines = False, ["```", traceback.format_exc(), "```", ""]
        report += [f"## {title}: {'passed' if ok else 'FAILED'} ({time.perf_counter() - t0:.0f} s)", "", *lines]
        if not ok:
            failed.append(title)
        if args.out:  # written after every part: a run cut short keeps what it did
            Path(args.out).write_text("\n".join(report) + "\n")
    text = "\n".join(report) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
