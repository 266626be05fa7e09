"""tools.convert and tools.export: official-layout checkpoints (written here from the official module
structure: names and shapes, no downloads) load strictly into our models, round-trip through timm's
local-dir and pretrained-file loading, and bad files fail with messages that name the file or the variant
they fit; run checkpoints (classification, distillation, dense) export to folders timm loads."""

from __future__ import annotations

import argparse
import json

import pytest
import timm
import torch

import backbones
from tests.official import (
    VIM_D_STATE,
    VIM_DEPTH,
    VIM_DIM,
    efficientvmamba_official,
    groupmamba_official_key,
    hrvmamba_official_key,
    msvmamba_official,
    vim_official,
    vim_reference_model,
    vmamba_official,
)
from tools.convert import convert_state_dict, load_official, main, matching_variants
from tools.export import export_checkpoint
from tools.export import main as export_main

TEST_VARIANTS = [name for name in backbones.list_backbones() if name.startswith("test_")]


def _v2(depths, dims, ssm_ratio):
    return dict(depths=depths, dims=dims, d_state=1, ssm_ratio=ssm_ratio, gated=False, conv_bias=False,
                mlp_ratio=4.0, generation="v2")


TEST_VMAMBA = _v2((1, 1, 1, 1), (8, 16, 32, 64), 1.0)
VANILLA_TINY = dict(depths=(2, 2, 9, 2), dims=(96, 192, 384, 768), d_state=16, ssm_ratio=2.0, gated=True,
                    conv_bias=True, mlp_ratio=0.0, generation="v0")
# The released checkpoints (MzeroMiko/VMamba README / releases) with their published parameter counts (M).
RELEASES = {
    "vanilla_vmamba_tiny": (VANILLA_TINY, 22.89),                                      # vssmtiny_dp01 (v0)
    "vmamba_tiny_s2l5": (_v2((2, 2, 5, 2), (96, 192, 384, 768), 2.0), 30.71),         # vssm_tiny_0230
    "vmamba_small_s2l15": (_v2((2, 2, 15, 2), (96, 192, 384, 768), 2.0), 50.15),      # vssm_small_0229
    "vmamba_base_s2l15": (_v2((2, 2, 15, 2), (128, 256, 512, 1024), 2.0), 88.56),     # vssm_base_0229
    "vmamba_tiny_s1l8": (_v2((2, 2, 8, 2), (96, 192, 384, 768), 1.0), 30.25),         # vssm1_tiny_0230s
}


def _values(state_dict: dict) -> torch.Tensor:
    """Every number of a state dict, sorted: equal for two dicts holding the same tensors however renamed,
    split or stacked."""
    return torch.cat([v.detach().double().flatten() for v in state_dict.values()]).sort().values


@pytest.mark.parametrize("variant", sorted(RELEASES))
def test_each_official_release_layout_fits_exactly_its_variant(variant):
    """Built on the meta device: the full-size official layout has the published parameter count and,
    after the family's rules, the key -> shape map of exactly one registered VMamba: its own."""
    config, published = RELEASES[variant]
    official = vmamba_official(**config, num_classes=1000, meta=True)
    assert abs(sum(v.numel() for v in official.values()) / 1e6 - published) < 0.01
    assert matching_variants({"model": official}, variant, 1000) == [variant]


def test_v2_release_layout_converts_strictly_and_keeps_every_tensor():
    official = vmamba_official(**TEST_VMAMBA, num_classes=7)
    model, conversion = convert_state_dict({"model": official, "model_ema": {}}, "test_vmamba")
    ours = model.state_dict()
    assert conversion.num_classes == 7 and conversion.tensors == len(official) == len(ours)
    assert conversion.renamed == len(official)  # no v2 key keeps its official name
    assert torch.equal(ours["stem.conv1.weight"], official["patch_embed.0.weight"])
    assert torch.equal(ours["stem.norm1.bias"], official["patch_embed.2.bias"])
    assert torch.equal(ours["stem.conv2.weight"], official["patch_embed.5.weight"])
    assert torch.equal(ours["stem.norm2.weight"], official["patch_embed.7.weight"])
    assert torch.equal(ours["stages.0.blocks.0.norm1.weight"], official["layers.0.blocks.0.norm.weight"])
    assert torch.equal(ours["stages.1.blocks.0.mixer.in_proj.weight"], official["layers.1.blocks.0.op.in_proj.weight"])
    assert torch.equal(ours["stages.1.blocks.0.mixer.out_norm.bias"], official["layers.1.blocks.0.op.out_norm.bias"])
    assert torch.equal(ours["stages.2.blocks.0.mixer.ssm.dt_projs_bias"],
                       official["layers.2.blocks.0.op.dt_projs_bias"])
    assert torch.equal(ours["stages.2.downsample.conv.weight"], official["layers.1.downsample.1.weight"])
    assert torch.equal(ours["stages.1.downsample.norm.bias"], official["layers.0.downsample.3.bias"])
    assert torch.equal(ours["stages.3.blocks.0.mixer.ssm.A_logs"], official["layers.3.blocks.0.op.A_logs"])
    assert torch.equal(ours["stages.0.blocks.0.mlp.fc2.bias"], official["layers.0.blocks.0.mlp.fc2.bias"])
    assert torch.equal(ours["norm.weight"], official["classifier.norm.weight"])
    assert torch.equal(ours["head.weight"], official["classifier.head.weight"])
    assert torch.equal(_values(ours), _values(official))


