"""The shipped Hydra configs compose, instantiate and validate as documented."""

from __future__ import annotations

import inspect
import math
from pathlib import Path

import hydra
import lightning as L
import pytest
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from omegaconf import DictConfig, OmegaConf

from gradnorm_lightning import GradNormCallback, GradNormMixin
from gradnorm_lightning.experiments.train import instantiate_callbacks, instantiate_loggers
from tests.conftest import CONFIG_DIR, EXPERIMENTS, ComposeFn, compose_train_config


def _gradnorm_callbacks(cfg: DictConfig) -> list[GradNormCallback]:
    return [cb for cb in instantiate_callbacks(cfg.callbacks) if isinstance(cb, GradNormCallback)]


def test_root_configs_link_points_at_the_shipped_configs() -> None:
    link = Path(__file__).resolve().parents[1] / "configs"
    assert link.is_symlink()
    assert link.resolve() == CONFIG_DIR
    assert CONFIG_DIR.parent.name == "experiments"


def test_binding_experiment_files_exist() -> None:
    names = {p.stem for p in (CONFIG_DIR / "experiment").glob("*.yaml")}
    assert set(EXPERIMENTS) <= names


def test_default_is_paper_toy_with_paper_alpha() -> None:
    cfg = compose_train_config()
    assert cfg.hydra.runtime.choices.experiment == "paper_toy"
    assert cfg.hydra.runtime.choices.weighting == "gradnorm"
    assert cfg.callbacks.gradnorm.alpha == pytest.approx(0.12)
    assert cfg.data._target_.endswith("PaperToyDataModule")
    assert cfg.model.optimizer._partial_ is True


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_composes_and_instantiates(compose_cfg: ComposeFn, experiment: str) -> None:
    cfg = compose_cfg(f"experiment={experiment}")
    assert cfg.task_name == experiment
    for key in cfg:  # every interpolation outside Hydra's own node resolves
        if key != "hydra" and OmegaConf.is_config(cfg[key]):
            OmegaConf.to_container(cfg[key], resolve=True)

    datamodule = hydra.utils.instantiate(cfg.data)
    model = hydra.utils.instantiate(cfg.model)
    assert isinstance(datamodule, L.LightningDataModule)
    assert isinstance(model, GradNormMixin) and isinstance(model, L.LightningModule)
    (gradnorm,) = _gradnorm_callbacks(cfg)
    assert gradnorm.alpha == pytest.approx(cfg.callbacks.gradnorm.alpha)
    trainer = hydra.utils.instantiate(cfg.trainer, logger=instantiate_loggers(cfg.logger))
    assert isinstance(trainer, L.Trainer)

    datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()))
    losses = model.task_losses(batch)
    assert tuple(losses) == tuple(model.task_names)
    assert all(math.isfinite(float(v)) for v in losses.values())


def test_alpha_override_reaches_the_callback(compose_cfg: ComposeFn) -> None:
    cfg = compose_cfg("callbacks.gradnorm.alpha=0.5")
    (gradnorm,) = _gradnorm_callbacks(cfg)
    assert gradnorm.alpha == 0.5


def test_mmoe_uses_the_keras_setup(compose_cfg: ComposeFn) -> None:
    cfg = compose_cfg("experiment=mmoe_recsys")
    (gradnorm,) = _gradnorm_callbacks(cfg)
    assert gradnorm.initial_losses == pytest.approx(math.log(2))
    assert gradnorm.optimizer == "adam"
    assert gradnorm.lr == pytest.approx(1e-2)
    assert gradnorm.lr_decay_rate == pytest.approx(0.75)
    assert gradnorm.lr_decay_steps == 100


def test_dense_uses_the_paper_nyuv2_alpha(compose_cfg: ComposeFn) -> None:
    cfg = compose_cfg("experiment=dense_synthetic")
    (gradnorm,) = _gradnorm_callbacks(cfg)
    assert gradnorm.alpha == pytest.approx(1.5)
    assert gradnorm.optimizer == "adam"
    assert gradnorm.lr == pytest.approx(0.025)
    model = hydra.utils.instantiate(cfg.model)
    assert type(model.shared_layer()).__name__ == "Conv2d"
    assert model.num_classes == cfg.data.num_classes


