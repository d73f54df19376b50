"""Figures of GradNorm runs from their CSV metrics (the GradNorm paper's Figure 2 kind).

A run folder of ``gradnorm-train`` holds ``metrics.csv`` (written by
:class:`~gradnorm_lightning.experiments.recorder.MetricsRecorder` whatever the logger); any
folder with one Lightning ``CSVLogger`` file below it works too. From
its ``gradnorm/*`` columns (logged by :class:`~gradnorm_lightning.GradNormCallback`) and the
tasks' training losses, :func:`plot_runs` draws, per task and over training steps:

* the task weights ``w_i`` (``gradnorm/weight/<task>``);
* the gradient norms ``||grad_W L_i||`` (``gradnorm/grad_norm/<task>``) and the weighted
  norms ``w_i ||grad_W L_i||`` that GradNorm balances;
* the inverse training rates ``r_i`` (``gradnorm/inverse_rate/<task>``);
* the loss ratios ``L_i(t) / L_i(0)`` (``gradnorm/loss_ratio/<task>``);
* the raw training losses (``train/loss/<task>``) and GradNorm's own loss (``gradnorm/loss``);
* with ``task_cosines=True``, the cosines between the tasks' gradients, one line per pair
  (``gradnorm/cosine/<a>/<b>``).

Panels without data are left out. Several runs are overlaid: one colour per task, one line
style per run. Command line::

    gradnorm-plot RUN_DIR [RUN_DIR ...] [-o out.png] [--labels A B ...]
"""

from __future__ import annotations

import argparse
import csv
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.lines import Line2D

__all__ = ["find_metrics_csv", "main", "plot_runs", "read_metrics"]

Series = tuple[np.ndarray, np.ndarray]
"""``(steps, values)`` of one logged key, in logging order."""

_LINESTYLES: tuple[Any, ...] = ("-", "--", ":", "-.")


@dataclass(frozen=True)
class _Panel:
    title: str
    prefix: str  # column prefix; a key equal to the prefix is a single (task-less) series
    log_y: bool
    pairs: bool = False  # one series per pair of tasks (`<prefix><a>/<b>`), not per task


_PANELS = (
    _Panel("task weight $w_i$", "gradnorm/weight/", False),
    _Panel(r"gradient norm $\|\nabla_W L_i\|$", "gradnorm/grad_norm/", True),
    _Panel(r"weighted norm $w_i\,\|\nabla_W L_i\|$", "weighted_grad_norm/", True),
    _Panel("inverse training rate $r_i$", "gradnorm/inverse_rate/", False),
    _Panel("loss ratio $L_i(t)/L_i(0)$", "gradnorm/loss_ratio/", True),
    _Panel("training loss $L_i$", "train/loss/", True),
    _Panel("GradNorm loss $L_{grad}$", "gradnorm/loss", True),
    _Panel("task-gradient cosine (pair a/b)", "gradnorm/cosine/", False, pairs=True),
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


def _panel_series(metrics: dict[str, Series], panel: _Panel) -> dict[str, Series]:
    if panel.prefix in metrics:
        return {"": metrics[panel.prefix]}
    if panel.pairs:
        return {k[len(panel.prefix) :]: v for k, v in metrics.items()
                if k.startswith(panel.prefix) and k[len(panel.prefix) :].count("/") == 1}
    return {
        key[len(panel.prefix) :]: series
        for key, series in metrics.items()
        if key.startswith(panel.prefix) and "/" not in key[len(panel.prefix) :]
    }


def plot_runs(
    run_dirs: Sequence[str | Path],
    out: str | Path,
    labels: Sequence[str] | None = None,
    title: str | None = None,
) -> Path:
    """Draw the per-task curves of one or several runs into one PNG.

    Args:
        run_dirs: Run folders (or ``metrics.csv`` paths).
        out: Output image path (its folder is created).
        labels: One legend label per run; default: the folder names.
        title: Figure title; default: the label of a single run.

    Returns:
        The path written.

    Raises:
        ValueError: If ``run_dirs`` is empty, ``labels`` has the wrong length, or no run has
            any of the plotted keys.
        FileNotFoundError: If a run has no ``metrics.csv``.
    """
    if not run_dirs:
        raise ValueError("`run_dirs` must name at least one run folder; got none.")
    if labels is None:
        labels = [Path(d).resolve().name for d in run_dirs]
    if len(labels) != len(run_dirs):
        raise ValueError(
            f"`labels` must have one entry per run ({len(run_dirs)}); got {len(labels)}: {list(labels)!r}."
        )
    runs = [_with_weighted_norms(read_metrics(find_metrics_csv(d))) for d in run_dirs]
    panels = [p for p in _PANELS if any(_panel_series(m, p) for m in runs)]
    if not panels:
        raise ValueError(
            "Nothing to plot: no gradnorm/* or train/loss/* columns in "
            + ", ".join(str(d) for d in run_dirs)
        )
    tasks = sorted(
        {t for m in runs for p in panels if not p.pairs for t in _panel_series(m, p) if t},
        key=_natural_key,
    )
    cmap = plt.get_cmap("tab10" if len(tasks) <= 10 else "tab20")
    colors = {t: cmap(i % cmap.N) for i, t in enumerate(tasks)}
    pairs = sorted({t for m in runs for p in panels if p.pairs for t in _panel_series(m, p)})
    colors.update({t: plt.get_cmap("Dark2")(i % 8) for i, t in enumerate(pairs)})

    ncols = 2 if len(panels) > 1 else 1
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(6.0 * ncols, 3.4 * nrows), squeeze=False)
    for ax, panel in zip(axes.flat, panels, strict=False):
        for metrics, style in zip(runs, itertools.cycle(_LINESTYLES), strict=False):
            for task, (steps, values) in _panel_series(metrics, panel).items():
                ax.plot(steps, values, linestyle=style, color=colors.get(task, "black"), lw=1.2)
        if panel.log_y and _all_positive(runs, panel):
            ax.set_yscale("log")
        if panel.pairs:
            ax.set_ylim(-1.05, 1.05)
            ax.axhline(0.0, color="grey", lw=0.8)
        ax.set_title(panel.title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")

    handles = [Line2D([], [], color=colors[t], label=t) for t in [*tasks, *pairs]]
    if len(runs) > 1:
        handles += [
            Line2D([], [], color="black", linestyle=s, label=label)
            for label, s in zip(labels, itertools.cycle(_LINESTYLES), strict=False)
        ]
    fig.legend(handles=handles, loc="outside right center", fontsize="small")
    fig.suptitle(title if title is not None else (labels[0] if len(runs) == 1 else "GradNorm runs"))
    fig.set_layout_engine("constrained")
    out_path = Path(out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
    return out_path


def _all_positive(runs: Sequence[dict[str, Series]], panel: _Panel) -> bool:
    return all(
        values.size == 0 or bool(np.all(values > 0))
        for m in runs
        for _, values in _panel_series(m, panel).values()
    )


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
