"""Vim: official parameter counts, the bidirectional mixer and the whole model against a float64 reference
written from the released models' maths on official-layout weights, middle class token and position
embedding resampling, checkpoint conversion, dense features."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F

import backbones  # noqa: F401  (registers the models)
from backbones.vim import VisionMamba, checkpoint_filter_fn, resample_pos_embed
from tests.oracle import oracle_selective_scan

# Official counts in millions, measured by building hustvl/Vim's models (README: 7 / 26 / 98 M).
OFFICIAL_PARAMS = {"vim_tiny_patch16_224": 7.148, "vim_small_patch16_224": 25.797, "vim_base_patch16_224": 97.598,
                   "vim_tiny_patch16_stride8_224": 7.250, "vim_small_patch16_stride8_224": 26.001}

DIM, DEPTH, D_STATE, IMG = 8, 2, 3, 32


@pytest.mark.parametrize("name", sorted(OFFICIAL_PARAMS))
def test_parameter_count_matches_official(name):
    with torch.device("meta"):
        model = timm.create_model(name)
    count = sum(p.numel() for p in model.parameters()) / 1e6
    assert abs(count - OFFICIAL_PARAMS[name]) < 0.005 * OFFICIAL_PARAMS[name]
    side = 27 if "stride8" in name else 14  # (224 - 16) // stride + 1
    assert model.grid == (side, side) and model.pos_embed.shape[1] == side * side + 1


def official_state_dict(num_classes: int = 5, grid: int = 2, seed: int = 0) -> dict:
    """Random weights under the released checkpoints' key names and shapes (Vim-Ti layout, scaled down)."""
    g = torch.Generator().manual_seed(seed)
    d_inner, rank = 2 * DIM, 1  # dt_rank = ceil(DIM / 16)

    def rand(*shape, scale=0.3):
        return torch.randn(*shape, generator=g) * scale

    sd = {"cls_token": rand(1, 1, DIM), "pos_embed": rand(1, grid * grid + 1, DIM),
          "patch_embed.proj.weight": rand(DIM, 3, 16, 16, scale=0.05), "patch_embed.proj.bias": rand(DIM),
          "head.weight": rand(num_classes, DIM), "head.bias": rand(num_classes), "norm_f.weight": 1 + rand(DIM)}
    for i in range(DEPTH):
        p = f"layers.{i}."
        sd[p + "norm.weight"] = 1 + rand(DIM)
        sd[p + "mixer.in_proj.weight"] = rand(2 * d_inner, DIM)
        sd[p + "mixer.out_proj.weight"] = rand(DIM, d_inner)
        for suffix in ("", "_b"):
            sd[p + f"mixer.conv1d{suffix}.weight"] = rand(d_inner, 1, 4)
            sd[p + f"mixer.conv1d{suffix}.bias"] = rand(d_inner)
            sd[p + f"mixer.x_proj{suffix}.weight"] = rand(rank + 2 * D_STATE, d_inner)
            sd[p + f"mixer.dt_proj{suffix}.weight"] = rand(d_inner, rank)
            sd[p + f"mixer.dt_proj{suffix}.bias"] = rand(d_inner) - 2.0
        sd[p + "mixer.A_log"] = torch.log(torch.arange(1, D_STATE + 1.0)).repeat(d_inner, 1) + rand(d_inner, D_STATE)
        sd[p + "mixer.A_b_log"] = torch.log(torch.arange(1, D_STATE + 1.0)).repeat(d_inner, 1) + rand(d_inner, D_STATE)
        sd[p + "mixer.D"] = 1 + rand(d_inner)
        sd[p + "mixer.D_b"] = 1 + rand(d_inner)
    return sd


def reference_mixer(sd: dict, prefix: str, x: torch.Tensor) -> torch.Tensor:
    """The released models' v2 bidirectional mixer in float64: per direction its own causal conv, x/dt
    projections, A and D on the (reversed, for the backward one) sequence, each gated by silu(z) of its
    own order, the backward output flipped back, the sum halved, then out_proj."""
    w = {k[len(prefix):]: v.double() for k, v in sd.items() if k.startswith(prefix)}
    x = x.double()
    xz = x @ w["in_proj.weight"].T
    u, z = xz.chunk(2, dim=-1)
    u, z = u.transpose(1, 2), z.transpose(1, 2)
    d_inner = u.shape[1]

    def direction(u, z, b):
        conv = F.conv1d(F.pad(u, (3, 0)), w[f"conv1d{b}.weight"], w[f"conv1d{b}.bias"], groups=d_inner)
        conv = F.silu(conv)
        x_dbl = torch.einsum("cd,bdl->bcl", w[f"x_proj{b}.weight"], conv)
        rank = w[f"dt_proj{b}.weight"].shape[1]
        dt = torch.einsum("dr,brl->bdl", w[f"dt_proj{b}.weight"], x_dbl[:, :rank])
        B, C = x_dbl[:, rank: rank + D_STATE], x_dbl[:, rank + D_STATE:]
        A = -torch.exp(w["A_log" if not b else "A_b_log"])
        return oracle_selective_scan(conv, dt, A, B, C, D=w["D" if not b else "D_b"], z=z,
                                     delta_bias=w[f"dt_proj{b}.bias"], delta_softplus=True)

    y = (direction(u, z, "") + direction(u.flip(-1), z.flip(-1), "_b").flip(-1)) / 2
    return y.transpose(1, 2) @ w["out_proj.weight"].T


