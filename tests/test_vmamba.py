"""VMamba: odd input sizes, scan backends inside the model, its cross scan (and Vim's bidirectional one)
against explicit indexing, and SS2D behaviour. Counts, features and weight-decay names: test_timm_contract."""

from __future__ import annotations

import timm
import torch

import backbones  # noqa: F401  (registers the models)
from backbones.scan_patterns import BidirectionalScan, CrossScan
from backbones.ss2d import SS2D


def test_odd_sizes_and_one_channel_input():
    model = timm.create_model("test_vmamba", in_chans=1, num_classes=10)
    assert model(torch.randn(1, 1, 28, 28)).shape == (1, 10)
    vanilla = timm.create_model("vanilla_vmamba_tiny", depths=(1, 1, 1, 1), dims=8, num_classes=3)
    assert vanilla(torch.randn(1, 3, 36, 36)).shape == (1, 3)


def test_backends_agree_inside_the_model():
    torch.manual_seed(0)
    model = timm.create_model("test_vmamba").eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        fast = model(x)
        reference = timm.create_model("test_vmamba", scan_backend="reference").eval()
        reference.load_state_dict(model.state_dict())
        torch.testing.assert_close(reference(x), fast, rtol=1e-5, atol=1e-5)


def _explicit_cross_routes(x):
    """Route k, position t -> source pixel, built by explicit indexing (row, column, reversed)."""
    _, _, height, width = x.shape
    row = [(t // width, t % width) for t in range(height * width)]
    col = [(t % height, t // height) for t in range(height * width)]
    orders = [row, col, row[::-1], col[::-1]]
    return torch.stack([torch.stack([x[:, :, i, j] for i, j in order], dim=-1) for order in orders], dim=1)


def test_cross_scan_matches_explicit_indexing_and_merge_is_its_adjoint():
    x = torch.randn(2, 3, 4, 5)
    pattern = CrossScan()
    routes = pattern.scan(x)
    torch.testing.assert_close(routes, _explicit_cross_routes(x))
    y = torch.randn_like(routes)
    # <scan(x), y> == <x, merge(y)>: merge sends each route value back to the pixel it came from.
    torch.testing.assert_close((routes * y).sum(), (x * pattern.merge(y, (4, 5))).sum())


def test_bidirectional_scan_round_trip():
    x = torch.randn(2, 3, 7)
    pattern = BidirectionalScan()
    routes = pattern.scan(x)
    torch.testing.assert_close(routes[:, 1], x.flip(-1))
    torch.testing.assert_close(pattern.merge(routes, (7,)), x)


def test_ss2d_ungated_and_gated_shapes_and_gradients():
    for gated in (False, True):
        layer = SS2D(8, d_state=2, ssm_ratio=1.5, gated=gated)
        x = torch.randn(2, 5, 6, 8, requires_grad=True)
        out = layer(x)
        assert out.shape == x.shape
        out.square().mean().backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in layer.parameters())
