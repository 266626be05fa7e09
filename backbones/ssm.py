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

- ``torch``: pure PyTorch. In eager mode the chunked scan (``scan_chunked``): a hand-written
  ``autograd.Function`` that keeps only its inputs and one state per chunk and recomputes the rest in
  backward, so memory stays bounded for any length. While ``torch.compile``/``torch.export``/ONNX
  trace the model it is the log-depth odd/even scan (``scan_oddeven``), which is made of plain
  tensor ops only (no data-dependent control flow, so no graph breaks).
- ``reference``: a plain sequential loop over time (``scan_sequential``); slow, a readable cross-check.
- ``mamba_ssm``: mamba-ssm's CUDA kernel, wrapped as the ``torch.library`` custom op
  ``mambalab::selective_scan_cuda`` (with a fake implementation, so compile/export can trace it);
  only for CUDA tensors and only when the package imports.
- ``fused``: our fused CPU kernel (``backbones.kernel``, custom op ``mambalab::selective_scan_cpu``),
  forward and backward; only for CPU tensors and only once built (``python -m backbones.kernel build``,
  which ``make install`` runs where a C++ compiler exists). float64 inputs take the ``torch`` path.
- ``auto``: ``mamba_ssm`` for CUDA tensors when it is usable; ``fused`` for CPU tensors when it is built
  (except while ``torch.onnx.export`` traces: ONNX has no such op); else ``torch``.

Choosing and observing the scan for a region of code (both thread-local, like ``torch.no_grad``):

