"""A generator of small, seeded, float64 multi-task models for the differential tests.

A :class:`Spec` names one model along these axes:

* ``layer``: the last shared layer: ``linear``, ``conv1d``, ``conv2d``, ``layernorm`` (a
  parametric norm), ``block`` (an ``nn.Sequential`` Linear-ReLU-Linear), ``gru`` and ``lstm``
  (batch-first, tuple outputs), ``mha`` (``nn.MultiheadAttention``: ``(attn, weights)``),
  ``experts`` (an MMoE-style batched-experts layer, output ``(B, E, out)``), ``dict`` and
  ``dataclass`` (a user block returning a dict / a dataclass of two tensors);
* ``between``: what sits between the shared layer's primary output and the heads: ``none``,
  ``tanh``, ``relu``, ``relu_inplace`` (``nn.ReLU(inplace=True)``), ``relu_``
  (``torch.relu_``), ``layernorm`` (``F.layer_norm`` without affine), ``softmax``;
* ``frozen``: parameters of the shared layer with ``requires_grad=False``: ``none``,
  ``weight`` / ``bias`` (every parameter whose name contains it, frozen at build time),
  ``weight_late`` (the weights frozen after step 0, i.e. after the balancer was built and
  took its first step);
* ``read``: how the heads read the representation ``z``: ``direct`` (``head_i(z)``),
  ``slice`` (``head_i(z[:, i::T])``), ``twice`` (``h_i(z) + g_i(z)``), ``residual``
  (``head_i(z + x_in)``, ``x_in`` the shared layer's input), ``hierarchical`` (task 1 also
  reads task 0's head output), ``parts`` (layers with several outputs only: head ``i``
  reads output ``i mod n``: e.g. GRU ``output`` / ``h_n``, MHA ``attn`` / ``weights``);
* ``reuse``: the shared layer called once, or twice (``layer(tanh(layer(x)))``);
* ``absent``: ``none``; ``missing`` (the last task's loss is ``None`` at steps
  :data:`ABSENT_STEPS`); ``nan`` (the last task's loss is a masked mean over an empty
  mask at those steps: NaN, with a graph);
* ``num_tasks``: 3 or 2.

Whether the heads read per-task views (``GradNorm.task_views``) is not part of the model:
:func:`build` returns ``forward(batch, views_fn)`` and the caller passes ``views_fn``;
:attr:`Spec.views_valid` says where views are meaningful (every head reads ``z``, or a
shared parameter-free function of it, only through its own view).

Samples: :func:`ci_specs` (one-factor-at-a-time from a base spec, plus a seeded greedy
sample covering every feasible pair of axis values), :func:`full_specs` (the product of the
model axes), :func:`representation_specs` (a few, for ``mode="representation"``).
"""

from __future__ import annotations

import dataclasses
import itertools
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

LAYERS: tuple[str, ...] = (
    "linear", "conv1d", "conv2d", "layernorm", "block", "gru", "lstm", "mha", "experts", "dict", "dataclass",
)
BETWEEN: tuple[str, ...] = ("none", "tanh", "relu", "relu_inplace", "relu_", "layernorm", "softmax")
FROZEN: tuple[str, ...] = ("none", "weight", "bias", "weight_late")
READS: tuple[str, ...] = ("direct", "slice", "twice", "residual", "hierarchical", "parts")
REUSE: tuple[int, ...] = (1, 2)
ABSENT: tuple[str, ...] = ("none", "missing", "nan")
NUM_TASKS: tuple[int, ...] = (3, 2)

#: the axes of a :class:`Spec` (all but ``seed``), in field order
AXES: dict[str, tuple[object, ...]] = {
    "layer": LAYERS,
    "between": BETWEEN,
    "frozen": FROZEN,
    "read": READS,
    "reuse": REUSE,
    "absent": ABSENT,
    "num_tasks": NUM_TASKS,
}

#: layers whose output has several tensors (the ``parts`` read needs them)
MULTI_OUTPUT: frozenset[str] = frozenset({"gru", "lstm", "mha", "dict", "dataclass"})
#: reads in which every head reads ``z`` only through its own view
VIEW_READS: frozenset[str] = frozenset({"direct", "slice", "twice", "residual"})

