"""GradNorm loss balancing for PyTorch Lightning and plain PyTorch.

* :class:`GradNorm`: the balancer, usable in any PyTorch training loop;
* :class:`GradNormMixin` and :class:`GradNormCallback`: the Lightning integration;
* :mod:`gradnorm_lightning.functional`: the math on tensors.
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

__all__ = [
    "GradNorm",
    "GradNormCallback",
    "GradNormMixin",
    "adam_update",
    "gradnorm_weight_grad",
    "inverse_training_rates",
    "renormalize_weights",
]
__version__ = "0.1.0"
