"""tools.convert: official-layout checkpoints (written here from the official module structure: names and
shapes, no downloads) load strictly into our models, round-trip through timm's local-dir format, and bad
files fail with messages that name the file or the variant they fit."""

from __future__ import annotations

import argparse
import math

import pytest
import timm
import torch

import backbones  # noqa: F401  (registers the models)
from tools.convert import convert_state_dict, load_official, main, matching_variants
from tools.export import export_checkpoint


def vmamba_official(depths, dims, d_state, ssm_ratio, gated, conv_bias, mlp_ratio, generation, num_classes,
                     meta=False) -> dict:
    """An official VMamba state dict: v0 release names (``patch_embed.proj``, ``ln_1``, ``self_attention``,
    ``layers.i.downsample.reduction``, ``norm``, ``head``) or v2 release names (``patch_embed.{0,2,5,7}``,
    ``norm``/``op``/``norm2``/``mlp``, ``layers.i.downsample.{1,3}``, ``classifier.{norm,head}``)."""
    g = torch.Generator().manual_seed(0)
    shapes, c0 = {}, dims[0]
    if generation == "v0":
        shapes.update({"patch_embed.proj.weight": (c0, 3, 4, 4), "patch_embed.proj.bias": (c0,),
                       "patch_embed.norm.weight": (c0,), "patch_embed.norm.bias": (c0,)})
    else:
        shapes.update({"patch_embed.0.weight": (c0 // 2, 3, 3, 3), "patch_embed.0.bias": (c0 // 2,),
                       "patch_embed.2.weight": (c0 // 2,), "patch_embed.2.bias": (c0 // 2,),
                       "patch_embed.5.weight": (c0, c0 // 2, 3, 3), "patch_embed.5.bias": (c0,),
                       "patch_embed.7.weight": (c0,), "patch_embed.7.bias": (c0,)})
    norm, op = ("ln_1", "self_attention") if generation == "v0" else ("norm", "op")
    for i, (depth, c) in enumerate(zip(depths, dims)):
        d, rank = int(ssm_ratio * c), math.ceil(c / 16)
        for j in range(depth):
            p = f"layers.{i}.blocks.{j}."
            shapes.update({
                p + f"{norm}.weight": (c,), p + f"{norm}.bias": (c,),
                p + f"{op}.x_proj_weight": (4, rank + 2 * d_state, d), p + f"{op}.dt_projs_weight": (4, d, rank),
                p + f"{op}.dt_projs_bias": (4, d), p + f"{op}.A_logs": (4 * d, d_state), p + f"{op}.Ds": (4 * d,),
                p + f"{op}.out_norm.weight": (d,), p + f"{op}.out_norm.bias": (d,),
                p + f"{op}.in_proj.weight": (2 * d if gated else d, c), p + f"{op}.conv2d.weight": (d, 1, 3, 3),
                p + f"{op}.out_proj.weight": (c, d)})
            if conv_bias:
                shapes[p + f"{op}.conv2d.bias"] = (d,)
            if mlp_ratio:
                hidden = int(mlp_ratio * c)
                shapes.update({p + "norm2.weight": (c,), p + "norm2.bias": (c,), p + "mlp.fc1.weight": (hidden, c),
                               p + "mlp.fc1.bias": (hidden,), p + "mlp.fc2.weight": (c, hidden),
                               p + "mlp.fc2.bias": (c,)})
        if i + 1 < len(dims):
            p, out = f"layers.{i}.downsample.", dims[i + 1]
            if generation == "v0":
                shapes.update({p + "reduction.weight": (out, 4 * c), p + "norm.weight": (4 * c,),
                               p + "norm.bias": (4 * c,)})
            else:
                shapes.update({p + "1.weight": (out, c, 3, 3), p + "1.bias": (out,), p + "3.weight": (out,),
                               p + "3.bias": (out,)})
    head = ("norm", "head") if generation == "v0" else ("classifier.norm", "classifier.head")
    shapes.update({f"{head[0]}.weight": (dims[-1],), f"{head[0]}.bias": (dims[-1],),
                   f"{head[1]}.weight": (num_classes, dims[-1]), f"{head[1]}.bias": (num_classes,)})
    if meta:
        return {k: torch.empty(s, device="meta") for k, s in shapes.items()}
    return {k: torch.randn(s, generator=g) * 0.1 for k, s in shapes.items()}


TEST_VMAMBA = dict(depths=(1, 1, 1, 1), dims=(8, 16, 32, 64), d_state=1, ssm_ratio=1.0, gated=False,
                   conv_bias=False, mlp_ratio=4.0, generation="v2")
VANILLA_TINY = dict(depths=(2, 2, 9, 2), dims=(96, 192, 384, 768), d_state=16, ssm_ratio=2.0, gated=True,
                    conv_bias=True, mlp_ratio=0.0, generation="v0")


def test_v2_release_layout_converts_strictly_and_keeps_every_tensor():
    official = vmamba_official(**TEST_VMAMBA, num_classes=7)
    model, conversion = convert_state_dict({"model": official, "model_ema": {}}, "test_vmamba")
    ours = model.state_dict()
    assert conversion.num_classes == 7 and conversion.tensors == len(official) == len(ours)
    assert torch.equal(ours["stem.conv2.weight"], official["patch_embed.5.weight"])
    assert torch.equal(ours["stages.2.downsample.conv.weight"], official["layers.1.downsample.1.weight"])
    assert torch.equal(ours["stages.3.blocks.0.mixer.ssm.A_logs"], official["layers.3.blocks.0.op.A_logs"])
    assert torch.equal(ours["stages.0.blocks.0.mlp.fc2.bias"], official["layers.0.blocks.0.mlp.fc2.bias"])
    assert torch.equal(ours["head.weight"], official["classifier.head.weight"])
    assert sorted(float(t.sum()) for t in ours.values()) == sorted(float(t.sum()) for t in official.values())


def test_v0_release_layout_converts_into_vanilla_vmamba_tiny():
    official = vmamba_official(**VANILLA_TINY, num_classes=1000)
    model, conversion = convert_state_dict({"model": {"module." + k: v for k, v in official.items()}},
                                           "vanilla_vmamba_tiny")
    ours = model.state_dict()
    assert conversion.tensors == len(official) == len(ours)
    assert torch.equal(ours["stem.proj.weight"], official["patch_embed.proj.weight"])
    assert torch.equal(ours["stages.1.blocks.1.norm1.bias"], official["layers.1.blocks.1.ln_1.bias"])
    assert torch.equal(ours["stages.3.downsample.reduction.weight"], official["layers.2.downsample.reduction.weight"])
    assert torch.equal(ours["stages.2.blocks.8.mixer.ssm.x_proj_weight"],
                       official["layers.2.blocks.8.self_attention.x_proj_weight"])
    assert torch.equal(ours["norm.weight"], official["norm.weight"])


def test_wrong_variant_names_the_variant_the_file_fits():
    s2l5 = vmamba_official(depths=(2, 2, 5, 2), dims=(96, 192, 384, 768), d_state=1, ssm_ratio=2.0, gated=False,
                           conv_bias=False, mlp_ratio=4.0, generation="v2", num_classes=1000, meta=True)
    assert matching_variants(s2l5, "vmamba_tiny_s1l8", 1000) == ["vmamba_tiny_s2l5"]
    with pytest.raises(ValueError, match="matches vmamba_tiny_s2l5, not vmamba_tiny_s1l8"):
        convert_state_dict({"model": s2l5}, "vmamba_tiny_s1l8")
    with pytest.raises(ValueError, match="unknown variant 'vmamba_huge'"):
        convert_state_dict({"model": s2l5}, "vmamba_huge")


def test_cli_round_trip_through_timm_local_dir_is_identical(tmp_path, capsys):
    official = vmamba_official(**TEST_VMAMBA, num_classes=5)
    path = tmp_path / "official.pth"
    torch.save({"model": official, "args": argparse.Namespace(lr=1e-3, model="test")}, path)
    assert main([str(path), "test_vmamba", "--out", str(tmp_path / "converted")]) == 0
    assert "test_vmamba (vmamba rules)" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "converted").iterdir()) == ["config.json", "model.safetensors"]
    expected, _ = convert_state_dict(load_official(path), "test_vmamba")
    loaded = timm.create_model(f"local-dir:{tmp_path / 'converted'}", pretrained=True).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), expected(x), rtol=0, atol=0)


