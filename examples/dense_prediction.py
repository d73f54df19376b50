"""Dense prediction with GradNorm: segmentation, depth and surface normals from one conv trunk.

The GradNorm paper's NYUv2 setting in miniature: a convolutional encoder, a shared
``Conv2d(C, C, 3, padding=1)`` + ReLU as the last shared layer, and three convolutional
decoders, trained with Lightning and ``GradNormCallback(alpha=1.5)`` as in the paper.

What you learn here:

* the shared layer does not have to be an ``nn.Linear``: for a ``Conv2d`` the norms
  ``||grad_W L_i||`` over its weight and bias come from one batched vector-Jacobian product
  through that layer alone (no pass through the encoder);
* per-pixel losses of different kinds and scales (cross-entropy over K classes, L1 depth,
  cosine distance of unit normals) each reduce to one scalar per task;
* ``self.task_views(z)``: give each decoder its own view of the shared representation, so
  that the per-task gradients GradNorm needs are captured during the model's own backward.
  Without it (``--no-task-views``) the result is the same, found by a slower route.

The images are synthetic and made here: a few blob-shaped regions of K classes at different
depths, their surface normals from the depth map, and an RGB rendering (class colour times
Lambertian shading, plus noise). Nothing is downloaded.

Run::

    python examples/dense_prediction.py --steps 100
    python examples/dense_prediction.py --steps 100 --no-task-views
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from gradnorm_lightning import GradNormCallback, GradNormMixin

NUM_CLASSES = 4
SIZE = 24  # images are SIZE x SIZE


# ---------------------------------------------------------------------------- synthetic scenes
def _smooth_field(n: int, channels: int, generator: torch.Generator) -> Tensor:
    """Random fields ``(n, channels, SIZE, SIZE)`` that vary slowly across the image."""
    coarse = torch.randn(n, channels, 4, 4, generator=generator)
    return F.interpolate(coarse, size=(SIZE, SIZE), mode="bicubic", align_corners=True)


def make_scenes(num_images: int, seed: int = 0) -> TensorDataset:
    """Images ``(N, 3, H, W)`` with segmentation ``(N, H, W)``, depth ``(N, 1, H, W)`` and unit normals ``(N, 3, H, W)``."""
    generator = torch.Generator().manual_seed(seed)
    segmentation = _smooth_field(num_images, NUM_CLASSES, generator).argmax(dim=1)  # blobs of K classes
    class_depth = torch.linspace(1.0, 4.0, NUM_CLASSES)  # each class sits at its own distance
    depth = class_depth[segmentation].unsqueeze(1) + 0.3 * _smooth_field(num_images, 1, generator)
    depth = F.avg_pool2d(depth, 3, stride=1, padding=1, count_include_pad=False)  # soften the edges
    dz_dy, dz_dx = torch.gradient(depth[:, 0] * SIZE / 4, dim=(1, 2))
    normals = F.normalize(torch.stack([-dz_dx, -dz_dy, torch.ones_like(dz_dx)], dim=1), dim=1)
    palette = torch.rand(NUM_CLASSES, 3, generator=generator) * 0.8 + 0.2
    light = F.normalize(torch.tensor([0.3, -0.4, 1.0]), dim=0)
    shading = (normals * light.view(1, 3, 1, 1)).sum(dim=1, keepdim=True).clamp_min(0.1)
    image = palette[segmentation].permute(0, 3, 1, 2) * shading / depth.sqrt()
    image = image + 0.05 * torch.randn(image.shape, generator=generator)
    return TensorDataset(image, segmentation, depth, normals)


# ---------------------------------------------------------------------------- the model
def _decoder(channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(), nn.Conv2d(channels, out_channels, 1)
    )


class DenseMultiTaskNet(GradNormMixin, L.LightningModule):
    """Conv encoder -> shared Conv2d + ReLU -> one conv decoder per task."""

    task_names = ("segmentation", "depth", "normals")

    def __init__(self, channels: int = 16, lr: float = 2e-3, use_task_views: bool = True) -> None:
        super().__init__()
        self.lr = lr
        self.use_task_views = use_task_views
        self.history: list[dict[str, Tensor]] = []  # per-step task losses, to print at the end
        self.encoder = nn.Sequential(
            nn.Conv2d(3, channels, 3, padding=1), nn.ReLU(),
            nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(),
        )
        self.shared = nn.Conv2d(channels, channels, 3, padding=1)  # the last shared layer
        self.decoders = nn.ModuleDict({
            "segmentation": _decoder(channels, NUM_CLASSES),  # per-pixel class logits
            "depth": _decoder(channels, 1),
            "normals": _decoder(channels, 3),
        })

    def shared_layer(self) -> nn.Module:
        return self.shared

    def forward(self, image: Tensor) -> dict[str, Tensor]:
        z = F.relu(self.shared(self.encoder(image)))
        # One view of z per task (a parameter-free alias): each decoder must read only its own.
        views = self.task_views(z) if self.use_task_views else dict.fromkeys(self.task_names, z)
        out = {name: decoder(views[name]) for name, decoder in self.decoders.items()}
        out["normals"] = F.normalize(out["normals"], dim=1)  # predict unit vectors
        return out

    def training_step(self, batch: tuple[Tensor, Tensor, Tensor, Tensor], batch_idx: int) -> Tensor:
        image, segmentation, depth, normals = batch
        out = self(image)
        losses = {
            "segmentation": F.cross_entropy(out["segmentation"], segmentation),  # mean over pixels
            "depth": F.l1_loss(out["depth"], depth),
            "normals": (1.0 - (out["normals"] * normals).sum(dim=1)).mean(),  # cosine distance
        }
        self.history.append({name: loss.detach() for name, loss in losses.items()})  # or self.log_dict
        return self.combine_task_losses(losses)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)


# ---------------------------------------------------------------------------- training
def main(argv: Sequence[str] | None = None) -> dict[str, object]:
    """Train for ``--steps`` optimizer steps; return the final weights and the losses.

    Args:
        argv: command-line arguments (``None``: ``sys.argv[1:]``).

    Returns:
        ``weights`` (task name to final weight), ``first_losses`` and ``last_losses`` (task
        name to the training loss of the first and the last step).
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps (default: 40)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--no-task-views", dest="task_views", action="store_false",
        help="let every decoder read the same z (GradNorm then takes a slower, equally exact route)",
    )
    args = parser.parse_args(argv)

    L.seed_everything(args.seed, verbose=False)
    torch.set_num_threads(1)

    model = DenseMultiTaskNet(use_task_views=args.task_views)
    data = DataLoader(make_scenes(128, seed=args.seed), batch_size=args.batch_size, shuffle=True)

    trainer = L.Trainer(
        max_steps=args.steps,
        # the paper's NYUv2 setting: alpha 1.5, plain SGD on the task weights
        callbacks=[GradNormCallback(alpha=1.5, lr=0.025, optimizer="sgd")],
        logger=False,  # add a logger to record gradnorm/weight/<task> and the other statistics
        log_every_n_steps=1,
        accelerator="cpu",
        devices=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, data)

    weights = {name: float(w) for name, w in model.task_weights.items()}
    first = {name: float(loss) for name, loss in model.history[0].items()}
    last = {name: float(loss) for name, loss in model.history[-1].items()}
    for name in model.task_names:
        print(f"{name:>13}: loss {first[name]:.4f} -> {last[name]:.4f}, weight {weights[name]:.4f}")
    print(f"final task weights (sum {sum(weights.values()):.4f} = T): {weights}")
    return {"weights": weights, "first_losses": first, "last_losses": last}


if __name__ == "__main__":
    main()
