"""Faults in the data, performed on fixtures in each dataset's real format: a label outside the classes is
refused where it enters, naming the file and the value; boxes that cannot be used are counted once per split;
a set with nothing to score warns instead of reporting a number; unreadable images are named by one reader."""

from __future__ import annotations

import functools
import json
import logging
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from datamodules import ADE20KDataModule, FashionMNISTDataModule, ImageFolderDataModule, NucleiDataModule
from run import build_task, build_trainer
from tests.conftest import compose_config
from tests.dense_fixtures import make_ade20k, make_coco, make_nuclei, make_trees, plain_backbone
from tests.fixtures import make_fashion_mnist, make_imagefolder, write_idx

SMALL_ADE = dict(batch_size=2, num_workers=0, crop_size=(32, 32), scale=(128, 32))


def warnings_from(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and text in r.getMessage()]


# ---------------------------------------------------------------- labels outside the classes (issue 13.5)

def test_fashion_mnist_label_outside_the_classes_is_named_before_training(tmp_path):
    data = make_fashion_mnist(tmp_path / "fashion")
    labels = np.arange(96) % 10
    labels[5] = 13
    labels_file = write_idx(data / "train-labels-idx1-ubyte.gz", labels, 2049)
    module = FashionMNISTDataModule(str(data), num_workers=0, val_size=16, search_system=False, download=False)
    with pytest.raises(ValueError, match=re.escape(str(labels_file)) + r".*value\(s\) 13 outside 0\.\.9.*index 5"):
        module.setup("fit")


def test_ade20k_mask_value_outside_the_classes_is_named_at_its_sample(tmp_path):
    root = make_ade20k(tmp_path / "ade", n_train=2, n_val=2)
    annotation = root / "ADEChallengeData2016" / "annotations" / "validation" / "ADE_val_00000002.png"
    label = np.asarray(Image.open(annotation)).copy()
    label[3, 7] = 200
    Image.fromarray(label).save(annotation)
    datamodule = ADE20KDataModule(str(root), **SMALL_ADE)
    datamodule.setup()
    datamodule.datasets["val"][0]  # the untouched file loads
    with pytest.raises(ValueError, match=re.escape(str(annotation)) + r": label value\(s\) 200 outside 0\.\.150 "
                                         r"or 255 \(ignored\) \(0 unlabelled, 1\.\.150 the classes\).*\(3, 7\)"):
        datamodule.datasets["val"][1]


def test_ade20k_bad_mask_stops_training_at_its_first_batch_naming_the_file(tmp_path):
    """The reported fault: a mask value of 200 used to train and then die in validation with a reshape error."""
    root = make_ade20k(tmp_path / "ade", n_train=2, n_val=1)
    for annotation in (root / "ADEChallengeData2016" / "annotations" / "training").glob("*.png"):
        label = np.asarray(Image.open(annotation)).copy()
        label[0, 0] = 200
        Image.fromarray(label).save(annotation)
    cfg = compose_config(["experiment=ade20k_upernet_vmamba_tiny_s1l8", f"data.root={root}", "backbone=test_vmamba",
                          "head.channels=16", "head.aux_channels=8", "data.crop_size=[32,32]", "data.scale=[128,32]",
                          "data.batch_size=2", "data.num_workers=0", "trainer.fast_dev_run=true", "logger=none",
                          "callbacks=none"], tmp_path)
    datamodule, task = build_task(cfg)
    with pytest.raises(ValueError, match=r"annotations/training/ADE_train_0000000[12]\.png: label value\(s\) 200 "):
        build_trainer(cfg).fit(task, datamodule=datamodule)
    assert task.global_step == 0


def test_synapse_label_outside_the_organs_is_named_in_slices_and_volumes(tmp_path):
    pytest.importorskip("h5py")
    import h5py

    from datamodules.synapse import SynapseDataModule
    from tests.medical_fixtures import make_synapse

    root = make_synapse(tmp_path / "Synapse")
    slice_file = root / "train_npz" / "case0005_slice001.npz"
    arrays = dict(np.load(slice_file))
    arrays["label"][2, 3] = 13.0
    np.savez(slice_file, **arrays)
    module = SynapseDataModule(str(root), num_workers=0, img_size=32, augment=False)
    module.setup()
    with pytest.raises(ValueError, match=re.escape(str(slice_file)) + r": label value\(s\) 13 outside 0\.\.8"):
        module.datasets["train"][(0, 1)]
    volume_file = root / "test_vol_h5" / "case0002.npy.h5"
    with h5py.File(volume_file, "a") as volume:
        label = volume["label"][()]
        label[1, 0, 0] = 9
        del volume["label"]
        volume["label"] = label
    with pytest.raises(ValueError, match=re.escape(str(volume_file)) + r".*value\(s\) 9 outside 0\.\.8.*\(1, 0, 0\)"):
        module.datasets["val"][1]


