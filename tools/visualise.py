"""Pictures of models and runs: effective receptive fields side by side, and multirun training curves.

    python -m tools.visualise erf vmamba_tiny_s1l8 convnext_tiny --size 224 --out erf.png
    python -m tools.visualise erf vmamba_tiny_s1l8 --weights <model.safetensors> --images <folder>
    python -m tools.visualise curves logs/train/multiruns/<time> --metric val/acc --out curves.png

The effective receptive field (ERF) follows the published method (RepLKNet, Ding et al., CVPR 2022,
"Scaling Up Your Kernels to 31x31", Sec. 4.2 and its erf/ scripts; VMamba's analysis reuses it): for each
image, back-propagate the sum over channels of ReLU(centre point of the last feature map), keep the positive
part of the input gradient (ReLU) and sum it over input channels; average these maps over the images. The
figure shows log10(1 + ERF) divided by its maximum, and ``area_ratio`` gives the paper's "high-contribution
area ratio": the area of the smallest centred square holding a fraction t of the total contribution,
divided by the image area. A wide, smooth ERF means each output sees the whole image.

The ReLU matters: the plain channel sum of a LayerNorm-ed feature vector is constant (normalised values sum
to zero times a uniform weight), so its gradient would be rounding noise.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import pandas as pd
import timm
import torch
from torch import nn

import backbones  # noqa: F401  (registers the vision-Mamba models with timm)
from tasks.callbacks import metric_history

AREA_THRESHOLDS = (0.2, 0.3, 0.5, 0.99)
"""Contribution fractions at which RepLKNet reports the high-contribution area ratio."""


def effective_receptive_field(model: nn.Module, images: torch.Tensor) -> np.ndarray:
    """RepLKNet's ERF of ``model.forward_features`` averaged over ``images``, as an (H, W) float64 array.

    Per image: gradient of sum_c ReLU(features[c, H/2, W/2]) with respect to the input, its positive
    part summed over input channels. Images whose map is not finite are skipped (as the reference code
    does); if none is left the error says so.
    """
    model.eval()
    total = torch.zeros(images.shape[-2:], dtype=torch.float64)
    used = 0
    for image in images:
        x = image[None].clone().requires_grad_(True)
        features = model.forward_features(x)
        if features.ndim != 4:
            raise ValueError("ERF needs NCHW features; sequence models must return maps from forward_features")
        height, width = features.shape[-2:]
        centre = torch.relu(features[0, :, height // 2, width // 2]).sum()
        (grad,) = torch.autograd.grad(centre, x)
        contribution = torch.relu(grad[0]).sum(0).double()
        if torch.isfinite(contribution).all():
            total += contribution
            used += 1
    if not used:
        raise FloatingPointError("every ERF map was non-finite (NaN/Inf gradients); check the model's weights")
    return (total / used).numpy()


def area_ratio(erf: np.ndarray, threshold: float) -> float:
    """RepLKNet's high-contribution area ratio: area of the smallest square centred on the image centre
    whose ERF sum reaches ``threshold`` of the total, divided by the image area."""
    height, width = erf.shape
    total = erf.sum()
    if total <= 0:
        return 0.0
    cy, cx = height // 2, width // 2
    for radius in range(max(height, width)):
        window = erf[max(0, cy - radius):cy + radius + 1, max(0, cx - radius):cx + radius + 1]
        if window.sum() >= threshold * total:
            return window.size / erf.size
    return 1.0


def normalise_erf(erf: np.ndarray) -> np.ndarray:
    """log10(1 + x) scaled to [0, 1], as the published ERF figures show it."""
    scaled = np.log10(erf + 1.0)
    return scaled / scaled.max() if scaled.max() > 0 else scaled


def load_images(folder: Optional[Path], count: int, size: int, in_chans: int, seed: int = 0) -> torch.Tensor:
    """Up to ``count`` images from ``folder`` (any PIL-readable files, resized), else Gaussian noise."""
    if folder is None:
        return torch.randn(count, in_chans, size, size, generator=torch.Generator().manual_seed(seed))
    from timm.data import create_transform

    from datamodules.readers import open_image

    transform = create_transform(size, is_training=False, crop_pct=1.0)
    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in {".jpg", ".jpeg", ".png", ".bmp"})[:count]
    if not paths:
        raise FileNotFoundError(f"no images (*.jpg, *.jpeg, *.png, *.bmp) under {folder}")
    return torch.stack([transform(open_image(p, "RGB")) for p in paths])


def build_model(name: str, weights: Optional[Path]) -> nn.Module:
    """A registered model with random weights, or with ``weights`` (safetensors or a torch state dict)."""
    model = timm.create_model(name, num_classes=0)
    if weights is not None:
        if weights.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(weights))
        else:
            state = torch.load(weights, map_location="cpu", weights_only=True)
        missing, unexpected = model.load_state_dict(state, strict=False)
        unexpected = [k for k in unexpected if not k.startswith("head")]
        if missing or unexpected:
            raise ValueError(f"{weights} does not fit {name}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model


def plot_erfs(erfs: dict[str, np.ndarray], out: Path) -> Path:
    """Side-by-side ERF heatmaps, one panel per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(erfs), figsize=(3.2 * len(erfs), 3.4), squeeze=False)
    for ax, (name, erf) in zip(axes[0], erfs.items()):
        image = ax.imshow(normalise_erf(erf), cmap="RdYlGn", vmin=0, vmax=1)
        ax.set_title(name, fontsize=9)
        ax.axis("off")
    fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8)
    fig.savefig(out, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return out


def multirun_curves(sweep_dir: Path, metric: str) -> dict[str, pd.DataFrame]:
    """``{label: (step, metric) frame}`` for every job of a Hydra multirun, labelled by its overrides."""
    curves = {}
    for job in sorted(p for p in sweep_dir.iterdir() if (p / "metrics.csv").is_file()):
        frame = pd.read_csv(job / "metrics.csv")
        if metric not in frame:
            continue
        overrides = job / ".hydra" / "overrides.yaml"
        label = job.name
        if overrides.is_file():
            import yaml

            label = " ".join(yaml.safe_load(overrides.read_text()) or []) or job.name
        curves[label] = metric_history(frame, metric)
    if not curves:
        raise FileNotFoundError(f"no job under {sweep_dir} has {metric!r} in its metrics.csv")
    return curves


def plot_curves(curves: dict[str, pd.DataFrame], metric: str, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for label, frame in curves.items():
        ax.plot(frame["step"], frame[metric], marker="o", label=label)
    ax.set_xlabel("step")
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    erf = commands.add_parser("erf", help="effective receptive fields of one or more models, side by side")
    erf.add_argument("models", nargs="+", help="registered model names (ours or timm's)")
    erf.add_argument("--weights", type=Path, nargs="*", default=[], help="weight files, one per model, in order")
    erf.add_argument("--images", type=Path, help="folder of images (default: Gaussian noise inputs)")
    erf.add_argument("--count", type=int, default=8, help="images to average over")
    erf.add_argument("--size", type=int, default=224, help="input side length")
    erf.add_argument("--out", type=Path, default=Path("erf.png"))
    curves = commands.add_parser("curves", help="one metric over steps for every job of a multirun")
    curves.add_argument("sweep_dir", type=Path)
    curves.add_argument("--metric", default="val/acc")
    curves.add_argument("--out", type=Path, default=Path("curves.png"))
    args = parser.parse_args(argv)

    if args.command == "erf":
        if args.weights and len(args.weights) != len(args.models):
            parser.error("give one --weights file per model, or none")
        weights = args.weights or [None] * len(args.models)
        images = load_images(args.images, args.count, args.size, in_chans=3)
        erfs = {name: effective_receptive_field(build_model(name, w), images) for name, w in zip(args.models, weights)}
        for name, erf in erfs.items():
            ratios = "  ".join(f"t={t:g}: {area_ratio(erf, t):.3f}" for t in AREA_THRESHOLDS)
            print(f"{name}: high-contribution area ratio  {ratios}")
        print(f"wrote {plot_erfs(erfs, args.out)}")
    else:
        print(f"wrote {plot_curves(multirun_curves(args.sweep_dir, args.metric), args.metric, args.out)}")


if __name__ == "__main__":
    main()
