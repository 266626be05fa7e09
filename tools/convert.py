"""Convert an official checkpoint into a mambalab model folder that timm loads.

    python -m tools.convert vssm1_tiny_0230s_ckpt_epoch_264.pth vmamba_tiny_s1l8 --out weights/vmamba_tiny_s1l8
    python -m tools.convert vssmtiny_dp01_ckpt_epoch_292.pth vanilla_vmamba_tiny --out weights/vanilla_tiny
    python -m tools.convert vim_t_midclstok_76p1acc.pth vim_tiny_patch16_224 --out weights/vim_tiny
    python -m tools.convert efficient_vmamba_tiny.ckpt efficientvmamba_tiny --ema
    python -m tools.convert hrvmamba_small_pose.pth hrvmamba_small --model-arg multiscale_output=False

The file is read with ``torch.load(weights_only=True)``; if it holds an ``argparse.Namespace`` (Vim stores
its training arguments), it is read again allowing that one class and nothing else. The keys are renamed
by the ``checkpoint_filter_fn`` of the family that registers the variant (the family file is the only
place that knows its official layout), the weights are loaded into our model with ``strict=True``, and
the folder gets ``model.safetensors`` + ``config.json`` in timm's Hugging Face layout, written to a
temporary folder first and renamed into place. Use the result (after ``import backbones``) with
``timm.create_model("local-dir:<folder>", pretrained=True)``, with
``timm.create_model(<variant>, pretrained=True, pretrained_cfg_overlay=dict(file="<folder>/model.safetensors"))``
(add ``num_classes=<n>`` to the model and the overlay when the classifier is not ImageNet-1k's) or in run.py
with ``backbone.pretrained=true +backbone.pretrained_cfg_overlay.file=<folder>/model.safetensors``.

A file that does not fit the chosen variant fails with the variants of that family whose shapes it does fit.
"""

from __future__ import annotations

import argparse
import ast
import pickle
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Dict, List, Optional

import timm
import torch
from timm.models import save_for_hf
from torch import Tensor, nn

import backbones
from backbones._checkpoint import unwrap_state_dict

# Keys of the EMA weights in the official training checkpoints (Swin-style trainers and EfficientVMamba's).
EMA_KEYS = ("model_ema", "state_dict_ema")


@dataclass
class Conversion:
    """What a conversion did, for the summary line."""

    variant: str
    family: str
    tensors: int
    renamed: int
    parameters: int
    num_classes: int
    out_dir: Optional[Path] = None

    def summary(self) -> str:
        where = f" -> {self.out_dir}" if self.out_dir else ""
        return (f"{self.variant} ({self.family} rules): {self.tensors} tensors, {self.renamed} renamed, "
                f"{self.parameters / 1e6:.2f} M parameters, {self.num_classes} classes, loaded strict{where}")


def load_official(path: Path) -> dict:
    """Read a checkpoint safely: tensors and containers only, plus ``argparse.Namespace`` (Vim's ``args``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path}: no such file")
    try:
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            if "argparse.Namespace" not in str(err):
                raise
            with torch.serialization.safe_globals([argparse.Namespace]):
                checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # unpickling refused or the file is not a torch checkpoint
        raise ValueError(f"checkpoint {path} cannot be read safely (weights_only=True, argparse.Namespace "
                         f"allowed): {err}") from err
    if not isinstance(checkpoint, dict):
        raise ValueError(f"checkpoint {path} holds a {type(checkpoint).__name__}, not a state dict")
    return checkpoint


def select_weights(checkpoint: dict, ema: bool) -> dict:
    """The EMA weights when asked (named error if the file has none), else the checkpoint as it is."""
    if not ema:
        return checkpoint
    for key in EMA_KEYS:
        if isinstance(checkpoint.get(key), dict):
            return checkpoint[key]
    raise KeyError(f"--ema: the checkpoint has no EMA weights (looked for {', '.join(EMA_KEYS)}; "
                   f"it has {', '.join(map(str, checkpoint))})")


def family_filter(variant: str) -> tuple[ModuleType, Callable[[dict, nn.Module], Dict[str, Tensor]]]:
    """The module registering ``variant`` and its ``checkpoint_filter_fn`` (the only family-specific part)."""
    family = backbones.family_of(variant)
    filter_fn = getattr(family, "checkpoint_filter_fn", None)
    if filter_fn is None:
        raise ValueError(f"{family.__name__} defines no checkpoint_filter_fn, so {variant} has no official "
                         f"checkpoint conversion")
    return family, filter_fn


def _family_name(variant: str) -> str:
    return backbones.family_of(variant).__name__.rsplit(".", 1)[-1]


def _shapes(state_dict: Dict[str, Tensor]) -> Dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in state_dict.items()}


def _build(variant: str, meta: bool = False, **kwargs: Any) -> nn.Module:
    if meta:
        with torch.device("meta"):
            return timm.create_model(variant, **kwargs)
    return timm.create_model(variant, **kwargs)


def _converted(weights: dict, variant: str, **kwargs: Any) -> tuple[nn.Module, Dict[str, Tensor]]:
    model = _build(variant, meta=True, **kwargs)
    return model, family_filter(variant)[1](weights, model)


def classifier_classes(converted: Dict[str, Tensor], model: nn.Module) -> int:
    """Outputs of the checkpoint's classifier (the pretrained cfg's ``classifier`` names), 0 if it has none."""
    names = model.pretrained_cfg.get("classifier") or ()
    names = [names] if isinstance(names, str) else list(names)
    for name in names:
        weight = converted.get(f"{name}.weight")
        if weight is not None and weight.dim() == 2:
            return int(weight.shape[0])
    return 0


def matching_variants(weights: dict, variant: str, num_classes: int, **kwargs: Any) -> List[str]:
    """The registered variants of ``variant``'s family that the converted weights fit exactly."""
    matches = []
    for name in timm.list_models(module=_family_name(variant)):
        try:
            model, converted = _converted(weights, name, num_classes=num_classes, **kwargs)
        except Exception:  # a family's filter may reject another variant's layout outright
            continue
        if _shapes(converted) == _shapes(model.state_dict()):
            matches.append(name)
    return matches


