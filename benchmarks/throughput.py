"""GPU-bound workloads as users run them, timed as throughput (issue 25).

The rows of :mod:`benchmarks.workloads` take a few milliseconds a step on a large GPU: they are
launch-bound there, so their ratios count kernel launches and host-side Python. Real training
keeps the GPU busy: the host queues the next operations while the device runs the last ones,
and it never waits for the device inside a step. Two models at a realistic size, a few hundred
GFLOP per training step (hundreds of milliseconds per plain step on a many-core CPU, tens on a
large GPU, where the arithmetic, not the launches, sets the time):

* ``resnet``: a ResNet-18-style network (a 3×3 stem, four stages of two basic blocks, 64 to 512
  channels) on 3×64×64 images, batch 32; the shared layer is the last block's second
  convolution, followed by BatchNorm, the residual add and a ReLU; ``T = 4`` linear heads on the
  pooled features, MSE each;
* ``transformer``: a pre-LN transformer encoder (6 layers, width 512, 8 heads, MLP 2048) on
  sequences of 256 tokens, batch 32; the shared layer is the last layer's second MLP Linear,
  followed by the residual add and the final LayerNorm; ``T = 4`` linear heads on the mean token.

:func:`time_throughput` runs each method for a block of steps and synchronises once at the end
of the block (a synchronisation per step would keep the host's work from overlapping the
device's); the blocks of the methods alternate, and the figure is the median block.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from benchmarks.methods import Method, PlainSum, gradnorm_settings
from benchmarks.workloads import Batch, Workload

THROUGHPUT_WORKLOADS = ("resnet", "transformer")


@dataclasses.dataclass(frozen=True)
class Size:
    """The sizes of one throughput workload."""

    name: str
    batch: int
    num_tasks: int = 4
    width: int = 64  # resnet: the first stage's channels; transformer: the model width
    depth: int = 2  # resnet: blocks per stage; transformer: layers
    image: int = 64  # resnet: the image side
    tokens: int = 128  # transformer: the sequence length
    heads: int = 4  # transformer: attention heads
    head_out: int = 10


def size(name: str, tiny: bool = False) -> Size:
    """A throughput workload's sizes (``tiny``: the CPU smoke test's)."""
    if name == "resnet":
        return Size("resnet", batch=2, width=4, depth=1, image=16) if tiny else Size("resnet", batch=32)
    if name == "transformer":
        if tiny:
            return Size("transformer", batch=2, width=8, depth=1, tokens=6, heads=2)
        return Size("transformer", batch=32, width=512, depth=6, tokens=256, heads=8)
    raise ValueError(f"`name` must be one of {THROUGHPUT_WORKLOADS}; got {name!r}.")


class _Block(nn.Module):
    """A ResNet basic block: conv-BN-ReLU-conv-BN, plus the (projected) input, ReLU."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.skip = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.skip = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))) + self.skip(x))


