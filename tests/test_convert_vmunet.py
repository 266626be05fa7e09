"""Official VM-UNet-family checkpoints -> run.py task weights: MHS-VM (PixDeep/MHS-VM) and the plain VM-UNet
(JCruan519/VM-UNet) files saved as the official train.py saves them from a stand-in of the official module tree
(tests/mhs_official.py), converted with tools.convert, loaded strictly, and computing what the official model
computes."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

import run
from backbones.mhs import checkpoint_filter_fn
from tasks.weights import load_task_weights, read_task_weights
from tests.mhs_official import SS2D, VMUNet, randomise
from tools.convert import main as convert_main
from tools.convert_dense import compose_experiment
from tools.convert_vmunet import convert_vmunet, fit_vmunet, official_routes, plan_vmunet

SMALL = ["backbone.depths=[1,1,1,1]", "head.depths=[1,1,1,1]"]  # with test_mhs_vmamba: dims 12-96


def small_official(head_num: int, seed: int = 0) -> VMUNet:
    """The official model at the size of test_mhs_vmamba (dims 12, depths 1-1-1-1 and decoder 1-1-1-1)."""
    return randomise(VMUNet(dims=12, depths=(1, 1, 1, 1), depths_decoder=(1, 1, 1, 1), head_num=head_num), seed)


def save_like_train_py(model: nn.Module, folder) -> tuple:
    """``best.pth`` (the bare state dict) and ``latest.pth`` (weights beside the resume state) as train.py saves
    them, after one AdamW step and one cosine scheduler step so the optimizer and scheduler hold state."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-2)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=50, eta_min=1e-5)
    loss = sum(p.square().sum() for p in model.parameters()) * 0.0
    loss.backward()
    optimizer.step()
    scheduler.step()
    best, latest = folder / "best.pth", folder / "latest.pth"
    torch.save(model.state_dict(), best)
    val_loss = np.mean([0.5, 0.25])  # val_one_epoch returns a numpy float64
    torch.save({"epoch": 120, "min_loss": val_loss, "min_epoch": 120, "loss": val_loss,
                "model_state_dict": model.state_dict(), "optimizer_state_dict": optimizer.state_dict(),
                "scheduler_state_dict": scheduler.state_dict()}, latest)
    return best, latest


# ---------------------------------------------------------------- the official key layout, full size

@pytest.mark.parametrize("head_num, routes, parameters", [(4, "CXSZ", 17_257_129), (3, "CXS", 17_386_153)])
def test_the_full_size_official_state_dict_fits_isic18_mhs_vmunet_key_for_key(head_num, routes, parameters):
    with torch.device("meta"):
        official = VMUNet(head_num=head_num)
    # the stand-in is the official model by size: the measured counts (each tensor once)
    assert sum(p.numel() for p in official.parameters()) == parameters
    state = official.state_dict()
    engines = [k for k in state if ".scanning.seq2seq_engine." in k]
    aliases = [k for k in state if k.endswith(".x_ssproj_W")]
    blocks = 2 + 2 + 2 + 2 + 2 + 2 + 2 + 1
    assert len(engines) == 5 * head_num * blocks and len(aliases) == blocks
    assert official_routes(state) == routes
    _, cfg, overrides, found, classes = plan_vmunet(state, "mhs_vmamba_tiny")
    assert (found, classes) == (routes, 1) and overrides == ([] if head_num == 4 else ["backbone.routes=CXS"])
    backbone, head, backbone_sd, head_sd = fit_vmunet(cfg, state, classes, "test", meta=True)
    ours = {**{f"backbone.{k}": v.shape for k, v in backbone.state_dict().items()},
            **{f"head.{k}": v.shape for k, v in head.state_dict().items()}}
    converted = {**{f"backbone.{k}": v.shape for k, v in backbone_sd.items()},
                 **{f"head.{k}": v.shape for k, v in head_sd.items()}}
    assert converted == ours
    assert len(converted) == len(state) - len(engines) - len(aliases)
    assert sum(s.numel() for s in ours.values()) == parameters


# ---------------------------------------------------------------- files as train.py saves them, small

