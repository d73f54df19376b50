"""What one forward call of the shared layer leaves for the backward: :class:`LayerCall`.

The shared layer's forward hook records, for every call made with gradients enabled:

* the tensor inputs (detached) and their autograd version counters, which the norm rules read;
* every tensor the layer returned, whatever the structure (a tensor, a tuple such as
  ``nn.GRU``'s ``(output, h_n)``, a list, a dict, a dataclass), as its *gradient edge* taken
  at that moment. An edge names the autograd node that produced the tensor, so it still means
  "the layer's output" after an in-place operation (``nn.ReLU(inplace=True)``) has rebased the
  tensor onto a new node;
* the layer's parameters that require grad in this call: the norms run over exactly these.
"""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd.graph import GradientEdge, get_gradient_edge

from gradnorm_lightning._compat import tensor_version
from gradnorm_lightning.capture._refs import weak_callable

__all__ = ["ForwardHook", "LayerCall", "output_tensors"]


@dataclasses.dataclass(frozen=True, eq=False)
class LayerCall:
    """One forward call of the shared layer with gradients enabled.

    Attributes:
        inputs: the positional tensor arguments, detached.
        input_versions: their version counters at the call.
        edges: the gradient edge of every output tensor that requires grad, in output order.
        shapes: the shape of each of those outputs.
        dtypes: their dtypes.
        params: ``(name, parameter)`` of the layer's parameters that required grad.
        outputs: weak references to the output tensors, with their version counters: an
            in-place write to an output after the call shows there.
    """

    inputs: tuple[Tensor, ...]
    input_versions: tuple[int, ...]
    edges: tuple[GradientEdge, ...]
    shapes: tuple[torch.Size, ...]
    dtypes: tuple[torch.dtype, ...]
    params: tuple[tuple[str, nn.Parameter], ...]
    outputs: tuple[tuple[weakref.ref[Tensor], int], ...] = ()

    def inputs_unchanged(self) -> bool:
        """Whether no input was written in place since the call (the rules read them)."""
        return all(tensor_version(t) == v for t, v in zip(self.inputs, self.input_versions))

    def outputs_modified(self) -> bool:
        """Whether an output was written in place after the call (e.g. ``nn.ReLU(inplace=True)``)."""
        for ref, version in self.outputs:
            t = ref()
            if t is not None and tensor_version(t) != version:
                return True
        return False

    @property
    def nodes(self) -> frozenset[Any]:
        """The autograd nodes that produced the outputs."""
        return frozenset(e.node for e in self.edges)


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


def make_call(module: nn.Module, inputs: tuple[Any, ...], output: Any) -> LayerCall | None:
    """The :class:`LayerCall` of one forward, or ``None`` when it built no graph."""
    outs = [t for t in output_tensors(output) if t.requires_grad and t.grad_fn is not None]
    if not outs:
        return None
    tensors = tuple(t.detach() for t in inputs if isinstance(t, Tensor))
    return LayerCall(
        inputs=tensors,
        input_versions=tuple(tensor_version(t) for t in tensors),
        edges=tuple(get_gradient_edge(t) for t in outs),
        shapes=tuple(t.shape for t in outs),
        dtypes=tuple(t.dtype for t in outs),
        params=tuple((n, p) for n, p in module.named_parameters() if p.requires_grad),
        outputs=tuple((weakref.ref(t), tensor_version(t)) for t in outs),
    )


class ForwardHook:
    """The shared layer's forward hook: hands each call to a sink, held weakly.

    A copy of the model (``copy.deepcopy``, pickling) gets a hook that does nothing, so a
    copied model does not report into the original's recorder.
    """

    def __init__(self, sink: Callable[[LayerCall], None] | None) -> None:
        self._ref = weak_callable(sink) if sink is not None else None

    # Never traced by torch.compile: the recorded edges must be those of the tensors the
    # losses really depend on (costs one graph break at the shared layer).
    @torch.compiler.disable
    def __call__(self, module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
        sink = self._ref() if self._ref is not None else None
        if sink is None or not torch.is_grad_enabled():
            return
        call = make_call(module, inputs, output)
        if call is not None:
            sink(call)

    def __deepcopy__(self, memo: dict[int, Any]) -> ForwardHook:
        return ForwardHook(None)

    def __reduce__(self) -> tuple[type[ForwardHook], tuple[None]]:
        return (ForwardHook, (None,))
