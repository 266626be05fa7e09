"""DCNv4 deformable aggregation in pure PyTorch, with the parameterisation of OpenGVLab's ``DCNv4`` module.

Upstream DCNv4 is a CUDA-only op. This is the same computation written with ``F.grid_sample``, so it
runs anywhere and official weights (HRVMamba's) load unchanged. On CPU, once the optional kernel library
is built (``python -m backbones.kernel build``), float32/bfloat16/float16 tensors take the fused kernel
(``backbones.kernel.dcnv4``) instead, forward and backward, except while torch.compile, export, ONNX or jit
tracing runs. For each output pixel and each of
``group`` channel groups, the op reads ``P = kernel_size**2`` points (the regular kernel grid moved by
learned offsets), samples the group's channels bilinearly there (zero outside the map) and sums them
weighted by learned, unnormalised modulation scalars (DCNv4 drops DCNv3's softmax).

Layout of the offset/mask tensor (last axis, per output pixel), as the DCNv4 kernels read it: group g
owns the slice ``[g*3P, (g+1)*3P)``: first ``2P`` offsets as (x, y) pairs, then ``P`` mask values; the
kernel points are ordered x-major (``for i in kernel_w: for j in kernel_h``). The projection producing
it is padded to a multiple of 8 outputs; the padding is unused.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import kernel as fused_kernel
from .kernel.dcnv4 import MAX_KERNEL_SIZE, dcnv4_cpu
from .ssm import is_tracing

__all__ = ["DCNv4", "dcnv4_sample"]


def dcnv4_sample(value: Tensor, offset_mask: Tensor, group: int, kernel_size: int = 3, stride: int = 1,
                 pad: int = 1, dilation: int = 1, offset_scale: float = 1.0, remove_center: bool = False) -> Tensor:
    """DCNv4's deformable aggregation.

    Args:
        value: (batch, height, width, group * group_channels), channels last.
        offset_mask: (batch, out_height, out_width, >= group * 3 * P) offsets and masks (layout above).
        group: number of channel groups, each with its own offsets and masks.
        kernel_size, stride, pad, dilation: the regular sampling grid, as for a convolution.
        offset_scale: scale of the offsets (and of the kernel grid's extent).
        remove_center: drop the kernel's centre point (P = kernel_size**2 - 1).

    Returns:
        (batch, out_height, out_width, group * group_channels).
    """
    batch, height, width, channels = value.shape
    if channels % group:
        raise ValueError(f"dcnv4_sample: {channels} value channels are not divisible by group={group}")
    points = [(i, j) for i in range(kernel_size) for j in range(kernel_size)
              if not (remove_center and i == kernel_size // 2 and j == kernel_size // 2)]
    num_points = len(points)
    out_h = (height + 2 * pad - (dilation * (kernel_size - 1) + 1)) // stride + 1
    out_w = (width + 2 * pad - (dilation * (kernel_size - 1) + 1)) // stride + 1
    if offset_mask.shape[:3] != (batch, out_h, out_w) or offset_mask.shape[3] < group * 3 * num_points:
        raise ValueError(f"dcnv4_sample: offset_mask has shape {tuple(offset_mask.shape)}, expected "
                         f"({batch}, {out_h}, {out_w}, >= {group * 3 * num_points})")
    if _runs_fused(value, offset_mask, kernel_size):
        return dcnv4_cpu(value, offset_mask, group, kernel_size, stride, pad, dilation, offset_scale, remove_center)
    # Points first (batch, group, point, ...): grid_sample then writes each point's samples as one
    # contiguous (out_h, out_w) plane, and the masked sum over points adds whole planes (vectorised)
    # instead of reducing a strided innermost axis of length P.
    om = offset_mask[..., : group * 3 * num_points].reshape(batch, out_h, out_w, group, 3 * num_points)
    om = om.permute(0, 3, 4, 1, 2)
    offsets = om[:, :, : 2 * num_points].unflatten(2, (num_points, 2))  # (batch, group, P, 2, out_h, out_w)
    mask = om[:, :, 2 * num_points:]  # (batch, group, P, out_h, out_w)
    # Pixel coordinates of the kernel grid; the grid's extent scales with offset_scale like the offsets.
    half = dilation * (kernel_size - 1) // 2
    origin = half - pad - half * offset_scale
    grid_x = torch.tensor([i * dilation for i, _ in points], dtype=offsets.dtype, device=offsets.device)
    grid_y = torch.tensor([j * dilation for _, j in points], dtype=offsets.dtype, device=offsets.device)
    base_x = torch.arange(out_w, dtype=offsets.dtype, device=offsets.device) * stride + origin
    base_y = torch.arange(out_h, dtype=offsets.dtype, device=offsets.device) * stride + origin
    x = base_x + (grid_x[:, None, None] + offsets[:, :, :, 0]) * offset_scale
    y = base_y[:, None] + (grid_y[:, None, None] + offsets[:, :, :, 1]) * offset_scale
    # grid_sample with align_corners=False puts pixel k's centre at (2k + 1) / size - 1.
    grid = torch.stack(((2 * x + 1) / width - 1, (2 * y + 1) / height - 1), dim=-1)
    grid = grid.reshape(batch * group, num_points * out_h, out_w, 2)
    per_group = value.reshape(batch, height, width, group, channels // group).permute(0, 3, 4, 1, 2)
    sampled = F.grid_sample(per_group.reshape(batch * group, channels // group, height, width), grid.to(value.dtype),
                            mode="bilinear", padding_mode="zeros", align_corners=False)
    sampled = sampled.view(batch, group, channels // group, num_points, out_h, out_w)
    out = (sampled * mask.unsqueeze(2).to(sampled.dtype)).sum(3)
    return out.permute(0, 3, 4, 1, 2).reshape(batch, out_h, out_w, channels)


def _runs_fused(value: Tensor, offset_mask: Tensor, kernel_size: int) -> bool:
    """Whether the fused CPU kernel computes this aggregation (float64, empty and traced inputs stay on PyTorch)."""
    return (kernel_size <= MAX_KERNEL_SIZE and value.device.type == "cpu" and offset_mask.device.type == "cpu"
            and value.numel() > 0 and offset_mask.numel() > 0
            and value.dtype != torch.float64 and offset_mask.dtype != torch.float64 and not is_tracing(value)
            and not torch.onnx.is_in_onnx_export() and fused_kernel.available())


class DCNv4(nn.Module):
    """DCNv4 module (OpenGVLab ``DCNv4.modules.dcnv4.DCNv4``) on NCHW maps, same parameter names and shapes.

    offsets and masks = ``offset_mask`` (a Linear, zero-initialised) of the input, or of a depthwise conv
    of it (``offset_mask_dw``, when ``dw_kernel_size`` is set); values = ``value_proj`` of the input;
    output = ``output_proj`` of the aggregation. ``without_pointwise=True`` drops the two projections
    (values are the input itself), as the DCNv4 build HRVMamba was trained with does by default.
    Only shape-preserving grids are supported (stride 1, ``2 * pad == dilation * (kernel_size - 1)``),
    since the offsets are predicted per input pixel. Upstream's ``center_feature_scale`` option is not
    implemented.

    Args:
        channels: input/output channels.
        kernel_size, stride, pad, dilation: the regular sampling grid.
        group: channel groups with separate offsets and masks.
        offset_scale: scale of the offsets.
        dw_kernel_size: kernel of the depthwise conv before ``offset_mask``, or None for none.
        remove_center: drop the kernel's centre point.
        output_bias: bias of ``output_proj``.
        without_pointwise: no ``value_proj``/``output_proj``.
    """

    def __init__(self, channels: int = 64, kernel_size: int = 3, stride: int = 1, pad: int = 1, dilation: int = 1,
                 group: int = 4, offset_scale: float = 1.0, dw_kernel_size: Optional[int] = None,
                 remove_center: bool = False, output_bias: bool = True, without_pointwise: bool = False) -> None:
        super().__init__()
        if channels % group:
            raise ValueError(f"DCNv4: channels={channels} must be divisible by group={group}")
        if stride != 1 or 2 * pad != dilation * (kernel_size - 1):
            raise ValueError(f"DCNv4: only shape-preserving grids are supported, got kernel_size={kernel_size}, "
                             f"stride={stride}, pad={pad}, dilation={dilation}")
        self.channels, self.kernel_size, self.stride, self.pad = channels, kernel_size, stride, pad
        self.dilation, self.group, self.offset_scale, self.remove_center = dilation, group, offset_scale, remove_center
        self.without_pointwise = without_pointwise
        num_points = group * (kernel_size * kernel_size - int(remove_center))
        if dw_kernel_size is not None:
            self.offset_mask_dw = nn.Conv2d(channels, channels, dw_kernel_size, padding=(dw_kernel_size - 1) // 2,
                                            groups=channels)
        else:
            self.offset_mask_dw = None
        self.offset_mask = nn.Linear(channels, math.ceil(num_points * 3 / 8) * 8)
        if without_pointwise:
            self.value_proj = self.output_proj = None
        else:
            self.value_proj = nn.Linear(channels, channels)
            self.output_proj = nn.Linear(channels, channels, bias=output_bias)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Upstream init: zero offsets and masks, Xavier-uniform projections with zero biases."""
        nn.init.zeros_(self.offset_mask.weight)
        nn.init.zeros_(self.offset_mask.bias)
        for proj in (self.value_proj, self.output_proj):
            if proj is not None:
                nn.init.xavier_uniform_(proj.weight)
                if proj.bias is not None:
                    nn.init.zeros_(proj.bias)

    def forward(self, x: Tensor) -> Tensor:
        """(batch, channels, height, width) -> same shape."""
        channels_last = x.permute(0, 2, 3, 1)
        value = channels_last if self.value_proj is None else self.value_proj(channels_last)
        source = channels_last if self.offset_mask_dw is None else self.offset_mask_dw(x).permute(0, 2, 3, 1)
        out = dcnv4_sample(value, self.offset_mask(source), self.group, self.kernel_size, self.stride, self.pad,
                           self.dilation, self.offset_scale, self.remove_center)
        if self.output_proj is not None:
            out = self.output_proj(out)
        return out.permute(0, 3, 1, 2)

    def extra_repr(self) -> str:
        return (f"channels={self.channels}, kernel_size={self.kernel_size}, group={self.group}, "
                f"offset_scale={self.offset_scale}, without_pointwise={self.without_pointwise}")
