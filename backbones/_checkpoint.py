"""What every family's ``checkpoint_filter_fn`` shares: finding the weights inside an official checkpoint
file, renaming keys with an ordered table of regular-expression rules, dropping the keys some official code
lists twice for one tensor, and the key layout of the official VMamba code base, which both VMamba's and
MSVMamba's releases use (MSVMamba's code is a fork of it); the model's own weights for parts a classifier
checkpoint lacks; and the check that ``pretrained=True`` points at converted weights on disk.

A family file keeps only what is its own: the rule table (``OFFICIAL_KEY_RULES``) and any reshaping
its layout needs.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Sequence, Tuple, Union

import torch
from timm.models import resolve_pretrained_cfg
from torch import Tensor, nn

# (pattern, replacement) pairs applied in order with ``re.sub``; a replacement may be a function of the match.
KeyRules = List[Tuple[str, Union[str, Callable[[re.Match], str]]]]

# Where training scripts store the weights: Swin/VMamba-style ``model`` (+ ``model_ema``), Lightning or
# mmengine ``state_dict``, EfficientVMamba's ``state_dict_ema``, VM-UNet-style ``model_state_dict`` (the
# ``latest.pth`` resume files of VM-UNet and MHS-VM).
STATE_DICT_KEYS = ("model", "state_dict", "model_ema", "state_dict_ema", "model_state_dict")


def unwrap_state_dict(checkpoint: Mapping, keys: Sequence[str] = STATE_DICT_KEYS) -> Dict[str, Tensor]:
    """The state dict inside a checkpoint (the first of ``keys`` that holds a dict), without DDP
    ``module.`` prefixes. A bare state dict is returned as it is (unprefixed)."""
    for key in keys:
        if isinstance(checkpoint.get(key), dict):
            checkpoint = checkpoint[key]
            break
    return {re.sub(r"^(module\.)+", "", k): v for k, v in checkpoint.items()}


def drop_aliases(state_dict: Mapping[str, Tensor], aliases: KeyRules) -> Dict[str, Tensor]:
    """``state_dict`` without the entries that name a tensor a second time, each checked equal to its primary.

    Official code can list one tensor under two names: a module registered under two attributes, or a parameter
    also assigned to a second attribute. ``aliases`` rename an alias key to its primary key; a primary that the
    file lacks takes the alias's tensor, and an alias whose tensor differs from its primary's (the file was
    edited, or the names do not alias) is refused naming both keys.
    """
    kept: Dict[str, Tensor] = {k: v for k, v in state_dict.items() if rename_key(k, aliases) == k}
    for key, value in state_dict.items():
        primary = rename_key(key, aliases)
        if primary == key:
            continue
        if primary not in kept:
            kept[primary] = value
        elif kept[primary].shape != value.shape or (value.device.type != "meta" and not torch.equal(kept[primary],
                                                                                                    value)):
            raise ValueError(f"{key} should repeat {primary} (the official model holds one tensor under both "
                             f"names), but the two differ; the file is not as its authors saved it")
    return kept


def rename_key(key: str, rules: KeyRules) -> str:
    """``key`` after every rule of ``rules``, in order."""
    for pattern, replacement in rules:
        key = re.sub(pattern, replacement, key)
    return key


# The VMamba code base (MzeroMiko/VMamba) -> ours, applied in order with ``re.sub`` (a replacement may be a
# function of the match). Official stage i ends with its downsample; ours starts stage i + 1 with it.
VMAMBA_BODY_RULES: KeyRules = [
    (r"^layers\.(\d+)\.downsample\.(reduction|norm)\.", lambda m: f"stages.{int(m[1]) + 1}.downsample.{m[2]}."),
    (r"^layers\.(\d+)\.downsample\.1\.", lambda m: f"stages.{int(m[1]) + 1}.downsample.conv."),
    (r"^layers\.(\d+)\.downsample\.3\.", lambda m: f"stages.{int(m[1]) + 1}.downsample.norm."),
    (r"^layers\.(\d+)\.blocks\.(\d+)\.norm\.", r"stages.\1.blocks.\2.norm1."),
    (r"^layers\.(\d+)\.blocks\.", r"stages.\1.blocks."),
    (r"\.op\.(x_proj_weight|dt_projs_weight|dt_projs_bias|A_logs|Ds)$", r".mixer.ssm.\1"),
    (r"\.op\.", ".mixer."),
    (r"^classifier\.norm\.", "norm."),
    (r"^classifier\.head\.", "head."),
    (r"^outnorm(\d+)\.", r"feature_norms.\1."),  # the dense backbone's per-level norms
]
# The v0 release predates the official code's renaming (which its ``_load_from_state_dict`` still does).
_VMAMBA_V0_NAMES: KeyRules = [
    (r"^patch_embed\.proj\.", "patch_embed.0."), (r"^patch_embed\.norm\.", "patch_embed.2."),
    (r"\.ln_1\.", ".norm."), (r"\.self_attention\.", ".op."),
    (r"^norm\.", "classifier.norm."), (r"^head\.", "classifier.head."),
]
VMAMBA_KEY_RULES: Dict[str, KeyRules] = {
    # v0/v1 code: patch-4 stem (conv, permute, norm) and patch merging.
    "v1": [*_VMAMBA_V0_NAMES, (r"^patch_embed\.0\.", "stem.proj."), (r"^patch_embed\.2\.", "stem.norm."),
           *VMAMBA_BODY_RULES],
    # v2 releases: overlapping stem (conv, -, norm, -, GELU, conv, -, norm) and conv downsampling.
    "v2": [(r"^patch_embed\.0\.", "stem.conv1."), (r"^patch_embed\.2\.", "stem.norm1."),
           (r"^patch_embed\.5\.", "stem.conv2."), (r"^patch_embed\.7\.", "stem.norm2."), *VMAMBA_BODY_RULES],
}


def vmamba_generation(state_dict: Mapping[str, Tensor]) -> str:
    """"v2" for VMamba-code checkpoints with the overlapping stem (``patch_embed.5``), else "v1"."""
    return "v2" if "patch_embed.5.weight" in state_dict else "v1"


def with_own_weights(state_dict: Dict[str, Tensor], model: nn.Module,
                     prefix: Union[str, Tuple[str, ...]]) -> Dict[str, Tensor]:
    """``state_dict`` plus the model's own tensors under ``prefix`` (one or several) where it has none: parts only
    a dense model has (feature norms, a feature pyramid) keep their initial values when a classifier checkpoint is
    loaded, and a classifier's norm and head when a segmentation model's encoder is."""
    own = {k: v for k, v in model.state_dict().items() if k.startswith(prefix) and k not in state_dict}
    return {**state_dict, **own}


def require_local_weights(variant: str, pretrained: bool, kwargs: Mapping[str, Any]) -> None:
    """With ``pretrained=True``, fail before anything is built or downloaded unless the weights are on disk.

    The official checkpoints are not in timm's layout and nothing is downloaded at run time: they are converted
    once with ``tools.convert``, and the result is named with ``pretrained_cfg_overlay=dict(file=...)`` or
    ``local-dir:<folder>``. A named file that does not exist is reported with its path.
    """
    if not pretrained:
        return
    cfg = resolve_pretrained_cfg(variant, kwargs.get("pretrained_cfg"), kwargs.get("pretrained_cfg_overlay"))
    if cfg.state_dict is not None:
        return
    if cfg.file:
        if not Path(cfg.file).exists():
            raise FileNotFoundError(f"{variant}: pretrained weights file {cfg.file} (pretrained_cfg_overlay.file) does "
                                    f"not exist; convert the official checkpoint with `python -m tools.convert "
                                    f"<checkpoint> {variant} --out <folder>` and name <folder>/model.safetensors")
        return
    origin = (f"https://huggingface.co/{cfg.hf_hub_id}" if cfg.hf_hub_id else cfg.url) or cfg.origin_url
    where = f" (download it by hand from {origin})" if origin else ""
    folder = f"weights/{variant}"
    raise RuntimeError(
        f"{variant}: pretrained=True needs the official checkpoint converted with tools.convert{where}; nothing is "
        f"downloaded at run time. Run `python -m tools.convert <checkpoint> {variant} --out {folder}`, then use "
        f"timm.create_model('local-dir:{folder}', pretrained=True) or pretrained_cfg_overlay=dict("
        f"file='{folder}/model.safetensors') (run.py: backbone.pretrained=true "
        f"+backbone.pretrained_cfg_overlay.file={folder}/model.safetensors)")
