"""OpenMMLab integration: registration, the documented configs build and train a step; converted official UperNet
and Mask R-CNN checkpoints load strictly into those configs and our models reproduce mmseg's / mmdet's outputs.

Runs only where the optional ``mm`` stack (compiled mmcv 2.1, mmengine, mmdet 3.3, mmsegmentation 1.2)
imports; elsewhere every test skips with the reason.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from tests.conftest import ROOT
from tests.helpers import parameters_reached

mmdet = pytest.importorskip("mmdet", reason="mmdet (optional extra 'mm') is not installed")
mmseg = pytest.importorskip("mmseg", reason="mmsegmentation (optional extra 'mm') is not installed")
pytest.importorskip("mmcv.ops", reason="mmcv with compiled ops is not installed")

from mmengine.config import Config  # noqa: E402
from mmengine.registry import init_default_scope  # noqa: E402
from mmengine.runner import load_checkpoint  # noqa: E402

DOCS = ROOT / "docs" / "mm"
UPERNET_CONFIG = DOCS / "upernet_vmamba_tiny_s1l8_8xb2-160k_ade20k-512x512.py"
MASKRCNN_CONFIG = DOCS / "mask-rcnn_vmamba_tiny_s1l8_fpn_1x_coco.py"
TEST_CHANNELS = [8, 16, 32, 64]  # test_vmamba


@pytest.fixture(autouse=True)
def quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def load_config(path, scope: str, backbone: str = "test_vmamba") -> Config:
    """A documented config with a tiny test backbone and plain BatchNorm (SyncBN needs a process group)."""
    cfg = Config.fromfile(str(path))
    cfg.model.backbone.name = backbone
    cfg.model.backbone.drop_path_rate = 0.0
    init_default_scope(scope)
    return cfg


def test_import_registers_the_backbone_in_both_registries():
    from mmdet.registry import MODELS as DET_MODELS
    from mmseg.registry import MODELS as SEG_MODELS

    import backbones.mm as mm

    assert set(mm.REGISTERED_IN) == {"mmdet", "mmseg"}
    for registry in (DET_MODELS, SEG_MODELS):
        backbone = registry.build(dict(type="MambaLabBackbone", name="test_vmamba"))
        features = backbone(torch.randn(1, 3, 64, 64))
        assert isinstance(features, tuple)
        assert [f.shape[1] for f in features] == TEST_CHANNELS
        assert [64 // f.shape[-1] for f in features] == [4, 8, 16, 32]


def test_upernet_config_builds_trains_a_step_and_predicts():
    from mmengine.structures import PixelData
    from mmseg.registry import MODELS
    from mmseg.structures import SegDataSample

    cfg = load_config(UPERNET_CONFIG, "mmseg")
    assert cfg.model.decode_head.channels == 512 and cfg.model.decode_head.pool_scales == (1, 2, 3, 6)
    assert cfg.model.auxiliary_head.loss_decode.loss_weight == 0.4
    cfg.model.decode_head.update(in_channels=TEST_CHANNELS, channels=16, norm_cfg=dict(type="BN"))
    cfg.model.auxiliary_head.update(in_channels=TEST_CHANNELS[2], channels=8, norm_cfg=dict(type="BN"))
    cfg.model.data_preprocessor.size = (64, 64)
    model = MODELS.build(cfg.model)
    torch.manual_seed(0)
    samples = []
    for _ in range(2):
        sample = SegDataSample(metainfo=dict(img_shape=(64, 64), ori_shape=(64, 64), pad_shape=(64, 64)))
        sample.gt_sem_seg = PixelData(data=torch.randint(0, 150, (1, 64, 64)))
        samples.append(sample)
    data = model.data_preprocessor(dict(inputs=[torch.randint(0, 255, (3, 64, 64), dtype=torch.uint8)] * 2,
                                        data_samples=samples), training=True)
    model.train()
    losses = model(**data, mode="loss")
    total = sum(value for key, value in losses.items() if "loss" in key)
    total.backward()
    assert torch.isfinite(total)
    assert parameters_reached(model.backbone.parameters()) > 0.5
    model.eval()
    with torch.no_grad():
        predictions = model(**model.data_preprocessor(data, training=False), mode="predict")
    assert predictions[0].pred_sem_seg.data.shape[-2:] == (64, 64)


def test_maskrcnn_config_builds_trains_a_step_and_predicts():
    from mmdet.registry import MODELS
    from mmdet.structures import DetDataSample
    from mmdet.structures.mask import BitmapMasks
    from mmengine.structures import InstanceData

    cfg = load_config(MASKRCNN_CONFIG, "mmdet")
    assert cfg.model.neck.out_channels == 256 and cfg.model.neck.num_outs == 5
    cfg.model.neck.in_channels = TEST_CHANNELS
    model = MODELS.build(cfg.model)
    size = (96, 128)
    sample = DetDataSample(metainfo=dict(img_shape=size, ori_shape=size, pad_shape=size, scale_factor=(1.0, 1.0),
                                         batch_input_shape=size))
    masks = torch.zeros((2, *size), dtype=torch.uint8)
    masks[0, 10:50, 20:70], masks[1, 40:90, 60:120] = 1, 1
    sample.gt_instances = InstanceData(bboxes=torch.tensor([[20.0, 10, 70, 50], [60.0, 40, 120, 90]]),
                                       labels=torch.tensor([0, 5]), masks=BitmapMasks(masks.numpy(), *size))
    data = model.data_preprocessor(dict(inputs=[torch.randint(0, 255, (3, *size), dtype=torch.uint8)],
                                        data_samples=[sample]), training=True)
    model.train()
    losses = model(**data, mode="loss")
    total = sum(v if torch.is_tensor(v) else sum(v) for k, v in losses.items() if "loss" in k)
    total.backward()
    assert torch.isfinite(total) and "loss_mask" in losses
    assert parameters_reached(model.backbone.parameters()) > 0.5
    model.eval()
    with torch.no_grad():
        predictions = model(**model.data_preprocessor(data, training=False), mode="predict")
    assert predictions[0].pred_instances.bboxes.shape[-1] == 4


def test_our_upernet_loads_mmseg_head_weights_strictly_and_matches_its_output():
    from mmseg.models.decode_heads import FCNHead as MMFCNHead
    from mmseg.models.decode_heads import UPerHead as MMUPerHead

    from heads import UperNet

    channels, norm = [96, 192, 384, 768], dict(type="BN", requires_grad=True)
    torch.manual_seed(0)
    decode = MMUPerHead(in_channels=channels, in_index=[0, 1, 2, 3], pool_scales=(1, 2, 3, 6), channels=512,
                        dropout_ratio=0.1, num_classes=150, norm_cfg=norm, align_corners=False)
    aux = MMFCNHead(in_channels=384, in_index=2, channels=256, num_convs=1, concat_input=False, dropout_ratio=0.1,
                    num_classes=150, norm_cfg=norm, align_corners=False)
    state = {**{f"decode_head.{k}": v for k, v in decode.state_dict().items()},
             **{f"auxiliary_head.{k}": v for k, v in aux.state_dict().items()}}
    ours = UperNet(channels, 150)
    ours.load_state_dict(state, strict=True)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in decode.parameters()) + sum(
        p.numel() for p in aux.parameters())
    features = [torch.randn(2, c, 32 // 2 ** i, 32 // 2 ** i) for i, c in enumerate(channels)]
    for module in (decode, aux, ours):
        module.eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(features), decode(features))
        torch.testing.assert_close(ours.forward_aux(features), aux(features))


def _realistic(state: dict, seed: int = 0) -> dict:
    """Random weights at trained-model scales: He-initialised convs, BatchNorm near identity, so that logits are
    O(1) and a 1e-4 tolerance means something."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, value in state.items():
        if key.endswith("bn.weight"):
            value = 1 + 0.1 * torch.randn(value.shape, generator=g)
        elif key.endswith(("bn.bias", "bn.running_mean")):
            value = 0.1 * torch.randn(value.shape, generator=g)
        elif key.endswith("bn.running_var"):
            value = 0.5 + torch.rand(value.shape, generator=g)
        elif "_head." in key and value.dim() == 4:
            value = torch.randn(value.shape, generator=g) * (2 / value[0].numel()) ** 0.5
        out[key] = value
    return out


