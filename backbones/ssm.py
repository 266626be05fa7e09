"""Selective scan: the one recurrence every backbone family runs.

``selective_scan`` computes, per channel ``d`` and state index ``n``::

    h_t = exp(delta_t * A[d, n]) * h_{t-1} + delta_t * B_t[n] * u_t
    y_t = sum_n C_t[n] * h_t[n] + D[d] * u_t          (times silu(z_t) when z is given)

with the argument shapes of mamba-ssm's ``selective_scan_fn`` so that backends are drop-in
replacements for one another:

- ``u``, ``delta``, ``z``: (batch, channels, length)
- ``A``: (channels, d_state)
- ``B``, ``C``: (batch, d_state, length), or grouped (batch, groups, d_state, length); channel ``d``
  reads group ``d // (channels // groups)`` -- VMamba's K scan routes are K groups.
- ``D``, ``delta_bias``: (channels,)

Backends:

- ``torch``: log-depth odd/even parallel scan in pure PyTorch (no Python loop over tokens).
- ``reference``: a plain sequential loop over time; slow, kept as a readable cross-check.
- ``mamba_ssm``: mamba-ssm's CUDA kernel; only for CUDA tensors and only when the package imports.
- ``auto``: ``mamba_ssm`` for CUDA tensors when it is usable, else ``torch``.

Precision policy: whatever the input dtype, delta, exp(delta * A), the state and the accumulation are
at least float32 (float64 inputs stay float64, so gradcheck is exact); the output is returned in the
dtype of ``u``.
"""

from __future__ import annotations

import functools
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

BACKENDS = ("auto", "torch", "reference", "mamba_ssm")


@functools.lru_cache(maxsize=1)
def mamba_ssm_status() -> tuple[Optional[Callable], str]:
    """Import mamba-ssm's CUDA selective scan once; return (function or None, reason)."""
    if not torch.cuda.is_available():
        return None, "no CUDA device is visible to torch"
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except ImportError as err:
        return None, f"mamba-ssm is not importable ({err}); install the 'cuda' extra on a CUDA machine"
    return selective_scan_fn, "available"