class _EncoderLayer(nn.Module):
    """A pre-LN transformer encoder layer: ``x + attn(ln(x))``, then ``x + fc2(gelu(fc1(ln(x))))``."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.fc1, self.fc2 = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)

    def forward(self, x: Tensor) -> Tensor:
        h = self.ln1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class ThroughputNet(nn.Module):
    """A trunk, ``T`` linear heads on its pooled features, MSE per task (the benchmark's interface:
    ``forward`` gives the head outputs, ``task_losses`` the losses, ``shared_layer`` the layer)."""

    def __init__(self, s: Size) -> None:
        super().__init__()
        self.s = s
        if s.name == "resnet":
            widths = [s.width * 2**i for i in range(4)]
            blocks: list[nn.Module] = [nn.Conv2d(3, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]),
                                       nn.ReLU()]
            c = widths[0]
            for i, w in enumerate(widths):
                for j in range(s.depth):
                    blocks.append(_Block(c, w, 2 if i > 0 and j == 0 else 1))
                    c = w
            self.trunk = nn.Sequential(*blocks, nn.AdaptiveAvgPool2d(1), nn.Flatten())
            self.shared: nn.Module = blocks[-1].conv2
        else:
            c = s.width
            self.embed = nn.Linear(16, c)
            self.layers = nn.ModuleList(_EncoderLayer(c, s.heads) for _ in range(s.depth))
            self.norm = nn.LayerNorm(c)
            self.shared = self.layers[-1].fc2
        self.heads = nn.ModuleList(nn.Linear(c, s.head_out) for _ in range(s.num_tasks))

    @property
    def shared_layer(self) -> nn.Module:
        """The last shared layer."""
        return self.shared

    def features(self, x: Tensor) -> Tensor:
        """The pooled shared features the heads read."""
        if self.s.name == "resnet":
            return self.trunk(x)
        h = self.embed(x)
        for layer in self.layers:
            h = layer(h)
        return self.norm(h).mean(dim=1)

    def forward(self, x: Tensor) -> list[Tensor]:
        """Head outputs, one per task."""
        z = self.features(x)
        return [head(z) for head in self.heads]

    @staticmethod
    def task_losses(outs: Sequence[Tensor], targets: Sequence[Tensor]) -> list[Tensor]:
        """MSE per task."""
        return [F.mse_loss(o, y) for o, y in zip(outs, targets, strict=True)]


def build(s: Size, device: torch.device | str = "cpu", seed: int = 0) -> ThroughputNet:
    """The model, initialised from ``seed`` on the CPU, then moved to ``device``."""
    torch.manual_seed(seed)
    return ThroughputNet(s).to(device)


def batches(s: Size, n: int, device: torch.device | str = "cpu", seed: int = 1) -> list[Batch]:
    """``n`` batches of random inputs and targets of different scales per task."""
    g = torch.Generator().manual_seed(seed)
    shape = (s.batch, 3, s.image, s.image) if s.name == "resnet" else (s.batch, s.tokens, 16)
    out = []
    for _ in range(n):
        x = torch.randn(shape, generator=g)
        ys = [torch.randn(s.batch, s.head_out, generator=g) * (t + 1) for t in range(s.num_tasks)]
        out.append((x.to(device), [y.to(device) for y in ys]))
    return out


def _workload(s: Size) -> Workload:
    """The settings GradNorm runs with here (those of the benchmark's rows)."""
    return Workload(s.name, num_tasks=s.num_tasks, batch=s.batch, model_lr=1e-3)


class Balanced(Method):
    """``gradnorm_lightning.GradNorm`` through the public API (``combine``, ``backward``, ``step``)."""

    def __init__(self, wl: Workload, model: ThroughputNet, name: str = "gradnorm-lightning default",
                 **options: object) -> None:
        super().__init__(wl, model)  # type: ignore[arg-type]
        from gradnorm_lightning import GradNorm

        self.gn = GradNorm(model.shared_layer, num_tasks=wl.num_tasks, **{**gradnorm_settings(wl), **options})
        self.name = name

    def step(self, batch: Batch) -> None:
        """One step."""
        x, ys = batch
        self.opt.zero_grad(set_to_none=True)
        self.gn.combine(self.model.task_losses(self.model(x), ys)).backward()
        self.gn.step()
        self.opt.step()


def rows(s: Size, device: torch.device | str = "cpu") -> list[Method]:
    """The throughput rows of one workload: the plain step and GradNorm's."""
    wl = _workload(s)
    return [PlainSum(wl, build(s, device)), Balanced(wl, build(s, device))]  # type: ignore[arg-type]


def time_throughput(methods: Sequence[Method], data: Sequence[Batch], steps: int, rounds: int,
                    sync: Callable[[], None] | None = None, warmup: int = 2) -> list[list[float]]:
    """Seconds per step of each method, one figure per round: ``steps`` steps back to back, then
    one ``sync()`` (``torch.cuda.synchronize`` on a GPU) inside the timed block; the methods'
    blocks alternate, their order rotating every round."""
    for method in methods:  # (warm-up: allocator, kernels, L(0))
        for i in range(warmup):
            method.step(data[i % len(data)])
    if sync is not None:
        sync()
    out: list[list[float]] = [[] for _ in methods]
    for r in range(rounds):
        for k in range(len(methods)):
            j = (r + k) % len(methods)
            t0 = time.perf_counter()
            for i in range(steps):
                methods[j].step(data[i % len(data)])
            if sync is not None:
                sync()
            out[j].append((time.perf_counter() - t0) / steps)
    return out


def table(names: Sequence[str], steps: int, rounds: int, device: torch.device | str = "cpu",
          tiny: bool = False) -> list[str]:
    """Part (e) of ``gpu_check.py``: the Markdown table of every throughput workload."""
    on_cuda = torch.device(device).type == "cuda"
    lines = ["| workload | method | ms/step (median of rounds) | min–max ms | ratio to plain |",
             "|---|---|---:|---:|---:|"]
    for name in names:
        s = size(name, tiny)
        methods = rows(s, device)
        data = batches(s, 4, device)
        times = time_throughput(methods, data, steps, rounds, torch.cuda.synchronize if on_cuda else None)
        plain = statistics.median(times[0])
        for method, ts in zip(methods, times, strict=True):
            med = statistics.median(ts)
            lines.append(f"| {name} (batch {s.batch}) | {method.name} | {med * 1e3:.2f} "
                         f"| {min(ts) * 1e3:.2f}–{max(ts) * 1e3:.2f} | {med / plain:.2f}× |")
        del methods, data
        if on_cuda:
            torch.cuda.empty_cache()
    return lines
