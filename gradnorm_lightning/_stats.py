"""Per-task gradient statistics at the last shared layer, gathered during the model's backward.

The GradNorm update needs ``n_i = ||grad_W L_i||`` for every task ``i``. This module gets
them without ``create_graph`` and without backward passes through the trunk:

* the gradient of each task loss with respect to the shared layer's *output* ``z`` comes
  either from one ``autograd.grad`` per task through its own head (default), or, when the
  heads read per-task aliases of the representation (``task_views``), from the model's own
  backward at no extra cost;
* from ``g_i = dL_i/dz`` and the layer's input ``h``, an ``nn.Linear`` gives the norms
  through ``||g_i^T h||_F^2 = <g_i g_i^T, h h^T>`` (the "ghost norm"), or through one
  batched matrix product when that is cheaper; other layers use one batched
  vector-Jacobian product through that layer alone.

Everything is accumulated over the backward passes of one optimizer step (gradient
accumulation) as the model's optimizer sees it: each backward contributes with the scale
``c`` that the backward applied to the combined loss (``1/k`` under accumulation, times the
GradScaler's scale under fp16 AMP).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn


@dataclass
class _Capture:
    """The shared layer's input and output from one forward call with grad enabled."""

    inputs: tuple[Tensor, ...]
    output: Tensor


def _flatten_rows(t: Tensor) -> Tensor:
    return t.reshape(-1, t.shape[-1])


def _linear_rows(layer: nn.Linear, h: Tensor, dtype: torch.dtype) -> Tensor:
    """The layer's input as rows, with a column of ones when the layer has a bias."""
    rows = _flatten_rows(h.detach()).to(dtype)
    if layer.bias is not None:
        rows = torch.cat([rows, rows.new_ones(rows.shape[0], 1)], dim=1)
    return rows


def _linear_sq_norms(rows: Tensor, grads: Tensor) -> Tensor:
    """``||g_i^T H||_F^2`` for every task, by the cheaper of two exact formulas.

    Args:
        rows: ``(N, d_in)`` layer inputs (with a ones column for the bias).
        grads: ``(T, N, d_out)`` per-task gradients at the layer output.
    """
    num_tasks, n, d_out = grads.shape
    d_in = rows.shape[1]
    # ghost: N^2 d_in + T N^2 d_out multiply-adds; direct: T N d_in d_out.
    if n * (d_in + num_tasks * d_out) < num_tasks * d_in * d_out:
        gram_h = rows @ rows.T
        gram_g = torch.bmm(grads, grads.transpose(1, 2))
        return (gram_g * gram_h).sum(dim=(1, 2))
    full = torch.matmul(grads.transpose(1, 2), rows)
    return torch.linalg.vector_norm(full, dim=(1, 2)).square()


def _linear_param_grads(rows: Tensor, grads: Tensor) -> Tensor:
    """Per-task gradients of the Linear layer's parameters, ``(T, d_out * d_in)``."""
    return torch.matmul(grads.transpose(1, 2), rows).flatten(1)


def _vjp_param_grads(output: Tensor, params: Sequence[Tensor], grads: Tensor) -> Tensor:
    """Per-task parameter gradients through the shared layer alone, ``(T, P)``.

    One batched vector-Jacobian product; a loop over tasks where vmap cannot batch the
    layer's backward.
    """
    try:
        outs = torch.autograd.grad(
            output, params, grad_outputs=grads.to(output.dtype), retain_graph=True,
            is_grads_batched=True, allow_unused=True,
        )
        per_param = [
            torch.zeros(grads.shape[0], p.numel(), dtype=grads.dtype, device=grads.device)
            if g is None else g.reshape(grads.shape[0], -1).to(grads.dtype)
            for g, p in zip(outs, params)
        ]
    except RuntimeError:
        rows = []
        for g_task in grads:
            outs = torch.autograd.grad(
                output, params, grad_outputs=g_task.to(output.dtype), retain_graph=True,
                allow_unused=True,
            )
            rows.append(torch.cat([
                torch.zeros(p.numel(), dtype=grads.dtype, device=grads.device)
                if g is None else g.reshape(-1).to(grads.dtype)
                for g, p in zip(outs, params)
            ]))
        return torch.stack(rows)
    return torch.cat(per_param, dim=1)


@dataclass
class _Pending:
    """Statistics accumulated over the backward passes of one optimizer step.

    Exactly one of ``linear`` (row blocks), ``param_grads`` or ``rep_sq_norms`` is used,
    depending on the path; ``loss_sum``/``loss_weight`` give the accumulated loss of each task
    (the mean over the micro-batches in which it was present, weighted by their scale).
    """

    loss_sum: Tensor
    loss_weight: Tensor
    present: Tensor
    linear: list[tuple[Tensor, Tensor]] = field(default_factory=list)
    param_grads: Tensor | None = None
    rep_sq_norms: Tensor | None = None

    def add_param_grads(self, grads: Tensor) -> None:
        self.param_grads = grads if self.param_grads is None else self.param_grads + grads

    def add_rep_sq_norms(self, sq: Tensor) -> None:
        self.rep_sq_norms = sq if self.rep_sq_norms is None else self.rep_sq_norms + sq

    def _linear_blocks(self) -> tuple[Tensor, Tensor]:
        """All backward passes' layer inputs and output gradients, stacked along the rows."""
        if len(self.linear) == 1:
            return self.linear[0]
        return torch.cat([r for r, _ in self.linear], dim=0), torch.cat([g for _, g in self.linear], dim=1)

    def local_sq_norms(self) -> Tensor:
        """Squared norms of the accumulated per-task W-gradients (this process only)."""
        if self.linear:
            return _linear_sq_norms(*self._linear_blocks())
        if self.param_grads is not None:
            return self.param_grads.pow(2).sum(dim=1)
        if self.rep_sq_norms is None:  # norms not measured (a baseline that does not need them)
            return torch.full_like(self.loss_sum, float("nan"))
        return self.rep_sq_norms

    def local_param_grads(self) -> Tensor | None:
        """The accumulated per-task gradients ``(T, P)``, or None in representation mode."""
        if self.linear:
            return _linear_param_grads(*self._linear_blocks())
        return self.param_grads
