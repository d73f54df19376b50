"""The GradNorm paper's synthetic regression benchmark (Chen et al., ICML 2018, Sec. 5.1).

``T`` regression tasks share an input ``x ∈ R^250`` and have targets

    f_i(x) = sigma_i * tanh((B + eps_i) x),   f_i(x) ∈ R^100,

where ``B`` (100×250) is shared by all tasks, ``eps_i`` (100×250) is task specific and the
scale ``sigma_i`` makes the tasks' losses differ by orders of magnitude, which is what
GradNorm has to balance.

Choices the paper leaves open (all are arguments of :class:`PaperToyDataModule`):

* The paper writes ``B ~ N(0, 10)`` and ``eps_i ~ N(0, 3.5)``. We read the second argument
  as the **variance** (std ``sqrt(10)`` and ``sqrt(3.5)``); pass ``b_var``/``eps_var`` to
  change it.
* The paper does not list the ``sigma_i`` used for ``T = 10`` (its Fig. 2 uses two tasks with
  ``sigma = 1`` and ``100``). By default we spread them log-uniformly over ``[1, 100]``:
  ``sigma_i = 10 ** (2 i / (T - 1))``; pass ``sigmas`` to choose others.
* ``x ~ N(0, I)``; a fixed training, validation and test set are drawn from one seed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from gradnorm_lightning.experiments.tasks._base import (
    Batch,
    MultiTaskModule,
    OptimizerFactory,
    SchedulerFactory,
    SplitDataModule,
    TaskOutputs,
    _check_positive_int,
)

__all__ = ["PaperToyDataModule", "PaperToyModel", "default_sigmas", "make_paper_toy_data"]


def default_sigmas(num_tasks: int, low: float = 1.0, high: float = 100.0) -> list[float]:
    """Task scales spread log-uniformly over ``[low, high]`` (our default; see module doc).

    Args:
        num_tasks: Number of tasks ``T``.
        low: Smallest scale ``sigma_0``.
        high: Largest scale ``sigma_{T-1}``.

    Returns:
        ``T`` scales, increasing geometrically from ``low`` to ``high``.

    Raises:
        ValueError: If ``num_tasks < 1`` or the bounds are not ``0 < low <= high``.

    Example::

        >>> [round(s, 3) for s in default_sigmas(3)]
        [1.0, 10.0, 100.0]
    """
    _check_positive_int("num_tasks", num_tasks)
    if not 0.0 < low <= high:
        raise ValueError(f"need 0 < `low` <= `high`; got low={low!r}, high={high!r}.")
    if num_tasks == 1:
        return [float(low)]
    ratio = math.log(high / low) / (num_tasks - 1)
    return [float(low * math.exp(ratio * i)) for i in range(num_tasks)]


def make_paper_toy_data(
    num_samples: Sequence[int],
    num_tasks: int = 10,
    input_dim: int = 250,
    output_dim: int = 100,
    b_var: float = 10.0,
    eps_var: float = 3.5,
    sigmas: Sequence[float] | None = None,
    seed: int = 0,
) -> list[tuple[Tensor, Tensor]]:
    """Draw the paper's synthetic multi-task regression data.

    Args:
        num_samples: Size of each split to draw (e.g. ``(train, val, test)``); all splits share
            ``B``, ``eps_i`` and ``sigma_i``.
        num_tasks: Number of tasks ``T``.
        input_dim: Input dimension (250 in the paper).
        output_dim: Output dimension of every task (100 in the paper).
        b_var: Variance of the entries of the shared matrix ``B``.
        eps_var: Variance of the entries of the task-specific matrices ``eps_i``.
        sigmas: The ``T`` task scales; ``None`` uses :func:`default_sigmas`.
        seed: Seed of the private random generator (the global RNG is not touched).

    Returns:
        One ``(x, y)`` pair per split, ``x`` of shape ``(n, input_dim)`` and ``y`` of shape
        ``(n, num_tasks, output_dim)``, float32.

    Raises:
        ValueError: On non-positive sizes or variances, or ``len(sigmas) != num_tasks``.

    Example::

        >>> [(x.shape, y.shape) for x, y in make_paper_toy_data([4, 2], num_tasks=3)]
        [(torch.Size([4, 250]), torch.Size([4, 3, 100])), (torch.Size([2, 250]), torch.Size([2, 3, 100]))]
    """
    _check_positive_int("num_tasks", num_tasks)
    _check_positive_int("input_dim", input_dim)
    _check_positive_int("output_dim", output_dim)
    for n in num_samples:
        _check_positive_int("num_samples", n)
    if b_var < 0 or eps_var < 0:
        raise ValueError(f"variances must be >= 0; got b_var={b_var!r}, eps_var={eps_var!r}.")
    scales = default_sigmas(num_tasks) if sigmas is None else [float(s) for s in sigmas]
    if len(scales) != num_tasks:
        raise ValueError(
            f"`sigmas` must have one entry per task ({num_tasks}); got {len(scales)}: {scales!r}."
        )
    gen = torch.Generator().manual_seed(seed)
    shared = math.sqrt(b_var) * torch.randn(output_dim, input_dim, generator=gen)
    # (T, out, in): B + eps_i for every task, then sigma_i * tanh(x (B + eps_i)^T).
    matrices = shared + math.sqrt(eps_var) * torch.randn(
        num_tasks, output_dim, input_dim, generator=gen
    )
    sigma = torch.tensor(scales).view(1, num_tasks, 1)
    splits = []
    for n in num_samples:
        x = torch.randn(n, input_dim, generator=gen)
        y = sigma * torch.tanh(torch.einsum("ni,toi->nto", x, matrices))
        splits.append((x, y))
    return splits


class PaperToyDataModule(SplitDataModule):
    """Fixed train/val/test sets of the paper's toy problem, generated from ``seed``.

    Batches are ``(x, y)`` with ``y`` of shape ``(batch, num_tasks, output_dim)``.

    Args:
        num_tasks: Number of tasks ``T`` (10 in the paper).
        input_dim: Input dimension (250).
        output_dim: Output dimension per task (100).
        b_var: Variance of ``B``'s entries (the paper's ``N(0, 10)``).
        eps_var: Variance of ``eps_i``'s entries (the paper's ``N(0, 3.5)``).
        sigmas: Task scales; ``None`` = log-uniform over ``[1, 100]``.
        num_train: Training set size.
        num_val: Validation set size.
        num_test: Test set size.
        batch_size: Batch size of every loader.
        seed: Data seed (independent of the training seed, so runs share their data).
        num_workers: DataLoader workers.

    Raises:
        ValueError: On bad sizes, variances or ``sigmas`` (checked in :meth:`setup`), and on
            a non-positive ``batch_size`` (checked here).
    """

    def __init__(
        self,
        num_tasks: int = 10,
        input_dim: int = 250,
        output_dim: int = 100,
        b_var: float = 10.0,
        eps_var: float = 3.5,
        sigmas: Sequence[float] | None = None,
        num_train: int = 8192,
        num_val: int = 1024,
        num_test: int = 2048,
        batch_size: int = 128,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__(batch_size=batch_size, seed=seed, num_workers=num_workers)
        self.num_tasks = _check_positive_int("num_tasks", num_tasks)
        self.input_dim = input_dim
        self.output_dim = output_dim
        self.b_var = b_var
        self.eps_var = eps_var
        self.sigmas = default_sigmas(num_tasks) if sigmas is None else [float(s) for s in sigmas]
        self.sizes = (num_train, num_val, num_test)

    def task_descriptions(self, task_names: Sequence[str]) -> dict[str, str]:
        """Each task's scale ``sigma_i``, the one thing that sets the toy's tasks apart.

        Args:
            task_names: The model's task names, in label order.

        Returns:
            Task name to ``"σ = <sigma_i>"``.

        Example::

            >>> PaperToyDataModule(num_tasks=3).task_descriptions(["a", "b", "c"])
            {'a': 'σ = 1', 'b': 'σ = 10', 'c': 'σ = 100'}
        """
        return {name: f"σ = {sigma:.3g}" for name, sigma in zip(task_names, self.sigmas, strict=False)}

    def build_splits(self) -> dict[str, TensorDataset]:
        """Generate the three splits (called once, by ``setup``).

        Returns:
            ``train``/``val``/``test`` datasets of ``(x, y)`` pairs.
        """
        splits = make_paper_toy_data(
            self.sizes,
            num_tasks=self.num_tasks,
            input_dim=self.input_dim,
            output_dim=self.output_dim,
            b_var=self.b_var,
            eps_var=self.eps_var,
            sigmas=self.sigmas,
            seed=self.seed,
        )
        return self._datasets(splits)


class PaperToyModel(MultiTaskModule):
    """The paper's toy network: a shared ReLU MLP trunk and one linear head per task.

    The trunk is ``num_layers`` ``Linear(·, hidden_dim)`` layers with ReLU; the last trunk
    ``Linear`` is GradNorm's shared layer (:meth:`shared_layer`). Each head is
    ``Linear(hidden_dim, output_dim)`` and each task's loss is the MSE to ``y[:, i]``.

    Args:
        num_tasks: Number of tasks ``T``; tasks are named ``task0 … task{T-1}``.
        input_dim: Input dimension.
        hidden_dim: Width of every trunk layer.
        output_dim: Output dimension of every head.
        num_layers: Number of trunk ``Linear`` layers.
        use_task_views: If true, the heads read per-task aliases of the shared layer's output
            (:meth:`task_views` of the mixin), which lets GradNorm capture every task's gradient
            in the model's own backward pass.
        optimizer: Partially applied optimizer class.
        scheduler: Optional partially applied per-step LR scheduler.

    Raises:
        ValueError: If ``num_tasks < 2`` or a size is not positive.
        TypeError: If a size is not an int, or ``optimizer`` is not callable.

    Example::

        >>> model = PaperToyModel(num_tasks=2, optimizer=torch.optim.SGD)
        >>> model.shared_layer()
        Linear(in_features=100, out_features=100, bias=True)
    """

    def __init__(
        self,
        num_tasks: int = 10,
        input_dim: int = 250,
        hidden_dim: int = 100,
        output_dim: int = 100,
        num_layers: int = 4,
        use_task_views: bool = False,
        optimizer: OptimizerFactory = torch.optim.Adam,
        scheduler: SchedulerFactory | None = None,
    ) -> None:
        _check_positive_int("num_tasks", num_tasks)
        super().__init__([f"task{i}" for i in range(num_tasks)], optimizer, scheduler)
        for name, value in (
            ("input_dim", input_dim),
            ("hidden_dim", hidden_dim),
            ("output_dim", output_dim),
            ("num_layers", num_layers),
        ):
            _check_positive_int(name, value)
        self.use_task_views = bool(use_task_views)
        layers: list[nn.Module] = []
        width = input_dim
        for _ in range(num_layers):
            layers += [nn.Linear(width, hidden_dim), nn.ReLU()]
            width = hidden_dim
        # The trunk ends at the last Linear (pre-activation) so that its output is the shared
        # layer's output: the heads apply the final ReLU themselves (to per-task views if asked).
        self.trunk = nn.Sequential(*layers[:-1])
        self.heads = nn.ModuleDict({n: nn.Linear(hidden_dim, output_dim) for n in self.task_names})

    def shared_layer(self) -> nn.Module:
        """The last shared layer: the trunk's final ``Linear``.

        Returns:
            The ``nn.Linear`` whose parameters GradNorm takes gradient norms over.
        """
        layer: nn.Module = self.trunk[-1]
        return layer

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """Predict every task.

        Args:
            x: Inputs of shape ``(batch, input_dim)``.

        Returns:
            A dict ``task name -> (batch, output_dim)`` predictions.
        """
        z = self.trunk(x)
        if self.use_task_views:
            views: dict[str, Tensor] = self.task_views(z)
            return {n: self.heads[n](F.relu(views[n])) for n in self.task_names}
        h = F.relu(z)
        return {n: self.heads[n](h) for n in self.task_names}

    def task_outputs(self, batch: Batch) -> TaskOutputs:
        """Per-task MSE (the test loss is this task's metric; no separate metric).

        Args:
            batch: ``(x, y)`` with ``y`` of shape ``(batch, num_tasks, output_dim)``.

        Returns:
            The per-task MSE losses; no metric inputs.
        """
        x, y = batch
        preds = self(x)
        losses = {n: F.mse_loss(preds[n], y[:, i]) for i, n in enumerate(self.task_names)}
        return TaskOutputs(losses, {}, {})
