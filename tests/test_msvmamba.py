"""MSVMamba: official parameter counts, features, the multi-scale scan against an explicit reference,
and conversion of official (v1 master / v3 v2-branch) key layouts."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F

import backbones  # noqa: F401  (registers the models)
from backbones.msvmamba import MultiScaleSS2D, checkpoint_filter_fn, rename_official_key
from backbones.scan_patterns import AtrousScan, CrossScan, RouteConcat
from backbones.ss2d import RouteSSM
from tests.oracle import oracle_selective_scan

# Official counts in millions: v1 from the master-branch yaml comments (6.86 / 11.88) and builds of
# the official code (33.05; yaml comment 33.08); v3 from builds of the official v2-branch code.
OFFICIAL_PARAMS = {
    "msvmamba_nano": 6.86,
    "msvmamba_micro": 11.88,
    "msvmamba_tiny": 33.05,
    "msvmamba_v3_tiny": 32.26,
    "msvmamba_v3_small": 50.22,
    "msvmamba_v3_base": 90.59,
}


@pytest.mark.parametrize("name", sorted(OFFICIAL_PARAMS))
def test_parameter_count_matches_official(name):
    with torch.device("meta"):
        model = timm.create_model(name)
    count = sum(p.numel() for p in model.parameters()) / 1e6
    assert abs(count - OFFICIAL_PARAMS[name]) / OFFICIAL_PARAMS[name] < 0.005, count


def test_features_are_four_nchw_stages():
    model = timm.create_model("test_msvmamba", features_only=True)
    features = model(torch.randn(2, 3, 64, 64))
    assert [f.shape for f in features] == [(2, 8, 16, 16), (2, 16, 8, 8), (2, 32, 4, 4), (2, 64, 2, 2)]
    assert model.feature_info.reduction() == [4, 8, 16, 32]
    assert model.feature_info.channels() == [8, 16, 32, 64]


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


def _official_state_dict(depths, dims, ssm_ratio, d_state, generation, gated, ffn_ratio, num_classes=1000):
    """An official-layout state dict, written from the official module structure (names and shapes)."""
    g = torch.Generator().manual_seed(0)
    shapes = {}
    c0 = dims[0]
    if generation == "v1":
        shapes.update({"patch_embed.0.weight": (c0, 3, 4, 4), "patch_embed.0.bias": (c0,),
                       "patch_embed.2.weight": (c0,), "patch_embed.2.bias": (c0,)})
    else:
        shapes.update({"patch_embed.0.weight": (c0 // 2, 3, 3, 3), "patch_embed.0.bias": (c0 // 2,),
                       "patch_embed.2.weight": (c0 // 2,), "patch_embed.2.bias": (c0 // 2,),
                       "patch_embed.5.weight": (c0, c0 // 2, 3, 3), "patch_embed.5.bias": (c0,),
                       "patch_embed.7.weight": (c0,), "patch_embed.7.bias": (c0,)})
    for i, (depth, c) in enumerate(zip(depths, dims)):
        d, rank, hidden = int(ssm_ratio * c), -(-c // 16), int(ffn_ratio * c)
        for j in range(depth):
            p = f"layers.{i}.blocks.{j}."
            shapes.update({
                p + "norm.weight": (c,), p + "norm.bias": (c,),
                p + "op.x_proj_weight": (2, rank + 2 * d_state, d), p + "op.dt_projs_weight": (2, d, rank),
                p + "op.dt_projs_bias": (2, d), p + "op.A_logs": (2 * d, d_state), p + "op.Ds": (2 * d,),
                p + "op.out_norm.weight": (d,), p + "op.out_norm.bias": (d,),
                p + "op.se.fc.0.weight": (d // 8, d), p + "op.se.fc.2.weight": (d, d // 8),
                p + "op.in_proj.weight": (2 * d if gated else d, c),
                p + "op.conv2d.weight": (d, 1, 3, 3), p + "op.conv2d.bias": (d,),
                p + "op.conv2d_b1.weight": (d, 1, 7, 7), p + "op.conv2d_b1.bias": (d,),
                p + "op.out_proj.weight": (c, d), p + "norm2.weight": (c,), p + "norm2.bias": (c,),
                p + "convFFN.linear1.weight": (hidden, c, 1, 1), p + "convFFN.linear1.bias": (hidden,),
                p + "convFFN.dwc.weight": (hidden, 1, 3, 3), p + "convFFN.dwc.bias": (hidden,),
                p + "convFFN.linear2.weight": (c, hidden, 1, 1), p + "convFFN.linear2.bias": (c,),
            })
        if i + 1 < len(dims):
            p, out = f"layers.{i}.downsample.", dims[i + 1]
            if generation == "v1":
                shapes.update({p + "reduction.weight": (out, 4 * c), p + "norm.weight": (4 * c,),
                               p + "norm.bias": (4 * c,)})
            else:
                shapes.update({p + "1.weight": (out, c, 3, 3), p + "1.bias": (out,), p + "3.weight": (out,),
                               p + "3.bias": (out,)})
    shapes.update({"classifier.norm.weight": (dims[-1],), "classifier.norm.bias": (dims[-1],),
                   "classifier.head.weight": (num_classes, dims[-1]), "classifier.head.bias": (num_classes,)})
    return {k: torch.randn(s, generator=g) for k, s in shapes.items()}


@pytest.mark.parametrize("name,generation,gated,ffn_ratio,ssm_ratio", [
    ("msvmamba_nano", "v1", True, 2.0, 2.0),
    ("test_msvmamba", "v3", False, 4.0, 1.0),
    ("msvmamba_v3_base", "v3", True, 4.0, 1.0),
])
def test_official_layout_loads_strictly(name, generation, gated, ffn_ratio, ssm_ratio):
    depths, dims = (1, 2, 1, 1), (16, 32, 48, 64)
    official = _official_state_dict(depths, dims, ssm_ratio, 1, generation, gated, ffn_ratio, num_classes=10)
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
