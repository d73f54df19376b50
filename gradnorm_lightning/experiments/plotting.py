"""The figure of GradNorm runs, from their CSV metrics (the GradNorm paper's Figure 2 kind).

A run folder of ``gradnorm-train`` holds ``metrics.csv`` (written by
:class:`~gradnorm_lightning.experiments.recorder.MetricsRecorder` whatever the logger); any
folder with one Lightning ``CSVLogger`` file below it works too. From its ``gradnorm/*``
columns (logged by :class:`~gradnorm_lightning.GradNormCallback` and the baselines'
callbacks), :func:`plot_runs` draws five panels (six with cosines), per task over the training steps:

* the task weights ``w_i`` (``gradnorm/weight/<task>``);
* the weighted gradient norms ``w_i ||grad_W L_i||``: what GradNorm balances; one band
  means balanced;
* the gradient norms ``||grad_W L_i||`` (``gradnorm/grad_norm/<task>``): how far apart the
  tasks are without the weights;
* the loss ratios ``L_i(t) / L_i(0)`` (``gradnorm/loss_ratio/<task>``): each task's progress;
* the inverse training rates ``r_i`` (``gradnorm/inverse_rate/<task>``): above 1, a task is
  behind the others and GradNorm raises its weight;
* with ``task_cosines=True``, the cosines between the tasks' gradients, one line per pair
  (``gradnorm/cosine/<a>/<b>``): below 0, the pair conflicts.

The sixth place holds the legend: each task with what the experiment knows about it (the
``task_descriptions`` of the run's ``summary.json``, e.g. ``σ = 10`` on the paper's toy) and,
for several runs, each run's line style. A run without any weighting callback (no
``gradnorm/*`` columns) gets one panel of its tasks' training losses. A panel's y axis is logarithmic only where its
values span more than a factor of :data:`LOG_SPAN`. Panels without data are left out.
Several runs are overlaid (one colour per task, one line style per run), e.g. GradNorm
against the equal-weighting baseline::

    gradnorm-train hydra.run.dir=runs/gradnorm
    gradnorm-train weighting=equal hydra.run.dir=runs/equal
    gradnorm-plot runs/gradnorm runs/equal --labels gradnorm equal -o gradnorm_vs_equal.png
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gradnorm_lightning.experiments._extras import require

__all__ = [
    "PANELS",
    "TRAINING_LOSS",
    "draw_runs",
    "find_metrics_csv",
    "main",
    "plot_runs",
    "read_metrics",
    "read_task_descriptions",
]

Series = tuple[np.ndarray, np.ndarray]
"""``(steps, values)`` of one logged key, in logging order."""

_LINESTYLES: tuple[tuple[str, str], ...] = (
    ("-", "solid"),
    ("--", "dashed"),
    (":", "dotted"),
    ("-.", "dash-dot"),
)
#: A panel's y axis is logarithmic where its positive values span more than this factor.
LOG_SPAN = 20.0


@dataclass(frozen=True)
class _Panel:
    title: str
    hint: str  # what to look for, one short line under the title
    prefix: str  # column prefix of the per-task series
    reference: float | None = None  # a horizontal line (e.g. r_i = 1)
    pairs: bool = False  # one series per pair of tasks (``<prefix><a>/<b>``), not per task


PANELS = (
    _Panel("task weight $w_i$", "GradNorm's output; they sum to T", "gradnorm/weight/"),
    _Panel(
        r"weighted gradient norm $w_i\,\|\nabla_W L_i\|$",
        "what GradNorm balances: one band = balanced",
        "weighted_grad_norm/",
    ),
    _Panel(
        r"gradient norm $\|\nabla_W L_i\|$",
        "unweighted: how far apart the tasks are",
        "gradnorm/grad_norm/",
    ),
    _Panel(
        "loss ratio $L_i(t)/L_i(0)$",
        "each task's progress: lower = trained further",
        "gradnorm/loss_ratio/",
        reference=1.0,
    ),
    _Panel(
        "inverse training rate $r_i$",
        "above 1: behind the others, its weight grows",
        "gradnorm/inverse_rate/",
        reference=1.0,
    ),
    _Panel(
        "task-gradient cosine (pair a/b)",
        "below 0: the pair's gradients conflict",
        "gradnorm/cosine/",
        reference=0.0,
        pairs=True,
    ),
)
"""The panels, in reading order (left to right, top to bottom)."""

#: Drawn only for runs without any weighting callback (no ``gradnorm/*`` columns).
TRAINING_LOSS = _Panel(
    "training loss $L_i$", "no weighting callback: the tasks' own losses", "train/loss/"
)


def find_metrics_csv(run_dir: str | Path) -> Path:
    """Locate the ``metrics.csv`` of a run.

    The folder's own ``metrics.csv`` (the recorder's, in a ``gradnorm-train`` run folder) is
    taken first; otherwise the folder is searched recursively (e.g. a ``CSVLogger`` folder).

    Args:
        run_dir: A run folder or a path to the CSV file itself.

    Returns:
        The path of the CSV file.

    Raises:
        FileNotFoundError: If ``run_dir`` does not exist or holds no ``metrics.csv``.
        ValueError: If it holds several (pass the folder of the one you mean).
    """
    path = Path(run_dir)
    if path.is_file():
        return path
    if not path.is_dir():
        raise FileNotFoundError(f"Run folder {str(path)!r} does not exist.")
    if (path / "metrics.csv").is_file():
        return path / "metrics.csv"
    found = sorted(path.rglob("metrics.csv"))
    if not found:
        raise FileNotFoundError(
            f"No metrics.csv under {str(path)!r}: is it a finished `gradnorm-train` run folder "
            "(or a Lightning CSVLogger folder)?"
        )
    if len(found) > 1:
        listing = ", ".join(str(p) for p in found)
        raise ValueError(
            f"Several metrics.csv under {str(path)!r}: {listing}. Pass the folder of one of them."
        )
    return found[0]


def read_metrics(path: str | Path) -> dict[str, Series]:
    """Read a Lightning ``CSVLogger`` file into one ``(steps, values)`` series per column.

    Empty cells (a key not logged in that row) are skipped.

    Args:
        path: The ``metrics.csv`` file.

    Returns:
        Column name to ``(steps, values)`` float arrays (the ``step`` and ``epoch`` columns
        are not returned as series).

    Raises:
        ValueError: If the file has no ``step`` column.
    """
    columns: dict[str, tuple[list[float], list[float]]] = {}
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        if reader.fieldnames is None or "step" not in reader.fieldnames:
            raise ValueError(f"{str(path)!r} has no `step` column; is it a Lightning metrics.csv?")
        for row in reader:
            step_text = row.get("step") or ""
            if not step_text:
                continue
            step = float(step_text)
            for key, text in row.items():
                if key in ("step", "epoch") or key is None or not text:
                    continue
                steps, values = columns.setdefault(key, ([], []))
                steps.append(step)
                values.append(float(text))
    return {k: (np.asarray(s), np.asarray(v)) for k, (s, v) in columns.items()}


def _with_weighted_norms(metrics: dict[str, Series]) -> dict[str, Series]:
    """Add ``weighted_grad_norm/<task>`` = weight * grad norm on the steps that have both."""
    out = dict(metrics)
    prefix = "gradnorm/grad_norm/"
    for key, (steps, norms) in metrics.items():
        if not key.startswith(prefix):
            continue
        task = key[len(prefix) :]
        weight = metrics.get(f"gradnorm/weight/{task}")
        if weight is None:
            continue
        common, i_norm, i_weight = np.intersect1d(steps, weight[0], return_indices=True)
        out[f"weighted_grad_norm/{task}"] = (common, norms[i_norm] * weight[1][i_weight])
    return out


def _pyplot() -> Any:
    """``matplotlib.pyplot`` on the non-interactive Agg backend, imported on first use."""
    matplotlib = require("matplotlib", "The figure (gradnorm-plot, gradnorm.png)")
    matplotlib.use("Agg")
    return require("matplotlib.pyplot", "The figure (gradnorm-plot, gradnorm.png)")


def _panel_series(metrics: Mapping[str, Series], panel: _Panel) -> dict[str, Series]:
    slashes = 1 if panel.pairs else 0  # (a pair's key is `<prefix><a>/<b>`)
    return {
        key[len(panel.prefix) :]: series
        for key, series in metrics.items()
        if key.startswith(panel.prefix) and key[len(panel.prefix) :].count("/") == slashes
    }


def read_task_descriptions(run_dir: str | Path) -> dict[str, str]:
    """The task descriptions a ``gradnorm-train`` run wrote into its ``summary.json``.

    Args:
        run_dir: A run folder (or the path of its ``metrics.csv``).

    Returns:
        Task name to description (e.g. ``{"task0": "σ = 1"}``); ``{}`` when the folder of the
        metrics has no ``summary.json`` or it has no ``task_descriptions``.
    """
    path = Path(run_dir)
    folder = path.parent if path.is_file() else path
    summary = folder / "summary.json"
    if not summary.is_file():
        return {}
    try:
        found = json.loads(summary.read_text()).get("task_descriptions") or {}
    except (json.JSONDecodeError, AttributeError):
        return {}
    return {str(k): str(v) for k, v in found.items()} if isinstance(found, dict) else {}


def _use_log_scale(values: Sequence[np.ndarray]) -> bool:
    finite = [v[np.isfinite(v)] for v in values]
    data = np.concatenate(finite) if finite else np.empty(0)
    if data.size == 0 or bool(np.any(data <= 0)):
        return False
    return float(data.max() / data.min()) > LOG_SPAN


def draw_runs(
    runs: Sequence[dict[str, Series]],
    labels: Sequence[str],
    task_descriptions: Mapping[str, str] | None = None,
    title: str | None = None,
) -> Any:
    """Draw the panels of one or several runs' metrics into a new matplotlib figure.

    Args:
        runs: Each run's metrics, as :func:`read_metrics` returns them.
        labels: One label per run (the legend's line styles, the default title).
        task_descriptions: Task name to a short description shown in the legend beside the
            name (e.g. ``"σ = 10"``).
        title: Figure title; default: the run's label, or "A (solid) vs B (dashed)".

    Returns:
        The ``matplotlib.figure.Figure`` (the caller saves and closes it).

    Raises:
        ValueError: If ``labels`` does not have one entry per run, or no run has any of
            the plotted keys.
        ModuleNotFoundError: If matplotlib (the ``[experiments]`` extra) is missing.
    """
    if len(labels) != len(runs):
        raise ValueError(
            f"`labels` must have one entry per run ({len(runs)}); got {len(labels)}: {list(labels)!r}."
        )
    plt = _pyplot()
    line = require("matplotlib.lines", "The figure").Line2D
    runs = [_with_weighted_norms(m) for m in runs]
    panels = [p for p in PANELS if any(_panel_series(m, p) for m in runs)]
    if not panels and any(_panel_series(m, TRAINING_LOSS) for m in runs):
        panels = [TRAINING_LOSS]
    if not panels:
        raise ValueError(
            "Nothing to plot: no gradnorm/weight, grad_norm, loss_ratio, inverse_rate "
            "or train/loss/<task> columns"
        )
    tasks = sorted({t for m in runs for p in panels if not p.pairs for t in _panel_series(m, p)}, key=_natural_key)
    cmap = plt.get_cmap("tab10" if len(tasks) <= 10 else "tab20")
    colors = {t: cmap(i % cmap.N) for i, t in enumerate(tasks)}
    pairs = sorted({t for m in runs for p in panels if p.pairs for t in _panel_series(m, p)}, key=_natural_key)
    colors.update({t: plt.get_cmap("Dark2")(i % 8) for i, t in enumerate(pairs)})
    styles = list(itertools.islice(itertools.cycle(_LINESTYLES), len(runs)))

    ncols = min(3, len(panels) + 1)
    nrows = math.ceil((len(panels) + 1) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.6 * ncols, 3.4 * nrows), squeeze=False)
    cells = list(axes.flat)
    for ax, panel in zip(cells, panels, strict=False):
        drawn = []
        for metrics, (style, _) in zip(runs, styles, strict=True):
            for task, (steps, values) in _panel_series(metrics, panel).items():
                ax.plot(steps, values, linestyle=style, color=colors[task], lw=1.1)
                drawn.append(values)
        if panel.reference is not None:
            ax.axhline(panel.reference, color="0.4", lw=0.8, ls=(0, (1, 2)), zorder=0)
        if panel.pairs:
            ax.set_ylim(-1.05, 1.05)
        elif _use_log_scale(drawn):
            ax.set_yscale("log")
        ax.set_title(f"{panel.title}\n", fontsize="medium")
        ax.text(0.5, 1.02, panel.hint, transform=ax.transAxes, ha="center", va="bottom",
                fontsize="small", color="0.35")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    legend_ax = cells[len(panels)]
    for ax in cells[len(panels) :]:
        ax.axis("off")

    descriptions = dict(task_descriptions or {})
    handles = [
        line([], [], color=colors[t], lw=2, label=f"{t}  ({descriptions[t]})" if t in descriptions else t)
        for t in tasks
    ]
    handles += [line([], [], color=colors[t], lw=2, label=f"cosine {t}") for t in pairs]
    if len(runs) > 1:
        handles += [
            line([], [], color="black", linestyle=style, label=f"{label} ({name})")
            for label, (style, name) in zip(labels, styles, strict=True)
        ]
    many = len(handles) > 14
    legend_ax.legend(
        handles=handles,
        loc="center",
        frameon=False,
        fontsize="x-small" if many else "small",
        ncols=2 if many else 1,
        title="tasks" if len(runs) == 1 else "tasks; runs by line style",
    )
    if title is None:
        title = labels[0] if len(runs) == 1 else " vs ".join(
            f"{label} ({name})" for label, (_, name) in zip(labels, styles, strict=True)
        )
    fig.suptitle(title)
    fig.set_layout_engine("constrained")
    return fig


def plot_runs(
    run_dirs: Sequence[str | Path],
    out: str | Path,
    labels: Sequence[str] | None = None,
    title: str | None = None,
    task_descriptions: Mapping[str, str] | None = None,
) -> Path:
    """Draw the per-task panels of one or several runs into one PNG.

    Args:
        run_dirs: Run folders (or ``metrics.csv`` paths).
        out: Output image path (its folder is created).
        labels: One legend label per run; default: the folder names.
        title: Figure title; default: the label of a single run, or "A (solid) vs B (dashed)".
        task_descriptions: Task name to a short description for the legend; default: those
            in the runs' ``summary.json`` (:func:`read_task_descriptions`; the first run's
            win).

    Returns:
        The path written.

    Raises:
        ValueError: If ``run_dirs`` is empty, ``labels`` has the wrong length, or no run has
            any of the plotted keys.
        FileNotFoundError: If a run has no ``metrics.csv``.
        ModuleNotFoundError: If matplotlib (the ``[experiments]`` extra) is missing.
    """
    if not run_dirs:
        raise ValueError("`run_dirs` must name at least one run folder; got none.")
    if labels is None:
        labels = [Path(d).resolve().name for d in run_dirs]
    if len(labels) != len(run_dirs):
        raise ValueError(
            f"`labels` must have one entry per run ({len(run_dirs)}); got {len(labels)}: {list(labels)!r}."
        )
    plt = _pyplot()
    paths = [find_metrics_csv(d) for d in run_dirs]
    if task_descriptions is None:
        task_descriptions = {}
        for path in reversed(paths):
            task_descriptions.update(read_task_descriptions(path))
    try:
        fig = draw_runs([read_metrics(p) for p in paths], labels, task_descriptions, title)
    except ValueError as err:
        if str(err).startswith("Nothing to plot"):
            raise ValueError(f"{err} in " + ", ".join(str(d) for d in run_dirs) + ".") from None
        raise
    out_path = Path(out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
    return out_path


def _natural_key(name: str) -> tuple[str, int, str]:
    """Sort ``task2`` before ``task10``."""
    stem = name.rstrip("0123456789")
    digits = name[len(stem) :]
    return (stem, int(digits) if digits else -1, name)


def main(argv: Sequence[str] | None = None) -> None:
    """Console entry point ``gradnorm-plot``.

    Args:
        argv: Command-line arguments (default: ``sys.argv[1:]``).

    Raises:
        SystemExit: On bad arguments or unreadable runs (exit status 2, message on stderr).
    """
    parser = argparse.ArgumentParser(
        prog="gradnorm-plot",
        description="Plot GradNorm task weights, gradient norms and inverse training rates "
        "of one or several runs (from their metrics.csv).",
    )
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run folder(s)")
    parser.add_argument(
        "-o",
        "--output",
        default=None,
        help="output PNG (default: RUN_DIR/gradnorm.png for one run, ./gradnorm_runs.png for several)",
    )
    parser.add_argument("--labels", nargs="+", default=None, help="one legend label per run")
    parser.add_argument("--title", default=None, help="figure title")
    args = parser.parse_args(argv)
    if args.output is None:
        only = Path(args.run_dirs[0])
        single = only if only.is_dir() else only.parent
        args.output = single / "gradnorm.png" if len(args.run_dirs) == 1 else "gradnorm_runs.png"
    try:
        path = plot_runs(args.run_dirs, args.output, labels=args.labels, title=args.title)
    except (FileNotFoundError, ValueError) as err:
        parser.error(str(err))
    print(path)


if __name__ == "__main__":
    main()
