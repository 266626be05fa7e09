"""Top-down pose estimation: crops and targets as mmpose 1.x makes them, the heatmap head, decoding, OKS-NMS,
COCO keypoint AP against pycocotools and by hand, official pose-checkpoint conversion, recipes and the CLI."""

from __future__ import annotations

import functools
import json
import os
import re
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from PIL import Image

import backbones  # noqa: F401  (registers the backbones with timm)
from datamodules.coco_keypoints import (
    COCO_KEYPOINTS,
    COCOKeypointsDataModule,
    PersonInstance,
    TopdownPersons,
    detected_people,
)
from datamodules.keypoint_transforms import (
    apply_affine,
    crop_matrix,
    fix_aspect_ratio,
    flip_indices_from_names,
    gaussian_heatmaps,
    half_body_box,
    random_box_transform,
    truncated_normal,
    warp_affine,
)
from heads import TopdownHeatmapHead
from heads.pose import pose_head_state_dict
from run import build_task
from tasks import PoseTask
from tasks.pose import keypoint_mse_loss
from tasks.pose_eval import (
    KEYPOINT_STATS,
    coco_keypoint_stats,
    decode_heatmaps,
    flip_back,
    instance_score,
    oks_nms,
    select_instances,
    to_image,
)
from tests.conftest import CONF_DIR, compose_config, run_cli
from tests.pose_fixtures import make_coco_keypoints
from tests.test_safe_load import Payload

pytest.importorskip("pycocotools", reason="pycocotools is needed for COCO keypoint data and AP")

NO_AUGMENTATION = dict(flip_prob=0.0, half_body_prob=0.0, shift_factor=0.16, shift_prob=0.0, scale_range=(0.5, 1.5),
                       scale_prob=0.0, rotate_factor=80.0, rotate_prob=0.0)
COCO_FLIP = [0, 2, 1, 4, 3, 6, 5, 8, 7, 10, 9, 12, 11, 14, 13, 16, 15]
# pycocotools' keypoint OKS constants (cocoeval.Params.setKpParams), written out as the COCO site lists them.
SIGMAS = np.array([.26, .25, .25, .35, .35, .79, .79, .72, .72, .62, .62, 1.07, 1.07, .87, .87, .89, .89]) / 10


@pytest.fixture(scope="module")
def pose_dir(tmp_path_factory) -> Path:
    return make_coco_keypoints(tmp_path_factory.mktemp("coco_keypoints"))


# ----------------------------------------------------------------------------------------------- transforms


def mmpose_warp_matrix(center, scale, rotation, output_size) -> np.ndarray:
    """mmpose's three-point construction of the crop: the center, a point half a box width to its left
    (rotated) and a third point at right angles, mapped to the output's center, left edge middle and the
    matching third point; solved as a linear system."""
    out_h, out_w = output_size
    theta = np.deg2rad(rotation)

    def rotate(point):
        return np.array([point[0] * np.cos(theta) - point[1] * np.sin(theta),
                         point[0] * np.sin(theta) + point[1] * np.cos(theta)])

    def third(a, b):
        direction = a - b
        return b + np.array([-direction[1], direction[0]])

    src = [np.asarray(center, float), np.asarray(center, float) + rotate([-0.5 * scale[0], 0.0])]
    dst = [np.array([out_w / 2, out_h / 2]), np.array([out_w / 2 - out_w / 2, out_h / 2])]
    src.append(third(*src))
    dst.append(third(*dst))
    system = np.array([[x, y, 1.0] for x, y in src])
    return np.linalg.solve(system, np.array(dst)).T


def test_crop_matrix_is_mmposes_warp_matrix():
    rng = np.random.default_rng(0)
    for _ in range(20):
        center, scale = rng.uniform(0, 500, 2), rng.uniform(20, 300, 2)
        rotation = float(rng.uniform(-80, 80))
        np.testing.assert_allclose(crop_matrix(center, scale, rotation, (256, 192)),
                                   mmpose_warp_matrix(center, scale, rotation, (256, 192)), rtol=1e-9, atol=1e-9)
    # the box's center lands on the crop's center, and its width on the crop's width
    matrix = crop_matrix(np.array([100.0, 50.0]), np.array([60.0, 80.0]), 0.0, (64, 48))
    np.testing.assert_allclose(apply_affine(np.array([[100.0, 50.0], [70.0, 50.0]]), matrix), [[24, 32], [0, 32]])


def test_aspect_ratio_grows_the_short_side():
    np.testing.assert_allclose(fix_aspect_ratio(np.array([30.0, 100.0]), 0.75), [75, 100])
    np.testing.assert_allclose(fix_aspect_ratio(np.array([90.0, 100.0]), 0.75), [90, 120])


def bilinear_reference(image: np.ndarray, matrix: np.ndarray, output_size) -> np.ndarray:
    """Per-pixel bilinear sampling at integer pixel centres with zeros outside, written out plainly."""
    channels, height, width = image.shape
    inverse = np.linalg.inv(np.vstack([matrix, [0, 0, 1]]))
    out = np.zeros((channels, *output_size))
    for v in range(output_size[0]):
        for u in range(output_size[1]):
            x, y, _ = inverse @ [u, v, 1]
            x0, y0 = int(np.floor(x)), int(np.floor(y))
            for dy, dx in ((0, 0), (0, 1), (1, 0), (1, 1)):
                px, py = x0 + dx, y0 + dy
                weight = (1 - abs(x - px)) * (1 - abs(y - py))
                if 0 <= px < width and 0 <= py < height:
                    out[:, v, u] += weight * image[:, py, px]
    return out