def test_gradnorm_yaml_lists_every_callback_argument() -> None:
    cfg = compose_train_config()
    params = set(inspect.signature(GradNormCallback.__init__).parameters) - {"self"}
    assert set(cfg.callbacks.gradnorm) - {"_target_"} == params
    text = (CONFIG_DIR / "callbacks" / "gradnorm.yaml").read_text()
    for name in params:  # every argument carries a comment right above it
        lines = text.splitlines()
        (index,) = [i for i, line in enumerate(lines) if line.strip().startswith(f"{name}:")]
        assert lines[index - 1].strip().startswith("#"), name


def test_yaml_defaults_match_the_callback_signature() -> None:
    cfg = compose_train_config(["experiment=paper_toy"])
    block = OmegaConf.to_container(cfg.callbacks.gradnorm)
    assert isinstance(block, dict)
    for name, param in inspect.signature(GradNormCallback.__init__).parameters.items():
        if name in ("self", "alpha", "lr", "optimizer"):  # the experiment sets these
            continue
        default = param.default
        value = block[name]
        if isinstance(default, tuple):
            default = list(default)
        assert value == default, name


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ("callbacks.gradnorm.alpha=-1", "callbacks.gradnorm"),
        ("callbacks.gradnorm.optimizer=rmsprop", "callbacks.gradnorm"),
        ("callbacks.gradnorm.lr=0", "callbacks.gradnorm"),
    ],
    ids=["negative-alpha", "unknown-optimizer", "zero-lr"],
)
def test_bad_gradnorm_argument_names_the_full_key(
    compose_cfg: ComposeFn, override: str, match: str
) -> None:
    cfg = compose_cfg(override)
    with pytest.raises(InstantiationException, match=match):
        instantiate_callbacks(cfg.callbacks)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_other_weighting_drops_the_gradnorm_callback(
    compose_cfg: ComposeFn, experiment: str
) -> None:
    # The experiment's callbacks.gradnorm settings stay behind without a `_target_` and
    # are skipped; the equal-weighting callback replaces GradNorm's.
    cfg = compose_cfg(f"experiment={experiment}", "weighting=equal")
    assert "_target_" not in cfg.callbacks.get("gradnorm", {})
    callbacks = instantiate_callbacks(cfg.callbacks)
    assert not any(isinstance(cb, GradNormCallback) for cb in callbacks)
    assert "EqualWeightingCallback" in {type(cb).__name__ for cb in callbacks}


def test_no_weighting_at_all(compose_cfg: ComposeFn) -> None:
    cfg = compose_cfg("~weighting")
    assert _gradnorm_callbacks(cfg) == []


def test_callbacks_can_be_removed_with_null(compose_cfg: ComposeFn) -> None:
    cfg = compose_cfg("callbacks.gradnorm=null")
    assert _gradnorm_callbacks(cfg) == []


def test_non_callback_entry_is_rejected() -> None:
    cfg = OmegaConf.create({"x": {"_target_": "builtins.dict"}})
    with pytest.raises(TypeError, match="Lightning callbacks"):
        instantiate_callbacks(cfg)


@pytest.mark.parametrize(
    "override",
    [
        "trainer=cpu",
        "trainer=gpu",
        "trainer=ddp",
        "logger=tensorboard",
        "logger=csv_tensorboard",
        "debug=fdr",
        "debug=overfit",
        "callbacks=none",
    ],
)
def test_group_options_compose(override: str) -> None:
    cfg = compose_train_config([override])
    OmegaConf.resolve(cfg.trainer)
    assert cfg.trainer._target_ == "lightning.pytorch.trainer.Trainer"


