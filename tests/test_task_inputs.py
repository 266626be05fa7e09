"""Tasks are told what they need at construction (class names, normalisation, input size, weight decay, Mixup),
heads say what they read as types, and one palette colours every overlay."""

from __future__ import annotations

import functools
from types import SimpleNamespace

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from torch import nn

import backbones
from datamodules.ade20k import ADE20K_CLASSES, MEAN_255, STD_255
from heads import LinearClassifier, MSVMUNetDecoder, UperNet, VMUNetDecoder
from heads.interface import AuxiliaryHead, HeadInputs, head_inputs
from run import backbone_interface, build_task, data_inputs
from tasks.overlays import paint_labels, palette
from tests.conftest import compose_config
from tests.dense_fixtures import make_ade20k


def test_build_task_passes_the_data_facts_each_task_declares(tmp_path, imagefolder_dir):
    cfg = compose_config(["experiment=ade20k_upernet_vmamba_tiny_s1l8", f"data.root={make_ade20k(tmp_path / 'ade')}",
                          "backbone=test_vmamba", "data.num_workers=0"], tmp_path)
    _, task = build_task(cfg)
    assert task.class_names == ADE20K_CLASSES and (task.mean, task.std) == (MEAN_255, STD_255)
    assert task.hparams.class_names == ADE20K_CLASSES  # recorded with the run, as plain tuples
    cfg = compose_config([f"data.root={imagefolder_dir}", "data=imagefolder", "data.num_workers=0",
                          "backbone=test_vmamba"], tmp_path)
    datamodule, task = build_task(cfg)
    assert task.batch_transform is not None and task.batch_transform.mixup_alpha == cfg.data.mixup_alpha
    assert task.hparams.num_classes == datamodule.num_classes == 2


def test_medical_task_takes_size_and_normalisation_from_the_data_and_needs_them(tmp_path):
    pytest.importorskip("h5py")
    from tests.medical_fixtures import make_synapse

    cfg = compose_config(["experiment=synapse_msvmunet_vmamba_tiny", f"data.root={make_synapse(tmp_path / 'syn')}",
                          "backbone=test_vmamba", "data.img_size=48", "data.num_workers=0"], tmp_path)
    datamodule, task = build_task(cfg)
    assert (task.hparams.img_size, task.hparams.mean, task.hparams.std, task.hparams.in_chans) == (
        (48, 48), (0.5,), (0.5,), 3)
    assert task.class_names == datamodule.class_names
    with pytest.raises(ValueError, match="MedicalSegmentationTask needs img_size, mean"):
        type(task)(task.backbone, task.head, task.optimizer_factory, 9)
    with pytest.raises(ValueError, match="2 class names for 8 classes"):
        type(task)(task.backbone, task.head, task.optimizer_factory, 9, img_size=48, mean=0.5, std=0.5, in_chans=3,
                   class_names=["liver", "spleen"])
    with pytest.raises(AttributeError, match=r"needs \['img_size', 'mean', 'std', 'in_chans'\] from its data module"):
        data_inputs("tasks.MedicalSegmentationTask", SimpleNamespace(num_classes=9, class_names=("a",) * 8))


def test_medical_evaluation_uses_the_size_it_was_told_without_a_data_module(tmp_path):
    """Evaluation used to ask ``trainer.datamodule`` for the size and silently fall back to 224."""
    pytest.importorskip("h5py")
    from datamodules.synapse import SynapseDataModule
    from tasks.medseg import MedicalSegmentationTask
    from tests.medical_fixtures import make_synapse

    module = SynapseDataModule(str(make_synapse(tmp_path / "syn", test_cases=1)), num_workers=0, img_size=64)
    module.setup()
    encoder = backbones.create_backbone("test_vmamba", features_only=True, in_chans=3)
    head = MSVMUNetDecoder(encoder.feature_info.channels(), encoder.feature_info.reduction(), 9)
    task = MedicalSegmentationTask(encoder, head, functools.partial(torch.optim.AdamW, lr=1e-3), 9, img_size=64,
                                   mean=module.mean, std=module.std, in_chans=3, num_overlays=0)
    seen = []
    encoder.register_forward_hook(lambda _module, inputs, _output: seen.append(tuple(inputs[0].shape[1:])))
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=tmp_path)
    trainer.validate(task, dataloaders=module.val_dataloader())
    assert seen and set(seen) == {(3, 64, 64)}