def test_warp_samples_bilinearly_with_zeros_outside():
    rng = np.random.default_rng(1)
    image = rng.uniform(0, 255, (3, 13, 17))
    matrix = crop_matrix(np.array([7.3, 6.1]), np.array([12.0, 16.0]), 25.0, (12, 9))
    ours = warp_affine(torch.from_numpy(image), matrix, (12, 9)).double().numpy()
    # float32 sampling of values up to 255: errors of a few 1e-4
    np.testing.assert_allclose(ours, bilinear_reference(image, matrix, (12, 9)), atol=2e-3)
    shifted = warp_affine(torch.from_numpy(image), np.array([[1.0, 0, -2], [0, 1, -3]]), (8, 10))
    np.testing.assert_allclose(shifted.double().numpy(), image[:, 3:11, 2:12], atol=1e-3)


def test_gaussian_targets_are_the_msra_encoding():
    keypoints = np.array([[21.0, 30.0], [-60.0, 10.0], [2.0, 2.0], [10.0, 10.0]])
    visible = np.array([1.0, 1.0, 1.0, 0.0])
    heatmaps, weights = gaussian_heatmaps(keypoints, visible, (16, 12), stride=4, sigma=2.0)
    assert heatmaps.shape == (4, 16, 12) and weights.tolist() == [1, 0, 1, 0]
    # keypoint 0: centred on the integer pixel floor(p / 4 + 0.5) = (x 5, y 8), peak 1, radius 3 sigma
    ys, xs = np.mgrid[0:16, 0:12]
    expected = np.exp(-((xs - 5) ** 2 + (ys - 8) ** 2) / 8.0) * ((abs(xs - 5) <= 6) & (abs(ys - 8) <= 6))
    np.testing.assert_allclose(heatmaps[0], expected, rtol=1e-6, atol=1e-7)
    assert heatmaps[1].max() == 0 and heatmaps[3].max() == 0  # window outside / unlabelled
    assert heatmaps[2, 1, 1] == 1.0 and heatmaps[2, 0, 0] == pytest.approx(np.exp(-2 / 8))  # cut at the border


def test_flip_pairs_from_keypoint_names():
    assert flip_indices_from_names(COCO_KEYPOINTS) == COCO_FLIP
    with pytest.raises(ValueError, match="no mirror"):
        flip_indices_from_names(["nose", "left_eye"])


def test_random_box_transform_and_half_body_stay_in_their_ranges():
    rng = np.random.default_rng(0)
    samples = truncated_normal(rng, 10000)
    assert np.abs(samples).max() <= 1 and abs(samples.mean()) < 0.02
    center, scale = np.array([50.0, 60.0]), np.array([40.0, 80.0])
    same = random_box_transform(rng, center, scale, 0.16, 0.0, (0.5, 1.5), 0.0, 80.0, 0.0)
    assert np.allclose(same[0], center) and np.allclose(same[1], scale) and same[2] == 0.0
    for _ in range(200):
        new_center, new_scale, rotation = random_box_transform(rng, center, scale, 0.16, 1.0, (0.5, 1.5), 1.0,
                                                               80.0, 1.0)
        assert np.all(np.abs(new_center - center) <= 0.16 * scale + 1e-4)
        assert 0.5 - 1e-6 <= new_scale[0] / scale[0] <= 1.5 + 1e-6 and abs(rotation) <= 80
    keypoints = np.stack([np.arange(17.0), np.arange(17.0) * 2], axis=1)
    upper, lower = list(range(11)), list(range(11, 17))
    box = half_body_box(rng, keypoints, np.ones(17), upper, lower, prob=1.0)
    chosen = upper if box[0][0] < 10 else lower
    np.testing.assert_allclose(box[0], keypoints[chosen].mean(0), rtol=1e-6)
    np.testing.assert_allclose(box[1], (keypoints[chosen].max(0) - keypoints[chosen].min(0)) * 1.5, rtol=1e-6)
    assert half_body_box(rng, keypoints, np.r_[np.ones(8), np.zeros(9)], upper, lower, prob=1.0) is None


# --------------------------------------------------------------------------------------------------- data


def dot_image(tmp_path: Path, x: int, y: int, size=(80, 100)) -> Path:
    """A black image with a white 3x3 dot centred on (x, y)."""
    pixels = np.zeros((*size, 3), np.uint8)
    pixels[y - 1:y + 2, x - 1:x + 2] = 255
    Image.fromarray(pixels).save(tmp_path / "dot.png")
    return tmp_path


@pytest.mark.parametrize("flip", [False, True])
def test_training_crop_puts_pixels_and_targets_in_the_same_place(flip, tmp_path):
    """A keypoint drawn as a dot: after the (flipped, rotated, rescaled) crop the dot and the target peak of
    its keypoint (the mirror one when flipped) coincide."""
    folder = dot_image(tmp_path, 30, 40)
    keypoints, visible = np.zeros((17, 2), np.float32), np.zeros(17, np.float32)
    keypoints[9], visible[9] = (30, 40), 1  # left_wrist
    person = PersonInstance(key=1, image_id=1, file_name="dot.png", image_size=(80, 100),
                            box=np.array([10, 20, 60, 70], np.float32), score=1.0, keypoints=keypoints,
                            visible=visible)
    augmentation = dict(NO_AUGMENTATION, flip_prob=float(flip), rotate_prob=1.0, scale_prob=1.0, shift_prob=1.0,
                        rotate_factor=40.0, scale_range=(0.8, 1.2), shift_factor=0.05)
    dataset = TopdownPersons([person], folder, folder / "x.json", (128, 96), 4, 2.0, COCO_FLIP, range(11),
                             range(11, 17), True, augmentation, mean=(0, 0, 0), std=(1, 1, 1))
    channel = 10 if flip else 9
    for epoch in range(4):
        sample = dataset[(epoch, 0)]
        assert sample["weights"].nonzero().flatten().tolist() == [channel]
        peak = divmod(int(sample["heatmaps"][channel].argmax()), 24)
        brightest = divmod(int(sample["image"].sum(0).argmax()), 96)
        assert abs(brightest[0] / 4 - peak[0]) <= 1.5 and abs(brightest[1] / 4 - peak[1]) <= 1.5


