"""The route of one step: how its per-task gradients are read, and where their norms come from.

:class:`RoutePlanner` looks at what one forward left (the layer's calls, the task views, the
losses' graph) and returns a :class:`Plan`: the route (``views``, ``heads``, ``losses``,
``autograd`` or ``none``; see :mod:`~gradnorm_lightning.capture.recorder`), the reason in words,
the parameters the norms run over, and the sink: the layer's outputs with a norm rule (or the
representation's norms), or the parameters themselves (the generic rule).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn
from torch.autograd.graph import GradientEdge, get_gradient_edge

from gradnorm_lightning.capture.calls import LayerCall
from gradnorm_lightning.capture.heads import (
    ELEMENTWISE_NODES,
    Frontier,
    OverBudget,
    Unreached,
    walk_heads,
)
from gradnorm_lightning.capture.norms import NormRule, find_norm_rule

__all__ = ["Plan", "RoutePlanner", "unreached_message"]


@dataclasses.dataclass
class Plan:
    """How one step's statistics are obtained (decided once, by the recorder).

    Attributes:
        route: ``"views"``, ``"heads"``, ``"losses"``, ``"autograd"`` or ``"none"``.
        reason: why, in words (logged once).
        params: the shared layer's trainable parameters in this step.
        calls: the layer calls whose outputs the sink reads (empty for ``autograd``/``none``).
        rule: ``(name, rule)`` for a one-call output sink, else ``None`` (generic rule).
        representation: ``mode="representation"``: norms of the output gradients themselves.
        frontier: the heads' walk (``heads`` route).
        views_edge: the edge of the tensor the views alias (``views`` route).
        elementwise: when the per-task gradients cross exactly one elementwise function to
            reach the layer's output (e.g. its activation), that function's node: they cross
            it by one product with its derivative.
    """

    route: str
    reason: str
    params: list[nn.Parameter]
    calls: list[LayerCall] = dataclasses.field(default_factory=list)
    rule: tuple[str, NormRule] | None = None
    representation: bool = False
    frontier: Frontier | None = None
    views_edge: GradientEdge | None = None
    elementwise: Any | None = None

    @property
    def outputs_sink(self) -> bool:
        """Whether per-task gradients are gathered at the layer's outputs (else at its parameters)."""
        return self.representation or self.rule is not None


def _elementwise_on(edge: GradientEdge, outputs: set[Any]) -> Any | None:
    """``edge``'s node when it is an elementwise function of one of the layer's outputs."""
    node = edge.node
    if node in outputs or node.name() not in ELEMENTWISE_NODES:
        return None
    nexts = [nxt for nxt, _ in node.next_functions if nxt is not None]
    return node if len(nexts) == 1 and nexts[0] in outputs else None


def unreached_message(name: str, layer: nn.Module) -> str:
    """The error of a task whose loss does not depend on the shared layer."""
    return (
        f"The loss of task {name!r} does not depend on the shared layer ({type(layer).__name__}); "
        "every task must be computed from the last shared layer."
    )


