"""Fixtures for the Hydra configs, the training entry point and the example tasks.

``compose_cfg`` builds the shipped config the way ``gradnorm-train`` does (same config
folder, same defaults list) and shrinks it in the lightning-hydra-template style: a few
steps on CPU, small data, no checkpoint/summary callbacks, no progress bar, and every path
pointed at the test's own ``tmp_path``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

import gradnorm_lightning.experiments

CONFIG_DIR = Path(gradnorm_lightning.experiments.__file__).resolve().parent / "configs"
EXPERIMENTS = ("paper_toy", "mmoe_recsys", "digits_multitask", "dense_synthetic")

# Data sizes small enough for a few-step run, per data module target.
_SMALL_DATA = {
    "gradnorm_lightning.experiments.tasks.toy.PaperToyDataModule": dict(
        num_train=256, num_val=64, num_test=128, batch_size=32
    ),
    "gradnorm_lightning.experiments.tasks.mmoe.RecsysDataModule": dict(
        num_train=512, num_val=256, num_test=512, batch_size=64
    ),
    "gradnorm_lightning.experiments.tasks.digits.DigitsDataModule": dict(batch_size=64),
    "gradnorm_lightning.experiments.tasks.dense.DenseDataModule": dict(
        image_size=16, num_train=64, num_val=16, num_test=32, batch_size=8
    ),
}

ComposeFn = Callable[..., DictConfig]

# The test models are tiny: one intra-op thread is as fast as two, and avoids OpenMP
# oversubscription (steps ~10x slower) when the 2-core machine is busy with other work.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def restore_globals() -> Iterator[None]:
    """Undo what examples and docs' code set: the thread count and Lightning's seed variable."""
    import os

    threads = torch.get_num_threads()
    seed = os.environ.get("PL_GLOBAL_SEED")
    yield
    torch.set_num_threads(threads)
    if seed is None:
        os.environ.pop("PL_GLOBAL_SEED", None)
    else:
        os.environ["PL_GLOBAL_SEED"] = seed


#: What a distributed launch leaves in the environment (Lightning's ``ddp_spawn`` sets them in the
#: parent process).
DIST_ENV = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK", "LOCAL_WORLD_SIZE",
            "GROUP_RANK")


@pytest.fixture(autouse=True)
def _fresh_dist_env() -> Iterator[None]:
    """Every test starts and ends without a launch's ``MASTER_PORT`` & co.: a later launch that
    inherited them would bind a port an earlier one may still hold in this process (a process
    group's store outlives its group here), and fail with EADDRINUSE or wait until a timeout."""
    import os

    saved = {k: os.environ.pop(k) for k in DIST_ENV if k in os.environ}
    try:
        yield
    finally:
        for k in DIST_ENV:
            os.environ.pop(k, None)
        os.environ.update(saved)


def compose_train_config(overrides: Sequence[str] = ()) -> DictConfig:
    """Compose ``train.yaml`` with ``overrides`` (no shrinking), Hydra config included.

    Args:
        overrides: Hydra command-line style overrides.

    Returns:
        The composed config, with its ``hydra`` node (as in a real run).
    """
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIG_DIR)):
        return compose(config_name="train", overrides=list(overrides), return_hydra_config=True)


def shrink(cfg: DictConfig, out_dir: Path, steps: int = 3) -> DictConfig:
    """Make ``cfg`` cheap to run and write under ``out_dir`` (in place).

    Args:
        cfg: A composed train config.
        out_dir: Folder for every output of the run.
        steps: ``trainer.max_steps``.

    Returns:
        ``cfg`` itself.
    """
    with open_dict(cfg):
        cfg.paths.log_dir = str(out_dir)
        cfg.paths.output_dir = str(out_dir)
        cfg.paths.work_dir = str(out_dir)
        cfg.hydra.runtime.output_dir = str(out_dir)
        cfg.trainer.max_steps = steps
        cfg.trainer.accelerator = "cpu"
        cfg.trainer.devices = 1
        cfg.trainer.log_every_n_steps = 1
        cfg.trainer.limit_val_batches = 1
        cfg.trainer.limit_test_batches = 2
        cfg.trainer.enable_progress_bar = False
        cfg.callbacks.progress_bar = None
        cfg.callbacks.model_summary = None
        cfg.callbacks.model_checkpoint = None
        cfg.data.update(_SMALL_DATA.get(cfg.data._target_, {}))
    return cfg


@pytest.fixture
def compose_cfg(tmp_path: Path) -> Iterator[ComposeFn]:
    """Factory: ``compose_cfg(*overrides, steps=3)`` -> a shrunk config writing to ``tmp_path``.

    The config's Hydra node is installed as the current ``HydraConfig`` (as during a real
    run), so ``${hydra:...}`` interpolations and the group choices resolve.
    """

    def make(*overrides: str, steps: int = 3) -> DictConfig:
        cfg = shrink(compose_train_config(overrides), tmp_path, steps=steps)
        HydraConfig.instance().set_config(cfg)
        return cfg

    yield make
    GlobalHydra.instance().clear()
