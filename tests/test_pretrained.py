"""``pretrained=True`` without converted weights on disk says what to do (tools.convert, where the official file
is, how to point at the result) instead of a download or hub error, and never reaches the network; a named
weights file that does not exist is reported with its path."""

from __future__ import annotations

import pytest
import timm
import torch

import backbones  # noqa: F401  (registers the models)
from tests.conftest import compose_config


@pytest.fixture(autouse=True)
def no_downloads(monkeypatch):
    """Any attempt to fetch weights fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("a download was attempted")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(timm.models._builder, "load_state_dict_from_url", refuse, raising=False)
    monkeypatch.setattr(timm.models._builder, "load_state_dict_from_hf", refuse, raising=False)


# One released variant per family and where its official weights live (the registered pretrained cfg).
RELEASED = {
    "vmamba_tiny_s1l8": "https://github.com/MzeroMiko/VMamba/releases/download/%23v2cls/"
                        "vssm1_tiny_0230s_ckpt_epoch_264.pth",
    "msvmamba_v3_tiny": "https://huggingface.co/YuhengSSS/MSVMamba",
    "efficientvmamba_tiny": "https://huggingface.co/TerryPei/EfficientVMamba-Tiny",
    "vim_tiny_patch16_224": "https://huggingface.co/hustvl/Vim-tiny-midclstok",
    "groupmamba_tiny": "https://huggingface.co/Abdelrahman-shaker/GroupMamba-Tiny",
    "hrvmamba_small": None,
}


@pytest.mark.parametrize("variant", sorted(RELEASED))
def test_pretrained_without_a_converted_file_says_how_to_get_one(variant):
    with pytest.raises(RuntimeError) as info:
        timm.create_model(variant, pretrained=True)
    message = str(info.value)
    assert f"{variant}: pretrained=True needs the official checkpoint converted with tools.convert" in message
    assert f"python -m tools.convert <checkpoint> {variant} --out weights/{variant}" in message
    assert f"pretrained_cfg_overlay=dict(file='weights/{variant}/model.safetensors')" in message
    assert f"+backbone.pretrained_cfg_overlay.file=weights/{variant}/model.safetensors" in message
    origin = RELEASED[variant]
    assert (f"download it by hand from {origin}" in message) if origin else "by hand" not in message


def test_a_missing_weights_file_is_named(tmp_path):
    missing = tmp_path / "weights" / "model.safetensors"
    with pytest.raises(FileNotFoundError, match=f"test_vmamba: pretrained weights file {missing} "
                                                f"\\(pretrained_cfg_overlay.file\\) does not exist"):
        timm.create_model("test_vmamba", pretrained=True, pretrained_cfg_overlay=dict(file=str(missing)))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        timm.create_model("test_vim", pretrained=True, features_only=True,
                          pretrained_cfg_overlay=dict(file=str(missing)))


def test_run_py_backbone_pretrained_without_a_file_fails_with_the_instructions(tmp_path, fashion_dir):
    from run import build_task

    cfg = compose_config(["backbone=test_vmamba", "backbone.pretrained=true", f"data.data_dir={fashion_dir}",
                          "data.num_workers=0"], tmp_path)
    with pytest.raises(Exception, match=r"test_vmamba: pretrained=True needs the official checkpoint converted"):
        build_task(cfg)
    cfg = compose_config(["backbone=test_vmamba", "backbone.pretrained=true", f"data.data_dir={fashion_dir}",
                          f"+backbone.pretrained_cfg_overlay.file={tmp_path / 'nope.safetensors'}",
                          "data.num_workers=0"], tmp_path)
    with pytest.raises(Exception, match=f"pretrained weights file {tmp_path / 'nope.safetensors'}"):
        build_task(cfg)
