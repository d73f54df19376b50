"""The backward side of one step: hooks on the graph turn per-task gradients into statistics.

A :class:`StepCapture` is made by the recorder for every ``combine`` and lives until that
combined loss has been back-propagated. It follows a :class:`Plan` (the route the recorder
chose) and never looks at the balancer:

1. the combined loss's hook runs first in the backward: it records the losses with the
   backward's scale ``c`` and, on the ``autograd`` and ``losses`` routes, computes every
   task's gradient right there (extra passes, the graph intact);
2. on the ``heads`` route, hooks on the heads' private nodes read each task's gradient where
   it leaves the task's private region; on the ``views`` route, the views' node hands all of
   them over;
3. gradients waiting at an edge are *flushed* by the pre-hook of the node they enter (before
   that node runs, so the graph below it is intact): vector-Jacobian products carry them to
   the *sink*, which is either the shared modules' outputs (then each module's norm rule turns
   them into parameter statistics) or the parameters directly (the generic rule; a tied use of a
   parameter delivers straight there);
4. the pre-hook of the last stop completes the step; every hook is then removed.

**Nothing lost.** A task that is absent from a backward pass while its loss has a graph (a
masked mean over an empty mask: NaN, whose backward writes ``0 * inf`` everywhere below it) is
*cut off*: the same hooks on its private nodes return zeros in place of everything that leaves
its private region (the :class:`~gradnorm_lightning.capture.heads.Frontier`'s taps and cuts),
so its head's own parameters get zero gradients and nothing of it reaches what other tasks
share, in this pass or in the accumulated gradients of earlier ones. Where the host reads values
for free (the CPU) only the tasks known to be absent are cut, by returning zeros; on a device
every task's edges go through ``torch.where(present_i, g, 0)``, decided there without a host
synchronisation. A private node whose backward writes parameters' gradients itself (a head under
``checkpoint(..., use_reentrant=True)``, whose backward runs a nested one through the recomputed
head) is also handed zeros before it runs. A route without a walk (``autograd``, ``losses``) or a
task whose loss node is shared cannot be cut: such tasks are reported (:attr:`Accumulator.uncut`).

Every gradient handled here is ``c w_i dL_i/d.`` (the model's own backward carries ``w_i``);
the recorder divides the norms by ``w_i`` and the GradScaler's scale at the end.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd.graph import GradientEdge, get_gradient_edge

from gradnorm_lightning._arrays import as_dtype
from gradnorm_lightning._compat import accumulate_grad_type, apply_node
from gradnorm_lightning.capture import norms
from gradnorm_lightning.capture.calls import ViewBase
from gradnorm_lightning.capture.routes import Plan, unreached_message
from gradnorm_lightning.capture.stats import Accumulator, Factored, RowSparse

__all__ = ["StepCapture"]

#: Backward nodes that write into parameters' gradients themselves, beyond their outputs: a
#: reentrant checkpoint (``use_reentrant=True``) recomputes its region and runs a nested backward
#: through it. A cut task's gradient is zeroed before such a node runs, not only after.
_OPAQUE_NODES = frozenset({"CheckpointFunctionBackward"})


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
        modules: the shared modules (their norm rules need them).
        losses: each task's loss, ``None`` for a task absent on the host.
        values: the losses as a ``(T,)`` tensor (NaN where missing).
        present: ``(T,)`` bool, the tasks taking part.
        weights: ``(T,)`` the weights of the combined loss.
        accumulator: returns the accumulator of the current optimizer step.
        names: the task names (for error messages).
        layer: the shared layer as given (for error messages).
        cut: the tasks to cut off: task -> ``None`` (known absent on the host: zeros) or a
            0-dim bool tensor (``present_i`` on the device: ``where``).
        host_absent: the absent tasks as read on the host (where that is free), else ``None``.
        calls_params: ``id -> (module index, name)`` of the parameters of this forward's calls.
    """

    def __init__(
        self,
        plan: Plan,
        modules: Sequence[nn.Module],
        losses: Sequence[Tensor | None],
        values: Tensor,
        present: Tensor,
        weights: Tensor,
        accumulator: Callable[[], Accumulator],
        names: Sequence[str],
        layer: Any = None,
        cut: dict[int, Tensor | None] | None = None,
        host_absent: list[bool] | None = None,
        calls_params: dict[int, tuple[int, str]] | None = None,
    ) -> None:
        self.plan = plan
        self.calls_params = calls_params or {}
        self.modules = tuple(modules)
        self.layer = layer if layer is not None else self.modules[0]
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
        # the modules' outputs, where an output sink gathers: edge -> (call index, base of a rebased view)
        self._sink_edges: dict[GradientEdge, tuple[int, ViewBase | None]] = {
            e: (k, base) for k, call in enumerate(plan.calls) for e, base in call.sink_edges()
        } if plan.outputs_sink else {}
        # the parameters' own edges (a tied use delivers there): edge -> index in plan.params
        leaf = accumulate_grad_type()
        self._leaf_edges: dict[Any, int] = {
            get_gradient_edge(p).node: i for i, p in enumerate(plan.params)
        } if plan.frontier is not None and any(type(s) is leaf for s in plan.frontier.stops) else {}
        self._stops_left: set[Any] = set()
        # how the per-task gradients reaching the sink are stacked (see _TaskGrads.stacked)
        rules = [rule for _, rule in plan.rules.values()]
        self._batch_major = not rules or all(norms.reads_batch_major(r) for r in rules)
        self.scale: Tensor = values  # the backward's scale c (0-dim): set when the backward starts
        # the dense (T, P) layout of the generic rule: the parameters whose gradients are dense
        self._dense_index: list[tuple[int, int]] = []  # (index in plan.params, offset) of dense params
        size = 0
        for i, p in enumerate(plan.params):
            if id(p) not in plan.sparse:
                self._dense_index.append((i, size))
                size += p.numel()
        self._dense_size = size
        self._cut = cut or {}
        self._host_absent = host_absent
        self._keep_cuts = False  # cut hooks that must outlive the statistics (extra-pass routes)
        self.combined_node: Any = None  # the combined loss's node (set by install)

    # ------------------------------------------------------------------ hooks
    def install(self, combined: Tensor) -> None:
        """Put the step's hooks on the graph (removed by :meth:`remove_hooks` or once they ran)."""
        self.combined_node = combined.grad_fn
        self._handles.append(combined.register_hook(self._on_loss_grad))
        frontier = self.plan.frontier
        if frontier is None:
            return
        taps = frontier.taps if self.plan.route == "heads" else {}
        edges: dict[Any, list[tuple[int, Tensor | None]]] = {}  # private node -> edges to cut
        for task, how in self._cut.items():
            if not self.plan.can_cut(task):
                continue
            for node in frontier.private_nodes(task):
                ks = [k for k, t, _ in frontier.taps.get(node, ()) if t == task]
                ks += [k for k, t in frontier.cuts.get(node, ()) if t == task]
                edges.setdefault(node, []).extend((k, how) for k in ks)
        for node in set(taps) | set(edges):
            self._handles.append(node.register_hook(self._tap(node, taps.get(node, []), edges.get(node, []))))
        for node, cut in edges.items():  # (an opaque node: silenced before it runs, see _silence)
            if node.name() in _OPAQUE_NODES:
                self._handles.append(node.register_prehook(self._silence(cut[0][1])))
        # the extra-pass routes finish their statistics when the backward starts: their cut
        # hooks stay until the recorder collects the step
        self._keep_cuts = bool(edges) and self.plan.route in ("losses", "none")
        if self.plan.route != "heads":
            return
        self._stops_left = set(frontier.stops)
        for node in frontier.entries | frontier.stops:
            self._handles.append(node.register_prehook(self._enter(node)))

    @property
    def has_hooks(self) -> bool:
        """Whether hooks of this step are still on the graph."""
        return bool(self._handles)

    def remove_hooks(self) -> None:
        """Take every hook of this step off the graph (idempotent)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _finish(self) -> None:
        self.finished = True
        if not self._keep_cuts:
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
        acc.param_keys.update(self._param_keys())
        self._count_absent(acc)
        route = self.plan.route
        try:
            if route == "none":  # (no statistics; cut hooks, if any, stay until the recorder collects)
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

    def _param_keys(self) -> dict[int, tuple[int, str]]:
        """``id -> (module index, name)`` of the parameters this step's statistics may cover: the
        calls' (under FSDP2 the gathered parameters the forward used, not the shards), else the modules'."""
        if self.calls_params:
            return self.calls_params
        return {id(p): (i, n) for i, m in enumerate(self.modules) for n, p in m.named_parameters()}

    def _count_absent(self, acc: Accumulator) -> None:
        """Count this pass's absent tasks, and those whose absent backward cannot be cut off."""
        cannot = [loss is not None and not self.plan.can_cut(t) for t, loss in enumerate(self.losses)]
        device = self.present.device
        if self._host_absent is not None:  # known on the host: nothing to do when every task is present
            if any(self._host_absent):
                acc.add_absent(torch.tensor(self._host_absent, device=device))
                uncut = [a and c for a, c in zip(self._host_absent, cannot)]
                if any(uncut):
                    acc.add_uncut(torch.tensor(uncut, device=device))
            return
        acc.add_absent(~self.present)
        if any(cannot):
            acc.add_uncut(~self.present & torch.tensor(cannot, device=device))

    def _task_scale(self, task: int, like: Tensor) -> Tensor:
        """``c w_i`` shaped like ``like``: the gradient the model's backward sends into loss ``i``."""
        return (self.scale * self.weights[task].to(self.scale.dtype)).to(like.dtype).expand_as(like)

    def _tap(self, node: Any, taps: list[tuple[int, int, GradientEdge]],
             cuts: list[tuple[int, Tensor | None]]) -> Callable[[Any, Any], Any]:
        def hook(grad_inputs: Any, grad_outputs: Any) -> Any:
            if self.started and not (self._busy or self.finished):
                for k, task, target in taps:
                    g = grad_inputs[k]
                    if g is not None:
                        self._waiting(target).add(task, g)
            if not cuts:
                return None
            out = list(grad_inputs)
            for k, present in cuts:
                g = out[k]
                if g is not None:
                    out[k] = torch.zeros_like(g) if present is None else torch.where(present, g, 0.0)
            return tuple(out)

        return hook

    @staticmethod
    def _silence(present: Tensor | None) -> Callable[[Any], Any]:
        """A pre-hook giving an opaque private node of a cut task zeros instead of its incoming
        gradients (``where(present, g, 0)`` on a device). Such a node's backward writes into
        parameters' gradients itself (a reentrant checkpoint runs a nested backward through the
        recomputed head), where zeroing its outputs afterwards comes too late."""

        def prehook(grad_outputs: Any) -> Any:
            return tuple(
                g if g is None else (torch.zeros_like(g) if present is None else torch.where(present, g, 0.0))
                for g in grad_outputs
            )

        return prehook

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
            elif edge.node in self._leaf_edges:  # a tied use: a parameter's own gradient
                self._add_param_rows(self._leaf_edges[edge.node], grads)
            else:
                moving.append((edge, grads))
        if not moving:
            return
        elementwise = self.plan.elementwise
        if elementwise is not None and len(moving) == 1 and moving[0][0].node is elementwise:
            self._cross_elementwise(elementwise, moving[0][1])
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
            self._add_param_grads(slice(None), out)

    def _cross_elementwise(self, elementwise: Any, grads: _TaskGrads) -> None:
        """One elementwise function: its VJP is a product with ``f'(x)``, the same for all tasks;
        the result waits at the module's output edge for that node's pre-hook."""
        block = grads.stacked(self.num_tasks, self._batch_major)
        nxt, nr = next((n, r) for n, r in elementwise.next_functions if n is not None)
        ones = torch.ones_like(block[0])
        self._busy = True
        try:
            diag: Tensor | None
            if self.plan.engine_vjp:  # (saved tensors under checkpointing: through the engine, once)
                diag = torch.autograd.grad([GradientEdge(elementwise, 0)], [GradientEdge(nxt, nr)], [ones],
                                           retain_graph=True)[0]
            else:
                diag = apply_node(elementwise, ones)[0]
        finally:
            self._busy = False
        assert diag is not None
        # (a block of this step's own is multiplied in place)
        product = block.mul_(diag) if grads.stacked_is_owned() else block * diag
        self._waiting(GradientEdge(nxt, nr)).add_block(product)

    def _vjp_per_task(self, moving: list[tuple[GradientEdge, _TaskGrads]], targets: Sequence[Any]) -> None:
        """Large gradients: one ``autograd.grad`` per task from the edges where that task has a
        gradient, its results kept as rows (no ``(T, ...)`` block is stacked for the VJPs, only
        once at the sink; a task crosses only the part of the graph its own gradients enter)."""
        writer = None if self.plan.outputs_sink else self._param_writer()
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
            if writer is not None:
                writer.write(task, out)
                continue
            for edge, g in zip(targets, out):
                if g is not None:
                    self._buffers.setdefault(edge, _TaskGrads()).add(task, g)
        if writer is not None:
            writer.commit()

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

    # ------------------------------------------------------------------ parameter gradients (generic rule)
    def _param_writer(self) -> _ParamWriter:
        return _ParamWriter(self)

    def _add_param_grads(self, rows: int | slice, grads: Sequence[Tensor | None]) -> None:
        """Per-task gradients of every parameter in ``plan.params`` (``(T, ...)`` each, or one
        task's when ``rows`` is an index), into the accumulator."""
        writer = self._param_writer()
        writer.write(rows, grads)
        writer.commit()

    def _add_param_rows(self, index: int, grads: _TaskGrads) -> None:
        """Per-task gradients of one parameter (a tied use), into the accumulator."""
        block = grads.stacked(self.num_tasks, batch_major=False)
        out: list[Tensor | None] = [None] * len(self.plan.params)
        out[index] = block
        self._add_param_grads(slice(None), out)

    def dense_size(self) -> int:
        """Elements of the dense ``(T, P)`` layout (the parameters with dense gradients)."""
        return self._dense_size

    # ------------------------------------------------------------------ the sink
    def _finalize(self, edges: Sequence[GradientEdge]) -> None:
        """Turn the complete per-task gradients at these output edges into statistics."""
        acc = self._accumulator()
        dtype = acc.dtype
        for edge in edges:
            buffer = self._buffers.pop(edge, None)
            if buffer is None:
                continue
            index, base = self._sink_edges[edge]
            call = self.plan.calls[index]
            stacked = buffer.stacked(self.num_tasks, self._batch_major)
            grads = base.cut(stacked) if base is not None else stacked  # a rebased view: its part of the base's
            if self.plan.representation:
                acc.add_rep(grads, self.present)
                continue
            result = None
            rule = self.plan.rules.get(index)
            if rule is not None and call.inputs_unchanged():
                result = rule[1](self.modules[call.module], call, grads, dtype)
            params = tuple(id(p) for _, p in call.params)
            key = ("module", call.module)
            if isinstance(result, Factored):
                result.present = self.present  # masked lazily: one (T,) where for a one-pass step
                acc.add(result, params, key)
            elif isinstance(result, RowSparse):
                acc.add(RowSparse(result.rows, torch.where(self.present[:, None, None], result.values, 0.0),
                                  result.num_rows), params, key)
            elif result is not None:
                acc.add(torch.where(self.present[:, None], result, 0.0), params, key)
            else:
                self._add_param_grads(slice(None), self._vjp([edge], [stacked], self.plan.params))

    # ------------------------------------------------------------------ extra-pass routes
    def _autograd(self) -> None:
        """One ``autograd.grad`` per task over the parameters: the exact reference route."""
        params = self.plan.params
        writer = self._param_writer()
        for task, loss in enumerate(self.losses):
            if loss is None:
                continue
            grads = torch.autograd.grad(
                loss, params, grad_outputs=self._task_scale(task, loss), retain_graph=True, allow_unused=True
            )
            if all(g is None for g in grads):
                raise ValueError(_unreached_in_autograd(self.names[task], self.layer, loss))
            writer.write(task, grads)
        writer.commit()

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
            edges.append(get_gradient_edge(loss))
            grads.append(onehot.reshape(-1, *([1] * loss.dim())) * self._task_scale(t, loss))
        targets: list[Any] = list(self._sink_edges) if self.plan.outputs_sink else list(self.plan.params)
        out = self._vjp(edges, grads, targets)
        if self.plan.outputs_sink:
            self._deliver(list(self._sink_edges), out)
            self._finalize(list(self._sink_edges))
        else:
            self._add_param_grads(slice(None), out)


