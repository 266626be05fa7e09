"""tools.convert on released UperNet (mmseg) and Mask R-CNN (mmdet) checkpoints: the official layouts (written
from the official module structure, tests/release_fixtures.py) fit the model run.py builds for the matching
experiment exactly, convert strictly into weights that run.py evaluates and fine-tunes from (``weights=``), and
wrong combinations fail naming what the file holds."""

from __future__ import annotations

import json
import re

import pytest
import torch

from tasks.weights import load_task_weights, read_task_weights
from tests import release_fixtures as rf
from tests.conftest import compose_config, run_cli
from tests.dense_fixtures import make_ade20k, make_coco
from tests.official import hrvmamba_official_key, msvmamba_official
from tests.test_convert import RELEASES, TEST_VMAMBA, vmamba_official
from tools.convert import main
from tools.convert_dense import fit_dense, plan_dense

TEST_DIMS = (8, 16, 32, 64)


@pytest.fixture(scope="module")
def ade_dir(tmp_path_factory):
    return make_ade20k(tmp_path_factory.mktemp("ade"))


@pytest.fixture(scope="module")
def coco_dir(tmp_path_factory):
    return make_coco(tmp_path_factory.mktemp("coco"))


def _test_backbone(config: dict = TEST_VMAMBA, dims=TEST_DIMS) -> rf.Shapes:
    return rf.dense_backbone(vmamba_official(**config, num_classes=1000, meta=True), dims)


def _msvmamba_backbone(depths, dims, generation: str, gated: bool, ffn_ratio: float, ssm_ratio: float) -> rf.Shapes:
    """MSVMamba's dense backbone (its ``MM_VSSM``: VMamba's ``Backbone_VSSM`` on MS blocks)."""
    official = msvmamba_official(depths, dims, ssm_ratio, 1, generation, gated, ffn_ratio)
    return rf.dense_backbone({k: v.to("meta") for k, v in official.items()}, dims)


# The official dense layouts of the test variants: VMamba's v2 release and MSVMamba's v3 (v2 branch).
TEST_BACKBONES = {"test_vmamba": _test_backbone,
                  "test_msvmamba": lambda: _msvmamba_backbone((1, 1, 1, 1), TEST_DIMS, "v3", False, 4.0, 1.0)}


def upernet_file(num_classes: int = 150, seed: int = 0, variant: str = "test_vmamba") -> dict:
    """A tiny official-layout UperNet state dict (decoder 32 wide, auxiliary head 16)."""
    shapes = {**TEST_BACKBONES[variant](), **rf.mmseg_upernet(TEST_DIMS, num_classes, channels=32, aux_channels=16)}
    return rf.materialise(shapes, seed)


def maskrcnn_file(num_classes: int = 3, seed: int = 0, variant: str = "test_vmamba") -> dict:
    """A tiny official-layout Mask R-CNN state dict (FPN 32, box FCs 64, mask convs 16)."""
    shapes = {**TEST_BACKBONES[variant](), **rf.mmdet_maskrcnn(TEST_DIMS, num_classes, fpn_channels=32,
                                                               fc_channels=64, mask_channels=16)}
    return rf.materialise(shapes, seed)


# Published sizes (MzeroMiko/VMamba README): UperNet 160k / Mask R-CNN 1x parameters in millions.
PUBLISHED = {("vmamba_tiny_s1l8", "mmseg"): 62, ("vmamba_tiny_s1l8", "mmdet"): 50,
             ("vmamba_tiny_s2l5", "mmseg"): 62, ("vmamba_tiny_s2l5", "mmdet"): 50,
             ("vanilla_vmamba_tiny", "mmseg"): 55, ("vanilla_vmamba_tiny", "mmdet"): 42}


