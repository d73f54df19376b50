"""Issue 24, item 5: GradNormCallback under Lightning's FSDP2 strategy, on the CPU.

``strategy="fsdp"`` (Lightning's ``FSDPStrategy``, FSDP1) refuses the CPU ("The strategy fsdp
requires a GPU accelerator"): ``benchmarks/gpu_check.py`` fits it where a GPU is available.
``ModelParallelStrategy`` (FSDP2: ``fully_shard`` in ``configure_model``) runs on the CPU with
gloo: with one process here, with two through Lightning's subprocess launcher (slow). Float64:
the weights and the task-gradient cosines after every step equal a plain one-process fit on
the whole batches to 1e-12, the ranks' bitwise; the shared layer's parameters are DTensors.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
from helpers import lightning_fsdp

HELPER = Path(lightning_fsdp.__file__)


def _close(got: dict, want: dict) -> None:
    torch.testing.assert_close(got["weights"], want["weights"], rtol=0, atol=1e-12)
    torch.testing.assert_close(got["cosines"], want["cosines"], rtol=0, atol=1e-12)
    for p, q in zip(got["params"], want["params"]):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-12)
    assert got["route"] == want["route"]
    assert (want["weights"][-1] - 1).abs().max() > 1e-3  # (the weights moved)


def test_model_parallel_strategy_one_process() -> None:
    saved = dict(os.environ)
    try:
        sharded = lightning_fsdp.fit(1, shard=True)
    finally:  # (Lightning leaves its process group and its MASTER_PORT & co. behind)
        if dist.is_initialized():
            dist.destroy_process_group()
        os.environ.clear()
        os.environ.update(saved)
    assert sharded["param_type"] == "DTensor"
    _close(sharded, lightning_fsdp.fit(1, shard=False))


@pytest.mark.slow
def test_model_parallel_strategy_two_processes_equal_one_on_the_union_batch(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items()
           if k not in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK")}
    env["PYTHONWARNINGS"] = "ignore"
    proc = subprocess.run([sys.executable, str(HELPER), str(tmp_path), "2"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"lightning_fsdp_rank{r}.pt") for r in range(2))
    assert r0["param_type"] == r1["param_type"] == "DTensor"
    assert torch.equal(r0["weights"], r1["weights"]) and torch.equal(r0["cosines"], r1["cosines"])
    want = lightning_fsdp.fit(1, shard=False)
    _close(r0, want)


def test_gpu_check_fsdp_fits_run_on_the_cpu() -> None:
    """``benchmarks/gpu_check.py``'s Lightning FSDP part, here on the CPU: ``strategy="fsdp"`` is
    refused (as expected there), ``ModelParallelStrategy`` fits and equals ``strategy="auto"``."""
    from benchmarks import gpu_check

    ok, lines = gpu_check.lightning_fsdp_fits(4, device="cpu")
    assert ok, "\n".join(lines)
    assert any("refused on the CPU (expected)" in line for line in lines)
    (row,) = [line for line in lines if line.startswith("| ModelParallelStrategy")]
    assert "| DTensor |" in row and "not as expected" not in row
    assert not dist.is_initialized()
