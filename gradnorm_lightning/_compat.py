"""The few private torch and Lightning APIs this package relies on, in one place.

Each is pinned by ``tests/test_compat.py``: when an upgrade breaks one, that test names it.
Everything else in the package uses public APIs only.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "accumulate_grad_type",
    "any_nonfinite",
    "apply_node",
    "in_backward",
    "next_sequence_nr",
    "node_sequence_nr",
    "saved_tensor_hooks_active",
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


def next_sequence_nr() -> int:
    """The sequence number autograd gives the next node created on this thread (a peek: creates nothing).

    Read when a shared module's call begins: every node the call creates is numbered from here.
    """
    return int(torch._C._autograd._get_sequence_nr())


def in_backward() -> bool:
    """Whether this thread is running a backward pass (e.g. activation checkpointing's recompute)."""
    return int(torch._C._current_graph_task_id()) != -1


def saved_tensor_hooks_active() -> bool:
    """Whether saved-tensor hooks are active (activation checkpointing, ``save_on_cpu``): the
    saved tensors of the nodes made now may be unpacked only as the hooks allow (non-reentrant
    checkpointing: once per backward pass), so no such node may be run by hand."""
    return torch._C._autograd._top_saved_tensors_default_hooks(False) is not None


@functools.cache
def accumulate_grad_type() -> type:
    """The Python type of autograd's leaf nodes (``AccumulateGrad``, a parameter's accumulator); found once."""
    leaf = torch.zeros(1, requires_grad=True)
    node = torch.autograd.graph.get_gradient_edge(leaf).node
    return type(node)


def apply_node(node: Any, *grads: Tensor) -> tuple[Tensor | None, ...]:
    """Run one autograd node's backward on ``grads`` (its vector-Jacobian product)."""
    out = node(*grads)
    return out if isinstance(out, tuple) else (out,)


def any_nonfinite(tensors: Sequence[Tensor]) -> Tensor:
    """A 0-dim bool tensor: whether any entry of ``tensors`` is NaN or infinite (no host read).

    One fused multi-tensor check per device and dtype (the GradScaler's own,
    ``torch._amp_foreach_non_finite_check_and_unscale_``, with a scale of 1, which leaves every
    value as it is); where torch lacks it for a dtype, a max of absolute values per tensor.
    """
    groups: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.device, t.dtype), []).append(t)
    flags = []
    check = getattr(torch, "_amp_foreach_non_finite_check_and_unscale_", None)
    for (device, _), group in groups.items():
        if check is not None and not any(t.is_sparse for t in group):
            found = torch.zeros(1, device=device)
            try:
                check(group, found, torch.ones(1, device=device))
                flags.append(found.reshape(()) > 0)
                continue
            except (RuntimeError, NotImplementedError):
                pass
        peaks = [t.abs().amax() if t.numel() else t.new_zeros(()) for t in group]
        flags.append(~torch.isfinite(torch.stack([p.float() for p in peaks])).all())
    if not flags:
        return torch.zeros((), dtype=torch.bool)
    first = flags[0]
    return first if len(flags) == 1 else torch.stack([f.to(first.device) for f in flags]).any()


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
