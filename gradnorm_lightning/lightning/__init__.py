"""The Lightning integration: the module mixin and the callbacks of every strategy."""

from gradnorm_lightning.lightning.callbacks import (
    DWACallback,
    EqualWeightingCallback,
    GradNormCallback,
    UncertaintyWeightingCallback,
    WeightingCallback,
)
from gradnorm_lightning.lightning.mixin import GradNormMixin, TaskBalancer

__all__ = [
    "DWACallback",
    "EqualWeightingCallback",
    "GradNormCallback",
    "GradNormMixin",
    "TaskBalancer",
    "UncertaintyWeightingCallback",
    "WeightingCallback",
]