def _converted(official: dict, tmp_path, name: str, classes: int = 150, variant: str = "test_vmamba"
               ) -> tuple[dict, dict]:
    """The official-layout state dict through tools.convert (with --openmmlab): our task weights and their
    description; the OpenMMLab checkpoint is <tmp_path>/<name>/openmmlab.pth."""
    from tasks.weights import read_task_weights
    from tests import release_fixtures as rf
    from tools.convert import main

    path = rf.save(rf.mmengine_checkpoint(official, [f"c{i}" for i in range(classes)], [[0, 0, 0]] * classes),
                   tmp_path / f"{name}.pth")
    assert main([str(path), variant, "--out", str(tmp_path / name), "--openmmlab"]) == 0
    return read_task_weights(tmp_path / name)


@pytest.mark.parametrize("mode,variant", [("whole", "test_vmamba"), ("slide", "test_vmamba"),
                                          ("whole", "test_msvmamba")])
def test_converted_upernet_reproduces_mmseg_encoder_decoder(mode, variant, tmp_path):
    """mmseg's EncoderDecoder (UPerHead + FCNHead) from the official config, with our backbone registered through
    backbones.mm, loads the official-layout checkpoint strictly (the exact path); run.py's task on the converted
    weights gives the same segmentation logits, whole-image and sliding-window, at sizes that are not multiples
    of 32."""
    import hydra
    from mmseg.registry import MODELS

    import run
    from tests.conftest import compose_config
    from tests.test_convert_dense import upernet_file

    official = _realistic(upernet_file(variant=variant))
    weights, meta = _converted(official, tmp_path, "upernet", variant=variant)
    crop, stride = (96, 96), (64, 64)
    cfg = load_config(UPERNET_CONFIG, "mmseg", variant)
    cfg.model.decode_head.update(in_channels=TEST_CHANNELS, channels=32, norm_cfg=dict(type="BN"))
    cfg.model.auxiliary_head.update(in_channels=TEST_CHANNELS[2], channels=16, norm_cfg=dict(type="BN"))
    cfg.model.test_cfg = dict(mode=mode, crop_size=crop, stride=stride)
    reference = MODELS.build(cfg.model).eval()
    load_checkpoint(reference, str(tmp_path / "upernet" / "openmmlab.pth"), strict=True)

    ours_cfg = compose_config([f"experiment={meta['experiment']}", *meta["overrides"], f"task.inference={mode}",
                               f"task.crop_size=[{crop[0]},{crop[1]}]", f"task.stride=[{stride[0]},{stride[1]}]"],
                              tmp_path)
    backbone, head = run.build_model(ours_cfg, 3, 150)
    task = hydra.utils.instantiate(ours_cfg.task, backbone=backbone, head=head, optimizer=None, num_classes=150)
    task.load_state_dict(weights, strict=True)
    task.eval()
    torch.manual_seed(0)
    for size in ((83, 117), (150, 230)):
        images = torch.randn(1, 3, *size)
        metas = [dict(img_shape=size, ori_shape=size, pad_shape=size, padding_size=[0, 0, 0, 0])]
        with torch.no_grad():
            expected = reference.inference(images, metas)
            got = task.predict_logits(images)
        assert got.shape == expected.shape == (1, 150, *size)
        assert expected.abs().max() > 0.5  # logits of a useful scale, so that the tolerance is meaningful
        assert (got - expected).abs().max() <= 1e-4


