"""The tooling around the library: Hydra training, comparisons, figures and example tasks.

Kept apart from the library itself (nothing in :mod:`gradnorm_lightning` imports it):

* :mod:`~gradnorm_lightning.experiments.train`: ``gradnorm-train``, the Hydra entry point
  (``train(cfg)`` builds everything from ``configs/`` and writes the run folder);
* :mod:`~gradnorm_lightning.experiments.compare`: ``gradnorm-compare``, the loss-weighting
  methods over seeds on one experiment;
* :mod:`~gradnorm_lightning.experiments.plotting`: ``gradnorm-plot``, the per-task figures;
* :mod:`~gradnorm_lightning.experiments.summary`: the step timer and ``summary.json``;
* :mod:`~gradnorm_lightning.experiments.tasks`: the example DataModules and models;
* ``configs/``: the Hydra config tree (shipped in the wheel).
"""
