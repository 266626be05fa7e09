"""OpenMMLab integration: registration, the documented configs build and train a step, UperNet parity.

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

DOCS = ROOT / "docs" / "mm"
UPERNET_CONFIG = DOCS / "upernet_vmamba_tiny_s1l8_8xb2-160k_ade20k-512x512.py"
MASKRCNN_CONFIG = DOCS / "mask-rcnn_vmamba_tiny_s1l8_fpn_1x_coco.py"
TEST_CHANNELS = [8, 16, 32, 64]  # test_vmamba


@pytest.fixture(autouse=True)
def quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def load_config(path, scope: str) -> Config:
    """A documented config with the tiny test backbone and plain BatchNorm (SyncBN needs a process group)."""
    cfg = Config.fromfile(str(path))
    cfg.model.backbone.name = "test_vmamba"
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
