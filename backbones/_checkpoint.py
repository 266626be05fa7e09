"""What every family's ``checkpoint_filter_fn`` shares: finding the weights inside an official checkpoint
file and renaming keys with an ordered table of regular-expression rules; and the check that ``pretrained=True``
points at converted weights on disk.

A family file keeps only what is its own: the rule table (``OFFICIAL_KEY_RULES``) and any reshaping
its layout needs.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Sequence, Tuple, Union

from timm.models import resolve_pretrained_cfg
from torch import Tensor, nn

# (pattern, replacement) pairs applied in order with ``re.sub``; a replacement may be a function of the match.
KeyRules = List[Tuple[str, Union[str, Callable[[re.Match], str]]]]

# Where training scripts store the weights: Swin/VMamba-style ``model`` (+ ``model_ema``), Lightning or
# mmengine ``state_dict``, EfficientVMamba's ``state_dict_ema``.
STATE_DICT_KEYS = ("model", "state_dict", "model_ema", "state_dict_ema")


def unwrap_state_dict(checkpoint: Mapping, keys: Sequence[str] = STATE_DICT_KEYS) -> Dict[str, Tensor]:
    """The state dict inside a checkpoint (the first of ``keys`` that holds a dict), without DDP
    ``module.`` prefixes. A bare state dict is returned as it is (unprefixed)."""
    for key in keys:
        if isinstance(checkpoint.get(key), dict):
            checkpoint = checkpoint[key]
            break
    return {re.sub(r"^(module\.)+", "", k): v for k, v in checkpoint.items()}


def rename_key(key: str, rules: KeyRules) -> str:
    """``key`` after every rule of ``rules``, in order."""
    for pattern, replacement in rules:
        key = re.sub(pattern, replacement, key)
    return key


def with_own_weights(state_dict: Dict[str, Tensor], model: nn.Module, prefix: str) -> Dict[str, Tensor]:
    """``state_dict`` plus the model's own tensors under ``prefix`` where it has none: parts only a dense model
    has (feature norms, a feature pyramid) keep their initial values when a classifier checkpoint is loaded."""
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