@pytest.mark.parametrize("head_num", [3, 4])
def test_best_and_latest_convert_from_the_command_line_and_load_strictly(head_num, tmp_path, capsys):
    official = small_official(head_num)
    best, latest = save_like_train_py(official, tmp_path)
    expected = {k: v.clone() for k, v in official.state_dict().items()}
    outputs = []
    for file in (best, latest):
        out = tmp_path / f"out_{file.stem}"
        assert convert_main([str(file), "test_mhs_vmamba", "--out", str(out), *[f"--override={o}" for o in SMALL]]) == 0
        summary = capsys.readouterr().out
        assert f"MHS-VM ({head_num} heads" in summary and "loaded strict" in summary
        assert "duplicate keys" in summary and "threshold 0.5" in summary
        if file is latest:
            assert "from model_state_dict" in summary
            assert "optimizer_state_dict" in summary and "scheduler_state_dict" in summary and "epoch" in summary
        outputs.append(read_task_weights(out))
    (weights, meta), (latest_weights, _) = outputs
    assert weights.keys() == latest_weights.keys()
    assert all(torch.equal(weights[k], latest_weights[k]) for k in weights)
    assert meta["backbone"] == "test_mhs_vmamba" and meta["head"] == "heads.VMUNetDecoder"
    assert meta["experiment"] == "isic18_mhs_vmunet" and meta["num_classes"] == 1
    assert ("backbone.routes=CXS" in meta["overrides"]) == (head_num == 3)
    assert json.loads((tmp_path / "out_best" / "mambalab.json").read_text()) == meta
    # run.py's model for the recorded experiment and overrides takes the file strictly, tensor for tensor
    cfg = compose_experiment(meta["experiment"], meta["overrides"])
    backbone, head = run.build_model(cfg, 3, 1)
    task = nn.Module()
    task.backbone, task.head = backbone, head
    load_task_weights(task, tmp_path / "out_best", "test_mhs_vmamba", "heads.VMUNetDecoder",
                      SimpleNamespace(num_classes=1))
    block = "stages.2.blocks.0.mixer.mhs"
    letters = "CXSZ"[:head_num]
    for i, letter in enumerate(letters):
        torch.testing.assert_close(backbone.model.get_submodule(f"{block}.heads.{i}.ssm").x_proj_weight,
                                   expected[f"vmunet.layers.2.blocks.0.self_attention.mhs.scanhead_{letter}."
                                            f"mambaeng.x_proj_weight"], rtol=0, atol=0)
    torch.testing.assert_close(head.final_expand.expand.weight, expected["vmunet.final_up.expand.weight"], rtol=0,
                               atol=0)


def test_duplicates_that_differ_are_refused_naming_the_key(tmp_path, capsys):
    state = small_official(4).state_dict()
    key = "vmunet.layers_up.1.blocks.0.self_attention.mhs.scanhead_S.scanning.seq2seq_engine.Ds"
    state[key] = state[key].clone() + 1
    with pytest.raises(ValueError, match=f"{key} should repeat .*scanhead_S.mambaeng.Ds"):
        convert_vmunet(state, "test_mhs_vmamba", "the file", "best.pth", overrides=SMALL)
    state = small_official(3).state_dict()
    state["vmunet.layers.0.blocks.0.self_attention.mhs.x_ssproj_W"] = torch.zeros(12, 12)
    torch.save(state, tmp_path / "best.pth")
    assert convert_main([str(tmp_path / "best.pth"), "test_mhs_vmamba", *[f"--override={o}" for o in SMALL],
                         "--out", str(tmp_path / "out")]) == 1
    assert "x_ssproj_W should repeat vmunet.layers.0.blocks.0.self_attention.mhs.x_ssproj.weight" in \
        capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_files_that_do_not_fit_are_refused_naming_what_they_hold(tmp_path):
    state = small_official(4).state_dict()
    with pytest.raises(ValueError, match="the file holds MHS-VM \\(4 heads CXSZ, 1 class\\), whose decoder does "
                                         "not fit.*missing, first stages.3.blocks.1"):
        convert_vmunet(state, "test_mhs_vmamba", "the file", "best.pth", overrides=[SMALL[0], "head.depths=[1,1,1,2]"])
    with pytest.raises(ValueError, match="whose encoder does not fit.*shape"):
        convert_vmunet(state, "mhs_vmamba_tiny", "the file", "best.pth", overrides=SMALL)
    stray = {**state, "vmunet.scan_route_dict": torch.zeros(8, 2, 64, dtype=torch.long)}
    with pytest.raises(ValueError, match="outside VM-UNet's encoder and decoder, first vmunet.scan_route_dict"):
        convert_vmunet(stray, "test_mhs_vmamba", "the file", "best.pth", overrides=SMALL)
    two_heads = {k: v for k, v in state.items() if "scanhead_S" not in k and "scanhead_Z" not in k}
    with pytest.raises(ValueError, match="heads \\['C', 'X'\\]"):
        convert_vmunet(two_heads, "test_mhs_vmamba", "the file", "best.pth", overrides=SMALL)


