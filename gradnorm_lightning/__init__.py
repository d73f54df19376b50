"""GradNorm loss balancing for PyTorch Lightning and plain PyTorch.

* :class:`GradNorm`: the balancer, usable in any PyTorch training loop;
* :class:`GradNormMixin` and :class:`GradNormCallback`: the Lightning integration;
* :mod:`gradnorm_lightning.functional`: the math on tensors;
* baselines with the same interface and log keys: :class:`EqualWeighting`,
  :class:`UncertaintyWeighting`, :class:`DynamicWeightAverage` and their callbacks.
"""

from gradnorm_lightning.balancer import GradNorm
from gradnorm_lightning.callback import GradNormCallback
from gradnorm_lightning.functional import (
    adam_update,
    gradnorm_weight_grad,
    inverse_training_rates,
    renormalize_weights,
)
from gradnorm_lightning.mixin import GradNormMixin
from gradnorm_lightning.nonfinite import zero_nonfinite_grads_
from gradnorm_lightning.weighting import (
    DWACallback,
    DynamicWeightAverage,
    EqualWeighting,
    EqualWeightingCallback,
    UncertaintyWeighting,
    UncertaintyWeightingCallback,
)

__all__ = [
    "DWACallback",
    "DynamicWeightAverage",
    "EqualWeighting",
    "EqualWeightingCallback",
    "GradNorm",
    "GradNormCallback",
    "GradNormMixin",
    "UncertaintyWeighting",
    "UncertaintyWeightingCallback",
    "adam_update",
    "gradnorm_weight_grad",
    "inverse_training_rates",
    "renormalize_weights",
    "zero_nonfinite_grads_",
]
__version__ = "0.1.0"
