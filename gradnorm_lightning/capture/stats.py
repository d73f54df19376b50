"""Per-task statistics of one optimizer step, accumulated over its backward passes.

Under gradient accumulation an optimizer step sees the sum of several backward passes, each
scaled by ``c`` (``1/k``, times the GradScaler's scale under fp16 AMP). GradNorm's norms are
those of that accumulated gradient, so the per-task gradients of every pass are summed before
any norm is taken. They come in one of two forms:

* :class:`Factored`: a Linear layer's per-task gradients as ``dW_t = G_t^T H`` (rows of
  inputs ``H``, per-task output gradients ``G_t``), never materialised: the norms come from
  ``<G_t G_t^T, H H^T>`` (the "ghost norm") or one batched product, whichever is cheaper;
* a dense ``(T, P)`` tensor of per-task gradients over some trainable parameters, in order;
* :class:`RowSparse`: an embedding table's per-task gradients as the rows the batch touched
  (row indices with duplicates, and one ``(T, N, D)`` block of row gradients), never
  materialised as the ``(V, D)`` table: the norm is taken over the touched rows.

Each piece covers its own parameters (one shared module's, or every shared parameter for the
generic rule); pieces of disjoint parameters combine by the square root of the sum of their
squared norms, pieces of the same parameters from several backward passes are summed first.
With ``task_cosines`` each piece gives its ``T x T`` Gram instead
(:mod:`~gradnorm_lightning.capture.gram`): Grams of disjoint pieces add, and the norms are the
square roots of the total's diagonal.

Norms are right to rounding for every finite gradient in float32 (no overflow of a sum of
squares, no loss to subnormal squares): the factors (or rows) are first scaled to at most 1 in
magnitude. Where reading a value on the host is free (the CPU), the plain formula runs first
and the scaled one only where the plain result shows it is needed.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from gradnorm_lightning import _arrays
from gradnorm_lightning._arrays import as_dtype
from gradnorm_lightning.capture._scale import accurate_on_host, inverse_peak
from gradnorm_lightning.capture.gram import Gram, dense_gram, factored_gram

__all__ = ["Accumulator", "Factored", "Gram", "RowSparse", "safe_norms"]


def safe_norms(grads: Tensor, present: Tensor | None = None) -> Tensor:
    """Row-wise 2-norms of ``grads`` ``(T, ...)``, right to rounding for every finite input.

    The plain norm is kept where it is right (see :func:`~gradnorm_lightning.capture._scale.accurate_on_host`); otherwise every
    row is first scaled to a largest entry of 1, so that its squares neither overflow nor
    underflow. Rows outside ``present`` may be anything.

    Example::

        >>> safe_norms(torch.tensor([[3e30, 4e30], [3e-30, 4e-30]]))
        tensor([5.0000e+30, 5.0000e-30])
    """
    flat = grads.reshape(grads.shape[0], -1)
    if flat.shape[1] == 0:
        return flat.new_zeros(flat.shape[0])
    if flat.dtype == torch.float64 or _arrays.host_reads_free(flat.device):
        plain = torch.linalg.vector_norm(flat, dim=1)
        if accurate_on_host(plain, flat.shape[1], present):
            return plain
    scale = inverse_peak(flat, (1,))
    return torch.linalg.vector_norm(flat * scale[:, None], dim=1) / scale


@dataclasses.dataclass
class Factored:
    """Per-task gradients of a Linear layer, ``dW_t = grads_t^T rows`` (plus the bias ``sum_n grads_t``).

    Attributes:
        rows: ``(N, d_in)`` layer inputs.
        grads: ``(T, N, d_out)`` per-task gradients at the layer output.
        weight: whether the weight is trained (part of the norm).
        bias: whether a bias is trained.
        present: the tasks whose rows count (the others may hold NaN): applied lazily, to the
            norms of a single block, to the gradients when blocks are stacked.
    """

    rows: Tensor
    grads: Tensor
    weight: bool
    bias: bool
    present: Tensor | None = None

    def _masked_grads(self) -> Tensor:
        if self.present is None:
            return self.grads
        return torch.where(self.present[:, None, None], self.grads, 0.0)

    def dense(self) -> Tensor:
        """The ``(T, P)`` gradients: the weight's ``(d_out, d_in)`` flattened, then the bias."""
        grads = self._masked_grads()
        parts = []
        if self.weight:
            parts.append(torch.matmul(grads.transpose(1, 2), self.rows).flatten(1))
        if self.bias:
            parts.append(grads.sum(dim=1))
        return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]

    def norms(self) -> Tensor:
        """``||dW_t||`` for every task, by the cheaper exact formula, overflow-safe (0 for absent tasks)."""
        present = self.present
        # (where reading is free, the mask is read once, for both uses)
        listed = present.tolist() if present is not None and _arrays.host_reads_free(present.device) else None
        norms = self._raw_norms(listed)
        if present is None or (listed is not None and all(listed)):
            return norms
        return torch.where(present, norms, 0.0)

    def _raw_norms(self, listed: list[bool] | None = None) -> Tensor:
        grads = self.grads
        if not self.weight:
            return safe_norms(grads.sum(dim=1), self.present)
        rows = self.rows
        if grads.dtype == torch.float64 or _arrays.host_reads_free(grads.device):
            plain = self._product_norms(grads, rows, None, None)
            if accurate_on_host(plain, rows.shape[1] * grads.shape[2], listed if listed is not None else self.present):
                return plain
        # every task's gradients and the rows scaled to at most 1 in magnitude (the rows' scale
        # at most 1 too, for the bias's column of ones): no product or square can overflow
        g_scale = inverse_peak(grads.transpose(0, 1), (0, 2))
        h_scale = inverse_peak(rows, floor=1.0)
        return self._product_norms(grads, rows, g_scale, h_scale) / g_scale / h_scale

    def _product_norms(self, grads: Tensor, rows: Tensor, g_scale: Tensor | None, h_scale: Tensor | None) -> Tensor:
        """``||(g_scale G_t)^T (h_scale [H, 1])||`` for every task, by the cheaper exact formula."""
        num_tasks, n, d_out = grads.shape
        d_in = rows.shape[1] + int(self.bias)
        if h_scale is not None:
            rows = rows * h_scale
        # ghost: N^2 (d_in + T d_out) multiply-adds; direct: T N d_in d_out, plus the T d_in d_out
        # products it writes and reads back (weighed as 8 multiply-adds each: memory traffic)
        if n * n * (d_in + num_tasks * d_out) >= num_tasks * d_in * d_out * (n + 8):
            if self.bias:  # the bias's column of ones (scaled like the rows)
                rows = (torch.nn.functional.pad(rows, (0, 1), value=1.0) if h_scale is None
                        else torch.cat([rows, h_scale.expand(n, 1)], dim=1))
            # all tasks in one GEMM, (d_in, N) @ (N, T d_out): batch-major storage (N, T, d_out)
            # makes the right operand a free reshape; column t d_out + j of the product is row j
            # of dW_t. The squares are summed down the columns, then over each task's block
            # (torch's vector_norm along dim 0 is several times slower than the GEMM itself);
            # a sum that overflows is caught by the caller (plain inputs) or cannot happen
            # (inputs scaled to at most 1)
            batch_major = grads.transpose(0, 1)
            if g_scale is not None:
                batch_major = batch_major * g_scale[:, None]
            full = rows.T @ batch_major.reshape(n, num_tasks * d_out)
            return full.square_().view(-1, num_tasks, d_out).sum(dim=(0, 2)).sqrt_()
        if g_scale is not None:
            grads = grads * g_scale[:, None, None]
        gram_h = rows @ rows.T
        if self.bias:
            gram_h = gram_h + (1.0 if h_scale is None else h_scale.square())
        gram_g = torch.bmm(grads, grads.transpose(1, 2))
        return (gram_g * gram_h).sum(dim=(1, 2)).clamp_min(0).sqrt()

    def gram(self, diagonal: bool = False) -> Gram:
        """The per-task Gram ``<dW_a, dW_b>`` (absent tasks' rows and columns zero), overflow-safe."""
        return factored_gram(self.rows, self.grads, self.weight, self.bias, self.present, diagonal)

    @staticmethod
    def cat(blocks: list[Factored]) -> Factored:
        """The blocks of several backward passes as one (their rows stacked, masks applied)."""
        if len(blocks) == 1:
            return blocks[0]
        first = blocks[0]
        return Factored(
            torch.cat([b.rows for b in blocks], dim=0), torch.cat([b._masked_grads() for b in blocks], dim=1),
            first.weight, first.bias,
        )