class RoutePlanner:
    """Chooses each step's :class:`Plan` for one shared layer.

    Args:
        layer: the shared layer.
        mode: ``"auto"``, ``"autograd"`` or ``"representation"``.
        measure_norms: ``False``: the ``none`` route.
        walk_budget: the most graph nodes the heads' walk expands before falling back.
    """

    def __init__(self, layer: nn.Module, mode: str, measure_norms: bool, walk_budget: int) -> None:
        self.layer = layer
        self.mode = mode
        self.measure_norms = measure_norms
        self.walk_budget = walk_budget

    def plan(self, losses: Sequence[Tensor | None], calls: list[LayerCall], views_edge: GradientEdge | None,
             names: Sequence[str]) -> Plan:
        """The route of one step (see the module docstring).

        Raises:
            ValueError: the layer was not called, has no trainable parameters, or a task does
                not reach it.
        """
        if not self.measure_norms:
            return Plan("none", "the strategy needs no gradient norms", [])
        if self.mode == "autograd":
            params = [p for p in self.layer.parameters() if p.requires_grad]
            self._check_trainable(params)
            return Plan("autograd", "mode='autograd': one autograd.grad per task over the shared layer's parameters",
                        params)
        if not calls:
            raise ValueError(
                f"The shared layer ({type(self.layer).__name__}) was not called in the forward pass that produced "
                "these losses (with gradients enabled); `shared_layer` must be the last layer shared by all tasks."
            )
        params = [p for _, p in calls[-1].params]
        self._check_trainable(params)
        inplace = any(c.outputs_modified() for c in calls)
        note = "; the layer's output was written in place after the call (version counter): its gradient is " \
            "taken at the layer's own output node" if inplace else ""
        if views_edge is not None:
            elementwise = _elementwise_on(views_edge, {node for c in calls for node in c.nodes})
            how = "per-task gradients from the task views' backward, no extra pass"
            if elementwise is not None:
                how += f", across {elementwise.name()} by one product"
            plan = Plan("views", how + note, params, calls=calls, views_edge=views_edge, elementwise=elementwise)
        else:
            stops = {node for c in calls for node in c.nodes}
            try:
                frontier = walk_heads(losses, stops, self.walk_budget)
            except Unreached:
                self._check_reach(losses, params, names)
                if self.mode == "representation":
                    raise ValueError(
                        "mode='representation' needs the gradient at the shared layer's output, and this graph does "
                        "not carry it (an in-place write rebuilt the output in a way the recorder cannot follow); "
                        "use mode='auto'."
                    ) from None
                return Plan("losses", "fallback: one batched backward from every loss to the parameters (an extra "
                            "pass), because a task's gradient does not arrive at the layer's recorded outputs (an "
                            "output rebuilt by an in-place write the recorder cannot follow)" + note, params)
            except OverBudget:
                plan = Plan("losses", "fallback: one batched backward from every loss through its head (an extra "
                            f"pass), because the graph above the shared layer has more than {self.walk_budget} nodes"
                            + note, params, calls=calls)
            else:
                # With several calls, an unreached one may lie below a reached one (the layer
                # reused on its own output): the generic rule then covers it through the graph.
                reached = [c for c in calls if c.nodes & frontier.stops] if len(calls) > 1 else calls
                how = "per-task gradients from the heads' backward nodes, no extra pass"
                if frontier.elementwise is not None:
                    how += f", across the shared {frontier.elementwise.name()} by one product"
                elif frontier.shared_part:
                    how += ", then one batched vector-Jacobian product through the part of the graph tasks share"
                plan = Plan("heads", how + note, params, calls=reached, frontier=frontier,
                            elementwise=frontier.elementwise)
        self._choose_sink(plan, len(calls))
        return plan

    def _choose_sink(self, plan: Plan, num_calls: int) -> None:
        kind = type(self.layer).__name__
        if self.mode == "representation":
            plan.representation = True
            plan.reason += "; mode='representation': norms of the gradients at the layer's output (an approximation)"
            return
        rule = find_norm_rule(self.layer)
        why = ""
        if num_calls != 1:
            why = f"the layer ran {num_calls} times in this forward"
        elif rule is None:
            why = f"no norm rule is registered for {kind}"
        elif not plan.calls[0].inputs_unchanged():
            why = "an input of the layer was written in place after the call"
        if why:
            plan.reason += f"; norms by one batched vector-Jacobian product to the parameters (generic rule: {why})"
            return
        assert rule is not None
        plan.rule = rule
        plan.reason += f"; norms by the {rule[0]} rule for {kind}"

    def _check_reach(self, losses: Sequence[Tensor | None], params: list[nn.Parameter], names: Sequence[str]) -> None:
        """Raise the clear error for a loss that does not reach the layer's parameters at all."""
        leaves = {get_gradient_edge(p).node for p in params}
        try:
            walk_heads(losses, leaves, self.walk_budget)
        except Unreached as err:
            raise ValueError(unreached_message(names[err.args[0]], self.layer)) from None
        except OverBudget:
            pass  # too large to tell: a task that does not reach gets zero norms

    def _check_trainable(self, params: list[nn.Parameter]) -> None:
        if not params:
            raise ValueError(
                f"The shared layer ({type(self.layer).__name__}) has no trainable parameters in this step (all "
                "`requires_grad=False`); GradNorm's norms run over them: unfreeze at least one, or stop the "
                "balancing while the layer is frozen."
            )

