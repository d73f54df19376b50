"""The route of one step: how its per-task gradients are read, and where their norms come from.

:class:`RoutePlanner` looks at what one forward left (the shared modules' calls, the task views,
the losses' graph) and returns a :class:`Plan`: the route (``views``, ``heads``, ``losses``,
``autograd`` or ``none``; see :mod:`~gradnorm_lightning.capture.recorder`), the reason in words,
the parameters the norms run over, the sink (the modules' outputs with a norm rule each, the
representation's norms, or the parameters themselves: the generic rule), and the heads' walk
(:class:`~gradnorm_lightning.capture.heads.Frontier`), which also tells where an absent task's
gradient is cut off.
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

__all__ = ["Plan", "RoutePlanner", "describe", "reentrant_message", "unreached_message"]

_SPARSE_TYPES = (nn.Embedding, nn.EmbeddingBag)


@dataclasses.dataclass
class Plan:
    """How one step's statistics are obtained (decided once, by the recorder).

    Attributes:
        route: ``"views"``, ``"heads"``, ``"losses"``, ``"autograd"`` or ``"none"``.
        reason: why, in words (logged once).
        params: the shared modules' trainable parameters in this step (the norms run over them).
        calls: the module calls whose outputs the sink reads (empty for ``autograd``/``none``).
        rules: for an output sink, the norm rule of each call, by call index (else empty: the
            generic rule, vector-Jacobian products to the parameters).
        representation: ``mode="representation"``: norms of the output gradients themselves.
        frontier: the heads' walk, where one was made: the ``heads`` route's taps, and the taps
            and cuts that drop an absent task's gradient.
        views_edge: the edge of the tensor the views alias (``views`` route).
        elementwise: when the per-task gradients cross exactly one elementwise function to
            reach a module's output (e.g. its activation), that function's node: they cross
            it by one product with its derivative.
        engine_vjp: run that elementwise node through the autograd engine rather than by hand
            (its saved tensors are managed by saved-tensor hooks: activation checkpointing).
        sparse: ids of the parameters whose gradients are sparse (``sparse=True`` embeddings).
        cuts: whether an absent task's gradient can be cut off this step (a walk was made and
            the task has a private region).
    """

    route: str
    reason: str
    params: list[nn.Parameter]
    calls: list[LayerCall] = dataclasses.field(default_factory=list)
    rules: dict[int, tuple[str, NormRule]] = dataclasses.field(default_factory=dict)
    representation: bool = False
    frontier: Frontier | None = None
    views_edge: GradientEdge | None = None
    elementwise: Any | None = None
    engine_vjp: bool = False
    sparse: frozenset[int] = frozenset()

    @property
    def outputs_sink(self) -> bool:
        """Whether per-task gradients are gathered at the modules' outputs (else at their parameters)."""
        return self.representation or bool(self.rules)

    def can_cut(self, task: int) -> bool:
        """Whether ``task``'s gradient can be dropped where it leaves its private region."""
        frontier = self.frontier
        return frontier is not None and all(t != task for t, _ in frontier.roots)


def describe(layer: nn.Module | Sequence[nn.Module]) -> str:
    """A short name of the shared layer (or modules) for messages."""
    if isinstance(layer, nn.Module) and not isinstance(layer, nn.ModuleList):
        return type(layer).__name__
    kinds = [type(m).__name__ for m in layer]
    return f"{len(kinds)} shared modules ({', '.join(kinds)})"


def unreached_message(name: str, layer: nn.Module | Sequence[nn.Module]) -> str:
    """The error of a task whose loss does not depend on the shared layer."""
    return (
        f"The loss of task {name!r} does not depend on the shared layer ({describe(layer)}); "
        "every task must be computed from the last shared layer."
    )


def checkpoint_message(layer: nn.Module | Sequence[nn.Module]) -> str:
    """The error of a shared layer whose forward ran without gradients (reentrant checkpointing)."""
    return (
        f"The shared layer ({describe(layer)}) ran with gradients disabled in this forward pass, as it does "
        "inside `torch.utils.checkpoint.checkpoint(..., use_reentrant=True)`: that form of activation "
        "checkpointing runs the forward under no_grad, so no per-task gradient exists there. Use "
        "`use_reentrant=False` (the default in current PyTorch code), or keep the shared layer outside the "
        "checkpointed region."
    )