@dataclasses.dataclass
class RowSparse:
    """Per-task gradients of an embedding table ``(V, D)``: the rows the batch touched.

    Task ``t``'s gradient is ``sum_n values[t, n]`` added into row ``rows[n]`` (a row index
    may repeat). Its norm is taken over the touched rows after the repeats are summed, by a
    sort and a segment sum of fixed size (no data-dependent shape, so no host synchronisation).

    Attributes:
        rows: ``(N,)`` row indices (int64).
        values: ``(T, N, D)`` per-task row gradients.
        num_rows: ``V``, the table's number of rows.
    """

    rows: Tensor
    values: Tensor
    num_rows: int

    def _summed(self) -> Tensor:
        """``(T, N, D)``: the repeats of each row summed into one slot, the other slots zero."""
        n = self.rows.numel()
        if n <= 1:
            return self.values
        ordered, perm = torch.sort(self.rows)
        segment = torch.cat([ordered.new_zeros(1), (ordered[1:] != ordered[:-1]).cumsum(0)])
        out = torch.zeros_like(self.values)
        return out.index_add_(1, segment, self.values.index_select(1, perm))

    def norms(self, present: Tensor | None = None) -> Tensor:
        """``||dW_t||`` for every task, overflow-safe."""
        return safe_norms(self._summed(), present)

    def gram(self, present: Tensor | None = None, diagonal: bool = False) -> Gram:
        """The per-task Gram over the touched rows (repeats summed first), overflow-safe."""
        return dense_gram(self._summed(), present, diagonal)

    def dense(self) -> Tensor:
        """The ``(T, V * D)`` gradients (the whole table: for reductions only)."""
        num_tasks, _, d = self.values.shape
        out = self.values.new_zeros(num_tasks, self.num_rows, d)
        return out.index_add_(1, self.rows, self.values).reshape(num_tasks, -1)

    @staticmethod
    def cat(blocks: list[RowSparse]) -> RowSparse:
        """The blocks of several backward passes as one (rows and values concatenated)."""
        if len(blocks) == 1:
            return blocks[0]
        return RowSparse(torch.cat([b.rows for b in blocks]), torch.cat([b.values for b in blocks], dim=1),
                         blocks[0].num_rows)


