"""Per-task Gram matrices: the inner products between the tasks' gradients, overflow-safe.

``Gram[a, b] = <g_a, g_b>`` over the shared layer's trainable parameters. Its diagonal holds
the squared norms, so GradNorm's norms ``n_a = sqrt(Gram[a, a])`` and the task-gradient cosines
``Gram[a, b] / (n_a n_b)`` come from one computation. Pieces over disjoint parameters add
their Grams; processes add theirs (exact DDP, :mod:`~gradnorm_lightning.capture.distributed`).

Every kernel here takes the per-task gradients in the form the capture keeps them (see
:mod:`~gradnorm_lightning.capture.stats`) and costs a ``T x T`` product where the norms cost
its diagonal: a dense ``(T, P)`` block ``X X^T``; a Linear's factored gradients
``dW_t = G_t^T H`` by the ghost identity ``<dW_a, dW_b> = <G_a^T H, G_b^T H> = sum (G_a G_b^T) o (H H^T)``
or by the product ``H^T G`` itself, whichever is cheaper. Each can also return the diagonal
only (the squared norms) where the cosines are not wanted.

A :class:`Gram` is kept *scaled*: ``matrix[a, b] = s_a s_b <g_a, g_b>``, each task's scale
``s_a`` chosen so that its gradient's largest entry is at most 1 in magnitude: then no product
and no sum of products can overflow in float32, and a task's own squared norm is at least 1, so
that nothing that matters falls into the subnormal range. Cosines need no unscaling (they do
not depend on the scales). Where reading a value on the host is free (the CPU), the plain
products run first and the scaled ones only where the plain diagonal shows they are needed.

Example::

    >>> g = dense_gram(torch.tensor([[3e30, 4e30], [-6e30, -8e30], [3e-30, 0.0]]))
    >>> g.norms()
    tensor([5.0000e+30, 1.0000e+31, 3.0000e-30])
    >>> g.cosines()
    tensor([[ 1.0000, -1.0000,  0.6000],
            [-1.0000,  1.0000, -0.6000],
            [ 0.6000, -0.6000,  1.0000]])
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
from torch import Tensor

from gradnorm_lightning import _arrays
from gradnorm_lightning.capture._scale import accurate_on_host, inverse_peak

__all__ = ["Gram", "cross_factored_gram", "dense_gram", "factored_gram"]


@dataclasses.dataclass
class Gram:
    """Per-task inner products, scaled: the true Gram is ``matrix[a, b] / (scale[a] scale[b])``.

    Attributes:
        matrix: ``(T, T)``, or ``(T,)`` when only the diagonal (the squared norms) was computed.
        scale: ``(T,)`` per-task scales, or ``None`` for 1.
    """

    matrix: Tensor
    scale: Tensor | None = None

    @property
    def diagonal_only(self) -> bool:
        """Whether only the diagonal was computed."""
        return self.matrix.dim() == 1

    def diagonal(self) -> Tensor:
        """The scaled squared norms ``(T,)``."""
        return self.matrix if self.diagonal_only else self.matrix.diagonal()

    def norms(self) -> Tensor:
        """The per-task norms ``sqrt(Gram[a, a])``."""
        norms = self.diagonal().clamp_min(0).sqrt()
        return norms if self.scale is None else norms / self.scale

    def cosines(self) -> Tensor:
        """``Gram[a, b] / (n_a n_b)``, clamped to ``[-1, 1]``; NaN where a task's gradient is zero
        (or was masked out as absent): a cosine is not defined there."""
        if self.diagonal_only:
            raise ValueError("This Gram holds the squared norms only (diagonal=True): no cosines.")
        d = self.diagonal().clamp_min(0).sqrt()
        return (self.matrix / d[:, None] / d[None, :]).clamp(-1.0, 1.0)

    def masked(self, present: Tensor | None) -> Gram:
        """Zero the rows and columns of the tasks outside ``present`` (which may hold NaN)."""
        if present is None:
            return self
        keep = present if self.diagonal_only else present[:, None] & present[None, :]
        scale = None if self.scale is None else torch.where(present, self.scale, 1.0)
        return Gram(torch.where(keep, self.matrix, 0.0), scale)

    def unscaled(self, dtype: torch.dtype = torch.float64) -> Tensor:
        """The true Gram in ``dtype`` (float64: every float32 product fits, unscaled)."""
        matrix = self.matrix.to(dtype)
        if self.scale is None:
            return matrix
        scale = self.scale.to(dtype)
        if self.diagonal_only:
            return matrix / scale / scale
        return matrix / scale[:, None] / scale[None, :]

    @staticmethod
    def total(grams: Sequence[Gram]) -> Gram:
        """The Gram of disjoint parameters together: the sum, on the smallest scale of each task
        (the rescaling factors are at most 1, so nothing overflows)."""
        if len(grams) == 1:
            return grams[0]
        if all(g.scale is None for g in grams):
            return Gram(torch.stack([g.matrix for g in grams]).sum(dim=0))
        ones = torch.ones_like(grams[0].diagonal())
        scales = [g.scale if g.scale is not None else ones for g in grams]
        low = torch.stack(scales).amin(dim=0)
        total = None
        for g, s in zip(grams, scales):
            factor = low / s
            term = g.matrix * (factor * factor if g.diagonal_only else factor[:, None] * factor[None, :])
            total = term if total is None else total + term
        assert total is not None
        return Gram(total, low)


def _self_products(x: Tensor, diagonal: bool) -> Tensor:
    """``x x^T`` (rows of ``x``), or its diagonal."""
    if diagonal:
        return torch.linalg.vecdot(x, x)
    return x @ x.T


def _plain_is_accurate(matrix: Tensor, count: int, present: Tensor | None) -> bool:
    diag = matrix if matrix.dim() == 1 else matrix.diagonal()
    return accurate_on_host(diag.clamp_min(0).sqrt(), count, present)


def _host_first(t: Tensor) -> bool:
    return t.dtype == torch.float64 or _arrays.host_reads_free(t.device)


def dense_gram(grads: Tensor, present: Tensor | None = None, diagonal: bool = False) -> Gram:
    """The Gram of dense per-task gradients ``(T, ...)``, rows outside ``present`` zeroed.

    Args:
        grads: ``(T, ...)`` per-task gradients (rows outside ``present`` may hold anything).
        present: ``(T,)`` bool, the tasks that count (``None``: all).
        diagonal: compute the squared norms only.
    """
    flat = grads.reshape(grads.shape[0], -1)
    if flat.shape[1] == 0:
        num_tasks = flat.shape[0]
        return Gram(flat.new_zeros(num_tasks) if diagonal else flat.new_zeros(num_tasks, num_tasks))
    if _host_first(flat):
        matrix = _self_products(flat, diagonal)
        if _plain_is_accurate(matrix, flat.shape[1], present):
            return Gram(matrix).masked(present)
    scale = inverse_peak(flat, (1,))
    return Gram(_self_products(flat * scale[:, None], diagonal), scale).masked(present)


def _augmented(rows: Tensor, bias: bool, value: Tensor | None) -> Tensor:
    """``[rows, value]``: the bias's column (``value``, 1 when ``None``) appended."""
    if not bias:
        return rows
    column = (rows.new_ones(()) if value is None else value).expand(rows.shape[0], 1)
    return torch.cat([rows, column], dim=1)


