"""The few array operations the weight update uses, for torch tensors and for NumPy arrays.

The update of ``T`` task weights is a few dozen operations on ``(T,)`` vectors. On a GPU they
run as tensors on the device (no host synchronisation); on the CPU, where the device *is* the
host, the balancer runs the very same code on NumPy views of the same memory, whose per-call
overhead is several times smaller than torch's. The math is written once, against
:func:`array_ops`; everything it needs beyond the operators (``+ - * / ** ~ & | < >``, ``abs``,
``.sum()``, ``.any()``, ``.all()``) is here.

Example::

    >>> import numpy as np
    >>> array_ops(torch.ones(2)).clamp_min(torch.tensor([0.5, 2.0]), 1.0)
    tensor([1., 2.])
    >>> array_ops(np.ones(2)).clamp_min(np.array([0.5, 2.0]), 1.0)
    array([1., 2.])
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = ["NUMPY", "TORCH", "ArrayOps", "array_ops", "from_host", "host_reads_free", "to_host"]


class ArrayOps:
    """Operations on torch tensors (the device path)."""

    name = "torch"

    @staticmethod
    def view(t: Tensor) -> Any:
        """A state tensor as this kind of array (the tensor itself; for NumPy, a view of its memory)."""
        return t

    @staticmethod
    def where(cond: Any, a: Any, b: Any) -> Any:
        return torch.where(cond, a, b)

    @staticmethod
    def sign(x: Any) -> Any:
        return torch.sign(x)

    @staticmethod
    def exp(x: Any) -> Any:
        return torch.exp(x)

    @staticmethod
    def log(x: Any) -> Any:
        return torch.log(x)

    @staticmethod
    def sqrt(x: Any) -> Any:
        return torch.sqrt(x)

    @staticmethod
    def floor(x: Any) -> Any:
        return torch.floor(x)

    @staticmethod
    def isfinite(x: Any) -> Any:
        return torch.isfinite(x)

    @staticmethod
    def clamp_min(x: Any, low: float) -> Any:
        return x.clamp_min(low)

    @staticmethod
    def amax(x: Any) -> Any:
        return x.amax()

    @staticmethod
    def zeros_like(x: Any) -> Any:
        return torch.zeros_like(x)

    @staticmethod
    def ones_like(x: Any) -> Any:
        return torch.ones_like(x)

    @staticmethod
    def true_like(x: Any) -> Any:
        return torch.ones_like(x, dtype=torch.bool)

    @staticmethod
    def count(mask: Any, like: Any) -> Any:
        """How many entries of ``mask`` are set, in ``like``'s dtype (0-dim)."""
        return mask.sum().to(like.dtype)

    @staticmethod
    def tiny(x: Any) -> float:
        return torch.finfo(x.dtype).tiny


class _NumpyOps(ArrayOps):
    """The same operations on NumPy arrays (the CPU path); ``sign(nan)`` is 0 as in torch."""

    name = "numpy"

    @staticmethod
    def view(t: Tensor) -> Any:
        return t.numpy()

    @staticmethod
    def where(cond: Any, a: Any, b: Any) -> Any:
        return np.where(cond, a, b)

    @staticmethod
    def sign(x: Any) -> Any:
        return np.sign(np.nan_to_num(x, nan=0.0, posinf=1.0, neginf=-1.0))

    @staticmethod
    def exp(x: Any) -> Any:
        return np.exp(x)

    @staticmethod
    def log(x: Any) -> Any:
        return np.log(x)

    @staticmethod
    def sqrt(x: Any) -> Any:
        return np.sqrt(x)

    @staticmethod
    def floor(x: Any) -> Any:
        return np.floor(x)

    @staticmethod
    def isfinite(x: Any) -> Any:
        return np.isfinite(x)

    @staticmethod
    def clamp_min(x: Any, low: float) -> Any:
        return np.maximum(x, np.asarray(low, dtype=np.result_type(x)))

    @staticmethod
    def amax(x: Any) -> Any:
        return np.max(x)

    @staticmethod
    def zeros_like(x: Any) -> Any:
        return np.zeros_like(x)

    @staticmethod
    def ones_like(x: Any) -> Any:
        return np.ones_like(x)

    @staticmethod
    def true_like(x: Any) -> Any:
        return np.ones_like(x, dtype=bool)

    @staticmethod
    def count(mask: Any, like: Any) -> Any:
        return np.asarray(mask.sum(), dtype=np.result_type(like))

    @staticmethod
    def tiny(x: Any) -> float:
        return float(np.finfo(np.result_type(x)).tiny)


TORCH = ArrayOps()
NUMPY = _NumpyOps()


def array_ops(x: Any) -> ArrayOps:
    """The operations for ``x``'s kind of array (NumPy for NumPy arrays, else torch)."""
    return NUMPY if isinstance(x, (np.ndarray, np.generic)) else TORCH


def host_reads_free(device: torch.device) -> bool:
    """Whether reading a tensor value on ``device`` costs no synchronisation: the CPU, outside
    ``torch.compile`` tracing. (The package's no-host-sync test switches this off.)"""
    return device.type == "cpu" and not torch.compiler.is_compiling()


def to_host(t: Tensor) -> np.ndarray:
    """A NumPy view of a CPU tensor that does not require grad (no copy)."""
    return t.numpy()


def from_host(a: Any, dtype: torch.dtype) -> Tensor:
    """A tensor holding the NumPy array (or scalar) ``a``, floating point as ``dtype`` (no copy
    when the dtype matches; booleans stay booleans)."""
    if not isinstance(a, np.ndarray) or not a.flags.writeable:
        a = np.array(a)
    t = torch.from_numpy(a)
    return t.to(dtype) if t.dtype is not dtype and t.is_floating_point() else t
