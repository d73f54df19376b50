"""The rows of the benchmark: each method owns a model copy and runs one full training step.

Rows, in table order (:func:`method_factories`): the plain summed loss (the denominator of
every ratio), the textbook ``create_graph`` GradNorm (the reference for numbers),
``gradnorm-pytorch`` 0.2.3, two LibMTL-style variants (norms over the trunk with ``T``
backward passes; norms at the representation, LibMTL's ``rep_grad``), a hand-written minimal
exact GradNorm for the workloads with a shared ``Linear`` (the floor reference), the plain step
plus the exact norms' arithmetic alone (the floor of any exact method; not a method), and this project's
routes through the public API only (``GradNorm``, ``task_views``, ``combine``, ``step``,
``weights``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from benchmarks.workloads import Batch, MultiTaskNet, Workload


class Method:
    """One row of the table: a full training step (forward, backward, balancer, SGD).

    Attributes:
        name: row label.
        reference: key of the textbook trajectory this row must reproduce (``None`` for
            the plain step, which has no weights); see :class:`Textbook`.
        must_match: whether a trajectory deviation fails the benchmark.
    """

    name = "?"
    reference: str | None = "W"
    must_match = True

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
        loss = torch.stack(self.model.task_losses(self.model(x), ys)).sum()
        loss.backward()
        self.opt.step()


class _AnalyticWeights(Method):
    """Shared state of the hand-written rows: weights, ``L(0)``, and the analytic update."""

    def __init__(self, wl: Workload, model: MultiTaskNet) -> None:
        super().__init__(wl, model)
        self.trunk_params = list(model.trunk.parameters())
        self.head_params = [list(h.parameters()) for h in model.heads]
        self.w = torch.ones(wl.num_tasks, dtype=self.trunk_params[0].dtype, device=self.trunk_params[0].device)
        self.initial: Tensor | None = None

    def _update(self, losses: Tensor, norms: Tensor) -> None:
        """``w <- renorm(clamp(w - lr sign(G - target) n))`` with ``G = w n``."""
        if self.initial is None:
            self.initial = losses.detach().clone()
        t = self.wl.num_tasks
        gw = self.w * norms
        ratios = losses.detach() / self.initial
        rates = ratios / ratios.mean()
        target = gw.mean() * rates**self.wl.alpha
        w = (self.w - self.wl.weight_lr * torch.sign(gw - target) * norms).clamp_min(self.wl.min_weight)
        self.w = w * (t / w.sum())

    def weights(self) -> Tensor:
        """Current weights."""
        return self.w


class Textbook(Method):
    """The textbook ``create_graph`` GradNorm (the reference for numbers).

    Per task ``autograd.grad(w_i L_i, X, create_graph=True)`` with ``X`` one of:
    ``"W"`` all parameters of the last shared layer (the paper), ``"trunk"`` all trunk
    parameters (what the LibMTL-style row computes), ``"rep"`` the shared layer's output,
    ``"rep_relu"`` the representation the heads read. Then ``G_i = ||.||``,
    ``L_grad = sum_i |G_i - G_bar r_i^alpha|`` with the target held constant, its gradient
    into ``w`` only, SGD on ``w``, clamp to ``min_weight``, renormalise to sum ``T``.

    ``gnp_compat=True`` applies, on top of ``X="W_weight"`` (the weight tensor only), the
    documented differences of gradnorm-pytorch 0.2.3 (see :class:`GradNormPytorch`).
    """

    name = "textbook create_graph"

    def __init__(self, wl: Workload, model: MultiTaskNet, wrt: str = "W", gnp_compat: bool = False) -> None:
        super().__init__(wl, model)
        self.wrt = wrt
        self.gnp_compat = gnp_compat
        self.reference = wrt
        p = next(model.parameters())
        self.w = nn.Parameter(torch.ones(wl.num_tasks, dtype=p.dtype, device=p.device))
        self.wopt = torch.optim.SGD([self.w], lr=wl.weight_lr)
        self.initial: Tensor | None = None

    def _inputs(self, pre: Tensor, z: Tensor) -> list[Tensor]:
        if self.wrt == "W":
            return list(self.model.shared_layer.parameters())
        if self.wrt == "W_weight":
            weight = self.model.shared_layer.weight
            assert isinstance(weight, Tensor)
            return [weight]
        if self.wrt == "trunk":
            return list(self.model.trunk.parameters())
        if self.wrt == "rep":
            return [pre]
        if self.wrt == "rep_relu":
            return [z]
        raise ValueError(f"`wrt` must be W, W_weight, trunk, rep or rep_relu; got {self.wrt!r}.")

    def step(self, batch: Batch) -> None:
        """One textbook GradNorm step."""
        x, ys = batch
        t = self.wl.num_tasks
        self.opt.zero_grad(set_to_none=True)
        pre, z, outs = self.model.forward_with_rep(x)
        losses = torch.stack(self.model.task_losses(outs, ys))
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


class LibMTLStyle(_AnalyticWeights):
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

    def step(self, batch: Batch) -> None:
        """One LibMTL-style step."""
        x, ys = batch
        t = self.wl.num_tasks
        self.opt.zero_grad(set_to_none=True)
        losses = torch.stack(self.model.task_losses(self.model(x), ys))
        n_trunk = len(self.trunk_params)
        rows = []
        for i in range(t):
            grads = torch.autograd.grad(losses[i], self.trunk_params + self.head_params[i], retain_graph=i < t - 1)
            rows.append(torch.cat([g.reshape(-1) for g in grads[:n_trunk]]))
            for p, g in zip(self.head_params[i], grads[n_trunk:], strict=True):
                p.grad = self.w[i] * g
        gmat = torch.stack(rows)
        shared = self.w @ gmat
        offset = 0
        for p in self.trunk_params:
            p.grad = shared[offset:offset + p.numel()].view_as(p)
            offset += p.numel()
        self.opt.step()
        self._update(losses, gmat.norm(dim=1))


class LibMTLRepGrad(_AnalyticWeights):
    """LibMTL ``rep_grad``-style GradNorm: norms of the per-task gradients at the representation.

    Written from the description: the trunk's output ``z`` (after the ReLU, what the heads
    read) is detached into ``T`` leaf copies, one per head; per task one backward through
    that head only gives ``g_i = dL_i/dz`` and the head's gradient (scaled by ``w_i``);
    ``n_i = ||g_i||`` over the whole batch; then one backward of ``z`` with
    ``sum_i w_i g_i`` fills the trunk's gradients. Compared against the textbook with
    ``X = z`` (``rep_relu``). LibMTL itself sums ``g_i`` over the batch before the norm and
    uses a softmax parameterisation; neither is reproduced here.
    """

    name = "LibMTL rep_grad-style (norms at the representation, T head passes)"
    reference = "rep_relu"

    def step(self, batch: Batch) -> None:
        """One rep_grad-style step."""
        x, ys = batch
        self.opt.zero_grad(set_to_none=True)
        z = self.model.trunk(x)
        reps = [z.detach().requires_grad_() for _ in self.model.heads]
        outs = [head(r) for head, r in zip(self.model.heads, reps, strict=True)]
        losses = torch.stack(self.model.task_losses(outs, ys))
        rep_grads = []
        for i, (loss, rep, params) in enumerate(zip(losses, reps, self.head_params, strict=True)):
            g_rep, *g_head = torch.autograd.grad(loss, [rep, *params])
            rep_grads.append(g_rep)
            for p, g in zip(params, g_head, strict=True):
                p.grad = self.w[i] * g
        grads = torch.stack(rep_grads)
        z.backward(torch.tensordot(self.w, grads, dims=1))
        self.opt.step()
        self._update(losses, grads.flatten(1).norm(dim=1))


class GradNormPytorch(Method):
    """``gradnorm-pytorch`` 0.2.3 (lucidrains, PyPI), used as its README shows.

    ``GradNormLossWeighter(num_losses=T, learning_rate=lr, restoring_force_alpha=alpha,
    grad_norm_parameters=shared_layer.weight)``; ``weighter.backward(losses)`` (which runs
    the model's backward itself), then ``opt.step()``. Differences from the textbook, by
    design or by accident, which is why this row is not required to match it:

    1. the norm is over the one ``Parameter`` passed (the weight tensor), not the bias;
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

        p = next(model.parameters())
        self.weighter = GradNormLossWeighter(
            num_losses=wl.num_tasks,
            learning_rate=wl.weight_lr,
            restoring_force_alpha=wl.alpha,
            grad_norm_parameters=model.shared_layer.weight,
        ).to(device=p.device, dtype=p.dtype)

    def step(self, batch: Batch) -> None:
        """One step as in gradnorm-pytorch's README."""
        x, ys = batch
        losses = self.model.task_losses(self.model(x), ys)
        self.weighter.backward(losses)
        self.opt.step()
        self.opt.zero_grad()

    def weights(self) -> Tensor:
        """Current weights (the weighter's ``loss_weights`` buffer)."""
        return self.weighter.loss_weights.detach()


class _FanOut(torch.autograd.Function):
    """``T`` aliases of ``z``; the backward keeps the ``T`` incoming gradients, stacked."""

    @staticmethod
    def forward(ctx: Any, z: Tensor, num: int, store: list[Tensor]) -> tuple[Tensor, ...]:
        ctx.store = store
        return tuple(z.view_as(z) for _ in range(num))

    @staticmethod
    def backward(ctx: Any, *grads: Tensor) -> tuple[Tensor, None, None]:
        stacked = torch.stack(grads, dim=1)  # batch-major (N, T, d): the norm's GEMM reads it as is
        ctx.store.append(stacked)
        return stacked.sum(dim=1), None, None


class MinimalExact(_AnalyticWeights):
    """A hand-written exact GradNorm for one model shape: the floor of an eager implementation.

    Not a library: it knows the workload's model (a shared ``Linear`` followed by ``ReLU``,
    heads reading its output) and uses that. The heads read ``T`` aliases of the
    representation from one autograd function whose backward keeps the ``T`` per-task
    gradients (no hooks, no graph walk); after the model's own backward they cross the ReLU
    by one product with its mask. The norms take the cheaper of two exact formulas
    (:func:`linear_norms`). The update is the analytic one of :class:`_AnalyticWeights`, in
    Python floats on the CPU (the cheapest update there is; the project's own ran so until issue
    25) and in torch on a device; nothing is scaled against overflow and nothing is checked. The benchmark's rows are
    compared with it to see how much of their cost an exact eager implementation cannot avoid;
    :class:`NormArithmetic` shows how much of that is arithmetic.
    """

    name = "hand-written minimal exact GradNorm (this model only; floor reference)"
    reference = "W"

    @staticmethod
    def applies(wl: Workload) -> bool:
        """Only for the workloads whose shared layer is a ``Linear`` (toy, conv)."""
        return wl.name in ("toy", "conv")

    def __init__(self, wl: Workload, model: MultiTaskNet) -> None:
        super().__init__(wl, model)
        if not isinstance(model.shared_layer, nn.Linear) or not isinstance(model.trunk[-1], nn.ReLU):
            raise ValueError("MinimalExact needs a shared Linear followed by a ReLU.")
        self._store: list[Tensor] = []

    def step(self, batch: Batch) -> None:
        """One step: forward with the aliases, weighted backward, norms, update."""
        x, ys = batch
        t = self.wl.num_tasks
        self.opt.zero_grad(set_to_none=True)
        trunk = self.model.trunk
        h = trunk[:-2](x).flatten(1)
        pre = trunk[-2](h)
        z = trunk[-1](pre)
        views = _FanOut.apply(z, t, self._store)
        outs = [head(v) for head, v in zip(self.model.heads, views, strict=True)]
        losses = torch.stack(self.model.task_losses(outs, ys))
        (self.w * losses).sum().backward()
        grads = self._store.pop() * (pre > 0).unsqueeze(1)  # (N, T, d_out) at the Linear's output
        norms = linear_norms(h.detach(), grads) / self.w
        self.opt.step()
        self._update(losses, norms)

    def _update(self, losses: Tensor, norms: Tensor) -> None:
        """The analytic update; on the CPU in Python floats."""
        if self.w.device.type != "cpu":
            super()._update(losses, norms)
            return
        values, n, w = losses.detach().tolist(), norms.tolist(), self.w.tolist()
        if self.initial is None:
            self.initial = losses.detach().clone()
        t, alpha, lr, low = self.wl.num_tasks, self.wl.alpha, self.wl.weight_lr, self.wl.min_weight
        ratios = [a / b for a, b in zip(values, self.initial.tolist())]
        mean_ratio = sum(ratios) / t
        gw = [a * b for a, b in zip(w, n)]
        mean_g = sum(gw) / t
        new = []
        for wi, gi, ri, ni in zip(w, gw, ratios, n):
            diff = gi - mean_g * (ri / mean_ratio) ** alpha
            new.append(max(wi - lr * ((diff > 0) - (diff < 0)) * ni, low))
        total = sum(new)
        self.w = torch.tensor([v * (t / total) for v in new], dtype=self.w.dtype)


def linear_norms(h: Tensor, grads: Tensor) -> Tensor:
    """``||dW_t||`` over a Linear's weight and bias from its inputs ``h`` ``(N, d_in)`` and the
    per-task output gradients ``grads`` ``(N, T, d_out)``, by the cheaper of the two exact
    formulas: one ``(d_in + 1, N) @ (N, T·d_out)`` GEMM whose squares are summed per task, or
    (small batches) the ghost norm ``<G_t G_t^T, H H^T>`` with ``H`` the inputs and a column of ones."""
    n, t, d_out = grads.shape
    rows = torch.cat([h, h.new_ones(n, 1)], dim=1)
    d_in = rows.shape[1]
    if n * n * (d_in + t * d_out) < t * d_in * d_out * n:  # the ghost norm is cheaper
        per_task = grads.transpose(0, 1)  # (T, N, d_out)
        gram = torch.bmm(per_task, per_task.transpose(1, 2)) * (rows @ rows.T)
        return gram.sum(dim=(1, 2)).clamp_min_(0).sqrt_()
    return (rows.T @ grads.reshape(n, -1)).square_().sum(dim=0).view(t, -1).sum(dim=1).sqrt_()


class NormArithmetic(PlainSum):
    """The plain step plus the exact per-task norms' arithmetic alone: the floor of every exact method.

    Not a method (it has no weights and balances nothing): after the plain summed-loss
    backward it computes what every exact GradNorm must compute on top of it, the ``T``
    per-task norms over the shared layer's parameters, from the layer's real input and a
    stand-in ``(N, T, ...)`` block of per-task output gradients (made once; a real method
    gets it from the backward). A shared ``Linear``: :func:`linear_norms`. A shared
    ``Conv2d``: every task's weight and bias gradient in one ``convolution_backward`` with the
    tasks stacked along the output channels (one unfolding of the input, one GEMM), then
    their squares summed per task. No hooks, no fan-out, no update, no checks.
    """

    name = "plain step + the exact per-task norms' arithmetic alone (not a method; floor of every exact method)"

    def __init__(self, wl: Workload, model: MultiTaskNet) -> None:
        super().__init__(wl, model)
        layer = model.shared_layer
        if isinstance(layer, nn.Conv2d) and (layer.groups != 1 or isinstance(layer.padding, str)):
            raise ValueError("NormArithmetic needs a Conv2d with groups=1 and numeric padding.")
        if not isinstance(layer, (nn.Linear, nn.Conv2d)):
            raise ValueError("NormArithmetic needs a shared Linear or Conv2d.")
        self.layer = layer
        self._inputs: list[Tensor] = []
        layer.register_forward_hook(lambda _m, inp, _out: self._inputs.append(inp[0].detach()))
        self._grads: Tensor | None = None
        self.last_norms: Tensor | None = None

    def _stand_in(self, h: Tensor) -> Tensor:
        """The ``(N, T, *output)`` block of per-task output gradients (random, made once)."""
        if self._grads is None or self._grads.shape[0] != h.shape[0]:
            with torch.no_grad():
                out = self.layer(h[:1])
            gen = torch.Generator().manual_seed(0)
            shape = (h.shape[0], self.wl.num_tasks, *out.shape[1:])
            self._grads = torch.randn(shape, generator=gen, dtype=h.dtype).to(h.device)
        return self._grads

    def step(self, batch: Batch) -> None:
        """The plain step, with the norms' arithmetic between its backward and its optimizer step."""
        x, ys = batch
        self.opt.zero_grad(set_to_none=True)
        loss = torch.stack(self.model.task_losses(self.model(x), ys)).sum()
        loss.backward()
        h = self._inputs.pop()
        self._inputs.clear()
        grads = self._stand_in(h)
        if isinstance(self.layer, nn.Linear):
            self.last_norms = linear_norms(h.flatten(1), grads)
        else:
            self.last_norms = self._conv_norms(h, grads)
        self.opt.step()

    def _conv_norms(self, h: Tensor, grads: Tensor) -> Tensor:
        layer = self.layer
        assert isinstance(layer, nn.Conv2d)
        n, t, c_out = grads.shape[:3]
        weight = layer.weight
        stacked = grads.reshape(n, t * c_out, *grads.shape[3:])  # (batch-major storage: a free reshape)
        # the weight's values are not read for weight and bias gradients, only its shape
        _, dw, db = torch.ops.aten.convolution_backward(
            stacked, h, weight.new_empty((t * c_out, *weight.shape[1:])), [t * c_out], layer.stride,
            layer.padding, layer.dilation, False, [0, 0], 1, [False, True, True],
        )
        squares = dw.reshape(t, -1).square().sum(dim=1) + db.reshape(t, -1).square().sum(dim=1)
        return squares.sqrt_()


def project_available() -> bool:
    """Whether ``gradnorm_lightning`` exposes the core API (``GradNorm``)."""
    try:
        from gradnorm_lightning import GradNorm  # noqa: F401
    except ImportError:
        return False
    return True


def gradnorm_settings(wl: Workload, mode: str = "auto") -> dict[str, Any]:
    """Every setting of ``GradNorm``/``GradNormCallback`` that shapes the trajectory, explicit.

    The textbook: SGD on the weights at ``wl.weight_lr`` without decay, ``L(0)`` = the first
    step's losses, the floor ``wl.min_weight``. Passed explicitly so that a change of the
    library's defaults cannot change what is measured.
    """
    return dict(alpha=wl.alpha, lr=wl.weight_lr, optimizer="sgd", initial_losses=None, initial_loss_steps=1,
                lr_decay_rate=1.0, min_weight=wl.min_weight, mode=mode)


class ProjectGradNorm(Method):
    """``gradnorm_lightning.GradNorm`` in a plain PyTorch loop (public API only).

    ``loss = gn.combine(losses); loss.backward(); gn.step(); opt.step()`` with the losses
    as a list (``update_every=k``: the statistics and the update on every k-th step only; such a
    row has no textbook trajectory, ``reference=None``) (``sanitize=True``: ``zero_nonfinite_grads_`` before ``opt.step()``, as the
    README's plain-loop quickstart). ``views=True`` makes the heads read ``gn.task_views(z)`` (the zero-extra-pass
    path). Every setting is passed explicitly (:func:`gradnorm_settings`).
    """

    def __init__(self, wl: Workload, model: MultiTaskNet, views: bool = False, mode: str = "auto",
                 name: str = "gradnorm-lightning GradNorm", reference: str | None = "W", sanitize: bool = False,
                 update_every: int = 1, task_cosines: bool = False) -> None:
        super().__init__(wl, model)
        from gradnorm_lightning import GradNorm, zero_nonfinite_grads_

        self._sanitize = zero_nonfinite_grads_ if sanitize else None

        self.gn = GradNorm(model.shared_layer, num_tasks=wl.num_tasks, update_every=update_every,
                           task_cosines=task_cosines, **gradnorm_settings(wl, mode))
        if views:
            model.view_fn = self.gn.task_views
        self.name = name
        self.reference = reference

    def step(self, batch: Batch) -> None:
        """One step through the public API."""
        x, ys = batch
        self.opt.zero_grad(set_to_none=True)
        loss = self.gn.combine(self.model.task_losses(self.model(x), ys))
        loss.backward()
        self.gn.step()
        if self._sanitize is not None:  # as the plain-loop quickstart does
            self._sanitize(self.model.parameters())
        self.opt.step()

    def weights(self) -> Tensor:
        """``gn.weights``."""
        return self.gn.weights.detach()


MethodFactory = Callable[[Workload, MultiTaskNet], Method]


def method_factories(include_project: bool | None = None, wl: Workload | None = None) -> list[tuple[str, MethodFactory]]:
    """All rows, in table order, as (key, factory); with ``wl``, only the rows that apply to it
    (a factory with an ``applies(wl)`` method says; the others apply to every workload)."""
    rows: list[tuple[str, MethodFactory]] = [
        ("plain", PlainSum),
        ("textbook", Textbook),
        ("gradnorm-pytorch", GradNormPytorch),
        ("libmtl", LibMTLStyle),
        ("libmtl-rep", LibMTLRepGrad),
        ("minimal", MinimalExact),
        ("arithmetic", NormArithmetic),
    ]
    if include_project is None:
        include_project = project_available()
    if include_project:
        rows += [
            ("gnl-default", lambda wl, m: ProjectGradNorm(
                wl, m, name="gradnorm-lightning default (losses list)")),
            ("gnl-views", lambda wl, m: ProjectGradNorm(
                wl, m, views=True, name="gradnorm-lightning task_views")),
            ("gnl-cosines", lambda wl, m: ProjectGradNorm(
                wl, m, task_cosines=True, name="gradnorm-lightning task_cosines=True (default route)")),
            ("gnl-representation", lambda wl, m: ProjectGradNorm(
                wl, m, views=True, mode="representation",
                name="gradnorm-lightning mode=representation + task_views", reference="rep")),
            ("gnl-representation-noviews", lambda wl, m: ProjectGradNorm(
                wl, m, mode="representation", name="gradnorm-lightning mode=representation (losses list)",
                reference="rep")),
            ("gnl-autograd", lambda wl, m: ProjectGradNorm(
                wl, m, mode="autograd", name="gradnorm-lightning mode=autograd")),
            # (not Algorithm 1 on every step: no trajectory check; the cost of a schedule)
            ("gnl-every4", lambda wl, m: ProjectGradNorm(
                wl, m, name="gradnorm-lightning default, update_every=4", reference=None, update_every=4)),
            ("gnl-every10", lambda wl, m: ProjectGradNorm(
                wl, m, name="gradnorm-lightning default, update_every=10", reference=None, update_every=10)),
        ]
    if wl is not None:
        rows = [(k, f) for k, f in rows if getattr(f, "applies", lambda _: True)(wl)]
    return rows