def test_a_users_folder_is_never_written_over(tmp_path, capsys):
    best, _ = save_like_train_py(small_official(4), tmp_path)
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    args = [str(best), "test_mhs_vmamba", "--out", str(out), *[f"--override={o}" for o in SMALL]]
    assert convert_main(args) == 1 and "--force" in capsys.readouterr().err
    assert (out / "notes.txt").read_text() == "mine" and not (out / "model.safetensors").exists()
    assert convert_main([*args, "--force"]) == 0
    assert (out / "notes.txt").read_text() == "mine" and (out / "model.safetensors").is_file()


def test_the_backbone_filter_takes_the_encoder_of_an_official_file():
    import backbones

    official = small_official(4).state_dict()
    model = backbones.create_backbone("test_mhs_vmamba")  # a classifier: keeps its own final norm and head
    converted = checkpoint_filter_fn(official, model)
    model.load_state_dict(converted, strict=True)
    assert torch.equal(model.stem.proj.weight, official["vmunet.patch_embed.proj.weight"])
    assert torch.equal(model.stages[3].downsample.reduction.weight,
                       official["vmunet.layers.2.downsample.reduction.weight"])


# ---------------------------------------------------------------- the converted model computes the official one

def swin_unet_order(head: nn.Module, features: list) -> torch.Tensor:
    """The order ``VMUNetDecoder`` had before following the reference: each expanded map gets the encoder stage
    *output* of its resolution added after the expand (Swin-UNet's). The same modules, another model."""
    levels = [f.permute(0, 2, 3, 1) for f in features[: len(head.stages)]][::-1]
    y = head.stages[0].blocks(levels[0])
    for stage, skip in zip(head.stages[1:], levels[1:]):
        y = stage.blocks(stage.upsample(y) + skip)
    return head.final_conv(head.final_expand(y).permute(0, 3, 1, 2))


def converted_small(head_num: int, threshold: float, seed: int = 0) -> tuple:
    """The small official model in float64 and run.py's model holding its converted weights, in float64."""
    official = small_official(head_num, seed).double().eval()
    for module in official.modules():
        if hasattr(module, "esfusion"):
            module.esfusion.t = threshold
    overrides = [*SMALL, f"backbone.sra_threshold={threshold}", "backbone.scan_backend=torch"]
    task_sd, conversion = convert_vmunet(official.state_dict(), "test_mhs_vmamba", "the file", "best.pth",
                                      overrides=overrides)
    backbone, head = run.build_model(compose_experiment(conversion.experiment, conversion.overrides), 3, 1)
    for name, module in (("backbone", backbone), ("head", head)):
        module.load_state_dict({k[len(name) + 1:]: v for k, v in task_sd.items() if k.startswith(name + ".")})
    return official, backbone.double().eval(), head.double().eval()