def test_weight_decay_is_a_task_argument_not_read_from_the_optimizer_partial(tmp_path, fashion_dir):
    cfg = compose_config([f"data.data_dir={fashion_dir}", "backbone=test_vmamba", "scheduler=none",
                          "optimizer.weight_decay=0.07"], tmp_path)
    _, task = build_task(cfg)
    assert task.weight_decay == task.hparams.weight_decay == pytest.approx(0.07)
    assert "weight_decay" not in task.optimizer_factory.keywords
    groups = task.configure_optimizers()["optimizer"].param_groups
    assert [group["weight_decay"] for group in groups] == pytest.approx([0.07, 0.0])
    assert all(p.ndim > 1 for p in groups[0]["params"]) and any(p.ndim == 1 for p in groups[1]["params"])


def test_heads_declare_what_they_read_as_a_type():
    assert head_inputs(LinearClassifier) is HeadInputs.POOLED
    assert {head_inputs(head) for head in (UperNet, MSVMUNetDecoder)} == {HeadInputs.FEATURES}
    assert head_inputs(VMUNetDecoder) is HeadInputs.FEATURES_AND_STAGE_INPUTS
    assert backbone_interface("heads.LinearClassifier")[0] == dict(num_classes=0)
    assert backbone_interface("heads.UperNet")[0] == dict(features_only=True)
    assert backbone_interface("heads.VMUNetDecoder")[0] == dict(features_only=True, stage_inputs=True)
    with pytest.raises(TypeError, match=r"torch\.nn\.modules\.linear\.Linear must declare `inputs`"):
        backbone_interface("torch.nn.Linear")
    assert isinstance(UperNet([8, 16, 32, 64], 3, channels=8), AuxiliaryHead)
    assert not isinstance(VMUNetDecoder([8, 16, 32, 64], [4, 8, 16, 32], 3, depths=[1, 1, 1, 1]), AuxiliaryHead)
    assert not isinstance(nn.Linear(2, 2), AuxiliaryHead)


def test_one_palette_gives_distinct_stable_colours_and_paints_only_real_classes():
    colours = palette(256)
    assert len({tuple(c) for c in colours}) == 256
    assert np.array_equal(palette(5), colours[:5])  # a class keeps its colour whatever the class count
    assert colours[1].tolist() == [128, 0, 0] and colours[2].tolist() == [0, 128, 0]  # PASCAL VOC's map
    image = np.full((1, 4, 3), 100, np.uint8)
    painted = paint_labels(image, np.array([[0, 1, 255, 9]]), palette(3), skip=(255,), alpha=0.5)
    assert painted[0].tolist() == [[50, 50, 50], [114, 50, 50], [100, 100, 100], [100, 100, 100]]


def test_recorded_data_facts_load_back_with_weights_only(tmp_path):
    cfg = compose_config(["experiment=ade20k_upernet_vmamba_tiny_s1l8", f"data.root={make_ade20k(tmp_path / 'ade')}",
                          "backbone=test_vmamba", "data.num_workers=0"], tmp_path)
    _, task = build_task(cfg)
    torch.save({"hyper_parameters": dict(task.hparams)}, tmp_path / "hparams.pt")
    loaded = torch.load(tmp_path / "hparams.pt", weights_only=True)["hyper_parameters"]
    assert loaded["class_names"][0] == "wall" and loaded["mean"] == MEAN_255
