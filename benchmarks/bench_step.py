"""Side-by-side per-step cost of GradNorm implementations (issue 5).

Run::

    python benchmarks/bench_step.py [--steps N] [--warmup N] [--workload toy|conv|all] [--out FILE.md]

What it does, per workload (the GradNorm paper's toy regression, and a conv trunk whose
last shared layer is ``Linear(4096, 256)``):

1. **Trajectory check** (float64, 50 steps, same init, same data, same ``lr``/``alpha``):
   every GradNorm row must reproduce the task-weight trajectory of the textbook
   ``create_graph`` implementation it claims to implement, to ``1e-6`` relative or better,
   or the script fails loudly. ``gradnorm-pytorch`` 0.2.3 deviates from the textbook by
   design (see :class:`GradNormPytorch`): for that row the deviation is printed, together
   with the deviation from a textbook variant that applies exactly the documented
   differences (which must be ~0, proving the list of differences complete), and the
   script does not fail for it.
2. **Timing**: one process, ``torch.set_num_threads(1)``, every method has its own copy of
   the same model; methods are interleaved round-robin (one step of each method per round,
   the starting method rotating every round) so machine noise hits all of them equally.
   The reported figure is the median over ``--steps`` rounds after ``--warmup`` rounds,
   of the wall-clock time (``perf_counter``) and of this thread's CPU time
   (``thread_time``, which excludes time the process was descheduled by other load).
3. **Extra peak memory**: each method's step is run under ``torch.profiler`` with
   ``profile_memory=True``; the CPU allocator's allocation/free events are replayed in time
   order and the peak of the running sum (bytes allocated during the step above the level
   at its start) is taken, max over a few steps. The column reports that peak minus the
   plain step's peak. Persistent state a method keeps between steps (weights, optimizer
   state) is allocated before the window and is not counted; it is O(T) floats everywhere.
4. **Lightning**: the same module trained by a ``Trainer`` with and without
   ``GradNormCallback``; short fits of the two are alternated (and interleaved with blocks
   of the plain-PyTorch loops), and each step is timed from ``on_train_batch_start`` (a
   callback placed first) to ``on_train_batch_end`` (a callback placed last).

The module is importable: ``tests/test_benchmarks.py`` runs :func:`check_trajectories`
on tiny sizes so the benchmark cannot silently rot.
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Batch = tuple[Tensor, list[Tensor]]

# --------------------------------------------------------------------------------------
# workloads
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Workload:
    """Sizes and hyper-parameters of one benchmark workload.

    Attributes:
        name: ``"toy"`` or ``"conv"`` (tiny test variants keep the same names).
        num_tasks: ``T``.
        batch: batch size.
        in_dim, hidden, head_out: toy sizes (input, trunk width, head output).
        image, channels, feat: conv sizes (input image ``C×H×W``, conv channels, width of
            the shared ``Linear(flat, feat)``).
        model_lr: SGD learning rate of the model.
        alpha, weight_lr: GradNorm's asymmetry and weight learning rate.
        min_weight: floor the weights are clamped to before renormalisation.
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
    model_lr: float = 1e-3
    alpha: float = 1.5
    weight_lr: float = 0.025
    min_weight: float = 1e-4

    @property
    def flat(self) -> int:
        """Flattened conv features fed to the shared Linear (two 2×2 poolings)."""
        _, h, w = self.image
        return self.channels[1] * (h // 4) * (w // 4)


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


class MultiTaskNet(nn.Module):
    """A shared trunk ending in ``Linear -> ReLU`` and ``T`` Linear heads.

    ``trunk[-2]`` is the last shared layer. ``view_fn``, when set, maps the shared
    representation to one tensor per head (the ``task_views`` path).
    """

    def __init__(self, trunk: nn.Sequential, heads: nn.ModuleList) -> None:
        super().__init__()
        self.trunk = trunk
        self.heads = heads
        self.view_fn: Callable[[Tensor], Sequence[Tensor]] | None = None

    @property
    def shared_layer(self) -> nn.Module:
        """The last shared layer (``trunk[-2]``)."""
        return self.trunk[-2]

    def forward_with_rep(self, x: Tensor) -> tuple[Tensor, Tensor, list[Tensor]]:
        """Forward returning (shared layer output, representation read by heads, head outputs)."""
        pre = self.trunk[:-1](x)
        z = self.trunk[-1](pre)
        views = self.view_fn(z) if self.view_fn is not None else [z] * len(self.heads)
        return pre, z, [head(v) for head, v in zip(self.heads, views, strict=True)]

    def forward(self, x: Tensor) -> list[Tensor]:
        """Head outputs, one per task."""
        z = self.trunk(x)
        views = self.view_fn(z) if self.view_fn is not None else [z] * len(self.heads)
        return [head(v) for head, v in zip(self.heads, views, strict=True)]


def build_model(wl: Workload, seed: int = 0, dtype: torch.dtype = torch.float32) -> MultiTaskNet:
    """The workload's model, initialised deterministically from ``seed``."""
    torch.manual_seed(seed)
    trunk: nn.Sequential
    if wl.name == "toy":
        layers: list[nn.Module] = []
        d = wl.in_dim
        for _ in range(4):
            layers += [nn.Linear(d, wl.hidden), nn.ReLU()]
            d = wl.hidden
        trunk = nn.Sequential(*layers)
        width = wl.hidden
    else:
        c, _, _ = wl.image
        c1, c2 = wl.channels
        trunk = nn.Sequential(
            nn.Conv2d(c, c1, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(wl.flat, wl.feat), nn.ReLU(),
        )
        width = wl.feat
    heads = nn.ModuleList(nn.Linear(width, wl.head_out) for _ in range(wl.num_tasks))
    return MultiTaskNet(trunk, heads).to(dtype)


def make_batches(wl: Workload, n: int, seed: int = 1, dtype: torch.dtype = torch.float32) -> list[Batch]:
    """``n`` batches of inputs and per-task regression targets with very different scales.

    Toy (as in the paper): ``y_i = sigma_i * tanh((B + eps_i) x)`` with ``B ~ N(0, 10)``,
    ``eps_i ~ N(0, 3.5)``, ``sigma_i`` spread over ``[1, T]``. Conv: ``y_i = sigma_i *
    tanh(P_i x_flat)`` with fixed random projections ``P_i``.
    """
    g = torch.Generator().manual_seed(seed)
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


def task_losses(outs: Sequence[Tensor], targets: Sequence[Tensor]) -> list[Tensor]:
    """Per-task MSE losses (0-dim tensors)."""
    return [F.mse_loss(o, y) for o, y in zip(outs, targets, strict=True)]


# --------------------------------------------------------------------------------------
# methods: each owns a model copy and performs one full training step per call
# --------------------------------------------------------------------------------------


class Method:
    """One row of the table: a full training step (forward, backward, balancer, SGD).

    Attributes:
        name: row label.
        reference: key of the textbook trajectory this row must reproduce (``None`` for
            the plain step, which has no weights).
        must_match: whether a trajectory deviation fails the benchmark.
        note: text printed next to the trajectory check.
    """

    name = "?"
    reference: str | None = "W"
    must_match = True
    note = ""

    def __init__(self, wl: Workload, model: MultiTaskNet) -> None:
        self.wl = wl
        self.model = model
        self.opt = torch.optim.SGD(model.parameters(), lr=wl.model_lr)

    def step(self, batch: Batch) -> None:
        """One training step on ``batch``."""
        raise NotImplementedError

    def weights(self) -> Tensor | None:
        """Current task weights (1-D, sums to T) or ``None``."""
        return None


class PlainSum(Method):
    """Model loss = sum of the task losses; backward; SGD step. The denominator of every ratio."""

    name = "plain sum (no balancing)"
    reference = None

    def step(self, batch: Batch) -> None:
        """One step of the plain summed-loss loop."""
        x, ys = batch
        self.opt.zero_grad(set_to_none=True)
        loss = torch.stack(task_losses(self.model(x), ys)).sum()
        loss.backward()
        self.opt.step()


class Textbook(Method):
    """The textbook ``create_graph`` GradNorm (the reference for numbers).

    Per task ``autograd.grad(w_i L_i, X, create_graph=True)`` with ``X`` one of:
    ``"W"`` all parameters of the last shared layer (the paper), ``"trunk"`` all trunk
    parameters (what the LibMTL-style row computes), ``"rep"`` the shared layer's output,
    ``"rep_relu"`` the representation the heads read. Then ``G_i = ||.||``,
    ``L_grad = sum_i |G_i - G_bar r_i^alpha|`` with the target held constant, its gradient
    into ``w`` only, SGD on ``w``, clamp to ``min_weight``, renormalise to sum ``T``.

    ``gnp_compat=True`` applies, on top of ``X="W_weight"`` (the weight matrix only), the
    documented differences of gradnorm-pytorch 0.2.3 (see :class:`GradNormPytorch`).
    """

    name = "textbook create_graph"

    def __init__(self, wl: Workload, model: MultiTaskNet, wrt: str = "W", gnp_compat: bool = False) -> None:
        super().__init__(wl, model)
        self.wrt = wrt
        self.gnp_compat = gnp_compat
        self.reference = wrt
        p = next(model.parameters())
        self.w = nn.Parameter(torch.ones(wl.num_tasks, dtype=p.dtype))
        self.wopt = torch.optim.SGD([self.w], lr=wl.weight_lr)
        self.initial: Tensor | None = None

    def _inputs(self, pre: Tensor, z: Tensor) -> list[Tensor]:
        if self.wrt == "W":
            return list(self.model.shared_layer.parameters())
        if self.wrt == "W_weight":
            return [self.model.shared_layer.weight]
        if self.wrt == "trunk":
            return list(self.model.trunk.parameters())
        if self.wrt == "rep":
            return [pre]
        if self.wrt == "rep_relu":
            return [z]
        raise ValueError(self.wrt)

    def step(self, batch: Batch) -> None:
        """One textbook GradNorm step."""
        x, ys = batch
        t = self.wl.num_tasks
        self.opt.zero_grad(set_to_none=True)
        pre, z, outs = self.model.forward_with_rep(x)
        losses = torch.stack(task_losses(outs, ys))
        if self.initial is None:
            self.initial = losses.detach().clone()
        (self.w.detach() * losses).sum().backward(retain_graph=True)
        inputs = self._inputs(pre, z)
        norms = []
        for i in range(t):
            grads = torch.autograd.grad(self.w[i] * losses[i], inputs, retain_graph=True, create_graph=True)
            norms.append(torch.cat([g.reshape(-1) for g in grads]).norm())
        g_norms = torch.stack(norms)
        ratios = losses.detach() / self.initial
        rates = ratios / ratios.mean()
        alpha = -self.wl.alpha if self.gnp_compat else self.wl.alpha
        target = (g_norms.mean() * rates**alpha).detach()
        if self.gnp_compat:
            # mean instead of sum, and backward into everything (model grads included)
            self.w.grad = None
            (g_norms - target).abs().mean().backward()
        else:
            (self.w.grad,) = torch.autograd.grad((g_norms - target).abs().sum(), self.w)
        self.opt.step()
        self.wopt.step()
        with torch.no_grad():
            if self.gnp_compat:
                self.w.div_(self.w.abs().sum()).mul_(t)
            else:
                self.w.clamp_(min=self.wl.min_weight)
                self.w.mul_(t / self.w.sum())

    def weights(self) -> Tensor:
        """Current weights."""
        return self.w.detach()


class LibMTLStyle(Method):
    """LibMTL-style GradNorm: norms over ALL shared (trunk) parameters.

    Written from the description (not LibMTL's code): per task one full backward through
    the trunk and that task's head (``autograd.grad(L_i, trunk + head_i params)``), the
    per-task trunk gradients stacked into a ``T × P`` matrix, ``n_i`` its row norms; the
    trunk's gradient is then ``w @ G`` and head ``i``'s is ``w_i × its gradient`` (no extra
    model backward). The weight gradient is the analytic ``sign(G_i - target_i) n_i``. Same
    ``w`` parameterisation as the textbook (LibMTL itself uses a softmax), so its trajectory
    is compared against the textbook with ``X = all trunk parameters``.
    """

    name = "LibMTL-style (norms over trunk, T backward passes)"
    reference = "trunk"

    def __init__(self, wl: Workload, model: MultiTaskNet) -> None:
        super().__init__(wl, model)
        self.trunk_params = list(model.trunk.parameters())
        self.head_params = [list(h.parameters()) for h in model.heads]
        p = self.trunk_params[0]
        self.w = torch.ones(wl.num_tasks, dtype=p.dtype)
        self.initial: Tensor | None = None

    def step(self, batch: Batch) -> None:
        """One LibMTL-style step."""
        x, ys = batch
        t = self.wl.num_tasks
        self.opt.zero_grad(set_to_none=True)
        losses = torch.stack(task_losses(self.model(x), ys))
        if self.initial is None:
            self.initial = losses.detach().clone()
        n_trunk = len(self.trunk_params)
        rows = []
        for i in range(t):
            grads = torch.autograd.grad(losses[i], self.trunk_params + self.head_params[i], retain_graph=i < t - 1)
            rows.append(torch.cat([g.reshape(-1) for g in grads[:n_trunk]]))
            for p, g in zip(self.head_params[i], grads[n_trunk:], strict=True):
                p.grad = self.w[i] * g
        gmat = torch.stack(rows)
        norms = gmat.norm(dim=1)
        gw = self.w * norms
        ratios = losses.detach() / self.initial
        rates = ratios / ratios.mean()
        target = gw.mean() * rates**self.wl.alpha
        weight_grad = torch.sign(gw - target) * norms
        shared = self.w @ gmat
        offset = 0
        for p in self.trunk_params:
            p.grad = shared[offset:offset + p.numel()].view_as(p)
            offset += p.numel()
        self.opt.step()
        w = (self.w - self.wl.weight_lr * weight_grad).clamp_min(self.wl.min_weight)
        self.w = w * (t / w.sum())

    def weights(self) -> Tensor:
        """Current weights."""
        return self.w


class GradNormPytorch(Method):
    """``gradnorm-pytorch`` 0.2.3 (lucidrains, PyPI), used as its README shows.

    ``GradNormLossWeighter(num_losses=T, learning_rate=lr, restoring_force_alpha=alpha,
    grad_norm_parameters=shared_layer.weight)``; ``weighter.backward(losses)`` (which runs
    the model's backward itself), then ``opt.step()``. Differences from the textbook, by
    design or by accident, which is why this row is not required to match it:

    1. the norm is over the one ``Parameter`` passed (the weight matrix), not the bias;
    2. ``L_grad`` is ``F.l1_loss`` (a mean over tasks): the weight gradient is ``1/T`` of
       the paper's, i.e. the effective weight lr is ``lr/T``;
    3. the target is ``G_bar * r_i ** -alpha`` (negated exponent vs. the paper's ``+alpha``);
    4. ``L_grad`` is back-propagated with a plain ``backward``, so its gradient leaks into
       the model parameters' ``.grad`` (heads and trunk) before ``opt.step()``;
    5. renormalisation is ``w / sum|w| * T`` with no positive floor;
    6. host syncs (``.item()``) every step.

    The trajectory check compares it with ``Textbook(wrt="W_weight", gnp_compat=True)``,
    which applies exactly 1-5; a ~0 deviation there shows the list is complete.
    """

    name = "gradnorm-pytorch 0.2.3"
    reference = "W"
    must_match = False

    def __init__(self, wl: Workload, model: MultiTaskNet) -> None:
        super().__init__(wl, model)
        from gradnorm_pytorch import GradNormLossWeighter

        dtype = next(model.parameters()).dtype
        self.weighter = GradNormLossWeighter(
            num_losses=wl.num_tasks,
            learning_rate=wl.weight_lr,
            restoring_force_alpha=wl.alpha,
            grad_norm_parameters=model.shared_layer.weight,
        ).to(dtype)

    def step(self, batch: Batch) -> None:
        """One step as in gradnorm-pytorch's README."""
        x, ys = batch
        losses = task_losses(self.model(x), ys)
        self.weighter.backward(losses)
        self.opt.step()
        self.opt.zero_grad()

    def weights(self) -> Tensor:
        """Current weights (the weighter's ``loss_weights`` buffer)."""
        return self.weighter.loss_weights.detach()


# --------------------------------------------------------------------------------------
# this project's rows (public API only)
# --------------------------------------------------------------------------------------


def project_available() -> bool:
    """Whether ``gradnorm_lightning`` exposes the core API (``GradNorm``)."""
    try:
        from gradnorm_lightning import GradNorm  # noqa: F401
    except ImportError:
        return False
    return True


class ProjectGradNorm(Method):
    """``gradnorm_lightning.GradNorm`` in a plain PyTorch loop.

    ``loss = gn.combine(losses); loss.backward(); gn.step(); opt.step()`` with the losses
    as a list. ``views=True`` makes the heads read ``gn.task_views(z)`` (the zero-extra-pass
    path). ``mode`` is passed through when given.
    """

    reference = "W"

    def __init__(self, wl: Workload, model: MultiTaskNet, views: bool = False, mode: str | None = None,
                 name: str = "gradnorm-lightning GradNorm", reference: str = "W") -> None:
        super().__init__(wl, model)
        from gradnorm_lightning import GradNorm

        kwargs: dict[str, Any] = {}
        if mode is not None:
            kwargs["mode"] = mode
        self.gn = GradNorm(shared_layer=model.shared_layer, num_tasks=wl.num_tasks, alpha=wl.alpha,
                           lr=wl.weight_lr, optimizer="sgd", min_weight=wl.min_weight, **kwargs)
        if views:
            model.view_fn = self.gn.task_views
        self.name = name
        self.reference = reference

    def step(self, batch: Batch) -> None:
        """One step through the public API."""
        x, ys = batch
        self.opt.zero_grad(set_to_none=True)
        loss = self.gn.combine(task_losses(self.model(x), ys))
        loss.backward()
        self.gn.step()
        self.opt.step()

    def weights(self) -> Tensor:
        """``gn.weights``."""
        return self.gn.weights.detach()


MethodFactory = Callable[[Workload, MultiTaskNet], Method]


def method_factories(include_project: bool | None = None) -> list[tuple[str, MethodFactory]]:
    """All rows, in table order, as (key, factory)."""
    rows: list[tuple[str, MethodFactory]] = [
        ("plain", PlainSum),
        ("textbook", Textbook),
        ("gradnorm-pytorch", GradNormPytorch),
        ("libmtl", LibMTLStyle),
    ]
    if include_project is None:
        include_project = project_available()
    if include_project:
        rows += [
            ("gnl-default", lambda wl, m: ProjectGradNorm(
                wl, m, name="gradnorm-lightning default (losses list)")),
            ("gnl-views", lambda wl, m: ProjectGradNorm(
                wl, m, views=True, name="gradnorm-lightning task_views")),
            ("gnl-representation", lambda wl, m: ProjectGradNorm(
                wl, m, views=True, mode="representation",
                name="gradnorm-lightning mode=representation + task_views", reference="rep")),
            ("gnl-representation-noviews", lambda wl, m: ProjectGradNorm(
                wl, m, mode="representation", name="gradnorm-lightning mode=representation (losses list)",
                reference="rep")),
            ("gnl-autograd", lambda wl, m: ProjectGradNorm(
                wl, m, mode="autograd", name="gradnorm-lightning mode=autograd")),
        ]
    return rows


# --------------------------------------------------------------------------------------
# trajectory check
# --------------------------------------------------------------------------------------


@dataclasses.dataclass
class CheckResult:
    """Outcome of the trajectory check of one row."""

    key: str
    name: str
    reference: str
    max_abs_dev: float
    max_rel_dev: float
    ok: bool
    must_match: bool
    detail: str = ""
    explained_dev: float | None = None


def run_trajectory(factory: MethodFactory, wl: Workload, batches: Sequence[Batch], seed: int = 0) -> Tensor:
    """Weights after each step (``steps × T``) of one method on ``batches``."""
    model = build_model(wl, seed=seed, dtype=batches[0][0].dtype)
    method = factory(wl, model)
    out = []
    for batch in batches:
        method.step(batch)
        w = method.weights()
        assert w is not None
        out.append(w.detach().clone().to(torch.float64))
    return torch.stack(out)


def _devs(a: Tensor, b: Tensor) -> tuple[float, float]:
    diff = (a - b).abs()
    return float(diff.max()), float((diff / b.abs().clamp_min(1e-12)).max())


def check_trajectories(wl: Workload, steps: int = 50, tol: float = 1e-6, keys: Sequence[str] | None = None,
                       verbose: bool = True) -> list[CheckResult]:
    """Compare every GradNorm row's float64 weight trajectory with its textbook reference.

    Raises:
        AssertionError: a row that must match deviates by more than ``tol`` (relative).
    """
    batches = make_batches(wl, steps, dtype=torch.float64)
    refs: dict[str, Tensor] = {}

    def ref(wrt: str, gnp: bool = False) -> Tensor:
        k = f"{wrt}{'+gnp' if gnp else ''}"
        if k not in refs:
            refs[k] = run_trajectory(lambda w, m: Textbook(w, m, wrt=wrt, gnp_compat=gnp), wl, batches)
        return refs[k]

    results = []
    for key, factory in method_factories():
        if keys is not None and key not in keys:
            continue
        probe = factory(wl, build_model(wl, dtype=torch.float64))
        if probe.reference is None:
            continue
        traj = run_trajectory(factory, wl, batches)
        reference = ref(probe.reference)
        abs_dev, rel_dev = _devs(traj, reference)
        ok = rel_dev <= tol
        detail = ""
        explained: float | None = None
        if isinstance(probe, GradNormPytorch):
            c_abs, c_rel = _devs(traj, ref("W_weight", gnp=True))
            explained = c_rel
            detail = (f"deviates from the textbook by design (weight-only norm, mean L_grad = lr/T, "
                      f"r**-alpha, L_grad leaks into model grads, no floor); vs. a textbook with exactly "
                      f"those changes: max abs {c_abs:.2e} (rel {c_rel:.2e})"
                      + ("" if c_rel <= tol else " -- NOT fully explained by the listed differences"))
        results.append(CheckResult(key, probe.name, probe.reference, abs_dev, rel_dev, ok, probe.must_match, detail,
                                   explained))
        if verbose:
            status = "ok" if ok else ("DEVIATES (expected, not fatal)" if not probe.must_match else "FAIL")
            print(f"[check {wl.name}] {probe.name:<52} vs textbook[{probe.reference}]: "
                  f"max|dw| {abs_dev:.2e} rel {rel_dev:.2e} {status}" + (f"\n    {detail}" if detail else ""),
                  flush=True)
    bad = [r for r in results if r.must_match and not r.ok]
    if bad:
        raise AssertionError("GradNorm rows deviate from the textbook trajectory: "
                             + ", ".join(f"{r.name} ({r.max_rel_dev:.2e})" for r in bad))
    return results


# --------------------------------------------------------------------------------------
# timing and memory
# --------------------------------------------------------------------------------------


@dataclasses.dataclass
class Series:
    """Per-step wall-clock (``perf_counter``) and this-thread CPU (``thread_time``) seconds.

    With one intra-op thread, CPU-side autograd runs on the calling thread, so the CPU time
    is the step's own work and excludes time the process spent descheduled: the robust
    figure on a shared machine.
    """

    wall: list[float] = dataclasses.field(default_factory=list)
    cpu: list[float] = dataclasses.field(default_factory=list)

    def add(self, wall: float, cpu: float) -> None:
        """Record one step."""
        self.wall.append(wall)
        self.cpu.append(cpu)

    def extend(self, other: Series) -> None:
        """Append another series' steps."""
        self.wall.extend(other.wall)
        self.cpu.extend(other.cpu)

    def drop(self, start: int, count: int) -> None:
        """Remove ``count`` steps from index ``start``."""
        del self.wall[start:start + count]
        del self.cpu[start:start + count]

    def __len__(self) -> int:
        return len(self.wall)

    @property
    def med_wall(self) -> float:
        """Median wall-clock seconds."""
        return statistics.median(self.wall)

    @property
    def med_cpu(self) -> float:
        """Median CPU seconds."""
        return statistics.median(self.cpu)


def time_interleaved(methods: Sequence[Method], batches: Sequence[Batch], steps: int, warmup: int) -> list[Series]:
    """Per-step times of each method, round-robin with a rotating start; warm-up dropped."""
    times = [Series() for _ in methods]
    n = len(methods)
    for r in range(warmup + steps):
        batch = batches[r % len(batches)]
        for k in range(n):
            j = (r + k) % n
            t0, c0 = time.perf_counter(), time.thread_time()
            methods[j].step(batch)
            c1, t1 = time.thread_time(), time.perf_counter()
            if r >= warmup:
                times[j].add(t1 - t0, c1 - c0)
    return times


def step_peak_bytes(method: Method, batches: Sequence[Batch], repeats: int = 3) -> int:
    """Peak bytes allocated during one step above the level at its start (max over repeats).

    Replays the CPU allocator's events recorded by ``torch.profiler(profile_memory=True)``.
    """
    from torch.profiler import ProfilerActivity, profile

    peak = 0
    for r in range(repeats):
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            method.step(batches[r % len(batches)])
        events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                        if e.name() == "[memory]")
        level = 0
        for _, nbytes in events:
            level += nbytes
            peak = max(peak, level)
    return peak


# --------------------------------------------------------------------------------------
# Lightning section
# --------------------------------------------------------------------------------------


class _StepTimer:
    """Shared record of per-step times, fed by a start and an end callback."""

    def __init__(self) -> None:
        self.t0 = 0.0
        self.c0 = 0.0
        self.times = Series()
        self.threads: set[int] = set()


def _timer_callbacks(timer: _StepTimer) -> tuple[Any, Any]:
    """A callback to put first (records the start) and one to put last (records the end)."""
    import lightning as L

    class Start(L.Callback):
        def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
            timer.threads.add(torch.get_num_threads())
            timer.t0, timer.c0 = time.perf_counter(), time.thread_time()

    class End(L.Callback):
        def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            c1, t1 = time.thread_time(), time.perf_counter()
            timer.times.add(t1 - timer.t0, c1 - timer.c0)

    return Start(), End()


def _lightning_modules(wl: Workload) -> tuple[Any, Any]:
    """(plain summed-loss LightningModule, GradNormMixin LightningModule) on the workload's model."""
    import lightning as L

    from gradnorm_lightning import GradNormMixin

    names = tuple(f"task{i}" for i in range(wl.num_tasks))

    class LitPlain(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = build_model(wl)

        def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
            x, ys = batch
            return torch.stack(task_losses(self.net(x), ys)).sum()

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=wl.model_lr)

    class LitGradNorm(GradNormMixin, L.LightningModule):
        task_names = names

        def __init__(self) -> None:
            super().__init__()
            self.net = build_model(wl)

        def shared_layer(self) -> nn.Module:
            return self.net.shared_layer

        def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
            x, ys = batch
            losses = task_losses(self.net(x), ys)
            return self.combine_task_losses(dict(zip(names, losses, strict=True)))

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=wl.model_lr)

    return LitPlain(), LitGradNorm()


