"""GroupMamba: the distillation contract, the one-route scans of the four channel groups, and conversion of
the released key layout. Counts, features and weight-decay names: test_timm_contract."""

from __future__ import annotations

import re

import pytest
import timm
import torch

import backbones  # noqa: F401  (registers the models)
from backbones.groupmamba import GroupMamba, ModulatedGroupMamba, checkpoint_filter_fn, rename_official_key
from backbones.scan_patterns import CrossScan, RouteConcat
from backbones.ss2d import RouteSSM
from tests.official import groupmamba_official_key


def test_distillation_contract_and_backward():
    torch.manual_seed(0)
    model = timm.create_model("test_groupmamba", in_chans=1, num_classes=5, drop_path_rate=0.1)
    x = torch.randn(2, 1, 28, 28)  # stage maps 7x7 ... 1x1: odd sizes and a single-pixel scan
    logits, dist_logits = model(x)
    assert logits.shape == dist_logits.shape == (2, 5)
    (logits.logsumexp(-1) - dist_logits[:, 0]).mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())

    model.eval()
    with torch.no_grad():
        token = model.forward_head(model.forward_features(x), pre_logits=True)
        expected = (model.head(token) + model.head_dist(token)) / 2
        torch.testing.assert_close(model(x), expected)
    model.train()
    model.set_distilled_training(False)
    assert model(x).shape == (2, 5)


def test_pooled_features_without_classes():
    model = timm.create_model("test_groupmamba", num_classes=0)
    out = model(torch.randn(2, 3, 32, 32))
    assert isinstance(out, torch.Tensor) and out.shape == (2, model.num_features)
    undistilled = timm.create_model("test_groupmamba", num_classes=3, distilled=False)
    assert undistilled.head_dist is None and undistilled(torch.randn(2, 3, 32, 32)).shape == (2, 3)


def _explicit_route(x, route):
    """Route ``route`` of the cross scan, position t -> pixel, by explicit index lists."""
    _, _, height, width = x.shape
    rows = [(t // width, t % width) for t in range(height * width)]
    cols = [(t % height, t // height) for t in range(height * width)]
    order = [rows, cols, rows[::-1], cols[::-1]][route]
    return torch.stack([x[:, :, i, j] for i, j in order], dim=-1).unsqueeze(1)


@pytest.mark.parametrize("route", [0, 1, 2, 3])
@pytest.mark.parametrize("size", [(3, 5), (4, 4), (1, 6)])
def test_single_route_scan_matches_explicit_indexing_and_merge_is_its_adjoint(route, size):
    x = torch.randn(2, 3, *size)
    pattern = RouteConcat(CrossScan(), (route,))
    routes = pattern.scan(x)
    torch.testing.assert_close(routes, _explicit_route(x, route))
    # One route visits every pixel once, so merge undoes scan and is its adjoint.
    torch.testing.assert_close(pattern.merge(routes, size), x)
    y = torch.randn_like(routes)
    torch.testing.assert_close((routes * y).sum(), (x * pattern.merge(y, size)).sum())


@pytest.mark.parametrize("group", [0, 1, 2, 3])
def test_each_group_scans_causally_along_its_own_direction(group):
    """With the depthwise conv made the identity, group k's output at a pixel depends only on the
    pixels before it along direction k (row-major, column-major, and their reverses)."""
    torch.manual_seed(0)
    layer = ModulatedGroupMamba(16, reduction=4)
    ss2d = layer.groups[group]
    with torch.no_grad():
        ss2d.conv2d.weight.zero_()
        ss2d.conv2d.weight[:, :, 1, 1] = 1.0
        ss2d.conv2d.bias.zero_()
    height, width = 3, 4
    x = torch.randn(1, height, width, 4, requires_grad=True)
    target = (1, 2)
    ss2d(x)[0, target[0], target[1]].sum().backward()
    touched = x.grad[0].abs().sum(-1) > 0
    order = _explicit_route(torch.arange(height * width).view(1, 1, height, width), group)[0, 0, 0].tolist()
    position = {pixel: t for t, pixel in enumerate(order)}
    target_t = position[target[0] * width + target[1]]
    for i in range(height):
        for j in range(width):
            assert bool(touched[i, j]) == (position[i * width + j] <= target_t), (i, j)


def test_official_checkpoint_layout_loads_strictly():
    torch.manual_seed(0)
    model = timm.create_model("test_groupmamba", num_classes=4)
    ours = model.state_dict()
    official = {"module." + groupmamba_official_key(k): torch.randn_like(v) if v.is_floating_point() else v
                for k, v in ours.items()}
    # Names as the official model has them (Amshaker/GroupMamba, measured state dict).
    for name in ("patch_embed1.conv.0.weight", "patch_embed1.conv.7.running_var", "patch_embed1.norm.weight",
                 "patch_embed2.proj.weight", "block1.0.attn.mamba_g1.x_proj_weight", "block3.0.attn.mamba_g4.Ds",
                 "block2.0.attn.mamba_g2.conv2d.weight", "block1.0.attn.fc1.weight", "block1.0.attn.skip_scale",
                 "block1.0.mlp.dwconv.dwconv.weight", "norm3.weight", "norm4.weight",
                 "post_network.0.attn.mamba_g3.in_proj.weight", "post_network.0.mlp.fc2.bias", "dist_head.weight"):
        assert "module." + name in official, name
    assert not any(re.search(r"\.ssm\.|stages|groups", k) for k in official)
    converted = checkpoint_filter_fn({"model": official, "epoch": 3}, model)
    model.load_state_dict(converted, strict=True)
    loaded = model.state_dict()
    assert all(torch.equal(loaded[rename_official_key(k[len("module."):])], v) for k, v in official.items())
    # Our own layout passes through; a model without distillation drops the official dist_head.
    assert checkpoint_filter_fn(ours, model).keys() == ours.keys()
    undistilled = timm.create_model("test_groupmamba", num_classes=4, distilled=False)
    undistilled.load_state_dict(checkpoint_filter_fn({"model": official}, undistilled), strict=True)


def test_every_layer_has_four_one_route_ssms():
    """Four groups in every block's layer and in the class block's (the contract test checks that exactly
    these SSMs' A_logs and Ds are kept out of weight decay)."""
    model = timm.create_model("test_groupmamba")
    ssms = [m for m in model.modules() if isinstance(m, RouteSSM)]
    assert len(ssms) == 4 * (sum(len(s.blocks) for s in model.stages) + 1)
    assert all(ssm.num_routes == 1 for ssm in ssms)


def test_bad_widths_are_rejected():
    with pytest.raises(ValueError, match="divisible by the 4 groups"):
        GroupMamba(embed_dims=(16, 16, 30, 32), depths=(1, 1, 1, 1), reduction=2)
