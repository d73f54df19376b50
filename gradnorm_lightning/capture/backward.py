"""The backward side of one step: hooks on the graph turn per-task gradients into statistics.

A :class:`StepCapture` is made by the recorder for every ``combine`` and lives until that
combined loss has been back-propagated. It follows a :class:`Plan` (the route the recorder
chose) and never looks at the balancer:

1. the combined loss's hook runs first in the backward: it records the losses with the
   backward's scale ``c`` and, on the ``autograd`` and ``losses`` routes, computes every
   task's gradient right there (extra passes, the graph intact);
2. on the ``heads`` route, hooks on the heads' private nodes read each task's gradient where
   it enters the shared part; on the ``views`` route, the views' node hands all of them over;
3. gradients waiting at an edge are *flushed* by the pre-hook of the node they enter (before
   that node runs, so the graph below it is intact): one batched vector-Jacobian product
   carries them to the *sink*, which is either the shared layer's output (then a norm rule
   turns them into parameter statistics) or its parameters directly (the generic rule);
4. the pre-hook of the layer's output node completes the step; every hook is then removed.

Every gradient handled here is ``c w_i dL_i/d.`` (the model's own backward carries ``w_i``);
the recorder divides the norms by ``w_i`` and the GradScaler's scale at the end.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd.graph import GradientEdge

from gradnorm_lightning._arrays import as_dtype
from gradnorm_lightning._compat import apply_node
from gradnorm_lightning.capture import norms
from gradnorm_lightning.capture.calls import LayerCall, ViewBase
from gradnorm_lightning.capture.routes import Plan, unreached_message
from gradnorm_lightning.capture.stats import Accumulator, Factored, safe_norms

__all__ = ["StepCapture"]


class _TaskGrads:
    """Per-task gradients at one edge: rows from the heads' hooks and/or whole ``(T, ...)`` blocks."""

    __slots__ = ("block", "owned", "rows")

    def __init__(self) -> None:
        self.rows: dict[int, Tensor] = {}
        self.block: Tensor | None = None
        self.owned = False  # whether the block is this step's own (may be overwritten)

    def add(self, task: int, g: Tensor) -> None:
        self.rows[task] = g if task not in self.rows else self.rows[task] + g

    def add_block(self, g: Tensor, owned: bool = False) -> None:
        if self.block is None:
            self.block, self.owned = g, owned
        else:
            self.block, self.owned = self.block + g, True

    def merge(self, other: _TaskGrads) -> None:
        for task, g in other.rows.items():
            self.add(task, g)
        if other.block is not None:
            self.add_block(other.block, other.owned)

    def task(self, task: int) -> Tensor | None:
        """One task's gradient (``None`` when it has none here)."""
        row = self.rows.get(task)
        if self.block is None:
            return row
        return self.block[task] if row is None else row + self.block[task]

    def task_numel(self) -> int:
        """Elements of one task's gradient."""
        if self.rows:
            return next(iter(self.rows.values())).numel()
        assert self.block is not None
        return self.block[0].numel()

    def stacked_is_owned(self) -> bool:
        """Whether :meth:`stacked` returns a tensor of this step's own (made here, or owned)."""
        return bool(self.rows) or self.owned

    def stacked(self, num_tasks: int, batch_major: bool = True) -> Tensor:
        """All of it as one ``(T, *shape)`` tensor (zeros for tasks without a row), stored
        batch-major ``(N, T, ...)`` (the Linear rule's product is then one GEMM) or task-major
        (each task's gradient contiguous, as a rule calling a backward once per task reads it)."""
        out = self.block
        if self.rows:
            ref = next(iter(self.rows.values()))
            zero = torch.zeros_like(ref) if len(self.rows) < num_tasks else ref
            rows = [self.rows.get(t, zero) for t in range(num_tasks)]
            if batch_major and ref.dim():
                stacked = torch.stack(rows, dim=1).transpose(0, 1)
            else:
                stacked = torch.stack(rows)
            out = stacked if out is None else out + stacked
        assert out is not None
        return out


