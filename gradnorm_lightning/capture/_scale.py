"""Scaling for overflow-safe norms and Gram matrices in float32 (shared by ``stats`` and ``gram``)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from gradnorm_lightning import _arrays

__all__ = ["accurate_on_host", "inverse_peak"]


def inverse_peak(x: Tensor, dims: tuple[int, ...] | None = None, floor: float | None = None) -> Tensor:
    """``1 / max |x|`` over ``dims`` (the largest entry of ``x * scale`` is 1), finite for ``x == 0``."""
    peak = x.abs().amax(dim=dims) if dims is not None else x.abs().amax()
    return peak.clamp_min(floor if floor is not None else torch.finfo(x.dtype).tiny).reciprocal()


def accurate_on_host(norms: Tensor, count: int, present: Tensor | list[bool] | None) -> bool:
    """Whether plain (unscaled) norms are right to rounding, read on the host: only where that is free.

    A plain norm is wrong when a sum of squares overflowed (then it is not finite) or when the
    squares fell into the subnormal range (then the norm is below ``sqrt(count * tiny / eps)``:
    what ``count`` subnormal squares can lose is then under one rounding error). Tasks outside
    ``present`` (a tensor, or its values already read) do not count. On a device where reading
    a value would synchronise, this is ``False``: the scaled formulas are used there unconditionally.
    """
    if norms.dtype == torch.float64:
        return True
    if not _arrays.host_reads_free(norms.device):
        return False
    info = torch.finfo(norms.dtype)
    floor = math.sqrt(max(count, 1) * info.tiny / info.eps)
    # (in Python on the listed values: right after a large product, a few small tensor
    # operations cost far more than reading T numbers)
    values = norms.tolist()
    mask = present.tolist() if isinstance(present, Tensor) else present or [True] * len(values)
    return all(floor < v < math.inf for v, m in zip(values, mask) if m)
