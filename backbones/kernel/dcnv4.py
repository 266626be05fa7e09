"""DCNv4's deformable aggregation on the fused CPU kernel (``csrc/dcnv4.cpp``).

The same computation as ``backbones.dcnv4.dcnv4_sample`` (which dispatches here for CPU tensors once the
kernel is built), without its intermediate (batch, group, P, channels, out_h, out_w) sample tensor: per
output pixel, group and kernel point the kernel reads the 4 bilinear neighbours of the value map (channels
last) and adds them, times the point's mask, into the output. Backward scatters the value gradient per
(batch element, group), so no two threads write the same element and any thread count gives the same bits.

The op lives in the same library as the scan (built by ``python -m backbones.kernel build``) and is a
``torch.library`` custom op with a fake implementation and a registered autograd formula. Inputs in
bfloat16/float16 are computed in float32; float64 is refused (``dcnv4_sample`` keeps it on PyTorch).
"""

from __future__ import annotations

import ctypes
import functools

import torch
from torch import Tensor

from . import _library

__all__ = ["MAX_KERNEL_SIZE", "dcnv4_cpu", "output_size"]

MAX_KERNEL_SIZE = 8  # the kernel keeps each point's grid position in a fixed 64-entry table


class _DCNv4Problem(ctypes.Structure):
    _fields_ = [("value", ctypes.c_void_p), ("offset_mask", ctypes.c_void_p), ("batch", ctypes.c_int64),
                ("height", ctypes.c_int64), ("width", ctypes.c_int64), ("channels", ctypes.c_int64),
                ("group", ctypes.c_int64), ("out_h", ctypes.c_int64), ("out_w", ctypes.c_int64),
                ("om_channels", ctypes.c_int64), ("kernel_size", ctypes.c_int64), ("stride", ctypes.c_int64),
                ("pad", ctypes.c_int64), ("dilation", ctypes.c_int64), ("offset_scale", ctypes.c_float),
                ("remove_center", ctypes.c_int32), ("threads", ctypes.c_int32)]


@functools.lru_cache(maxsize=None)
def _typed(lib: ctypes.CDLL) -> ctypes.CDLL:
    problem = ctypes.POINTER(_DCNv4Problem)
    lib.mdc_forward.argtypes = [problem, ctypes.c_void_p]
    lib.mdc_backward.argtypes = [problem, *[ctypes.c_void_p] * 3]
    lib.mdc_last_error.restype = ctypes.c_char_p
    return lib


def output_size(size: int, kernel_size: int, stride: int, pad: int, dilation: int) -> int:
    """Output length of the regular sampling grid along one axis, as for a convolution."""
    return (size + 2 * pad - (dilation * (kernel_size - 1) + 1)) // stride + 1


def _check(value: Tensor, offset_mask: Tensor, group: int, kernel_size: int, stride: int, pad: int, dilation: int,
           remove_center: bool) -> None:
    for name, t in (("value", value), ("offset_mask", offset_mask)):
        if t.device.type != "cpu" or not t.is_floating_point() or t.dtype == torch.float64:
            raise ValueError(f"the fused DCNv4 takes float32/bfloat16/float16 CPU tensors; {name} is "
                             f"{t.dtype} on {t.device}")
    if value.dim() != 4 or offset_mask.dim() != 4:
        raise ValueError(f"value and offset_mask must be 4-D (batch, height, width, channels), got "
                         f"{tuple(value.shape)} and {tuple(offset_mask.shape)}")
    if not 1 <= kernel_size <= MAX_KERNEL_SIZE or stride < 1 or dilation < 1 or pad < 0:
        raise ValueError(f"the fused DCNv4 takes kernel_size 1..{MAX_KERNEL_SIZE}, stride and dilation >= 1 and "
                         f"pad >= 0, got {kernel_size}, {stride}, {dilation}, {pad}")
    batch, height, width, channels = value.shape
    if group < 1 or channels % group:
        raise ValueError(f"{channels} value channels are not divisible by group={group}")
    points = kernel_size ** 2 - int(remove_center)
    out_h, out_w = (output_size(s, kernel_size, stride, pad, dilation) for s in (height, width))
    if offset_mask.shape[:3] != (batch, out_h, out_w) or offset_mask.shape[3] < group * 3 * points:
        raise ValueError(f"offset_mask has shape {tuple(offset_mask.shape)}, expected "
                         f"({batch}, {out_h}, {out_w}, >= {group * 3 * points})")


