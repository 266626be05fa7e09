"""VM-UNet decoder (Ruan & Xiang, arXiv 2402.02491): patch expanding, VSS blocks, additive skips, final x4 expand.

Facts from the official code (JCruan519/VM-UNet and its fork PixDeep/MHS-VM, ``models/vmunet/vmamba.py``,
``VSSM.forward_features`` / ``forward_features_up``): the decoder mirrors the encoder with one stage per
level, deepest first. It starts from the encoder's last map as it is (no norm: the model's ``self.norm`` is
commented out). Every stage but the deepest starts with a patch expand (``Linear(C_in, 4 C_out)`` without
bias, a 2x2 pixel shuffle, ``LayerNorm(C_out)``), then runs vanilla VSS blocks (VMamba v0: d_state 16,
expansion 2, z gate, no MLP). Skips are added, not concatenated, *before* the expand, and they are the
encoder stages' *inputs*: the encoder records each layer's input (``skip_list``; a layer's patch merging
sits at its end), and decoder stage k >= 1 computes ``stage_k(x + skip_list[-k])``, so the maps entering
encoder stages 3, 2, 1 (strides 32, 16, 8, after their downsampling) join before the expands to strides
16, 8, 4. The backbone hands these over as its stage inputs (``HeadInputs.FEATURES_AND_STAGE_INPUTS``). A
final expand (``Linear(C, 16 C/4)``, 4x4 shuffle, ``LayerNorm(C/4)``) and a 1x1 conv give full-resolution
logits.
The paper's configuration is encoder depths [2, 2, 2, 2], decoder depths [2, 2, 2, 1], drop path 0.2
(linear over the encoder, reversed over the decoder), 27.43 M parameters with its encoder
(``vanilla_vmamba_tiny`` with ``depths=[2, 2, 2, 2]``). Its ``load_from`` also copies encoder stage i's
blocks into decoder stage 3 - i: ``init_from_encoder`` here.
"""

from __future__ import annotations

import re
from functools import partial
from typing import Callable, Dict, Optional, Sequence

import torch
from torch import Tensor, nn

from backbones._checkpoint import KeyRules, rename_key
from backbones.layers import VSSBlock, init_linear_trunc_normal

from .interface import HeadInputs

__all__ = ["OFFICIAL_DECODER", "OFFICIAL_DECODER_RULES", "PatchExpand", "SS2D_MIXER_RULES", "VMUNetDecoder",
           "from_official", "pixel_expand"]

# VMamba v0 blocks, as the reference's encoder and decoder use.
vanilla_vss_block = partial(VSSBlock, mlp_ratio=0.0, d_state=16, ssm_ratio=2.0, gated=True, conv_bias=True)