def _fit(module: Any, batches: Sequence[Batch], steps: int, extra: Sequence[Any], timer: _StepTimer) -> None:
    import lightning as L
    from torch.utils.data import DataLoader

    start, end = _timer_callbacks(timer)
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[start, *extra, end],
    )
    trainer.fit(module, DataLoader(list(batches), batch_size=None, shuffle=False))


@dataclasses.dataclass
class LightningResult:
    """Step times of the Lightning section."""

    plain_loop: Series
    balancer_loop: Series
    lightning_plain: Series
    lightning_gradnorm: Series
    lightning_gradnorm_nosanitize: Series


def time_lightning(wl: Workload, batches: Sequence[Batch], steps: int, per_fit: int = 10,
                   drop: int = 2) -> LightningResult:
    """Alternate short fits with and without ``GradNormCallback`` with blocks of the plain loops.

    Every round: a fit of ``per_fit`` steps of the plain summed-loss module; the same for
    the GradNormMixin module with ``GradNormCallback()`` (defaults) and with
    ``GradNormCallback(sanitize_grads=False)``; then ``per_fit`` interleaved steps of the
    plain PyTorch summed-loss loop and of the plain-PyTorch balancer (default path). The
    first ``drop`` steps of every fit are discarded (Trainer start-up). Rounds continue
    until every series has ``steps`` samples.
    """
    import logging

    from gradnorm_lightning import GradNormCallback

    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    lit_plain, lit_gn = _lightning_modules(wl)
    _, lit_gn2 = _lightning_modules(wl)
    kwargs: dict[str, Any] = dict(alpha=wl.alpha, lr=wl.weight_lr, optimizer="sgd", min_weight=wl.min_weight)
    # One callback instance per module for all its fits: a fresh one per fit would leave the
    # previous balancer's forward hook on the shared layer (GradNormCallback.teardown keeps it).
    runs = [(lit_plain, []), (lit_gn, [GradNormCallback(**kwargs)]),
            (lit_gn2, [GradNormCallback(**kwargs, sanitize_grads=False)])]
    timers = [_StepTimer() for _ in runs]
    loops: list[Method] = [PlainSum(wl, build_model(wl)),
                           ProjectGradNorm(wl, build_model(wl), name="balancer")]
    loop_times = [Series(), Series()]
    rounds = 0
    while min(*(len(t.times) for t in timers), len(loop_times[0])) < steps:
        for (module, callbacks), timer in zip(runs, timers, strict=True):
            n = len(timer.times)
            _fit(module, batches, per_fit, callbacks, timer)
            timer.times.drop(n, drop)
        block = time_interleaved(loops, batches, per_fit - drop, warmup=0 if rounds else drop)
        for acc, series in zip(loop_times, block, strict=True):
            acc.extend(series)
        rounds += 1
    return LightningResult(loop_times[0], loop_times[1], *(t.times for t in timers))