class _ParamWriter:
    """Per-task gradients of the shared parameters in the generic layout: one dense ``(T, P)``
    block over the parameters with dense gradients, and a :class:`RowSparse` piece for each
    parameter with sparse gradients (``sparse=True`` embeddings: only the touched rows)."""

    def __init__(self, capture: StepCapture) -> None:
        self.capture = capture
        self.dense: Tensor | None = None
        self.sparse: dict[int, list[tuple[int, Tensor]]] = {}  # param index -> [(task, sparse grad)]

    def _buffer(self) -> Tensor:
        if self.dense is None:
            cap = self.capture
            self.dense = torch.zeros(cap.num_tasks, cap.dense_size(), dtype=cap._accumulator().dtype,
                                     device=cap.present.device)
        return self.dense

    def write(self, rows: int | slice, grads: Sequence[Tensor | None]) -> None:
        """Copy per-parameter gradients into the rows ``rows`` (``None``: zeros)."""
        cap = self.capture
        dense_at = dict(cap._dense_index)
        for i, g in enumerate(grads):
            if g is None:
                continue
            if g.is_sparse or i not in dense_at:
                if isinstance(rows, int):
                    self.sparse.setdefault(i, []).append((rows, g))
                else:
                    for t in range(cap.num_tasks):
                        self.sparse.setdefault(i, []).append((t, g[t]))
                continue
            offset = dense_at[i]
            n = cap.plan.params[i].numel()
            block = self._buffer()[rows, offset : offset + n]
            block.copy_(g.reshape(block.shape))

    def commit(self) -> None:
        """Add what was written to the accumulator, absent tasks' rows zeroed."""
        cap = self.capture
        acc = cap._accumulator()
        if self.dense is not None:
            params = tuple(id(cap.plan.params[i]) for i, _ in cap._dense_index)
            acc.add(self.dense.masked_fill_(~cap.present[:, None], 0.0), params, "params")
        for i, parts in self.sparse.items():
            p = cap.plan.params[i]
            acc.add(_row_sparse(parts, cap.num_tasks, p, acc.dtype, cap.present), (id(p),), ("sparse", id(p)))


