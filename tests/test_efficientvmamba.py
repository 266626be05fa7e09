"""EfficientVMamba: official parameter counts, features, the atrous scan against explicit indexing,
the EVSS block's shared attention, and conversion of the released key layout."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F

import backbones  # noqa: F401  (registers the models)
from backbones.efficientvmamba import BiAttn, EVSSBlock, checkpoint_filter_fn, rename_official_key
from backbones.scan_patterns import AtrousScan

# Official counts in millions, from the released models' training logs (GitHub release v1.0.0,
# log_efficient_vmamba_{tiny,small,base}.txt: "params: 6.494 M / 11.274 M / 33.717 M").
OFFICIAL_PARAMS = {"efficientvmamba_tiny": 6.494, "efficientvmamba_small": 11.274, "efficientvmamba_base": 33.717}


@pytest.mark.parametrize("name", sorted(OFFICIAL_PARAMS))
def test_parameter_count_matches_official(name):
    with torch.device("meta"):
        model = timm.create_model(name)
    count = sum(p.numel() for p in model.parameters()) / 1e6
    assert abs(count - OFFICIAL_PARAMS[name]) / OFFICIAL_PARAMS[name] < 0.005, count


def test_features_are_four_nchw_stages():
    model = timm.create_model("test_efficientvmamba", features_only=True)
    features = model(torch.randn(2, 3, 64, 64))
    assert [f.shape for f in features] == [(2, 8, 16, 16), (2, 16, 8, 8), (2, 32, 4, 4), (2, 64, 2, 2)]
    assert model.feature_info.reduction() == [4, 8, 16, 32]
    assert model.feature_info.channels() == [8, 16, 32, 64]


def test_forward_backward_odd_sizes_and_one_channel():
    model = timm.create_model("test_efficientvmamba", in_chans=1, num_classes=3, drop_path_rate=0.1)
    out = model(torch.randn(2, 1, 30, 26))  # stage maps 7x6 and 4x3: odd sizes reach the atrous scan
    assert out.shape == (2, 3)
    out.square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def _explicit_atrous_routes(x):
    """Route k, position t -> pixel, by explicit index lists over the even-padded map (padding reads 0)."""
    _, _, height, width = x.shape
    rows, cols = (height + 1) // 2, (width + 1) // 2
    orders = [
        [(2 * i, 2 * j) for i in range(rows) for j in range(cols)],  # even rows, even cols, row-major
        [(2 * i + 1, 2 * j) for j in range(cols) for i in range(rows)],  # odd rows, even cols, column-major
        [(2 * i, 2 * j + 1) for i in range(rows) for j in range(cols)],  # even rows, odd cols, row-major
        [(2 * i + 1, 2 * j + 1) for j in range(cols) for i in range(rows)],  # odd rows, odd cols, column-major
    ]
    zero = torch.zeros_like(x[:, :, 0, 0])
    pick = lambda i, j: x[:, :, i, j] if i < height and j < width else zero  # noqa: E731
    return torch.stack([torch.stack([pick(i, j) for i, j in order], dim=-1) for order in orders], dim=1)


@pytest.mark.parametrize("size", [(4, 6), (5, 7), (1, 1), (3, 2)])
def test_atrous_scan_matches_explicit_indexing_and_merge_is_its_adjoint(size):
    x = torch.randn(2, 3, *size)
    pattern = AtrousScan()
    routes = pattern.scan(x)
    torch.testing.assert_close(routes, _explicit_atrous_routes(x))
    # Every pixel is on exactly one route, so merge (scatter, no sum) undoes scan ...
    torch.testing.assert_close(pattern.merge(routes, size), x)
    # ... and is its adjoint: <scan(x), y> == <x, merge(y)>.
    y = torch.randn_like(routes)
    torch.testing.assert_close((routes * y).sum(), (x * pattern.merge(y, size)).sum())


def test_bi_attn_scales_channels_by_a_gate_of_the_normalised_mean():
    torch.manual_seed(0)
    attn = BiAttn(16)
    x = torch.randn(2, 3, 5, 16)
    pooled = F.layer_norm(x, (16,), attn.norm.weight, attn.norm.bias).mean(dim=(1, 2))
    gate = torch.sigmoid(attn.channel_select(F.gelu(attn.global_reduce(pooled))))
    torch.testing.assert_close(attn(x), x * gate[:, None, None, :])


def test_evss_block_applies_one_shared_attention_to_both_branches():
    block = EVSSBlock(8, d_state=2).eval()
    calls = []
    block.attn.register_forward_hook(lambda module, inputs, output: calls.append(inputs[0]))
    x = torch.randn(2, 5, 6, 8)
    out = block(x)
    assert len(calls) == 2 and sum(isinstance(m, BiAttn) for m in block.modules()) == 1
    with torch.no_grad():
        normed = block.norm1(x)
        local = block.conv_branch(normed.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        torch.testing.assert_close(calls[0], block.mixer(normed))
        torch.testing.assert_close(calls[1], local)
        torch.testing.assert_close(out, x + block.attn(block.mixer(normed)) + block.attn(local))


# Official key -> shape for EfficientVMamba-T, measured from the official build (reference notes) and
# derived from the released layout (stage-2 inverted residuals at layers.2.1..4, downsample at layers.2.6).
OFFICIAL_TINY_KEYS = {
    "layers.0.blocks.0.op.x_proj_weight": (4, 35, 96),
    "layers.0.blocks.0.op.dt_projs_weight": (4, 96, 3),
    "layers.0.blocks.0.op.A_logs": (384, 16),
    "layers.0.blocks.0.op.in_proj.weight": (192, 48),
    "layers.0.blocks.0.se.global_reduce.weight": (6, 48),
    "layers.0.blocks.0.conv_branch.1.running_var": (48,),
    "layers.1.downsample.reduction.weight": (192, 384),
    "layers.2.1.conv_pw.0.weight": (768, 192, 1, 1),
    "layers.2.4.se.conv_reduce.weight": (96, 768, 1, 1),
    "layers.2.6.reduction.weight": (384, 768),
    "layers.3.2.conv_pw2.1.running_mean": (384,),
    "patch_embed.0.weight": (48, 3, 4, 4),
}


def test_official_keys_map_to_parameters_of_the_same_shape():
    with torch.device("meta"):
        ours = timm.create_model("efficientvmamba_tiny").state_dict()
    for key, shape in OFFICIAL_TINY_KEYS.items():
        assert ours[rename_official_key(key)].shape == shape, key


def _official_state_dict(depths, dims, d_state=16, ssm_ratio=2.0, num_classes=1000):
    """A released-layout state dict, written from the official module structure (names and shapes)."""
    g = torch.Generator().manual_seed(0)
    bn = lambda p, c: {p + "weight": (c,), p + "bias": (c,), p + "running_mean": (c,), p + "running_var": (c,),  # noqa: E731
                       p + "num_batches_tracked": ()}
    shapes = {"patch_embed.0.weight": (dims[0], 3, 4, 4), "patch_embed.0.bias": (dims[0],),
              "patch_embed.2.weight": (dims[0],), "patch_embed.2.bias": (dims[0],)}
    for i, (depth, c) in enumerate(zip(depths, dims)):
        if i < 2:
            d, rank = int(ssm_ratio * c), -(-c // 16)
            for j in range(depth):
                p = f"layers.{i}.blocks.{j}."
                shapes.update({
                    p + "norm.weight": (c,), p + "norm.bias": (c,),
                    p + "op.x_proj_weight": (4, rank + 2 * d_state, d), p + "op.dt_projs_weight": (4, d, rank),
                    p + "op.dt_projs_bias": (4, d), p + "op.A_logs": (4 * d, d_state), p + "op.Ds": (4 * d,),
                    p + "op.out_norm.weight": (d,), p + "op.out_norm.bias": (d,), p + "op.in_proj.weight": (2 * d, c),
                    p + "op.conv2d.weight": (d, 1, 3, 3), p + "op.conv2d.bias": (d,), p + "op.out_proj.weight": (c, d),
                    p + "conv_branch.0.weight": (c, 1, 3, 3), p + "conv_branch.0.bias": (c,),
                    p + "conv_branch.3.weight": (c, c, 1, 1), p + "conv_branch.3.bias": (c,),
                    p + "se.norm.weight": (c,), p + "se.norm.bias": (c,),
                    p + "se.global_reduce.weight": (c // 8, c), p + "se.global_reduce.bias": (c // 8,),
                    p + "se.channel_select.weight": (c, c // 8), p + "se.channel_select.bias": (c,),
                    **bn(p + "conv_branch.1.", c),
                })
            down = f"layers.{i}.downsample."
        else:
            mid = 4 * c
            for j in range(1, depth + 1):
                p = f"layers.{i}.{j}."
                shapes.update({
                    p + "conv_pw.0.weight": (mid, c, 1, 1), **bn(p + "conv_pw.1.", mid),
                    p + "conv_dw.0.weight": (mid, 1, 3, 3), **bn(p + "conv_dw.1.", mid),
                    p + "se.conv_reduce.weight": (mid // 8, mid, 1, 1), p + "se.conv_reduce.bias": (mid // 8,),
                    p + "se.conv_expand.weight": (mid, mid // 8, 1, 1), p + "se.conv_expand.bias": (mid,),
                    p + "conv_pw2.0.weight": (c, mid, 1, 1), **bn(p + "conv_pw2.1.", c),
                })
            down = f"layers.{i}.{depth + 2}."
        if i + 1 < len(dims):
            shapes.update({down + "reduction.weight": (dims[i + 1], 4 * c), down + "norm.weight": (4 * c,),
                           down + "norm.bias": (4 * c,)})
    shapes.update({"classifier.norm.weight": (dims[-1],), "classifier.norm.bias": (dims[-1],),
                   "classifier.head.weight": (num_classes, dims[-1]), "classifier.head.bias": (num_classes,)})
    return {k: (torch.randn(s, generator=g) if s else torch.tensor(7)) for k, s in shapes.items()}


def test_released_layout_loads_strictly():
    depths, dims = (1, 2, 2, 1), (16, 32, 64, 128)
    official = _official_state_dict(depths, dims, d_state=2, num_classes=10)
    model = timm.create_model("test_efficientvmamba", depths=depths, dims=dims, num_classes=10)
    # The released checkpoints come from a DDP-wrapped trainer.
    converted = checkpoint_filter_fn({"state_dict": {"module.module." + k: v for k, v in official.items()}}, model)
    model.load_state_dict(converted, strict=True)
    block = model.stages[2].blocks[1]
    torch.testing.assert_close(block.bn1.running_var, official["layers.2.2.conv_pw.1.running_var"])
    torch.testing.assert_close(block.conv_pwl.weight, official["layers.2.2.conv_pw2.0.weight"])
    torch.testing.assert_close(model.stages[3].downsample.reduction.weight, official["layers.2.4.reduction.weight"])
    torch.testing.assert_close(model.stages[1].blocks[1].mixer.ssm.A_logs, official["layers.1.blocks.1.op.A_logs"])
    torch.testing.assert_close(model.stages[0].blocks[0].attn.channel_select.bias,
                               official["layers.0.blocks.0.se.channel_select.bias"])
    assert model.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 10)
    assert checkpoint_filter_fn(model.state_dict(), model).keys() == model.state_dict().keys()