def test_v0_release_layout_converts_into_vanilla_vmamba_tiny():
    official = vmamba_official(**VANILLA_TINY, num_classes=1000)
    model, conversion = convert_state_dict({"model": {"module." + k: v for k, v in official.items()}},
                                           "vanilla_vmamba_tiny")
    ours = model.state_dict()
    assert conversion.tensors == len(official) == len(ours)
    assert torch.equal(ours["stem.proj.weight"], official["patch_embed.proj.weight"])
    assert torch.equal(ours["stem.norm.bias"], official["patch_embed.norm.bias"])
    assert torch.equal(ours["stages.1.blocks.1.norm1.bias"], official["layers.1.blocks.1.ln_1.bias"])
    assert torch.equal(ours["stages.0.blocks.0.mixer.conv2d.bias"],
                       official["layers.0.blocks.0.self_attention.conv2d.bias"])
    assert torch.equal(ours["stages.3.downsample.reduction.weight"], official["layers.2.downsample.reduction.weight"])
    assert torch.equal(ours["stages.1.downsample.norm.weight"], official["layers.0.downsample.norm.weight"])
    assert torch.equal(ours["stages.2.blocks.8.mixer.ssm.x_proj_weight"],
                       official["layers.2.blocks.8.self_attention.x_proj_weight"])
    assert torch.equal(ours["norm.weight"], official["norm.weight"])
    assert torch.equal(ours["head.bias"], official["head.bias"])
    assert torch.equal(_values(ours), _values(official))


def test_wrong_variant_names_the_variant_the_file_fits():
    s2l5 = vmamba_official(**RELEASES["vmamba_tiny_s2l5"][0], num_classes=1000, meta=True)
    assert matching_variants(s2l5, "vmamba_tiny_s1l8", 1000) == ["vmamba_tiny_s2l5"]
    with pytest.raises(ValueError, match="matches vmamba_tiny_s2l5, not vmamba_tiny_s1l8"):
        convert_state_dict({"model": s2l5}, "vmamba_tiny_s1l8")
    with pytest.raises(ValueError, match="it matches no registered vmamba variant"):
        convert_state_dict({"model": vmamba_official(**_v2((1, 1, 1, 1), (8, 16, 32, 64), 3.0), num_classes=5)},
                           "test_vmamba")
    with pytest.raises(ValueError, match="unknown variant 'vmamba_huge'"):
        convert_state_dict({"model": s2l5}, "vmamba_huge")


def test_cli_round_trip_through_timm_local_dir_and_pretrained_file(tmp_path, capsys):
    official = vmamba_official(**TEST_VMAMBA, num_classes=5)
    path = tmp_path / "official.pth"
    # Vim's checkpoints store their argparse.Namespace next to the weights; that one class is allowed.
    torch.save({"model": official, "args": argparse.Namespace(lr=1e-3, model="test")}, path)
    assert main([str(path), "test_vmamba", "--out", str(tmp_path / "converted")]) == 0
    assert "test_vmamba (vmamba rules)" in capsys.readouterr().out
    folder = tmp_path / "converted"
    assert sorted(p.name for p in folder.iterdir()) == [".mambalab-manifest.json", "config.json", "model.safetensors"]
    config = json.loads((folder / "config.json").read_text())
    assert config["architecture"] == "test_vmamba" and config["num_classes"] == 5
    assert config["pretrained_cfg"]["first_conv"] == "stem.conv1"
    expected, _ = convert_state_dict(load_official(path), "test_vmamba")
    from_dir = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    # timm drops a file's classifier unless the overlay says how many classes it has (default 1000).
    from_file = timm.create_model("test_vmamba", pretrained=True, num_classes=5, pretrained_cfg_overlay=dict(
        file=str(folder / "model.safetensors"), num_classes=5)).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(from_dir(x), expected(x), rtol=0, atol=0)
        torch.testing.assert_close(from_file(x), expected(x), rtol=0, atol=0)


