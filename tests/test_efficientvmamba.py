"""EfficientVMamba: odd sizes, the atrous scan against explicit indexing, the EVSS block's shared attention,
and conversion of the released key layout. Counts and features: test_timm_contract."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F

import backbones  # noqa: F401  (registers the models)
from backbones.efficientvmamba import BiAttn, EVSSBlock, checkpoint_filter_fn, rename_official_key
from backbones.scan_patterns import AtrousScan
from tests.official import efficientvmamba_official


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


def test_released_layout_loads_strictly():
    depths, dims = (1, 2, 2, 1), (16, 32, 64, 128)
    official = efficientvmamba_official(depths, dims, d_state=2, num_classes=10)
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
