"""Dense prediction in miniature: the GradNorm paper's NYUv2 setting on synthetic scenes.

The paper (Chen et al., ICML 2018, Sec. 5.2) balances per-pixel depth regression, surface
normals and semantic segmentation on NYUv2. Here every image is drawn in code (nothing is
downloaded): a tilted background plane and a few shapes in front of it, z-buffered, shaded
by a fixed light and fogged with distance, plus pixel noise. Per pixel the targets are

* ``seg``: the class of the visible surface, ``0`` = background, ``1 .. K-1`` the shapes'
  classes (cross-entropy; metric: mean IoU over the ``K`` classes);
* ``depth``: the distance of the visible surface, about 1 to 5 (L1; metric: mean absolute error);
* ``normals``: its unit normal ``normalize(-dz/dx, -dz/dy, 1)`` (loss ``1 - cos``; metric: mean
  angular error in degrees).

A shape's class sets its colour and its geometry: class ``k`` is a sphere when
``(k - 1) % 3 == 0``, a fronto-parallel box when ``1`` and a tilted square when ``2``. Depth
and normals are visible only through fog and shading, so the three tasks differ in kind,
scale and difficulty, which is what GradNorm has to balance.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import TensorDataset
from torchmetrics import Metric
from torchmetrics.classification import MulticlassJaccardIndex
from torchmetrics.regression import MeanAbsoluteError
from torchmetrics.wrappers import MultitaskWrapper

from gradnorm_lightning.experiments.tasks._base import (
    Batch,
    MultiTaskModule,
    OptimizerFactory,
    SchedulerFactory,
    SplitDataModule,
    TaskOutputs,
    _check_positive_int,
)

__all__ = [
    "DENSE_TASKS",
    "DenseDataModule",
    "DenseMultiTaskModel",
    "MeanAngularError",
    "make_dense_data",
]

DENSE_TASKS: tuple[str, ...] = ("seg", "depth", "normals")

_LIGHT = (0.4, -0.5, 1.0)  # direction towards the light (x right, y down, z to the camera)


def _check_image_args(image_size: int, num_classes: int, max_shapes: int, noise: float) -> None:
    _check_positive_int("image_size", image_size)
    if image_size < 8 or image_size % 2:
        raise ValueError(f"`image_size` must be an even number >= 8; got {image_size!r}.")
    _check_positive_int("num_classes", num_classes)
    if num_classes < 2:
        raise ValueError(f"`num_classes` must be >= 2 (background + shapes); got {num_classes!r}.")
    _check_positive_int("max_shapes", max_shapes)
    if noise < 0:
        raise ValueError(f"`noise` must be >= 0; got {noise!r}.")


def _scenes(
    n: int, size: int, num_classes: int, max_shapes: int, colours: Tensor, gen: torch.Generator
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Render ``n`` scenes: albedo ``(n,3,H,W)``, labels ``(n,H,W)``, depth, normals."""
    u = lambda *shape: torch.rand(*shape, generator=gen)  # noqa: E731
    coords = (torch.arange(size, dtype=torch.float32) + 0.5) / size * 2 - 1
    y, x = torch.meshgrid(coords, coords, indexing="ij")  # (H, W), in [-1, 1]
    # Background: the plane z = z0 + gx x + gy y.
    z0, gx, gy = 4.0 + u(n, 1, 1), 0.6 * u(n, 1, 1) - 0.3, 0.6 * u(n, 1, 1)
    depth = z0 + gx * x + gy * y
    normal = torch.stack(torch.broadcast_tensors(-gx, -gy, torch.ones_like(gx)), 1)
    normal = normal.expand(n, 3, size, size).clone()
    labels = torch.zeros(n, size, size, dtype=torch.long)
    for _ in range(max_shapes):
        present = (u(n, 1, 1) < 0.85).float()
        cls = torch.randint(1, num_classes, (n, 1, 1), generator=gen)
        cx, cy = 1.4 * u(n, 1, 1) - 0.7, 1.4 * u(n, 1, 1) - 0.7
        r = 0.2 + 0.3 * u(n, 1, 1)
        base = 1.5 + 2.0 * u(n, 1, 1)
        tilt = 2.0 * u(n, 1, 1) - 1.0
        dx, dy = x - cx, y - cy
        kind = (cls - 1) % 3
        rho2 = dx**2 + dy**2
        cap = torch.sqrt((r**2 - rho2).clamp_min(0.0))
        square = (dx.abs() < r) & (dy.abs() < r)
        inside = torch.where(kind == 0, rho2 < r**2, square) & (present > 0)
        shape_depth = torch.where(kind == 0, base - cap, base + torch.where(kind == 2, tilt * dx, 0))
        zero, one = torch.zeros_like(dx), torch.ones_like(dx)
        nx = torch.where(kind == 0, -dx, torch.where(kind == 2, -tilt * one, zero))
        ny = torch.where(kind == 0, -dy, zero)
        nz = torch.where(kind == 0, cap, one)
        visible = inside & (shape_depth < depth)
        depth = torch.where(visible, shape_depth, depth)
        labels = torch.where(visible, cls, labels)
        normal = torch.where(visible.unsqueeze(1), torch.stack([nx, ny, nz], 1), normal)
    normal = F.normalize(normal, dim=1)
    albedo = colours[labels].permute(0, 3, 1, 2)
    return albedo, labels, depth.unsqueeze(1), normal


