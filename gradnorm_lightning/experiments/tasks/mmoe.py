"""Multi-gate Mixture-of-Experts (Ma et al., KDD 2018) on synthetic recommender-style tasks.

The data imitate a feed: every example has dense user/item features and three binary
labels of increasing difficulty and decreasing positive rate:

* ``click`` (≈ 30 % positives): mostly a linear function of the features;
* ``like`` (≈ 12 %): shares half of its signal with ``click`` plus a quadratic term;
* ``convert`` (≈ 4 %): a sparse interaction of features plus ``click``'s signal and more
  label noise (the hard, rare task).

Labels are Bernoulli draws from ``sigmoid(logit + b)`` with the offset ``b`` solved so the
expected positive rate matches the requested one. All losses are binary cross-entropy on
logits, so every task starts near ``ln 2``: the matching GradNorm setup (the original Keras
implementation) is ``initial_losses = ln 2``, Adam with ``lr = 1e-2`` and exponential decay
``0.75`` every ``100`` updates (see ``configs/experiment/mmoe_recsys.yaml``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import TensorDataset
from torchmetrics.classification import BinaryAUROC
from torchmetrics.wrappers import MultitaskWrapper

from gradnorm_lightning.experiments.tasks._base import (
    Batch,
    MultiTaskModule,
    OptimizerFactory,
    SchedulerFactory,
    SplitDataModule,
    TaskOutputs,
    _check_fraction,
    _check_positive_int,
)

__all__ = ["BatchedLinear", "MMoEModel", "RecsysDataModule", "make_recsys_data"]

RECSYS_TASKS: tuple[str, ...] = ("click", "like", "convert")


def _offset_for_rate(logits: Tensor, rate: float, iters: int = 60) -> float:
    """Solve ``mean(sigmoid(logits + b)) = rate`` for ``b`` by bisection."""
    low, high = -50.0, 50.0
    for _ in range(iters):
        mid = 0.5 * (low + high)
        if torch.sigmoid(logits + mid).mean().item() < rate:
            low = mid
        else:
            high = mid
    return 0.5 * (low + high)


def make_recsys_data(
    num_samples: Sequence[int],
    num_features: int = 32,
    rates: Sequence[float] = (0.3, 0.12, 0.04),
    noise: Sequence[float] = (0.5, 1.0, 2.0),
    seed: int = 0,
) -> list[tuple[Tensor, Tensor]]:
    """Draw synthetic click/like/convert data (see the module docstring).

    Args:
        num_samples: Size of each split (e.g. ``(train, val, test)``); splits share the
            generating functions.
        num_features: Number of dense features (at least 8).
        rates: Target positive rate of ``click``, ``like`` and ``convert``.
        noise: Std of the Gaussian logit noise per task (larger = harder).
        seed: Seed of the private random generator.

    Returns:
        One ``(x, y)`` pair per split: ``x`` of shape ``(n, num_features)`` and ``y`` of shape
        ``(n, 3)`` with 0/1 float labels in the order ``click, like, convert``.

    Raises:
        ValueError: If ``num_features < 8``, a rate is not in (0, 1), a noise is negative,
            or ``rates``/``noise`` do not have three entries.

    Example::

        >>> (x, y), = make_recsys_data([5000], seed=1)
        >>> x.shape, y.shape
        (torch.Size([5000, 32]), torch.Size([5000, 3]))
        >>> bool(y[:, 0].mean() > y[:, 2].mean())
        True
    """
    if num_features < 8:
        raise ValueError(f"`num_features` must be >= 8; got {num_features!r}.")
    if len(rates) != len(RECSYS_TASKS) or len(noise) != len(RECSYS_TASKS):
        raise ValueError(
            f"`rates` and `noise` need {len(RECSYS_TASKS)} entries ({', '.join(RECSYS_TASKS)}); "
            f"got rates={list(rates)!r}, noise={list(noise)!r}."
        )
    for rate in rates:
        _check_fraction("rates", rate)
    if any(s < 0 for s in noise):
        raise ValueError(f"`noise` must be >= 0; got {list(noise)!r}.")
    for n in num_samples:
        _check_positive_int("num_samples", n)

    gen = torch.Generator().manual_seed(seed)
    d = num_features
    w_click = torch.randn(d, generator=gen) / math.sqrt(d)
    w_like = torch.randn(d, generator=gen) / math.sqrt(d)
    quad = torch.randn(d, d, generator=gen) / d
    pairs = torch.randint(0, d, (4, 2), generator=gen)

    def logits(x: Tensor) -> Tensor:
        click = 3.0 * x @ w_click
        like = 0.5 * click + 2.0 * x @ w_like + ((x @ quad) * x).sum(dim=1)
        inter = sum((x[:, i] * x[:, j] for i, j in pairs.tolist()), torch.zeros(x.shape[0]))
        convert = 0.5 * click + 1.5 * torch.tanh(inter)
        return torch.stack([click, like, convert], dim=1)

    noise_std = torch.tensor([float(s) for s in noise])

    def noisy_logits(n: int) -> tuple[Tensor, Tensor]:
        x = torch.randn(n, d, generator=gen)
        return x, logits(x) + torch.randn(n, len(RECSYS_TASKS), generator=gen) * noise_std

    # Offsets are fixed on a large calibration draw so every split shares them.
    _, calib = noisy_logits(20000)
    offsets = torch.tensor(
        [_offset_for_rate(calib[:, t], rates[t]) for t in range(len(RECSYS_TASKS))]
    )
    splits = []
    for n in num_samples:
        x, z = noisy_logits(n)
        y = torch.bernoulli(torch.sigmoid(z + offsets), generator=gen)
        splits.append((x, y))
    return splits


class RecsysDataModule(SplitDataModule):
    """Fixed synthetic click/like/convert splits, generated from ``seed``.

    Batches are ``(x, y)`` with ``y`` of shape ``(batch, 3)``.

    Args:
        num_features: Number of dense features.
        rates: Positive rates of ``click``, ``like``, ``convert``.
        noise: Logit noise std per task.
        num_train: Training set size.
        num_val: Validation set size.
        num_test: Test set size.
        batch_size: Batch size.
        seed: Data seed.
        num_workers: DataLoader workers.

    Raises:
        TypeError: If ``batch_size`` is not an int.
        ValueError: If ``batch_size < 1`` (other arguments are checked in :meth:`setup`).
    """

    def __init__(
        self,
        num_features: int = 32,
        rates: Sequence[float] = (0.3, 0.12, 0.04),
        noise: Sequence[float] = (0.5, 1.0, 2.0),
        num_train: int = 16384,
        num_val: int = 2048,
        num_test: int = 4096,
        batch_size: int = 256,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__(batch_size=batch_size, seed=seed, num_workers=num_workers)
        self.num_features = num_features
        self.rates = [float(r) for r in rates]
        self.noise = [float(s) for s in noise]
        self.sizes = (num_train, num_val, num_test)

    def task_descriptions(self, task_names: Sequence[str]) -> dict[str, str]:
        """Each task's positive rate (the tasks differ in how rare their positives are).

        Args:
            task_names: The model's task names, in label-column order.

        Returns:
            Task name to e.g. ``"4 % positive"``.
        """
        return {n: f"{100 * r:.3g} % positive" for n, r in zip(task_names, self.rates, strict=False)}

    def build_splits(self) -> dict[str, TensorDataset]:
        """Generate the three splits (called once, by ``setup``).

        Returns:
            ``train``/``val``/``test`` datasets of ``(x, y)`` pairs.
        """
        splits = make_recsys_data(
            self.sizes, self.num_features, self.rates, self.noise, seed=self.seed
        )
        return self._datasets(splits)


class BatchedLinear(nn.Module):
    """``E`` independent linear maps held in one module (one expert layer of an MoE).

    Input ``(batch, in)`` (shared by all experts) or ``(batch, E, in)`` (one input per
    expert); output ``(batch, E, out)``. Holding all experts' weights in one module lets
    GradNorm use "the experts' last layer" as its shared layer.

    Args:
        num_experts: Number of experts ``E``.
        in_features: Input size.
        out_features: Output size.

    Raises:
        TypeError: If a size is not an int.
        ValueError: If a size is not positive.

    Example::

        >>> layer = BatchedLinear(4, 8, 3)
        >>> layer(torch.zeros(5, 8)).shape, layer(torch.zeros(5, 4, 8)).shape
        (torch.Size([5, 4, 3]), torch.Size([5, 4, 3]))
    """

    def __init__(self, num_experts: int, in_features: int, out_features: int) -> None:
        super().__init__()
        self.num_experts = _check_positive_int("num_experts", num_experts)
        self.in_features = _check_positive_int("in_features", in_features)
        self.out_features = _check_positive_int("out_features", out_features)
        bound = 1.0 / math.sqrt(in_features)
        self.weight = nn.Parameter(
            torch.empty(num_experts, in_features, out_features).uniform_(-bound, bound)
        )
        self.bias = nn.Parameter(torch.empty(num_experts, out_features).uniform_(-bound, bound))

    def forward(self, x: Tensor) -> Tensor:
        """Apply every expert.

        Args:
            x: ``(batch, in)`` or ``(batch, E, in)``.

        Returns:
            ``(batch, E, out)``.

        Raises:
            ValueError: If ``x`` has another shape.
        """
        if x.dim() == 2 and x.shape[1] == self.in_features:
            return torch.einsum("bi,eio->beo", x, self.weight) + self.bias
        if x.dim() == 3 and x.shape[1:] == (self.num_experts, self.in_features):
            return torch.einsum("bei,eio->beo", x, self.weight) + self.bias
        raise ValueError(
            f"`x` must have shape (batch, {self.in_features}) or "
            f"(batch, {self.num_experts}, {self.in_features}); got {tuple(x.shape)}."
        )

    def extra_repr(self) -> str:
        """Sizes shown by ``repr``.

        Returns:
            ``num_experts=…, in_features=…, out_features=…``.
        """
        return (
            f"num_experts={self.num_experts}, in_features={self.in_features}, "
            f"out_features={self.out_features}"
        )


class MMoEModel(MultiTaskModule):
    """Multi-gate Mixture-of-Experts with one softmax gate and one tower per task.

    ``experts``: two :class:`BatchedLinear` layers with ReLU (``E`` experts, widths
    ``expert_hidden`` then ``expert_dim``); the second is GradNorm's shared layer. With
    ``separate_experts``, each expert is its own ``Linear → ReLU → Linear`` module (as the
    original Keras model's ``level_1_expert_shared*`` layers), and the shared layer is the
    ``nn.ModuleList`` of their last ``Linear`` layers: the norms run over all of them. Task ``t``
    mixes the expert outputs with ``softmax(gate_t(x))`` and feeds the mix to its tower
    ``Linear(expert_dim, tower_dim) → ReLU → Linear(tower_dim, 1)``, whose output is a logit.

    Args:
        num_features: Input size.
        num_experts: Number of experts ``E``.
        expert_hidden: Hidden width of each expert.
        expert_dim: Output width of each expert.
        tower_dim: Hidden width of each task tower.
        task_names: Task names, in label-column order.
        use_task_views: If true, each task reads its own alias of the experts' output
            (:meth:`task_views` of the mixin).
        separate_experts: If true, the experts are separate modules and the shared layer is
            the list of their last layers (several shared modules).
        optimizer: Partially applied optimizer class.
        scheduler: Optional partially applied per-step LR scheduler.

    Raises:
        ValueError: If fewer than two tasks or a non-positive size is given.
        TypeError: If a size is not an int or ``optimizer`` is not callable.

    Example::

        >>> model = MMoEModel(optimizer=torch.optim.Adam)
        >>> model.shared_layer()
        BatchedLinear(num_experts=4, in_features=32, out_features=16)
    """

    def __init__(
        self,
        num_features: int = 32,
        num_experts: int = 4,
        expert_hidden: int = 32,
        expert_dim: int = 16,
        tower_dim: int = 8,
        task_names: Sequence[str] = RECSYS_TASKS,
        use_task_views: bool = False,
        separate_experts: bool = False,
        optimizer: OptimizerFactory = torch.optim.Adam,
        scheduler: SchedulerFactory | None = None,
    ) -> None:
        super().__init__(task_names, optimizer, scheduler)
        _check_positive_int("tower_dim", tower_dim)
        self.use_task_views = bool(use_task_views)
        self.separate_experts = bool(separate_experts)
        if self.separate_experts:
            _check_positive_int("num_experts", num_experts)
            self.experts = nn.ModuleList(
                [
                    nn.Sequential(
                        nn.Linear(num_features, expert_hidden), nn.ReLU(), nn.Linear(expert_hidden, expert_dim)
                    )
                    for _ in range(num_experts)
                ]
            )
        else:
            self.experts_in = BatchedLinear(num_experts, num_features, expert_hidden)
            self.experts_out = BatchedLinear(num_experts, expert_hidden, expert_dim)
        self.gates = nn.ModuleDict(
            {n: nn.Linear(num_features, num_experts) for n in self.task_names}
        )
        self.towers = nn.ModuleDict(
            {
                n: nn.Sequential(
                    nn.Linear(expert_dim, tower_dim), nn.ReLU(), nn.Linear(tower_dim, 1)
                )
                for n in self.task_names
            }
        )
        self.metrics = MultitaskWrapper({n: BinaryAUROC() for n in self.task_names})

    def shared_layer(self) -> nn.Module:
        """The experts' last layer (all experts' weights in one module), or with
        ``separate_experts`` the list of each expert's last ``Linear``.

        Returns:
            The :class:`BatchedLinear` producing the expert outputs, or an ``nn.ModuleList``.
        """
        if self.separate_experts:
            return nn.ModuleList([expert[-1] for expert in self.experts])  # type: ignore[index]
        return self.experts_out

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """Per-task logits.

        Args:
            x: Features of shape ``(batch, num_features)``.

        Returns:
            A dict ``task name -> (batch,)`` logits.
        """
        if self.separate_experts:
            z = torch.stack([expert(x) for expert in self.experts], dim=1)  # (batch, E, expert_dim)
        else:
            z = self.experts_out(F.relu(self.experts_in(x)))
        views: dict[str, Tensor] = (
            self.task_views(z) if self.use_task_views else dict.fromkeys(self.task_names, z)
        )
        out = {}
        for n in self.task_names:
            gate = torch.softmax(self.gates[n](x), dim=-1).unsqueeze(-1)  # (batch, E, 1)
            mixed = (gate * F.relu(views[n])).sum(dim=1)
            out[n] = self.towers[n](mixed).squeeze(-1)
        return out

    def task_outputs(self, batch: Batch) -> TaskOutputs:
        """Per-task binary cross-entropy on logits, and probabilities/labels for AUROC.

        Args:
            batch: ``(x, y)`` with ``y`` of shape ``(batch, num_tasks)``.

        Returns:
            The per-task BCE losses, sigmoid probabilities and integer labels.
        """
        x, y = batch
        logits = self(x)
        losses, preds, targets = {}, {}, {}
        for i, n in enumerate(self.task_names):
            losses[n] = F.binary_cross_entropy_with_logits(logits[n], y[:, i])
            preds[n] = torch.sigmoid(logits[n].detach())
            targets[n] = y[:, i].long()
        return TaskOutputs(losses, preds, targets)
