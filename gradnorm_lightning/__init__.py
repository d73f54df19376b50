"""GradNorm loss balancing for PyTorch Lightning and plain PyTorch.

* :class:`GradNorm`: the balancer, usable in any PyTorch training loop
  (:mod:`gradnorm_lightning.balancers`), with :func:`zero_nonfinite_grads_` for tasks that
  may lack labels in a batch;
* :class:`GradNormMixin` and :class:`GradNormCallback`: the Lightning integration
  (:mod:`gradnorm_lightning.lightning`, imported on first use, so plain-PyTorch users do not
  pay for importing Lightning);
* :mod:`gradnorm_lightning.capture`: how the per-task statistics are recorded, with
  :func:`register_norm_rule` for exact norm rules of your own layer types;
* :mod:`gradnorm_lightning.functional`: the math on tensors;
* baselines with the same interface and log keys: :class:`EqualWeighting`,
  :class:`UncertaintyWeighting`, :class:`DynamicWeightAverage` and their callbacks.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from gradnorm_lightning.balancers import (
    Balancer,
    DynamicWeightAverage,
    EqualWeighting,
    GradNorm,
    Proposal,
    StepInputs,
    UncertaintyWeighting,
)
from gradnorm_lightning.capture import Recorder, register_norm_rule
from gradnorm_lightning.functional import (
    adam_update,
    gradnorm_weight_grad,
    inverse_training_rates,
    renormalize_weights,
)
from gradnorm_lightning.nonfinite import zero_nonfinite_grads_

if TYPE_CHECKING:
    from gradnorm_lightning.lightning import (
        DWACallback,
        EqualWeightingCallback,
        GradNormCallback,
        GradNormMixin,
        UncertaintyWeightingCallback,
        WeightingCallback,
    )

_LIGHTNING = frozenset({
    "DWACallback", "EqualWeightingCallback", "GradNormCallback", "GradNormMixin",
    "UncertaintyWeightingCallback", "WeightingCallback",
})

__all__ = [
    "Balancer",
    "DWACallback",
    "DynamicWeightAverage",
    "EqualWeighting",
    "EqualWeightingCallback",
    "GradNorm",
    "GradNormCallback",
    "GradNormMixin",
    "Proposal",
    "Recorder",
    "StepInputs",
    "UncertaintyWeighting",
    "UncertaintyWeightingCallback",
    "WeightingCallback",
    "adam_update",
    "gradnorm_weight_grad",
    "inverse_training_rates",
    "register_norm_rule",
    "renormalize_weights",
    "zero_nonfinite_grads_",
]
__version__ = "0.2.0"


def __getattr__(name: str) -> Any:
    if name in _LIGHTNING:
        value = getattr(importlib.import_module("gradnorm_lightning.lightning"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'gradnorm_lightning' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | _LIGHTNING)