_LOGGERS = {
    "csv": ["CSVLogger"],
    "tensorboard": ["TensorBoardLogger"],
    "csv_tensorboard": ["CSVLogger", "TensorBoardLogger"],
    "none": [],
}


# data option -> the model option it goes with (the model reads sizes from `data`).
_DATA_MODEL = {"paper_toy": "paper_toy", "recsys": "mmoe", "digits": "digits", "dense": "dense"}
_GROUPS = ("callbacks", "data", "debug", "experiment", "logger", "model", "trainer", "weighting")
_OPTIONS = [(g, p.stem) for g in _GROUPS for p in sorted((CONFIG_DIR / g).glob("*.yaml"))]


def test_every_data_and_model_option_is_paired() -> None:
    assert {o for g, o in _OPTIONS if g == "data"} == set(_DATA_MODEL)
    assert {o for g, o in _OPTIONS if g == "model"} == set(_DATA_MODEL.values())


@pytest.mark.parametrize(("group", "option"), _OPTIONS, ids=[f"{g}={o}" for g, o in _OPTIONS])
def test_every_config_file_composes_resolves_and_instantiates(
    tmp_path: Path, group: str, option: str
) -> None:
    overrides = [f"{group}={option}"]
    if group == "data":
        overrides.append(f"model={_DATA_MODEL[option]}")
    elif group == "model":
        overrides.append(f"data={dict(map(reversed, _DATA_MODEL.items()))[option]}")
    cfg = compose_train_config(overrides)
    cfg.hydra.runtime.output_dir = str(tmp_path)
    HydraConfig.instance().set_config(cfg)
    for key in cfg:
        if key != "hydra" and OmegaConf.is_config(cfg[key]):
            OmegaConf.to_container(cfg[key], resolve=True)
    assert isinstance(hydra.utils.instantiate(cfg.data), L.LightningDataModule)
    assert isinstance(hydra.utils.instantiate(cfg.model), GradNormMixin)
    callbacks = instantiate_callbacks(cfg.get("callbacks"))
    loggers = instantiate_loggers(cfg.get("logger"))
    if not (group == "trainer" and option == "gpu" and not torch.cuda.is_available()):
        trainer = hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
        assert isinstance(trainer, L.Trainer)


def test_every_logger_config_is_tested() -> None:
    assert {p.stem for p in (CONFIG_DIR / "logger").glob("*.yaml")} == set(_LOGGERS)


@pytest.mark.parametrize("override", [*(f"logger={name}" for name in _LOGGERS), "~logger"])
def test_every_logger_config_composes_and_instantiates(
    compose_cfg: ComposeFn, tmp_path: Path, override: str
) -> None:
    cfg = compose_cfg(override)
    loggers = instantiate_loggers(cfg.get("logger"))
    expected = _LOGGERS.get(override.removeprefix("logger="), [])
    assert [type(lg).__name__ for lg in loggers] == expected
    trainer = hydra.utils.instantiate(cfg.trainer, logger=loggers or False)
    assert len(trainer.loggers) == len(loggers)
    for lg in loggers:
        assert Path(lg.save_dir).resolve().is_relative_to(tmp_path.resolve())


def test_hydra_refuses_null_for_a_config_group() -> None:
    # Why logger/none.yaml exists: `logger=null` is not a way to drop the group in Hydra 1.3.
    with pytest.raises(ValueError, match="Config group override must be a string or a list"):
        compose_train_config(["logger=null"])


def test_cpu_trainer_and_loggers_instantiate(compose_cfg: ComposeFn, tmp_path: Path) -> None:
    cfg = compose_cfg("trainer=cpu", "logger=csv_tensorboard")
    loggers = instantiate_loggers(cfg.logger)
    assert [type(lg).__name__ for lg in loggers] == ["CSVLogger", "TensorBoardLogger"]
    trainer = hydra.utils.instantiate(cfg.trainer, logger=loggers)
    assert trainer.max_steps == 3
    assert Path(trainer.default_root_dir) == tmp_path