def test_acdc_label_outside_the_structures_is_named(tmp_path):
    from datamodules.acdc import ACDCDataModule
    from tests.medical_fixtures import make_acdc

    root = make_acdc(tmp_path / "ACDC")
    case = root / "test" / "case_002_volume_ED.npz"
    arrays = dict(np.load(case))
    arrays["label"][0, 5, 5] = 4.0
    np.savez(case, **arrays)
    module = ACDCDataModule(str(root), num_workers=0)
    with pytest.raises(ValueError, match=re.escape(str(case)) + r": label value\(s\) 4 outside 0\.\.3"):
        module.load_case(case)


def test_coco_annotation_with_an_unlisted_category_is_named_when_the_file_is_read(tmp_path):
    pytest.importorskip("pycocotools")
    from datamodules import COCODataModule

    root = make_coco(tmp_path / "coco")
    val_json = root / "annotations" / "instances_val2017.json"
    data = json.loads(val_json.read_text())
    data["annotations"][1]["category_id"] = 99
    val_json.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=re.escape(str(val_json)) + rf": annotation {data['annotations'][1]['id']} "
                                         r"has category_id 99, not one of the listed ids \[1, 3, 7\]"):
        COCODataModule(str(root), num_workers=0).setup("fit")


# ---------------------------------------------------------------- unusable boxes, nothing to score (issue 13.10)

def coco_with_boxes(root: Path, boxes: list[list[float]]) -> tuple[Path, Path]:
    """A COCO fixture whose first validation image's annotations are replaced by ``boxes`` (64x80 image)."""
    make_coco(root)
    val_json = root / "annotations" / "instances_val2017.json"
    data = json.loads(val_json.read_text())
    others = [a for a in data["annotations"] if a["image_id"] != 101]
    added = [{"id": 900 + i, "image_id": 101, "category_id": 3, "bbox": box, "area": 10.0, "iscrowd": 0,
              "segmentation": [[0, 0, 1, 0, 1, 1]]} for i, box in enumerate(boxes)]
    data["annotations"] = others + added
    val_json.write_text(json.dumps(data))
    return root, val_json


def test_coco_boxes_degenerate_or_outside_are_dropped_and_counted_once_per_split(tmp_path, caplog):
    pytest.importorskip("pycocotools")
    from datamodules import COCODataModule

    root, val_json = coco_with_boxes(tmp_path / "coco", [[10, 10, 20, 12], [5, 5, 0.5, 9], [200, 10, 20, 20],
                                                         [70, 30, 20, 10]])
    with caplog.at_level(logging.WARNING, logger="mambalab"):
        datamodule = COCODataModule(str(root), num_workers=0)
        datamodule.setup("validate")
        dataset = datamodule.datasets["val"]
        targets = [dataset[i][1] for i in range(len(dataset))] + [dataset[0][1]]
    dropped = warnings_from(caplog, str(val_json))
    assert dropped == [f"COCO annotations {val_json}: 2 of {dataset.boxes.usable + 2} boxes dropped: 1 degenerate "
                       f"(under 1 px wide or high, or not finite), 1 wholly outside their image",
                       f"COCO annotations {val_json}: 1 boxes reach more than 1 px beyond their image border "
                       f"(kept as annotated)"]
    assert targets[0]["boxes"].tolist() == [[10, 10, 30, 22], [70, 30, 90, 40]]


def test_coco_val_set_without_usable_boxes_warns_and_logs_nan_not_minus_one(tmp_path, caplog):
    pytest.importorskip("pycocotools")
    from datamodules import COCODataModule
    from heads import MaskRCNN
    from tasks import DetectionTask

    root, val_json = coco_with_boxes(tmp_path / "coco", [[5, 5, 0, 9], [-50, 10, 20, 20]])
    data = json.loads(val_json.read_text())
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] == 101]
    val_json.write_text(json.dumps(data))
    backbone = plain_backbone()
    head = MaskRCNN(backbone.feature_info.channels(), 3, backbone.feature_info.reduction(), fpn_channels=16,
                    representation_size=32, mask_channels=8, min_size=64, max_size=96)
    task = DetectionTask(backbone, head, functools.partial(torch.optim.AdamW, lr=1e-4), 3)
    import lightning.pytorch as pl

    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path)
    with caplog.at_level(logging.WARNING, logger="mambalab"):
        datamodule = COCODataModule(str(root), num_workers=0)
        trainer.validate(task, datamodule=datamodule)
    assert warnings_from(caplog, f"COCO annotations {val_json}: no usable box (2 annotated")
    assert len(warnings_from(caplog, "the val set has no scored ground-truth box")) == 2  # bbox and segm
    for name in ("bbox_mAP", "bbox_mAP_50", "segm_mAP", "bbox_AR_100"):
        assert math.isnan(trainer.callback_metrics[f"val/{name}"]), name