def _mismatch_message(variant: str, weights: dict, model: nn.Module, converted: Dict[str, Tensor],
                      num_classes: int, **kwargs: Any) -> str:
    ours, theirs = _shapes(model.state_dict()), _shapes(converted)
    missing, unexpected = sorted(ours.keys() - theirs.keys()), sorted(theirs.keys() - ours.keys())
    wrong = sorted(k for k in ours.keys() & theirs.keys() if ours[k] != theirs[k])
    details = []
    if wrong:
        details.append(f"{len(wrong)} shape(s) differ, first {wrong[0]}: file {theirs[wrong[0]]}, "
                       f"model {ours[wrong[0]]}")
    if missing:
        details.append(f"{len(missing)} key(s) missing, first {missing[0]}")
    if unexpected:
        details.append(f"{len(unexpected)} unexpected key(s), first {unexpected[0]}")
    matches = [m for m in matching_variants(weights, variant, num_classes, **kwargs) if m != variant]
    hint = (f"this checkpoint matches {', '.join(matches)}, not {variant}" if matches
            else f"it matches no registered {_family_name(variant)} variant")
    return f"{hint} ({'; '.join(details)})"


def convert_state_dict(checkpoint: dict, variant: str, ema: bool = False,
                       **model_args: Any) -> tuple[nn.Module, Conversion]:
    """Our model of ``variant`` (built with ``model_args``) holding the official weights, loaded strictly,
    and what the conversion did. The number of classes is read from the checkpoint's classifier."""
    if variant not in backbones.list_backbones():
        raise ValueError(f"unknown variant {variant!r}; available: {', '.join(backbones.list_backbones())}")
    family, filter_fn = family_filter(variant)
    weights = select_weights(checkpoint, ema)
    model, converted = _converted(weights, variant, **model_args)
    num_classes = classifier_classes(converted, model)
    model = _build(variant, meta=True, num_classes=num_classes, **model_args)
    converted = filter_fn(weights, model)
    if _shapes(converted) != _shapes(model.state_dict()):
        raise ValueError(_mismatch_message(variant, weights, model, converted, num_classes, **model_args))
    model = _build(variant, num_classes=num_classes, **model_args)
    model.load_state_dict(converted, strict=True)
    source_keys = set(unwrap_state_dict(weights))
    summary = Conversion(variant=variant, family=family.__name__.rsplit(".", 1)[-1], tensors=len(converted),
                         renamed=len(set(converted) - source_keys),
                         parameters=sum(p.numel() for p in model.parameters()), num_classes=num_classes)
    return model.eval(), summary


def save_model_folder(model: nn.Module, out_dir: Path,
                      write_extra: Optional[Callable[[Path], None]] = None) -> Path:
    """``model.safetensors`` + ``config.json`` (timm's Hugging Face layout) and whatever ``write_extra``
    adds, written atomically: into a temporary folder beside ``out_dir``, then renamed over it."""
    out_dir = Path(out_dir).resolve()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        save_for_hf(model, str(staging), safe_serialization=True)
        if write_extra is not None:
            write_extra(staging)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        staging.rename(out_dir)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return out_dir


def parse_model_args(items: List[str]) -> Dict[str, Any]:
    """``["multiscale_output=False", "img_size=256"]`` -> keyword arguments (Python literals, else strings)."""
    args = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.isidentifier():
            raise ValueError(f"--model-arg {item!r}: expected KEY=VALUE")
        try:
            args[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            args[key] = value
    return args


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path, help="official checkpoint file (.pth/.ckpt)")
    parser.add_argument("variant", help="our model name (python -c 'import backbones; "
                                        "print(backbones.list_backbones())')")
    parser.add_argument("--out", type=Path, help="output folder (default: ./<variant>)")
    parser.add_argument("--ema", action="store_true", help="convert the EMA weights (model_ema / state_dict_ema)")
    parser.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE",
                        help="constructor argument of the variant, repeatable (e.g. multiscale_output=False)")
    parser.add_argument("--pose", action="store_true", help="an mmpose top-down pose checkpoint: convert its heatmap "
                        "head too and write a run.py checkpoint to --out (tools.convert_pose)")
    args = parser.parse_args(argv)
    if args.pose:
        from tools.convert_pose import convert_pose_main

        return convert_pose_main(args.checkpoint, args.variant, args.out, args.ema, args.model_arg)
    try:
        model_args = parse_model_args(args.model_arg)
        model, conversion = convert_state_dict(load_official(args.checkpoint), args.variant, args.ema, **model_args)
    except (FileNotFoundError, KeyError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    conversion.out_dir = save_model_folder(model, args.out or Path(args.variant))
    print(conversion.summary())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