- ``with use_backend("reference"): ...`` runs every scan requested as ``auto`` with that backend (or
  with a given function of the scan's signature). A backend configured explicitly -- a module's
  ``scan_backend="torch"``, a direct ``selective_scan(..., backend="torch")`` -- always wins: the region
  only decides what ``auto`` means, so a deliberate choice is never overridden silently.
- ``with observe(callback): ...`` calls ``callback(ScanCall)`` after every eager scan call with the
  backend that ran, the shapes, dtype, device and the call's wall-clock time.

Pruned sequences (token pruning, Zhan et al., NeurIPS 2024, arXiv:2409.18962): ``positions`` (the paper's
"position map") gives each token's index in the unpruned sequence. The scan then keeps the hidden state
aligned with the unpruned one by letting every pruned position between two kept tokens still decay the
state, with the step size of the kept token before it and no input (see ``aligned_inputs``). Every
backend runs aligned calls. ``aligned_inputs`` is the rule: an exact reparametrisation of (u, delta)
applied before dispatch, so a backend's own forward/backward (chunked torch, mamba-ssm) is reused and
autograd differentiates the reparametrisation. The fused CPU kernel is a second implementation of the same
recurrence: it takes each step's gap itself (``position_gaps``) and adds the skipped positions' decay
inside the scan, forward and backward, with no extra pass over the tensors.

Precision policy: whatever the input dtype, delta, exp(delta * A), the state and the accumulation are
at least float32 (float64 inputs stay float64, so gradcheck is exact); the output is returned in the
dtype of ``u``.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
import time
from typing import Callable, Iterator, NamedTuple, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from . import kernel as fused_kernel

BACKENDS = ("auto", "torch", "reference", "mamba_ssm", "fused")

CHUNK_LEN = 64
"""Tokens per chunk of the chunked scan: long enough to amortise the per-chunk work, short enough
that a chunk's summed log-decay rarely needs the exact fallback."""
BLOCK_ELEMENTS = 1 << 20
"""Elements per temporary of the chunked scan on CPU (4 MiB in fp32): chunks are processed in blocks
of about this size so temporaries stay cache-friendly and below glibc's mmap threshold. Accelerators
use 64x larger blocks (fewer kernel launches)."""
LOG_DECAY_LIMIT = 120.0
"""Largest |sum of A*delta| over a chunk for which the rescaled cumulative-sum form is used; rows
beyond it (e^60 away from fp32 overflow with the midpoint offset) take the exact odd/even scan."""


MAMBA_SSM_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
"""Input dtypes mamba-ssm's kernel runs (it has no float64 path)."""

_mamba_ssm_on_cpu = False
"""Set only inside ``mamba_ssm_on_cpu_for_tests``."""


@functools.lru_cache(maxsize=1)
def mamba_ssm_status() -> tuple[Optional[type], str]:
    """Import mamba-ssm's CUDA selective scan once; return (its autograd.Function or None, reason)."""
    if not torch.cuda.is_available() and not _mamba_ssm_on_cpu:
        return None, "no CUDA device is visible to torch"
    try:
        from mamba_ssm.ops.selective_scan_interface import SelectiveScanFn
    except ImportError as err:
        if err.name == "selective_scan_cuda":
            return None, ("mamba-ssm is installed without its compiled CUDA extension (as `make` installs it for the "
                          "CPU tests); build it on a CUDA machine with `pip install --force-reinstall --no-deps "
                          "--no-build-isolation mamba-ssm==2.3.1`")
        return None, f"mamba-ssm is not importable ({err}); install the 'cuda' extra on a CUDA machine"
    return SelectiveScanFn, "available"


@contextlib.contextmanager
def mamba_ssm_on_cpu_for_tests() -> Iterator[None]:
    """Test hook: let a forced ``mamba_ssm`` backend run on CPU tensors, to test its plumbing without a GPU.

    mamba-ssm's Python code (``SelectiveScanFn``) then runs as it would on a GPU and calls whatever
    module is imported as its compiled ``selective_scan_cuda`` extension -- in the tests, a CPU
    stand-in placed in ``sys.modules``. Normal use never needs this; ``auto`` still picks ``torch``
    for CPU tensors inside it.
    """
    global _mamba_ssm_on_cpu
    previous, _mamba_ssm_on_cpu = _mamba_ssm_on_cpu, True
    reset_backend_cache()
    try:
        yield
    finally:
        _mamba_ssm_on_cpu = previous
        reset_backend_cache()


def resolve_backend(backend: str, device: torch.device, dtype: Optional[torch.dtype] = None) -> str:
    """Turn ``auto`` into a concrete backend and check that a forced one can run here.

    ``dtype``: the inputs' dtype where known (mamba-ssm's kernel has no float64 path, so ``auto``
    does not pick it for float64 inputs and forcing it raises).
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown scan backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "auto":
        if device.type == "cuda":
            kernel_runs = dtype in (None, *MAMBA_SSM_DTYPES)
            return "mamba_ssm" if kernel_runs and mamba_ssm_status()[0] is not None else "torch"
        if (device.type == "cpu" and dtype != torch.float64 and fused_kernel.available()
                and not torch.onnx.is_in_onnx_export()):
            return "fused"
        return "torch"
    if backend == "fused":
        if not fused_kernel.available():
            raise RuntimeError(f"scan backend 'fused' was requested but cannot run: {fused_kernel.status().reason}")
        if device.type != "cpu":
            raise RuntimeError(f"scan backend 'fused' needs CPU tensors, got tensors on {device}")
    if backend == "mamba_ssm":
        kernel, reason = mamba_ssm_status()
        if kernel is None:
            raise RuntimeError(f"scan backend 'mamba_ssm' was requested but cannot run: {reason}")
        if device.type != "cuda" and not _mamba_ssm_on_cpu:
            raise RuntimeError(f"scan backend 'mamba_ssm' needs CUDA tensors, got tensors on {device}")
        if dtype is not None:
            _require_mamba_ssm_dtype(dtype)
    return backend


def _require_mamba_ssm_dtype(dtype: torch.dtype) -> None:
    if dtype not in MAMBA_SSM_DTYPES:
        raise RuntimeError(f"scan backend 'mamba_ssm' runs float32, float16 and bfloat16 inputs, got {dtype}; "
                           "use 'torch' or 'reference'")


_resolutions: dict[tuple[str, torch.device, Optional[torch.dtype], bool], str] = {}


@torch.compiler.assume_constant_result
def _resolve_cached(backend: str, device: torch.device, dtype: Optional[torch.dtype]) -> str:
    """``resolve_backend`` memoised: what can run does not change during a run (tracers take the
    answer as a constant instead of tracing the import checks)."""
    key = (backend, device, dtype, fused_kernel.available())  # hiding or loading the kernel changes the answer
    if key not in _resolutions:
        _resolutions[key] = resolve_backend(backend, device, dtype)
    return _resolutions[key]


def reset_backend_cache() -> None:
    """Forget cached backend resolutions and mamba-ssm's import status (after installing or hiding a backend)."""
    mamba_ssm_status.cache_clear()
    _resolutions.clear()


def compute_dtype(u: Tensor) -> torch.dtype:
    """The dtype the scan accumulates in: float32, or float64 for float64 inputs."""
    return torch.promote_types(u.dtype, torch.float32)


def is_tracing(x: Tensor) -> bool:
    """True while torch.compile, torch.export, ONNX or jit tracing runs, or for meta tensors:
    the places where only data-independent tensor code may run."""
    return (torch.compiler.is_compiling() or torch.compiler.is_exporting() or torch.jit.is_tracing()
            or x.device.type == "meta")


# ----------------------------------------------------------------------------- shared pieces

def _expand_groups(BC: Tensor, channels: int) -> Tensor:
    """(b, n, l) or (b, g, n, l) -> (b, channels, n, l) as a broadcast view where possible."""
    if BC.dim() == 3:
        return BC.unsqueeze(1).expand(-1, channels, -1, -1)
    b, g, n, l = BC.shape
    if channels % g:
        raise ValueError(f"{channels} channels cannot be split into {g} groups of B/C")
    return BC.unsqueeze(2).expand(b, g, channels // g, n, l).reshape(b, channels, n, l)


def _step_size(delta: Tensor, delta_bias: Optional[Tensor], delta_softplus: bool, dtype: torch.dtype) -> Tensor:
    """delta (+ bias) (then softplus), in the compute dtype."""
    delta = delta.to(dtype)
    if delta_bias is not None:
        delta = delta + delta_bias.to(dtype)[:, None]
    return F.softplus(delta) if delta_softplus else delta


def _finish(y: Tensor, u: Tensor, D: Optional[Tensor], z: Optional[Tensor], out_dtype: torch.dtype) -> Tensor:
    """Add the skip D*u, gate by silu(z), return in ``out_dtype``."""
    if D is not None:
        y = y + D.to(y.dtype)[:, None] * u
    if z is not None:
        y = y * F.silu(z.to(y.dtype))
    return y.to(out_dtype)


def _discretize(u: Tensor, dt: Tensor, A: Tensor, B: Tensor) -> tuple[Tensor, Tensor]:
    """Per-step decay exp(dt*A) and input dt*B*u, both materialised as (b, d, n, l)."""
    decay = torch.exp(dt.unsqueeze(2) * A[None, :, :, None])
    drive = (dt * u).unsqueeze(2) * _expand_groups(B, u.shape[1])
    return decay, drive


def _readout(states: Tensor, C: Tensor) -> Tensor:
    """sum_n C * h over the state axis: (b, d, n, l) -> (b, d, l)."""
    return (states * _expand_groups(C, states.shape[1])).sum(2)


def linear_recurrence(decay: Tensor, drive: Tensor) -> Tensor:
    """All states of ``h_t = decay_t * h_{t-1} + drive_t`` (h_{-1} = 0) along the last dim.

    Odd/even (pairwise) parallel scan: adjacent steps are fused into one step with decay
    ``a2 * a1`` and drive ``a2 * b1 + b2``, the half-length problem is solved recursively, and the
    even positions are filled in from their odd neighbours. Depth is log2(L), total work ~2L, and
    since it only multiplies decays in (0, 1] it cannot overflow, whatever |A * delta| is.
    """
    length = decay.shape[-1]
    # h_0 = drive_0 (meta tensors carry only shapes); `+ 0 * decay` keeps decay (hence A) in the autograd graph
    if length == 1 or drive.device.type == "meta":
        return drive + 0.0 * decay
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


# ----------------------------------------------------------------------------- chunked scan
#
# Internal layout: "rows" r = (batch, group) pairs, each with Dg = channels // groups channels that
# share one B/C row. u, delta, z: (R, Dg, L); B, C: (R, N, L); A: (R, Dg, N); D, delta_bias: (R, Dg).
# A block of tokens is viewed as nc chunks of q tokens: per-channel tensors are (r, Dg, nc, q), state
# tensors (r, Dg, N, nc, q), with B/C broadcast over channels as (r, 1, N, nc, q). Inputs are cast to
# the compute dtype block by block, and the skip (D), gate (z) and step-size bias/softplus are fused
# into the blocks, so no full-length temporaries are allocated besides the outputs.
#
# Within a chunk, with cum_t = A * sum_{s<=t} dt_s (<= 0) and m = cum_last / 2:
#     h_t = exp(cum_t - m) * sum_{s<=t} exp(m - cum_s) x_s + exp(cum_t) * h_start
# (x = dt*u*B). Both exponentials stay within exp(+-|cum_last|/2), so the form is exact in fp32 as
# long as |cum_last| <= LOG_DECAY_LIMIT; rows beyond it take linear_recurrence, which never divides.
# The adjoint G_t = dL/dh_t obeys the mirrored recurrence G_t = C_t gy_t + a_{t+1} G_{t+1} and is
# computed the same way backwards; chunk-start states / chunk-end adjoints are carried across chunks
# with linear_recurrence on (r, Dg, N, nc) tensors.


class _Rows(NamedTuple):
    """The scan's inputs in row layout (see above); D, z and delta_bias may be None."""

    u: Tensor
    delta: Tensor
    A: Tensor
    B: Tensor
    C: Tensor
    D: Optional[Tensor]
    z: Optional[Tensor]
    delta_bias: Optional[Tensor]


class _Block(NamedTuple):
    """One block of rows r0:r1 and tokens t0:t1 in chunks of q, cast to the compute dtype."""

    u: Tensor  # (r, Dg, nc, q)
    dt: Tensor  # step size: softplus(delta + bias), or delta + bias
    B: Tensor  # (r, 1, N, nc, q)
    C: Tensor
    A: Tensor  # (r, Dg, N, 1, 1)
    D: Optional[Tensor]  # (r, Dg, 1, 1)
    z: Optional[Tensor]


def _plan(rows: int, channels: int, d_state: int, length: int, chunk_len: int,
          block_elements: int) -> tuple[list[tuple[int, int]], list[tuple[int, int, int]]]:
    """Split rows into slabs and tokens into blocks of whole chunks (plus one shorter final chunk)."""
    q = max(1, min(chunk_len, length))
    slab = max(1, min(rows, block_elements // (channels * d_state * q)))
    tokens = max(q, block_elements // (slab * channels * d_state) // q * q)
    slabs = [(r0, min(rows, r0 + slab)) for r0 in range(0, rows, slab)]
    full = length // q * q
    blocks = [(t0, min(full, t0 + tokens), q) for t0 in range(0, full, tokens)]
    if full < length:
        blocks.append((full, length, length - full))
    return slabs, blocks


def _chunks(t: Tensor, r0: int, r1: int, t0: int, t1: int, q: int) -> Tensor:
    """Rows r0:r1, tokens t0:t1 of an (R, X, L) tensor as an (r, X, nc, q) view."""
    return t[r0:r1, :, t0:t1].unflatten(-1, ((t1 - t0) // q, q))


def _block(x: _Rows, r0: int, r1: int, t0: int, t1: int, q: int, softplus: bool, dtype: torch.dtype,
           delta_is_dt: bool = False) -> _Block:
    """The block's inputs in the compute dtype; ``delta_is_dt``: x.delta already holds the step size."""
    dt = _chunks(x.delta, r0, r1, t0, t1, q).to(dtype)
    if not delta_is_dt:
        if x.delta_bias is not None:
            dt = dt + x.delta_bias[r0:r1, :, None, None]
        if softplus:
            dt = F.softplus(dt)
    return _Block(
        u=_chunks(x.u, r0, r1, t0, t1, q).to(dtype), dt=dt,
        B=_chunks(x.B, r0, r1, t0, t1, q).to(dtype).unsqueeze(1),
        C=_chunks(x.C, r0, r1, t0, t1, q).to(dtype).unsqueeze(1), A=x.A[r0:r1, :, :, None, None],
        D=None if x.D is None else x.D[r0:r1, :, None, None],
        z=None if x.z is None else _chunks(x.z, r0, r1, t0, t1, q).to(dtype))


def _sum(t: Tensor, dim: int) -> Tensor:
    """Sum over ``dim``, as a free squeeze when it has size 1 (d_state 1)."""
    return t.squeeze(dim) if t.shape[dim] == 1 else t.sum(dim)


def _cumsum(t: Tensor) -> Tensor:
    """Cumulative sum over the last dim; on a 2-D view, which torch's CPU kernel runs ~2x faster."""
    return t.reshape(-1, t.shape[-1]).cumsum(-1).view(t.shape)


def _local_states(cdt: Tensor, A5: Tensor, dt: Tensor, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Optional[tuple]]:
    """States of every chunk started from zero, and the chunk's rescaling factors.

    Returns (h, w, em, exact) with w = exp(m - cum) and em = exp(m), so that em / w = exp(cum) and
    em * w = exp(cum_last - cum). Rows whose |cum_last| is over the limit get exact local states from
    linear_recurrence, w = 1 and em = 0 (their carry terms vanish in the shared code), and are
    returned as ``exact = (mask, cum)`` for the caller to add their carries.
    """
    half = 0.5 * cdt[..., -1:]
    log_em = A5 * half
    w = torch.addcmul(log_em, A5, cdt, value=-1.0).exp_()
    h = _cumsum(w * x).div_(w)
    bad = log_em[..., 0] < -0.5 * LOG_DECAY_LIMIT
    exact = None
    if bad.any():
        dA = (dt * A5).expand_as(x)[bad]
        h[bad] = linear_recurrence(dA.exp(), x[bad])
        w[bad] = 1.0
        log_em[bad] = -math.inf
        exact = (bad, dA.cumsum(-1))
    return h, w, log_em.exp_(), exact


def _carry_forward(decay: Tensor, drive: Tensor, start: Tensor) -> Tensor:
    """Chunk-start states: s_0 = start, s_c = decay_{c-1} s_{c-1} + drive_{c-1}; (..., nc) tensors."""
    if decay.shape[-1] == 1:
        return start.unsqueeze(-1)
    drive = drive[..., :-1].clone()
    drive[..., 0] += decay[..., 0] * start
    return torch.cat((start.unsqueeze(-1), linear_recurrence(decay[..., :-1], drive)), -1)


def _carry_backward(decay: Tensor, drive: Tensor, end: Tensor) -> Tensor:
    """Chunk-end adjoints: e_last = end, e_c = decay_{c+1} e_{c+1} + drive_{c+1}; (..., nc) tensors."""
    if decay.shape[-1] == 1:
        return end.unsqueeze(-1)
    decay, drive = decay[..., 1:].flip(-1), drive[..., 1:].flip(-1)
    drive[..., 0] += decay[..., 0] * end
    return torch.cat((linear_recurrence(decay, drive).flip(-1), end.unsqueeze(-1)), -1)


class _States(NamedTuple):
    h: Tensor  # all states of the block, (r, Dg, N, nc, q)
    x: Tensor  # dt * u * B
    dtu: Tensor  # dt * u, (r, Dg, 1, nc, q)
    cdt: Tensor  # within-chunk cumulative dt
    chunk_start: Tensor  # (r, Dg, N, nc)
    w: Tensor
    em: Tensor
    exact: Optional[tuple]


def _block_states(b: _Block, start: Optional[Tensor], chunk_start: Optional[Tensor] = None) -> _States:
    """All states of a block, from the state before it (forward) or from saved chunk starts (backward)."""
    dt5 = b.dt.unsqueeze(2)
    cdt = _cumsum(dt5)
    dtu = dt5 * b.u.unsqueeze(2)
    x = dtu * b.B
    h, w, em, exact = _local_states(cdt, b.A, dt5, x)
    if chunk_start is None:
        chunk_start = _carry_forward(torch.exp(b.A[..., 0] * cdt[..., -1]), h[..., -1], start)
    h.addcdiv_(em * chunk_start.unsqueeze(-1), w)
    if exact is not None:
        bad, cum = exact
        h[bad] += torch.exp(cum) * chunk_start[bad].unsqueeze(-1)
    return _States(h, x, dtu, cdt, chunk_start, w, em, exact)


def _into(target: Tensor, dtype: torch.dtype) -> Optional[Tensor]:
    """``target`` as an ``out=`` argument when it has the compute dtype, else None (copy afterwards)."""
    return target if target.dtype == dtype else None


def _readout_block(h: Tensor, C: Tensor, out: Optional[Tensor]) -> Tensor:
    """sum_n C * h -> (r, Dg, nc, q), written into ``out`` when given."""
    if h.shape[2] == 1:
        return torch.mul(h[:, :, 0], C[:, :, 0], out=out)
    return torch.sum(h * C, 2, out=out)


def _chunked_forward(x: _Rows, softplus: bool, chunk_len: int, block_elements: int,
                     for_backward: bool) -> tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
    """The scan output (in the dtype of u); for backward also the state at the start of every chunk
    and the step sizes (saving them spares backward the softplus, the most expensive op per token)."""
    dtype = compute_dtype(x.u)
    rows, channels, length = x.u.shape
    d_state = x.B.shape[1]
    slabs, blocks = _plan(rows, channels, d_state, length, chunk_len, block_elements)
    q0 = blocks[0][2]
    y = torch.empty_like(x.u)
    starts = x.A.new_empty(rows, channels, d_state, -(-length // q0)) if for_backward else None
    steps = torch.empty(x.u.shape, dtype=dtype, device=x.u.device) if for_backward else None
    for r0, r1 in slabs:
        state = x.A.new_zeros(r1 - r0, channels, d_state)
        for t0, t1, q in blocks:
            b = _block(x, r0, r1, t0, t1, q, softplus, dtype)
            s = _block_states(b, state)
            state = s.h[..., -1, -1].clone()
            target = _chunks(y, r0, r1, t0, t1, q)
            out = _readout_block(s.h, b.C, _into(target, dtype))
            if b.D is not None:
                out.addcmul_(b.u, b.D)
            if b.z is not None:
                out.mul_(F.silu(b.z))
            if out is not target:
                target.copy_(out)
            if for_backward:
                starts[r0:r1, :, :, t0 // q0:t0 // q0 + s.chunk_start.shape[-1]] = s.chunk_start
                _chunks(steps, r0, r1, t0, t1, q).copy_(b.dt)
    return y, starts, steps


def _chunked_backward(gy: Tensor, x: _Rows, starts: Tensor, delta_dtype: torch.dtype, softplus: bool,
                      chunk_len: int, block_elements: int) -> list[Optional[Tensor]]:
    """Gradients of sum(gy * y) for every field of ``x`` (whose ``delta`` holds the saved step sizes),
    recomputing states chunk by chunk."""
    dtype = compute_dtype(x.u)
    rows, channels, length = x.u.shape
    d_state = x.B.shape[1]
    slabs, blocks = _plan(rows, channels, d_state, length, chunk_len, block_elements)
    q0 = blocks[0][2]
    du, dB, dC = (torch.empty_like(t) for t in (x.u, x.B, x.C))
    ddelta = torch.empty_like(x.delta, dtype=delta_dtype)
    dA = torch.zeros_like(x.A)
    dD = None if x.D is None else torch.zeros_like(x.D)
    dz = None if x.z is None else torch.empty_like(x.z)
    dbias = None if x.delta_bias is None else torch.zeros_like(x.delta_bias)

    for r0, r1 in slabs:
        lam = x.A.new_zeros(r1 - r0, channels, d_state)  # adjoint flowing into the block's last token
        for t0, t1, q in reversed(blocks):
            b = _block(x, r0, r1, t0, t1, q, softplus, dtype, delta_is_dt=True)
            nc = (t1 - t0) // q
            s = _block_states(b, None, starts[r0:r1, :, :, t0 // q0:t0 // q0 + nc])
            dt5 = b.dt.unsqueeze(2)
            out = {name: _chunks(t, r0, r1, t0, t1, q) for name, t in
                   (("u", du), ("delta", ddelta), ("B", dB), ("C", dC), ("z", dz)) if t is not None}
            g = _chunks(gy, r0, r1, t0, t1, q).to(dtype)
            if b.z is not None:
                pre = _readout_block(s.h, b.C, None)
                if b.D is not None:
                    pre.addcmul_(b.u, b.D)
                sig = torch.sigmoid(b.z)
                out["z"].copy_(g * pre * sig * (1 + b.z * (1 - sig)))
                g = g * b.z * sig
            g5 = g.unsqueeze(2)
            # adjoint within each chunk from zero at its end (G_t = sum_{s>=t} exp(cum_s - cum_t) C_s gy_s),
            # then the adjoint entering each chunk's last token from later chunks
            r = b.C * g5
            adj = _cumsum((r / s.w).flip(-1)).flip(-1).mul_(s.w)
            if s.exact is not None:
                bad, _ = s.exact
                next_decay = torch.exp(F.pad((dt5 * b.A)[..., 1:], (0, 1))).expand_as(s.x)
                adj[bad] = linear_recurrence(next_decay[bad].flip(-1), r.expand_as(s.x)[bad].flip(-1)).flip(-1)
            first_decay = torch.exp(b.A[..., 0] * dt5[..., 0])
            incoming = _carry_backward(torch.exp(b.A[..., 0] * s.cdt[..., -1]), first_decay * adj[..., 0], lam)
            adj.addcmul_(s.w, s.em * incoming.unsqueeze(-1))
            if s.exact is not None:
                bad, cum = s.exact
                adj[bad] += torch.exp(cum[..., -1:] - cum) * incoming[bad].unsqueeze(-1)
            lam = first_decay[..., 0] * adj[..., 0, 0]
            grads = {"C": torch.sum(g5 * s.h, 1, out=_into(out["C"], dtype)),
                     "B": torch.sum(adj * s.dtu, 1, out=_into(out["B"], dtype))}
            ddtu = _sum(adj * b.B, 2)
            # dL/d(dt*A) = G_t * a_t * h_{t-1}, formed directly: h_t - x_t would cancel under strong decay
            decay_grad = torch.mul(dt5, b.A).exp_().mul_(adj)
            decay_grad[..., 1:].mul_(s.h[..., :-1])
            decay_grad[..., 0].mul_(s.chunk_start)
            dA[r0:r1] += (decay_grad * dt5).sum((3, 4))
            ddt = _sum(decay_grad * b.A, 2).addcmul_(ddtu, b.u)
            grads["u"] = torch.mul(ddtu, b.dt, out=_into(out["u"], dtype))
            if b.D is not None:
                grads["u"].addcmul_(g, b.D)
                dD[r0:r1] += (g * b.u).sum((2, 3))
            if softplus:  # softplus' = sigmoid(delta + bias) = 1 - exp(-dt)
                ddt = torch.mul(ddt, torch.neg(b.dt).expm1_(), out=_into(out["delta"], dtype)).neg_()
            grads["delta"] = ddt
            if dbias is not None:
                dbias[r0:r1] += ddt.sum((2, 3))
            for name, value in grads.items():
                if value is not out[name]:
                    out[name].copy_(value)
    return [du, ddelta, dA, dB, dC, dD, dz, dbias]


class _ChunkedScan(torch.autograd.Function):
    """Row-layout chunked scan; saves the inputs and one state per chunk, recomputes in backward."""

    @staticmethod
    def forward(ctx, u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
                z: Optional[Tensor], delta_bias: Optional[Tensor], softplus: bool, chunk_len: int,
                block_elements: int) -> Tensor:
        x = _Rows(u, delta, A, B, C, D, z, delta_bias)
        y, starts, steps = _chunked_forward(x, softplus, chunk_len, block_elements, for_backward=True)
        ctx.save_for_backward(*x._replace(delta=steps), starts)
        ctx.options = (delta.dtype, softplus, chunk_len, block_elements)
        return y

    @staticmethod
    def backward(ctx, gy: Tensor):
        *x, starts = ctx.saved_tensors
        grads = _chunked_backward(gy, _Rows(*x), starts, *ctx.options)
        return (*grads, None, None, None)


def scan_chunked(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor] = None,
                 z: Optional[Tensor] = None, delta_bias: Optional[Tensor] = None, delta_softplus: bool = False,
                 chunk_len: int = CHUNK_LEN, block_elements: Optional[int] = None) -> Tensor:
    """The chunked scan with its hand-written backward (eager default of the ``torch`` backend).

    Memory: the inputs, one (batch, channels, d_state) state per chunk and ``block_elements``-sized
    temporaries; never the (batch, channels, d_state, length) state history.
    """
    dtype = compute_dtype(u)
    if block_elements is None:
        block_elements = BLOCK_ELEMENTS if u.device.type == "cpu" else 64 * BLOCK_ELEMENTS
    batch, channels, length = u.shape
    B, C = (t if t.dim() == 4 else t.unsqueeze(1) for t in (B, C))
    groups, d_state = B.shape[1], B.shape[2]
    if channels % groups:
        raise ValueError(f"{channels} channels cannot be split into {groups} groups of B/C")
    rows, per_group = batch * groups, channels // groups

    def per_row(t: Optional[Tensor], *shape: int) -> Optional[Tensor]:
        if t is None:
            return None
        return t.to(dtype).reshape(groups, per_group, *shape).repeat(batch, *[1] * (len(shape) + 1))

    x = _Rows(u.reshape(rows, per_group, length), delta.reshape(rows, per_group, length), per_row(A, d_state),
              B.reshape(rows, d_state, length), C.reshape(rows, d_state, length), per_row(D),
              None if z is None else z.reshape(rows, per_group, length), per_row(delta_bias))
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in x):
        y = _ChunkedScan.apply(*x, delta_softplus, chunk_len, block_elements)
    else:
        y = _chunked_forward(x, delta_softplus, chunk_len, block_elements, for_backward=False)[0]
    return y.reshape(batch, channels, length)


def scan_oddeven(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor] = None,
                 z: Optional[Tensor] = None, delta_bias: Optional[Tensor] = None,
                 delta_softplus: bool = False) -> Tensor:
    """The odd/even parallel scan over the whole sequence, differentiated by autograd.

    Plain tensor ops only, so it traces into one graph for torch.compile, torch.export and ONNX; it
    materialises the (batch, channels, d_state, length) history a few times over.
    """
    dtype = compute_dtype(u)
    uc = u.to(dtype)
    decay, drive = _discretize(uc, _step_size(delta, delta_bias, delta_softplus, dtype), A.to(dtype), B.to(dtype))
    return _finish(_readout(linear_recurrence(decay, drive), C.to(dtype)), uc, D, z, u.dtype)


def scan_sequential(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor] = None,
                    z: Optional[Tensor] = None, delta_bias: Optional[Tensor] = None,
                    delta_softplus: bool = False) -> Tensor:
    """A plain loop over time (``unbind``, so autograd's backward stays linear in length)."""
    dtype = compute_dtype(u)
    uc = u.to(dtype)
    decay, drive = _discretize(uc, _step_size(delta, delta_bias, delta_softplus, dtype), A.to(dtype), B.to(dtype))
    state = torch.zeros_like(drive[..., 0])
    states = []
    for decay_t, drive_t in zip(decay.unbind(-1), drive.unbind(-1)):
        state = decay_t * state + drive_t
        states.append(state)
    return _finish(_readout(torch.stack(states, dim=-1), C.to(dtype)), uc, D, z, u.dtype)


def position_gaps(positions: Tensor, groups: int) -> Tensor:
    """Pruned positions skipped before each token of the scan, (batch, groups or 1, 1, length), from ``positions``.

    ``positions``: (batch, length) or (batch, groups, length) indices of the tokens in the unpruned sequence,
    strictly monotonic along the scan (increasing for a forward scan, decreasing for a reversed one). The
    gap before token t is |p_t - p_{t-1}| - 1; before the first token it is 0 (the state starts at zero,
    so decaying it changes nothing).
    """
    if positions.dim() == 2:
        positions = positions.unsqueeze(1)
    if positions.dim() != 3 or positions.shape[1] not in (1, groups):
        raise ValueError(f"positions must be (batch, length) or (batch, {groups}, length); "
                         f"got {tuple(positions.shape)}")
    steps = (positions[..., 1:] - positions[..., :-1]).abs()
    if not is_tracing(positions) and bool((steps < 1).any()):
        raise ValueError("positions must be strictly monotonic along the scan (each token at its own unpruned index)")
    return F.pad(steps - 1, (1, 0)).unsqueeze(2)


def aligned_inputs(u: Tensor, delta: Tensor, delta_bias: Optional[Tensor], delta_softplus: bool,
                   gaps: Tensor) -> tuple[Tensor, Tensor]:
    """(u', delta') for which the plain scan runs the pruning-aware recurrence (no bias, no softplus left).

    The recurrence (Zhan et al., 2024, Sec. 4 "pruning-aware hidden state alignment": pruned tokens keep
    their place in the scan and carry the state of the previous unpruned token, so the remaining tokens
    see the position gap): with dt = softplus(delta + bias) and g_t pruned positions before kept token t,
    the g_t pruned positions decay the state with the previous kept token's step dt_{t-1} and add no input::

        h_t = exp(A (dt_t + g_t dt_{t-1})) h_{t-1} + dt_t B_t u_t

    The plain scan computes exp(A dt'_t) h_{t-1} + dt'_t B_t u'_t, so dt' = dt + g dt_{t-1} and
    u' = u dt / dt' reproduce it exactly (dt' >= dt > 0; where softplus underflows to dt = dt' = 0 the
    input term is 0 either way). ``gaps``: (batch, groups, 1, length) from ``position_gaps``. Assumption
    (the paper's text was not at hand): the skipped positions use the step of the kept token before them in
    scan order, as the authors' position-map kernel repeats the previous unpruned token's state.
    """
    dtype = compute_dtype(u)
    batch, channels, length = u.shape
    dt = _step_size(delta, delta_bias, delta_softplus, dtype).view(batch, gaps.shape[1], -1, length)
    aligned_dt = dt.clone()
    aligned_dt[..., 1:].addcmul_(gaps[..., 1:].to(dtype), dt[..., :-1])
    ratio = dt / aligned_dt.clamp_min(torch.finfo(dtype).tiny)
    return ratio.mul_(u.to(dtype).view_as(ratio)).view(u.shape), aligned_dt.view(u.shape)


def _scan_torch(u, delta, A, B, C, D, z, delta_bias, delta_softplus):
    formulation = scan_oddeven if is_tracing(u) else scan_chunked
    return formulation(u, delta, A, B, C, D, z, delta_bias, delta_softplus)


# ----------------------------------------------------------------------------- mamba-ssm CUDA kernel
#
# mamba-ssm's ``SelectiveScanFn`` is an autograd.Function around its CUDA extension. Its static
# forward/backward are called directly with a plain context object inside two torch.library custom
# ops (custom-op kernels run below autograd, so the Function cannot be ``apply``-ed there); the
# forward op gets its gradient from the backward op, and both have fake implementations so that
# torch.compile / torch.export trace them as single opaque nodes. The backward op reruns the forward
# kernel to rebuild the kernel's saved chunk states (one extra forward per backward); this uses only
# the Function's forward/backward contract, which has been stable across mamba-ssm releases, not the
# extension's raw signatures, which have not. Without a GPU the tests run this whole path with
# mamba-ssm's real Python code and a CPU stand-in for its extension (``mamba_ssm_on_cpu_for_tests``).


class _KernelContext:
    """Stands in for autograd's ``ctx`` when a Function's static forward/backward is called directly."""

    def save_for_backward(self, *tensors: Optional[Tensor]) -> None:
        self.saved_tensors = tensors


def _cuda_kernel() -> type:
    kernel, reason = mamba_ssm_status()
    if kernel is None:
        raise RuntimeError(f"scan backend 'mamba_ssm' cannot run: {reason}")
    return kernel


@torch.library.custom_op("mambalab::selective_scan_cuda", mutates_args=())
def selective_scan_cuda_op(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
                           z: Optional[Tensor], delta_bias: Optional[Tensor], delta_softplus: bool) -> Tensor:
    """mamba-ssm's selective scan as one opaque op that compile/export can trace through."""
    return _cuda_kernel().forward(_KernelContext(), u, delta, A, B, C, D, z, delta_bias, delta_softplus)


@selective_scan_cuda_op.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, delta_softplus):
    return torch.empty_like(u, memory_format=torch.contiguous_format)


@torch.library.custom_op("mambalab::selective_scan_cuda_backward", mutates_args=())
def selective_scan_cuda_backward_op(grad: Tensor, u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
                                    D: Optional[Tensor], z: Optional[Tensor], delta_bias: Optional[Tensor],
                                    delta_softplus: bool) -> list[Tensor]:
    """Gradients for the given (non-None) inputs, in argument order."""
    kernel, ctx = _cuda_kernel(), _KernelContext()
    kernel.forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    grads = kernel.backward(ctx, grad.contiguous())
    inputs = (u, delta, A, B, C, D, z, delta_bias)
    return [g.clone() if g is t else g for g, t in zip(grads, inputs) if t is not None]


@selective_scan_cuda_backward_op.register_fake
def _(grad, u, delta, A, B, C, D, z, delta_bias, delta_softplus):
    return [torch.empty_like(t) for t in (u, delta, A, B, C, D, z, delta_bias) if t is not None]


def _cuda_setup_context(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs[:8])
    ctx.delta_softplus = inputs[8]


def _cuda_backward(ctx, grad):
    saved = ctx.saved_tensors
    grads = iter(selective_scan_cuda_backward_op(grad, *saved, ctx.delta_softplus))
    return (*(next(grads) if t is not None else None for t in saved), None)


selective_scan_cuda_op.register_autograd(_cuda_backward, setup_context=_cuda_setup_context)


def _scan_mamba_ssm(u, delta, A, B, C, D, z, delta_bias, delta_softplus):
    """Bring the inputs to the kernel's contract: u, delta, B, C and z in one dtype (float32, float16 or
    bfloat16: the promoted one, so nothing is rounded down), A, D and delta_bias in float32, and
    delta_bias contiguous (``SelectiveScanFn`` makes the others contiguous, but not that one)."""
    io_dtype = functools.reduce(torch.promote_types, [t.dtype for t in (u, delta, B, C, z) if t is not None])
    _require_mamba_ssm_dtype(io_dtype)
    groups = 1 if B.dim() == 3 else B.shape[1]
    if u.shape[1] % groups:  # the kernel would read the wrong B/C rows rather than fail
        raise ValueError(f"{u.shape[1]} channels cannot be split into {groups} groups of B/C")
    out_dtype = u.dtype
    u, delta, B, C, z = (None if t is None else t.to(io_dtype) for t in (u, delta, B, C, z))
    out = selective_scan_cuda_op(u, delta, A.float(), B, C, None if D is None else D.float(), z,
                                 None if delta_bias is None else delta_bias.float().contiguous(), delta_softplus)
    return out.to(out_dtype)


# ----------------------------------------------------------------------------- fused CPU kernel


def _scan_fused(u, delta, A, B, C, D, z, delta_bias, delta_softplus):
    if u.dtype == torch.float64:  # the kernel computes in float32; float64 callers (gradcheck) want float64
        return _scan_torch(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    return fused_kernel.selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus)


def _scan_fused_aligned(u, delta, A, B, C, D, z, delta_bias, delta_softplus, gaps: Tensor) -> Tensor:
    """The aligned scan on the fused kernel, which takes the gaps (batch, groups or 1, 1, length) itself."""
    return fused_kernel.selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                                       gaps=gaps.squeeze(2).float())


def _takes_gaps(impl: ScanFunction, u: Tensor) -> bool:
    return impl is _scan_fused and u.dtype != torch.float64  # float64 runs on the torch path


# ----------------------------------------------------------------------------- public entry points

_IMPLEMENTATIONS = {"torch": _scan_torch, "reference": scan_sequential, "mamba_ssm": _scan_mamba_ssm,
                    "fused": _scan_fused}

ScanFunction = Callable[..., Tensor]
"""A scan with ``selective_scan``'s positional arguments (u, delta, A, B, C, D, z, delta_bias, delta_softplus)."""


class ScanCall(NamedTuple):
    """What an ``observe`` callback learns about one scan call."""

    backend: str  # the backend that ran, or the __name__ of a function given to use_backend
    batch: int
    channels: int
    length: int
    d_state: int
    groups: int  # B/C groups (1 for ungrouped B/C)
    with_D: bool
    with_z: bool
    dtype: torch.dtype  # of u
    device: torch.device
    seconds: float  # wall-clock time of the forward call (backward runs later, inside autograd)


_region_backend: contextvars.ContextVar[Union[str, ScanFunction, None]] = contextvars.ContextVar(
    "mambalab_scan_backend", default=None)
_observers: contextvars.ContextVar[tuple[tuple[Callable[[ScanCall], None], bool], ...]] = contextvars.ContextVar(
    "mambalab_scan_observers", default=())


@contextlib.contextmanager
def use_backend(backend: Union[str, ScanFunction]) -> Iterator[None]:
    """Run the scans requested as ``auto`` inside the block with ``backend``.

    ``backend`` is one of ``BACKENDS`` or a function with the scan's positional arguments (for
    measurements, e.g. a scan-free stub). Explicitly configured backends are left alone (see the
    module docstring); the innermost block wins; the setting is local to the current thread and
    context, like ``torch.no_grad``, and is restored however the block exits.
    """
    if not callable(backend) and backend not in BACKENDS:
        raise ValueError(f"unknown scan backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    token = _region_backend.set(backend)
    try:
        yield
    finally:
        _region_backend.reset(token)


@contextlib.contextmanager
def observe(callback: Callable[[ScanCall], None], synchronize: bool = False) -> Iterator[None]:
    """Call ``callback(ScanCall)`` after every scan call made inside the block (in this thread).

    ``synchronize``: wait for the device before and after each call, so that ``seconds`` is the
    scan's run time on CUDA rather than its launch time. Calls traced by torch.compile/export run
    inside the compiled graph and are not reported. Nested blocks all see each call.
    """
    token = _observers.set((*_observers.get(), (callback, synchronize)))
    try:
        yield
    finally:
        _observers.reset(token)


def _chosen(backend: str, u: Tensor) -> tuple[str, ScanFunction]:
    """(name, implementation) of the backend that runs a call requested as ``backend``."""
    if backend == "auto":
        region = _region_backend.get()
        if callable(region):
            return getattr(region, "__name__", "custom"), region
        backend = region or backend
    if torch.onnx.is_in_onnx_export():  # ONNX has no fused op: resolved afresh, never from the cache
        name = resolve_backend(backend, u.device, u.dtype)
    else:
        name = _resolve_cached(backend, u.device, u.dtype)
    return name, _IMPLEMENTATIONS[name]


def chosen_backend(backend: str, u: Tensor) -> str:
    """The backend a scan of ``u`` requested as ``backend`` runs on (the ``use_backend`` region applied), e.g.
    for modules that take the fused kernel's route-aware path only when the scan runs there."""
    return _chosen(backend, u)[0]


def native_aligned_scan(backend: str, u: Tensor) -> bool:
    """Whether an aligned scan of ``u`` requested as ``backend`` runs natively in the fused kernel (the gaps
    passed to it) rather than through ``aligned_inputs``' reparametrisation before the backend's plain scan."""
    return _takes_gaps(_chosen(backend, u)[1], u)


def observed(run: Callable[[], Tensor], call: ScanCall) -> Tensor:
    """``run()``, timed and reported to the ``observe`` callbacks as ``call`` (its ``seconds`` filled in) when
    any are active and nothing is being traced. For scan entry points other than ``selective_scan`` (the
    fused kernel's route-aware path), so that observers see every scan."""
    observers = _observers.get()
    tracing = (torch.compiler.is_compiling() or torch.compiler.is_exporting() or torch.jit.is_tracing()
               or call.device.type == "meta")
    if not observers or tracing:
        return run()
    sync = any(wait for _, wait in observers) and call.device.type == "cuda"
    if sync:
        torch.cuda.synchronize(call.device)
    start = time.perf_counter()
    out = run()
    if sync:
        torch.cuda.synchronize(call.device)
    call = call._replace(seconds=time.perf_counter() - start)
    for callback, _ in observers:
        callback(call)
    return out


def selective_scan(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor] = None,
                   z: Optional[Tensor] = None, delta_bias: Optional[Tensor] = None,
                   delta_softplus: bool = False, backend: str = "auto", positions: Optional[Tensor] = None) -> Tensor:
    """Run the selective scan with mamba-ssm's argument convention (see the module docstring).

    ``positions``: for a pruned sequence, each token's index in the unpruned one, (batch, length) or
    (batch, groups, length); the scan then runs the pruning-aware aligned recurrence (``aligned_inputs``; on
    the fused kernel natively, see ``native_aligned_scan``).
    """
    if u.dim() != 3 or delta.shape != u.shape:
        raise ValueError(f"u and delta must both be (batch, channels, length); got {tuple(u.shape)} "
                         f"and {tuple(delta.shape)}")
    if A.shape[0] != u.shape[1]:
        raise ValueError(f"A has {A.shape[0]} channels but u has {u.shape[1]}")
    name, impl = _chosen(backend, u)
    if positions is None:
        def run() -> Tensor:
            return impl(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    else:
        if positions.shape[-1] != u.shape[-1] or positions.shape[0] != u.shape[0]:
            raise ValueError(f"positions {tuple(positions.shape)} do not match u {tuple(u.shape)}")
        gaps = position_gaps(positions, 1 if B.dim() == 3 else B.shape[1])
        native = _takes_gaps(impl, u)

        def run() -> Tensor:
            if native:
                return _scan_fused_aligned(u, delta, A, B, C, D, z, delta_bias, delta_softplus, gaps)
            aligned_u, aligned_dt = aligned_inputs(u, delta, delta_bias, delta_softplus, gaps)
            y = impl(aligned_u, aligned_dt, A, B, C, None, None, None, False)
            return _finish(y, u.to(y.dtype), D, z, u.dtype)
    if not _observers.get():
        return run()
    call = ScanCall(name, u.shape[0], u.shape[1], u.shape[2], A.shape[1], 1 if B.dim() == 3 else B.shape[1],
                    D is not None, z is not None, u.dtype, u.device, 0.0)
    return observed(run, call)


def selective_scan_flops(batch: int, length: int, channels: int, d_state: int, with_D: bool = True,
                         with_z: bool = False) -> int:
    """FLOPs of one scan as the official VMamba/Mamba repos count them: 9*B*L*D*N (+B*D*L per D, z)."""
    return batch * length * channels * (9 * d_state + int(with_D) + int(with_z))