def _realistic_detector(state: dict, seed: int = 0) -> dict:
    """Random detector weights at trained-model scales (He-initialised convs and FC layers, small biases)."""
    g = torch.Generator().manual_seed(seed)
    return {k: (torch.randn(v.shape, generator=g) * (2 / v[0].numel()) ** 0.5 if v.dim() > 1 and not k.startswith(
        "backbone.") else 0.01 * torch.randn(v.shape, generator=g) if not k.startswith("backbone.") else v)
        for k, v in state.items()}


@pytest.mark.parametrize("variant", ["test_vmamba", "test_msvmamba"])
def test_converted_maskrcnn_matches_mmdet_module_by_module(variant, tmp_path):
    """mmdet's Mask R-CNN from the official config (our backbone through backbones.mm) loads the official-layout
    checkpoint strictly; on the converted weights our torchvision-based head gives the same FPN maps, RPN
    objectness and deltas, anchors, box-head logits and deltas and mask logits for the same RoIs (<= 1e-4)."""
    from collections import OrderedDict

    from mmdet.registry import MODELS
    from mmdet.structures.bbox import bbox2roi
    from torchvision.models.detection.image_list import ImageList

    import run
    from tests import release_fixtures as rf
    from tests.conftest import compose_config
    from tests.test_convert_dense import TEST_BACKBONES

    official = _realistic_detector(rf.materialise({**TEST_BACKBONES[variant](),
                                                   **rf.mmdet_maskrcnn(TEST_CHANNELS, 80)}))
    weights, meta = _converted(official, tmp_path, "mask_rcnn", classes=80, variant=variant)
    cfg = load_config(MASKRCNN_CONFIG, "mmdet", variant)
    cfg.model.neck.in_channels = TEST_CHANNELS
    reference = MODELS.build(cfg.model).eval()
    load_checkpoint(reference, str(tmp_path / "mask_rcnn" / "openmmlab.pth"), strict=True)
    ours_cfg = compose_config([f"experiment={meta['experiment']}", *meta["overrides"]], tmp_path)
    backbone, head = run.build_model(ours_cfg, 3, 80)
    backbone.load_state_dict({k[len("backbone."):]: v for k, v in weights.items() if k.startswith("backbone.")})
    head.load_state_dict({k[len("head."):]: v for k, v in weights.items() if k.startswith("head.")})
    backbone.eval(), head.eval()

    def close(got, expected):
        assert got.shape == expected.shape and expected.abs().max() > 0.05
        assert (got - expected).abs().max() <= 1e-4

    torch.manual_seed(0)
    height, width = 512, 640
    images = torch.randn(1, 3, height, width)
    with torch.no_grad():
        features = reference.backbone(images)
        assert all(f.is_contiguous() for f in features)  # mmcv's CPU RoIAlign misreads channels-last maps
        pyramid = head.fpn(OrderedDict((str(i), f) for i, f in enumerate(backbone(images))))
        expected_pyramid = reference.neck(features)
        for got, expected in zip(pyramid.values(), expected_pyramid):
            close(got, expected)
        objectness, deltas = head.rpn.head(list(pyramid.values()))
        scores, boxes = reference.rpn_head(expected_pyramid)
        for pair in (*zip(objectness, scores), *zip(deltas, boxes)):
            close(*pair)
        anchors = head.rpn.anchor_generator(ImageList(images, [(height, width)]), list(pyramid.values()))[0]
        priors = reference.rpn_head.prior_generator.grid_priors([f.shape[-2:] for f in expected_pyramid],
                                                                device="cpu")
        torch.testing.assert_close(anchors, torch.cat(priors), rtol=0, atol=1e-4)
        # Decoding the same deltas, log size changes beyond mmdet's +-4.14 clamp on both sides included.
        deltas = torch.randn(len(anchors), 4) * 3
        for ours_coder, coder in ((head.rpn.box_coder, reference.rpn_head.bbox_coder),
                                  (head.roi_heads.box_coder, reference.roi_head.bbox_head.bbox_coder)):
            expected = coder.decode(anchors, deltas / torch.tensor(coder.stds))
            got = ours_coder.decode_single(deltas * torch.tensor(ours_coder.weights), anchors)
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-3)
        # RoIs of every size, so that all four pooling levels are used.
        centre = torch.rand(200, 2) * torch.tensor([width, height])
        size = torch.exp(torch.empty(200, 2).uniform_(2.5, 6.3))
        rois = torch.cat([centre - size / 2, centre + size / 2], 1).clamp(min=0)
        rois[:, 2:] = torch.minimum(rois[:, 2:], torch.tensor([width, height]) - 1)
        rois = torch.cat([rois, torch.tensor([[0.0, 0, 639, 511], [40, 10, 600, 500]])])  # level 3: side >= 448
        image_sizes = [(height, width)]
        box_features = head.roi_heads.box_roi_pool(pyramid, [rois], image_sizes)
        assert set(head.roi_heads.box_roi_pool.map_levels([rois]).tolist()) == {0, 1, 2, 3}
        logits, box_deltas = head.roi_heads.box_predictor(head.roi_heads.box_head(box_features))
        bbox = reference.roi_head._bbox_forward(expected_pyramid[:4], bbox2roi([rois]))
        close(logits[:, list(range(1, 81)) + [0]], bbox["cls_score"])  # background first in torchvision
        close(box_deltas[:, 4:], bbox["bbox_pred"])
        mask_features = head.roi_heads.mask_roi_pool(pyramid, [rois], image_sizes)
        mask_logits = head.roi_heads.mask_predictor(head.roi_heads.mask_head(mask_features))
        close(mask_logits[:, 1:], reference.roi_head._mask_forward(expected_pyramid[:4], bbox2roi([rois]))[
            "mask_preds"])


def test_masks_are_pasted_as_mmdet_pastes_them():
    """heads.maskrcnn.paste_masks (used when detections go back to the image) equals mmdet's FCNMaskHead pasting."""
    from mmdet.models.roi_heads.mask_heads.fcn_mask_head import _do_paste_mask

    from heads.maskrcnn import paste_masks

    g = torch.Generator().manual_seed(0)
    probabilities = torch.rand(40, 1, 28, 28, generator=g)
    corner = torch.rand(40, 2, generator=g) * torch.tensor([300.0, 200.0])
    boxes = torch.cat([corner, corner + 2 + torch.rand(40, 2, generator=g) * 150], 1)
    expected = _do_paste_mask(probabilities, boxes, 320, 400, skip_empty=False)[0]
    torch.testing.assert_close(paste_masks(probabilities, boxes, (320, 400))[:, 0], expected, rtol=0, atol=1e-5)
