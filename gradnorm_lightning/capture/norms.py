"""Exact per-task gradients of the shared layer's parameters, by layer type.

Given the per-task gradients ``G`` ``(T, *output.shape)`` at the shared layer's output, a
*norm rule* returns the per-task gradients of the layer's trainable parameters in a form
whose norms are cheap: :class:`~gradnorm_lightning.capture.stats.Factored` for
``nn.Linear`` (ghost norm, never materialised), or a dense ``(T, P)`` tensor. Rules are keyed
by layer type (the most derived registered type wins) and may decline a layer (return
``None``); every layer without an applicable rule gets the generic exact rule, one batched
vector-Jacobian product through the layer's own autograd nodes (:func:`batched_vjp`).

Register a rule for your own layer with :func:`register_norm_rule`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd.graph import GradientEdge

from gradnorm_lightning._arrays import as_dtype
from gradnorm_lightning.capture.calls import LayerCall
from gradnorm_lightning.capture.stats import Factored

__all__ = ["NormRule", "batched_vjp", "find_norm_rule", "register_norm_rule"]

NormRule = Callable[[nn.Module, LayerCall, Tensor, torch.dtype], "Factored | Tensor | None"]
"""``rule(layer, call, grads, dtype)``: per-task parameter gradients from the output gradients
``grads`` ``(T, *output.shape)`` of one call, in ``dtype``; ``None`` to decline. A dense result
is ``(T, P)`` over ``call.params`` in order, each parameter flattened. The rows of absent tasks
in ``grads`` may be NaN: a rule must keep the tasks apart (the caller masks them afterwards)."""

_RULES: dict[type[nn.Module], tuple[str, NormRule]] = {}
_FOUND: dict[type, tuple[str, NormRule] | None] = {}  # lookups by layer type (cleared on registration)


def register_norm_rule(*layer_types: type[nn.Module], name: str | None = None) -> Callable[[NormRule], NormRule]:
    """Register an exact norm rule for layers of the given types (and their subclasses).

    Args:
        layer_types: the ``nn.Module`` classes the rule handles.
        name: how the rule is named in the route message (default: the function's name).

    Returns:
        A decorator registering the rule and returning it unchanged.

    Example::

        >>> @register_norm_rule(nn.Bilinear)
        ... def bilinear_rule(layer, call, grads, dtype):
        ...     return None  # decline: the generic rule is used
        >>> find_norm_rule(nn.Bilinear(2, 2, 2))[0]
        'bilinear_rule'
    """

    def decorate(rule: NormRule) -> NormRule:
        for layer_type in layer_types:
            _RULES[layer_type] = (name or str(getattr(rule, "__name__", "rule")), rule)
        _FOUND.clear()
        return rule

    return decorate


def find_norm_rule(layer: nn.Module) -> tuple[str, NormRule] | None:
    """The rule registered for the most derived class of ``layer``, if any."""
    kind = type(layer)
    if kind not in _FOUND:
        _FOUND[kind] = next((_RULES[cls] for cls in kind.__mro__ if cls in _RULES), None)
    return _FOUND[kind]


def _trained(call: LayerCall, allowed: set[str]) -> set[str] | None:
    names = {n for n, _ in call.params}
    return names if names <= allowed else None


@register_norm_rule(nn.Linear, name="Linear ghost norm")
def _linear_rule(layer: nn.Module, call: LayerCall, grads: Tensor, dtype: torch.dtype) -> Factored | None:
    assert isinstance(layer, nn.Linear)
    names = _trained(call, {"weight", "bias"})
    if names is None or not call.inputs or len(call.edges) != 1:
        return None
    h = call.inputs[0]
    d_out, d_in = layer.weight.shape
    if h.dim() == 0 or h.shape[-1] != d_in or grads.shape[-1] != d_out:
        return None
    rows = as_dtype(h if h.dim() == 2 else h.reshape(-1, h.shape[-1]), dtype)
    out = as_dtype(grads if grads.dim() == 3 else grads.reshape(grads.shape[0], -1, grads.shape[-1]), dtype)
    if out.shape[1] != rows.shape[0]:
        return None
    return Factored(rows, out, weight="weight" in names, bias="bias" in names)


@register_norm_rule(nn.Conv1d, nn.Conv2d, nn.Conv3d, name="grouped convolution backward")
def _conv_rule(layer: nn.Module, call: LayerCall, grads: Tensor, dtype: torch.dtype) -> Tensor | None:
    assert isinstance(layer, nn.modules.conv._ConvNd)
    names = _trained(call, {"weight", "bias"})
    if (
        names is None or not call.inputs or len(call.edges) != 1
        or layer.padding_mode != "zeros" or isinstance(layer.padding, str)
    ):
        return None
    h = call.inputs[0]
    spatial = layer.weight.dim() - 2
    if h.dim() == spatial + 1:  # unbatched input
        h, grads = h.unsqueeze(0), grads.unsqueeze(1)
    weight = layer.weight.detach()
    mask = ["weight" in names, "bias" in names]
    bias_sizes = [weight.shape[0]] if mask[1] else None

    def backward(g: Tensor) -> tuple[Tensor, ...]:
        _, dw, db = torch.ops.aten.convolution_backward(
            g, h.to(g.dtype), weight.to(g.dtype), bias_sizes, layer.stride, layer.padding, layer.dilation,
            False, [0] * spatial, layer.groups, [False, *mask],
        )
        return tuple(t for t, m in zip((dw, db), mask) if m)

    parts = torch.func.vmap(backward)(grads)
    return torch.cat([p.reshape(p.shape[0], -1).to(dtype) for p in parts], dim=1)


def batched_vjp(
    outputs: Sequence[GradientEdge], grads: Sequence[Tensor], inputs: Sequence[GradientEdge] | Sequence[Tensor]
) -> list[Tensor | None]:
    """Per-task vector-Jacobian products of ``outputs`` w.r.t. ``inputs``, all tasks at once.

    Args:
        outputs: gradient edges the per-task gradients enter at.
        grads: for each output edge, the per-task gradients ``(T, *shape)``.
        inputs: where to stop: gradient edges (e.g. the layer's outputs) or parameters.

    Returns:
        For each input, the per-task gradients ``(T, *shape)``, or ``None`` where no output
        reaches it. One batched ``autograd.grad``; a loop over tasks where vmap cannot batch a
        node's backward (e.g. an inductor-compiled segment). The graph is retained.
    """
    try:
        out = torch.autograd.grad(
            list(outputs), inputs, grad_outputs=list(grads), retain_graph=True,
            is_grads_batched=True, allow_unused=True,
        )
        return list(out)
    except RuntimeError:
        pass
    per_task: list[Any] = [
        torch.autograd.grad(
            list(outputs), inputs, grad_outputs=[g[t] for g in grads], retain_graph=True, allow_unused=True
        )
        for t in range(grads[0].shape[0])
    ]
    stacked: list[Tensor | None] = []
    for j in range(len(inputs)):
        column = [row[j] for row in per_task]
        if all(c is None for c in column):
            stacked.append(None)
            continue
        ref = next(c for c in column if c is not None)
        stacked.append(torch.stack([c if c is not None else torch.zeros_like(ref) for c in column]))
    return stacked
