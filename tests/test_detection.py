"""Detection / instance segmentation: COCO loading, augmentation, Mask R-CNN on two backbones, mAP, CLI."""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from torch import nn

import backbones  # noqa: F401  (registers the backbones with timm)
from datamodules import COCODataModule, TreeCrownsDataModule
from datamodules.coco import flip_target, random_scaled_crop
from datamodules.trees import IMAGES, read_voc_boxes, tile_image, tile_origins
from heads import MaskRCNN
from run import build_task
from tasks import DetectionTask
from tasks.optim import warmup_multistep
from tests.conftest import CONF_DIR, compose_config, run_cli
from tests.dense_fixtures import make_coco, make_trees, plain_backbone
from tests.helpers import parameters_reached

pytest.importorskip("pycocotools", reason="pycocotools is needed for COCO data and mAP")


@pytest.fixture(scope="module")
def coco_dir(tmp_path_factory) -> Path:
    return make_coco(tmp_path_factory.mktemp("coco"))


def hierarchical_backbone() -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model("test_vmamba", features_only=True)


BACKBONES = {"hierarchical": hierarchical_backbone, "plain": plain_backbone}


def test_coco_loader_maps_categories_and_filters_like_mmdet(coco_dir):
    datamodule = COCODataModule(str(coco_dir), num_workers=0)
    assert datamodule.num_classes == 3 and datamodule.class_names == ["person", "car", "train"]
    assert datamodule.cat_to_label == {1: 1, 3: 2, 7: 3}
    datamodule.setup("fit")
    train, val = datamodule.datasets["train"], datamodule.datasets["val"]
    data = json.loads((coco_dir / "annotations" / "instances_train2017.json").read_text())
    last = max(image["id"] for image in data["images"])
    boxes_in_json = [a for a in data["annotations"] if a["image_id"] == last]
    target = train.target(last)
    assert len(target["boxes"]) == len(boxes_in_json) - 1  # the 0.5-pixel-wide box is dropped
    x, y, w, h = boxes_in_json[0]["bbox"]
    assert target["boxes"][0].tolist() == [x, y, x + w, y + h]
    assert target["labels"].tolist() == [datamodule.cat_to_label[a["category_id"]] for a in boxes_in_json[:-1]]
    # polygon masks are the diamonds inside the boxes: about half the box area
    assert target["masks"].shape[0] == len(target["boxes"])
    assert abs(target["masks"][0].sum().item() - w * h / 2) < (w + h)
    # evaluation keeps the crowd annotation with its flag
    crowd = val.target(101)
    assert crowd["iscrowd"].tolist()[-1] == 1 and crowd["masks"][-1].sum() == 8 * 18
    image, sample = val[0]
    assert image.shape == (3, 64, 80) and 0 <= image.min() and image.max() <= 1
    assert sample["masks"].shape[-2:] == (64, 80)


def test_flip_and_crop_keep_boxes_and_masks_together(coco_dir):
    datamodule = COCODataModule(str(coco_dir), num_workers=0)
    datamodule.setup("fit")
    dataset = datamodule.datasets["train"]
    image_id = dataset.ids[0]
    target = dataset.target(image_id)

    def mask_box(mask: torch.Tensor) -> list[float]:
        ys, xs = torch.nonzero(mask, as_tuple=True)
        return [xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1]

    flipped = flip_target(target, 80)
    for box, mask in zip(flipped["boxes"], flipped["masks"]):
        assert torch.allclose(torch.tensor(mask_box(mask), dtype=torch.float32), box, atol=1.5)
    image = torch.rand(3, 64, 80)
    rng = np.random.default_rng(3)
    for _ in range(5):
        crop, cropped = random_scaled_crop(image, target, rng, (40, 50), (20, 30), 1333)
        height, width = crop.shape[-2:]
        assert cropped["masks"].shape[-2:] == (height, width)
        assert (cropped["boxes"][:, 2] <= width).all() and (cropped["boxes"][:, 3] <= height).all()
        assert ((cropped["boxes"][:, 2:] - cropped["boxes"][:, :2]) > 0).all()
    again = dataset[(0, 0)], dataset[(0, 0)]
    assert torch.equal(again[0][0], again[1][0])


def test_missing_and_corrupt_annotation_files_are_named(tmp_path):
    root = make_coco(tmp_path / "coco", n_train=1, n_val=1)
    val_json = root / "annotations" / "instances_val2017.json"
    text = val_json.read_text()
    val_json.write_text(text[:40])
    with pytest.raises(ValueError, match=re.escape(str(val_json))):
        COCODataModule(str(root))
    val_json.write_text(json.dumps({"images": []}))
    with pytest.raises(ValueError, match="lacks the key"):
        COCODataModule(str(root))
    val_json.unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(str(val_json))):
        COCODataModule(str(root))
    val_json.write_text(text)
    image = next((root / "val2017").glob("*.jpg"))
    image.unlink()
    datamodule = COCODataModule(str(root), num_workers=0)
    datamodule.setup("validate")
    with pytest.raises(OSError, match=re.escape(image.name)):
        datamodule.datasets["val"][0]