def make_dense_data(
    num_samples: Sequence[int],
    image_size: int = 32,
    num_classes: int = 4,
    max_shapes: int = 3,
    noise: float = 0.05,
    seed: int = 0,
) -> list[tuple[Tensor, Tensor, Tensor, Tensor]]:
    """Draw synthetic scenes with per-pixel segmentation, depth and normal targets.

    Args:
        num_samples: Size of each split (e.g. ``(train, val, test)``); all splits share the
            class colours.
        image_size: Height and width ``H = W`` (even, at least 8).
        num_classes: ``K``, background included (at least 2).
        max_shapes: Shapes drawn per image (each present with probability 0.85).
        noise: Std of the Gaussian pixel noise.
        seed: Seed of the private random generator (the global RNG is not touched).

    Returns:
        One ``(image, seg, depth, normals)`` tuple per split: ``image`` ``(n, 3, H, W)``
        float, ``seg`` ``(n, H, W)`` int64 in ``[0, K)``, ``depth`` ``(n, 1, H, W)``,
        ``normals`` ``(n, 3, H, W)`` of unit length.

    Raises:
        TypeError: If a size is not an int.
        ValueError: On a non-positive size, an odd or too small ``image_size``,
            ``num_classes < 2`` or a negative ``noise``.

    Example::

        >>> (image, seg, depth, normals), = make_dense_data([2], image_size=16)
        >>> tuple(image.shape), tuple(seg.shape), tuple(depth.shape), tuple(normals.shape)
        ((2, 3, 16, 16), (2, 16, 16), (2, 1, 16, 16), (2, 3, 16, 16))
    """
    _check_image_args(image_size, num_classes, max_shapes, noise)
    for n in num_samples:
        _check_positive_int("num_samples", n)
    gen = torch.Generator().manual_seed(seed)
    colours = 0.15 + 0.85 * torch.rand(num_classes, 3, generator=gen)
    light = F.normalize(torch.tensor(_LIGHT), dim=0).view(1, 3, 1, 1)
    splits = []
    for n in num_samples:
        albedo, seg, depth, normals = _scenes(
            n, image_size, num_classes, max_shapes, colours, gen
        )
        shading = 0.35 + 0.65 * (normals * light).sum(1, keepdim=True).clamp_min(0.0)
        fog = torch.exp(-0.25 * (depth - 1.0))
        image = albedo * shading * fog
        image = image + noise * torch.randn(image.shape, generator=gen)
        splits.append((image, seg, depth, normals))
    return splits