def test_datamodule_reads_the_released_layout_like_mmpose(pose_dir):
    datamodule = COCOKeypointsDataModule(str(pose_dir), input_size=(64, 48), num_workers=0)
    assert datamodule.num_classes == 17 and datamodule.flip_indices == COCO_FLIP
    assert datamodule.skeleton[0] == (15, 13) and datamodule.lower_body == list(range(11, 17))
    datamodule.setup("fit")
    train = json.loads((pose_dir / "annotations" / "person_keypoints_train2017.json").read_text())
    usable = [a for a in train["annotations"] if a["num_keypoints"] > 0 and not a["iscrowd"]]
    assert len(datamodule.datasets["train"]) == len(usable) < len(train["annotations"])
    detections = json.loads((pose_dir / "person_detection_results" /
                             "COCO_val2017_detections_AP_H_56_person.json").read_text())
    people = [d for d in detections if d["category_id"] == 1]
    val = datamodule.datasets["val"]
    assert len(val) == len(people) < len(detections)
    sample = val[0]
    x, y, w, h = people[0]["bbox"]
    np.testing.assert_allclose(sample["center"].numpy(), [x + w / 2, y + h / 2], rtol=1e-5)
    np.testing.assert_allclose(sample["scale"].numpy(), fix_aspect_ratio(np.array([w, h]) * 1.25, 0.75), rtol=1e-5)
    assert sample["image"].shape == (3, 64, 48) and sample["score"] == pytest.approx(people[0]["score"])
    ground_truth = COCOKeypointsDataModule(str(pose_dir), input_size=(64, 48), val_boxes="ground_truth")
    ground_truth.setup("validate")
    assert {p.key for p in ground_truth.datasets["val"].instances} == {
        a["id"] for a in ground_truth.coco_gt.anns.values() if a["num_keypoints"] > 0 and not a["iscrowd"]}
    batch = next(iter(datamodule.train_dataloader()))
    assert batch["heatmaps"].shape[1:] == (17, 16, 12) and batch["weights"].shape[1:] == (17,)


def test_bad_files_are_named(pose_dir, tmp_path):
    root = make_coco_keypoints(tmp_path / "coco", n_train=1, n_val=1)
    detections = root / "person_detection_results" / "COCO_val2017_detections_AP_H_56_person.json"
    coco = COCOKeypointsDataModule(str(root)).coco_gt
    detections.write_text(json.dumps([{"image_id": 999, "category_id": 1, "bbox": [0, 0, 5, 5], "score": 1.0}]))
    with pytest.raises(ValueError, match=r"COCO_val2017_detections_AP_H_56_person.json: entry 0 names image_id 999"):
        detected_people(detections, coco, 1)
    detections.write_text(json.dumps([{"image_id": 1010, "bbox": [0, 0, 5, 5]}]))
    with pytest.raises(ValueError, match="entry 0 is not a detection"):
        detected_people(detections, coco, 1)
    detections.unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(str(detections))):
        COCOKeypointsDataModule(str(root))
    val_json = root / "annotations" / "person_keypoints_val2017.json"
    data = json.loads(val_json.read_text())
    data["annotations"][0]["keypoints"] = [1, 2, 2]
    val_json.write_text(json.dumps(data))
    datamodule = COCOKeypointsDataModule(str(root), val_boxes="ground_truth")
    with pytest.raises(ValueError, match=f"{re.escape(str(val_json))}: annotation 2 has 3 keypoint values"):
        datamodule.setup("validate")
    data["categories"][0]["keypoints"] = ["nose"]
    val_json.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="COCO's 17"):
        COCOKeypointsDataModule(str(root), val_boxes="ground_truth")
    with pytest.raises(ValueError, match="multiples of heatmap_stride"):
        COCOKeypointsDataModule(str(pose_dir), input_size=(66, 48))


# --------------------------------------------------------------------------------------------------- head