STEPS = 4  #: training steps of one run
ABSENT_STEPS: frozenset[int] = frozenset({1, 2})  #: steps in which the last task is absent
CI_PAIRWISE_SAMPLES = 3  #: pairwise samples in the CI set (about 80 specs each)
FREEZE_STEP = 1  #: ``weight_late``: frozen before this step's forward (after step 0's update)

BATCH = 8
FEATURES = 6  # vector / sequence features (square, so residual and reuse fit)
SEQ_LEN = 3
CONV1D_SHAPE = (4, 5)  # channels, length
CONV2D_SHAPE = (3, 4, 4)  # channels, height, width
EXPERTS = 3
HIDDEN = 8  # the block's inner width
HEAD_OUT = 2  # each task predicts HEAD_OUT numbers


@dataclass(frozen=True)
class Spec:
    """One generated multi-task model (see the module docstring for the axes)."""

    layer: str = "linear"
    between: str = "none"
    frozen: str = "none"
    read: str = "direct"
    reuse: int = 1
    absent: str = "none"
    num_tasks: int = 3
    seed: int = 0

    @property
    def id(self) -> str:
        """A readable test id, e.g. ``gru-relu_inplace-frz_weight-parts-x1-abs_nan-T3-s4``."""
        return (
            f"{self.layer}-{self.between}-frz_{self.frozen}-{self.read}-x{self.reuse}"
            f"-abs_{self.absent}-T{self.num_tasks}-s{self.seed}"
        )

    @property
    def views_valid(self) -> bool:
        """Whether ``task_views`` is meaningful: each head reads ``z`` only via its own view."""
        return self.read in VIEW_READS

    def present(self, step: int) -> list[bool]:
        """Which tasks have a finite loss at ``step``."""
        absent = self.absent != "none" and step in ABSENT_STEPS
        return [not (absent and i == self.num_tasks - 1) for i in range(self.num_tasks)]

    def with_(self, **changes: object) -> Spec:
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]


def invalid_reason(spec: Spec) -> str | None:
    """Why ``spec`` is not a meaningful model, or None when it is."""
    for name, values in AXES.items():
        if getattr(spec, name) not in values:
            return f"{name}={getattr(spec, name)!r} is not one of {values}"
    if spec.read == "parts" and spec.layer not in MULTI_OUTPUT:
        return f"read='parts' needs a layer with several outputs; {spec.layer} has one"
    if (
        spec.layer in ("conv1d", "conv2d") and spec.frozen in ("weight", "weight_late")
        and spec.between in ("layernorm", "softmax") and spec.reuse == 1
    ):
        # the only trainable parameter left is a per-channel bias, constant along the last
        # dim, which layer_norm / softmax over that dim cancel: every norm is exactly 0
        return "frozen conv weight behind a normalisation over the last dim: all norms are 0"
    return None


def is_valid(spec: Spec) -> bool:
    """Whether ``spec`` names a meaningful model."""
    return invalid_reason(spec) is None


# ---------------------------------------------------------------------- building blocks
class BatchedExperts(nn.Module):
    """MMoE-style experts sharing one layer: ``weight (E, in, out)``, ``bias (E, out)``.

    ``forward(x)`` maps ``(B, in)`` to ``(B, E, out)`` with one einsum.
    """

    def __init__(self, num_experts: int, d_in: int, d_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(num_experts, d_in, d_out) / d_in**0.5)
        self.bias = nn.Parameter(0.1 * torch.randn(num_experts, d_out))

    def forward(self, x: Tensor) -> Tensor:
        """``(B, in) -> (B, E, out)``."""
        return torch.einsum("bi,eio->beo", x, self.weight) + self.bias


