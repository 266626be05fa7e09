"""Export one of our backbones to a timm model folder, optionally also to ONNX and the Hugging Face Hub.

    python -m tools.export logs/train/runs/<run>/checkpoints/last.ckpt vmamba_femto --out exported/femto
    python -m tools.export weights/vmamba_tiny_s1l8/model.safetensors vmamba_tiny_s1l8 --out exported/t --onnx
    python -m tools.export <run>/checkpoints/last.ckpt vmamba_tiny_s1l8 --push-to-hub me/vmamba-t

The weights come from either
  * a checkpoint written by ``run.py`` (read with ``weights_only=True``): the backbone under ``backbone.``,
    a classification run's linear head under ``head.fc.`` (and ``dist_head.fc.`` with distillation,
    folded into the exported classifier so that it predicts what the run predicted). A dense run's
    backbone (built with ``features_only=True``) is exported as a feature extractor; the parts its
    feature wrapper removed (final norm, classification neck) keep their initial weights, and
    feature-only additions (Vim's pyramid) are not exported. The input channels are read from the
    checkpoint (1 for Fashion-MNIST runs);
  * or a state dict in our layout: a ``model.safetensors`` (from ``tools.convert`` or an earlier export)
    or a ``.pth``.

The folder holds timm's Hugging Face layout (``config.json`` + ``model.safetensors``, written by timm's
``save_for_hf``), a model card ``README.md`` with the pretrained cfg, and with ``--onnx`` ``model.onnx``
(dynamic batch, input ``images``); everything is written into a temporary folder and then moved into place,
never over a file the tool did not write (``--out`` as in ``tools.convert``: new, empty or an earlier output;
``--force`` writes beside a user's files). After ``import backbones`` either of these rebuilds the network:
``timm.create_model("local-dir:<folder>", pretrained=True)``, or ``timm.create_model(<variant>,
pretrained=True, num_classes=<n>, pretrained_cfg_overlay=dict(file="<folder>/model.safetensors",
num_classes=<n>))`` (without the overlay's ``num_classes``, timm assumes 1000 and drops another classifier).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import timm
import torch
from safetensors.torch import load_file
from timm.models._hub import generate_readme
from torch import Tensor, nn

import backbones
from backbones._checkpoint import unwrap_state_dict
from tools.convert import classifier_classes, save_model_folder
from tools.output_folder import check_output_folder

# Prefixes a run's backbone may carry: torch.compile's wrapper, then timm's feature wrapper (dense runs).
_WRAPPERS = ("_orig_mod.", "model.")


def read_weights(path: Path) -> dict:
    """A checkpoint or state dict from ``.safetensors`` or (``weights_only=True``) torch files."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path}: no such file")
    try:
        if path.suffix == ".safetensors":
            return load_file(path)
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # not a weights file, or a pickle holding more than tensors
        raise ValueError(f"checkpoint {path} cannot be read safely (safetensors or weights_only=True): {err}") from err
    if not isinstance(checkpoint, dict):
        raise ValueError(f"checkpoint {path} holds a {type(checkpoint).__name__}, not a state dict")
    return checkpoint


def _prefixed(state_dict: Dict[str, Tensor], prefix: str) -> Dict[str, Tensor]:
    return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}


def _strip_wrappers(body: Dict[str, Tensor]) -> Tuple[Dict[str, Tensor], bool]:
    """The backbone weights without wrapper prefixes, and whether timm's feature wrapper was one of them."""
    dense = False
    for prefix in _WRAPPERS:
        if body and all(k.startswith(prefix) for k in body):
            body, dense = _prefixed(body, prefix), dense or prefix == "model."
    return body, dense


def _classifiers(model: nn.Module) -> List[nn.Module]:
    classifier = model.get_classifier()
    return list(classifier) if isinstance(classifier, tuple) else [classifier]


def _in_chans(state_dict: Dict[str, Tensor], variant: str, source: Path) -> int:
    first_conv = timm.models.get_pretrained_cfg(variant).first_conv
    weight = state_dict.get(f"{first_conv}.weight")
    if weight is None:
        raise ValueError(f"checkpoint {source} has no {first_conv}.weight, the first conv of {variant} (an "
                         f"official checkpoint goes through tools.convert first)")
    return int(weight.shape[1])


