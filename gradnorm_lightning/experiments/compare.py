"""``gradnorm-compare``: the GradNorm paper's toy claim (Sec. 5.1, Fig. 2), measured.

Runs ``experiment=paper_toy`` once per (number of tasks ``T``, loss-weighting method, seed)
in-process with :func:`gradnorm_lightning.experiments.train.train`, each run in its own folder
``<out>/T<T>/<method>/seed<S>``, and writes a table of the per-task test losses, normalised,
as mean ± std over seeds:

* ``<out>/compare_report.md``: the tables in Markdown, with the command, date and machine;
* ``<out>/compare_results.json``: every run's per-task test losses and normalised scores,
  and the aggregated rows.

Every method sees the same runs: for seed ``S`` the training seed (``seed=S``: model init,
shuffling) **and** the data seed (``data.seed=S``: ``B``, ``eps_i`` and the train/val/test
draws) are ``S``, so seed ``S`` of every method is trained and tested on the same data and
starts from the same initial network; comparisons are paired by seed.

Normalisations (``L_i`` = task ``i``'s test MSE, ``T`` tasks, ``sigma_i`` its scale):

* ``rel_equal`` (the headline): ``(1/T) sum_i L_i(method, S) / L_i(equal, S)``, the mean over
  tasks of the test loss relative to the equal-weighting run of the same seed (so equal
  weighting is exactly 1 and values below 1 are better than equal weighting). Needs
  ``equal`` among the methods.
* ``scaled``: ``(1/T) sum_i L_i / sigma_i^2``, each task's loss in units of its own scale
  (the target ``sigma_i tanh(.)`` has variance proportional to ``sigma_i^2``), so every task
  counts equally, independent of the equal-weighting run.
* ``raw_sum``: ``sum_i L_i``, the unweighted total, which the largest-``sigma`` tasks dominate
  (it is what equal weighting minimises; reported for reference, not as the claim).
* ``wins``: the number of seeds where ``rel_equal < 1``.

GradNorm runs get ``callbacks.gradnorm.alpha=<alpha>`` (0.12, the paper's value for the toy)
and otherwise the experiment's GradNorm settings; the baselines get no method-specific
override. Examples::

    python -m gradnorm_lightning.experiments.compare                          # T=10, 5 seeds, 4 methods
    python -m gradnorm_lightning.experiments.compare --num-tasks 2,10 --steps 1000 --out compare_runs
    python -m gradnorm_lightning.experiments.compare --methods equal,gradnorm --seeds 2 --steps 5 \\
        data.num_train=256 data.num_test=128      # extra Hydra overrides apply to every run
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import logging
import math
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "DEFAULT_METHODS",
    "Aggregate",
    "RunRecord",
    "aggregate",
    "compose_run_config",
    "format_report",
    "main",
    "normalise",
    "run_overrides",
]

log = logging.getLogger(__name__)

DEFAULT_METHODS: tuple[str, ...] = ("equal", "gradnorm", "uncertainty", "dwa")
"""The loss-weighting methods compared by default (the ``weighting`` config group options)."""

DEFAULT_ALPHA = 0.12
"""GradNorm's asymmetry on the paper's toy problem (Chen et al. 2018, Sec. 5.1)."""

REFERENCE_METHOD = "equal"
REPORT_MD = "compare_report.md"
RESULTS_JSON = "compare_results.json"
RECORD_JSON = "record.json"
METRICS: tuple[str, ...] = ("rel_equal", "scaled", "raw_sum")

CONFIG_DIR = Path(__file__).resolve().parent / "configs"

# Overrides that make a run quiet and cheap without changing what it trains: no progress
# bar, no model summary, no checkpoints, no figure.
_QUIET_OVERRIDES: tuple[str, ...] = (
    "callbacks.progress_bar=null",
    "callbacks.model_summary=null",
    "callbacks.model_checkpoint=null",
    "trainer.enable_progress_bar=false",
    "+trainer.enable_model_summary=false",
    "plot=false",
)


@dataclass
class RunRecord:
    """One finished run: its identity, per-task test losses and task scales.

    Attributes:
        num_tasks: ``T``.
        method: The ``weighting`` option.
        seed: Training and data seed.
        test_losses: Task name to test MSE, in task order.
        sigmas: The task scales ``sigma_i``, in task order.
        final_weights: Task name to final weight.
        run_dir: The run's output folder.
        overrides: The Hydra overrides the run was composed with.
        total_steps: Optimizer steps taken.
        time_per_step_ms: Mean wall-clock time per training step.
        wall_s: Wall-clock time of the whole run (fit + test), seconds.
    """

    num_tasks: int
    method: str
    seed: int
    test_losses: dict[str, float]
    sigmas: list[float]
    final_weights: dict[str, float] = field(default_factory=dict)
    run_dir: str = ""
    overrides: list[str] = field(default_factory=list)
    total_steps: int = 0
    time_per_step_ms: float = math.nan
    wall_s: float = math.nan


@dataclass
class Aggregate:
    """One table row: a method's normalised scores over seeds at one ``T``.

    Attributes:
        num_tasks: ``T``.
        method: The ``weighting`` option.
        seeds: The seeds aggregated.
        mean: Metric name (``rel_equal``, ``scaled``, ``raw_sum``) to mean over seeds.
        std: Metric name to sample standard deviation over seeds (``None`` for one seed).
        wins: Seeds where ``rel_equal < 1`` (``None`` without the equal-weighting runs).
        per_task_rel_equal: Task name to mean over seeds of ``L_i / L_i(equal)``.
        time_per_step_ms: Mean over seeds of the mean time per training step.
    """

    num_tasks: int
    method: str
    seeds: list[int]
    mean: dict[str, float | None]
    std: dict[str, float | None]
    wins: int | None
    per_task_rel_equal: dict[str, float | None]
    time_per_step_ms: float


def run_overrides(
    method: str,
    seed: int,
    num_tasks: int,
    run_dir: Path,
    steps: int | None = None,
    alpha: float = DEFAULT_ALPHA,
    extra: Sequence[str] = (),
) -> list[str]:
    """The Hydra overrides of one comparison run.

    Args:
        method: The ``weighting`` option (``equal``, ``gradnorm``, ``uncertainty``, ``dwa``).
        seed: Used as both the training seed (``seed``) and the data seed (``data.seed``).
        num_tasks: ``T`` (``data.num_tasks``; the model follows it).
        run_dir: The run's output folder (absolute).
        steps: ``trainer.max_steps``; ``None`` keeps the experiment's.
        alpha: GradNorm's ``alpha``, set only when ``method == "gradnorm"``.
        extra: More overrides, appended last (e.g. smaller data for a quick check).

    Returns:
        The overrides, in order.

    Example::

        >>> run_overrides("equal", 3, 10, Path("/r"))[:5]
        ['experiment=paper_toy', 'weighting=equal', 'seed=3', 'data.seed=3', 'data.num_tasks=10']
    """
    out = str(run_dir)
    overrides = [
        "experiment=paper_toy",
        f"weighting={method}",
        f"seed={seed}",
        f"data.seed={seed}",
        f"data.num_tasks={num_tasks}",
    ]
    if steps is not None:
        overrides.append(f"trainer.max_steps={steps}")
    if method == "gradnorm":
        overrides.append(f"callbacks.gradnorm.alpha={alpha}")
    overrides += [
        f"paths.log_dir={out}",
        f"paths.output_dir={out}",
        f"paths.work_dir={Path.cwd()}",
        f"task_name=compare_T{num_tasks}_{method}_seed{seed}",
        *_QUIET_OVERRIDES,
        *extra,
    ]
    return overrides


def compose_run_config(overrides: Sequence[str], run_dir: Path) -> Any:
    """Compose ``train.yaml`` with ``overrides`` the way ``gradnorm-train`` would.

    The Hydra node is kept and installed as the current ``HydraConfig`` (its runtime output
    folder set to ``run_dir``), so ``${hydra:...}`` interpolations and the config-group
    choices that :func:`~gradnorm_lightning.experiments.train.train` records resolve as in a real run.

    Args:
        overrides: Hydra overrides (see :func:`run_overrides`).
        run_dir: The run's output folder.

    Returns:
        The composed ``DictConfig``.
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIG_DIR)):
        cfg = compose(config_name="train", overrides=list(overrides), return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(run_dir)
        cfg.hydra.runtime.cwd = str(Path.cwd())
    HydraConfig.instance().set_config(cfg)
    return cfg


def _task_sigmas(cfg: Any) -> list[float]:
    """The task scales of a composed paper_toy config (the data module's default if null)."""
    from gradnorm_lightning.experiments.tasks.toy import default_sigmas

    sigmas = cfg.data.get("sigmas")
    if sigmas is None:
        return default_sigmas(int(cfg.data.num_tasks))
    return [float(s) for s in sigmas]


def _run_one(
    method: str,
    seed: int,
    num_tasks: int,
    out: Path,
    steps: int | None,
    alpha: float,
    extra: Sequence[str],
    reuse: bool,
) -> tuple[RunRecord, bool]:
    """Train and test one run (or load it when ``reuse`` and its overrides match).

    Returns:
        The run's record and whether it was loaded instead of trained.
    """
    from gradnorm_lightning.experiments.train import train

    run_dir = (out / f"T{num_tasks}" / method / f"seed{seed}").resolve()
    overrides = run_overrides(method, seed, num_tasks, run_dir, steps, alpha, extra)
    record_path = run_dir / RECORD_JSON
    if reuse and record_path.is_file():
        data = json.loads(record_path.read_text())
        if data.get("overrides") == overrides:
            log.info("Reusing %s", record_path)
            return RunRecord(**data), True
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    cfg = compose_run_config(overrides, run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    try:
        summary = train(cfg)
    finally:  # leave no Hydra state behind for the caller
        HydraConfig.instance().cfg = None
        GlobalHydra.instance().clear()
    wall = time.perf_counter() - start
    tasks: Mapping[str, Mapping[str, Any]] = summary["tasks"]
    losses = {name: row["test_loss"] for name, row in tasks.items()}
    missing = [name for name, value in losses.items() if value is None]
    if missing or not losses:
        raise RuntimeError(
            f"run {run_dir} reported no test loss for {missing or 'any task'}; "
            "was `test=false` or `trainer.limit_test_batches=0` passed?"
        )
    record = RunRecord(
        num_tasks=num_tasks,
        method=method,
        seed=seed,
        test_losses={name: float(value) for name, value in losses.items()},
        sigmas=_task_sigmas(cfg),
        final_weights={name: float(row["final_weight"]) for name, row in tasks.items()},
        run_dir=str(run_dir),
        overrides=overrides,
        total_steps=int(summary["total_steps"]),
        time_per_step_ms=float(summary["time_per_step_ms"]),
        wall_s=wall,
    )
    record_path.write_text(json.dumps(asdict(record), indent=2) + "\n")
    return record, False


def normalise(records: Sequence[RunRecord]) -> list[dict[str, Any]]:
    """Normalised scores of every run (see the module docstring for the definitions).

    Args:
        records: Finished runs. ``rel_equal`` needs, for the same ``T`` and seed, a run of
            the ``equal`` method; without one it is ``None``.

    Returns:
        One dict per record, in order: ``num_tasks``, ``method``, ``seed``, ``rel_equal``,
        ``scaled``, ``raw_sum`` and ``per_task_rel_equal`` (task name to ratio, or ``None``).

    Raises:
        ValueError: If a run's tasks differ from its equal-weighting run's, or the number
            of ``sigmas`` differs from the number of tasks.

    Example::

        >>> eq = RunRecord(2, "equal", 0, {"a": 1.0, "b": 100.0}, [1.0, 10.0])
        >>> gn = RunRecord(2, "gradnorm", 0, {"a": 0.5, "b": 100.0}, [1.0, 10.0])
        >>> [(r["method"], r["rel_equal"], r["scaled"]) for r in normalise([eq, gn])]
        [('equal', 1.0, 1.0), ('gradnorm', 0.75, 0.75)]
    """
    reference = {
        (r.num_tasks, r.seed): r.test_losses for r in records if r.method == REFERENCE_METHOD
    }
    rows = []
    for r in records:
        names = list(r.test_losses)
        if len(r.sigmas) != len(names):
            raise ValueError(
                f"{r.method} seed {r.seed}: {len(r.sigmas)} sigmas for {len(names)} tasks."
            )
        losses = [r.test_losses[n] for n in names]
        scaled = statistics.fmean(loss / s**2 for loss, s in zip(losses, r.sigmas, strict=True))
        ref = reference.get((r.num_tasks, r.seed))
        per_task: dict[str, float | None] = dict.fromkeys(names)
        rel: float | None = None
        if ref is not None:
            if set(ref) != set(names):
                raise ValueError(
                    f"{r.method} seed {r.seed} has tasks {sorted(names)}; the equal-weighting "
                    f"run has {sorted(ref)}."
                )
            ratios = {n: r.test_losses[n] / ref[n] for n in names}
            per_task = dict(ratios)
            rel = statistics.fmean(ratios.values())
        rows.append(
            {
                "num_tasks": r.num_tasks,
                "method": r.method,
                "seed": r.seed,
                "rel_equal": rel,
                "scaled": scaled,
                "raw_sum": math.fsum(losses),
                "per_task_rel_equal": per_task,
            }
        )
    return rows


def _mean_std(values: Sequence[float | None]) -> tuple[float | None, float | None]:
    """Mean and sample std of the non-``None`` values (``None`` where undefined)."""
    present = [v for v in values if v is not None]
    if not present:
        return None, None
    mean = statistics.fmean(present)
    std = statistics.stdev(present) if len(present) > 1 else None
    return mean, std


def aggregate(records: Sequence[RunRecord]) -> list[Aggregate]:
    """Mean ± std over seeds of the normalised scores, per ``T`` and method.

    Args:
        records: Finished runs.

    Returns:
        One :class:`Aggregate` per (``T``, method), ordered by ``T`` then first appearance
        of the method in ``records``.
    """
    rows = normalise(records)
    keys: list[tuple[int, str]] = []
    for r in records:
        if (r.num_tasks, r.method) not in keys:
            keys.append((r.num_tasks, r.method))
    keys.sort(key=lambda k: k[0])
    out = []
    for num_tasks, method in keys:
        group = [row for row in rows if row["num_tasks"] == num_tasks and row["method"] == method]
        runs = [r for r in records if r.num_tasks == num_tasks and r.method == method]
        mean: dict[str, float | None] = {}
        std: dict[str, float | None] = {}
        for metric in METRICS:
            mean[metric], std[metric] = _mean_std([row[metric] for row in group])
        rels = [row["rel_equal"] for row in group]
        wins = None if any(v is None for v in rels) else sum(1 for v in rels if v < 1.0)
        task_names = list(group[0]["per_task_rel_equal"])
        per_task = {
            n: _mean_std([row["per_task_rel_equal"][n] for row in group])[0] for n in task_names
        }
        out.append(
            Aggregate(
                num_tasks=num_tasks,
                method=method,
                seeds=[row["seed"] for row in group],
                mean=mean,
                std=std,
                wins=wins,
                per_task_rel_equal=per_task,
                time_per_step_ms=statistics.fmean(r.time_per_step_ms for r in runs),
            )
        )
    return out


def _pm(mean: float | None, std: float | None, digits: int = 3) -> str:
    """``mean ± std`` with ``digits`` significant digits (``-`` when undefined)."""
    if mean is None:
        return "-"
    if std is None:
        return f"{mean:.{digits}g}"
    return f"{mean:.{digits}g} ± {std:.2g}"


def format_report(
    records: Sequence[RunRecord],
    aggregates: Sequence[Aggregate],
    header: Mapping[str, str] | None = None,
) -> str:
    """Render the comparison as Markdown: the main table and a per-task table per ``T``.

    Args:
        records: Finished runs (for the task scales).
        aggregates: From :func:`aggregate`.
        header: ``label -> value`` lines printed above the tables (command, date, ...).

    Returns:
        The Markdown text.
    """
    lines = ["# GradNorm paper toy (Sec. 5.1): test losses by loss-weighting method", ""]
    for label, value in (header or {}).items():
        lines.append(f"- {label}: {value}")
    lines += [
        "",
        "Normalised per-task test loss, mean ± sample std over seeds (lower is better):",
        "",
        "- `rel. to equal` = (1/T) Σ_i L_i / L_i(equal, same seed): equal weighting = 1;",
        "- `L/σ²` = (1/T) Σ_i L_i / σ_i²: each task's test MSE in units of its scale;",
        "- `raw sum` = Σ_i L_i (dominated by the largest-σ tasks; what equal weighting minimises);",
        "- `wins` = seeds with `rel. to equal` < 1.",
        "",
    ]
    for num_tasks in sorted({a.num_tasks for a in aggregates}):
        group = [a for a in aggregates if a.num_tasks == num_tasks]
        sigmas = next(r.sigmas for r in records if r.num_tasks == num_tasks)
        seeds = sorted({s for a in group for s in a.seeds})
        lines += [
            f"## T = {num_tasks}",
            "",
            f"σ_i = {', '.join(f'{s:.3g}' for s in sigmas)}; seeds {seeds}",
            "",
            "| method | rel. to equal | wins | L/σ² | raw sum | ms/step |",
            "|---|---|---|---|---|---|",
        ]
        for a in group:
            wins = "-" if a.wins is None else f"{a.wins}/{len(a.seeds)}"
            lines.append(
                f"| {a.method} | {_pm(a.mean['rel_equal'], a.std['rel_equal'])} | {wins} | "
                f"{_pm(a.mean['scaled'], a.std['scaled'])} | "
                f"{_pm(a.mean['raw_sum'], a.std['raw_sum'])} | {a.time_per_step_ms:.1f} |"
            )
        task_names = list(group[0].per_task_rel_equal)
        if any(v is not None for a in group for v in a.per_task_rel_equal.values()):
            lines += [
                "",
                "Per task, mean over seeds of L_i / L_i(equal):",
                "",
                "| method | "
                + " | ".join(f"{n} (σ={s:.3g})" for n, s in zip(task_names, sigmas, strict=True))
                + " |",
                "|---|" + "---|" * len(task_names),
            ]
            for a in group:
                cells = [_pm(a.per_task_rel_equal[n], None) for n in task_names]
                lines.append(f"| {a.method} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def _csv_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def _positive_ints(text: str) -> list[int]:
    try:
        values = [int(item) for item in _csv_list(text)]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints; got {text!r}") from err
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive ints; got {text!r}")
    return values


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected a positive int; got {text!r}") from err
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive int; got {text!r}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gradnorm-compare",
        description=(
            "Run experiment=paper_toy per loss-weighting method and seed, and write a "
            "Markdown + JSON table of the normalised per-task test losses."
        ),
    )
    parser.add_argument("--seeds", type=_positive_int, default=5, help="seeds 0..N-1 (default 5)")
    parser.add_argument(
        "--methods",
        type=_csv_list,
        default=list(DEFAULT_METHODS),
        help=f"comma-separated weighting options (default {','.join(DEFAULT_METHODS)})",
    )
    parser.add_argument(
        "--steps",
        type=_positive_int,
        default=None,
        help="trainer.max_steps (default: the experiment's)",
    )
    parser.add_argument(
        "--num-tasks",
        type=_positive_ints,
        default=[10],
        help="T, or a comma-separated list of T values (default 10)",
    )
    parser.add_argument(
        "--alpha", type=float, default=DEFAULT_ALPHA, help="GradNorm's alpha (default 0.12)"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("compare_runs"),
        help="output folder (default compare_runs/)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads per run (default 1; 0 keeps torch's default)",
    )
    parser.add_argument(
        "--reuse",
        action="store_true",
        help="load runs whose record.json exists with the same overrides instead of rerunning",
    )
    parser.add_argument("--verbose", action="store_true", help="keep Lightning's INFO logs")
    parser.add_argument(
        "overrides",
        nargs="*",
        help="extra Hydra overrides applied to every run (e.g. data.num_train=256)",
    )
    return parser


def _machine() -> str:
    import torch

    return (
        f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPU cores "
        f"({platform.processor() or 'unknown CPU'}), Python {platform.python_version()}, "
        f"torch {torch.__version__} ({torch.get_num_threads()} thread(s)), "
        f"{'CUDA ' + torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU'}"
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point ``gradnorm-compare`` (``python -m gradnorm_lightning.experiments.compare``).

    Args:
        argv: Command-line arguments (default ``sys.argv[1:]``).

    Returns:
        The exit status (0).
    """
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(message)s")
    if not args.verbose:
        for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
            logging.getLogger(name).setLevel(logging.WARNING)
    import torch

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    command = "python -m gradnorm_lightning.experiments.compare " + shlex.join(
        list(sys.argv[1:] if argv is None else argv)
    )
    started = _dt.datetime.now(_dt.timezone.utc)
    t0 = time.perf_counter()
    records: list[RunRecord] = []
    reused = 0
    plan = [(t, m, s) for t in args.num_tasks for s in range(args.seeds) for m in args.methods]
    for i, (num_tasks, method, seed) in enumerate(plan, 1):
        log.info("[%d/%d] T=%d %s seed %d", i, len(plan), num_tasks, method, seed)
        record, was_reused = _run_one(
            method, seed, num_tasks, out, args.steps, args.alpha, args.overrides, args.reuse
        )
        reused += was_reused
        log.info(
            "  %.1f s, %.1f ms/step, test losses %s",
            record.wall_s,
            record.time_per_step_ms,
            ", ".join(f"{v:.4g}" for v in record.test_losses.values()),
        )
        records.append(record)
    elapsed = time.perf_counter() - t0
    aggregates = aggregate(records)
    header = {
        "command": f"`{command}`",
        "date": started.strftime("%Y-%m-%d %H:%M UTC"),
        "machine": _machine(),
        "wall time": (
            f"{elapsed / 60:.1f} min for {len(records) - reused} runs trained"
            + (f" ({reused} reused from earlier, --reuse)" if reused else "")
            + f"; sum of the runs' own wall times {sum(r.wall_s for r in records) / 60:.1f} min"
        ),
        "steps per run": ", ".join(sorted({str(r.total_steps) for r in records})),
        "GradNorm": f"alpha={args.alpha}; other settings from experiment=paper_toy",
        "seeds": "seed S is both the training seed and the data seed (paired across methods)",
    }
    report = format_report(records, aggregates, header)
    (out / REPORT_MD).write_text(report + "\n")
    results = {
        "header": header,
        "runs": [asdict(r) for r in records],
        "normalised": normalise(records),
        "aggregates": [asdict(a) for a in aggregates],
    }
    (out / RESULTS_JSON).write_text(json.dumps(results, indent=2) + "\n")
    print(report)
    log.info("Wrote %s and %s", out / REPORT_MD, out / RESULTS_JSON)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