class DictBlock(nn.Module):
    """A user block returning a dict of two tensors, ``{"a": (B, d), "b": (B, 3)}``."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.a = nn.Linear(d, d)
        self.b = nn.Linear(d, 3)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """Both outputs, keyed by name."""
        return {"a": self.a(x), "b": torch.tanh(self.b(x))}


@dataclass
class BlockOutput:
    """The output of :class:`DataclassBlock`."""

    a: Tensor
    b: Tensor


class DataclassBlock(DictBlock):
    """A user block returning a dataclass of two tensors."""

    def forward(self, x: Tensor) -> BlockOutput:  # type: ignore[override]
        """Both outputs as a :class:`BlockOutput`."""
        out = super().forward(x)
        return BlockOutput(out["a"], out["b"])


class Head(nn.Module):
    """Flatten + Linear; for the experts layer, an MMoE gate (from ``x_in``) mixes the experts first."""

    def __init__(self, in_features: int, gate_in: int | None = None) -> None:
        super().__init__()
        self.gate = nn.Linear(gate_in, EXPERTS) if gate_in is not None else None
        self.lin = nn.Linear(in_features, HEAD_OUT)

    def forward(self, z: Tensor, x_in: Tensor) -> Tensor:
        """The task's prediction ``(B, HEAD_OUT)``."""
        if self.gate is not None:
            z = torch.einsum("be,beo->bo", self.gate(x_in).softmax(-1), z)
        return self.lin(z.flatten(1))


@dataclass
class Batch:
    """One step's data: input ``x``, targets ``y (B, T, HEAD_OUT)``, label mask ``(B, T)``."""

    step: int
    x: Tensor
    y: Tensor
    mask: Tensor

    def to(self, device: torch.device | str) -> Batch:
        """The same batch on ``device``."""
        return Batch(self.step, self.x.to(device), self.y.to(device), self.mask.to(device))


def _make_layer(layer: str) -> nn.Module:
    d = FEATURES
    makers: dict[str, Callable[[], nn.Module]] = {
        "linear": lambda: nn.Linear(d, d),
        "conv1d": lambda: nn.Conv1d(CONV1D_SHAPE[0], CONV1D_SHAPE[0], 3, padding=1),
        "conv2d": lambda: nn.Conv2d(CONV2D_SHAPE[0], CONV2D_SHAPE[0], 3, padding=1),
        "layernorm": lambda: nn.LayerNorm(d),
        "block": lambda: nn.Sequential(nn.Linear(d, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, d)),
        "gru": lambda: nn.GRU(d, d, batch_first=True),
        "lstm": lambda: nn.LSTM(d, d, batch_first=True),
        "mha": lambda: nn.MultiheadAttention(d, 2, batch_first=True),
        "experts": lambda: BatchedExperts(EXPERTS, d, d),
        "dict": lambda: DictBlock(d),
        "dataclass": lambda: DataclassBlock(d),
    }
    return makers[layer]()


def _make_pre(layer: str) -> nn.Module:
    """A trainable layer below the shared one (so ``x_in`` is computed, not data)."""
    if layer == "conv1d":
        return nn.Sequential(nn.Conv1d(CONV1D_SHAPE[0], CONV1D_SHAPE[0], 1), nn.Tanh())
    if layer == "conv2d":
        return nn.Sequential(nn.Conv2d(CONV2D_SHAPE[0], CONV2D_SHAPE[0], 1), nn.Tanh())
    return nn.Sequential(nn.Linear(FEATURES, FEATURES), nn.Tanh())


def input_shape(layer: str) -> tuple[int, ...]:
    """The shape of one batch's input ``x`` for ``layer``."""
    if layer == "conv1d":
        return (BATCH, *CONV1D_SHAPE)
    if layer == "conv2d":
        return (BATCH, *CONV2D_SHAPE)
    if layer in ("gru", "lstm", "mha"):
        return (BATCH, SEQ_LEN, FEATURES)
    return (BATCH, FEATURES)


def output_parts(layer: str, output: Any) -> dict[str, Tensor]:
    """The shared layer's output as named tensors, batch first; the first is the primary one."""
    if layer in ("gru", "lstm"):
        out, state = output
        if layer == "gru":
            return {"out": out, "h_n": state.transpose(0, 1)}
        h_n, c_n = state
        return {"out": out, "h_n": h_n.transpose(0, 1), "c_n": c_n.transpose(0, 1)}
    if layer == "mha":
        attn, weights = output
        return {"attn": attn, "weights": weights}
    if layer == "dict":
        return dict(output)
    if layer == "dataclass":
        return {f.name: getattr(output, f.name) for f in dataclasses.fields(output)}
    assert isinstance(output, Tensor)
    return {"z": output}