class DenseDataModule(SplitDataModule):
    """Fixed train/val/test sets of synthetic scenes (see :func:`make_dense_data`).

    Batches are ``(image, seg, depth, normals)``.

    Args:
        image_size: Height and width of the images (even, at least 8).
        num_classes: Segmentation classes ``K``, background included.
        max_shapes: Shapes per image.
        noise: Pixel noise std.
        num_train: Training set size.
        num_val: Validation set size.
        num_test: Test set size.
        batch_size: Batch size.
        seed: Data seed (independent of the training seed).
        num_workers: DataLoader workers.

    Raises:
        TypeError: If a size is not an int.
        ValueError: On bad sizes, ``num_classes < 2`` or a negative ``noise``.
    """

    def __init__(
        self,
        image_size: int = 32,
        num_classes: int = 4,
        max_shapes: int = 3,
        noise: float = 0.05,
        num_train: int = 1024,
        num_val: int = 128,
        num_test: int = 256,
        batch_size: int = 16,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__(batch_size=batch_size, seed=seed, num_workers=num_workers)
        _check_image_args(image_size, num_classes, max_shapes, noise)
        self.image_size = image_size
        self.num_classes = num_classes
        self.max_shapes = max_shapes
        self.noise = float(noise)
        self.sizes = (num_train, num_val, num_test)

    def task_descriptions(self, task_names: Sequence[str]) -> dict[str, str]:
        """Each task's loss (the tasks differ in kind: classes, distances, angles).

        Args:
            task_names: The model's task names.

        Returns:
            Task name to its loss, for the tasks of :data:`DENSE_TASKS`.
        """
        known = {"seg": "cross-entropy", "depth": "L1", "normals": "1 − cos"}
        return {n: known[n] for n in task_names if n in known}

    def build_splits(self) -> dict[str, TensorDataset]:
        """Draw the three splits (called once, by ``setup``).

        Returns:
            ``train``/``val``/``test`` datasets of ``(image, seg, depth, normals)``.
        """
        splits = make_dense_data(
            self.sizes, self.image_size, self.num_classes, self.max_shapes, self.noise, self.seed
        )
        return self._datasets(splits)


class MeanAngularError(Metric):
    """Mean angle in degrees between predicted and target unit vectors along dim 1.

    Example::

        >>> metric = MeanAngularError()
        >>> metric.update(torch.tensor([[1.0, 0.0, 0.0]]), torch.tensor([[0.0, 1.0, 0.0]]))
        >>> metric.compute()
        tensor(90.)
    """

    higher_is_better = False
    is_differentiable = False
    full_state_update = False
    total: Tensor
    count: Tensor

    def __init__(self) -> None:
        super().__init__()
        self.add_state("total", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: Tensor, target: Tensor) -> None:
        """Add the angles of one batch.

        Args:
            preds: Predicted vectors ``(N, 3, ...)`` (normalised here).
            target: Unit target vectors, same shape.
        """
        cos = (F.normalize(preds, dim=1) * target).sum(1).clamp(-1.0, 1.0)
        self.total += torch.rad2deg(torch.acos(cos)).sum().double()
        self.count += cos.numel()

    def compute(self) -> Tensor:
        """The mean angle.

        Returns:
            The mean over all pixels seen, in degrees (float32).
        """
        return (self.total / self.count).float()


def _conv_block(c_in: int, c_out: int, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1), nn.ReLU()]