def test_bad_files_and_arguments_are_named(tmp_path, capsys):
    """Unsafe pickles are refused in tests/test_safe_load.py; here, files that are not checkpoints at all."""
    path = tmp_path / "official.pth"
    torch.save({"model": vmamba_official(**TEST_VMAMBA, num_classes=5)}, path)
    assert main([str(tmp_path / "nope.pth"), "test_vmamba"]) == 1
    assert f"{tmp_path / 'nope.pth'}: no such file" in capsys.readouterr().err
    (tmp_path / "text.pth").write_text("not a checkpoint")
    assert main([str(tmp_path / "text.pth"), "test_vmamba"]) == 1
    assert f"checkpoint {tmp_path / 'text.pth'} cannot be read safely" in capsys.readouterr().err
    torch.save([torch.ones(1)], tmp_path / "list.pth")
    assert main([str(tmp_path / "list.pth"), "test_vmamba"]) == 1
    assert "holds a list, not a state dict" in capsys.readouterr().err
    assert main([str(path), "test_vmamba", "--model-arg", "oops"]) == 1
    assert "expected KEY=VALUE" in capsys.readouterr().err


def test_ema_weights_are_chosen_on_request_and_their_absence_is_named():
    official = vmamba_official(**TEST_VMAMBA, num_classes=5)
    ema = {k: v + 1 for k, v in official.items()}
    model, _ = convert_state_dict({"model": official, "model_ema": ema}, "test_vmamba", ema=True)
    assert torch.equal(model.head.weight, ema["classifier.head.weight"])
    with pytest.raises(KeyError, match="no EMA weights"):
        convert_state_dict({"model": official}, "test_vmamba", ema=True)


def _msvmamba_official() -> tuple[dict, dict]:
    return {"model": msvmamba_official((1, 1, 1, 1), (8, 16, 32, 64), 1.0, 1, "v3", False, 4.0, 3)}, {}


def _efficientvmamba_official() -> tuple[dict, dict]:
    official = efficientvmamba_official((1, 1, 1, 1), (8, 16, 32, 64), d_state=2, num_classes=3)
    return {"state_dict": {"module.module." + k: v for k, v in official.items()}}, {}


def _vim_official() -> tuple[dict, dict]:
    return ({"model": vim_official(num_classes=3), "args": argparse.Namespace(model="vim")},
            dict(embed_dim=VIM_DIM, depth=VIM_DEPTH, d_state=VIM_D_STATE))


def _from_official_keys(variant: str, to_official) -> tuple[dict, dict]:
    """Our random weights under the official names that ``to_official`` gives."""
    torch.manual_seed(0)
    ours = timm.create_model(variant, num_classes=3).state_dict()
    return {"model": {to_official(k): torch.randn_like(v) if v.is_floating_point() else v
                      for k, v in ours.items()}}, {}


def _positive_variances(checkpoint: dict) -> dict:
    """Random BatchNorm running variances made positive, so that the models give finite outputs."""
    return {k: _positive_variances(v) if isinstance(v, dict) else v.abs() if k.endswith("running_var") else v
            for k, v in checkpoint.items()}


# The official layouts of the other families (names and shapes in tests/official.py).
OTHER_FAMILIES = {
    "test_msvmamba": _msvmamba_official,
    "test_efficientvmamba": _efficientvmamba_official,
    "test_vim": _vim_official,
    "test_groupmamba": lambda: _from_official_keys("test_groupmamba", groupmamba_official_key),
    "test_hrvmamba": lambda: _from_official_keys("test_hrvmamba", hrvmamba_official_key),
}


@pytest.mark.parametrize("variant", sorted(OTHER_FAMILIES))
def test_other_families_convert_their_official_layout_through_the_generic_cli(variant, tmp_path, capsys):
    checkpoint, model_args = OTHER_FAMILIES[variant]()
    checkpoint = _positive_variances(checkpoint)
    path = tmp_path / "official.pth"
    torch.save(checkpoint, path)
    args = [f"--model-arg={k}={v}" for k, v in model_args.items()]
    assert main([str(path), variant, "--out", str(tmp_path / "out"), *args]) == 0
    family = backbones.family_of(variant).__name__.rsplit(".", 1)[-1]
    assert f"{variant} ({family} rules)" in capsys.readouterr().out
    model, conversion = convert_state_dict(load_official(path), variant, **model_args)
    assert conversion.num_classes == 3 and conversion.renamed > 0
    official = next(v for k, v in checkpoint.items() if k != "args")
    assert torch.equal(_values(model.state_dict()), _values(official))
    from_file = timm.create_model(variant, pretrained=True, num_classes=3, **model_args, pretrained_cfg_overlay=dict(
        file=str(tmp_path / "out" / "model.safetensors"), num_classes=3)).eval()
    from_dir = timm.create_model(f"local-dir:{tmp_path / 'out'}", pretrained=True).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(from_file(x), model(x), rtol=0, atol=0)
        torch.testing.assert_close(from_dir(x), model(x), rtol=0, atol=0)
    if variant == "test_vim":  # the family's float64 re-implementation of the released forward
        torch.testing.assert_close(model(x).double(), vim_reference_model(official, x), rtol=1e-4, atol=1e-5)


