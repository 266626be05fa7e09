"""timm's model contract, as timm's own tests/test_models.py applies it, for every registered backbone, and
what every family promises besides: the official parameter counts (one table) and the feature levels.

Cheap checks (pretrained cfg, first conv and classifier names, feature info, pool size, parameter counts) run
on every name, built on the meta device; forward/backward checks run on the small variants (``test_*`` of
every family and ``vmamba_femto``). A family added to ``backbones`` is picked up here automatically, and
these tests fail until its official counts and its test variant's feature widths are in the tables below.
``make test-timm`` runs timm's file itself on every model; this one keeps what timm's does not check.
"""

from __future__ import annotations

import ast
import inspect
import math
import sys

import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.models import FeatureInfo, save_for_hf
from torch import nn

import backbones
from backbones.ss2d import RouteSSM

ALL = backbones.list_backbones()
SMALL = [name for name in ALL if name.startswith("test_") or name == "vmamba_femto"]
FAMILIES = {backbones.family_of(name).__name__ for name in ALL}
UNOFFICIAL = {"vmamba_femto"}  # registered for CPU demos, not an official release

# Official parameter counts in millions: (variant, model arguments, count). Within 0.5 %: the published
# counts are rounded to three or four significant figures.
OFFICIAL_PARAMS = [
    # VMamba: MzeroMiko/VMamba README and builds of the official code.
    ("vanilla_vmamba_tiny", {}, 22.89),
    ("vmamba_tiny_s2l5", {}, 30.71),
    ("vmamba_small_s2l15", {}, 50.15),
    ("vmamba_base_s2l15", {}, 88.56),
    ("vmamba_tiny_s1l8", {}, 30.25),
    # MSVMamba v1: master-branch yaml comments (6.86 / 11.88) and a build of the official code (33.05; yaml
    # comment 33.08); v3: builds of the official v2-branch code.
    ("msvmamba_nano", {}, 6.86),
    ("msvmamba_micro", {}, 11.88),
    ("msvmamba_tiny", {}, 33.05),
    ("msvmamba_v3_tiny", {}, 32.26),
    ("msvmamba_v3_small", {}, 50.22),
    ("msvmamba_v3_base", {}, 90.59),
    # EfficientVMamba: the released models' training logs (GitHub release v1.0.0,
    # log_efficient_vmamba_{tiny,small,base}.txt: "params: 6.494 M / 11.274 M / 33.717 M").
    ("efficientvmamba_tiny", {}, 6.494),
    ("efficientvmamba_small", {}, 11.274),
    ("efficientvmamba_base", {}, 33.717),
    # GroupMamba, with the distillation head: builds of Amshaker/GroupMamba classification/models/groupmamba.py
    # (23,361,917 / 34,781,555 / 57,150,838; README: 23 M / 34 M / 57 M).
    ("groupmamba_tiny", {}, 23.361917),
    ("groupmamba_small", {}, 34.781555),
    ("groupmamba_base", {}, 57.150838),
    # HRVMamba, built from zhanghao5201/HRVMamba with the DCNv4 build the models were trained with (no
    # value/output projections): pose backbones from pose_estimation/configs/cocofinal/
    # td-hm_hrvmamba_{tiny,small,base}_*_coco-256x192.py (README: 2 M / 8 M / 47 M), classifiers from
    # classification/models/build.py (README: 20 M / 61 M).
    ("hrvmamba_tiny", dict(features_only=True, multiscale_output=False), 2.151008),
    ("hrvmamba_small", dict(features_only=True, multiscale_output=False), 8.033840),
    ("hrvmamba_base", dict(features_only=True, multiscale_output=False), 47.099616),
    ("hrvmamba_small", {}, 20.101976),
    ("hrvmamba_base", {}, 60.548520),
    # Vim: builds of hustvl/Vim's models (README: 7 / 26 / 98 M).
    ("vim_tiny_patch16_224", {}, 7.148),
    ("vim_small_patch16_224", {}, 25.797),
    ("vim_base_patch16_224", {}, 97.598),
    ("vim_tiny_patch16_stride8_224", {}, 7.250),
    ("vim_small_patch16_stride8_224", {}, 26.001),
]
# Official counts of a whole model rather than its backbone, checked where that model is built.
COUNTED_WITH_THE_DECODER = {
    "mhs_vmamba_tiny": "tests/test_mhs.py: MHS-VM's 17.26 M (4 heads) / 17.39 M (3 heads) are of the encoder "
                       "with its MHS VM-UNet decoder; no encoder-only count is published",
}

