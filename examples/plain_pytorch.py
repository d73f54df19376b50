"""GradNorm in a plain PyTorch training loop, with a task whose labels are sometimes missing.

What you learn here:

* how to put :class:`gradnorm_lightning.GradNorm` into your own loop: name the last shared
  layer, build the model loss with ``gn.combine(losses)``, call ``loss.backward()``, then
  ``gn.step()`` (the task-weight update) and your optimizer's ``step()``;
* what happens to a task without labels in a batch: its loss is a masked mean over an empty
  mask, ``0 / 0 = NaN``, with a graph whose backward writes ``0 * inf = NaN`` below the head.
  GradNorm leaves the task out of the model loss and out of the weight update, and cuts its
  gradient off before it meets the other tasks' (in the trunk, and under accumulation in the
  gradients of earlier micro-batches): nothing to clean up, nothing lost. ``--loss-form index``
  writes the same loss as ``per_sample[has_label].mean()`` (NaN too, with finite gradients):
  both forms train the same model;
* :func:`gradnorm_lightning.zero_nonfinite_grads_` as a divergence guard (``--guard``): with
  every task's NaN cut off, a non-finite gradient left after the backward is a divergence.

The model: a 2-layer MLP trunk whose second ``Linear`` is the last shared layer, and three
heads with losses of very different scales (a regression with targets of scale 1, one of
scale 10, and a 3-way classification whose labels are missing in every third batch).
Everything is synthetic and made here; nothing is downloaded.

Run::

    python examples/plain_pytorch.py --steps 200
    python examples/plain_pytorch.py --steps 200 --loss-form index   # the same weights
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from gradnorm_lightning import GradNorm, zero_nonfinite_grads_

TASKS = ("small", "large", "label")  # the weights come out in this order
IN_FEATURES = 16
HIDDEN = 64
NUM_CLASSES = 3


class MultiTaskNet(nn.Module):
    """A shared trunk and one head per task."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(
            nn.Linear(IN_FEATURES, HIDDEN),
            nn.ReLU(),
            nn.Linear(HIDDEN, HIDDEN),  # <- the last shared layer: GradNorm's norms run over it
            nn.ReLU(),
        )
        self.heads = nn.ModuleDict({
            "small": nn.Linear(HIDDEN, 1),
            "large": nn.Linear(HIDDEN, 1),
            "label": nn.Linear(HIDDEN, NUM_CLASSES),
        })

    @property
    def shared_layer(self) -> nn.Module:
        """The last layer every task goes through (all its parameters enter the norms)."""
        return self.trunk[2]

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        z = self.trunk(x)
        return {name: head(z) for name, head in self.heads.items()}


def make_batch(
    step: int, batch_size: int, teacher: dict[str, Tensor], generator: torch.Generator
) -> tuple[Tensor, dict[str, Tensor], Tensor]:
    """One synthetic batch: inputs, targets, and which samples carry a class label.

    Every third batch comes from a source without class labels (``has_label`` all False),
    the way a batch of a dataset that lacks one annotation does.
    """
    x = torch.randn(batch_size, IN_FEATURES, generator=generator)
    targets = {
        "small": x @ teacher["small"] + 0.1 * torch.randn(batch_size, generator=generator),
        "large": 10.0 * torch.tanh(x @ teacher["large"]),
        "label": (x @ teacher["label"]).argmax(dim=1),
    }
    has_label = torch.rand(batch_size, generator=generator) < 0.5
    if step % 3 == 2:
        has_label[:] = False
    return x, targets, has_label


def task_losses(outputs: dict[str, Tensor], targets: dict[str, Tensor], has_label: Tensor,
                form: str = "masked") -> list[Tensor]:
    """The three task losses, in the order of ``TASKS``."""
    small = nn.functional.mse_loss(outputs["small"].squeeze(1), targets["small"])
    large = nn.functional.mse_loss(outputs["large"].squeeze(1), targets["large"])
    per_sample = nn.functional.cross_entropy(outputs["label"], targets["label"], reduction="none")
    if form == "index":  # NaN over no labels too, but a backward that reads no element
        return [small, large, per_sample[has_label].mean()]
    # Masked mean over the labelled samples. With no labelled sample this is 0 / 0 = NaN with a
    # graph whose backward writes NaN below the head; GradNorm cuts that off (nothing lost).
    mask = has_label.to(per_sample.dtype)
    label = (per_sample * mask).sum() / mask.sum()
    return [small, large, label]


