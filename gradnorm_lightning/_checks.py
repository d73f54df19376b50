"""Argument checks shared by the balancer, the mixin and the callback: one error wording."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from torch import nn

OPTIMIZERS = ("sgd", "adam")
MODES = ("auto", "representation", "autograd")
DISTRIBUTED_MODES = ("exact", "approx")
WEIGHT_SPACES = ("linear", "log")


def _check_alpha(alpha: Any) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise TypeError(f"`alpha` must be a finite number; got {alpha!r}.")
    if alpha < 0:
        raise ValueError(f"`alpha` must be >= 0 (the paper uses 0.12 to 3.0); got {alpha!r}.")
    return float(alpha)


def _check_positive(name: str, value: Any, *, integer: bool = False) -> Any:
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind):
        what = "an integer" if integer else "a number"
        raise TypeError(f"`{name}` must be {what}; got {value!r}.")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"`{name}` must be > 0; got {value!r}.")
    return value


def _check_choice(name: str, value: Any, choices: Sequence[str]) -> str:
    if not isinstance(value, str) or value.lower() not in choices:
        raise ValueError(f"`{name}` must be one of {', '.join(map(repr, choices))}; got {value!r}.")
    return value.lower()


def _check_betas(betas: Any) -> tuple[float, float]:
    try:
        b1, b2 = (float(b) for b in betas)
    except (TypeError, ValueError):
        raise TypeError(f"`betas` must be a pair of numbers; got {betas!r}.") from None
    if not (0.0 <= b1 < 1.0 and 0.0 <= b2 < 1.0):
        raise ValueError(f"`betas` must both lie in [0, 1); got {betas!r}.")
    return b1, b2


def _check_task_names(names: Any) -> tuple[str, ...]:
    if isinstance(names, str) or not isinstance(names, Sequence):
        raise TypeError(f"`task_names` must be a sequence of strings; got {names!r}.")
    names = tuple(names)
    if not all(isinstance(n, str) and n for n in names):
        raise TypeError(f"`task_names` must be non-empty strings; got {names!r}.")
    if len(set(names)) != len(names):
        raise ValueError(f"`task_names` must be unique; got {names!r}.")
    if len(names) < 2:
        raise ValueError(
            f"GradNorm balances two or more tasks; got {len(names)} ({names!r}). "
            "With one task there is nothing to balance: train without GradNorm."
        )
    return names


def _check_initial_losses(value: Any) -> float | tuple[float, ...] | dict[str, float] | None:
    """Validate ``initial_losses`` (task names are checked once they are known)."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise TypeError(f"`initial_losses` must be None, a number, a sequence or a mapping; got {value!r}.")
    if isinstance(value, (int, float)):
        return float(_check_positive("initial_losses", value))
    if isinstance(value, Mapping):
        out: dict[str, float] = {}
        for key, v in value.items():
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise TypeError(f"`initial_losses[{key!r}]` must be a number; got {v!r}.")
            out[str(key)] = float(_check_positive(f"initial_losses[{key!r}]", v))
        return out
    if isinstance(value, Sequence) and not isinstance(value, str):
        return tuple(float(_check_positive(f"initial_losses[{i}]", v)) for i, v in enumerate(value))
    raise TypeError(f"`initial_losses` must be None, a number, a sequence or a mapping; got {value!r}.")


def _check_shared_layer(layer: Any, where: str = "`shared_layer`") -> Any:
    """A shared layer: one ``nn.Module``, or several (a list, a tuple or an ``nn.ModuleList``) whose
    trainable parameters together are the shared parameters (e.g. MMoE experts)."""
    if isinstance(layer, nn.Module) and not isinstance(layer, nn.ModuleList):
        modules = [layer]
    elif isinstance(layer, (nn.ModuleList, list, tuple)):
        modules = list(layer)
        if not modules:
            raise ValueError(f"{where} is an empty sequence; give the last shared layer, or the shared modules.")
        wrong = [type(m).__name__ for m in modules if not isinstance(m, nn.Module)]
        if wrong:
            raise TypeError(f"{where} must hold `nn.Module`s; got {', '.join(wrong)}.")
        if isinstance(layer, list):
            layer = tuple(layer)
    else:
        raise TypeError(
            f"{where} must be an `nn.Module` (the last layer shared by all tasks) or a sequence of modules "
            f"(e.g. the experts of an MMoE); got {type(layer).__name__}."
        )
    if not any(p.requires_grad for m in modules for p in m.parameters()):
        kind = type(modules[0]).__name__ if len(modules) == 1 else f"{len(modules)} modules"
        raise ValueError(
            f"{where} ({kind}) has no trainable parameters; GradNorm needs the last "
            "shared layer with weights, e.g. the last `nn.Linear` of the trunk."
        )
    return layer


def _number(name: str) -> Callable[[Any], float]:
    """A checker of a positive number option, returning it as a float."""
    return lambda value: float(_check_positive(name, value))


def _integer(name: str) -> Callable[[Any], int]:
    """A checker of a positive integer option."""
    return lambda value: int(_check_positive(name, value, integer=True))


def _choice(name: str, choices: Sequence[str]) -> Callable[[Any], str]:
    """A checker of a string option among ``choices`` (case-insensitive)."""
    return lambda value: _check_choice(name, value, choices)


def _flag(value: Any) -> bool:
    return bool(value)


def _real(name: str) -> Callable[[Any], float]:
    """A checker of a finite real number option."""

    def check(value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise TypeError(f"`{name}` must be a finite number; got {value!r}.")
        return float(value)

    return check