def test_model_args_reach_the_model_a_pose_backbone_needs():
    """HRVMamba's pose checkpoints (mmpose ``state_dict`` with ``backbone.``) fit multiscale_output=False."""
    torch.manual_seed(0)
    pose = timm.create_model("test_hrvmamba", num_classes=0, multiscale_output=False)
    official = {"backbone." + hrvmamba_official_key(k): torch.randn_like(v) if v.is_floating_point() else v
                for k, v in pose.state_dict().items()}
    official["head.final_layer.weight"] = torch.zeros(17, 8, 1, 1)
    model, conversion = convert_state_dict({"state_dict": official, "meta": {}}, "test_hrvmamba",
                                           multiscale_output=False)
    assert conversion.num_classes == 0 and conversion.tensors == len(official) - 1
    with pytest.raises(ValueError, match="matches no registered hrvmamba variant"):
        convert_state_dict({"state_dict": official}, "test_hrvmamba")


@pytest.mark.parametrize("variant", TEST_VARIANTS)
def test_every_family_passes_its_own_layout_through_the_generic_path(variant):
    source = timm.create_model(variant, num_classes=3).eval()
    model, conversion = convert_state_dict({"state_dict": source.state_dict()}, variant)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), source(x))
    assert conversion.renamed == 0 and conversion.num_classes == 3


def _run_checkpoint(path, backbone, heads=(), prefix="backbone."):
    """A checkpoint as run.py's Lightning tasks write it: backbone under ``backbone.``, heads' ``fc``."""
    state = {prefix + k: v for k, v in backbone.state_dict().items()}
    for name, head in heads:
        state.update({f"{name}.fc.weight": head.weight.detach(), f"{name}.fc.bias": head.bias.detach()})
    torch.save({"state_dict": state, "epoch": 1, "hyper_parameters": {"num_classes": 4}}, path)
    return path


def test_export_of_a_run_checkpoint_loads_through_local_dir_and_pretrained_file(tmp_path):
    torch.manual_seed(0)
    backbone = timm.create_model("test_vmamba", num_classes=0, in_chans=1).eval()
    head = torch.nn.Linear(backbone.num_features, 4)
    ckpt = _run_checkpoint(tmp_path / "last.ckpt", backbone, [("head", head)])
    out = export_checkpoint(ckpt, "test_vmamba", tmp_path / "export")
    assert sorted(p.name for p in out.iterdir()) == [".mambalab-manifest.json", "README.md", "config.json",
                                                     "model.safetensors"]
    card = (out / "README.md").read_text()
    assert "test_vmamba" in card and "input_size" in card and "license: apache-2.0" in card
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        expected = head(backbone(x))
        from_dir = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
        torch.testing.assert_close(from_dir(x), expected, rtol=1e-6, atol=1e-6)
        from_file = timm.create_model("test_vmamba", pretrained=True, num_classes=4, in_chans=1,
                                      pretrained_cfg_overlay=dict(file=str(out / "model.safetensors"),
                                                                  num_classes=4)).eval()
        torch.testing.assert_close(from_file(x), expected, rtol=1e-6, atol=1e-6)


