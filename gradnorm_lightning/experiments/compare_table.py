"""The numbers of ``gradnorm-compare``: run records, normalised scores, aggregates, report.

Normalisations (``L_i`` = task ``i``'s test loss, ``T`` tasks), per run:

* ``rel_equal`` (the headline): ``(1/T) sum_i L_i(method, S) / L_i(equal, S)``, the mean over
  tasks of the test loss relative to the equal-weighting run of the same experiment, ``T``
  and seed (so equal weighting is exactly 1 and values below 1 are better than equal
  weighting). Needs ``equal`` among the methods.
* ``scaled``: ``(1/T) sum_i L_i / sigma_i^2``, each task's loss in units of its own scale, for
  experiments with task scales ``sigma_i`` (the paper toy: the target ``sigma_i tanh(.)`` has
  variance proportional to ``sigma_i^2``); ``None`` for the others.
* ``raw_sum``: ``sum_i L_i``, the unweighted total (what equal weighting minimises; reported
  for reference, not as the claim).
* ``wins``: the number of seeds where ``rel_equal < 1``.

Per task, the test metric of the experiment (e.g. mean IoU) is aggregated too when the
runs report one.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "METRICS",
    "REFERENCE_METHOD",
    "Aggregate",
    "RunRecord",
    "aggregate",
    "format_report",
    "normalise",
]

REFERENCE_METHOD = "equal"
METRICS: tuple[str, ...] = ("rel_equal", "scaled", "raw_sum")


@dataclass
class RunRecord:
    """One finished run: its identity, per-task test losses and task scales.

    Attributes:
        num_tasks: ``T``.
        method: The ``weighting`` option.
        seed: Training and data seed.
        test_losses: Task name to test loss, in task order.
        sigmas: The task scales ``sigma_i``, in task order (empty: the experiment has none).
        final_weights: Task name to final weight.
        run_dir: The run's output folder.
        overrides: The Hydra overrides the run was composed with.
        total_steps: Optimizer steps taken.
        time_per_step_ms: Mean wall-clock time per training step.
        wall_s: Wall-clock time of the whole run (fit + test), seconds.
        experiment: The ``experiment`` option.
        test_metrics: Task name to test metric (``None`` for a task without one).
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
    experiment: str = "paper_toy"
    test_metrics: dict[str, float | None] = field(default_factory=dict)


@dataclass
class Aggregate:
    """One table row: a method's normalised scores over seeds at one experiment and ``T``.

    Attributes:
        num_tasks: ``T``.
        method: The ``weighting`` option.
        seeds: The seeds aggregated.
        mean: Metric name (``rel_equal``, ``scaled``, ``raw_sum``) to mean over seeds.
        std: Metric name to sample standard deviation over seeds (``None`` for one seed).
        wins: Seeds where ``rel_equal < 1`` (``None`` without the equal-weighting runs).
        per_task_rel_equal: Task name to mean over seeds of ``L_i / L_i(equal)``.
        time_per_step_ms: Mean over seeds of the mean time per training step.
        experiment: The ``experiment`` option.
        metric_mean: Task name to mean over seeds of its test metric (``None`` without one).
        metric_std: Task name to sample std over seeds of its test metric.
    """

    num_tasks: int
    method: str
    seeds: list[int]
    mean: dict[str, float | None]
    std: dict[str, float | None]
    wins: int | None
    per_task_rel_equal: dict[str, float | None]
    time_per_step_ms: float
    experiment: str = "paper_toy"
    metric_mean: dict[str, float | None] = field(default_factory=dict)
    metric_std: dict[str, float | None] = field(default_factory=dict)


def normalise(records: Sequence[RunRecord]) -> list[dict[str, Any]]:
    """Normalised scores of every run (see the module docstring for the definitions).

    Args:
        records: Finished runs. ``rel_equal`` needs, for the same experiment, ``T`` and seed,
            a run of the ``equal`` method; without one it is ``None``.

    Returns:
        One dict per record, in order: ``experiment``, ``num_tasks``, ``method``, ``seed``,
        ``rel_equal``, ``scaled``, ``raw_sum`` and ``per_task_rel_equal`` (task name to
        ratio, or ``None``).

    Raises:
        ValueError: If a run's tasks differ from its equal-weighting run's, or it has task
            scales but not one per task.

    Example::

        >>> eq = RunRecord(2, "equal", 0, {"a": 1.0, "b": 100.0}, [1.0, 10.0])
        >>> gn = RunRecord(2, "gradnorm", 0, {"a": 0.5, "b": 100.0}, [1.0, 10.0])
        >>> [(r["method"], r["rel_equal"], r["scaled"]) for r in normalise([eq, gn])]
        [('equal', 1.0, 1.0), ('gradnorm', 0.75, 0.75)]
    """
    reference = {
        (r.experiment, r.num_tasks, r.seed): r.test_losses
        for r in records
        if r.method == REFERENCE_METHOD
    }
    rows = []
    for r in records:
        names = list(r.test_losses)
        losses = [r.test_losses[n] for n in names]
        scaled: float | None = None
        if r.sigmas:
            if len(r.sigmas) != len(names):
                raise ValueError(
                    f"{r.method} seed {r.seed}: {len(r.sigmas)} sigmas for {len(names)} tasks."
                )
            pairs = zip(losses, r.sigmas, strict=True)
            scaled = statistics.fmean(loss / sigma**2 for loss, sigma in pairs)
        ref = reference.get((r.experiment, r.num_tasks, r.seed))
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
                "experiment": r.experiment,
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
    """Mean ± std over seeds of the normalised scores, per experiment, ``T`` and method.

    Args:
        records: Finished runs.

    Returns:
        One :class:`Aggregate` per (experiment, ``T``, method), ordered by experiment (first
        appearance), then ``T``, then first appearance of the method in ``records``.
    """
    rows = normalise(records)
    keys: list[tuple[str, int, str]] = []
    for r in records:
        if (r.experiment, r.num_tasks, r.method) not in keys:
            keys.append((r.experiment, r.num_tasks, r.method))
    experiments = list(dict.fromkeys(e for e, _, _ in keys))
    keys.sort(key=lambda k: (experiments.index(k[0]), k[1]))
    out = []
    for experiment, num_tasks, method in keys:
        key = (experiment, num_tasks, method)
        group = [row for row in rows if (row["experiment"], row["num_tasks"], row["method"]) == key]
        runs = [r for r in records if (r.experiment, r.num_tasks, r.method) == key]
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
        metric_stats = {n: _mean_std([r.test_metrics.get(n) for r in runs]) for n in task_names}
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
                experiment=experiment,
                metric_mean={n: m for n, (m, _) in metric_stats.items()},
                metric_std={n: s for n, (_, s) in metric_stats.items()},
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


