"""Do the task weights settle, or flip-flop? GradNorm configurations side by side.

Run from the repository root::

    python benchmarks/weight_stability.py [--config key=value ...]... [--no-defaults] [--out FILE.md]

Trains the README quickstart's model (trunk ``Linear(8,32)-ReLU-Linear(32,32)-ReLU``, three
``Linear(32,1)`` heads, Adam lr 1e-3 on the model, batch 32, inputs ``randn(32, 8)``,
targets ``randn(32, 3) * scales``, MSE per task) in a plain loop with
``gradnorm_lightning.GradNorm`` for ``--steps`` steps, for every configuration × alpha ×
loss scales × seed, and reports per (configuration, alpha, scales), over the seeds:

* **low weights**: the percentage of steps ``t > --after`` at which some weight
  ``w_i(t) < --floor``, a task switched off;
* **jitter**: the median over those steps of ``max_i |w_i(t) - w_i(t-1)|``; the weights
  average 1, so this is a relative change per step;
* the final weights.

``w(t)`` is the weight vector after ``t`` updates (``w(0) = 1``). The configurations are the
library's defaults, the paper's update (SGD, lr 0.025), Adam at lr 0.025, log-space weights
with SGD and with Adam, and any given with ``--config key=value ...`` (values parsed as
Python literals, else strings): every key is passed to ``GradNorm``, every other setting is
the library's default, and an option the library does not have produces an error row, not a
crash. The grid and the data are the same
for every configuration (seed ``s`` is both the model's and the data's), so rows are paired.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import statistics
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

DEFAULT_CONFIGS: tuple[dict[str, Any], ...] = (
    {},  # the library's defaults
    {"optimizer": "sgd", "lr": 0.025},  # the paper's update
    {"optimizer": "adam", "lr": 0.025},
    {"weight_space": "log", "optimizer": "sgd", "lr": 0.025},
    {"weight_space": "log", "optimizer": "adam", "lr": 0.01},
)
ALPHAS = (0.12, 1.5)
SCALES: tuple[tuple[float, ...], ...] = ((1.0, 10.0, 100.0), (1.0, 1.0, 1.0))
SEEDS = (0, 1, 2)
RESERVED = ("alpha", "shared_layer", "num_tasks", "task_names")


def train_weights(config: Mapping[str, Any], alpha: float, scales: Sequence[float], seed: int,
                  steps: int = 300) -> Tensor:
    """The weight trajectory ``w(0..steps)`` (``(steps + 1) × T``) of one quickstart run.

    Raises:
        TypeError, ValueError: whatever ``GradNorm`` raises for the configuration.
    """
    from gradnorm_lightning import GradNorm

    torch.manual_seed(seed)
    trunk = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU())
    heads = nn.ModuleList([nn.Linear(32, 1) for _ in scales])
    optimizer = torch.optim.Adam([*trunk.parameters(), *heads.parameters()], lr=1e-3)
    gn = GradNorm(trunk[-2], num_tasks=len(scales), **{"alpha": alpha, **config})
    g = torch.Generator().manual_seed(seed)
    scale = torch.tensor(list(scales))
    out = [torch.ones(len(scales))]
    for _ in range(steps):
        x = torch.randn(32, 8, generator=g)
        y = torch.randn(32, len(scales), generator=g) * scale
        z = trunk(x)
        losses = [nn.functional.mse_loss(h(z).squeeze(1), y[:, i]) for i, h in enumerate(heads)]
        optimizer.zero_grad()
        gn.combine(losses).backward()
        gn.step()
        optimizer.step()
        out.append(gn.weights.detach().clone().float())
    return torch.stack(out)


def low_weight_percent(traj: Tensor, after: int = 50, floor: float = 1e-3) -> float:
    """Percentage of steps ``t > after`` at which some ``w_i(t) < floor`` (``traj[t] = w(t)``)."""
    tail = traj[after + 1:]
    if len(tail) == 0:
        raise ValueError(f"the trajectory has {len(traj) - 1} steps; `after` must be below that, got {after!r}.")
    return 100.0 * float((tail.min(dim=1).values < floor).double().mean())


def median_max_change(traj: Tensor, after: int = 50) -> float:
    """Median over steps ``t > after`` of ``max_i |w_i(t) - w_i(t-1)|`` (``traj[t] = w(t)``)."""
    if len(traj) <= after + 1:
        raise ValueError(f"the trajectory has {len(traj) - 1} steps; `after` must be below that, got {after!r}.")
    change = (traj[after + 1:] - traj[after:-1]).abs().max(dim=1).values
    return statistics.median(change.tolist())


@dataclasses.dataclass
class Row:
    """One table row: a configuration at one alpha and loss scales, over the seeds."""

    config: dict[str, Any]
    alpha: float
    scales: tuple[float, ...]
    low: list[float] = dataclasses.field(default_factory=list)
    change: list[float] = dataclasses.field(default_factory=list)
    final: list[Tensor] = dataclasses.field(default_factory=list)
    error: str | None = None


def run_row(config: Mapping[str, Any], alpha: float, scales: Sequence[float], seeds: Sequence[int],
            steps: int = 300, after: int = 50, floor: float = 1e-3) -> Row:
    """All seeds of one (configuration, alpha, scales); an exception becomes ``Row.error``."""
    row = Row(dict(config), alpha, tuple(scales))
    for seed in seeds:
        try:
            traj = train_weights(config, alpha, scales, seed, steps)
        except Exception as exc:  # a configuration the library rejects is a result, not a crash
            row.error = f"{type(exc).__name__}: {exc}"
            return row
        row.low.append(low_weight_percent(traj, after, floor))
        row.change.append(median_max_change(traj, after))
        row.final.append(traj[-1])
    return row


def _defaults() -> dict[str, Any]:
    """GradNorm's default settings (those a configuration may override), from its signature."""
    import inspect

    from gradnorm_lightning import GradNorm

    skip = {"shared_layer", "num_tasks", "task_names", "recorder", "betas", "eps", "lr_staircase", "lr_decay_steps"}
    return {n: p.default for n, p in inspect.signature(GradNorm).parameters.items() if n not in skip}


