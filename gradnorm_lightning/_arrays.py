"""The few array operations the weight update uses, for torch tensors and for Python vectors.

The update of ``T`` task weights is a few dozen operations on ``(T,)`` vectors. On a GPU they
run as tensors on the device (no host synchronisation). On the CPU, where the device *is* the
host, the balancer runs the very same code on :class:`Vec` (Python numbers): each small torch
call costs microseconds of dispatch, and many more right after a large product has flushed the
caches, while ``T`` Python multiplications cost well under one. The math is written once,
against :func:`array_ops`; everything it needs beyond the operators (``+ - * / ** ~ & | < >``,
``abs``, ``.sum()``, ``.any()``, ``.all()``) is here. (GradNorm also has a fused host kernel,
``GradNorm._host_kernel``: the same operations in the same order in one pass over the tasks,
held equal to this generic path to the last bit by ``tests/test_host_update.py``.)

Example::

    >>> array_ops(torch.ones(2)).clamp_min(torch.tensor([0.5, 2.0]), 1.0)
    tensor([1., 2.])
    >>> python_ops(torch.float32).clamp_min(Vec([0.5, 2.0]), 1.0)
    Vec([1.0, 2.0])
"""

from __future__ import annotations

import array
import math
import weakref
from collections.abc import Collection
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "TORCH", "ArrayOps", "PythonOps", "Vec", "array_ops", "as_dtype", "host_reads_free", "ieee_div", "python_ops",
]


class ArrayOps:
    """Operations on torch tensors (the device path)."""

    name = "torch"

    def view(self, t: Tensor) -> Any:
        """A state tensor as this kind of array (for torch, the tensor itself)."""
        return t

    def tensors(self, values: dict[str, Any], remember: Collection[str] | None = None) -> dict[str, Tensor]:
        """Several results as tensors, by name (for torch, the values themselves).

        Args:
            values: the results, by name.
            remember: the names whose tensors the next step reads through :meth:`view`
                (``None``: all); the host path keeps their values so the read is free.
        """
        return dict(values)

    @staticmethod
    def is_zero(t: Tensor) -> Any:
        """Whether every entry of the tensor ``t`` is 0, as a 0-dim boolean of this kind."""
        return (t == 0).all()

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
    def true_like(x: Any) -> Any:
        return torch.ones_like(x, dtype=torch.bool)

    @staticmethod
    def count(mask: Any, like: Any) -> Any:
        """How many entries of ``mask`` are set, in ``like``'s dtype (0-dim)."""
        return mask.sum().to(like.dtype)

    def tiny(self, x: Any) -> float:
        return float(torch.finfo(x.dtype).tiny)