def output_tensors(output: object) -> list[Tensor]:
    """Every tensor of a layer output (tensor, tuple/list, dict or dataclass), in order."""
    if isinstance(output, Tensor):
        return [output]
    if isinstance(output, (tuple, list)):
        return [t for o in output for t in output_tensors(o)]
    if isinstance(output, dict):
        return [t for o in output.values() for t in output_tensors(o)]
    if dataclasses.is_dataclass(output) and not isinstance(output, type):
        return [t for f in dataclasses.fields(output) for t in output_tensors(getattr(output, f.name))]
    return []


def _between(name: str, z: Tensor, act_inplace: nn.Module) -> Tensor:
    if name == "none":
        return z
    if name == "tanh":
        return torch.tanh(z)
    if name == "relu":
        return torch.relu(z)
    if name == "relu_inplace":
        return act_inplace(z)
    if name == "relu_":
        return torch.relu_(z)
    if name == "layernorm":
        return F.layer_norm(z, z.shape[-1:])
    if name == "softmax":
        return z.softmax(-1)
    raise ValueError(f"unknown between-op {name!r}")


Views = Callable[[Tensor], Sequence[Tensor]]


class ZooModel(nn.Module):
    """The generated model: ``pre`` -> ``shared`` (once or twice) -> between-op -> heads.

    ``shared`` is the last shared layer; :meth:`task_losses` is the forward.
    """

    def __init__(self, spec: Spec) -> None:
        super().__init__()
        reason = invalid_reason(spec)
        if reason is not None:
            raise ValueError(f"invalid spec {spec.id}: {reason}")
        self.spec = spec
        self.pre = _make_pre(spec.layer)
        self.shared = _make_layer(spec.layer)
        with torch.no_grad():  # biased towards positive outputs: fewer dead ReLUs in small slices
            for name, p in self.shared.named_parameters():
                if "bias" in name.rsplit(".", 1)[-1]:
                    p.add_(0.3)
        self.act_inplace = nn.ReLU(inplace=True)
        with torch.no_grad():  # shapes of the heads' inputs
            x_in = self.pre(torch.zeros(input_shape(spec.layer)))
            inputs = self._head_inputs(self._shared_forward(x_in), x_in, None)
        # experts: an MMoE gate per task mixes the experts, so the head's Linear sees one expert
        gate = FEATURES if spec.layer == "experts" and spec.read != "slice" else None
        self.heads = nn.ModuleList([
            Head(inp.shape[-1] if gate is not None else inp[0].numel(), gate) for inp in inputs
        ])
        self.heads2 = nn.ModuleList([Head(inp[0].numel()) for inp in inputs]) if spec.read == "twice" else None
        self.hier = nn.Linear(HEAD_OUT, HEAD_OUT) if spec.read == "hierarchical" else None
        self.double()
        if spec.frozen in ("weight", "bias"):
            self.freeze(spec.frozen)

    # -------------------------------------------------------------- pieces of the forward
    def _call(self, x: Tensor) -> Any:
        if self.spec.layer == "mha":
            return self.shared(x, x, x)
        return self.shared(x)

    def _shared_forward(self, x_in: Tensor) -> dict[str, Tensor]:
        """The shared layer's output parts, after reuse and the between-op (on the primary)."""
        layer = self.spec.layer
        parts = output_parts(layer, self._call(x_in))
        if self.spec.reuse == 2:
            primary = next(iter(parts.values()))
            again = primary.mean(1) if layer == "experts" else primary
            parts = output_parts(layer, self._call(torch.tanh(again)))
        name = next(iter(parts))
        parts[name] = _between(self.spec.between, parts[name], self.act_inplace)
        return parts

    def _residual(self, x_in: Tensor) -> Tensor:
        return x_in.unsqueeze(1) if self.spec.layer == "experts" else x_in

    def _head_inputs(self, parts: dict[str, Tensor], x_in: Tensor, views_fn: Views | None) -> list[Tensor]:
        spec = self.spec
        t = spec.num_tasks
        if spec.read == "parts":
            tensors = list(parts.values())
            return [tensors[i % len(tensors)] for i in range(t)]
        z = next(iter(parts.values()))
        views = list(views_fn(z)) if views_fn is not None and spec.read != "hierarchical" else [z] * t
        if len(views) != t:
            raise ValueError(f"views_fn returned {len(views)} views for {t} tasks")
        if spec.read == "slice":
            return [v[:, i::t] for i, v in enumerate(views)]
        if spec.read == "residual":
            return [v + self._residual(x_in) for v in views]
        return views

    def freeze(self, which: str) -> None:
        """Set ``requires_grad=False`` on the shared layer's parameters whose name contains ``which``."""
        key = which.removesuffix("_late")
        for name, p in self.shared.named_parameters():
            if key in name.rsplit(".", 1)[-1]:
                p.requires_grad_(False)

    def before_step(self, step: int) -> None:
        """Call before each step's forward: applies the late freeze."""
        if self.spec.frozen == "weight_late" and step == FREEZE_STEP:
            self.freeze("weight")

    def task_losses(self, batch: Batch, views_fn: Views | None = None) -> list[Tensor | None]:
        """The forward: ``T`` scalar losses, ``None`` for a missing task, NaN (with a graph) for no labels.

        Args:
            batch: the step's data.
            views_fn: ``GradNorm.task_views`` (or any function returning ``T`` aliases of its
                argument); ``None`` means every head reads ``z`` itself.
        """
        spec = self.spec
        present = spec.present(batch.step)
        x_in = self.pre(batch.x)
        inputs = self._head_inputs(self._shared_forward(x_in), x_in, views_fn)
        outs: list[Tensor | None] = []
        for i, (head, inp) in enumerate(zip(self.heads, inputs)):
            if not present[i] and spec.absent == "missing":
                outs.append(None)
                continue
            y = head(inp, x_in)
            if self.heads2 is not None:
                y = y + self.heads2[i](inp, x_in)
            if self.hier is not None and i == 1:
                y0 = outs[0]
                assert y0 is not None
                y = y + self.hier(y0)
            outs.append(y)
        losses: list[Tensor | None] = []
        for i, y in enumerate(outs):
            if y is None:
                losses.append(None)
                continue
            err = (y - batch.y[:, i]).pow(2).mean(1)
            if spec.absent == "nan" and i == spec.num_tasks - 1:
                mask = batch.mask[:, i] if present[i] else torch.zeros_like(batch.mask[:, i])
                losses.append(err[mask].mean())  # masked mean: NaN over an empty mask
            else:
                losses.append(err.mean())
        return losses


