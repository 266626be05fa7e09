"""The parts families are built from: norms and inits, stems, downsampling layers, stages, VMamba's VSS
block and a squeeze-excite channel gate.

This is the layer between the mixers (``ss2d.py``) and the family files: a family file imports its parts
from here (and from ``_features.py`` / ``hierarchical.py``), never from another family file.
"""

from __future__ import annotations

from functools import partial
from typing import Callable, List, Optional, Sequence, Tuple, Union

import torch
from timm.layers import DropPath, Mlp, trunc_normal_
from timm.layers import LayerNorm2d as _TimmLayerNorm2d
from torch import Tensor, nn

from .ss2d import SS2D

# timm's LayerNorm2d defaults to eps 1e-6; the official vision-Mamba models use PyTorch's 1e-5 everywhere.
LayerNorm2d = partial(_TimmLayerNorm2d, eps=1e-5)

# ``(dim, drop_path=rate) -> block`` and ``(dim, downsample, blocks) -> stage``, as ``build_stages`` calls them.
BlockLayer = Callable[..., nn.Module]
StageLayer = Callable[[int, nn.Module, List[nn.Module]], nn.Module]


def init_linear_trunc_normal(module: nn.Module, std: float = 0.02) -> None:
    """The timm/official init of linear layers: truncated normal weights, zero biases (use with ``apply``)."""
    if isinstance(module, nn.Linear):
        trunc_normal_(module.weight, std=std)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def flagged_no_weight_decay(model: nn.Module) -> set:
    """Names of the parameters flagged ``_no_weight_decay`` (the SSM's A_logs and Ds), for ``no_weight_decay()``."""
    return {name for name, p in model.named_parameters() if getattr(p, "_no_weight_decay", False)}