def test_head_is_hrnets_1x1_conv_on_stride_4_and_simplebaselines_deconvs_on_stride_32():
    hrnet = TopdownHeatmapHead([16], 17, strides=[4])
    assert sorted(hrnet.state_dict()) == ["final_layer.bias", "final_layer.weight"]
    assert hrnet([torch.randn(2, 16, 8, 6)]).shape == (2, 17, 8, 6)
    simple = TopdownHeatmapHead([8, 16, 32, 64], 17, strides=[4, 8, 16, 32])
    assert [k for k in simple.state_dict() if k.endswith("weight")] == [
        "deconv_layers.0.weight", "deconv_layers.1.weight", "deconv_layers.3.weight", "deconv_layers.4.weight",
        "deconv_layers.6.weight", "deconv_layers.7.weight", "final_layer.weight"]
    deconv = simple.deconv_layers[0]
    assert (deconv.kernel_size, deconv.stride, deconv.padding, deconv.bias) == ((4, 4), (2, 2), (1, 1), None)
    assert deconv.weight.shape == (64, 256, 4, 4) and 0.0008 < float(deconv.weight.detach().std()) < 0.0012
    assert simple([torch.randn(1, c, 128 // s, 96 // s) for c, s in ((8, 4), (16, 8), (32, 16), (64, 32))]
                  ).shape == (1, 17, 32, 24)
    assert len(TopdownHeatmapHead([8, 16], 17, strides=[4, 16], in_index=-1).deconv_layers) == 6
    with pytest.raises(ValueError, match="stride 12"):
        TopdownHeatmapHead([8], 17, strides=[12])
    with pytest.raises(ValueError, match="in_index=3"):
        TopdownHeatmapHead([8], 17, strides=[4], in_index=3)


# ------------------------------------------------------------------------------------------ post-processing


def test_decoding_takes_the_maximum_and_a_quarter_step_as_mmpose():
    heatmaps = torch.zeros(1, 3, 16, 12)
    heatmaps[0, 0, 7, 5], heatmaps[0, 0, 7, 6], heatmaps[0, 0, 6, 5] = 1.0, 0.5, 0.2  # right and up are higher
    heatmaps[0, 0, 8, 5] = 0.3
    heatmaps[0, 1, 4, 1], heatmaps[0, 1, 4, 2] = 0.8, 0.6  # x = 1: no x step (mmpose needs 1 < x)
    keypoints, scores = decode_heatmaps(heatmaps, (4.0, 4.0))
    assert keypoints[0, 0].tolist() == [5.25 * 4, 7.25 * 4] and scores[0, 0] == 1.0
    assert keypoints[0, 1].tolist() == [1 * 4, 4 * 4]
    assert keypoints[0, 2].tolist() == [-4, -4] and scores[0, 2] == 0  # empty heatmap


def test_flip_back_swaps_sides_and_shifts_one_pixel():
    heatmaps = torch.zeros(1, 17, 4, 6)
    heatmaps[0, 9, 2, 1] = 1.0  # left wrist seen at x = 1 in the mirrored crop
    back = flip_back(heatmaps, COCO_FLIP, shift=True)
    assert back[0, 10, 2, 5] == 1.0 and back.sum() == 1  # right wrist at 6 - 1 - 1 = 4, shifted to 5
    assert torch.equal(flip_back(flip_back(heatmaps, COCO_FLIP, False), COCO_FLIP, False), heatmaps)


def test_back_projection_inverts_the_crop():
    center, scale = np.array([120.0, 80.0]), fix_aspect_ratio(np.array([50.0, 90.0]) * 1.25, 0.75)
    points = np.array([[100.0, 50.0], [130.0, 120.0]])
    crop = apply_affine(points, crop_matrix(center, scale, 0.0, (256, 192)))
    back = to_image(torch.tensor(crop)[None], torch.tensor(center)[None], torch.tensor(scale)[None], (256, 192))
    np.testing.assert_allclose(back[0].numpy(), points, atol=1e-9)


def test_loss_counts_only_weighted_keypoints():
    heatmaps, targets = torch.rand(2, 3, 4, 4), torch.rand(2, 3, 4, 4)
    weights = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0]])
    expected = sum(((heatmaps[b, k] - targets[b, k]) ** 2).sum() for b, k in ((0, 0), (0, 2), (1, 2))) / 96
    assert keypoint_mse_loss(heatmaps, targets, weights).item() == pytest.approx(expected.item())


def test_rescoring_and_oks_nms():
    assert instance_score(np.array([0.9, 0.1, 0.5]), 0.8) == pytest.approx(0.8 * 0.7)
    assert instance_score(np.array([0.1, 0.2]), 0.8) == 0.0
    pose = np.random.default_rng(0).uniform(0, 100, (17, 2))
    poses = np.stack([pose, pose + 0.5, pose + 60])
    keep = oks_nms(poses, np.array([0.5, 0.9, 0.7]), np.full(3, 5000.0), SIGMAS, 0.9)
    assert keep == [1, 2]  # the near-duplicate with the lower score goes
    assert oks_nms(poses, np.array([0.5, 0.9, 0.7]), np.full(3, 5000.0), SIGMAS, 1.0) == [1, 2, 0]


# ------------------------------------------------------------------------------------------- COCO AP / AR


def predictions_from_ground_truth(coco, shift=(0.0, 0.0)) -> list[dict]:
    """Every annotated person predicted at its labelled keypoints (+ ``shift``), scores 0.9, box score 1."""
    predictions = []
    for ann in coco.anns.values():
        if not ann.get("num_keypoints"):
            continue
        keypoints = np.asarray(ann["keypoints"], float).reshape(-1, 3)[:, :2] + shift
        predictions.append({"key": ann["id"], "image_id": ann["image_id"], "keypoints": keypoints,
                            "keypoint_scores": np.full(17, 0.9), "box_score": 1.0, "area": ann["area"]})
    return predictions


def test_perfect_predictions_give_ap_1(pose_dir):
    coco = COCOKeypointsDataModule(str(pose_dir)).coco_gt
    results = select_instances(predictions_from_ground_truth(coco), SIGMAS)
    stats = coco_keypoint_stats(coco, results)
    assert stats["AP"] == 1.0 and stats["AR"] == 1.0 and stats["AP_50"] == 1.0
    assert coco_keypoint_stats(coco, []) == {name: 0.0 for name in KEYPOINT_STATS}


