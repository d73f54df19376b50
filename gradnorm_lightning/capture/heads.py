"""The heads' graph walk: where each task's gradient enters the part of the graph tasks share.

Walking the backward graph from every task loss down to the *stops* (the shared modules'
output nodes, and the accumulators of their parameters) splits it into the nodes a single task
reaches (its head: *private*) and the nodes several tasks reach (the *shared part*: an
activation, a reshape, a norm, a residual, or nothing at all). Each edge out of a task's private
region carries that one task's gradient:

* a *tap* is such an edge into the shared part or straight into a stop: a hook on the private
  node reads the task's gradient there during the model's own backward, so no extra pass runs
  through the heads. A tap into a parameter's accumulator is a use of a shared parameter outside
  the modules' calls (a tied weight);
* a *cut* is such an edge into anything that does not reach a stop (a head's own parameters,
  a tensor computed before the shared modules, a loss term outside the balancing). A task that
  is absent from a batch (a masked mean over an empty mask: NaN, with a graph) contributes
  nothing when its taps and cuts are zeroed: what it wrote is dropped before it meets another
  task's gradient, and everything the present tasks contribute is kept.

A task whose loss node is itself shared (losses unbound from one tensor, or a loss that an
``extra`` term reads) enters at its loss (a *root*): it has no private region to cut.

Only nodes that can reach a stop count; nodes created before the shared modules' calls began
(``min_seq``) cannot reach them (a node's inputs are always older) and are not walked, so the
cost is the size of the graph above the shared modules.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from torch import Tensor
from torch.autograd.graph import GradientEdge, get_gradient_edge

from gradnorm_lightning._compat import accumulate_grad_type, node_sequence_nr

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
    """The graph above the shared modules is larger than the walk allows."""


class Unreached(Exception):
    """A task's loss does not depend on the shared modules (``args[0]`` is the task index)."""


@dataclasses.dataclass
class Frontier:
    """Where each task's gradient leaves its private region, as found by :func:`walk_heads`.

    Attributes:
        taps: private node -> ``[(k, task, target)]``: the node's ``k``-th gradient output is
            ``task``'s gradient at the edge ``target`` (into the shared part or a stop).
        cuts: private node -> ``[(k, task)]``: the node's ``k``-th gradient output is ``task``'s
            and goes where no stop is reached (the task's own parameters, older tensors).
        roots: ``(task, edge)`` of tasks whose loss node is shared: their gradient enters there.
        entries: every node a tap or a root delivers into (their pre-hooks flush).
        stops: the stop nodes some task reaches.
        elementwise: the shared part's only node when it is one elementwise function lying
            directly on a stop, else ``None``.
        masks: every relevant node -> the bit mask of the tasks reaching it (bit ``T`` is the
            ``extra`` term's).
        walked: how many nodes the walk expanded.
    """

    taps: dict[Any, list[tuple[int, int, GradientEdge]]]
    cuts: dict[Any, list[tuple[int, int]]]
    roots: list[tuple[int, GradientEdge]]
    entries: set[Any]
    stops: set[Any]
    elementwise: Any | None
    masks: dict[Any, int]
    walked: int

    @property
    def shared_part(self) -> bool:
        """Whether some task's gradient must cross nodes above the stops that tasks share."""
        return bool(self.roots) or any(n not in self.stops for n in self.entries)

    def private_nodes(self, task: int) -> list[Any]:
        """The nodes with a tap or a cut of ``task`` (where its gradient leaves its region)."""
        return [n for n in {**self.taps, **self.cuts} if self.masks.get(n) == 1 << task]