# --------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------


def machine_info() -> list[str]:
    """CPU model, core count, versions and thread setting, as Markdown bullet lines."""
    import os
    import subprocess
    from importlib import metadata

    cpu = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass

    def version(pkg: str) -> str:
        try:
            return metadata.version(pkg)
        except metadata.PackageNotFoundError:
            return "not installed"

    here = os.path.dirname(os.path.abspath(__file__))
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                check=False, cwd=here).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "../gradnorm_lightning"],
                               capture_output=True, text=True, check=False, cwd=here).stdout.strip()
        if commit and dirty:
            commit += " + uncommitted changes in gradnorm_lightning/"
    except OSError:
        commit = "?"
    return [
        f"- CPU: {cpu} ({os.cpu_count()} logical cores visible), no GPU used",
        f"- torch {torch.__version__}, torch.get_num_threads() = {torch.get_num_threads()}",
        f"- lightning {version('lightning')}, gradnorm-pytorch {version('gradnorm-pytorch')}, "
        f"python {platform.python_version()}",
        f"- project commit {commit or '?'}, {time.strftime('%Y-%m-%d %H:%M:%S %Z')}",
    ]


def run_workload(wl: Workload, steps: int, warmup: int, check_steps: int, lightning: bool) -> list[str]:
    """Check, time and measure every row on one workload; returns Markdown lines."""
    lines = [f"### Workload `{wl.name}`", ""]
    if wl.name == "toy":
        lines.append(f"GradNorm paper toy: T={wl.num_tasks}, input {wl.in_dim}, trunk 4×(Linear(·,{wl.hidden})+ReLU), "
                     f"heads Linear({wl.hidden},{wl.head_out}), batch {wl.batch}, MSE per task; "
                     f"shared layer = last trunk Linear ({wl.hidden}×{wl.hidden}+{wl.hidden}).")
    else:
        c1, c2 = wl.channels
        lines.append(f"Conv trunk: {'×'.join(map(str, wl.image))} input, Conv({c1})-ReLU-Pool-Conv({c2})-ReLU-Pool "
                     f"-> {wl.flat} features -> shared Linear({wl.flat},{wl.feat})+ReLU; T={wl.num_tasks} heads "
                     f"Linear({wl.feat},{wl.head_out}), batch {wl.batch}, MSE per task.")
    lines += ["", f"alpha={wl.alpha}, weight lr={wl.weight_lr} (SGD), model SGD lr={wl.model_lr}, float32 for timing.", ""]

    print(f"== {wl.name}: trajectory check (float64, {check_steps} steps)", flush=True)
    checks = {r.key: r for r in check_trajectories(wl, steps=check_steps)}

    print(f"== {wl.name}: timing ({warmup} warm-up + {steps} interleaved rounds)", flush=True)
    batches = make_batches(wl, 8)
    factories = method_factories()
    methods = [f(wl, build_model(wl)) for _, f in factories]
    times = time_interleaved(methods, batches, steps, warmup)
    peaks = [step_peak_bytes(m, batches) for m in methods]

    plain = times[0]
    lines += ["| method | median ms/step | p25–p75 ms | ratio to plain | CPU ms/step | ratio to plain (CPU) "
              "| extra peak memory (MiB) | max abs(w − w_textbook) [reference] |",
              "|---|---:|---:|---:|---:|---:|---:|---|"]
    for (key, _), m, ts, pk in zip(factories, methods, times, peaks, strict=True):
        q = statistics.quantiles(ts.wall, n=4)
        chk = checks.get(key)
        dev = "—" if chk is None else f"{chk.max_abs_dev:.1e} [{chk.reference}]" + ("" if chk.ok else " (deviates, see below)")
        lines.append(f"| {m.name} | {ts.med_wall * 1e3:.2f} | {q[0] * 1e3:.2f}–{q[2] * 1e3:.2f} "
                     f"| {ts.med_wall / plain.med_wall:.2f}× | {ts.med_cpu * 1e3:.2f} | {ts.med_cpu / plain.med_cpu:.2f}× "
                     f"| {(pk - peaks[0]) / 2**20:+.2f} | {dev} |")
    lines.append("")
    lines.append(f"Plain step peak (allocated during the step): {peaks[0] / 2**20:.2f} MiB.")
    for chk in checks.values():
        if chk.detail:
            lines.append(f"- {chk.name}: max abs(w − w_textbook) = {chk.max_abs_dev:.2e}; {chk.detail}.")
    lines.append("")

    if lightning and project_available():
        print(f"== {wl.name}: Lightning", flush=True)
        lr = time_lightning(wl, batches, steps)
        rows = [("plain PyTorch loop, summed loss", lr.plain_loop, None),
                ("plain PyTorch loop, GradNorm balancer (default path)", lr.balancer_loop, None),
                ("Lightning, summed loss, no callback", lr.lightning_plain, None),
                ("Lightning, GradNormMixin + GradNormCallback() (defaults)", lr.lightning_gradnorm, lr.balancer_loop),
                ("Lightning, GradNormMixin + GradNormCallback(sanitize_grads=False)",
                 lr.lightning_gradnorm_nosanitize, lr.balancer_loop)]
        n = min(len(r[1]) for r in rows)
        lines += [
            f"Lightning (same model; >= {n} timed steps each; short fits alternated with blocks of the plain "
            "loops; a step is on_train_batch_start (first callback) → on_train_batch_end (last callback)):",
            "",
            "| run | median ms/step | ÷ plain loop | ÷ Lightning without | ÷ plain balancer loop "
            "| CPU ms/step | ÷ Lightning without (CPU) | ÷ plain balancer loop (CPU) |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        base = lr.lightning_plain
        for label, ser, bal in rows:
            is_lit = label.startswith("Lightning")
            lines.append(
                f"| {label} | {ser.med_wall * 1e3:.2f} | {ser.med_wall / lr.plain_loop.med_wall:.2f}× "
                f"| {f'{ser.med_wall / base.med_wall:.2f}×' if is_lit else '—'} "
                f"| {f'{ser.med_wall / bal.med_wall:.2f}×' if bal is not None else '—'} "
                f"| {ser.med_cpu * 1e3:.2f} | {f'{ser.med_cpu / base.med_cpu:.2f}×' if is_lit else '—'} "
                f"| {f'{ser.med_cpu / bal.med_cpu:.2f}×' if bal is not None else '—'} |")
        lines.append("")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--steps", type=int, default=60, help="timed interleaved rounds (>= 30)")
    parser.add_argument("--warmup", type=int, default=10, help="untimed rounds first")
    parser.add_argument("--workload", choices=["toy", "conv", "all"], default="all")
    parser.add_argument("--check-steps", type=int, default=50, help="float64 trajectory-check steps")
    parser.add_argument("--no-lightning", action="store_true", help="skip the Lightning section")
    parser.add_argument("--out", default=None, help="also write the Markdown report here")
    args = parser.parse_args(argv)
    if args.steps < 30:
        parser.error("--steps must be >= 30 (median of at least 30 steps)")
    torch.set_num_threads(1)

    lines = ["# GradNorm step-time benchmark", "", f"Command: `python {' '.join(sys.argv if argv is None else ['benchmarks/bench_step.py', *argv])}`", ""]
    lines += machine_info()
    lines += ["", "Time: median over interleaved rounds (methods round-robin, start rotating), after warm-up, "
              "one thread. Ratio: ÷ the plain summed-loss step measured in the same rounds. CPU ms: `time.thread_time()` of the step (excludes time descheduled by other processes; the steadier figure on a shared machine). Extra peak "
              "memory: peak of bytes allocated during one step (CPU allocator events from "
              "`torch.profiler(profile_memory=True)`, replayed in order) minus the plain step's; state kept "
              "between steps is not included (O(T) floats for every method). Trajectory: float64, same "
              "init/data/lr/alpha, max over all steps and tasks of |w − w_reference|, where the reference is "
              "the textbook create_graph GradNorm with norms over: W = all parameters of the last shared layer, "
              "trunk = all trunk parameters, rep = the shared layer's output, rep_relu = the representation the heads read (after the ReLU).", ""]
    if not project_available():
        lines += ["**gradnorm_lightning.GradNorm is not importable: this project's rows are missing.**", ""]
    names = ["toy", "conv"] if args.workload == "all" else [args.workload]
    for name in names:
        wl = toy_workload() if name == "toy" else conv_workload()
        lines += run_workload(wl, args.steps, args.warmup, args.check_steps, not args.no_lightning)
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