def _ghost_is_cheaper(n_own: int, n_all: int, d_in: int, d_out: int, num_tasks: int, diagonal: bool,
                      split: int = 1) -> bool:
    """Whether the ghost identity costs fewer multiply-adds than the direct product ``H^T G``
    (itself written and read back: weighed as 8 multiply-adds per element, memory traffic).

    ``n_own`` rows on this side against ``n_all`` on the other; ``split``: the direct product's
    output columns are shared among that many processes."""
    pairs = num_tasks if diagonal else num_tasks * num_tasks
    ghost = n_own * n_all * (d_in + num_tasks * d_out) + pairs * n_own * d_out
    direct = (num_tasks * d_in * d_out * (n_all + 8) + pairs * d_in * d_out) // split
    return ghost < direct


def _ghost(rows: Tensor, grads: Tensor, rows_all: Tensor, grads_all: Tensor, bias_sq: Tensor | None,
           diagonal: bool) -> Tensor:
    """``<G_a^T H, G_all_b^T H_all>`` by the ghost identity: ``(H H_all^T + bias)`` carried to
    each task's output gradients, one product per task pair (or per task: the diagonal)."""
    kernel = rows @ rows_all.T
    if bias_sq is not None:
        kernel = kernel + bias_sq
    carried = torch.matmul(kernel, grads_all)  # (T, N, d_out): row n of task b's, through the kernel
    num_tasks = grads.shape[0]
    if diagonal:
        return torch.linalg.vecdot(grads.reshape(num_tasks, -1), carried.reshape(num_tasks, -1))
    return grads.reshape(num_tasks, -1) @ carried.reshape(num_tasks, -1).T


def _direct(rows: Tensor, grads: Tensor, diagonal: bool) -> Tensor:
    """The Gram of ``dW_t = G_t^T H`` materialised, all tasks in one product ``H^T [G_1 .. G_T]``."""
    num_tasks, n, d_out = grads.shape
    # batch-major storage (N, T, d_out) makes the right operand a free reshape when the caller
    # stored it so; column t d_out + j of the product is row j of dW_t
    full = rows.T @ grads.transpose(0, 1).reshape(n, num_tasks * d_out)
    if diagonal:
        return full.square_().sum(dim=0).view(num_tasks, d_out).sum(dim=1)
    per_task = full.view(rows.shape[1], num_tasks, d_out).transpose(0, 1).reshape(num_tasks, -1)
    return per_task @ per_task.T