Form = Factored | Tensor | RowSparse
"""One piece of per-task parameter gradients: factored (Linear), dense ``(T, P)``, or row-sparse."""


class _Piece:
    """Per-task gradients of one set of parameters, summed over backward passes."""

    __slots__ = ("dense", "factored", "params", "sparse")

    def __init__(self, params: tuple[int, ...]) -> None:
        self.params = params  # ids of the parameters covered, in order
        self.factored: list[Factored] = []
        self.sparse: list[RowSparse] = []
        self.dense: Tensor | None = None

    def add(self, grads: Form) -> None:
        if isinstance(grads, Factored):
            if self.factored and (grads.weight, grads.bias, grads.rows.shape[1]) != (
                self.factored[0].weight, self.factored[0].bias, self.factored[0].rows.shape[1]
            ):
                self._add_dense(Factored.cat(self.factored).dense())
                self.factored = []
            self.factored.append(grads)
        elif isinstance(grads, RowSparse):
            self.sparse.append(grads)
        else:
            self._add_dense(grads)

    def _add_dense(self, grads: Tensor) -> None:
        if self.dense is None:
            self.dense = grads
        elif self.dense.shape != grads.shape:
            raise ValueError(
                "The shared layer's trainable parameters changed within one optimizer step "
                f"({self.dense.shape[1]} then {grads.shape[1]} values): freeze or unfreeze them "
                "between optimizer steps, not between the backward passes of one."
            )
        else:
            self.dense = self.dense + grads

    def to_dense(self) -> Tensor:
        """Everything as one dense ``(T, P)`` block (the forms summed)."""
        if self.factored:
            self._add_dense(Factored.cat(self.factored).dense())
            self.factored = []
        if self.sparse:
            self._add_dense(RowSparse.cat(self.sparse).dense())
            self.sparse = []
        assert self.dense is not None
        return self.dense

    @property
    def form(self) -> str:
        """``"factored"`` or ``"sparse"`` when everything is in that one form, else ``"dense"``."""
        kinds = bool(self.factored) + bool(self.sparse) + (self.dense is not None)
        if kinds == 1 and self.factored:
            return "factored"
        if kinds == 1 and self.sparse:
            return "sparse"
        return "dense"

    def gram(self, present: Tensor, diagonal: bool = False) -> Gram:
        form = self.form
        if form == "factored":
            return Factored.cat(self.factored).gram(diagonal)
        if form == "sparse":
            return RowSparse.cat(self.sparse).gram(present, diagonal)
        return dense_gram(self.to_dense(), present, diagonal)

    def norms(self, present: Tensor) -> Tensor:
        kinds = bool(self.factored) + bool(self.sparse) + (self.dense is not None)
        if kinds == 1 and self.factored:
            return Factored.cat(self.factored).norms()
        if kinds == 1 and self.sparse:
            return RowSparse.cat(self.sparse).norms(present)
        return safe_norms(self.to_dense(), present)


