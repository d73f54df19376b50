"""The heads' graph walk: where each task's gradient enters the part of the graph tasks share.

Walking the backward graph from every task loss down to the shared layer's output nodes
splits it into the nodes a single task reaches (its head: *private*) and the nodes several
tasks reach (the *shared part* above the layer: an activation, a reshape, a norm, a residual,
or nothing at all). An edge from a private node into the shared part (or straight into the
layer's output) carries that one task's gradient; a hook on the private node reads it during
the model's own backward, so no extra pass runs through the heads. A task whose loss node is
itself shared (losses unbound from one tensor) enters at its loss.

Only nodes that can reach the layer count; nodes created before the layer's outputs cannot
reach them (a node's inputs are always older) and are not walked, so the cost is the size of
the graph above the shared layer.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from torch import Tensor
from torch.autograd.graph import GradientEdge, get_gradient_edge

from gradnorm_lightning._compat import node_sequence_nr

__all__ = ["ELEMENTWISE_NODES", "Frontier", "OverBudget", "Unreached", "walk_heads"]

#: Backward nodes of elementwise functions ``y = f(x)`` of one input, whose VJP is
#: ``v * f'(x)``: as the whole shared part, the per-task gradients cross them by one product.
ELEMENTWISE_NODES = frozenset({
    "ReluBackward0", "GeluBackward0", "SiluBackward0", "TanhBackward0", "SigmoidBackward0",
    "LeakyReluBackward0", "LeakyReluBackward1", "EluBackward0", "EluBackward1", "HardtanhBackward0",
    "HardtanhBackward1", "MishBackward0", "SoftplusBackward0", "HardswishBackward0",
    "HardsigmoidBackward0", "NativeDropoutBackward0", "ThresholdBackward0", "ThresholdBackward1",
})


class OverBudget(Exception):
    """The graph above the shared layer is larger than the walk allows."""


class Unreached(Exception):
    """A task's loss does not depend on the shared layer (``args[0]`` is the task index)."""


@dataclasses.dataclass
class Frontier:
    """Where each task's gradient enters the shared part, as found by :func:`walk_heads`.

    Attributes:
        taps: private node -> ``[(k, task, target)]``: the node's ``k``-th gradient output is
            ``task``'s gradient at the edge ``target`` (into the shared part or the layer).
        roots: ``(task, edge)`` of tasks whose loss node is shared: their gradient enters there.
        entries: every node a tap or a root delivers into (their pre-hooks flush).
        stops: the layer output nodes some task reaches.
        elementwise: the shared part's only node when it is one elementwise function lying
            directly on the layer's output, else ``None``.
        walked: how many nodes the walk expanded.
    """

    taps: dict[Any, list[tuple[int, int, GradientEdge]]]
    roots: list[tuple[int, GradientEdge]]
    entries: set[Any]
    stops: set[Any]
    elementwise: Any | None
    walked: int

    @property
    def shared_part(self) -> bool:
        """Whether some task's gradient must cross nodes above the layer that tasks share."""
        return bool(self.roots) or any(n not in self.stops for n in self.entries)


def _children(node: Any) -> list[Any]:
    return [nxt for nxt, _ in node.next_functions if nxt is not None]


class _Walk:
    """Memoised "can this node reach a stop node?" over one graph."""

    def __init__(self, stops: set[Any], budget: int) -> None:
        self.stops = stops
        self.reach: dict[Any, bool] = dict.fromkeys(stops, True)
        seqs = [node_sequence_nr(s) for s in stops]
        # leaves (AccumulateGrad) carry the largest sequence number: no pruning below them
        usable = all(s is not None and s < 2**63 for s in seqs)
        self.min_seq = min(s for s in seqs if s is not None) if usable and seqs else None
        self.budget = budget
        self.walked = 0

    def _pruned(self, node: Any) -> bool:
        if self.min_seq is None:
            return False
        seq = node_sequence_nr(node)
        return seq is not None and seq < self.min_seq

    def reaches(self, root: Any) -> bool:
        if root in self.reach:
            return self.reach[root]
        found: dict[Any, bool] = {root: False}
        stack = [(root, iter(_children(root)))]
        self._expand()
        while stack:
            node, children = stack[-1]
            descended = False
            for child in children:
                known = self.reach.get(child)
                if known is None and self._pruned(child):
                    self.reach[child] = known = False
                if known is None:
                    self._expand()
                    found[child] = False
                    stack.append((child, iter(_children(child))))
                    descended = True
                    break
                if known:
                    found[node] = True
            if not descended:
                stack.pop()
                self.reach[node] = result = found.pop(node)
                if stack and result:
                    found[stack[-1][0]] = True
        return self.reach[root]

    def _expand(self) -> None:
        self.walked += 1
        if self.walked > self.budget:
            raise OverBudget(self.budget)

    def relevant(self, root: Any) -> set[Any]:
        """The nodes below ``root`` that reach a stop (stops included, not walked past)."""
        out = {root}
        stack = [root]
        while stack:
            node = stack.pop()
            if node in self.stops:
                continue
            for child in _children(node):
                if child not in out and self.reach.get(child, False):
                    out.add(child)
                    stack.append(child)
        return out


def walk_heads(losses: Sequence[Tensor | None], stops: set[Any], budget: int = 4096) -> Frontier:
    """Find, for every task, the edges through which its gradient enters the shared part.

    Args:
        losses: each task's loss (``None`` for a task left out of the walk).
        stops: the autograd nodes that produced the shared layer's outputs.
        budget: the most nodes the walk may expand.

    Returns:
        The :class:`Frontier`.

    Raises:
        OverBudget: when the graph above the layer has more than ``budget`` nodes.
        Unreached: when a loss does not depend on the shared layer's outputs.
    """
    walk = _Walk(stops, budget)
    sets: dict[int, set[Any]] = {}
    for i, loss in enumerate(losses):
        if loss is None:
            continue
        root = loss.grad_fn
        if root is None or not walk.reaches(root):
            raise Unreached(i)
        sets[i] = walk.relevant(root)
    count: dict[Any, int] = {}
    for nodes in sets.values():
        for node in nodes:
            count[node] = count.get(node, 0) + 1
    taps: dict[Any, list[tuple[int, int, GradientEdge]]] = {}
    roots: list[tuple[int, GradientEdge]] = []
    entries: set[Any] = set()
    for i, nodes in sets.items():
        loss = losses[i]
        assert loss is not None and loss.grad_fn is not None
        if count[loss.grad_fn] > 1 or loss.grad_fn in stops:
            edge = get_gradient_edge(loss)
            roots.append((i, edge))
            entries.add(edge.node)
            continue
        for node in nodes:
            if count[node] != 1 or node in stops:
                continue
            for k, (nxt, nr) in enumerate(node.next_functions):
                if nxt is not None and walk.reach.get(nxt, False) and (count[nxt] > 1 or nxt in stops):
                    taps.setdefault(node, []).append((k, i, GradientEdge(nxt, nr)))
                    entries.add(nxt)
    reached = {node for nodes in sets.values() for node in nodes if node in stops}
    return Frontier(taps, roots, entries, reached, _single_elementwise(entries, roots, reached), walk.walked)


def _single_elementwise(entries: set[Any], roots: list[Any], stops: set[Any]) -> Any | None:
    if roots or len(entries) != 1:
        return None
    (node,) = entries
    if node in stops or node.name() not in ELEMENTWISE_NODES:
        return None
    nexts = [nxt for nxt, _ in node.next_functions if nxt is not None]
    return node if len(nexts) == 1 and nexts[0] in stops else None