# Channels of the four feature levels (strides 4, 8, 16, 32) of each family's test variant.
TEST_VARIANT_WIDTHS = {
    "test_vmamba": [8, 16, 32, 64],
    "test_msvmamba": [8, 16, 32, 64],
    "test_efficientvmamba": [8, 16, 32, 64],
    "test_groupmamba": [16, 16, 32, 32],
    "test_hrvmamba": [8, 16, 16, 32],
    "test_vim": [16, 16, 16, 16],
    "test_mhs_vmamba": [12, 24, 48, 96],  # features_only adds the stride-4/8/16/32 pyramid over the taps
}


def build(name: str, meta: bool = False, **kwargs) -> nn.Module:
    if meta:
        with torch.device("meta"):
            return timm.create_model(name, **kwargs)
    torch.manual_seed(0)
    return timm.create_model(name, **kwargs).eval()


def _input(model: nn.Module, batch: int = 2, in_chans: int = 3) -> torch.Tensor:
    return torch.randn(batch, in_chans, *model.pretrained_cfg["input_size"][1:])


def _as_tensor(out) -> torch.Tensor:
    return torch.cat(out) if isinstance(out, tuple) else out


def test_every_family_has_a_small_test_variant():
    assert {backbones.family_of(name).__name__ for name in SMALL if name.startswith("test_")} == FAMILIES


def test_family_files_import_parts_never_each_other():
    families = {name.rsplit(".", 1)[-1] for name in FAMILIES}
    for family in FAMILIES:
        tree = ast.parse(inspect.getsource(sys.modules[family]))
        imported = {node.module.rsplit(".", 1)[-1] for node in ast.walk(tree)
                    if isinstance(node, ast.ImportFrom) and node.module}
        assert not imported & families, f"{family} imports {imported & families}"


@pytest.mark.parametrize("name", SMALL)
def test_unknown_global_pool_is_refused_at_build_and_reset(name):
    with pytest.raises(ValueError, match="global_pool must be .*'avg'.*got 'max'"):
        build(name, meta=True, global_pool="max")
    model = build(name, meta=True)
    with pytest.raises(ValueError, match="global_pool must be"):
        model.reset_classifier(3, "max")


def test_unknown_backbone_lists_choices():
    with pytest.raises(ValueError, match="vmamba_tiny_s1l8"):
        backbones.create_backbone("vmamba_tiny_nope")


def test_every_official_variant_has_its_official_parameter_count():
    official = {name for name in ALL if not name.startswith("test_")} - UNOFFICIAL
    assert {name for name, _, _ in OFFICIAL_PARAMS} | COUNTED_WITH_THE_DECODER.keys() == official


@pytest.mark.parametrize("name,kwargs,millions", OFFICIAL_PARAMS,
                         ids=[name + "".join(f"-{k}" for k in kwargs) for name, kwargs, _ in OFFICIAL_PARAMS])
def test_parameter_count_matches_official(name, kwargs, millions):
    model = build(name, meta=True, **kwargs)
    count = sum(p.numel() for p in model.parameters()) / 1e6
    assert abs(count - millions) / millions < 0.005, count