def single_person_coco(area: float = 4000.0):
    """One image with one person (10 labelled keypoints), as a pycocotools index."""
    from pycocotools.coco import COCO

    keypoints = np.zeros((17, 3))
    keypoints[:10] = [[20 + 5 * k, 30 + 3 * k, 2] for k in range(10)]
    coco = COCO()
    coco.dataset = {"images": [{"id": 7, "width": 200, "height": 200, "file_name": "a.jpg"}],
                    "categories": [{"id": 1, "name": "person"}],
                    "annotations": [{"id": 1, "image_id": 7, "category_id": 1, "iscrowd": 0, "area": area,
                                     "bbox": [10, 20, 80, 90], "num_keypoints": 10,
                                     "keypoints": keypoints.reshape(-1).tolist()}]}
    coco.createIndex()
    return coco, keypoints


def test_a_known_shift_gives_the_ap_of_cocos_definition():
    """OKS = mean over labelled keypoints of exp(-d^2 / (2 area (2 sigma)^2)); one person matched at the
    thresholds 0.50:0.05:0.95 it reaches gives AP = (number of those thresholds) / 10."""
    from pycocotools.cocoeval import COCOeval

    coco, keypoints = single_person_coco()
    shift = 6.0
    expected_oks = np.mean(np.exp(-shift ** 2 / (2 * 4000.0 * (2 * SIGMAS[:10]) ** 2)))
    thresholds = np.linspace(0.5, 0.95, 10)
    assert np.min(np.abs(thresholds - expected_oks)) > 0.01  # not on a threshold
    expected_ap = float((thresholds <= expected_oks).sum()) / 10
    assert 0 < expected_ap < 1
    prediction = {"key": 1, "image_id": 7, "keypoints": keypoints[:, :2] + [shift, 0.0],
                  "keypoint_scores": np.full(17, 0.9), "box_score": 1.0, "area": 4000.0}
    results = select_instances([prediction], SIGMAS)
    stats = coco_keypoint_stats(coco, results)
    assert stats["AP"] == pytest.approx(expected_ap) and stats["AR"] == pytest.approx(expected_ap)
    evaluator = COCOeval(coco, coco.loadRes(results), iouType="keypoints")
    evaluator.evaluate()
    assert evaluator.ious[(7, 1)][0, 0] == pytest.approx(expected_oks, rel=1e-9)


def test_shifted_predictions_score_as_pycocotools_on_the_fixture(pose_dir):
    from pycocotools.cocoeval import COCOeval

    coco = COCOKeypointsDataModule(str(pose_dir)).coco_gt
    predictions = predictions_from_ground_truth(coco, shift=(3.0, -2.0))
    ours = coco_keypoint_stats(coco, select_instances(predictions, SIGMAS))
    raw = [{"image_id": p["image_id"], "category_id": 1, "score": 0.9,
            "keypoints": np.concatenate([p["keypoints"], np.full((17, 1), 0.9)], 1).reshape(-1).tolist()}
           for p in predictions]
    evaluator = COCOeval(coco, coco.loadRes(raw), iouType="keypoints")
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    assert ours == dict(zip(KEYPOINT_STATS, (float(v) for v in evaluator.stats)))
    assert 0 < ours["AP"] < 1


# ----------------------------------------------------------------------------------------------- the task


def pose_task(backbone_name: str = "test_hrvmamba", **task_args) -> PoseTask:
    torch.manual_seed(0)
    backbone = timm.create_model(backbone_name, features_only=True, multiscale_output=False)
    head = TopdownHeatmapHead(backbone.feature_info.channels(), 17, backbone.feature_info.reduction())
    return PoseTask(backbone, head, functools.partial(torch.optim.AdamW, lr=1e-3), 17, **task_args)


def test_validation_of_perfect_keypoints_reaches_ap_1_and_draws_skeletons(pose_dir, tmp_path, monkeypatch):
    """The whole evaluation path (batches, image coordinates, rescoring, NMS, pycocotools, logging, results
    file, overlays) with a model that returns the annotated keypoints of each ground-truth box."""
    datamodule = COCOKeypointsDataModule(str(pose_dir), input_size=(64, 48), val_boxes="ground_truth",
                                         num_workers=0, val_batch_size=2)
    datamodule.setup("validate")
    by_center = {tuple(np.round((p.box[:2] + p.box[2:]) / 2, 3)): datamodule.coco_gt.anns[p.key]["keypoints"]
                 for p in datamodule.datasets["val"].instances}
    task = pose_task(coco_gt=datamodule.coco_gt, skeleton=datamodule.skeleton, image_path=datamodule.image_path)

    def annotated(images, center, scale):
        points = torch.tensor([by_center[tuple(np.round(c.numpy(), 3))] for c in center]).view(-1, 17, 3)
        return points[..., :2], torch.where(points[..., 2] > 0, 0.9, 0.0)

    monkeypatch.setattr(task, "predict_keypoints", annotated)
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         default_root_dir=str(tmp_path), enable_model_summary=False)
    metrics = trainer.validate(task, datamodule=datamodule)[0]
    assert metrics["val/AP"] == 1.0 and metrics["val/AR"] == 1.0
    results = json.loads((tmp_path / "keypoints_val.json").read_text())
    assert len(results) == len(datamodule.datasets["val"]) and len(results[0]["keypoints"]) == 51
    with pytest.raises(RuntimeError, match="coco_gt"):
        trainer.validate(pose_task(), datamodule=datamodule)
    overlay = np.array(Image.open(tmp_path / "overlays" / "val_epoch000_0.png"))
    width = overlay.shape[1] // 3
    assert (overlay[:, width:2 * width] != overlay[:, :width]).any()  # predicted skeletons drawn


