"""Convert an official top-down pose checkpoint (mmpose layout: backbone + heatmap head) into a run.py checkpoint.

    python -m tools.convert_pose hrvmamba_small256192.pth hrvmamba_small --out weights/hrvmamba_small_256x192.ckpt
    python -m tools.convert hrvmamba_small256192.pth hrvmamba_small --pose --out weights/hrvmamba_small_256x192.ckpt
    python run.py experiment=coco_pose_hrvmamba_small_256x192 mode=eval ckpt_path=weights/hrvmamba_small_256x192.ckpt

The backbone goes through ``tools.convert`` (the family's ``checkpoint_filter_fn``, loaded strictly; HRVMamba
is built with ``multiscale_output=False``, its pose backbone, unless ``--model-arg`` says otherwise); the head's
keys through ``heads.pose.POSE_HEAD_KEY_RULES`` into ``TopdownHeatmapHead``, also loaded strictly, with its
keypoint count and deconvolutions read from the file. The output holds ``state_dict`` with the ``backbone.``
(timm ``features_only`` model) and ``head.`` keys of ``tasks.PoseTask``, so ``run.py mode=eval`` evaluates the
official model; it is written to a temporary file and renamed, and an existing file is never replaced.

The file is read by ``tools.convert.load_official`` (``tools.safe_load``): mmengine's ``meta`` (numpy arrays of
the dataset metadata) and ``message_hub`` training state load as inert records, and a file naming anything that
would run code is refused before anything from it runs.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

import timm
import torch
from torch import nn

import backbones
from heads.pose import TopdownHeatmapHead, pose_head_state_dict
from tools.convert import Conversion, convert_state_dict, load_official, parse_model_args, select_weights


@dataclass
class PoseConversion:
    """What a pose conversion did, for the summary line."""

    backbone: Conversion
    keypoints: int
    deconvolutions: int
    head_tensors: int
    out_path: Optional[Path] = None

    def summary(self) -> str:
        where = f" -> {self.out_path}" if self.out_path else ""
        return (f"{self.backbone.variant} ({self.backbone.family} rules): backbone {self.backbone.tensors} tensors "
                f"({self.backbone.renamed} renamed, {self.backbone.parameters / 1e6:.2f} M parameters), heatmap head "
                f"{self.head_tensors} tensors ({self.deconvolutions} deconvolutions, {self.keypoints} keypoints), "
                f"loaded strict{where}")


def _head_shape(head_weights: Dict[str, torch.Tensor]) -> tuple[int, int, int, int]:
    """Input channels, deconvolutions, their width and keypoints of an mmpose heatmap head."""
    if "final_layer.weight" not in head_weights:
        raise ValueError("the checkpoint has no heatmap head (head.final_layer.weight or keypoint_head.final_layer."
                         f"weight); head keys found: {sorted(head_weights)[:5]}")
    deconvs = sorted(int(k.split(".")[1]) for k, v in head_weights.items()
                     if k.startswith("deconv_layers.") and k.endswith(".weight") and v.dim() == 4)
    if deconvs != [3 * i for i in range(len(deconvs))]:
        raise ValueError(f"unexpected heatmap head layout: deconvolutions at deconv_layers.{deconvs}")
    final = head_weights["final_layer.weight"]
    in_channels = head_weights["deconv_layers.0.weight"].shape[0] if deconvs else final.shape[1]
    width = head_weights["deconv_layers.0.weight"].shape[1] if deconvs else 0
    return int(in_channels), len(deconvs), int(width), int(final.shape[0])


def convert_pose_checkpoint(checkpoint: dict, variant: str, ema: bool = False,
                            **model_args: Any) -> tuple[nn.Module, nn.Module, PoseConversion]:
    """The features-only backbone and the heatmap head holding an official pose checkpoint's weights (both
    loaded strictly), and what the conversion did."""
    if backbones.family_of(variant).__name__.endswith(".hrvmamba"):
        model_args.setdefault("multiscale_output", False)
    backbone, conversion = convert_state_dict(checkpoint, variant, ema, **model_args)
    features = timm.create_model(variant, features_only=True, **model_args)
    features.model.load_state_dict(backbone.state_dict(), strict=True)
    head_weights = pose_head_state_dict(select_weights(checkpoint, ema)[0])
    in_channels, num_deconv, width, keypoints = _head_shape(head_weights)
    channels = features.feature_info.channels()
    levels = [i for i, c in enumerate(channels) if c == in_channels]
    if not levels:
        raise ValueError(f"the heatmap head reads {in_channels} channels but {variant}'s feature levels have "
                         f"{channels}")
    head = TopdownHeatmapHead(channels, keypoints, in_index=levels[-1], num_deconv=num_deconv,
                              deconv_channels=width or 256)
    head.load_state_dict(head_weights, strict=True)
    summary = PoseConversion(backbone=conversion, keypoints=keypoints, deconvolutions=num_deconv,
                             head_tensors=len(head_weights))
    return features.eval(), head.eval(), summary


def save_pose_checkpoint(backbone: nn.Module, head: nn.Module, path: Path) -> Path:
    """A run.py checkpoint (``state_dict`` with ``backbone.`` and ``head.`` keys) at ``path``, written to a
    temporary file beside it and renamed; an existing ``path`` is refused."""
    import lightning

    path = Path(path).resolve()
    if path.exists():
        raise FileExistsError(f"{path} exists; choose another --out (nothing was written)")
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {f"backbone.{k}": v for k, v in backbone.state_dict().items()}
    state.update({f"head.{k}": v for k, v in head.state_dict().items()})
    handle, staging = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(handle)
    try:
        torch.save({"state_dict": state, "pytorch-lightning_version": lightning.__version__}, staging)
        os.replace(staging, path)
    finally:
        if os.path.exists(staging):
            os.unlink(staging)
    return path


def convert_pose_main(checkpoint: Path, variant: str, out: Optional[Path], ema: bool = False,
                      model_arg: Optional[List[str]] = None) -> int:
    """Convert and save as the command line asks; 0 on success, 1 with the error printed."""
    try:
        backbone, head, conversion = convert_pose_checkpoint(load_official(checkpoint), variant, ema,
                                                             **parse_model_args(model_arg or []))
        conversion.out_path = save_pose_checkpoint(backbone, head, out or Path(f"{variant}_pose.ckpt"))
    except (FileNotFoundError, FileExistsError, KeyError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(conversion.summary())
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.convert_pose", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path, help="official pose checkpoint (.pth), mmpose layout")
    parser.add_argument("variant", help="our backbone name, e.g. hrvmamba_small")
    parser.add_argument("--out", type=Path, help="output .ckpt file (default: ./<variant>_pose.ckpt)")
    parser.add_argument("--ema", action="store_true", help="convert the EMA weights")
    parser.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE",
                        help="constructor argument of the backbone, repeatable")
    args = parser.parse_args(argv)
    return convert_pose_main(args.checkpoint, args.variant, args.out, args.ema, args.model_arg)


if __name__ == "__main__":
    raise SystemExit(main())
