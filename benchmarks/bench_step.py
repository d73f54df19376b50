"""Side-by-side per-step cost of GradNorm implementations (issue 5): the command line.

Run from the repository root::

    python benchmarks/bench_step.py [--steps N] [--warmup N] [--workload toy|conv|dense|convbn|all] [--out FILE.md]

What it does, per workload (:mod:`benchmarks.workloads`: the GradNorm paper's toy
regression; a conv trunk whose last shared layer is ``Linear(4096, 256)``; a dense-prediction
model whose last shared layer is ``Conv2d(128, 128, 3)``; a ``Conv2d -> BatchNorm2d -> ReLU``
block whose convolution is shared, so that the part above it is not elementwise), for every row of
:mod:`benchmarks.methods`:

1. **Trajectory check** (float64, 50 steps, same init, same data, same ``lr``/``alpha``):
   every GradNorm row must reproduce the task-weight trajectory of the textbook
   ``create_graph`` implementation it claims to implement, to ``1e-6`` relative or better,
   or the script fails loudly. ``gradnorm-pytorch`` 0.2.3 deviates from the textbook by
   design (see :class:`~benchmarks.methods.GradNormPytorch`): for that row the deviation is
   printed, together with the deviation from a textbook variant that applies exactly the
   documented differences (which must be ~0, proving the list of differences complete), and
   the script does not fail for it.
2. **Timing**: one process, ``torch.set_num_threads(1)``, every method has its own copy of
   the same model; methods are interleaved round-robin (one step of each method per round,
   the starting method rotating every round) so machine noise hits all of them equally.
   The reported figure is the median over ``--steps`` rounds after ``--warmup`` rounds,
   of the wall-clock time (``perf_counter``) and of this thread's CPU time
   (``thread_time``, which excludes time the process was descheduled by other load).
3. **Extra peak memory**: each method's step is run under ``torch.profiler`` with
   ``profile_memory=True``; the CPU allocator's allocation/free events are replayed in time
   order and the peak of the running sum (bytes allocated during the step above the level
   at its start) is taken, max over a few steps. The column reports that peak minus the
   plain step's peak. Persistent state a method keeps between steps (weights, optimizer
   state) is allocated before the window and is not counted; it is O(T) floats everywhere.
4. **Lightning** (:mod:`benchmarks.lightning_timing`): the same module trained by a
   ``Trainer`` with and without ``GradNormCallback``.

Steps (1)-(3) live in :mod:`benchmarks.measure`; ``tests/test_benchmarks.py`` runs them on
tiny sizes so the benchmark cannot silently rot.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from benchmarks.lightning_timing import time_lightning
from benchmarks.measure import check_trajectories, step_peak_bytes, time_interleaved
from benchmarks.methods import method_factories, project_available
from benchmarks.workloads import WORKLOADS, Workload, build_model, make_batches, workload

MIN_STEPS = 30
HEADER = (
    "Time: median over interleaved rounds (methods round-robin, start rotating), after warm-up, "
    "one thread. Ratio: ÷ the plain summed-loss step measured in the same rounds. CPU ms: `time.thread_time()` "
    "of the step (excludes time descheduled by other processes; the steadier figure on a shared machine). "
    "Extra peak memory: peak of bytes allocated during one step (CPU allocator events from "
    "`torch.profiler(profile_memory=True)`, replayed in order) minus the plain step's; state kept "
    "between steps is not included (O(T) floats for every method). Trajectory: float64, same "
    "init/data/lr/alpha, max over all steps and tasks of |w − w_reference|, where the reference is "
    "the textbook create_graph GradNorm with norms over: W = all parameters of the last shared layer, "
    "trunk = all trunk parameters, rep = the shared layer's output, rep_relu = the representation the "
    "heads read (after the ReLU)."
)


def package_version(pkg: str) -> str:
    """The installed version of a distribution, or ``"not installed"``."""
    from importlib import metadata

    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return "not installed"


def machine_info() -> list[str]:
    """CPU model, core count, versions and thread setting, as Markdown bullet lines."""
    import os
    import subprocess
    cpu = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass

    here = os.path.dirname(os.path.abspath(__file__))
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                check=False, cwd=here).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "../gradnorm_lightning"],
                               capture_output=True, text=True, check=False, cwd=here).stdout.strip()
        if commit and dirty:
            commit += " + uncommitted changes in gradnorm_lightning/"
    except OSError:
        commit = "?"
    return [
        f"- CPU: {cpu} ({os.cpu_count()} logical cores visible), no GPU used",
        f"- torch {torch.__version__}, torch.get_num_threads() = {torch.get_num_threads()}",
        f"- lightning {package_version('lightning')}, gradnorm-pytorch {package_version('gradnorm-pytorch')}, "
        f"python {platform.python_version()}",
        f"- project commit {commit or '?'}, {time.strftime('%Y-%m-%d %H:%M:%S %Z')}",
    ]


def _method_table(wl: Workload, steps: int, warmup: int, check_steps: int) -> list[str]:
    """The trajectory check, then the timing and memory table of every row."""
    if wl.check_horizon is not None and check_steps > wl.check_horizon:
        check_steps = wl.check_horizon  # see Workload.check_horizon: chaotic after it
    print(f"== {wl.name}: trajectory check (float64, {check_steps} steps)", flush=True)
    checks = {r.key: r for r in check_trajectories(wl, steps=check_steps)}

    print(f"== {wl.name}: timing ({warmup} warm-up + {steps} interleaved rounds)", flush=True)
    batches = make_batches(wl, 8)
    factories = method_factories(wl=wl)
    methods = [f(wl, build_model(wl)) for _, f in factories]
    times = time_interleaved(methods, batches, steps, warmup)
    peaks = [step_peak_bytes(m, batches) for m in methods]

    plain = times[0]
    lines = ["| method | median ms/step | p25–p75 ms | ratio to plain | CPU ms/step | ratio to plain (CPU) "
             "| extra peak memory (MiB) | max abs(w − w_textbook) [reference] |",
             "|---|---:|---:|---:|---:|---:|---:|---|"]
    for (key, _), m, ts, pk in zip(factories, methods, times, peaks, strict=True):
        q25, q75 = ts.quartiles_wall()
        chk = checks.get(key)
        dev = "—" if chk is None else f"{chk.max_abs_dev:.1e} [{chk.reference}]" + ("" if chk.ok else " (deviates, see below)")
        lines.append(f"| {m.name} | {ts.med_wall * 1e3:.2f} | {q25 * 1e3:.2f}–{q75 * 1e3:.2f} "
                     f"| {ts.med_wall / plain.med_wall:.2f}× | {ts.med_cpu * 1e3:.2f} | {ts.med_cpu / plain.med_cpu:.2f}× "
                     f"| {(pk - peaks[0]) / 2**20:+.2f} | {dev} |")
    lines.append("")
    lines.append(f"Plain step peak (allocated during the step): {peaks[0] / 2**20:.2f} MiB. "
                 f"Trajectory check over {check_steps} float64 steps"
                 + (" (this workload's check horizon: see `Workload.check_horizon`)." if wl.check_horizon else "."))
    for chk in checks.values():
        if chk.detail:
            lines.append(f"- {chk.name}: max abs(w − w_textbook) = {chk.max_abs_dev:.2e}; {chk.detail}.")
    lines.append("")
    return lines


def _lightning_table(wl: Workload, steps: int) -> list[str]:
    """The Lightning section's table."""
    print(f"== {wl.name}: Lightning", flush=True)
    lr = time_lightning(wl, make_batches(wl, 8), steps)
    rows = [("plain PyTorch loop, summed loss", lr.plain_loop, None),
            ("plain PyTorch loop, GradNorm balancer (default path)", lr.balancer_loop, None),
            ("plain PyTorch loop, GradNorm balancer + zero_nonfinite_grads_", lr.balancer_loop_sanitize, None),
            ("Lightning, summed loss, no callback", lr.lightning_plain, None),
            ("Lightning, GradNormMixin + GradNormCallback(sanitize_grads=True)", lr.lightning_gradnorm,
             lr.balancer_loop_sanitize),
            ("Lightning, GradNormMixin + GradNormCallback(sanitize_grads=False)",
             lr.lightning_gradnorm_nosanitize, lr.balancer_loop)]
    n = min(len(r[1]) for r in rows)
    lines = [
        f"Lightning (same model and GradNorm settings; >= {n} timed steps each; short fits alternated with "
        "blocks of the plain loops; a step is on_train_batch_start (first callback) → on_train_batch_end "
        "(last callback)); ÷ plain balancer loop: the loop doing what the callback does (with "
        "`zero_nonfinite_grads_` for `sanitize_grads=True`):",
        "",
        "| run | median ms/step | ÷ plain loop | ÷ Lightning without | ÷ plain balancer loop "
        "| CPU ms/step | ÷ Lightning without (CPU) | ÷ plain balancer loop (CPU) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    base = lr.lightning_plain
    for label, ser, bal in rows:
        is_lit = label.startswith("Lightning")
        lines.append(
            f"| {label} | {ser.med_wall * 1e3:.2f} | {ser.med_wall / lr.plain_loop.med_wall:.2f}× "
            f"| {f'{ser.med_wall / base.med_wall:.2f}×' if is_lit else '—'} "
            f"| {f'{ser.med_wall / bal.med_wall:.2f}×' if bal is not None else '—'} "
            f"| {ser.med_cpu * 1e3:.2f} | {f'{ser.med_cpu / base.med_cpu:.2f}×' if is_lit else '—'} "
            f"| {f'{ser.med_cpu / bal.med_cpu:.2f}×' if bal is not None else '—'} |")
    lines.append("")
    return lines


def run_workload(wl: Workload, steps: int, warmup: int, check_steps: int, lightning: bool) -> list[str]:
    """Check, time and measure every row on one workload; returns Markdown lines."""
    lines = [f"### Workload `{wl.name}`", "", wl.describe(), "",
             f"alpha={wl.alpha}, weight lr={wl.weight_lr} (SGD), model SGD lr={wl.model_lr}, float32 for timing.", ""]
    lines += _method_table(wl, steps, warmup, check_steps)
    if lightning and project_available():
        lines += _lightning_table(wl, steps)
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--steps", type=int, default=150,
                        help=f"timed interleaved rounds (fewer than {MIN_STEPS}: a smoke run, flagged in the report)")
    parser.add_argument("--warmup", type=int, default=10, help="untimed rounds first")
    parser.add_argument("--workload", choices=[*WORKLOADS, "all"], default="all")
    parser.add_argument("--check-steps", type=int, default=50, help="float64 trajectory-check steps")
    parser.add_argument("--no-lightning", action="store_true", help="skip the Lightning section")
    parser.add_argument("--out", default=None, help="also write the Markdown report here")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.check_steps < 1:
        parser.error("--steps and --check-steps must be >= 1, --warmup >= 0")
    torch.set_num_threads(1)

    command = sys.argv if argv is None else ["benchmarks/bench_step.py", *argv]
    lines = ["# GradNorm step-time benchmark", "", f"Command: `python {' '.join(command)}`", ""]
    lines += machine_info()
    lines += ["", HEADER, ""]
    if args.steps < MIN_STEPS:
        lines += [f"**Smoke run: {args.steps} timed steps (< {MIN_STEPS}); the times below are not a measurement.**",
                  ""]
    if not project_available():
        lines += ["**gradnorm_lightning.GradNorm is not importable: this project's rows are missing.**", ""]
    names = list(WORKLOADS) if args.workload == "all" else [args.workload]
    for name in names:
        lines += run_workload(workload(name), args.steps, args.warmup, args.check_steps, not args.no_lightning)
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
