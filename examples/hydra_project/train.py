"""A user's own Hydra + Lightning project that adds GradNorm purely through its config.

What you learn here:

* ``GradNormCallback`` needs no code in your training script: ``conf/callbacks/gradnorm.yaml``
  names it by ``_target_: gradnorm_lightning.GradNormCallback``, and the script instantiates
  every callback entry it finds, like any other Lightning callback;
* the model is your own ``GradNormMixin`` module (``multitask.py``), built with
  ``hydra.utils.instantiate`` like the data and the Trainer;
* every GradNorm argument can be overridden on the command line
  (``callbacks.gradnorm.alpha=0.5``), and ``callbacks=none`` turns it off.

This project does not use gradnorm-lightning's shipped configs.

Run (from any directory)::

    python examples/hydra_project/train.py
    python examples/hydra_project/train.py trainer.max_steps=3
    python examples/hydra_project/train.py callbacks.gradnorm.alpha=0.5 callbacks.gradnorm.optimizer=sgd
    python examples/hydra_project/train.py callbacks=none   # equal weighting, for comparison

Each run writes ``csv/`` (the CSV logger) and ``summary.json`` into its Hydra run folder
(``outputs/<date>/<time>/`` under the current directory, or ``hydra.run.dir=...``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.loggers import CSVLogger
from omegaconf import DictConfig, OmegaConf


def instantiate_callbacks(cfg: DictConfig | None) -> list[L.Callback]:
    """Every entry of ``cfg`` that has a ``_target_``, instantiated."""
    if not cfg:
        return []
    return [hydra.utils.instantiate(entry) for entry in cfg.values() if "_target_" in entry]


def train(cfg: DictConfig, output_dir: Path) -> dict[str, Any]:
    """Build the data, the model, the callbacks and the Trainer from ``cfg``; fit; summarise.

    Args:
        cfg: the composed config.
        output_dir: where the logger and ``summary.json`` go.

    Returns:
        The summary: the callbacks' types, the final task weights and the metrics file.
    """
    L.seed_everything(cfg.seed, verbose=False)
    torch.set_num_threads(cfg.threads)

    data = hydra.utils.instantiate(cfg.data)
    model = hydra.utils.instantiate(cfg.model)
    callbacks = instantiate_callbacks(cfg.get("callbacks"))
    logger = CSVLogger(save_dir=output_dir, name="csv", version="")
    trainer = hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=logger)
    print("callbacks:", [type(cb).__name__ for cb in callbacks])

    trainer.fit(model, data)

    summary = {
        "callbacks": [f"{type(cb).__module__}.{type(cb).__qualname__}" for cb in callbacks],
        "weights": {name: float(w) for name, w in model.task_weights.items()},
        "metrics_csv": str(Path(logger.log_dir) / "metrics.csv"),
        "steps": trainer.global_step,
    }
    (output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"final task weights: {summary['weights']}")
    print(f"summary written to {output_dir / 'summary.json'}")
    return summary


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> None:
    """The command-line entry point (Hydra parses the overrides)."""
    print(OmegaConf.to_yaml(cfg.callbacks))
    train(cfg, Path(HydraConfig.get().runtime.output_dir))


if __name__ == "__main__":
    main()
