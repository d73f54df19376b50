"""Weak references to callbacks: hooks on the graph must not keep the recorder alive."""

from __future__ import annotations

import inspect
import weakref
from collections.abc import Callable
from typing import Any


def weak_callable(fn: Callable[..., Any]) -> Callable[[], Callable[..., Any] | None]:
    """A zero-argument function returning ``fn``, or ``None`` once ``fn``'s owner is gone.

    Bound methods are held weakly (the graph's hooks outlive nothing); other callables strongly.
    """
    if inspect.ismethod(fn):
        return weakref.WeakMethod(fn)
    return lambda: fn
