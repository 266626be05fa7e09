"""Token pruning (Zhan et al., NeurIPS 2024): the aligned scan against a float64 oracle of the paper's recurrence."""

from __future__ import annotations

import pytest
import torch

from backbones import kernel
from backbones.ssm import selective_scan
from tests.oracle import oracle_aligned_scan, oracle_selective_scan
from tests.test_ssm import make_inputs

BACKENDS = ["torch", "reference"] + (["fused"] if kernel.available() else [])


def pruned_positions(batch: int, length: int, full: int, seed: int = 1) -> torch.Tensor:
    """(batch, length) sorted random distinct indices into an unpruned sequence of ``full`` tokens."""
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(full, generator=g)[:length].sort().values for _ in range(batch)])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("optional", [True, False])
def test_aligned_scan_matches_float64_oracle_of_the_paper_recurrence(backend, optional):
    """dt_scale 1 with d_state 16: gaps of several positions decay the state by up to e^-100, so a scan that
    ignored them (or added input at them) would be far off."""
    inputs = make_inputs(length=24, d_state=16, with_z=optional, with_D=optional, with_bias=optional)
    positions = pruned_positions(2, 24, 60)
    expected = oracle_aligned_scan(**inputs, positions=positions, delta_softplus=True)
    got = selective_scan(**inputs, delta_softplus=True, backend=backend, positions=positions)
    assert got.dtype == torch.float32
    # fp32 scan of 24 steps against float64: the plain scan's tolerance (test_ssm)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())
    naive = oracle_selective_scan(**inputs, delta_softplus=True)
    assert (naive - expected).abs().max() > 100 * 1e-5 * expected.abs().max()


@pytest.mark.parametrize("backend", BACKENDS)
def test_aligned_scan_without_gaps_is_the_plain_scan(backend):
    inputs = make_inputs(length=13, d_state=4)
    positions = torch.arange(13).expand(2, -1)
    expected = oracle_selective_scan(**inputs, delta_softplus=True)
    got = selective_scan(**inputs, delta_softplus=True, backend=backend, positions=positions)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


def test_grouped_routes_take_their_own_position_maps():
    """Vim's two routes in one grouped call: the reversed route's tokens come in reversed order with decreasing
    positions, whose gaps are those of the mirrored (increasing) map."""
    inputs = make_inputs(length=10, d_state=4, groups=2, channels=4)
    positions = pruned_positions(2, 10, 25)
    routes = torch.stack((positions, positions.flip(-1)), dim=1)
    got = selective_scan(**inputs, delta_softplus=True, backend="torch", positions=routes)
    for route, route_positions in enumerate((positions, 24 - positions.flip(-1))):
        channels = slice(2 * route, 2 * route + 2)
        sub = {k: (v[:, channels] if k in ("u", "delta", "z") else v[channels] if k in ("A", "D", "delta_bias")
                   else v[:, route]) for k, v in inputs.items()}
        expected = oracle_aligned_scan(**sub, positions=route_positions, delta_softplus=True)
        torch.testing.assert_close(got[:, channels].double(), expected, rtol=1e-5,
                                   atol=1e-5 * expected.abs().max().item())


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_aligned_scan_gradients_match_the_float64_oracle(backend):
    """Float64 in, so the backends compute in float64; gradients of every input against autograd through the
    step-by-step oracle, and torch.autograd.gradcheck on the aligned scan itself."""
    inputs = make_inputs(batch=1, channels=2, length=7, d_state=3, dtype=torch.float64)
    positions = pruned_positions(1, 7, 15)
    names = [n for n, v in inputs.items() if v is not None]
    weights = torch.randn(1, 2, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(3))

    def grads(fn):
        leaves = {n: inputs[n].detach().clone().requires_grad_() for n in names}
        (fn(**leaves, positions=positions, delta_softplus=True) * weights).sum().backward()
        return {n: leaves[n].grad for n in names}

    expected = grads(oracle_aligned_scan)
    got = grads(lambda **kw: selective_scan(**kw, backend=backend))
    for name in names:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-9, atol=1e-9, msg=name)

    def scan(*args):
        return selective_scan(**dict(zip(names, args)), delta_softplus=True, backend=backend, positions=positions)

    assert torch.autograd.gradcheck(scan, [inputs[n].detach().clone().requires_grad_() for n in names],
                                    eps=1e-6, atol=1e-5)


@pytest.mark.skipif(not kernel.available(), reason="the fused kernel is not built")
def test_fused_kernel_gradients_through_the_aligned_scan_match_torch():
    """The fused kernel computes in fp32: its gradients against the float64 torch path within fp32 rounding of a
    24-step scan (relative 1e-4 of the largest gradient)."""
    inputs = make_inputs(length=24, d_state=8)
    positions = pruned_positions(2, 24, 50)
    names = [n for n, v in inputs.items() if v is not None]

    def grads(backend, dtype):
        leaves = {n: inputs[n].detach().to(dtype).requires_grad_() for n in names}
        selective_scan(**leaves, delta_softplus=True, backend=backend, positions=positions).sum().backward()
        return {n: leaves[n].grad for n in names}

    expected, got = grads("torch", torch.float64), grads("fused", torch.float32)
    for name in names:
        scale = expected[name].abs().max().item()
        torch.testing.assert_close(got[name].double(), expected[name], rtol=1e-4, atol=1e-4 * scale, msg=name)


def test_positions_are_checked():
    inputs = make_inputs(length=5, d_state=2)
    with pytest.raises(ValueError, match="strictly monotonic"):
        selective_scan(**inputs, positions=torch.tensor([[0, 1, 1, 2, 3]] * 2))
    with pytest.raises(ValueError, match="do not match"):
        selective_scan(**inputs, positions=torch.arange(4).expand(2, -1))
