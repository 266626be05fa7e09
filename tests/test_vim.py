"""Vim: the bidirectional mixer and the whole model against a float64 reference written from the released
models' maths on official-layout weights, the released models' token grids, middle class token and position
embedding resampling, checkpoint conversion, dense features. Counts and feature levels: test_timm_contract."""

from __future__ import annotations

import pytest
import timm
import torch

import backbones  # noqa: F401  (registers the models)
from backbones.vim import VisionMamba, checkpoint_filter_fn, resample_pos_embed
from tests.official import VIM_D_STATE, VIM_DEPTH, VIM_DIM, vim_official, vim_reference_mixer, vim_reference_model

IMG = 32


@pytest.mark.parametrize("name", ["vim_tiny_patch16_224", "vim_small_patch16_224", "vim_base_patch16_224",
                                  "vim_tiny_patch16_stride8_224", "vim_small_patch16_stride8_224"])
def test_released_models_token_grid_and_position_embedding(name):
    with torch.device("meta"):
        model = timm.create_model(name)
    side = 27 if "stride8" in name else 14  # (224 - 16) // stride + 1
    assert model.grid == (side, side) and model.pos_embed.shape[1] == side * side + 1


def converted_model(**kwargs) -> VisionMamba:
    model = VisionMamba(img_size=IMG, embed_dim=VIM_DIM, depth=VIM_DEPTH, d_state=VIM_D_STATE, num_classes=5,
                        drop_path_rate=0.0, **kwargs).eval()
    model.load_state_dict(checkpoint_filter_fn({"model": vim_official(), "args": None}, model), strict=True)
    return model


def test_mixer_on_converted_weights_matches_the_official_bidirectional_maths():
    sd = vim_official()
    model = converted_model()
    x = torch.randn(2, 7, VIM_DIM)
    with torch.no_grad():
        ours = model.layers[1].mixer(x)
    torch.testing.assert_close(ours.double(), vim_reference_mixer(sd, "layers.1.mixer.", x), rtol=1e-5, atol=1e-5)


def test_whole_model_on_converted_weights_matches_the_official_forward():
    images = torch.randn(2, 3, IMG, IMG)
    with torch.no_grad():
        ours = converted_model()(images)
    torch.testing.assert_close(ours.double(), vim_reference_model(vim_official(), images), rtol=1e-4, atol=1e-5)


def test_conversion_stacks_forward_then_backward_direction():
    sd = vim_official()
    converted = checkpoint_filter_fn(sd, converted_model())
    d_inner = 2 * VIM_DIM
    assert torch.equal(converted["layers.0.mixer.ssm.A_logs"][d_inner:], sd["layers.0.mixer.A_b_log"])
    assert torch.equal(converted["layers.0.mixer.ssm.x_proj_weight"][0], sd["layers.0.mixer.x_proj.weight"])
    assert torch.equal(converted["layers.0.mixer.conv1d.bias"][d_inner:], sd["layers.0.mixer.conv1d_b.bias"])
    ours = converted_model().state_dict()
    assert converted.keys() == ours.keys()
    assert checkpoint_filter_fn(ours, converted_model()).keys() == ours.keys()


def test_stride16_checkpoint_loads_into_a_stride8_model_with_a_resampled_grid():
    model = VisionMamba(img_size=IMG, stride=8, embed_dim=VIM_DIM, depth=VIM_DEPTH, d_state=VIM_D_STATE, num_classes=5)
    assert model.grid == (3, 3)
    converted = checkpoint_filter_fn(vim_official(), model)
    model.load_state_dict(converted, strict=True)
    sd = vim_official()
    assert torch.equal(converted["pos_embed"][:, 4], sd["pos_embed"][:, 2]), "the class row moves to the new middle"


def test_position_embedding_resampling_keeps_the_middle_class_row():
    pos = torch.randn(1, 2 * 2 + 1, 4)
    assert torch.equal(resample_pos_embed(pos, (2, 2), (2, 2)), pos)
    grown = resample_pos_embed(pos, (2, 2), (4, 4))
    assert grown.shape == (1, 17, 4) and torch.equal(grown[:, 8], pos[:, 2])
    constant = torch.ones(1, 5, 4)
    constant[:, 2] = 7.0
    resampled = resample_pos_embed(constant, (2, 2), (3, 5))
    torch.testing.assert_close(torch.cat((resampled[:, :7], resampled[:, 8:]), 1), torch.ones(1, 15, 4))
    assert torch.equal(resampled[:, 7], constant[:, 2])


def test_class_token_sits_in_the_middle_and_other_sizes_run():
    model = timm.create_model("test_vim", num_classes=0).eval()
    assert model.forward_features(torch.randn(1, 3, 32, 32)).shape == (1, 5, 16)
    with torch.no_grad():
        tokens, _ = model._tokens(torch.randn(1, 3, 48, 64))
    assert tokens.shape == (1, 3 * 4 + 1, 16)
    assert torch.allclose(tokens[0, 6], model.cls_token[0, 0] + resample_pos_embed(model.pos_embed, (2, 2),
                                                                                     (3, 4))[0, 6])
    assert model(torch.randn(2, 3, 48, 64)).shape == (2, 16)


def test_features_only_gives_a_four_level_pyramid_and_backward_runs():
    model = timm.create_model("test_vim", features_only=True)
    features = model(torch.randn(2, 3, 64, 64))  # levels: test_timm_contract
    sum(f.mean() for f in features).backward()
    assert timm.create_model("test_vim", features_only=True, out_indices=(1, 3))(torch.randn(1, 3, 64, 64))[1].shape \
        == (1, 16, 2, 2)
    # Stride 8 (the "+" models): a 7x7 token grid at 64 px; one transposed conv up, identity, pools of 2 and 4.
    stride8 = timm.create_model("test_vim", features_only=True, stride=8)
    assert [f.shape[-1] for f in stride8(torch.randn(1, 3, 64, 64))] == [14, 7, 3, 1]


def test_reset_classifier_to_zero_gives_pooled_features():
    model = timm.create_model("test_vim", num_classes=7).eval()
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 7)
    model.reset_classifier(0)
    assert model.get_classifier().__class__ is torch.nn.Identity
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, model.num_features)


def test_classifier_has_no_pyramid_and_intermediates_are_the_tapped_residual_stream():
    model = timm.create_model("test_vim").eval()
    assert model.feature_pyramid is None and model.feature_taps == [0, 1, 2, 3]
    final, taps = model.forward_intermediates(torch.randn(1, 3, 32, 32))
    assert [t.shape for t in taps] == [(1, 16, 2, 2)] * 4
    assert final.shape == (1, 5, 16)


def test_gradient_checkpointing_gives_the_same_output():
    model = timm.create_model("test_vim").eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
        model.set_grad_checkpointing()
        torch.testing.assert_close(model(x), expected)


def test_timm_local_dir_round_trip(tmp_path):
    """timm's config.json records img_size as a list; the model must rebuild from it with the same output."""
    from tools.convert import save_model_folder

    model = timm.create_model("test_vim", num_classes=3).eval()
    loaded = timm.create_model(f"local-dir:{save_model_folder(model, tmp_path / 'vim')}", pretrained=True).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
