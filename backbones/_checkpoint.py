"""What every family's ``checkpoint_filter_fn`` shares: finding the weights inside an official checkpoint
file and renaming keys with an ordered table of regular-expression rules.

A family file keeps only what is its own: the rule table (``OFFICIAL_KEY_RULES``) and any reshaping
its layout needs.
"""

from __future__ import annotations

import re
from typing import Callable, Dict, List, Mapping, Sequence, Tuple, Union

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

