"""Convert an official checkpoint into a mambalab model folder that timm loads.

    python -m tools.convert vssm1_tiny_0230s_ckpt_epoch_264.pth vmamba_tiny_s1l8 --out weights/vmamba_tiny_s1l8
    python -m tools.convert vssmtiny_dp01_ckpt_epoch_292.pth vanilla_vmamba_tiny --out weights/vanilla_tiny
    python -m tools.convert vim_t_midclstok_76p1acc.pth vim_tiny_patch16_224 --out weights/vim_tiny
    python -m tools.convert efficient_vmamba_tiny.ckpt efficientvmamba_tiny --ema
    python -m tools.convert hrvmamba_small_pose.pth hrvmamba_small --model-arg multiscale_output=False
    python -m tools.convert best.pth vanilla_vmamba_tiny --out weights/vmunet  # VM-UNet, tools.convert_vmunet
    python -m tools.convert best_4h.pth mhs_vmamba_tiny --out weights/mhs_vm_4h  # MHS-VM, tools.convert_vmunet

The file is read with a restricted unpickler (``tools.safe_load``): tensors and plain containers are rebuilt,
the training state official scripts save beside the weights (yacs configs, optimizer and scaler state,
mmengine's meta and message hub) is kept as inert placeholders without importing yacs or mmengine, and a
file that would run code is refused. The summary says where the weights were found (``--ema`` takes
``model_ema``, ``state_dict_ema``, ``ema_model`` or the EMA hooks' copies). The keys are renamed
by the ``checkpoint_filter_fn`` of the family that registers the variant (the family file is the only
place that knows its official layout), the weights are loaded into our model with ``strict=True``, and
the folder gets ``model.safetensors`` + ``config.json`` in timm's Hugging Face layout, written to a
temporary folder first and moved into place. ``--out`` must be a new or empty folder or an earlier output of
the tool; ``--force`` writes beside a user's files, never over them (``tools.output_folder``). Use the result
(after ``import backbones``) with
``timm.create_model("local-dir:<folder>", pretrained=True)``, with
``timm.create_model(<variant>, pretrained=True, pretrained_cfg_overlay=dict(file="<folder>/model.safetensors"))``
(add ``num_classes=<n>`` to the model and the overlay when the classifier is not ImageNet-1k's) or in run.py
with ``backbone.pretrained=true +backbone.pretrained_cfg_overlay.file=<folder>/model.safetensors``.

A file that does not fit the chosen variant fails with the variants of that family whose shapes it does fit.
Whole dense models become the task weights run.py loads with ``weights=`` instead: mmseg UperNet and mmdet
Mask R-CNN files (``tools.convert_dense``) and the official VM-UNet and MHS-VM segmentation models
(``tools.convert_vmunet``).
"""

from __future__ import annotations

import argparse
import ast
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Dict, List, Optional

import timm
import torch
from timm.models import save_for_hf
from torch import Tensor, nn

import backbones
from backbones._checkpoint import STATE_DICT_KEYS, unwrap_state_dict
from tools.convert_dense import (
    DenseConversion,
    convert_dense,
    default_out,
    dense_framework,
    openmmlab_checkpoint,
    write_task_weights,
)
from tools.convert_vmunet import VMUNetConversion, convert_vmunet, official_layout
from tools.convert_vmunet import default_out as vmunet_default_out
from tools.output_folder import check_output_folder, write_output_folder
from tools.safe_load import describe, load_checkpoint

# Where the official trainers keep EMA weights: Swin-style trainers (VMamba, MSVMamba, HRVMamba) and DeiT's (Vim)
# ``model_ema``, timm's train script ``state_dict_ema``, EfficientVMamba's trainer ``ema_model``.
EMA_KEYS = ("model_ema", "state_dict_ema", "ema_model")


@dataclass
class Conversion:
    """What a conversion did, for the summary line."""

    variant: str
    family: str
    tensors: int
    renamed: int
    parameters: int
    num_classes: int
    weights_from: str = "the file"
    not_converted: str = ""
    out_dir: Optional[Path] = None

    def summary(self) -> str:
        where = f" -> {self.out_dir}" if self.out_dir else ""
        lines = [f"{self.variant} ({self.family} rules) from {self.weights_from}: {self.tensors} tensors, "
                 f"{self.renamed} renamed, {self.parameters / 1e6:.2f} M parameters, {self.num_classes} classes, "
                 f"loaded strict{where}"]
        if self.not_converted:
            lines.append(f"also in the file, not converted: {self.not_converted}")
        return "\n".join(lines)


