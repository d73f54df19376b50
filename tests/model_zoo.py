"""A generator of small, seeded, float64 multi-task models for the differential tests.

A :class:`Spec` names one model along these axes:

* ``layer``: the last shared layer: ``linear``, ``conv1d``, ``conv2d``, ``layernorm`` (a
  parametric norm), ``block`` (an ``nn.Sequential`` Linear-ReLU-Linear), ``gru`` and ``lstm``
  (batch-first, tuple outputs), ``mha`` (``nn.MultiheadAttention``: ``(attn, weights)``),
  ``experts`` (an MMoE-style batched-experts layer, output ``(B, E, out)``), ``dict`` and
  ``dataclass`` (a user block returning a dict / a dataclass of two tensors), ``embedding``
  (a dense ``nn.Embedding`` over integer indices ``(B, L)``: no layer below it, so no
  ``residual`` read, no reuse, no ``input`` tie), ``sparse_embedding`` (``nn.Embedding(sparse=True,
  padding_idx=0)``, the padding row among the indices), ``experts_list`` (several shared
  modules: three ``nn.Linear`` experts held in an ``nn.ModuleList`` and handed to the balancer as
  a plain list, :attr:`ZooModel.shared_layer`; their outputs stacked to ``(B, E, out)``);
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
  reads output ``i mod n``: e.g. GRU ``output`` / ``h_n``, MHA ``attn`` / ``weights``),
  ``interact`` (each head reads its own view, and head 1 also reads head 0's hidden activation
  ``tanh(mix(z_0))``: under ``task_views`` the balancer must see it and leave the views);
* ``reuse``: the shared layer called once, or twice (``layer(tanh(layer(x)))``);
* ``absent``: ``none``; ``missing`` (the last task's loss is ``None`` where it is absent);
  ``nan`` (the last task's loss is the index-form mean ``err[m].mean()`` over an empty mask
  there: NaN with a graph whose backward is finite); ``masked`` (the masked mean
  ``(err * m).sum() / m.sum()``: NaN with a ``0 * inf`` backward, which the balancer must cut
  off; its references are the same spec with ``nan``, :func:`index_twin`);
* ``num_tasks``: 3 or 2;
* ``tie``: a shared parameter also used outside the layer's calls: ``none``; ``head`` (tasks 0
  and ``T - 1`` also apply the shared weight to their view of ``z`` directly, a tied output
  projection: ``F.linear(z, W)``, ``z @ emb.weight.T``, a functional conv with the layer's
  kernel, ...); ``input`` (the layer's input is ``x_in + tanh(f(x_in, W))``: the shared weight
  used below the call, in computing its input, e.g. a tied encoder); ``before`` (tasks 0 and
  ``T - 1`` also read ``tanh(f(x_in, W))``, computed before the call: for the embeddings a second
  lookup ``F.embedding(x, W)``);
* ``checkpoint``: activation checkpointing: ``none``; ``block``
  (``checkpoint(..., use_reentrant=False)`` around the shared layer's calls and the between-op);
  ``heads`` (non-reentrant around each head); ``heads_reentrant`` (``use_reentrant=True`` around
  each head: the shared layer outside the region);
* ``accumulate``: micro-batches per optimizer step (1 or 2); with 2 the last task is absent in
  one micro-batch of step 1 only, and in both of step 2 (:func:`absent_in`).

Where the last task is absent: at steps :data:`ABSENT_STEPS` (all micro-batches but the first
of step 1 under accumulation). A rank of a multi-process run (``rank=1``) has its own data and
its own absences (:func:`absent_in`), so that a task can be absent on one rank only.

Whether the heads read per-task views (``GradNorm.task_views``) is not part of the model:
:func:`build` returns ``forward(batch, views_fn)`` and the caller passes ``views_fn``;
:attr:`Spec.views_valid` says where views are meaningful (every head reads ``z``, or a
shared parameter-free function of it, only through its own view, maybe with a tied use or
an interaction the balancer must detect).

Samples: :func:`ci_specs` (one-factor-at-a-time from a base spec, plus two seeded greedy
samples each covering every feasible pair of axis values: 256 specs), :func:`full_specs` (the
product of layer x between x frozen x read x reuse, the other axes drawn along it: 4334 specs),
:func:`representation_specs` (a few, for ``mode="representation"``).
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
from torch.utils.checkpoint import checkpoint

LAYERS: tuple[str, ...] = (
    "linear", "conv1d", "conv2d", "layernorm", "block", "gru", "lstm", "mha", "experts", "dict", "dataclass",
    "embedding", "sparse_embedding", "experts_list",
)
BETWEEN: tuple[str, ...] = ("none", "tanh", "relu", "relu_inplace", "relu_", "layernorm", "softmax")
FROZEN: tuple[str, ...] = ("none", "weight", "bias", "weight_late")
READS: tuple[str, ...] = ("direct", "slice", "twice", "residual", "hierarchical", "parts", "interact")
REUSE: tuple[int, ...] = (1, 2)
ABSENT: tuple[str, ...] = ("none", "missing", "nan", "masked")
NUM_TASKS: tuple[int, ...] = (3, 2)
TIE: tuple[str, ...] = ("none", "head", "input", "before")
CHECKPOINT: tuple[str, ...] = ("none", "block", "heads", "heads_reentrant")
ACCUMULATE: tuple[int, ...] = (1, 2)
#: not an axis value: ``checkpoint(..., use_reentrant=True)`` around the shared layer, which every
#: route must refuse with an error naming checkpointing (the differential tests' error case)
BLOCK_REENTRANT = "block_reentrant"

#: the axes of a :class:`Spec` (all but ``seed``), in field order
AXES: dict[str, tuple[object, ...]] = {
    "layer": LAYERS,
    "between": BETWEEN,
    "frozen": FROZEN,
    "read": READS,
    "reuse": REUSE,
    "absent": ABSENT,
    "num_tasks": NUM_TASKS,
    "tie": TIE,
    "checkpoint": CHECKPOINT,
    "accumulate": ACCUMULATE,
}

#: layers whose output has several tensors (the ``parts`` read needs them)
MULTI_OUTPUT: frozenset[str] = frozenset({"gru", "lstm", "mha", "dict", "dataclass"})
#: layers reading integer indices (no layer below them, no residual, no reuse, no input tie)
EMBEDDINGS: frozenset[str] = frozenset({"embedding", "sparse_embedding"})
#: layers whose output is ``(B, E, out)``, mixed by a per-task gate in the heads
EXPERT_LAYERS: frozenset[str] = frozenset({"experts", "experts_list"})
#: reads in which every head reads ``z`` only through its own view (``interact``: plus another
#: head's activation, which the balancer must detect under views)
VIEW_READS: frozenset[str] = frozenset({"direct", "slice", "twice", "residual", "interact"})

STEPS = 4  #: optimizer steps of one run
ABSENT_STEPS: frozenset[int] = frozenset({1, 2})  #: steps in which the last task is absent (in some micro-batch)
CI_PAIRWISE_SAMPLES = 2  #: pairwise samples in the CI set (about 105 specs each)
FREEZE_STEP = 1  #: ``weight_late``: frozen before this step's forward (after step 0's update)

BATCH = 8
FEATURES = 6  # vector / sequence features (square, so residual and reuse fit)
SEQ_LEN = 3
CONV1D_SHAPE = (4, 5)  # channels, length
CONV2D_SHAPE = (3, 4, 4)  # channels, height, width
EXPERTS = 3
HIDDEN = 8  # the block's inner width, the interacting heads' hidden width
HEAD_OUT = 2  # each task predicts HEAD_OUT numbers
VOCAB = 10  # rows of the embedding tables (BATCH * SEQ_LEN indices: repeats, untouched rows)
PADDING_IDX = 0  # sparse_embedding's padding row


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
    tie: str = "none"
    checkpoint: str = "none"
    accumulate: int = 1
    seed: int = 0

    @property
    def id(self) -> str:
        """A readable test id, e.g. ``gru-relu_inplace-frz_weight-parts-x1-abs_nan-T3-s4``; the
        axes added later appear only where they differ from their default:
        ``embedding-none-frz_none-direct-x1-abs_masked-T3-tie_head-ck_heads-acc2-s7``."""
        extra = "".join([
            f"-tie_{self.tie}" if self.tie != "none" else "",
            f"-ck_{self.checkpoint}" if self.checkpoint != "none" else "",
            f"-acc{self.accumulate}" if self.accumulate != 1 else "",
        ])
        return (
            f"{self.layer}-{self.between}-frz_{self.frozen}-{self.read}-x{self.reuse}"
            f"-abs_{self.absent}-T{self.num_tasks}{extra}-s{self.seed}"
        )

    @property
    def views_valid(self) -> bool:
        """Whether ``task_views`` is meaningful: each head reads ``z`` via its own view."""
        return self.read in VIEW_READS

    @property
    def tied_tasks(self) -> tuple[int, ...]:
        """The tasks whose heads use the shared weight directly (``tie="head"``), or read its use
        before the call (``tie="before"``)."""
        return tuple(sorted({0, self.num_tasks - 1})) if self.tie in ("head", "before") else ()

    def present(self, step: int, rank: int = 0) -> list[bool]:
        """Which tasks have a finite loss in at least one micro-batch of ``step``."""
        return [
            any(not absent_in(self, step, m, rank)[i] for m in range(self.accumulate)) for i in range(self.num_tasks)
        ]

    def with_(self, **changes: object) -> Spec:
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]


def absent_in(spec: Spec, step: int, micro: int, rank: int = 0) -> list[bool]:
    """Which tasks are absent from micro-batch ``micro`` of ``step`` (on process ``rank``).

    Only the last task is ever absent. Rank 0: in the last micro-batch of step 1 and in every
    micro-batch of step 2 (with one micro-batch per step: in steps 1 and 2). Any other rank: in
    the first micro-batch of step 1 when there are several (present there otherwise), and in
    every micro-batch of step 2 (absent on every rank: left out of that step's update).
    """
    last = spec.num_tasks - 1
    k = spec.accumulate
    if spec.absent == "none":
        hit = False
    elif rank == 0:
        hit = (step == 1 and micro == k - 1) or step == 2
    else:
        hit = (step == 1 and micro == 0 and k > 1) or step == 2
    return [hit and i == last for i in range(spec.num_tasks)]


def index_twin(spec: Spec) -> Spec:
    """The spec whose run a correct route must reproduce on ``spec``: the masked mean in the
    index form (``err[m].mean()``: finite gradients, nothing to cut)."""
    return spec.with_(absent="nan") if spec.absent == "masked" else spec


def invalid_reason(spec: Spec) -> str | None:
    """Why ``spec`` is not a meaningful model, or None when it is."""
    for name, values in AXES.items():
        if getattr(spec, name) not in values and not (name == "checkpoint" and spec.checkpoint == BLOCK_REENTRANT):
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
    if spec.layer in EMBEDDINGS:
        if spec.frozen != "none":
            # the table is the only parameter: frozen, nothing is trained; it has no bias
            return f"an embedding's only parameter is its weight: frozen={spec.frozen!r} leaves nothing or changes nothing"
        if spec.read == "residual" or spec.reuse != 1 or spec.tie == "input":
            return "an embedding reads integer indices: no residual, no reuse, no tie below it"
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
    """Flatten + Linear; for the experts layers, an MMoE gate (from ``x_in``) mixes the experts first."""

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
    """One micro-batch: input ``x``, targets ``y (B, T, HEAD_OUT)``, label mask ``(B, T)``, and
    which tasks are absent from it (their labels all missing)."""

    step: int
    x: Tensor
    y: Tensor
    mask: Tensor
    micro: int = 0
    absent: tuple[bool, ...] = ()

    def to(self, device: torch.device | str) -> Batch:
        """The same batch on ``device``."""
        return dataclasses.replace(self, x=self.x.to(device), y=self.y.to(device), mask=self.mask.to(device))


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
        "embedding": lambda: nn.Embedding(VOCAB, d),
        "sparse_embedding": lambda: nn.Embedding(VOCAB, d, sparse=True, padding_idx=PADDING_IDX),
        "experts_list": lambda: nn.ModuleList([nn.Linear(d, d) for _ in range(EXPERTS)]),
    }
    return makers[layer]()


def _make_pre(layer: str) -> nn.Module:
    """A trainable layer below the shared one (so ``x_in`` is computed, not data)."""
    if layer == "conv1d":
        return nn.Sequential(nn.Conv1d(CONV1D_SHAPE[0], CONV1D_SHAPE[0], 1), nn.Tanh())
    if layer == "conv2d":
        return nn.Sequential(nn.Conv2d(CONV2D_SHAPE[0], CONV2D_SHAPE[0], 1), nn.Tanh())
    if layer in EMBEDDINGS:
        return nn.Identity()  # (integer indices: nothing trainable below a lookup)
    return nn.Sequential(nn.Linear(FEATURES, FEATURES), nn.Tanh())


def input_shape(layer: str) -> tuple[int, ...]:
    """The shape of one batch's input ``x`` for ``layer``."""
    if layer == "conv1d":
        return (BATCH, *CONV1D_SHAPE)
    if layer == "conv2d":
        return (BATCH, *CONV2D_SHAPE)
    if layer in ("gru", "lstm", "mha") or layer in EMBEDDINGS:
        return (BATCH, SEQ_LEN, FEATURES) if layer not in EMBEDDINGS else (BATCH, SEQ_LEN)
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


def shared_modules(layer: str, shared: nn.Module) -> list[nn.Module]:
    """The modules the balancer is given as the shared layer (their calls are what it sees)."""
    return list(shared) if layer == "experts_list" else [shared]


def tied_weight(layer: str, shared: nn.Module) -> Tensor:
    """The shared parameter a ``tie`` uses outside the layer's calls."""
    if layer == "block":
        return shared[2].weight  # (FEATURES, HIDDEN)
    if layer in ("gru", "lstm"):
        return shared.weight_ih_l0  # (3 or 4 FEATURES, FEATURES)
    if layer == "mha":
        return shared.out_proj.weight
    if layer == "experts_list":
        return shared[0].weight
    if layer in ("dict", "dataclass"):
        return shared.a.weight
    return shared.weight


def tied_head_use(layer: str, w: Tensor, z: Tensor) -> Tensor:
    """A head's direct use of the shared weight ``w`` on (its view of) the primary output ``z``."""
    if layer == "conv1d":
        return F.conv1d(z, w, padding=1)
    if layer == "conv2d":
        return F.conv2d(z, w, padding=1)
    if layer == "layernorm":
        return z * w
    if layer == "block":
        return z @ w  # the block's last weight, transposed: a tied decoder
    if layer == "experts":
        return torch.einsum("bei,eio->beo", z, w)
    if layer in EMBEDDINGS:
        return z @ w.T  # a tied output projection: logits over the vocabulary
    return F.linear(z, w)


def tied_input_use(layer: str, w: Tensor, x: Tensor) -> Tensor:
    """A use of the shared weight ``w`` on the layer's input ``x`` (same shape as ``x``; for the
    embeddings, a lookup of the indices ``x``), made before the layer's call."""
    if layer == "embedding":
        return F.embedding(x, w)
    if layer == "sparse_embedding":
        return F.embedding(x, w, sparse=True)
    if layer == "block":
        return (x @ w)[..., :FEATURES]  # (FEATURES -> HIDDEN, cut back)
    if layer in ("gru", "lstm"):
        return F.linear(x, w)[..., :FEATURES]
    if layer == "experts":
        return torch.einsum("bi,eio->bo", x, w) / EXPERTS
    return tied_head_use(layer, w, x)


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

    ``shared`` is the last shared layer (for ``experts_list`` the ``nn.ModuleList`` of the
    experts); :attr:`shared_layer` is what the balancer is given; :meth:`task_losses` is the
    forward (also ``forward``, for a DDP wrapper).
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
            x_in = self.pre(_zeros_input(spec.layer))
            before = self._before(x_in)
            views, inputs = self._head_inputs(self._shared_forward(self._layer_input(x_in)), x_in, None)
            tied = [self._tied_read(views[0], before) for _ in spec.tied_tasks]
        # experts: an MMoE gate per task mixes the experts, so the head's Linear sees one expert
        gate = FEATURES if spec.layer in EXPERT_LAYERS and spec.read != "slice" else None
        self.heads = nn.ModuleList([
            Head(inp.shape[-1] if gate is not None else inp[0].numel(), gate) for inp in inputs
        ])
        self.heads2 = nn.ModuleList([Head(inp[0].numel()) for inp in inputs]) if spec.read == "twice" else None
        self.hier = nn.Linear(HEAD_OUT, HEAD_OUT) if spec.read == "hierarchical" else None
        # tie="head": each tied task maps its direct use of the shared weight to its outputs
        self.tied_out = nn.ModuleList([nn.Linear(t[0].numel(), HEAD_OUT) for t in tied]) if tied else None
        # read="interact": head 0's hidden activation, read by heads 0 and 1
        if spec.read == "interact":
            self.mix: nn.Module | None = nn.Linear(inputs[0][0].numel(), HIDDEN)
            self.mix_out: nn.ModuleList | None = nn.ModuleList([nn.Linear(HIDDEN, HEAD_OUT) for _ in range(2)])
        else:
            self.mix, self.mix_out = None, None
        self.double()
        if spec.frozen in ("weight", "bias"):
            self.freeze(spec.frozen)

    @property
    def shared_layer(self) -> nn.Module | list[nn.Module]:
        """The shared layer as the balancer is given it: the module, or a list of the experts."""
        modules = shared_modules(self.spec.layer, self.shared)
        return modules if self.spec.layer == "experts_list" else modules[0]

    @property
    def _tied(self) -> Tensor:
        return tied_weight(self.spec.layer, self.shared)

    # -------------------------------------------------------------- pieces of the forward
    def _call(self, x: Tensor) -> Any:
        if self.spec.layer == "mha":
            return self.shared(x, x, x)
        if self.spec.layer == "experts_list":
            return torch.stack([expert(x) for expert in self.shared], dim=1)
        return self.shared(x)

    def _before(self, x_in: Tensor) -> Tensor | None:
        """``tie="before"``: the shared weight's own use, made before the layer's call."""
        if self.spec.tie != "before":
            return None
        return torch.tanh(tied_input_use(self.spec.layer, self._tied, x_in))

    def _tied_read(self, view: Tensor, before: Tensor | None) -> Tensor:
        """What a tied task reads besides its head's input: the shared weight applied to its view
        of ``z`` (``tie="head"``), or the use made before the call (``tie="before"``)."""
        if before is not None:
            return before
        return tied_head_use(self.spec.layer, self._tied, view)

    def _layer_input(self, x_in: Tensor) -> Tensor:
        """The first call's input: ``x_in``, plus the shared weight's own use for ``tie="input"``."""
        if self.spec.tie != "input":
            return x_in
        return x_in + torch.tanh(tied_input_use(self.spec.layer, self._tied, x_in))

    def _shared_forward(self, x: Tensor) -> dict[str, Tensor]:
        """The shared layer's output parts, after reuse and the between-op (on the primary)."""
        layer = self.spec.layer
        parts = output_parts(layer, self._call(x))
        if self.spec.reuse == 2:
            primary = next(iter(parts.values()))
            again = primary.mean(1) if layer in EXPERT_LAYERS else primary
            parts = output_parts(layer, self._call(torch.tanh(again)))
        name = next(iter(parts))
        parts[name] = _between(self.spec.between, parts[name], self.act_inplace)
        return parts

    def _residual(self, x_in: Tensor) -> Tensor:
        return x_in.unsqueeze(1) if self.spec.layer in EXPERT_LAYERS else x_in

    def _head_inputs(self, parts: dict[str, Tensor], x_in: Tensor,
                     views_fn: Views | None) -> tuple[list[Tensor], list[Tensor]]:
        """Each task's view of the primary output ``z`` (``z`` itself without views), and each
        head's input."""
        spec = self.spec
        t = spec.num_tasks
        z = next(iter(parts.values()))
        if spec.read == "parts":
            tensors = list(parts.values())
            return [z] * t, [tensors[i % len(tensors)] for i in range(t)]
        views = list(views_fn(z)) if views_fn is not None and spec.views_valid else [z] * t
        if len(views) != t:
            raise ValueError(f"views_fn returned {len(views)} views for {t} tasks")
        if spec.read == "slice":
            return views, [v[:, i::t] for i, v in enumerate(views)]
        if spec.read == "residual":
            return views, [v + self._residual(x_in) for v in views]
        return views, views

    def _head(self, i: int, inp: Tensor, view: Tensor, x_in: Tensor, hidden: Tensor | None,
              before: Tensor | None) -> Any:
        """Task ``i``'s prediction (and, for head 0 of ``interact``, its hidden activation)."""
        spec = self.spec
        y = self.heads[i](inp, x_in)
        if self.heads2 is not None:
            y = y + self.heads2[i](inp, x_in)
        if self.tied_out is not None and i in spec.tied_tasks:
            y = y + self.tied_out[spec.tied_tasks.index(i)](self._tied_read(view, before).flatten(1))
        if self.mix is not None and self.mix_out is not None:
            if i == 0:
                h = torch.tanh(self.mix(inp.flatten(1)))
                return y + self.mix_out[0](h), h
            if i == 1:
                assert hidden is not None
                y = y + self.mix_out[1](hidden)
        return y

    def _run_head(self, i: int, inp: Tensor, view: Tensor, x_in: Tensor, hidden: Tensor | None,
                  before: Tensor | None) -> Any:
        mode = self.spec.checkpoint
        if mode in ("heads", "heads_reentrant"):
            return checkpoint(self._head, i, inp, view, x_in, hidden, before, use_reentrant=mode == "heads_reentrant")
        return self._head(i, inp, view, x_in, hidden, before)

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
            batch: the micro-batch.
            views_fn: ``GradNorm.task_views`` (or any function returning ``T`` aliases of its
                argument); ``None`` means every head reads ``z`` itself.
        """
        spec = self.spec
        absent = batch.absent or (False,) * spec.num_tasks
        x_in = self.pre(batch.x)
        before = self._before(x_in)
        if spec.checkpoint == "block":
            parts = checkpoint(self._shared_forward, self._layer_input(x_in), use_reentrant=False)
        elif spec.checkpoint == BLOCK_REENTRANT:  # (a reentrant region returns tensors, not a dict)
            values = checkpoint(lambda x: tuple(self._shared_forward(x).values()), self._layer_input(x_in),
                                use_reentrant=True)
            parts = {f"part{i}": v for i, v in enumerate(values)}
        else:
            parts = self._shared_forward(self._layer_input(x_in))
        views, inputs = self._head_inputs(parts, x_in, views_fn)
        outs: list[Tensor | None] = []
        hidden: Tensor | None = None
        for i, (inp, view) in enumerate(zip(inputs, views)):
            if absent[i] and spec.absent == "missing":
                outs.append(None)
                continue
            y = self._run_head(i, inp, view, x_in, hidden, before)
            if isinstance(y, tuple):
                y, hidden = y
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
            if spec.absent in ("nan", "masked") and i == spec.num_tasks - 1:
                mask = torch.zeros_like(batch.mask[:, i]) if absent[i] else batch.mask[:, i]
                if spec.absent == "nan":
                    losses.append(err[mask].mean())  # index form: NaN over an empty mask, finite backward
                else:
                    m = mask.to(err.dtype)
                    losses.append((err * m).sum() / m.sum())  # masked mean: NaN, and 0 * inf backward
            else:
                losses.append(err.mean())
        return losses

    forward = task_losses


def _zeros_input(layer: str) -> Tensor:
    if layer in EMBEDDINGS:
        return torch.zeros(input_shape(layer), dtype=torch.long)
    return torch.zeros(input_shape(layer))


Forward = Callable[[Batch, Views | None], list[Tensor | None]]


def build(spec: Spec) -> tuple[ZooModel, nn.Module | list[nn.Module], Forward]:
    """The seeded float64 model of ``spec``: ``(model, shared_layer, forward)``.

    ``shared_layer`` is what the balancer is given (:attr:`ZooModel.shared_layer`);
    ``forward(batch, views_fn)`` is ``model.task_losses``. A ``copy.deepcopy`` of the model is
    identical (use its ``shared_layer`` and ``task_losses``). The parameters do not depend on
    ``absent``, ``checkpoint`` or ``accumulate``.
    """
    torch.manual_seed(spec.seed)
    model = ZooModel(spec)
    return model, model.shared_layer, model.task_losses


def batches(spec: Spec, steps: int = STEPS, rank: int = 0) -> list[Batch]:
    """Seeded micro-batches, ``spec.accumulate`` per step, in order; the tasks' targets have
    very different scales. ``rank``: a process's own data and absences (see :func:`absent_in`)."""
    g = torch.Generator().manual_seed(10_000 + spec.seed + 7919 * rank)
    t = spec.num_tasks
    scales = torch.logspace(0, 0.5, t, dtype=torch.float64).view(1, t, 1)
    out = []
    for step in range(steps):
        for micro in range(spec.accumulate):
            if spec.layer in EMBEDDINGS:
                x = torch.randint(0, VOCAB, input_shape(spec.layer), generator=g)
            else:
                x = torch.randn(input_shape(spec.layer), generator=g, dtype=torch.float64)
            y = torch.randn(BATCH, t, HEAD_OUT, generator=g, dtype=torch.float64) * scales
            mask = torch.rand(BATCH, t, generator=g) < 0.6
            mask[:2] = True  # at least two labelled rows per task
            out.append(Batch(step, x, y, mask, micro, tuple(absent_in(spec, step, micro, rank))))
    return out


def step_batches(spec: Spec, steps: int = STEPS, rank: int = 0) -> list[list[Batch]]:
    """:func:`batches` grouped by optimizer step."""
    flat = batches(spec, steps, rank)
    k = spec.accumulate
    return [flat[s * k : (s + 1) * k] for s in range(steps)]


# ---------------------------------------------------------------------- samples
def _random_spec(rng: random.Random, fixed: dict[str, object] | None = None) -> Spec | None:
    """A random valid spec with the ``fixed`` axis values (``None`` when 1000 draws found none)."""
    fixed = fixed or {}
    for _ in range(1000):
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


#: the axes :func:`full_specs` takes the product of; the others vary along it, seeded
PRODUCT_AXES: tuple[str, ...] = ("layer", "between", "frozen", "read", "reuse")


@cache
def full_specs() -> tuple[Spec, ...]:
    """The opt-in run: the product of layer x between x frozen x read x reuse (valid ones);
    the other axes (``absent``, ``num_tasks``, ``tie``, ``checkpoint``, ``accumulate``) are
    drawn along it from a generator seeded by the spec's index (a valid draw), and each spec
    gets its own seed."""
    out = []
    combos = itertools.product(*(AXES[name] for name in PRODUCT_AXES))
    for k, values in enumerate(combos):
        fixed = dict(zip(PRODUCT_AXES, values))
        if not is_valid(Spec(**fixed)):  # type: ignore[arg-type]
            continue
        spec = _random_spec(random.Random(k), fixed)
        if spec is not None:
            out.append(spec.with_(seed=k))
    return tuple(out)


@cache
def representation_specs() -> tuple[Spec, ...]:
    """A few single-call specs for ``mode="representation"``: every layer plain and behind an
    in-place ReLU, the multi-output layers with ``parts``, and some other between-ops, a
    masked mean, checkpointed heads and a weight tied before the call."""
    out = []
    for layer in LAYERS:
        out.append(Spec(layer))
        out.append(Spec(layer, between="relu_inplace"))
        if layer in MULTI_OUTPUT:
            out.append(Spec(layer, read="parts", absent="nan"))
    out += [Spec("linear", between=b) for b in ("tanh", "softmax")]
    out += [Spec("conv1d", read="slice", absent="missing"), Spec("linear", read="hierarchical")]
    out += [Spec("conv1d", read="slice", absent="masked"), Spec("embedding", absent="masked", checkpoint="heads")]
    out += [Spec("linear", tie="before"), Spec("experts_list", tie="before", absent="masked", checkpoint="heads_reentrant")]
    return _dedup(out)