Forward = Callable[[Batch, Views | None], list[Tensor | None]]


def build(spec: Spec) -> tuple[ZooModel, nn.Module, Forward]:
    """The seeded float64 model of ``spec``: ``(model, shared_layer, forward)``.

    ``forward(batch, views_fn)`` is ``model.task_losses``; a ``copy.deepcopy`` of the model is
    identical (use its ``shared`` and ``task_losses``).
    """
    torch.manual_seed(spec.seed)
    model = ZooModel(spec)
    return model, model.shared, model.task_losses


def batches(spec: Spec, steps: int = STEPS) -> list[Batch]:
    """Seeded data for ``steps`` steps; the tasks' targets have very different scales."""
    g = torch.Generator().manual_seed(10_000 + spec.seed)
    t = spec.num_tasks
    scales = torch.logspace(0, 0.5, t, dtype=torch.float64).view(1, t, 1)
    out = []
    for step in range(steps):
        x = torch.randn(input_shape(spec.layer), generator=g, dtype=torch.float64)
        y = torch.randn(BATCH, t, HEAD_OUT, generator=g, dtype=torch.float64) * scales
        mask = torch.rand(BATCH, t, generator=g) < 0.6
        mask[:2] = True  # at least two labelled rows per task
        out.append(Batch(step, x, y, mask))
    return out


# ---------------------------------------------------------------------- samples
def _random_spec(rng: random.Random, fixed: dict[str, object] | None = None) -> Spec | None:
    fixed = fixed or {}
    for _ in range(50):
        values = {k: fixed.get(k, rng.choice(v)) for k, v in AXES.items()}
        spec = Spec(**values)  # type: ignore[arg-type]
        if is_valid(spec):
            return spec
    return None


