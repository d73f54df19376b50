"""Exact per-task gradients of the shared layer's parameters, by layer type.

Given the per-task gradients ``G`` ``(T, *output.shape)`` at the shared layer's output, a
*norm rule* returns the per-task gradients of the layer's trainable parameters in a form
whose norms are cheap: :class:`~gradnorm_lightning.capture.stats.Factored` for
``nn.Linear`` (ghost norm, never materialised), :class:`~gradnorm_lightning.capture.stats.RowSparse`
for ``nn.Embedding`` (the rows the batch touched, dense or ``sparse=True``), or a dense
``(T, P)`` tensor. Rules are keyed
by layer type (the most derived registered type wins) and may decline a layer (return
``None``); every layer without an applicable rule gets the generic exact rule, the
vector-Jacobian products through the layer's own autograd nodes (:func:`batched_vjp`: batched
for small gradients, one per task for large ones). A rule is handed ``G`` batch-major in memory
(``(N, T, ...)``) when :func:`reads_batch_major` says so (the Linear rule), else each task's
gradient contiguous.

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
from gradnorm_lightning.capture.stats import Factored, RowSparse

__all__ = [
    "LOOP_NUMEL", "NormRule", "batched_vjp", "find_norm_rule", "per_task_vjps", "reads_batch_major", "register_norm_rule",
]

NormRule = Callable[[nn.Module, LayerCall, Tensor, torch.dtype], "Factored | RowSparse | Tensor | None"]
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


@register_norm_rule(nn.Embedding, name="Embedding rows")
def _embedding_rule(layer: nn.Module, call: LayerCall, grads: Tensor, dtype: torch.dtype) -> RowSparse | None:
    """The rows the batch touched: row ``idx[n]`` gets ``grads[:, n]`` (repeats summed when the
    norm is taken), never the whole ``(V, D)`` table, whether the layer is ``sparse`` or not."""
    assert isinstance(layer, nn.Embedding)
    names = _trained(call, {"weight"})
    if names is None or not call.inputs or len(call.edges) != 1 or layer.scale_grad_by_freq:
        return None  # (gradients scaled by the batch's row counts: the generic rule)
    idx = call.inputs[0]
    d = layer.embedding_dim
    if idx.is_floating_point() or grads.shape[1:] != (*idx.shape, d):
        return None
    rows = idx.reshape(-1)
    values = grads.reshape(grads.shape[0], -1, d)
    if layer.padding_idx is not None:  # the padding row gets no gradient
        values = torch.where((rows != layer.padding_idx)[None, :, None], values, 0.0)
    return RowSparse(rows, as_dtype(values, dtype), layer.num_embeddings)


def reads_batch_major(rule: NormRule) -> bool:
    """Whether ``rule`` is best handed its ``(T, N, ...)`` gradients stored batch-major
    (``(N, T, ...)`` in memory: the Linear rule reads them as one GEMM operand); every other
    rule is handed each task's gradient contiguous (task-major)."""
    return rule is _linear_rule


@register_norm_rule(nn.Conv1d, nn.Conv2d, nn.Conv3d, name="convolution backward")
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
    # the weight's values are not read (no input gradient is asked for): only its shape, from a
    # tensor of zeros without storage; under FSDP2 ``layer.weight`` may be a shard by now
    weight = grads.new_zeros(()).expand(layer.weight.shape)
    mask = ["weight" in names, "bias" in names]
    bias_sizes = [layer.out_channels] if mask[1] else None

    def backward(g: Tensor) -> tuple[Tensor, ...]:
        _, dw, db = torch.ops.aten.convolution_backward(
            g, h.to(g.dtype), weight, bias_sizes, layer.stride, layer.padding, layer.dilation,
            False, [0] * spatial, layer.groups, [False, *mask],
        )
        return tuple(t for t, m in zip((dw, db), mask) if m)

    if grads.device.type == "cpu" and _per_task_macs(layer, grads) >= _LOOP_MACS:
        rows = [backward(g) for g in grads]  # large products: one call per task beats vmap's batching
        parts = tuple(torch.stack(column) for column in zip(*rows, strict=True))
    else:
        parts = torch.func.vmap(backward)(grads)
    return torch.cat([p.reshape(p.shape[0], -1).to(dtype) for p in parts], dim=1)


#: Per-task multiply-adds of a convolution's weight gradient from which :func:`_conv_rule`
#: calls ``convolution_backward`` once per task instead of through ``vmap``, on the CPU (on a
#: device vmap's batched form stays: the threshold is unmeasured there). Measured on one CPU
#: thread (torch 2.13): vmap's batched form took 17.1 ms against 1.9 ms for a 3-channel
#: input (batch 64, 32x32, 16 output channels, T = 4; 28M per task) and 9.6 against 8.0 ms for
#: the dense benchmark's Conv2d(128, 128, 3) on 8x16x16 (T = 3; 302M per task; no difference
#: in place in that benchmark's step), while below the threshold it saves the calls' overhead
#: (0.49 against 1.09 ms for Conv1d(16, 24, 5) on batch 32 x 50, T = 10; 3M per task).
_LOOP_MACS = 8_000_000


def _per_task_macs(layer: nn.modules.conv._ConvNd, grads: Tensor) -> int:
    """Multiply-adds of one task's weight gradient: output positions x kernel size x channels."""
    positions = grads[0].numel() // layer.out_channels
    return positions * layer.weight.numel()


#: Elements per task (summed over the output gradients) from which :func:`batched_vjp` runs one
#: ``autograd.grad`` per task instead of one batched call. The batched form runs the backward
#: under vmap, whose batched kernels and copies cost more than the calls they save once the
#: tensors are large. Measured on one CPU thread (torch 2.13), per-task calls over batched, for
#: gelu, relu, gelu then a mean, layer_norm and a matmul: 0.3-1.4x at 100k elements per task
#: (T = 10 and 30), 0.17-0.98x at 300k, 0.12-0.80x at 1M; 0.6-2.5x at 10k (T = 4 to 30). On the
#: CPU only: on a device, where per-task calls multiply the kernel launches, the batched form
#: stays (unmeasured there).
LOOP_NUMEL = 100_000


def per_task_vjps(numel: int, device: torch.device) -> bool:
    """Whether per-task gradients of ``numel`` elements each (summed over the tensors they
    cross from) on ``device`` cross a part of the graph by one ``autograd.grad`` per task
    rather than one batched call (:data:`LOOP_NUMEL`)."""
    return device.type == "cpu" and numel >= LOOP_NUMEL


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
        reaches it. One batched ``autograd.grad`` for small gradients; one ``autograd.grad`` per
        task for large ones on the CPU (:func:`per_task_vjps`, where the batched form's overhead
        outgrows the calls') and where vmap cannot batch a node's backward
        (e.g. an inductor-compiled segment). The graph is retained.
    """
    if not per_task_vjps(sum(g[0].numel() for g in grads), grads[0].device):
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