@pytest.mark.parametrize("head_num, threshold", [(4, 0.5), (3, 0.0)])
def test_converted_weights_compute_the_official_model_in_float64(head_num, threshold):
    """run.py's model for the recorded experiment (``isic18_mhs_vmunet`` at the test size), holding the converted
    weights, computes the official forward: ``head(backbone(images))`` as the task runs it."""
    official, backbone, head = converted_small(head_num, threshold)
    images = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with torch.no_grad():
        expected = official(images)
        features = backbone(images)
        ours = head(features)
        official_deepest = official.vmunet.patch_embed(images)
        for layer in official.vmunet.layers:
            official_deepest = layer(official_deepest)
    # Both sides run in float64 (the stand-in's scan is the step-by-step oracle, ours the library's "torch" scan):
    # measured differences are 0.6-3.8e-10 of the output's scale over these two cases and seeds 0, 1 (the scan
    # formulations round differently, and the scan route attention divides by the routes' shifted mean); 1e-7
    # leaves a margin of >250x, while a misplaced tensor moves the output by a sizeable part of its scale (the
    # checks below, > 1e-2; measured over the same cases: the former order 1.8-1.9x, two heads swapped 0.08-0.36x).
    scale = expected.abs().max().item()
    assert scale > 1e-3
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-7 * scale)
    # the decoder starts from our encoder's last level, which is the official encoder's output (no norm between)
    torch.testing.assert_close(features[3], official_deepest.permute(0, 3, 1, 2), rtol=0,
                               atol=1e-7 * official_deepest.abs().max().item())
    # the check can fail: the decoder's former order (stage outputs added after expanding) is another model ...
    with torch.no_grad():
        assert (swin_unet_order(head, features) - expected).abs().max() > 1e-2 * scale
    # ... and the weights of two heads swapped move the output far outside the tolerance
    swapped = head.stages[3].blocks[0].mixer.mhs.heads
    with torch.no_grad():
        first = [p.clone() for p in swapped[0].parameters()]
        for mine, theirs in zip(swapped[0].parameters(), swapped[1].parameters()):
            mine.copy_(theirs)
        for theirs, saved in zip(swapped[1].parameters(), first):
            theirs.copy_(saved)
        assert (head(backbone(images)) - expected).abs().max() > 1e-2 * scale


# ---------------------------------------------------------------- the plain VM-UNet (VMamba v0's SS2D)

PLAIN = ["+backbone.dims=12", "backbone.scan_backend=torch"]  # the test size; the depths are read from the file


def small_plain(num_classes: int = 1, seed: int = 0) -> VMUNet:
    """The official VM-UNet with SS2D mixers, dims 12, depths 1-1-1-1 and decoder 1-1-1-1 (its own test size)."""
    return randomise(VMUNet(dims=12, depths=(1, 1, 1, 1), depths_decoder=(1, 1, 1, 1), num_classes=num_classes,
                            mixer=SS2D), seed)


@pytest.mark.parametrize("num_classes, experiment, parameters", [(1, "isic18_vmunet", 27_427_561),
                                                                   (9, "synapse_vmunet", 27_427_761)])
def test_the_full_size_official_vm_unet_fits_its_experiment_key_for_key(num_classes, experiment, parameters):
    """The official configs (ISIC and Synapse: depths 2-2-2-2, decoder 2-2-2-1; 27.43 M parameters measured) fit
    the default experiment for their classes with nothing to override, every tensor placed."""
    with torch.device("meta"):
        official = VMUNet(num_classes=num_classes, mixer=SS2D)
    state = official.state_dict()
    assert sum(p.numel() for p in official.parameters()) == parameters
    found, cfg, overrides, routes, classes = plan_vmunet(state, "vanilla_vmamba_tiny")
    assert (found, overrides, routes, classes) == (experiment, [], "", num_classes)
    backbone, head, backbone_sd, head_sd = fit_vmunet(cfg, state, classes, "test", meta=True)
    assert len(backbone_sd) + len(head_sd) == len(state)
    assert sum(p.numel() for p in [*backbone.parameters(), *head.parameters()]) == parameters