def test_training_step_learns_and_checks_target_shapes(pose_dir):
    datamodule = COCOKeypointsDataModule(str(pose_dir), input_size=(64, 48), num_workers=0, batch_size=4)
    datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()))
    task = pose_task()
    optimizer = torch.optim.Adam(task.parameters(), lr=1e-3)
    losses = []
    for _ in range(30):
        loss = task.training_step(batch, 0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    with pytest.raises(ValueError, match="output_stride"):
        task.training_step(dict(batch, heatmaps=batch["heatmaps"][..., :8, :6]), 0)


def test_flip_test_averages_the_mirrored_heatmaps():
    task = pose_task().eval()
    images = torch.randn(2, 3, 64, 48)
    with torch.no_grad():
        plain, mirrored = task(images), task(images.flip(-1))
        expected = (plain + flip_back(mirrored, COCO_FLIP, shift=True)) / 2
        torch.testing.assert_close(task.predict_heatmaps(images), expected)
        task.hparams.flip_test = False
        torch.testing.assert_close(task.predict_heatmaps(images), plain)


def test_official_decay_on_every_parameter():
    assert len(pose_task(decay_all_parameters=True).parameter_groups(0.01)) == 1
    groups = pose_task().parameter_groups(0.01)
    assert groups[1]["weight_decay"] == 0.0 and groups[1]["params"]


# -------------------------------------------------------------------------------- official checkpoints


def official_pose_checkpoint(variant: str, deconv_widths=(), prefix: str = "head.", keypoints: int = 17,
                             seed: int = 0) -> dict:
    """An mmpose pose checkpoint as HRVMamba's release lays it out: ``meta`` (with numpy arrays, as mmengine
    stores the dataset metadata) and ``state_dict`` with the official backbone names under ``backbone.`` and
    HeatmapHead's under ``head.`` (``keypoint_head.`` in mmpose 0.x). Values: our initialisation, perturbed,
    with positive BatchNorm variances."""
    from tests.official import hrvmamba_official_key

    torch.manual_seed(seed)
    ours = timm.create_model(variant, num_classes=0, multiscale_output=False)

    def perturbed(key: str, value: torch.Tensor) -> torch.Tensor:
        if not value.is_floating_point():
            return value
        if key.endswith("running_var"):
            return value.abs() + torch.rand_like(value)
        return value + 0.02 * torch.randn_like(value)

    state = {"backbone." + hrvmamba_official_key(k): perturbed(k, v) for k, v in ours.state_dict().items()}
    width = ours.widths[0]
    for i, out in enumerate(deconv_widths):
        state[f"{prefix}deconv_layers.{3 * i}.weight"] = 0.05 * torch.randn(width, out, 4, 4)
        bn = f"{prefix}deconv_layers.{3 * i + 1}."
        state.update({bn + "weight": 1 + 0.1 * torch.randn(out), bn + "bias": 0.1 * torch.randn(out),
                      bn + "running_mean": 0.1 * torch.randn(out), bn + "running_var": 0.5 + torch.rand(out),
                      bn + "num_batches_tracked": torch.tensor(100)})
        width = out
    state[prefix + "final_layer.weight"] = 0.1 * torch.randn(keypoints, width, 1, 1)
    state[prefix + "final_layer.bias"] = 0.1 * torch.randn(keypoints)
    meta = {"dataset_meta": {"sigmas": np.array(SIGMAS, dtype=np.float32), "flip_indices": COCO_FLIP,
                             "num_keypoints": np.int64(keypoints)}, "epoch": 210}
    return {"meta": meta, "state_dict": state}


def official_heatmaps(checkpoint: dict, variant: str, images: torch.Tensor, prefix: str = "head.") -> torch.Tensor:
    """The official model's heatmaps: the backbone through its family's key conversion, then mmpose's
    HeatmapHead written as float64 functional ops on the checkpoint's own head tensors."""
    from backbones.hrvmamba import checkpoint_filter_fn

    backbone = timm.create_model(variant, num_classes=0, multiscale_output=False).eval()
    backbone.load_state_dict(checkpoint_filter_fn(checkpoint, backbone), strict=True)
    weights = {k[len(prefix):]: v.double() for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)}
    with torch.no_grad():
        x = backbone.forward_features(images).double()
    index = 0
    while f"deconv_layers.{index}.weight" in weights:
        bn = f"deconv_layers.{index + 1}."
        x = F.conv_transpose2d(x, weights[f"deconv_layers.{index}.weight"], stride=2, padding=1)
        x = F.batch_norm(x, weights[bn + "running_mean"], weights[bn + "running_var"], weights[bn + "weight"],
                         weights[bn + "bias"], training=False, eps=1e-5).relu()
        index += 3
    return F.conv2d(x, weights["final_layer.weight"], weights["final_layer.bias"])


