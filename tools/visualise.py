"""Pictures of models and runs: effective receptive fields side by side, and multirun training curves.

    python -m tools.visualise erf vmamba_tiny_s1l8 convnext_tiny --size 224 --out erf.png
    python -m tools.visualise erf vmamba_tiny_s1l8 --weights <model.safetensors> --images <folder>
    python -m tools.visualise curves logs/train/multiruns/<time> --metric val/acc --out curves.png

The effective receptive field (ERF) follows the analysis VMamba reports (after RepLKNet): the gradient
of the centre pixel of the last feature map, summed over channels, with respect to the input; its
absolute value is summed over input channels, averaged over images, and shown as log10(1 + x)
normalised to [0, 1]. A wide, smooth ERF means each output sees the whole image.
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


def effective_receptive_field(model: nn.Module, images: torch.Tensor) -> np.ndarray:
    """Mean |d(centre of the last feature map) / d(input)| over ``images``, as an (H, W) array."""
    model.eval()
    total = torch.zeros(images.shape[-2:], dtype=torch.float64)
    for image in images:
        x = image[None].clone().requires_grad_(True)
        features = model.forward_features(x)
        if features.ndim == 3:
            raise ValueError("ERF needs NCHW features; sequence models must return maps from forward_features")
        height, width = features.shape[-2:]
        features[0, :, height // 2, width // 2].sum().backward()
        total += x.grad[0].abs().sum(0).double()
    return (total / len(images)).numpy()


def normalise_erf(erf: np.ndarray) -> np.ndarray:
    """log10(1 + x) scaled to [0, 1], as the published ERF figures show it."""
    scaled = np.log10(erf + 1.0)
    return scaled / scaled.max() if scaled.max() > 0 else scaled


def load_images(folder: Optional[Path], count: int, size: int, in_chans: int, seed: int = 0) -> torch.Tensor:
    """Up to ``count`` images from ``folder`` (any PIL-readable files, resized), else Gaussian noise."""
    if folder is None:
        return torch.randn(count, in_chans, size, size, generator=torch.Generator().manual_seed(seed))
    from PIL import Image
    from timm.data import create_transform

    transform = create_transform(size, is_training=False, crop_pct=1.0)
    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in {".jpg", ".jpeg", ".png", ".bmp"})[:count]
    if not paths:
        raise FileNotFoundError(f"no images (*.jpg, *.jpeg, *.png, *.bmp) under {folder}")
    return torch.stack([transform(Image.open(p).convert("RGB")) for p in paths])


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
        print(f"wrote {plot_erfs(erfs, args.out)}")
    else:
        print(f"wrote {plot_curves(multirun_curves(args.sweep_dir, args.metric), args.metric, args.out)}")


if __name__ == "__main__":
    main()
