"""Multi-Head Scan (MHS-VM): route tables, the route-table scan pattern, scan route attention, the mixer, the
paper's parameter counts and its ISIC experiment."""

from __future__ import annotations

import hashlib
from functools import partial

import hydra
import pytest
import torch
from torch import nn

import backbones
from backbones.layers import VSSBlock
from backbones.mhs import MHS_ROUTES, MultiHeadScan, MultiHeadScanMixer, ScanHead, ScanRouteAttention
from backbones.scan_patterns import RouteTable
from heads.vmunet import VMUNetDecoder
from tests.conftest import compose_config, run_cli
from tests.medical_fixtures import make_isic

SIZES = [(1, 1), (1, 5), (4, 1), (2, 3), (5, 5), (6, 9), (8, 8), (7, 4)]

# sha256 of the official route tables (routedicts/route_dict_4l.pth of PixDeep/MHS-VM: the 8 routes C0 C1 X0 X1
# S0 S1 Z0 Z1 of each level of a 256x256 input, as little-endian int64), read once from the released file.
OFFICIAL_ROUTE_SHA256 = {
    64: "a223dfc2ac27fbf30c7c1be87f10d6c5448ce2d72670ddb978fcfb3dc169404d",
    32: "14a2c3a8e43f497fd294aa6abf0711b558d6c2ecbaf50aaeb7e308ada536813e",
    16: "780d229c5df872e3a7ef1245fbdc94835bb0f17737403af6e02ce68c632e5a11",
    8: "ac24e5e07a3cd32b7eaa76aa9b7d777b9012e963912c3e3a44ae387220869b84",
}


def n_params(*modules: nn.Module) -> int:
    return sum(p.numel() for m in modules for p in m.parameters())


# ---------------------------------------------------------------- routes

@pytest.mark.parametrize("letter", sorted(MHS_ROUTES))
@pytest.mark.parametrize("size", SIZES)
def test_every_route_visits_each_pixel_exactly_once(letter, size):
    height, width = size
    routes = MHS_ROUTES[letter](height, width)
    assert routes.shape == (2, height * width)
    for route in routes:
        assert torch.equal(route.sort().values, torch.arange(height * width))
    sources = RouteTable(MHS_ROUTES[letter]).sources(size, torch.device("cpu"))
    assert sources.shape == (4, height * width)
    assert torch.equal(sources[1], sources[0].flip(0)) and torch.equal(sources[3], sources[2].flip(0))


def test_routes_on_a_3x4_map_follow_the_paper_figure():
    # pixel numbers, row-major:   0  1  2  3 /  4  5  6  7 /  8  9 10 11
    assert MHS_ROUTES["C"](3, 4).tolist() == [[0, 1, 2, 3, 7, 6, 5, 4, 8, 9, 10, 11],
                                              [0, 4, 8, 9, 5, 1, 2, 6, 10, 11, 7, 3]]
    assert MHS_ROUTES["X"](3, 4).tolist() == [[0, 1, 4, 8, 5, 2, 3, 6, 9, 10, 7, 11],
                                              [3, 2, 7, 11, 6, 1, 0, 5, 10, 9, 4, 8]]
    assert MHS_ROUTES["S"](3, 4).tolist() == [[0, 1, 2, 3, 7, 11, 10, 9, 8, 4, 5, 6],
                                              [8, 9, 10, 11, 7, 3, 2, 1, 0, 4, 5, 6]]
    assert MHS_ROUTES["Z"](3, 4).tolist() == [list(range(12)), [0, 4, 8, 1, 5, 9, 2, 6, 10, 3, 7, 11]]


@pytest.mark.parametrize("size", sorted(OFFICIAL_ROUTE_SHA256))
def test_routes_equal_the_official_precomputed_tables(size):
    table = torch.cat([MHS_ROUTES[letter](size, size) for letter in "CXSZ"])
    digest = hashlib.sha256(table.numpy().astype("<i8").tobytes()).hexdigest()
    assert digest == OFFICIAL_ROUTE_SHA256[size]


def test_a_route_function_that_repeats_a_pixel_is_refused_by_name():
    def broken_routes(height: int, width: int) -> torch.Tensor:
        return torch.zeros(1, height * width, dtype=torch.long)

    pattern = RouteTable(broken_routes)
    assert pattern.num_routes == 2
    with pytest.raises(ValueError, match="broken_routes.*exactly once"):
        pattern.scan(torch.zeros(1, 2, 2, 3))


# ---------------------------------------------------------------- the route-table pattern

@pytest.mark.parametrize("letter", sorted(MHS_ROUTES))
def test_scan_and_merge_are_adjoint(letter):
    pattern = RouteTable(MHS_ROUTES[letter])
    x = torch.randn(2, 3, 5, 7, dtype=torch.float64)
    y = torch.randn(2, 4, 3, 35, dtype=torch.float64)
    assert torch.allclose((pattern.scan(x) * y).sum(), (x * pattern.merge(y, (5, 7))).sum(), rtol=1e-12, atol=0)


