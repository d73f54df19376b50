"""The weights' floor as the references apply it, written independently of the package."""

from __future__ import annotations

import torch
from torch import Tensor


def floored(x: Tensor, budget: Tensor | float, floor: float) -> Tensor:
    """``max(floor, c x_i)`` summing to ``budget``: rescale, pin the weights that fall below the
    floor to it, rescale the rest with what is left, until none falls below (water-filling)."""
    x = x.clamp_min(floor)
    pinned = torch.zeros_like(x, dtype=torch.bool)
    while True:
        free = sum(x[~pinned].unbind(), torch.zeros((), dtype=x.dtype))  # (summed in order)
        new = torch.where(pinned, torch.full_like(x, floor), x * (budget - floor * int(pinned.sum())) / free)
        below = (new < floor) & ~pinned
        if not below.any():
            return new
        pinned |= below
