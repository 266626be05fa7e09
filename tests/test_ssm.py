"""Selective-scan backends against an independent float64 oracle, gradients by gradcheck."""

from __future__ import annotations

import pytest
import torch

from backbones import kernel
from backbones.ssm import BACKENDS, linear_recurrence, resolve_backend, selective_scan
from tests.oracle import oracle_selective_scan

CPU_BACKENDS = ["torch", "reference"]


def make_inputs(batch=2, channels=4, length=13, d_state=16, groups=None, with_z=True, with_D=True,
                with_bias=True, dt_scale=1.0, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape_bc = (batch, d_state, length) if groups is None else (batch, groups, d_state, length)
    inputs = dict(
        u=torch.randn(batch, channels, length, generator=g, dtype=dtype),
        delta=(torch.rand(batch, channels, length, generator=g, dtype=dtype) * dt_scale),
        A=-torch.arange(1, d_state + 1, dtype=dtype).repeat(channels, 1),
        B=torch.randn(*shape_bc, generator=g, dtype=dtype),
        C=torch.randn(*shape_bc, generator=g, dtype=dtype),
        D=torch.randn(channels, generator=g, dtype=dtype) if with_D else None,
        z=torch.randn(batch, channels, length, generator=g, dtype=dtype) if with_z else None,
        delta_bias=torch.randn(channels, generator=g, dtype=dtype) * 0.1 if with_bias else None,
    )
    return inputs


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("d_state", [1, 16])
@pytest.mark.parametrize("groups", [None, 2])
@pytest.mark.parametrize("optional", [True, False])
@pytest.mark.parametrize("length", [1, 13, 64])
def test_matches_float64_oracle(backend, d_state, groups, optional, length):
    inputs = make_inputs(length=length, d_state=d_state, groups=groups, with_z=optional, with_D=optional,
                         with_bias=optional)
    for softplus in (False, True):
        expected = oracle_selective_scan(**inputs, delta_softplus=softplus)
        got = selective_scan(**inputs, delta_softplus=softplus, backend=backend)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_large_decay_is_finite_and_exact(backend):
    """|A * delta| up to ~200 with d_state 16: the case that breaks ratio-trick scans."""
    inputs = make_inputs(length=40, d_state=16, dt_scale=12.0, with_bias=False)
    expected = oracle_selective_scan(**inputs)
    got = selective_scan(**inputs, backend=backend)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_gradcheck_float64(backend):
    inputs = make_inputs(batch=1, channels=2, length=7, d_state=3, groups=2, dtype=torch.float64)
    names = list(inputs)
    tensors = [inputs[n].requires_grad_() for n in names]

    def fn(*args):
        return selective_scan(**dict(zip(names, args)), delta_softplus=True, backend=backend)

    # float64 in, so the float32 precision policy must not apply: gradcheck needs exact doubles.
    assert torch.autograd.gradcheck(fn, tensors, eps=1e-6, atol=1e-4)


def test_low_precision_inputs_return_input_dtype():
    inputs = make_inputs(length=9, d_state=4)
    expected = selective_scan(**inputs, backend="torch")
    half = {k: (v.bfloat16() if v is not None and k in ("u", "delta", "B", "C", "z") else v)
            for k, v in inputs.items()}
    got = selective_scan(**half, backend="torch")
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), expected, rtol=5e-2, atol=5e-2)


def test_linear_recurrence_odd_lengths():
    for length in (1, 2, 3, 5, 8, 31):
        a, b = torch.rand(3, length, dtype=torch.float64), torch.randn(3, length, dtype=torch.float64)
        h, expected = torch.zeros(3, dtype=torch.float64), []
        for t in range(length):
            h = a[:, t] * h + b[:, t]
            expected.append(h)
        torch.testing.assert_close(linear_recurrence(a, b), torch.stack(expected, -1))


def test_unknown_and_unavailable_backends_say_why():
    with pytest.raises(ValueError, match="choose one of"):
        resolve_backend("fast", torch.device("cpu"))
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="mamba_ssm"):
            resolve_backend("mamba_ssm", torch.device("cpu"))
    assert resolve_backend("auto", torch.device("cpu")) == ("fused" if kernel.available() else "torch")
    assert set(CPU_BACKENDS) < set(BACKENDS)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="mamba-ssm's kernel needs CUDA")
def test_mamba_ssm_matches_torch_on_cuda():
    pytest.importorskip("mamba_ssm")
    inputs = {k: (v.cuda() if v is not None else None) for k, v in make_inputs(length=64, groups=2).items()}
    torch.testing.assert_close(selective_scan(**inputs, delta_softplus=True, backend="mamba_ssm"),
                               selective_scan(**inputs, delta_softplus=True, backend="torch"),
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_every_input_gets_a_gradient_at_length_one(backend):
    """A 1x1 last stage scans length-1 sequences; DDP needs A in the graph there (its gradient is 0)."""
    inputs = make_inputs(length=1, d_state=4)
    tensors = {k: v.requires_grad_() for k, v in inputs.items() if v is not None}
    selective_scan(**inputs, delta_softplus=True, backend=backend).sum().backward()
    assert all(t.grad is not None for t in tensors.values())
    assert torch.count_nonzero(tensors["A"].grad) == 0