def _main_table(group: Sequence[Aggregate]) -> list[str]:
    scaled = any(a.mean["scaled"] is not None for a in group)
    lines = [
        "| method | rel. to equal | wins |" + (" L/σ² |" if scaled else "") + " raw sum | ms/step |",
        "|---|---|---|" + ("---|" if scaled else "") + "---|---|",
    ]
    for a in group:
        wins = "-" if a.wins is None else f"{a.wins}/{len(a.seeds)}"
        cells = [a.method, _pm(a.mean["rel_equal"], a.std["rel_equal"]), wins]
        if scaled:
            cells.append(_pm(a.mean["scaled"], a.std["scaled"]))
        cells += [_pm(a.mean["raw_sum"], a.std["raw_sum"]), f"{a.time_per_step_ms:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def format_report(
    records: Sequence[RunRecord],
    aggregates: Sequence[Aggregate],
    header: Mapping[str, str] | None = None,
    title: str = "GradNorm paper toy (Sec. 5.1): test losses by loss-weighting method",
    metric_labels: Mapping[str, str] | None = None,
) -> str:
    """Render the comparison as Markdown: a main table and per-task tables per experiment and ``T``.

    Args:
        records: Finished runs (for the task scales).
        aggregates: From :func:`aggregate`.
        header: ``label -> value`` lines printed above the tables (command, date, ...).
        title: The report's first heading.
        metric_labels: Task name to the column label of its test metric (default: the task
            name); the per-task metric table is printed when some run reports a metric.

    Returns:
        The Markdown text.
    """
    lines = [f"# {title}", ""]
    for label, value in (header or {}).items():
        lines.append(f"- {label}: {value}")
    lines += [
        "",
        "Normalised per-task test loss, mean ± sample std over seeds (lower is better):",
        "",
        "- `rel. to equal` = (1/T) Σ_i L_i / L_i(equal, same seed): equal weighting = 1;",
    ]
    if any(r.sigmas for r in records):
        lines.append("- `L/σ²` = (1/T) Σ_i L_i / σ_i²: each task's test loss in units of its scale;")
    lines += [
        "- `raw sum` = Σ_i L_i (what equal weighting minimises; dominated by the largest losses);",
        "- `wins` = seeds with `rel. to equal` < 1.",
        "",
    ]
    groups = list(dict.fromkeys((a.experiment, a.num_tasks) for a in aggregates))
    several = len({e for e, _ in groups}) > 1
    for experiment, num_tasks in groups:
        group = [a for a in aggregates if (a.experiment, a.num_tasks) == (experiment, num_tasks)]
        sigmas = next(
            r.sigmas for r in records if (r.experiment, r.num_tasks) == (experiment, num_tasks)
        )
        seeds = sorted({s for a in group for s in a.seeds})
        task_names = list(group[0].per_task_rel_equal)
        heading = f"{experiment}, T = {num_tasks}" if several else f"T = {num_tasks}"
        lines += [f"## {heading}", ""]
        if sigmas:
            lines.append(f"σ_i = {', '.join(f'{s:.3g}' for s in sigmas)}; seeds {seeds}")
        else:
            lines.append(f"tasks {', '.join(task_names)}; seeds {seeds}")
        lines += ["", *_main_table(group)]
        if any(v is not None for a in group for v in a.per_task_rel_equal.values()):
            names = (
                [f"{n} (σ={s:.3g})" for n, s in zip(task_names, sigmas, strict=True)]
                if sigmas
                else task_names
            )
            lines += [
                "",
                "Per task, mean over seeds of L_i / L_i(equal):",
                "",
                "| method | " + " | ".join(names) + " |",
                "|---|" + "---|" * len(task_names),
            ]
            for a in group:
                cells = [_pm(a.per_task_rel_equal[n], None) for n in task_names]
                lines.append(f"| {a.method} | " + " | ".join(cells) + " |")
        if any(v is not None for a in group for v in a.metric_mean.values()):
            labels = [(metric_labels or {}).get(n, n) for n in task_names]
            lines += [
                "",
                "Per task test metric, mean ± sample std over seeds:",
                "",
                "| method | " + " | ".join(labels) + " |",
                "|---|" + "---|" * len(task_names),
            ]
            for a in group:
                cells = [_pm(a.metric_mean.get(n), a.metric_std.get(n)) for n in task_names]
                lines.append(f"| {a.method} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)