def reentrant_message(layer: nn.Module | Sequence[nn.Module], where: str) -> str:
    """The error of a reentrant checkpoint that per-task gradients would have to cross."""
    return (
        f"Part of the graph above the shared layer ({describe(layer)}) runs under "
        f"`torch.utils.checkpoint.checkpoint(..., use_reentrant=True)` {where}: its backward can only run as part "
        "of the model's own backward (it refuses `autograd.grad`), so no task's gradient can be taken through it "
        "on its own. Use `use_reentrant=False` (the default in current PyTorch code)."
    )


#: the backward node of a reentrant checkpoint (``use_reentrant=True``)
_REENTRANT_NODE = "CheckpointFunctionBackward"


def _reentrant_crossed(frontier: Frontier, every: bool) -> bool:
    """Whether a reentrant checkpoint lies where per-task gradients cross the graph: in the
    part several tasks share (``every=False``: the ``heads`` and ``views`` routes), or anywhere
    between the losses and the layer (``every=True``: a backward from every loss)."""
    return any((every or mask & (mask - 1)) and node.name() == _REENTRANT_NODE
               for node, mask in frontier.masks.items())


def _elementwise_on(edge: GradientEdge, outputs: set[Any]) -> Any | None:
    """``edge``'s node when it is an elementwise function of one of the modules' outputs."""
    node = edge.node
    if node in outputs or node.name() not in ELEMENTWISE_NODES:
        return None
    nexts = [nxt for nxt, _ in node.next_functions if nxt is not None]
    return node if len(nexts) == 1 and nexts[0] in outputs else None


def _is_sharded(p: nn.Parameter) -> bool:
    return type(p).__name__ == "DTensor" or type(p.data).__name__ == "DTensor"


def _views_problem(frontier: Frontier, fan: Any, num_tasks: int) -> str | None:
    """Why the heads do not each read only their own view (``None`` when they do)."""
    if frontier.roots:
        return "a task's loss node is shared by several tasks"
    interacting = "the heads interact (one reads another's activation, or they mix their views)"
    fan_seq = fan._sequence_nr()
    for taps in frontier.taps.values():
        for _, task, target in taps:
            node = target.node
            if node is fan:
                if target.output_nr != task:
                    return f"head {task} reads view {target.output_nr}"
            elif type(node).__name__ == "AccumulateGrad":
                return f"head {task} uses a shared parameter directly (a tied weight)"
            elif node in frontier.stops or node._sequence_nr() < fan_seq:
                return f"head {task} reads the shared representation other than through its view"
            else:
                return interacting
    for node, mask in frontier.masks.items():
        if node is not fan and mask & (mask - 1) and any(nxt is fan for nxt, _ in node.next_functions):
            return interacting if mask < 1 << num_tasks else "the `extra` term reads a task's view"
    return None


