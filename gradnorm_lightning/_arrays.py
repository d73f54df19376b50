"""Small tensor helpers shared by the capture and the balancers: host reads.

Example::

    >>> as_dtype(torch.ones(2), torch.float64).dtype
    torch.float64
    >>> host_reads_free(torch.device("cpu"))
    True
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["HostFlag", "as_dtype", "host_reads_free"]


def as_dtype(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t`` in ``dtype`` (without a dispatched no-op when it already is)."""
    return t if t.dtype is dtype else t.to(dtype)


def host_reads_free(device: torch.device) -> bool:
    """Whether reading a tensor value on ``device`` costs no synchronisation: the CPU, outside
    ``torch.compile`` tracing. (The package's no-host-sync test switches this off.)"""
    return device.type == "cpu" and not torch.compiler.is_compiling()


class HostFlag:
    """A 0-dim boolean tensor read on the host once it is there, without waiting for the device.

    On the CPU (outside ``torch.compile``) the value is read at once. On a CUDA device it is
    copied into pinned host memory behind an event, and :meth:`value` answers ``None`` until the
    event has completed (it never synchronises). On other devices it stays ``None``.

    Example::

        >>> HostFlag(torch.tensor(True)).value()
        True
    """

    def __init__(self, flag: Tensor) -> None:
        self._value: bool | None = None
        self._event: torch.cuda.Event | None = None
        if host_reads_free(flag.device):
            self._value = bool(flag)
        elif flag.device.type == "cuda":
            buffer = torch.empty((), dtype=torch.bool, pin_memory=True)
            buffer.copy_(flag, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
            self._host = buffer.numpy()  # (a view of the pinned buffer: read without torch)

    def value(self, wait: bool = False) -> bool | None:
        """The flag, or ``None`` while it is not on the host yet (``wait``: wait for it; it was
        posted a step ago, so in practice it is there)."""
        if self._value is None and self._event is not None and (wait or self._event.query()):
            if wait:
                self._event.synchronize()
            self._value = bool(self._host[()])
        return self._value
