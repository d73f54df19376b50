"""GradNorm in a Lightning Fabric training loop, with Fabric's precision (bf16 included).

What you learn here:

* Fabric needs no callback: the plain balancer works in a Fabric loop as in any PyTorch loop.
  Set the model up with ``fabric.setup``, build :class:`gradnorm_lightning.GradNorm` on its
  last shared layer (after ``setup``, so it sees the layer Fabric placed and converted), then
  per step ``fabric.backward(gn.combine(losses))``, ``gn.step()`` and ``optimizer.step()``;
* precision: under ``"bf16-mixed"`` (autocast) and ``"bf16-true"`` (a bfloat16 model) the task
  weights, their optimizer and the statistics stay float32, and bfloat16 losses are combined in
  float32. (Under ``"16-mixed"`` Fabric's GradScaler scales the backward: pass its scale,
  ``gn.step(grad_scale=scaler.get_scale())``, so that the norms are those of the unscaled loss.)

The model: an MLP trunk whose second ``Linear`` is the last shared layer and three regression
heads whose targets differ in scale (1, 5 and 25). Everything is synthetic; nothing is
downloaded.

Run::

    python examples/fabric_loop.py --steps 200
    python examples/fabric_loop.py --steps 200 --precision bf16-mixed
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import lightning as L
import torch
from torch import Tensor, nn

from gradnorm_lightning import GradNorm

TASKS = ("unit", "five", "twentyfive")
SCALES = (1.0, 5.0, 25.0)
IN_FEATURES = 12
HIDDEN = 32


class MultiTaskNet(nn.Module):
    """A shared trunk and one regression head per task."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(
            nn.Linear(IN_FEATURES, HIDDEN), nn.Tanh(),
            nn.Linear(HIDDEN, HIDDEN),  # <- the last shared layer
            nn.Tanh(),
        )
        self.heads = nn.ModuleList(nn.Linear(HIDDEN, 1) for _ in TASKS)

    @property
    def shared_layer(self) -> nn.Module:
        """The last layer every task goes through."""
        return self.trunk[2]

    def forward(self, x: Tensor) -> list[Tensor]:
        z = self.trunk(x)
        return [head(z).squeeze(1) for head in self.heads]


def make_batches(steps: int, batch_size: int = 32, seed: int = 0) -> list[tuple[Tensor, Tensor]]:
    """``steps`` batches: targets from a fixed random teacher, one scale per task."""
    g = torch.Generator().manual_seed(seed)
    teacher = torch.randn(IN_FEATURES, len(TASKS), generator=g)
    out = []
    for _ in range(steps):
        x = torch.randn(batch_size, IN_FEATURES, generator=g)
        out.append((x, torch.tanh(x @ teacher) * torch.tensor(SCALES)))
    return out


def train(steps: int, precision: str | None = "32-true", seed: int = 0) -> dict[str, object]:
    """Train with GradNorm for ``steps`` steps; ``precision=None``: the same loop without Fabric.

    Returns:
        The final task weights (by name), the balancer's dtype, the last losses and the count
        of weight updates.
    """
    torch.manual_seed(seed)
    model = MultiTaskNet()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.002)
    fabric = None
    if precision is not None:
        fabric = L.Fabric(accelerator="cpu", devices=1, precision=precision)  # type: ignore[arg-type]
        model, optimizer = fabric.setup(model, optimizer)
    # after fabric.setup: the layer as Fabric placed and converted it
    gn = GradNorm(model.shared_layer, task_names=TASKS, alpha=1.5, lr=0.025, optimizer="adam")
    losses: list[Tensor] = []
    for x, y in make_batches(steps, seed=seed):
        if fabric is not None:
            x, y = fabric.to_device((x, y))
        outputs = model(x)
        losses = [nn.functional.mse_loss(out, y[:, i].to(out.dtype)) for i, out in enumerate(outputs)]
        optimizer.zero_grad()
        loss = gn.combine(losses)
        if fabric is not None:
            fabric.backward(loss)
        else:
            loss.backward()
        gn.step()
        optimizer.step()
    return {
        "weights": dict(zip(TASKS, gn.weights.tolist())),
        "dtype": gn.weights.dtype,
        "last_losses": {name: float(loss.detach()) for name, loss in zip(TASKS, losses)},
        "updates": int(gn.num_updates),
    }


def main(argv: Sequence[str] | None = None) -> dict[str, object]:
    """Command line: train and print the final task weights."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--precision", default="32-true",
                        help="Fabric's precision: 32-true, bf16-mixed, bf16-true, 64-true, ...")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    result = train(args.steps, args.precision)
    weights = ", ".join(f"{k}={v:.4f}" for k, v in result["weights"].items())  # type: ignore[attr-defined]
    print(f"precision {args.precision}: final task weights {weights} (balancer {result['dtype']})")
    return result


if __name__ == "__main__":
    main()