def test_tree_boxes_degenerate_or_outside_are_counted_once_and_dropped(tmp_path, caplog):
    from datamodules import TreeCrownsDataModule
    from datamodules.trees import IMAGES

    folder = make_trees(tmp_path / "trees")
    xml = folder / f"{IMAGES[0]}.xml"
    bad = ("<object><name>Tree</name><bndbox><xmin>30</xmin><ymin>10</ymin><xmax>30</xmax><ymax>40</ymax></bndbox>"
           "</object><object><name>Tree</name><bndbox><xmin>400</xmin><ymin>10</ymin><xmax>420</xmax><ymax>40</ymax>"
           "</bndbox></object>")
    xml.write_text(xml.read_text().replace("</annotation>", bad + "</annotation>"))
    with caplog.at_level(logging.WARNING, logger="mambalab"):
        datamodule = TreeCrownsDataModule(str(folder), tile_size=100)
        datamodule.setup()
        datamodule.setup()
    assert warnings_from(caplog, "boxes dropped") == [
        f"tree-crown train boxes in {folder}: 2 of 11 boxes dropped: 1 degenerate (under 1 px wide or high, or not "
        f"finite), 1 wholly outside their image"]
    assert sum(len(target["boxes"]) for _, target in datamodule.datasets["train"].tiles) >= 9


def test_segmentation_set_without_labelled_pixels_warns_and_logs_nan(tmp_path, caplog):
    import lightning.pytorch as pl

    root = make_ade20k(tmp_path / "ade", n_train=2, n_val=2)
    for annotation in (root / "ADEChallengeData2016" / "annotations" / "validation").glob("*.png"):
        Image.fromarray(np.zeros_like(np.asarray(Image.open(annotation)))).save(annotation)  # 0: unlabelled
    cfg = compose_config(["experiment=ade20k_upernet_vmamba_tiny_s1l8", f"data.root={root}", "backbone=test_vmamba",
                          "head.channels=16", "head.aux_channels=8", "data.scale=[128,32]", "data.num_workers=0"],
                         tmp_path)
    datamodule, task = build_task(cfg)
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path)
    with caplog.at_level(logging.WARNING, logger="mambalab"):
        trainer.validate(task, datamodule=datamodule)
    assert warnings_from(caplog, "no labelled pixel in the whole val set (every label is ignore_index=255)")
    assert all(math.isnan(trainer.callback_metrics[f"val/{name}"]) for name in ("mIoU", "aAcc", "mAcc"))
    assert not (tmp_path / "per_class_iou_val.csv").exists()


# ---------------------------------------------------------------- one image reader, one error policy (issue 16.3)

def test_every_image_reader_names_a_decompression_bomb(tmp_path, monkeypatch):
    """PIL refuses images over twice ``MAX_IMAGE_PIXELS`` with ``DecompressionBombError``, which is not an
    OSError: the ImageFolder and nuclei readers used to let it through without naming the file."""
    tree = make_imagefolder(tmp_path / "imagenet", per_class=1, size=40)
    nuclei = make_nuclei(tmp_path / "nuclei", size=64)
    ade = make_ade20k(tmp_path / "ade", n_train=1, n_val=1)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    folder = ImageFolderDataModule(str(tree), image_size=32, batch_size=2, num_workers=0)
    folder.setup("fit")
    image = Path(folder.datasets["val"].samples[0][0])
    with pytest.raises(OSError, match=re.escape(f"cannot read image {image}: Image size")):
        folder.datasets["val"][0]
    with pytest.raises(OSError, match=re.escape(f"cannot read image {nuclei / 'img2d.tif'}: Image size")):
        NucleiDataModule(str(nuclei), crop_size=16).setup()
    segmentation = ADE20KDataModule(str(ade), **SMALL_ADE)
    segmentation.setup()
    with pytest.raises(OSError, match=r"cannot read image .*ADE_val_00000001\.jpg: Image size"):
        segmentation.datasets["val"][0]
