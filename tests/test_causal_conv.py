"""The fused causal conv1d + SiLU of Vim's two directions (backbones.kernel.conv): float64-oracle parity at
every ISA level this CPU runs, the custom op's contract, Vim on it against the pure-PyTorch path, and the
fallback when no kernel is built.

Error measure and bounds as in test_scan_kernel: max |got - expected| / max |expected| over the tensor,
5e-6 forward and 1e-5 for gradients. Each output is a bias plus `width` products (and each gradient a sum of
up to batch x length products), so fp32 round-off stays near 1e-7 and the bounds leave a wide margin, while
a wrong tap, direction, offset or missing term is an error of order 1.
"""

from __future__ import annotations

from typing import Optional

import pytest
import timm
import torch
import torch.nn.functional as F

from backbones import vim
from backbones.kernel.conv import bidirectional_conv_silu, causal_conv_silu_cpu
from tests.helpers import record_calls
from tests.test_scan_fast import relative_error
from tests.test_scan_kernel import assert_threads_and_levels_agree, isa, needs_kernel, no_kernel  # noqa: F401 (fixtures)

FORWARD_TOL, GRAD_TOL = 5e-6, 1e-5


def conv_oracle(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """The mixer's definition, with nn.Conv1d semantics: each direction's causal depthwise conv (padding
    width - 1, first L outputs) and SiLU, direction 1 on the reversed sequence and flipped back to token
    order; (batch, L, d) -> (batch, 2, d, L)."""
    batch, length, channels = x.shape
    tokens = x.transpose(1, 2)
    sequences = torch.cat((tokens, tokens.flip(-1)), dim=1)
    out = F.conv1d(sequences, weight, bias, padding=weight.shape[-1] - 1, groups=2 * channels)[..., :length]
    out = F.silu(out).view(batch, 2, channels, length)
    return torch.stack((out[:, 0], out[:, 1].flip(-1)), dim=1)


def make_inputs(batch: int, length: int, channels: int, width: int, bias: bool, seed: int = 0) -> list:
    """x as in_proj leaves it (a channels-last half of a wider tensor, so tokens are not contiguous), a
    depthwise conv's weight and bias."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, length, 2 * channels, generator=g)[..., :channels]
    weight = torch.randn(2 * channels, 1, width, generator=g) * 0.5
    return [x, weight, torch.randn(2 * channels, generator=g) if bias else None]


def run_with_grads(fn, inputs: list, grad_out: torch.Tensor) -> tuple[torch.Tensor, list]:
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in inputs]
    y = fn(*leaves)
    present = [t for t in leaves if t is not None]
    return y.detach(), list(torch.autograd.grad(y, present, grad_out.to(y.dtype)))


@needs_kernel
@pytest.mark.usefixtures("isa")
@pytest.mark.parametrize("width", [2, 3, 4])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("batch,length,channels", [(1, 1, 3), (2, 70, 20), (3, 130, 37)])
def test_forward_and_gradients_match_float64(width, bias, batch, length, channels):
    """Channels 3/20/37 leave tails of every vector width (4, 8, 16); lengths 70 and 130 cross the kernel's
    64-token blocks, whose backward needs the width - 1 tokens either side; length 1 is all padding."""
    inputs = make_inputs(batch, length, channels, width, bias)
    grad_out = torch.randn(batch, 2, channels, length, generator=torch.Generator().manual_seed(1))
    got, grads = run_with_grads(bidirectional_conv_silu, inputs, grad_out)
    expected, expected_grads = run_with_grads(conv_oracle, [t.double() if t is not None else None for t in inputs],
                                              grad_out)
    assert relative_error(got, expected) <= FORWARD_TOL
    for name, grad, exact in zip(("x", "weight", "bias"), grads, expected_grads):
        assert grad.shape == exact.shape and grad.dtype == torch.float32, name
        assert relative_error(grad, exact) <= GRAD_TOL, name


@needs_kernel
def test_widths_up_to_the_kernel_limit():
    for width in (1, 5, 8):
        inputs = make_inputs(2, 40, 9, width, True)
        grad_out = torch.randn(2, 2, 9, 40, generator=torch.Generator().manual_seed(1))
        got, grads = run_with_grads(bidirectional_conv_silu, inputs, grad_out)
        expected, expected_grads = run_with_grads(conv_oracle, [t.double() for t in inputs], grad_out)
        assert relative_error(got, expected) <= FORWARD_TOL, width
        assert all(relative_error(a, b) <= GRAD_TOL for a, b in zip(grads, expected_grads)), width


@needs_kernel
def test_saturated_pre_activations():
    """Pre-activations far out on both sides (|a| up to ~400, where e^-a overflows float32) give SiLU and its
    derivative as float64 does: a or 0, gradient 1 or 0."""
    x, weight, bias = make_inputs(2, 30, 20, 4, True)
    inputs = [x * 100, weight, bias]
    grad_out = torch.randn(2, 2, 20, 30, generator=torch.Generator().manual_seed(1))
    got, grads = run_with_grads(bidirectional_conv_silu, inputs, grad_out)
    expected, expected_grads = run_with_grads(conv_oracle, [t.double() for t in inputs], grad_out)
    assert torch.isfinite(got).all() and relative_error(got, expected) <= FORWARD_TOL
    assert all(relative_error(a, b) <= GRAD_TOL for a, b in zip(grads, expected_grads))


@needs_kernel
def test_isa_levels_agree_and_threads_do_not_change_results():
    """The weight and bias gradients are summed per fixed 64-token block and then over blocks in order, so
    any thread count gives the same bits; the levels differ by round-off only."""
    inputs = make_inputs(4, 197, 45, 4, True)
    grad_out = torch.randn(4, 2, 45, 197, generator=torch.Generator().manual_seed(1))

    def run() -> list:
        y, grads = run_with_grads(bidirectional_conv_silu, inputs, grad_out)
        return [y, *grads]

    assert_threads_and_levels_agree(run)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs_are_computed_in_float32(dtype):
    """The op computes a bfloat16/float16 input in float32 and rounds the result once: exactly the float32
    op on the same (rounded) values, rounded to ``dtype``."""
    x, weight, bias = make_inputs(2, 50, 24, 4, True)
    x = x.to(dtype)
    expected = bidirectional_conv_silu(x.float(), weight, bias).to(dtype)
    leaf = x.clone().requires_grad_()
    got = bidirectional_conv_silu(leaf, weight, bias)
    assert got.dtype == dtype and torch.equal(got, expected)
    got.float().square().sum().backward()
    assert leaf.grad.dtype == dtype


@needs_kernel
def test_refuses_what_it_cannot_compute():
    x, weight, bias = make_inputs(1, 5, 4, 4, True)
    with pytest.raises(ValueError, match="float64"):
        bidirectional_conv_silu(x.double(), weight, bias)
    with pytest.raises(ValueError, match=r"weight must be a depthwise Conv1d's \(2 \* 4, 1, width <= 8\)"):
        bidirectional_conv_silu(x, weight[:4], bias)
    with pytest.raises(ValueError, match="width <= 8"):
        bidirectional_conv_silu(x, torch.zeros(8, 1, 9), bias)
    with pytest.raises(ValueError, match=r"bias must be \(8,\)"):
        bidirectional_conv_silu(x, weight, bias[:4])


@needs_kernel
@pytest.mark.parametrize("bias", [True, False])
def test_opcheck(bias):
    x, weight, b = (t.requires_grad_() if t is not None else None for t in make_inputs(2, 9, 5, 3, bias))
    torch.library.opcheck(causal_conv_silu_cpu, (x, weight, b))


# ----------------------------------------------------------------------------- Vim on the kernel


def count_conv_calls(monkeypatch) -> list:
    """Record every call of the fused conv from Vim's mixer."""
    return record_calls(monkeypatch, vim, "bidirectional_conv_silu")


@needs_kernel
def test_vim_mixer_runs_the_fused_conv_and_matches_the_pure_pytorch_path(monkeypatch):
    """The mixer on the fused scan takes the fused conv; output and every parameter gradient match the same
    mixer on the pure-PyTorch scan and conv (float64 as the judge of the gradients, as in
    test_scan_kernel's model parity)."""
    calls = count_conv_calls(monkeypatch)
    torch.manual_seed(0)
    reference = vim.BiMambaMixer(32, d_state=8, scan_backend="torch")
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(0.05 * torch.randn_like(p))
    fused = vim.BiMambaMixer(32, d_state=8, scan_backend="fused")
    fused.load_state_dict(reference.state_dict())
    oracle = vim.BiMambaMixer(32, d_state=8, scan_backend="torch").double()
    oracle.load_state_dict(reference.state_dict())
    x = torch.randn(2, 37, 32)
    grad_out = torch.randn(2, 37, 32)
    outputs = [m(t) for m, t in ((reference, x), (fused, x), (oracle, x.double()))]
    assert calls == [(2, 37, 64)]
    assert relative_error(outputs[1], outputs[0].double()) <= 5e-6
    for out in outputs:
        out.backward(grad_out.to(out.dtype))
    for (name, p), q, exact in zip(reference.named_parameters(), fused.parameters(), oracle.parameters()):
        fp32_noise = relative_error(p.grad, exact.grad)
        assert relative_error(q.grad, exact.grad) <= 5e-5 + 3 * fp32_noise, name


@needs_kernel
def test_vim_mixer_with_a_conv_wider_than_the_kernel_takes_the_pytorch_conv(monkeypatch):
    calls = count_conv_calls(monkeypatch)
    mixer = vim.BiMambaMixer(16, d_state=4, d_conv=9, scan_backend="fused")
    assert mixer(torch.randn(1, 12, 16)).shape == (1, 12, 16) and calls == []


@pytest.mark.usefixtures("no_kernel")
def test_without_a_built_kernel_vim_runs_the_pure_pytorch_conv(monkeypatch):
    calls = count_conv_calls(monkeypatch)
    torch.manual_seed(0)
    model = timm.create_model("test_vim")
    model(torch.randn(1, 3, 32, 32)).sum().backward()
    assert calls == [] and model.layers[0].mixer.conv1d.weight.grad is not None
    with pytest.raises(RuntimeError, match="python -m backbones.kernel build"):
        bidirectional_conv_silu(*make_inputs(1, 5, 4, 4, True))
