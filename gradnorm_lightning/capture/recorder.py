"""The recorder: everything one optimizer step records at the shared layer, and its route.

A :class:`Recorder` is handed to a balancer. It owns the shared modules' forward hooks (their
calls), the task views, the backward captures of every combined loss and their accumulated
statistics. The shared layer may be one module or several (MMoE experts): the norms then run
over the union of their trainable parameters, each module with its own rule. For each ``combine`` it decides, once, from the graph it sees, how
the per-task gradients are obtained (the *route*) and where their norms come from (the *norm
rule*) with a :class:`~gradnorm_lightning.capture.routes.RoutePlanner`, logs that decision once
(rank zero, INFO) and hands the :class:`~gradnorm_lightning.capture.routes.Plan` to a
:class:`~gradnorm_lightning.capture.backward.StepCapture`. :meth:`Recorder.collect` returns
the step's :class:`Statistics`. Every route is exact; ``mode="representation"`` is the one
documented approximation (norms at the layer's output instead of over its parameters).

Routes:

* ``"views"``: the heads read :meth:`Recorder.views`; their node hands over every task's
  gradient during the model's own backward (no extra pass);
* ``"heads"``: the backward graph is walked from each loss to the layer; hooks on the heads'
  own nodes read each task's gradient where it enters the part tasks share (no extra pass);
* ``"losses"`` (fallback when the graph above the layer is too large to walk, or when an
  output was rebuilt by an in-place write the recorder cannot follow): one batched backward
  from every loss (an extra pass);
* ``"autograd"`` (``mode="autograd"``): one ``autograd.grad`` per task over the parameters;
* ``"none"``: the strategy needs no norms, or this step measures none (``measuring=False``):
  only the losses are recorded.

Whatever the route, a task absent from a backward pass (a non-finite loss with a graph) loses
nothing for the others where the route has walked the graph (``heads``, ``views``, ``none``): its
gradient is cut off where it leaves its private region (see
:mod:`~gradnorm_lightning.capture.backward`); the routes without a walk say so in their reason.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd.graph import get_gradient_edge

from gradnorm_lightning import _arrays
from gradnorm_lightning._arrays import as_dtype
from gradnorm_lightning.capture.backward import StepCapture
from gradnorm_lightning.capture.calls import CallHooks, LayerCall
from gradnorm_lightning.capture.distributed import reduce_statistics, world_size
from gradnorm_lightning.capture.routes import Plan, RoutePlanner, describe
from gradnorm_lightning.capture.stats import Accumulator
from gradnorm_lightning.capture.views import fan_out

__all__ = ["Recorder", "Statistics"]

log = logging.getLogger("gradnorm_lightning")

# Layer calls kept between two `combine`s: more than one means reuse of the layer or forwards
# that never reached `combine`; bounded so that the latter cannot pile up.
_MAX_CALLS = 64


@dataclasses.dataclass
class Statistics:
    """One optimizer step's per-task statistics, reduced over processes.

    Attributes:
        grad_norms: ``n_i = ||grad_W L_i||`` (NaN when not measured).
        losses: each task's loss, averaged over the backward passes it was present in.
        present: the tasks present in at least one backward pass.
        route: how the per-task gradients were obtained (routes of several passes joined by ``+``).
        absent: ``(T,)`` how many backward passes each task was absent from (``None``: none was).
        uncut: ``(T,)`` bool, tasks absent with a graph on a route that could not cut their
            backward off (``None``: none was): non-finite values it wrote into gradients other
            tasks share have to be zeroed, and what the present tasks contributed there is lost.
        cosines: ``(T, T)`` cosines between the tasks' gradients over the shared layer's
            trainable parameters (``task_cosines=True``; else ``None``): NaN in the row and
            column of a task absent from the step or whose gradient is zero. Under
            ``mode="representation"``, between the gradients at the layer's output.
    """

    grad_norms: Tensor
    losses: Tensor
    present: Tensor
    route: str
    absent: Tensor | None = None
    uncut: Tensor | None = None
    cosines: Tensor | None = None


class _ViewsLink:
    """Connects the views made in a forward to the capture that ``combine`` creates later."""

    def __init__(self, edge: Any) -> None:
        self.edge = edge
        self.node: Any = None  # the views' own autograd node
        self.capture: StepCapture | None = None

    def deliver(self, grads: tuple[Tensor | None, ...], stacked: Tensor | None) -> None:
        if self.capture is not None:
            self.capture.on_views(grads, stacked)

    def layout(self, numel: int) -> str | None:
        return self.capture.views_layout(numel) if self.capture is not None else "batch"


def shared_modules(layer: nn.Module | Sequence[nn.Module]) -> tuple[nn.Module, ...]:
    """The shared modules of a shared layer given as one module or as several (a list, a tuple,
    an ``nn.ModuleList``), each once, in order."""
    if isinstance(layer, nn.Module) and not isinstance(layer, nn.ModuleList):
        return (layer,)
    out: list[nn.Module] = []
    for m in layer:
        if all(m is not o for o in out):
            out.append(m)
    return tuple(out)


def _rank_zero() -> bool:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank() == 0
    return os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")) == "0"


class Recorder:
    """Per-task gradient statistics at a shared layer, gathered during the model's backward.

    Args:
        layer: the last layer shared by all tasks, or several modules (a list, a tuple or an
            ``nn.ModuleList``, e.g. MMoE experts): the norms run over all their trainable parameters.
        mode: ``"auto"`` (exact, cheapest route), ``"autograd"`` (exact, one ``autograd.grad``
            per task, no forward hook) or ``"representation"`` (norms at the layer's output).
        distributed: ``"exact"`` or ``"approx"`` (see :mod:`~gradnorm_lightning.capture.distributed`).
        measure_norms: ``False`` records only the losses (a strategy that needs no norms).
        walk_budget: the most graph nodes the heads' walk expands before falling back.
        task_cosines: also compute the cosines between the tasks' gradients (the whole ``T x T``
            Gram of the per-task gradients instead of its diagonal; the norms then come from the
            same Gram).

    Example::

        >>> layer = nn.Linear(3, 4)
        >>> rec = Recorder(layer)
        >>> z = layer(torch.randn(5, 3))
        >>> losses = [z[:, 0].pow(2).mean(), z[:, 1].pow(2).mean()]
        >>> values = torch.stack([loss.detach() for loss in losses])
        >>> weights = torch.ones(2)
        >>> combined = (weights * torch.stack(losses)).sum()
        >>> rec.record(losses, values, torch.tensor([True, True]), weights, combined, ("a", "b"))
        >>> combined.backward()
        >>> stats = rec.collect()
        >>> stats.route, stats.grad_norms.shape
        ('heads', torch.Size([2]))
    """

    def __init__(
        self,
        layer: nn.Module | Sequence[nn.Module],
        *,
        mode: str = "auto",
        distributed: str = "exact",
        measure_norms: bool = True,
        walk_budget: int = 4096,
        task_cosines: bool = False,
    ) -> None:
        self.layer = layer
        self.modules = shared_modules(layer)
        self.mode = mode
        self.distributed = distributed
        self.measure_norms = measure_norms
        self.task_cosines = bool(task_cosines)
        #: whether this step's statistics are measured (a balancer sets it ``False`` on steps
        #: that update no weights: the backward then records only the losses, while an absent
        #: task's gradient is still cut off)
        self.measuring = True
        self._calls: list[LayerCall] = []
        self._numels: dict[tuple[int, str], int] = {}  # each shared parameter's size as a call used it
        self._nograd_calls = 0
        self._views: _ViewsLink | None = None
        self._captures: list[StepCapture] = []
        self._acc: Accumulator | None = None
        self._weights: Tensor | None = None
        self._hooks: list[Any] = []
        self._announced: set[str] = set()
        self._planner = RoutePlanner(layer, self.modules, mode, measure_norms, walk_budget)
        # the statistics' dtype: float64 for a float64 layer, else float32
        self._dtype = torch.float64 if any(
            p.dtype == torch.float64 for m in self.modules for p in m.parameters()
        ) else torch.float32
        self.attach()

    # ------------------------------------------------------------------ lifecycle
    def set_dtype(self, dtype: torch.dtype) -> None:
        """Compute the statistics in ``dtype`` from the next step on (a balancer following its
        model from float32 to float64, e.g. Lightning's ``precision="64-true"``)."""
        self._dtype = dtype

    @property
    def uses_forward_hook(self) -> bool:
        """Whether this recorder hooks the shared modules' forward (not for ``mode="autograd"``,
        which needs no hook so that ``torch.compile`` can trace the whole trunk)."""
        return self.mode != "autograd"

    def attach(self) -> None:
        """Put the forward hooks on the shared modules (idempotent)."""
        if not self._hooks and self.uses_forward_hook:
            for index, module in enumerate(self.modules):
                hooks = CallHooks(self._on_call, index)
                self._hooks.append(module.register_forward_pre_hook(hooks.pre))
                self._hooks.append(module.register_forward_hook(hooks))

    def detach(self) -> None:
        """Take the forward hooks off and forget everything recorded."""
        for handle in self._hooks:
            handle.remove()
        self._hooks = []
        self.reset()

    def reset(self) -> None:
        """Forget every forward and backward recorded since the last :meth:`collect`."""
        for capture in self._captures:
            capture.remove_hooks()
        self._captures, self._calls, self._views, self._acc = [], [], None, None
        self._nograd_calls = 0
        self._planner.views_checked = False

    @property
    def pending_calls(self) -> int:
        """How many calls of the layer were recorded since the last ``combine`` (bounded)."""
        return len(self._calls)

    @property
    def pending(self) -> bool:
        """Whether a combined loss was back-propagated (or an empty step recorded) since the last :meth:`collect`."""
        return self._acc is not None

    def _on_call(self, index: int, call: LayerCall | None) -> None:
        if call is None:  # (a call with gradients disabled: reentrant activation checkpointing, or eval)
            self._nograd_calls += 1
            return
        if len(self._calls) >= _MAX_CALLS:
            del self._calls[0]
        self._calls.append(call)
        for name, p in call.params:  # (the full sizes: in the forward even FSDP's parameters are whole)
            self._numels[(index, name)] = p.numel()

    # ------------------------------------------------------------------ forward side
    def views(self, z: Tensor, num_tasks: int) -> tuple[Tensor, ...]:
        """``num_tasks`` aliases of ``z`` whose backward hands over each task's gradient."""
        if not (torch.is_grad_enabled() and z.requires_grad and self.uses_forward_hook):
            return tuple(z.view_as(z) for _ in range(num_tasks))
        link = _ViewsLink(get_gradient_edge(z))
        self._views = link
        views = fan_out(z, num_tasks, link.deliver, link.layout)
        link.node = views[0].grad_fn
        return views

    def _accumulator(self, like: Tensor, num_tasks: int) -> Accumulator:
        if self._acc is None:
            self._acc = Accumulator(num_tasks, self._dtype, like.device, cosines=self.task_cosines)
        return self._acc

    def record(
        self,
        losses: Sequence[Tensor | None],
        values: Tensor,
        present: Tensor,
        weights: Tensor,
        combined: Tensor,
        names: Sequence[str],
        extra: Tensor | None = None,
        host_values: Sequence[float] | None = None,
    ) -> None:
        """Record one combined loss ``sum_i weights_i losses_i`` for its backward.

        Args:
            losses: each task's loss (``None`` for a task absent on the host, or without a graph).
            values: ``(T,)`` loss values (NaN where missing).
            present: ``(T,)`` bool, the tasks taking part.
            weights: ``(T,)`` weights of the combined loss.
            combined: the combined loss; its backward records the statistics.
            names: task names, for messages.
            extra: a loss term outside the balancing that is added to ``combined`` before the
                backward: its graph is taken into account so that the norms stay exact.
            host_values: ``values`` already read on the host, where reading them is free (not
                read again); ``None``: read them here if free.

        Raises:
            ValueError: when the shared layer was not called in this forward, has no trainable
                parameters, or a task's loss does not depend on it.
        """
        calls, self._calls = self._calls, []
        link, self._views = self._views, None
        nograd, self._nograd_calls = self._nograd_calls, 0
        if not (torch.is_grad_enabled() and combined.requires_grad):
            return
        # A combined loss never back-propagated (abandoned) keeps its hooks on a graph that
        # holds them in a cycle through C++: take them off; finished captures need nothing more
        # (those that only cut off an absent task keep their hooks until the step is collected).
        for capture in self._captures:
            if not capture.started:
                capture.remove_hooks()
        self._captures = [c for c in self._captures if c.started and (not c.finished or c.has_hooks)]
        cut, host_absent = self._cuts(losses, values, present, host_values)
        views = (link.edge, link.node) if link is not None else None
        plan = self._planner.plan(losses, calls, views, names, measure=self.measuring, cut=bool(cut),
                                  nograd_calls=nograd, extra=extra)
        num_tasks = len(names)
        # the accumulator is made by the backward: a combine never back-propagated records nothing
        capture = StepCapture(
            plan, self.modules, losses, values, present, weights, lambda: self._accumulator(values, num_tasks), names,
            layer=self.layer, cut=cut, host_absent=host_absent,
            calls_params={id(p): (c.module, n) for c in calls for n, p in c.params},
        )
        if link is not None and plan.route == "views":
            link.capture = capture
            capture.keep_alive.append(link)  # the views' node holds it weakly
        capture.install(combined)
        self._captures.append(capture)
        self._weights = weights
        self._announce(plan)

    @staticmethod
    def _cuts(losses: Sequence[Tensor | None], values: Tensor, present: Tensor,
              host_values: Sequence[float] | None) -> tuple[dict[int, Tensor | None], list[bool] | None]:
        """Which tasks' gradients to cut off, and how (see :class:`StepCapture`): on the host,
        where reading the values is free, only the tasks known to be absent with a graph (by
        zeros); elsewhere every task with a graph, by ``where(present_i, g, 0)`` on the device."""
        if _arrays.host_reads_free(values.device):
            absent = [not math.isfinite(v) for v in (values.tolist() if host_values is None else host_values)]
            return {t: None for t, (a, loss) in enumerate(zip(absent, losses)) if a and loss is not None}, absent
        rows = present.unbind()  # (one operation for every task's flag)
        return {t: rows[t] for t, loss in enumerate(losses) if loss is not None}, None

    def record_empty(self, values: Tensor, weights: Tensor) -> None:
        """Record a step in which no task has a loss (nothing to back-propagate)."""
        self._calls, self._views = [], None
        acc = self._accumulator(values, values.numel())
        acc.routes.append("empty")
        acc.add_absent(torch.ones(values.numel(), dtype=torch.bool, device=values.device))
        self._weights = weights

    def outside_terms(self, root: Tensor, budget: int = 20_000) -> list[int]:
        """The tasks whose own part of the graph a term added to the last combined loss reads.

        A term added to ``combine``'s result (instead of passed as its ``extra``) that reads a
        head's activations sends its gradient through that head's private nodes, where the
        capture reads the task's gradient: it is counted into that task's norm. Checked against
        the last combine's walk (none: an empty list).

        Args:
            root: the tensor the backward starts from.
            budget: the most nodes examined.

        Returns:
            The indices of the tasks concerned.
        """
        capture = next((c for c in reversed(self._captures) if c.plan.frontier is not None), None)
        if capture is None or root.grad_fn is None:
            return []
        frontier = capture.plan.frontier
        assert frontier is not None
        num_tasks = capture.num_tasks
        private = {n: m.bit_length() - 1 for n, m in frontier.masks.items() if not m & (m - 1) and m < 1 << num_tasks}
        oldest = min((n._sequence_nr() for n in frontier.masks), default=0)
        seen = {root.grad_fn}
        stack = [root.grad_fn]
        hits: set[int] = set()
        while stack and len(seen) < budget:
            node = stack.pop()
            if node is capture.combined_node:
                continue
            if node in private:
                hits.add(private[node])
                continue
            for nxt, _ in node.next_functions:
                if nxt is not None and nxt not in seen and nxt._sequence_nr() >= oldest:
                    seen.add(nxt)
                    stack.append(nxt)
        return sorted(hits)

    # ------------------------------------------------------------------ the route
    def _announce(self, plan: Plan) -> None:
        message = f"{plan.route}: {plan.reason}"
        if message in self._announced:
            return
        self._announced.add(message)
        if _rank_zero():
            log.info("GradNorm statistics at %s: %s.", describe(self.layer), message)

    # ------------------------------------------------------------------ the result
    def collect(self, grad_scale: Tensor | float | None = None) -> Statistics | None:
        """The statistics recorded since the last call (``None`` if nothing was recorded).

        Args:
            grad_scale: the factor the backward passes were scaled by beyond the combined
                loss (the GradScaler's scale under fp16 AMP); ``None`` means 1.

        Raises:
            ValueError: when a recorded backward started but never reached the shared layer.
        """
        acc, captures = self._acc, self._captures
        self._acc, self._captures = None, []
        unfinished = [c for c in captures if c.started and not c.finished]
        for capture in captures:
            capture.remove_hooks()
        if acc is None:
            return None
        if unfinished:
            raise ValueError(
                f"The backward of a combined loss did not reach the shared layer ({describe(self.layer)}): "
                "back-propagate the combined loss through the whole model (no `inputs=` restricting it) "
                "before the update."
            )
        reduced = reduce_statistics(
            acc, self.distributed, representation=self.mode == "representation",
            measured=self.measure_norms and self.measuring, layout=self._layout() if world_size() > 1 else (),
        )
        norms, losses, present = reduced.norms, reduced.losses, reduced.present
        if self._weights is not None:
            norms = norms / as_dtype(self._weights, norms.dtype)
        if grad_scale is not None:
            if isinstance(grad_scale, Tensor):
                grad_scale = grad_scale.to(device=norms.device, dtype=norms.dtype)
            norms = norms / grad_scale
        route = "+".join(dict.fromkeys(acc.routes)) or "none"
        return Statistics(norms, losses, present, route, acc._absent, acc._uncut, reduced.cosines)

    def _layout(self) -> list[tuple[int, str, int, bool]]:
        """Every parameter of the shared modules, ``(module index, name, numel, requires grad)``:
        how the exact DDP reduction names them across processes. The size is the full one, as the
        forward used it: outside the forward an FSDP1 parameter (``use_orig_params=True``) is this
        rank's part of the flat shard, whose size differs between ranks."""
        return [(i, n, self._numels.get((i, n), p.numel()), p.requires_grad)
                for i, m in enumerate(self.modules) for n, p in m.named_parameters()]

    # ------------------------------------------------------------------ copies
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.update(_calls=[], _views=None, _captures=[], _acc=None, _hooks=[], _weights=None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.attach()
