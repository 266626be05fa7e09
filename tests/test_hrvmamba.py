"""HRVMamba: the pose backbone's single stride-4 output, the pure-PyTorch DCNv4 op against a per-point
bilinear reference, the DVSS pieces, and conversion of the released key layouts. Counts (classifier and
pose backbone), features and weight-decay names: test_timm_contract."""

from __future__ import annotations

import pytest
import timm
import torch

import backbones  # noqa: F401  (registers the models)
from backbones.dcnv4 import DCNv4, dcnv4_sample
from backbones.hrvmamba import HRVMamba, channel_shuffle, checkpoint_filter_fn, rename_official_key
from backbones.ss2d import RouteSSM
from tests.official import hrvmamba_official_key
from tests.oracle import oracle_dcnv4


@pytest.mark.parametrize("name", ["hrvmamba_tiny", "hrvmamba_small", "hrvmamba_base"])
def test_pose_backbone_is_the_stride4_branch(name):
    with torch.device("meta"):
        model = timm.create_model(name, features_only=True, multiscale_output=False)
    assert model.feature_info.reduction() == [4]


def test_pose_backbone_returns_the_fused_stride4_map():
    pose = timm.create_model("test_hrvmamba", features_only=True, multiscale_output=False).eval()
    assert [f.shape for f in pose(torch.randn(1, 3, 30, 26))] == [(1, 8, 8, 7)]


def test_forward_backward_odd_sizes_and_one_channel():
    torch.manual_seed(0)
    model = timm.create_model("test_hrvmamba", in_chans=1, num_classes=3, drop_path_rate=0.1)
    out = model(torch.randn(2, 1, 30, 26))  # branches 8x7, 4x4, 2x2, 1x1: bilinear fusion of odd sizes
    assert out.shape == (2, 3)
    out.square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    assert timm.create_model("test_hrvmamba", num_classes=0)(torch.randn(2, 3, 32, 32)).shape == (2, 64)


@pytest.mark.parametrize("kernel_size,stride,pad,dilation,offset_scale,remove_center", [
    (3, 1, 1, 1, 1.0, False), (3, 2, 1, 1, 0.5, False), (3, 1, 2, 2, 1.0, True), (2, 1, 0, 1, 1.0, False)])
def test_dcnv4_sample_matches_per_point_bilinear_reference(kernel_size, stride, pad, dilation, offset_scale,
                                                           remove_center):
    torch.manual_seed(0)
    group, points = 2, kernel_size ** 2 - int(remove_center)
    value = torch.randn(2, 4, 5, group * 3, dtype=torch.float64)
    out_h = (4 + 2 * pad - (dilation * (kernel_size - 1) + 1)) // stride + 1
    out_w = (5 + 2 * pad - (dilation * (kernel_size - 1) + 1)) // stride + 1
    offset_mask = torch.randn(2, out_h, out_w, group * 3 * points + 5, dtype=torch.float64) * 1.5  # + padding
    args = (group, kernel_size, stride, pad, dilation, offset_scale, remove_center)
    torch.testing.assert_close(dcnv4_sample(value, offset_mask, *args), oracle_dcnv4(value, offset_mask, *args))