def pixel_expand(x: Tensor, scale: int) -> Tensor:
    """``(B, H, W, scale^2 * C) -> (B, H * scale, W * scale, C)``.

    Channels are read as ``(row offset, column offset, channel)``, channel fastest (einops
    ``b h w (p1 p2 c) -> b (h p1) (w p2) c``, the order of the reference implementations, so their
    weights keep their meaning; ``nn.PixelShuffle`` reads channel slowest).
    """
    batch, height, width, channels = x.shape
    if channels % (scale * scale):
        raise ValueError(f"pixel_expand: {channels} channels cannot be split into {scale}x{scale} positions")
    x = x.reshape(batch, height, width, scale, scale, channels // (scale * scale))
    return x.permute(0, 1, 3, 2, 4, 5).reshape(batch, height * scale, width * scale, -1)


class PatchExpand(nn.Module):
    """Channels-last upsampling: ``Linear(in, scale^2 * out)`` (no bias), pixel expand, ``LayerNorm(out)``."""

    def __init__(self, in_dim: int, out_dim: int, scale: int = 2,
                 norm_layer: Callable[[int], nn.Module] = nn.LayerNorm) -> None:
        super().__init__()
        self.scale = scale
        self.expand = nn.Linear(in_dim, scale * scale * out_dim, bias=False)
        self.norm = norm_layer(out_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(pixel_expand(self.expand(x), self.scale))


class DecoderStage(nn.Module):
    """Optional upsampling, then blocks (channels-last in and out)."""

    def __init__(self, upsample: nn.Module, blocks: Sequence[nn.Module]) -> None:
        super().__init__()
        self.upsample = upsample
        self.blocks = nn.Sequential(*blocks)


class VMUNetDecoder(nn.Module):
    """VM-UNet's decoder on a staged backbone's last feature map and stage inputs (the reference's order).

    Args:
        in_channels: channels of the backbone's feature maps, finest first (from run.py).
        strides: their strides; the finest sets the final expansion (4 for every backbone here).
        num_classes: output channels (1 for a sigmoid binary output, as VM-UNet on ISIC).
        depths: blocks per decoder stage, deepest first (the paper: [2, 2, 2, 1]).
        drop_path_rate: stochastic depth, falling linearly from the deepest block to 0 at the last.
        block: ``(dim, drop_path=...) -> channels-last module``; VMamba v0 VSS blocks by default.
        final_channels: channels after the final expansion; default a quarter of the finest level's.
        init_from_encoder: copy the encoder's block weights into the mirrored decoder stages (the
            reference's ``load_from``); the task calls ``init_from_encoder`` with its backbone.
    """

    inputs = HeadInputs.FEATURES_AND_STAGE_INPUTS

    def __init__(self, in_channels: Sequence[int], strides: Sequence[int], num_classes: int,
                 depths: Sequence[int] = (2, 2, 2, 1), drop_path_rate: float = 0.2,
                 block: Callable[..., nn.Module] = vanilla_vss_block, final_channels: Optional[int] = None,
                 init_from_encoder: bool = False) -> None:
        super().__init__()
        if len(depths) != len(in_channels):
            raise ValueError(f"VMUNetDecoder: {len(depths)} decoder depths for {len(in_channels)} feature levels")
        dims = list(in_channels)[::-1]
        rates = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").flip(0).tolist()
        stages = []
        for level, (dim, depth) in enumerate(zip(dims, depths)):
            upsample = PatchExpand(dims[level - 1], dim) if level else nn.Identity()
            start = sum(depths[:level])
            stages.append(DecoderStage(upsample, [block(dim, drop_path=rates[start + j]) for j in range(depth)]))
        self.stages = nn.ModuleList(stages)
        final_channels = final_channels or max(1, in_channels[0] // 4)
        self.final_expand = PatchExpand(in_channels[0], final_channels, scale=strides[0])
        self.final_conv = nn.Conv2d(final_channels, num_classes, 1)
        self.encoder_init = init_from_encoder
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        """Truncated-normal linear layers and unit LayerNorms, as the reference's ``_init_weights``."""
        init_linear_trunc_normal(module)
        if isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    @torch.no_grad()
    def init_from_encoder(self, encoder: nn.Module) -> int:
        """Copy encoder block ``stages.i.blocks.j`` into decoder block ``stages.(n-1-i).blocks.j`` (the
        reference's ``load_from``), for every decoder block whose tensors all have a same-named, same-shaped
        counterpart (blocks of another kind are left alone); returns the number of blocks copied."""
        pattern = re.compile(r"(?:^|\.)stages\.(\d+)\.blocks\.(\d+)\.(.+)$")
        last = len(self.stages) - 1
        sources: dict[str, dict[str, Tensor]] = {}
        for key, value in encoder.state_dict().items():
            match = pattern.search(key)
            if match is not None:
                block = f"stages.{last - int(match[1])}.blocks.{match[2]}"
                sources.setdefault(block, {})[match[3]] = value
        copied = 0
        for name, module in self.named_modules():
            source = sources.get(name)
            own = module.state_dict() if source is not None else {}
            if source and own.keys() == source.keys() and all(own[k].shape == source[k].shape for k in own):
                module.load_state_dict(source)
                copied += 1
        return copied

    def forward(self, features: Sequence[Tensor]) -> Tensor:
        """The backbone's NCHW level maps, finest first, followed by the same levels' stage inputs
        (``HeadInputs.FEATURES_AND_STAGE_INPUTS``) -> logits at ``strides[0]`` times the finest resolution.

        The deepest level map starts the decoder; the stage inputs of the levels from the deepest up to the
        second finest are added before the expands (the finest level's input, the stem's output, is unused,
        as in the reference)."""
        levels = len(self.stages)
        if len(features) != 2 * levels:
            raise ValueError(f"VMUNetDecoder: expected {levels} level maps followed by their {levels} stage inputs "
                             f"(a backbone built with features_only=True, stage_inputs=True), got {len(features)} "
                             f"maps")
        stage_inputs = [f.permute(0, 2, 3, 1) for f in features[levels:]][::-1]
        x = self.stages[0].blocks(features[levels - 1].permute(0, 2, 3, 1))
        for stage, skip in zip(self.stages[1:], stage_inputs):
            x = stage.blocks(stage.upsample(x + skip))
        x = self.final_expand(x).permute(0, 3, 1, 2)
        return self.final_conv(x)


# The official decoder (``VSSM.layers_up``, ``final_up``, ``final_conv`` in VM-UNet and its forks, e.g. MHS-VM) ->
# ``VMUNetDecoder``: decoder layer k is stage k (its ``upsample`` first in both), VMamba v0's block names
# (``ln_1``, ``self_attention``) become ours; the mixer's own keys follow the mixer's table.
OFFICIAL_DECODER = ("layers_up.", "final_up.", "final_conv.")
OFFICIAL_DECODER_RULES: KeyRules = [
    (r"^layers_up\.(\d+)\.", r"stages.\1."),
    (r"^(stages\.\d+\.blocks\.\d+)\.ln_1\.", r"\1.norm1."),
    (r"^(stages\.\d+\.blocks\.\d+)\.self_attention\.", r"\1.mixer."),
    (r"^final_up\.", "final_expand."),
]

# VM-UNet's own mixer (VMamba v0's ``SS2D``, ``self_attention`` -> ``mixer``): its scan parameters live in ``ssm``.
SS2D_MIXER_RULES: KeyRules = [(r"\.mixer\.(x_proj_weight|dt_projs_weight|dt_projs_bias|A_logs|Ds)$", r".mixer.ssm.\1")]


def from_official(state_dict: Dict[str, Tensor], mixer_rules: KeyRules = ()) -> Dict[str, Tensor]:
    """The decoder part of an official VM-UNet-style state dict (keys without the wrapper's prefix), renamed for
    ``VMUNetDecoder`` by ``OFFICIAL_DECODER_RULES`` and then the mixer's ``mixer_rules``."""
    rules = [*OFFICIAL_DECODER_RULES, *mixer_rules]
    return {rename_key(k, rules): v for k, v in state_dict.items() if k.startswith(OFFICIAL_DECODER)}