class StepCapture:
    """Hooks and per-task gradients of one combined loss's backward (see the module doc).

    Args:
        plan: the route.
        layer: the shared layer (its norm rule needs it).
        losses: each task's loss, ``None`` for a task absent on the host.
        values: the losses as a ``(T,)`` tensor (NaN where missing).
        present: ``(T,)`` bool, the tasks taking part.
        weights: ``(T,)`` the weights of the combined loss.
        accumulator: returns the accumulator of the current optimizer step.
        names: the task names (for error messages).
    """

    def __init__(
        self,
        plan: Plan,
        layer: nn.Module,
        losses: Sequence[Tensor | None],
        values: Tensor,
        present: Tensor,
        weights: Tensor,
        accumulator: Callable[[], Accumulator],
        names: Sequence[str],
    ) -> None:
        self.plan = plan
        self.layer = layer
        self.losses: list[Tensor | None] = list(losses)
        self.values = values
        self.present = present
        self.weights = weights
        self.names = tuple(names)
        self.num_tasks = len(self.losses)
        self._accumulator = accumulator
        self.started = False
        self.finished = False
        self._handles: list[Any] = []
        self.keep_alive: list[Any] = []  # objects the graph's hooks reach only weakly
        self._pending: dict[GradientEdge, _TaskGrads] = {}
        self._buffers: dict[GradientEdge, _TaskGrads] = {}
        self._busy = False  # our own autograd calls run the graph's hooks too: ignore them
        # the layer's outputs, where an output sink gathers: edge -> (call, base of a rebased view)
        self._sink_edges: dict[GradientEdge, tuple[LayerCall, ViewBase | None]] = {
            e: (call, base) for call in plan.calls for e, base in call.sink_edges()
        } if plan.outputs_sink else {}
        self._stops_left: set[Any] = set()
        # how the per-task gradients reaching the sink are stacked (see _TaskGrads.stacked)
        self._batch_major = plan.rule is None or norms.reads_batch_major(plan.rule[1])
        self.scale: Tensor = values  # the backward's scale c (0-dim): set when the backward starts

    # ------------------------------------------------------------------ hooks
    def install(self, combined: Tensor) -> None:
        """Put the step's hooks on the graph (removed by :meth:`remove_hooks` or once they ran)."""
        self._handles.append(combined.register_hook(self._on_loss_grad))
        frontier = self.plan.frontier
        if self.plan.route != "heads" or frontier is None:
            return
        for node in frontier.taps:
            self._handles.append(node.register_hook(self._tap(node)))
        self._stops_left = set(frontier.stops)
        for node in frontier.entries | frontier.stops:
            self._handles.append(node.register_prehook(self._enter(node)))

    def remove_hooks(self) -> None:
        """Take every hook of this step off the graph (idempotent)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _finish(self) -> None:
        self.finished = True
        self.remove_hooks()
        # nothing of the graph is needed any more
        self.losses = []
        self.keep_alive.clear()
        self._pending.clear()
        self._buffers.clear()

    def _on_loss_grad(self, grad: Tensor) -> None:
        if self.started or self.finished:
            return
        self.started = True
        acc = self._accumulator()
        scale = grad.detach()
        self.scale = as_dtype(scale if scale.dim() == 0 else scale.reshape(()), acc.dtype)
        acc.add_losses(self.values, self.present, self.scale)
        acc.routes.append(self.plan.route)
        route = self.plan.route
        try:
            if route == "none":
                self._finish()
            elif route == "autograd":
                self._autograd()
                self._finish()
            elif route == "losses":
                self._from_losses()
                self._finish()
            elif route == "heads":
                assert self.plan.frontier is not None
                for task, edge in self.plan.frontier.roots:
                    loss = self.losses[task]
                    assert loss is not None
                    self._waiting(edge).add(task, self._task_scale(task, loss))
        except BaseException:
            self._finish()
            raise

    def _task_scale(self, task: int, like: Tensor) -> Tensor:
        """``c w_i`` shaped like ``like``: the gradient the model's backward sends into loss ``i``."""
        return (self.scale * self.weights[task].to(self.scale.dtype)).to(like.dtype).expand_as(like)

    def _tap(self, node: Any) -> Callable[[Any, Any], None]:
        assert self.plan.frontier is not None
        taps = self.plan.frontier.taps[node]

        def hook(grad_inputs: Any, grad_outputs: Any) -> None:
            if not self.started or self._busy or self.finished:
                return
            for k, task, target in taps:
                g = grad_inputs[k]
                if g is not None:
                    self._waiting(target).add(task, g)

        return hook

    def _enter(self, node: Any) -> Callable[[Any], None]:
        def prehook(grad_outputs: Any) -> None:
            if not self.started or self._busy or self.finished:
                return
            try:
                self._flush()
                if node in self._stops_left:
                    self._stops_left.discard(node)
                    if self.plan.outputs_sink:
                        self._finalize([e for e in self._sink_edges if e.node is node])
                    if not self._stops_left:
                        self._finish()
            except BaseException:
                self._finish()
                raise

        return prehook

    def views_layout(self, numel: int) -> str | None:
        """How the views' node hands over the per-task gradients (``numel`` elements each; see
        :data:`~gradnorm_lightning.capture.views.ViewsLayout`): one block in the layout the sink
        reads, directly or across an elementwise function; for a part of the graph to cross by
        VJPs, a block for one batched VJP (small) or the gradients alone for one VJP per task (large)."""
        if self.plan.views_edge in self._sink_edges or self.plan.elementwise is not None:
            return "batch" if self._batch_major else "task"
        return None if norms.per_task_vjps(numel, self.present.device) else "batch"

    def on_views(self, grads: tuple[Tensor | None, ...], stacked: Tensor | None = None) -> None:
        """The views' backward: every task's gradient at the aliased tensor (``stacked``: all of
        them as one ``(T, ...)`` block of this step's own, when every view was read)."""
        if not self.started or self._busy or self.finished:
            return
        try:
            rows = _TaskGrads()
            for task, (g, loss) in enumerate(zip(grads, self.losses)):
                if g is not None:
                    if stacked is None:
                        rows.add(task, g)
                elif loss is not None:
                    raise ValueError(
                        f"Task {self.names[task]!r} has a loss but did not read its view from `task_views`; "
                        "each head must read its own view (and only it)."
                    )
            if stacked is not None:
                rows.add_block(stacked, owned=True)
            if rows.rows or rows.block is not None:
                assert self.plan.views_edge is not None
                self._pending[self.plan.views_edge] = rows
                while self._pending:  # (across an elementwise node, then into the sink)
                    self._flush()
                if self.plan.outputs_sink:
                    self._finalize(list(self._sink_edges))
        finally:
            self._finish()

    # ------------------------------------------------------------------ moving gradients
    def _waiting(self, edge: GradientEdge) -> _TaskGrads:
        return self._pending.setdefault(edge, _TaskGrads())

    def _flush(self) -> None:
        """Carry every waiting gradient to the sink (the graph below them is intact)."""
        if not self._pending:
            return
        pending, self._pending = self._pending, {}
        moving: list[tuple[GradientEdge, _TaskGrads]] = []
        for edge, grads in pending.items():
            if edge in self._sink_edges:
                self._buffers.setdefault(edge, _TaskGrads()).merge(grads)
            else:
                moving.append((edge, grads))
        if not moving:
            return
        elementwise = self.plan.elementwise
        if elementwise is not None and len(moving) == 1 and moving[0][0].node is elementwise:
            # one elementwise function: its VJP is a product with f'(x), the same for all tasks;
            # the result waits at the layer's output edge for that node's pre-hook
            block = moving[0][1].stacked(self.num_tasks, self._batch_major)
            self._busy = True
            try:
                diag = apply_node(elementwise, torch.ones_like(block[0]))[0]
            finally:
                self._busy = False
            assert diag is not None
            nxt, nr = next((n, r) for n, r in elementwise.next_functions if n is not None)
            # (a block of this step's own is multiplied in place)
            product = block.mul_(diag) if pending[moving[0][0]].stacked_is_owned() else block * diag
            self._waiting(GradientEdge(nxt, nr)).add_block(product)
            return
        targets: list[GradientEdge] | list[nn.Parameter]
        targets = list(self._sink_edges) if self.plan.outputs_sink else list(self.plan.params)
        if norms.per_task_vjps(sum(grads.task_numel() for _, grads in moving), self.present.device):
            self._vjp_per_task(moving, targets)
            return
        out = self._vjp([e for e, _ in moving], [g.stacked(self.num_tasks) for _, g in moving], targets)
        if self.plan.outputs_sink:
            self._deliver(list(self._sink_edges), out)
        else:
            self._add_dense(out)

    def _vjp_per_task(self, moving: list[tuple[GradientEdge, _TaskGrads]], targets: Sequence[Any]) -> None:
        """Large gradients: one ``autograd.grad`` per task from the edges where that task has a
        gradient, its results kept as rows (no ``(T, ...)`` block is stacked for the VJPs, only
        once at the sink; a task crosses only the part of the graph its own gradients enter)."""
        dense = None if self.plan.outputs_sink else self._dense_buffer()
        for task in range(self.num_tasks):
            pairs = [(edge, g) for edge, grads in moving if (g := grads.task(task)) is not None]
            if not pairs:
                continue
            self._busy = True
            try:
                out = torch.autograd.grad(
                    [e for e, _ in pairs], targets, [g for _, g in pairs], retain_graph=True, allow_unused=True
                )
            finally:
                self._busy = False
            if dense is not None:
                self._write(dense, task, out)
                continue
            for edge, g in zip(targets, out):
                if g is not None:
                    self._buffers.setdefault(edge, _TaskGrads()).add(task, g)
        if dense is not None:
            self._commit_dense(dense)

    def _vjp(self, outputs: list[GradientEdge], grads: list[Tensor], inputs: Sequence[Any]) -> list[Tensor | None]:
        self._busy = True
        try:
            return norms.batched_vjp(outputs, grads, inputs)
        finally:
            self._busy = False

    def _deliver(self, edges: Sequence[GradientEdge], grads: Sequence[Tensor | None]) -> None:
        """Per-task gradients ``(T, ...)`` at sink edges, into their buffers."""
        for edge, g in zip(edges, grads):
            if g is not None:
                self._buffers.setdefault(edge, _TaskGrads()).add_block(g)

    def _add_dense(self, grads: Sequence[Tensor | None]) -> None:
        """Per-task parameter gradients from a VJP, as one masked ``(T, P)`` block."""
        dense = self._dense_buffer()
        self._write(dense, slice(None), grads)
        self._commit_dense(dense)

    def _commit_dense(self, dense: Tensor) -> None:
        """Add a written ``(T, P)`` block to the accumulator, absent tasks' rows zeroed."""
        self._accumulator().add(dense.masked_fill_(~self.present[:, None], 0.0))

    def _write(self, dense: Tensor, rows: int | slice, grads: Sequence[Tensor | None]) -> None:
        """Copy per-parameter gradients into ``dense[rows]``, parameter after parameter (``None``: zeros)."""
        offset = 0
        for g, p in zip(grads, self.plan.params):
            n = p.numel()
            if g is not None:
                block = dense[rows, offset : offset + n]
                block.copy_(g.reshape(block.shape))
            offset += n

    def _dense_buffer(self) -> Tensor:
        """A zeroed ``(T, P)`` block for per-task parameter gradients, in the statistics' dtype."""
        size = sum(p.numel() for p in self.plan.params)
        return torch.zeros(self.num_tasks, size, dtype=self._accumulator().dtype,
                           device=self.present.device)

    def _finalize(self, edges: Sequence[GradientEdge]) -> None:
        """Turn the complete per-task gradients at these output edges into statistics."""
        acc = self._accumulator()
        dtype = acc.dtype
        for edge in edges:
            buffer = self._buffers.pop(edge, None)
            if buffer is None:
                continue
            call, base = self._sink_edges[edge]
            stacked = buffer.stacked(self.num_tasks, self._batch_major)
            grads = base.cut(stacked) if base is not None else stacked  # a rebased view: its part of the base's
            if self.plan.representation:
                acc.add_rep_norms(torch.where(self.present, safe_norms(grads.to(dtype), self.present), 0.0))
                continue
            result = None
            if self.plan.rule is not None and call.inputs_unchanged():
                result = self.plan.rule[1](self.layer, call, grads, dtype)
            if isinstance(result, Factored):
                result.present = self.present  # masked lazily: one (T,) where for a one-pass step
                acc.add(result)
            elif result is not None:
                acc.add(torch.where(self.present[:, None], result, 0.0))
            else:
                self._add_dense(self._vjp([edge], [stacked], self.plan.params))

    # ------------------------------------------------------------------ extra-pass routes
    def _autograd(self) -> None:
        """One ``autograd.grad`` per task over the parameters: the exact reference route."""
        params = self.plan.params
        dense = self._dense_buffer()
        for task, loss in enumerate(self.losses):
            if loss is None:
                continue
            grads = torch.autograd.grad(
                loss, params, grad_outputs=self._task_scale(task, loss), retain_graph=True, allow_unused=True
            )
            if all(g is None for g in grads):
                raise ValueError(unreached_message(self.names[task], self.layer))
            self._write(dense, task, grads)
        self._commit_dense(dense)

    def _from_losses(self) -> None:
        """Every task's gradient from its loss, all tasks in one batched backward (an extra pass)."""
        tasks = [t for t, loss in enumerate(self.losses) if loss is not None]
        edges = []
        grads = []
        for t in tasks:
            loss = self.losses[t]
            assert loss is not None
            onehot = torch.zeros(self.num_tasks, dtype=loss.dtype, device=loss.device)
            onehot[t] = 1.0
            edges.append(torch.autograd.graph.get_gradient_edge(loss))
            grads.append(onehot.reshape(-1, *([1] * loss.dim())) * self._task_scale(t, loss))
        targets: list[Any] = list(self._sink_edges) if self.plan.outputs_sink else list(self.plan.params)
        out = self._vjp(edges, grads, targets)
        if self.plan.outputs_sink:
            self._deliver(list(self._sink_edges), out)
            self._finalize(list(self._sink_edges))
        else:
            self._add_dense(out)
