"""Hydra entry point: ``gradnorm-train`` / ``python -m gradnorm_lightning.experiments.train``.

:func:`train` builds everything from the config (``_target_`` entries, instantiated with
:func:`hydra.utils.instantiate`), fits, tests and writes into the run folder
(``cfg.paths.output_dir``, Hydra's run directory):

* ``metrics.csv``: the training curves (``train/*`` and ``gradnorm/*`` on the Trainer's
  logging steps), recorded by :class:`~gradnorm_lightning.experiments.recorder.MetricsRecorder`
  whatever logger is configured (``logger=csv``, ``tensorboard``, ``csv_tensorboard``, or
  none: ``logger=none`` or ``~logger``);
* ``gradnorm.png``: task weights, weighted and unweighted gradient norms, loss ratios and
  inverse training rates per task over steps, the tasks named with what the data module knows
  (``task_descriptions``, e.g. each toy task's σ)
  (:func:`gradnorm_lightning.experiments.plotting.plot_runs`), drawn from that file;
* ``summary.json`` and ``summary.txt``: final weights, per-task test loss and metric, time
  per training step and total steps, the task descriptions (:mod:`gradnorm_lightning.experiments.summary`);
* the loggers' own files: ``csv/metrics.csv`` (CSV logger, the default; all logged keys,
  validation and test included), ``tensorboard/`` (TensorBoard logger);
* ``checkpoints/`` (the ``model_checkpoint`` callback).

Examples::

    gradnorm-train                                   # paper_toy, GradNorm alpha = 0.12
    gradnorm-train experiment=mmoe_recsys callbacks.gradnorm.alpha=1.0
    gradnorm-train experiment=digits_multitask trainer.max_steps=200 seed=1
    gradnorm-train debug=fdr                         # one batch of everything
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
import torch.distributed as dist
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger, Logger
from omegaconf import DictConfig, OmegaConf

from gradnorm_lightning.experiments._extras import INSTALL_HINT, has_module
from gradnorm_lightning.experiments.plotting import plot_runs
from gradnorm_lightning.experiments.recorder import METRICS_CSV, MetricsRecorder
from gradnorm_lightning.experiments.summary import (
    StepTimer,
    build_summary,
    format_summary,
    write_summary,
)

__all__ = ["check_extras", "instantiate_callbacks", "instantiate_loggers", "main", "train"]

log = logging.getLogger(__name__)

FIGURE_NAME = "gradnorm.png"


def _instantiate_dict(cfg: DictConfig | None, kind: str) -> list[Any]:
    """Instantiate every value of a ``name -> {_target_: ...}`` dict config, in order.

    Values that are ``None`` or have no ``_target_`` are skipped (the latter with a log
    message: e.g. ``callbacks.gradnorm`` settings left by an experiment under another
    weighting).
    """
    if cfg is None:
        return []
    if not isinstance(cfg, DictConfig):
        raise TypeError(
            f"`{kind}` must be a dict of name -> config with a `_target_`; got {type(cfg).__name__}."
        )
    objects = []
    for name, node in cfg.items():
        if node is None:
            continue
        if isinstance(node, DictConfig) and "_target_" in node:
            objects.append(hydra.utils.instantiate(node))
        else:
            log.info("Skipping %s.%s: it has no `_target_`.", kind, name)
    return objects


def instantiate_callbacks(cfg: DictConfig | None) -> list[Callback]:
    """Instantiate the callbacks of ``cfg.callbacks``.

    Args:
        cfg: A dict config ``name -> {_target_: ..., args}``, or ``None``.

    Returns:
        The callbacks, in config order.

    Raises:
        TypeError: If ``cfg`` is not a dict config or an entry is not a ``Callback``.
        hydra.errors.InstantiationException: If an entry cannot be built; the message
            names the entry's full key (e.g. ``callbacks.gradnorm``).
    """
    callbacks = _instantiate_dict(cfg, "callbacks")
    for cb in callbacks:
        if not isinstance(cb, Callback):
            raise TypeError(f"`callbacks` entries must build Lightning callbacks; got {cb!r}.")
    return callbacks


def instantiate_loggers(cfg: DictConfig | None) -> list[Logger]:
    """Instantiate the loggers of ``cfg.logger``.

    Args:
        cfg: A dict config ``name -> {_target_: ..., args}``, or ``None``.

    Returns:
        The loggers, in config order.

    Raises:
        TypeError: If ``cfg`` is not a dict config or an entry is not a Lightning ``Logger``.
        hydra.errors.InstantiationException: If an entry cannot be built.
    """
    loggers = _instantiate_dict(cfg, "logger")
    for lg in loggers:
        if not isinstance(lg, Logger):
            raise TypeError(f"`logger` entries must build Lightning loggers; got {lg!r}.")
    return loggers


def check_extras(cfg: DictConfig) -> None:
    """Fail before training when the run needs a package of the ``[experiments]`` extra that is missing.

    The figure needs matplotlib (unless ``plot=false``), a TensorBoard logger needs
    tensorboard; the digits data module imports scikit-learn itself when it loads the data.

    Args:
        cfg: The composed config.

    Raises:
        ModuleNotFoundError: Naming the missing package and the ``pip install`` that fixes it.
    """
    needs: list[tuple[str, str]] = []
    if cfg.get("plot", True):
        needs.append(("matplotlib", "The figure gradnorm.png (or set plot=false)"))
    loggers = cfg.get("logger") or {}
    if isinstance(loggers, DictConfig) and any(
        isinstance(node, DictConfig) and str(node.get("_target_", "")).endswith("TensorBoardLogger")
        for node in loggers.values()
    ):
        needs.append(("tensorboard", "The TensorBoard logger (logger=tensorboard or csv_tensorboard)"))
    for module, purpose in needs:
        if not has_module(module):
            raise ModuleNotFoundError(
                f"{purpose} needs {module}, which is not installed. It comes with the tooling's "
                f"extra: {INSTALL_HINT}.",
                name=module,
            )


def _hydra_choice(group: str) -> str | None:
    """The option chosen for a config group in the current Hydra run, if any."""
    if not HydraConfig.initialized():
        return None
    choice = HydraConfig.get().runtime.choices.get(group)
    return None if choice is None else str(choice)


def train(cfg: DictConfig) -> dict[str, Any]:
    """Fit and test the configured model, then write metrics, figure and summary.

    Args:
        cfg: The composed config (``configs/train.yaml``): ``data``, ``model``, ``trainer``
            (each with a ``_target_``), ``callbacks`` and ``logger`` (dicts of such
            entries), ``paths.output_dir``, ``seed``, ``threads`` (torch intra-op threads, or
            null), and the flags ``test`` and ``plot``.

    Returns:
        The summary (see :func:`gradnorm_lightning.experiments.summary.build_summary`) with the paths
        of the files written under ``files``.

    Raises:
        hydra.errors.InstantiationException: If a config entry cannot be built (the message
            names its full key, e.g. ``callbacks.gradnorm``).
        TypeError: If ``callbacks`` or ``logger`` entries build the wrong kind of object.
        ModuleNotFoundError: If the run needs a package of the ``[experiments]`` extra that
            is not installed (:func:`check_extras`).
    """
    check_extras(cfg)
    if cfg.get("threads") is not None:
        torch.set_num_threads(int(cfg.threads))
    if cfg.get("seed") is not None:
        L.seed_everything(int(cfg.seed), workers=True)

    log.info("Instantiating data <%s>", cfg.data._target_)
    datamodule: L.LightningDataModule = hydra.utils.instantiate(cfg.data)
    log.info("Instantiating model <%s>", cfg.model._target_)
    model: L.LightningModule = hydra.utils.instantiate(cfg.model)
    callbacks = instantiate_callbacks(cfg.get("callbacks"))
    out_dir = Path(cfg.paths.output_dir)
    timer = StepTimer()
    # Last, so that it sees what the other callbacks logged on this step.
    recorder = MetricsRecorder(out_dir / METRICS_CSV)
    loggers = instantiate_loggers(cfg.get("logger"))
    log.info("Instantiating trainer <%s>", cfg.trainer._target_)
    trainer: L.Trainer = hydra.utils.instantiate(
        cfg.trainer, callbacks=[timer, *callbacks, recorder], logger=loggers or False
    )

    trainer.fit(model=model, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    test_results: dict[str, Any] = {}
    if cfg.get("test", True):
        results = trainer.test(model=model, datamodule=datamodule, verbose=False)
        test_results = dict(results[0]) if results else {}

    files: dict[str, str] = {}
    for lg in trainer.loggers:
        if isinstance(lg, CSVLogger):
            lg.save()
            files["csv_logger_metrics"] = str(Path(lg.log_dir) / "metrics.csv")
    metrics_csv = out_dir / METRICS_CSV
    if trainer.is_global_zero and metrics_csv.is_file():
        files["metrics_csv"] = str(metrics_csv)
    describe = getattr(datamodule, "task_descriptions", None)
    names = getattr(model, "task_names", None)
    descriptions: dict[str, str] = dict(describe(names)) if callable(describe) and names else {}
    weighting = _hydra_choice("weighting") or (
        "gradnorm" if "gradnorm" in (cfg.get("callbacks") or {}) else None
    )
    label = " · ".join(str(part) for part in (cfg.get("task_name", "run"), weighting) if part)
    if cfg.get("plot", True) and trainer.is_global_zero:
        if not recorder.rows:  # e.g. fewer steps than trainer.log_every_n_steps
            log.warning("No training step was a logging step: no figure.")
        else:
            try:
                figure = plot_runs(
                    [metrics_csv],
                    out_dir / FIGURE_NAME,
                    labels=[label],
                    task_descriptions=descriptions,
                )
                files["figure"] = str(figure)
            except ValueError as err:
                log.warning("No figure: %s", err)

    task_weights = getattr(model, "task_weights", {})
    summary = build_summary(
        task_weights,
        test_results,
        timer.stats(),
        trainer.global_step,
        extra={
            "task_name": cfg.get("task_name"),
            "experiment": _hydra_choice("experiment"),
            "weighting": weighting,
            "task_descriptions": descriptions,
            "tags": list(cfg.get("tags") or []),
            "seed": cfg.get("seed"),
            "output_dir": str(out_dir),
            "files": files,
        },
    )
    if trainer.is_global_zero:
        json_path, txt_path = write_summary(summary, out_dir)
        files.update(summary_json=str(json_path), summary_txt=str(txt_path))
        log.info("Summary (%s):\n%s", txt_path, format_summary(summary))
    return summary


def _destroy_process_group() -> None:
    """Destroy the default process group, if the run made one, once every process is done.

    Lightning destroys an NCCL group at exit but leaves a gloo group (DDP on CPU) to the
    interpreter's shutdown. There a gloo worker thread still releasing the last collective's
    tensor needs the GIL after finalization has begun, and the process aborts after a
    successful run (SIGABRT, "terminate called without an active exception"; 3 of 240
    two-process CPU fits here). Destroying the group while the interpreter is alive joins
    those threads first. Not called after an error: a process waiting here for one that
    failed would hang instead of exiting.
    """
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> None:
    """Console entry point ``gradnorm-train``; takes Hydra overrides on the command line.

    Args:
        cfg: The config Hydra composed from ``configs/train.yaml`` and the overrides.
    """
    log.debug("Config:\n%s", OmegaConf.to_yaml(cfg))
    train(cfg)
    _destroy_process_group()


if __name__ == "__main__":
    main()