def test_plain_best_and_latest_convert_and_compute_the_official_vm_unet_in_float64(tmp_path, capsys):
    """best.pth and latest.pth as train.py saves them convert on the command line into weights that run.py's
    composed ``isic18_vmunet`` model (depths recorded from the file) loads strictly and that compute the official
    forward, ``head(backbone(images))`` as the task runs it."""
    official = small_plain()
    best, latest = save_like_train_py(official, tmp_path)
    official = official.double().eval()
    outputs = []
    for file in (best, latest):
        out = tmp_path / f"out_{file.stem}"
        assert convert_main([str(file), "vanilla_vmamba_tiny", "--out", str(out),
                             *[f"--override={o}" for o in PLAIN]]) == 0
        summary = capsys.readouterr().out
        assert "VM-UNet (depths [1, 1, 1, 1], decoder [1, 1, 1, 1], 1 class)" in summary and "loaded strict" in summary
        assert "duplicate keys" not in summary and "threshold" not in summary
        if file is latest:
            assert "from model_state_dict" in summary and "optimizer_state_dict" in summary
        outputs.append(read_task_weights(out))
    (weights, meta), (latest_weights, _) = outputs
    assert weights.keys() == latest_weights.keys() and all(torch.equal(weights[k], latest_weights[k]) for k in weights)
    assert meta["experiment"] == "isic18_vmunet" and meta["num_classes"] == 1
    assert meta["backbone"] == "vanilla_vmamba_tiny" and meta["head"] == "heads.VMUNetDecoder"
    assert meta["overrides"] == ["backbone.depths=[1,1,1,1]", "head.depths=[1,1,1,1]", *PLAIN]
    assert meta["source"]["layout"] == "JCruan519/VM-UNet VMUNet state dict"
    cfg = compose_experiment(meta["experiment"], meta["overrides"])
    task = nn.Module()
    task.backbone, task.head = run.build_model(cfg, 3, 1)
    load_task_weights(task, tmp_path / "out_best", "vanilla_vmamba_tiny", "heads.VMUNetDecoder",
                      SimpleNamespace(num_classes=1))
    backbone, head = task.backbone.double().eval(), task.head.double().eval()
    images = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with torch.no_grad():
        expected = official(images)
        features = backbone(images)
        ours = head(features)
        former = swin_unet_order(head, features)
    # float64 on both sides, the oracle scan against the library's "torch" scan: measured 1.6-4.3e-12 of the
    # output's scale over seeds 0-2 (no scan route attention to divide by small numbers), so MHS-VM's 1e-7 holds
    # with a wide margin; the former decoder order is 1.7-1.9x the scale away.
    scale = expected.abs().max().item()
    assert scale > 1e-3
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-7 * scale)
    assert (former - expected).abs().max() > 1e-2 * scale


def test_a_nine_class_vm_unet_defaults_to_synapse_and_misfits_name_the_official_key(tmp_path, capsys):
    state = small_plain(num_classes=9).state_dict()
    _, conversion = convert_vmunet(state, "vanilla_vmamba_tiny", "the file", "best.pth", overrides=PLAIN)
    assert conversion.experiment == "synapse_vmunet" and conversion.num_classes == 9
    # the ISIC experiment has one class: refused naming the official key and both shapes
    with pytest.raises(ValueError, match=r"9 classes, but experiment=isic18_vmunet's data .* has 1 class: "
                                         r"vmunet\.final_conv\.weight is \(9, 3, 1, 1\) in the file, "
                                         r"\(1, 3, 1, 1\) in the model"):
        convert_vmunet(state, "vanilla_vmamba_tiny", "the file", "best.pth", "isic18_vmunet", PLAIN)
    # the full-size experiment (dims 96) does not fit the dims-12 file: the first official key and both shapes
    torch.save(state, tmp_path / "best.pth")
    args = [str(tmp_path / "best.pth"), "vanilla_vmamba_tiny", "--out", str(tmp_path / "out"),
            "--override=backbone.scan_backend=torch"]
    assert convert_main(args) == 1
    error = capsys.readouterr().err
    assert "the file holds VM-UNet (depths [1, 1, 1, 1], decoder [1, 1, 1, 1], 9 classes), whose encoder does not " \
           "fit experiment=synapse_vmunet" in error
    assert "shape(s) differ, first vmunet.layers.0.blocks.0.self_attention.conv2d.bias " \
           "(model.stages.0.blocks.0.mixer.conv2d.bias): file (24,), model (192,)" in error
    assert not (tmp_path / "out").exists()
    # a user's override against the file's depths: the first block the file lacks
    with pytest.raises(ValueError, match="whose decoder does not fit.*missing, first stages.0.blocks.1"):
        convert_vmunet(state, "vanilla_vmamba_tiny", "the file", "best.pth",
                       overrides=[*PLAIN, "head.depths=[2,1,1,1]"])
