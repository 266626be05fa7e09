# UperNet + FCN auxiliary head on VMamba-T[s1l8] for ADE20K, 160k iterations at 512x512 (mmsegmentation 1.2.2).
# Everything but the backbone is mmseg's Swin-T UperNet recipe, as MzeroMiko/VMamba's vssm1 configs use it:
# AdamW lr 6e-5, wd 0.01, 1500 linear warm-up iterations then poly decay, 8 GPUs x 2 images, SyncBN heads.
# Official result for this backbone: 47.9 mIoU single-scale (MzeroMiko/VMamba README).
# Train:  python docs/mm/train.py docs/mm/upernet_vmamba_tiny_s1l8_8xb2-160k_ade20k-512x512.py
_base_ = ["mmseg::swin/swin-tiny-patch4-window7-in1k-pre_upernet_8xb2-160k_ade20k-512x512.py"]
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
    decode_head=dict(in_channels=[96, 192, 384, 768], num_classes=150),
    auxiliary_head=dict(in_channels=384, num_classes=150),
)
# The base config already exempts norms from weight decay; the SSM's A_logs and Ds are exempt too.
optim_wrapper = dict(paramwise_cfg=dict(custom_keys={"A_logs": dict(decay_mult=0.0), "Ds": dict(decay_mult=0.0)}))