def detection_task(backbone: nn.Module, num_classes: int = 3, with_masks: bool = True) -> DetectionTask:
    head = MaskRCNN(backbone.feature_info.channels(), num_classes, backbone.feature_info.reduction(),
                    fpn_channels=32, representation_size=64, mask_channels=16, min_size=64, max_size=128,
                    with_masks=with_masks)
    return DetectionTask(backbone, head, functools.partial(torch.optim.AdamW, lr=1e-4), num_classes)


@pytest.mark.parametrize("kind", sorted(BACKBONES))
def test_maskrcnn_forward_backward_and_predict(kind, coco_dir):
    datamodule = COCODataModule(str(coco_dir), num_workers=0, batch_size=2)
    datamodule.setup("fit")
    images, targets = next(iter(datamodule.train_dataloader()))
    task = detection_task(BACKBONES[kind]())
    task.train()
    losses, _ = task(images, targets)
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg"}
    sum(losses.values()).backward()
    assert all(torch.isfinite(v) for v in losses.values())
    assert parameters_reached(task.backbone.parameters()) > 0.5
    task.eval()
    with torch.no_grad():
        _, detections = task([torch.rand(3, 50, 70)])
    assert detections[0]["masks"].shape[-2:] == (50, 70)  # back at the original size
    assert detections[0]["boxes"].shape[-1] == 4


def test_head_matches_mmdet_mask_rcnn_structure():
    head = MaskRCNN([96, 192, 384, 768], 80)
    assert head.fpn.inner_blocks[0][0].out_channels == 256 and len(head.rpn.anchor_generator.sizes) == 5
    assert head.rpn.anchor_generator.num_anchors_per_location() == [3] * 5
    assert head.roi_heads.box_predictor.cls_score.out_features == 81
    assert head.roi_heads.mask_predictor.mask_fcn_logits.out_channels == 81
    assert head.roi_heads.detections_per_img == 100 and head.roi_heads.score_thresh == 0.05
    assert not MaskRCNN([8, 16, 32, 64], 1, with_masks=False).roi_heads.has_mask()
    with pytest.raises(ValueError, match="anchor_sizes"):
        MaskRCNN([8, 16, 32, 64], 1, anchor_sizes=(32, 64))


def test_map_of_hand_made_detections():
    task = detection_task(hierarchical_backbone(), with_masks=True)
    masks = torch.zeros(2, 40, 40, dtype=torch.uint8)
    masks[0, 0:10, 0:10], masks[1, 20:30, 20:40] = 1, 1
    target = {"boxes": torch.tensor([[0.0, 0, 10, 10], [20.0, 20, 40, 30]]), "labels": torch.tensor([1, 2]),
              "masks": masks, "iscrowd": torch.tensor([0, 0]), "area": torch.tensor([100.0, 200.0])}
    probabilities = masks[:1, None].float() * 0.9  # the first object found exactly, the second missed
    detection = {"boxes": target["boxes"][:1], "scores": torch.tensor([0.9]), "labels": torch.tensor([1]),
                 "masks": probabilities}
    task.metrics["val"].update(*task._metric_inputs([detection], [target]))
    results = task.metrics["val"].compute()
    # class 1: AP 1; class 2: nothing detected, AP 0 -> mAP 0.5 for boxes and masks alike
    assert results["bbox_map"].item() == pytest.approx(0.5)
    assert results["segm_map"].item() == pytest.approx(0.5)
    task.metrics["val"].reset()
    both = dict(detection, labels=torch.tensor([2]))  # right place, wrong class: no true positive at all
    task.metrics["val"].update(*task._metric_inputs([both], [target]))
    assert task.metrics["val"].compute()["bbox_map"].item() == pytest.approx(0.0)


def test_warmup_multistep_drops_at_milestone_epochs():
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    factor = warmup_multistep(optimizer, total_steps=1200, milestones=[8, 11], epochs=12, warmup_steps=50,
                              warmup_start_factor=0.001).lr_lambdas[0]
    assert factor(0) == pytest.approx(0.001)
    assert factor(25) == pytest.approx(0.001 + 0.999 * 0.5)
    assert factor(799) == pytest.approx(1.0)
    assert factor(800) == pytest.approx(0.1)
    assert factor(1100) == pytest.approx(0.01)


def test_tiles_cover_the_image_and_keep_mostly_visible_boxes():
    assert tile_origins(1000, 400) == [0, 400, 600] and tile_origins(300, 400) == [0]
    boxes = torch.tensor([[10.0, 10, 50, 50], [380, 10, 420, 50], [390, 10, 430, 50]])
    tiles = tile_image(torch.rand(3, 400, 800), boxes, 400, 0.5)
    assert len(tiles) == 2
    (_, left), (_, right) = tiles
    # the middle box is half in each tile (kept in both, clipped); the last one 1/4 left, 3/4 right
    assert left["boxes"].tolist() == [[10, 10, 50, 50], [380, 10, 400, 50]]
    assert right["boxes"].tolist() == [[0, 10, 20, 50], [0, 10, 30, 50]]
    assert right["area"].tolist() == [800.0, 1200.0]


