"""MSVMamba: the multi-scale scan against an explicit reference, odd sizes on both generations, and
conversion of official (v1 master / v3 v2-branch) key layouts. Counts and features: test_timm_contract."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F

import backbones  # noqa: F401  (registers the models)
from backbones.msvmamba import MultiScaleSS2D, checkpoint_filter_fn, rename_official_key
from backbones.scan_patterns import AtrousScan, CrossScan, RouteConcat
from backbones.ss2d import RouteSSM
from tests.official import msvmamba_official
from tests.oracle import oracle_selective_scan


@pytest.mark.parametrize("name", ["test_msvmamba", "msvmamba_nano"])
def test_forward_backward_odd_sizes(name):
    # msvmamba_nano shrunk: exercises the v1 path (gate, per-scale norm, bilinear upsampling).
    model = timm.create_model(name, depths=(1, 1, 1, 1), dims=8, num_classes=3, in_chans=1)
    x = torch.randn(2, 1, 36, 44)
    out = model(x)
    assert out.shape == (2, 3)
    out.square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def _positions(height, width, order):
    rows = [(i, j) for i in range(height) for j in range(width)]
    cols = [(i, j) for j in range(width) for i in range(height)]
    return {"row": rows, "col": cols, "row_rev": rows[::-1], "col_rev": cols[::-1]}[order]


def test_route_concat_matches_explicit_indexing_and_merge_is_its_adjoint():
    x = torch.randn(2, 3, 3, 5)
    pattern = RouteConcat(CrossScan(), (2, 1, 3))
    routes = pattern.scan(x)
    order = _positions(3, 5, "row_rev") + _positions(3, 5, "col") + _positions(3, 5, "col_rev")
    expected = torch.stack([x[:, :, i, j] for i, j in order], dim=-1).unsqueeze(1)
    torch.testing.assert_close(routes, expected)
    y = torch.randn_like(routes)
    torch.testing.assert_close((routes * y).sum(), (x * pattern.merge(y, (3, 5))).sum())
    with pytest.raises(ValueError, match="distinct"):
        RouteConcat(CrossScan(), (1, 1))


def test_route_concat_of_a_padding_pattern_joins_its_routes():
    x = torch.randn(2, 3, 5, 7)  # odd sizes: the atrous routes read zero padding
    inner, pattern = AtrousScan(), RouteConcat(AtrousScan(), (3, 0))
    routes = pattern.scan(x)
    torch.testing.assert_close(routes, torch.cat((inner.scan(x)[:, 3], inner.scan(x)[:, 0]), dim=-1).unsqueeze(1))
    y = torch.randn_like(routes)
    torch.testing.assert_close((routes * y).sum(), (x * pattern.merge(y, (5, 7))).sum())


def test_route_ssm_parameter_subset_equals_a_smaller_route_ssm():
    torch.manual_seed(0)
    stacked = RouteSSM(6, num_routes=2, d_state=3, dt_rank=2)
    single = RouteSSM(6, num_routes=1, d_state=3, dt_rank=2)
    with torch.no_grad():
        single.x_proj_weight.copy_(stacked.x_proj_weight[1:])
        single.dt_projs_weight.copy_(stacked.dt_projs_weight[1:])
        single.dt_projs_bias.copy_(stacked.dt_projs_bias[1:])
        single.A_logs.copy_(stacked.A_logs[6:] + torch.rand(6, 3))
        stacked.A_logs[6:] = single.A_logs
        single.Ds.copy_(torch.randn(6))
        stacked.Ds[6:] = single.Ds
    xs = torch.randn(2, 1, 6, 11)
    torch.testing.assert_close(stacked(xs, slice(1, 2)), single(xs))
    with pytest.raises(ValueError, match="routes"):
        stacked(torch.randn(2, 2, 6, 11), slice(1, 2))


def _reference_ms2d(mixer: MultiScaleSS2D, x: torch.Tensor) -> torch.Tensor:
    """MS2D written out: explicit route index lists, the float64 oracle scan, explicit scatter."""
    x = x.double()
    params = {k: v.detach().double() for k, v in mixer.state_dict().items()}
    batch, height, width, _ = x.shape
    xz = x @ params["in_proj.weight"].T
    u, z = xz.chunk(2, dim=-1) if mixer.gated else (xz, None)
    u = u.permute(0, 3, 1, 2)
    channels = u.shape[1]
    full = F.silu(F.conv2d(u, params["conv2d.weight"], params["conv2d.bias"], padding=1, groups=channels))
    low = F.silu(F.conv2d(u, params["conv2d_low.weight"], params["conv2d_low.bias"], stride=2, padding=3,
                          groups=channels))
    ssm = mixer.ssm
    n, r = ssm.d_state, ssm.dt_rank

    def scan(seq, k):
        proj = torch.einsum("bdl,cd->bcl", seq, params["ssm.x_proj_weight"][k])
        dt, B, C = proj.split([r, n, n], dim=1)
        dt = torch.einsum("brl,dr->bdl", dt, params["ssm.dt_projs_weight"][k])
        rows = slice(k * channels, (k + 1) * channels)
        y = oracle_selective_scan(seq, dt, -params["ssm.A_logs"][rows].exp(), B, C, D=params["ssm.Ds"][rows],
                                  delta_bias=params["ssm.dt_projs_bias"][k], delta_softplus=True)
        if mixer.norm_each_scale:
            y = F.layer_norm(y.transpose(1, 2), (channels,), params["out_norm.weight"], params["out_norm.bias"],
                             mixer.out_norm.eps).transpose(1, 2)
        return y

    full_order = _positions(height, width, "row")
    low_h, low_w = low.shape[2:]
    low_order = sum((_positions(low_h, low_w, o) for o in ("row_rev", "col", "col_rev")), [])
    y_full = scan(torch.stack([full[:, :, i, j] for i, j in full_order], -1), 0)
    y_low = scan(torch.stack([low[:, :, i, j] for i, j in low_order], -1), 1)
    out = torch.zeros_like(full)
    for t, (i, j) in enumerate(full_order):
        out[:, :, i, j] = y_full[:, :, t]
    low_out = torch.zeros_like(low)
    for t, (i, j) in enumerate(low_order):
        low_out[:, :, i, j] += y_low[:, :, t]
    align = False if mixer.upsample_mode == "bilinear" else None
    y = (out + F.interpolate(low_out, size=(height, width), mode=mixer.upsample_mode, align_corners=align))
    y = y.permute(0, 2, 3, 1)
    if not mixer.norm_each_scale:
        y = F.layer_norm(y, (channels,), params["out_norm.weight"], params["out_norm.bias"], mixer.out_norm.eps)
    gate = torch.sigmoid(F.relu(y.mean((1, 2), keepdim=True) @ params["se.fc1.weight"].T) @ params["se.fc2.weight"].T)
    y = y * gate
    if z is not None:
        y = y * F.silu(z)
    return y @ params["out_proj.weight"].T


@pytest.mark.parametrize("generation", [
    dict(gated=True, norm_each_scale=True, upsample_mode="bilinear", ssm_ratio=2.0),  # v1
    dict(gated=False, norm_each_scale=False, upsample_mode="nearest", ssm_ratio=1.0),  # v3
])
def test_multiscale_mixer_matches_explicit_reference(generation):
    torch.manual_seed(0)
    mixer = MultiScaleSS2D(8, d_state=2, se_reduction=4, **generation)
    with torch.no_grad():
        for p in (mixer.out_norm.weight, mixer.out_norm.bias, mixer.conv2d.bias, mixer.conv2d_low.bias):
            p.normal_(0, 0.5)
    x = torch.randn(2, 5, 6, 8)
    torch.testing.assert_close(mixer(x).double(), _reference_ms2d(mixer, x), rtol=1e-4, atol=1e-5)


# Official key -> shape, measured from the official builds (reference notes), stage 0 block 0.
OFFICIAL_TINY_KEYS = {
    "msvmamba_tiny": {
        "layers.0.blocks.0.op.x_proj_weight": (2, 8, 192),
        "layers.0.blocks.0.op.dt_projs_weight": (2, 192, 6),
        "layers.0.blocks.0.op.A_logs": (384, 1),
        "layers.0.blocks.0.op.se.fc.0.weight": (24, 192),
        "layers.0.blocks.0.op.se.fc.2.weight": (192, 24),
        "layers.0.blocks.0.op.in_proj.weight": (384, 96),
        "layers.0.blocks.0.op.conv2d_b1.weight": (192, 1, 7, 7),
        "layers.0.downsample.reduction.weight": (192, 384),
        "patch_embed.0.weight": (96, 3, 4, 4),
    },
    "msvmamba_v3_tiny": {
        "layers.0.blocks.0.op.x_proj_weight": (2, 8, 96),
        "layers.0.blocks.0.op.dt_projs_weight": (2, 96, 6),
        "layers.0.blocks.0.op.A_logs": (192, 1),
        "layers.0.blocks.0.op.Ds": (192,),
        "layers.0.blocks.0.op.in_proj.weight": (96, 96),
        "layers.0.downsample.1.weight": (192, 96, 3, 3),
        "patch_embed.5.weight": (96, 48, 3, 3),
    },
}


@pytest.mark.parametrize("name", sorted(OFFICIAL_TINY_KEYS))
def test_official_keys_map_to_parameters_of_the_same_shape(name):
    with torch.device("meta"):
        ours = timm.create_model(name).state_dict()
    generation = "v1" if name == "msvmamba_tiny" else "v3"
    for key, shape in OFFICIAL_TINY_KEYS[name].items():
        assert ours[rename_official_key(key, generation)].shape == shape, key


@pytest.mark.parametrize("name,generation,gated,ffn_ratio,ssm_ratio", [
    ("msvmamba_nano", "v1", True, 2.0, 2.0),
    ("test_msvmamba", "v3", False, 4.0, 1.0),
    ("msvmamba_v3_base", "v3", True, 4.0, 1.0),
])
def test_official_layout_loads_strictly(name, generation, gated, ffn_ratio, ssm_ratio):
    depths, dims = (1, 2, 1, 1), (16, 32, 48, 64)
    official = msvmamba_official(depths, dims, ssm_ratio, 1, generation, gated, ffn_ratio, num_classes=10)
    model = timm.create_model(name, depths=depths, dims=dims, num_classes=10)
    converted = checkpoint_filter_fn({"model": {"module." + k: v for k, v in official.items()}}, model)
    model.load_state_dict(converted, strict=True)
    mixer = model.stages[1].blocks[1].mixer
    x_proj = official["layers.1.blocks.1.op.x_proj_weight"]
    A_logs = official["layers.1.blocks.1.op.A_logs"]
    # Ours: parameter set 0 = full resolution. v1 stores the half-resolution set first.
    full, low = (1, 0) if generation == "v1" else (0, 1)
    torch.testing.assert_close(mixer.ssm.x_proj_weight[0], x_proj[full])
    torch.testing.assert_close(mixer.ssm.x_proj_weight[1], x_proj[low])
    d = mixer.ssm.d_inner
    torch.testing.assert_close(mixer.ssm.A_logs[:d], A_logs[full * d:(full + 1) * d])
    torch.testing.assert_close(model.stages[2].downsample.norm.weight,
                               official["layers.1.downsample.norm.weight" if generation == "v1"
                                        else "layers.1.downsample.3.weight"])
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 10)
    # Our own layout passes through unchanged.
    assert checkpoint_filter_fn(model.state_dict(), model).keys() == model.state_dict().keys()