def main(argv: Sequence[str] | None = None) -> dict[str, object]:
    """Train for ``--steps`` steps and return the final weights and what happened.

    Args:
        argv: command-line arguments (``None``: ``sys.argv[1:]``).

    Returns:
        ``weights`` (task name to final weight), ``absent_steps`` (steps without class labels),
        ``skipped`` (GradNorm's own count of absent steps per task), ``diverged`` (a non-finite
        gradient found by ``--guard``), ``params_finite`` and ``params`` (the final parameters).
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60, help="training steps (default: 60)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--loss-form", choices=("masked", "index"), default="masked",
                        help="the label task's loss: (err * mask).sum() / mask.sum(), or err[mask].mean()")
    parser.add_argument("--guard", action="store_true",
                        help="check for divergence with zero_nonfinite_grads_ before each optimizer step")
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    torch.set_num_threads(1)  # small model: one thread is fastest and reproducible
    generator = torch.Generator().manual_seed(args.seed)
    teacher = {
        "small": torch.randn(IN_FEATURES, generator=generator) / IN_FEATURES**0.5,
        "large": torch.randn(IN_FEATURES, generator=generator) / IN_FEATURES**0.5,
        "label": torch.randn(IN_FEATURES, NUM_CLASSES, generator=generator),
    }

    model = MultiTaskNet()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    # Every setting spelled out: alpha (asymmetry; the paper uses 0.12 on its toy, 1.5 on NYUv2),
    # and the task weights' own optimizer and learning rate. Adam on the weights, because the
    # tasks' gradient norms differ by orders of magnitude here and plain SGD steps would jump.
    gn = GradNorm(model.shared_layer, task_names=TASKS, alpha=1.5, lr=0.025, optimizer="adam")

    absent_steps = 0
    diverged = torch.zeros((), dtype=torch.bool)
    for step in range(args.steps):
        x, targets, has_label = make_batch(step, args.batch_size, teacher, generator)
        losses = task_losses(model(x), targets, has_label, args.loss_form)

        optimizer.zero_grad()
        loss = gn.combine(losses)  # sum_i w_i L_i over the present (finite) tasks
        loss.backward()            # records the per-task gradients at the shared layer
        gn.step()                  # the GradNorm update: w(t) -> w(t+1); the NaN task is left out

        if args.guard:
            # Optional: the absent task's NaN was cut off in the backward, so a non-finite
            # gradient here is a divergence. `found` is a 0-dim bool tensor on the gradients'
            # device (reading it costs a host sync: a real loop checks it on its logging steps).
            diverged |= zero_nonfinite_grads_(model.parameters())
        optimizer.step()
        absent_steps += int(not has_label.any())

        if step % 20 == 0 or step == args.steps - 1:
            shown_losses = ", ".join(f"{n}={float(v.detach()):.3g}" for n, v in zip(TASKS, losses))
            shown_weights = ", ".join(f"{n}={float(w):.3f}" for n, w in zip(TASKS, gn.weights))
            print(f"step {step:4d}  losses: {shown_losses}  weights: {shown_weights}")
            if bool(diverged):
                raise RuntimeError(f"training diverged by step {step}: non-finite gradients with every task present")

    params_finite = all(bool(torch.isfinite(p).all()) for p in model.parameters())
    weights = {name: float(w) for name, w in zip(TASKS, gn.weights)}
    skipped = {name: int(s) for name, s in zip(TASKS, gn.last_stats["skipped"])} if gn.last_stats else {}
    print(f"final task weights (sum {sum(weights.values()):.4f} = T): {weights}")
    print(f"steps without class labels: {absent_steps}; GradNorm counted as absent: {skipped}")
    print(f"model parameters finite: {params_finite}")
    return {
        "weights": weights,
        "absent_steps": absent_steps,
        "skipped": skipped,
        "diverged": bool(diverged),
        "params_finite": params_finite,
        "params": [p.detach().clone() for p in model.parameters()],
    }


if __name__ == "__main__":
    main()