def axis_pairs(spec: Spec) -> set[tuple[str, object, str, object]]:
    """Every pair of (axis, value) that ``spec`` exhibits."""
    items = [(k, getattr(spec, k)) for k in AXES]
    return {(a, va, b, vb) for (a, va), (b, vb) in itertools.combinations(items, 2)}


@cache
def feasible_pairs() -> frozenset[tuple[str, object, str, object]]:
    """Every pair of axis values that some valid spec exhibits."""
    pairs: set[tuple[str, object, str, object]] = set()
    names = list(AXES)
    for a, b in itertools.combinations(names, 2):
        for va, vb in itertools.product(AXES[a], AXES[b]):
            if _random_spec(random.Random(0), {a: va, b: vb}) is not None:
                pairs.add((a, va, b, vb))
    return frozenset(pairs)


@cache
def pairwise_specs(seed: int = 0, candidates: int = 30) -> tuple[Spec, ...]:
    """A seeded greedy sample in which every feasible pair of axis values appears."""
    rng = random.Random(seed)
    uncovered = set(feasible_pairs())
    chosen: list[Spec] = []
    while uncovered:
        a, va, b, vb = min(uncovered, key=repr)  # deterministic: the first uncovered pair
        best: Spec | None = None
        best_gain = -1
        for _ in range(candidates):
            cand = _random_spec(rng, {a: va, b: vb})
            assert cand is not None  # the pair is feasible
            gain = len(axis_pairs(cand) & uncovered)
            if gain > best_gain:
                best, best_gain = cand, gain
        assert best is not None
        best = best.with_(seed=1000 * seed + len(chosen) + 1)
        chosen.append(best)
        uncovered -= axis_pairs(best)
    return tuple(chosen)


def one_factor_specs(base: Spec = Spec()) -> tuple[Spec, ...]:
    """``base`` and, for every axis value, ``base`` with only that axis changed; each layer
    also with the other reads it supports (readable single-cause failures)."""
    out = [base]
    for name, values in AXES.items():
        for v in values:
            spec = base.with_(**{name: v})
            if spec not in out and is_valid(spec):
                out.append(spec)
    for layer in MULTI_OUTPUT:
        spec = base.with_(layer=layer, read="parts")
        if spec not in out:
            out.append(spec)
    return tuple(out)


def _dedup(specs: Iterator[Spec] | Sequence[Spec]) -> tuple[Spec, ...]:
    seen: set[str] = set()
    out = []
    for s in specs:
        if s.id not in seen:
            seen.add(s.id)
            out.append(s)
    return tuple(out)


@cache
def ci_specs() -> tuple[Spec, ...]:
    """The fixed CI sample: one-factor-at-a-time specs, then :data:`CI_PAIRWISE_SAMPLES`
    pairwise samples (every feasible pair of axis values that often, in different company)."""
    return _dedup([*one_factor_specs(), *(s for k in range(CI_PAIRWISE_SAMPLES) for s in pairwise_specs(k))])


@cache
def full_specs() -> tuple[Spec, ...]:
    """The opt-in run: the product of layer x between x frozen x read x reuse (valid ones);
    ``absent`` and ``num_tasks`` cycle along it, and each spec gets its own seed."""
    out = []
    combos = itertools.product(LAYERS, BETWEEN, FROZEN, READS, REUSE)
    for k, (layer, between, frozen, read, reuse) in enumerate(combos):
        spec = Spec(
            layer, between, frozen, read, reuse,
            absent=ABSENT[k % len(ABSENT)], num_tasks=NUM_TASKS[(k // len(ABSENT)) % len(NUM_TASKS)], seed=k,
        )
        if is_valid(spec):
            out.append(spec)
    return tuple(out)


@cache
def representation_specs() -> tuple[Spec, ...]:
    """A few single-call specs for ``mode="representation"``: every layer plain and behind an
    in-place ReLU, the multi-output layers with ``parts``, and some other between-ops."""
    out = []
    for layer in LAYERS:
        out.append(Spec(layer))
        out.append(Spec(layer, between="relu_inplace"))
        if layer in MULTI_OUTPUT:
            out.append(Spec(layer, read="parts", absent="nan"))
    out += [Spec("linear", between=b) for b in ("tanh", "softmax")]
    out += [Spec("conv1d", read="slice", absent="missing"), Spec("linear", read="hierarchical")]
    return _dedup(out)