@pytest.mark.parametrize("variant,framework", sorted(PUBLISHED))
def test_each_released_dense_layout_fits_its_experiment_exactly(variant, framework):
    """Full size, on the meta device: the released model's keys and shapes are exactly those of the model run.py
    builds for ``ade20k_upernet_<variant>`` / ``coco_maskrcnn_1x_<variant>``, with the published size."""
    config, _ = RELEASES[variant]
    dims = config["dims"]
    shapes = _test_backbone(config, dims)
    shapes.update(rf.mmseg_upernet(dims, 150) if framework == "mmseg" else rf.mmdet_maskrcnn(dims, 80))
    weights = rf.materialise(shapes, meta=True)
    plan = plan_dense({}, weights, variant)
    expected = f"ade20k_upernet_{variant}" if framework == "mmseg" else f"coco_maskrcnn_1x_{variant}"
    assert (plan.experiment, plan.overrides) == (expected, [])
    backbone, head, _, _ = fit_dense(plan, weights, meta=True)
    parameters = sum(p.numel() for module in (backbone, head) for p in module.parameters())
    assert abs(parameters / 1e6 - PUBLISHED[(variant, framework)]) < 0.5


# MSVMamba (YuHengsss/MSVMamba README, master-branch v1 models): parameters in millions of its released
# UperNet 160k and Mask R-CNN 1x models, and the official downstream configs' backbones (ms_vssm/*).
MSVMAMBA_PUBLISHED = {("msvmamba_tiny", "mmseg"): 65, ("msvmamba_tiny", "mmdet"): 53,
                      ("msvmamba_micro", "mmseg"): 42, ("msvmamba_micro", "mmdet"): 32}
MSVMAMBA_CONFIGS = {"msvmamba_tiny": ((1, 2, 9, 2), (96, 192, 384, 768)),
                    "msvmamba_micro": ((1, 2, 5, 2), (64, 128, 256, 512))}


@pytest.mark.parametrize("variant,framework", sorted(MSVMAMBA_PUBLISHED))
def test_msvmamba_released_dense_layouts_fit_exactly(variant, framework):
    depths, dims = MSVMAMBA_CONFIGS[variant]
    shapes = _msvmamba_backbone(depths, dims, "v1", True, 2.0, 2.0)
    shapes.update(rf.mmseg_upernet(dims, 150) if framework == "mmseg" else rf.mmdet_maskrcnn(dims, 80))
    weights = rf.materialise(shapes, meta=True)
    plan = plan_dense({}, weights, variant)
    recipe = "ade20k_upernet" if framework == "mmseg" else "coco_maskrcnn_1x"
    expected = f"{recipe}_{variant}" if variant == "msvmamba_tiny" else f"{recipe}_common"
    assert plan.experiment == expected
    backbone, head, _, _ = fit_dense(plan, weights, meta=True)
    parameters = sum(p.numel() for module in (backbone, head) for p in module.parameters())
    assert abs(parameters / 1e6 - MSVMAMBA_PUBLISHED[(variant, framework)]) < 0.5


@pytest.mark.parametrize("framework", ["mmseg", "mmdet"])
def test_msvmamba_dense_files_convert_into_run_py_models(framework, ade_dir, coco_dir, tmp_path):
    from run import build_task

    state = upernet_file(variant="test_msvmamba") if framework == "mmseg" else maskrcnn_file(variant="test_msvmamba")
    path = rf.save({"state_dict": state}, tmp_path / "official.pth")
    assert main([str(path), "test_msvmamba", "--out", str(tmp_path / "w")]) == 0
    weights, meta = read_task_weights(tmp_path / "w")
    data = f"data.root={ade_dir}" if framework == "mmseg" else f"data.root={coco_dir}"
    cfg = compose_config([f"experiment={meta['experiment']}", *meta["overrides"], data, "data.num_workers=0"],
                         tmp_path)
    datamodule, task = build_task(cfg)
    load_task_weights(task, tmp_path / "w", cfg.backbone.name, cfg.head._target_, datamodule)
    assert torch.equal(task.backbone.model.stages[1].blocks[0].mixer.conv2d_low.weight,
                       state["backbone.layers.1.blocks.0.op.conv2d_b1.weight"])
    assert torch.equal(task.backbone.model.feature_norms[3].weight, state["backbone.outnorm3.weight"])


