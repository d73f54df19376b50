"""Per-task gradient statistics at the last shared layer (the recorder and its parts).

* :mod:`~.recorder`: :class:`Recorder`, handed to a balancer: forward hook, views, route, result;
* :mod:`~.calls`: what a forward call of the layer leaves (:class:`LayerCall`);
* :mod:`~.views`: task views, one node handing over every task's gradient;
* :mod:`~.routes`: the route of a step (:class:`~.routes.Plan`) and why;
* :mod:`~.heads`: the graph walk finding where each task's gradient enters the shared part;
* :mod:`~.backward`: the hooks of one step's backward;
* :mod:`~.norms`: exact norm rules by layer type (:func:`register_norm_rule`) and the generic one;
* :mod:`~.stats`: accumulation over backward passes, overflow-safe norms;
* :mod:`~.distributed`: the reduction over processes.
"""

from gradnorm_lightning.capture.norms import NormRule, find_norm_rule, register_norm_rule
from gradnorm_lightning.capture.recorder import Recorder, Statistics

__all__ = ["NormRule", "Recorder", "Statistics", "find_norm_rule", "register_norm_rule"]
