"""HRVMamba: official parameter counts, multi-resolution features, the pure-PyTorch DCNv4 op against a
per-point bilinear reference, the DVSS pieces, and conversion of the released key layouts."""

from __future__ import annotations

import math

import pytest
import timm
import torch

import backbones  # noqa: F401  (registers the models)
from backbones.dcnv4 import DCNv4, dcnv4_sample
from backbones.hrvmamba import HRVMamba, channel_shuffle, checkpoint_filter_fn, rename_official_key

# Official counts, measured by building the official code (zhanghao5201/HRVMamba) with the DCNv4 build
# the models were trained with (no value/output projections):
# pose backbones from pose_estimation/configs/cocofinal/td-hm_hrvmamba_{tiny,small,base}_*_coco-256x192.py
# (README: 2 M / 8 M / 47 M); classifiers from classification/models/build.py (README: 20 M / 61 M).
OFFICIAL_POSE = {"hrvmamba_tiny": 2_151_008, "hrvmamba_small": 8_033_840, "hrvmamba_base": 47_099_616}
OFFICIAL_CLASSIFIER = {"hrvmamba_small": 20_101_976, "hrvmamba_base": 60_548_520}


def _count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", sorted(OFFICIAL_POSE))
def test_pose_backbone_parameter_count_matches_official(name):
    with torch.device("meta"):
        model = timm.create_model(name, features_only=True, multiscale_output=False)
    assert abs(_count(model) - OFFICIAL_POSE[name]) / OFFICIAL_POSE[name] < 0.005, _count(model)
    assert model.feature_info.reduction() == [4]


@pytest.mark.parametrize("name", sorted(OFFICIAL_CLASSIFIER))
def test_classifier_parameter_count_matches_official(name):
    with torch.device("meta"):
        model = timm.create_model(name)
    assert abs(_count(model) - OFFICIAL_CLASSIFIER[name]) / OFFICIAL_CLASSIFIER[name] < 0.005, _count(model)


def test_features_are_the_four_branches():
    model = timm.create_model("test_hrvmamba", features_only=True).eval()
    features = model(torch.randn(1, 3, 32, 32))
    assert [f.shape for f in features] == [(1, 8, 8, 8), (1, 16, 4, 4), (1, 16, 2, 2), (1, 32, 1, 1)]
    assert model.feature_info.reduction() == [4, 8, 16, 32]
    assert model.feature_info.channels() == [8, 16, 16, 32]
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


def _reference_dcnv4(value, offset_mask, group, kernel_size, stride, pad, dilation, offset_scale, remove_center):
    """DCNv4 as its CUDA kernel computes it: one output pixel, group and kernel point at a time."""
    batch, height, width, channels = value.shape
    per_group = channels // group
    out_h, out_w = offset_mask.shape[1:3]
    points = [(i, j) for i in range(kernel_size) for j in range(kernel_size)
              if not (remove_center and i == kernel_size // 2 and j == kernel_size // 2)]
    half = dilation * (kernel_size - 1) // 2
    out = torch.zeros(batch, out_h, out_w, channels, dtype=value.dtype)
    for n in range(batch):
        for yo in range(out_h):
            for xo in range(out_w):
                for g in range(group):
                    base = g * 3 * len(points)
                    for p, (i, j) in enumerate(points):
                        dx = float(offset_mask[n, yo, xo, base + 2 * p])
                        dy = float(offset_mask[n, yo, xo, base + 2 * p + 1])
                        weight = offset_mask[n, yo, xo, base + 2 * len(points) + p]
                        x = xo * stride - pad + half - half * offset_scale + (i * dilation + dx) * offset_scale
                        y = yo * stride - pad + half - half * offset_scale + (j * dilation + dy) * offset_scale
                        if not (-1 < x < width and -1 < y < height):
                            continue
                        x0, y0 = math.floor(x), math.floor(y)
                        for yy, xx, corner in ((y0, x0, (1 - (y - y0)) * (1 - (x - x0))),
                                               (y0, x0 + 1, (1 - (y - y0)) * (x - x0)),
                                               (y0 + 1, x0, (y - y0) * (1 - (x - x0))),
                                               (y0 + 1, x0 + 1, (y - y0) * (x - x0))):
                            if 0 <= yy < height and 0 <= xx < width:
                                out[n, yo, xo, g * per_group:(g + 1) * per_group] += (
                                    weight * corner * value[n, yy, xx, g * per_group:(g + 1) * per_group])
    return out


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
    torch.testing.assert_close(dcnv4_sample(value, offset_mask, *args), _reference_dcnv4(value, offset_mask, *args))


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


def _to_official(key: str) -> str:
    """Our key -> the official one (inverse of the rules, written out from the official DVSS block)."""
    parts = key.split(".")
    if "branches" not in parts:
        return key
    at = parts.index("branches") + 3  # stageN.m.branches.b.k.<block part>
    head, rest = parts[:at], parts[at:]
    if rest[:2] == ["local", "norm"]:
        rest = ["norm0", *rest[2:]]
    elif rest[:2] == ["local", "convs"]:
        rest = ["conv2d", *rest[2:]]
    elif rest[0] == "norm1":
        rest = ["norm", *rest[1:]]
    elif rest[0] == "mixer":
        rest = ["op", *[p for p in rest[1:] if p != "ssm"]]
    return ".".join(head + rest)


def test_official_checkpoint_layouts_load_strictly():
    torch.manual_seed(0)
    model = timm.create_model("test_hrvmamba", num_classes=4)
    ours = model.state_dict()
    official = {_to_official(k): torch.randn_like(v) if v.is_floating_point() else v for k, v in ours.items()}
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
    pose_official = {"backbone." + _to_official(k): v for k, v in pose.state_dict().items()}
    pose_official["head.final_layer.weight"] = torch.zeros(17, 8, 1, 1)
    assert "backbone.stage4.0.fuse_layers.0.3.0.weight" in pose_official
    assert not any(k.startswith("backbone.stage4.0.fuse_layers.1.") for k in pose_official)
    pose.load_state_dict(checkpoint_filter_fn({"state_dict": pose_official, "meta": {}}, pose), strict=True)
    # A features-only model drops the classification neck and head; our own layout passes through.
    features = timm.create_model("test_hrvmamba", num_classes=0)
    features.prune_intermediate_layers()
    features.load_state_dict(checkpoint_filter_fn({"model": official}, features), strict=True)
    assert checkpoint_filter_fn(ours, model).keys() == ours.keys()


def test_no_weight_decay_names_the_ssm_parameters():
    model = timm.create_model("test_hrvmamba")
    names = model.no_weight_decay()
    assert names and all(n.endswith((".A_logs", ".Ds")) for n in names)
    assert len(names) == 2 * (2 + 3 + 4)  # one DVSS block per branch in each of the three stages
