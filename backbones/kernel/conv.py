"""Vim's two causal depthwise conv1d + SiLU in one pass on the fused CPU kernel (``csrc/causal_conv.cpp``).

Vim's mixer runs, per direction, a causal depthwise conv1d and a SiLU; the backward direction runs them on
the reversed sequence. In token order that conv is anti-causal with the kernel flipped, so both directions
are one pass over the tokens: ``bidirectional_conv_silu`` reads x (batch, L, d) with channels innermost
(as ``in_proj`` writes it) and returns (batch, 2, d, L), a view of a (batch, L, 2, d) tensor, which is
the per-route, pixel-order, channels-last layout the selective scan's route-aware path reads in place.

The op lives in the same library as the scan (built by ``python -m backbones.kernel build``) and is a
``torch.library`` custom op with a fake implementation and a registered autograd formula; its backward
recomputes the pre-activations rather than saving them. Inputs in bfloat16/float16 are computed in
float32; float64 is refused (the fused route path never sees it).
"""

from __future__ import annotations

import ctypes
import functools
from typing import Optional

import torch
from torch import Tensor

from . import _library

__all__ = ["MAX_WIDTH", "bidirectional_conv_silu", "causal_conv_silu_cpu"]

MAX_WIDTH = 8  # taps per direction the kernel takes (Vim uses 4)


class _ConvProblem(ctypes.Structure):
    _fields_ = [("x", ctypes.c_void_p), ("x_batch", ctypes.c_int64), ("x_token", ctypes.c_int64),
                ("weight", ctypes.c_void_p), ("bias", ctypes.c_void_p), ("batch", ctypes.c_int64),
                ("length", ctypes.c_int64), ("channels", ctypes.c_int64), ("width", ctypes.c_int64),
                ("threads", ctypes.c_int32)]


@functools.lru_cache(maxsize=None)
def _typed(lib: ctypes.CDLL) -> ctypes.CDLL:
    problem = ctypes.POINTER(_ConvProblem)
    lib.mcc_forward.argtypes = [problem, ctypes.c_void_p]
    lib.mcc_backward.argtypes = [problem, *[ctypes.c_void_p] * 4]
    lib.mcc_last_error.restype = ctypes.c_char_p
    return lib


def _check(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> None:
    if x.dim() != 3:
        raise ValueError(f"x must be (batch, length, channels), got {tuple(x.shape)}")
    channels = x.shape[2]
    if weight.dim() != 3 or weight.shape[:2] != (2 * channels, 1) or not 1 <= weight.shape[2] <= MAX_WIDTH:
        raise ValueError(f"weight must be a depthwise Conv1d's (2 * {channels}, 1, width <= {MAX_WIDTH}), "
                         f"got {tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (2 * channels,):
        raise ValueError(f"bias must be ({2 * channels},), got {tuple(bias.shape)}")
    for name, t in (("x", x), ("weight", weight), ("bias", bias)):
        if t is not None and (t.device.type != "cpu" or not t.is_floating_point() or t.dtype == torch.float64):
            raise ValueError(f"the fused causal conv takes float32/bfloat16/float16 CPU tensors; {name} is "
                             f"{t.dtype} on {t.device}")


def _problem(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> tuple[_ConvProblem, tuple[Tensor, ...]]:
    """The kernel's problem, and the float32 tensors it points into (kept alive by the caller)."""
    tokens = x.float()
    if tokens.stride(2) != 1 and tokens.shape[2] > 1:
        tokens = tokens.contiguous()
    batch, length, channels = tokens.shape
    width = weight.shape[2]
    taps = weight.detach().float().reshape(2, channels, width).transpose(1, 2).contiguous()  # direction, tap, channel
    biases = None if bias is None else bias.detach().float().contiguous()
    problem = _ConvProblem(tokens.data_ptr(), tokens.stride(0), tokens.stride(1), taps.data_ptr(),
                           None if biases is None else biases.data_ptr(), batch, length, channels, width,
                           torch.get_num_threads())
    return problem, (tokens, taps, biases)


@torch.library.custom_op("mambalab::causal_conv_silu_cpu", mutates_args=())
def causal_conv_silu_cpu(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """SiLU of both directions' convs of x (batch, L, d), in token order: (batch, L, 2, d)."""
    _check(x, weight, bias)
    lib = _typed(_library())
    problem, alive = _problem(x, weight, bias)
    y = torch.empty(*x.shape[:2], 2, x.shape[2])
    if lib.mcc_forward(ctypes.byref(problem), y.data_ptr()):
        raise RuntimeError(f"fused causal conv: {lib.mcc_last_error().decode()}")
    return y.to(x.dtype)


@causal_conv_silu_cpu.register_fake
def _(x, weight, bias):
    return x.new_empty(*x.shape[:2], 2, x.shape[2])


@torch.library.custom_op("mambalab::causal_conv_silu_cpu_backward", mutates_args=())
def causal_conv_silu_cpu_backward(grad: Tensor, x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> list[Tensor]:
    """Gradients of x, weight and (when given) bias."""
    _check(x, weight, bias)
    lib = _typed(_library())
    problem, alive = _problem(x, weight, bias)
    gy = grad.float().contiguous()
    dx = torch.empty(x.shape)
    dweight = torch.empty(alive[1].shape)
    dbias = None if bias is None else torch.empty(bias.shape)
    if lib.mcc_backward(ctypes.byref(problem), gy.data_ptr(), dx.data_ptr(), dweight.data_ptr(),
                        None if dbias is None else dbias.data_ptr()):
        raise RuntimeError(f"fused causal conv backward: {lib.mcc_last_error().decode()}")
    grads = [dx.to(x.dtype), dweight.transpose(1, 2).reshape(weight.shape).to(weight.dtype)]
    return grads if bias is None else [*grads, dbias.to(bias.dtype)]


@causal_conv_silu_cpu_backward.register_fake
def _(grad, x, weight, bias):
    return [t.new_empty(t.shape) for t in (x, weight, bias) if t is not None]  # contiguous, as the kernel's


def _setup_context(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad: Tensor):
    x, weight, bias = ctx.saved_tensors
    grads = causal_conv_silu_cpu_backward(grad, x, weight, bias)
    return grads[0], grads[1], grads[2] if bias is not None else None


causal_conv_silu_cpu.register_autograd(_backward, setup_context=_setup_context)


def bidirectional_conv_silu(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """Both directions' causal depthwise conv + SiLU of x (batch, L, d), in token order: (batch, 2, d, L).

    ``weight`` (2 * d, 1, width) and ``bias`` (2 * d,) are one depthwise ``nn.Conv1d``'s over the two
    directions' channels (direction k owns channels k * d...). Direction 0 is the causal conv of the
    sequence, direction 1 the causal conv of the reversed sequence, read back in token order. The result
    is a view of a (batch, L, 2, d) tensor (channels innermost).
    """
    return causal_conv_silu_cpu(x, weight, bias).permute(0, 2, 3, 1)