def config_label(config: Mapping[str, Any]) -> str:
    """``key=value`` pairs, as passed on the command line."""
    return " ".join(f"{k}={v}" for k, v in config.items()) or "(library defaults)"


def _fmt(values: Sequence[float], spec: str, centre: str) -> str:
    mid = statistics.fmean(values) if centre == "mean" else statistics.median(values)
    return f"{mid:{spec}} [{min(values):{spec}}–{max(values):{spec}}]"


def markdown(rows: Sequence[Row], after: int, floor: float, seeds: int) -> list[str]:
    """The table, one line per row."""
    lines = [f"| configuration | alpha | loss scales | steps with a weight < {floor:g} (% of t > {after}; "
             f"mean [min–max] over {seeds} seeds) | median max_i abs(Δw_i) (t > {after}; median [min–max]) "
             "| final weights (mean over seeds) |",
             "|---|---:|---|---:|---:|---|"]
    for r in rows:
        head = f"| {config_label(r.config)} | {r.alpha:g} | {', '.join(f'{s:g}' for s in r.scales)} "
        if r.error is not None:
            message = r.error.replace("|", "\\|").replace("\n", " ")
            lines.append(head + f"| error: {message} | — | — |")
            continue
        final = torch.stack(r.final).mean(dim=0)
        lines.append(head + f"| {_fmt(r.low, '.1f', 'mean')} | {_fmt(r.change, '.2g', 'median')} "
                     f"| [{', '.join(f'{w:.3g}' for w in final.tolist())}] |")
    return lines


def parse_config(pairs: Sequence[str]) -> dict[str, Any]:
    """``["optimizer=adam", "lr=0.01"]`` -> ``{"optimizer": "adam", "lr": 0.01}``.

    Raises:
        ValueError: a pair without ``=``, or a key this script sets itself (``alpha`` ...).
    """
    config: dict[str, Any] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"a configuration is `key=value` pairs; got {pair!r}.")
        if key in RESERVED:
            raise ValueError(f"`{key}` is set by this script (alpha: --alphas); got {pair!r}.")
        try:
            config[key] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            config[key] = text
    return config


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--config", nargs="+", action="append", default=[], metavar="KEY=VALUE",
                        help="one more GradNorm configuration (repeatable), e.g. --config optimizer=adam lr=0.01")
    parser.add_argument("--no-defaults", action="store_true", help="only the --config configurations")
    parser.add_argument("--alphas", type=float, nargs="+", default=list(ALPHAS))
    parser.add_argument("--scales", nargs="+", default=[",".join(f"{s:g}" for s in sc) for sc in SCALES],
                        help="loss scales per task, comma-separated, one entry per setting")
    parser.add_argument("--seeds", type=int, default=len(SEEDS), help="seeds 0..N-1")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--after", type=int, default=50, help="statistics over steps t > AFTER")
    parser.add_argument("--floor", type=float, default=1e-3, help="a weight below this counts as switched off")
    parser.add_argument("--out", default=None, help="also write the Markdown table here")
    args = parser.parse_args(argv)
    try:
        extra = [parse_config(pairs) for pairs in args.config]
        scales = [tuple(float(s) for s in text.split(",")) for text in args.scales]
    except ValueError as exc:
        parser.error(str(exc))
    if args.steps <= args.after or args.seeds < 1:
        parser.error("--steps must exceed --after, and --seeds must be >= 1")
    configs = ([] if args.no_defaults else list(DEFAULT_CONFIGS)) + extra
    if not configs:
        parser.error("no configuration: drop --no-defaults or give --config")
    torch.set_num_threads(1)

    start = time.perf_counter()
    rows = [run_row(c, a, s, range(args.seeds), args.steps, args.after, args.floor)
            for c in configs for a in args.alphas for s in scales]
    command = sys.argv if argv is None else ["benchmarks/weight_stability.py", *argv]
    lines = ["# GradNorm weight stability (README quickstart model)", "",
             f"Command: `python {' '.join(command)}`", "",
             f"{args.steps} steps per run, Adam lr 1e-3 on the model, batch 32, targets randn × loss scales; "
             "every GradNorm setting a configuration does not name is the library's default "
             f"({config_label(_defaults())}). "
             f"{sum(len(r.low) for r in rows)} runs in {time.perf_counter() - start:.0f} s.", ""]
    lines += markdown(rows, args.after, args.floor, args.seeds)
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