def test_dcnv4_sample_gradients():
    torch.manual_seed(0)
    value = torch.randn(1, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    offset_mask = (torch.rand(1, 3, 4, 2 * 27, dtype=torch.float64) * 0.8 + 0.1).requires_grad_()
    assert torch.autograd.gradcheck(lambda v, om: dcnv4_sample(v, om, 2), (value, offset_mask))


def _point_bias(layer: DCNv4, group: int, point: int, dx: float = 0.0, dy: float = 0.0, mask: float = 1.0) -> None:
    """Make ``layer`` read one kernel point of one group at a fixed offset (through offset_mask's bias)."""
    points = layer.kernel_size ** 2
    with torch.no_grad():
        base = group * 3 * points
        layer.offset_mask.bias[base + 2 * point] = dx
        layer.offset_mask.bias[base + 2 * point + 1] = dy
        layer.offset_mask.bias[base + 2 * points + point] = mask


def test_dcnv4_module_parameter_layout_and_offset_semantics():
    layer = DCNv4(64, group=2, dw_kernel_size=3, output_bias=False)
    shapes = {k: tuple(v.shape) for k, v in layer.state_dict().items()}
    assert shapes == {"offset_mask_dw.weight": (64, 1, 3, 3), "offset_mask_dw.bias": (64,),
                      "offset_mask.weight": (56, 64), "offset_mask.bias": (56,),  # ceil(2 * 9 * 3 / 8) * 8
                      "value_proj.weight": (64, 64), "value_proj.bias": (64,), "output_proj.weight": (64, 64)}
    assert not layer.offset_mask.weight.any() and not layer.offset_mask.bias.any()

    # Without projections, weight 1 on the centre point (x-major index 4) copies the input ...
    layer = DCNv4(4, group=2, without_pointwise=True)
    x = torch.randn(1, 4, 3, 5)
    for group in range(2):
        _point_bias(layer, group, point=4)
    torch.testing.assert_close(layer(x), x)
    # ... and point (i=2, j=1) (index 7: one pixel right) in group 1 only, shifts group 1's channels left.
    layer = DCNv4(4, group=2, without_pointwise=True)
    _point_bias(layer, 1, point=7)
    out = layer(x)
    assert not out[:, :2].any()
    torch.testing.assert_close(out[:, 2:, :, :-1], x[:, 2:, :, 1:])
    assert not out[:, 2:, :, -1].any()
    # A fractional offset interpolates between neighbours: centre point moved half a pixel down.
    layer = DCNv4(4, group=1, without_pointwise=True)
    _point_bias(layer, 0, point=4, dy=0.5)
    torch.testing.assert_close(layer(x)[:, :, :-1], (x[:, :, :-1] + x[:, :, 1:]) / 2)


def test_dcnv4_rejects_bad_arguments():
    with pytest.raises(ValueError, match="divisible by group"):
        DCNv4(10, group=4)
    with pytest.raises(ValueError, match="shape-preserving"):
        DCNv4(8, group=2, stride=2)


def test_channel_shuffle_interleaves_groups():
    x = torch.arange(12.0).view(1, 12, 1, 1)
    shuffled = channel_shuffle(x, 4).flatten().tolist()
    assert shuffled == [float(g * 3 + k) for k in range(3) for g in range(4)]


def test_official_checkpoint_layouts_load_strictly():
    torch.manual_seed(0)
    model = timm.create_model("test_hrvmamba", num_classes=4)
    ours = model.state_dict()
    official = {hrvmamba_official_key(k): torch.randn_like(v) if v.is_floating_point() else v for k, v in ours.items()}
    # Names as the official models have them (zhanghao5201/HRVMamba, measured state dicts).
    for name in ("conv1.weight", "bn2.running_mean", "layer1.0.downsample.0.weight", "transition1.0.0.weight",
                 "transition1.1.0.0.weight", "transition3.3.0.1.weight", "stage2.0.branches.0.0.norm0.weight",
                 "stage2.0.branches.1.0.conv2d.3.weight", "stage2.0.branches.0.0.norm.bias",
                 "stage3.0.branches.2.0.op.x_proj_weight", "stage3.0.branches.2.0.op.A_logs",
                 "stage4.0.branches.3.0.op.conv2d.offset_mask.weight", "stage4.0.branches.0.0.op.out_norm.weight",
                 "stage4.0.branches.0.0.mlp.fc2.weight", "stage3.0.fuse_layers.0.2.1.running_var",
                 "stage4.0.fuse_layers.3.0.2.3.weight", "neck.increase_layers.3.0.conv3.weight",
                 "neck.downsample_layers.2.bn.weight", "neck.final_layer.conv.weight", "head.weight"):
        assert name in official, name
    assert official["stage2.0.branches.0.0.conv2d.3.weight"].shape[-1] == 9
    # Classification checkpoint: {"model": ...}.
    model.load_state_dict(checkpoint_filter_fn({"model": official}, model), strict=True)
    converted = model.state_dict()
    assert all(torch.equal(converted[rename_official_key(k)], v) for k, v in official.items())
    # Pose checkpoint (mmpose): backbone keys under "backbone.", next to the heatmap head's.
    pose = HRVMamba(widths=(8, 16, 16, 32), stage1_planes=8, num_modules=(1, 1, 1), depth=1, stem_width=16,
                    multiscale_output=False, num_classes=0)
    pose_official = {"backbone." + hrvmamba_official_key(k): v for k, v in pose.state_dict().items()}
    pose_official["head.final_layer.weight"] = torch.zeros(17, 8, 1, 1)
    assert "backbone.stage4.0.fuse_layers.0.3.0.weight" in pose_official
    assert not any(k.startswith("backbone.stage4.0.fuse_layers.1.") for k in pose_official)
    pose.load_state_dict(checkpoint_filter_fn({"state_dict": pose_official, "meta": {}}, pose), strict=True)
    # A features-only model drops the classification neck and head; our own layout passes through.
    features = timm.create_model("test_hrvmamba", num_classes=0)
    features.prune_intermediate_layers()
    features.load_state_dict(checkpoint_filter_fn({"model": official}, features), strict=True)
    assert checkpoint_filter_fn(ours, model).keys() == ours.keys()


def test_one_dss2d_per_branch_and_module():
    """One DVSS block (one SSM) per branch in each of the three stages (the contract test checks that exactly
    these SSMs' A_logs and Ds are kept out of weight decay)."""
    model = timm.create_model("test_hrvmamba")
    assert sum(isinstance(m, RouteSSM) for m in model.modules()) == 2 + 3 + 4