def walk_heads(
    losses: Sequence[Tensor | None],
    stops: set[Any],
    budget: int = 4096,
    *,
    min_seq: int | None = None,
    extra: Tensor | None = None,
) -> Frontier:
    """Find, for every task, the edges through which its gradient leaves its private region.

    One depth-first pass over the union of the tasks' graphs finds the nodes that reach a
    stop (memoised, pruned by creation order); one pass in topological order then gives every
    such node the set of tasks that reach it (a bit mask). A private node has one bit; its
    edges to nodes with other bits or to stops are taps, its edges to nodes reaching no stop
    are cuts.

    Args:
        losses: each task's loss (``None`` for a task left out of the walk).
        stops: the autograd nodes where the walk ends: the shared modules' outputs, and the
            accumulators of their parameters (reaching one of these from above is a tied use).
        budget: the most nodes the walk may expand.
        min_seq: the creation order below which no node can reach a stop (the sequence number
            at which the shared modules' first call began); by default the oldest non-leaf stop's.
        extra: a loss term outside the balancing: its graph is walked as one more root (its
            bit makes the nodes it reads shared), but it need not reach a stop.

    Returns:
        The :class:`Frontier`.

    Raises:
        OverBudget: when the graph above the stops has more than ``budget`` nodes.
        Unreached: when a loss does not depend on the stops.
    """
    leaf = accumulate_grad_type()
    if min_seq is None:
        seqs = [node_sequence_nr(s) for s in stops if type(s) is not leaf]
        usable = bool(seqs) and all(q is not None for q in seqs)
        min_seq = min(q for q in seqs if q is not None) if usable else -1
    reach: dict[Any, bool] = dict.fromkeys(stops, True)
    reached_by = reach.get
    children: dict[Any, list[tuple[int, Any, int]]] = {}  # relevant node -> its relevant (k, child, nr)
    order: list[Any] = []  # relevant non-stop nodes, children before parents
    expanded = 0
    num_tasks = len(losses)
    roots_in = [*losses, extra]
    for i, loss in enumerate(roots_in):
        if loss is None:
            continue
        root = loss.grad_fn
        if root is None:
            if i == num_tasks:
                continue
            raise Unreached(i)
        if root in reach:
            if not reach[root] and i < num_tasks:
                raise Unreached(i)
            continue
        reach[root] = False
        stack = [(root, root.next_functions, 0)]
        while stack:
            node, nexts, j = stack.pop()
            size = len(nexts)
            while j < size:
                child = nexts[j][0]
                j += 1
                if child is None or child in reach or type(child) is leaf:
                    continue  # (a parameter's accumulator that is not a stop reaches nothing)
                if min_seq >= 0 and child._sequence_nr() < min_seq:
                    reach[child] = False  # older than the shared modules' calls: cannot reach them
                    continue
                expanded += 1
                if expanded > budget:
                    raise OverBudget(budget)
                reach[child] = False
                stack.append((node, nexts, j))
                stack.append((child, child.next_functions, 0))
                break
            else:  # every child is done: the node reaches a stop through the ones that do
                kids = [(k, nxt, nr) for k, (nxt, nr) in enumerate(nexts) if reached_by(nxt)]
                if kids:
                    reach[node] = True
                    children[node] = kids
                    order.append(node)
        if i < num_tasks and not reach[root]:
            raise Unreached(i)
    masks: dict[Any, int] = {}
    for i, loss in enumerate(roots_in):
        if loss is not None and loss.grad_fn is not None and reach.get(loss.grad_fn):
            masks[loss.grad_fn] = masks.get(loss.grad_fn, 0) | (1 << i)
    for node in reversed(order):  # parents before children
        mask = masks.get(node, 0)
        for _, child, _ in children[node]:
            masks[child] = masks.get(child, 0) | mask
    roots: list[tuple[int, GradientEdge]] = []
    entries: set[Any] = set()
    for i, loss in enumerate(losses):
        if loss is not None and (masks[loss.grad_fn] != 1 << i or loss.grad_fn in stops):
            edge = get_gradient_edge(loss)
            roots.append((i, edge))
            entries.add(edge.node)
    rooted = {task for task, _ in roots}
    taps: dict[Any, list[tuple[int, int, GradientEdge]]] = {}
    cuts: dict[Any, list[tuple[int, int]]] = {}
    for node in order:
        mask = masks[node]
        if mask & (mask - 1):  # shared by several tasks (or a task and the extra term)
            continue
        task = mask.bit_length() - 1
        if task >= num_tasks or task in rooted:
            continue
        for k, (child, nr) in enumerate(node.next_functions):
            if child is None:
                continue
            if reached_by(child):
                if child in stops or masks[child] != mask:
                    taps.setdefault(node, []).append((k, task, GradientEdge(child, nr)))
                    entries.add(child)
            else:
                cuts.setdefault(node, []).append((k, task))
    reached = {node for node in stops if node in masks}
    return Frontier(taps, cuts, roots, entries, reached, _single_elementwise(entries, roots, reached), masks, expanded)


def _single_elementwise(entries: set[Any], roots: list[Any], stops: set[Any]) -> Any | None:
    if roots or len(entries) != 1:
        return None
    (node,) = entries
    if node in stops or node.name() not in ELEMENTWISE_NODES:
        return None
    nexts = [nxt for nxt, _ in node.next_functions if nxt is not None]
    return node if len(nexts) == 1 and nexts[0] in stops else None
