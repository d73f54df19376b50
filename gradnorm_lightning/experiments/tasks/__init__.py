"""Example multi-task experiments: LightningDataModules and GradNorm-ready LightningModules.

* :mod:`~gradnorm_lightning.experiments.tasks.toy`: the GradNorm paper's synthetic regression tasks.
* :mod:`~gradnorm_lightning.experiments.tasks.mmoe`: Multi-gate Mixture-of-Experts on synthetic
  click/like/convert labels.
* :mod:`~gradnorm_lightning.experiments.tasks.digits`: four heterogeneous tasks on sklearn's digits.
"""

from gradnorm_lightning.experiments.tasks._base import MultiTaskModule, TaskOutputs
from gradnorm_lightning.experiments.tasks.digits import DigitsDataModule, DigitsMultiTaskModel
from gradnorm_lightning.experiments.tasks.mmoe import BatchedLinear, MMoEModel, RecsysDataModule
from gradnorm_lightning.experiments.tasks.toy import PaperToyDataModule, PaperToyModel

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