def _feature_only_keys(variant: str, in_chans: int) -> Tuple[set, set]:
    """Keys of ``variant`` that its ``features_only`` wrapper removes, and keys that only it adds."""
    with torch.device("meta"):
        plain = set(timm.create_model(variant, in_chans=in_chans, num_classes=0).state_dict())
        wrapped = {k[len("model."):] for k in timm.create_model(variant, in_chans=in_chans,
                                                                features_only=True).state_dict()}
    return plain - wrapped, wrapped - plain


def _load(model: nn.Module, state_dict: Dict[str, Tensor], variant: str, source: Path) -> Tuple[List[str], List[str]]:
    """``load_state_dict(strict=False)`` after a shape check that names the file and the first misfit."""
    ours = model.state_dict()
    wrong = sorted(k for k in ours.keys() & state_dict.keys() if ours[k].shape != state_dict[k].shape)
    if wrong:
        raise ValueError(f"checkpoint {source} does not fit {variant}: {len(wrong)} shape(s) differ, first {wrong[0]}: "
                         f"file {tuple(state_dict[wrong[0]].shape)}, model {tuple(ours[wrong[0]].shape)}")
    return model.load_state_dict(state_dict, strict=False)


def model_from_run(checkpoint: dict, variant: str, source: Path) -> Tuple[nn.Module, List[str]]:
    """Our timm model of ``variant`` holding a run checkpoint's backbone and linear classifier, and notes
    on anything not taken over one to one."""
    body, dense = _strip_wrappers(_prefixed(checkpoint["state_dict"], "backbone."))
    heads = [h for h in (_prefixed(checkpoint["state_dict"], f"{name}.fc.") for name in ("head", "dist_head")) if h]
    in_chans = _in_chans(body, variant, source)
    num_classes = int(heads[0]["weight"].shape[0]) if heads else 0
    model = backbones.create_backbone(variant, in_chans=in_chans, num_classes=num_classes)
    names = model.pretrained_cfg["classifier"]
    names = [names] if isinstance(names, str) else list(names)
    classifier_keys = {k for k in model.state_dict() if any(k.startswith(f"{name}.") for name in names)}
    removed, added = _feature_only_keys(variant, in_chans) if dense else (set(), set())
    missing, unexpected = _load(model, {k: v for k, v in body.items() if k not in added}, variant, source)
    bad_missing, bad_unexpected = sorted(set(missing) - classifier_keys - removed), sorted(unexpected)
    if bad_missing or bad_unexpected:
        raise ValueError(f"checkpoint {source} does not fit {variant}: {len(bad_missing)} missing "
                         f"{bad_missing[:3]}, {len(bad_unexpected)} unexpected {bad_unexpected[:3]}")
    notes = []
    if dense:
        initial = sorted(set(missing) - classifier_keys)
        notes.append(f"dense run: exported as a feature extractor; {len(initial)} tensors the run did not use "
                     f"keep their initial values ({', '.join(initial[:3])}{', ...' if len(initial) > 3 else ''})")
        if added & body.keys():
            notes.append(f"{len(added & body.keys())} feature-only tensors not exported "
                         f"({sorted(added & body.keys())[0]}, ...)")
    classifiers = _classifiers(model)
    if heads and len(classifiers) == 1 and len(heads) == 2:
        # The run predicts the mean of both heads' logits; for linear heads that is the mean head.
        heads = [{k: (heads[0][k] + heads[1][k]) / 2 for k in heads[0]}]
        notes.append("head and dist_head averaged into one classifier (same predictions as the run)")
    for classifier, weights in zip(classifiers, heads + heads[:1]):
        classifier.load_state_dict(weights)
    return model.eval(), notes


def model_from_state_dict(state_dict: Dict[str, Tensor], variant: str, source: Path) -> nn.Module:
    """Our model of ``variant`` holding a state dict in our own layout, loaded strictly."""
    state_dict = unwrap_state_dict(state_dict)
    in_chans = _in_chans(state_dict, variant, source)
    with torch.device("meta"):
        num_classes = classifier_classes(state_dict, timm.create_model(variant))
    model = backbones.create_backbone(variant, in_chans=in_chans, num_classes=num_classes)
    missing, unexpected = _load(model, state_dict, variant, source)
    if missing or unexpected:
        raise ValueError(f"checkpoint {source} does not fit {variant}: {len(missing)} missing {sorted(missing)[:3]}, "
                         f"{len(unexpected)} unexpected {sorted(unexpected)[:3]} (official checkpoints go through "
                         f"tools.convert first)")
    return model.eval()