class Accumulator:
    """What the backward passes of one optimizer step recorded, per task.

    Args:
        num_tasks: ``T``.
        dtype: the dtype of the statistics (float64 for float64 layers, else float32).
        device: their device.
        cosines: whether the full ``T x T`` Gram is wanted (the task-gradient cosines), not only
            its diagonal (the squared norms).
    """

    def __init__(self, num_tasks: int, dtype: torch.dtype, device: torch.device, cosines: bool = False) -> None:
        self.num_tasks, self.dtype, self.device = num_tasks, dtype, device
        self.cosines = cosines
        # each backward pass's (loss values, presence, scale c): combined when read
        self._passes: list[tuple[Tensor, Tensor, Tensor]] = []
        self._sums: tuple[Tensor, Tensor] | None = None
        self._absent: Tensor | None = None
        self._uncut: Tensor | None = None
        self._pieces: dict[object, _Piece] = {}
        self.rep: Gram | None = None  # mode="representation": the Gram at the layer's output
        self.routes: list[str] = []
        #: a canonical name of each parameter the pieces cover, by id: ``(module index, name)``
        #: (the same on every process, where the ids differ)
        self.param_keys: dict[int, tuple[int, str]] = {}

    def _zeros(self) -> Tensor:
        return torch.zeros(self.num_tasks, dtype=self.dtype, device=self.device)

    def _loss_sums(self) -> tuple[Tensor, Tensor]:
        if self._sums is None:
            total, weight = self._zeros(), self._zeros()
            for values, present, scale in self._passes:
                pass_weight = present * scale
                total = total + torch.where(present, as_dtype(values, self.dtype), 0.0) * pass_weight
                weight = weight + pass_weight
            self._sums = (total, weight)
        return self._sums

    @property
    def loss_sum(self) -> Tensor:
        """``sum_passes c * L_i`` over the passes task ``i`` was present in."""
        return self._loss_sums()[0]

    @property
    def loss_weight(self) -> Tensor:
        """``sum_passes c`` over the passes task ``i`` was present in."""
        return self._loss_sums()[1]

    def losses(self) -> tuple[Tensor, Tensor]:
        """``(losses, present)``: each task's loss averaged over the passes it was present in, weighted
        by their scales (0 for a task absent from every pass), and whether it was present in any.
        (One pass: its losses as they are, without the arithmetic.)"""
        if len(self._passes) == 1:
            values, present, _ = self._passes[0]
            return torch.where(present, as_dtype(values, self.dtype), 0.0), present
        total, weight = self._loss_sums()
        return total / weight.clamp_min(torch.finfo(weight.dtype).tiny), weight > 0

    def _present(self) -> Tensor:
        """The tasks present in some pass (one pass: its own mask)."""
        return self._passes[0][1] if len(self._passes) == 1 else self.loss_weight > 0

    @property
    def absent(self) -> Tensor:
        """``(T,)``: how many backward passes each task was absent from."""
        if self._absent is None:
            self._absent = self._zeros()
        return self._absent

    @property
    def uncut(self) -> Tensor:
        """``(T,)`` bool: tasks absent with a graph in a pass whose route could not cut them off
        (their backward may have written non-finite values into gradients other tasks share)."""
        if self._uncut is None:
            self._uncut = torch.zeros(self.num_tasks, dtype=torch.bool, device=self.device)
        return self._uncut

    def add_losses(self, values: Tensor, present: Tensor, scale: Tensor) -> None:
        """One backward pass's task losses and its scale ``c`` (combined when read)."""
        self._passes.append((values, present, scale))
        self._sums = None

    def add_absent(self, absent: Tensor) -> None:
        """Count one backward pass's absent tasks (``(T,)`` bool)."""
        self._absent = absent.to(self.dtype) if self._absent is None else self._absent + absent

    def add_uncut(self, uncut: Tensor) -> None:
        """Mark tasks whose absent backward a route could not cut off (``(T,)`` bool)."""
        self._uncut = uncut if self._uncut is None else self._uncut | uncut

    def add(self, grads: Form, params: tuple[int, ...], key: object = "params") -> None:
        """Add per-task gradients of the shared parameters ``params`` (their ids, in order).

        Pieces under one ``key`` are summed over backward passes; pieces of different keys
        cover disjoint parameters (when a later pass covers the same parameters under another
        key, everything is summed as one dense block over their union).
        """
        piece = self._pieces.get(key)
        if piece is None:
            taken = {p for other in self._pieces.values() for p in other.params}
            if taken & set(params):
                self._merge_all()
                piece = self._pieces.get("params")
                if piece is not None and piece.params != params:
                    piece = None
            if piece is None:
                piece = self._pieces[key] = _Piece(params)
        piece.add(grads)

    def _merge_all(self) -> None:
        """Everything recorded so far as one dense block keyed ``"params"`` (its parameters in order)."""
        if len(self._pieces) == 1 and "params" in self._pieces:
            return
        params = tuple(p for piece in self._pieces.values() for p in piece.params)
        dense = torch.cat([piece.to_dense() for piece in self._pieces.values()], dim=1)
        merged = _Piece(params)
        merged.dense = dense
        self._pieces = {"params": merged}

    def add_rep(self, grads: Tensor, present: Tensor) -> None:
        """Add per-task gradients ``(T, ...)`` at the representation (rows disjoint from those
        added before: their Grams add)."""
        gram = dense_gram(grads.to(self.dtype), present, diagonal=not self.cosines)
        self.rep = gram if self.rep is None else Gram.total([self.rep, gram])

    @property
    def measured(self) -> bool:
        """Whether any per-task gradient statistics were recorded."""
        return bool(self._pieces) or self.rep is not None

    def pieces(self) -> list[tuple[tuple[int, ...], _Piece]]:
        """The pieces recorded: ``(parameter ids, piece)``, in the order they were first recorded."""
        return [(piece.params, piece) for piece in self._pieces.values()]

    def gram(self) -> Gram | None:
        """This process's Gram over every piece (its diagonal only unless :attr:`cosines`), or
        ``None`` when nothing was measured."""
        if self.rep is not None:
            return self.rep
        if not self._pieces:
            return None
        present = self._present()  # (tasks absent from every pass do not count)
        return Gram.total([piece.gram(present, not self.cosines) for piece in self._pieces.values()])

    def dense_grads(self) -> Tensor | None:
        """The accumulated ``(T, P)`` gradients over every piece's parameters (materialised), or ``None``."""
        if not self._pieces:
            return None
        return torch.cat([piece.to_dense() for piece in self._pieces.values()], dim=1)

    def norms(self) -> Tensor:
        """The per-task norms of the accumulated gradients on this process (NaN if not measured)."""
        if self.rep is not None:
            return self.rep.norms()
        if not self._pieces:
            return torch.full((self.num_tasks,), float("nan"), dtype=self.dtype, device=self.device)
        present = self._present()  # (tasks absent from every pass do not count)
        parts = [piece.norms(present) for piece in self._pieces.values()]
        if len(parts) == 1:
            return parts[0]
        return safe_norms(torch.stack(parts, dim=1), present)