class Vec:
    """A ``(T,)`` vector of Python numbers with elementwise operators: the host path's array.

    Python floats are IEEE doubles, so on well-defined inputs the host update is the device
    update to rounding; where Python would raise instead of giving ``inf`` or ``NaN`` (a
    division by zero, ``log(0)``, a negative number to a fractional power), the operation
    raises :class:`ArithmeticError` or :class:`ValueError` and the balancer redoes the step on
    the device path.
    """

    __slots__ = ("v",)

    def __init__(self, values: list[Any]) -> None:
        self.v = values

    @property
    def shape(self) -> tuple[int]:
        return (len(self.v),)

    def __len__(self) -> int:
        return len(self.v)

    def __repr__(self) -> str:
        return f"Vec({self.v!r})"

    # arithmetic (vector with vector or with a number, either side)
    def __add__(self, o: Any) -> Vec:
        return Vec([a + b for a, b in zip(self.v, o.v)]) if isinstance(o, Vec) else Vec([a + o for a in self.v])

    __radd__ = __add__

    def __sub__(self, o: Any) -> Vec:
        return Vec([a - b for a, b in zip(self.v, o.v)]) if isinstance(o, Vec) else Vec([a - o for a in self.v])

    def __rsub__(self, o: Any) -> Vec:
        return Vec([o - a for a in self.v])

    def __mul__(self, o: Any) -> Vec:
        return Vec([a * b for a, b in zip(self.v, o.v)]) if isinstance(o, Vec) else Vec([a * o for a in self.v])

    __rmul__ = __mul__

    def __truediv__(self, o: Any) -> Vec:
        if isinstance(o, Vec):
            if 0 in o.v:
                return Vec([ieee_div(a, b) for a, b in zip(self.v, o.v)])
            return Vec([a / b for a, b in zip(self.v, o.v)])
        return Vec([ieee_div(a, o) for a in self.v]) if o == 0 else Vec([a / o for a in self.v])

    def __rtruediv__(self, o: Any) -> Vec:
        return Vec([ieee_div(o, a) for a in self.v]) if 0 in self.v else Vec([o / a for a in self.v])

    def __pow__(self, o: Any) -> Vec:
        return Vec([math.pow(a, b) for a, b in zip(self.v, o.v)]) if isinstance(o, Vec) else Vec(
            [math.pow(a, o) for a in self.v])

    def __rpow__(self, o: Any) -> Vec:
        return Vec([math.pow(o, a) for a in self.v])

    def __neg__(self) -> Vec:
        return Vec([-a for a in self.v])

    def __abs__(self) -> Vec:
        return Vec([abs(a) for a in self.v])

    # comparisons and logic
    def __lt__(self, o: Any) -> Vec:
        return Vec([a < b for a, b in zip(self.v, o.v)]) if isinstance(o, Vec) else Vec([a < o for a in self.v])

    def __gt__(self, o: Any) -> Vec:
        return Vec([a > b for a, b in zip(self.v, o.v)]) if isinstance(o, Vec) else Vec([a > o for a in self.v])

    def __eq__(self, o: Any) -> Vec:  # type: ignore[override]
        return Vec([a == b for a, b in zip(self.v, o.v)]) if isinstance(o, Vec) else Vec([a == o for a in self.v])

    __hash__ = None  # type: ignore[assignment]

    def __and__(self, o: Any) -> Vec:
        return Vec([a and b for a, b in zip(self.v, o.v)]) if isinstance(o, Vec) else Vec([a and o for a in self.v])

    __rand__ = __and__

    def __or__(self, o: Any) -> Vec:
        return Vec([a or b for a, b in zip(self.v, o.v)]) if isinstance(o, Vec) else Vec([a or o for a in self.v])

    __ror__ = __or__

    def __invert__(self) -> Vec:
        return Vec([not a for a in self.v])

    # reductions
    def sum(self) -> Any:
        return sum(self.v)

    def any(self) -> bool:
        return any(self.v)

    def all(self) -> bool:
        return all(self.v)


def ieee_div(a: float, b: float) -> float:
    """``a / b`` as IEEE arithmetic gives it (``inf`` or ``NaN`` for a zero divisor)."""
    if b != 0:
        return a / b
    if a == 0 or a != a:
        return math.nan
    return math.copysign(math.inf, a) * math.copysign(1.0, b)


def _map(f: Any, x: Any) -> Any:
    return Vec([f(a) for a in x.v]) if isinstance(x, Vec) else f(x)


def _sign(a: float) -> float:
    return 1.0 if a > 0 else (-1.0 if a < 0 else 0.0)  # (0 for NaN, as torch.sign)


