"""A CPU stand-in for mamba-ssm's compiled ``selective_scan_cuda`` extension, for tests only.

mamba-ssm's ``SelectiveScanFn`` calls ``selective_scan_cuda.fwd`` and ``.bwd``; with this module in
``sys.modules`` under that name, its Python code -- and our wrapper around it -- runs on CPU. Written
from the recurrence (not from the CUDA kernel), with the extension's contract as mamba-ssm 2.3.1's
``csrc/selective_scan/selective_scan.cpp`` defines it:

``fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus) -> [out, x] (+ [out_z] with z)``
    ``out``: y = C h + D u before the gate, in the input dtype; ``x``: (batch, dim, n_chunks,
    2 * dstate) float32, for every chunk of ``CHUNK_LEN`` tokens the pair (product of all decays
    from the first token, state) at its last token, interleaved -- ``x[..., 1::2]`` of the last
    chunk is the final state; ``out_z``: out * silu(z).
``bwd(u, delta, A, B, C, D, z, delta_bias, dout, x, out, dz, delta_softplus, recompute_out_z)``
    ``-> [du, ddelta, dA, dB, dC, dD, ddelta_bias]`` (+ ``[dz]`` with z, + ``[out_z]`` when
    recomputed); dD / ddelta_bias are None without D / delta_bias; ``out`` (pre-gate) is required
    with z; backward starts each chunk from the state saved in ``x``.

Every argument check of the extension is enforced (dtypes, shapes, last-dim strides, ``x`` present
and contiguous), except that CPU tensors are accepted, plus one the kernel lacks (it would silently
misread channels not divisible by the B/C groups). Constant (2-D) B/C and complex A, which mambalab
never passes, are refused. Computation is float32 (as the kernel's), sequential over time. ``calls``
records what each call received, for tests that check what was passed.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

CHUNK_LEN = 2048
"""Tokens per chunk: the extension allocates ceil(seqlen / 2048) chunk states."""
INPUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

calls: list[tuple[str, dict]] = []
"""(``"fwd"`` or ``"bwd"``, {argument: (shape, dtype, stride) or value}) for every call, in order."""


def _record(kind: str, **arguments: object) -> None:
    calls.append((kind, {name: (tuple(v.shape), v.dtype, v.stride()) if isinstance(v, Tensor) else v
                         for name, v in arguments.items()}))


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise RuntimeError(f"selective_scan_cuda stand-in: {message}")


def _check_last_dim(name: str, t: Tensor) -> None:
    _require(t.stride(-1) == 1 or t.size(-1) == 1, f"{name} must be contiguous in its last dim, strides {t.stride()}")


def _check_inputs(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
                  z: Optional[Tensor], delta_bias: Optional[Tensor]) -> int:
    """The extension's checks of the forward arguments; returns the number of B/C groups."""
    _require(u.dtype in INPUT_DTYPES, f"u must be float32/float16/bfloat16, got {u.dtype}")
    _require(A.dtype == torch.float32, f"A must be float32, got {A.dtype}")
    _require(delta.dtype == u.dtype, f"delta must have u's dtype {u.dtype}, got {delta.dtype}")
    batch, dim, seqlen = u.shape
    dstate = A.shape[1]
    _require(dstate <= 256, "dstate must be <= 256")
    _require(tuple(delta.shape) == (batch, dim, seqlen), f"delta shape {tuple(delta.shape)}")
    _require(tuple(A.shape) == (dim, dstate), f"A shape {tuple(A.shape)}")
    _check_last_dim("u", u)
    _check_last_dim("delta", delta)
    groups = B.shape[1] if B.dim() == 4 else 0
    for name, t in (("B", B), ("C", C)):
        _require(t.dim() == 4, f"{name} must be (batch, groups, dstate, seqlen) (SelectiveScanFn adds the group "
                               f"dim to 3-D input), got {tuple(t.shape)}")
        _require(tuple(t.shape) == (batch, groups, dstate, seqlen), f"{name} shape {tuple(t.shape)}")
        _require(t.dtype == u.dtype, f"{name} must have u's dtype {u.dtype}, got {t.dtype}")
        _check_last_dim(name, t)
    _require(dim % groups == 0, f"{dim} channels do not split into {groups} B/C groups")
    for name, t in (("D", D), ("delta_bias", delta_bias)):
        if t is not None:
            _require(t.dtype == torch.float32, f"{name} must be float32, got {t.dtype}")
            _require(tuple(t.shape) == (dim,), f"{name} shape {tuple(t.shape)}")
            _check_last_dim(name, t)
    if z is not None:
        _require(z.dtype == u.dtype and tuple(z.shape) == (batch, dim, seqlen), f"z {z.dtype} {tuple(z.shape)}")
        _check_last_dim("z", z)
    return groups