def _symmetric(matrix: Tensor) -> Tensor:
    return matrix if matrix.dim() == 1 else (matrix + matrix.T) * 0.5


def factored_gram(rows: Tensor, grads: Tensor, weight: bool, bias: bool, present: Tensor | None = None,
                  diagonal: bool = False) -> Gram:
    """The Gram of a Linear layer's factored gradients ``dW_t = G_t^T H`` (and ``db_t = sum_n G_t[n]``).

    Args:
        rows: ``(N, d_in)`` the layer's inputs ``H``.
        grads: ``(T, N, d_out)`` per-task output gradients ``G`` (rows of absent tasks may be NaN).
        weight: whether the weight is trained.
        bias: whether the bias is trained.
        present: the tasks that count (``None``: all).
        diagonal: the squared norms only.
    """
    if present is not None:
        grads = torch.where(present[:, None, None], grads, 0.0)
    if not weight:
        return dense_gram(grads.sum(dim=1), present, diagonal)
    num_tasks, n, d_out = grads.shape
    d_in = rows.shape[1] + int(bias)
    ghost = _ghost_is_cheaper(n, n, d_in, d_out, num_tasks, diagonal)

    def products(h: Tensor, g: Tensor, bias_value: Tensor | None) -> Tensor:
        if ghost:
            bias_sq = None if not bias else (h.new_ones(()) if bias_value is None else bias_value.square())
            return _symmetric(_ghost(h, g, h, g, bias_sq, diagonal))
        return _direct(_augmented(h, bias, bias_value), g, diagonal)

    if _host_first(grads):
        matrix = products(rows, grads, None)
        if _plain_is_accurate(matrix, d_in * d_out, present):
            return Gram(matrix).masked(present)
    # every task's gradients and the rows scaled to at most 1 (the rows' scale at most 1 too,
    # for the bias's column of ones)
    g_scale = inverse_peak(grads.transpose(0, 1), (0, 2))
    h_scale = inverse_peak(rows, floor=1.0)
    matrix = products(rows * h_scale, grads * g_scale[:, None, None], h_scale)
    return Gram(matrix, g_scale * h_scale).masked(present)


def cross_factored_gram(rows_all: Tensor, grads_all: Tensor, own: slice, weight: bool, bias: bool,
                        part: int, parts: int, diagonal: bool = False) -> Gram:
    """One process's share of the Gram of a Linear's factored gradients over the union batch.

    The processes' rows and output gradients were all gathered (``rows_all``, ``grads_all``:
    identical on every process); the shares of all ``parts`` processes add up to the Gram of
    ``sum_r dW_r``. By the ghost identity, share ``part`` is ``<dW_own, dW_all>`` (its own rows
    ``own`` against everyone's); by the direct product, it is the Gram over its slice of the
    weight's output rows (``dW_all[:, rows of part]``). The cheaper one is taken (the same on
    every process).

    Args:
        rows_all: ``(N_total, d_in)`` gathered inputs.
        grads_all: ``(T, N_total, d_out)`` gathered output gradients (absent tasks zeroed).
        own: this process's rows in the gathered ones.
        weight: whether the weight is trained.
        bias: whether the bias is trained.
        part: this process's index.
        parts: the number of processes.
        diagonal: the squared norms only.
    """
    num_tasks, n_all, d_out = grads_all.shape
    if not weight:  # (the bias alone: one process takes it all)
        sums = grads_all.sum(dim=1) if part == 0 else grads_all.new_zeros(num_tasks, d_out)
        return dense_gram(sums, None, diagonal)
    n_own = own.stop - own.start
    d_in = rows_all.shape[1] + int(bias)
    ghost = _ghost_is_cheaper(n_own, n_all, d_in, d_out, num_tasks, diagonal, split=parts)
    g_scale = inverse_peak(grads_all.transpose(0, 1), (0, 2))
    h_scale = inverse_peak(rows_all, floor=1.0)
    h = rows_all * h_scale
    g = grads_all * g_scale[:, None, None]
    if ghost:
        bias_sq = h_scale.square() if bias else None
        matrix = _ghost(h[own], g[:, own], h, g, bias_sq, diagonal)
    else:
        width = -(-d_out // parts)
        cols = slice(min(part * width, d_out), min((part + 1) * width, d_out))
        matrix = _direct(_augmented(h, bias, h_scale), g[:, :, cols], diagonal)
    return Gram(matrix, g_scale * h_scale)