class RoutePlanner:
    """Chooses each step's :class:`Plan` for the shared modules.

    Args:
        layer: the shared layer, or the sequence of shared modules (for messages).
        modules: the shared modules, in order.
        mode: ``"auto"``, ``"autograd"`` or ``"representation"``.
        measure_norms: ``False``: the ``none`` route.
        walk_budget: the most graph nodes the heads' walk expands before falling back.
    """

    def __init__(self, layer: nn.Module | Sequence[nn.Module], modules: Sequence[nn.Module], mode: str,
                 measure_norms: bool, walk_budget: int) -> None:
        self.layer = layer
        self.modules = tuple(modules)
        self.mode = mode
        self.measure_norms = measure_norms
        self.walk_budget = walk_budget
        self.views_checked = False  # the views were checked by a walk (once per fit)
        self.uses_checked = False  # the whole graph was searched for earlier uses of the parameters (once per fit)
        self.used_before = False  # a shared parameter is used before the modules' calls (a tied weight)
        self.used_below = False  # a shared parameter is used in computing a call's input (a tied weight)

    # ------------------------------------------------------------------ the plan
    def plan(
        self,
        losses: Sequence[Tensor | None],
        calls: list[LayerCall],
        views: tuple[GradientEdge, Any] | None,
        names: Sequence[str],
        *,
        measure: bool = True,
        cut: bool = False,
        nograd_calls: int = 0,
        extra: Tensor | None = None,
    ) -> Plan:
        """The route of one step (see the module docstring).

        Args:
            losses: each task's loss (``None``: absent on the host).
            calls: the shared modules' calls since the last ``combine``.
            views: ``(edge of the aliased tensor, the views' node)``, if task views were made.
            names: the task names (for messages).
            measure: ``False``: no statistics this step (only the cut, where needed).
            cut: whether an absent task's gradient may need cutting off (a walk is then made).
            nograd_calls: calls of the shared modules made with gradients disabled.
            extra: a loss term outside the balancing, added to the combined loss.

        Raises:
            ValueError: the layer was not called, has no trainable parameters, or a task does
                not reach it.
        """
        if not (self.measure_norms and measure):
            return self._plan_none(losses, calls, cut, extra)
        if self.mode == "autograd":
            return self._plan_autograd()
        if not calls:
            if nograd_calls:
                raise ValueError(checkpoint_message(self.layer))
            raise ValueError(
                f"The shared layer ({describe(self.layer)}) was not called in the forward pass that produced "
                "these losses (with gradients enabled); `shared_layer` must be the last layer shared by all tasks."
            )
        params = _unique([p for c in calls for _, p in c.params])
        self._check_trainable(params)
        sparse = frozenset(id(p) for m in self.modules if isinstance(m, _SPARSE_TYPES) and m.sparse
                           for p in m.parameters())
        inplace = any(c.outputs_modified() for c in calls)
        note = "; the layer's output was written in place after the call (version counter): its gradient is " \
            "taken at the layer's own output node" if inplace else ""
        outputs = {node for c in calls for node in c.nodes}
        stops = outputs | {get_gradient_edge(p).node for p in params}
        starts = [c.start for c in calls]
        min_seq = min(starts) if all(s is not None for s in starts) else None  # type: ignore[type-var]
        engine_vjp = any(c.saved_hooks for c in calls)
        if not self.uses_checked:
            self.uses_checked = True
            self.used_before = self._used_before(losses, outputs, params, extra)
            self.used_below = self._used_below(calls, outputs, params)
        plan: Plan | None = None
        frontier: Frontier | None = None
        if views is not None:
            views_edge, fan = views
            if cut or not self.views_checked or len(calls) > 1:
                frontier = self._walk_views(losses, stops, min_seq, extra, names)
            problem = _views_problem(frontier, fan, len(names)) if frontier is not None else None
            if problem is None:
                self.views_checked = self.views_checked or frontier is not None
                elementwise = _elementwise_on(views_edge, outputs)
                how = "per-task gradients from the task views' backward, no extra pass"
                if elementwise is not None:
                    how += f", across {elementwise.name()} by one product"
                plan = Plan("views", how + note, params, calls=calls, views_edge=views_edge, elementwise=elementwise,
                            frontier=frontier)
            else:
                assert frontier is not None
                plan = self._heads_plan(frontier, params, calls, note + f"; not the task views, because {problem}")
        if plan is None:
            try:
                frontier = walk_heads(losses, stops, self.walk_budget, min_seq=min_seq, extra=extra)
            except Unreached:
                self._check_reach(losses, params, names, min_seq, extra)
                if self.mode == "representation":
                    raise ValueError(
                        "mode='representation' needs the gradient at the shared layer's output, and this graph does "
                        "not carry it (an in-place write rebuilt the output in a way the recorder cannot follow); "
                        "use mode='auto'."
                    ) from None
                return Plan("losses", "fallback: one batched backward from every loss to the parameters (an extra "
                            "pass), because a task's gradient does not arrive at the layer's recorded outputs (an "
                            "output rebuilt by an in-place write the recorder cannot follow)" + note
                            + "; an absent task's gradient cannot be cut off on this route", params, sparse=sparse)
            except OverBudget:
                plan = Plan("losses", "fallback: one batched backward from every loss through its head (an extra "
                            f"pass), because the graph above the shared layer has more than {self.walk_budget} nodes"
                            + note + "; an absent task's gradient cannot be cut off on this route", params,
                            calls=calls, sparse=sparse)
                self._choose_sink(plan, tied=True)  # (unwalked: a tied use cannot be ruled out)
                return plan
            plan = self._heads_plan(frontier, params, calls, note)
        # (mode='representation' takes the outputs' gradients only: a weight tied before the call is no matter)
        tied_before = self.used_before and self.mode != "representation"
        if plan.frontier is not None and _reentrant_crossed(plan.frontier, every=tied_before):
            raise ValueError(reentrant_message(self.layer, "where a backward from every loss to the parameters (a "
                                               "weight tied before the layer's call) must cross it" if tied_before
                                               else "where several tasks' gradients meet (e.g. a checkpointed head whose "
                                               "output another task reads)"))
        if tied_before:
            plan = Plan("losses", "one batched backward from every loss to the parameters (an extra pass), because "
                        "a shared parameter is also used before the layer's call (a tied weight), which the heads' "
                        "backward nodes cannot separate" + note, params, frontier=plan.frontier, sparse=sparse)
            return plan
        plan.sparse = sparse
        plan.engine_vjp = engine_vjp
        tied = plan.frontier is not None and any(type(n).__name__ == "AccumulateGrad" for n in plan.frontier.stops)
        self._choose_sink(plan, tied=tied)
        return plan

    def _heads_plan(self, frontier: Frontier, params: list[nn.Parameter], calls: list[LayerCall], note: str) -> Plan:
        how = "per-task gradients from the heads' backward nodes, no extra pass"
        if frontier.elementwise is not None:
            how += f", across the shared {frontier.elementwise.name()} by one product"
        elif frontier.shared_part:
            how += ", then vector-Jacobian products through the part of the graph tasks share"
        return Plan("heads", how + note, params, calls=calls, frontier=frontier, elementwise=frontier.elementwise)

    def _walk_views(self, losses: Sequence[Tensor | None], stops: set[Any], min_seq: int | None,
                    extra: Tensor | None, names: Sequence[str]) -> Frontier:
        """The heads' walk on a step with task views (the views' node is part of the shared part)."""
        try:
            return walk_heads(losses, stops, self.walk_budget, min_seq=min_seq, extra=extra)
        except Unreached as err:
            self._check_reach(losses, [], names, min_seq, extra)
            raise ValueError(
                f"Task {names[err.args[0]]!r} has a loss but its gradient does not reach the shared layer through "
                "its view from `task_views`; each head must read its own view (and only it)."
            ) from None
        except OverBudget:
            raise ValueError(
                f"task_views: the graph above the shared layer has more than {self.walk_budget} nodes, so the "
                "recorder cannot check that each head reads only its own view; drop `task_views` (the default "
                "route needs no views)."
            ) from None

    def _plan_none(self, losses: Sequence[Tensor | None], calls: list[LayerCall], cut: bool,
                   extra: Tensor | None) -> Plan:
        frontier = None
        if cut and calls:
            params = _unique([p for c in calls for _, p in c.params])
            stops = {node for c in calls for node in c.nodes} | {get_gradient_edge(p).node for p in params}
            starts = [c.start for c in calls]
            min_seq = min(starts) if all(s is not None for s in starts) else None  # type: ignore[type-var]
            try:
                frontier = walk_heads([x if x is not None and x.grad_fn is not None else None for x in losses],
                                      stops, self.walk_budget, min_seq=min_seq, extra=extra)
            except (Unreached, OverBudget):
                frontier = None
        reason = "the strategy needs no gradient norms" if not self.measure_norms else "no statistics on this step"
        return Plan("none", reason, [], frontier=frontier)

    def _plan_autograd(self) -> Plan:
        params = _unique([p for m in self.modules for p in m.parameters() if p.requires_grad])
        self._check_trainable(params)
        if any(_is_sharded(p) for p in params):
            raise ValueError(
                f"mode='autograd' differentiates with respect to the shared layer's parameters, and FSDP has "
                f"sharded them (DTensor) in {describe(self.layer)}: the forward runs on gathered copies, so the "
                "losses do not depend on the sharded parameters themselves. Use mode='auto' (the default), which "
                "reads the per-task gradients at the layer's calls and is exact under FSDP."
            )
        return Plan("autograd", "mode='autograd': one autograd.grad per task over the shared layer's parameters; "
                    "an absent task's gradient cannot be cut off on this route", params,
                    sparse=frozenset(id(p) for m in self.modules if isinstance(m, _SPARSE_TYPES) and m.sparse
                                     for p in m.parameters()))

    # ------------------------------------------------------------------ the sink
    def _choose_sink(self, plan: Plan, tied: bool) -> None:
        if self.mode == "representation":
            plan.representation = True
            if plan.frontier is not None and len(plan.calls) > 1:
                # an unreached call may lie below a reached one (the layer reused on its own
                # output): the representation is the gradient at the outputs the tasks read
                plan.calls = [c for c in plan.calls if c.nodes & plan.frontier.stops]
            plan.reason += "; mode='representation': norms of the gradients at the layer's output (an approximation)"
            return
        calls = plan.calls
        counts: dict[int, int] = {}
        for c in calls:
            counts[c.module] = counts.get(c.module, 0) + 1
        why = ""
        if tied:
            why = ("a shared parameter is used outside the layer's calls (a tied weight, e.g. `h @ emb.weight.T`), "
                   "which a capture at the outputs cannot see" if plan.frontier is not None
                   else "the graph was not walked, so a tied use of the parameters cannot be ruled out")
        elif self.used_below:
            why = ("a shared parameter is also used in computing the layer's input (a tied weight below the call), "
                   "which a rule reading the call alone cannot see")
        elif not calls:
            why = "no call's output is read directly"
        elif any(n > 1 for n in counts.values()):
            why = "the layer ran several times in this forward"
        elif plan.frontier is not None and any(not (c.nodes & plan.frontier.stops) for c in calls):
            why = "some shared module's output is not read directly by the tasks"
        rules: dict[int, tuple[str, NormRule]] = {}
        if not why:
            for k, c in enumerate(calls):
                module = self.modules[c.module]
                found = find_norm_rule(module)
                if found is None:
                    why = f"no norm rule is registered for {type(module).__name__}"
                elif not c.inputs_unchanged():
                    why = "an input of the layer was written in place after the call"
                if found is None or why:
                    break
                rules[k] = found
        if why:
            plan.reason += f"; norms by vector-Jacobian products to the parameters (generic rule: {why})"
            return
        plan.rules = rules
        names = list(dict.fromkeys(f"the {name} rule for {type(self.modules[calls[k].module]).__name__}"
                                   for k, (name, _) in rules.items()))
        plan.reason += "; norms by " + ", ".join(names)

    # ------------------------------------------------------------------ checks
    def _used_before(self, losses: Sequence[Tensor | None], outputs: set[Any], params: list[nn.Parameter],
                     extra: Tensor | None) -> bool:
        """Whether a task reaches a shared parameter other than through the modules' outputs,
        anywhere in the graph (a tied weight used before the calls, which the per-step walk,
        pruned at the calls, cannot see). Searched once per fit; a graph larger than 16 walk
        budgets is not searched (the per-step walk still finds the uses after the calls)."""
        leaves = {get_gradient_edge(p).node for p in params}
        try:
            frontier = walk_heads(losses, outputs | leaves, 16 * self.walk_budget, min_seq=-1, extra=extra)
        except (Unreached, OverBudget):
            return False
        return any(node in leaves for node in frontier.stops) and self._before_calls(frontier, leaves, outputs)

    def _used_below(self, calls: list[LayerCall], outputs: set[Any], params: list[nn.Parameter]) -> bool:
        """Whether a shared parameter is reached from a call's inputs other than through a call's
        outputs: used in computing the layer's own input (a tied encoder, ``x + f(x, W)``). Every
        task's gradient of ``W`` then also flows through that input, which the norm rules (reading
        the call's own use of its parameters) miss and the vector-Jacobian products to the
        parameters include. Searched once per fit; a graph below the calls larger than 16 walk
        budgets is not searched."""
        leaves = {get_gradient_edge(p).node for p in params}
        seen: set[Any] = set(outputs)  # (an input computed by another call: the layer reused, a case of its own)
        stack = [e.node for c in calls for e in c.input_edges]
        budget = 16 * self.walk_budget
        while stack:
            node = stack.pop()
            if node in seen:
                continue
            if node in leaves:
                return True
            seen.add(node)
            if len(seen) > budget:
                return False
            stack.extend(nxt for nxt, _ in node.next_functions if nxt is not None)
        return False

    @staticmethod
    def _before_calls(frontier: Frontier, leaves: set[Any], outputs: set[Any]) -> bool:
        """Whether a node reaching a parameter's accumulator directly is older than the calls."""
        oldest = min((n._sequence_nr() for n in outputs), default=0)
        for node in frontier.masks:
            if node in leaves or node in outputs:
                continue
            if any(nxt in leaves for nxt, _ in node.next_functions) and node._sequence_nr() < oldest:
                return True
        return False

    def _check_reach(self, losses: Sequence[Tensor | None], params: list[nn.Parameter], names: Sequence[str],
                     min_seq: int | None, extra: Tensor | None) -> None:
        """Raise the clear error for a loss that does not reach the layer's parameters at all."""
        if not params:
            params = [p for m in self.modules for p in m.parameters() if p.requires_grad]
        leaves = {get_gradient_edge(p).node for p in params}
        try:
            walk_heads(losses, leaves, self.walk_budget, min_seq=-1)
        except Unreached as err:
            raise ValueError(unreached_message(names[err.args[0]], self.layer)) from None
        except OverBudget:
            pass  # too large to tell: a task that does not reach gets zero norms

    def _check_trainable(self, params: list[nn.Parameter]) -> None:
        if not params:
            raise ValueError(
                f"The shared layer ({describe(self.layer)}) has no trainable parameters in this step (all "
                "`requires_grad=False`); GradNorm's norms run over them: unfreeze at least one, or stop the "
                "balancing while the layer is frozen."
            )


def _unique(params: list[nn.Parameter]) -> list[nn.Parameter]:
    seen: set[int] = set()
    out = []
    for p in params:
        if id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out