class DenseMultiTaskModel(MultiTaskModule):
    """A small fully convolutional net: encoder, one shared conv, three conv decoders.

    Encoder: ``Conv(3→C/2) → ReLU → Conv(C/2→C, stride 2) → ReLU → Conv(C→C) → ReLU``, then the
    shared layer ``nn.Conv2d(C, C, 3, padding=1)`` (:meth:`shared_layer`) at half resolution.
    Each decoder: ``ReLU → Conv(C→D) → ReLU → 2× bilinear upsampling → Conv(D→D) → ReLU →
    Conv(D→out, 1)``, with ``out`` = ``K`` logits, 1 depth, 3 normal components. Losses are
    per-pixel means: cross-entropy, L1 and ``1 - cos`` (predicted normals normalised).

    Args:
        num_classes: Segmentation classes ``K``.
        channels: Width ``C`` of the encoder and the shared layer.
        decoder_channels: Width ``D`` of each decoder.
        use_task_views: If true, each decoder reads its own alias of the shared layer's output.
        optimizer: Partially applied optimizer class.
        scheduler: Optional partially applied per-step LR scheduler.

    Raises:
        TypeError: If a size is not an int or ``optimizer`` is not callable.
        ValueError: If a size is not positive, ``channels`` is odd or ``num_classes < 2``.

    Example::

        >>> model = DenseMultiTaskModel(channels=8, decoder_channels=4, optimizer=torch.optim.Adam)
        >>> model.shared_layer()
        Conv2d(8, 8, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1))
        >>> {k: tuple(v.shape) for k, v in model(torch.zeros(2, 3, 16, 16)).items()}
        {'seg': (2, 4, 16, 16), 'depth': (2, 1, 16, 16), 'normals': (2, 3, 16, 16)}
    """

    def __init__(
        self,
        num_classes: int = 4,
        channels: int = 32,
        decoder_channels: int = 16,
        use_task_views: bool = False,
        optimizer: OptimizerFactory = torch.optim.Adam,
        scheduler: SchedulerFactory | None = None,
    ) -> None:
        super().__init__(DENSE_TASKS, optimizer, scheduler)
        for name, value in (
            ("num_classes", num_classes),
            ("channels", channels),
            ("decoder_channels", decoder_channels),
        ):
            _check_positive_int(name, value)
        if num_classes < 2:
            raise ValueError(f"`num_classes` must be >= 2; got {num_classes!r}.")
        if channels % 2:
            raise ValueError(f"`channels` must be even; got {channels!r}.")
        self.num_classes = num_classes
        self.use_task_views = bool(use_task_views)
        half = channels // 2
        self.encoder = nn.Sequential(
            *_conv_block(3, half), *_conv_block(half, channels, 2), *_conv_block(channels, channels)
        )
        self.shared = nn.Conv2d(channels, channels, 3, padding=1)
        outputs = {"seg": num_classes, "depth": 1, "normals": 3}
        self.decoders = nn.ModuleDict(
            {
                name: nn.Sequential(
                    nn.ReLU(),
                    *_conv_block(channels, decoder_channels),
                    nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
                    *_conv_block(decoder_channels, decoder_channels),
                    nn.Conv2d(decoder_channels, out, 1),
                )
                for name, out in outputs.items()
            }
        )
        self.metrics = MultitaskWrapper(
            {
                "seg": MulticlassJaccardIndex(num_classes=num_classes, average="macro"),
                "depth": MeanAbsoluteError(),
                "normals": MeanAngularError(),
            }
        )

    def shared_layer(self) -> nn.Module:
        """The shared ``Conv2d(C, C, 3, padding=1)`` every decoder reads.

        Returns:
            The shared convolution.
        """
        return self.shared

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        """Per-pixel outputs.

        Args:
            images: ``(N, 3, H, W)``, ``H`` and ``W`` even.

        Returns:
            ``seg`` logits ``(N, K, H, W)``, ``depth`` ``(N, 1, H, W)`` and un-normalised
            ``normals`` ``(N, 3, H, W)``.
        """
        z = self.shared(self.encoder(images))
        views: dict[str, Tensor] = (
            self.task_views(z) if self.use_task_views else dict.fromkeys(self.task_names, z)
        )
        return {name: self.decoders[name](views[name]) for name in self.task_names}

    def task_outputs(self, batch: Batch) -> TaskOutputs:
        """Per-pixel mean losses, and the inputs of the per-task metrics.

        Args:
            batch: ``(image, seg, depth, normals)``.

        Returns:
            Cross-entropy, L1 and ``1 - cos`` losses; argmax labels, depth and normals with
            their targets.
        """
        images, seg, depth, normals = batch
        out = self(images)
        pred_normals = F.normalize(out["normals"], dim=1)
        losses = {
            "seg": F.cross_entropy(out["seg"], seg),
            "depth": F.l1_loss(out["depth"], depth),
            "normals": 1.0 - (pred_normals * normals).sum(1).mean(),
        }
        preds = {
            "seg": out["seg"].detach().argmax(dim=1),
            "depth": out["depth"].detach(),
            "normals": pred_normals.detach(),
        }
        targets = {"seg": seg, "depth": depth, "normals": normals}
        return TaskOutputs(losses, preds, targets)