def _row_sparse(parts: list[tuple[int, Tensor]], num_tasks: int, param: Tensor, dtype: torch.dtype,
                present: Tensor) -> RowSparse:
    """Per-task gradients of an embedding table as one :class:`RowSparse` (each task's rows in its own block)."""
    rows: list[tuple[int, Tensor, Tensor]] = []
    for task, g in parts:
        if g.is_sparse:
            idx, vals = g._indices()[0], g._values()
        else:  # a dense gradient of a sparse-layout parameter: every row
            idx = torch.arange(g.shape[0], device=g.device)
            vals = g
        vals = vals.reshape(idx.numel(), -1)
        rows.append((task, idx, vals))
    width = rows[0][2].shape[1]
    total = sum(idx.numel() for _, idx, _ in rows)
    values = torch.zeros(num_tasks, total, width, dtype=dtype, device=param.device)
    start = 0
    for task, idx, vals in rows:
        values[task, start : start + idx.numel()] = vals.to(dtype)
        start += idx.numel()
    values = torch.where(present[:, None, None], values, 0.0)
    return RowSparse(torch.cat([idx for _, idx, _ in rows]), values, int(param.shape[0]))


def _unreached_in_autograd(name: str, layer: Any, loss: Tensor) -> str:
    """The error of a task whose loss reaches none of the shared parameters (naming checkpointing when seen)."""
    message = unreached_message(name, layer)
    seen = {loss.grad_fn}
    stack = [loss.grad_fn]
    while stack and len(seen) < 20_000:
        node = stack.pop()
        if node is None:
            continue
        if node.name() == "CheckpointFunctionBackward":
            return message + (
                " Its graph goes through `torch.utils.checkpoint.checkpoint(..., use_reentrant=True)`, which runs "
                "the forward under no_grad: use `use_reentrant=False`, or keep the shared layer outside the "
                "checkpointed region."
            )
        for nxt, _ in node.next_functions:
            if nxt is not None and nxt not in seen:
                seen.add(nxt)
                stack.append(nxt)
    return message
