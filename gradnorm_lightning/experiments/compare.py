"""``gradnorm-compare``: loss-weighting methods over seeds on one experiment, measured.

Runs one experiment (``--experiment``) once per (loss-weighting method, seed), and for
``paper_toy`` per number of tasks ``T`` (``--num-tasks``), in-process with
:func:`gradnorm_lightning.experiments.train.train`, each run in its own folder, and writes a
table of the per-task test losses, normalised, as mean ± std over seeds:

* ``<out>/compare_report.md``: the tables in Markdown, with the command, date and machine;
* ``<out>/compare_results.json``: every run's per-task test losses (and test metrics) and
  normalised scores, and the aggregated rows.

Experiments (:data:`EXPERIMENTS`):

* ``paper_toy`` (default): the GradNorm paper's toy claim (Sec. 5.1, Fig. 2); runs in
  ``<out>/T<T>/<method>/seed<S>``; GradNorm's alpha defaults to 0.12, the paper's value.
* ``dense_synthetic``: per-pixel segmentation, depth and normals (the paper's NYUv2 setting
  in miniature); runs in ``<out>/dense_synthetic/<method>/seed<S>``; alpha defaults to 1.5,
  the paper's NYUv2 value; the table adds each task's test metric (mean IoU, depth MAE, mean
  angular error of the normals).

Every method sees the same runs: for seed ``S`` the training seed (``seed=S``: model init,
shuffling) **and** the data seed (``data.seed=S``) are ``S``, so seed ``S`` of every method
is trained and tested on the same data and starts from the same initial network;
comparisons are paired by seed. The normalisations are defined in
:mod:`~gradnorm_lightning.experiments.compare_table`; the headline ``rel_equal`` is the mean
over tasks of each task's test loss relative to equal weighting on the same seed.

GradNorm runs get ``callbacks.gradnorm.alpha=<alpha>`` and otherwise the experiment's
GradNorm settings; the baselines get no method-specific override. Examples::

    gradnorm-compare                                   # paper_toy, T=10, 5 seeds, 4 methods
    gradnorm-compare --num-tasks 2,10 --steps 1000 --out compare_runs
    gradnorm-compare --experiment dense_synthetic --seeds 3 --steps 300
    gradnorm-compare --methods equal,gradnorm --seeds 2 --steps 5 \\
        data.num_train=256 data.num_test=128      # extra Hydra overrides apply to every run
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import logging
import os
import platform
import shlex
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from gradnorm_lightning.experiments.compare_table import (
    METRICS,
    REFERENCE_METHOD,
    Aggregate,
    RunRecord,
    aggregate,
    format_report,
    normalise,
)

__all__ = [
    "DEFAULT_METHODS",
    "EXPERIMENTS",
    "METRICS",
    "REFERENCE_METHOD",
    "Aggregate",
    "ExperimentSpec",
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

REPORT_MD = "compare_report.md"
RESULTS_JSON = "compare_results.json"
RECORD_JSON = "record.json"

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


def _toy_sigmas(cfg: Any) -> list[float]:
    """The task scales of a composed paper_toy config (the data module's default if null)."""
    from gradnorm_lightning.experiments.tasks.toy import default_sigmas

    sigmas = cfg.data.get("sigmas")
    if sigmas is None:
        return default_sigmas(int(cfg.data.num_tasks))
    return [float(s) for s in sigmas]


@dataclass(frozen=True)
class ExperimentSpec:
    """What ``gradnorm-compare`` needs to know about one experiment.

    Attributes:
        name: The ``experiment`` config option.
        title: The report's first heading.
        alpha: GradNorm's default ``alpha`` for it.
        varies_num_tasks: Whether ``--num-tasks`` sets ``data.num_tasks``.
        default_num_tasks: ``T`` of the experiment (the default of ``--num-tasks``).
        scales: Composed config to the task scales ``sigma_i`` (empty: none).
        metric_labels: Task name to the label of its test metric in the report.
    """

    name: str
    title: str
    alpha: float
    varies_num_tasks: bool
    default_num_tasks: int
    scales: Callable[[Any], list[float]] = lambda cfg: []
    metric_labels: Mapping[str, str] = field(default_factory=dict)


EXPERIMENTS: dict[str, ExperimentSpec] = {
    "paper_toy": ExperimentSpec(
        name="paper_toy",
        title="GradNorm paper toy (Sec. 5.1): test losses by loss-weighting method",
        alpha=DEFAULT_ALPHA,
        varies_num_tasks=True,
        default_num_tasks=10,
        scales=_toy_sigmas,
    ),
    "dense_synthetic": ExperimentSpec(
        name="dense_synthetic",
        title="Synthetic dense prediction (seg / depth / normals): test losses by loss-weighting method",
        alpha=1.5,
        varies_num_tasks=False,
        default_num_tasks=3,
        metric_labels={
            "seg": "seg mIoU ↑",
            "depth": "depth MAE ↓",
            "normals": "normals mean angle (°) ↓",
        },
    ),
}
"""The experiments ``gradnorm-compare --experiment`` accepts."""


def _spec(experiment: str) -> ExperimentSpec:
    if experiment not in EXPERIMENTS:
        raise ValueError(f"`experiment` must be one of {sorted(EXPERIMENTS)}; got {experiment!r}.")
    return EXPERIMENTS[experiment]


def run_overrides(
    method: str,
    seed: int,
    num_tasks: int | None,
    run_dir: Path,
    steps: int | None = None,
    alpha: float = DEFAULT_ALPHA,
    extra: Sequence[str] = (),
    experiment: str = "paper_toy",
) -> list[str]:
    """The Hydra overrides of one comparison run.

    Args:
        method: The ``weighting`` option (``equal``, ``gradnorm``, ``uncertainty``, ``dwa``).
        seed: Used as both the training seed (``seed``) and the data seed (``data.seed``).
        num_tasks: ``T`` (``data.num_tasks``; the model follows it) for an experiment whose
            number of tasks varies (``paper_toy``); ``None`` for the others.
        run_dir: The run's output folder (absolute).
        steps: ``trainer.max_steps``; ``None`` keeps the experiment's.
        alpha: GradNorm's ``alpha``, set only when ``method == "gradnorm"``.
        extra: More overrides, appended last (e.g. smaller data for a quick check).
        experiment: The ``experiment`` option (a key of :data:`EXPERIMENTS`).

    Returns:
        The overrides, in order.

    Raises:
        ValueError: If ``experiment`` is unknown, or ``num_tasks`` is given for an experiment
            with a fixed number of tasks (or missing for one without).

    Example::

        >>> run_overrides("equal", 3, 10, Path("/r"))[:5]
        ['experiment=paper_toy', 'weighting=equal', 'seed=3', 'data.seed=3', 'data.num_tasks=10']
        >>> run_overrides("dwa", 1, None, Path("/r"), experiment="dense_synthetic")[:4]
        ['experiment=dense_synthetic', 'weighting=dwa', 'seed=1', 'data.seed=1']
    """
    spec = _spec(experiment)
    if spec.varies_num_tasks == (num_tasks is None):
        raise ValueError(
            f"`num_tasks` must be {'an int' if spec.varies_num_tasks else 'None'} for "
            f"experiment {experiment!r}; got {num_tasks!r}."
        )
    out = str(run_dir)
    overrides = [f"experiment={experiment}", f"weighting={method}", f"seed={seed}", f"data.seed={seed}"]
    if num_tasks is not None:
        overrides.append(f"data.num_tasks={num_tasks}")
    if steps is not None:
        overrides.append(f"trainer.max_steps={steps}")
    if method == "gradnorm":
        overrides.append(f"callbacks.gradnorm.alpha={alpha}")
    family = f"T{num_tasks}" if num_tasks is not None else experiment
    overrides += [
        f"paths.log_dir={out}",
        f"paths.output_dir={out}",
        f"paths.work_dir={Path.cwd()}",
        f"task_name=compare_{family}_{method}_seed{seed}",
        *_QUIET_OVERRIDES,
        *extra,
    ]
    return overrides


def compose_run_config(overrides: Sequence[str], run_dir: Path) -> Any:
    """Compose ``train.yaml`` with ``overrides`` the way ``gradnorm-train`` would.

    The Hydra node is kept and installed as the current ``HydraConfig`` (its runtime output
    folder set to ``run_dir``), so ``${hydra:...}`` interpolations and the config-group
    choices that :func:`~gradnorm_lightning.experiments.train.train` records resolve as in a
    real run.

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


def _run_dir(out: Path, spec: ExperimentSpec, num_tasks: int | None, method: str, seed: int) -> Path:
    family = f"T{num_tasks}" if spec.varies_num_tasks else spec.name
    return (out / family / method / f"seed{seed}").resolve()


def _run_one(
    spec: ExperimentSpec,
    method: str,
    seed: int,
    num_tasks: int | None,
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

    run_dir = _run_dir(out, spec, num_tasks, method, seed)
    overrides = run_overrides(method, seed, num_tasks, run_dir, steps, alpha, extra, spec.name)
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
        num_tasks=len(losses) if num_tasks is None else num_tasks,
        method=method,
        seed=seed,
        test_losses={name: float(value) for name, value in losses.items()},
        sigmas=spec.scales(cfg),
        final_weights={name: float(row["final_weight"]) for name, row in tasks.items()},
        run_dir=str(run_dir),
        overrides=overrides,
        total_steps=int(summary["total_steps"]),
        time_per_step_ms=float(summary["time_per_step_ms"]),
        wall_s=wall,
        experiment=spec.name,
        test_metrics={
            name: None if row["test_metric"] is None else float(row["test_metric"])
            for name, row in tasks.items()
        },
    )
    record_path.write_text(json.dumps(asdict(record), indent=2) + "\n")
    return record, False


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
            "Run one experiment per loss-weighting method and seed, and write a "
            "Markdown + JSON table of the normalised per-task test losses."
        ),
    )
    parser.add_argument(
        "--experiment",
        choices=sorted(EXPERIMENTS),
        default="paper_toy",
        help="the experiment config to compare on (default paper_toy)",
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
        default=None,
        help="paper_toy only: T, or a comma-separated list of T values (default 10)",
    )
    parser.add_argument(
        "--alpha",
        type=float,
        default=None,
        help="GradNorm's alpha (default: the experiment's, 0.12 for paper_toy, 1.5 for "
        "dense_synthetic)",
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
    parser = _parser()
    args = parser.parse_args(argv)
    spec = EXPERIMENTS[args.experiment]
    if args.num_tasks is not None and not spec.varies_num_tasks:
        parser.error(
            f"--num-tasks applies to paper_toy only; {spec.name} has "
            f"{spec.default_num_tasks} tasks."
        )
    counts: list[int | None] = (
        list(args.num_tasks or [spec.default_num_tasks]) if spec.varies_num_tasks else [None]
    )
    alpha = spec.alpha if args.alpha is None else args.alpha
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(message)s")
    if not args.verbose:
        for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
            logging.getLogger(name).setLevel(logging.WARNING)
    import torch

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    command = "gradnorm-compare " + shlex.join(
        list(sys.argv[1:] if argv is None else argv)
    )
    started = _dt.datetime.now(_dt.timezone.utc)
    t0 = time.perf_counter()
    records: list[RunRecord] = []
    reused = 0
    plan = [(t, m, s) for t in counts for s in range(args.seeds) for m in args.methods]
    for i, (num_tasks, method, seed) in enumerate(plan, 1):
        where = spec.name if num_tasks is None else f"T={num_tasks}"
        log.info("[%d/%d] %s %s seed %d", i, len(plan), where, method, seed)
        record, was_reused = _run_one(
            spec, method, seed, num_tasks, out, args.steps, alpha, args.overrides, args.reuse
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
        "GradNorm": f"alpha={alpha}; other settings from experiment={spec.name}",
        "seeds": "seed S is both the training seed and the data seed (paired across methods)",
    }
    report = format_report(
        records, aggregates, header, title=spec.title, metric_labels=spec.metric_labels
    )
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