def load_model(checkpoint_path: Path, variant: str) -> Tuple[nn.Module, List[str]]:
    """Our model of ``variant`` with the weights of a run checkpoint or of a state dict in our layout."""
    if variant not in backbones.list_backbones():
        raise ValueError(f"unknown variant {variant!r}; available: {', '.join(backbones.list_backbones())}")
    checkpoint = read_weights(checkpoint_path)
    state = checkpoint.get("state_dict")
    if isinstance(state, dict) and any(k.startswith("backbone.") for k in state):
        return model_from_run(checkpoint, variant, Path(checkpoint_path))
    return model_from_state_dict(checkpoint, variant, Path(checkpoint_path)), []


def model_card(model: nn.Module, variant: str, source: Path, cfg: dict) -> dict:
    """A model card stub (timm's ``generate_readme`` format) showing ``cfg``, the pretrained cfg of the
    folder's ``config.json``."""
    card_cfg = {k: cfg[k] for k in ("input_size", "interpolation", "crop_pct", "mean", "std", "first_conv",
                                     "classifier") if cfg.get(k) is not None}
    card_cfg["num_classes"] = cfg.get("num_classes", model.num_classes)
    details = {"Model Type": "Image classification / feature backbone" if model.num_classes else "Feature backbone",
               "Architecture": f"{variant} (mambalab)",
               "Params (M)": f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}",
               "Weights": f"exported from {source.name}", "pretrained_cfg": card_cfg}
    if cfg.get("paper_ids"):
        details["Papers"] = cfg["paper_ids"]
    usage = ("```python\nimport backbones  # registers the mambalab architectures with timm\nimport timm\n\n"
             "model = timm.create_model('local-dir:<this folder>', pretrained=True).eval()\n```")
    return dict(license=cfg.get("license", "apache-2.0"), tags=["image-classification", "timm", "mambalab"],
                description=f"`{variant}` weights in timm's layout, exported by mambalab's `tools.export`.",
                details=details, usage=usage)


def export_onnx(model: nn.Module, path: Path) -> None:
    """ONNX through torch.export (dynamo), batch dimension dynamic, input named ``images``."""
    channels, height, width = model.pretrained_cfg["input_size"]
    channels = model.get_submodule(model.pretrained_cfg["first_conv"]).in_channels
    example = torch.randn(2, channels, height, width)
    torch.onnx.export(model, (example,), str(path), dynamo=True, input_names=["images"],
                      output_names=["logits" if model.num_classes else "features"],
                      dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=4096)},))


def export_checkpoint(checkpoint_path: Path, variant: str, out_dir: Path, onnx: bool = False,
                      push_to_hub: Optional[str] = None, force: bool = False) -> Path:
    """Write ``variant`` with the checkpoint's weights to ``out_dir``; with ``push_to_hub``, upload it too."""
    model, notes = load_model(Path(checkpoint_path), variant)
    card = {}

    def write_extra(folder: Path) -> None:
        cfg = json.loads((folder / "config.json").read_text())["pretrained_cfg"]
        card.update(model_card(model, variant, Path(checkpoint_path), cfg))
        (folder / "README.md").write_text(generate_readme(card, variant), encoding="utf-8")
        if onnx:
            export_onnx(model, folder / "model.onnx")

    out = save_model_folder(model, Path(out_dir), write_extra, tool="tools.export", force=force,
                            source=Path(checkpoint_path).name)
    for note in notes:
        print(f"note: {note}")
    if push_to_hub:
        timm.models.push_to_hf_hub(model, push_to_hub, model_card=card, safe_serialization=True)
    return out


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path, help="a .ckpt written by run.py, or a model.safetensors/.pth "
                                                      "in our layout")
    parser.add_argument("variant", help="the backbone (a run's backbone.name)")
    parser.add_argument("--out", type=Path, help="output folder (default: ./<variant>-export); a new folder, an "
                                                 "empty one or an earlier output of this tool")
    parser.add_argument("--force", action="store_true", help="write into a non-empty folder the tool did not "
                                                              "write (its files are never replaced)")
    parser.add_argument("--onnx", action="store_true", help="also write model.onnx (dynamic batch)")
    parser.add_argument("--push-to-hub", metavar="REPO_ID", help="also upload with timm's push_to_hf_hub")
    args = parser.parse_args(argv)
    out_dir = args.out or Path(f"{args.variant}-export")
    try:
        check_output_folder(out_dir, "tools.export", args.force)
        out = export_checkpoint(args.checkpoint, args.variant, out_dir, args.onnx, args.push_to_hub, args.force)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"exported {args.variant} to {out}; after `import backbones`: "
          f"timm.create_model('local-dir:{out}', pretrained=True)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