def load_official(path: Path) -> dict:
    """Read an official checkpoint with the restricted unpickler of ``tools.safe_load``: tensors and containers
    are rebuilt, training state the authors saved with them (yacs configs, mmengine log buffers, numpy arrays)
    is kept inert, and a file that would run code is refused."""
    checkpoint = load_checkpoint(path)
    if not isinstance(checkpoint, dict):
        raise ValueError(f"checkpoint {path} holds a {describe(checkpoint)}, not a state dict")
    return checkpoint


def other_contents(checkpoint: dict, used: str) -> str:
    """The checkpoint's other top-level entries, for the user: "optimizer (dict of 2), config (yacs...)"."""
    return ", ".join(f"{key} ({describe(value)})" for key, value in checkpoint.items() if key != used)


def select_weights(checkpoint: dict, ema: bool) -> tuple[dict, str, str]:
    """The weights to convert, the file's top-level key holding them and, for the user, where they were found.

    The EMA weights when asked (an error naming what the file holds if it has none), else the plain ones.
    mmengine's ``EMAHook`` saves the averaged weights in ``state_dict`` itself (and the raw ones in
    ``ema_state_dict``); mmcv 1.x's adds ``ema_<name with _ for .>`` copies of the parameters to ``state_dict``.
    """
    state = checkpoint.get("state_dict")
    if isinstance(state, dict) and "ema_state_dict" in checkpoint:
        return checkpoint, "state_dict", ("state_dict, where mmengine's EMAHook keeps the averaged weights (the "
                                          "raw ones are in ema_state_dict)")
    mmcv_ema = {k: v for k, v in state.items() if k.startswith("ema_")} if isinstance(state, dict) else {}
    if mmcv_ema:
        plain = {k: v for k, v in state.items() if not k.startswith("ema_")}
        if not ema:
            return {"state_dict": plain}, "state_dict", (f"state_dict (without its {len(mmcv_ema)} ema_ copies; "
                                                         f"--ema uses them)")
        averaged = {k: mmcv_ema.get("ema_" + k.replace(".", "_"), v) for k, v in plain.items()}
        swapped = sum("ema_" + k.replace(".", "_") in mmcv_ema for k in plain)
        return {"state_dict": averaged}, "state_dict", (f"the ema_ copies in state_dict (mmcv's EMAHook: {swapped} "
                                                        f"of {len(plain)} tensors averaged, buffers as trained)")
    if not ema:
        used = next((key for key in STATE_DICT_KEYS if isinstance(checkpoint.get(key), dict)), None)
        return checkpoint, used or "", used or "the file (a bare state dict)"
    for key in EMA_KEYS:
        if isinstance(checkpoint.get(key), dict):
            return checkpoint[key], key, f"{key} (EMA)"
    raise KeyError(f"--ema: the checkpoint has no EMA weights (looked for {', '.join(EMA_KEYS)}, mmengine's "
                   f"ema_state_dict and mmcv's ema_ keys; it holds {other_contents(checkpoint, '')})")


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
    weights, weights_key, weights_from = select_weights(checkpoint, ema)
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
                         parameters=sum(p.numel() for p in model.parameters()), num_classes=num_classes,
                         weights_from=weights_from,
                         not_converted=other_contents(checkpoint, weights_key) if weights_key else "")
    return model.eval(), summary


def save_model_folder(model: nn.Module, out_dir: Path, write_extra: Optional[Callable[[Path], None]] = None,
                      tool: str = "tools.convert", force: bool = False, source: Optional[str] = None) -> Path:
    """``model.safetensors`` + ``config.json`` (timm's Hugging Face layout) and whatever ``write_extra``
    adds, written into ``out_dir`` without touching any file the tool did not write (``tools.output_folder``)."""

    def write(folder: Path) -> None:
        save_for_hf(model, str(folder), safe_serialization=True)
        if write_extra is not None:
            write_extra(folder)

    return write_output_folder(out_dir, write, tool, force, source)


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


def convert_dense_file(checkpoint: dict, args: argparse.Namespace) -> DenseConversion:
    """tools.convert for an mmseg / mmdet checkpoint: the task weights run.py loads with ``weights=``."""
    if args.model_arg:
        raise ValueError("--model-arg builds a classifier; for a UperNet / Mask R-CNN file pass the backbone's "
                         "arguments as run.py overrides, e.g. --override backbone.drop_path_rate=0.2")
    weights, _, weights_from = select_weights(checkpoint, args.ema)
    weights = unwrap_state_dict(weights)
    task_sd, conversion = convert_dense(checkpoint, weights, weights_from, args.variant, args.checkpoint.name,
                                        args.experiment, args.override)
    description = conversion.description()
    openmmlab = openmmlab_checkpoint(task_sd, weights, description) if args.openmmlab else None
    conversion.out_dir = write_output_folder(args.out or default_out(conversion),
                                             lambda folder: write_task_weights(task_sd, description, folder, openmmlab),
                                             "tools.convert", args.force, args.checkpoint.name)
    return conversion