class NotAllowed:
    """Any class other than argparse.Namespace inside a checkpoint must be refused."""


def test_unsafe_pickles_are_refused_and_missing_files_named(tmp_path, capsys):
    path = tmp_path / "unsafe.pth"
    torch.save({"model": vmamba_official(**TEST_VMAMBA, num_classes=5), "extra": NotAllowed()}, path)
    assert main([str(path), "test_vmamba", "--out", str(tmp_path / "out")]) == 1
    assert "cannot be read safely" in capsys.readouterr().err and not (tmp_path / "out").exists()
    assert main([str(tmp_path / "nope.pth"), "test_vmamba"]) == 1
    assert f"{tmp_path / 'nope.pth'}: no such file" in capsys.readouterr().err


def test_ema_weights_are_chosen_on_request_and_their_absence_is_named():
    official = vmamba_official(**TEST_VMAMBA, num_classes=5)
    ema = {k: v + 1 for k, v in official.items()}
    model, _ = convert_state_dict({"model": official, "model_ema": ema}, "test_vmamba", ema=True)
    assert torch.equal(model.head.weight, ema["classifier.head.weight"])
    with pytest.raises(KeyError, match="no EMA weights"):
        convert_state_dict({"model": official}, "test_vmamba", ema=True)


@pytest.mark.parametrize("variant", ["test_vim", "test_groupmamba", "test_hrvmamba", "test_msvmamba",
                                     "test_efficientvmamba"])
def test_every_family_converts_its_own_layout_through_the_generic_path(variant):
    """Our own layout passes each family's filter unchanged (the official layouts are tested per family)."""
    source = timm.create_model(variant, num_classes=3).eval()
    model, conversion = convert_state_dict({"state_dict": source.state_dict()}, variant)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), source(x))
    assert conversion.renamed == 0


def test_export_of_a_run_checkpoint_round_trips_through_local_dir(tmp_path):
    backbone = timm.create_model("test_vmamba", num_classes=0)
    head = torch.nn.Linear(backbone.num_features, 4)
    state = {f"backbone.{k}": v for k, v in backbone.state_dict().items()}
    state.update({"head.fc.weight": head.weight.detach(), "head.fc.bias": head.bias.detach()})
    ckpt = tmp_path / "last.ckpt"
    torch.save({"state_dict": state, "hyper_parameters": {"num_classes": 4}}, ckpt)
    out = export_checkpoint(ckpt, "test_vmamba", tmp_path / "export")
    loaded = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = head(backbone.eval()(x))
        torch.testing.assert_close(loaded(x), expected, rtol=1e-6, atol=1e-6)


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