def test_export_folds_a_distillation_head_into_the_classifier(tmp_path, capsys):
    torch.manual_seed(0)
    backbone = timm.create_model("test_msvmamba", num_classes=0).eval()
    head, dist_head = torch.nn.Linear(backbone.num_features, 4), torch.nn.Linear(backbone.num_features, 4)
    ckpt = _run_checkpoint(tmp_path / "last.ckpt", backbone, [("head", head), ("dist_head", dist_head)],
                           prefix="backbone._orig_mod.")  # a run with compile=true
    assert export_main([str(ckpt), "test_msvmamba", "--out", str(tmp_path / "export")]) == 0
    assert "averaged into one classifier" in capsys.readouterr().out
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        features = backbone(x)
        expected = (head(features) + dist_head(features)) / 2
        loaded = timm.create_model(f"local-dir:{tmp_path / 'export'}", pretrained=True).eval()
        torch.testing.assert_close(loaded(x), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("variant", ["test_vmamba", "test_groupmamba", "test_vim"])
def test_export_of_a_dense_run_gives_its_feature_extractor(variant, tmp_path, capsys):
    torch.manual_seed(0)
    backbone = timm.create_model(variant, features_only=True).eval()
    state = {"backbone." + k: v for k, v in backbone.state_dict().items()}
    state["head.decode.weight"] = torch.zeros(2, 3)  # the dense head's own weights are not the backbone's
    torch.save({"state_dict": state}, tmp_path / "last.ckpt")
    out = export_checkpoint(tmp_path / "last.ckpt", variant, tmp_path / "export")
    assert "dense run" in capsys.readouterr().out
    loaded = timm.create_model(variant, pretrained=True, features_only=True, pretrained_cfg_overlay=dict(
        file=str(out / "model.safetensors"), num_classes=0)).eval()
    assert loaded.model.num_classes == 0
    exported = loaded.state_dict()
    for key, value in backbone.state_dict().items():
        if "feature_pyramid" not in key:  # Vim's pyramid is built fresh for features_only
            assert torch.equal(exported[key], value), key
    if not hasattr(backbone.model, "feature_pyramid"):
        x = torch.randn(1, 3, 32, 32)
        with torch.no_grad():
            for got, want in zip(loaded(x), backbone(x)):
                torch.testing.assert_close(got, want)


def test_export_from_a_converted_folder_and_its_errors(tmp_path, capsys):
    official = vmamba_official(**TEST_VMAMBA, num_classes=5)
    torch.save({"model": official}, tmp_path / "official.pth")
    assert main([str(tmp_path / "official.pth"), "test_vmamba", "--out", str(tmp_path / "converted")]) == 0
    weights = tmp_path / "converted" / "model.safetensors"
    assert export_main([str(weights), "test_vmamba", "--out", str(tmp_path / "export")]) == 0
    expected = timm.create_model(f"local-dir:{tmp_path / 'converted'}", pretrained=True).eval()
    loaded = timm.create_model(f"local-dir:{tmp_path / 'export'}", pretrained=True).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), expected(x), rtol=0, atol=0)
    capsys.readouterr()
    assert export_main([str(weights), "test_msvmamba", "--out", str(tmp_path / "bad")]) == 1
    assert f"checkpoint {weights} does not fit test_msvmamba" in capsys.readouterr().err
    assert export_main([str(tmp_path / "official.pth"), "test_vmamba"]) == 1  # official layout: convert first
    assert "tools.convert first" in capsys.readouterr().err
    assert export_main([str(tmp_path / "missing.ckpt"), "test_vmamba"]) == 1
    assert f"{tmp_path / 'missing.ckpt'}: no such file" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


@pytest.mark.slow
def test_export_onnx_runs_in_onnxruntime_with_any_batch(tmp_path):
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    backbone = timm.create_model("test_vmamba", num_classes=0).eval()
    head = torch.nn.Linear(backbone.num_features, 4)
    ckpt = _run_checkpoint(tmp_path / "last.ckpt", backbone, [("head", head)])
    out = export_checkpoint(ckpt, "test_vmamba", tmp_path / "export", onnx=True)
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    for batch in (1, 3):
        x = torch.randn(batch, 3, 32, 32)
        (got,) = session.run(None, {"images": x.numpy()})
        with torch.no_grad():
            torch.testing.assert_close(torch.from_numpy(got), head(backbone(x)), rtol=1e-4, atol=1e-5)


def test_converted_weights_feed_run_py_through_the_backbone_config(tmp_path, fashion_dir):
    from run import build_task
    from tests.conftest import compose_config

    official = vmamba_official(**TEST_VMAMBA, num_classes=5)
    torch.save({"model": official}, tmp_path / "official.pth")
    assert main([str(tmp_path / "official.pth"), "test_vmamba", "--out", str(tmp_path / "weights")]) == 0
    cfg = compose_config(["backbone=test_vmamba", "backbone.pretrained=true",
                          f"+backbone.pretrained_cfg_overlay.file={tmp_path / 'weights' / 'model.safetensors'}",
                          f"data.data_dir={fashion_dir}", "data.num_workers=0"], tmp_path)
    _, task = build_task(cfg)
    # The RGB stem is adapted to Fashion-MNIST's one channel by timm; everything after it is the official weights.
    assert torch.equal(task.backbone.stages[3].blocks[0].mixer.ssm.A_logs, official["layers.3.blocks.0.op.A_logs"])
