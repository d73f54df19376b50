"""Keeps ``benchmarks/bench_step.py`` from rotting: every row runs and follows its reference.

Tiny sizes only, no timing assertions.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_step.py"


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_step", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


bench = _load()
HAS_GNP = importlib.util.find_spec("gradnorm_pytorch") is not None


def _keys() -> list[str]:
    return [k for k, _ in bench.method_factories(include_project=True) if HAS_GNP or k != "gradnorm-pytorch"]


@pytest.fixture(autouse=True)
def _one_thread() -> object:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("make", [bench.toy_workload, bench.conv_workload], ids=["toy", "conv"])
def test_every_row_follows_its_textbook_trajectory(make: object) -> None:
    wl = make(tiny=True)  # type: ignore[operator]
    results = bench.check_trajectories(wl, steps=8, keys=_keys(), verbose=False)
    by_key = {r.key: r for r in results}
    expected = {k for k in _keys() if k != "plain"}
    assert set(by_key) == expected
    for r in results:
        if r.must_match:
            assert r.ok and r.max_rel_dev < 1e-9, (r.name, r.max_rel_dev)
    if HAS_GNP:
        gnp = by_key["gradnorm-pytorch"]
        # it deviates from the paper, and exactly by the documented differences
        assert gnp.max_rel_dev > 1e-6
        assert gnp.explained_dev is not None and gnp.explained_dev < 1e-9


def test_check_fails_loudly_on_a_deviating_row(monkeypatch: pytest.MonkeyPatch) -> None:
    wl = bench.toy_workload(tiny=True)
    original = bench.LibMTLStyle.step

    def wrong(self: object, batch: object) -> None:
        original(self, batch)
        self.w = self.w.flip(0)  # type: ignore[attr-defined]

    monkeypatch.setattr(bench.LibMTLStyle, "step", wrong)
    with pytest.raises(AssertionError, match="LibMTL"):
        bench.check_trajectories(wl, steps=3, keys=["libmtl"], verbose=False)


@pytest.mark.skipif(not HAS_GNP, reason="the full table includes the gradnorm-pytorch row: pip install '.[bench]'")
def test_table_and_memory_columns_render() -> None:
    wl = bench.conv_workload(tiny=True)
    lines = bench.run_workload(wl, steps=4, warmup=1, check_steps=2, lightning=False)
    rows = [line for line in lines if line.startswith("| ") and "ms/step" not in line]
    assert len(rows) == len(bench.method_factories())
    assert all(row.count("|") == 9 for row in rows)


def test_lightning_modules_train_with_the_callback() -> None:
    from gradnorm_lightning import GradNormCallback

    wl = bench.toy_workload(tiny=True)
    batches = bench.make_batches(wl, 4)
    _, lit = bench._lightning_modules(wl)
    timer = bench._StepTimer()
    bench._fit(lit, batches, 3, [GradNormCallback(alpha=wl.alpha, lr=wl.weight_lr)], timer)
    assert len(timer.times) == 3
    weights = torch.stack(list(lit.task_weights.values()))
    assert weights.shape == (wl.num_tasks,)
    assert not torch.allclose(weights, torch.ones_like(weights))
