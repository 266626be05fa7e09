"""timm's model contract, as timm's own tests/test_models.py applies it, for every registered backbone.

Cheap checks (pretrained cfg, first conv and classifier names, feature info) run on every name, built on
the meta device; forward checks run on the small ``test_*`` variants of every family. A family added to
``backbones`` is picked up here automatically.
"""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

import backbones

ALL = backbones.list_backbones()
SMALL = [name for name in ALL if name.startswith("test_")]
FAMILIES = {backbones.family_of(name).__name__ for name in ALL}


def build(name: str, meta: bool = False, **kwargs) -> nn.Module:
    if meta:
        with torch.device("meta"):
            return timm.create_model(name, **kwargs)
    torch.manual_seed(0)
    return timm.create_model(name, **kwargs).eval()


def test_every_family_has_a_small_test_variant():
    assert {backbones.family_of(name).__name__ for name in SMALL} == FAMILIES


@pytest.mark.parametrize("name", ALL)
def test_pretrained_cfg_names_real_modules(name):
    model = build(name, meta=True)
    cfg = model.pretrained_cfg
    for field in ("mean", "std", "input_size", "crop_pct", "interpolation", "license", "paper_ids"):
        assert cfg.get(field), f"{name}: pretrained_cfg lacks {field}"
    first_conv = model.get_submodule(cfg["first_conv"])
    assert isinstance(first_conv, nn.Conv2d) and first_conv.in_channels == 3
    classifiers = cfg["classifier"] if isinstance(cfg["classifier"], (tuple, list)) else [cfg["classifier"]]
    for classifier in classifiers:
        layer = model.get_submodule(classifier)
        assert isinstance(layer, nn.Linear) and layer.out_features == cfg["num_classes"]
        assert layer.in_features == model.num_features
    assert model.head_hidden_size == model.num_features
    assert len(model.feature_info) >= 1


@pytest.mark.parametrize("name", SMALL)
def test_forward_head_and_classifier_reset(name):
    model = build(name)
    size = model.pretrained_cfg["input_size"][1:]
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        assert model(x).shape == (2, model.pretrained_cfg["num_classes"])
        features = model.forward_features(x)
        pooled = model.forward_head(features, pre_logits=True)
        assert pooled.shape == (2, model.num_features)
        model.reset_classifier(0)
        torch.testing.assert_close(model(x), pooled)
        model.reset_classifier(5)
        assert model(x).shape == (2, 5)
        model.reset_classifier(0, "")
        torch.testing.assert_close(model(x), features)


@pytest.mark.parametrize("name", SMALL)
def test_features_only_matches_feature_info_and_forward_intermediates(name):
    model = build(name, features_only=True)
    size = model.pretrained_cfg["input_size"][1:] if hasattr(model, "pretrained_cfg") else (32, 32)
    x = torch.randn(1, 3, 64, 64) if min(size) < 64 else torch.randn(1, 3, *size)
    with torch.no_grad():
        features = model(x)
    assert [f.shape[1] for f in features] == model.feature_info.channels()
    assert [x.shape[-1] // f.shape[-1] for f in features] == model.feature_info.reduction()
    subset = build(name, features_only=True, out_indices=(1, len(features) - 1))
    with torch.no_grad():
        picked = subset(x)
    assert [f.shape for f in picked] == [features[1].shape, features[-1].shape]
    full = build(name)
    with torch.no_grad():
        intermediates = full.forward_intermediates(x, intermediates_only=True)
    assert len(intermediates) == len(full.feature_info)


@pytest.mark.parametrize("name", SMALL)
def test_gradient_checkpointing_keeps_the_output_and_trains(name):
    model = build(name)
    x = torch.randn(2, 3, *model.pretrained_cfg["input_size"][1:])
    with torch.no_grad():
        expected = model(x)
    model.set_grad_checkpointing(True)
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected)
    model.train()
    out = model(x)
    (sum(o.sum() for o in out) if isinstance(out, tuple) else out.sum()).backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert sum(g is not None for g in grads) > 0.9 * len(grads)


@pytest.mark.parametrize("name", SMALL)
def test_group_matcher_and_no_weight_decay_name_real_parameters(name):
    model = build(name, meta=True)
    names = {n for n, _ in model.named_parameters()}
    assert model.no_weight_decay() <= names
    matcher = model.group_matcher()
    assert "stem" in matcher and "blocks" in matcher
