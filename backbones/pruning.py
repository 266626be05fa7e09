"""Token pruning for plain (non-hierarchical) vision SSMs: Zhan et al., "Exploring Token Pruning in Vision State
Space Models", NeurIPS 2024 (arXiv:2409.18962; authors' code: github.com/ZLKong/ToP-ViM).

Dropping tokens ViT-style changes the sequence the scan runs over: every surviving token's hidden state then
follows a different neighbourhood. The paper's two parts, as this module and the scan core implement them:

- Pruning-aware hidden state alignment: the kept tokens keep their unpruned indices (the "position map",
  ``positions`` here, carried from one pruning step to the next) and the scan lets each skipped position
  still decay the state (``backbones.ssm.selective_scan(..., positions=...)``). ``mode="naive"`` scans the
  kept tokens as if they were adjacent: the baseline the alignment must beat.
- SSM-adapted token importance: the clipped (ReLU'd) channel values of the mixer's SSM output, summed over
  channels (``token_importance``). The authors' released code reads the backward direction's gated output (with
  its clamp commented out); here the gated output of both directions (what the out projection receives) is
  clipped and scored, as the paper describes -- which output exactly is an assumption.

Settings (``PAPER_SETTINGS``) follow the authors' released Vim scripts: keep 80 % of the patch tokens after
blocks 10 and 20 (Vim-T) or 5, 10 and 15 (Vim-S), counted from 1; fine-tuning runs 30 epochs at lr 5e-6 from
the released weights. The class token is never pruned. The kept tokens stay in their unpruned order (the class
token included); the authors instead re-insert the class token in the middle of the kept tokens by count,
which would make the position map non-monotonic. A training-free model prunes only in eval mode
(``train=False``); the fine-tune mode (``train=True``) prunes in training too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

__all__ = ["MODES", "PAPER_SETTINGS", "PruneConfig", "gather_tokens", "keep_count", "select_tokens",
           "token_importance"]

MODES = ("aligned", "naive")

PAPER_SETTINGS: dict[str, dict[str, Any]] = {
    "vim_tiny": dict(keep_ratio=0.8, layers=[9, 19]),
    "vim_small": dict(keep_ratio=0.8, layers=[4, 9, 14]),
}
"""Keep ratio and pruning blocks (0-based: pruning happens after these blocks) of the authors' released Vim runs."""


@dataclass(frozen=True)
class PruneConfig:
    """Where and how much to prune.

    Args:
        keep_ratio: fraction of the patch tokens present that each pruning step keeps (one number, or one per
            pruning block); in (0, 1].
        layers: block indices (0-based, increasing) after which tokens are pruned, scored by that block's mixer.
        mode: "aligned" (the paper's hidden state alignment) or "naive" (scan the kept tokens as adjacent).
        train: prune in training too (fine-tune mode); False prunes only in eval mode (training-free).
    """

    keep_ratio: Union[float, Tuple[float, ...]] = 0.8
    layers: Tuple[int, ...] = field(default_factory=tuple)
    mode: str = "aligned"
    train: bool = False

    def __post_init__(self) -> None:
        layers = tuple(self.layers)
        if not layers or any(not isinstance(i, int) or isinstance(i, bool) or i < 0 for i in layers):
            raise ValueError(f"prune.layers={list(layers)!r}: must be a non-empty list of block indices >= 0")
        if list(layers) != sorted(set(layers)):
            raise ValueError(f"prune.layers={list(layers)!r}: must be increasing, without repeats")
        ratios = self.keep_ratio if isinstance(self.keep_ratio, (list, tuple)) else (self.keep_ratio,) * len(layers)
        ratios = tuple(ratios)
        if len(ratios) != len(layers):
            raise ValueError(f"prune.keep_ratio={list(ratios)!r}: give one ratio, or one per pruning layer "
                             f"({len(layers)})")
        for ratio in ratios:
            if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio <= 1:
                raise ValueError(f"prune.keep_ratio={ratio!r}: must be a number in (0, 1]")
        if self.mode not in MODES:
            raise ValueError(f"prune.mode={self.mode!r}: must be one of {', '.join(MODES)}")
        if not isinstance(self.train, bool):
            raise ValueError(f"prune.train={self.train!r}: must be true (fine-tune mode) or false (training-free)")
        object.__setattr__(self, "layers", layers)
        object.__setattr__(self, "keep_ratio", tuple(float(r) for r in ratios))

    @classmethod
    def parse(cls, value: Union[None, "PruneConfig", Mapping[str, Any]], depth: int) -> Optional["PruneConfig"]:
        """A config from None, a PruneConfig or a mapping (Hydra's ``backbone.prune``), checked against ``depth``."""
        if value is None or isinstance(value, PruneConfig):
            config = value
        elif isinstance(value, Mapping):
            unknown = set(value) - {"keep_ratio", "layers", "mode", "train"}
            if unknown:
                raise ValueError(f"prune.{sorted(unknown)[0]}: unknown option (prune takes keep_ratio, layers, mode, "
                                 "train)")
            config = cls(**{k: tuple(v) if isinstance(v, Sequence) and not isinstance(v, str) else v
                            for k, v in value.items()})
        else:
            raise ValueError(f"prune={value!r}: must be a mapping with keep_ratio, layers, mode, train")
        if config is not None and config.layers[-1] >= depth - 1:
            raise ValueError(f"prune.layers={list(config.layers)!r}: pruning after block {config.layers[-1]} leaves no "
                             f"block to run on the kept tokens (the model has {depth} blocks)")
        return config

    def active(self, training: bool) -> bool:
        """Whether a forward pass in this mode prunes."""
        return self.train or not training


def token_importance(ssm_output: Tensor) -> Tensor:
    """The paper's SSM-adapted importance, (batch, length, channels) -> (batch, length): channel values clipped
    at zero and summed (negative activations are not evidence of a token mattering; the paper's ablation finds
    clipping beats l1/l2 norms). Detached: the ranking is a selection, not a path for gradients."""
    return ssm_output.detach().clamp(min=0).sum(-1)


def keep_count(patches: int, ratio: float) -> int:
    """Patch tokens kept out of ``patches`` at ``ratio``: ceil, as the authors' code rounds; at least one."""
    return max(1, min(patches, math.ceil(patches * ratio - 1e-9)))


def select_tokens(scores: Tensor, ratio: float, protected: Optional[Tensor]) -> Tensor:
    """Indices (batch, kept) of the tokens to keep, in their current order.

    ``scores``: (batch, length) importance; ``protected``: (batch,) index of a token always kept (the class
    token) or None. The top ``keep_count`` of the other tokens are kept.
    """
    batch, length = scores.shape
    if protected is None:
        kept = scores.topk(keep_count(length, ratio), dim=1).indices
    else:
        scores = scores.scatter(1, protected[:, None], float("-inf"))
        kept = scores.topk(keep_count(length - 1, ratio), dim=1).indices
        kept = torch.cat((kept, protected[:, None]), dim=1)
    return kept.sort(dim=1).values


def gather_tokens(tokens: Tensor, index: Tensor) -> Tensor:
    """tokens (batch, length, ...) at ``index`` (batch, kept) along the length axis."""
    expanded = index.view(*index.shape, *[1] * (tokens.dim() - 2)).expand(-1, -1, *tokens.shape[2:])
    return tokens.gather(1, expanded)
