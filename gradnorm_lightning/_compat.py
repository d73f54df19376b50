"""The few private torch and Lightning APIs this package relies on, in one place.

Each is pinned by ``tests/test_compat.py``: when an upgrade breaks one, that test names it.
Everything else in the package uses public APIs only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "apply_node",
    "max_abs_per_tensor",
    "node_sequence_nr",
    "scaler_state",
    "should_update_logs",
    "tensor_version",
    "trainer_scaler",
    "view_base",
]


def tensor_version(t: Tensor) -> int:
    """Autograd's version counter of ``t``: it grows with every in-place write to ``t``."""
    return int(t._version)


def view_base(t: Tensor) -> Tensor | None:
    """The tensor ``t`` is a view of, or ``None`` when it is not a view."""
    return t._base if t._is_view() else None


def node_sequence_nr(node: Any) -> int | None:
    """The creation order of an autograd node (``None`` where torch does not expose it).

    A node's inputs are created before it, so a node created before another cannot reach it
    in the backward graph: the graph walk uses this to prune the part below the shared layer.
    """
    get = getattr(node, "_sequence_nr", None)
    return None if get is None else int(get())


def apply_node(node: Any, *grads: Tensor) -> tuple[Tensor | None, ...]:
    """Run one autograd node's backward on ``grads`` (its vector-Jacobian product)."""
    out = node(*grads)
    return out if isinstance(out, tuple) else (out,)


def max_abs_per_tensor(tensors: Sequence[Tensor]) -> list[Tensor]:
    """``max |t|`` of every tensor, by two fused multi-tensor calls where torch has them.

    NaN and Inf propagate. (``torch._foreach_norm(ts, inf)`` gives the same but is several
    times slower on CPU.)
    """
    foreach_max = getattr(torch, "_foreach_max", None)
    foreach_abs = getattr(torch, "_foreach_abs", None)
    if foreach_max is not None and foreach_abs is not None:
        return list(foreach_max(foreach_abs(list(tensors))))
    return [t.abs().amax() for t in tensors]


def should_update_logs(trainer: Any) -> bool:
    """Whether the Trainer writes to its loggers on the current step (its logging steps)."""
    if bool(getattr(trainer, "fast_dev_run", False)):
        return True
    connector = getattr(trainer, "_logger_connector", None)
    return bool(getattr(connector, "should_update_logs", True))


def trainer_scaler(module: Any) -> Any:
    """The GradScaler of the Trainer a LightningModule is attached to (``None`` without one)."""
    trainer = getattr(module, "_trainer", None)
    return getattr(getattr(trainer, "precision_plugin", None), "scaler", None)


def scaler_state(scaler: Any, optimizer: Any) -> tuple[Tensor | None, Tensor | None]:
    """A GradScaler's scale and found-inf flag for ``optimizer`` as tensors, without a host sync.

    Returns ``(None, None)`` for a disabled or absent scaler; the flag is ``None`` when the
    scaler has not unscaled this optimizer's gradients yet.
    """
    if scaler is None or not scaler.is_enabled():
        return None, None
    get_async = getattr(scaler, "_get_scale_async", None)
    scale = get_async() if get_async is not None else None
    if scale is None:
        scale = torch.tensor(scaler.get_scale())
    states = getattr(scaler, "_per_optimizer_states", {})
    per_device = states[id(optimizer)].get("found_inf_per_device", {}) if id(optimizer) in states else {}
    found = None
    if per_device:
        found = sum(v.to(scale.device) for v in per_device.values())
    return scale, found
