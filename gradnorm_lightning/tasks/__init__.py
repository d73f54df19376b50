"""Example multi-task experiments: LightningDataModules and GradNorm-ready LightningModules.

* :mod:`~gradnorm_lightning.tasks.toy`: the GradNorm paper's synthetic regression tasks.
* :mod:`~gradnorm_lightning.tasks.mmoe`: Multi-gate Mixture-of-Experts on synthetic
  click/like/convert labels.
* :mod:`~gradnorm_lightning.tasks.digits`: four heterogeneous tasks on sklearn's digits.
"""

from gradnorm_lightning.tasks._base import MultiTaskModule, TaskOutputs
from gradnorm_lightning.tasks.digits import DigitsDataModule, DigitsMultiTaskModel
from gradnorm_lightning.tasks.mmoe import BatchedLinear, MMoEModel, RecsysDataModule
from gradnorm_lightning.tasks.toy import PaperToyDataModule, PaperToyModel

__all__ = [
    "BatchedLinear",
    "DigitsDataModule",
    "DigitsMultiTaskModel",
    "MMoEModel",
    "MultiTaskModule",
    "PaperToyDataModule",
    "PaperToyModel",
    "RecsysDataModule",
    "TaskOutputs",
]
