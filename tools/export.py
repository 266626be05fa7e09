"""Export a trained run's backbone (and classifier) to a timm model folder, optionally to the Hugging Face Hub.

    python -m tools.export logs/train/runs/<run>/checkpoints/last.ckpt vmamba_femto --out exported/femto
    python -m tools.export <run>/checkpoints/last.ckpt vmamba_tiny_s1l8 --out exported/t --push-to-hub me/vmamba-t

The checkpoint is the one ``run.py`` writes (read with ``weights_only=True``): the backbone's weights
under ``backbone.``, a classification run's linear head under ``head.fc.`` (and ``dist_head.fc.`` with
distillation). The folder is timm's Hugging Face layout (``config.json`` + ``model.safetensors``, written
by timm's ``save_for_hf`` into a temporary folder that is then renamed into place), so after
``import backbones`` ``timm.create_model("local-dir:<folder>", pretrained=True)`` rebuilds the same network:
the backbone with the run's classifier as its ``head``, or a feature extractor (``num_classes=0``) when the run
trained a dense head. The input channels are read from the checkpoint (1 for Fashion-MNIST runs).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Dict, List, Optional

import timm
import torch
from torch import Tensor, nn

import backbones
from tools.convert import save_model_folder


def _prefixed(state_dict: Dict[str, Tensor], prefix: str) -> Dict[str, Tensor]:
    return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}


def _classifiers(model: nn.Module) -> List[nn.Module]:
    classifier = model.get_classifier()
    return list(classifier) if isinstance(classifier, tuple) else [classifier]


def model_from_run(checkpoint_path: Path, variant: str) -> nn.Module:
    """Our timm model of ``variant`` holding a run checkpoint's backbone and linear classifier."""
    if not checkpoint_path.is_file():
        raise FileNotFoundError(f"checkpoint {checkpoint_path}: no such file")
    checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
    state = checkpoint.get("state_dict", checkpoint)
    body = _prefixed(state, "backbone.")
    if not body:
        raise ValueError(f"checkpoint {checkpoint_path} has no 'backbone.' weights; is it from run.py?")
    heads = [_prefixed(state, f"{name}.fc.") for name in ("head", "dist_head")]
    heads = [h for h in heads if h]
    first_conv = timm.models.get_pretrained_cfg(variant).first_conv
    in_chans = int(body[f"{first_conv}.weight"].shape[1])
    num_classes = int(heads[0]["weight"].shape[0]) if heads else 0
    model = backbones.create_backbone(variant, in_chans=in_chans, num_classes=num_classes)
    classifier_keys = {k for k in model.state_dict() if any(k.startswith(f"{name}.") for name in ("head", "head_dist"))}
    missing, unexpected = model.load_state_dict(body, strict=False)
    if unexpected or set(missing) - classifier_keys:
        raise ValueError(f"checkpoint {checkpoint_path} does not fit {variant}: missing "
                         f"{sorted(set(missing) - classifier_keys)[:3]}, unexpected {sorted(unexpected)[:3]}")
    for classifier, weights in zip(_classifiers(model), heads + heads[:1]):
        classifier.load_state_dict(weights)
    return model.eval()


def export_checkpoint(checkpoint_path: Path, variant: str, out_dir: Path, push_to_hub: Optional[str] = None) -> Path:
    """Write the run's model to ``out_dir`` (timm's layout); with ``push_to_hub``, also upload it there."""
    model = model_from_run(Path(checkpoint_path), variant)
    out = save_model_folder(model, Path(out_dir))
    if push_to_hub:
        timm.models.push_to_hf_hub(model, push_to_hub, safe_serialization=True)
    return out


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path, help="a .ckpt written by run.py")
    parser.add_argument("variant", help="the backbone the run trained (its backbone.name)")
    parser.add_argument("--out", type=Path, help="output folder (default: ./<variant>-export)")
    parser.add_argument("--push-to-hub", metavar="REPO_ID", help="also upload with timm's push_to_hf_hub")
    args = parser.parse_args(argv)
    try:
        out = export_checkpoint(args.checkpoint, args.variant, args.out or Path(f"{args.variant}-export"),
                                args.push_to_hub)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"exported {args.variant} to {out}; after `import backbones`: "
          f"timm.create_model('local-dir:{out}', pretrained=True)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