def resolve_backend(backend: str, device: torch.device) -> str:
    """Turn ``auto`` into a concrete backend and check that a forced one can run here."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown scan backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    kernel, reason = mamba_ssm_status()
    if backend == "auto":
        return "mamba_ssm" if device.type == "cuda" and kernel is not None else "torch"
    if backend == "mamba_ssm":
        if kernel is None:
            raise RuntimeError(f"scan backend 'mamba_ssm' was requested but cannot run: {reason}")
        if device.type != "cuda":
            raise RuntimeError(f"scan backend 'mamba_ssm' needs CUDA tensors, got tensors on {device}")
    return backend


def _expand_groups(BC: Tensor, channels: int) -> Tensor:
    """(b, n, l) or (b, g, n, l) -> (b, channels, n, l) without copying (a broadcast view)."""
    if BC.dim() == 3:
        return BC.unsqueeze(1).expand(-1, channels, -1, -1)
    b, g, n, l = BC.shape
    if channels % g:
        raise ValueError(f"{channels} channels cannot be split into {g} groups of B/C")
    return BC.unsqueeze(2).expand(b, g, channels // g, n, l).reshape(b, channels, n, l)


def compute_dtype(u: Tensor) -> torch.dtype:
    """The dtype the scan accumulates in: float32, or float64 for float64 inputs."""
    return torch.promote_types(u.dtype, torch.float32)


def _discretize(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, delta_bias: Optional[Tensor],
                delta_softplus: bool) -> tuple[Tensor, Tensor]:
    """Return the per-step decay exp(delta*A) and input delta*B*u, both (b, d, n, l) in compute dtype."""
    dtype = compute_dtype(u)
    delta = delta.to(dtype)
    if delta_bias is not None:
        delta = delta + delta_bias.to(dtype)[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    decay = torch.exp(delta.unsqueeze(2) * A.to(dtype)[None, :, :, None])
    drive = (delta * u.to(dtype)).unsqueeze(2) * _expand_groups(B.to(dtype), u.shape[1])
    return decay, drive


def _readout(states: Tensor, u: Tensor, C: Tensor, D: Optional[Tensor], z: Optional[Tensor]) -> Tensor:
    """y = sum_n C*h (+ D*u) (* silu(z)), returned in the dtype of ``u``."""
    dtype = states.dtype
    y = (states * _expand_groups(C.to(dtype), u.shape[1])).sum(2)
    if D is not None:
        y = y + D.to(dtype)[:, None] * u.to(dtype)
    if z is not None:
        y = y * F.silu(z.to(dtype))
    return y.to(u.dtype)


def linear_recurrence(decay: Tensor, drive: Tensor) -> Tensor:
    """All states of ``h_t = decay_t * h_{t-1} + drive_t`` (h_{-1} = 0) along the last dim.

    Odd/even (pairwise) parallel scan: adjacent steps are fused into one step with decay
    ``a2 * a1`` and drive ``a2 * b1 + b2``, the half-length problem is solved recursively, and the
    even positions are filled in from their odd neighbours. Depth is log2(L), total work ~2L, and
    since it only multiplies decays in (0, 1] it cannot overflow, whatever |A * delta| is.
    """
    length = decay.shape[-1]
    if length == 1:
        return drive
    pairs = length // 2
    a_even, a_odd = decay[..., 0::2], decay[..., 1::2]
    b_even, b_odd = drive[..., 0::2], drive[..., 1::2]
    odd_states = linear_recurrence(a_odd * a_even[..., :pairs], a_odd * b_even[..., :pairs] + b_odd)
    previous_odd = F.pad(odd_states[..., : b_even.shape[-1] - 1], (1, 0))
    even_states = b_even + a_even * previous_odd
    interleaved = torch.stack((even_states[..., :pairs], odd_states), dim=-1).flatten(-2)
    if length % 2:
        interleaved = torch.cat((interleaved, even_states[..., -1:]), dim=-1)
    return interleaved


def _scan_torch(u, delta, A, B, C, D, z, delta_bias, delta_softplus):
    decay, drive = _discretize(u, delta, A, B, delta_bias, delta_softplus)
    return _readout(linear_recurrence(decay, drive), u, C, D, z)


def _scan_reference(u, delta, A, B, C, D, z, delta_bias, delta_softplus):
    decay, drive = _discretize(u, delta, A, B, delta_bias, delta_softplus)
    state = torch.zeros_like(drive[..., 0])
    states = []
    for decay_t, drive_t in zip(decay.unbind(-1), drive.unbind(-1)):
        state = decay_t * state + drive_t
        states.append(state)
    return _readout(torch.stack(states, dim=-1), u, C, D, z)


def _scan_mamba_ssm(u, delta, A, B, C, D, z, delta_bias, delta_softplus):
    kernel, _ = mamba_ssm_status()
    out = kernel(u, delta, A.float(), B, C, D=None if D is None else D.float(), z=z,
                 delta_bias=None if delta_bias is None else delta_bias.float(),
                 delta_softplus=delta_softplus)
    return out.to(u.dtype)


_IMPLEMENTATIONS = {"torch": _scan_torch, "reference": _scan_reference, "mamba_ssm": _scan_mamba_ssm}


def selective_scan(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor] = None,
                   z: Optional[Tensor] = None, delta_bias: Optional[Tensor] = None,
                   delta_softplus: bool = False, backend: str = "auto") -> Tensor:
    """Run the selective scan with mamba-ssm's argument convention (see the module docstring)."""
    if u.dim() != 3 or delta.shape != u.shape:
        raise ValueError(f"u and delta must both be (batch, channels, length); got {tuple(u.shape)} "
                         f"and {tuple(delta.shape)}")
    if A.shape[0] != u.shape[1]:
        raise ValueError(f"A has {A.shape[0]} channels but u has {u.shape[1]}")
    impl = _IMPLEMENTATIONS[resolve_backend(backend, u.device)]
    return impl(u, delta, A, B, C, D, z, delta_bias, delta_softplus)


def selective_scan_flops(batch: int, length: int, channels: int, d_state: int, with_D: bool = True,
                         with_z: bool = False) -> int:
    """FLOPs of one scan as the official VMamba/Mamba repos count them: 9*B*L*D*N (+B*D*L per D, z)."""
    return batch * length * channels * (9 * d_state + int(with_D) + int(with_z))
