# Mask R-CNN with FPN on VMamba-T[s1l8] for COCO, 1x schedule (mmdetection 3.3.0).
# Everything but the backbone is mmdet's Swin-T Mask R-CNN 1x recipe, as MzeroMiko/VMamba's vssm1 configs use it:
# 12 epochs, AdamW lr 1e-4, wd 0.05, 1000 linear warm-up iterations, lr x 0.1 after epochs 8 and 11, 8 GPUs x 2.
# Official result for this backbone: 47.3 box AP / 42.7 mask AP (MzeroMiko/VMamba README). For the 3x multi-scale
# schedule inherit "mmdet::swin/mask-rcnn_swin-t-p4-w7_fpn_ms-crop-3x_coco.py" instead.
# Train:  python docs/mm/train.py docs/mm/mask-rcnn_vmamba_tiny_s1l8_fpn_1x_coco.py
_base_ = ["mmdet::swin/mask-rcnn_swin-t-p4-w7_fpn_1x_coco.py"]
custom_imports = dict(imports=["backbones.mm"], allow_failed_imports=False)
model = dict(
    backbone=dict(
        _delete_=True,
        type="MambaLabBackbone",
        name="vmamba_tiny_s1l8",
        out_indices=(0, 1, 2, 3),
        drop_path_rate=0.2,
        # ImageNet weights converted with tools/convert.py:
        # pretrained=True, pretrained_cfg_overlay=dict(file="vmamba_tiny_s1l8.safetensors"),
    ),
    neck=dict(in_channels=[96, 192, 384, 768]),
)
optim_wrapper = dict(paramwise_cfg=dict(custom_keys={"A_logs": dict(decay_mult=0.0), "Ds": dict(decay_mult=0.0)}))