def _per_channel(BC: Tensor, dim: int) -> Tensor:
    """(batch, groups, dstate, seqlen) -> float32 (batch, dim, dstate, seqlen): channel d reads group d // (dim / g)."""
    return BC.float().repeat_interleave(dim // BC.shape[1], dim=1)


def _per_group(grad: Tensor, groups: int) -> Tensor:
    """Sum a per-channel (batch, dim, dstate, seqlen) gradient over each group's channels."""
    batch, dim, dstate, seqlen = grad.shape
    return grad.view(batch, groups, dim // groups, dstate, seqlen).sum(2)


def _step_sizes(delta: Tensor, delta_bias: Optional[Tensor], softplus: bool) -> tuple[Tensor, Tensor]:
    """(dt, d dt / d delta) in float32."""
    pre = delta.float() + (0.0 if delta_bias is None else delta_bias[:, None])
    if not softplus:
        return pre, torch.ones_like(pre)
    return F.softplus(pre), torch.sigmoid(pre)


def fwd(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor], z: Optional[Tensor],
        delta_bias: Optional[Tensor], delta_softplus: bool) -> list[Tensor]:
    _record("fwd", u=u, delta=delta, A=A, B=B, C=C, D=D, z=z, delta_bias=delta_bias, delta_softplus=delta_softplus)
    _check_inputs(u, delta, A, B, C, D, z, delta_bias)
    batch, dim, seqlen = u.shape
    dstate = A.shape[1]
    dt, _ = _step_sizes(delta, delta_bias, delta_softplus)
    uf, Bf, Cf = u.float(), _per_channel(B, dim), _per_channel(C, dim)
    x = torch.empty(batch, dim, math.ceil(seqlen / CHUNK_LEN), 2 * dstate)
    y = torch.empty(batch, dim, seqlen)
    h, decay_product = torch.zeros(batch, dim, dstate), torch.ones(batch, dim, dstate)
    for t in range(seqlen):
        decay = torch.exp(dt[:, :, t, None] * A)
        h = decay * h + (dt[:, :, t] * uf[:, :, t])[..., None] * Bf[..., t]
        decay_product = decay_product * decay
        y[:, :, t] = (h * Cf[..., t]).sum(-1)
        if t % CHUNK_LEN == CHUNK_LEN - 1 or t == seqlen - 1:
            x[:, :, t // CHUNK_LEN, 0::2] = decay_product
            x[:, :, t // CHUNK_LEN, 1::2] = h
    if D is not None:
        y = y + D[:, None] * uf
    result = [y.to(u.dtype), x]
    if z is not None:
        result.append((y * F.silu(z.float())).to(u.dtype))
    return result


def bwd(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor], z: Optional[Tensor],
        delta_bias: Optional[Tensor], dout: Tensor, x: Optional[Tensor], out: Optional[Tensor], dz: Optional[Tensor],
        delta_softplus: bool, recompute_out_z: bool) -> list[Optional[Tensor]]:
    _record("bwd", u=u, delta=delta, A=A, B=B, C=C, D=D, z=z, delta_bias=delta_bias, dout=dout, x=x, out=out, dz=dz,
            delta_softplus=delta_softplus, recompute_out_z=recompute_out_z)
    groups = _check_inputs(u, delta, A, B, C, D, z, delta_bias)
    batch, dim, seqlen = u.shape
    dstate = A.shape[1]
    n_chunks = math.ceil(seqlen / CHUNK_LEN)
    _require(dout.dtype == u.dtype and tuple(dout.shape) == (batch, dim, seqlen), f"dout {dout.dtype} {dout.shape}")
    _check_last_dim("dout", dout)
    _require(x is not None or n_chunks == 1, "x (the forward's chunk states) is required for more than one chunk")
    if x is not None:
        _require(x.dtype == torch.float32 and x.is_contiguous(), "x must be contiguous float32")
        _require(tuple(x.shape) == (batch, dim, n_chunks, 2 * dstate), f"x shape {tuple(x.shape)}")
    dt, dt_ddelta = _step_sizes(delta, delta_bias, delta_softplus)
    uf, Bf, Cf = u.float(), _per_channel(B, dim), _per_channel(C, dim)
    gy = dout.float()
    extra = []
    if z is not None:
        _require(out is not None and out.dtype == u.dtype and tuple(out.shape) == (batch, dim, seqlen),
                 "out (the forward's output before the gate) is required with z")
        zf, pre_gate = z.float(), out.float()
        sig = torch.sigmoid(zf)
        dz_value = (gy * pre_gate * sig * (1 + zf * (1 - sig))).to(z.dtype)
        dz = dz_value if dz is None else dz.copy_(dz_value)
        extra.append(dz)
        if recompute_out_z:
            extra.append((pre_gate * F.silu(zf)).to(u.dtype))
        gy = gy * F.silu(zf)
    du = torch.zeros(batch, dim, seqlen) if D is None else gy * D[:, None]
    ddt = torch.zeros(batch, dim, seqlen)
    dA = torch.zeros(dim, dstate)
    dB, dC = torch.zeros(batch, dim, dstate, seqlen), torch.zeros(batch, dim, dstate, seqlen)
    adjoint_carry = torch.zeros(batch, dim, dstate)  # decay_{t+1} * dL/dh_{t+1}
    for chunk in reversed(range(n_chunks)):
        t0, t1 = chunk * CHUNK_LEN, min(seqlen, (chunk + 1) * CHUNK_LEN)
        h = torch.zeros(batch, dim, dstate) if chunk == 0 else x[:, :, chunk - 1, 1::2].clone()
        states, decays = [h], []
        for t in range(t0, t1):
            decays.append(torch.exp(dt[:, :, t, None] * A))
            states.append(decays[-1] * states[-1] + (dt[:, :, t] * uf[:, :, t])[..., None] * Bf[..., t])
        for i in reversed(range(t1 - t0)):
            t = t0 + i
            h_prev, h_t, decay = states[i], states[i + 1], decays[i]
            adjoint = adjoint_carry + Cf[..., t] * gy[:, :, t, None]
            dC[..., t] = h_t * gy[:, :, t, None]
            dB[..., t] = adjoint * (dt[:, :, t] * uf[:, :, t])[..., None]
            d_decay = adjoint * h_prev * decay  # d/d(dt*A) of the decay term
            dA += (d_decay * dt[:, :, t, None]).sum(0)
            ddt[:, :, t] = (d_decay * A + adjoint * Bf[..., t] * uf[:, :, t, None]).sum(-1)
            du[:, :, t] += (adjoint * Bf[..., t]).sum(-1) * dt[:, :, t]
            adjoint_carry = decay * adjoint
    ddelta = ddt * dt_ddelta
    dD = None if D is None else (gy * uf).sum((0, 2))
    ddelta_bias = None if delta_bias is None else ddelta.sum((0, 2))
    return [du.to(u.dtype), ddelta.to(delta.dtype), dA, _per_group(dB, groups).to(B.dtype),
            _per_group(dC, groups).to(C.dtype), dD, ddelta_bias, *extra]
