"""Loss-weighting strategies: a :class:`Balancer` base and the strategies as siblings.

* :class:`GradNorm` (Chen et al., 2018), the point of this package;
* baselines with the same interface and log keys: :class:`EqualWeighting`,
  :class:`UncertaintyWeighting` (Kendall et al., 2018), :class:`DynamicWeightAverage`
  (Liu et al., 2019).

A new strategy subclasses :class:`Balancer` and implements :meth:`Balancer.propose`, which
maps a step's :class:`StepInputs` to a :class:`Proposal`.
"""

from gradnorm_lightning.balancers._losses import LossesLike
from gradnorm_lightning.balancers.base import Balancer
from gradnorm_lightning.balancers.dwa import DynamicWeightAverage
from gradnorm_lightning.balancers.equal import EqualWeighting
from gradnorm_lightning.balancers.gradnorm import GradNorm
from gradnorm_lightning.balancers.interface import Proposal, StepInputs
from gradnorm_lightning.balancers.uncertainty import UncertaintyWeighting

__all__ = [
    "Balancer",
    "DynamicWeightAverage",
    "EqualWeighting",
    "GradNorm",
    "LossesLike",
    "Proposal",
    "StepInputs",
    "UncertaintyWeighting",
]
