"""``SplitDataModule``: the loader settings and the build-once ``setup`` every example shares."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch.utils.data import RandomSampler, SequentialSampler, TensorDataset

from gradnorm_lightning.experiments.tasks import (
    DigitsDataModule,
    PaperToyDataModule,
    RecsysDataModule,
)
from gradnorm_lightning.experiments.tasks._base import SplitDataModule


class _Counting(SplitDataModule):
    """Splits of 10/4/6 rows; counts how often they are built."""

    def __init__(self, batch_size: int = 4, seed: int = 0, num_workers: int = 0) -> None:
        super().__init__(batch_size=batch_size, seed=seed, num_workers=num_workers)
        self.builds = 0

    def build_splits(self) -> dict[str, TensorDataset]:
        self.builds += 1
        gen = torch.Generator().manual_seed(self.seed)
        return self._datasets([(torch.randn(n, 2, generator=gen),) for n in (10, 4, 6)])


def test_setup_builds_once_and_loaders_share_the_settings() -> None:
    dm = _Counting(batch_size=4, seed=3)
    train = dm.train_dataloader()  # a loader sets the module up on demand
    dm.setup("fit")
    dm.setup("test")
    assert dm.builds == 1
    assert [len(dm._splits[s]) for s in SplitDataModule.SPLITS] == [10, 4, 6]
    assert train.batch_size == 4 and isinstance(train.sampler, RandomSampler)
    for loader in (dm.val_dataloader(), dm.test_dataloader()):
        assert loader.batch_size == 4 and isinstance(loader.sampler, SequentialSampler)
    again = _Counting(seed=3)
    again.setup()
    assert torch.equal(dm._splits["train"].tensors[0], again._splits["train"].tensors[0])


def test_missing_split_is_an_error() -> None:
    class _NoTest(_Counting):
        def build_splits(self) -> dict[str, TensorDataset]:
            splits = super().build_splits()
            del splits["test"]
            return splits

    with pytest.raises(ValueError, match=r"must return the splits \['train', 'val', 'test'\]"):
        _NoTest().setup()


def test_base_class_needs_build_splits() -> None:
    with pytest.raises(NotImplementedError):
        SplitDataModule(batch_size=2).setup()


_MODULES: dict[str, Callable[..., SplitDataModule]] = {
    "toy": lambda **kw: PaperToyDataModule(
        num_tasks=2, num_train=16, num_val=8, num_test=8, **kw
    ),
    "recsys": lambda **kw: RecsysDataModule(num_train=16, num_val=8, num_test=8, **kw),
    "digits": lambda **kw: DigitsDataModule(**kw),
}


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(batch_size=0), ValueError, "`batch_size` must be >= 1"),
        (dict(batch_size=2.5), TypeError, "`batch_size` must be an int"),
        (dict(num_workers=-1), ValueError, "`num_workers` must be >= 0"),
        (dict(num_workers=True), TypeError, "`num_workers` must be an int"),
    ],
    ids=["zero-batch", "float-batch", "negative-workers", "bool-workers"],
)
@pytest.mark.parametrize("name", list(_MODULES))
def test_every_example_checks_its_loader_arguments(
    name: str, kwargs: dict[str, object], error: type, match: str
) -> None:
    with pytest.raises(error, match=match):
        _MODULES[name](**kwargs)


@pytest.mark.parametrize("name", list(_MODULES))
def test_every_example_builds_its_splits_once(name: str) -> None:
    dm = _MODULES[name](batch_size=8, seed=1)
    assert isinstance(dm, SplitDataModule) and (dm.batch_size, dm.seed) == (8, 1)
    dm.setup("fit")
    first = dict(dm._splits)
    dm.setup("test")
    assert list(dm._splits) == ["train", "val", "test"]
    assert all(dm._splits[s] is first[s] for s in first)
    assert next(iter(dm.train_dataloader()))[0].shape[0] == 8
