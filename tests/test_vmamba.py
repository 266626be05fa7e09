"""VMamba: official parameter counts, feature contract, scan patterns and SS2D behaviour."""

from __future__ import annotations

import pytest
import timm
import torch

import backbones
from backbones.scan_patterns import BidirectionalScan, CrossScan
from backbones.ss2d import SS2D

# Official counts (MzeroMiko/VMamba README / measured from the official build code), in millions.
OFFICIAL_PARAMS = {
    "vanilla_vmamba_tiny": 22.89,
    "vmamba_tiny_s2l5": 30.71,
    "vmamba_small_s2l15": 50.15,
    "vmamba_base_s2l15": 88.56,
    "vmamba_tiny_s1l8": 30.25,
}


@pytest.mark.parametrize("name", sorted(OFFICIAL_PARAMS))
def test_parameter_count_matches_official(name):
    model = timm.create_model(name)
    count = sum(p.numel() for p in model.parameters()) / 1e6
    assert abs(count - OFFICIAL_PARAMS[name]) / OFFICIAL_PARAMS[name] < 0.005, count


def test_features_are_four_nchw_stages():
    model = timm.create_model("test_vmamba", features_only=True)
    features = model(torch.randn(2, 3, 64, 64))
    assert [f.shape for f in features] == [(2, 8, 16, 16), (2, 16, 8, 8), (2, 32, 4, 4), (2, 64, 2, 2)]
    assert model.feature_info.reduction() == [4, 8, 16, 32]


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


def test_no_weight_decay_names_the_ssm_parameters():
    model = timm.create_model("test_vmamba")
    names = model.no_weight_decay()
    assert names and all(n.endswith((".A_logs", ".Ds")) for n in names)
    assert len(names) == 2 * sum(1 for m in model.modules() if isinstance(m, SS2D))


def test_unknown_backbone_lists_choices():
    with pytest.raises(ValueError, match="vmamba_tiny_s1l8"):
        backbones.create_backbone("vmamba_tiny_nope")


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