def _hrvmamba_dense_backbone(variant: str) -> rf.Shapes:
    """HRVMamba's segmentation backbone (``Backbone_HRVMamba``): the classifier without ``head`` (its neck kept,
    ``final_layer`` included) plus ``outnorm{i}`` on the neck's four levels, official names under ``backbone.``."""
    import timm


    with torch.device("meta"):
        model = timm.create_model(variant, num_classes=0, dense_features="neck")
    return {"backbone." + re.sub(r"^feature_norms\.(\d+)\.", r"outnorm\1.", hrvmamba_official_key(k)): tuple(v.shape)
            for k, v in model.state_dict().items()}


def test_hrvmamba_released_upernet_fits_its_experiment_exactly():
    """HRVMamba-Base UperNet 160k (README: 99M parameters, 51.4 mIoU): UperNet on the neck's 128/256/512/2048
    levels, as ``ade20k_upernet_hrvmamba_base`` builds it."""
    shapes = {**_hrvmamba_dense_backbone("hrvmamba_base"), **rf.mmseg_upernet((128, 256, 512, 2048), 150)}
    weights = rf.materialise(shapes, meta=True)
    plan = plan_dense({}, weights, "hrvmamba_base")
    assert (plan.experiment, plan.overrides) == ("ade20k_upernet_hrvmamba_base", [])
    backbone, head, _, _ = fit_dense(plan, weights, meta=True)
    parameters = sum(p.numel() for module in (backbone, head) for p in module.parameters())
    assert abs(parameters / 1e6 - 99) < 1  # 99.86 M: the README gives whole millions


def test_hrvmamba_upernet_file_converts_with_the_neck_features(ade_dir, tmp_path, capsys):
    from run import build_task

    channels = (16, 16, 32, 64)  # test_hrvmamba's neck levels
    shapes = {**_hrvmamba_dense_backbone("test_hrvmamba"),
              **rf.mmseg_upernet(channels, 150, channels=32, aux_channels=16)}
    state = rf.materialise(shapes)
    path = rf.save({"state_dict": state}, tmp_path / "hrvmamba_upernet.pth")
    assert main([str(path), "test_hrvmamba", "--out", str(tmp_path / "x")]) == 1  # the branch features do not fit
    assert "its backbone fits no registered hrvmamba variant" in capsys.readouterr().err
    assert main([str(path), "test_hrvmamba", "--out", str(tmp_path / "w"),
                 "--override", "+backbone.dense_features=neck"]) == 0
    weights, meta = read_task_weights(tmp_path / "w")
    assert "+backbone.dense_features=neck" in meta["overrides"]
    cfg = compose_config([f"experiment={meta['experiment']}", *meta["overrides"], f"data.root={ade_dir}",
                          "data.num_workers=0"], tmp_path)
    datamodule, task = build_task(cfg)
    load_task_weights(task, tmp_path / "w", cfg.backbone.name, cfg.head._target_, datamodule)
    assert torch.equal(task.backbone.model.feature_norms[3].bias, state["backbone.outnorm3.bias"])
    assert torch.equal(task.backbone.model.neck.final_layer.conv.weight, state["backbone.neck.final_layer.conv.weight"])
    with torch.no_grad():
        task.eval()
        logits = task.predict_logits(torch.randn(1, 3, 64, 96))
    assert logits.shape == (1, 150, 64, 96) and torch.isfinite(logits).all()


