"""Example multi-task experiments: LightningDataModules and GradNorm-ready LightningModules.

* :mod:`~gradnorm_lightning.experiments.tasks.toy`: the GradNorm paper's synthetic
  regression tasks.
* :mod:`~gradnorm_lightning.experiments.tasks.mmoe`: Multi-gate Mixture-of-Experts on
  synthetic click/like/convert labels.
* :mod:`~gradnorm_lightning.experiments.tasks.digits`: four heterogeneous tasks on sklearn's
  digits.
* :mod:`~gradnorm_lightning.experiments.tasks.dense`: per-pixel segmentation, depth and
  normals on synthetic scenes (the paper's NYUv2 setting in miniature).

Every DataModule is a :class:`SplitDataModule` (it only builds its splits); every model is a
:class:`MultiTaskModule` (it only computes its per-task losses and metric inputs).
"""

from gradnorm_lightning.experiments.tasks._base import MultiTaskModule, SplitDataModule, TaskOutputs
from gradnorm_lightning.experiments.tasks.dense import DenseDataModule, DenseMultiTaskModel
from gradnorm_lightning.experiments.tasks.digits import DigitsDataModule, DigitsMultiTaskModel
from gradnorm_lightning.experiments.tasks.mmoe import BatchedLinear, MMoEModel, RecsysDataModule
from gradnorm_lightning.experiments.tasks.toy import PaperToyDataModule, PaperToyModel

__all__ = [
    "BatchedLinear",
    "DenseDataModule",
    "DenseMultiTaskModel",
    "DigitsDataModule",
    "DigitsMultiTaskModel",
    "MMoEModel",
    "MultiTaskModule",
    "PaperToyDataModule",
    "PaperToyModel",
    "RecsysDataModule",
    "SplitDataModule",
    "TaskOutputs",
]