def _problem(value: Tensor, offset_mask: Tensor, group: int, kernel_size: int, stride: int, pad: int, dilation: int,
             offset_scale: float, remove_center: bool) -> tuple[_DCNv4Problem, tuple[Tensor, Tensor]]:
    """The kernel's problem, and the contiguous float32 tensors it points into (kept alive by the caller)."""
    values, om = value.float().contiguous(), offset_mask.float().contiguous()
    problem = _DCNv4Problem(values.data_ptr(), om.data_ptr(), *values.shape[:3], values.shape[3], group,
                            *om.shape[1:], kernel_size, stride, pad, dilation, offset_scale, int(remove_center),
                            torch.get_num_threads())
    return problem, (values, om)


@torch.library.custom_op("mambalab::dcnv4_cpu", mutates_args=())
def dcnv4_cpu(value: Tensor, offset_mask: Tensor, group: int, kernel_size: int, stride: int, pad: int, dilation: int,
              offset_scale: float, remove_center: bool) -> Tensor:
    """``dcnv4_sample``'s aggregation (same arguments and layouts): (batch, out_h, out_w, channels)."""
    _check(value, offset_mask, group, kernel_size, stride, pad, dilation, remove_center)
    lib = _typed(_library())
    problem, alive = _problem(value, offset_mask, group, kernel_size, stride, pad, dilation, offset_scale,
                              remove_center)
    out = torch.empty(*offset_mask.shape[:3], value.shape[3])
    if lib.mdc_forward(ctypes.byref(problem), out.data_ptr()):
        raise RuntimeError(f"fused DCNv4: {lib.mdc_last_error().decode()}")
    return out.to(value.dtype)


@dcnv4_cpu.register_fake
def _(value, offset_mask, group, kernel_size, stride, pad, dilation, offset_scale, remove_center):
    return value.new_empty(*offset_mask.shape[:3], value.shape[3])


@torch.library.custom_op("mambalab::dcnv4_cpu_backward", mutates_args=())
def dcnv4_cpu_backward(grad: Tensor, value: Tensor, offset_mask: Tensor, group: int, kernel_size: int, stride: int,
                       pad: int, dilation: int, offset_scale: float, remove_center: bool) -> list[Tensor]:
    """Gradients of value and offset_mask (zero in offset_mask's unused padding columns)."""
    _check(value, offset_mask, group, kernel_size, stride, pad, dilation, remove_center)
    lib = _typed(_library())
    problem, alive = _problem(value, offset_mask, group, kernel_size, stride, pad, dilation, offset_scale,
                              remove_center)
    gout = grad.float().contiguous()
    dvalue, doffset_mask = torch.empty(value.shape), torch.empty(offset_mask.shape)
    if lib.mdc_backward(ctypes.byref(problem), gout.data_ptr(), dvalue.data_ptr(), doffset_mask.data_ptr()):
        raise RuntimeError(f"fused DCNv4 backward: {lib.mdc_last_error().decode()}")
    return [dvalue.to(value.dtype), doffset_mask.to(offset_mask.dtype)]


@dcnv4_cpu_backward.register_fake
def _(grad, value, offset_mask, group, kernel_size, stride, pad, dilation, offset_scale, remove_center):
    return [value.new_empty(value.shape), offset_mask.new_empty(offset_mask.shape)]  # contiguous, as the kernel's


def _setup_context(ctx, inputs, output) -> None:
    value, offset_mask, *options = inputs
    ctx.save_for_backward(value, offset_mask)
    ctx.options = options


def _backward(ctx, grad: Tensor):
    value, offset_mask = ctx.saved_tensors
    dvalue, doffset_mask = dcnv4_cpu_backward(grad, value, offset_mask, *ctx.options)
    return dvalue, doffset_mask, None, None, None, None, None, None, None


dcnv4_cpu.register_autograd(_backward, setup_context=_setup_context)