def convert_vmunet_file(checkpoint: dict, args: argparse.Namespace) -> VMUNetConversion:
    """tools.convert for an official VM-UNet or MHS-VM checkpoint: the task weights run.py loads with ``weights=``."""
    if args.model_arg:
        raise ValueError("--model-arg builds a classifier; for a VM-UNet / MHS-VM file pass the model's arguments as "
                         "run.py overrides, e.g. --override backbone.sra_threshold=0.4")
    weights, weights_key, weights_from = select_weights(checkpoint, args.ema)
    task_sd, conversion = convert_vmunet(unwrap_state_dict(weights), args.variant, weights_from,
                                         args.checkpoint.name, args.experiment, args.override)
    conversion.not_converted = other_contents(checkpoint, weights_key) if weights_key else ""
    conversion.out_dir = write_output_folder(args.out or vmunet_default_out(conversion),
                                             lambda folder: write_task_weights(task_sd, conversion.description(),
                                                                               folder),
                                             "tools.convert", args.force, args.checkpoint.name)
    return conversion


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path, help="official checkpoint file (.pth/.ckpt)")
    parser.add_argument("variant", help="our backbone name (python -c 'import backbones; "
                                        "print(backbones.list_backbones())')")
    parser.add_argument("--out", type=Path, help="output folder (default: ./<variant>, ./<recipe>_<variant> for "
                                                 "UperNet / Mask R-CNN files, ./<experiment> for VM-UNet and "
                                                 "./<experiment>_<heads>h for MHS-VM files); a new folder, an empty "
                                                 "one or an earlier output of this tool")
    parser.add_argument("--force", action="store_true", help="write into a non-empty folder the tool did not "
                                                              "write (its files are never replaced)")
    parser.add_argument("--ema", action="store_true", help="convert the EMA weights (model_ema, state_dict_ema, "
                                                           "ema_model, mmengine/mmcv EMA hooks)")
    parser.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE",
                        help="constructor argument of the variant, repeatable (e.g. multiscale_output=False)")
    parser.add_argument("--experiment", help="UperNet / Mask R-CNN / VM-UNet / MHS-VM files: the run.py experiment "
                                             "to convert for (default: ade20k_upernet_<variant> / "
                                             "coco_maskrcnn_1x_<variant> / isic18_vmunet or, 9 classes, "
                                             "synapse_vmunet / isic18_mhs_vmunet)")
    parser.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                        help="UperNet / Mask R-CNN / VM-UNet / MHS-VM files: a run.py override of that experiment, "
                             "repeatable")
    parser.add_argument("--openmmlab", action="store_true",
                        help="UperNet / Mask R-CNN files: also write openmmlab.pth for mmseg/mmdet configs with "
                             "MambaLabBackbone (docs/mm)")
    parser.add_argument("--pose", action="store_true", help="an mmpose top-down pose checkpoint: convert its heatmap "
                        "head too and write a run.py checkpoint to --out (tools.convert_pose)")
    args = parser.parse_args(argv)
    if args.pose:
        from tools.convert_pose import convert_pose_main

        return convert_pose_main(args.checkpoint, args.variant, args.out, args.ema, args.model_arg)
    try:
        if args.out is not None:
            check_output_folder(args.out, "tools.convert", args.force)
        checkpoint = load_official(args.checkpoint)
        weights = unwrap_state_dict(select_weights(checkpoint, args.ema)[0])
        if dense_framework(weights):
            print(convert_dense_file(checkpoint, args).summary())
            return 0
        if official_layout(weights) is not None:
            print(convert_vmunet_file(checkpoint, args).summary())
            return 0
        if args.experiment or args.override:
            raise ValueError(f"--experiment/--override apply to UperNet / Mask R-CNN and VM-UNet / MHS-VM "
                             f"checkpoints; {args.checkpoint} has no mmseg decode_head, mmdet roi_head or "
                             f"vmunet.* keys")
        out_dir = args.out or Path(args.variant)
        check_output_folder(out_dir, "tools.convert", args.force)
        model_args = parse_model_args(args.model_arg)
        model, conversion = convert_state_dict(checkpoint, args.variant, args.ema, **model_args)
        conversion.out_dir = save_model_folder(model, out_dir, force=args.force, source=args.checkpoint.name)
    except (FileNotFoundError, KeyError, ValueError) as err:  # OutputFolderError is a ValueError
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(conversion.summary())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