class PatchStem(nn.Module):
    """Non-overlapping patch stem of the vanilla VMamba models: conv k=s=patch_size, then LayerNorm."""

    def __init__(self, in_chans: int, dim: int, patch_size: int = 4) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, patch_size, stride=patch_size)
        self.norm = LayerNorm2d(dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(self.proj(x))


class OverlapStem(nn.Module):
    """Stem of the VMamba v2 models: two 3x3 stride-2 convs with LayerNorm, GELU between them."""

    def __init__(self, in_chans: int, dim: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, dim // 2, 3, stride=2, padding=1)
        self.norm1 = LayerNorm2d(dim // 2)
        self.act = nn.GELU()
        self.conv2 = nn.Conv2d(dim // 2, dim, 3, stride=2, padding=1)
        self.norm2 = LayerNorm2d(dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm2(self.conv2(self.act(self.norm1(self.conv1(x)))))


class PatchMerging(nn.Module):
    """Swin-style 2x2 merge (vanilla model): gather 4 neighbours, LayerNorm(4C), Linear 4C -> out."""

    def __init__(self, dim: int, out_dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, out_dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        x = nn.functional.pad(x, (0, x.shape[3] % 2, 0, x.shape[2] % 2)).permute(0, 2, 3, 1)
        x = torch.cat((x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]), dim=-1)
        return self.reduction(self.norm(x)).permute(0, 3, 1, 2)


class ConvDownsample(nn.Module):
    """Downsampling of the v2 models: 3x3 stride-2 conv, then LayerNorm."""

    def __init__(self, dim: int, out_dim: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(dim, out_dim, 3, stride=2, padding=1)
        self.norm = LayerNorm2d(out_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(self.conv(x))


class ChannelGate(nn.Module):
    """Squeeze-excite gate of a channels-last map: spatial mean -> fc -> ReLU -> fc -> sigmoid, (b, 1, 1, C).

    The gate is returned, not applied: MSVMamba scales the map it comes from, GroupMamba a product of it.
    """

    def __init__(self, channels: int, reduction: int, bias: bool = True) -> None:
        super().__init__()
        self.fc1 = nn.Linear(channels, channels // reduction, bias=bias)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(channels // reduction, channels, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return torch.sigmoid(self.fc2(self.act(self.fc1(x.mean(dim=(1, 2), keepdim=True)))))


class VSSBlock(nn.Module):
    """Pre-norm residual block: x + mixer(norm(x)) (SS2D by default), then x + MLP(norm(x)) when mlp_ratio > 0;
    channels-last.

    Args:
        dim: channels.
        drop_path: stochastic-depth rate of both residual branches.
        mlp_ratio: MLP hidden width as a multiple of dim; 0 removes the MLP (vanilla model).
        norm_layer: channels-last normalisation.
        mixer_layer: ``(dim, **ssm_kwargs) -> channels-last module``, the token mixer; ``SS2D`` by default
            (``backbones.mhs.MultiHeadScanMixer`` takes the same arguments).
        **ssm_kwargs: passed to the mixer.
    """

    def __init__(self, dim: int, drop_path: float = 0.0, mlp_ratio: float = 4.0,
                 norm_layer: Callable[[int], nn.Module] = nn.LayerNorm,
                 mixer_layer: Callable[..., nn.Module] = SS2D, **ssm_kwargs) -> None:
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.mixer = mixer_layer(dim, **ssm_kwargs)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        if mlp_ratio > 0:
            self.norm2 = norm_layer(dim)
            self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU)
        else:
            self.norm2 = self.mlp = None

    def forward(self, x: Tensor) -> Tensor:
        """(batch, height, width, dim) -> same shape."""
        x = x + self.drop_path(self.mixer(self.norm1(x)))
        if self.mlp is not None:
            x = x + self.drop_path(self.mlp(self.norm2(x)))
        return x


class Stage(nn.Module):
    """Optional downsample, blocks and optional norm on NCHW maps, with optional gradient checkpointing.

    Args:
        dim: channels of the blocks.
        downsample: the layer before the blocks (``nn.Identity`` for the first stage).
        blocks: the stage's blocks, in order.
        norm_layer: ``dim -> module``, a norm after the blocks (GroupMamba's stages), or None.
    """

    def __init__(self, dim: int, downsample: nn.Module, blocks: Sequence[nn.Module],
                 norm_layer: Optional[Callable[[int], nn.Module]] = None) -> None:
        super().__init__()
        self.downsample = downsample
        self.blocks = nn.Sequential(*blocks)
        self.norm = norm_layer(dim) if norm_layer is not None else nn.Identity()
        self.grad_checkpointing = False

    def run_blocks(self, x: Tensor) -> Tensor:
        if self.grad_checkpointing and not torch.jit.is_scripting():
            from timm.models import checkpoint_seq
            return checkpoint_seq(self.blocks, x)
        return self.blocks(x)

    def forward_downsampled(self, x: Tensor) -> Tensor:
        """Blocks and norm on the NCHW map ``downsample`` returned (the stage's input, after downsampling)."""
        return self.norm(self.run_blocks(x))

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_downsampled(self.downsample(x))


class ChannelsLastStage(Stage):
    """A stage whose blocks (and norm) run on channels-last maps; NCHW in and out, like every stage."""

    def forward_downsampled(self, x: Tensor) -> Tensor:
        return self.norm(self.run_blocks(x.permute(0, 2, 3, 1))).permute(0, 3, 1, 2)


def build_stages(depths: Sequence[int], dims: Sequence[int], block_layer: Union[BlockLayer, Sequence[BlockLayer]],
                 stage_layer: Union[StageLayer, Sequence[StageLayer]],
                 downsample_layer: Callable[[int, int], nn.Module],
                 drop_path_rate: float) -> Tuple[nn.Sequential, List[dict]]:
    """The stages of a four-stride backbone and their timm ``feature_info`` (stage i at stride 4 * 2 ** i).

    Stage i is ``stage_layer(dims[i], downsample, blocks)``: no downsample for the first stage, then
    ``downsample_layer(dims[i - 1], dims[i])``; block j is ``block_layer(dims[i], drop_path=rate)`` with the
    stochastic-depth rate rising linearly over all blocks. ``block_layer`` and ``stage_layer`` may be one
    callable or one per stage.
    """
    block_layers = list(block_layer) if isinstance(block_layer, (list, tuple)) else [block_layer] * len(depths)
    stage_layers = list(stage_layer) if isinstance(stage_layer, (list, tuple)) else [stage_layer] * len(depths)
    if not len(block_layers) == len(stage_layers) == len(dims) == len(depths):
        raise ValueError(f"{len(depths)} depths need as many dims, block and stage layers; got {len(dims)} dims, "
                         f"{len(block_layers)} block layers and {len(stage_layers)} stage layers")
    rates = [drop_path_rate * i / max(sum(depths) - 1, 1) for i in range(sum(depths))]
    stages, feature_info = [], []
    for i, (depth, dim) in enumerate(zip(depths, dims)):
        downsample = downsample_layer(dims[i - 1], dim) if i else nn.Identity()
        blocks = [block_layers[i](dim, drop_path=rates[sum(depths[:i]) + j]) for j in range(depth)]
        stages.append(stage_layers[i](dim, downsample, blocks))
        feature_info.append(dict(num_chs=dim, reduction=4 * 2 ** i, module=f"stages.{i}"))
    return nn.Sequential(*stages), feature_info