def _vim_seg_backbone(dim: int, depth: int, d_state: int, grid: int) -> rf.Shapes:
    """The official Vim-Ti segmentation backbone (``VisionMambaSeg``, mmseg 0.x, ``if_cls_token=False``): the
    classifier's blocks without head or class token, one position row per patch, and the ``fpn1``-``fpn4``
    pyramid (two transposed convs with SyncBN + GELU between them, one transposed conv, identity, max-pool)."""
    d_inner, rank = 2 * dim, -(-dim // 16)
    shapes = {"pos_embed": (1, grid * grid, dim), "patch_embed.proj.weight": (dim, 3, 16, 16),
              "patch_embed.proj.bias": (dim,), "norm_f.weight": (dim,)}
    for i in range(depth):
        p = f"layers.{i}."
        shapes.update({p + "norm.weight": (dim,), p + "mixer.in_proj.weight": (2 * d_inner, dim),
                       p + "mixer.out_proj.weight": (dim, d_inner)})
        for suffix in ("", "_b"):
            shapes.update({p + f"mixer.conv1d{suffix}.weight": (d_inner, 1, 4), p + f"mixer.conv1d{suffix}.bias":
                           (d_inner,), p + f"mixer.x_proj{suffix}.weight": (rank + 2 * d_state, d_inner),
                           p + f"mixer.dt_proj{suffix}.weight": (d_inner, rank),
                           p + f"mixer.dt_proj{suffix}.bias": (d_inner,)})
        shapes.update({p + "mixer.A_log": (d_inner, d_state), p + "mixer.A_b_log": (d_inner, d_state),
                       p + "mixer.D": (d_inner,), p + "mixer.D_b": (d_inner,)})
    for name in ("fpn1.0", "fpn1.3", "fpn2.0"):
        shapes.update({f"{name}.weight": (dim, dim, 2, 2), f"{name}.bias": (dim,)})
    shapes.update({f"fpn1.1.{k}": (dim,) for k in ("weight", "bias", "running_mean", "running_var")})
    shapes["fpn1.1.num_batches_tracked"] = ()
    return {f"backbone.{k}": v for k, v in shapes.items()}


# The official Vim-Ti UperNet (hustvl/Vim seg/configs/vim/upernet/upernet_vim_tiny_24_512_slide_60k.py) as run.py
# builds it: no class token, 512-pixel grid, taps of the mixer output; the head width (192) follows from the file.
VIM_SEG = ["+backbone.class_token=false", "+backbone.img_size=512", "+backbone.feature_stream=hidden"]


@pytest.mark.parametrize("img_size", [512, 1024])
def test_vim_official_upernet_layout_fits_and_has_the_logged_size(img_size):
    """Full size on the meta device. The official benchmark log (seg/tools/analysis_tools/vim-t-upernet.txt) counts
    12,901,100 parameters for the model built at 1024 pixels (a 64 x 64 position grid): ours has exactly that,
    but for ``norm_f`` (192), which the segmentation model never uses."""
    grid = img_size // 16
    shapes = {**_vim_seg_backbone(192, 24, 16, grid), **rf.mmseg_upernet([192] * 4, 150, channels=192)}
    weights = rf.materialise(shapes, meta=True)
    overrides = [*VIM_SEG[:1], f"+backbone.img_size={img_size}", *VIM_SEG[2:]]
    plan = plan_dense({}, weights, "vim_tiny_patch16_224", overrides=overrides)
    assert (plan.experiment, plan.overrides) == ("ade20k_upernet_vim_tiny_patch16_224",
                                                 [*overrides, "head.channels=192"])
    backbone, head, _, _ = fit_dense(plan, weights, meta=True)
    if img_size == 1024:
        assert sum(p.numel() for module in (backbone, head) for p in module.parameters()) + 192 == 12_901_100


def test_vim_upernet_file_in_mmseg_0x_layout_converts_and_taps_the_mixer_output(ade_dir, tmp_path):
    from run import build_task

    state = rf.materialise({**_vim_seg_backbone(16, 4, 4, 4), **rf.mmseg_upernet([16] * 4, 150, channels=32,
                                                                                  aux_channels=16)})
    state["backbone.rope.freqs_cos"] = torch.ones(16, 8)  # saved by some versions whether or not rope is used
    path = rf.save(rf.mmcv_checkpoint(state, [f"c{i}" for i in range(150)], [[0, 0, 0]] * 150), tmp_path / "v.pth")
    overrides = [f"--override={o}" for o in ("+backbone.class_token=false", "+backbone.img_size=64",
                                             "+backbone.feature_stream=hidden")]
    assert main([str(path), "test_vim", "--out", str(tmp_path / "w"), *overrides]) == 0
    weights, meta = read_task_weights(tmp_path / "w")
    assert meta["source"]["layout"] == "mmseg 0.x" and meta["classes"][:1] == ["c0"]
    assert torch.equal(weights["backbone.model.feature_pyramid.0.3.weight"], state["backbone.fpn1.3.weight"])
    assert torch.equal(weights["backbone.model.pos_embed"], state["backbone.pos_embed"])
    cfg = compose_config([f"experiment={meta['experiment']}", *meta["overrides"], f"data.root={ade_dir}",
                          "data.num_workers=0"], tmp_path)
    datamodule, task = build_task(cfg)
    load_task_weights(task, tmp_path / "w", cfg.backbone.name, cfg.head._target_, datamodule)
    model = task.backbone.model.eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():  # the stride-16 level is the last tap's mixer output itself (fpn3 is the identity)
        hidden, residual = model._tokens(x)[0], None
        for block in model.layers:
            hidden, residual = block(hidden, residual)
        expected = hidden.transpose(1, 2).reshape(1, 16, 4, 4)
        torch.testing.assert_close(task.backbone(x)[2], expected)


def test_upernet_file_converts_and_run_py_evaluates_it(ade_dir, tmp_path, capsys):
    state = upernet_file()
    checkpoint = rf.mmengine_checkpoint(state, [f"class{i}" for i in range(150)], [[i, i, i] for i in range(150)])
    path = rf.save(checkpoint, tmp_path / "upernet_vssm_4xb4-160k_ade20k-512x512_test_iter_160000.pth")
    out = tmp_path / "converted"
    assert main([str(path), "test_vmamba", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    overrides = ["backbone=test_vmamba", "head.channels=32", "head.aux_channels=16"]
    assert "a UperNet (UPerHead + FCNHead) with 150 classes (mmseg 1.x) from state_dict" in printed
    assert f"evaluate: python run.py mode=eval experiment=ade20k_upernet_common {' '.join(overrides)} " \
           f"weights={out}" in printed
    weights, meta = read_task_weights(out)
    assert meta == json.loads((out / "mambalab.json").read_text())
    assert (meta["experiment"], meta["overrides"], meta["backbone"], meta["head"], meta["num_classes"]) == (
        "ade20k_upernet_common", overrides, "test_vmamba", "heads.UperNet", 150)
    assert meta["classes"][:2] == ["class0", "class1"] and meta["source"]["layout"] == "mmseg 1.x"
    # Every tensor of the file, renamed: the family's rules for the backbone, mmseg's own names for the head.
    assert len(weights) == len(state)
    renamed = {"backbone.model.stem.conv1.weight": "backbone.patch_embed.0.weight",
               "backbone.model.stages.2.downsample.conv.weight": "backbone.layers.1.downsample.1.weight",
               "backbone.model.stages.3.blocks.0.mixer.ssm.A_logs": "backbone.layers.3.blocks.0.op.A_logs",
               "backbone.model.feature_norms.2.bias": "backbone.outnorm2.bias",
               "head.decode_head.psp_modules.3.1.bn.running_var": "decode_head.psp_modules.3.1.bn.running_var",
               "head.auxiliary_head.conv_seg.weight": "auxiliary_head.conv_seg.weight"}
    for ours, official in renamed.items():
        assert torch.equal(weights[ours], state[official]), ours
    result = run_cli(["mode=eval", "experiment=ade20k_upernet_common", *overrides, f"weights={out}",
                      f"data.root={ade_dir}", "data.num_workers=0", "trainer=cpu", "logger=csv",
                      "print_config=false", f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    assert f"weights: {out} loaded into backbone, head (converted from {path.name})" in output
    assert re.search(r"test/mIoU = [0-9.]+", output)


def test_fine_tuning_starts_from_the_converted_weights(ade_dir, tmp_path):
    from run import build_task

    state = upernet_file()
    path = rf.save(rf.mmcv_checkpoint(state, [f"c{i}" for i in range(150)], [[0, 0, 0]] * 150), tmp_path / "u.pth")
    assert main([str(path), "test_vmamba", "--out", str(tmp_path / "w")]) == 0
    cfg = compose_config(["experiment=ade20k_upernet_common", "backbone=test_vmamba", "head.channels=32",
                          "head.aux_channels=16", f"data.root={ade_dir}", "data.num_workers=0",
                          f"weights={tmp_path / 'w'}"], tmp_path)
    datamodule, task = build_task(cfg)
    load_task_weights(task, cfg.weights, cfg.backbone.name, cfg.head._target_, datamodule)
    weights, meta = read_task_weights(tmp_path / "w" / "model.safetensors")
    assert meta["source"]["layout"] == "mmseg 0.x" and meta["classes"][0] == "c0"
    for key, value in task.state_dict().items():
        if key.startswith(("backbone.", "head.")):
            assert torch.equal(value, weights[key]), key


def test_maskrcnn_file_converts_into_torchvision_layout_and_run_py_evaluates_it(coco_dir, tmp_path, capsys):
    state = maskrcnn_file()
    checkpoint = rf.mmengine_checkpoint(state, ["person", "car", "train"], [[220, 20, 60]] * 3)
    path = rf.save(checkpoint, tmp_path / "mask_rcnn_vssm_fpn_coco_test_epoch_12.pth")
    out = tmp_path / "converted"
    assert main([str(path), "test_vmamba", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "a Mask R-CNN (FPN, RPN, 2-FC box head, FCN mask head) with 3 classes (mmdet 3.x)" in printed
    overrides = ["backbone=test_vmamba", "head.fpn_channels=32", "head.representation_size=64", "head.mask_channels=16"]
    weights, meta = read_task_weights(out)
    assert meta["overrides"] == overrides and meta["experiment"] == "coco_maskrcnn_1x_common"
    # Background: mmdet's last classifier row is torchvision's first; deltas and masks get a zero background slot.
    cls = weights["head.roi_heads.box_predictor.cls_score.weight"]
    assert torch.equal(cls[0], state["roi_head.bbox_head.fc_cls.weight"][3])
    assert torch.equal(cls[1:], state["roi_head.bbox_head.fc_cls.weight"][:3])
    deltas = weights["head.roi_heads.box_predictor.bbox_pred.weight"]
    assert not deltas[:4].any() and torch.equal(deltas[4:], state["roi_head.bbox_head.fc_reg.weight"])
    masks = weights["head.roi_heads.mask_predictor.mask_fcn_logits.weight"]
    assert not masks[0].any() and torch.equal(masks[1:], state["roi_head.mask_head.conv_logits.weight"])
    assert torch.equal(weights["head.fpn.inner_blocks.2.0.weight"], state["neck.lateral_convs.2.conv.weight"])
    assert torch.equal(weights["head.rpn.head.conv.0.0.bias"], state["rpn_head.rpn_conv.bias"])
    assert torch.equal(weights["head.roi_heads.box_head.fc7.weight"], state["roi_head.bbox_head.shared_fcs.1.weight"])
    assert torch.equal(weights["head.roi_heads.mask_head.3.0.weight"], state["roi_head.mask_head.convs.3.conv.weight"])
    result = run_cli(["mode=eval", "experiment=coco_maskrcnn_1x_common", *overrides, f"weights={out}",
                      f"data.root={coco_dir}", "data.num_workers=0", "head.min_size=64", "head.max_size=128",
                      "trainer=cpu", "print_config=false", f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert re.search(r"test/bbox_mAP = [-0-9.]+", result.stdout + result.stderr)


def test_a_faster_rcnn_and_a_head_without_auxiliary_branch_follow_the_file(tmp_path):
    no_masks = {k: v for k, v in maskrcnn_file().items() if not k.startswith("roi_head.mask_head.")}
    plan = plan_dense({}, no_masks, "test_vmamba")
    assert "head.with_masks=false" in plan.overrides and plan.dense.head.startswith("Faster R-CNN")
    fit_dense(plan, no_masks)
    no_aux = {k: v for k, v in upernet_file().items() if not k.startswith("auxiliary_head.")}
    plan = plan_dense({}, no_aux, "test_vmamba")
    assert "head.aux_index=null" in plan.overrides
    fit_dense(plan, no_aux)


def test_wrong_combinations_name_what_the_file_holds(tmp_path, capsys):
    s2l5 = {**_test_backbone(RELEASES["vmamba_tiny_s2l5"][0], (96, 192, 384, 768)),
            **rf.mmseg_upernet((96, 192, 384, 768), 150)}
    weights = rf.materialise(s2l5, meta=True)
    with pytest.raises(ValueError, match=r"the file holds a UperNet \(UPerHead \+ FCNHead\) with 150 classes "
                                         r"\(mmseg \(no meta\)\); its backbone fits vmamba_tiny_s2l5, not "
                                         r"vmamba_tiny_s1l8"):
        fit_dense(plan_dense({}, weights, "vmamba_tiny_s1l8"), weights, meta=True)
    detector = rf.save(rf.mmengine_checkpoint(maskrcnn_file(), ["a", "b", "c"], [[0, 0, 0]] * 3), tmp_path / "d.pth")
    assert main([str(detector), "test_vmamba", "--experiment", "ade20k_upernet_common"]) == 1
    assert ("the file holds a Mask R-CNN (FPN, RPN, 2-FC box head, FCN mask head) with 3 classes (mmdet 3.x), but "
            "experiment=ade20k_upernet_common builds heads.UperNet") in capsys.readouterr().err
    assert main([str(detector), "test_msvmamba", "--out", str(tmp_path / "x")]) == 1
    assert "its backbone fits no registered msvmamba variant" in capsys.readouterr().err
    no_outnorm = {k: v for k, v in upernet_file().items() if ".outnorm" not in k}
    with pytest.raises(ValueError, match="its backbone lacks 8 tensors of the dense backbone"):
        fit_dense(plan_dense({}, no_outnorm, "test_vmamba"), no_outnorm)
    classifier = rf.save({"model": vmamba_official(**TEST_VMAMBA, num_classes=5)}, tmp_path / "cls.pth")
    assert main([str(classifier), "test_vmamba", "--experiment", "ade20k_upernet_common"]) == 1
    assert "--experiment/--override apply to UperNet / Mask R-CNN and VM-UNet / MHS-VM checkpoints" in \
        capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_run_py_refuses_weights_made_for_another_model(ade_dir, tmp_path):
    from run import build_task

    cityscapes = rf.save({"state_dict": upernet_file(num_classes=19)}, tmp_path / "cityscapes.pth")
    assert main([str(cityscapes), "test_vmamba", "--out", str(tmp_path / "w19")]) == 0
    base = ["experiment=ade20k_upernet_common", "head.channels=32", "head.aux_channels=16", f"data.root={ade_dir}",
            "data.num_workers=0"]
    for overrides, message in ((["backbone=test_vmamba"], "num_classes 19 (this run: 150)"),
                               (["backbone=test_msvmamba"], "backbone 'test_vmamba' (this run: 'test_msvmamba')")):
        cfg = compose_config([*base, *overrides], tmp_path)
        datamodule, task = build_task(cfg)
        with pytest.raises(ValueError, match=re.escape(message)):
            load_task_weights(task, tmp_path / "w19", cfg.backbone.name, cfg.head._target_, datamodule)
    with pytest.raises(FileNotFoundError, match="weights=.*nope: no such file"):
        read_task_weights(tmp_path / "nope")


@pytest.mark.parametrize("experiment,norms", [("ade20k_upernet_vmamba_tiny_s1l8", True),
                                              ("coco_maskrcnn_1x_msvmamba_tiny", True),
                                              ("synapse_msvmunet_vmamba_tiny", False),
                                              ("acdc_msvmunet_vmamba_tiny", False), ("synapse_vmunet", False),
                                              ("isic18_vmunet", False)])
def test_per_level_norms_only_where_the_official_dense_models_have_them(experiment, norms, tmp_path):
    """UperNet / Mask R-CNN backbones normalise each level (Backbone_VSSM's outnorm); the U-Net encoders of
    VM-UNet and MSVM-UNet pass their stages' outputs on as they are."""
    import hydra

    cfg = compose_config([f"experiment={experiment}"], tmp_path)
    with torch.device("meta"):
        backbone = hydra.utils.instantiate(cfg.backbone, in_chans=3, features_only=True)
    assert (backbone.model.feature_norms is not None) == norms