def test_tree_demo_data_splits_by_image(tmp_path):
    folder = make_trees(tmp_path / "trees")
    datamodule = TreeCrownsDataModule(str(folder), tile_size=100)
    datamodule.setup()
    assert len(datamodule.datasets["train"]) == 3 * 4 and len(datamodule.datasets["val"]) == 4
    images, targets = next(iter(datamodule.train_dataloader()))
    assert images[0].shape == (3, 100, 100) and (targets[0]["labels"] == 1).all()
    (folder / f"{IMAGES[0]}.xml").write_text("<annotation><object><bndbox><xmin>1</xmin></bndbox></object>")
    with pytest.raises(ValueError, match=re.escape(str(folder / f"{IMAGES[0]}.xml"))):
        read_voc_boxes(folder / f"{IMAGES[0]}.xml")
    with pytest.raises(FileNotFoundError, match="deepforest"):
        TreeCrownsDataModule(str(tmp_path / "empty"))


def test_fast_dev_run_of_the_coco_maskrcnn_experiment(coco_dir, tmp_path):
    result = run_cli(["experiment=coco_maskrcnn_1x_vmamba_tiny_s1l8", f"data.root={coco_dir}",
                      "trainer.fast_dev_run=true", "backbone=test_vmamba", "head.min_size=64", "head.max_size=128",
                      "head.fpn_channels=32", "head.representation_size=64", "head.mask_channels=16",
                      "data.num_workers=0", "print_config=false", f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    assert re.search(r"test/bbox_mAP = [0-9.]+", output) and re.search(r"test/segm_mAP = [0-9.]+", output)
    assert list((tmp_path / "run" / "overlays").glob("val_epoch000_*.png"))


@pytest.mark.slow
def test_coco_3x_recipe_fast_dev_run(coco_dir, tmp_path):
    result = run_cli(["experiment=coco_maskrcnn_3x_vmamba_tiny_s1l8", f"data.root={coco_dir}",
                      "trainer.fast_dev_run=true", "backbone=test_vmamba", "head.min_size=[48,64]",
                      "head.max_size=128", "data.num_workers=0", "print_config=false",
                      f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.slow
def test_tree_demo_finds_trees(tmp_path):
    try:
        TreeCrownsDataModule()
    except FileNotFoundError as err:
        pytest.skip(str(err))
    # A shortened demo (the full 12 epochs reach AP50 0.24, README); untrained detectors score ~0.
    result = run_cli(["experiment=demo_det_trees", "trainer.max_epochs=5", "print_config=false",
                      f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path, timeout=3600)
    assert result.returncode == 0, result.stderr[-3000:]
    ap50 = float(re.search(r"test/bbox_mAP_50 = ([0-9.]+)", result.stdout + result.stderr).group(1))
    assert ap50 > 0.05


COCO_EXPERIMENTS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("coco_maskrcnn_*.yaml"))


@pytest.mark.parametrize("experiment", COCO_EXPERIMENTS)
def test_coco_recipes_follow_the_official_schedules(experiment, tmp_path):
    cfg = compose_config([f"experiment={experiment}"], tmp_path)
    assert (cfg.optimizer.lr, cfg.optimizer.weight_decay) == (1e-4, 0.05)
    assert cfg.data.batch_size * cfg.trainer.accumulate_grad_batches == 16
    assert (cfg.head.fpn_channels, cfg.scheduler.warmup_steps, cfg.scheduler.epochs) == (256, 1000,
                                                                                      cfg.trainer.max_epochs)
    if "_1x_" in experiment:
        assert (cfg.trainer.max_epochs, list(cfg.scheduler.milestones), cfg.head.min_size) == (12, [8, 11], 800)
    else:
        assert (cfg.trainer.max_epochs, list(cfg.scheduler.milestones)) == (36, [27, 33])
        assert list(cfg.head.min_size) == list(range(480, 801, 32)) and cfg.data.crop_prob == 0.5
    if not experiment.endswith("_common"):
        assert cfg.backbone.name == experiment.split("_", 3)[3]


def test_run_builds_the_feature_interface_for_maskrcnn(coco_dir, tmp_path):
    cfg = compose_config(["experiment=coco_maskrcnn_1x_vmamba_tiny_s1l8", f"data.root={coco_dir}",
                          "backbone=test_vmamba", "data.num_workers=0"], tmp_path)
    datamodule, task = build_task(cfg)
    assert isinstance(task, DetectionTask) and task.iou_types == ("bbox", "segm")
    assert [block[0].in_channels for block in task.head.fpn.inner_blocks] == [8, 16, 32, 64]
    assert task.head.roi_heads.box_predictor.cls_score.out_features == datamodule.num_classes + 1 == 4