def test_hrvmamba_tiny_pose_checkpoint_converts_and_reproduces_the_official_heatmaps(pose_dir, tmp_path, capsys):
    """The official tiny config's shapes (branches 16/32/64/128, HeatmapHead 16 -> 17), through the CLI, into
    the task run.py builds for coco_pose_hrvmamba_tiny_256x192, at 256x192."""
    from tools.convert import main

    checkpoint = official_pose_checkpoint("hrvmamba_tiny")
    backbone_params = sum(v.numel() for k, v in checkpoint["state_dict"].items()
                          if k.startswith("backbone.") and "running" not in k and "num_batches" not in k)
    assert backbone_params == 2_151_008  # the official pose backbone, measured from its config
    assert checkpoint["state_dict"]["head.final_layer.weight"].shape == (17, 16, 1, 1)
    path, out = tmp_path / "hrvmamba_tiny256192.pth", tmp_path / "weights" / "tiny.ckpt"
    torch.save(checkpoint, path)
    assert main([str(path), "hrvmamba_tiny", "--pose", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "hrvmamba_tiny (hrvmamba rules)" in printed and "0 deconvolutions, 17 keypoints" in printed
    cfg = compose_config(["experiment=coco_pose_hrvmamba_tiny_256x192", f"data.root={pose_dir}",
                          "data.num_workers=0"], tmp_path)
    _, task = build_task(cfg)
    task.load_state_dict(torch.load(out, weights_only=True)["state_dict"], strict=True)
    images = torch.randn(2, 3, 256, 192)
    with torch.no_grad():
        heatmaps = task.eval()(images)
    expected = official_heatmaps(checkpoint, "hrvmamba_tiny", images)
    assert heatmaps.shape == (2, 17, 64, 48) and expected.abs().max() > 0.1
    # float32 against float64 head arithmetic on identical features: rounding only
    torch.testing.assert_close(heatmaps.double(), expected, rtol=1e-5, atol=1e-5)
    assert main([str(path), "hrvmamba_tiny", "--pose", "--out", str(out)]) == 1  # never replaces a file
    assert "exists" in capsys.readouterr().err


def test_mmpose_0x_deconvolution_head_converts_too():
    """SimpleBaseline's head (deconvolutions + BN) in mmpose 0.x's ``keypoint_head.`` layout."""
    from tools.convert_pose import convert_pose_checkpoint

    checkpoint = official_pose_checkpoint("test_hrvmamba", deconv_widths=(32, 32), prefix="keypoint_head.")
    features, head, conversion = convert_pose_checkpoint(checkpoint, "test_hrvmamba")
    assert (conversion.deconvolutions, conversion.keypoints, conversion.head_tensors) == (2, 17, 14)
    assert set(pose_head_state_dict(checkpoint)) == set(head.state_dict())
    images = torch.randn(1, 3, 32, 24)
    with torch.no_grad():
        heatmaps = head(features(images))
    expected = official_heatmaps(checkpoint, "test_hrvmamba", images, prefix="keypoint_head.")
    assert heatmaps.shape == (1, 17, 32, 24)
    torch.testing.assert_close(heatmaps.double(), expected, rtol=1e-5, atol=1e-5)


class TrainingState:
    """A class a checkpoint may pickle (mmengine's message_hub): read as an inert record, never rebuilt."""

    def __init__(self) -> None:
        self.log = [1.0, 2.0]


def test_pose_checkpoint_files_are_read_safely(tmp_path):
    from tools.convert import load_official
    from tools.convert_pose import convert_pose_main
    from tools.safe_load import Opaque

    checkpoint = official_pose_checkpoint("test_hrvmamba")
    torch.save(checkpoint, tmp_path / "with_meta.pth")
    assert load_official(tmp_path / "with_meta.pth")["meta"]["dataset_meta"]["flip_indices"] == COCO_FLIP
    torch.save(dict(checkpoint, message_hub=TrainingState()), tmp_path / "training_state.pth")
    state = load_official(tmp_path / "training_state.pth")["message_hub"]
    assert isinstance(state, Opaque) and state.source.endswith("TrainingState") and state.state == {"log": [1.0, 2.0]}
    assert convert_pose_main(tmp_path / "training_state.pth", "test_hrvmamba", tmp_path / "from_state.ckpt") == 0
    torch.save(dict(checkpoint, message_hub=Payload(os.system, f"touch {tmp_path / 'marker'}")), tmp_path / "evil.pth")
    assert convert_pose_main(tmp_path / "evil.pth", "test_hrvmamba", tmp_path / "evil.ckpt") == 1
    assert not (tmp_path / "marker").exists() and not (tmp_path / "evil.ckpt").exists()
    headless = {"state_dict": {k: v for k, v in checkpoint["state_dict"].items() if k.startswith("backbone.")}}
    torch.save(headless, tmp_path / "backbone_only.pth")
    assert convert_pose_main(tmp_path / "backbone_only.pth", "test_hrvmamba", tmp_path / "x.ckpt") == 1
    assert not (tmp_path / "x.ckpt").exists()


def test_converted_checkpoint_evaluates_with_run_py(pose_dir, tmp_path):
    from tools.convert_pose import convert_pose_checkpoint, save_pose_checkpoint

    features, head, _ = convert_pose_checkpoint(official_pose_checkpoint("test_hrvmamba"), "test_hrvmamba")
    ckpt = save_pose_checkpoint(features, head, tmp_path / "pose.ckpt")
    result = run_cli(["experiment=coco_pose_hrvmamba_tiny_256x192", "backbone=test_hrvmamba", f"data.root={pose_dir}",
                      "data.input_size=[64,48]", "data.num_workers=0", "mode=eval", f"ckpt_path={ckpt}",
                      "print_config=false", f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert re.search(r"test keypoint AP [0-9.]+", result.stdout + result.stderr)
    assert json.loads((tmp_path / "run" / "keypoints_test.json").read_text())


# ------------------------------------------------------------------------------------- recipes and the CLI

# Official configs (zhanghao5201/HRVMamba pose_estimation/configs/cocofinal): per-GPU batch (x 8 GPUs), input
# (height, width), sigma, drop path, DSS2D dropout, MLP dropout, validation interval (epochs).
OFFICIAL_RECIPES = {
    "coco_pose_hrvmamba_tiny_256x192": (128, [256, 192], 2.0, 0.0, 0.0, 0.0, 2),
    "coco_pose_hrvmamba_small_256x192": (64, [256, 192], 2.0, 0.1, 0.1, 0.1, 2),
    "coco_pose_hrvmamba_base_256x192": (64, [256, 192], 2.0, 0.2, 0.0, 0.0, 2),
    "coco_pose_hrvmamba_small_384x288": (32, [384, 288], 3.0, 0.1, 0.1, 0.1, 2),
    "coco_pose_hrvmamba_base_384x288": (32, [384, 288], 3.0, 0.6, 0.2, 0.2, 1),
}
POSE_EXPERIMENTS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("coco_pose_*.yaml")
                          if p.stem != "coco_pose_common")


@pytest.mark.parametrize("experiment", POSE_EXPERIMENTS)
def test_pose_recipes_follow_hrvmambas_official_configs(experiment, tmp_path):
    cfg = compose_config([f"experiment={experiment}"], tmp_path)
    assert (cfg.optimizer.lr, cfg.optimizer.weight_decay, list(cfg.optimizer.betas)) == (5e-4, 0.01, [0.9, 0.999])
    assert cfg.task.decay_all_parameters and cfg.task.flip_test and cfg.task.nms_threshold == 0.9
    assert (list(cfg.scheduler.milestones), cfg.scheduler.warmup_steps, cfg.scheduler.warmup_start_factor,
            cfg.trainer.max_epochs, cfg.scheduler.epochs) == ([170, 200], 500, 0.001, 210, 210)
    assert cfg.data.val_boxes == "detections" and cfg.data.detections_file.endswith("_AP_H_56_person.json")
    batch = cfg.data.batch_size * cfg.trainer.accumulate_grad_batches
    if experiment in OFFICIAL_RECIPES:
        per_gpu, size, sigma, drop_path, ssm_drop, mlp_drop, interval = OFFICIAL_RECIPES[experiment]
        assert batch == 8 * per_gpu and list(cfg.data.input_size) == size and cfg.data.sigma == sigma
        assert (cfg.backbone.drop_path_rate, cfg.backbone.ssm_drop_rate, cfg.backbone.mlp_drop_rate) == (
            drop_path, ssm_drop, mlp_drop)
        assert cfg.backbone.multiscale_output is False and cfg.trainer.check_val_every_n_epoch == interval
    else:
        assert batch == 512 and list(cfg.data.input_size) == [256, 192] and cfg.data.sigma == 2.0
        assert cfg.backbone.name == experiment[len("coco_pose_"):]


@pytest.mark.parametrize("experiment, backbone, deconvolutions, size", [
    ("coco_pose_hrvmamba_tiny_256x192", "test_hrvmamba", 0, (64, 48)),
    ("coco_pose_vmamba_tiny_s1l8", "test_vmamba", 3, (128, 96)),
    ("coco_pose_vim_tiny_patch16_224", "test_vim", 2, (64, 48))])
def test_run_builds_hrnets_head_on_hrvmamba_and_deconvolutions_elsewhere(experiment, backbone, deconvolutions, size,
                                                                          pose_dir, tmp_path):
    overrides = [f"experiment={experiment}", f"backbone={backbone}", f"data.root={pose_dir}", "data.num_workers=0",
                 f"data.input_size=[{size[0]},{size[1]}]"]
    if backbone == "test_vim":
        overrides += [f"backbone.img_size=[{size[0]},{size[1]}]", "backbone.feature_taps=[3]"]
    datamodule, task = build_task(compose_config(overrides, tmp_path))
    deconvs = [m for m in task.head.modules() if isinstance(m, torch.nn.ConvTranspose2d)]
    assert len(deconvs) == deconvolutions and task.head.final_layer.out_channels == datamodule.num_classes == 17
    with torch.no_grad():
        assert task(torch.randn(1, 3, *size)).shape == (1, 17, size[0] // 4, size[1] // 4)


def test_fast_dev_run_of_the_hrvmamba_pose_experiment(pose_dir, tmp_path):
    result = run_cli(["experiment=coco_pose_hrvmamba_tiny_256x192", "backbone=test_hrvmamba", f"data.root={pose_dir}",
                      "data.input_size=[64,48]", "data.batch_size=4", "data.val_batch_size=4", "data.num_workers=0",
                      "trainer.fast_dev_run=true", "print_config=false", f"hydra.run.dir={tmp_path / 'run'}"],
                     cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    assert re.search(r"test/AP = [0-9.]+", output) and re.search(r"test/AR = [0-9.]+", output)
    assert list((tmp_path / "run" / "overlays").glob("val_epoch000_*.png"))


# One recipe per head path at full size: HRNet's 1x1 head at both input sizes, the SimpleBaseline deconvolutions
# on a hierarchical backbone and the ViTPose head on Vim. The other recipes differ only in numbers that
# test_pose_recipes_follow_hrvmambas_official_configs and tests/test_configs.py check; running all twelve at
# full size took over 30 minutes on the 2-core CI machine.
FULL_SIZE_RUNS = ("coco_pose_hrvmamba_tiny_256x192", "coco_pose_hrvmamba_small_384x288", "coco_pose_vmamba_tiny_s1l8",
                  "coco_pose_vim_tiny_patch16_224")


@pytest.mark.slow
@pytest.mark.parametrize("experiment", FULL_SIZE_RUNS)
def test_fast_dev_run_of_each_pose_head_path_at_full_size(experiment, pose_dir, tmp_path):
    """The recipe as configured (its full-size backbone, input size and head), one batch of two crops."""
    result = run_cli([f"experiment={experiment}", f"data.root={pose_dir}", "data.batch_size=2",
                      "data.val_batch_size=2", "data.num_workers=0", "trainer.fast_dev_run=true", "print_config=false",
                      f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path, timeout=1800)
    assert result.returncode == 0, result.stderr[-3000:]
    assert re.search(r"test/AP = [0-9.]+", result.stdout + result.stderr)