@pytest.mark.parametrize("letter", sorted(MHS_ROUTES))
def test_unscan_brings_every_route_back_to_row_major_order(letter):
    pattern = RouteTable(MHS_ROUTES[letter])
    x = torch.randn(2, 3, 6, 4)
    scanned = pattern.scan(x)
    assert scanned.shape == (2, 4, 3, 24)
    assert torch.equal(pattern.unscan(scanned, (6, 4)), x.flatten(2)[:, None].expand(2, 4, 3, 24))
    route = MHS_ROUTES[letter](6, 4)[1]
    assert torch.equal(scanned[:, 2], x.flatten(2)[..., route])  # route 1, forwards
    assert torch.equal(scanned[:, 3], x.flatten(2)[..., route.flip(0)])  # route 1, reversed


# ---------------------------------------------------------------- scan route attention

def reference_sra(y: torch.Tensor, threshold: float, eps: float = 1e-5) -> torch.Tensor:
    """The official GFU written out in float64: sum_k y_k * max(std_k / (mean_k(y_k - min_j y_j) + eps) - t, 0)."""
    y = y.double()
    routes = y.shape[1]
    mean = y.sum(1) / routes
    std = (((y - mean[:, None]) ** 2).sum(1) / (routes - 1)).sqrt()
    shifted_mean = (y - y.min(1, keepdim=True).values).sum(1) / routes
    return y.sum(1) * (std / (shifted_mean + eps) - threshold).clamp(min=0)


@pytest.mark.parametrize("threshold", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("scale", [1.0, 1e-5])  # at 1e-5 the eps is as large as the spread: a wrong eps shows
def test_scan_route_attention_matches_a_float64_computation(threshold, scale):
    torch.manual_seed(0)
    y = torch.randn(2, 4, 6, 50) * scale
    out = ScanRouteAttention(threshold)(y)
    expected = reference_sra(y, threshold)
    # cv is below K, so float32 rounding stays near 1e-6 of the largest output; 1e-5 leaves a 10x margin.
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())
    cut = expected == 0
    assert torch.equal(out[cut], torch.zeros_like(out[cut]))
    if scale == 1.0:  # eps negligible: for K = 4 routes that differ cv >= sqrt(K) / (K - 1) = 2/3 (one route low,
        # three equal), so the official thresholds (0, 0.4, 0.5) damp but never cut; 1 cuts where routes nearly agree
        assert cut.any() == (threshold == 1.0)


def test_scan_route_attention_of_agreeing_routes_is_zero():
    y = torch.randn(1, 1, 3, 8).expand(1, 4, 3, 8)
    assert torch.equal(ScanRouteAttention()(y), torch.zeros(1, 3, 8))


# ---------------------------------------------------------------- the MHS module and mixer

def test_a_head_equals_scanning_each_route_and_its_reverse_by_hand():
    """The official ScanRoutes/ReArrange order: gather route r, flip it, scan both, flip back, invert the route."""
    torch.manual_seed(0)
    head = ScanHead(6, MHS_ROUTES["S"], d_state=4, sra_threshold=0.2)
    x = torch.randn(2, 6, 5, 7)
    flat, routes = x.flatten(2), MHS_ROUTES["S"](5, 7)
    ys = head.ssm(torch.stack([seq for route in routes for seq in (flat[..., route], flat[..., route].flip(-1))], 1))
    back = []
    for k, route in enumerate(routes):
        inverse = torch.empty_like(route)
        inverse[route] = torch.arange(route.numel())
        back += [ys[:, 2 * k][..., inverse], ys[:, 2 * k + 1].flip(-1)[..., inverse]]
    torch.testing.assert_close(head(x), head.fusion(torch.stack(back, 1)), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("routes, ssm_ratio, gated, with_proj", [
    ("CXSZ", 1.0, True, True), ("CXS", 1.0, True, True), ("XZ", 2.0, False, False)])
def test_mixer_keeps_the_shape_and_trains_every_parameter(routes, ssm_ratio, gated, with_proj):
    torch.manual_seed(0)
    mixer = MultiHeadScanMixer(12, d_state=4, ssm_ratio=ssm_ratio, gated=gated, routes=routes,
                               with_proj=with_proj)
    assert len(mixer.mhs.heads) == len(routes)
    assert mixer.mhs.heads[0].ssm.dt_rank == 1 and mixer.mhs.heads[0].ssm.num_routes == 4
    x = torch.randn(2, 5, 7, 12, requires_grad=True)
    y = mixer(x)
    assert y.shape == x.shape
    y.square().mean().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in mixer.parameters())