@pytest.mark.parametrize("name", [name for name in SMALL if name.startswith("test_")])
def test_features_only_gives_four_nchw_levels_at_strides_4_to_32(name):
    model = build(name, features_only=True)
    with torch.no_grad():
        features = model(torch.randn(2, 3, 64, 64))
    widths = TEST_VARIANT_WIDTHS[name]
    assert [f.shape for f in features] == [(2, c, 64 // r, 64 // r) for c, r in zip(widths, (4, 8, 16, 32))]
    assert model.feature_info.reduction() == [4, 8, 16, 32]
    assert model.feature_info.channels() == widths


@pytest.mark.parametrize("name", ALL)
def test_pretrained_cfg_names_real_modules(name):
    model = build(name, meta=True)
    cfg = model.pretrained_cfg
    for field in ("mean", "std", "input_size", "crop_pct", "interpolation", "license", "paper_ids"):
        assert cfg.get(field), f"{name}: pretrained_cfg lacks {field}"
    state = model.state_dict()
    first_conv = model.get_submodule(cfg["first_conv"])
    assert isinstance(first_conv, nn.Conv2d) and first_conv.in_channels == 3
    assert f"{cfg['first_conv']}.weight" in state
    classifiers = cfg["classifier"] if isinstance(cfg["classifier"], (tuple, list)) else [cfg["classifier"]]
    for classifier in classifiers:
        layer = model.get_submodule(classifier)
        assert isinstance(layer, nn.Linear) and layer.out_features == cfg["num_classes"] == model.num_classes
        assert layer.in_features == model.num_features and f"{classifier}.weight" in state
    assert model.num_features > 0 and model.head_hidden_size == model.num_features
    info = FeatureInfo(model.feature_info, list(range(len(model.feature_info))))
    assert len(info) >= 3  # timm: every hierarchical model has at least 3 feature levels
    assert all(model.get_submodule(module) is not None for module in info.module_name())
    if cfg.get("pool_size"):  # the last feature map's size at the default resolution
        assert tuple(cfg["pool_size"]) == tuple(s // info.reduction()[-1] for s in cfg["input_size"][1:])


@pytest.mark.parametrize("name", SMALL)
def test_default_cfg_shapes_head_and_classifier_reset(name):
    """timm's test_model_default_cfgs(_non_std): unpooled features, pre-logits, classifier removal."""
    model = build(name)
    pool_size = model.pretrained_cfg.get("pool_size")
    x = _input(model)
    with torch.no_grad():
        assert model(x).shape == (2, model.pretrained_cfg["num_classes"])
        features = model.forward_features(x)
        if pool_size:
            assert features.shape == (2, model.num_features, *pool_size)
        else:  # token output (B, N, C)
            assert features.shape[-1] == model.num_features
        pooled = model.forward_head(features, pre_logits=True)
        assert pooled.shape == (2, model.head_hidden_size)
        model.reset_classifier(0)
        assert model.num_classes == 0
        torch.testing.assert_close(model(x), pooled)
        model.reset_classifier(5)
        assert model(x).shape == (2, 5)
        model.reset_classifier(0, "")
        torch.testing.assert_close(model(x), features)
        unpooled = build(name, num_classes=0, global_pool="")
        assert unpooled(x).shape == features.shape


@pytest.mark.parametrize("name", SMALL)
def test_backward_reaches_every_parameter(name):
    """timm's test_model_backward: 42 classes, train mode, a gradient for every parameter."""
    model = build(name, num_classes=42).train()
    out = _as_tensor(model(_input(model)))
    assert out.shape[-1] == 42 and not out.isnan().any()
    out.mean().backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []


@pytest.mark.parametrize("name", SMALL)
def test_forward_intermediates_follow_feature_info(name):
    """timm's test_model_forward_intermediates: levels match feature_info, the final output is
    forward_features, index subsets and NHWC agree, gradient checkpointing keeps the output."""
    model = build(name)
    info = FeatureInfo(model.feature_info, list(range(len(model.feature_info))))
    x = _input(model, batch=1)
    with torch.no_grad():
        output, intermediates = model.forward_intermediates(x)
        torch.testing.assert_close(output, model.forward_features(x))
        assert len(intermediates) == len(info)
        for feature, channels, reduction in zip(intermediates, info.channels(), info.reduction()):
            assert feature.shape[:2] == (1, channels)
            assert all(s <= math.ceil(size / reduction) + 1 for s, size in zip(feature.shape[2:], x.shape[2:]))
        last = len(info) - 1
        picked = model.forward_intermediates(x, indices=[1, last], intermediates_only=True)
        assert [torch.equal(a, b) for a, b in zip(picked, [intermediates[1], intermediates[last]])] == [True, True]
        nhwc = model.forward_intermediates(x, output_fmt="NHWC", intermediates_only=True)
        assert all(torch.equal(a.permute(0, 3, 1, 2), b) for a, b in zip(nhwc, intermediates))
        model.set_grad_checkpointing(True)
        torch.testing.assert_close(model.forward_intermediates(x)[0], output, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", SMALL)
def test_features_only_matches_feature_info_and_forward_intermediates(name):
    model = build(name, features_only=True)
    x = _input(model, batch=1)
    with torch.no_grad():
        features = model(x)
    assert len(features) == len(model.feature_info) >= 3
    assert [f.shape[1] for f in features] == model.feature_info.channels()
    assert [x.shape[-1] // f.shape[-1] for f in features] == model.feature_info.reduction()
    last = len(features) - 1
    subset = build(name, features_only=True, out_indices=(1, last))
    assert subset.feature_info.channels() == [model.feature_info.channels()[i] for i in (1, last)]
    assert subset.feature_info.reduction() == [model.feature_info.reduction()[i] for i in (1, last)]
    subset.load_state_dict(model.state_dict(), strict=False)
    with torch.no_grad():
        picked = subset(x)
    torch.testing.assert_close(picked, [features[1], features[last]])
    # The wrapper's maps are the classifier's intermediates when both describe the same levels (Vim's
    # features_only adds a pyramid, so its levels differ from its classifier's), normalised by the same per-level
    # norms where the family's dense backbone has them (VMamba, MSVMamba, EfficientVMamba).
    has_norms = getattr(model.model, "feature_norms", None) is not None
    full = build(name, **({"feature_norms": True} if has_norms else {}))
    full_info = FeatureInfo(full.feature_info, list(range(len(full.feature_info))))
    if (full_info.channels(), full_info.reduction()) == (model.feature_info.channels(), model.feature_info.reduction()):
        full.load_state_dict({k[len("model."):]: v for k, v in model.state_dict().items()}, strict=False)
        with torch.no_grad():
            torch.testing.assert_close(features, full.forward_intermediates(x, intermediates_only=True))


@pytest.mark.parametrize("name", SMALL)
def test_stage_inputs_follow_the_levels_in_staged_families_and_are_refused_by_name_elsewhere(name):
    """``features_only`` with ``stage_inputs=True`` (what VM-UNet's decoder reads): the same levels, then each
    level's stage input, the stage's ``downsample`` of the previous stage's output (of the stem's for the first),
    as the stages compute them in ``forward``. Families whose levels are not such stages refuse it by name."""
    model = build(name, features_only=True)
    if not model.model.has_stage_inputs:
        with pytest.raises(ValueError, match=f"{name}: stage_inputs=True needs a staged backbone"):
            build(name, features_only=True, stage_inputs=True)
        with pytest.raises(ValueError, match="has no stage inputs"):
            model.model.forward_intermediates(_input(model, batch=1), stage_inputs=True)
        return
    with pytest.raises(ValueError, match=f"{name}: stage_inputs=True needs features_only=True"):
        build(name, stage_inputs=True)
    with_inputs = build(name, features_only=True, stage_inputs=True)
    with_inputs.load_state_dict(model.state_dict())
    x = _input(model, batch=1)
    with torch.no_grad():
        levels, maps = model(x), with_inputs(x)
        encoder, stage_inputs, state = with_inputs.model, [], with_inputs.model.stem(x)
        for stage in encoder.stages:
            stage_inputs.append(stage.downsample(state))
            state = stage(state)
        nhwc = encoder.forward_intermediates(x, indices=[1, 3], output_fmt="NHWC", intermediates_only=True,
                                             stage_inputs=True)
    assert len(maps) == 2 * len(levels) == 8
    torch.testing.assert_close(maps[:4], levels, rtol=0, atol=0)
    torch.testing.assert_close(maps[4:], stage_inputs, rtol=0, atol=0)
    assert [f.shape for f in maps[4:]] == [f.shape for f in levels]
    torch.testing.assert_close([f.permute(0, 3, 1, 2) for f in nhwc], [maps[1], maps[3], maps[5], maps[7]],
                               rtol=0, atol=0)


@pytest.mark.parametrize("name", SMALL)
def test_gradient_checkpointing_keeps_the_output_and_trains(name):
    model = build(name)
    x = _input(model)
    with torch.no_grad():
        expected = model(x)
    model.set_grad_checkpointing(True)
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-5)
    model.train()
    _as_tensor(model(x)).sum().backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []


@pytest.mark.parametrize("name", SMALL)
def test_pretrained_weights_adapt_to_other_channels_and_classes(name, tmp_path):
    """timm's test_model_load_pretrained, from a local file: 1-channel input and other classifiers."""
    source = build(name)
    path = tmp_path / "model.safetensors"
    save_file(source.state_dict(), path)
    same = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path))).eval()
    x = _input(source)
    with torch.no_grad():
        torch.testing.assert_close(same(x), source(x), rtol=0, atol=0)
    for num_classes in (5, 0):
        model = timm.create_model(name, pretrained=True, in_chans=1, num_classes=num_classes,
                                  pretrained_cfg_overlay=dict(file=str(path))).eval()
        stem = model.get_submodule(model.pretrained_cfg["first_conv"]).weight
        # timm sums the RGB filters of the stem into the single channel.
        torch.testing.assert_close(stem, source.get_submodule(model.pretrained_cfg["first_conv"]).weight.sum(
            dim=1, keepdim=True))
        with torch.no_grad():
            assert model(_input(model, in_chans=1)).shape == (2, num_classes or model.num_features)


@pytest.mark.parametrize("name", SMALL)
def test_save_for_hf_round_trip(name, tmp_path):
    """timm's Hugging Face layout (what push_to_hf_hub uploads) rebuilds the same network, here for a
    1-channel 7-class model, from ``local-dir:``."""
    model = build(name, in_chans=1, num_classes=7)
    save_for_hf(model, str(tmp_path), safe_serialization=True)
    loaded = timm.create_model(f"local-dir:{tmp_path}", pretrained=True).eval()
    x = _input(model, in_chans=1)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


@pytest.mark.parametrize("name", SMALL)
def test_no_weight_decay_is_exactly_the_ssm_decay_and_skip_parameters(name):
    """Every SSM's A_logs and Ds (the official recipes' no-decay set), and only Vim's position embedding and
    class token besides."""
    model = build(name, meta=True)
    ssm_names = {f"{prefix}.{param}" for prefix, module in model.named_modules() if isinstance(module, RouteSSM)
                 for param in ("A_logs", "Ds")}
    assert ssm_names and model.no_weight_decay() - {"pos_embed", "cls_token"} == ssm_names


@pytest.mark.parametrize("name", SMALL)
def test_group_matcher_and_no_weight_decay_name_real_parameters(name):
    model = build(name, meta=True)
    names = {n for n, _ in model.named_parameters()}
    assert model.no_weight_decay() <= names
    matcher = model.group_matcher()
    assert "stem" in matcher and "blocks" in matcher
    groups = timm.models.group_parameters(model, matcher)
    assert set().union(*groups.values()) == names
