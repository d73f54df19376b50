"""The benchmark workloads: sizes, models, synthetic data and per-task losses.

Four workloads, each a shared trunk ending in ``shared layer -> activation`` and ``T`` heads:

* ``toy``: the GradNorm paper's regression toy (T=10), shared ``Linear(100, 100)`` + ReLU;
* ``conv``: a conv trunk flattened to 4096 features, shared ``Linear(4096, 256)`` + ReLU, T=4;
* ``dense``: dense prediction, a conv encoder, shared ``Conv2d(128, 128, 3)`` + ReLU, three conv
  decoders with per-pixel losses (segmentation, depth, surface normals);
* ``convbn``: the common ``Conv2d -> BatchNorm2d -> ReLU`` block with the convolution shared:
  what the tasks share above the shared layer is not elementwise (batch statistics), so every
  task's gradient crosses it by a backward of its own; T=4 pooled conv heads.

Every model is a :class:`MultiTaskNet`, so the methods in :mod:`benchmarks.methods` treat
them alike: ``trunk[-2]`` is the last shared layer, ``trunk`` all shared parameters.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Batch = tuple[Tensor, list[Tensor]]
LossFn = Callable[[Sequence[Tensor], Sequence[Tensor]], list[Tensor]]
WORKLOADS = ("toy", "conv", "dense", "convbn")


@dataclasses.dataclass(frozen=True)
class Workload:
    """Sizes and hyper-parameters of one benchmark workload.

    Attributes:
        name: one of :data:`WORKLOADS` (tiny test variants keep the same names).
        num_tasks: ``T`` (3 for ``dense``: segmentation, depth, normals).
        batch: batch size.
        in_dim, hidden, head_out: toy sizes (input, trunk width, head output); ``head_out``
            is also the conv heads' output width.
        image: input image ``C×H×W`` (conv, dense and convbn).
        channels: the two encoder convolutions' channels (conv and dense; for dense the
            shared layer is ``Conv2d(channels[1], channels[1], 3)``; for convbn the stem's and
            the shared ``Conv2d(channels[0], channels[1], 3)``'s output channels).
        feat: width of the conv workload's shared ``Linear(flat, feat)``.
        decoder: hidden channels of each dense decoder and of each convbn head's convolution.
        classes: segmentation classes of the dense workload.
        model_lr: SGD learning rate of the model.
        alpha, weight_lr: GradNorm's asymmetry and weight learning rate.
        min_weight: floor the weights are clamped to before renormalisation.
        check_horizon: the most steps the float64 trajectory check may compare (``None``: no
            limit). On ``convbn`` for time only: float64 convolutions on the CPU (no oneDNN
            kernels) take about 9 s a step for all rows together. On ``dense`` the SGD weights reach the floor at step ~34 and bounce on it
            from then on; rounding differences between any two exact implementations (1e-16 at
            step 0) then grow about exponentially (measured: to 1e-4 by step 49, while this
            project's default and ``mode="autograd"`` rows stay bitwise equal to each other), so
            the comparison with the textbook is only meaningful before that.
    """

    name: str
    num_tasks: int
    batch: int
    in_dim: int = 250
    hidden: int = 100
    head_out: int = 100
    image: tuple[int, int, int] = (3, 32, 32)
    channels: tuple[int, int] = (32, 64)
    feat: int = 256
    decoder: int = 32
    classes: int = 7
    model_lr: float = 1e-3
    alpha: float = 1.5
    weight_lr: float = 0.025
    min_weight: float = 1e-4
    check_horizon: int | None = None

    @property
    def flat(self) -> int:
        """Flattened conv features fed to the conv workload's shared Linear (two 2×2 poolings)."""
        _, h, w = self.image
        return self.channels[1] * (h // 4) * (w // 4)

    def describe(self) -> str:
        """One Markdown sentence describing the model, for the report."""
        c, h, w = self.image
        c1, c2 = self.channels
        if self.name == "toy":
            return (f"GradNorm paper toy: T={self.num_tasks}, input {self.in_dim}, trunk 4×(Linear(·,{self.hidden})"
                    f"+ReLU), heads Linear({self.hidden},{self.head_out}), batch {self.batch}, MSE per task; "
                    f"shared layer = last trunk Linear ({self.hidden}×{self.hidden}+{self.hidden}).")
        if self.name == "convbn":
            return (f"Conv-BatchNorm-ReLU: {c}×{h}×{w} input, stem Conv({c1})-ReLU, shared Conv2d({c1},{c2},3) "
                    f"then BatchNorm2d({c2})+ReLU (not elementwise: each task's gradient crosses it by a backward "
                    f"of its own); T={self.num_tasks} heads Conv({c2},{self.decoder},3)-ReLU-global average "
                    f"pool-Linear({self.decoder},{self.head_out}), batch {self.batch}, MSE per task.")
        if self.name == "conv":
            return (f"Conv trunk: {c}×{h}×{w} input, Conv({c1})-ReLU-Pool-Conv({c2})-ReLU-Pool "
                    f"-> {self.flat} features -> shared Linear({self.flat},{self.feat})+ReLU; T={self.num_tasks} "
                    f"heads Linear({self.feat},{self.head_out}), batch {self.batch}, MSE per task.")
        return (f"Dense prediction: {c}×{h}×{w} input, encoder Conv({c1})-ReLU-Pool-Conv({c2})-ReLU "
                f"-> shared Conv2d({c2},{c2},3)+ReLU on a {h // 2}×{w // 2} map; T={self.num_tasks} decoders "
                f"Conv({c2},{self.decoder},3)-ReLU-Conv({self.decoder},out,1)-bilinear ×2 to {h}×{w}; "
                f"per-pixel losses: segmentation cross-entropy ({self.classes} classes), depth L1, "
                f"surface normals 1 − cosine; batch {self.batch}.")


def toy_workload(tiny: bool = False) -> Workload:
    """The GradNorm paper's toy (T=10, 250-d input, 4×Linear(·,100)+ReLU trunk, batch 100)."""
    if tiny:
        return Workload("toy", num_tasks=3, batch=8, in_dim=12, hidden=10, head_out=5, model_lr=1e-3)
    return Workload("toy", num_tasks=10, batch=100, model_lr=1e-3, alpha=1.5, weight_lr=0.025)


def conv_workload(tiny: bool = False) -> Workload:
    """Conv trunk on 3×32×32 flattened to 4096 features, shared Linear(4096, 256), T=4, batch 32."""
    if tiny:
        return Workload("conv", num_tasks=3, batch=4, image=(1, 8, 8), channels=(3, 4), feat=6,
                        head_out=3, model_lr=1e-2)
    return Workload("conv", num_tasks=4, batch=32, head_out=10, model_lr=1e-2)


def dense_workload(tiny: bool = False) -> Workload:
    """Dense prediction on 3×32×32: encoder 3→64→128 to 16×16, shared Conv2d(128, 128, 3), T=3, batch 8."""
    if tiny:
        return Workload("dense", num_tasks=3, batch=2, image=(2, 8, 8), channels=(3, 4), decoder=3,
                        classes=3, model_lr=1e-2)
    return Workload("dense", num_tasks=3, batch=8, image=(3, 32, 32), channels=(64, 128), decoder=32,
                    classes=7, model_lr=1e-2, check_horizon=20)


def convbn_workload(tiny: bool = False) -> Workload:
    """Conv-BatchNorm-ReLU on 3×32×32: stem Conv(16), shared Conv2d(16, 32, 3), BatchNorm, T=4, batch 16."""
    if tiny:
        return Workload("convbn", num_tasks=3, batch=4, image=(2, 6, 6), channels=(3, 4), decoder=3,
                        head_out=2, model_lr=1e-2)
    return Workload("convbn", num_tasks=4, batch=16, image=(3, 32, 32), channels=(16, 32), decoder=8,
                    head_out=10, model_lr=1e-2, check_horizon=20)


def workload(name: str, tiny: bool = False) -> Workload:
    """The workload called ``name`` (one of :data:`WORKLOADS`)."""
    makers = {"toy": toy_workload, "conv": conv_workload, "dense": dense_workload, "convbn": convbn_workload}
    if name not in makers:
        raise ValueError(f"`name` must be one of {WORKLOADS}; got {name!r}.")
    return makers[name](tiny=tiny)


def mse_losses(outs: Sequence[Tensor], targets: Sequence[Tensor]) -> list[Tensor]:
    """Per-task MSE losses (0-dim tensors)."""
    return [F.mse_loss(o, y) for o, y in zip(outs, targets, strict=True)]


def dense_losses(outs: Sequence[Tensor], targets: Sequence[Tensor]) -> list[Tensor]:
    """Per-pixel losses, averaged: segmentation cross-entropy, depth L1, normals ``1 − cos``."""
    seg, depth, normals = outs
    seg_y, depth_y, normals_y = targets
    return [
        F.cross_entropy(seg, seg_y),
        F.l1_loss(depth, depth_y),
        (1.0 - F.cosine_similarity(normals, normals_y, dim=1)).mean(),
    ]


class MultiTaskNet(nn.Module):
    """A shared trunk ending in ``shared layer -> activation`` and ``T`` heads.

    ``trunk[-2]`` is the last shared layer, ``trunk[-1]`` what follows it (a ReLU, or
    BatchNorm + ReLU). ``view_fn``, when set, maps the shared
    representation to one tensor per head (the ``task_views`` path). ``task_losses`` turns
    the head outputs and the targets into the per-task losses.
    """

    def __init__(self, trunk: nn.Sequential, heads: nn.ModuleList, losses: LossFn = mse_losses) -> None:
        super().__init__()
        self.trunk = trunk
        self.heads = heads
        self.loss_fn = losses
        self.view_fn: Callable[[Tensor], Sequence[Tensor]] | None = None

    @property
    def shared_layer(self) -> nn.Module:
        """The last shared layer (``trunk[-2]``)."""
        return self.trunk[-2]

    def task_losses(self, outs: Sequence[Tensor], targets: Sequence[Tensor]) -> list[Tensor]:
        """Per-task losses (0-dim tensors) of the head outputs against the targets."""
        return self.loss_fn(outs, targets)

    def _heads(self, z: Tensor) -> list[Tensor]:
        views = self.view_fn(z) if self.view_fn is not None else [z] * len(self.heads)
        return [head(v) for head, v in zip(self.heads, views, strict=True)]

    def forward_with_rep(self, x: Tensor) -> tuple[Tensor, Tensor, list[Tensor]]:
        """Forward returning (shared layer output, representation read by heads, head outputs)."""
        pre = self.trunk[:-1](x)
        z = self.trunk[-1](pre)
        return pre, z, self._heads(z)

    def forward(self, x: Tensor) -> list[Tensor]:
        """Head outputs, one per task."""
        return self._heads(self.trunk(x))


def _dense_head(wl: Workload, out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(wl.channels[1], wl.decoder, 3, padding=1), nn.ReLU(),
        nn.Conv2d(wl.decoder, out, 1),
        nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
    )


def build_model(wl: Workload, seed: int = 0, dtype: torch.dtype = torch.float32,
                device: torch.device | str = "cpu") -> MultiTaskNet:
    """The workload's model, initialised deterministically from ``seed`` (on the CPU, then moved to ``device``)."""
    torch.manual_seed(seed)
    c, _, _ = wl.image
    c1, c2 = wl.channels
    losses: LossFn = mse_losses
    if wl.name == "toy":
        layers: list[nn.Module] = []
        d = wl.in_dim
        for _ in range(4):
            layers += [nn.Linear(d, wl.hidden), nn.ReLU()]
            d = wl.hidden
        trunk = nn.Sequential(*layers)
        heads = nn.ModuleList(nn.Linear(wl.hidden, wl.head_out) for _ in range(wl.num_tasks))
    elif wl.name == "conv":
        trunk = nn.Sequential(
            nn.Conv2d(c, c1, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(wl.flat, wl.feat), nn.ReLU(),
        )
        heads = nn.ModuleList(nn.Linear(wl.feat, wl.head_out) for _ in range(wl.num_tasks))
    elif wl.name == "dense":
        if wl.num_tasks != 3:
            raise ValueError(f"the dense workload has 3 tasks; got num_tasks={wl.num_tasks!r}.")
        trunk = nn.Sequential(
            nn.Conv2d(c, c1, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 3, padding=1), nn.ReLU(),
            nn.Conv2d(c2, c2, 3, padding=1), nn.ReLU(),
        )
        heads = nn.ModuleList([_dense_head(wl, wl.classes), _dense_head(wl, 1), _dense_head(wl, 3)])
        losses = dense_losses
    elif wl.name == "convbn":
        trunk = nn.Sequential(
            nn.Conv2d(c, c1, 3, padding=1), nn.ReLU(),
            nn.Conv2d(c1, c2, 3, padding=1), nn.Sequential(nn.BatchNorm2d(c2), nn.ReLU()),
        )
        heads = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c2, wl.decoder, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(wl.decoder, wl.head_out))
            for _ in range(wl.num_tasks)
        )
    else:
        raise ValueError(f"`wl.name` must be one of {WORKLOADS}; got {wl.name!r}.")
    return MultiTaskNet(trunk, heads, losses).to(device=device, dtype=dtype)


def _dense_batches(wl: Workload, n: int, g: torch.Generator, dtype: torch.dtype) -> list[Batch]:
    """Targets from fixed random 3×3 convolutions of the input (labels: their argmax)."""
    c = wl.image[0]

    def proj(k: int) -> Tensor:
        return torch.randn(k, c, 3, 3, generator=g, dtype=torch.float64) / (9 * c) ** 0.5

    p_seg, p_depth, p_normals = proj(wl.classes), proj(1), proj(3)
    out: list[Batch] = []
    for _ in range(n):
        x = torch.randn((wl.batch, *wl.image), generator=g, dtype=torch.float64)
        seg = F.conv2d(x, p_seg, padding=1).argmax(dim=1)
        depth = 10.0 * torch.tanh(F.conv2d(x, p_depth, padding=1))
        normals = F.normalize(F.conv2d(x, p_normals, padding=1), dim=1)
        out.append((x.to(dtype), [seg, depth.to(dtype), normals.to(dtype)]))
    return out


def make_batches(wl: Workload, n: int, seed: int = 1, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu") -> list[Batch]:
    """``n`` batches of inputs and per-task targets with very different scales.

    Toy (as in the paper): ``y_i = sigma_i * tanh((B + eps_i) x)`` with ``B ~ N(0, 10)``,
    ``eps_i ~ N(0, 3.5)``, ``sigma_i`` spread over ``[1, T]``. Conv: ``y_i = sigma_i *
    tanh(P_i x_flat)`` with fixed random projections ``P_i`` (convbn too). Dense: per-pixel targets from
    fixed random 3×3 convolutions ``P`` of the image: class labels ``argmax P_seg x``,
    depth ``10 tanh(P_depth x)``, unit normals ``P_normals x / ||P_normals x||``. The data
    are made on the CPU (the same numbers for every device) and then moved to ``device``.
    """
    out = _cpu_batches(wl, n, seed, dtype)
    if torch.device(device).type == "cpu":
        return out
    return [(x.to(device), [y.to(device) for y in ys]) for x, ys in out]


def _cpu_batches(wl: Workload, n: int, seed: int, dtype: torch.dtype) -> list[Batch]:
    g = torch.Generator().manual_seed(seed)
    if wl.name == "dense":
        return _dense_batches(wl, n, g, dtype)
    t = wl.num_tasks
    sigmas = torch.linspace(1.0, float(t), t, dtype=torch.float64)
    if wl.name == "toy":
        base = torch.randn(wl.head_out, wl.in_dim, generator=g, dtype=torch.float64) * 10.0**0.5
        mats = [(base + torch.randn(base.shape, generator=g, dtype=torch.float64) * 3.5**0.5) / wl.in_dim**0.5
                for _ in range(t)]
        shape: tuple[int, ...] = (wl.batch, wl.in_dim)
    else:
        d = wl.image[0] * wl.image[1] * wl.image[2]
        mats = [torch.randn(wl.head_out, d, generator=g, dtype=torch.float64) / d**0.5 for _ in range(t)]
        shape = (wl.batch, *wl.image)
    out: list[Batch] = []
    for _ in range(n):
        x = torch.randn(shape, generator=g, dtype=torch.float64)
        flat = x.reshape(x.shape[0], -1)
        ys = [(s * torch.tanh(flat @ m.T)).to(dtype) for s, m in zip(sigmas, mats, strict=True)]
        out.append((x.to(dtype), ys))
    return out
