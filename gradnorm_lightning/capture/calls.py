"""What one forward call of a shared module leaves for the backward: :class:`LayerCall`.

The shared modules' forward hooks (:class:`CallHooks`) record, for every call made with
gradients enabled and outside a backward pass (a call that activation checkpointing repeats
during the backward is not a new call):

* the tensor inputs (detached) and their autograd version counters, which the norm rules read;
* every tensor the layer returned, whatever the structure (a tensor, a tuple such as
  ``nn.GRU``'s ``(output, h_n)``, a list, a dict, a dataclass), as its *gradient edge* taken
  at that moment. An edge names the autograd node that produced the tensor, so it still means
  "the layer's output" after an in-place operation (``nn.ReLU(inplace=True)``) has rebased the
  tensor onto a new node;
* the module's parameters that require grad in this call: the norms run over exactly these;
* where the call began in autograd's creation order, so that the graph walk also sees a use of
  the parameters inside the call that bypasses its outputs, the gradient edges of its inputs
  (a use of the parameters below the call, in computing its input), and whether the call's saved
  tensors are managed by saved-tensor hooks (activation checkpointing), under which no node
  of the region may be run by hand.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd.graph import GradientEdge, get_gradient_edge

from gradnorm_lightning._compat import (
    in_backward,
    next_sequence_nr,
    saved_tensor_hooks_active,
    tensor_version,
    view_base,
)
from gradnorm_lightning.capture._refs import weak_callable

__all__ = ["CallHooks", "LayerCall", "ViewBase", "output_tensors"]


@dataclasses.dataclass(frozen=True, eq=False)
class ViewBase:
    """Where the gradient of an output that is a view arrives once an in-place write rebased it.

    An in-place write to a view (``torch.relu_(out)`` on ``nn.LSTM``'s transposed output)
    rewrites the history of its base: later readers reach the base's node, not the view's.
    The view's gradient is then read at the base and cut out of it by the view's geometry.

    Attributes:
        edge: the base's gradient edge at the call.
        shape: the base's shape.
        size: the view's size.
        stride: the view's strides in the base's (contiguous) storage.
        offset: the view's storage offset.
    """

    edge: GradientEdge
    shape: torch.Size
    size: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int

    def cut(self, grads: Tensor) -> Tensor:
        """Per-task gradients ``(T, *base.shape)`` at the base -> ``(T, *view.size)`` at the view."""
        flat = grads.reshape(grads.shape[0], -1).contiguous()
        return torch.as_strided(flat, (flat.shape[0], *self.size), (flat.shape[1], *self.stride), self.offset)


@dataclasses.dataclass(frozen=True, eq=False)
class LayerCall:
    """One forward call of the shared layer with gradients enabled.

    Attributes:
        inputs: the positional tensor arguments, detached.
        input_versions: their version counters at the call.
        edges: the gradient edge of every output tensor that requires grad, in output order.
        params: ``(name, parameter)`` of the layer's parameters that required grad.
        outputs: detached aliases of the output tensors (they share the outputs' version
            counters), with the counters at the call: an in-place write after the call shows there.
        bases: for each output that is a view of a contiguous base, that base (else ``None``).
        module: the index of the shared module that was called (0 for a single shared layer).
        start: autograd's sequence number when the call began (``None``: unknown).
        saved_hooks: whether saved-tensor hooks (activation checkpointing) were active.
        input_edges: the gradient edges of the tensor inputs that require grad (the graph below
            the call: a shared parameter used there, a tied weight, escapes the norm rules).
    """

    inputs: tuple[Tensor, ...]
    input_versions: tuple[int, ...]
    edges: tuple[GradientEdge, ...]
    params: tuple[tuple[str, nn.Parameter], ...]
    outputs: tuple[tuple[Tensor, int], ...] = ()
    bases: tuple[ViewBase | None, ...] = ()
    module: int = 0
    start: int | None = None
    saved_hooks: bool = False
    input_edges: tuple[GradientEdge, ...] = ()

    def inputs_unchanged(self) -> bool:
        """Whether no input was written in place since the call (the rules read them)."""
        return all(tensor_version(t) == v for t, v in zip(self.inputs, self.input_versions))

    def _modified(self, k: int) -> bool:
        alias, version = self.outputs[k]
        return tensor_version(alias) != version

    def outputs_modified(self) -> bool:
        """Whether an output was written in place after the call (e.g. ``nn.ReLU(inplace=True)``)."""
        return any(self._modified(k) for k in range(len(self.outputs)))

    def sink_edges(self) -> list[tuple[GradientEdge, ViewBase | None]]:
        """Where each output's gradient arrives now: its own edge, or its base's when rebased."""
        out: list[tuple[GradientEdge, ViewBase | None]] = []
        for k, edge in enumerate(self.edges):
            base = self.bases[k] if k < len(self.bases) else None
            out.append((base.edge, base) if base is not None and self._modified(k) else (edge, None))
        return out

    @property
    def nodes(self) -> frozenset[Any]:
        """The autograd nodes the outputs' gradients arrive at (see :meth:`sink_edges`)."""
        return frozenset(e.node for e, _ in self.sink_edges())


def _view_base(t: Tensor) -> ViewBase | None:
    base = view_base(t)
    if base is None or base.grad_fn is None or not base.is_contiguous() or base.storage_offset() != 0:
        return None
    return ViewBase(get_gradient_edge(base), base.shape, tuple(t.shape), tuple(t.stride()), int(t.storage_offset()))


def output_tensors(output: Any) -> Iterator[Tensor]:
    """Every tensor in a layer's output structure, depth first, in order.

    Example::

        >>> a, b = torch.zeros(1), torch.ones(2)
        >>> [t.shape for t in output_tensors((a, {"h": [b]}, None))]
        [torch.Size([1]), torch.Size([2])]
    """
    if isinstance(output, Tensor):
        yield output
    elif isinstance(output, Mapping):
        for value in output.values():
            yield from output_tensors(value)
    elif isinstance(output, (tuple, list)):
        for value in output:
            yield from output_tensors(value)
    elif dataclasses.is_dataclass(output) and not isinstance(output, type):
        for f in dataclasses.fields(output):
            yield from output_tensors(getattr(output, f.name))


def make_call(module: nn.Module, inputs: tuple[Any, ...], output: Any, index: int = 0,
              start: int | None = None,
              params: tuple[tuple[str, nn.Parameter], ...] | None = None) -> LayerCall | None:
    """The :class:`LayerCall` of one forward, or ``None`` when it built no graph.

    ``params``: the module's trainable parameters as the call began (default: as it ended).
    """
    outs = [t for t in output_tensors(output) if t.requires_grad and t.grad_fn is not None]
    if not outs:
        return None
    tensors = tuple(t.detach() for t in inputs if isinstance(t, Tensor))
    return LayerCall(
        inputs=tensors,
        input_versions=tuple(tensor_version(t) for t in tensors),
        edges=tuple(get_gradient_edge(t) for t in outs),
        params=params if params is not None else _trainable(module),
        outputs=tuple((t.detach(), tensor_version(t)) for t in outs),
        bases=tuple(_view_base(t) for t in outs),
        module=index,
        start=start,
        saved_hooks=saved_tensor_hooks_active(),
        input_edges=tuple(get_gradient_edge(t) for t in inputs if isinstance(t, Tensor) and t.requires_grad),
    )


def _trainable(module: nn.Module) -> tuple[tuple[str, nn.Parameter], ...]:
    return tuple((n, p) for n, p in module.named_parameters() if p.requires_grad)


#: ``sink(index, call)``: a call of shared module ``index``; ``call`` is ``None`` for a call
#: made with gradients disabled (e.g. under reentrant activation checkpointing).
CallSink = Callable[[int, "LayerCall | None"], None]


class CallHooks:
    """A shared module's forward pre-hook and hook: hand each call to a sink, held weakly.

    Args:
        sink: receives ``(index, call)`` (see :data:`CallSink`); a bound method is held weakly.
        index: the module's index among the shared modules.

    A copy of the model (``copy.deepcopy``, pickling) gets hooks that do nothing, so a copied
    model does not report into the original's recorder.
    """

    def __init__(self, sink: CallSink | None, index: int = 0) -> None:
        self._ref = weak_callable(sink) if sink is not None else None
        self.index = index
        self._start: int | None = None
        self._params: tuple[tuple[str, nn.Parameter], ...] | None = None

    # Never traced by torch.compile: the recorded edges must be those of the tensors the
    # losses really depend on (costs one graph break at the shared layer).
    @torch.compiler.disable
    def pre(self, module: nn.Module, inputs: tuple[Any, ...]) -> None:
        """The forward pre-hook: where the call begins in autograd's creation order, and the
        parameters the forward is about to use (under FSDP2, ``fully_shard``'s own pre-hook, which
        runs first, has swapped in the gathered, unsharded parameters; its post-hook swaps the
        sharded ``DTensor`` s back before this class's post-hook runs)."""
        self._start = next_sequence_nr()
        self._params = _trainable(module)

    @torch.compiler.disable
    def __call__(self, module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
        sink = self._ref() if self._ref is not None else None
        start, self._start = self._start, None
        params, self._params = self._params, None
        if sink is None or in_backward():
            return
        if not torch.is_grad_enabled():
            sink(self.index, None)
            return
        call = make_call(module, inputs, output, self.index, start, params)
        if call is not None:
            sink(self.index, call)

    def __deepcopy__(self, memo: dict[int, Any]) -> CallHooks:
        return CallHooks(None, self.index)

    def __reduce__(self) -> tuple[type[CallHooks], tuple[None, int]]:
        return (CallHooks, (None, self.index))