class PythonOps(ArrayOps):
    """The same operations on :class:`Vec` and Python numbers (the host path), for ``dtype``.

    Args:
        dtype: the balancer's dtype (its ``tiny``; the tensors made from the results).
    """

    name = "python"

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype
        # the values of the tensors made by `tensors`, rounded to `dtype`, by id: the next
        # step reads them without a conversion while the tensor is alive and unwritten
        self._known: dict[int, tuple[Any, int, Any]] = {}

    def view(self, t: Tensor) -> Any:
        known = self._known.get(id(t))
        if known is not None and known[0]() is t and t._version == known[1]:
            return known[2]
        values = t.tolist()
        return Vec(values) if isinstance(values, list) else values

    def _remember(self, t: Tensor, value: Any) -> None:
        key = id(t)
        known = self._known

        def forget(_: Any) -> None:
            known.pop(key, None)

        known[key] = (weakref.ref(t, forget), t._version, value)

    def tensors(self, values: dict[str, Any], remember: Collection[str] | None = None) -> dict[str, Tensor]:
        """Tensors of the balancer's dtype for numeric results (vectors or numbers), by name:
        views of one tensor made in one call (a small tensor costs microseconds to make)."""
        vectors = [(name, v) for name, v in values.items() if isinstance(v, Vec)]
        numbers = [(name, v) for name, v in values.items() if not isinstance(v, Vec)]
        flat: list[Any] = [x for _, v in vectors for x in v.v]
        flat.extend(v for _, v in numbers)
        # (from a C array: several times cheaper than torch.tensor on a list; read back, it
        # gives the values rounded to the dtype)
        code = _ARRAY_CODES.get(self.dtype)
        if code is None:
            whole = torch.tensor(flat, dtype=self.dtype)
            rounded = whole.tolist()
        else:
            buffer = array.array(code, flat)
            whole = torch.frombuffer(buffer, dtype=self.dtype)
            rounded = buffer.tolist()
        sizes = [len(v.v) for _, v in vectors]
        pieces = list(whole.split([*sizes, len(numbers)]))
        out: dict[str, Tensor] = {}
        start = 0
        for (name, _), size, piece in zip(vectors, sizes, pieces):
            out[name] = piece
            if remember is None or name in remember:
                self._remember(piece, Vec(rounded[start : start + size]))
            start += size
        for (name, _), piece, value in zip(numbers, pieces[-1].unbind() if numbers else (), rounded[start:]):
            out[name] = piece
            if remember is None or name in remember:
                self._remember(piece, value)
        return out

    @staticmethod
    def is_zero(t: Tensor) -> Any:
        values = t.tolist()
        return all(v == 0 for v in values) if isinstance(values, list) else values == 0

    @staticmethod
    def where(cond: Any, a: Any, b: Any) -> Any:
        if not isinstance(cond, Vec):
            return a if cond else b
        av, bv = isinstance(a, Vec), isinstance(b, Vec)
        return Vec([(a.v[i] if av else a) if m else (b.v[i] if bv else b) for i, m in enumerate(cond.v)])

    @staticmethod
    def sign(x: Any) -> Any:
        return _map(_sign, x)

    @staticmethod
    def exp(x: Any) -> Any:
        return _map(math.exp, x)

    @staticmethod
    def log(x: Any) -> Any:
        return _map(math.log, x)

    @staticmethod
    def sqrt(x: Any) -> Any:
        return _map(math.sqrt, x)

    @staticmethod
    def floor(x: Any) -> Any:
        return _map(lambda a: float(math.floor(a)), x)

    @staticmethod
    def isfinite(x: Any) -> Any:
        return _map(math.isfinite, x)

    @staticmethod
    def clamp_min(x: Any, low: float) -> Any:
        return _map(lambda a: a if a >= low or a != a else low, x)

    @staticmethod
    def amax(x: Any) -> Any:
        return math.nan if any(a != a for a in x.v) else max(x.v)

    @staticmethod
    def zeros_like(x: Any) -> Any:
        return Vec([0.0] * len(x.v))

    @staticmethod
    def true_like(x: Any) -> Any:
        return Vec([True] * len(x.v))

    @staticmethod
    def count(mask: Any, like: Any) -> Any:
        return float(sum(mask.v))

    def tiny(self, x: Any) -> float:
        return float(torch.finfo(self.dtype).tiny)


_ARRAY_CODES = {torch.float32: "f", torch.float64: "d"}
TORCH = ArrayOps()
_PYTHON = {torch.float32: PythonOps(torch.float32), torch.float64: PythonOps(torch.float64)}


def python_ops(dtype: torch.dtype) -> PythonOps:
    """The host path's operations for a balancer of ``dtype``."""
    return _PYTHON[dtype] if dtype in _PYTHON else PythonOps(dtype)


def array_ops(x: Any) -> ArrayOps:
    """The operations for ``x``'s kind of array: torch for tensors, else the host path's."""
    if isinstance(x, Tensor):
        return TORCH
    return _PYTHON[torch.float64]


def as_dtype(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t`` in ``dtype`` (without a dispatched no-op when it already is)."""
    return t if t.dtype is dtype else t.to(dtype)


def host_reads_free(device: torch.device) -> bool:
    """Whether reading a tensor value on ``device`` costs no synchronisation: the CPU, outside
    ``torch.compile`` tracing. (The package's no-host-sync test switches this off.)"""
    return device.type == "cpu" and not torch.compiler.is_compiling()