def test_mhs_module_sizes_its_heads_as_the_official_code():
    mhs = MultiHeadScan(96, "CXSZ")
    assert mhs.head_dim == 24 and mhs.subspace_proj.weight.shape == (96, 96)
    assert mhs.heads[0].ssm.x_proj_weight.shape == (4, 2 + 2 * 16, 24)  # dt rank ceil(24 / 16) = 2
    three = MultiHeadScan(768, "CXS")
    assert three.head_dim == 256 and three.heads[2].ssm.dt_projs_weight.shape == (4, 256, 16)
    assert MultiHeadScan(100, "CXS").subspace_proj.weight.shape == (99, 100)  # d // h channels per head


def test_bad_route_letters_and_uneven_heads_without_projection_are_refused():
    with pytest.raises(ValueError, match="unknown \\['Q'\\]"):
        MultiHeadScan(12, "CQ")
    with pytest.raises(ValueError, match="routes=''"):
        MultiHeadScan(12, "")
    with pytest.raises(ValueError, match="with_proj=False"):
        MultiHeadScan(10, "CXS", with_proj=False)


# ---------------------------------------------------------------- the paper's model

def mhs_vm(routes: str) -> tuple[nn.Module, nn.Module]:
    encoder = backbones.create_backbone("mhs_vmamba_tiny", features_only=True, stage_inputs=True, routes=routes)
    block = partial(VSSBlock, mlp_ratio=0.0, d_state=16, ssm_ratio=1.0, gated=True, conv_bias=True,
                    mixer_layer=partial(MultiHeadScanMixer, routes=routes))
    return encoder, VMUNetDecoder(encoder.feature_info.channels(), encoder.feature_info.reduction(), 1, block=block)


@pytest.mark.parametrize("routes, millions", [("CXSZ", 17.26), ("CXS", 17.39)])
def test_mhs_vm_has_the_official_parameter_count(routes, millions):
    """Official (PixDeep/MHS-VM at 256x256, 1 class, counted once per tensor): 4 heads 17.26 M, 3 heads 17.39 M.

    The official state dict lists some tensors twice -- each head's Mamba parameters under ``mambaeng`` and again
    under ``scanning.seq2seq_engine`` (the scan pattern holds the same module), and the subspace projection as
    ``x_ssproj.weight`` and ``x_ssproj_W`` -- so summing its entries gives ~21.9 M (4 heads); ours has no aliases.
    """
    encoder, head = mhs_vm(routes)
    total = n_params(encoder, head)
    assert round(total / 1e6, 2) == millions
    assert total == sum(t.numel() for m in (encoder, head) for t in m.state_dict().values())


def test_mhs_mixer_is_selectable_in_any_vss_block_from_the_command_line(tmp_path):
    cfg = compose_config(["experiment=isic18_vmunet", "+mixer@head.block.mixer_layer=mhs", "head.block.ssm_ratio=1",
                          "backbone=test_vmamba", "+mixer@backbone.mixer_layer=mhs"], tmp_path)
    encoder = hydra.utils.instantiate(cfg.backbone, features_only=True, stage_inputs=True)
    head = hydra.utils.instantiate(cfg.head, in_channels=encoder.feature_info.channels(),
                                   strides=encoder.feature_info.reduction(), num_classes=1)
    assert all(isinstance(block.mixer, MultiHeadScanMixer) for m in (encoder, head) for block in m.modules()
               if isinstance(block, VSSBlock))
    assert head(encoder(torch.randn(1, 3, 32, 32))).shape == (1, 1, 32, 32)


def test_isic18_mhs_vmunet_fast_dev_run_on_the_isic_format(tmp_path):
    root = make_isic(tmp_path / "isic2018")
    result = run_cli(["experiment=isic18_mhs_vmunet", f"data.root={root}", "trainer.fast_dev_run=true",
                      "data.img_size=32", "data.batch_size=2", "data.num_workers=0", "print_config=false",
                      f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert "Total params: 17.3 M" in output  # the 4-head MHS-VM, encoder and decoder
    assert "lesion" in output and "test/pixel_DSC" in output
    config = (tmp_path / "run" / "config.yaml").read_text()
    assert "name: mhs_vmamba_tiny" in config and "backbones.mhs.MultiHeadScanMixer" in config
    assert "sra_threshold: 0.5" in config


def test_weights_in_our_layout_pass_the_checkpoint_filter_unchanged():
    """(Official MHS-VM files: tests/test_convert_vmunet.py.)"""
    from backbones.mhs import checkpoint_filter_fn

    model = backbones.create_backbone("test_mhs_vmamba")
    state = model.state_dict()
    converted = checkpoint_filter_fn({"state_dict": state}, model)
    assert converted.keys() == state.keys() and all(converted[k] is state[k] for k in state)