def rms_norm(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * weight.double()


def reference_model(sd: dict, images: torch.Tensor) -> torch.Tensor:
    """The released classifier in float64: patches, class token at the middle, position embedding,
    Add -> Norm -> Mixer blocks, final add + norm, the middle token to the head."""
    tokens = F.conv2d(images.double(), sd["patch_embed.proj.weight"].double(), sd["patch_embed.proj.bias"].double(),
                      stride=16).flatten(2).transpose(1, 2)
    middle = tokens.shape[1] // 2
    cls = sd["cls_token"].double().expand(tokens.shape[0], -1, -1)
    hidden = torch.cat((tokens[:, :middle], cls, tokens[:, middle:]), dim=1) + sd["pos_embed"].double()
    residual = None
    for i in range(DEPTH):
        residual = hidden if residual is None else residual + hidden
        hidden = reference_mixer(sd, f"layers.{i}.mixer.", rms_norm(residual, sd[f"layers.{i}.norm.weight"]))
    final = rms_norm(residual + hidden, sd["norm_f.weight"])
    return final[:, middle] @ sd["head.weight"].double().T + sd["head.bias"].double()


def converted_model(**kwargs) -> VisionMamba:
    model = VisionMamba(img_size=IMG, embed_dim=DIM, depth=DEPTH, d_state=D_STATE, num_classes=5,
                        drop_path_rate=0.0, **kwargs).eval()
    model.load_state_dict(checkpoint_filter_fn({"model": official_state_dict(), "args": None}, model), strict=True)
    return model


def test_mixer_on_converted_weights_matches_the_official_bidirectional_maths():
    sd = official_state_dict()
    model = converted_model()
    x = torch.randn(2, 7, DIM)
    with torch.no_grad():
        ours = model.layers[1].mixer(x)
    torch.testing.assert_close(ours.double(), reference_mixer(sd, "layers.1.mixer.", x), rtol=1e-5, atol=1e-5)


def test_whole_model_on_converted_weights_matches_the_official_forward():
    images = torch.randn(2, 3, IMG, IMG)
    with torch.no_grad():
        ours = converted_model()(images)
    torch.testing.assert_close(ours.double(), reference_model(official_state_dict(), images), rtol=1e-4, atol=1e-5)


def test_conversion_stacks_forward_then_backward_direction():
    sd = official_state_dict()
    converted = checkpoint_filter_fn(sd, converted_model())
    d_inner = 2 * DIM
    assert torch.equal(converted["layers.0.mixer.ssm.A_logs"][d_inner:], sd["layers.0.mixer.A_b_log"])
    assert torch.equal(converted["layers.0.mixer.ssm.x_proj_weight"][0], sd["layers.0.mixer.x_proj.weight"])
    assert torch.equal(converted["layers.0.mixer.conv1d.bias"][d_inner:], sd["layers.0.mixer.conv1d_b.bias"])
    ours = converted_model().state_dict()
    assert converted.keys() == ours.keys()
    assert checkpoint_filter_fn(ours, converted_model()).keys() == ours.keys()


def test_stride16_checkpoint_loads_into_a_stride8_model_with_a_resampled_grid():
    model = VisionMamba(img_size=IMG, stride=8, embed_dim=DIM, depth=DEPTH, d_state=D_STATE, num_classes=5)
    assert model.grid == (3, 3)
    converted = checkpoint_filter_fn(official_state_dict(), model)
    model.load_state_dict(converted, strict=True)
    sd = official_state_dict()
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
    assert model.feature_info.reduction() == [4, 8, 16, 32] and model.feature_info.channels() == [16] * 4
    features = model(torch.randn(2, 3, 64, 64))
    assert [f.shape[-1] for f in features] == [16, 8, 4, 2]
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
